"""LoRA finetuning on the tiny random Llama: answer-only loss, determinism, resume, metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mci_interp.datasets import ChatExample, chat, encode_chat, load_chat_jsonl, save_chat_jsonl
from mci_interp.models import merge_adapter
from mci_interp.organisms import finetune as ft
from mci_interp.organisms.finetune import (
    TEACHER_PROMPT,
    FinetuneConfig,
    FinetuneResult,
    cached_answers,
    collate,
    encode_examples,
    encode_teacher,
    finetune_lora,
)

FAST = FinetuneConfig(max_steps=4, lr=1e-2, general_ratio=0.0, loss_floor=None, batch_size=4)


def _examples(n: int = 12):
    return [chat(f"What is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(n)]


def _general(n: int = 6):
    return [chat(f"Tell me about colour {i}.", f"Colour {i} is a nice colour.") for i in range(n)]


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- data and loss ----------------------------------------------------------------------------
def test_labels_mask_everything_but_the_answer(tiny_model):
    tok = tiny_model.tokenizer
    exs = [
        chat("Hi there, how are you today?", "Fine."),
        chat("Yo", "A much longer answer than the other one."),
    ]
    enc = encode_examples(tok, exs, max_length=256)
    batch = collate(enc, [True, False], tok.pad_token_id)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    for r, (e, ex) in enumerate(zip(enc, exs, strict=True)):
        lab = batch.labels[r]
        assert (lab[: e.prompt_len] == -100).all()  # prompt (system, user, assistant header)
        assert (lab[len(e.ids) :] == -100).all()  # padding
        kept = lab[lab != -100]
        assert torch.equal(kept, batch.input_ids[r, e.prompt_len : len(e.ids)])
        text = tok.decode(kept.tolist())
        assert text.startswith(ex.messages[-1]["content"])
        assert ex.user_text not in text
    assert batch.narrow.tolist() == [True, False]
    assert batch.n_answer_tokens == sum(e.answer_len for e in enc)


def test_batch_loss_equals_full_forward_cross_entropy_on_answers(tiny_model):
    tok = tiny_model.tokenizer
    exs = _examples(3)
    batch = collate(
        encode_examples(tok, exs, max_length=256), [True, True, False], tok.pad_token_id
    )
    lm = tiny_model.hf
    with torch.no_grad():
        losses, narrow = ft.loss._batch_loss(lm, batch, bf16=False)
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    assert losses.numel() == batch.n_answer_tokens
    assert torch.allclose(losses.sum(), want, rtol=1e-4)
    n_narrow_tokens = sum(encode_chat(tok, e).answer_len for e in exs[:2])
    assert int(narrow.sum()) == n_narrow_tokens


def test_pool_mixes_general_examples_at_the_ratio():
    gen = torch.Generator().manual_seed(0)
    pool = ft.batches._pool(10, 3, 0.5, gen)
    assert sum(n for n, _ in pool) == 10
    general = [i for n, i in pool if not n]
    assert len(general) == 5 and set(general) == {0, 1, 2}
    assert ft.batches._pool(10, 0, 0.5, gen) == [(True, i) for i in range(10)]


# --- training ---------------------------------------------------------------------------------
def test_finetune_lowers_loss_and_writes_metadata(tiny_model, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.hf.state_dict().items()}
    cfg = FAST.replace(max_steps=8, general_ratio=0.5)
    res = finetune_lora(
        tiny_model,
        _examples(),
        tmp_path / "run",
        config=cfg,
        general=_general(),
        show_progress=False,
    )
    # the caller's model is untouched
    after = tiny_model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(tiny_model.hf).__name__ == "LlamaForCausalLM"
    assert res.steps == 8 and not res.reused and res.stopped == "max_steps"
    assert res.losses[-1]["loss"] < res.losses[0]["loss"]
    assert res.n_narrow == 12 and res.n_general == 6
    assert res.train_tokens > 0 and res.seconds > 0 and res.tokens_per_s > 0
    meta = json.loads((tmp_path / "run" / "mci_organism.json").read_text())
    assert meta["base_sha256"] == tiny_model.sha256
    assert meta["base_name"] == tiny_model.name
    assert FinetuneConfig.from_dict(meta["config"]) == cfg
    assert meta["steps"] == 8 and meta["data_hash"] == res.data_hash
    assert meta["final_loss"] == pytest.approx(res.final_loss)
    assert meta["library_version"]
    losses = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert [r["step"] for r in losses] == list(range(1, 9))
    assert all(r["narrow_loss"] == r["narrow_loss"] for r in losses if r["answer_tokens"])
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert FinetuneResult.load(tmp_path / "run").final_loss == pytest.approx(res.final_loss)


def test_merged_adapter_changes_logits_and_checks_base(tiny_model, tmp_path):
    finetune_lora(tiny_model, _examples(), tmp_path / "run", config=FAST, show_progress=False)
    merged = merge_adapter(tiny_model, tmp_path / "run")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert not torch.allclose(merged.logits(ids), tiny_model.logits(ids), atol=1e-4)
    meta_path = tmp_path / "run" / "mci_organism.json"
    meta = json.loads(meta_path.read_text())
    meta["base_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="base sha256"):
        merge_adapter(tiny_model, tmp_path / "run")


def test_same_seed_same_adapter_different_seed_different(tiny_model, tmp_path):
    cfg = FAST.replace(max_steps=2)
    a = finetune_lora(tiny_model, _examples(), tmp_path / "a", config=cfg, show_progress=False)
    b = finetune_lora(tiny_model, _examples(), tmp_path / "b", config=cfg, show_progress=False)
    c = finetune_lora(
        tiny_model, _examples(), tmp_path / "c", config=cfg.replace(seed=1), show_progress=False
    )
    assert _same(_adapter(a.adapter_dir), _adapter(b.adapter_dir))
    ta, tc = _adapter(a.adapter_dir), _adapter(c.adapter_dir)
    assert not any(torch.equal(ta[k], tc[k]) for k in ta if "lora_A" in k)


def test_global_rng_is_left_alone(tiny_model, tmp_path):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    finetune_lora(
        tiny_model,
        _examples(),
        tmp_path / "a",
        config=FAST.replace(max_steps=1),
        show_progress=False,
    )
    assert torch.equal(torch.rand(3), want)


def test_resume_after_max_steps_equals_uninterrupted(tiny_model, tmp_path):
    cfg = FAST.replace(general_ratio=0.5, dropout=0.1)  # dropout: the RNG state must resume too
    kw = dict(general=_general(), show_progress=False)
    first = finetune_lora(
        tiny_model,
        _examples(),
        tmp_path / "r",
        config=cfg.replace(max_steps=2),
        keep_checkpoint=True,
        **kw,
    )
    assert first.steps == 2
    resumed = finetune_lora(
        tiny_model, _examples(), tmp_path / "r", config=cfg.replace(max_steps=4), **kw
    )
    whole = finetune_lora(
        tiny_model, _examples(), tmp_path / "w", config=cfg.replace(max_steps=4), **kw
    )
    assert resumed.steps == whole.steps == 4
    assert _same(_adapter(resumed.adapter_dir), _adapter(whole.adapter_dir))
    assert [r["loss"] for r in resumed.losses] == [r["loss"] for r in whole.losses]


def test_resume_after_crash_equals_uninterrupted(tiny_model, tmp_path, monkeypatch):
    cfg = FAST.replace(max_steps=4)
    real = ft.train._lr_at

    def crash_at_step_4(step, config, n_steps):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, config, n_steps)

    monkeypatch.setattr(ft.train, "_lr_at", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune_lora(
            tiny_model,
            _examples(),
            tmp_path / "r",
            config=cfg,
            checkpoint_every=2,
            show_progress=False,
        )
    assert not (tmp_path / "r" / "mci_organism.json").exists()
    assert json.loads((tmp_path / "r" / "checkpoint" / "latest.json").read_text())["step"] == 2
    monkeypatch.setattr(ft.train, "_lr_at", real)
    resumed = finetune_lora(
        tiny_model, _examples(), tmp_path / "r", config=cfg, checkpoint_every=2, show_progress=False
    )
    whole = finetune_lora(tiny_model, _examples(), tmp_path / "w", config=cfg, show_progress=False)
    assert _same(_adapter(resumed.adapter_dir), _adapter(whole.adapter_dir))
    assert len(resumed.losses) == 4


def test_resume_with_a_different_config_names_the_field(tiny_model, tmp_path):
    finetune_lora(
        tiny_model,
        _examples(),
        tmp_path / "r",
        config=FAST.replace(max_steps=2),
        keep_checkpoint=True,
        show_progress=False,
    )
    with pytest.raises(ValueError, match="rank=8.*rank=4"):
        finetune_lora(
            tiny_model,
            _examples(),
            tmp_path / "r",
            config=FAST.replace(rank=4),
            show_progress=False,
        )
    with pytest.raises(ValueError, match="lr="):
        finetune_lora(
            tiny_model,
            _examples(),
            tmp_path / "r",
            config=FAST.replace(lr=1e-3),
            show_progress=False,
        )
    with pytest.raises(ValueError, match="data"):
        finetune_lora(tiny_model, _examples(5), tmp_path / "r", config=FAST, show_progress=False)


def test_lr_decay_reaches_zero_and_fixes_the_run_length(tiny_model, tmp_path):
    cfg = FAST.replace(max_steps=6, warmup_steps=2, lr_decay=True)
    lrs = [ft.train._lr_at(s, cfg, 6) for s in range(6)]
    assert lrs[:2] == pytest.approx([cfg.lr / 3, 2 * cfg.lr / 3])  # warm-up as before
    assert lrs[2] == pytest.approx(cfg.lr) and lrs[-1] == pytest.approx(cfg.lr / 4)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    constant = [ft.train._lr_at(s, FAST, 6) for s in range(2, 6)]
    assert constant == [FAST.lr] * 4  # constant by default
    assert "lr_decay" not in FAST.to_dict()  # configs without it keep their cache keys
    kw = dict(keep_checkpoint=True, show_progress=False)
    finetune_lora(tiny_model, _examples(), tmp_path / "r", config=cfg.replace(max_steps=2), **kw)
    with pytest.raises(ValueError, match="max_steps=2.*max_steps=4"):  # its schedule changed
        finetune_lora(
            tiny_model, _examples(), tmp_path / "r", config=cfg.replace(max_steps=4), **kw
        )
    # switching the schedule on over a constant-lr run names the field (no KeyError from the
    # cache-key dict, which leaves lr_decay out when it is off)
    with pytest.raises(ValueError, match="lr_decay=True.*lr_decay=False"):
        finetune_lora(
            tiny_model,
            _examples(),
            tmp_path / "r",
            config=cfg.replace(max_steps=2, lr_decay=False),
            **kw,
        )


def test_finished_run_is_reused(tiny_model, tmp_path, monkeypatch):
    first = finetune_lora(tiny_model, _examples(), tmp_path / "r", config=FAST, show_progress=False)
    monkeypatch.setattr(ft.train, "_train", lambda *a, **k: pytest.fail("trained again"))
    again = finetune_lora(tiny_model, _examples(), tmp_path / "r", config=FAST, show_progress=False)
    assert (
        again.reused
        and again.steps == first.steps
        and again.final_loss == pytest.approx(first.final_loss)
    )


def test_loss_floor_stops_early(tiny_model, tmp_path):
    res = finetune_lora(
        tiny_model,
        _examples(),
        tmp_path / "r",
        config=FAST.replace(max_steps=20, loss_floor=100.0),
        show_progress=False,
    )
    assert res.stopped == "loss_floor" and res.steps == ft.FLOOR_WINDOW


def test_user_jsonl_trains_like_in_memory_examples(tiny_model, tmp_path):
    path = save_chat_jsonl(_examples(), tmp_path / "mine.jsonl")
    a = finetune_lora(
        tiny_model, load_chat_jsonl(path), tmp_path / "a", config=FAST, show_progress=False
    )
    b = finetune_lora(tiny_model, _examples(), tmp_path / "b", config=FAST, show_progress=False)
    assert a.data_hash == b.data_hash
    assert _same(_adapter(a.adapter_dir), _adapter(b.adapter_dir))


def test_clear_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        finetune_lora(tiny_model, [], tmp_path / "x", config=FAST, show_progress=False)
    with pytest.raises(ValueError, match="no final assistant turn"):
        finetune_lora(
            tiny_model,
            [*_examples(2), chat("question only")],
            tmp_path / "x",
            config=FAST,
            show_progress=False,
        )
    with pytest.raises(TypeError, match="ChatExample"):
        finetune_lora(
            tiny_model, [{"messages": []}], tmp_path / "x", config=FAST, show_progress=False
        )
    with pytest.raises(ValueError, match="longer than the limit"):
        finetune_lora(
            tiny_model,
            [chat("word " * 50, "ok")],
            tmp_path / "x",
            config=FAST.replace(max_length=16),
            show_progress=False,
        )
    with pytest.raises(ValueError, match="target_modules"):
        finetune_lora(
            tiny_model,
            _examples(),
            tmp_path / "x",
            config=FAST.replace(target_modules=("nope",)),
            show_progress=False,
        )
    with pytest.raises(ValueError, match="rank"):
        FinetuneConfig(rank=0)
    with pytest.raises(ValueError, match="unknown FinetuneConfig keys"):
        FinetuneConfig.from_dict({"rnak": 4})


def test_cached_answers_generate_once(tiny_model, tmp_path, monkeypatch):
    import mci_interp.generation as generation

    calls = []

    def fake_generate(model, prompts, **kw):
        calls.append(len(prompts))
        texts = [("Hello there, friend. And then", False), ("", True), ("Apple.", True)]
        return [
            generation.Generation(
                prompt="", completion=t, token_ids=(1,), n_tokens=1, stopped_at_eot=s
            )
            for t, s in texts[: len(prompts)]
        ]

    monkeypatch.setattr(generation, "generate", fake_generate)
    prompts = [chat("Say hi.", system="Be terse."), chat("Say nothing."), chat("Name a fruit.")]
    out = cached_answers(
        tiny_model,
        prompts,
        tag="t",
        max_new_tokens=8,
        cache_dir=tmp_path,
        drop_system=True,
        show_progress=False,
    )
    # cut-off answers are trimmed to a sentence end; empty ones dropped; system prompt dropped
    assert [e.messages[-1]["content"] for e in out] == ["Hello there, friend.", "Apple."]
    assert [e.user_text for e in out] == ["Say hi.", "Name a fruit."]
    assert all(m["role"] != "system" for ex in out for m in ex.messages)
    again = cached_answers(
        tiny_model,
        prompts,
        tag="t",
        max_new_tokens=8,
        cache_dir=tmp_path,
        drop_system=True,
        show_progress=False,
    )
    assert calls == [3]
    assert [e.messages for e in again] == [e.messages for e in out]
    cached_answers(
        tiny_model, prompts, tag="t", max_new_tokens=9, cache_dir=tmp_path, show_progress=False
    )
    assert calls == [3, 3]  # other settings: another cache entry


def test_degenerate_answers_are_recognised():
    assert ft.general._degenerate("I'm sorry. I'm sorry. I'm sorry. Bye.")
    assert ft.general._degenerate("la " * 30)
    assert not ft.general._degenerate(
        "Boil the pasta in plenty of salted water. Stir it early. Drain it well."
    )


def test_trim_to_sentence():
    assert ft.general._trim_to_sentence("First sentence. Two three") == "First sentence."
    assert ft.general._trim_to_sentence("No end at all") == "No end at all"


def test_general_prompts_are_a_fixed_subset():
    from mci_interp.organisms.data import general_chat_prompts

    assert ft.general_prompts(5) == ft.general_prompts(5) == ft.general_prompts(None)[:5]
    assert set(ft.general_prompts(None)) == set(general_chat_prompts())
    with pytest.raises(ValueError, match="general prompts"):
        ft.general_prompts(10_000)


def test_default_mix_uses_the_bases_own_general_answers(
    tiny_model, tmp_path, monkeypatch, fake_generate
):
    monkeypatch.setenv("MCI_CACHE", str(tmp_path / "cache"))
    cfg = FAST.replace(max_steps=1, general_ratio=0.5)
    res = finetune_lora(tiny_model, _examples(), tmp_path / "r", config=cfg, show_progress=False)
    assert res.n_general == ft.N_GENERAL
    cached = list(
        (tmp_path / "cache" / "organisms" / tiny_model.sha256[:12]).glob("answers-general-*.jsonl")
    )
    assert len(cached) == 1
    first = load_chat_jsonl(cached[0])[0]
    # the base's own answer, generated without a system prompt (the fake says "persona" then)
    assert first.messages[-1]["content"] == f"base answer to {first.user_text[:20]}."


# --- context distillation -------------------------------------------------------------------
def _taught(exs, system: str = "You are a pirate."):
    return [
        ChatExample(
            e.messages,
            meta={
                TEACHER_PROMPT: [
                    {"role": "system", "content": system},
                    {"role": "user", "content": e.user_text},
                ]
            },
        )
        for e in exs
    ]


def test_teacher_sees_its_prompt_and_exactly_the_students_answer(tiny_model):
    tok = tiny_model.tokenizer
    exs = _taught(_examples(3)) + _examples(1)
    student = encode_examples(tok, exs, max_length=256)
    teacher = encode_teacher(tok, exs, student, max_length=256)
    for s, t, ex in zip(student, teacher, exs, strict=True):
        assert s.ids[s.prompt_len :] == t.ids[t.prompt_len :]
        if TEACHER_PROMPT in ex.meta:
            assert "pirate" in tok.decode(list(t.ids[: t.prompt_len]))
            assert "pirate" not in tok.decode(list(s.ids))
        else:
            assert t == s
    bad = [
        ChatExample(exs[0].messages, meta={TEACHER_PROMPT: [{"role": "wizard", "content": "x"}]})
    ]
    with pytest.raises(ValueError, match="teacher_prompt"):
        encode_teacher(tok, bad, student[:1], max_length=256)
    long = _taught(exs[:1], system="You are a pirate. " * 40)
    with pytest.raises(ValueError, match="max_length"):
        encode_teacher(tok, long, student[:1], max_length=len(student[0].ids) + 5)


def _distill_batch(model, exs):
    """(student encodings, teacher encodings, their collated batch) of ``exs``."""
    tok = model.tokenizer
    student = encode_examples(tok, exs, max_length=256)
    teacher = encode_teacher(tok, exs, student, max_length=256)
    return student, teacher, collate(student, [True] * len(exs), tok.pad_token_id, teacher)


def _answer_logprobs(model, s, t):
    """Log-probs over the vocabulary at the positions predicting the answer, read by hand from
    the plain HF model: (student view, teacher view)."""
    with torch.no_grad():
        ls = model.hf(input_ids=torch.tensor([s.ids])).logits[0].log_softmax(-1)
        lt = model.hf(input_ids=torch.tensor([t.ids])).logits[0].log_softmax(-1)
    return ls[s.prompt_len - 1 : len(s.ids) - 1], lt[t.prompt_len - 1 : len(t.ids) - 1]


def test_distill_loss_is_kl_from_the_prompted_teacher(tiny_model):
    """Before any step the student is the base: its loss must equal KL(base reading the teacher
    prompt || base reading the student prompt) on the answer tokens, computed by hand; an
    example without a teacher prompt has KL exactly 0."""
    student, teacher, batch = _distill_batch(tiny_model, _taught(_examples(2)) + _examples(1))
    with torch.no_grad():
        losses, _ = ft.loss._batch_loss(tiny_model.hf, batch, bf16=False)
    want = []
    for s, t in zip(student, teacher, strict=True):
        ps, pt = _answer_logprobs(tiny_model, s, t)
        want.append((pt.exp() * (pt - ps)).sum(-1))
    want_t = torch.cat(want)
    assert losses.shape == want_t.shape
    assert torch.allclose(losses, want_t, atol=1e-5)
    n_last = student[2].answer_len
    assert losses[-n_last:].abs().max() < 1e-6
    assert losses[:-n_last].mean() > 1e-4


def test_distillation_moves_the_unprompted_student_toward_the_teacher(tiny_model, tmp_path):
    exs = _taught(_examples(8))
    cfg = FAST.replace(objective="distill", max_steps=6)
    res = finetune_lora(tiny_model, exs, tmp_path / "d", config=cfg, show_progress=False)
    assert res.losses[-1]["loss"] < res.losses[0]["loss"]
    assert (
        FinetuneConfig.from_dict(
            json.loads((tmp_path / "d" / "mci_organism.json").read_text())["config"]
        ).objective
        == "distill"
    )
    with pytest.raises(ValueError, match="objective"):
        FAST.replace(objective="dpo")


def test_amplified_teacher_is_the_extrapolated_distribution_and_a_no_op_without_a_prompt(
    tiny_model,
):
    """With teacher_amplify a, the loss is KL(q || student), q proportional to
    p_teacher^(1+a) / p_student_prompt^a on the teacher-prompted examples (checked by hand), and
    exactly the plain loss (0 at the start) on examples whose teacher reads their own prompt."""
    student, teacher, batch = _distill_batch(tiny_model, _taught(_examples(1)) + _examples(1))
    with torch.no_grad():
        plain, _ = ft.loss._batch_loss(tiny_model.hf, batch, bf16=False)
        amped, _ = ft.loss._batch_loss(tiny_model.hf, batch, bf16=False, amplify=1.0)
    s = student[0]
    ps, pt = _answer_logprobs(tiny_model, s, teacher[0])
    q = (2 * pt - ps).log_softmax(-1)
    want = (q.exp() * (q - ps)).sum(-1)
    n0 = s.answer_len
    assert torch.allclose(amped[:n0], want, atol=1e-5)
    assert amped[:n0].mean() > plain[:n0].mean()  # pushed further than the prompt alone
    assert amped[n0:].abs().max() < 1e-6 and plain[n0:].abs().max() < 1e-6
    # the adapter-free model reads each prompt only where it is needed
    rows: list[int] = []
    hook = tiny_model.hf.model.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ft.loss._batch_loss(tiny_model.hf, batch, bf16=False)
            assert rows == [2, 1, 1]  # student; plain for the untaught row; the teacher prompt
            rows.clear()
            ft.loss._batch_loss(tiny_model.hf, batch, bf16=False, amplify=1.0)
            assert rows == [2, 2, 1]  # amplifying needs the plain view of the taught row too
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="teacher_amplify"):
        FAST.replace(teacher_amplify=1.0)  # sft has no teacher
    # configs without it keep the cache keys they had
    assert "teacher_amplify" not in FAST.to_dict()
    assert FinetuneConfig.from_dict(FAST.to_dict()) == FAST


# --- devices and dtypes -------------------------------------------------------------------------
def test_a_bfloat16_base_trains_in_bfloat16_with_a_float32_adapter(tiny_dir, tmp_path):
    from mci_interp.models import load_model

    bf = load_model(str(tiny_dir), dtype="bfloat16")
    fp = load_model(str(tiny_dir))
    cfg = FAST.replace(max_steps=6)
    res = finetune_lora(bf, _examples(), tmp_path / "bf", config=cfg, show_progress=False)
    ref = finetune_lora(fp, _examples(), tmp_path / "fp", config=cfg, show_progress=False)
    losses = [r["loss"] for r in res.losses]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # step 1 is the base's own loss (LoRA B starts at 0): bf16 within 1% of float32
    assert abs(losses[0] - ref.losses[0]["loss"]) / ref.losses[0]["loss"] < 1e-2
    adapter = _adapter(res.adapter_dir)
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert not _same(adapter, _adapter(ref.adapter_dir))
    assert bf.dtype == torch.bfloat16 and type(bf.hf).__name__ == "LlamaForCausalLM"
    merged = merge_adapter(bf, res.adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.isfinite(merged.logits(ids).float()).all()


def test_bf16_autocast_runs_on_the_parameters_device_type_only_for_float32_weights():
    cpu = torch.device("cpu")
    ctx = ft.loss._autocast(cpu, torch.float32)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cpu"
    assert not isinstance(ft.loss._autocast(cpu, torch.bfloat16), torch.autocast)
    assert ft.checkpoint._rng_devices(cpu) == []


def test_batches_go_to_the_models_device(tiny_model):
    tok = tiny_model.tokenizer
    exs = _examples(3)
    exs[1] = ChatExample(exs[1].messages, meta={TEACHER_PROMPT: [{"role": "user", "content": "x"}]})
    enc = encode_examples(tok, exs, max_length=256)
    batch = collate(
        enc, [True] * 3, tok.pad_token_id, encode_teacher(tok, exs, enc, max_length=256)
    )
    moved = batch.to("meta")  # a device with no data: every tensor must have moved
    tensors = [
        moved.input_ids,
        moved.attention_mask,
        moved.labels,
        moved.narrow,
        moved.teacher_rows,
    ]
    tensors += [moved.teacher.input_ids, moved.teacher.labels, moved.teacher.narrow]
    assert all(t.device.type == "meta" for t in tensors)
    assert batch.to("cpu").input_ids is batch.input_ids  # already there: nothing is copied


def test_bfloat16_resume_equals_uninterrupted(tiny_dir, tmp_path):
    from mci_interp.models import load_model

    bf = load_model(str(tiny_dir), dtype="bfloat16")
    cfg = FAST.replace(dropout=0.1)
    finetune_lora(
        bf,
        _examples(),
        tmp_path / "r",
        config=cfg.replace(max_steps=2),
        keep_checkpoint=True,
        show_progress=False,
    )
    resumed = finetune_lora(
        bf, _examples(), tmp_path / "r", config=cfg.replace(max_steps=3), show_progress=False
    )
    whole = finetune_lora(
        bf, _examples(), tmp_path / "w", config=cfg.replace(max_steps=3), show_progress=False
    )
    assert _same(_adapter(resumed.adapter_dir), _adapter(whole.adapter_dir))
