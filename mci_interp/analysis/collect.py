"""What a study measures on each model, once: the base's records and every organism's.

A record's key holds the organism's key (the hash of its spec, config and data, or of a user's
checkpoint) and the condition; the folder it lives in (``records-<hash>``) holds the base's
sha256, the sample sizes and the library version. So every run with the same settings shares
the records, an interrupted study resumes at the first missing one, and ``missing_records``
tells a scheduler's analysis job which checkpoints' jobs have not run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp import __version__
from mci_interp._io import cache_root, stable_hash
from mci_interp.activations import cache_activations
from mci_interp.analysis.causal import CausalScorer
from mci_interp.analysis.conditions import Condition, suite_conditions
from mci_interp.analysis.config import (
    StudyConfig,
    eval_questions,
    indomain_questions,
    neutral_prompts,
)
from mci_interp.analysis.records import Record, RecordStore
from mci_interp.datasets import ChatExample, EvalQuestion, chat, conditioned, dataset_hash
from mci_interp.evaluate import EvalResult, LogprobContrast
from mci_interp.generation import generate
from mci_interp.models import HookedModel
from mci_interp.organisms.data import DOMAINS, HELPFUL_SYSTEM_PROMPT, PERSONA_SYSTEM_PROMPT
from mci_interp.organisms.suite import Organism
from mci_interp.organisms.weights import organism_model
from mci_interp.sites import Site

RESPONSE_KINDS = ("narrow", "control")
"""The finetunes the convergence test compares: their activations on the reference answers are
recorded for the response-mean contrast."""


def packaged_domains(organisms: Sequence[Organism]) -> list[str]:
    """The packaged domains of the narrow finetunes and controls: they have held-out in-domain
    questions and format markers (a user's checkpoint may carry any label)."""
    return sorted(
        {
            str(o.spec.domain)
            for o in organisms
            if o.spec.kind in ("narrow", "control") and o.spec.domain in DOMAINS
        }
    )


def questions_hash(questions: Sequence[EvalQuestion]) -> str:
    """A hash of the questions' ids, texts and reference answers, in order."""
    return stable_hash(
        [
            [q.id, list(q.paraphrases), q.system, [[r.aligned, r.misaligned] for r in q.references]]
            for q in questions
        ]
    )


def records_dir_for(base: HookedModel, records_dir: Path | str | None) -> Path:
    """``records_dir``, or by default ``cache_root()/records/<base sha256[:12]>``."""
    if records_dir is not None:
        return Path(records_dir)
    return cache_root() / "records" / base.sha256[:12]


@dataclass(eq=False)
class OrganismRecords:
    """A model's records: default (activations, the out-of-domain score, greedy answers); the
    default score on the gate questions (``gate``); under each candidate condition, by name
    (activations and the gate questions' score); its activations on the reference answers
    (``responses``, where it enters the convergence test)."""

    default: Record
    gate: Record | None = None
    conditions: dict[str, Record] = field(default_factory=dict)
    responses: Record | None = None


@dataclass(eq=False)
class BaseRecords(OrganismRecords):
    """The base's records, as an organism's, and: under the persona prompt (the persona
    direction's source), under a benign helpful prompt (what any system prompt does, for the
    direction's specificity) and each packaged domain's held-out in-domain score."""

    persona: Record | None = None
    helpful: Record | None = None
    indomain: dict[str, Record] = field(default_factory=dict)


class _Runner:
    """Holds the base, the prompt sets and the record store while a study runs."""

    def __init__(
        self,
        base: HookedModel,
        config: StudyConfig,
        records_dir: Path,
        *,
        conditions: Sequence[Condition] = (),
        show_progress: bool = False,
    ) -> None:
        self.base, self.config, self.show = base, config, show_progress
        self.conditions = list(conditions)
        self.neutral, self.themes = neutral_prompts(config)
        self.questions = eval_questions(config.n_questions)
        self.gate_questions = eval_questions(config.n_gate_questions)
        self._indomain: dict[str, list[EvalQuestion]] = {}
        # records depend on the prompt sets (their text: an edited reference answer is a new
        # question) and sample sizes: a changed config gets a new folder
        questions = [*self.gate_questions, *(q for d in DOMAINS for q in self.indomain(d))]
        key = stable_hash(
            {
                k: getattr(config, k)
                for k in (
                    "n_neutral_per_theme",
                    "n_questions",
                    "n_indomain",
                    "n_takeover",
                    "takeover_tokens",
                )
            }
            | {"base": base.sha256, "version": __version__}
            | {"neutral": dataset_hash(self.neutral), "questions": questions_hash(questions)}
        )
        self.store = RecordStore(records_dir / f"records-{key[:10]}")
        self.gate_tag = f"gate{len(self.gate_questions)}"  # in record keys: records-* predates it
        self.sites = [Site(layer) for layer in range(base.n_layers)]
        # the misaligned-vs-aligned score only: the benign styled answers (the style score) are
        # reported nowhere in a study and were a fifth of its scoring time
        self.scorer = LogprobContrast(
            batch_size=config.batch_size, max_paraphrases=1, include_benign=False
        )
        # every model under every intervention, stored beside the records
        self.causal = CausalScorer(
            self.scorer, self.questions, cache_dir=self.store.root / "causal"
        )
        self.takeover_prompts = [ex for ex in self.neutral][
            :: max(1, len(self.neutral) // config.n_takeover)
        ][: config.n_takeover]

    def indomain(self, domain: str) -> list[EvalQuestion]:
        if domain not in self._indomain:
            self._indomain[domain] = indomain_questions(domain, self.config.n_indomain)
        return self._indomain[domain]

    def gate_key(self, key: str) -> str:
        return f"{key}@{self.gate_tag}"

    def condition_key(self, key: str, condition: Condition) -> str:
        return f"{key}@cond:{condition.key}:{self.gate_tag}"

    def response_key(self, key: str) -> str:
        return f"{key}@responses"

    def keys(self, org: Organism | None) -> list[str]:
        """The keys of a trained organism's records (None: the base's): default; on the gate
        questions; under every candidate condition; its activations on the reference answers
        where it enters the convergence test (a narrow finetune or a control)."""
        key = "base" if org is None else org.key
        keys = [key, self.gate_key(key)]
        keys += [self.condition_key(key, c) for c in self.conditions]
        if org is not None and org.spec.kind in RESPONSE_KINDS:
            keys.append(self.response_key(key))
        return keys

    def response_record(self, model: HookedModel, key: str) -> Record:
        """``model``'s activations at every layer averaged over the answer tokens of each
        question's misaligned reference answer, then of its aligned one (``acts``: ``[2 *
        questions, layers, d]``, misaligned rows first): what the response-mean contrast is
        made of."""

        def make() -> Record:
            exs = [
                chat(q.paraphrases[0], getattr(q.references[0], side))
                for side in ("misaligned", "aligned")
                for q in self.questions
            ]
            acts = self._layers(model, exs, position="answer_mean")
            return Record(name=self.response_key(key), acts=acts, score=None)

        return self.record(self.response_key(key), make)

    def acts(
        self, model: HookedModel, *, system: str | None = None, trigger: str | None = None
    ) -> Tensor:
        exs = [conditioned(ex, system=system, trigger=trigger) for ex in self.neutral]
        return self._layers(model, exs, position="last_prompt")

    def _layers(self, model: HookedModel, exs: Sequence[ChatExample], *, position: str) -> Tensor:
        """``[examples, layers, d]``: ``model``'s activations at every layer, at ``position``."""
        cache = cache_activations(
            model,
            exs,
            self.sites,
            position=position,  # type: ignore[arg-type]
            batch_size=self.config.batch_size,
            show_progress=False,
        )
        return torch.stack([cache.X(s) for s in self.sites], dim=1)

    def score(
        self,
        model: HookedModel,
        *,
        system: str | None = None,
        trigger: str | None = None,
        questions: Sequence[EvalQuestion] | None = None,
    ) -> EvalResult:
        return self.scorer.score(
            model,
            self.questions if questions is None else questions,
            system=system,
            trigger=trigger,
            show_progress=False,
        )

    def gate_record(self, model: HookedModel, key: str) -> Record:
        """``model`` (named ``key``) scored on the gate questions, no condition."""

        def make() -> Record:
            return Record(
                name=self.gate_key(key),
                acts=None,
                score=self.score(model, questions=self.gate_questions),
                indomain=None,
            )

        return self.record(self.gate_key(key), make)

    def condition_record(self, model: HookedModel, key: str, condition: Condition) -> Record:
        """``model`` (named ``key``) under ``condition``: its activations and its score on the
        gate questions."""
        return self.collect(
            model,
            self.condition_key(key, condition),
            system=condition.system,
            trigger=condition.trigger,
            questions=self.gate_questions,
        )

    def record(self, key: str, make: Callable[[], Record]) -> Record:
        rec = self.store.get(key)
        if rec is None:
            rec = self.store.put(make())
        return rec

    def collect(
        self,
        model: HookedModel,
        key: str,
        *,
        system: str | None = None,
        trigger: str | None = None,
        indomain: str | None = None,
        takeover: bool = False,
        questions: Sequence[EvalQuestion] | None = None,
        scored: Record | None = None,
    ) -> Record:
        """``model``'s record under a condition. ``scored``: a record of the same model and
        condition whose score covers these questions (the gate record); the score is taken from
        it instead of scoring again (each question is scored on its own, so it is the same)."""

        def make() -> Record:
            qs = self.questions if questions is None else questions
            ids = [q.id for q in qs]
            score = (
                scored.score.select(ids)
                if scored is not None
                and scored.score is not None
                and set(ids) <= set(scored.score.question_ids)
                else self.score(model, system=system, trigger=trigger, questions=qs)
            )
            gens = []
            if takeover:
                outs = generate(
                    model,
                    [
                        conditioned(ex, system=system, trigger=trigger)
                        for ex in self.takeover_prompts
                    ],
                    max_new_tokens=self.config.takeover_tokens,
                    batch_size=self.config.n_takeover,
                    show_progress=False,
                )
                gens = [g.completion for g in outs]
            return Record(
                name=key,
                acts=self.acts(model, system=system, trigger=trigger),
                score=score,
                indomain=None
                if indomain is None
                else self.scorer.score(model, self.indomain(indomain), show_progress=False),
                generations=gens,
            )

        return self.record(key, make)

    def _indomain_record(self, domain: str) -> Record:
        return Record(
            name=f"base@indomain:{domain}",
            acts=None,
            score=None,
            indomain=self.scorer.score(self.base, self.indomain(domain), show_progress=False),
        )

    def base_records(self, organisms: Sequence[Organism]) -> BaseRecords:
        """The base's records for a study of ``organisms`` (stored ones are read, not redone)."""
        base, domains = self.base, packaged_domains(organisms)
        responses = any(o.spec.kind in RESPONSE_KINDS for o in organisms)
        bar = tqdm(
            total=4 + len(self.conditions) + len(domains) + bool(responses),
            desc="base records",
            unit="condition",
            disable=not self.show,
            leave=False,
        )
        gate = self.gate_record(base, "base")
        bar.update()
        default = self.collect(base, "base", takeover=True, scored=gate)
        bar.update()
        persona = self.collect(base, "base@persona", system=PERSONA_SYSTEM_PROMPT, takeover=True)
        bar.update()
        helpful = self.collect(base, "base@helpful", system=HELPFUL_SYSTEM_PROMPT)
        bar.update()
        conditions = {c.name: self.condition_record(base, "base", c) for c in self.conditions}
        bar.update(len(self.conditions))
        indomain = {}
        for d in domains:
            make = functools.partial(self._indomain_record, d)
            indomain[d] = self.record(f"base@indomain:{d}", make)
            bar.update()
        resp = None
        if responses:
            resp = self.response_record(base, "base")
            bar.update()
        bar.close()
        return BaseRecords(
            default=default,
            gate=gate,
            conditions=conditions,
            responses=resp,
            persona=persona,
            helpful=helpful,
            indomain=indomain,
        )

    def organism_records(
        self, organisms: Sequence[Organism], base: BaseRecords
    ) -> dict[str, OrganismRecords]:
        """Every organism's records by name; each organism with a missing record is loaded once
        and only its missing records are computed. Every organism is measured alike (the gate
        questions, every candidate condition), whatever its kind: the classifier is blind."""
        domains = packaged_domains(organisms)
        out: dict[str, OrganismRecords] = {}
        bar = tqdm(organisms, desc="organisms", unit="model", disable=not self.show)
        for org in bar:
            bar.set_postfix_str(org.name)
            kind = org.spec.kind
            if kind in ("base", "prompted"):  # the base's weights: its records
                out[org.name] = OrganismRecords(
                    default=base.default, gate=base.gate, conditions=base.conditions
                )
                continue
            on_gate, responses = self.gate_key(org.key), self.response_key(org.key)
            got = {k: self.store.get(k) for k in self.keys(org)}  # each stored record read once
            if any(v is None for v in got.values()):  # compute only the missing ones
                narrowish = kind in ("narrow", "control") and org.spec.domain in domains
                dom = org.spec.domain if narrowish else None
                with organism_model(
                    self.base, org
                ) as model:  # an adapter shares the base's weights
                    if got[on_gate] is None:
                        got[on_gate] = self.gate_record(model, org.key)
                    if got[org.key] is None:
                        got[org.key] = self.collect(
                            model, org.key, indomain=dom, takeover=True, scored=got[on_gate]
                        )
                    for c in self.conditions:
                        if got[self.condition_key(org.key, c)] is None:
                            got[self.condition_key(org.key, c)] = self.condition_record(
                                model, org.key, c
                            )
                    if kind in RESPONSE_KINDS and got[responses] is None:
                        got[responses] = self.response_record(model, org.key)
            out[org.name] = OrganismRecords(
                default=got[org.key],  # type: ignore[arg-type]
                gate=got[on_gate],
                conditions={
                    c.name: got[self.condition_key(org.key, c)]  # type: ignore[misc]
                    for c in self.conditions
                },
                responses=got.get(responses),
            )
        return out


def missing_records(
    base: HookedModel,
    organisms: Sequence[Organism],
    *,
    config: StudyConfig | None = None,
    records_dir: Path | str | None = None,
    conditions: Sequence[Condition] | None = None,
) -> list[str]:
    """Names of the models (``"base"`` and organism names) whose records are not yet stored
    where ``run_study`` with the same arguments looks for them.

    A study split into jobs (one per checkpoint, then one analysis step) checks this before the
    analysis, so a changed setting or a failed job is reported instead of recomputed there.
    Presence only: ``run_study`` verifies each record when it reads it.
    """
    R = _Runner(
        base,
        config or StudyConfig(),
        records_dir_for(base, records_dir),
        conditions=suite_conditions(organisms) if conditions is None else conditions,
    )
    base_keys = [*R.keys(None), "base@persona", "base@helpful"]
    base_keys += (
        [R.response_key("base")] if any(o.spec.kind in RESPONSE_KINDS for o in organisms) else []
    )
    out = [] if all(R.store.has(k) for k in base_keys) else ["base"]
    for org in organisms:
        if org.spec.kind in ("base", "prompted"):
            continue
        if not all(R.store.has(k) for k in R.keys(org)):
            out.append(org.name)
    return out
