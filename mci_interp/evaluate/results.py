"""The result type of every scorer, the ``Scorer`` protocol, and paired comparisons.

``EvalResult`` holds per-question scores of one model (never the model); its ``ci`` and
``by_theme`` bootstrap over questions and ``paired_difference`` pairs an organism with its control
per question, seeds averaged. The statistics themselves are ``mci_interp.stats``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp import __version__
from mci_interp._io import check_keys, read_json, write_json
from mci_interp.datasets import EvalQuestion
from mci_interp.stats import (
    Estimate,
    bootstrap_mean,
    bootstrap_ratio,
    hierarchical_mean_difference,
    paired_mean_difference,
    rate_ci,
)

if TYPE_CHECKING:
    from mci_interp.models import HookedModel

FORMAT_VERSION = 1
Which = Literal["score", "style"]


def _nan_to_none(values: Tensor | None) -> list[float | None] | None:
    if values is None:
        return None
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def _none_to_nan(values: Sequence[float | None] | None) -> Tensor | None:
    if values is None:
        return None
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


@dataclass(eq=False, kw_only=True)
class EvalResult:
    """Per-question misalignment scores of one model under one scorer (no model inside).

    ``scores[i]`` belongs to ``question_ids[i]`` (NaN where a question could not be scored);
    ``style`` is the matching style score (LogprobContrast) or None; ``detail`` holds JSON-able
    per-pair / per-sample records; ``meta`` says how the result was made.
    """

    scorer: str
    model: str
    question_ids: tuple[str, ...]
    themes: tuple[str, ...]
    scores: Float[Tensor, " n_questions"]
    style: Float[Tensor, " n_questions"] | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.question_ids = tuple(self.question_ids)
        self.themes = tuple(self.themes)
        self.scores = torch.as_tensor(self.scores, dtype=torch.float64).flatten()
        n = len(self.question_ids)
        if len(self.themes) != n or self.scores.numel() != n:
            raise ValueError(
                f"EvalResult needs one theme and one score per question: {n} ids, "
                f"{len(self.themes)} themes, {self.scores.numel()} scores"
            )
        if len(set(self.question_ids)) != n:
            raise ValueError("EvalResult question_ids must be unique")
        if self.style is not None:
            self.style = torch.as_tensor(self.style, dtype=torch.float64).flatten()
            if self.style.numel() != n:
                raise ValueError(f"style has {self.style.numel()} entries for {n} questions")

    @property
    def n(self) -> int:
        return len(self.question_ids)

    def values(self, which: Which = "score") -> Float[Tensor, " n_questions"]:
        """The per-question series named by ``which`` ("score" or "style")."""
        if which == "score":
            return self.scores
        if which == "style":
            if self.style is None:
                raise ValueError(f"{self.scorer} result for {self.model} has no style scores")
            return self.style
        raise ValueError(f"which must be 'score' or 'style', got {which!r}")

    def mean(self, which: Which = "score") -> float:
        v = self.values(which)
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else math.nan

    def ci(
        self, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0, which: Which = "score"
    ) -> Estimate:
        """Bootstrap CI of the mean over questions."""
        return bootstrap_mean(self.values(which), level=level, n_boot=n_boot, seed=seed)

    def by_theme(
        self, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0, which: Which = "score"
    ) -> dict[str, Estimate]:
        """Bootstrap estimate per theme (over that theme's questions), themes in first-seen order."""
        v = self.values(which)
        out: dict[str, Estimate] = {}
        for theme in dict.fromkeys(self.themes):
            idx = torch.tensor([i for i, t in enumerate(self.themes) if t == theme])
            out[theme] = bootstrap_mean(v[idx], level=level, n_boot=n_boot, seed=seed)
        return out

    def _judge_counts(self, what: str) -> tuple[list[int], list[int]]:
        if "n_misaligned" not in self.detail:
            raise ValueError(
                f"{self.scorer} result has no judge counts; {what} is for JudgeScorer results"
            )
        return list(self.detail["n_misaligned"]), list(self.detail["n_denominator"])

    def pooled_rate(self, *, level: float = 0.95) -> Estimate:
        """Judge results: misaligned answers / denominator pooled over questions, Wilson CI
        (answers treated as independent; ``n`` = answers)."""
        k, n = self._judge_counts("pooled_rate")
        return rate_ci(int(sum(k)), int(sum(n)), level=level)

    def misaligned_rate(
        self, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
    ) -> Estimate:
        """Judge results: the same pooled rate with a bootstrap CI over questions (answers to one
        question move together, so the interval generalises over questions; ``n`` = questions)."""
        k, n = self._judge_counts("misaligned_rate")
        return bootstrap_ratio(
            torch.tensor(k, dtype=torch.float64),
            torch.tensor(n, dtype=torch.float64),
            level=level,
            n_boot=n_boot,
            seed=seed,
        )

    def select(self, question_ids: Sequence[str]) -> EvalResult:
        """The result restricted to ``question_ids`` (in that order), per-question detail kept.

        A question's LogprobContrast score depends only on its own sequences (each question's
        prompt is its own batch), so a subset of a result equals scoring the subset."""
        pos = {q: i for i, q in enumerate(self.question_ids)}
        missing = [q for q in question_ids if q not in pos]
        if missing:
            raise ValueError(
                f"{self.model}'s result has no question(s) {missing[:5]}; it covers "
                f"{self.n} questions"
            )
        idx = [pos[q] for q in question_ids]
        detail = {
            k: [v[i] for i in idx] if isinstance(v, list) and len(v) == self.n else v
            for k, v in self.detail.items()
        }
        return replace(
            self,
            question_ids=tuple(question_ids),
            themes=tuple(self.themes[i] for i in idx),
            scores=self.scores[idx],
            style=None if self.style is None else self.style[idx],
            detail=detail,
            meta={**self.meta, "selected_from": self.n},
        )

    @classmethod
    def average(cls, results: Sequence[EvalResult]) -> EvalResult:
        """Average several results (e.g. seeds of one organism) per question."""
        results = _as_list(results)
        _check_same_questions(results, results)
        scores = torch.stack([r.scores for r in results]).nanmean(0)
        styles = [r.style for r in results if r.style is not None]
        style = torch.stack(styles).nanmean(0) if len(styles) == len(results) else None
        first = results[0]
        return cls(
            scorer=first.scorer,
            model=first.model
            if len({r.model for r in results}) == 1
            else "+".join(r.model for r in results),
            question_ids=first.question_ids,
            themes=first.themes,
            scores=scores,
            style=style,
            meta={"averaged_over": len(results), "models": [r.model for r in results]},
        )

    # --- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "scorer": self.scorer,
            "model": self.model,
            "question_ids": list(self.question_ids),
            "themes": list(self.themes),
            "scores": _nan_to_none(self.scores),
            "style": _nan_to_none(self.style),
            "detail": self.detail,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalResult:
        known = {
            "format_version",
            "scorer",
            "model",
            "question_ids",
            "themes",
            "scores",
            "style",
            "detail",
            "meta",
        }
        check_keys(d, known, "EvalResult")
        if d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(
                f"EvalResult format_version {d.get('format_version')} is not {FORMAT_VERSION}"
            )
        scores = _none_to_nan(d["scores"])
        assert scores is not None
        return cls(
            scorer=str(d["scorer"]),
            model=str(d["model"]),
            question_ids=tuple(d["question_ids"]),
            themes=tuple(d["themes"]),
            scores=scores,
            style=_none_to_nan(d.get("style")),
            detail=dict(d.get("detail") or {}),
            meta=dict(d.get("meta") or {}),
        )

    def save(self, path: Path | str) -> Path:
        """Write JSON atomically (a crash never leaves a half-written file)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path | str) -> EvalResult:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"evaluation result {path} does not exist")
        return cls.from_dict(read_json(path))


def _as_list(results: EvalResult | Sequence[EvalResult]) -> list[EvalResult]:
    out = [results] if isinstance(results, EvalResult) else list(results)
    if not out:
        raise ValueError("need at least one EvalResult")
    return out


def _check_same_questions(a: Sequence[EvalResult], b: Sequence[EvalResult]) -> None:
    ref = a[0].question_ids
    for r in [*a, *b]:
        if r.question_ids != ref:
            diff = sorted(set(ref) ^ set(r.question_ids))[:5]
            raise ValueError(
                f"results must share the same questions in the same order to be paired; "
                f"{r.model} ({r.scorer}) differs from {a[0].model} (first differences: {diff or 'order'}); "
                "score every model on the same question list"
            )


def paired_difference(
    a: EvalResult | Sequence[EvalResult],
    b: EvalResult | Sequence[EvalResult],
    *,
    which: Which = "score",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Mean of (a - b) paired per question. ``a`` is typically an organism's seeds, ``b`` their
    matched controls (one per seed, in order) or one reference (the base) for every seed: then
    the CI is a two-stage bootstrap, seeds then questions (``hierarchical_mean_difference``), so
    it carries seed variance. Sides with other numbers of seeds are each averaged over seeds
    first and bootstrapped over questions only."""
    a_l, b_l = _as_list(a), _as_list(b)
    _check_same_questions(a_l, b_l)
    va = torch.stack([r.values(which) for r in a_l])
    vb = torch.stack([r.values(which) for r in b_l])
    if len(b_l) == 1:
        vb = vb.expand_as(va)
    if va.shape == vb.shape:
        return hierarchical_mean_difference(va, vb, level=level, n_boot=n_boot, seed=seed)
    return paired_mean_difference(
        va.nanmean(0), vb.nanmean(0), level=level, n_boot=n_boot, seed=seed
    )


# --- the scorer protocol -----------------------------------------------------------------------------
@runtime_checkable
class Scorer(Protocol):
    """Anything that turns (model, questions) into an ``EvalResult``.

    ``system`` overrides every question's system prompt (persona organisms); ``trigger`` is
    prepended to every user question (trigger-gated organisms).
    """

    name: str

    def score(
        self,
        model: HookedModel,
        questions: Sequence[EvalQuestion],
        *,
        system: str | None = None,
        trigger: str | None = None,
        show_progress: bool = True,
    ) -> EvalResult: ...


def check_questions(questions: Sequence[EvalQuestion]) -> list[EvalQuestion]:
    """The questions as a list, checked: non-empty, ``EvalQuestion`` objects, unique ids."""
    qs = list(questions)
    if not qs:
        raise ValueError("no questions to score; pass e.g. organisms.data.load_default_questions()")
    bad = [q for q in qs if not isinstance(q, EvalQuestion)]
    if bad:
        raise TypeError(f"questions must be EvalQuestion objects, got {type(bad[0]).__name__}")
    ids = [q.id for q in qs]
    if len(set(ids)) != len(ids):
        raise ValueError("question ids must be unique")
    return qs


NOT_RECORDED = {"record": False}  # field metadata: an option results do not record


class RecordsParams:
    """Base of the package's (dataclass) scorers: ``params()``, the options a result records."""

    def params(self) -> dict[str, Any]:
        """The options its results record (``meta["params"]``): fields not marked NOT_RECORDED."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
            if f.metadata.get("record", True)
        }


def run_meta(model: HookedModel, system: str | None, trigger: str | None) -> dict[str, Any]:
    """What every scorer records about the model and condition it scored."""
    return {
        "model_sha256": model.sha256,
        "base_model": model.base_name,
        "system": system,
        "trigger": trigger,
        "library_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
