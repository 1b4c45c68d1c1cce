"""Difference of class means: the workhorse direction estimator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from sklearn.base import TransformerMixin
from torch import Tensor

from mci_interp.direction import Param
from mci_interp.extract._base import Estimator, as_float64, as_labels, project_rows

WEIGHTINGS = ("example", "token")


class DiffMeans(TransformerMixin, Estimator):
    """mean(positive rows) - mean(negative rows), accumulated in float64 on the CPU.

    When rows are tokens of examples (``example_index`` given to ``fit``), ``weighting="token"``
    averages all tokens pooled (the model-organisms convention) and ``weighting="example"``
    first averages within each example so every example counts once (the persona-vectors
    convention). Without ``example_index`` each row is one example and both agree.

    ``transform(X)`` is each row's scalar projection on the unit direction, ``[rows, 1]``.

    Fitted: ``direction_`` (float64 ``[d_model]``), ``mean_pos_``, ``mean_neg_``, ``n_pos_``,
    ``n_neg_`` (examples or tokens, by weighting), ``n_rows_``, ``n_features_in_``.
    """

    method = "diff_means"

    def __init__(self, *, weighting: str = "example") -> None:
        self.weighting = weighting

    def fit(
        self,
        X: Float[Tensor, "rows d_model"],
        y: Any,
        groups: Sequence[Any] | None = None,
        *,
        example_index: Any = None,
    ) -> DiffMeans:
        """Fit on rows ``X`` with labels ``y`` (1 positive, 0 negative). ``groups`` is accepted
        for the common signature and unused; ``example_index`` (per row, which example it is a
        token of) is the fit metadata the weighting reads."""
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        x = as_float64(X)
        lab = as_labels(y, x.shape[0])
        if example_index is not None and self.weighting == "example":
            ex = torch.as_tensor(example_index).long().flatten()
            if ex.numel() != x.shape[0]:
                raise ValueError(
                    f"example_index has {ex.numel()} entries but X has {x.shape[0]} rows"
                )
            uniq, inv = torch.unique(ex, return_inverse=True)
            n_ex = uniq.numel()
            sums = torch.zeros(n_ex, x.shape[1], dtype=torch.float64).index_add_(0, inv, x)
            counts = torch.bincount(inv, minlength=n_ex).double()
            ex_means = sums / counts.unsqueeze(1)
            ex_lab = torch.full((n_ex,), -1, dtype=torch.long)
            ex_lab[inv] = lab
            mixed = torch.zeros(n_ex, dtype=torch.bool)
            mixed[inv[lab != ex_lab[inv]]] = True
            if mixed.any():
                raise ValueError(
                    f"examples {uniq[mixed][:5].tolist()} have rows with both labels; labels belong "
                    "to examples, not tokens"
                )
            pos, neg = ex_means[ex_lab == 1], ex_means[ex_lab == 0]
        else:
            pos, neg = x[lab == 1], x[lab == 0]
        self.mean_pos_ = pos.mean(0)
        self.mean_neg_ = neg.mean(0)
        self.direction_ = self.mean_pos_ - self.mean_neg_
        self.n_pos_, self.n_neg_ = int(pos.shape[0]), int(neg.shape[0])
        self.n_rows_ = int(x.shape[0])
        self.n_features_in_ = int(x.shape[1])
        return self

    def transform(self, X: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows 1"]:
        """Each row's scalar projection on the unit direction, ``[rows, 1]`` (float64; a tensor on
        ``X``'s device for a tensor, else a NumPy array)."""
        self.check_fitted()
        return project_rows(X, self.direction_.unsqueeze(0))

    def fit_summary(self) -> dict[str, Param]:
        self.check_fitted()
        return {"norm": float(self.direction_.norm()), "n_rows": self.n_rows_}
