"""Causal scores: a model's per-question scores under interventions, and what the causal tests
build on them.

A causal score (``CausalScore``) keeps every question's score, so each effect built on it has a
bootstrap interval over questions, and, where the scorer is given *coherence texts* (the base's
own answers to everyday prompts), the mean loss of those answers under the same interventions:
an intervention that raises the misalignment score by wrecking the model shows up as a loss
increase beside it. It is stored under what identifies it (the model's key, each intervention's
type, settings and directions' exact bytes, the questions, the coherence texts), so a repeated
or interrupted study never scores the same thing twice.

The random controls of a causal test are drawn from a generator seeded by what they are for, so
each is the same whatever else a study computes and in whatever order, and its stored score is
reused. They alternate between isotropic Gaussian directions and directions drawn from the
activation covariance at their site (``covariance``: what a structured but meaningless direction
does), norm-matched to the tested direction. With n controls a rank p-value cannot go below
1/(n+1): the default 19 make p = 0.05 reachable.

An ablation's effect is the share of an organism's misalignment (its score minus a reference's,
per question) that it removes, with an interval over questions (and seeds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mci_interp._io import read_json_verified, stable_hash, write_json
from mci_interp.datasets import ChatExample, EvalQuestion
from mci_interp.direction import Direction, random_direction
from mci_interp.evaluate import Scorer
from mci_interp.generation import completion_nll
from mci_interp.intervene import Ablate, Intervention, apply
from mci_interp.models import HookedModel
from mci_interp.organisms.suite import Organism
from mci_interp.organisms.weights import organism_model
from mci_interp.stats import Estimate, bootstrap_ratio


@dataclass(frozen=True, slots=True)
class CausalScore:
    """A model's score on each question under some interventions, and the mean loss (nats per
    token) of the coherence texts under the same interventions (NaN: not measured)."""

    scores: Tensor  # [n_questions] float64
    coherence: float = math.nan

    @property
    def mean(self) -> float:
        return float(self.scores.mean())


@dataclass(frozen=True, slots=True)
class CoherenceTexts:
    """What coherence is measured on: prompts and the base's own answers to them. The loss of
    these answers rises when an intervention damages the model, whatever it does to the
    misalignment score."""

    prompts: tuple[ChatExample, ...]
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.answers) or not self.prompts:
            raise ValueError(
                f"coherence needs one answer per prompt (got {len(self.prompts)} prompts and "
                f"{len(self.answers)} answers), and at least one"
            )

    def key(self) -> str:
        return stable_hash([[p.user_text for p in self.prompts], list(self.answers)])


def fingerprint(intervention: Any) -> dict[str, Any]:
    """What identifies an intervention: its type, its settings and its directions' exact bytes."""
    out: dict[str, Any] = {"type": type(intervention).__name__}
    for f in dataclasses.fields(intervention):
        v = getattr(intervention, f.name)
        if isinstance(v, Direction):
            v = {
                "site": v.site.hook_name,
                "sha256": hashlib.sha256(v.vector.numpy().tobytes()).hexdigest(),
            }
        elif isinstance(v, Tensor):
            v = hashlib.sha256(v.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()
        out[f.name] = v if isinstance(v, str | int | float | bool | dict | type(None)) else repr(v)
    return out


class CausalScorer:
    """Per-question scores of a model under interventions, on ``questions`` unless told
    otherwise, and (with ``coherence``) the loss of the coherence texts under them.

    With ``cache_dir``, each score is stored there as ``<hash>.json`` (the hash of the model's
    key, the interventions' fingerprints and, where other questions or coherence texts are
    asked for, their ids) and read back instead of scoring again.
    """

    def __init__(
        self,
        scorer: Scorer,
        questions: Sequence[EvalQuestion],
        *,
        cache_dir: Path | None = None,
        coherence: CoherenceTexts | None = None,
    ) -> None:
        self.scorer, self.questions, self.cache_dir = scorer, list(questions), cache_dir
        self.coherence = coherence

    def __call__(
        self,
        model: HookedModel,
        model_key: str,
        *interventions: Intervention,
        questions: Sequence[EvalQuestion] | None = None,
    ) -> CausalScore:
        """``model``'s (named ``model_key``: what its stored scores are filed under) scores
        under ``interventions`` on ``questions`` (default: this scorer's; ``()``: none, only
        the coherence loss)."""
        what: dict[str, Any] = {
            "model": model_key,
            "interventions": [fingerprint(iv) for iv in interventions],
        }
        if questions is not None:
            what["questions"] = [q.id for q in questions]
        if self.coherence is not None:
            what["coherence"] = self.coherence.key()
        path = None if self.cache_dir is None else self.cache_dir / f"{stable_hash(what)}.json"
        if path is not None and path.exists():
            fix = f"delete {path} and re-run the same study to recompute this causal score"
            stored = read_json_verified(path, fix=fix)
            if "scores" in stored:  # files from before per-question scores are recomputed
                coh = stored.get("coherence")
                return CausalScore(
                    torch.tensor(stored["scores"], dtype=torch.float64),
                    math.nan if coh is None else float(coh),
                )
        qs = self.questions if questions is None else questions
        with apply(model, *interventions):
            values = (
                self.scorer.score(model, qs, show_progress=False).values().double()
                if qs
                else torch.zeros(0, dtype=torch.float64)  # coherence only
            )
            coh = math.nan
            if self.coherence is not None:
                c = self.coherence
                coh = float(completion_nll(model, list(c.prompts), list(c.answers)).nanmean())
        out = CausalScore(values, coh)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(
                path,
                {
                    "score": out.mean,
                    "scores": values.tolist(),
                    "coherence": None if math.isnan(coh) else coh,
                    "model": model_key,
                    "interventions": [str(iv) for iv in interventions],
                },
            )
        return out


def rng(seed: int, *purpose: Any) -> torch.Generator:
    """A generator seeded by a study's seed and what it is for (e.g. ``"transfer", domain,
    k``): each random control is the same whatever else the study computes, and in whatever order
    (a shared generator made them depend on which cells ran before), so its causal score is
    cached once and reused."""
    return torch.Generator().manual_seed(int(stable_hash([seed, *purpose]), 16) % (1 << 62))


def random_like(
    dirs: Sequence[Direction],
    generator: torch.Generator,
    covariance: Mapping[int, Tensor] | None = None,
) -> list[Direction]:
    """Norm-matched random directions at the sites of ``dirs``, one each: isotropic Gaussian,
    or, where ``covariance`` has rows for the site's layer, Gaussian with those rows'
    covariance (a random combination of the centred rows)."""
    out = []
    for d in dirs:
        rows = None if covariance is None else covariance.get(d.site.layer)
        if rows is None:
            out.append(random_direction(d, generator=generator))
            continue
        x = rows.double() - rows.double().mean(0)
        v = torch.randn(x.shape[0], generator=generator, dtype=torch.float64) @ x
        out.append(
            d.with_vector(
                (v / v.norm() * d.norm).float(),
                method="random_covariance",
                params={"norm_matched_to": d.name},
            )
        )
    return out


def random_controls(
    like: Sequence[Direction],
    n: int,
    *,
    seed: int,
    purpose: tuple[Any, ...],
    covariance: Mapping[int, Tensor] | None = None,
) -> list[list[Direction]]:
    """``n`` random sets shaped like ``like``; set ``k`` is drawn from ``rng(seed, *purpose,
    k)``: isotropic for even ``k`` and, with ``covariance`` (layer -> activation rows, e.g. the
    base's on neutral prompts), from the activations' covariance for odd ``k``."""
    return [
        random_like(like, rng(seed, *purpose, k), covariance if k % 2 else None) for k in range(n)
    ]


def control_kinds(n: int, covariance: Mapping[int, Tensor] | None) -> tuple[str, ...]:
    """What each of ``random_controls``' ``n`` sets is: "isotropic" or "covariance"."""
    return tuple(
        "covariance" if k % 2 and covariance is not None else "isotropic" for k in range(n)
    )


def share_point(score: Tensor, ablated: Tensor, reference: Tensor) -> float:
    """``share_removed``'s point value alone (no interval): for the random controls."""
    gap = float((score - reference).sum())
    return float((score - ablated).sum()) / gap if gap > 0 else math.nan


def share_removed(score: Tensor, ablated: Tensor, reference: Tensor, *, seed: int = 0) -> Estimate:
    """Share of the misalignment ``score - reference`` that ``ablated`` removes, per question
    (``[n]``) or per seed and question (``[seeds, n]``): ``sum(score - ablated) /
    sum(score - reference)``, its interval resampling seeds then questions. NaN where the
    misalignment is not positive (a share of nothing)."""
    return bootstrap_ratio(score - ablated, score - reference, seed=seed)


def ablated_scores(
    base: HookedModel,
    organism: Organism,
    direction_sets: Sequence[Sequence[Direction]],
    *,
    scores: CausalScorer,
    questions: Sequence[EvalQuestion] | None = None,
) -> list[CausalScore]:
    """``organism`` (built on ``base``) scored with each set of directions ablated together,
    in order. The organism is loaded once, and the blocks below the lowest ablated layer run
    once for all the sets (``reuse_below``)."""
    lowest = min(d.site.layer for dirs in direction_sets for d in dirs)
    with (
        organism_model(base, organism) as model,
        model.reuse_below(lowest),  # the blocks below run once for all of them
    ):
        return [
            scores(model, organism.key, *[Ablate(d) for d in dirs], questions=questions)
            for dirs in direction_sets
        ]


def unablated_coherence(
    base: HookedModel, organism: Organism, *, scores: CausalScorer
) -> CausalScore:
    """``organism``'s coherence loss with no intervention (no questions scored): what an
    ablation's coherence cost is measured from."""
    with organism_model(base, organism) as model:
        return scores(model, organism.key, questions=())
