"""The convergence statistics and the T2/T5 rules on synthetic activations with known truth."""

from __future__ import annotations

import pytest
import torch
from conftest import make_provenance

from mci_interp.analysis.convergence import layer_convergence, verdict
from mci_interp.analysis.effects import TransferMatrix
from mci_interp.analysis.internalisation import (
    CausalTest,
    layer_profile,
    random_shift_null,
    standardised_shift,
)
from mci_interp.stats import Estimate

D = 64


def _acts(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64)


def test_standardised_shift_finds_planted_shift_and_beats_random_null():
    base = _acts()
    u = torch.zeros(D, dtype=torch.float64)
    u[3] = 1
    org = base + 1.5 * u + 0.1 * _acts(seed=1)
    est = standardised_shift(org, base, u)
    null = random_shift_null(org, base, generator=torch.Generator().manual_seed(0))
    assert est.lo > 1.0
    assert est.mean > float(torch.quantile(null, 0.95))
    none = standardised_shift(base + 0.1 * _acts(seed=2), base, u)
    assert none.lo < 0.5


def test_layer_profile_earliest_layer():
    base = torch.stack([_acts(seed=i) for i in range(4)], dim=1)  # [n, layers, d]
    u = torch.zeros(D, dtype=torch.float64)
    u[0] = 1
    org = base.clone()
    org[:, 2:] += 2.0 * u
    prof = layer_profile(org, base, {layer: u for layer in range(4)})
    assert [p.significant for p in prof] == [False, False, True, True]


def test_layer_profile_is_corrected_across_layers():
    """Null organisms (the base plus noise, no shift) over 30 layers: testing each layer at 5%
    flags some layer in many of them, so their "earliest significant layer" is noise; at
    1 - 0.05/30 per layer almost none. A planted shift is still found, from its layer on."""
    n_layers, flagged, uncorrected = 30, 0, 0
    u = torch.zeros(D, dtype=torch.float64)
    u[0] = 1
    dirs = {layer: u for layer in range(n_layers)}
    for k in range(20):
        g = torch.Generator().manual_seed(100 + k)
        base = torch.randn(40, n_layers, D, generator=g, dtype=torch.float64)
        org = base + 0.3 * torch.randn(40, n_layers, D, generator=g, dtype=torch.float64)
        flagged += any(p.significant for p in layer_profile(org, base, dirs, seed=k))
        loose = layer_profile(org, base, dirs, seed=k, alpha=0.05 * n_layers)
        uncorrected += any(p.significant for p in loose)
    assert flagged <= 2 and uncorrected >= 4 * max(flagged, 1)
    org[:, 20:] += 1.5 * u
    prof = layer_profile(org, base, dirs)
    assert next(p.layer for p in prof if p.significant) == 20


def _est(m, lo, hi):
    return Estimate(m, lo, hi, 20)


def test_convergence_detects_shared_direction_and_rejects_independent():
    g = torch.Generator().manual_seed(0)
    n = 30
    shared = torch.randn(D, generator=g, dtype=torch.float64)

    def diffs(vec):
        return [vec + 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64) for _ in range(3)]

    noise = {
        d: [0.5 * torch.randn(n, D, generator=g, dtype=torch.float64) for _ in range(3)]
        for d in "abc"
    }
    naive = {d: torch.randn(D, generator=g, dtype=torch.float64) for d in "abc"}
    persona = shared.clone()
    conv = layer_convergence(
        0, {d: diffs(shared) for d in "abc"}, noise, naive, naive, persona, n_boot=50
    )
    assert all(p.beats_null and p.cos > 0.9 for p in conv.pairs)
    assert (conv.persona_cos > 0.9).all()
    assert all(r > 0.8 for r in conv.reliability.values())
    indep = layer_convergence(
        0,
        {d: diffs(torch.randn(D, generator=g, dtype=torch.float64)) for d in "abc"},
        noise,
        naive,
        naive,
        persona,
        n_boot=50,
    )
    assert not any(p.beats_null for p in indep.pairs)
    mis = {d: _est(0.2, 0.1, 0.3) for d in "abc"}
    tm = TransferMatrix(
        directions=("a", "b", "c"),
        organisms=("a:x", "b:y", "c:z"),
        share=torch.full((3, 3), 0.8, dtype=torch.float64),
        random_share=torch.full((2, 3), 0.05, dtype=torch.float64),
        gap=torch.ones(3, dtype=torch.float64),
        layers=(0,),
    )
    assert verdict(conv, tm, mis)[0] == "converged"
    assert verdict(indep, None, mis)[0] == "not converged"
    untestable = verdict(conv, tm, {d: _est(0.0, -0.1, 0.1) for d in "abc"})[0]
    # no misalignment: transfer cannot count, so at most "partly", flagged untestable
    assert untestable.startswith("partly") and "untestable" in untestable
    # a transfer that damages the model, or whose share's interval reaches zero, does not count
    import dataclasses

    broke = dataclasses.replace(tm, coherence=torch.full((3, 3), 0.3, dtype=torch.float64))
    assert broke.damaged(0, 1) and not broke.beats_random(0, 1)
    assert verdict(conv, broke, mis)[0] == "partly"  # the cosines still beat the null
    wide = torch.stack([torch.full((3, 3), -0.1), torch.full((3, 3), 1.7)], -1).double()
    assert not dataclasses.replace(tm, interval=wide).beats_random(0, 1)
    assert "(damage)" in broke.share_text(0, 1)


def test_intervention_fingerprint_changes_with_the_direction_and_settings():
    """Stored causal scores are keyed by this fingerprint: it must tell apart different
    directions (by their bytes), layers, strengths and kinds, and be stable otherwise."""
    from mci_interp.analysis.causal import fingerprint as _fingerprint
    from mci_interp.direction import random_direction
    from mci_interp.intervene import Ablate, Steer
    from mci_interp.sites import Site

    def rnd(seed: int, layer: int = 3):
        like = torch.zeros(8)
        like[0] = 1.0
        g = torch.Generator().manual_seed(seed)
        from mci_interp.direction import Direction

        prov = make_provenance()
        return random_direction(
            Direction(vector=like, site=Site(layer), provenance=prov), generator=g
        )

    a, b = rnd(0), rnd(1)
    assert _fingerprint(Ablate(a)) == _fingerprint(Ablate(rnd(0)))
    prints = [
        _fingerprint(Ablate(a)),
        _fingerprint(Ablate(b)),
        _fingerprint(Ablate(rnd(0, layer=4))),
        _fingerprint(Steer(a, 0.5, scale="relative")),
        _fingerprint(Steer(a, 1.0, scale="relative")),
        _fingerprint(Steer(a, 1.0)),
    ]
    assert len({repr(p) for p in prints}) == len(prints)


def test_causal_criterion_fails_on_each_of_its_controls():
    """Beating every random control is not enough: the share's interval must lie above zero,
    the ablation must remove more in the organism than in the base, and it must not damage the
    model. Each control alone turns a passing test into a failing one."""
    good = CausalTest(
        share_removed=0.9,
        random_shares=(0.1,) * 19,
        gap=0.2,
        share=_est(0.9, 0.5, 1.3),
        specific=_est(0.15, 0.05, 0.25),
        base_removed=_est(0.01, -0.01, 0.03),
        coherence=0.05,
    )
    assert good.passes and good.failures() == [] and good.p_value == 0.05
    import dataclasses

    cases = {
        "random up to": dict(random_shares=(0.1,) * 18 + (0.95,)),
        "does not lie above zero": dict(share=_est(0.9, -0.1, 1.9)),
        "no more in the organism than in the base": dict(specific=_est(0.02, -0.03, 0.07)),
        "damage": dict(coherence=0.3),
    }
    for words, change in cases.items():
        bad = dataclasses.replace(good, **change)
        assert not bad.passes and any(words in f for f in bad.failures()), words


def test_causal_rank_p_value_counts_random_directions_at_least_as_strong():
    from mci_interp.analysis.internalisation import CausalTest

    assert CausalTest(share_removed=0.9, random_shares=(0.1, 0.2, 0.3), gap=0.1).p_value == 0.25
    assert CausalTest(share_removed=0.2, random_shares=(0.1, 0.2, 0.3), gap=0.1).p_value == 0.75
    many = CausalTest(share_removed=0.9, random_shares=tuple([0.0] * 19), gap=0.1)
    assert many.p_value == 0.05 and many.beats_random
    # z: the share against the random shares' mean and sample SD (0.2, 0.1 here)
    assert CausalTest(share_removed=0.9, random_shares=(0.1, 0.2, 0.3), gap=0.1).z_score == (
        pytest.approx(7.0)
    )
    assert many.z_score is None and many.z_text() == ""  # no spread
    assert CausalTest(share_removed=0.9, random_shares=(0.1,), gap=0.1).z_score is None


def test_an_uncontrolled_pair_must_beat_the_task_and_format_null():
    """Two finetunes without controls sharing a direction (their contrast is finetune minus
    base). Against benign finetunes that share little, it beats the task-and-format null;
    against benign finetunes that share as much (task and format), it does not; with too few
    benign cosines to reach the level, it is descriptive whatever its cosine."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(D, generator=g, dtype=torch.float64)
    diffs = {
        dom: [shared * 2 + 0.3 * torch.randn(30, D, generator=g, dtype=torch.float64)]
        for dom in ("a", "b")
    }
    nan = torch.full((D,), float("nan"), dtype=torch.float64)
    naive = {d: x[0].mean(0) for d, x in diffs.items()}
    args = (0, diffs, {}, naive, {"a": nan, "b": nan}, torch.randn(D, dtype=torch.float64))

    def benign(k, like):  # k benign finetunes per domain, sharing ``like`` of one direction
        common = torch.randn(D, generator=g, dtype=torch.float64)
        return {
            d: [like * common + torch.randn(D, generator=g, dtype=torch.float64) for _ in range(k)]
            for d in ("a", "b")
        }

    (low,) = layer_convergence(*args, benign=benign(8, 0.0)).pairs  # 64 cross-domain cosines
    assert low.task_null and not low.controlled and low.beats_null and low.cos > 0.9
    (high,) = layer_convergence(*args, benign=benign(8, 20.0)).pairs
    assert high.task_null and not high.beats_null and high.bar > 0.95
    (few,) = layer_convergence(*args, benign=benign(3, 0.0)).pairs  # 9 cosines: too few
    assert not few.task_null and not few.beats_null
    (none,) = layer_convergence(*args).pairs
    assert not none.task_null and not none.beats_null
