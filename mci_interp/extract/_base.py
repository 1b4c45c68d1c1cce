"""Shared pieces of the estimators: scikit-learn style parameters and strict input checks."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mci_interp.direction import Param


class Estimator:
    """Base of the direction estimators: ``__init__`` stores keyword hyperparameters only,
    ``fit`` returns ``self``, fitted state ends in ``_``; ``direction_`` is the fitted vector."""

    method: str = "estimator"
    direction_: Tensor

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyperparameters as passed to ``__init__`` (scikit-learn convention)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Estimator:
        valid = set(self._param_names())
        for k, v in params.items():
            if k not in valid:
                raise ValueError(
                    f"{type(self).__name__} has no parameter {k!r}; valid: {sorted(valid)}"
                )
            setattr(self, k, v)
        return self

    def provenance_params(self) -> dict[str, Param]:
        """Hyperparameters plus fitted summaries, flattened to JSON scalars for ``Provenance``."""
        out: dict[str, Param] = {}
        for k, v in self.get_params().items():
            out[k] = _scalar(v)
        out.update(self.fit_summary())
        return out

    def fit_summary(self) -> dict[str, Param]:
        """Scalar facts about the fit worth recording in provenance (overridden)."""
        return {}

    def is_fitted(self) -> bool:
        return hasattr(self, "direction_")

    def check_fitted(self) -> None:
        if not self.is_fitted():
            raise ValueError(f"{type(self).__name__} is not fitted yet; call fit(X, y) first")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def clone(est: Estimator) -> Estimator:
    """An unfitted copy with the same hyperparameters."""
    return type(est)(**est.get_params())


def _scalar(v: Any) -> Param:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, np.integer | np.floating):
        return v.item()
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except TypeError:
        return str(v)


def as_float64(X: Any, name: str = "X") -> Tensor:
    """A 2-D float64 CPU tensor; raise on NaN/inf naming how many rows are bad."""
    if isinstance(X, Tensor):
        t = X.detach().to("cpu", torch.float64)
    else:
        t = torch.as_tensor(np.asarray(X, dtype=np.float64))
    if t.ndim != 2:
        raise ValueError(f"{name} must be [rows, d_model], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    finite = torch.isfinite(t).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero().flatten()
        raise ValueError(
            f"{name} has NaN or inf activations in {bad.numel()} of {t.shape[0]} rows (first: row "
            f"{int(bad[0])}); re-cache in float32 or drop those rows"
        )
    return t


def as_labels(y: Any, n: int, *, name: str = "y") -> Tensor:
    """0/1 labels as a long tensor; both classes must be present."""
    lab = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, Tensor) else y)).flatten()
    if lab.numel() != n:
        raise ValueError(f"{name} has {lab.numel()} labels but X has {n} rows")
    if lab.is_floating_point():
        if not torch.equal(lab, lab.round()):
            raise ValueError(f"{name} must hold integer labels 0/1, got non-integers")
    lab = lab.long()
    values = set(lab.unique().tolist())
    if not values <= {0, 1}:
        raise ValueError(
            f"{name} must hold labels 0 (negative) and 1 (positive), found {sorted(values)}; "
            "drop unlabelled (-1) rows first"
        )
    if len(values) < 2:
        only = next(iter(values))
        raise ValueError(
            f"{name} holds one class only (all {only}): a direction needs both positive (1) and "
            "negative (0) rows"
        )
    return lab


def as_groups(groups: Sequence[Any] | None, n: int, *, name: str = "groups") -> np.ndarray | None:
    """Integer group codes per row; None entries become singleton groups; None stays None."""
    if groups is None:
        return None
    g = list(groups.tolist() if isinstance(groups, Tensor | np.ndarray) else groups)
    if len(g) != n:
        raise ValueError(f"{name} has {len(g)} entries but X has {n} rows")
    keys = np.asarray([f"\x00row{i}" if v is None else str(v) for i, v in enumerate(g)])
    return np.unique(keys, return_inverse=True)[1].astype(np.int64)
