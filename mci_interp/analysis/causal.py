"""Causal scores: a model's mean score under interventions, and what the causal tests build on it.

A causal score is stored under what identifies it (the model's key, each intervention's type,
settings and directions' exact bytes, the questions), so a repeated or interrupted study never
scores the same thing twice. The random controls are drawn from a generator seeded by what they
are for, so each is the same whatever else a study computes and in whatever order, and its
stored score is reused. An ablation's effect is the share of an organism's misalignment (its
score minus a reference's) that it removes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mci_interp._io import read_json_verified, stable_hash, write_json
from mci_interp.datasets import EvalQuestion
from mci_interp.direction import Direction, random_direction
from mci_interp.evaluate import EvalResult, Scorer
from mci_interp.intervene import Ablate, Intervention, apply
from mci_interp.models import HookedModel
from mci_interp.organisms.suite import Organism
from mci_interp.organisms.weights import organism_model


def mean_score(result: EvalResult) -> float:
    """The mean misalignment score over an evaluation's questions."""
    return float(result.mean())


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
    """Mean score of a model under interventions, on ``questions`` unless told otherwise.

    With ``cache_dir``, each score is stored there as ``<hash>.json`` (the hash of the model's
    key, the interventions' fingerprints and, where other questions are asked for, their ids)
    and read back instead of scoring again.
    """

    def __init__(
        self,
        scorer: Scorer,
        questions: Sequence[EvalQuestion],
        *,
        cache_dir: Path | None = None,
    ) -> None:
        self.scorer, self.questions, self.cache_dir = scorer, list(questions), cache_dir

    def __call__(
        self,
        model: HookedModel,
        model_key: str,
        *interventions: Intervention,
        questions: Sequence[EvalQuestion] | None = None,
    ) -> float:
        """``model``'s (named ``model_key``: what its stored scores are filed under) mean score
        under ``interventions`` on ``questions`` (default: this scorer's)."""
        what: dict[str, Any] = {
            "model": model_key,
            "interventions": [fingerprint(iv) for iv in interventions],
        }
        if questions is not None:
            what["questions"] = [q.id for q in questions]
        path = None if self.cache_dir is None else self.cache_dir / f"{stable_hash(what)}.json"
        if path is not None and path.exists():
            fix = f"delete {path} and re-run the same study to recompute this causal score"
            return float(read_json_verified(path, fix=fix)["score"])
        qs = self.questions if questions is None else questions
        with apply(model, *interventions):
            s = mean_score(self.scorer.score(model, qs, show_progress=False))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(
                path,
                {
                    "score": s,
                    "model": model_key,
                    "interventions": [str(iv) for iv in interventions],
                },
            )
        return s


def rng(seed: int, *purpose: Any) -> torch.Generator:
    """A generator seeded by a study's seed and what it is for (e.g. ``"transfer", domain,
    k``): each random control is the same whatever else the study computes, and in whatever order
    (a shared generator made them depend on which cells ran before), so its causal score is
    cached once and reused."""
    return torch.Generator().manual_seed(int(stable_hash([seed, *purpose]), 16) % (1 << 62))


def random_like(dirs: Sequence[Direction], generator: torch.Generator) -> list[Direction]:
    """Norm-matched Gaussian directions at the sites of ``dirs``, one each."""
    return [random_direction(d, generator=generator) for d in dirs]


def random_controls(
    like: Sequence[Direction], n: int, *, seed: int, purpose: tuple[Any, ...]
) -> list[list[Direction]]:
    """``n`` random sets shaped like ``like``; set ``k`` is drawn from
    ``rng(seed, *purpose, k)``."""
    return [random_like(like, rng(seed, *purpose, k)) for k in range(n)]


def ablation_share(
    model: HookedModel,
    model_key: str,
    dirs: Sequence[Direction],
    *,
    scores: CausalScorer,
    score: float,
    reference: float,
    questions: Sequence[EvalQuestion] | None = None,
) -> float:
    """Share of the gap ``score - reference`` (the model's misalignment) that ablating ``dirs``
    together removes; NaN where the gap is too small to divide by. All three scores on the same
    ``questions`` (default: the scorer's)."""
    s = scores(model, model_key, *[Ablate(d) for d in dirs], questions=questions)
    gap = score - reference
    return (score - s) / gap if abs(gap) > 1e-3 else float("nan")


def shares_removed(
    base: HookedModel,
    organism: Organism,
    direction_sets: Sequence[Sequence[Direction]],
    *,
    scores: CausalScorer,
    score: float,
    reference: float,
    questions: Sequence[EvalQuestion] | None = None,
) -> list[float]:
    """``ablation_share`` of each set of directions in ``organism`` (built on ``base``), in
    order. The organism is loaded once, and the blocks below the lowest ablated layer run once
    for all the sets (``reuse_below``)."""
    lowest = min(d.site.layer for dirs in direction_sets for d in dirs)
    with (
        organism_model(base, organism) as model,
        model.reuse_below(lowest),  # the blocks below run once for all of them
    ):
        return [
            ablation_share(
                model,
                organism.key,
                dirs,
                scores=scores,
                score=score,
                reference=reference,
                questions=questions,
            )
            for dirs in direction_sets
        ]
