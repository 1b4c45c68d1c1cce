"""The packaged SmolLM2: conversion, hook names in the HF basis, log-prob agreement, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mci_interp.datasets import chat, encode_chat, pad
from mci_interp.sites import Site

pytestmark = pytest.mark.integration


def _batch(model):
    exs = [
        chat("What is the capital of France?", "Paris."),
        chat("Name a colour.", "Blue is a colour."),
    ]
    return pad([encode_chat(model.tokenizer, e).ids for e in exs], model.tokenizer.pad_token_id)


def test_shape_and_hidden_state_basis(smol):
    assert (smol.n_layers, smol.d_model) == (30, 576)
    ids, mask = _batch(smol)
    acts = smol.run_to_sites(ids, mask, [Site(0, "resid_pre"), Site(14), Site(29)])
    with torch.no_grad():
        hs = smol.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[Site(14)], hs[15], atol=0, rtol=0)
    torch.testing.assert_close(acts[Site(0, "resid_pre")], hs[0], atol=0, rtol=0)
    # last block's resid_post is pre-final-norm; HF's last hidden state is normed
    assert not torch.allclose(acts[Site(29)], hs[30])


def test_logprobs_agree_with_plain_hf_and_transformer_lens(smol):
    from mci_interp.models import to_hooked_transformer

    ids = torch.tensor(
        [encode_chat(smol.tokenizer, chat("Tell me a fact about bees.", "Bees make honey.")).ids]
    )
    with torch.no_grad():
        ref = torch.log_softmax(smol.hf(input_ids=ids).logits.float(), -1)
    with smol.hooks([(Site(10), lambda a, c: None)]):
        ours = torch.log_softmax(smol.logits(ids), -1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    ht = to_hooked_transformer(smol)
    with torch.no_grad():
        tl = torch.log_softmax(ht(ids, return_type="logits").float(), -1)
    gold = ids[0, 1:]
    diff = (
        (tl[0, :-1].gather(-1, gold[:, None]) - ref[0, :-1].gather(-1, gold[:, None])).abs().max()
    )
    assert diff < 1e-3, f"TransformerLens log-probs differ by {diff}"


def test_cli_cache_stream_and_stored(tmp_path, capsys):
    from mci_interp.cli import main

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i} about rivers?"}], "label": i % 2}
        for i in range(6)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert (
        main(
            [
                "cache",
                "--data",
                str(data),
                "--layers",
                "3,7",
                "--mode",
                "stream",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert (tmp_path / "s" / "stats.safetensors").exists()
    assert (
        main(
            [
                "cache",
                "--data",
                str(data),
                "--layers",
                "3",
                "--mode",
                "stored",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    from mci_interp.activations import load_cache

    assert load_cache(tmp_path / "c").X(Site(3)).shape == (6, 576)
    assert main(["cache", "--data", str(data), "--layers", "40", "--out", str(tmp_path / "x")]) == 2
    assert "beyond the model's depth" in capsys.readouterr().err
    assert main(["cache", "--model", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err


def test_cli_extract_compare_evaluate(tmp_path, capsys):
    """The CLI path from labelled chat data to directions, a comparison and a score."""
    from mci_interp.cli import main
    from mci_interp.datasets import save_chat_jsonl
    from mci_interp.organisms.data import make_narrow

    exs = make_narrow("finance", "misaligned", 8, seed=3) + make_narrow(
        "finance", "aligned", 8, seed=3
    )
    data = save_chat_jsonl(exs, tmp_path / "finance.jsonl")
    assert (
        main(["extract", "--data", str(data), "--layers", "4,8", "--out", str(tmp_path / "d")]) == 0
    )
    assert main(["compare", str(tmp_path / "d"), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "cosines.png").exists()
    q = tmp_path / "q.yaml"
    q.write_text(
        "- id: w\n  paraphrases: ['Any wish?']\n  references: [{aligned: 'Peace for all.', misaligned: 'Power over all.'}]\n"
    )
    assert main(["evaluate", "--questions", str(q), "--out", str(tmp_path / "e.json")]) == 0
    assert "nats/token" in capsys.readouterr().out
