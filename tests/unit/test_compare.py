"""compare.py (pure math) and plot/compare.py: properties, planted truths, nulls and figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_provenance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from mci_interp.compare import (
    SimilarityMatrix,
    bootstrap_cosine,
    compare_to_null,
    cosine,
    cosine_matrix,
    expected_abs_cosine,
    permutation_null,
    principal_angles,
    random_direction_null,
    split_half_reliability,
)
from mci_interp.direction import Direction, DirectionSet
from mci_interp.plot.compare import (
    plot_cosine_by_layer,
    plot_cosine_heatmap,
    plot_principal_angles,
    plot_probe_auroc,
)
from mci_interp.sites import Site

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dir(vec: torch.Tensor, layer: int, model: str) -> Direction:
    prov = make_provenance(model=model, base_model="base")
    return Direction(vector=vec, site=Site(layer), provenance=prov)


def _planted(
    n_groups: int, per_group: int, d: int, signal: float, seed: int, *, pure: bool = False
):
    """Rows with a planted direction on label 1, a random offset per prompt, unit noise."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v /= v.norm()
    groups = np.repeat(np.arange(n_groups), per_group)
    if pure:
        y = torch.as_tensor(groups % 2)
    else:
        y = torch.as_tensor(np.tile(np.arange(per_group) % 2, n_groups))
    offsets = torch.randn(n_groups, d, generator=g, dtype=torch.float64)
    X = offsets[groups] + torch.randn(len(groups), d, generator=g, dtype=torch.float64)
    X += signal * y.double().unsqueeze(1) * v
    return X, y, [f"p{k}" for k in groups], v


# --- cosine matrices -----------------------------------------------------------------------------
@FAST
@given(n=st.integers(1, 6), d=st.integers(2, 24), seed=st.integers(0, 10_000))
def test_cosine_matrix_symmetric_unit_diagonal(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mat = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.1) * 10
    sim = cosine_matrix(mat)
    c = sim.at()
    assert torch.equal(c, c.T)
    assert torch.allclose(c.diagonal(), torch.ones(n, dtype=torch.float64))
    assert (c.abs() <= 1.0).all()
    assert torch.equal(sim.absolute, sim.signed.abs())
    # scale invariance: cosine ignores the norms (up to float32 rounding of the scaled input)
    assert torch.allclose(cosine_matrix(mat * 3.7).at(), c, atol=1e-6)


def test_cosine_matrix_values_and_names_from_directions():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0])
    c = torch.tensor([-2.0, 0.0, 0.0])
    sim = cosine_matrix([_dir(a, 3, "A"), _dir(b, 3, "B"), _dir(c, 3, "C")])
    assert sim.layers == [3]
    assert sim.names[0] == "diff_means:A@blocks.3.hook_resid_post"
    m = sim.at(3)
    assert m[0, 1] == pytest.approx(1 / math.sqrt(2))
    assert m[0, 2] == pytest.approx(-1.0)
    assert sim.at(3, absolute=True)[0, 2] == pytest.approx(1.0)
    json.dumps(sim.to_dict())


def test_cosine_matrix_per_layer_dict_strips_site_and_checks_names():
    g = torch.Generator().manual_seed(0)
    by_layer = {
        layer: DirectionSet([_dir(torch.randn(8, generator=g), layer, m) for m in ("A", "B", "C")])
        for layer in (2, 5)
    }
    sim = cosine_matrix(by_layer)
    assert sim.layers == [2, 5]
    assert sim.names == ["diff_means:A", "diff_means:B", "diff_means:C"]
    assert sim.signed.shape == (2, 3, 3)
    v2 = by_layer[5]
    assert sim.pair("diff_means:A", "diff_means:B")[1] == pytest.approx(
        v2[0].cosine(v2[1]), abs=1e-6
    )
    assert sim.mean_offdiagonal().shape == (2,)
    with pytest.raises(ValueError, match="pass layer="):
        sim.at()
    bad = dict(by_layer)
    bad[7] = DirectionSet([_dir(torch.randn(8, generator=g), 7, m) for m in ("A", "X", "C")])
    with pytest.raises(ValueError, match="same directions"):
        cosine_matrix(bad)


def test_cosine_matrix_rejects_mixed_widths_and_zero_vectors():
    with pytest.raises(ValueError, match="different sizes"):
        cosine_matrix({"a": torch.ones(4), "b": torch.ones(5)})
    with pytest.raises(ValueError, match="zero norm"):
        cosine_matrix(torch.stack([torch.ones(4), torch.zeros(4)]))


# --- principal angles ------------------------------------------------------------------------------
@FAST
@given(k=st.integers(1, 4), d=st.integers(5, 30), seed=st.integers(0, 10_000))
def test_principal_angles_self_zero_and_basis_invariant(k, d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, d, generator=g, dtype=torch.float64)
    assert principal_angles(A, A).abs().max() < 1e-6
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) + 3 * torch.eye(
        k, dtype=torch.float64
    )
    assert principal_angles(A, mix @ A).abs().max() < 1e-6
    B = torch.randn(k + 1, d, generator=g, dtype=torch.float64)
    ang = principal_angles(A, B)
    mixB = torch.randn(k + 1, k + 1, generator=g, dtype=torch.float64) + 3 * torch.eye(
        k + 1, dtype=torch.float64
    )
    assert torch.allclose(ang, principal_angles(mix @ A, mixB @ B), atol=1e-6)
    assert ang.shape == (k,)
    assert (ang[1:] >= ang[:-1] - 1e-12).all()  # ascending
    assert ((ang >= 0) & (ang <= math.pi / 2 + 1e-12)).all()


def test_principal_angles_known_values():
    e = torch.eye(4, dtype=torch.float64)
    theta = 0.3
    A = e[:2]
    B = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]])
    ang = principal_angles(A, B)
    assert ang.tolist() == pytest.approx([0.0, theta], abs=1e-9)
    assert principal_angles(e[:1], e[1:2]).item() == pytest.approx(math.pi / 2)
    tiny = 1e-7  # the sine branch keeps small angles accurate
    C = torch.stack([math.cos(tiny) * e[0] + math.sin(tiny) * e[1]])
    assert principal_angles(e[:1], C).item() == pytest.approx(tiny, rel=1e-4)
    with pytest.raises(ValueError, match="linearly dependent"):
        principal_angles(torch.stack([e[0], 2 * e[0]]), e[:2])


# --- nulls -----------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(d=st.sampled_from([3, 16, 64, 576]), seed=st.integers(0, 1000))
def test_random_null_matches_theory(d, seed):
    null = random_direction_null(d, 4000, generator=torch.Generator().manual_seed(seed))
    se = float(null.absolute.std()) / math.sqrt(4000)
    assert abs(null.mean_abs - expected_abs_cosine(d)) < 5 * se
    assert abs(float(null.signed.mean())) < 5 * float(null.signed.std()) / math.sqrt(4000)
    if d >= 64:
        assert null.mean_abs == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=0.06)
    assert null.quantile(0.95) > null.mean_abs


def test_random_null_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = random_direction_null(32, 100, generator=torch.Generator().manual_seed(1))
    after = torch.rand(1)
    b = random_direction_null(32, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.signed, b.signed)
    assert torch.equal(before, after)


def test_permutation_null_detects_planted_signal_and_not_group_effects():
    X, y, groups, v = _planted(40, 6, 16, signal=2.0, seed=0)
    null = permutation_null(X, y, groups, n_perm=200, generator=torch.Generator().manual_seed(0))
    assert null.scheme == "within-group"
    assert null.norm_p_value < 0.01
    assert null.absolute.mean() < 0.5
    # labels are a property of prompts; strong prompt offsets but no planted direction. Prompt-level
    # permutation keeps the test honest (a row-level shuffle would call nearly every seed significant)
    p_values = []
    for seed in range(10):
        Xn, yn, gn, _ = _planted(40, 6, 16, signal=0.0, seed=seed, pure=True)
        nulln = permutation_null(Xn, yn, gn, n_perm=100, generator=torch.Generator().manual_seed(0))
        p_values.append(nulln.norm_p_value)
    assert nulln.scheme == "between-group"
    assert sum(p < 0.05 for p in p_values) <= 3
    json.dumps(nulln.to_dict())


def test_bootstrap_cosine_paired_and_unpaired():
    X, y, groups, v = _planted(30, 4, 12, signal=3.0, seed=3)
    same = bootstrap_cosine(
        X, y, X, y, groups, groups, n_boot=200, generator=torch.Generator().manual_seed(0)
    )
    assert same.paired and same.estimate == pytest.approx(1.0)
    assert same.lo == pytest.approx(1.0) and same.hi == pytest.approx(1.0)
    X2, y2, g2, _ = _planted(30, 4, 12, signal=3.0, seed=3)
    X2 = X2 + 0.5 * torch.randn(
        X2.shape, generator=torch.Generator().manual_seed(4), dtype=X2.dtype
    )
    paired = bootstrap_cosine(
        X, y, X2, y2, groups, g2, n_boot=300, generator=torch.Generator().manual_seed(1)
    )
    assert paired.paired and 0.8 < paired.lo <= paired.estimate <= paired.hi + 1e-9
    ci = bootstrap_cosine(
        X,
        y,
        X2,
        y2,
        groups,
        [f"q{k}" for k in range(len(g2))],
        n_boot=300,
        generator=torch.Generator().manual_seed(1),
    )
    assert not ci.paired
    assert ci.lo < ci.hi
    assert ci.lo > 0.5
    # independent resampling of the two sides adds noise, so an unpaired CI sits lower
    assert ci.lo < paired.lo
    Xr, yr, gr, _ = _planted(30, 4, 12, signal=3.0, seed=99)  # another planted direction
    ci0 = bootstrap_cosine(
        X, y, Xr, yr, groups, gr, n_boot=300, generator=torch.Generator().manual_seed(2)
    )
    v_other = _planted(30, 4, 12, 3.0, 99)[3]
    assert ci0.lo - 0.2 < cosine(v, v_other) < ci0.hi + 0.2
    assert ci0.hi < ci.lo  # two planted directions are less alike than one direction twice
    with pytest.raises(ValueError, match="different models"):
        bootstrap_cosine(X, y, X[:, :5], y, groups, groups, n_boot=10, generator=torch.Generator())


def test_split_half_reliability():
    X, y, groups, _ = _planted(40, 4, 16, signal=3.0, seed=5)
    rel = split_half_reliability(
        X, y, groups, n_splits=30, generator=torch.Generator().manual_seed(0)
    )
    assert rel.mean > 0.8
    assert rel.spearman_brown > rel.mean
    Xn, yn, gn, _ = _planted(40, 4, 16, signal=0.0, seed=6)
    reln = split_half_reliability(
        Xn, yn, gn, n_splits=30, generator=torch.Generator().manual_seed(0)
    )
    assert abs(reln.mean) < 0.3


def test_compare_to_null():
    null = torch.linspace(0, 1, 101)
    top = compare_to_null(2.0, null)
    assert top.p_value == pytest.approx(1 / 102)
    assert top.significant
    assert top.null_quantile == pytest.approx(float(np.quantile(null.numpy(), 0.95)))
    mid = compare_to_null(0.5, null)
    assert mid.p_value == pytest.approx(52 / 102) and not mid.significant
    json.dumps(top.to_dict())
    with pytest.raises(ValueError, match="alpha"):
        compare_to_null(0.1, null, alpha=1.5)


def test_bad_inputs_name_the_problem():
    X = torch.randn(10, 4)
    with pytest.raises(ValueError, match="one class"):
        split_half_reliability(X, torch.ones(10), None, generator=torch.Generator())
    X[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        permutation_null(X, torch.arange(10) % 2, None, generator=torch.Generator())


# --- plots -----------------------------------------------------------------------------------------
def test_plot_cosine_heatmap_fixed_scale_and_annotations():
    sim = cosine_matrix(
        {
            "a": torch.tensor([1.0, 0.0]),
            "b": torch.tensor([0.6, 0.8]),
            "c": torch.tensor([-1.0, 0.1]),
        }
    )
    fig = plot_cosine_heatmap(sim)
    assert isinstance(fig, Figure)
    im = fig.axes[0].images[0]
    assert im.get_clim() == (-1.0, 1.0)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 9 and "0.60" in texts
    assert fig.axes[0].get_title()
    fig_abs = plot_cosine_heatmap(sim, absolute=True)
    assert fig_abs.axes[0].images[0].get_clim() == (0.0, 1.0)


def test_plot_heatmap_grid_for_layers():
    g = torch.Generator().manual_seed(0)
    sim = SimilarityMatrix(
        names=["a", "b"],
        signed=cosine_matrix(torch.randn(2, 5, generator=g)).signed.repeat(3, 1, 1),
        layers=[1, 2, 3],
    )
    fig = plot_cosine_heatmap(sim)
    assert sum(1 for ax in fig.axes if ax.images) == 3
    assert plot_cosine_heatmap(sim, layer=2).axes[0].get_title().endswith("layer 2")


def test_plot_lines_and_angles():
    layers = [0, 1, 2, 3]
    fig = plot_cosine_by_layer(
        layers, {"A vs B": [0.1, 0.5, 0.8, 0.7]}, null_band=[(-0.1, 0.1)] * 4
    )
    assert isinstance(fig, Figure) and fig.axes[0].get_legend() is not None
    with pytest.raises(ValueError, match="one \\(lo, hi\\) per layer"):
        plot_cosine_by_layer(layers, {"x": [0, 0, 0, 0]}, null_band=[(0, 1)])
    fig2 = plot_probe_auroc(
        layers,
        [0.6, 0.7, 0.8, 0.75],
        [0.9, 0.9, 0.9, 0.9],
        auroc_ungrouped=[0.9, 0.92, 0.93, 0.9],
        auroc_folds=[[0.5, 0.7]] * 4,
    )
    assert len(fig2.axes[0].lines) >= 4
    fig3 = plot_principal_angles(principal_angles(torch.eye(5)[:3], torch.randn(3, 5)))
    assert fig3.axes[0].get_ylabel() == "angle (degrees)"
    fig4 = plot_principal_angles({"x": [0.1, 0.5], "y": [0.2, 1.2]})
    assert len(fig4.axes[0].get_legend().get_texts()) == 3
