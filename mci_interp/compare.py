"""Comparing directions: cosine matrices, principal angles, null distributions, bootstrap CIs.

Pure math on torch tensors (float64 inside); no model code. Anything with a ``.vector`` (a
``Direction``), a mapping ``name -> vector`` or a ``[n, d_model]`` tensor can be compared.
Every resampling function takes a ``torch.Generator`` and never touches the global RNG; the
resampling itself (bootstrap, split halves, p-values, quantiles) is ``mci_interp.stats``'s.

Conventions: cosines are reported both signed and absolute (some public helpers return |cos| by
default, which hides anti-aligned directions); nulls resample *prompts* (groups), never rows,
so answers to one question move together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp.stats import (
    bootstrap,
    check_level,
    empirical_p_value,
    index_counts,
    percentile_interval,
    quantile,
    spearman_brown,
    split_half,
)

ArrayLike = Tensor | np.ndarray | Sequence[float]


# --- small helpers -------------------------------------------------------------------------------
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


# --- cosine matrices -----------------------------------------------------------------------------
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


# --- subspaces -----------------------------------------------------------------------------------
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


# --- nulls ---------------------------------------------------------------------------------------
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


def _codes_and_keys(groups: Sequence[Any] | None, n: int) -> list[str]:
    if groups is None:
        return [f"__row{i}" for i in range(n)]
    g = list(groups.tolist() if isinstance(groups, Tensor | np.ndarray) else groups)
    return [f"__row{i}" if v is None else str(v) for i, v in enumerate(g)]


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


__all__ = [
    "BootstrapCI",
    "NullComparison",
    "PermutationNull",
    "RandomNull",
    "SimilarityMatrix",
    "SplitHalf",
    "bootstrap_cosine",
    "compare_to_null",
    "cosine",
    "cosine_matrix",
    "expected_abs_cosine",
    "permutation_null",
    "principal_angles",
    "random_direction_null",
    "split_half_reliability",
]
