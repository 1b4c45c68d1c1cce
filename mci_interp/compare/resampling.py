"""How sure a diff-means direction is: a bootstrap CI of the cosine between two of them
(resampling prompts, paired where they share prompts) and split-half reliability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp.compare._common import (
    ArrayLike,
    _check_xyg,
    _codes_and_keys,
    _cos_rows,
    _dataclass_dict,
    _GroupSums,
)
from mci_interp.stats import (
    bootstrap,
    check_level,
    index_counts,
    percentile_interval,
    spearman_brown,
    split_half,
)


@dataclass(frozen=True, eq=False)
class BootstrapCI:
    """A statistic, its bootstrap samples and a percentile confidence interval."""

    estimate: float
    lo: float
    hi: float
    level: float
    samples: Float[Tensor, " n_boot"]
    n_skipped: int = 0
    paired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self)


def bootstrap_cosine(
    Xa: ArrayLike,
    ya: ArrayLike,
    Xb: ArrayLike,
    yb: ArrayLike,
    groups_a: Sequence[Any] | None = None,
    groups_b: Sequence[Any] | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    generator: torch.Generator,
) -> BootstrapCI:
    """Percentile CI of the cosine between two diff-means directions, resampling prompts.

    If ``a`` and ``b`` share prompt ids (say two finetunes answering the same questions), the
    same resampled prompts are used for both (a paired bootstrap); otherwise each side resamples
    its own prompts. Samples where a side draws no positive or no negative rows are skipped.
    """
    check_level(level)
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    xa, la, _ = _check_xyg(Xa, ya, groups_a, "Xa")
    xb, lb, _ = _check_xyg(Xb, yb, groups_b, "Xb")
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"Xa has d_model {xa.shape[1]} but Xb has {xb.shape[1]}: different models")
    ka, kb = _codes_and_keys(groups_a, xa.shape[0]), _codes_and_keys(groups_b, xb.shape[0])
    paired = groups_a is not None and groups_b is not None and set(ka) == set(kb)
    if paired:
        keys = sorted(set(ka))
        index = {k: i for i, k in enumerate(keys)}
        ca = torch.tensor([index[k] for k in ka])
        cb = torch.tensor([index[k] for k in kb])
    else:
        ca = torch.as_tensor(np.unique(np.asarray(ka), return_inverse=True)[1].astype(np.int64))
        cb = torch.as_tensor(np.unique(np.asarray(kb), return_inverse=True)[1].astype(np.int64))
    sa, sb = _GroupSums.build(xa, la, ca), _GroupSums.build(xb, lb, cb)
    Ga, Gb = sa.n_pos.shape[0], sb.n_pos.shape[0]
    da = xa[la == 1].mean(0) - xa[la == 0].mean(0)
    db = xb[lb == 1].mean(0) - xb[lb == 0].mean(0)
    est = float(_cos_rows(da, db))

    def resampled_cosine(idx_a: Tensor, idx_b: Tensor | None = None) -> Tensor:
        wa = index_counts(idx_a, Ga)
        wb = wa if idx_b is None else index_counts(idx_b, Gb)
        (va, ok_a), (vb, ok_b) = sa.diff(wa), sb.diff(wb)
        return torch.where(ok_a & ok_b, _cos_rows(va, vb), torch.nan)

    # paired: one resample of the shared prompts serves both sides; else each side its own
    boots = bootstrap(
        resampled_cosine,
        Ga if paired else (Ga, Gb),
        n_boot=n_boot,
        generator=generator,
        chunk=256,
    )
    defined = ~torch.isnan(boots)
    s, skipped = boots[defined], int((~defined).sum())
    if s.numel() < 2:
        raise ValueError("almost every bootstrap sample lacked a class; too few prompts per label")
    lo, hi = percentile_interval(s, level)
    return BootstrapCI(
        estimate=est, lo=lo, hi=hi, level=level, samples=s, n_skipped=skipped, paired=paired
    )


@dataclass(frozen=True, eq=False)
class SplitHalf:
    """Cosines between directions estimated on disjoint halves of the prompts.

    ``spearman_brown`` = 2r / (1 + r) estimates the reliability of the full-data direction.
    """

    samples: Float[Tensor, " n_splits"]
    n_groups: int

    @property
    def mean(self) -> float:
        return float(self.samples.mean())

    @property
    def spearman_brown(self) -> float:
        return spearman_brown(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples.tolist(),
            "n_groups": self.n_groups,
            "mean": self.mean,
            "spearman_brown": self.spearman_brown,
        }


def split_half_reliability(
    X: ArrayLike,
    y: ArrayLike,
    groups: Sequence[Any] | None,
    *,
    n_splits: int = 50,
    generator: torch.Generator,
) -> SplitHalf:
    """Cosine between diff-means of two disjoint random halves of the prompts, ``n_splits`` times
    (``stats.split_half``; a split whose half lacks a class is redrawn, up to 20 times)."""
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    x, lab, codes = _check_xyg(X, y, groups)
    G = int(codes.max()) + 1
    if G < 4:
        raise ValueError(f"need at least 4 prompts (groups) to split in halves, got {G}")
    sums = _GroupSums.build(x, lab, codes)

    def halves_cosine(h1: Tensor, h2: Tensor) -> float | None:
        w = torch.zeros(2, G, dtype=torch.float64)
        w[0, h1] = 1.0
        w[1, h2] = 1.0
        d, ok = sums.diff(w)
        return float(_cos_rows(d[0], d[1])) if bool(ok.all()) else None

    try:
        samples = split_half(halves_cosine, G, n_splits=n_splits, generator=generator)
    except ValueError:
        raise ValueError(
            "could not split the prompts into halves that both hold both labels; "
            "too few prompts per label"
        ) from None
    return SplitHalf(samples=samples, n_groups=G)
