"""What an intervention does to a model: the KL of its next-token distributions from the
unsteered model's, and dose-response sweeps against norm-matched random directions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp._io import check_keys
from mci_interp.datasets import ChatExample, pad
from mci_interp.direction import Direction, random_direction
from mci_interp.generation import prompt_ids
from mci_interp.intervene.interventions import (
    Intervention,
    Scale,
    SitesArg,
    Steer,
    _check_finite,
    apply,
)
from mci_interp.intervene.positions import PositionRule
from mci_interp.models import HookedModel


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
        check_keys(d, cls, "DoseResponse")
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
