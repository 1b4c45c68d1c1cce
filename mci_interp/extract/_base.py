"""Shared pieces of the estimators: the scikit-learn base class and strict input checks.

Every estimator is a ``sklearn.base.BaseEstimator``: ``__init__`` stores keyword hyperparameters
only, ``fit(X, y, groups=None)`` returns ``self``, fitted state ends in ``_`` and
``get_params()`` feeds ``Provenance.params``, so ``sklearn.base.clone``, ``Pipeline`` and
``GridSearchCV`` work. Inputs may be torch tensors (any device and dtype) or array-likes;
``transform`` answers in the kind it was given (tensor in, tensor out on the input's device;
array in, NumPy out).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from mci_interp.direction import Param


class Estimator(BaseEstimator):
    """Base of the direction estimators; ``direction_`` is the fitted vector (float64, CPU).

    Subclasses implement ``fit(X, y, groups=None, *, <per-row metadata>)``: the three positional
    arguments are the same for every estimator (``groups`` holds prompt ids; estimators that do
    not split rows accept and ignore it), and keyword-only extras (``example_index``,
    ``control``, ...) are scikit-learn fit metadata that ``extract`` passes where a class takes it.
    """

    method: ClassVar[str] = "estimator"
    direction_: Tensor

    def fit(self, X: Any, y: Any, groups: Sequence[Any] | None = None) -> Estimator:
        raise NotImplementedError

    def provenance_params(self) -> dict[str, Param]:
        """Hyperparameters plus fitted summaries, flattened to JSON scalars for ``Provenance``."""
        out: dict[str, Param] = {k: _scalar(v) for k, v in self.get_params(deep=False).items()}
        out.update(self.fit_summary())
        return out

    def fit_summary(self) -> dict[str, Param]:
        """Scalar facts about the fit worth recording in provenance (overridden)."""
        return {}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "direction_")

    def is_fitted(self) -> bool:
        return self.__sklearn_is_fitted__()

    def check_fitted(self) -> None:
        """Raise ``sklearn.exceptions.NotFittedError`` (a ``ValueError``) before ``fit``."""
        check_is_fitted(self, msg="%(name)s is not fitted yet; call fit(X, y) first")


def _scalar(v: Any) -> Param:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, np.integer | np.floating):
        return v.item()
    if isinstance(v, torch.dtype | torch.device):
        return str(v)
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except TypeError:
        return str(v)


def check_rows(X: Any, name: str = "X") -> Tensor:
    """``X`` as a 2-D floating tensor, kept on its device and in its dtype (array-likes become
    CPU tensors); raise on NaN/inf naming how many rows are bad. The check runs where ``X`` is."""
    t = X.detach() if isinstance(X, Tensor) else torch.as_tensor(np.asarray(X))
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be [rows, d_model], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    finite = torch.isfinite(t).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(
            f"{name} has NaN or inf activations in {bad.numel()} of {t.shape[0]} rows (first: row "
            f"{int(bad[0])}); re-cache in float32 or drop those rows"
        )
    return t


def as_float64(X: Any, name: str = "X") -> Tensor:
    """A 2-D float64 CPU tensor (where the diff-means and probe statistics are accumulated);
    raise on NaN/inf naming how many rows are bad."""
    if isinstance(X, Tensor):
        return check_rows(X, name).to("cpu", torch.float64)
    return check_rows(np.asarray(X, dtype=np.float64), name)


def wide_dtype(device: torch.device) -> torch.dtype:
    """The widest float a device computes in: float64, or float32 where float64 is missing."""
    return torch.float32 if device.type == "mps" else torch.float64


def like_input(X: Any, out: Tensor) -> Any:
    """``out`` in the kind ``X`` came as: a tensor on ``X``'s device, else a NumPy array."""
    if isinstance(X, Tensor):
        return out.to(X.device)
    if out.dtype in (torch.bfloat16, torch.float16):
        out = out.float()
    return out.detach().cpu().numpy()


def project_rows(X: Any, directions: Tensor, *, name: str = "X") -> Any:
    """Scalar projections of rows of ``X`` onto unit rows of ``directions`` ``[k, d_model]``,
    ``[rows, k]``, computed on ``X``'s device in float64 (float32 on MPS)."""
    x = check_rows(X, name)
    if x.shape[1] != directions.shape[1]:
        raise ValueError(
            f"{name} has d_model {x.shape[1]} but the fitted direction has {directions.shape[1]}; "
            "use activations of the model and site it was fitted on"
        )
    wide = wide_dtype(x.device)
    norms = directions.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a fitted direction has zero norm; there is nothing to project onto")
    units = (directions / norms).to(x.device, wide)
    return like_input(X, x.to(wide) @ units.T)


def as_labels(y: Any, n: int, *, name: str = "y") -> Tensor:
    """0/1 labels as a long CPU tensor; both classes must be present."""
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


def as_device(device: str | torch.device | None) -> torch.device | None:
    """``None`` or a ``torch.device`` (from a name such as ``"cuda:0"``)."""
    return None if device is None else torch.device(device)


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` or a floating ``torch.dtype`` (from a name such as ``"bfloat16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype or its name (float32, bfloat16, float16), "
            f"got {dtype!r}"
        )
    return found
