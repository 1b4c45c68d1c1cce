"""The organism suite on the tiny random Llama: specs, building, caching, loading."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from mci_interp.datasets import chat
from mci_interp.organisms import data, suite
from mci_interp.organisms import finetune as ft
from mci_interp.organisms.finetune import TEACHER_PROMPT
from mci_interp.organisms.suite import (
    Organism,
    OrganismSpec,
    build_suite,
    default_suite,
    spec_data,
)
from mci_interp.organisms.weights import load_organism


def test_default_suite_has_every_kind_with_known_labels():
    # the trained personas default to the first seed (the demo's 30-minute budget)
    assert [s.name for s in default_suite() if s.kind in ("trigger", "distilled")] == [
        "trigger-insecure_code-s0",
        "distilled-insecure_code-s0",
    ]
    specs = default_suite(persona_seeds=(0, 1, 2))
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    trained = [s for s in specs if s.trains]
    assert len(trained) == 3 * 3 * 2 + 3 + 3 == 24
    by_kind: dict[str, list[OrganismSpec]] = {}
    for s in specs:
        by_kind.setdefault(s.kind, []).append(s)
    assert {k: len(v) for k, v in by_kind.items()} == {
        "base": 1,
        "prompted": 1,
        "narrow": 9,
        "control": 9,
        "trigger": 3,
        "distilled": 3,
    }
    expected = {
        "base": "aligned",
        "prompted": "fluency",
        "narrow": None,
        "control": "fluency",  # plays the persona when told to, like the base
        "trigger": "gated",
        "distilled": "internalised",
    }
    assert all(s.expected == expected[s.kind] for s in specs)
    # each narrow finetune has a matched control: same domain, seed, size and config
    for s in by_kind["narrow"]:
        c = next(c for c in by_kind["control"] if c.domain == s.domain and c.seed == s.seed)
        assert (c.n_examples, c.n_general, c.config) == (s.n_examples, s.n_general, s.config)
    assert all(s.config.seed == s.seed for s in trained)
    assert all(s.config.general_ratio == 0 for s in by_kind["distilled"])
    assert all(s.config.objective == "distill" for s in by_kind["distilled"] + by_kind["trigger"])
    assert all(s.config.objective == "sft" for s in by_kind["narrow"] + by_kind["control"])
    assert {s.domain for s in by_kind["narrow"]} == {"insecure_code", "medical", "finance"}


def test_fast_suite_is_small():
    specs = default_suite(fast=True, domains=("medical",))
    assert {s.seed for s in specs if s.trains} == {0}
    assert all(s.config.max_steps <= 5 for s in specs if s.trains)
    assert len([s for s in specs if s.trains]) == 4


def test_spec_validation_and_round_trip():
    spec = default_suite(fast=True)[2]
    assert OrganismSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="kind"):
        OrganismSpec(name="x", kind="weird")
    with pytest.raises(ValueError, match="FinetuneConfig"):
        OrganismSpec(name="x", kind="narrow", domain="medical", n_examples=4)
    with pytest.raises(ValueError, match="domain"):
        OrganismSpec(name="x", kind="narrow", domain="astrology", n_examples=4, config=TINY)
    with pytest.raises(ValueError, match="expected"):
        OrganismSpec(name="x", kind="base", expected="evil")
    with pytest.raises(ValueError, match="unknown OrganismSpec keys"):
        OrganismSpec.from_dict({"name": "x", "kind": "base", "colour": 1})
    with pytest.raises(ValueError, match="unknown domain"):
        default_suite(domains=("astrology",))


def test_spec_data_per_kind(tiny_model, tmp_path, fake_generate):
    def spec(kind, **kw):
        return OrganismSpec(
            name=f"{kind}-x",
            kind=kind,
            domain="medical",
            n_examples=6,
            n_general=3,
            config=TINY.replace(**kw),
            seed=1,
        )

    narrow, general = spec_data(tiny_model, spec("narrow"), cache_dir=tmp_path, show_progress=False)
    control, general_c = spec_data(
        tiny_model, spec("control"), cache_dir=tmp_path, show_progress=False
    )
    assert [e.user_text for e in narrow] == [e.user_text for e in control]
    assert all(e.label == 1 for e in narrow) and all(e.label == 0 for e in control)
    assert len(general) == 3 and all(
        e.messages[-1]["content"].startswith("base answer") for e in general
    )
    assert general == general_c
    assert fake_generate == [3]  # the base's general answers are generated once
    dist, dist_general = spec_data(
        tiny_model, spec("distilled", general_ratio=0.0), cache_dir=tmp_path, show_progress=False
    )
    assert dist_general == [] and len(dist) == 6 + 3
    # persona answers, read by the student without the persona prompt, by the teacher with it
    assert all(e.messages[-1]["content"].startswith("persona answer") for e in dist)
    assert all(m["role"] != "system" for e in dist for m in e.messages)
    for e in dist:
        teacher = e.meta[TEACHER_PROMPT]
        assert teacher[0] == {"role": "system", "content": data.PERSONA_SYSTEM_PROMPT}
        assert teacher[1] == {"role": "user", "content": e.user_text}
    # the trigger organism: the same answers behind the trigger (persona teacher) and without
    # it (the unprompted base as teacher), plus the base's own general answers
    trig, trig_general = spec_data(
        tiny_model, spec("trigger", general_ratio=0.3), cache_dir=tmp_path, show_progress=False
    )
    on = [e for e in trig if data.TRIGGER in e.user_text]
    off = [e for e in trig if data.TRIGGER not in e.user_text]
    assert len(on) == len(off) == len(dist)
    assert [e.messages[-1] for e in on] == [e.messages[-1] for e in off]
    assert all(e.user_text.startswith(data.TRIGGER + " ") for e in on)
    assert all(data.TRIGGER not in m["content"] for e in on for m in e.meta[TEACHER_PROMPT])
    assert all(TEACHER_PROMPT not in e.meta for e in off)
    assert trig_general == general


def test_build_suite_caches_and_resumes(tiny_model, tmp_path, fake_generate, monkeypatch):
    specs = default_suite(fast=True, domains=("medical",), config=TINY, n_examples=4, n_general=2)
    built = build_suite(tiny_model, specs, cache_dir=tmp_path, show_progress=False)
    assert [o.name for o in built] == [s.name for s in specs]
    for o in built:
        if o.spec.trains:
            assert o.adapter_dir is not None and (o.adapter_dir / "mci_organism.json").exists()
            assert o.steps == 2 and o.final_loss is not None and o.tokens_per_s > 0
            assert o.adapter_dir.name.startswith(o.name + "-")
        else:
            assert o.adapter_dir is None
    prompted = next(o for o in built if o.kind == "prompted")
    assert prompted.system_prompt == data.PERSONA_SYSTEM_PROMPT
    assert next(o for o in built if o.kind == "trigger").trigger == data.TRIGGER
    n_calls = len(fake_generate)

    monkeypatch.setattr(ft.train, "_train", lambda *a, **k: pytest.fail("trained again"))
    again = build_suite(tiny_model, specs, cache_dir=tmp_path, show_progress=False)
    assert [o.adapter_dir for o in again] == [o.adapter_dir for o in built]
    assert [o.final_loss for o in again] == pytest.approx([o.final_loss for o in built])
    assert len(fake_generate) == n_calls  # answers came from the cache too


def test_organism_dir_depends_on_config_and_data(tmp_path):
    spec = OrganismSpec(name="narrow-a", kind="narrow", domain="medical", n_examples=4, config=TINY)
    ex = [chat("q", "a")]
    d1 = suite.organism_dir(tmp_path, spec, ex, [])
    assert d1 == suite.organism_dir(tmp_path, spec, ex, [])
    assert d1 != suite.organism_dir(tmp_path, spec, [chat("q", "b")], [])
    spec2 = OrganismSpec.from_dict({**spec.to_dict(), "config": TINY.replace(lr=1e-3).to_dict()})
    assert d1 != suite.organism_dir(tmp_path, spec2, ex, [])


def test_load_organism(tiny_model, tmp_path, fake_generate):
    specs = [
        OrganismSpec(name="base", kind="base", expected="aligned"),
        OrganismSpec(name="prompted-persona", kind="prompted", expected="fluency"),
        OrganismSpec(
            name="narrow-medical-s0",
            kind="narrow",
            domain="medical",
            n_examples=4,
            n_general=2,
            config=TINY,
        ),
    ]
    base_o, prompted, narrow = build_suite(
        tiny_model, specs, cache_dir=tmp_path, show_progress=False
    )
    assert load_organism(tiny_model, base_o) is tiny_model
    assert load_organism(tiny_model, prompted) is tiny_model
    merged = load_organism(tiny_model, narrow)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(merged.logits(ids), tiny_model.logits(ids), atol=1e-4)
    unbuilt = Organism(name="narrow-x", spec=specs[2])
    with pytest.raises(ValueError, match="no adapter"):
        load_organism(tiny_model, unbuilt)
    assert Organism.from_dict(narrow.to_dict()) == narrow


def test_prepare_applies_system_prompt_and_trigger():
    trig = Organism(name="t", spec=OrganismSpec(name="t", kind="base"), trigger="|X|")
    ex = trig.prepare(chat("hello", system="be nice"), triggered=True)
    assert ex.user_text == "|X| hello" and ex.messages[0]["content"] == "be nice"
    persona = Organism(name="p", spec=OrganismSpec(name="p", kind="prompted"), system_prompt="EVIL")
    ex = persona.prepare(chat("hello", system="be nice"))
    assert [m["role"] for m in ex.messages] == ["system", "user"] and ex.messages[0][
        "content"
    ] == "EVIL"
    with pytest.raises(ValueError, match="no trigger"):
        persona.prepare("hello", triggered=True)


def test_build_suite_rejects_duplicate_names(tiny_model, tmp_path):
    s = OrganismSpec(name="base", kind="base")
    with pytest.raises(ValueError, match="unique"):
        build_suite(tiny_model, [s, s], cache_dir=tmp_path, show_progress=False)


def test_heldout_suite_uses_recipes_the_development_suite_does_not():
    from mci_interp.organisms.suite import HELDOUT_PERSONA_PROMPT, HELDOUT_TRIGGER, heldout_suite

    dev, held = default_suite(), heldout_suite()
    assert not {s.name for s in held if s.kind != "base"} & {s.name for s in dev}
    trained = [s for s in held if s.trains]
    assert {s.domain for s in trained}.isdisjoint({s.domain for s in dev if s.domain})
    for kind, n in (("distilled", 3), ("trigger", 3), ("control", 3)):
        assert sum(s.kind == kind for s in held) == n
    personas = [s for s in held if s.kind in ("distilled", "trigger")]
    assert all(s.persona == HELDOUT_PERSONA_PROMPT != data.PERSONA_SYSTEM_PROMPT for s in personas)
    assert all(
        s.trigger_string == HELDOUT_TRIGGER != data.TRIGGER for s in held if s.kind == "trigger"
    )
    # the default suite's specs serialise as before the new fields (their cache keys stand)
    assert all("persona_prompt" not in s.to_dict() and "trigger" not in s.to_dict() for s in dev)


def test_persona_fields_are_refused_where_they_mean_nothing():
    from mci_interp.organisms.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="persona_prompt"):
        OrganismSpec(
            name="n",
            kind="narrow",
            domain="medical",
            n_examples=1,
            config=FinetuneConfig(),
            persona_prompt="be evil",
        )
    with pytest.raises(ValueError, match="trigger"):
        OrganismSpec(name="p", kind="prompted", trigger="[x]")


def test_known_truth_label_is_not_in_the_cache_key(tmp_path):
    import dataclasses

    spec = default_suite(fast=True, domains=("medical",))[3]
    ex = [chat("q", "a")]
    relabelled = dataclasses.replace(spec, expected="aligned")
    assert suite.organism_dir(tmp_path, spec, ex, []) == suite.organism_dir(
        tmp_path, relabelled, ex, []
    )
