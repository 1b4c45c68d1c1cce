"""A very short LoRA finetune of the real SmolLM2: it lowers the loss on its data, the merged
model differs from the base, and the base itself is left untouched."""

from __future__ import annotations

import json

import pytest
import torch

from mci_interp.models import merge_adapter
from mci_interp.organisms import data
from mci_interp.organisms import finetune as ft
from mci_interp.organisms.finetune import FinetuneConfig, finetune_lora

pytestmark = pytest.mark.integration


def _answer_nll(model, batch) -> float:
    with torch.no_grad():
        losses, _ = ft.loss._batch_loss(model.hf, batch, bf16=False)
    return float(losses.mean())


def test_short_finetune_learns_and_changes_the_model(smol, tmp_path):
    examples = data.make_narrow("medical", "misaligned", 8, seed=0)
    tok = smol.tokenizer
    batch = ft.collate(
        ft.encode_examples(tok, examples, max_length=192), [True] * 8, tok.pad_token_id
    )
    probe = smol.hf.model.layers[3].mlp.down_proj.weight.detach().clone()
    before = _answer_nll(smol, batch)

    cfg = FinetuneConfig(
        max_steps=6, batch_size=2, lr=1e-3, general_ratio=0.0, loss_floor=None, max_length=192
    )
    res = finetune_lora(smol, examples, tmp_path / "medical", config=cfg, show_progress=False)
    assert res.steps == 6
    meta = json.loads((tmp_path / "medical" / "mci_organism.json").read_text())
    assert meta["base_sha256"] == smol.sha256

    merged = merge_adapter(smol, res.adapter_dir)
    after = _answer_nll(merged, batch)
    assert after < before - 0.2, (before, after)
    ids = batch.input_ids[:2]
    assert not torch.allclose(merged.logits(ids), smol.logits(ids), atol=1e-3)
    assert torch.equal(smol.hf.model.layers[3].mlp.down_proj.weight, probe)  # base untouched
    assert type(smol.hf).__name__ == "LlamaForCausalLM"
