"""Training data: tokenised examples with the loss on answers only, the teacher's view of each
example for distillation, padded micro-batches, and the seeded pool and order they are drawn in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mci_interp.datasets import ChatExample, Encoded, encode_chat, pad, validate_messages
from mci_interp.organisms.finetune.config import TEACHER_PROMPT, FinetuneConfig


@dataclass(frozen=True, slots=True)
class TrainBatch:
    """One padded micro-batch. ``labels`` equal ``input_ids`` on answer tokens and are -100 on
    prompt and padding tokens; ``narrow`` marks rows that are narrow (not general) examples;
    ``teacher_rows`` (distillation only) marks the rows whose teacher reads another prompt, and
    ``teacher`` holds those rows' answers behind their teacher's prompts (None when no row has
    one: every teacher then reads the student's own prompt)."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    labels: Int[Tensor, "batch pos"]
    narrow: Tensor
    teacher: TrainBatch | None = None
    teacher_rows: Tensor | None = None

    def rows(self, keep: Tensor) -> TrainBatch:
        """The rows where ``keep`` is True, trimmed to their longest (right padding)."""
        width = int(self.attention_mask[keep].sum(-1).max())
        return TrainBatch(
            self.input_ids[keep, :width],
            self.attention_mask[keep, :width],
            self.labels[keep, :width],
            self.narrow[keep],
        )

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with every tensor on ``device`` (the same objects where they are
        there already)."""
        return TrainBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.narrow.to(device),
            None if self.teacher is None else self.teacher.to(device),
            None if self.teacher_rows is None else self.teacher_rows.to(device),
        )

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_answer_tokens(self) -> int:
        return int((self.labels != -100).sum())


def encode_examples(
    tokenizer: Any, examples: Sequence[ChatExample], *, max_length: int, what: str = "example"
) -> list[Encoded]:
    """Tokenise training examples, refusing ones without a final assistant turn."""
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, ChatExample):
            raise TypeError(
                f"{what} {i} is a {type(ex).__name__}, not a ChatExample; build examples with "
                "datasets.chat(user, assistant) or load_chat_jsonl(path)"
            )
        if not ex.has_answer:
            raise ValueError(
                f"{what} {i} (starts {ex.user_text[:40]!r}) has no final assistant turn to train on; "
                "every training example must end with the assistant's answer"
            )
        enc = encode_chat(tokenizer, ex, max_length=max_length)
        if enc.answer_len == 0:
            raise ValueError(f"{what} {i} (starts {ex.user_text[:40]!r}) has an empty answer")
        out.append(enc)
    return out


def encode_teacher(
    tokenizer: Any, examples: Sequence[ChatExample], student: Sequence[Encoded], *, max_length: int
) -> list[Encoded]:
    """The teacher's view of each example: its ``meta["teacher_prompt"]`` (default: the
    example's own prompt) followed by exactly the student's answer tokens, so the two score the
    same tokens position for position."""
    out = []
    for i, (ex, enc) in enumerate(zip(examples, student, strict=True)):
        prompt = ex.meta.get(TEACHER_PROMPT)
        if prompt is None:
            out.append(enc)
            continue
        try:
            msgs = validate_messages(
                list(prompt), f"example {i} {TEACHER_PROMPT}", require_answer=False
            )
        except ValueError as e:
            raise ValueError(
                f"{e}; it must be the teacher's prompt messages, without the answer"
            ) from e
        t = encode_chat(tokenizer, ChatExample(msgs), max_length=max_length)
        ids = t.ids + enc.ids[enc.prompt_len :]
        if len(ids) > max_length:
            raise ValueError(
                f"example {i}: teacher prompt + answer is {len(ids)} tokens, over max_length "
                f"{max_length}; raise FinetuneConfig.max_length"
            )
        out.append(Encoded(ids, t.prompt_len))
    return out


def collate(
    encoded: Sequence[Encoded],
    narrow: Sequence[bool],
    pad_id: int,
    teacher: Sequence[Encoded] | None = None,
) -> TrainBatch:
    """Right-pad to the longest example of this batch; mask everything but answer tokens. With
    ``teacher`` (``encode_teacher``), the rows whose teacher reads another prompt get a teacher
    batch of their own; the others need no second encoding."""
    ids, mask = pad([e.ids for e in encoded], pad_id, side="right")
    labels = torch.full_like(ids, -100)
    for r, e in enumerate(encoded):
        labels[r, e.prompt_len : len(e.ids)] = ids[r, e.prompt_len : len(e.ids)]
    is_narrow = torch.tensor(list(narrow), dtype=torch.bool)
    if teacher is None:
        return TrainBatch(ids, mask, labels, is_narrow)
    own = [t == e for t, e in zip(teacher, encoded, strict=True)]
    other = [r for r, o in enumerate(own) if not o]
    t = collate([teacher[r] for r in other], [narrow[r] for r in other], pad_id) if other else None
    rows = torch.tensor([not o for o in own], dtype=torch.bool)
    return TrainBatch(ids, mask, labels, is_narrow, t, rows)


def _pool(
    n_narrow: int, n_general: int, ratio: float, gen: torch.Generator
) -> list[tuple[bool, int]]:
    """The training pool: every narrow example plus round(ratio * n_narrow) general ones, drawn
    without replacement (cycling when there are fewer general examples than needed)."""
    pool = [(True, i) for i in range(n_narrow)]
    k = round(ratio * n_narrow) if n_general else 0
    while k > 0:
        take = min(k, n_general)
        pool += [(False, int(i)) for i in torch.randperm(n_general, generator=gen)[:take]]
        k -= take
    return pool


def _order(pool_size: int, n_needed: int, gen: torch.Generator) -> list[int]:
    """Pool indices for ``n_needed`` examples: one fresh permutation per epoch (a prefix of the
    same stream whatever ``n_needed`` is, so extending a run continues the same order)."""
    out: list[int] = []
    while len(out) < n_needed:
        out += torch.randperm(pool_size, generator=gen).tolist()
    return out[:n_needed]


def total_steps(config: FinetuneConfig, pool_size: int) -> int:
    """Optimizer steps a run takes (before early stopping)."""
    if config.max_steps is not None:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * pool_size / per_step))
