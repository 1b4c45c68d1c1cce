"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer (unit tests) and the
real packaged SmolLM2 (integration tests, session-scoped so it loads once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import mci_interp.generation as generation
from mci_interp.direction import Provenance
from mci_interp.organisms.finetune import FinetuneConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from mci_interp.models import model_dir

    return model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_dir) -> Path:
    """A random 2-layer Llama (hidden 64) saved as an HF dir, with SmolLM2's tokenizer."""
    from mci_interp.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture()
def tiny_model(tiny_dir):
    """A fresh tiny HookedModel per test (tests may edit weights)."""
    from mci_interp.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct, loaded once per session. Do not edit its weights."""
    from mci_interp.models import load_model

    return load_model("smollm2-135m-instruct")


def make_provenance(**kw) -> Provenance:
    """A complete, made-up provenance for directions built by hand in tests (fields overridable)."""
    base = dict(
        model="m",
        base_model="b",
        model_sha256="0" * 64,
        method="diff_means",
        dataset="d",
        dataset_hash="h",
        position="last_prompt",
        n_pos=3,
        n_neg=4,
        params={"a": 1, "b": None},
    )
    return Provenance(**(base | kw))


TINY = FinetuneConfig(  # a 2-step LoRA for the tiny model
    max_steps=2, lr=1e-2, loss_floor=None, rank=2, max_length=256
)


@pytest.fixture()
def fake_generate(monkeypatch):
    """Deterministic stand-in for generation (the tiny random model only babbles): answers echo
    the prompt, and say 'persona' when the system prompt is the persona's."""
    calls: list[int] = []

    def fake(model, prompts, **kw):
        calls.append(len(prompts))
        out = []
        for p in prompts:
            who = "persona" if any(m["role"] == "system" for m in p.messages) else "base"
            out.append(
                generation.Generation(
                    prompt="",
                    completion=f"{who} answer to {p.user_text[:20]}.",
                    token_ids=(1,),
                    n_tokens=1,
                    stopped_at_eot=True,
                )
            )
        return out

    monkeypatch.setattr(generation, "generate", fake)
    return calls
