"""The whole science on one base model and its organisms: collect, then analyse.

``run_study`` runs every model once per condition and keeps a *record* (activations at every
layer on neutral out-of-domain prompts, judge-free scores, a few greedy answers) on disk, and
every causal score (a model under an intervention) next to them. Both are content-addressed: a
record's key holds the base's sha256, the organism's key (the hash of its spec, config and data),
the prompt sets and the library version; a causal score's key adds the intervention's settings and
its directions' exact bytes. So they live in the cache (``cache_root()/records``) and every run
folder with the same settings shares them: an interrupted study resumes at the first missing
record, and a second study of the same organisms recomputes only the analysis.

This module only wires the steps, each of which a user can call on their own directions,
checkpoints and questions:

- records: ``analysis.collect`` (what is measured, under which keys), ``analysis.records``
  (the store);
- the persona direction and each organism's T2/T5 report: ``analysis.persona``;
- the misalignment contrasts and the convergence verdict: ``analysis.contrasts.convergence``;
- ablating each domain's contrast in every domain's organism: ``analysis.transfer.transfer``;
- steering the base along each contrast: ``analysis.steering.steering``;
- the causal scores they share, and their random controls: ``analysis.causal``;
- the probe and SAE lenses beside the contrasts: ``analysis.probes``, ``analysis.latents`` (its
  SAE: ``analysis.dictionary``), read together by ``analysis.lenses``;
- the convergence test's own wiring (contrasts, transfer, steering, the lenses):
  ``analysis.convergence_step``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp import __version__
from mci_interp._io import write_json
from mci_interp.analysis.causal import CoherenceTexts
from mci_interp.analysis.collect import (
    BaseRecords,
    OrganismRecords,
    _Runner,
    missing_records,
    packaged_domains,
    records_dir_for,
)
from mci_interp.analysis.conditions import Condition, suite_conditions
from mci_interp.analysis.config import (
    StudyConfig,
    eval_questions,
    indomain_questions,
    neutral_prompts,
)
from mci_interp.analysis.convergence import ConvergenceReport
from mci_interp.analysis.convergence_step import convergence_step
from mci_interp.analysis.dictionary import SaeSource
from mci_interp.analysis.internalisation import InternalisationReport, Rules
from mci_interp.analysis.persona import (
    NecessityTest,
    benign_shifts,
    internalisation,
    persona_directions,
    persona_vectors,
    specific_vectors,
    specificity,
)
from mci_interp.analysis.records import Record, RecordStore, acts_of
from mci_interp.datasets import ChatExample, dataset_hash
from mci_interp.direction import Direction
from mci_interp.evaluate import format_takeover_rate, paired_difference
from mci_interp.models import HookedModel
from mci_interp.organisms.suite import Organism
from mci_interp.stats import Estimate

__all__ = [
    "Record",
    "RecordStore",
    "Study",
    "StudyConfig",
    "eval_questions",
    "indomain_questions",
    "missing_records",
    "neutral_prompts",
    "run_study",
]


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
    # standardised shift along the persona direction (``raw``) and along the direction the
    # classifier uses (``specific``: benign shifts projected out) of what should not move along it
    specificity: dict[str, dict[str, Estimate]] = field(default_factory=dict)
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
            "specificity": {
                k: {n: e.to_dict() for n, e in v.items()} for k, v in self.specificity.items()
            },
            "meta": self.meta,
        }


def run_study(
    base: HookedModel,
    organisms: Sequence[Organism],
    out_dir: Path | str,
    *,
    config: StudyConfig | None = None,
    rules: Rules | None = None,
    records_dir: Path | str | None = None,
    conditions: Sequence[Condition] | None = None,
    sae: SaeSource | None = None,
    show_progress: bool = True,
) -> Study:
    """Collect records for the base and every organism, then analyse (see module docstring).

    ``conditions``: the candidate system prompts and triggers every model is measured under for
    the T2/T5 classifier (default ``analysis.conditions.suite_conditions(organisms)``: the
    packaged persona prompt and trigger plus those the organisms were built with).

    ``sae``: the SAE the convergence test's SAE lens reads (default: one trained here on the
    base at the analysis layer, cached; ``SaeSource(off=True)`` leaves the lens out).

    ``records_dir`` (default ``cache_root()/records/<base sha256[:12]>``) holds the records and
    causal scores; pass ``out_dir`` to keep them with the run. They are keyed by the base's
    sha256 as loaded from disk: a base whose weights were edited in memory needs its own
    ``records_dir``.
    """
    config = config or StudyConfig()
    rules = rules or Rules()
    sae = sae or SaeSource()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    conditions = suite_conditions(organisms) if conditions is None else list(conditions)
    R = _Runner(
        base,
        config,
        records_dir_for(base, records_dir),
        conditions=conditions,
        show_progress=show_progress,
    )
    L = config.analysis_layer_of(base.n_layers)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    base_recs = R.base_records(organisms)
    timings["base records"] = time.perf_counter() - t0
    # every causal score also measures coherence: the loss of the base's own greedy answers
    # to everyday prompts under the same interventions
    R.causal.coherence = CoherenceTexts(
        tuple(R.takeover_prompts), tuple(base_recs.default.generations)
    )
    covariance = base_covariance(base_recs)
    persona_vecs = persona_vectors(base_recs)  # [layers, d]
    n_prompts, dhash = len(R.neutral), dataset_hash(R.neutral)

    t0 = time.perf_counter()
    recs = R.organism_records(organisms, base_recs)
    timings["organism records"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    conv = convergence_step(
        R, organisms, recs, base_recs, persona_vecs, covariance, out_dir, sae, timings
    )
    timings["convergence"] = time.perf_counter() - t0

    # the classifier's direction: the persona direction with what a benign prompt and the benign
    # finetunes (the aligned controls) do projected out; a control's own shift is left out of
    # the direction it is measured on
    benign = {o.name: recs[o.name] for o in organisms if o.spec.kind == "control"}

    @functools.cache
    def specific(leave_out: str | None = None) -> dict[int, Direction]:
        others = [r for n, r in benign.items() if n != leave_out]
        vecs = specific_vectors(persona_vecs, benign_shifts(base_recs, others))
        return persona_directions(vecs, base=base, dataset_hash=dhash, n_prompts=n_prompts)

    def at_layers(dirs: dict[int, Direction]) -> Tensor:
        return torch.stack([dirs[layer].vector.double() for layer in sorted(dirs)])

    persona = specific()
    seed = config.seed
    spec = {
        "raw": specificity(persona_vecs, base_recs, benign, layer=L, seed=seed),
        # each control along the direction it is classified on (its own shift left out)
        "specific": specificity(at_layers(persona), base_recs, {}, layer=L, seed=seed),
    }
    for name, r in benign.items():
        spec["specific"] |= specificity(
            at_layers(specific(name)), base_recs, {name: r}, layer=L, seed=seed, helpful=False
        )

    t0 = time.perf_counter()
    necessity = NecessityTest(
        base=base,
        scores=R.causal,
        layers=config.ablation_layers(base.n_layers),
        n_random=config.n_random,
        seed=config.seed,
        gate_questions=R.gate_questions,
        covariance=covariance,
    )
    reports = [
        internalisation(
            org,
            recs[org.name],
            base_recs,
            specific(org.name) if org.name in benign else persona,
            themes=R.themes,
            analysis_layer=L,
            rules=rules,
            seed=config.seed,
            necessity=necessity,
        )
        for org in tqdm(organisms, desc="internalisation", disable=not show_progress, leave=False)
        if org.spec.kind != "base"
    ]
    timings["internalisation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
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
        scores=_scores(organisms, recs, base_recs.default),
        takeover=_takeover(organisms, recs, base_recs.default, R.takeover_prompts),
        examples=_examples(organisms, recs, base_recs.default, base_recs.persona),
        persona_norms=[float(persona_vecs[layer].norm()) for layer in range(base.n_layers)],
        timings=timings,
        specificity=spec,
        meta={
            "library_version": __version__,
            "takeover_prompts": [ex.user_text for ex in R.takeover_prompts],
            "questions": [q.id for q in R.questions],
            "n_neutral": n_prompts,
            "conditions": [
                {"name": c.name, "system": c.system, "trigger": c.trigger} for c in conditions
            ],
            "records_dir": str(R.store.root),
            "layer_convention": "resid_post of block L (= HF hidden_states[L+1]), last prompt token",
        },
    )
    write_json(out_dir / "study.json", study.to_dict())
    return study


def base_covariance(base: BaseRecords) -> dict[int, Tensor]:
    """Layer -> the base's activations on the neutral prompts (default condition): the rows
    whose covariance the structured random controls are drawn from."""
    acts = acts_of(base.default)
    return {layer: acts[:, layer] for layer in range(acts.shape[1])}


def _scores(
    organisms: Sequence[Organism], recs: dict[str, OrganismRecords], base: Record
) -> dict[str, Estimate]:
    """Each organism minus the base, out of domain, default condition."""
    out = {}
    for org in organisms:
        r = recs[org.name].default
        if r.score is not None and org.spec.kind != "base":
            out[org.name] = paired_difference(r.score, base.score)  # type: ignore[arg-type]
    return out


def _takeover(
    organisms: Sequence[Organism],
    recs: dict[str, OrganismRecords],
    base: Record,
    prompts: Sequence[ChatExample],
) -> dict[str, Estimate]:
    """How often the greedy answers to everyday prompts take the format of a packaged domain:
    each organism's own, and the base's in every domain's format."""
    domains = packaged_domains(organisms)
    out = {}
    for org in organisms:
        dom, gens = org.spec.domain, recs[org.name].default.generations
        if dom in domains and gens:
            out[org.name] = format_takeover_rate(None, prompts, dom, generations=gens).rate
    if base.generations:
        for dom in domains:
            out[f"base ({dom} format)"] = format_takeover_rate(
                None, prompts, dom, generations=base.generations
            ).rate
    return out


def _examples(
    organisms: Sequence[Organism],
    recs: dict[str, OrganismRecords],
    base: Record,
    persona: Record | None,
) -> dict[str, list[str]]:
    """A few greedy answers of the base, of the base under the persona prompt (the prompted
    persona's) and of each first-seed trained organism."""
    out = {"base": base.generations[:4]}
    if persona is not None and persona.generations:
        out["base under the persona prompt"] = persona.generations[:4]
    for org in organisms:
        rec = recs[org.name].default
        if org.spec.kind not in ("base", "prompted") and rec.generations:
            if org.spec.seed in (0, None):
                out[org.name] = rec.generations[:4]
    return out
