"""The one statistics module: the bootstrap and its intervals are calibrated, resample what they
claim to resample, and are what compare, evaluate and the convergence analysis use."""

from __future__ import annotations

import math

import pytest
import torch

from mci_interp import stats
from mci_interp.stats import (
    Estimate,
    bootstrap,
    bootstrap_mean,
    bootstrap_ratio,
    empirical_p_value,
    index_counts,
    paired_mean_difference,
    percentile_interval,
    quantile,
    rate_ci,
    split_half,
)


# --- the bootstrap ----------------------------------------------------------------------------
def test_bootstrap_draws_do_not_depend_on_chunking_or_the_statistic():
    x = torch.randn(17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = bootstrap(lambda i: x[i].mean(1), 17, n_boot=300, generator=torch.Generator())
    seen = []

    def record(i):
        seen.append(i)
        return x[i].mean(1)

    g = torch.Generator()
    chunked = bootstrap(record, 17, n_boot=300, generator=g, chunk=64)
    assert torch.equal(whole, chunked) and [t.shape[0] for t in seen] == [64] * 4 + [44]
    # the draws are plain resamples: n_boot rows of n unit indices drawn with replacement
    idx = torch.randint(0, 17, (300, 17), generator=torch.Generator())
    assert torch.equal(torch.cat(seen), idx)


def test_independent_sets_are_drawn_in_turn_per_chunk():
    a, b = [], []
    bootstrap(
        lambda ia, ib: (a.append(ia), b.append(ib), torch.zeros(ia.shape[0]))[-1],
        (5, 9),
        n_boot=10,
        generator=torch.Generator().manual_seed(3),
        chunk=4,
    )
    g = torch.Generator().manual_seed(3)
    for m, ia, ib in zip([4, 4, 2], a, b, strict=True):
        assert torch.equal(ia, torch.randint(0, 5, (m, 5), generator=g))
        assert torch.equal(ib, torch.randint(0, 9, (m, 9), generator=g))


def test_bootstrap_rejects_a_statistic_of_the_wrong_length():
    with pytest.raises(ValueError, match="values for"):
        bootstrap(lambda i: torch.zeros(3), 4, n_boot=5, generator=torch.Generator())
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap(lambda i: i.float().mean(1), 4, n_boot=0, generator=torch.Generator())


def test_index_counts_are_resample_weights():
    idx = torch.tensor([[0, 0, 2], [1, 2, 2]])
    assert index_counts(idx, 4).tolist() == [[2, 0, 1, 0], [0, 1, 2, 0]]


def test_bootstrap_mean_interval_is_calibrated():
    """Coverage of the true mean by the 90% interval over 300 simulated data sets: a bootstrap
    that resamples too few units, too few times or at the wrong level fails this."""
    g = torch.Generator().manual_seed(0)
    hits, widths = 0, []
    for s in range(300):
        x = torch.randn(40, generator=g, dtype=torch.float64) + 2.0
        e = bootstrap_mean(x, level=0.9, n_boot=400, seed=s)
        hits += e.lo <= 2.0 <= e.hi
        widths.append(e.hi - e.lo)
    assert 0.83 <= hits / 300 <= 0.96
    # the width matches the normal theory interval 2 * 1.645 / sqrt(40)
    assert sum(widths) / len(widths) == pytest.approx(2 * 1.645 / math.sqrt(40), rel=0.1)


def test_bootstrap_mean_is_reproducible_and_drops_nan():
    x = torch.tensor([1.0, float("nan"), 3.0, 2.0, 5.0])
    e = bootstrap_mean(x, seed=4)
    assert e == bootstrap_mean(x[~torch.isnan(x)], seed=4) and e.n == 4
    y = torch.randn(30, generator=torch.Generator().manual_seed(0))
    assert bootstrap_mean(y, seed=4) != bootstrap_mean(y, seed=5)
    assert e.mean == pytest.approx(11 / 4) and e.lo < e.mean < e.hi


def test_paired_difference_pairs_units():
    g = torch.Generator().manual_seed(1)
    unit = torch.randn(30, generator=g, dtype=torch.float64) * 10  # large unit effects
    a = unit + 0.5 + 0.01 * torch.randn(30, generator=g, dtype=torch.float64)
    b = unit
    paired = paired_mean_difference(a, b)
    assert paired.lo > 0.45 and paired.hi < 0.55  # unit effects cancel in the pairs
    with pytest.raises(ValueError, match="one value per unit"):
        paired_mean_difference(a, b[:5])


def test_ratio_bootstrap_resamples_whole_units():
    """Answers cluster by question: every answer to half the questions is misaligned, none to
    the others. Resampling questions gives a much wider interval than treating the 400 answers
    as independent (Wilson)."""
    k = torch.tensor([20.0] * 10 + [0.0] * 10)
    n = torch.full((20,), 20.0)
    by_question = bootstrap_ratio(k, n, seed=0)
    by_answer = rate_ci(200, 400)
    assert by_question.mean == pytest.approx(0.5) == by_answer.mean and by_question.n == 20
    assert by_question.hi - by_question.lo > 3 * (by_answer.hi - by_answer.lo)
    assert math.isnan(bootstrap_ratio(torch.zeros(3), torch.zeros(3)).mean)


def test_bootstrap_ratio_over_seeds_resamples_seeds_then_questions():
    """Two seeds that disagree (a share of 0.2 in one, 0.8 in the other, each pinned down by
    its questions): resampling seeds makes the interval span both; pooling the seeds' cells as
    if they were one seed's questions would make it narrow and wrong."""
    g = torch.Generator().manual_seed(0)
    den = torch.ones(2, 30, dtype=torch.float64)
    num = torch.stack([torch.full((30,), 0.2), torch.full((30,), 0.8)]).double()
    num = num + 0.01 * torch.randn(2, 30, generator=g, dtype=torch.float64)
    seeds = bootstrap_ratio(num, den, seed=0)
    cells = bootstrap_ratio(num.flatten(), den.flatten(), seed=0)
    assert seeds.mean == pytest.approx(cells.mean) == pytest.approx(0.5, abs=0.01)
    assert seeds.lo < 0.25 and seeds.hi > 0.75 and seeds.n == 30
    assert cells.hi - cells.lo < 0.5 * (seeds.hi - seeds.lo)
    with pytest.raises(ValueError, match="seeds, n"):
        bootstrap_ratio(num[None], den[None])


# --- intervals and nulls ----------------------------------------------------------------------
def test_quantiles_and_intervals():
    s = torch.arange(101, dtype=torch.float64)
    assert percentile_interval(s, 0.9) == pytest.approx((5.0, 95.0))
    assert quantile(s, 0.95) == pytest.approx(95.0)
    assert math.isnan(quantile(torch.tensor([]), 0.5))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(s, 95)


def test_split_half_redraws_invalid_splits_and_gives_up():
    calls = []

    def every_other(h1, h2):
        calls.append(1)
        return None if len(calls) % 2 else float(len(h1) - len(h2))

    out = split_half(every_other, 7, n_splits=3, generator=torch.Generator())
    assert out.tolist() == [-1.0, -1.0, -1.0] and len(calls) == 6
    with pytest.raises(ValueError, match="no valid split"):
        split_half(lambda h1, h2: None, 6, n_splits=1, generator=torch.Generator())


def test_split_halves_are_disjoint_and_cover_every_unit():
    def check(h1, h2):
        assert len(h1) == 4 and len(h2) == 5
        assert sorted(torch.cat([h1, h2]).tolist()) == list(range(9))
        return 0.0

    split_half(check, 9, n_splits=10, generator=torch.Generator().manual_seed(0))


def test_p_value_is_never_zero():
    null = torch.randn(19, generator=torch.Generator().manual_seed(0))
    assert empirical_p_value(100.0, null) == pytest.approx(1 / 20)
    assert empirical_p_value(-100.0, null) == 1.0


def test_estimate_round_trip():
    e = Estimate(0.1, -0.2, 0.3, 7, 0.9)
    assert Estimate.from_dict(e.to_dict()) == e
    with pytest.raises(ValueError, match="unknown"):
        Estimate.from_dict({**e.to_dict(), "sd": 1})


# --- one implementation -----------------------------------------------------------------------
def test_public_paths_share_the_one_implementation():
    import mci_interp.analysis.internalisation as internalisation
    import mci_interp.evaluate as evaluate
    import mci_interp.evaluate.results as results

    assert evaluate.Estimate is stats.Estimate and evaluate.bootstrap_mean is stats.bootstrap_mean
    assert evaluate.rate_ci is stats.rate_ci and results.Estimate is stats.Estimate
    assert internalisation.bootstrap_mean is stats.bootstrap_mean


def _domains(sign_b: float, *, n: int = 40, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)

    def diffs(sign: float):
        return [sign * u + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)] * 2

    org = {"a": diffs(1.0), "b": diffs(sign_b)}
    ctrl = {k: [0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)] for k in org}
    naive = {k: torch.randn(d, generator=g, dtype=torch.float64) for k in org}
    return org, ctrl, naive, u


def test_convergence_cosine_is_signed():
    """Anti-aligned contrasts are not convergence: a |cos| anywhere in the pair statistic or its
    bootstrap would call this pair converged."""
    from mci_interp.analysis.convergence import layer_convergence

    org, ctrl, naive, u = _domains(-1.0)
    lc = layer_convergence(0, org, ctrl, naive, naive, u, n_boot=100)
    (pair,) = lc.pairs
    assert pair.cos < -0.9 and pair.ci[1] < -0.9 and not pair.beats_null
    org, ctrl, naive, u = _domains(1.0)
    (pair,) = layer_convergence(0, org, ctrl, naive, naive, u, n_boot=100).pairs
    assert pair.cos > 0.9 and pair.ci[0] > 0.9 and pair.beats_null


def test_convergence_nulls_are_the_shared_ones():
    from mci_interp.analysis.convergence import layer_convergence
    from mci_interp.compare import random_direction_null

    org, ctrl, naive, u = _domains(1.0)
    lc = layer_convergence(0, org, ctrl, naive, naive, u, n_boot=10, seed=7)
    # the random null is the first draw from the layer's generator
    null = random_direction_null(16, 2000, generator=torch.Generator().manual_seed(7))
    assert torch.equal(lc.null_random, null.signed)
    # one pair: no correction, the one-sided 95th percentile of the larger null
    assert lc.level == 0.95
    assert lc.bar == max(quantile(null.signed, 0.95), quantile(lc.null_structured, 0.95))
    assert lc.pairs[0].bar == lc.bar


def test_hierarchical_interval_carries_seed_variance():
    from mci_interp.stats import hierarchical_mean_difference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(40, generator=g, dtype=torch.float64)  # per-question effect, shared by seeds
    base = torch.zeros(3, 40, dtype=torch.float64)
    same = q.expand(3, -1) + 0.01 * torch.randn(3, 40, generator=g, dtype=torch.float64)
    spread = same + torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)  # seeds disagree
    e_same = hierarchical_mean_difference(same, base)
    e_spread = hierarchical_mean_difference(spread, base)
    flat = paired_mean_difference(spread.mean(0), base.mean(0))  # seeds averaged first
    assert e_spread.mean == pytest.approx(flat.mean) and e_spread.n == 40
    # seed disagreement widens the interval well past the questions-only one ...
    assert (e_spread.hi - e_spread.lo) > 2 * (flat.hi - flat.lo)
    # ... and agreeing seeds add almost nothing to it
    assert (e_same.hi - e_same.lo) == pytest.approx(flat.hi - flat.lo, rel=0.25)
    one = hierarchical_mean_difference(spread[:1], base[:1])
    assert one == paired_mean_difference(spread[0], base[0])
    with pytest.raises(ValueError, match=r"\[seeds, units\]"):
        hierarchical_mean_difference(spread, base[:2])
