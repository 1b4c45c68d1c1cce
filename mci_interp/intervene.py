"""Causal interventions on a ``HookedModel``: steering, directional ablation, projection setting,
weight orthogonalisation, dose-response sweeps and a KL distance to the unsteered model.

Interventions are frozen values with ``hooks(model) -> [(Site, HookFn)]``; ``apply(model, *ivs)``
validates all of them against the model *before* any forward pass, attaches their hooks and
removes them on exit, exceptions included. ``orthogonalized`` edits weights and restores the exact
original tensors on exit.

Devices and dtypes: every tensor a hook creates lives on the device of the activations it meets;
the arithmetic runs in float32 (float64 for float64 activations) and the result is cast back to
the activations' dtype, because a projection computed in bfloat16 would leave ``|h.u|`` at ~1e-2
of ``|h|`` instead of removing it. Sites may be given as ``Site`` values, layer numbers (the
direction's component at that layer) or TransformerLens hook names (``"blocks.12.hook_resid_post"``).

Position rules (``positions=``) use absolute positions of the (padded) sequence as the model
sees it, i.e. ``ctx.past_len + index``:

- ``"all"``: every position, prompt and generated;
- ``"prompt"``: positions before ``ctx.prompt_len`` (every position outside generation);
- ``"generated"``: positions at or after ``ctx.prompt_len`` (none outside generation);
- a ``slice`` or a list of ints: prompt positions; negative numbers count back from the end of
  the prompt (``-1`` is the last prompt token when prompts are left-padded, as in ``generate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp._io import write_json
from mci_interp.datasets import ChatExample, pad
from mci_interp.direction import Direction, random_direction
from mci_interp.generation import prompt_ids
from mci_interp.models import HookContext, HookedModel, HookFn, save_atomic_dir
from mci_interp.sites import Site, as_site

log = logging.getLogger(__name__)

PositionRule = Literal["all", "prompt", "generated"] | slice | Sequence[int]
Scale = Literal["absolute", "relative"]
SitesArg = Sequence[Site | int | str] | Site | int | str | None
_WRITABLE = ("resid_pre", "resid_post", "attn_out", "mlp_out")


# --- helpers ----------------------------------------------------------------------------------
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


def _check_positions(positions: Any) -> None:
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise ValueError(
                f"unknown positions {positions!r}; use 'all', 'prompt', 'generated', a slice or a "
                "list of ints"
            )
        return
    if isinstance(positions, slice):
        for part in (positions.start, positions.stop, positions.step):
            if part is not None and (not isinstance(part, int) or isinstance(part, bool)):
                raise ValueError(f"positions slice {positions!r} must have int bounds")
        if positions.step is not None and positions.step <= 0:
            raise ValueError(f"positions slice {positions!r} needs a positive step")
        return
    if isinstance(positions, Sequence) and not isinstance(positions, (str, bytes)):
        if len(positions) == 0:
            raise ValueError("positions is an empty list; give at least one position or use 'all'")
        bad = [p for p in positions if not isinstance(p, int) or isinstance(p, bool)]
        if bad:
            raise ValueError(f"positions must be ints, got {bad[:3]!r}")
        return
    raise ValueError(
        f"positions={positions!r} is not understood; use 'all', 'prompt', 'generated', a slice or "
        "a list of ints"
    )


def _freeze_positions(positions: Any) -> Any:
    if isinstance(positions, (str, slice)):
        return positions
    if isinstance(positions, Sequence):
        return tuple(positions)
    return positions


def position_mask(
    positions: PositionRule, ctx: HookContext, n: int, *, device: torch.device | str | None = None
) -> Tensor | None:
    """Boolean ``[n]`` mask (on ``device``) of the current chunk's positions an intervention acts
    on; None = all."""
    if isinstance(positions, str) and positions == "all":
        return None
    if isinstance(positions, str):
        if ctx.prompt_len is None:  # a plain forward pass: everything is prompt
            return (
                None if positions == "prompt" else torch.zeros(n, dtype=torch.bool, device=device)
            )
        absolute = torch.arange(ctx.past_len, ctx.past_len + n, device=device)
        if positions == "prompt":
            return absolute < ctx.prompt_len
        return absolute >= ctx.prompt_len
    length = ctx.prompt_len if ctx.prompt_len is not None else ctx.past_len + n
    if isinstance(positions, slice):
        wanted = list(range(length)[positions])
    else:
        wanted = []
        for p in positions:
            q = p + length if p < 0 else p
            if not 0 <= q < length:
                raise ValueError(
                    f"position {p} is outside the prompt of length {length}; use positions within "
                    f"-{length}..{length - 1}"
                )
            wanted.append(q)
    flags = [False] * n
    for q in wanted:  # a few ints: built on the host, one small copy to the device
        if 0 <= q - ctx.past_len < n:
            flags[q - ctx.past_len] = True
    return torch.tensor(flags, dtype=torch.bool, device=device)


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


# --- interventions ----------------------------------------------------------------------------
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


# --- weight orthogonalisation -----------------------------------------------------------------
def _tied(model: HookedModel) -> bool:
    out = model.hf.get_output_embeddings()
    return out is not None and out.weight is model.hf.get_input_embeddings().weight


@contextlib.contextmanager
def orthogonalized(model: HookedModel, direction: Direction | Tensor) -> Iterator[HookedModel]:
    """Project the direction out of every residual writer for the body of a ``with``.

    Matrices ``W [d_model, *]`` become ``W - u u^T W``, embedding rows ``E - (E u) u^T``, biases
    ``b - (b.u)u``; the exact original tensors come back on exit, exceptions included. With tied
    input/output embeddings (SmolLM2) only the *input* embedding is orthogonalised: it gets its own
    edited copy for the duration, the unembedding keeps the original, so the result equals
    ``Ablate(direction, sites="all")`` (which never touches the unembedding).
    """
    _check_direction(direction, model)
    u64 = _unit(direction).double()
    embed_module = model.hf.get_input_embeddings()
    tied = _tied(model)
    saved: list[tuple[torch.nn.Parameter, Tensor]] = []
    original_embed = embed_module.weight
    try:
        with torch.no_grad():
            for name, param in model.residual_writers():
                u = u64.to(param.device)
                w = param.detach().double()
                if name == "embed":
                    new = w - (w @ u)[:, None] * u[None, :]
                elif param.ndim == 1:
                    new = w - (w @ u) * u
                else:
                    new = w - u[:, None] * (u @ w)[None, :]
                new = new.to(param.dtype)
                if name == "embed" and tied:
                    embed_module.weight = torch.nn.Parameter(new, requires_grad=False)
                else:
                    saved.append((param, param.detach().clone()))
                    param.copy_(new)
        yield model
    finally:
        with torch.no_grad():
            for param, orig in saved:
                param.copy_(orig)
        embed_module.weight = original_embed


def export_orthogonalized(
    model: HookedModel, direction: Direction | Tensor, path: Path | str
) -> Path:
    """Save an orthogonalised copy of the model as a normal HF directory (reloads with
    ``load_model(path)``). Tied embeddings are saved untied (``tie_word_embeddings=False``) so the
    unembedding stays the original, matching ``orthogonalized``."""
    path = Path(path)
    config = model.hf.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    old_tie = getattr(text_config, "tie_word_embeddings", None)
    out_emb = model.hf.get_output_embeddings()
    old_out_weight = out_emb.weight if out_emb is not None else None
    tied = _tied(model)
    try:
        with orthogonalized(model, direction):
            if tied and old_out_weight is not None:
                text_config.tie_word_embeddings = False
                if config is not text_config:
                    config.tie_word_embeddings = False
                # a separate copy, so the saver cannot treat the head as shared
                out_emb.weight = torch.nn.Parameter(
                    old_out_weight.detach().clone(), requires_grad=False
                )
            save_atomic_dir(model, path)
    finally:
        if tied:
            out_emb.weight = old_out_weight
            text_config.tie_word_embeddings = old_tie
            if config is not text_config:
                config.tie_word_embeddings = old_tie
    meta: dict[str, Any] = {
        "intervention": "orthogonalized",
        "source_model": model.name,
        "source_sha256": model.sha256,
        "untied_embeddings": tied,
    }
    if isinstance(direction, Direction):
        meta.update(
            direction=direction.name,
            direction_site=direction.site.hook_name,
            direction_provenance=direction.provenance.to_dict(),
        )
    write_json(path / "mci_intervention.json", meta)
    return path


# --- measurements -----------------------------------------------------------------------------
def _encode_prompts(model: HookedModel, prompts: Sequence[ChatExample | str]) -> list[list[int]]:
    if isinstance(prompts, (str, ChatExample)):
        raise TypeError("prompts must be a sequence; wrap a single prompt in a list")
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    return [prompt_ids(model, p) for p in prompts]


def _next_token_logprobs(
    model: HookedModel, ids: Tensor, mask: Tensor, last: Tensor | None
) -> Tensor:
    """Float64 log-probs ``[n, vocab]`` at every unpadded position, or only at ``last[b]``."""
    if last is None:
        logits = model.logits(ids, mask)[mask.bool()]
    else:  # the 49k-vocab head only where it is read
        hidden, head = model.hidden_and_head(ids, mask)
        with torch.inference_mode():
            logits = head(hidden[torch.arange(ids.shape[0], device=ids.device), last])
    return torch.log_softmax(logits.double(), dim=-1)


def kl_vs_unsteered(
    model: HookedModel,
    prompts: Sequence[ChatExample | str],
    *interventions: Intervention,
    at: Literal["all", "last"] = "all",
    batch_size: int = 8,
) -> float:
    """Mean KL(unsteered || steered) of next-token distributions over the prompts' positions
    (``at="last"``: the last prompt position only). Prompts are chat-templated with the
    assistant header. 0 means the interventions change nothing."""
    if at not in ("all", "last"):
        raise ValueError(f"at={at!r}; use 'all' or 'last'")
    for iv in interventions:
        iv.validate(model)
    encs = _encode_prompts(model, prompts)
    pad_id = model.tokenizer.pad_token_id or 0
    total, count = 0.0, 0
    for i in range(0, len(encs), batch_size):
        chunk = encs[i : i + batch_size]
        ids, mask = pad(chunk, pad_id, side="right")
        ids, mask = ids.to(model.device), mask.to(model.device)
        last = torch.tensor([len(c) - 1 for c in chunk], device=ids.device)
        base = _next_token_logprobs(model, ids, mask, last if at == "last" else None)
        with apply(model, *interventions):
            steered = _next_token_logprobs(model, ids, mask, last if at == "last" else None)
        sel = (base.exp() * (base - steered)).sum(-1)
        total += float(sel.sum())
        count += int(sel.numel())
    model.ctx.attention_mask = None
    return total / count


@dataclass(frozen=True, slots=True, eq=False)
class DoseResponse:
    """Score (and coherence) as a function of steering strength, with norm-matched random controls.

    ``random_scores`` is ``[n_controls, n_alphas]``; ``coherence`` is NaN where not measured.
    """

    alphas: tuple[float, ...]
    scores: tuple[float, ...]
    coherence: tuple[float, ...]
    random_scores: Float[Tensor, "n_controls n_alphas"]
    direction: str = ""
    site: str = ""
    scale: str = "absolute"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def random_mean(self) -> Float[Tensor, " n_alphas"]:
        return self.random_scores.mean(0)

    @property
    def random_std(self) -> Float[Tensor, " n_alphas"]:
        if self.random_scores.shape[0] < 2:
            return torch.zeros(len(self.alphas))
        return self.random_scores.std(0)

    @property
    def has_coherence(self) -> bool:
        return any(not math.isnan(c) for c in self.coherence)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": list(self.alphas),
            "scores": list(self.scores),
            "coherence": [None if math.isnan(c) else c for c in self.coherence],
            "random_scores": self.random_scores.tolist(),
            "direction": self.direction,
            "site": self.site,
            "scale": self.scale,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DoseResponse:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown DoseResponse keys {sorted(unknown)}; expected {sorted(known)}"
            )
        n = len(d["alphas"])
        rs = torch.tensor(d["random_scores"], dtype=torch.float64).reshape(-1, n)
        return cls(
            alphas=tuple(float(a) for a in d["alphas"]),
            scores=tuple(float(s) for s in d["scores"]),
            coherence=tuple(float("nan") if c is None else float(c) for c in d["coherence"]),
            random_scores=rs,
            direction=d.get("direction", ""),
            site=d.get("site", ""),
            scale=d.get("scale", "absolute"),
            meta=dict(d.get("meta", {})),
        )


def _split_score(value: Any, *, where: str) -> tuple[float, float | None]:
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                f"{where} returned a {len(value)}-tuple; return a float or (score, coherence)"
            )
        return float(value[0]), (None if value[1] is None else float(value[1]))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    raise TypeError(
        f"{where} must return a float or (score, coherence), got {type(value).__name__}"
    )


def dose_response(
    model: HookedModel,
    direction: Direction,
    alphas: Sequence[float],
    *,
    score_fn: Callable[[HookedModel], float | tuple[float, float]],
    coherence_fn: Callable[[HookedModel], float] | None = None,
    random_controls: int = 3,
    generator: torch.Generator,
    sites: SitesArg = None,
    positions: PositionRule = "all",
    scale: Scale = "absolute",
    show_progress: bool = True,
) -> DoseResponse:
    """Steer with ``direction`` at each alpha and score the model, plus ``random_controls``
    norm-matched Gaussian directions at the same alphas.

    ``score_fn(model)`` runs with the steering hooks attached and returns a score, or
    ``(score, coherence)`` when it already measured coherence; otherwise ``coherence_fn(model)``
    (if given) is called under the same hooks. Controls are scored only.
    """
    if not isinstance(direction, Direction):
        raise TypeError(f"direction must be a Direction, got {type(direction).__name__}")
    alphas = [_check_finite("alpha", a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty; pass e.g. [0, 2, 4, 8]")
    if not isinstance(random_controls, int) or random_controls < 0:
        raise ValueError(f"random_controls must be a non-negative int, got {random_controls!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0))"
        )
    probe = Steer(direction, 1.0, sites=sites, positions=positions, scale=scale)
    probe.validate(model)
    controls = [random_direction(direction, generator=generator) for _ in range(random_controls)]
    scores, coherence = [], []
    rand = torch.full((random_controls, len(alphas)), float("nan"), dtype=torch.float64)
    total = len(alphas) * (1 + random_controls)
    bar = tqdm(total=total, desc="dose-response", disable=not show_progress)
    for j, a in enumerate(alphas):
        with apply(model, Steer(direction, a, sites=sites, positions=positions, scale=scale)):
            score, coh = _split_score(score_fn(model), where="score_fn")
            if coh is None and coherence_fn is not None:
                coh = float(coherence_fn(model))
        scores.append(score)
        coherence.append(float("nan") if coh is None else coh)
        bar.update()
        for k, ctrl in enumerate(controls):
            with apply(model, Steer(ctrl, a, sites=sites, positions=positions, scale=scale)):
                rand[k, j] = _split_score(score_fn(model), where="score_fn")[0]
            bar.update()
    bar.close()
    site = sites if sites is not None else direction.site
    return DoseResponse(
        alphas=tuple(alphas),
        scores=tuple(scores),
        coherence=tuple(coherence),
        random_scores=rand,
        direction=direction.name,
        site=str(site),
        scale=scale,
        meta={"positions": str(positions), "random_controls": random_controls, "model": model.name},
    )
