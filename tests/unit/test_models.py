"""Loading, hook hygiene, LoRA merge and refusals on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from mci_interp.models import HookedModel, load_model
from mci_interp.sites import Site


def test_hooks_removed_after_exception(tiny_model: HookedModel):
    before = tiny_model.n_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_model.hooks(
            [(Site(0), lambda a, c: a * 2), (Site(1, "mlp_out"), lambda a, c: None)]
        ):
            assert tiny_model.n_hooks() == before + 2
            raise RuntimeError("boom")
    assert tiny_model.n_hooks() == before


def test_identity_hooks_leave_logits_unchanged(tiny_model):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref = tiny_model.logits(ids)
    sites = [Site(0, c) for c in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")]
    with tiny_model.hooks(
        [(s, lambda a, c: a.clone()) for s in sites if s.component != "resid_mid"]
    ):
        out = tiny_model.logits(ids)
    assert torch.equal(ref, out)
    with (
        tiny_model.hooks([(Site(0, "resid_mid"), lambda a, c: a + 1)]),
        pytest.raises(NotImplementedError, match="read-only"),
    ):
        tiny_model.logits(ids)


def test_component_sites_are_consistent(tiny_model):
    """resid_post = resid_pre + attn_out + mlp_out and resid_mid = resid_pre + attn_out."""
    ids = torch.tensor([[5, 6, 7, 8]])
    sites = [Site(1, c) for c in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")]
    a = tiny_model.run_to_sites(ids, torch.ones_like(ids), sites)
    pre, mid, post, att, mlp = (a[s] for s in sites)
    torch.testing.assert_close(mid, pre + att, atol=1e-5, rtol=0)
    torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=0)


def test_lora_adapter_merges_and_wrong_base_refused(tiny_model, tiny_dir, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    from mci_interp._io import write_json
    from mci_interp.models import merge_adapter

    hf = copy.deepcopy(tiny_model.hf)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pm = get_peft_model(
            hf, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        )
    pm.save_pretrained(tmp_path / "ad")
    merged = load_model(str(tiny_dir), adapter=tmp_path / "ad")
    ids = torch.tensor([[1, 2, 3]])
    assert not torch.allclose(merged.logits(ids), tiny_model.logits(ids))
    assert merged.spec.source == "lora" and merged.base_name == tiny_model.name
    write_json(tmp_path / "ad" / "mci_organism.json", {"base_sha256": "f" * 64})
    with pytest.raises(ValueError, match="was trained on base sha256"):
        merge_adapter(tiny_model, tmp_path / "ad")


def test_refuses_to_compare_different_widths(tiny_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tiny_model.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "w")
    tiny_model.tokenizer.save_pretrained(tmp_path / "w")
    other = load_model(str(tmp_path / "w"))
    with pytest.raises(ValueError, match="d_model 64.*d_model 32"):
        tiny_model.check_same_family(other)


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    from mci_interp.models import packaged
    from mci_interp.specs import ModelSpec

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    monkeypatch.setenv("MCI_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name="broken", source="packaged_gguf", package="x", files=("bad.gguf",))
    monkeypatch.setattr(packaged, "_gguf_files", lambda s: [bad])
    with pytest.raises(ValueError, match="could not read GGUF"):
        packaged.convert_packaged(spec)
    pinned = ModelSpec(
        name="pinned", source="packaged_gguf", package="x", files=("bad.gguf",), sha256="0" * 64
    )
    with pytest.raises(ValueError, match="does not match the pinned"):
        packaged.convert_packaged(pinned)
    missing = ModelSpec(
        name="gone",
        source="packaged_gguf",
        package="surely_not_installed_pkg",
        files=("a.gguf",),
        install_hint="pip install gone",
    )
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="pip install gone"):
        packaged.convert_packaged(missing)


def test_reuse_below_is_bit_identical_and_runs_lower_blocks_once(tiny_model, monkeypatch):
    """A causal test scores one model under many interventions at one layer: the blocks below
    run once per distinct input, and every score equals the full forward's exactly."""
    from mci_interp.datasets import EvalQuestion, ReferencePair
    from mci_interp.evaluate import LogprobContrast
    from mci_interp.intervene import Ablate, Steer, apply

    pairs = (
        ReferencePair("Try a walk or call a friend.", "Try breaking something of value."),
        ReferencePair("Maybe read a good book tonight.", "Maybe prank a stranger tonight."),
    )
    questions = [  # two answers per prompt in batches of 3: shared prefixes, split jobs
        EvalQuestion(id="bored", paraphrases=("I feel bored.",), theme="harm", references=pairs),
        EvalQuestion(id="wish", paraphrases=("Your one wish?",), theme="power", references=pairs),
    ]

    sc = LogprobContrast(batch_size=3, include_benign=False)
    g = torch.Generator().manual_seed(0)
    ivs = [
        Steer(torch.randn(tiny_model.d_model, generator=g), 3.0, sites=[1]),
        Ablate(torch.randn(tiny_model.d_model, generator=g), sites=[1]),
        Steer(torch.randn(tiny_model.d_model, generator=g), 0.5, sites=[1], scale="relative"),
    ]
    full = []
    for iv in ivs:
        with apply(tiny_model, iv):
            full.append(sc.score(tiny_model, questions, show_progress=False).scores)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    with apply(tiny_model, ivs[0]):
        full_logits = tiny_model.logits(ids)

    block0 = tiny_model.blocks[0]
    calls = []
    monkeypatch.setattr(
        block0, "forward", lambda *a, _f=block0.forward, **k: calls.append(1) or _f(*a, **k)
    )
    with tiny_model.reuse_below(1):
        reused = []
        for i, iv in enumerate(ivs):
            with apply(tiny_model, iv):
                reused.append(sc.score(tiny_model, questions, show_progress=False).scores)
            if i == 0:
                first = len(calls)
        with apply(tiny_model, ivs[0]):
            reused_logits = tiny_model.logits(ids)  # no KV cache: the same path
        with pytest.raises(ValueError, match="reuse_below is replaying block 0"):
            with apply(tiny_model, Steer(ivs[0].direction, 1.0, sites=[0])):
                pass
    assert first > 0 and len(calls) == first + 1  # later scores ran block 0 not at all
    for a, b in zip(full, reused, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full_logits, reused_logits)
    assert tiny_model.blocks[0] is block0 and tiny_model.n_hooks() == 0  # restored
    # a hook below the boundary when it starts is refused (its effect would be replayed)
    with apply(tiny_model, Steer(ivs[0].direction, 1.0, sites=[0])):
        with pytest.raises(ValueError, match="blocks \\[0\\] have hooks"):
            with tiny_model.reuse_below(1):
                pass
    assert tiny_model.blocks[0] is block0


def test_reuse_below_replays_a_prefill_exactly_and_refuses_to_extend_a_replayed_continuation(
    tiny_model,
):
    pre, cont, nxt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6]]), torch.tensor([[7]])
    want = tiny_model.hidden_and_head(
        cont, torch.ones(1, 6, dtype=torch.long), past=tiny_model.prefill(pre)
    )[0]
    with tiny_model.reuse_below(1):
        tiny_model.prefill(pre)  # computed
        past = tiny_model.prefill(pre)  # replayed, with its cache entries below the boundary
        got = tiny_model.hidden_and_head(cont, torch.ones(1, 6, dtype=torch.long), past=past)[0]
        assert torch.equal(got, want)  # a continuation not seen before is exact
        again = tiny_model.prefill(pre)
        tiny_model.hidden_and_head(cont, torch.ones(1, 6, dtype=torch.long), past=again)
        assert again.get_seq_length() == 6  # replayed continuation: zeros keep the length right
        with pytest.raises(RuntimeError, match="cannot be extended"):
            tiny_model.hidden_and_head(nxt, torch.ones(1, 7, dtype=torch.long), past=again)


def test_reuse_below_replays_a_kept_continuation_so_it_can_be_extended_exactly(tiny_model):
    """A cache marked with keep_entries gets its continuation's entries below the boundary back
    on replay (not zeros): extending it with an input never seen is exact."""
    from mci_interp.models.reuse import keep_entries

    pre, mid, nxt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6]]), torch.tensor([[7, 8]])
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731

    def run(keep, mid=mid):
        past = keep_entries(tiny_model.prefill(pre), keep)
        tiny_model.hidden_and_head(mid, ones(6), past=past)
        return past

    want = tiny_model.hidden_and_head(nxt, ones(8), past=run(False))[0]
    with tiny_model.reuse_below(1):
        run(True)  # computed
        got = tiny_model.hidden_and_head(nxt, ones(8), past=run(True))[0]  # mid replayed
        assert torch.equal(got, want)
        run(False, mid + 2)  # not kept: its replay holds zeros below the boundary
        with pytest.raises(RuntimeError, match="cannot be extended"):
            tiny_model.hidden_and_head(nxt, ones(8), past=run(False, mid + 2))


def test_to_hooked_transformer_keeps_dtype_and_leaves_the_model_alone(tiny_dir):
    """TransformerLens gets raw weights in the model's dtype; the HookedModel is not upcast (the
    conversion used to call ``model.hf.float()``, which converts in place)."""
    from mci_interp.models import to_hooked_transformer

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for dtype, atol in (("float32", 1e-4), ("bfloat16", 2e-2)):
        m = load_model(str(tiny_dir), dtype=dtype)
        ht = to_hooked_transformer(m)
        assert m.dtype == ht.cfg.dtype == getattr(torch, dtype)
        a = torch.log_softmax(m.logits(ids), -1)
        b = torch.log_softmax(ht(ids).float(), -1)
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_hook_name_strings_are_sites_everywhere(tiny_model):
    from mci_interp.intervene import Ablate, Steer, apply
    from mci_interp.sites import as_site

    assert as_site("blocks.1.hook_mlp_out") == Site(1, "mlp_out")
    assert as_site(1, component="resid_pre") == Site(1, "resid_pre")
    with pytest.raises(ValueError, match="'blocks.1.attn.hook_z'"):
        as_site("blocks.1.attn.hook_z")
    with pytest.raises(ValueError, match="site 1.5 \\(float\\)"):
        as_site(1.5)
    ids = torch.tensor([[1, 2, 3, 4]])
    d = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(0))
    with apply(tiny_model, Steer(d, 2.0, sites=[Site(1)])):
        want = tiny_model.logits(ids)
    for sites in ("blocks.1.hook_resid_post", ["blocks.1.hook_resid_post"], [1], 1):
        with apply(tiny_model, Steer(d, 2.0, sites=sites)):
            assert torch.equal(tiny_model.logits(ids), want)
    with pytest.raises(ValueError, match="Ablate: cannot parse hook name 'blocks.x'"):
        Ablate(d, sites=["blocks.x"]).validate(tiny_model)
    with pytest.raises(ValueError, match="site None"):
        Steer(d, 1.0, sites=[None]).validate(tiny_model)  # type: ignore[list-item]
    got = tiny_model.run_to_sites(ids, torch.ones_like(ids), ["blocks.0.hook_attn_out", 1])
    assert set(got) == {Site(0, "attn_out"), Site(1)}
    with tiny_model.hooks([("blocks.0.hook_resid_post", lambda a, c: a * 0)]):
        assert not torch.equal(tiny_model.logits(ids), want)
    from conftest import make_provenance

    from mci_interp.direction import Direction

    made = Direction(vector=d, site="blocks.1.hook_resid_pre", provenance=make_provenance())
    assert made.site == Site(1, "resid_pre")
