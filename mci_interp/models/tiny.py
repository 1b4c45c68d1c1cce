"""Tiny random models with the packaged SmolLM2 tokenizer: the models the unit tests and the
calibration benchmarks run on (2 layers, d_model 64; no download, no training). A Llama by
default; Qwen2 (attention biases) and Gemma 2/3 (logit softcapping, sliding-window layers,
sandwich norms) for the code paths those families take."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

Family = Literal["llama", "qwen2", "gemma2", "gemma3"]


def save_tiny_model(
    out: Path,
    family: Family = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
) -> Path:
    """Write a random 2-layer model of ``family`` and SmolLM2's tokenizer to ``out`` as a Hugging
    Face directory (load it with ``load_model(str(out))``); the weights depend on the family,
    ``seed`` and the sizes only. The Gemmas alternate a sliding window of 8 with full attention."""
    import transformers as tf

    from mci_interp.models.load import model_dir

    tok = tf.AutoTokenizer.from_pretrained(model_dir("smollm2-135m-instruct"))
    common: dict[str, Any] = dict(
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
    gemma: dict[str, Any] = dict(
        head_dim=hidden_size // 4, sliding_window=8, query_pre_attn_scalar=16
    )
    cfg, cls = {
        "llama": (lambda: tf.LlamaConfig(**common), tf.LlamaForCausalLM),
        "qwen2": (lambda: tf.Qwen2Config(**common), tf.Qwen2ForCausalLM),
        "gemma2": (
            lambda: tf.Gemma2Config(**common, **gemma, final_logit_softcapping=30.0),
            tf.Gemma2ForCausalLM,
        ),
        "gemma3": (
            lambda: tf.Gemma3TextConfig(**common, **gemma, final_logit_softcapping=30.0),
            tf.Gemma3ForCausalLM,
        ),
    }[family]
    torch.manual_seed(seed)
    cls(cfg()).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def save_tiny_llama(
    out: Path, *, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 128
) -> Path:
    """The tiny random Llama (``save_tiny_model`` with ``family="llama"``)."""
    return save_tiny_model(
        out, "llama", seed=seed, hidden_size=hidden_size, intermediate_size=intermediate_size
    )
