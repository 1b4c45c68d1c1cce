"""The convergence test on simulated studies with a known answer: it must rarely fire when no
direction is shared and must fire when one clearly is (scripts/bench_calibration.py measures
the rates with more studies)."""

from __future__ import annotations

import pytest
import torch

from mci_interp.analysis.convergence import layer_convergence, verdict
from mci_interp.analysis.simulate import synthetic_study
from mci_interp.stats import Estimate


def _pairs_beating(shared: float, n: int, **kw) -> list[list[bool]]:
    out = []
    for r in range(n):
        study = synthetic_study(shared=shared, d_model=32, seed=r, **kw)
        lc = layer_convergence(0, *study.layer_inputs(), n_boot=100, n_null=1000, seed=r)
        out.append([p.beats_null for p in lc.pairs])
    return out


def test_null_studies_rarely_beat_the_null():
    """30 studies without a shared direction: the family-wise rate is 5% by construction; more
    than 4 of 30 (13%) would mean the bar is miscalibrated."""
    fired = sum(any(b) for b in _pairs_beating(0.0, 30))
    assert fired <= 4


def test_a_shared_direction_is_found_and_its_sign_matters():
    found = _pairs_beating(2.0, 10)
    assert sum(all(b) for b in found) >= 8
    study = synthetic_study(shared=2.0, d_model=32, seed=0)
    flipped = dict(study.organism_diffs)
    flipped["d1"] = [-x for x in flipped["d1"]]  # d1 now anti-aligned with d0 and d2
    lc = layer_convergence(0, flipped, *study.layer_inputs()[1:], n_boot=100, n_null=1000, seed=0)
    beats = {(p.a, p.b): p.beats_null for p in lc.pairs}
    assert beats == {("d0", "d1"): False, ("d0", "d2"): True, ("d1", "d2"): False}


def test_pairs_without_a_control_are_descriptive_only():
    study = synthetic_study(shared=2.0, d_model=32, seed=0)
    cnaive = dict(study.control_naive)
    cnaive["d2"] = torch.full_like(cnaive["d2"], float("nan"))  # d2 compared with the base
    lc = layer_convergence(
        0,
        study.organism_diffs,
        study.control_seed_diffs,
        study.naive,
        cnaive,
        study.persona,
        n_boot=100,
        n_null=1000,
    )
    by = {(p.a, p.b): p for p in lc.pairs}
    assert by[("d0", "d1")].beats_null and by[("d0", "d1")].controlled
    assert not by[("d0", "d2")].beats_null and not by[("d0", "d2")].controlled
    assert by[("d0", "d2")].cos > 0.5  # the cosine is there, it is just not evidence
    mis = {d: Estimate(0.2, 0.1, 0.3, 10, 0.95) for d in ("d0", "d1", "d2")}
    v, reasons = verdict(lc, None, mis)
    assert v == "partly"
    assert sum("descriptive only" in r for r in reasons) == 2


def test_the_simulation_checks_its_arguments():
    with pytest.raises(ValueError, match=">= 2 domains"):
        synthetic_study(n_domains=1)


def test_seed_cosines_show_the_ceiling_a_cross_domain_cosine_is_read_against():
    """Without a shared direction, each domain's seeds still agree (its own direction
    reproduces) while the domains agree much less: the within-domain seed cosines say so."""
    within, across = [], []
    for r in range(6):
        study = synthetic_study(shared=0.0, d_model=32, seed=r)
        lc = layer_convergence(0, *study.layer_inputs(), n_boot=20, n_null=200)
        within += list(lc.seed_cos.values())
        across += [abs(p.cos) for p in lc.pairs]
    assert sum(within) / len(within) > sum(across) / len(across) + 0.2
