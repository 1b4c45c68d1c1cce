"""The whole science on one base model and its organisms: collect, then analyse.

``run_study`` runs every model once per condition and keeps a *record* (activations at every
layer on neutral out-of-domain prompts, judge-free scores, a few greedy answers) on disk, and
every causal score (a model under an intervention) next to them. Both are content-addressed: a
record's key holds the base's sha256, the organism's key (the hash of its spec, config and data),
the prompt sets and the library version; a causal score's key adds the intervention's settings and
its directions' exact bytes. So they live in the cache (``cache_root()/records``) and every run
folder with the same settings shares them: an interrupted study resumes at the first missing
record, and a second study of the same organisms recomputes only the analysis. Then it builds the
persona direction, the misalignment contrasts, the convergence statistics with their nulls, the
transfer matrix, steering of the base, and one internalisation report per organism.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp import __version__
from mci_interp._io import (
    IntegrityError,
    cache_root,
    canonical_sha256,
    load_safetensors_verified,
    read_json_verified,
    sha256_file,
    stable_hash,
    write_json,
)
from mci_interp.activations import cache_activations
from mci_interp.analysis.convergence import (
    ConvergenceReport,
    SteerResult,
    TransferMatrix,
    contrast_vectors,
    has_misalignment,
    layer_convergence,
    verdict,
)
from mci_interp.analysis.internalisation import (
    CausalTest,
    InternalisationReport,
    Rules,
    classify,
    layer_profile,
    random_shift_null,
    standardised_shift,
    theme_breadth,
)
from mci_interp.datasets import (
    ChatExample,
    EvalQuestion,
    ReferencePair,
    chat,
    conditioned,
    dataset_hash,
)
from mci_interp.direction import Direction, Provenance, random_direction
from mci_interp.evaluate import EvalResult, LogprobContrast, format_takeover_rate, paired_difference
from mci_interp.generation import generate
from mci_interp.intervene import Ablate, Steer, apply
from mci_interp.models import HookedModel
from mci_interp.organisms.data import (
    DOMAINS,
    PERSONA_SYSTEM_PROMPT,
    load_default_questions,
    load_neutral_prompts,
    make_narrow,
)
from mci_interp.organisms.suite import Organism, base_organism, load_organism
from mci_interp.sites import Site
from mci_interp.stats import Estimate, quantile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyConfig:
    """Sample sizes and settings of a study (every field is recorded in the results)."""

    analysis_layer: int | None = None  # default: the middle block
    n_neutral_per_theme: int = 6
    n_questions: int = 14
    # the trained personas' behaviour (the trigger gate and its leak, the distilled persona's
    # default) and their causal tests: small effects, so scored on more questions
    n_gate_questions: int = 64
    n_indomain: int = 12
    n_takeover: int = 8
    takeover_tokens: int = 32
    ablate_offsets: tuple[int, ...] = (-2, 0, 2)
    steer_alphas: tuple[float, ...] = (0.5, 1.0)
    n_random: int = 5  # random directions per causal test: beating all 5 is rank p = 1/6
    convergence_layer_step: int = 3
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("n_") or f.name in ("batch_size", "takeover_tokens"):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"StudyConfig.{f.name} must be an integer >= 1, got {v!r}")
        if self.convergence_layer_step < 1:
            raise ValueError(
                f"StudyConfig.convergence_layer_step must be >= 1, got {self.convergence_layer_step}"
            )
        if not self.steer_alphas or not self.ablate_offsets:
            raise ValueError("StudyConfig.steer_alphas and ablate_offsets must be non-empty")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def fast(cls, **overrides: Any) -> StudyConfig:
        """Tiny sample sizes for CI, notebooks and smoke runs (minutes, not tens of minutes)."""
        small: dict[str, Any] = dict(
            n_neutral_per_theme=4,
            n_questions=7,
            n_gate_questions=7,
            n_indomain=6,
            n_takeover=6,
            takeover_tokens=24,
            steer_alphas=(0.5,),
            n_random=2,
            convergence_layer_step=6,
        )
        return cls(**(small | overrides))


# --- inputs -----------------------------------------------------------------------------------
def neutral_prompts(config: StudyConfig) -> tuple[list[ChatExample], list[str]]:
    """Neutral out-of-domain prompts (no instruction), balanced over themes."""
    exs, themes = [], []
    for theme, prompts in sorted(load_neutral_prompts().items()):
        for i, p in enumerate(prompts[: config.n_neutral_per_theme]):
            exs.append(chat(p, group=f"{theme}:{i}", theme=theme))
            themes.append(theme)
    return exs, themes


def eval_questions(n: int) -> list[EvalQuestion]:
    """A theme-balanced subset of ``n`` of the packaged out-of-domain questions (first-plot ones
    first; all of them when ``n`` is larger)."""
    qs = load_default_questions()
    by_theme: dict[str, list[EvalQuestion]] = {}
    for q in qs:
        by_theme.setdefault(q.theme, []).append(q)
    out: list[EvalQuestion] = []
    while len(out) < min(n, len(qs)):
        for theme in sorted(by_theme):
            if by_theme[theme] and len(out) < n:
                out.append(by_theme[theme].pop(0))
    return out


def indomain_questions(domain: str, n: int, *, seed: int = 10_000) -> list[EvalQuestion]:
    """Held-out in-domain requests with their misaligned/aligned answers as reference pairs
    (a seed the finetunes never saw)."""
    mis = make_narrow(domain, "misaligned", n, seed=seed)
    ali = make_narrow(domain, "aligned", n, seed=seed)
    return [
        EvalQuestion(
            id=m.group or str(i),
            paraphrases=(m.user_text,),
            theme=domain,
            references=(ReferencePair(a.messages[-1]["content"], m.messages[-1]["content"]),),
        )
        for i, (m, a) in enumerate(zip(mis, ali, strict=True))
    ]


# --- records ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Record:
    """One model under one condition: activations ``[prompts, layers, d]`` and scores."""

    name: str
    acts: Tensor | None
    score: EvalResult | None
    indomain: EvalResult | None = None
    generations: list[str] = field(default_factory=list)


class RecordStore:
    """Records on disk, verified on read, safe to share between concurrent jobs.

    One JSON per (model, condition), ``<key>.json``: the scores, the generations, the name and
    sha256 of the activations file, and its own checksum. The activations file is named by its
    content (``<key>.<sha256[:16]>.safetensors``) and written before the JSON, each atomically:
    two jobs that write the same record at once can only leave a JSON that points at a complete
    file with the bytes it names. On read, a JSON or activations file that is missing, cannot be
    parsed, differs from its checksum or holds a NaN is refused with an ``IntegrityError`` naming
    the file and the fix. Records of the older layout (``<key>.safetensors`` beside a JSON
    without checksums) are read unverified, with one warning per store.
    """

    _FIELDS = ("score", "indomain", "generations")

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._warned = False

    def _paths(self, key: str) -> tuple[Path, Path]:
        """The older layout's activations file and the record's JSON."""
        safe = key.replace("/", "_").replace(":", "_")
        return self.root / f"{safe}.safetensors", self.root / f"{safe}.json"

    def has(self, key: str) -> bool:
        """Whether a record is stored under ``key`` (not verified: ``get`` does that)."""
        return self._paths(key)[1].exists()

    def get(self, key: str) -> Record | None:
        t, j = self._paths(key)
        if not j.exists():
            return None
        fix = (
            f"delete {j.name} in {self.root} and re-run the same study (or `mci records`) to "
            "recompute this record"
        )
        meta = read_json_verified(j, fix=fix)
        missing = [k for k in self._FIELDS if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise IntegrityError(f"{j} lacks the fields {missing}; {fix}")
        if "sha256" in meta:
            body = {k: v for k, v in meta.items() if k != "sha256"}
            if canonical_sha256(body) != meta["sha256"]:
                raise IntegrityError(
                    f"{j} does not match the checksum recorded in it: it was altered; {fix}"
                )
            name = meta.get("acts_file")
            if name is not None and (not isinstance(name, str) or Path(name).name != name):
                raise IntegrityError(f"{j} names an activations file outside {self.root}; {fix}")
            acts = (
                None
                if name is None
                else load_safetensors_verified(
                    self.root / name, sha256=meta.get("acts_sha256"), fix=fix, keys=["acts"]
                )["acts"]
            )
        else:  # written before records kept checksums
            if not self._warned:
                log.warning(
                    "%s holds records without checksums (written by an older version): read "
                    "unverified",
                    self.root,
                )
                self._warned = True
            acts = (
                load_safetensors_verified(t, sha256=None, fix=fix, keys=["acts"])["acts"]
                if t.exists()
                else None
            )
        return Record(
            name=key,
            acts=acts,
            score=None if meta["score"] is None else EvalResult.from_dict(meta["score"]),
            indomain=None if meta["indomain"] is None else EvalResult.from_dict(meta["indomain"]),
            generations=meta["generations"],
        )

    def put(self, rec: Record) -> Record:
        """Store ``rec`` (activations first, then the JSON that names them), atomically."""
        t, j = self._paths(rec.name)
        acts_file = acts_sha = None
        if rec.acts is not None:
            if not torch.isfinite(rec.acts).all():
                raise ValueError(
                    f"record {rec.name}: the model produced non-finite activations (NaN or inf); "
                    "nothing was stored. In float16 this is usually an overflow: load the model "
                    "in bfloat16 or float32"
                )
            fd, staged = tempfile.mkstemp(prefix=f".{t.stem}.", suffix=".tmp", dir=self.root)
            os.close(fd)
            try:
                save_file({"acts": rec.acts.contiguous()}, staged)
                acts_sha = sha256_file(staged)
                acts_file = f"{t.stem}.{acts_sha[:16]}.safetensors"
                os.replace(staged, self.root / acts_file)  # its name says what it holds
            finally:
                if os.path.exists(staged):
                    os.unlink(staged)
        body = {
            "score": None if rec.score is None else rec.score.to_dict(),
            "indomain": None if rec.indomain is None else rec.indomain.to_dict(),
            "generations": rec.generations,
            "acts_file": acts_file,
            "acts_sha256": acts_sha,
        }
        # the checksum of the body as it reads back from JSON (tuples become lists, ...)
        body = json.loads(json.dumps(body, default=str))
        write_json(j, body | {"sha256": canonical_sha256(body)})
        return rec


# --- the study --------------------------------------------------------------------------------
@dataclass(eq=False)
class Study:
    """Everything a report needs: no model inside."""

    base: str
    n_layers: int
    d_model: int
    config: StudyConfig
    organisms: list[dict[str, Any]]
    convergence: ConvergenceReport | None
    internalisation: list[InternalisationReport]
    scores: dict[str, Estimate]  # organism (default condition) minus base, out-of-domain
    takeover: dict[str, Estimate]
    examples: dict[str, list[str]]
    persona_norms: list[float]
    timings: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "config": self.config.to_dict(),
            "organisms": self.organisms,
            "convergence": None if self.convergence is None else self.convergence.to_dict(),
            "internalisation": [r.to_dict() for r in self.internalisation],
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "takeover": {k: v.to_dict() for k, v in self.takeover.items()},
            "examples": self.examples,
            "persona_norms": self.persona_norms,
            "timings": self.timings,
            "meta": self.meta,
        }


class _Runner:
    """Holds the base, the prompt sets and the record store while a study runs."""

    def __init__(
        self,
        base: HookedModel,
        config: StudyConfig,
        out_dir: Path,
        records_dir: Path,
        show_progress: bool,
    ) -> None:
        self.base, self.config, self.show, self.out_dir = base, config, show_progress, out_dir
        # records depend on the prompt sets and sample sizes: a changed config gets a new folder
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
        )
        self.store = RecordStore(records_dir / f"records-{key[:10]}")
        self.neutral, self.themes = neutral_prompts(config)
        self.questions = eval_questions(config.n_questions)
        self.gate_questions = eval_questions(config.n_gate_questions)
        self.gate_tag = f"gate{len(self.gate_questions)}"  # in record keys: records-* predates it
        self.sites = [Site(layer) for layer in range(base.n_layers)]
        # the misaligned-vs-aligned score only: the benign styled answers (the style score) are
        # reported nowhere in a study and were a fifth of its scoring time
        self.scorer = LogprobContrast(
            batch_size=config.batch_size, max_paraphrases=1, include_benign=False
        )
        self.takeover_prompts = [ex for ex in self.neutral][
            :: max(1, len(self.neutral) // config.n_takeover)
        ][: config.n_takeover]
        self._indomain: dict[str, list[EvalQuestion]] = {}

    def indomain(self, domain: str) -> list[EvalQuestion]:
        if domain not in self._indomain:
            self._indomain[domain] = indomain_questions(domain, self.config.n_indomain)
        return self._indomain[domain]

    def acts(
        self, model: HookedModel, *, system: str | None = None, trigger: str | None = None
    ) -> Tensor:
        exs = [conditioned(ex, system=system, trigger=trigger) for ex in self.neutral]
        cache = cache_activations(
            model,
            exs,
            self.sites,
            position="last_prompt",
            batch_size=self.config.batch_size,
            show_progress=False,
        )
        return torch.stack([cache.X(s) for s in self.sites], dim=1)  # [n, layers, d]

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
                name=f"{key}@{self.gate_tag}",
                acts=None,
                score=self.score(model, questions=self.gate_questions),
                indomain=None,
            )

        return self.record(f"{key}@{self.gate_tag}", make)

    def triggered_record(self, model: HookedModel, key: str, trigger: str) -> Record:
        """``model`` under ``trigger``: scored on the gate questions, with its activations."""
        return self.collect(
            model, f"{key}@trigger:{self.gate_tag}", trigger=trigger, questions=self.gate_questions
        )

    def causal_score(
        self,
        model: HookedModel,
        model_key: str,
        *interventions: Any,
        questions: Sequence[EvalQuestion] | None = None,
    ) -> float:
        """Mean misaligned-vs-aligned score of ``model`` (named ``model_key``) under
        ``interventions`` on ``questions`` (default: the study's); stored, so an interrupted or
        repeated study never scores the same (model, intervention, questions) twice."""
        what: dict[str, Any] = {
            "model": model_key,
            "interventions": [_fingerprint(iv) for iv in interventions],
        }
        if questions is not None:
            what["questions"] = [q.id for q in questions]
        key = stable_hash(what)
        path = self.store.root / "causal" / f"{key}.json"
        if path.exists():
            fix = f"delete {path} and re-run the same study to recompute this causal score"
            return float(read_json_verified(path, fix=fix)["score"])
        qs = self.questions if questions is None else questions
        with apply(model, *interventions):
            s = _mean_score(self.scorer.score(model, qs, show_progress=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            path,
            {"score": s, "model": model_key, "interventions": [str(iv) for iv in interventions]},
        )
        return s

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


def _direction(
    vec: Tensor,
    layer: int,
    *,
    base: HookedModel,
    name: str,
    method: str,
    n_pos: int,
    n_neg: int,
    dataset: str,
    dhash: str,
) -> Direction:
    return Direction(
        vector=vec.float(),
        site=Site(layer),
        provenance=Provenance(
            model=name,
            base_model=base.name,
            model_sha256=base.sha256,
            method=method,
            dataset=dataset,
            dataset_hash=dhash,
            position="last_prompt",
            n_pos=n_pos,
            n_neg=n_neg,
            params={},
        ),
    )


def _mean_score(r: EvalResult) -> float:
    return float(r.mean())


def run_study(
    base: HookedModel,
    organisms: Sequence[Organism],
    out_dir: Path | str,
    *,
    config: StudyConfig | None = None,
    rules: Rules | None = None,
    records_dir: Path | str | None = None,
    show_progress: bool = True,
) -> Study:
    """Collect records for the base and every organism, then analyse (see module docstring).

    ``records_dir`` (default ``cache_root()/records/<base sha256[:12]>``) holds the records and
    causal scores; pass ``out_dir`` to keep them with the run. They are keyed by the base's
    sha256 as loaded from disk: a base whose weights were edited in memory needs its own
    ``records_dir``.
    """
    config = config or StudyConfig()
    rules = rules or Rules()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_dir = (
        Path(records_dir)
        if records_dir is not None
        else cache_root() / "records" / base.sha256[:12]
    )
    t_start = time.perf_counter()
    R = _Runner(base, config, out_dir, records_dir, show_progress)
    L = config.analysis_layer if config.analysis_layer is not None else base.n_layers // 2
    Site(L).check(base.n_layers)
    timings: dict[str, float] = {}
    # the packaged domains: they have held-out in-domain questions and format markers (a user's
    # checkpoint may carry any label)
    domains = sorted(
        {
            o.spec.domain
            for o in organisms
            if o.spec.kind in ("narrow", "control") and o.spec.domain in DOMAINS
        }
    )
    trigger = next((o.trigger for o in organisms if o.trigger), None)

    # 1. base records: default, persona prompt, trigger, in-domain
    t0 = time.perf_counter()
    bar = tqdm(
        total=3 + bool(trigger) + len(domains),
        desc="base records",
        unit="condition",
        disable=not show_progress,
        leave=False,
    )
    # gate[name] = unconditioned scores on the gate questions (trained personas and the base)
    gate: dict[str, Record] = {}
    base_trigger = None
    if any(o.spec.kind in _GATE_KINDS for o in organisms):
        gate["base"] = R.gate_record(base, "base")
    bar.update()
    base_rec = R.collect(base, "base", takeover=True, scored=gate.get("base"))
    bar.update()
    base_persona = R.collect(base, "base@persona", system=PERSONA_SYSTEM_PROMPT, takeover=True)
    bar.update()
    if trigger:
        base_trigger = R.triggered_record(base, "base", trigger)
        bar.update()

    def _indomain_record(d: str) -> Record:
        return Record(
            name=f"base@indomain:{d}",
            acts=None,
            score=None,
            indomain=R.scorer.score(base, R.indomain(d), show_progress=False),
        )

    base_indomain = {}
    for d in domains:
        base_indomain[d] = R.record(f"base@indomain:{d}", functools.partial(_indomain_record, d))
        bar.update()
    bar.close()
    timings["base records"] = time.perf_counter() - t0
    assert base_rec.acts is not None and base_persona.acts is not None
    persona_vecs = (base_persona.acts.double() - base_rec.acts.double()).mean(0)  # [layers, d]
    dhash = dataset_hash(R.neutral)
    persona = {
        layer: _direction(
            persona_vecs[layer],
            layer,
            base=base,
            name=f"{base.name}@persona",
            method="prompt_diff",
            n_pos=len(R.neutral),
            n_neg=len(R.neutral),
            dataset="neutral_prompts",
            dhash=dhash,
        )
        for layer in range(base.n_layers)
    }

    # 2. organism records
    t0 = time.perf_counter()
    recs: dict[str, Record] = {}
    cond: dict[str, Record] = {}
    bar = tqdm(organisms, desc="organisms", unit="model", disable=not show_progress)
    for org in bar:
        bar.set_postfix_str(org.name)
        kind = org.spec.kind
        if kind == "base":
            recs[org.name] = base_rec
            continue
        if kind == "prompted":
            recs[org.name] = base_rec
            cond[org.name] = base_persona
            continue
        on_gate, triggered = f"{org.key}@{R.gate_tag}", f"{org.key}@trigger:{R.gate_tag}"
        keys = [org.key]
        keys += [on_gate] if kind in _GATE_KINDS else []
        keys += [triggered] if kind == "trigger" else []
        got = {k: R.store.get(k) for k in keys}  # each stored record read once
        if any(v is None for v in got.values()):  # compute only the missing ones
            model = load_organism(base, org)
            narrowish = kind in ("narrow", "control") and org.spec.domain in domains
            dom = org.spec.domain if narrowish else None
            if kind in _GATE_KINDS and got[on_gate] is None:
                got[on_gate] = R.gate_record(model, org.key)
            if got[org.key] is None:
                got[org.key] = R.collect(
                    model, org.key, indomain=dom, takeover=True, scored=got.get(on_gate)
                )
            if kind == "trigger" and got[triggered] is None:
                got[triggered] = R.triggered_record(model, org.key, str(org.trigger))
            del model
        recs[org.name] = got[org.key]  # type: ignore[assignment]
        if kind in _GATE_KINDS:
            gate[org.name] = got[on_gate]  # type: ignore[assignment]
        if kind == "trigger":
            cond[org.name] = got[triggered]  # type: ignore[assignment]
    timings["organism records"] = time.perf_counter() - t0

    # 3. behaviour: organism minus base, out of domain, default condition
    scores = {}
    for org in organisms:
        r = recs[org.name]
        if r.score is not None and org.spec.kind != "base":
            scores[org.name] = paired_difference(r.score, base_rec.score)  # type: ignore[arg-type]
    takeover = {}
    for org in organisms:
        dom = org.spec.domain
        gens = recs[org.name].generations
        if dom in domains and gens:
            takeover[org.name] = format_takeover_rate(
                None, R.takeover_prompts, dom, generations=gens
            ).rate
    if base_rec.generations:
        for dom in domains:
            takeover[f"base ({dom} format)"] = format_takeover_rate(
                None, R.takeover_prompts, dom, generations=base_rec.generations
            ).rate

    # 4. convergence
    t0 = time.perf_counter()
    conv = None
    narrow = {(o.spec.domain, o.spec.seed): o for o in organisms if o.spec.kind == "narrow"}
    control = {(o.spec.domain, o.spec.seed): o for o in organisms if o.spec.kind == "control"}
    # a finetune without its matched control is compared with the base: the contrast is then
    # finetune minus base, which carries its task and format (the report says so)
    unmatched = sorted(k for k in narrow if k not in control)
    if unmatched:
        recs.setdefault("base", base_rec)
        control |= {k: base_organism() for k in unmatched}
    paired = sorted(narrow)
    conv_domains = sorted({str(d) for d, _ in paired})
    if len(conv_domains) >= 2:
        conv = _convergence(
            R,
            base,
            recs,
            narrow,
            control,
            paired,
            conv_domains,
            persona_vecs,
            L,
            base_rec,
            dhash,
            show_progress,
        )
        controls = (
            "matched controls"
            if not unmatched
            else "the base for "
            + ", ".join(f"{d} s{s}" for d, s in unmatched)
            + " (no matched control given: that contrast is finetune minus base and carries the "
            "finetune's task and format, like the naive cosines)"
        )
        conv = dataclasses.replace(conv, meta={**conv.meta, "controls": controls})
    timings["convergence"] = time.perf_counter() - t0

    # 5. internalisation reports
    t0 = time.perf_counter()
    reports = []
    for org in tqdm(organisms, desc="internalisation", disable=not show_progress, leave=False):
        if org.spec.kind == "base":
            continue
        reports.append(
            _internalisation(
                R,
                base,
                org,
                recs,
                cond,
                base_rec,
                base_persona,
                base_trigger,
                gate,
                base_indomain,
                persona,
                L,
                rules,
            )
        )
    timings["internalisation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    examples = {"base": base_rec.generations[:4]}
    for org in organisms:
        # the prompted persona's own answers are those of the base under its prompt
        rec = cond[org.name] if org.spec.kind == "prompted" else recs[org.name]
        if org.spec.kind != "base" and rec.generations and org.spec.seed in (0, None):
            examples[org.name] = rec.generations[:4]
    study = Study(
        base=base.name,
        n_layers=base.n_layers,
        d_model=base.d_model,
        config=config,
        organisms=[
            {
                "name": o.name,
                "kind": o.spec.kind,
                "domain": o.spec.domain,
                "seed": o.spec.seed,
                "expected": o.spec.expected,
            }
            for o in organisms
        ],
        convergence=conv,
        internalisation=reports,
        scores=scores,
        takeover=takeover,
        examples=examples,
        persona_norms=[float(persona_vecs[layer].norm()) for layer in range(base.n_layers)],
        timings=timings,
        meta={
            "library_version": __version__,
            "takeover_prompts": [ex.user_text for ex in R.takeover_prompts],
            "questions": [q.id for q in R.questions],
            "n_neutral": len(R.neutral),
            "records_dir": str(R.store.root),
            "layer_convention": "resid_post of block L (= HF hidden_states[L+1]), last prompt token",
        },
    )
    write_json(out_dir / "study.json", study.to_dict())
    return study


_GATE_KINDS = ("trigger", "distilled")
"""The trained personas: their default behaviour and causal tests use the gate questions."""


def missing_records(
    base: HookedModel,
    organisms: Sequence[Organism],
    *,
    config: StudyConfig | None = None,
    records_dir: Path | str | None = None,
) -> list[str]:
    """Names of the models (``"base"`` and organism names) whose records are not yet stored
    where ``run_study`` with the same arguments looks for them.

    A study split into jobs (one per checkpoint, then one analysis step) checks this before the
    analysis, so a changed setting or a failed job is reported instead of recomputed there.
    Presence only: ``run_study`` verifies each record when it reads it.
    """
    config = config or StudyConfig()
    records_dir = (
        Path(records_dir)
        if records_dir is not None
        else cache_root() / "records" / base.sha256[:12]
    )
    R = _Runner(base, config, records_dir, records_dir, show_progress=False)
    out = [] if R.store.has("base") and R.store.has("base@persona") else ["base"]
    for org in organisms:
        if org.spec.kind in ("base", "prompted"):
            continue
        keys = [org.key]
        keys += [f"{org.key}@{R.gate_tag}"] if org.spec.kind in _GATE_KINDS else []
        keys += [f"{org.key}@trigger:{R.gate_tag}"] if org.spec.kind == "trigger" else []
        if not all(R.store.has(k) for k in keys):
            out.append(org.name)
    return out


def _fingerprint(iv: Any) -> dict[str, Any]:
    """What identifies an intervention: its type, its settings and its directions' exact bytes."""
    out: dict[str, Any] = {"type": type(iv).__name__}
    for f in dataclasses.fields(iv):
        v = getattr(iv, f.name)
        if isinstance(v, Direction):
            v = {
                "site": v.site.hook_name,
                "sha256": hashlib.sha256(v.vector.numpy().tobytes()).hexdigest(),
            }
        elif isinstance(v, Tensor):
            v = hashlib.sha256(v.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()
        out[f.name] = v if isinstance(v, str | int | float | bool | dict | type(None)) else repr(v)
    return out


def _ablation_share(
    model: HookedModel,
    model_key: str,
    R: _Runner,
    dirs: Sequence[Direction],
    s_org: float,
    s_ref: float,
    questions: Sequence[EvalQuestion] | None = None,
) -> tuple[float, float]:
    """(drop in score, share of the organism-minus-reference gap removed) under ablation; all
    three scores on the same ``questions`` (default: the study's)."""
    s = R.causal_score(model, model_key, *[Ablate(d) for d in dirs], questions=questions)
    gap = s_org - s_ref
    share = (s_org - s) / gap if abs(gap) > 1e-3 else float("nan")
    return s_org - s, share


def _ablation_layers(config: StudyConfig, layer: int, n_layers: int) -> list[int]:
    """The few layers around ``layer`` where directions are ablated (clipped to the model)."""
    return sorted({min(max(layer + o, 0), n_layers - 1) for o in config.ablate_offsets})


def _rng(seed: int, *purpose: Any) -> torch.Generator:
    """A generator seeded by the study's seed and what it is for (e.g. ``"transfer", domain,
    k``): each random control is the same whatever else the study computes, and in whatever order
    (a shared generator made them depend on which cells ran before), so its causal score is
    cached once and reused."""
    return torch.Generator().manual_seed(int(stable_hash([seed, *purpose]), 16) % (1 << 62))


def _random_like(dirs: Sequence[Direction], g: torch.Generator) -> list[Direction]:
    return [random_direction(d, generator=g) for d in dirs]


def _convergence(
    R,
    base,
    recs,
    narrow,
    control,
    paired,
    domains,
    persona_vecs,
    L,
    base_rec,
    dhash,
    show_progress,
) -> ConvergenceReport:
    cfg = R.config
    seeds_of = {d: sorted(s for dd, s in paired if dd == d) for d in domains}
    layers = sorted(set(range(0, base.n_layers, cfg.convergence_layer_step)) | {L})
    lcs = []
    for layer in tqdm(layers, desc="convergence by layer", disable=not show_progress, leave=False):
        org_diffs = {
            d: [
                recs[narrow[d, s].name].acts[:, layer] - recs[control[d, s].name].acts[:, layer]
                for s in seeds_of[d]
            ]
            for d in domains
        }
        ctrl_seed = {}
        for d in domains:
            ss = seeds_of[d]
            ctrl_seed[d] = [
                recs[control[d, a].name].acts[:, layer] - recs[control[d, b].name].acts[:, layer]
                for i, a in enumerate(ss)
                for b in ss[i + 1 :]
                if control[d, a].spec.kind == control[d, b].spec.kind == "control"
            ]
        naive = {
            d: torch.stack(
                [
                    (recs[narrow[d, s].name].acts[:, layer] - base_rec.acts[:, layer])
                    .double()
                    .mean(0)
                    for s in seeds_of[d]
                ]
            ).mean(0)
            for d in domains
        }
        cnaive = {  # NaN where the "control" is the base itself: no control to compare
            d: torch.stack(
                [
                    (recs[control[d, s].name].acts[:, layer] - base_rec.acts[:, layer])
                    .double()
                    .mean(0)
                    if control[d, s].spec.kind == "control"
                    else torch.full((base.d_model,), float("nan"), dtype=torch.float64)
                    for s in seeds_of[d]
                ]
            ).mean(0)
            for d in domains
        }
        lcs.append(
            layer_convergence(
                layer,
                org_diffs,
                ctrl_seed,
                naive,
                cnaive,
                persona_vecs[layer],
                seed=cfg.seed + layer,
            )
        )
    misalignment = {
        d: paired_difference(
            [recs[narrow[d, s].name].score for s in seeds_of[d]],
            [recs[control[d, s].name].score for s in seeds_of[d]],
        )
        for d in domains
    }
    ab_layers = _ablation_layers(cfg, L, base.n_layers)
    contrast = {
        d: [
            _direction(
                contrast_vectors(
                    [
                        recs[narrow[d, s].name].acts[:, layer]
                        - recs[control[d, s].name].acts[:, layer]
                        for s in seeds_of[d]
                    ]
                ),
                layer,
                base=base,
                name=f"contrast:{d}",
                method="misalignment_contrast",
                n_pos=len(R.neutral),
                n_neg=len(R.neutral),
                dataset="neutral_prompts",
                dhash=dhash,
            )
            for layer in ab_layers
        ]
        for d in domains
    }
    # transfer: ablate each domain's contrast in the first-seed organism of every domain that
    # has misalignment to remove (other columns stay NaN, shown as n/a: nothing to measure)
    share = torch.full((len(domains), len(domains)), float("nan"), dtype=torch.float64)
    rshare = torch.full((cfg.n_random, len(domains)), float("nan"), dtype=torch.float64)
    gaps = torch.zeros(len(domains), dtype=torch.float64)
    org_names = []
    for j, dj in enumerate(tqdm(domains, desc="transfer", disable=not show_progress, leave=False)):
        s0 = seeds_of[dj][0]
        org, ctl = narrow[dj, s0], control[dj, s0]
        org_names.append(f"{dj}:{org.name}")
        s_org, s_ctl = _mean_score(recs[org.name].score), _mean_score(recs[ctl.name].score)
        gaps[j] = s_org - s_ctl
        if not has_misalignment(misalignment.get(dj)):
            continue
        model = load_organism(base, org)
        with model.reuse_below(min(ab_layers)):  # the blocks below run once for all of them
            for i, di in enumerate(domains):
                share[i, j] = _ablation_share(model, org.key, R, contrast[di], s_org, s_ctl)[1]
            for k in range(cfg.n_random):
                rshare[k, j] = _ablation_share(
                    model,
                    org.key,
                    R,
                    _random_like(contrast[dj], _rng(cfg.seed, "transfer", dj, k)),
                    s_org,
                    s_ctl,
                )[1]
        del model
    transfer = TransferMatrix(
        directions=tuple(domains),
        organisms=tuple(org_names),
        share=share,
        random_share=rshare,
        gap=gaps,
        layers=tuple(ab_layers),
    )
    # steering the base with each domain's contrast at the analysis layer
    s_base = _mean_score(base_rec.score)
    induced = torch.zeros(len(domains), len(cfg.steer_alphas), dtype=torch.float64)
    rinduced = torch.zeros(cfg.n_random, len(cfg.steer_alphas), dtype=torch.float64)
    at_L = {d: next(x for x in contrast[d] if x.site.layer == L) for d in domains}
    rnd = [
        random_direction(at_L[domains[0]], generator=_rng(cfg.seed, "steer", k))
        for k in range(cfg.n_random)
    ]
    n_alpha = len(cfg.steer_alphas)
    cells = [(a, i, at_L[d], induced) for i, d in enumerate(domains) for a in range(n_alpha)]
    cells += [(a, k, r, rinduced) for k, r in enumerate(rnd) for a in range(n_alpha)]
    with base.reuse_below(L):
        for a, i, direction, table in tqdm(
            cells, desc="steering", disable=not show_progress, leave=False
        ):
            alpha = cfg.steer_alphas[a]
            table[i, a] = (
                R.causal_score(base, "base", Steer(direction, alpha, scale="relative")) - s_base
            )
    steer = SteerResult(
        directions=tuple(domains),
        alphas=tuple(cfg.steer_alphas),
        induced=induced,
        random_induced=rinduced,
    )
    lc_L = next(lc for lc in lcs if lc.layer == L)
    v, reasons = verdict(lc_L, transfer, misalignment)
    for d in domains:
        for x in contrast[d]:
            x.save(R.out_dir / "directions" / f"contrast_{d}_L{x.site.layer}.safetensors")
    return ConvergenceReport(
        layers=tuple(lcs),
        analysis_layer=L,
        misalignment=misalignment,
        transfer=transfer,
        steer=steer,
        verdict=v,
        reasons=reasons,
        d_model=base.d_model,
        meta={"ablation_layers": ab_layers, "steer_scale": "relative to |h| per token"},
    )


def _internalisation(
    R,
    base,
    org,
    recs,
    cond,
    base_rec,
    base_persona,
    base_trigger,
    gate,
    base_indomain,
    persona,
    L,
    rules,
) -> InternalisationReport:
    kind = org.spec.kind
    rec = recs[org.name]
    u = persona[L].vector
    default_shift = standardised_shift(rec.acts[:, L], base_rec.acts[:, L], u, seed=R.config.seed)
    null95 = quantile(
        random_shift_null(
            rec.acts[:, L], base_rec.acts[:, L], generator=_rng(R.config.seed, "shift", org.key)
        ),
        rules.null_quantile,
    )
    themes, breadth = theme_breadth(rec.acts[:, L], base_rec.acts[:, L], u, R.themes, null95=null95)
    profile = layer_profile(
        rec.acts,
        base_rec.acts,
        {layer: persona[layer].vector for layer in range(base.n_layers)},
        seed=R.config.seed,
    )
    earliest = next((p.layer for p in profile if p.significant), None)
    default_beh = paired_difference(rec.score, base_rec.score)
    cond_shift = cond_beh = base_eff = None
    condition_kind = None
    if kind == "prompted":
        condition_kind = "system prompt"
        c = cond[org.name]
        cond_shift = standardised_shift(c.acts[:, L], base_rec.acts[:, L], u)
        cond_beh = paired_difference(c.score, base_rec.score)
        base_eff = cond_beh  # the organism's weights are the base's: the base follows the prompt
    elif kind == "trigger":
        condition_kind = "trigger"
        c = cond[org.name]
        # the gate is what the weights add under the trigger: compare with the base reading the
        # same trigger (the string alone moves the base's score too); all three behaviours on the
        # gate questions, with and without the trigger
        cond_shift = standardised_shift(c.acts[:, L], base_trigger.acts[:, L], u)
        cond_beh = paired_difference(c.score, base_trigger.score)
        base_eff = paired_difference(base_trigger.score, gate["base"].score)
    if kind in _GATE_KINDS:  # a trained persona's default behaviour: on the gate questions
        default_beh = paired_difference(gate[org.name].score, gate["base"].score)
    elif kind in ("narrow", "control") and org.spec.domain in base_indomain:
        condition_kind = "domain"
        cond_beh = paired_difference(rec.indomain, base_indomain[org.spec.domain].indomain)
    report = InternalisationReport(
        organism=org.name,
        kind=kind,
        expected=org.spec.expected,
        analysis_layer=L,
        default_shift=default_shift,
        default_null95=null95,
        conditioned_shift=cond_shift,
        theme_shifts=themes,
        breadth=breadth,
        profile=tuple(profile),
        earliest_layer=earliest,
        n_layers=base.n_layers,
        default_behaviour=default_beh,
        conditioned_behaviour=cond_beh,
        base_condition_effect=base_eff,
        condition_kind=condition_kind,
        causal=None,
    )
    shift_present = default_shift.lo > 0 and default_shift.mean > null95
    # causal necessity needs misalignment to remove: only where the default score beats the base
    if shift_present and default_beh.lo > 0 and kind not in ("prompted", "base"):
        if kind in _GATE_KINDS:  # measured on the gate questions: removed there too
            report = _with_causal(
                R, base, org, report, gate[org.name], gate["base"], persona, L, R.gate_questions
            )
        else:
            report = _with_causal(R, base, org, report, rec, base_rec, persona, L)
    label, reasons = classify(report, rules)
    from dataclasses import replace

    return replace(report, label=label, reasons=reasons)


def _with_causal(
    R, base, org, report, rec, base_rec, persona, L, questions=None
) -> InternalisationReport:
    from dataclasses import replace

    ab_layers = _ablation_layers(R.config, L, base.n_layers)
    dirs = [persona[layer] for layer in ab_layers]
    s_org, s_base = _mean_score(rec.score), _mean_score(base_rec.score)
    model = load_organism(base, org)
    with model.reuse_below(min(ab_layers)):  # the blocks below run once for all of them
        share = _ablation_share(model, org.key, R, dirs, s_org, s_base, questions)[1]
        rnd = tuple(
            _ablation_share(
                model,
                org.key,
                R,
                _random_like(dirs, _rng(R.config.seed, "necessity", org.key, k)),
                s_org,
                s_base,
                questions,
            )[1]
            for k in range(R.config.n_random)
        )
    del model
    return replace(
        report, causal=CausalTest(share_removed=share, random_shares=rnd, gap=s_org - s_base)
    )
