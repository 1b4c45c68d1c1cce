"""Direction estimators on synthetic activations: planted truth, provenance, strict input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mci_interp.activations import ActivationCache
from mci_interp.compare import cosine
from mci_interp.direction import Direction, DirectionSet
from mci_interp.extract import (
    Contrast,
    DiffMeans,
    LinearProbe,
    SaeLatents,
    SaeTrainConfig,
    clone,
    data_diff,
    extract,
    latent_directions,
    model_contrast,
    model_diff,
    prompt_diff,
    sweep,
    train_sae,
)
from mci_interp.sites import Site

SAE_CONFIGS = Path(__file__).resolve().parents[2] / "sae_configs"


def planted(n_groups=60, per_group=16, d=64, signal=6.0, seed=0):
    """Rows = prompt offset + unit noise + signal * v on label 1 (labels mixed within prompts)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v /= v.norm()
    groups = np.repeat(np.arange(n_groups), per_group)
    y = torch.as_tensor(np.tile(np.arange(per_group) % 2, n_groups))
    offsets = 0.5 * torch.randn(n_groups, d, generator=g, dtype=torch.float64)
    X = offsets[groups] + torch.randn(len(groups), d, generator=g, dtype=torch.float64)
    X += signal * y.double().unsqueeze(1) * v
    return X.float(), y, [f"q{k}" for k in groups], v


SITE3 = Site(3)


def fake_cache(
    X, y, groups, *, site=SITE3, model="ft", base="base", sha="s1", data="h1", row_example=None
):
    n_ex = len(groups)
    return ActivationCache(
        acts={site: torch.as_tensor(X, dtype=torch.float32)},
        row_example=torch.arange(len(y)) if row_example is None else row_example,
        labels=torch.as_tensor(y).long(),
        groups=list(groups),
        meta={
            "model": model,
            "base_model": base,
            "model_sha256": sha,
            "dataset_hash": data,
            "position": "last_prompt",
            "n_examples": n_ex,
        },
    )


# --- planted truth ---------------------------------------------------------------------------------
def test_diff_means_and_probe_recover_planted_direction():
    X, y, groups, v = planted()
    dm = DiffMeans().fit(X, y, groups)
    assert cosine(dm.direction_, v) > 0.99
    assert dm.direction_.dtype == torch.float64
    probe = LinearProbe(cv=5, C=0.1).fit(X, y, groups)
    assert cosine(probe.direction_, v) > 0.95
    assert probe.auroc_ > 0.95 and len(probe.auroc_folds_) == 5
    assert probe.grouped_ and probe.n_groups_ == 60


def test_probe_direction_is_mapped_back_to_raw_space():
    """Rescaling features (units) changes nothing after standardisation, so the raw-space weight
    must transform as w(X S) = S^-1 w(X) and the decision function must not change."""
    d = 24
    X, y, groups, v = planted(d=d, n_groups=40, per_group=10)
    scales = torch.logspace(-1, 1.5, d, dtype=torch.float64)
    a = LinearProbe(C=0.1, ungrouped_baseline=False).fit(X, y, groups)
    b = LinearProbe(C=0.1, ungrouped_baseline=False).fit(X.double() * scales, y, groups)
    assert np.allclose(b.coef_raw_, a.coef_raw_ / scales.numpy(), rtol=1e-4, atol=1e-7)
    assert torch.allclose(
        b.decision_function(X.double() * scales), a.decision_function(X), atol=1e-4
    )
    assert cosine(a.direction_, v) > 0.95  # isotropic noise: the raw weight is the planted vector
    x = X.double().numpy()
    manual = ((x - a.mean_) / a.scale_) @ a.coef_ + a.intercept_
    assert np.allclose(a.decision_function(X).numpy(), manual, atol=1e-8)


def test_prompt_identity_baseline_exposes_prompt_leakage():
    """Labels are a property of prompts; prompt offsets carry them, there is no concept."""
    g = torch.Generator().manual_seed(1)
    n_groups, per, d = 40, 10, 16
    groups = np.repeat(np.arange(n_groups), per)
    y = torch.as_tensor(groups % 2)
    X = 3 * torch.randn(n_groups, d, generator=g)[groups] + torch.randn(len(groups), d, generator=g)
    probe = LinearProbe(cv=5).fit(X, y, [f"p{k}" for k in groups])
    assert probe.prompt_identity_auroc_ > 0.95  # row-level CV: prompt identity alone suffices
    assert probe.auroc_ungrouped_ > 0.8  # and a row-level probe looks good
    assert probe.auroc_ < 0.75  # but held-out prompts show there is nothing general
    assert probe.auroc_ungrouped_ - probe.auroc_ > 0.2
    summary = probe.fit_summary()
    assert summary["prompt_identity_auroc"] == pytest.approx(probe.prompt_identity_auroc_, abs=1e-6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_groups=st.integers(4, 30), cv=st.integers(2, 4), seed=st.integers(0, 10_000))
@example(n_groups=4, cv=4, seed=688)  # every class with fewer rows than folds (found by CI)
def test_grouped_cv_never_splits_a_prompt(n_groups, cv, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_groups)
    groups = np.repeat(np.arange(n_groups), sizes).astype(str)
    y = rng.integers(0, 2, len(groups))
    y[:2] = [0, 1]
    probe = LinearProbe(cv=cv, seed=seed)
    try:
        splits = list(probe.cv_splits(y, groups))
    except ValueError as e:  # a class in one prompt, or too few rows to fold: refused, by design
        assert "at least 2 prompts" in str(e) or "fewer rows than cv" in str(e)
        return
    assert len(splits) == cv
    seen_test = np.concatenate([te for _, te in splits])
    assert sorted(seen_test) == list(range(len(groups)))  # every row tested exactly once
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])


def test_diff_means_example_vs_token_weighting():
    # example 0: 3 tokens of label 1; example 1: 1 token of label 1; examples 2, 3: label 0
    X = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0.0, 4], [0, 0], [0, 2]])
    ex = torch.tensor([0, 0, 0, 1, 2, 3])
    y = torch.tensor([1, 1, 1, 1, 0, 0])
    tok = DiffMeans(weighting="token").fit(X, y, example_index=ex)
    exm = DiffMeans(weighting="example").fit(X, y, example_index=ex)
    assert torch.allclose(tok.direction_, torch.tensor([0.75, 1.0 - 1.0], dtype=torch.float64))
    assert torch.allclose(exm.direction_, torch.tensor([0.5, 2.0 - 1.0], dtype=torch.float64))
    assert (tok.n_pos_, exm.n_pos_) == (4, 2)
    with pytest.raises(ValueError, match="both labels"):
        DiffMeans().fit(X, torch.tensor([1, 0, 1, 1, 0, 0]), example_index=ex)


def test_sae_latents_find_planted_latent_and_control_removes_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, n_feat, n = 32, 48, 3000
    D = torch.randn(n_feat, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)

    def sample(p_plant):
        on = (torch.rand(n, n_feat, generator=g) < 0.06).float()
        acts = on * (0.5 + torch.rand(n, n_feat, generator=g))
        acts[:, 0] = (torch.rand(n, generator=g) < p_plant).float() * (
            1 + torch.rand(n, generator=g)
        )
        return acts @ D + 0.01 * torch.randn(n, d, generator=g)

    base, ft, ctrl = sample(0.02), sample(0.5), sample(0.5)
    X, y = torch.cat([ft, base]), torch.cat([torch.ones(n), torch.zeros(n)])
    est = SaeLatents(config=str(SAE_CONFIGS / "tiny_test.yaml"), top_k=3).fit(X, y)
    assert abs(cosine(est.direction_, D[0])) > 0.8
    assert est.decoder_.shape == (3, d)
    assert est.train_metrics_["fvu"] < 0.5 and est.train_metrics_["samples_per_s"] > 0
    # the same SAE, scored against a control finetune that shows the same increase
    ctl = SaeLatents(top_k=3, sae=est.sae_).fit(X, y, control=ctrl)
    top_id = int(est.latents_[0])
    assert abs(float(ctl.scores_[top_id])) < 0.2 * float(est.scores_[top_id])
    # a saved SAE loads back from a local directory and ranks the same latents
    est.sae_.save_model(tmp_path / "sae")
    loaded = SaeLatents(sae_path=str(tmp_path / "sae"), top_k=3).fit(X, y)
    assert torch.equal(loaded.latents_, est.latents_)
    # extract + latent_directions turn the top-k into Directions with provenance
    lat = SaeLatents(sae_path=str(tmp_path / "sae"), top_k=2)
    top = extract(lat, X, y, site="blocks.3.hook_resid_post", model="ft")
    assert top.provenance.method == "sae_latent" and top.provenance.params["latent"] == int(
        est.latents_[0]
    )
    both = latent_directions(lat, top)
    assert len(both) == 2 and [x.provenance.params["rank"] for x in both] == [0, 1]
    assert torch.allclose(both[0].vector, top.vector)
    # wrong hook or width is refused, naming both
    est.sae_.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match="blocks.3.hook_resid_post.*blocks.9.hook_resid_post"):
        SaeLatents(hook_name="blocks.9.hook_resid_post", sae=est.sae_).fit(X, y)
    with pytest.raises(ValueError, match="d_in=32.*d_model=16"):
        SaeLatents(sae=est.sae_).fit(X[:, :16], y)
    est.sae_.save_model(tmp_path / "sae_l3")  # extract checks the site against the SAE's hook
    with pytest.raises(ValueError, match="blocks.3.hook_resid_post.*blocks.9.hook_resid_post"):
        extract(SaeLatents(sae_path=str(tmp_path / "sae_l3")), X, y, site=Site(9))
    assert extract(SaeLatents(sae_path=str(tmp_path / "sae_l3")), X, y, site=Site(3)).site == Site(
        3
    )


def test_sae_config_is_strict():
    cfg = SaeTrainConfig.from_yaml(SAE_CONFIGS / "smollm2_l15_batchtopk.yaml")
    assert cfg.d_in == 576 and cfg.hook_name == "blocks.15.hook_resid_post" and cfg.lr_end
    with pytest.raises(ValueError, match="unknown SAE config keys"):
        SaeTrainConfig.from_dict({"d_sae": 8, "k": 2, "dsae": 3})
    with pytest.raises(ValueError, match="d_in=576.*d_in=32"):
        train_sae(torch.randn(300, 32), cfg.replace(training_samples=2048))
    with pytest.raises(ValueError, match="blocks.15.*blocks.2"):
        train_sae(
            torch.randn(300, 576),
            cfg.replace(training_samples=2048),
            hook_name="blocks.2.hook_resid_post",
        )


# --- extract / sweep / flavours ----------------------------------------------------------------------
def test_extract_from_cache_and_sweep_build_provenance(tmp_path):
    X, y, groups, v = planted(n_groups=30, per_group=6, d=16)
    cache = fake_cache(X, y, groups)
    cache.acts[Site(4)] = cache.acts[Site(3)] * 2
    d = extract("probe", cache, site="blocks.3.hook_resid_post", params={"cv": 3})
    p = d.provenance
    assert (p.method, p.model, p.base_model, p.dataset_hash, p.position) == (
        "probe",
        "ft",
        "base",
        "h1",
        "last_prompt",
    )
    assert (p.n_pos, p.n_neg) == (90, 90)
    assert (
        p.params["cv"] == 3
        and 0.9 < p.params["auroc"] <= 1.0
        and p.params["flavour"] == "data_diff"
    )
    ds = sweep(DiffMeans(), cache)
    assert [x.site.layer for x in ds] == [3, 4]
    assert cosine(ds[0].vector, v) > 0.95
    assert ds[1].norm == pytest.approx(2 * ds[0].norm, rel=1e-5)
    loaded = DirectionSet.load(ds.save(tmp_path / "sweep"))
    assert torch.equal(loaded[1].vector, ds[1].vector)
    assert loaded[1].provenance == ds[1].provenance
    with pytest.raises(ValueError, match="several sites"):
        extract("diff_means", cache)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    d=st.integers(2, 40), seed=st.integers(0, 1000), method=st.sampled_from(["diff_means", "probe"])
)
def test_produced_directions_round_trip(tmp_path, d, seed, method):
    X, y, groups, _ = planted(n_groups=10, per_group=4, d=d, seed=seed)
    est = DiffMeans() if method == "diff_means" else LinearProbe(cv=2, ungrouped_baseline=False)
    direction = extract(
        est,
        X,
        y,
        groups,
        site=Site(seed % 30, "resid_pre"),
        model="m",
        dataset="toy",
        dataset_hash="abc",
        position="answer_mean",
    )
    back = Direction.load(direction.save(tmp_path / f"{method}_{d}_{seed}.safetensors"))
    assert torch.equal(back.vector, direction.vector)
    assert back.site == direction.site and back.provenance == direction.provenance
    assert back.provenance.params == direction.provenance.params


def test_data_diff_drops_unlabelled_rows():
    X = torch.tensor([[2.0, 0], [0, 0], [100, 100]])
    cache = fake_cache(X, [1, 0, -1], ["a", "b", "c"])
    d = data_diff(cache)
    assert torch.allclose(d.vector, torch.tensor([2.0, 0]))
    assert (d.provenance.n_pos, d.provenance.n_neg) == (1, 1)


def test_model_and_prompt_diff_check_their_caches():
    g = torch.Generator().manual_seed(0)
    base_x = torch.randn(20, 8, generator=g)
    shift = torch.zeros(8)
    shift[2] = 1.5
    groups = [f"q{i}" for i in range(20)]
    base = fake_cache(base_x, [-1] * 20, groups, model="base", sha="s0")
    ft = fake_cache(base_x + shift, [-1] * 20, groups, model="ft", sha="s1")
    d = model_diff(ft, base)
    assert torch.allclose(d.vector, shift, atol=1e-6)
    assert d.provenance.params["reference_model"] == "base"
    assert d.provenance.params["flavour"] == "model_diff"
    c = model_contrast(ft, base)
    assert isinstance(c, Contrast) and c.groups[0] == c.groups[20]  # pairs share a prompt id
    probe = extract(LinearProbe(cv=4), c)
    assert probe.provenance.params["grouped"] is True
    with pytest.raises(ValueError, match="dataset_hash h1 vs h2"):
        model_diff(ft, fake_cache(base_x, [-1] * 20, groups, model="base", data="h2"))
    with pytest.raises(ValueError, match="base 'base'.*base 'other'"):
        model_diff(ft, fake_cache(base_x, [-1] * 20, groups, model="b2", base="other"))
    wide = fake_cache(torch.randn(20, 12), [-1] * 20, groups, model="wide")
    with pytest.raises(ValueError, match="d_model 8.*d_model 12"):
        model_diff(ft, wide)
    persona = fake_cache(base_x + 2 * shift, [-1] * 20, groups, model="base", sha="s0", data="h9")
    pd = prompt_diff(persona, base)
    assert torch.allclose(pd.vector, 2 * shift, atol=1e-6)
    with pytest.raises(ValueError, match="different models"):
        prompt_diff(persona, ft)


def test_bad_inputs_are_refused_with_a_fix():
    X, y, groups, _ = planted(n_groups=6, per_group=4, d=8)
    with pytest.raises(ValueError, match="one class"):
        DiffMeans().fit(X, torch.ones(len(y)))
    Xn = X.clone()
    Xn[5, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf.*row 5"):
        LinearProbe().fit(Xn, y, groups)
    with pytest.raises(ValueError, match="only 6 groups.*cv=10"):
        LinearProbe(cv=10).fit(X, y, groups)
    with pytest.raises(ValueError, match="labels 0 .* and 1"):
        DiffMeans().fit(X, y + 1)
    with pytest.raises(ValueError, match="unknown method"):
        extract("pca", X, y, site=Site(1))
    with pytest.raises(ValueError, match="weighting"):
        DiffMeans(weighting="tokens").fit(X, y)
    with pytest.raises(ValueError, match="not fitted"):
        DiffMeans().fit_summary()


def test_estimators_follow_sklearn_conventions():
    p = LinearProbe(C=0.3, cv=3)
    assert p.get_params()["C"] == 0.3 and not any(k.endswith("_") for k in vars(p))
    q = clone(p)
    assert q.get_params() == p.get_params() and q is not p
    X, y, groups, _ = planted(n_groups=12, per_group=4, d=8)
    assert p.fit(X, y, groups) is p
    assert not hasattr(q, "direction_")
    with pytest.raises(ValueError, match="Invalid parameter 'c'"):
        p.set_params(c=1.0)
