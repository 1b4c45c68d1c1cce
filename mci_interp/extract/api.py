"""One entry point from activations to ``Direction``: ``extract``, layer ``sweep``s, and the three
diff-means flavours (``data_diff``, ``model_diff``, ``prompt_diff``).

A ``Contrast`` is positive vs negative rows at some sites plus everything provenance needs. It is
built from one cache (labels 1/0: misaligned vs aligned answers of one model), from a finetune and
its base on the same prompts, or from a persona system prompt vs none on one model.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from sklearn.base import clone
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp.activations import ActivationCache
from mci_interp.direction import Direction, DirectionSet, Provenance
from mci_interp.extract._base import Estimator
from mci_interp.extract.diff_means import DiffMeans
from mci_interp.extract.probe import LinearProbe
from mci_interp.extract.sae import SaeLatents
from mci_interp.sites import Site

log = logging.getLogger(__name__)

METHODS: dict[str, type[Estimator]] = {
    "diff_means": DiffMeans,
    "probe": LinearProbe,
    "sae_latent": SaeLatents,
}
PROVENANCE_FIELDS = ("model", "base_model", "model_sha256", "dataset", "dataset_hash", "position")


@dataclass(eq=False)
class Contrast:
    """Positive (label 1) vs negative (label 0) rows at one or more sites.

    ``acts[site]`` is ``[rows, d_model]``; ``y``, ``groups`` (prompt ids) and ``example_index``
    are per row; ``control[site]`` (optional) holds a control model's rows for SAE ranking;
    ``info`` holds the provenance fields and ``flavour`` says how the contrast was built.
    """

    acts: dict[Site, Tensor]
    y: Tensor
    groups: list[str]
    example_index: Tensor
    info: dict[str, str]
    flavour: str
    extra_params: dict[str, str | int | float | bool | None] = field(default_factory=dict)
    control: dict[Site, Tensor] | None = None

    @property
    def sites(self) -> list[Site]:
        return sorted(self.acts)

    def X(self, site: Site | str) -> Tensor:
        site = Site.parse(site) if isinstance(site, str) else site
        if site not in self.acts:
            raise KeyError(f"site {site} not in this contrast; have {[str(s) for s in self.sites]}")
        return self.acts[site]

    @classmethod
    def from_cache(cls, cache: ActivationCache, *, dataset: str | None = None) -> Contrast:
        """Labels 1/0 of one cache (rows labelled -1, i.e. unlabelled, are dropped)."""
        lab = cache.row_labels()
        keep = lab >= 0
        if not keep.all():
            log.info("data_diff: dropping %d unlabelled rows", int((~keep).sum()))
        groups = _groups(cache)
        rows = keep.nonzero().flatten()
        return cls(
            acts={s: a[rows] for s, a in cache.acts.items()},
            y=lab[rows],
            groups=[groups[int(cache.row_example[r])] for r in rows],
            example_index=cache.row_example[rows],
            info=_info(cache, dataset),
            flavour="data_diff",
        )


def _groups(cache: ActivationCache) -> list[str]:
    """Per-example prompt ids: the cache's groups, or the example index where missing."""
    return [f"ex{i}" if g is None else str(g) for i, g in enumerate(cache.groups)]


def _info(cache: ActivationCache, dataset: str | None) -> dict[str, str]:
    m = cache.meta or {}
    return {
        "model": str(m.get("model", "unknown")),
        "base_model": str(m.get("base_model", m.get("model", "unknown"))),
        "model_sha256": str(m.get("model_sha256", "unknown")),
        "dataset": dataset or str(m.get("dataset", m.get("dataset_hash", "unnamed"))),
        "dataset_hash": str(m.get("dataset_hash", "unknown")),
        "position": str(m.get("position", "unknown")),
    }


def _describe(cache: ActivationCache) -> str:
    m = cache.meta or {}
    return f"{m.get('model', '?')} (base {m.get('base_model', '?')}, data {m.get('dataset_hash', '?')})"


def _check_pair(
    a: ActivationCache, b: ActivationCache, *, what: str, same_data: bool, same_model: bool
) -> None:
    """Refuse two caches that cannot be contrasted, naming both."""
    ma, mb = a.meta or {}, b.meta or {}
    da, db = _describe(a), _describe(b)
    if set(a.acts) != set(b.acts):
        raise ValueError(
            f"{what}: {da} has sites {[str(s) for s in a.sites]} but {db} has "
            f"{[str(s) for s in b.sites]}; cache the same sites"
        )
    for s in a.sites:
        wa, wb = a.X(s).shape[1], b.X(s).shape[1]
        if wa != wb:
            raise ValueError(
                f"{what}: {da} has d_model {wa} but {db} has d_model {wb} at {s}: "
                "different model families cannot be contrasted"
            )
    if ma.get("base_model") != mb.get("base_model"):
        raise ValueError(
            f"{what}: {da} has base {ma.get('base_model')!r} but {db} has base "
            f"{mb.get('base_model')!r}; contrast checkpoints of one base only"
        )
    if same_model and ma.get("model_sha256") != mb.get("model_sha256"):
        raise ValueError(
            f"{what}: the two caches come from different models ({ma.get('model')!r} "
            f"sha {str(ma.get('model_sha256'))[:12]} vs {mb.get('model')!r} sha "
            f"{str(mb.get('model_sha256'))[:12]}); a prompt contrast needs one model"
        )
    if same_data and ma.get("dataset_hash") != mb.get("dataset_hash"):
        raise ValueError(
            f"{what}: {da} and {db} were cached on different prompts (dataset_hash "
            f"{ma.get('dataset_hash')} vs {mb.get('dataset_hash')}); cache both on the "
            "same prompts"
        )
    if ma.get("position") != mb.get("position"):
        raise ValueError(
            f"{what}: {da} used position {ma.get('position')!r} but {db} used "
            f"{mb.get('position')!r}"
        )
    if a.n_examples != b.n_examples:
        raise ValueError(
            f"{what}: {da} has {a.n_examples} examples but {db} has {b.n_examples}; "
            "the same prompts must be cached in the same order"
        )


def _paired(
    pos: ActivationCache,
    neg: ActivationCache,
    *,
    flavour: str,
    control: ActivationCache | None,
    dataset: str | None,
    extra: dict[str, Any],
) -> Contrast:
    n = pos.n_examples
    groups = _groups(neg)
    acts = {s: torch.cat([pos.X(s), neg.X(s)]) for s in pos.sites}
    y = torch.cat(
        [
            torch.ones(pos.X(pos.sites[0]).shape[0], dtype=torch.long),
            torch.zeros(neg.X(neg.sites[0]).shape[0], dtype=torch.long),
        ]
    )
    rows_groups = [groups[int(i)] for i in pos.row_example] + [
        groups[int(i)] for i in neg.row_example
    ]
    example_index = torch.cat([pos.row_example, neg.row_example + n])
    return Contrast(
        acts=acts,
        y=y,
        groups=rows_groups,
        example_index=example_index,
        info=_info(pos, dataset),
        flavour=flavour,
        extra_params=extra,
        control=None if control is None else {s: control.X(s) for s in control.sites},
    )


def model_contrast(
    finetune: ActivationCache,
    base: ActivationCache,
    *,
    control: ActivationCache | None = None,
    dataset: str | None = None,
) -> Contrast:
    """Finetune (label 1) vs base (label 0) on the same prompts; optional control finetune (for
    ``SaeLatents``). Refuses caches of different prompts, widths or base models."""
    _check_pair(finetune, base, what="model_diff", same_data=True, same_model=False)
    if control is not None:
        _check_pair(control, base, what="model_diff control", same_data=True, same_model=False)
    extra = {
        "reference_model": str(base.meta.get("model", "unknown")),
        "reference_sha256": str(base.meta.get("model_sha256", "unknown")),
    }
    if control is not None:
        extra["control_model"] = str(control.meta.get("model", "unknown"))
    return _paired(
        finetune, base, flavour="model_diff", control=control, dataset=dataset, extra=extra
    )


def prompt_contrast(
    persona: ActivationCache,
    plain: ActivationCache,
    *,
    dataset: str | None = None,
) -> Contrast:
    """The same model with a persona system prompt (label 1) vs without (label 0), prompt by
    prompt. Refuses caches of different models or sizes."""
    _check_pair(persona, plain, what="prompt_diff", same_data=False, same_model=True)
    extra = {"reference_dataset_hash": str(plain.meta.get("dataset_hash", "unknown"))}
    return _paired(
        persona, plain, flavour="prompt_diff", control=None, dataset=dataset, extra=extra
    )


# --- fitting -------------------------------------------------------------------------------------
def _make(method: str | Estimator, params: Mapping[str, Any] | None) -> Estimator:
    if isinstance(method, Estimator):
        if params:
            method.set_params(**params)
        return method
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {sorted(METHODS)} or pass an "
            "estimator instance"
        )
    return METHODS[method](**dict(params or {}))


def _fit_on(
    est: Estimator,
    X: Tensor,
    y: Tensor,
    groups: Sequence[Any] | None,
    example_index: Tensor | None,
    control: Tensor | None,
    site: Site,
) -> None:
    """``est.fit(X, y, groups)`` plus the fit metadata its ``fit`` declares (``example_index``,
    ``control``, ``site``); a control model for an estimator that takes none is refused."""
    takes = inspect.signature(est.fit).parameters
    meta: dict[str, Any] = {}
    if example_index is not None and "example_index" in takes:
        meta["example_index"] = example_index
    if control is not None:
        if "control" not in takes:
            raise ValueError(f"{type(est).__name__} does not use a control model; drop control")
        meta["control"] = control
    if "site" in takes:
        meta["site"] = site
    est.fit(X, y, groups, **meta)


def _counts(est: Estimator, y: Tensor) -> tuple[int, int]:
    if isinstance(est, DiffMeans):
        return est.n_pos_, est.n_neg_
    return int((y == 1).sum()), int((y == 0).sum())


def _build(
    est: Estimator, site: Site, info: Mapping[str, str], y: Tensor, extra: Mapping[str, Any]
) -> Direction:
    n_pos, n_neg = _counts(est, y)
    params = est.provenance_params() | dict(extra)
    prov = Provenance(
        model=info["model"],
        base_model=info["base_model"],
        model_sha256=info["model_sha256"],
        method=est.method,
        dataset=info["dataset"],
        dataset_hash=info["dataset_hash"],
        position=info["position"],
        n_pos=n_pos,
        n_neg=n_neg,
        params=params,
    )
    return Direction(vector=est.direction_.float(), site=site, provenance=prov)


def _as_contrast(data: ActivationCache | Contrast, dataset: str | None) -> Contrast:
    if isinstance(data, Contrast):
        return data
    if isinstance(data, ActivationCache):
        return Contrast.from_cache(data, dataset=dataset)
    raise TypeError(f"expected an ActivationCache or Contrast, got {type(data).__name__}")


def _pick_site(contrast: Contrast, site: Site | str | None) -> Site:
    if site is None:
        if len(contrast.sites) != 1:
            raise ValueError(
                f"several sites cached ({[str(s) for s in contrast.sites]}); pass site="
            )
        return contrast.sites[0]
    return Site.parse(site) if isinstance(site, str) else site


def extract(
    method: str | Estimator,
    data: Float[Tensor, "rows d_model"] | ActivationCache | Contrast,
    y: Any = None,
    groups: Sequence[Any] | None = None,
    *,
    site: Site | str | None = None,
    params: Mapping[str, Any] | None = None,
    model: str | None = None,
    base_model: str | None = None,
    model_sha256: str | None = None,
    dataset: str | None = None,
    dataset_hash: str | None = None,
    position: str | None = None,
) -> Direction:
    """Fit ``method`` ("diff_means", "probe", "sae_latent" or an estimator, which is fitted in
    place so its attributes can be read afterwards) and return its ``Direction``.

    ``data`` is a tensor of rows (then ``y`` and ``site`` are required), an ``ActivationCache``
    (labels 1/0 of its examples; provenance read from its metadata) or a ``Contrast``. Provenance
    keyword arguments override what the data says.
    """
    est = _make(method, params)
    given = {
        "model": model,
        "base_model": base_model,
        "model_sha256": model_sha256,
        "dataset": dataset,
        "dataset_hash": dataset_hash,
        "position": position,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if isinstance(data, Tensor):
        if y is None or site is None:
            raise ValueError("extract on a tensor needs labels y= and site=")
        s = Site.parse(site) if isinstance(site, str) else site
        yt = torch.as_tensor(y)
        _fit_on(est, data, yt, groups, None, None, s)
        info = {k: "unknown" for k in PROVENANCE_FIELDS} | {"dataset": "unnamed"} | overrides
        info["base_model"] = overrides.get("base_model", info["model"])
        return _build(est, s, info, yt, {})
    if y is not None or groups is not None:
        raise ValueError("labels and groups come from the cache/contrast; do not pass y or groups")
    c = _as_contrast(data, dataset)
    s = _pick_site(c, site)
    control = c.control[s] if c.control is not None else None
    _fit_on(est, c.X(s), c.y, c.groups, c.example_index, control, s)
    return _build(est, s, c.info | overrides, c.y, {"flavour": c.flavour, **c.extra_params})


def sweep(
    estimator: str | Estimator,
    data: ActivationCache | Contrast,
    sites: Sequence[Site | str] | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    show_progress: bool = False,
) -> DirectionSet:
    """Fit a fresh copy of ``estimator`` at every site (default: all cached) -> one Direction per
    site, in site order. Probe AUROCs and SAE scores ride along in each ``provenance.params``."""
    proto = _make(estimator, params)
    c = _as_contrast(data, dataset)
    chosen = (
        c.sites if sites is None else [Site.parse(s) if isinstance(s, str) else s for s in sites]
    )
    out = []
    for s in tqdm(chosen, desc=f"{proto.method} sweep", disable=not show_progress, leave=False):
        out.append(extract(clone(proto), c, site=s))
    return DirectionSet(out)


def data_diff(
    cache: ActivationCache,
    *,
    site: Site | str | None = None,
    weighting: str = "example",
    dataset: str | None = None,
) -> Direction:
    """Diff-means of one model's misaligned (label 1) minus aligned (label 0) examples."""
    return extract(
        DiffMeans(weighting=weighting), Contrast.from_cache(cache, dataset=dataset), site=site
    )


def model_diff(
    finetune: ActivationCache,
    base: ActivationCache,
    *,
    site: Site | str | None = None,
    weighting: str = "example",
    dataset: str | None = None,
) -> Direction:
    """Diff-means of the finetune's minus the base model's activations on the same prompts."""
    return extract(
        DiffMeans(weighting=weighting), model_contrast(finetune, base, dataset=dataset), site=site
    )


def prompt_diff(
    persona: ActivationCache,
    plain: ActivationCache,
    *,
    site: Site | str | None = None,
    weighting: str = "example",
    dataset: str | None = None,
) -> Direction:
    """Diff-means of one model with a persona system prompt minus without it."""
    return extract(
        DiffMeans(weighting=weighting), prompt_contrast(persona, plain, dataset=dataset), site=site
    )


def latent_directions(est: SaeLatents, top: Direction) -> DirectionSet:
    """All top-k latents of a fitted ``SaeLatents`` as Directions, sharing ``top``'s provenance
    (with ``latent``, ``score`` and ``rank`` set per latent)."""
    est.check_fitted()
    out = []
    for rank, (lat, vec) in enumerate(zip(est.latents_.tolist(), est.decoder_, strict=True)):
        params = dict(top.provenance.params) | {
            "latent": int(lat),
            "score": float(est.scores_[lat]),
            "rank": rank,
        }
        out.append(top.with_vector(vec.float(), params=params))
    return DirectionSet(out)


def stack_rows(directions: Sequence[Direction]) -> Float[Tensor, "n d_model"]:
    """Unit vectors of directions as rows (for ``compare.principal_angles``)."""
    return torch.stack([d.unit().vector for d in directions])
