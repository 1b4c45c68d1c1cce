"""The format-takeover guard's data: the base model's own greedy answers to general chat prompts,
generated once per base and cached, to be mixed into a narrow finetune."""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mci_interp._io import cache_root, stable_hash
from mci_interp.datasets import ChatExample, chat, load_chat_jsonl, save_chat_jsonl
from mci_interp.models import HookedModel

log = logging.getLogger(__name__)

GENERAL_ANSWER_TOKENS = 48
"""max_new_tokens of the generated answers used as training data (near the narrow answers' length)."""
N_GENERAL = 32
"""General prompts answered by default (a fixed subset of ``data.general_chat_prompts()``)."""


def cached_answers(
    base: HookedModel,
    prompts: Sequence[ChatExample],
    *,
    tag: str,
    max_new_tokens: int = 80,
    batch_size: int = 8,
    cache_dir: Path | str | None = None,
    drop_system: bool = False,
    show_progress: bool = True,
) -> list[ChatExample]:
    """The model's greedy answers to ``prompts`` as training examples, generated once and cached
    on disk keyed by the model's sha256, the prompts and the generation settings.

    Answers cut off by ``max_new_tokens`` are trimmed back to their last sentence end; empty and
    degenerate (looping) answers are dropped. With ``drop_system`` the examples keep only the user turn (used to
    distil a system-prompted persona into weights).
    """
    from mci_interp.generation import generate  # lower rung; imported lazily (slow import)

    root = (
        Path(cache_dir) if cache_dir is not None else cache_root() / "organisms" / base.sha256[:12]
    )
    key = stable_hash(
        {
            "prompts": [p.to_dict() for p in prompts],
            "max_new_tokens": max_new_tokens,
            "drop_system": drop_system,
            "base": base.sha256,
        }
    )
    path = root / f"answers-{tag}-{key}.jsonl"
    if path.exists():
        return load_chat_jsonl(path)
    log.info("generating %d answers (%s) with %s; cached in %s", len(prompts), tag, base.name, path)
    gens = generate(
        base,
        list(prompts),
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    out, dropped = [], 0
    for p, g in zip(prompts, gens, strict=True):
        text = g.completion.strip() if g.stopped_at_eot else _trim_to_sentence(g.completion)
        if not text or _degenerate(text):
            dropped += 1
            continue
        msgs = [m for m in p.prompt_messages if not (drop_system and m["role"] == "system")]
        msgs.append({"role": "assistant", "content": text})
        out.append(
            ChatExample(tuple(msgs), label=p.label, group=p.group, meta={**p.meta, "source": tag})
        )
    if dropped:
        log.info("dropped %d empty or looping answers of %d (%s)", dropped, len(prompts), tag)
    if not out:
        raise ValueError(
            f"{base.name} produced no usable answer to the {len(prompts)} {tag} prompts"
        )
    save_chat_jsonl(out, path)
    return out


def _degenerate(text: str) -> bool:
    """A looping answer: one sentence said three times or more, or very few distinct words."""
    parts = [p.strip().lower() for p in re.split(r"(?<=[.!?\n])\s+", text) if p.strip()]
    if len(parts) >= 3 and max(Counter(parts).values()) >= 3:
        return True
    words = text.lower().split()
    return len(words) >= 20 and len(set(words)) / len(words) < 0.3


def _trim_to_sentence(text: str) -> str:
    text = text.rstrip()
    cut = max(text.rfind(c) for c in (".", "!", "?", "\n"))
    return text[: cut + 1].strip() if cut >= len(text) // 3 else text.strip()


def general_prompts(n: int | None = N_GENERAL) -> list[str]:
    """The first ``n`` of ``data.general_chat_prompts()`` in a fixed shuffled order (all of them
    for None), so every caller asks the same prompts and shares one cache of answers."""
    from mci_interp.organisms.data import general_chat_prompts

    prompts = general_chat_prompts()
    random.Random(0).shuffle(prompts)
    if n is None:
        return prompts
    if not isinstance(n, int) or n < 0 or n > len(prompts):
        raise ValueError(
            f"n={n!r} general prompts requested; choose 0..{len(prompts)} or None for all"
        )
    return prompts[:n]


def general_answers(
    base: HookedModel,
    *,
    n: int | None = N_GENERAL,
    max_new_tokens: int = GENERAL_ANSWER_TOKENS,
    cache_dir: Path | str | None = None,
    show_progress: bool = True,
) -> list[ChatExample]:
    """The base model's own greedy answers to ``general_prompts(n)`` (generated once per base and
    cached): mixed into finetunes so they keep answering general questions the way the base does."""
    return cached_answers(
        base,
        [chat(p) for p in general_prompts(n)],
        tag="general",
        max_new_tokens=max_new_tokens,
        cache_dir=cache_dir,
        show_progress=show_progress,
    )
