"""The package's statistics: estimates, the one bootstrap, intervals, quantiles and null tests.

Pure math on torch tensors (float64); no model code, imported by ``compare``, ``evaluate`` and
``analysis``. Every resampling function takes a ``torch.Generator`` (or a ``seed`` that makes
one) and never touches the global RNG, so a result is reproducible from its arguments alone.

- ``bootstrap`` draws resamples of one or several sets of units and applies a statistic to
  each; ``bootstrap_mean``, ``paired_mean_difference`` and ``hierarchical_mean_difference``
  (seeds, then questions) are its common uses, and grouped
  (prompt-level) resampling weighs groups with ``index_counts``; ``bootstrap_ratio`` is a pooled
  rate whose interval resamples whole units.
- ``percentile_interval``, ``quantile`` and ``rate_ci`` (Wilson) make intervals.
- ``split_half`` and ``empirical_p_value`` are the building blocks of nulls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with a confidence interval: ``mean`` [``lo``, ``hi``] over ``n`` units."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}] (n={self.n})"

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "level": self.level}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        unknown = set(d) - {"mean", "lo", "hi", "n", "level"}
        if unknown:
            raise ValueError(f"unknown Estimate keys {sorted(unknown)}")
        return cls(
            float(d["mean"]),
            float(d["lo"]),
            float(d["hi"]),
            int(d["n"]),
            float(d.get("level", 0.95)),
        )


def check_level(level: float) -> None:
    """Raise unless ``level`` is a confidence level in (0, 1)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")


# --- intervals --------------------------------------------------------------------------------
def quantile(x: Tensor | Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``x`` (float64, linear interpolation); NaN for an empty ``x``."""
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    return float(torch.quantile(t, q)) if t.numel() else math.nan


def percentile_interval(samples: Tensor, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` percentile interval of bootstrap ``samples``."""
    check_level(level)
    alpha = (1 - level) / 2
    s = torch.as_tensor(samples, dtype=torch.float64).flatten()
    q = torch.quantile(s, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


def rate_ci(k: int, n: int, *, level: float = 0.95) -> Estimate:
    """Wilson score interval for a rate of ``k`` successes out of ``n`` (judge rates, takeover)."""
    check_level(level)
    if n <= 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n and n > 0 for a rate; got k={k}, n={n}")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Estimate(p, lo, hi, n, level)


# --- the bootstrap ----------------------------------------------------------------------------
def bootstrap(
    statistic: Callable[..., Tensor | Sequence[float]],
    n_units: int | Sequence[int],
    *,
    n_boot: int,
    generator: torch.Generator,
    chunk: int | None = None,
) -> Float[Tensor, " n_boot"]:
    """Bootstrap samples of ``statistic``: resample units with replacement ``n_boot`` times.

    ``n_units`` is the number of units (questions, prompts, groups) or, for independent
    samples (two unpaired sets of prompts), one count per set. For each block of ``chunk``
    resamples (all at once by default) one ``[m, n]`` index tensor is drawn per set, in order,
    and ``statistic(*indices)`` must return the ``m`` sample values (NaN where a sample is
    undefined; callers drop or count those). The draws do not depend on ``statistic``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    sizes = (n_units,) if isinstance(n_units, int) else tuple(n_units)
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"every set needs at least one unit to resample, got {sizes}")
    step = n_boot if chunk is None else chunk
    if step < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    out = []
    for start in range(0, n_boot, step):
        m = min(step, n_boot - start)
        idx = [torch.randint(0, n, (m, n), generator=generator) for n in sizes]
        vals = torch.as_tensor(statistic(*idx), dtype=torch.float64).flatten()
        if vals.numel() != m:
            raise ValueError(f"statistic returned {vals.numel()} values for {m} resamples")
        out.append(vals)
    return torch.cat(out)


def index_counts(idx: Int[Tensor, "m n"], n: int) -> Float[Tensor, "m n"]:
    """How often each of ``n`` units occurs in each resample (weights for grouped statistics)."""
    m = idx.shape[0]
    return torch.zeros(m, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(idx.shape, dtype=torch.float64)
    )


def bootstrap_mean(
    x: Float[Tensor, " n"], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """Percentile-bootstrap CI of the mean of ``x`` (NaN entries are dropped first)."""
    check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    x = x[~torch.isnan(x)]
    n = int(x.numel())
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean, mean, mean, 1, level)
    g = torch.Generator().manual_seed(seed)
    boots = bootstrap(lambda idx: x[idx].mean(dim=1), n, n_boot=n_boot, generator=g)
    lo, hi = percentile_interval(boots, level)
    return Estimate(mean, lo, hi, n, level)


def paired_mean_difference(
    a: Float[Tensor, " n"],
    b: Float[Tensor, " n"],
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Mean of ``a - b`` paired per unit, bootstrap CI over units (units that are NaN on either
    side are dropped)."""
    ta = torch.as_tensor(a, dtype=torch.float64).flatten()
    tb = torch.as_tensor(b, dtype=torch.float64).flatten()
    if ta.shape != tb.shape:
        raise ValueError(
            f"paired samples need one value per unit on both sides; got {ta.numel()} and {tb.numel()}"
        )
    return bootstrap_mean(ta - tb, level=level, n_boot=n_boot, seed=seed)


def leave_one_out(
    a: Float[Tensor, " n"],
    b: Float[Tensor, " n"],
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Estimate]:
    """``paired_mean_difference(a, b)`` with each of the n pairs left out in turn (entry i
    leaves out pair i): whether one unit, one question, carries an effect on its own."""
    ta = torch.as_tensor(a, dtype=torch.float64).flatten()
    tb = torch.as_tensor(b, dtype=torch.float64).flatten()
    if ta.shape != tb.shape or ta.numel() < 2:
        raise ValueError(
            f"leave_one_out needs >= 2 paired values on both sides; got {ta.numel()} and "
            f"{tb.numel()}"
        )
    keep = ~torch.eye(ta.numel(), dtype=torch.bool)
    return [
        paired_mean_difference(ta[k], tb[k], level=level, n_boot=n_boot, seed=seed) for k in keep
    ]


def hierarchical_mean_difference(
    a: Float[Tensor, "seeds n"],
    b: Float[Tensor, "seeds n"],
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Mean of ``a - b`` paired per seed and unit (row s of ``b`` is seed s's reference: its
    matched control, or the base repeated), with a two-stage bootstrap CI: seeds with
    replacement, then units (questions, shared by every seed) with replacement. With one seed
    it is ``paired_mean_difference``. NaN cells are left out of the means."""
    check_level(level)
    ta = torch.as_tensor(a, dtype=torch.float64)
    tb = torch.as_tensor(b, dtype=torch.float64)
    if ta.ndim != 2 or ta.shape != tb.shape:
        raise ValueError(
            f"need [seeds, units] on both sides, paired by seed and unit; got {tuple(ta.shape)} "
            f"and {tuple(tb.shape)}"
        )
    diff = ta - tb
    n_seeds = diff.shape[0]
    if n_seeds == 1:
        return paired_mean_difference(ta[0], tb[0], level=level, n_boot=n_boot, seed=seed)
    keep = ~diff.isnan().all(0)
    diff = diff[:, keep]
    if diff.shape[1] == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)

    def stat(seed_idx: Tensor, unit_idx: Tensor) -> Tensor:
        rows = diff[seed_idx]  # [m, seeds, n]
        cells = torch.gather(rows, 2, unit_idx[:, None, :].expand(-1, n_seeds, -1))
        return cells.nanmean(dim=(1, 2))

    g = torch.Generator().manual_seed(seed)
    boots = bootstrap(stat, (n_seeds, diff.shape[1]), n_boot=n_boot, generator=g)
    lo, hi = percentile_interval(boots[~boots.isnan()], level)
    return Estimate(float(diff.nanmean()), lo, hi, int(diff.shape[1]), level)


def bootstrap_ratio(
    num: Float[Tensor, "*seeds n"],
    den: Float[Tensor, "*seeds n"],
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """``sum(num) / sum(den)`` over units with a CI that resamples whole units: a pooled rate
    (misaligned answers over counted answers, per question) whose interval lets the answers to
    one question move together, or a share (misalignment removed over misalignment there was).
    Given ``[seeds, n]`` (units shared by every seed), it resamples seeds, then units. NaN
    where ``sum(den) <= 0``; resamples with ``sum(den) <= 0`` are dropped; ``n`` = units."""
    check_level(level)
    tn = torch.as_tensor(num, dtype=torch.float64)
    td = torch.as_tensor(den, dtype=torch.float64)
    if tn.shape != td.shape or tn.ndim > 2:
        raise ValueError(
            f"need one numerator per denominator, as [n] or [seeds, n]; got {tuple(tn.shape)} "
            f"and {tuple(td.shape)}"
        )
    flat = tn.ndim < 2
    tn = tn.reshape(-1, tn.shape[-1] if tn.ndim else 1)
    td = td.reshape(tn.shape)
    n_seeds, n = tn.shape
    total = float(td.sum()) if n else 0.0
    if total <= 0:
        return Estimate(math.nan, math.nan, math.nan, n, level)
    point = float(tn.sum()) / total
    if n * n_seeds == 1:
        return Estimate(point, point, point, 1, level)
    g = torch.Generator().manual_seed(seed)

    def totals(seed_idx: Tensor | None, unit_idx: Tensor) -> tuple[Tensor, Tensor]:
        if seed_idx is None:  # one set of units: the same draws as before seeds were allowed
            return tn[0][unit_idx].sum(1), td[0][unit_idx].sum(1)
        expand = unit_idx[:, None, :].expand(-1, n_seeds, -1)
        return tuple(  # type: ignore[return-value]
            torch.gather(x[seed_idx], 2, expand).sum((1, 2)) for x in (tn, td)
        )

    def pooled(*idx: Tensor) -> Tensor:
        a, d = totals(None, idx[0]) if flat else totals(idx[0], idx[1])
        return torch.where(d > 0, a / d.clamp_min(1e-300), torch.nan)

    sizes = n if flat else (n_seeds, n)
    boots = bootstrap(pooled, sizes, n_boot=n_boot, generator=g)
    boots = boots[~torch.isnan(boots)]
    lo, hi = percentile_interval(boots, level) if boots.numel() else (math.nan, math.nan)
    return Estimate(point, lo, hi, n, level)


# --- nulls ------------------------------------------------------------------------------------
def split_half(
    statistic: Callable[[Tensor, Tensor], float | None],
    n_units: int,
    *,
    n_splits: int,
    generator: torch.Generator,
    max_redraws: int = 20,
) -> Float[Tensor, " n_splits"]:
    """``statistic(half_1, half_2)`` over ``n_splits`` random splits of the units into disjoint
    halves (a random permutation: its first ``n_units // 2`` units, then the rest).

    A split whose statistic is None or NaN (say a half lacks a class) is redrawn, up to
    ``max_redraws`` times per split; then ``ValueError``.
    """
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    if n_units < 2:
        raise ValueError(f"need at least 2 units to split in halves, got {n_units}")
    out = []
    for _ in range(n_splits):
        for _attempt in range(max_redraws):
            perm = torch.randperm(n_units, generator=generator)
            v = statistic(perm[: n_units // 2], perm[n_units // 2 :])
            if v is not None and not math.isnan(float(v)):
                out.append(float(v))
                break
        else:
            raise ValueError(
                f"no valid split in {max_redraws} draws: too few units per class to split in halves"
            )
    return torch.tensor(out, dtype=torch.float64)


def spearman_brown(r: float) -> float:
    """Reliability of a full-data estimate from the correlation ``r`` between its two halves."""
    return 2 * r / (1 + r) if r > -1 else math.nan


def empirical_p_value(observed: float, null: Tensor) -> float:
    """One-sided (greater) p-value of ``observed`` under null samples: (1 + #null >= observed) /
    (1 + n). Never zero; 19 null draws reach 0.05 at best."""
    t = torch.as_tensor(null, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("null samples are empty")
    return (1 + int((t >= observed).sum())) / (1 + t.numel())


__all__ = [
    "Estimate",
    "bootstrap",
    "bootstrap_mean",
    "bootstrap_ratio",
    "check_level",
    "empirical_p_value",
    "index_counts",
    "paired_mean_difference",
    "hierarchical_mean_difference",
    "percentile_interval",
    "quantile",
    "rate_ci",
    "spearman_brown",
    "split_half",
]
