"""The internalisation step: the base's persona direction, and each organism's T2/T5 report
along it.

The persona direction is the base's mean activation under the persona system prompt minus its
default, per layer, on the neutral prompts. An organism's report holds its default shift along
it (against random directions), the shift's breadth over prompt themes and its profile over
layers, its behaviour with and without its condition, and, where the rules need it, the causal
test; the label comes from ``analysis.internalisation.classify``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

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
from mci_interp.analysis.collect import GATE_KINDS, BaseRecords, OrganismRecords
from mci_interp.analysis.config import neutral_direction
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
from mci_interp.analysis.records import acts_of, score_of
from mci_interp.datasets import EvalQuestion
from mci_interp.direction import Direction
from mci_interp.evaluate import paired_difference
from mci_interp.intervene import Ablate
from mci_interp.models import HookedModel
from mci_interp.organisms.suite import Organism
from mci_interp.stats import paired_mean_difference, quantile


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

    Args:
        organism: its kind, domain and expected label (the label is not read by the rules).
        records: its records, on the same prompts and questions as ``base``'s.
        persona: the persona direction at every layer.
        themes: the theme of each neutral prompt (for the breadth).
        necessity: how to test the causal role where the rules need it; None: untested.
    """
    kind, L = organism.spec.kind, analysis_layer
    rec, b = records.default, base.default
    u = persona[L].vector
    org_L, base_L = acts_of(rec)[:, L], acts_of(b)[:, L]
    default_shift = standardised_shift(org_L, base_L, u, seed=seed)
    null = random_shift_null(org_L, base_L, generator=rng(seed, "shift", organism.key))
    null95 = quantile(null, rules.null_quantile)
    theme_shifts, breadth = theme_breadth(org_L, base_L, u, themes, null95=null95)
    vectors = {layer: persona[layer].vector for layer in sorted(persona)}
    profile = layer_profile(acts_of(rec), acts_of(b), vectors, seed=seed)
    default_beh = paired_difference(score_of(rec), score_of(b))
    cond_shift = cond_beh = base_eff = None
    condition_kind = None
    if kind == "prompted":
        condition_kind = "system prompt"
        c = records.conditioned
        cond_shift = standardised_shift(acts_of(c)[:, L], base_L, u)
        cond_beh = paired_difference(score_of(c), score_of(b))
        base_eff = cond_beh  # the organism's weights are the base's: the base follows the prompt
    elif kind == "trigger":
        condition_kind = "trigger"
        c, bt = records.conditioned, base.trigger
        # the gate is what the weights add under the trigger: compare with the base reading the
        # same trigger (the string alone moves the base's score too); all three behaviours on the
        # gate questions, with and without the trigger
        cond_shift = standardised_shift(acts_of(c)[:, L], acts_of(bt)[:, L], u)
        cond_beh = paired_difference(score_of(c), score_of(bt))
        base_eff = paired_difference(score_of(bt), score_of(base.gate))
    if kind in GATE_KINDS:  # a trained persona's default behaviour: on the gate questions
        default_beh = paired_difference(score_of(records.gate), score_of(base.gate))
    elif kind in ("narrow", "control") and organism.spec.domain in base.indomain:
        condition_kind = "domain"
        base_in = base.indomain[organism.spec.domain]
        cond_beh = paired_difference(score_of(rec, indomain=True), score_of(base_in, indomain=True))
    causal = None
    shift_present = default_shift.lo > 0 and default_shift.mean > null95
    # causal necessity needs misalignment to remove: only where the default score beats the base
    testable = shift_present and default_beh.lo > 0 and kind not in ("prompted", "base")
    if testable and necessity is not None:
        dirs = [persona[layer] for layer in necessity.layers]
        if kind in GATE_KINDS:  # measured on the gate questions: removed there too
            on, ref, qs = records.gate, base.gate, necessity.gate_questions
        else:
            on, ref, qs = rec, b, None
        causal = necessity(
            organism,
            dirs,
            score=score_of(on).values(),
            reference=score_of(ref).values(),
            questions=qs,
        )
    report = InternalisationReport(
        organism=organism.name,
        kind=kind,
        expected=organism.spec.expected,
        analysis_layer=L,
        default_shift=default_shift,
        default_null95=null95,
        conditioned_shift=cond_shift,
        theme_shifts=theme_shifts,
        breadth=breadth,
        profile=tuple(profile),
        earliest_layer=next((p.layer for p in profile if p.significant), None),
        n_layers=acts_of(rec).shape[1],
        default_behaviour=default_beh,
        conditioned_behaviour=cond_beh,
        base_condition_effect=base_eff,
        condition_kind=condition_kind,
        causal=causal,
    )
    label, reasons = classify(report, rules)
    return replace(report, label=label, reasons=reasons)
