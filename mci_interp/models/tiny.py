"""A tiny random Llama with the packaged SmolLM2 tokenizer: the model the unit tests and the
calibration benchmarks run on (2 layers, d_model 64; no download, no training)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(
    out: Path, *, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 128
) -> Path:
    """Write a random 2-layer Llama (hidden 64 by default) and SmolLM2's tokenizer to ``out`` as
    a Hugging Face directory (load it with ``load_model(str(out))``); the weights depend on
    ``seed`` and the sizes only."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mci_interp.models.load import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m-instruct"))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
