"""The interventions, ``Steer``, ``Ablate`` and ``SetProjection``: frozen values whose
``hooks(model)`` edit the residual stream at their sites; ``apply`` attaches them for a ``with``
block and removes them on exit. Also the checks they share (direction, sites, finite numbers)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mci_interp.direction import Direction
from mci_interp.intervene.positions import (
    PositionRule,
    _check_positions,
    _freeze_positions,
    position_mask,
)
from mci_interp.models import HookContext, HookedModel, HookFn
from mci_interp.sites import Site, as_site

Scale = Literal["absolute", "relative"]


SitesArg = Sequence[Site | int | str] | Site | int | str | None


_WRITABLE = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def _vector(direction: Direction | Tensor) -> Tensor:
    """The direction as a float32 master copy on the CPU (a Direction's own convention, checked
    and normalised once); hooks move it to their activations' device."""
    v = direction.vector if isinstance(direction, Direction) else direction
    if not isinstance(v, Tensor) or v.ndim != 1:
        raise TypeError(
            f"direction must be a Direction or a 1-D tensor, got {type(direction).__name__} "
            f"with shape {getattr(v, 'shape', None)}"
        )
    return v.detach().to("cpu", torch.float32)


def _work_dtype(acts: Tensor) -> torch.dtype:
    """Hook arithmetic precision: float32, or float64 for float64 activations."""
    return torch.float64 if acts.dtype == torch.float64 else torch.float32


class _OnDevice:
    """A unit vector with one copy per (device, dtype) it meets, made on first use."""

    def __init__(self, u: Tensor):
        self.u = u
        self.copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, acts: Tensor) -> Tensor:
        key = (acts.device, _work_dtype(acts))
        got = self.copies.get(key)
        if got is None:
            got = self.copies[key] = self.u.to(*key)
        return got


def _unit(direction: Direction | Tensor) -> Tensor:
    v = _vector(direction)
    if not torch.isfinite(v).all():
        raise ValueError("direction has NaN or inf entries; recompute it")
    n = v.norm()
    if n == 0:
        raise ValueError("direction has zero norm; an intervention needs a non-zero direction")
    return v / n


def _check_direction(direction: Direction | Tensor, model: HookedModel) -> None:
    v = _vector(direction)
    if v.shape[0] != model.d_model:
        name = direction.name if isinstance(direction, Direction) else "tensor"
        raise ValueError(
            f"direction {name} has d_model {v.shape[0]} but {model.name} has d_model "
            f"{model.d_model}: use a direction extracted from this model family"
        )
    _unit(direction)


def _resolve_sites(
    direction: Direction | Tensor, sites: SitesArg, *, what: str
) -> list[Site] | str:
    """Sites as given: Sites, hook names ("blocks.12.hook_resid_post"), or ints (the direction's
    component at that layer); 'all' is kept symbolic."""
    if isinstance(sites, str) and sites.strip() == "all":
        return "all"
    if sites is None:
        if not isinstance(direction, Direction):
            raise ValueError(f"{what}: a raw tensor direction has no site; pass sites=[Site(...)]")
        return [direction.site]
    if isinstance(sites, (Site, int, str)):
        sites = [sites]
    component = direction.site.component if isinstance(direction, Direction) else "resid_post"
    out = []
    for s in sites:
        try:
            out.append(as_site(s, component=component))
        except ValueError as e:
            raise ValueError(
                f"{what}: {e}; sites takes Sites, layer numbers, hook names or 'all'"
            ) from None
    if not out:
        raise ValueError(f"{what}: sites is empty; give at least one site")
    return out


def all_writer_sites(n_layers: int) -> list[Site]:
    """Every block input and every attention and MLP output: the directional-ablation recipe that
    is equivalent to orthogonalising every residual writer."""
    out = []
    for layer in range(n_layers):
        out += [Site(layer, "resid_pre"), Site(layer, "attn_out"), Site(layer, "mlp_out")]
    return out


def _check_sites(sites: list[Site] | str, model: HookedModel, *, what: str) -> list[Site]:
    resolved = all_writer_sites(model.n_layers) if isinstance(sites, str) else list(sites)
    for s in resolved:
        s.check(model.n_layers)
        if s.component not in _WRITABLE:
            raise ValueError(
                f"{what}: {s.hook_name} is read-only (editing resid_mid would change only the MLP "
                f"input); use Site({s.layer}, 'attn_out') or Site({s.layer + 1}, 'resid_pre')"
            )
    return resolved


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}; pick a finite {name}")
    return float(value)


def _apply_masked(acts: Tensor, new: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return new
    return torch.where(mask.to(acts.device)[None, :, None], new, acts)


def _ablate(acts: Tensor, u: Tensor) -> Tensor:
    a = acts.to(_work_dtype(acts))
    u = u.to(a.device, a.dtype)
    return (a - (a @ u)[..., None] * u).to(acts.dtype)


@dataclass(frozen=True, eq=False)
class Steer:
    """Add ``alpha * unit(direction)`` to the residual stream at ``sites`` and ``positions``.

    ``scale="relative"`` makes ``alpha`` a multiple of each token's own residual norm at the site
    (norm-relative steering: ``h + alpha * |h| * u``), so one alpha means the same across layers.
    """

    direction: Direction | Tensor
    alpha: float
    _: KW_ONLY
    sites: SitesArg = None
    positions: PositionRule = "all"
    scale: Scale = "absolute"

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _freeze_positions(self.positions))
        if isinstance(self.sites, list):
            object.__setattr__(self, "sites", tuple(self.sites))

    def validate(self, model: HookedModel) -> list[Site]:
        _check_finite("alpha", self.alpha)
        if self.scale not in ("absolute", "relative"):
            raise ValueError(f"scale={self.scale!r}; use 'absolute' or 'relative'")
        _check_positions(self.positions)
        _check_direction(self.direction, model)
        return _check_sites(
            _resolve_sites(self.direction, self.sites, what="Steer"), model, what="Steer"
        )

    def hooks(self, model: HookedModel) -> list[tuple[Site, HookFn]]:
        sites = self.validate(model)
        u = _OnDevice(_unit(self.direction))
        alpha, positions, relative = float(self.alpha), self.positions, self.scale == "relative"

        def fn(acts: Tensor, ctx: HookContext) -> Tensor:
            mask = position_mask(positions, ctx, acts.shape[1], device=acts.device)
            uu = u.like(acts)
            a = acts.to(uu.dtype)
            coef = alpha * a.norm(dim=-1, keepdim=True) if relative else alpha
            return _apply_masked(acts, (a + coef * uu).to(acts.dtype), mask)

        return [(s, fn) for s in sites]


@dataclass(frozen=True, eq=False)
class Ablate:
    """Project the direction out, ``h <- h - (h.u)u``, at every position of each site.

    ``sites="all"`` ablates at every block input and every attention and MLP output (the
    refusal-direction recipe), which matches ``orthogonalized(model, direction)``.
    """

    direction: Direction | Tensor
    _: KW_ONLY
    sites: SitesArg = None

    def __post_init__(self) -> None:
        if isinstance(self.sites, list):
            object.__setattr__(self, "sites", tuple(self.sites))

    @classmethod
    def every_layer(cls, direction: Direction | Tensor, n_layers: int) -> Ablate:
        """Ablation at every block input, attention output and MLP output of ``n_layers`` blocks."""
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        return cls(direction, sites=all_writer_sites(n_layers))

    def validate(self, model: HookedModel) -> list[Site]:
        _check_direction(self.direction, model)
        return _check_sites(
            _resolve_sites(self.direction, self.sites, what="Ablate"), model, what="Ablate"
        )

    def hooks(self, model: HookedModel) -> list[tuple[Site, HookFn]]:
        sites = self.validate(model)
        u = _OnDevice(_unit(self.direction))

        def fn(acts: Tensor, ctx: HookContext) -> Tensor:
            return _ablate(acts, u.like(acts))

        return [(s, fn) for s in sites]


@dataclass(frozen=True, eq=False)
class SetProjection:
    """Set the component along the direction to ``value``: ``h <- h - (h.u)u + value*u``."""

    direction: Direction | Tensor
    value: float
    _: KW_ONLY
    sites: SitesArg = None
    positions: PositionRule = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _freeze_positions(self.positions))
        if isinstance(self.sites, list):
            object.__setattr__(self, "sites", tuple(self.sites))

    def validate(self, model: HookedModel) -> list[Site]:
        _check_finite("value", self.value)
        _check_positions(self.positions)
        _check_direction(self.direction, model)
        return _check_sites(
            _resolve_sites(self.direction, self.sites, what="SetProjection"),
            model,
            what="SetProjection",
        )

    def hooks(self, model: HookedModel) -> list[tuple[Site, HookFn]]:
        sites = self.validate(model)
        u = _OnDevice(_unit(self.direction))
        value, positions = float(self.value), self.positions

        def fn(acts: Tensor, ctx: HookContext) -> Tensor:
            mask = position_mask(positions, ctx, acts.shape[1], device=acts.device)
            uu = u.like(acts)
            a = acts.to(uu.dtype)
            new = a - (a @ uu)[..., None] * uu + value * uu
            return _apply_masked(acts, new.to(acts.dtype), mask)

        return [(s, fn) for s in sites]


Intervention = Steer | Ablate | SetProjection


@contextlib.contextmanager
def apply(model: HookedModel, *interventions: Intervention) -> Iterator[HookedModel]:
    """Attach every intervention's hooks for the body of a ``with``; removed on exit, exceptions
    included. All interventions are validated before any hook is attached."""
    for iv in interventions:
        if not hasattr(iv, "hooks") or not hasattr(iv, "validate"):
            raise TypeError(
                f"{type(iv).__name__} is not an intervention; pass Steer, Ablate or SetProjection values"
            )
        iv.validate(model)
    fwd: list[tuple[Site, HookFn]] = []
    for iv in interventions:
        fwd.extend(iv.hooks(model))
    with model.hooks(fwd):
        yield model
