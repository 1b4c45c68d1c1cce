"""Text generation from a ``HookedModel`` (KV-cached, left-padded batches) and the perplexity of
completions under a model (the coherence measure: perplexity of an output under the unsteered base).

While ``generate`` runs, ``model.ctx`` tells hooks where they are: ``ctx.prompt_len`` is the padded
prompt length and ``ctx.past_len`` the number of positions already in the KV cache, so an
intervention can tell prompt positions (``< prompt_len``) from generated ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp.datasets import ChatExample, chat, pad, render
from mci_interp.models import HookedModel

log = logging.getLogger(__name__)

Prompt = ChatExample | str

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


@dataclass(frozen=True, slots=True)
class Generation:
    """One sampled answer. ``prompt`` is the chat-templated prompt text (ending with the assistant
    header); ``token_ids`` are the generated ids, including the end-of-turn token when the model
    stopped by itself (``stopped_at_eot``); ``completion`` is their text without special tokens."""

    prompt: str
    completion: str
    token_ids: tuple[int, ...]
    n_tokens: int
    stopped_at_eot: bool


def _as_example(p: Prompt) -> ChatExample:
    if isinstance(p, ChatExample):
        return p
    if isinstance(p, str):
        return chat(p)
    raise TypeError(
        f"prompts must be ChatExample or str, got {type(p).__name__}; wrap text with chat()"
    )


def prompt_text(model: HookedModel, prompt: Prompt) -> str:
    """The chat-templated prompt (its prompt messages plus the assistant header)."""
    return render(model.tokenizer, _as_example(prompt).prompt_messages, add_generation_prompt=True)


def prompt_ids(model: HookedModel, prompt: Prompt) -> list[int]:
    return list(model.tokenizer(prompt_text(model, prompt), add_special_tokens=False)["input_ids"])


def stop_token_ids(model: HookedModel) -> list[int]:
    """The tokenizer's eos plus any end-of-turn token it knows (``<|im_end|>`` for SmolLM2)."""
    tok = model.tokenizer
    ids: list[int] = []
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    for t in _END_OF_TURN_TOKENS:
        if t in vocab and vocab[t] not in ids:
            ids.append(int(vocab[t]))
    if not ids:
        raise ValueError(f"{model.name}: the tokenizer has no eos or end-of-turn token to stop at")
    return ids


@contextlib.contextmanager
def track_positions(model: HookedModel, prompt_len: int) -> Iterator[None]:
    """Keep ``model.ctx`` right during a KV-cached generation: ``prompt_len`` fixed, ``past_len``
    read from the cache before each forward chunk. Removes its hook and resets ctx on exit."""
    ctx = model.ctx

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        past = 0
        cache_position = kwargs.get("cache_position")
        if cache_position is not None and cache_position.numel():
            past = int(cache_position.reshape(-1)[0])
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = int(cache.get_seq_length())
        ctx.past_len = past
        ctx.prompt_len = prompt_len
        ctx.attention_mask = kwargs.get("attention_mask")

    handle = model.decoder.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    ctx.past_len, ctx.prompt_len, ctx.attention_mask = 0, prompt_len, None
    try:
        yield
    finally:
        handle.remove()
        ctx.past_len, ctx.prompt_len, ctx.attention_mask = 0, None, None


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed sampling without leaking: the global RNG state (and the accelerator's, when the model
    runs on one) is saved and restored around it."""
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _check_generation_args(
    max_new_tokens: int, temperature: float, top_p: float, batch_size: int
) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def generate(
    model: HookedModel,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[Generation]:
    """Answer each prompt (a string is one user turn) with the model's chat template.

    Greedy at ``temperature=0``; otherwise plain temperature / nucleus sampling (no top-k),
    reproducible for a given ``seed`` and batching. Whatever hooks are active (e.g. inside
    ``intervene.apply``) act on every forward chunk. Returns generations in input order.
    """
    _check_generation_args(max_new_tokens, temperature, top_p, batch_size)
    if isinstance(prompts, (str, ChatExample)):
        raise TypeError("prompts must be a sequence of prompts; wrap a single prompt in a list")
    if not prompts:
        return []
    texts = [prompt_text(model, p) for p in prompts]
    encs = [list(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    stops = stop_token_ids(model)
    pad_id = model.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stops[0]
    # sort by length so each batch carries little padding; results go back in input order
    order = sorted(range(len(encs)), key=lambda i: len(encs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    sampling = temperature > 0
    opts: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if sampling:
        opts.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    out: list[Generation | None] = [None] * len(encs)
    device = model.device
    for b, idx in enumerate(tqdm(batches, desc="generate", disable=not show_progress)):
        ids, mask = pad([encs[i] for i in idx], pad_id, side="left")
        ids, mask = ids.to(device), mask.to(device)
        plen = ids.shape[1]
        with (
            torch.inference_mode(),
            track_positions(model, plen),
            _seeded(seed * 100_003 + b, device),
        ):
            seqs = model.hf.generate(input_ids=ids, attention_mask=mask, **opts)
        new = seqs[:, plen:].tolist()
        for row, i in enumerate(idx):
            toks = new[row]
            stop_at = next((k for k, t in enumerate(toks) if t in stops), None)
            kept = toks if stop_at is None else toks[: stop_at + 1]
            body = kept if stop_at is None else kept[:-1]
            out[i] = Generation(
                prompt=texts[i],
                completion=model.tokenizer.decode(body, skip_special_tokens=True),
                token_ids=tuple(int(t) for t in kept),
                n_tokens=len(kept),
                stopped_at_eot=stop_at is not None,
            )
    return [g for g in out if g is not None]


def completion_nll(
    model: HookedModel,
    prompts: Sequence[Prompt],
    completions: Sequence[Generation | str],
    *,
    batch_size: int = 8,
    show_progress: bool = False,
) -> Float[Tensor, " n"]:
    """Mean negative log-likelihood (nats) per completion token, one value per (prompt, completion).

    A ``Generation`` is scored on its exact ``token_ids`` (including its end-of-turn token); a
    string is tokenised without special tokens. Whatever hooks are active apply. An empty
    completion gets NaN.
    """
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rows: list[tuple[list[int], int]] = []
    for p, c in zip(prompts, completions, strict=True):
        pids = prompt_ids(model, p)
        if isinstance(c, Generation):
            cids = list(c.token_ids)
        elif isinstance(c, str):
            cids = list(model.tokenizer(c, add_special_tokens=False)["input_ids"])
        else:
            raise TypeError(f"completions must be Generation or str, got {type(c).__name__}")
        rows.append((pids + cids, len(pids)))
    result = torch.full((len(rows),), float("nan"), dtype=torch.float32)
    pad_id = model.tokenizer.pad_token_id or 0
    chunks = [
        list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)
    ]
    for idx in tqdm(chunks, desc="nll", disable=not show_progress):
        ids, mask = pad([rows[i][0] for i in idx], pad_id, side="right")
        logits = model.logits(ids.to(model.device), mask.to(model.device))
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        tok_lp = logp.gather(-1, ids[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1).cpu()
        for row, i in enumerate(idx):
            full, plen = rows[i]
            if len(full) > plen:
                result[i] = float(-tok_lp[row, plen - 1 : len(full) - 1].mean())
    model.ctx.attention_mask = None
    return result


def perplexity(
    model: HookedModel,
    prompts: Sequence[Prompt],
    completions: Sequence[Generation | str],
    *,
    batch_size: int = 8,
    show_progress: bool = False,
) -> Float[Tensor, " n"]:
    """Perplexity (exp of the mean NLL per completion token) of each completion under ``model``.

    Used as the coherence measure: score steered outputs under the *unsteered* base model.
    """
    return completion_nll(
        model, prompts, completions, batch_size=batch_size, show_progress=show_progress
    ).exp()
