"""The internalisation step: the base's persona direction, made specific, and each organism's
blind T2/T5 report along it.

The persona direction is the base's mean activation under the persona system prompt minus its
default, per layer, on the neutral prompts. The classifier uses it with the *benign shifts*
projected out (``specific_vectors``: what a helpful system prompt does to the base and the
aligned controls' mean shift, a control's own left out when it is the one measured), because on
SmolLM2 the raw direction moved with benign finetunes as much as with misaligned ones. An
organism's report holds its default shift along it (against random directions), the shift's
breadth over prompt themes and its profile over layers, its behaviour with no condition and
under every candidate condition (beside the base's under the same), leave-one-question-out
checks, and, where the rules need it, the causal test; the label comes from
``analysis.internalisation.classify``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mci_interp.analysis.causal import (
    CausalScore,
    CausalScorer,
    ablated_scores,
    control_kinds,
    random_controls,
    rng,
    share_point,
    share_removed,
    unablated_coherence,
)
from mci_interp.analysis.collect import BaseRecords, OrganismRecords
from mci_interp.analysis.config import neutral_direction
from mci_interp.analysis.internalisation import (
    CausalTest,
    ConditionEffect,
    InternalisationReport,
    Rules,
    Sensitivity,
    classify,
    layer_profile,
    random_shift_null,
    sensitivity,
    shift_present,
    standardised_shift,
    theme_breadth,
)
from mci_interp.analysis.records import acts_of, score_of
from mci_interp.datasets import EvalQuestion
from mci_interp.direction import Direction
from mci_interp.evaluate import EvalResult, paired_difference
from mci_interp.intervene import Ablate
from mci_interp.models import HookedModel
from mci_interp.organisms.suite import Organism
from mci_interp.stats import Estimate, paired_mean_difference, quantile


def persona_vectors(base: BaseRecords) -> Tensor:
    """``[layers, d_model]`` (float64): the base under the persona prompt minus its default,
    averaged over the neutral prompts."""
    return (acts_of(base.persona).double() - acts_of(base.default).double()).mean(0)


def persona_directions(
    vectors: Tensor, *, base: HookedModel, dataset_hash: str, n_prompts: int
) -> dict[int, Direction]:
    """``persona_vectors`` as one ``Direction`` per layer."""
    return {
        layer: neutral_direction(
            vectors[layer],
            layer,
            base=base,
            name=f"{base.name}@persona",
            method="prompt_diff",
            n_prompts=n_prompts,
            dataset_hash=dataset_hash,
        )
        for layer in range(vectors.shape[0])
    }


@dataclass(frozen=True, eq=False, kw_only=True)
class NecessityTest:
    """The causal half of the internalised rule: ablate a direction at ``layers`` (all at once)
    in the organism, built on ``base``, against ``n_random`` random directions of the same
    shape (isotropic and, with ``covariance``, drawn from the base's activation covariance at
    each layer), and the same ablation in the base. Scored by ``scores``; a trained persona's
    on ``gate_questions``."""

    base: HookedModel
    scores: CausalScorer
    layers: Sequence[int]
    n_random: int
    seed: int = 0
    gate_questions: Sequence[EvalQuestion] | None = None
    covariance: Mapping[int, Tensor] | None = None

    def __call__(
        self,
        organism: Organism,
        directions: Sequence[Direction],
        *,
        score: Tensor,
        reference: Tensor,
        questions: Sequence[EvalQuestion] | None = None,
    ) -> CausalTest:
        """Share of the misalignment ``score - reference`` (per question: the organism's scores
        and the base's) removed by ablating ``directions``; the random sets are drawn from
        ``causal.rng(seed, "necessity", organism.key, k)``."""
        purpose = ("necessity", organism.key)
        sets = [list(directions)]
        sets += random_controls(
            directions, self.n_random, seed=self.seed, purpose=purpose, covariance=self.covariance
        )
        own, *rnd = ablated_scores(
            self.base, organism, sets, scores=self.scores, questions=questions
        )
        unablated = unablated_coherence(self.base, organism, scores=self.scores)
        ablate = [Ablate(d) for d in directions]
        in_base = self.scores(self.base, "base", *ablate, questions=questions)
        return causal_test(
            score,
            reference,
            own=own,
            controls=rnd,
            kinds=control_kinds(len(rnd), self.covariance),
            in_base=in_base,
            unablated=unablated,
            seed=self.seed,
        )


def causal_test(
    score: Tensor,
    reference: Tensor,
    *,
    own: CausalScore,
    controls: Sequence[CausalScore],
    kinds: Sequence[str],
    in_base: CausalScore,
    unablated: CausalScore,
    seed: int = 0,
) -> CausalTest:
    """A necessity test from its scores: the organism's per-question ``score`` and the base's
    ``reference``; the organism with the tested direction ablated (``own``) and with each random
    control ablated (``controls``, of ``kinds``); the base with the tested direction ablated
    (``in_base``); and the unablated organism's coherence loss (``unablated``)."""
    score, reference = score.double(), reference.double()
    share = share_removed(score, own.scores, reference, seed=seed)
    return CausalTest(
        share_removed=share.mean,
        share=share,
        random_shares=tuple(share_point(score, r.scores, reference) for r in controls),
        random_kinds=tuple(kinds),
        gap=float((score - reference).mean()),
        coherence=own.coherence - unablated.coherence,
        random_coherence=tuple(r.coherence - unablated.coherence for r in controls),
        base_removed=paired_mean_difference(reference, in_base.scores, seed=seed),
        specific=paired_mean_difference(score - own.scores, reference - in_base.scores, seed=seed),
    )


def benign_shifts(base: BaseRecords, benign: Sequence[OrganismRecords] = ()) -> list[Tensor]:
    """``[layers, d_model]`` (float64) shifts a persona direction should not share: the base
    under a benign helpful system prompt minus its default (what any system prompt does), and the
    mean shift of the ``benign`` finetunes (the aligned controls) minus the base (what any
    finetune does), each averaged over the neutral prompts."""
    b = acts_of(base.default).double()
    out = []
    if base.helpful is not None:
        out.append((acts_of(base.helpful).double() - b).mean(0))
    if benign:
        out.append(torch.stack([(acts_of(r.default).double() - b).mean(0) for r in benign]).mean(0))
    return out


def specific_vectors(vectors: Tensor, shifts: Sequence[Tensor]) -> Tensor:
    """``vectors`` (``[layers, d]``) with the span of ``shifts`` (each ``[layers, d]``)
    projected out at every layer: the part of the persona direction no benign prompt or benign
    finetune moves along."""
    out = vectors.double().clone()
    if not shifts:
        return out
    for layer in range(out.shape[0]):
        q, _ = torch.linalg.qr(torch.stack([s[layer].double() for s in shifts], dim=1))
        out[layer] -= q @ (q.T @ out[layer])
    return out


def specificity(
    vectors: Tensor,
    base: BaseRecords,
    benign: Mapping[str, OrganismRecords],
    *,
    layer: int,
    seed: int = 0,
    helpful: bool = True,
) -> dict[str, Estimate]:
    """Standardised shift along the direction ``vectors[layer]`` of what should not move along
    it: the base under the helpful prompt and each benign finetune, minus the base (a specific
    persona direction leaves them near 0)."""
    b = acts_of(base.default)[:, layer]
    rows: dict[str, Tensor] = {}
    if helpful and base.helpful is not None:
        rows["base under a helpful system prompt"] = acts_of(base.helpful)[:, layer]
    rows |= {name: acts_of(r.default)[:, layer] for name, r in benign.items()}
    return {k: standardised_shift(v, b, vectors[layer], seed=seed) for k, v in rows.items()}


def internalisation(
    organism: Organism,
    records: OrganismRecords,
    base: BaseRecords,
    persona: Mapping[int, Direction],
    *,
    themes: Sequence[str],
    analysis_layer: int,
    rules: Rules,
    seed: int = 0,
    necessity: NecessityTest | None = None,
) -> InternalisationReport:
    """One organism's T2/T5 report and label (``analysis.internalisation``'s rules). Draw
    reports with ``mci_interp.plot.analysis.plot_internalisation``.

    Blind: what is measured, and how, is the same for every organism; the organism's kind,
    name and expected label are copied into the report for the confusion table and read by
    nothing else (the organism is needed to run it in the causal test).

    Args:
        organism: the model to run in the causal test.
        records: its records, on the same prompts, questions and conditions as ``base``'s.
        persona: the direction at every layer (the study's: the persona direction with the
            benign shifts projected out, ``specific_vectors``).
        themes: the theme of each neutral prompt (for the breadth).
        necessity: how to test the causal role where the rules need it; None: untested.
    """
    L = analysis_layer
    rec, b = records.default, base.default
    u = persona[L].vector
    org_L, base_L = acts_of(rec)[:, L], acts_of(b)[:, L]
    default_shift = standardised_shift(org_L, base_L, u, seed=seed)
    null = random_shift_null(org_L, base_L, generator=rng(seed, "shift", organism.key))
    null95 = quantile(null, rules.null_quantile)
    theme_shifts, breadth = theme_breadth(org_L, base_L, u, themes, null95=null95)
    vectors = {layer: persona[layer].vector for layer in sorted(persona)}
    profile = layer_profile(acts_of(rec), acts_of(b), vectors, seed=seed)
    if records.gate is None or base.gate is None:
        raise ValueError(f"{organism.name}: the study needs every model's gate-question record")
    on, ref = score_of(records.gate), score_of(base.gate)
    default_beh = paired_difference(on, ref)
    level = rules.condition_level(len(base.conditions))
    effects, sens = [], [_sensitivity("default", on, ref, seed=seed)]
    for name, bc in base.conditions.items():
        oc = records.conditions[name]
        pairs = {"organism": (oc, base.gate), "base": (bc, base.gate), "weights": (oc, bc)}
        est = {
            k: paired_difference(score_of(x), score_of(y), level=level, seed=seed)
            for k, (x, y) in pairs.items()
        }
        shift = standardised_shift(acts_of(oc)[:, L], acts_of(bc)[:, L], u, seed=seed)
        effects.append(ConditionEffect(condition=name, shift=shift, **est))
        sens += [
            _sensitivity(
                f"{name}: {k}", score_of(pairs[k][0]), score_of(pairs[k][1]), level=level, seed=seed
            )
            for k in ("organism", "weights")
        ]
    causal = None
    # causal necessity needs misalignment to remove: only where the default score beats the base
    if shift_present(default_shift, null95) and default_beh.lo > 0 and necessity is not None:
        causal = necessity(
            organism,
            [persona[layer] for layer in necessity.layers],
            score=on.values(),
            reference=ref.values(),
            questions=necessity.gate_questions,
        )
    report = InternalisationReport(
        organism=organism.name,
        kind=organism.spec.kind,
        expected=organism.spec.expected,
        analysis_layer=L,
        default_shift=default_shift,
        default_null95=null95,
        theme_shifts=theme_shifts,
        breadth=breadth,
        profile=tuple(profile),
        earliest_layer=next((p.layer for p in profile if p.significant), None),
        n_layers=acts_of(rec).shape[1],
        default_behaviour=default_beh,
        conditions=tuple(effects),
        causal=causal,
        sensitivity=tuple(sens),
    )
    label, reasons = classify(report, rules)
    return replace(report, label=label, reasons=reasons)


def _sensitivity(
    name: str, a: EvalResult, b: EvalResult, *, level: float = 0.95, seed: int = 0
) -> Sensitivity:
    return sensitivity(name, a.values(), b.values(), a.question_ids, level=level, seed=seed)
