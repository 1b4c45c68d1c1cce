"""How similar directions are: signed cosines, cosine matrices per layer (``SimilarityMatrix``)
and principal angles between subspaces."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp.compare._common import ArrayLike, _f64


def cosine(a: ArrayLike, b: ArrayLike) -> float:
    """Signed cosine between two vectors (float64); 0 if either has zero norm."""
    x, y = _f64(a, "a").flatten(), _f64(b, "b").flatten()
    if x.shape != y.shape:
        raise ValueError(f"cannot compare vectors of length {x.shape[0]} and {y.shape[0]}")
    den = x.norm() * y.norm()
    return float(x @ y / den) if den > 0 else 0.0


def expected_abs_cosine(d_model: int, *, exact: bool = True) -> float:
    """E|cos| between two independent Gaussian vectors in ``d_model`` dimensions.

    ``exact`` uses Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)); otherwise the large-d approximation
    sqrt(2 / (pi d)).
    """
    if d_model < 2:
        raise ValueError(f"d_model must be >= 2 for a random-cosine null, got {d_model}")
    if not exact:
        return math.sqrt(2.0 / (math.pi * d_model))
    return math.exp(math.lgamma(d_model / 2) - math.lgamma((d_model + 1) / 2)) / math.sqrt(math.pi)


def _vector_and_name(item: Any, i: int) -> tuple[Tensor, str]:
    if hasattr(item, "vector"):
        name = getattr(item, "name", None) or f"d{i}"
        return _f64(item.vector, f"direction {name}"), str(name)
    return _f64(item, f"direction {i}"), f"d{i}"


def _unpack(directions: Any, names: Sequence[str] | None) -> tuple[Tensor, list[str], int | None]:
    """Vectors ``[n, d]``, their names and their common layer (None if mixed/unknown)."""
    layer: int | None = None
    if isinstance(directions, Mapping):
        items = list(directions.items())
        vecs = [_f64(getattr(v, "vector", v), f"direction {k}") for k, v in items]
        got_names = [str(k) for k, _ in items]
        sites = [getattr(v, "site", None) for _, v in items]
    elif isinstance(directions, Tensor | np.ndarray):
        mat = _f64(directions, "directions")
        if mat.ndim != 2:
            raise ValueError(
                f"a tensor of directions must be [n, d_model], got shape {tuple(mat.shape)}"
            )
        vecs = list(mat)
        got_names = [f"d{i}" for i in range(mat.shape[0])]
        sites = [None] * mat.shape[0]
    else:
        seq = list(directions)
        pairs = [_vector_and_name(x, i) for i, x in enumerate(seq)]
        vecs = [p[0] for p in pairs]
        got_names = [p[1] for p in pairs]
        sites = [getattr(x, "site", None) for x in seq]
    if not vecs:
        raise ValueError("no directions to compare: pass at least one")
    dims = {v.shape[-1] for v in vecs}
    if len(dims) != 1 or any(v.ndim != 1 for v in vecs):
        raise ValueError(
            f"directions have different sizes {sorted(dims)}: they come from different models "
            "(or sites with different widths) and cannot be compared"
        )
    layers = {getattr(s, "layer", None) for s in sites}
    if len(layers) == 1:
        layer = next(iter(layers))
    if names is not None:
        if len(names) != len(vecs):
            raise ValueError(f"got {len(names)} names for {len(vecs)} directions")
        got_names = [str(n) for n in names]
    return torch.stack(vecs), got_names, layer


def _cos_mat(mat: Tensor) -> Tensor:
    norms = mat.norm(dim=1, keepdim=True)
    zero = (norms.squeeze(1) == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"directions at positions {zero} have zero norm; their cosine is undefined"
        )
    unit = mat / norms
    c = (unit @ unit.T).clamp(-1.0, 1.0)
    c = (c + c.T) / 2
    c.fill_diagonal_(1.0)
    return c


def _strip_site(name: str) -> str:
    return name.split("@", 1)[0]


@dataclass(frozen=True, eq=False)
class SimilarityMatrix:
    """Signed cosines between named directions, one ``[n, n]`` matrix per layer.

    ``signed`` is ``[n_layers, n, n]``; ``layers[i]`` is the layer of matrix ``i`` (None when the
    directions did not share one). ``absolute`` gives |cos|.
    """

    names: list[str]
    signed: Float[Tensor, "n_layers n n"]
    layers: list[int | None]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def absolute(self) -> Float[Tensor, "n_layers n n"]:
        return self.signed.abs()

    @property
    def n(self) -> int:
        return len(self.names)

    def at(self, layer: int | None = None, *, absolute: bool = False) -> Float[Tensor, "n n"]:
        """The matrix for one layer (``layer`` may be omitted when there is only one)."""
        mats = self.absolute if absolute else self.signed
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(f"this matrix has layers {self.layers}; pass layer=one of them")
            return mats[0]
        if layer not in self.layers:
            raise KeyError(f"no layer {layer}; have {self.layers}")
        return mats[self.layers.index(layer)]

    def pair(self, a: str, b: str, *, absolute: bool = False) -> Tensor:
        """Cosine between two named directions at every layer, ``[n_layers]``."""
        for x in (a, b):
            if x not in self.names:
                raise KeyError(f"no direction named {x!r}; have {self.names}")
        i, j = self.names.index(a), self.names.index(b)
        mats = self.absolute if absolute else self.signed
        return mats[:, i, j]

    def mean_offdiagonal(self, *, absolute: bool = False) -> Tensor:
        """Mean off-diagonal cosine per layer, ``[n_layers]`` (NaN for a single direction)."""
        mats = self.absolute if absolute else self.signed
        n = self.n
        if n < 2:
            return torch.full((mats.shape[0],), float("nan"), dtype=torch.float64)
        mask = ~torch.eye(n, dtype=torch.bool)
        return mats[:, mask].mean(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "layers": list(self.layers),
            "signed": self.signed.tolist(),
            "absolute": self.absolute.tolist(),
            "meta": dict(self.meta),
        }


def cosine_matrix(
    directions: Any,
    *,
    names: Sequence[str] | None = None,
) -> SimilarityMatrix:
    """Signed cosine matrix between directions.

    ``directions`` is a sequence of ``Direction`` (or a ``DirectionSet``), a mapping
    ``name -> Direction | vector``, a ``[n, d]`` tensor, or a mapping ``layer -> DirectionSet``
    for one matrix per layer (the same named directions at every layer; names drop the
    ``@site`` suffix so they match across layers).
    """
    if (
        isinstance(directions, Mapping)
        and directions
        and all(isinstance(k, int) and not isinstance(k, bool) for k in directions)
    ):
        layers = sorted(directions)
        mats, ref_names = [], None
        for layer in layers:
            mat, got, _ = _unpack(directions[layer], names)
            got = got if names is not None else [_strip_site(x) for x in got]
            if ref_names is None:
                ref_names = got
            elif got != ref_names:
                raise ValueError(
                    f"layer {layer} holds directions {got} but layer {layers[0]} holds {ref_names}; "
                    "every layer must hold the same directions in the same order (or pass names=)"
                )
            mats.append(_cos_mat(mat))
        if len(set(ref_names or [])) != len(ref_names or []):
            raise ValueError(f"direction names are not unique: {ref_names}; pass names=")
        return SimilarityMatrix(
            names=list(ref_names or []), signed=torch.stack(mats), layers=list(layers)
        )
    mat, got, layer = _unpack(directions, names)
    return SimilarityMatrix(names=got, signed=_cos_mat(mat).unsqueeze(0), layers=[layer])


def _orth_basis(M: Tensor, name: str, *, rtol: float = 1e-10) -> Tensor:
    """Orthonormal basis ``[d, k]`` of the row space of ``M`` ``[k, d]`` via QR."""
    if M.ndim == 1:
        M = M.unsqueeze(0)
    if M.ndim != 2 or M.shape[0] == 0:
        raise ValueError(
            f"{name} must be a [k, d_model] matrix of basis vectors, got {tuple(M.shape)}"
        )
    if M.shape[0] > M.shape[1]:
        raise ValueError(f"{name} has {M.shape[0]} vectors in {M.shape[1]} dimensions: too many")
    q, r = torch.linalg.qr(M.T)
    diag = r.diagonal().abs()
    scale = M.norm(dim=1).max()
    if scale == 0 or (diag <= rtol * scale).any():
        raise ValueError(
            f"{name}'s vectors are linearly dependent (or zero); drop the redundant ones so they span "
            "a subspace of the dimension you mean"
        )
    return q


def principal_angles(A: ArrayLike, B: ArrayLike) -> Float[Tensor, " k"]:
    """Principal angles (radians, ascending) between the row spaces of ``A [k1, d]`` and
    ``B [k2, d]``; ``min(k1, k2)`` angles. QR for orthonormal bases, SVD of ``Qa^T Qb`` for the
    cosines, and the sine formula for small angles (accurate near 0)."""
    a, b = _f64(A, "A"), _f64(B, "B")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"subspaces live in different spaces: d={a.shape[-1]} vs d={b.shape[-1]}")
    qa, qb = _orth_basis(a, "A"), _orth_basis(b, "B")
    if qa.shape[1] > qb.shape[1]:
        qa, qb = qb, qa
    k = qa.shape[1]
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)[:k]
    # sines: singular values of the part of qb ... orthogonal to qa give the large angles
    resid = qa - qb @ (qb.T @ qa)
    sin = torch.linalg.svdvals(resid).clamp(0.0, 1.0)
    sin = torch.sort(sin).values[:k]  # ascending sines <-> ascending angles
    ang_cos = torch.arccos(torch.sort(cos, descending=True).values)
    ang_sin = torch.arcsin(sin)
    use_sin = torch.sort(cos, descending=True).values > math.sqrt(0.5)
    return torch.where(use_sin, ang_sin, ang_cos)
