"""What every comparison shares: float64 tensors checked for NaN, results as plain dicts, and
labelled rows grouped by prompt (diff-means for any weighting of the prompts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _f64(x: Any, name: str) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values; clean the activations first")
    return t


def _to_list(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _dataclass_dict(obj: Any) -> dict[str, Any]:
    return {f: _to_list(getattr(obj, f)) for f in obj.__dataclass_fields__}


def _check_xyg(X: Any, y: Any, groups: Any, name: str = "X") -> tuple[Tensor, Tensor, Tensor]:
    """Float64 rows, 0/1 labels and integer group codes (each row its own group if None)."""
    x = _f64(X, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [rows, d_model], got shape {tuple(x.shape)}")
    lab = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, Tensor) else y)).long().flatten()
    if lab.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} rows but labels have {lab.shape[0]}")
    bad = set(lab.unique().tolist()) - {0, 1}
    if bad:
        raise ValueError(f"labels must be 0/1, found {sorted(bad)}; drop unlabelled rows first")
    if lab.sum() == 0 or lab.sum() == lab.numel():
        raise ValueError(
            f"labels of {name} hold one class only ({int(lab[0])}); need both 1 (positive) and 0"
        )
    if groups is None:
        codes = torch.arange(x.shape[0])
    else:
        g = list(groups.tolist() if isinstance(groups, Tensor | np.ndarray) else groups)
        if len(g) != x.shape[0]:
            raise ValueError(f"{name} has {x.shape[0]} rows but groups have {len(g)}")
        keys = [f"__row{i}" if v is None else v for i, v in enumerate(g)]
        _, inv = np.unique(np.asarray([str(k) for k in keys]), return_inverse=True)
        codes = torch.as_tensor(inv.astype(np.int64))
    return x, lab, codes


@dataclass(frozen=True)
class _GroupSums:
    s_pos: Tensor  # [G, d]
    s_neg: Tensor
    n_pos: Tensor  # [G]
    n_neg: Tensor

    @classmethod
    def build(cls, x: Tensor, lab: Tensor, codes: Tensor) -> _GroupSums:
        G = int(codes.max()) + 1
        d = x.shape[1]
        s_pos = torch.zeros(G, d, dtype=torch.float64).index_add_(0, codes[lab == 1], x[lab == 1])
        s_neg = torch.zeros(G, d, dtype=torch.float64).index_add_(0, codes[lab == 0], x[lab == 0])
        n_pos = torch.zeros(G, dtype=torch.float64).index_add_(0, codes, (lab == 1).double())
        n_neg = torch.zeros(G, dtype=torch.float64).index_add_(0, codes, (lab == 0).double())
        return cls(s_pos, s_neg, n_pos, n_neg)

    def diff(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Diff-means for group weights ``w [B, G]`` -> (``[B, d]``, valid mask ``[B]``)."""
        np_, nn_ = w @ self.n_pos, w @ self.n_neg
        valid = (np_ > 0) & (nn_ > 0)
        d = (w @ self.s_pos) / np_.clamp_min(1e-300).unsqueeze(1) - (
            w @ self.s_neg
        ) / nn_.clamp_min(1e-300).unsqueeze(1)
        return d, valid


def _cos_rows(a: Tensor, b: Tensor) -> Tensor:
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den))


def _codes_and_keys(groups: Sequence[Any] | None, n: int) -> list[str]:
    if groups is None:
        return [f"__row{i}" for i in range(n)]
    g = list(groups.tolist() if isinstance(groups, Tensor | np.ndarray) else groups)
    return [f"__row{i}" if v is None else str(v) for i, v in enumerate(g)]
