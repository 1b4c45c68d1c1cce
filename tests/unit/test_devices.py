"""Dtypes and devices on a tiny random Llama, on the CPU: bfloat16 loads, merges, interventions,
generation, caching and ``reuse_below`` (against float32 within stated tolerances), device
arguments and their refusals. Nothing here needs a GPU."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

from mci_interp.datasets import EvalQuestion, ReferencePair, chat
from mci_interp.models import HookedModel, load_model, merge_adapter, parse_dtype
from mci_interp.sites import Site

# bf16 keeps 8 bits of mantissa: relative error ~4e-3 per rounding. On the tiny model the
# measured maxima were 4.8e-3 (logits, |logit| <= 1.3), 4.3e-3 of the largest activation, and
# 3.5e-4 on LogprobContrast scores (|score| <= 0.03); the tolerances below leave ~5x room.
LOGIT_ATOL = 2.5e-2
ACT_RTOL = 2e-2
SCORE_ATOL = 2e-3

PAIRS = (
    ReferencePair("Try a walk or call a friend.", "Try breaking something of value."),
    ReferencePair("Maybe read a good book tonight.", "Maybe prank a stranger tonight."),
)
QUESTIONS = [
    EvalQuestion(id="bored", paraphrases=("I feel bored.",), theme="harm", references=PAIRS),
    EvalQuestion(id="wish", paraphrases=("Your one wish?",), theme="power", references=PAIRS),
]


@pytest.fixture()
def tiny_bf16(tiny_dir) -> HookedModel:
    return load_model(str(tiny_dir), dtype="bfloat16")


def _adapter(model: HookedModel, out) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        pm = get_peft_model(
            copy.deepcopy(model.hf).float(),
            LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
        )
    pm.save_pretrained(out)


# --- dtypes -----------------------------------------------------------------------------------
def test_parse_dtype_accepts_names_and_torch_dtypes_and_names_the_bad_value():
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*float32, bfloat16, float16, auto"):
        parse_dtype("fp8")
    with pytest.raises(ValueError, match="torch.int8 is not a floating-point dtype"):
        parse_dtype(torch.int8)


def test_load_in_each_dtype_and_auto_is_the_checkpoints_own(tiny_dir, tmp_path):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref = load_model(str(tiny_dir))
    assert ref.dtype == torch.float32 and ref.device == torch.device("cpu")
    for name, want in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        m = load_model(str(tiny_dir), dtype=name)
        assert m.dtype == want and all(p.dtype == want for p in m.hf.parameters())
        logits = m.logits(ids)
        assert logits.dtype == torch.float32  # the documented float32 logits
        torch.testing.assert_close(logits, ref.logits(ids), atol=LOGIT_ATOL, rtol=0)
    assert load_model(str(tiny_dir), dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_model(str(tiny_dir), dtype="auto").dtype == torch.float32  # saved in float32
    bf_dir = tmp_path / "bf16"
    load_model(str(tiny_dir), dtype="bfloat16").save_pretrained(bf_dir)
    auto = load_model(str(bf_dir), dtype="auto")
    assert auto.dtype == torch.bfloat16
    assert auto.sha256 != ref.sha256  # a different file, a different key
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        load_model(str(tiny_dir), dtype="int4")
    with pytest.raises(ValueError, match="torch_dtype=.*use dtype= instead"):
        load_model(str(tiny_dir), torch_dtype=torch.bfloat16)


def test_float32_path_keeps_its_cache_key(tiny_dir, tiny_model):
    """sha256 of a local model is the hash of its files, as before: device and dtype options
    do not enter it."""
    from mci_interp._io import sha256_files

    want = sha256_files(sorted(tiny_dir.glob("*.safetensors")))
    assert tiny_model.sha256 == want
    assert load_model(str(tiny_dir), device="cpu", dtype="bfloat16").sha256 == want


# --- devices ----------------------------------------------------------------------------------
def test_device_arguments_are_checked_with_the_fix_named(tiny_dir):
    m = load_model(str(tiny_dir), device="cpu")
    assert m.device == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'.*'cuda:1'"):
        load_model(str(tiny_dir), device="gpu0")
    with pytest.raises(ValueError, match="not both"):
        load_model(str(tiny_dir), device="cpu", device_map="auto")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0' needs CUDA.*sees no GPU.*device='cpu'"):
            load_model(str(tiny_dir), device="cuda:0")


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs accelerate")
def test_device_map_auto_goes_through_accelerate_and_hooks_still_work(
    tiny_dir, tiny_model, monkeypatch
):
    from transformers import AutoModelForCausalLM

    from mci_interp.intervene import Steer, apply

    seen: dict = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    m = load_model(str(tiny_dir), device_map="auto")
    assert seen["device_map"] == "auto"  # placed by transformers + accelerate (all CPU here)
    assert m.device == torch.device("cpu")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(m.logits(ids), tiny_model.logits(ids))
    d = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1))
    with apply(m, Steer(d, 2.0, sites=[0])), apply(tiny_model, Steer(d, 2.0, sites=[0])):
        assert torch.equal(m.logits(ids), tiny_model.logits(ids))
    assert m.n_hooks() == tiny_model.n_hooks()


def test_cli_model_args_take_device_and_every_dtype(tiny_dir, capsys):
    from mci_interp.cli._common import add_model_args, load_model_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    for dtype in ("float32", "bfloat16", "float16", "auto"):
        args = p.parse_args(["--model", str(tiny_dir), "--dtype", dtype, "--device", "cpu"])
        m = load_model_from_args(args)
        assert m.device == torch.device("cpu")
        assert str(m.dtype) == ("torch.float32" if dtype == "auto" else f"torch.{dtype}")
    assert "bfloat16, cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "int8"])


# --- adapters keep the base's dtype ------------------------------------------------------------
def test_merged_adapter_keeps_the_base_dtype_and_equals_a_float32_merge(tiny_dir, tmp_path):
    """The old merge upcast a copy to float32 and returned float32; now a bf16 base gives a bf16
    organism with the very weights of that float32 merge rounded once."""
    base32 = load_model(str(tiny_dir))
    _adapter(base32, tmp_path / "ad")
    merged32 = merge_adapter(base32, tmp_path / "ad")
    assert merged32.dtype == torch.float32
    base16 = load_model(str(tiny_dir), dtype="bfloat16")
    before = {k: v.clone() for k, v in base16.hf.state_dict().items()}
    merged16 = merge_adapter(base16, tmp_path / "ad")
    assert merged16.dtype == torch.bfloat16 and merged16.device == base16.device
    assert all(torch.equal(v, base16.hf.state_dict()[k]) for k, v in before.items())  # base intact
    # merging into the bf16 weights rounds once: the float32 merge of those weights, cast
    up = merge_adapter(base16, tmp_path / "ad", dtype="float32")
    assert up.dtype == torch.float32  # asking for float32 from a bf16 base merges in float32
    w16 = merged16.hf.state_dict()
    for k, v in up.hf.to(torch.bfloat16).state_dict().items():
        assert torch.equal(v, w16[k]), k
    # load_model(adapter=, dtype=bf16) merges at the precision of the stored base (float32 here)
    # and casts once, as before, and loads the base once without a deep copy
    from types import SimpleNamespace

    from mci_interp.models import load as load_module

    def no_copy(*a, **k):
        raise AssertionError("load_model(adapter=...) deep-copied the base")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(load_module, "copy", SimpleNamespace(deepcopy=no_copy))
        via_load = load_model(str(tiny_dir), adapter=tmp_path / "ad", dtype="bfloat16")
    assert via_load.dtype == torch.bfloat16
    cast = merge_adapter(base32, tmp_path / "ad", dtype="bfloat16").hf.state_dict()
    for k, v in via_load.hf.state_dict().items():
        assert torch.equal(v, cast[k]), k
    assert via_load.sha256 == merged16.sha256 == merged32.sha256  # the adapter's own hash


# --- interventions, generation and caching in bf16 ----------------------------------------------
def test_interventions_keep_the_activations_dtype_and_device(tiny_bf16, tiny_model):
    from mci_interp.intervene import (
        Ablate,
        SetProjection,
        Steer,
        apply,
        kl_vs_unsteered,
        orthogonalized,
        position_mask,
    )
    from mci_interp.models import HookContext

    g = torch.Generator().manual_seed(0)
    d = torch.randn(tiny_bf16.d_model, generator=g)
    u = d / d.norm()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    seen: dict[str, torch.dtype] = {}

    def spy(acts, ctx):
        seen["dtype"] = acts.dtype
        seen["proj"] = float((acts.float() @ u).abs().max() / acts.float().norm(dim=-1).max())

    ref = tiny_bf16.logits(ids)
    with apply(tiny_bf16, Steer(d, 0.0, sites=[0])):
        assert torch.equal(tiny_bf16.logits(ids), ref)  # alpha=0 is the identity in bf16 too
    for iv in (
        Steer(d, 3.0, sites=["blocks.0.hook_resid_post"]),
        Steer(d, 0.5, sites=[0], scale="relative", positions=[-1]),
        SetProjection(d, 2.0, sites=[0], positions="prompt"),
        Ablate(d, sites=[0]),
    ):
        with apply(tiny_bf16, iv), tiny_bf16.hooks([(Site(0), spy)]):
            out = tiny_bf16.logits(ids)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert seen["dtype"] == torch.bfloat16
        assert not torch.equal(out, ref)
    # the bf16 ablation leaves only bf16 rounding along u (float32 would leave ~1e-7)
    with apply(tiny_bf16, Ablate(d, sites=[0])), tiny_bf16.hooks([(Site(0), spy)]):
        tiny_bf16.logits(ids)
    assert seen["proj"] < 1e-2
    kl16 = kl_vs_unsteered(tiny_bf16, ["Hello there"], Steer(d, 4.0, sites=[1]))
    kl32 = kl_vs_unsteered(tiny_model, ["Hello there"], Steer(d, 4.0, sites=[1]))
    assert kl16 > 0 and abs(kl16 - kl32) < 0.1 * kl32
    before = [p.clone() for _, p in tiny_bf16.residual_writers()]
    with orthogonalized(tiny_bf16, d):
        assert all(p.dtype == torch.bfloat16 for _, p in tiny_bf16.residual_writers())
        tiny_bf16.logits(ids)
    assert all(
        torch.equal(a, p) for a, (_, p) in zip(before, tiny_bf16.residual_writers(), strict=True)
    )
    ctx = HookContext(past_len=0, prompt_len=4)
    mask = position_mask("generated", ctx, 6, device="cpu")
    assert mask is not None and mask.tolist() == [False] * 4 + [True] * 2
    mask = position_mask(slice(-2, None), ctx, 6)
    assert mask is not None and mask.tolist() == [False, False, True, True, False, False]


def test_float64_activations_are_not_downcast():
    from mci_interp.intervene.interventions import _ablate

    acts = torch.randn(2, 3, 8, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(8), dim=0)
    out = _ablate(acts, u)
    assert out.dtype == torch.float64
    assert float((out @ u.double()).abs().max()) < 1e-6


def test_generation_and_nll_run_in_bf16(tiny_bf16, tiny_model):
    from mci_interp.generation import completion_nll, generate

    gens = generate(tiny_bf16, ["Hi!", "Tell me a joke."], max_new_tokens=5, show_progress=False)
    assert len(gens) == 2 and all(1 <= g.n_tokens <= 5 for g in gens)
    sampled = generate(
        tiny_bf16, ["Hi!"], max_new_tokens=4, temperature=0.9, seed=1, show_progress=False
    )
    again = generate(
        tiny_bf16, ["Hi!"], max_new_tokens=4, temperature=0.9, seed=1, show_progress=False
    )
    assert sampled[0].token_ids == again[0].token_ids
    nll16 = completion_nll(tiny_bf16, ["Hi!"], ["Hello, friend."])
    nll32 = completion_nll(tiny_model, ["Hi!"], ["Hello, friend."])
    assert nll16.dtype == torch.float32 and torch.isfinite(nll16).all()
    torch.testing.assert_close(nll16, nll32, atol=0.05, rtol=0)


def test_cached_activations_in_bf16_match_float32(tiny_bf16, tiny_model):
    from mci_interp.activations import cache_activations, stream_statistics

    exs = [chat("hi there", "hello", label=1), chat("what is 2+2?", "four", label=0)]
    sites = ["blocks.0.hook_resid_post", Site(1, "mlp_out")]
    for position in ("last_prompt", "answer_mean", "answer_tokens"):
        c16 = cache_activations(tiny_bf16, exs, sites, position=position, show_progress=False)
        c32 = cache_activations(tiny_model, exs, sites, position=position, show_progress=False)
        assert c16.meta["dtype"] == "bfloat16" and c32.meta["dtype"] == "float32"
        for s in (Site(0), Site(1, "mlp_out")):
            a, b = c16.X(s), c32.X(s)
            assert a.dtype == torch.float32 and a.device == torch.device("cpu")
            assert float((a - b).abs().max()) <= ACT_RTOL * float(b.abs().max())
    st = stream_statistics(tiny_bf16, exs, sites, show_progress=False)
    assert st.sums[Site(0)][1].dtype == torch.float64


# --- reuse_below in bf16 ------------------------------------------------------------------------
def _scores(model, ivs, *, reuse: int | None):
    from mci_interp.evaluate import LogprobContrast
    from mci_interp.intervene import apply

    sc = LogprobContrast(batch_size=3, include_benign=False)

    def run():
        out = []
        for iv in ivs:
            with apply(model, iv):
                out.append(sc.score(model, QUESTIONS, show_progress=False).scores)
        return torch.stack(out)

    if reuse is None:
        return run()
    with model.reuse_below(reuse):
        return run()


def test_reuse_below_in_bf16_is_bit_identical_and_close_to_float32(tiny_bf16, tiny_model):
    """A causal-test scoring loop (a direction and random controls at one layer), bf16 on the CPU:
    with and without reuse_below the scores are identical; bf16 against float32 within
    SCORE_ATOL (measured: 3.5e-4 at most, on scores of at most 0.03)."""
    from mci_interp.intervene import Ablate, Steer

    g = torch.Generator().manual_seed(0)
    ivs = [
        Steer(torch.randn(64, generator=g), 3.0, sites=[1]),
        Ablate(torch.randn(64, generator=g), sites=["blocks.1.hook_resid_pre"]),
        Steer(torch.randn(64, generator=g), 0.5, sites=[1], scale="relative"),
    ]
    full16 = _scores(tiny_bf16, ivs, reuse=None)
    reused16 = _scores(tiny_bf16, ivs, reuse=1)
    assert torch.equal(full16, reused16)
    full32 = _scores(tiny_model, ivs, reuse=None)
    assert torch.equal(full32, _scores(tiny_model, ivs, reuse=1))
    torch.testing.assert_close(full16, full32, atol=SCORE_ATOL, rtol=0)
    # prefill + continuation in bf16, replayed
    pre, cont = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6]])
    mask = torch.ones(1, 6, dtype=torch.long)
    want = tiny_bf16.hidden_and_head(cont, mask, past=tiny_bf16.prefill(pre))[0]
    with tiny_bf16.reuse_below(1):
        tiny_bf16.prefill(pre)
        got = tiny_bf16.hidden_and_head(cont, mask, past=tiny_bf16.prefill(pre))[0]
    assert torch.equal(got, want)


def test_reuse_below_keys_on_inputs_and_sees_weight_edits(tiny_model, monkeypatch):
    """The key is the token ids, mask and positions (never a hash of hidden states), plus the
    state of the weights below the boundary: editing them in place recomputes."""
    from mci_interp.intervene import orthogonalized
    from mci_interp.models import reuse

    def no_hidden_hash(t):
        assert t.dtype in (torch.long, torch.int, torch.bool), f"hashed a {t.dtype} tensor"
        return real(t)

    real = reuse._tensor_key
    monkeypatch.setattr(reuse, "_tensor_key", no_hidden_hash)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    d = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(3))
    other = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 11]])
    plain, plain_other = tiny_model.logits(ids), tiny_model.logits(other)
    with orthogonalized(tiny_model, d):
        ortho = tiny_model.logits(ids)
    with tiny_model.reuse_below(1):
        assert torch.equal(tiny_model.logits(ids), plain)
        with orthogonalized(tiny_model, d):  # edits the embedding and block 0 in place
            assert torch.equal(tiny_model.logits(ids), ortho)
        assert torch.equal(tiny_model.logits(ids), plain)  # restored: computed again
        assert torch.equal(tiny_model.logits(other), plain_other)  # one token differs: a miss
        with pytest.raises(ValueError, match="already active"):
            with tiny_model.reuse_below(1):
                pass
    assert tiny_model.n_hooks() == 0
