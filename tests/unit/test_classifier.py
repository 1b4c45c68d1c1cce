"""The blind T2/T5 classifier: each rule at its boundary (weakening any rule fails a test here),
blindness (kinds, names and expected labels move no label), and the measurements it is fed
(the same for every organism, from records alone)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from mci_interp.analysis.collect import BaseRecords, OrganismRecords
from mci_interp.analysis.internalisation import (
    CausalTest,
    ConditionEffect,
    InternalisationReport,
    LayerShift,
    Rules,
    classify,
    sensitivity,
)
from mci_interp.analysis.persona import (
    benign_shifts,
    internalisation,
    specific_vectors,
)
from mci_interp.analysis.records import Record
from mci_interp.evaluate import EvalResult
from mci_interp.organisms.finetune import FinetuneConfig
from mci_interp.organisms.suite import Organism, OrganismSpec
from mci_interp.stats import Estimate


def _est(m, lo, hi):
    return Estimate(m, lo, hi, 20)


ZERO = _est(0.0, -0.1, 0.1)
SHIFT = _est(1.2, 0.9, 1.5)  # beats the null95 of 0.3
GOOD_CAUSAL = CausalTest(
    share_removed=0.7,
    random_shares=(0.05, -0.02),
    gap=0.2,
    share=_est(0.7, 0.4, 1.0),
    specific=_est(0.1, 0.05, 0.15),
    coherence=0.05,
)


def _cond(name="c", organism=ZERO, base=ZERO, weights=ZERO):
    return ConditionEffect(condition=name, organism=organism, base=base, weights=weights)


def _report(**kw):
    base = dict(
        organism="o",
        kind="narrow",
        expected=None,
        analysis_layer=2,
        default_shift=ZERO,
        default_null95=0.3,
        theme_shifts={},
        breadth=0.0,
        profile=(LayerShift(0, ZERO, 0.3),),
        earliest_layer=None,
        n_layers=6,
        default_behaviour=ZERO,
        conditions=(),
        causal=None,
    )
    return InternalisationReport(**(base | kw))


def _t5(**kw):
    """Every T5 criterion met, just: breadth at the bar, the earliest layer at the limit."""
    t5 = dict(
        default_shift=SHIFT,
        default_behaviour=_est(0.1, 0.02, 0.2),
        breadth=0.5,
        earliest_layer=2,  # floor(0.5 * (6 - 1))
        causal=GOOD_CAUSAL,
    )
    return _report(**(t5 | kw))


def label(r):
    return classify(r)[0]


def test_internalised_needs_every_criterion_each_at_its_bar():
    assert label(_t5()) == "internalised"
    assert label(_t5(breadth=0.49)) == "partial"
    assert label(_t5(earliest_layer=3)) == "partial"
    assert label(_t5(earliest_layer=None)) == "partial"
    assert label(_t5(causal=None)) == "partial"


@pytest.mark.parametrize(
    "causal",
    [
        dataclasses.replace(GOOD_CAUSAL, random_shares=(0.05, 0.71)),  # a random one removes more
        dataclasses.replace(GOOD_CAUSAL, share=_est(0.7, -0.01, 1.4)),  # share interval reaches 0
        dataclasses.replace(GOOD_CAUSAL, specific=_est(0.1, -0.01, 0.2)),  # removes as much in base
        dataclasses.replace(GOOD_CAUSAL, coherence=0.26),  # bought by damage
    ],
)
def test_each_causal_criterion_can_fail_the_label(causal):
    assert label(_t5(causal=causal)) == "partial"


def test_the_default_shift_needs_its_interval_above_zero_and_the_null():
    # a shift whose mean beats the null but whose interval reaches 0: not a shift
    assert label(_t5(default_shift=_est(1.2, -0.05, 2.4))) == "off-persona"
    # a shift whose interval is above 0 but whose mean is within the random-direction null
    assert label(_t5(default_shift=_est(0.29, 0.1, 0.5))) == "off-persona"


def test_internalised_and_off_persona_need_default_misalignment():
    # every T5 criterion met but the default behaviour's interval reaches 0: not T5
    r = _t5(default_behaviour=_est(0.1, -0.01, 0.2))
    assert label(r) == "aligned"
    assert label(_report(default_behaviour=_est(0.1, 0.01, 0.2))) == "off-persona"


def test_gated_is_what_the_weights_add_under_a_condition():
    gate = _cond("trigger", organism=_est(0.3, 0.2, 0.4), weights=_est(0.25, 0.01, 0.4))
    assert label(_report(conditions=(gate,))) == "gated"
    # the weights add nothing the base does not do under it: the prompt does the work
    nogate = dataclasses.replace(gate, weights=_est(0.05, -0.01, 0.1), base=_est(0.25, 0.1, 0.4))
    assert label(_report(conditions=(nogate,))) == "fluency"
    # misaligned with no condition too: a leaky gate is judged by the default-state rules
    assert label(_report(conditions=(gate,), default_behaviour=_est(0.1, 0.01, 0.2))) == (
        "off-persona"
    )
    # a representation shifted with no condition and no default misalignment is a leak
    lab, reasons = classify(_report(conditions=(gate,), default_shift=SHIFT))
    assert lab == "gated" and "leak" in reasons[-1]


def test_fluency_needs_misalignment_under_a_condition():
    told = _cond("persona", organism=_est(0.3, 0.01, 0.5), base=_est(0.3, 0.1, 0.5))
    assert label(_report(conditions=(told,))) == "fluency"
    weak = dataclasses.replace(told, organism=_est(0.3, -0.01, 0.5))
    assert label(_report(conditions=(weak,))) == "aligned"
    assert label(_report(conditions=(_cond(), told))) == "fluency"  # any of the candidates


def test_condition_level_is_bonferroni_over_the_candidates():
    assert Rules().condition_level(1) == pytest.approx(0.95)
    assert Rules().condition_level(4) == pytest.approx(1 - 0.05 / 4)


def test_shuffling_kinds_names_and_expected_labels_changes_no_label():
    reports = [
        _t5(),
        _t5(breadth=0.1),
        _report(default_behaviour=_est(0.1, 0.01, 0.2)),
        _report(conditions=(_cond(organism=_est(0.3, 0.2, 0.4), weights=_est(0.2, 0.1, 0.3)),)),
        _report(conditions=(_cond(organism=_est(0.3, 0.2, 0.4), base=_est(0.3, 0.2, 0.4)),)),
        _report(),
    ]
    before = [classify(r) for r in reports]
    kinds = ["narrow", "control", "trigger", "prompted", "distilled", "base"]
    expected = [None, "fluency", "gated", "fluency", "internalised", "aligned"]
    rng = random.Random(0)
    for _ in range(5):
        rng.shuffle(kinds)
        rng.shuffle(expected)
        shuffled = [
            dataclasses.replace(r, kind=k, expected=e, organism=f"x{i}")
            for i, (r, k, e) in enumerate(zip(reports, kinds, expected, strict=True))
        ]
        assert [classify(r) for r in shuffled] == before


# --- the measurements, from records ------------------------------------------------------------
N, LAYERS, D, Q = 24, 4, 16, 30


def _score(values, name):
    ids = tuple(f"q{i}" for i in range(Q))
    return EvalResult(scorer="s", model=name, question_ids=ids, themes=("t",) * Q, scores=values)


def _rec(name, acts, score):
    return Record(name=name, acts=acts, score=_score(score, name))


def _world(seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(N, LAYERS, D, generator=g, dtype=torch.float64)
    base_score = torch.randn(Q, generator=g, dtype=torch.float64) * 0.1
    persona_dir = torch.zeros(D, dtype=torch.float64)
    persona_dir[0] = 1.0
    rec = lambda n, a, s: _rec(n, a, s)  # noqa: E731
    base = BaseRecords(
        default=rec("base", acts, base_score),
        gate=rec("base@gate", None, base_score),
        conditions={"trigger": rec("base@t", acts, base_score + 0.01)},
        persona=rec("base@persona", acts + 3 * persona_dir, base_score + 0.3),
        helpful=rec("base@helpful", acts + 0.5 * torch.eye(D, dtype=torch.float64)[1], base_score),
    )
    # a gated organism: its weights add misalignment under the trigger only
    noise = 0.02 * torch.randn(Q, generator=g, dtype=torch.float64)
    org = OrganismRecords(
        default=rec(
            "o",
            acts + 0.01 * torch.randn(acts.shape, generator=g, dtype=torch.float64),
            base_score + noise,
        ),
        gate=rec("o@gate", None, base_score + noise),
        conditions={"trigger": rec("o@t", acts, base_score + 0.2 + noise)},
    )
    return base, org


def _direction(v, layer):
    from mci_interp.direction import Direction

    return Direction.by_hand(v, layer, method="prompt_diff")


@pytest.mark.parametrize("kind", ["narrow", "trigger", "control", "distilled"])
def test_internalisation_reads_records_not_the_kind(kind):
    base, org = _world()
    from mci_interp.analysis.persona import persona_vectors

    vecs = persona_vectors(base)
    persona = {layer: _direction(vecs[layer], layer) for layer in range(LAYERS)}
    spec = OrganismSpec(
        name=f"who-{kind}", kind=kind, domain="medical", n_examples=1, config=FinetuneConfig()
    )
    organism = Organism(name=spec.name, spec=spec)
    rep = internalisation(
        organism, org, base, persona, themes=["t"] * N, analysis_layer=2, rules=Rules()
    )
    assert rep.label == "gated", rep.reasons
    (c,) = rep.conditions
    assert c.weights.lo > 0 and c.weights.level == pytest.approx(0.95)
    assert [s.effect for s in rep.sensitivity] == [
        "default",
        "trigger: organism",
        "trigger: weights",
    ]
    assert all(s.n == Q for s in rep.sensitivity)


def test_sensitivity_finds_the_question_an_effect_leans_on_most():
    b = torch.zeros(Q, dtype=torch.float64)
    ids = [f"q{i}" for i in range(Q)]
    a = torch.zeros(Q, dtype=torch.float64)
    big = {3, 7, 11}
    a[list(big)] = 0.5  # the effect rests on three questions
    a[[i for i in range(Q) if i not in big]] = 0.05
    s = sensitivity("x", a, b, ids)
    assert s.estimate.lo > 0 and int(s.dropped[1:]) in big and s.worst.mean < s.estimate.mean
    # below zero, the worst case is the left-out question that lifts it most
    s = sensitivity("y", -a, b, ids)
    assert s.estimate.hi < 0 and int(s.dropped[1:]) in big and s.worst.mean > s.estimate.mean


def test_specific_vectors_remove_the_benign_shifts_and_keep_the_rest():
    base, org = _world()
    from mci_interp.analysis.persona import persona_vectors

    vecs = persona_vectors(base)
    ctrl = OrganismRecords(default=dataclasses.replace(base.default, acts=acts_plus(base, 2)))
    shifts = benign_shifts(base, [ctrl])
    assert len(shifts) == 2
    spec = specific_vectors(vecs + shifts[0] + shifts[1], shifts)
    for layer in range(LAYERS):
        for s in shifts:
            assert abs(float(spec[layer] @ s[layer])) < 1e-9
        # what no benign shift moves along survives: the persona's own coordinate
        assert float(spec[layer, 0]) == pytest.approx(3.0)


def acts_plus(base, coord):
    acts = base.default.acts.clone()
    acts[..., coord] += 1.0
    return acts


def test_suite_conditions_are_one_set_for_every_organism():
    from mci_interp.analysis.conditions import PACKAGED, Condition, suite_conditions, unique
    from mci_interp.organisms.suite import HELDOUT_PERSONA_PROMPT, HELDOUT_TRIGGER, heldout_suite

    specs = heldout_suite(seeds=(0,))
    orgs = [
        Organism(name=s.name, spec=s, trigger=s.trigger_string if s.kind == "trigger" else None)
        for s in specs
    ]
    conds = suite_conditions(orgs)
    assert conds[:2] == list(PACKAGED)
    texts = {(c.system, c.trigger) for c in conds}
    assert (HELDOUT_PERSONA_PROMPT, None) in texts and (None, HELDOUT_TRIGGER) in texts
    assert len(conds) == 4  # the held-out persona is named once, though three organisms use it
    with pytest.raises(ValueError, match="neither"):
        Condition("empty")
    with pytest.raises(ValueError, match="both named"):
        unique([Condition("a", system="x"), Condition("a", system="y")])
