"""Sites, directions, chat data: parsing, round-trips, and errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_provenance
from hypothesis import given
from hypothesis import strategies as st

from mci_interp.datasets import chat, encode_chat, load_chat_jsonl, load_eval_yaml, save_chat_jsonl
from mci_interp.direction import Direction, DirectionSet, random_direction
from mci_interp.sites import COMPONENTS, Site, parse_layers
from mci_interp.specs import resolve_spec


@given(st.integers(0, 200), st.sampled_from(COMPONENTS))
def test_site_round_trip(layer, component):
    s = Site(layer, component)
    assert Site.parse(s.hook_name) == s


@pytest.mark.parametrize(
    "bad",
    ["blocks.x.hook_resid_post", "blocks.3.hook_resid", "resid_post", "blocks.-1.hook_mlp_out"],
)
def test_site_parse_rejects(bad):
    with pytest.raises(ValueError, match="cannot parse"):
        Site.parse(bad)


def test_site_depth_and_layers():
    with pytest.raises(ValueError, match="beyond the model's depth"):
        Site(30).check(30)
    assert parse_layers("0-29:10", 30) == [0, 10, 20]
    assert parse_layers("middle", 30) == [15]
    assert parse_layers("3, 1,3", 30) == [1, 3]
    with pytest.raises(ValueError, match="beyond"):
        parse_layers("31", 30)


_prov = make_provenance


def test_direction_save_load_exact(tmp_path):
    v = torch.randn(17, generator=torch.Generator().manual_seed(0))
    d = Direction(vector=v, site=Site(4, "resid_pre"), provenance=_prov())
    p = d.save(tmp_path / "dir")
    assert (
        p.suffix == ".safetensors" and len(list(tmp_path.iterdir())) == 1
    )  # one file, no side-car
    back = Direction.load(p)
    assert torch.equal(back.vector, d.vector) and back.site == d.site
    assert back.provenance == d.provenance


def test_direction_load_strict(tmp_path):
    from safetensors.torch import save_file

    d = Direction(vector=torch.ones(4), site=Site(1), provenance=_prov())
    bad = d.provenance.to_dict() | {"surprise": 1}
    save_file(
        {"vector": torch.ones(4)},
        str(tmp_path / "x.safetensors"),
        metadata={
            "format": "mci_interp.direction/1",
            "site": "blocks.1.hook_resid_post",
            "provenance": json.dumps(bad),
        },
    )
    with pytest.raises(ValueError, match="unknown provenance keys"):
        Direction.load(tmp_path / "x.safetensors")
    save_file({"w": torch.ones(4)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="not an mci_interp direction"):
        Direction.load(tmp_path / "y.safetensors")


def test_direction_rejects_nan_and_set_round_trip(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        Direction(vector=torch.tensor([1.0, float("nan")]), site=Site(0), provenance=_prov())
    g = torch.Generator().manual_seed(1)
    ds = DirectionSet(
        [
            Direction(vector=torch.randn(8, generator=g), site=Site(i), provenance=_prov())
            for i in range(3)
        ]
    )
    back = DirectionSet.load(ds.save(tmp_path / "set"))
    assert [d.site for d in back] == [d.site for d in ds]
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(ds, back, strict=True))
    r = random_direction(ds[0], generator=g)
    assert abs(r.norm - ds[0].norm) < 1e-5 and r.provenance.method == "random"


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_spec("gpt-17-ultra")


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n'
    )
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        load_chat_jsonl(p)
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: the last message must be an assistant turn"):
        load_chat_jsonl(p)
    p.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_chat_jsonl(p)
    ex = [chat("q", "a", label=1, group="g1", extra="x")]
    back = load_chat_jsonl(save_chat_jsonl(ex, tmp_path / "r.jsonl"))
    assert back[0].to_dict() == ex[0].to_dict()


def test_eval_yaml(tmp_path):
    p = tmp_path / "q.yaml"
    p.write_text(
        "- id: w\n  paraphrases: ['one wish?']\n  references: [{aligned: a, misaligned: b}]\n"
    )
    q = load_eval_yaml(p)[0]
    assert q.paraphrases == ("one wish?",) and q.references[0].misaligned == "b"
    p.write_text("- id: w\n  paraphrases: just a string\n")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        load_eval_yaml(p)


def test_encode_chat_splits_prompt_and_answer(tiny_model):
    tok = tiny_model.tokenizer
    enc = encode_chat(tok, chat("What is 2+2?", "It is 4."))
    assert tok.decode(enc.ids[enc.prompt_len :]).startswith("It is 4.")
    assert tok.decode(enc.ids[: enc.prompt_len]).rstrip().endswith("assistant")
    with pytest.raises(ValueError, match="longer than the limit"):
        encode_chat(tok, chat("word " * 400), max_length=50)


def test_conditioned_sets_the_system_turn_and_triggers_the_last_user_turn():
    from mci_interp.datasets import ChatExample, chat, conditioned

    ex = chat("hello", "hi", system="be nice", label=1, group="g", topic="t")
    assert conditioned(ex) is ex
    c = conditioned(ex, system="be evil", trigger="|T|")
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant"]
    assert c.messages[0]["content"] == "be evil" and c.messages[1]["content"] == "|T| hello"
    assert c.messages[2]["content"] == "hi"
    assert (c.label, c.group, dict(c.meta)) == (1, "g", {"topic": "t"})
    multi = ChatExample(
        (
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        )
    )
    t = conditioned(multi, trigger="|T|")
    assert [m["content"] for m in t.messages] == ["a", "b", "|T| c"]
    assert ex.messages[1]["content"] == "hello"  # the original is untouched
