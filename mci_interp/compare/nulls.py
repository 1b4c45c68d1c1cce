"""What chance looks like: cosines of random Gaussian directions, diff-means under prompt-level
label permutations, and an observed statistic's one-sided p-value against null samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp.compare._common import ArrayLike, _check_xyg, _cos_rows, _dataclass_dict, _f64
from mci_interp.compare.similarity import expected_abs_cosine
from mci_interp.stats import empirical_p_value, quantile


@dataclass(frozen=True, eq=False)
class RandomNull:
    """Cosines between pairs of independent Gaussian vectors: the chance level for a given width."""

    d_model: int
    signed: Float[Tensor, " n"]
    expected_abs: float
    expected_abs_approx: float

    @property
    def absolute(self) -> Tensor:
        return self.signed.abs()

    @property
    def mean_abs(self) -> float:
        return float(self.absolute.mean())

    def quantile(self, q: float = 0.95, *, absolute: bool = True) -> float:
        return quantile(self.absolute if absolute else self.signed, q)

    def to_dict(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "n": int(self.signed.numel()),
            "mean_abs": self.mean_abs,
            "q95_abs": self.quantile(0.95),
            "expected_abs": self.expected_abs,
            "expected_abs_approx": self.expected_abs_approx,
            "signed": self.signed.tolist(),
        }


def random_direction_null(
    d_model: int, n: int, *, generator: torch.Generator, chunk: int = 4096
) -> RandomNull:
    """``n`` cosines between independent Gaussian vector pairs in ``d_model`` dimensions.

    E|cos| is about sqrt(2 / (pi d)) (0.033 for d = 576): the level below which a cosine between
    two directions means nothing. Each block of ``chunk`` pairs is one ``[m, 2, d_model]`` draw
    (the convergence analysis's random null is this function).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    expected = expected_abs_cosine(d_model)
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        r = torch.randn(m, 2, d_model, generator=generator, dtype=torch.float64)
        out.append(torch.nn.functional.cosine_similarity(r[:, 0], r[:, 1], dim=-1))
    return RandomNull(
        d_model=d_model,
        signed=torch.cat(out),
        expected_abs=expected,
        expected_abs_approx=expected_abs_cosine(d_model, exact=False),
    )


def structured_direction_null(
    rows: Float[Tensor, "m d_model"], n: int, *, generator: torch.Generator
) -> Float[Tensor, " n"]:
    """Signed cosines of ``n`` pairs of independent random directions drawn from the covariance
    of ``rows`` (e.g. centred per-prompt contrast rows): two unrelated directions in the rows'
    own anisotropic geometry, whose cosines spread wider than isotropic ones (the convergence
    analysis's structured null)."""
    x = torch.as_tensor(rows, dtype=torch.float64)
    w = torch.randn(n, 2, x.shape[0], generator=generator, dtype=torch.float64)
    z = w @ x  # [n, 2, d]: each row ~ N(0, x^T x)
    return torch.nn.functional.cosine_similarity(z[:, 0], z[:, 1], dim=-1)


@dataclass(frozen=True, eq=False)
class PermutationNull:
    """Diff-means under label permutations (at prompt level) compared with the true one.

    ``signed``: cosine of each permuted direction with the true one; ``norms``: their norms,
    against ``observed_norm`` (is there a difference at all?); ``scheme`` says how labels moved.
    """

    signed: Float[Tensor, " n_perm"]
    norms: Float[Tensor, " n_perm"]
    observed_norm: float
    scheme: str
    n_groups: int

    @property
    def absolute(self) -> Tensor:
        return self.signed.abs()

    @property
    def norm_p_value(self) -> float:
        """Empirical p-value of the observed diff-means norm under the permutation null."""
        return empirical_p_value(self.observed_norm, self.norms)

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self) | {"norm_p_value": self.norm_p_value}


def permutation_null(
    X: ArrayLike,
    y: ArrayLike,
    groups: Sequence[Any] | None,
    *,
    n_perm: int = 200,
    generator: torch.Generator,
    chunk: int = 64,
) -> PermutationNull:
    """Cosines between the true diff-means direction and diff-means under permuted labels.

    Labels move at prompt (group) level: groups whose rows share one label swap labels with each
    other; groups holding both labels shuffle labels among their own rows. Rows of a group are
    therefore never split the way a row-level shuffle would split them.
    """
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    x, lab, codes = _check_xyg(X, y, groups)
    G = int(codes.max()) + 1
    true = x[lab == 1].mean(0) - x[lab == 0].mean(0)
    n_pos_g = torch.zeros(G).index_add_(0, codes, (lab == 1).float())
    n_g = torch.bincount(codes, minlength=G).float()
    pure = (n_pos_g == 0) | (n_pos_g == n_g)
    pure_ids = pure.nonzero().flatten()
    mixed_rows = [(codes == g).nonzero().flatten() for g in (~pure).nonzero().flatten().tolist()]
    group_label = (n_pos_g > 0).long()
    pure_rows = pure[codes]
    scheme = (
        "between-group"
        if not mixed_rows
        else "within-group"
        if len(pure_ids) == 0
        else "between-group (pure) + within-group (mixed)"
    )
    if len(pure_ids) > 0 and not mixed_rows and len(set(group_label[pure_ids].tolist())) < 2:
        raise ValueError("every group holds the same label; nothing to permute")
    signed, norms = [], []
    for start in range(0, n_perm, chunk):
        m = min(chunk, n_perm - start)
        labs = lab.repeat(m, 1)
        if len(pure_ids) > 0:
            for b in range(m):
                perm = pure_ids[torch.randperm(len(pure_ids), generator=generator)]
                new_gl = group_label.clone()
                new_gl[pure_ids] = group_label[perm]
                labs[b, pure_rows] = new_gl[codes[pure_rows]]
        for rows in mixed_rows:
            for b in range(m):
                labs[b, rows] = labs[b, rows[torch.randperm(len(rows), generator=generator)]]
        pos = (labs == 1).double()
        neg = 1.0 - pos
        d = (pos @ x) / pos.sum(1, keepdim=True) - (neg @ x) / neg.sum(1, keepdim=True)
        signed.append(_cos_rows(d, true.unsqueeze(0)))
        norms.append(d.norm(dim=1))
    return PermutationNull(
        signed=torch.cat(signed),
        norms=torch.cat(norms),
        observed_norm=float(true.norm()),
        scheme=scheme,
        n_groups=G,
    )


@dataclass(frozen=True)
class NullComparison:
    """An observed statistic against samples of its null distribution (one-sided, greater).

    ``p_value`` = (1 + #null >= observed) / (1 + n); ``null_quantile`` is the null's (1 - alpha)
    quantile (its 95th percentile at the default alpha).
    """

    observed: float
    p_value: float
    null_quantile: float
    null_mean: float
    alpha: float
    n_null: int

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    def to_dict(self) -> dict[str, Any]:
        return _dataclass_dict(self) | {"significant": self.significant}


def compare_to_null(
    observed: float, null_samples: ArrayLike, *, alpha: float = 0.05
) -> NullComparison:
    """Empirical one-sided p-value of ``observed`` under ``null_samples`` (pass |cos| on both
    sides to test "more aligned than chance" regardless of sign)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    null = _f64(null_samples, "null_samples").flatten()
    if null.numel() == 0:
        raise ValueError("null_samples is empty")
    obs = float(observed)
    if not math.isfinite(obs):
        raise ValueError(f"observed must be finite, got {observed}")
    return NullComparison(
        observed=obs,
        p_value=empirical_p_value(obs, null),
        null_quantile=quantile(null, 1 - alpha),
        null_mean=float(null.mean()),
        alpha=alpha,
        n_null=int(null.numel()),
    )
