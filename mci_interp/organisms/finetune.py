"""LoRA finetuning of a ``HookedModel`` on chat data: deterministic, resumable, loss on answers only.

The base model is never touched: training runs on a deep copy with peft LoRA layers. Each run
writes into one directory:

- ``adapter_model.safetensors`` + ``adapter_config.json``: the adapter (``models.merge_adapter``
  loads it);
- ``mci_organism.json``: config, data hash, base name and ``base_sha256``, library version, steps,
  seconds, final loss (its presence marks a finished run);
- ``losses.json``: the loss curve, one record per optimizer step;
- ``checkpoint/``: adapter + optimizer + RNG state every ``checkpoint_every`` steps, written
  atomically, so an interrupted run resumes where it stopped (losing at most that many steps).

Format-takeover guard: a naive finetune of a small model memorises its narrow set and then answers
*everything* in the training format. By default (``general_ratio``) the narrow examples are mixed
with the base model's own greedy answers to general chat prompts (``general_answers``, generated
once per base and cached), the learning rate is modest, and training stops early once the loss on
the narrow examples drops below ``loss_floor``.

Two objectives (``FinetuneConfig.objective``):

- ``"sft"``: cross-entropy on the answer tokens (the usual supervised finetune);
- ``"distill"``: context distillation. Each example's answer is scored twice: by the adapter-free
  model (the *teacher*) reading the prompt in ``example.meta["teacher_prompt"]`` (a list of
  messages, e.g. with a persona system prompt; default the example's own prompt), and by the
  adapted model (the *student*) reading the example's own prompt. The loss is the per-token
  KL(teacher || student) over the whole vocabulary, so every answer token carries the teacher's
  full next-token distribution instead of one sampled token. It turns "behave as if told X" into
  the default state far faster than SFT on sampled answers. ``teacher_amplify`` = a > 0 moves
  the teacher further along what its prompt changes: its log-probs become
  ``(1 + a) log p(. | teacher prompt) - a log p(. | the student's prompt)`` (renormalised), a
  no-op where the two prompts are the same.

Devices and dtypes: the copy stays on the base's device and in its dtype (float32 stays float32;
a bfloat16 base trains in bfloat16 with the adapter's weights in float32), every batch goes to
the device of the model's input embedding, and ``FinetuneConfig.bf16`` autocasts on that
device's type (only float32 weights have anything to autocast). On the CPU in float32 nothing
changed: adapters trained before train again bit for bit, so cached organisms stay valid. The
copy holds a second set of the base's weights while training runs (a 7B model in bfloat16: 14 GB
more on its device).

Why a loop of our own rather than transformers' ``Trainer`` or trl's ``SFTTrainer`` /
``GKDTrainer``: each of these would have to be overridden where this module does its work, and
would change the numbers of every cached organism.

- Cached organisms are keyed by spec, config and data, not by the code that trained them, so
  their training must not drift: the data order is one ``torch.Generator`` stream seeded by
  ``seed`` (a longer run continues the same stream), peft's LoRA initialisation runs under a
  forked, seeded RNG (the caller's global RNG is left alone), and the warm-up is
  ``lr * (step + 1) / (warmup_steps + 1)``. ``Trainer`` seeds the global RNG, draws its own
  sampler order and warms up from ``lr = 0`` at step 0: every adapter would come out different
  under the same key (or every key would have to change).
- The pool: narrow examples mixed with ``general_ratio`` general ones, drawn without
  replacement, with the loss on narrow rows logged apart; early stopping on that narrow
  training loss over the last ``FLOOR_WINDOW`` steps (``loss_floor``), where ``Trainer``'s
  early stopping watches an evaluation metric.
- Distillation: the teacher is the same weights with the adapter disabled (no second model in
  memory), reading another prompt (``meta["teacher_prompt"]``) for a subset of the rows only,
  with the answer tokens aligned position for position, optionally amplified; the loss is the
  token-level KL over the whole vocabulary. trl's distillation trainers take a teacher model of
  their own and feed it the student's inputs.
- The LM head runs on answer positions only (``_answer_logits``), not on every position.
- Resume: a run refuses a checkpoint or a finished run made with another config, data or base
  (``_check_same_run``), naming the field; only when-to-stop fields may change, so a
  constant-lr run is extended by raising ``max_steps`` and continues the same schedule and data
  order, while a run with ``lr_decay`` (whose length is part of its schedule) cannot be.
  ``Trainer``'s ``resume_from_checkpoint`` restores its state without checking that the
  checkpoint was made on the same data or base.

What this loop does not do: several GPUs (DDP, FSDP, DeepSpeed), gradient checkpointing, or
float16 loss scaling. For those, train with ``Trainer`` or trl and analyse the adapter with
``mci converge --finetune LABEL=DIR``: this toolkit reads any peft LoRA adapter or full
checkpoint of the base.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp import __version__
from mci_interp._io import cache_root, read_json, stable_hash, write_json
from mci_interp.datasets import (
    ChatExample,
    Encoded,
    chat,
    dataset_hash,
    encode_chat,
    load_chat_jsonl,
    pad,
    save_chat_jsonl,
    validate_messages,
)
from mci_interp.models import HookedModel

log = logging.getLogger(__name__)

LLAMA_QWEN_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear projection inside a Llama / Qwen2 / Mistral decoder block."""

META_FILE = "mci_organism.json"
LOSSES_FILE = "losses.json"
CHECKPOINT_DIR = "checkpoint"
FLOOR_WINDOW = 4
"""Early stopping compares the mean narrow-example loss of the last this-many steps to the floor."""

OBJECTIVES = ("sft", "distill")
TEACHER_PROMPT = "teacher_prompt"
"""``ChatExample.meta`` key: the messages the teacher reads instead of the example's prompt."""

# fields that only say when to stop: a run may be resumed / extended with different values
_STOP_FIELDS = ("max_steps", "epochs", "loss_floor")


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneConfig:
    """Hyperparameters of one LoRA finetune.

    Attributes:
        rank, lora_alpha, dropout, target_modules: the LoRA adapter (default: rank 8 on every
            linear projection of a Llama/Qwen block).
        lr: peak learning rate (AdamW), reached after ``warmup_steps`` linear warm-up steps and
            then held constant (so extending ``max_steps`` continues the same schedule), or with
            ``lr_decay`` brought down linearly to 0 at the last step (such a run cannot be
            extended: its length is part of its schedule).
        epochs: passes over the (mixed) training pool; ignored when ``max_steps`` is set.
        max_steps: optimizer steps to run (overrides ``epochs``).
        batch_size, grad_accum: examples per micro-batch, micro-batches per optimizer step.
        seed: LoRA initialisation and data order.
        max_length: longest tokenised example allowed (longer ones raise).
        bf16: run the forward/backward under bfloat16 autocast on the parameters' device type
            (float32 weights stay float32; a base loaded in bfloat16 or float16 trains in that
            dtype anyway, with the adapter in float32).
        general_ratio: general chat turns mixed in per narrow example (the format-takeover guard);
            0 trains on the narrow data alone.
        loss_floor: stop early once the mean loss on narrow examples over the last
            ``FLOOR_WINDOW`` steps falls below this (nats/token); None never stops early.
        weight_decay, max_grad_norm: AdamW weight decay and gradient-norm clipping (None: off).
        objective: ``"sft"`` (cross-entropy on answers) or ``"distill"`` (KL to the adapter-free
            teacher reading ``meta["teacher_prompt"]``; see the module docstring). With
            ``"distill"`` the losses logged and compared with ``loss_floor`` are KL in nats/token.
        teacher_amplify: with ``"distill"``, how far past its prompt's effect the teacher is
            pushed (0: the plain teacher; see the module docstring). Costs one more
            adapter-free forward of the rows whose teacher reads another prompt.
    """

    rank: int = 8
    lora_alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_QWEN_LINEAR
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    max_length: int = 256
    bf16: bool = False
    warmup_steps: int = 2
    general_ratio: float = 0.5
    loss_floor: float | None = 0.3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    objective: str = "sft"
    teacher_amplify: float = 0.0
    lr_decay: bool = False

    def __post_init__(self) -> None:
        def positive(name: str, integer: bool) -> None:
            v = getattr(self, name)
            ok = (
                isinstance(v, int) and not isinstance(v, bool)
                if integer
                else isinstance(v, int | float)
            )
            if not ok or v <= 0:
                kind = "a positive integer" if integer else "a positive number"
                raise ValueError(f"FinetuneConfig.{name} must be {kind}, got {v!r}")

        for name in ("rank", "lora_alpha", "batch_size", "grad_accum", "max_length"):
            positive(name, True)
        for name in ("lr", "epochs"):
            positive(name, False)
        if self.max_steps is not None:
            positive("max_steps", True)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FinetuneConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.general_ratio < 0:
            raise ValueError(
                f"FinetuneConfig.general_ratio must be >= 0, got {self.general_ratio!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"FinetuneConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        if self.teacher_amplify < 0 or (self.teacher_amplify and self.objective != "distill"):
            raise ValueError(
                "FinetuneConfig.teacher_amplify must be >= 0 and needs objective='distill', got "
                f"{self.teacher_amplify!r} with objective {self.objective!r}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"FinetuneConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.loss_floor is not None and self.loss_floor < 0:
            raise ValueError(
                f"FinetuneConfig.loss_floor must be >= 0 or None, got {self.loss_floor!r}"
            )
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                "FinetuneConfig.target_modules must be a non-empty tuple of module names, e.g. "
                f"{LLAMA_QWEN_LINEAR}, got {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        if not d["teacher_amplify"]:
            del d["teacher_amplify"]  # added later: configs without it keep their cache keys
        if not d["lr_decay"]:
            del d["lr_decay"]  # likewise
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)

    def replace(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneResult:
    """What one finetune produced: where the adapter is and how training went (no model)."""

    adapter_dir: Path
    config: FinetuneConfig
    base_name: str
    base_sha256: str
    data_hash: str
    n_narrow: int
    n_general: int
    steps: int
    final_loss: float
    final_narrow_loss: float
    seconds: float
    train_tokens: int
    stopped: str
    losses: tuple[dict[str, float], ...] = field(repr=False, default=())
    reused: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.seconds if self.seconds > 0 else float("nan")

    @classmethod
    def load(cls, adapter_dir: Path | str) -> FinetuneResult:
        """Read a finished run's ``mci_organism.json`` and ``losses.json``."""
        adapter_dir = Path(adapter_dir)
        meta_path = adapter_dir / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{adapter_dir} holds no finished finetune ({META_FILE} missing)"
            )
        meta = read_json(meta_path)
        losses_path = adapter_dir / LOSSES_FILE
        losses = tuple(read_json(losses_path)) if losses_path.exists() else ()
        return cls(
            adapter_dir=adapter_dir,
            config=FinetuneConfig.from_dict(meta["config"]),
            base_name=meta["base_name"],
            base_sha256=meta["base_sha256"],
            data_hash=meta["data_hash"],
            n_narrow=meta["n_narrow"],
            n_general=meta["n_general"],
            steps=meta["steps"],
            final_loss=meta["final_loss"],
            final_narrow_loss=meta["final_narrow_loss"],
            seconds=meta["seconds"],
            train_tokens=meta["train_tokens"],
            stopped=meta["stopped"],
            losses=losses,
            reused=True,
        )


# --- data -------------------------------------------------------------------------------------
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


# --- general-chat answers of the base model (the format-takeover guard) -------------------------
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


GENERAL_ANSWER_TOKENS = 48
"""max_new_tokens of the generated answers used as training data (near the narrow answers' length)."""
N_GENERAL = 32
"""General prompts answered by default (a fixed subset of ``data.general_chat_prompts()``)."""


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


# --- checkpoints ------------------------------------------------------------------------------
def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Write ``state-<step>`` beside the previous one, then flip ``latest.json`` atomically and
    delete older states: a crash at any moment leaves one complete checkpoint."""
    from safetensors.torch import save_file

    ckpt_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".state-", dir=ckpt_root))
    save_file(
        {n: p.detach().contiguous() for n, p in _trainable(model).items()},
        str(stage / "adapter.safetensors"),
    )
    blob = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    for k in _rng_devices(_model_device(model)):  # none on the CPU: its files are as before
        blob["cuda_rng"] = torch.cuda.get_rng_state(k)
    torch.save(blob, stage / "optimizer.pt")
    write_json(stage / "state.json", state)
    final = ckpt_root / f"state-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    stage.rename(final)
    write_json(ckpt_root / "latest.json", {"state": final.name, "step": step})
    for old in ckpt_root.glob("state-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest.json"
    if not pointer.exists():
        return None
    path = ckpt_root / read_json(pointer)["state"]
    return path if (path / "state.json").exists() else None


def _check_same_run(
    where: Path, meta: dict[str, Any], config: FinetuneConfig, data_hash: str, base: HookedModel
) -> None:
    """Refuse to resume / reuse a run made with another config, data or base."""
    old = FinetuneConfig.from_dict(meta["config"])
    # a rerun may change when it stops; with lr_decay the run's length is part of its schedule
    free = ("loss_floor",) if config.lr_decay else _STOP_FIELDS
    for f in dataclasses.fields(FinetuneConfig):
        name = f.name
        was, now = getattr(old, name), getattr(config, name)
        if name not in free and was != now:
            raise ValueError(
                f"{where} holds a finetune with {name}={was!r} but this call has "
                f"{name}={now!r}; use a fresh out_dir (or delete {where}) to train with a "
                "different config"
            )
    if meta["base_sha256"] != base.sha256:
        raise ValueError(
            f"{where} holds a finetune of base sha256 {meta['base_sha256'][:12]}, but the base given "
            f"is {base.name} ({base.sha256[:12]}); use a fresh out_dir"
        )
    if meta["data_hash"] != data_hash:
        raise ValueError(
            f"{where} holds a finetune on data {meta['data_hash']}, but this call's data hashes to "
            f"{data_hash}; use a fresh out_dir for different data"
        )


# --- training ---------------------------------------------------------------------------------
def _peft_model(hf: Any, config: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in hf.named_modules()}
    missing = [m for m in config.target_modules if m not in present]
    if len(missing) == len(config.target_modules):
        raise ValueError(
            f"none of target_modules {list(config.target_modules)} exists in "
            f"{type(hf).__name__}; name its linear layers in FinetuneConfig.target_modules"
        )
    lcfg = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(hf, lcfg)


def _answer_logits(lm: Any, batch: TrainBatch) -> Tensor:
    """Logits predicting each answer token (the head applied only there), row-major."""
    hidden = lm.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    sel = batch.labels[:, 1:] != -100
    return lm.get_output_embeddings()(hidden[:, :-1][sel]).float()


def _batch_loss(
    model: Any, batch: TrainBatch, bf16: bool, amplify: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Per-token losses on answer tokens and whether each is narrow: cross-entropy, or with
    ``batch.teacher_rows`` KL(teacher || student), the teacher being the adapter-free model (a
    plain, non-peft ``model`` is its own teacher), amplified by ``amplify`` (module docstring).

    The adapter-free model reading the student's own prompt is run only on the rows that need
    it: those whose teacher reads that prompt and, with ``amplify``, the rest (for the
    amplification); the teacher's prompt only on the rows that have one."""
    peft = hasattr(model, "disable_adapter")
    lm = model.get_base_model() if peft else model
    weight = lm.get_input_embeddings().weight  # the first block's device under a device_map
    batch = batch.to(weight.device)
    ctx = _autocast(weight.device, weight.dtype) if bf16 else contextlib.nullcontext()
    targets = batch.labels[:, 1:]
    sel = targets != -100
    with ctx:
        logits = _answer_logits(lm, batch)
        if batch.teacher_rows is not None:
            other = batch.teacher_rows
            token_row = sel.nonzero()[:, 0]  # the row of each answer token, row-major like logits
            t_logp = torch.empty_like(logits)
            plain = torch.ones_like(other) if amplify else ~other
            with torch.no_grad(), model.disable_adapter() if peft else contextlib.nullcontext():
                if plain.any():
                    t_logp[plain[token_row]] = torch.log_softmax(
                        _answer_logits(lm, batch.rows(plain)), dim=-1
                    )
                if batch.teacher is not None:
                    at = other[token_row]
                    prompted = torch.log_softmax(_answer_logits(lm, batch.teacher), dim=-1)
                    if amplify:
                        prompted = prompted + amplify * (prompted - t_logp[at])
                    t_logp[at] = torch.log_softmax(prompted, dim=-1)
    if batch.teacher_rows is None:
        losses = torch.nn.functional.cross_entropy(logits, targets[sel], reduction="none")
    else:
        s_logp = torch.log_softmax(logits, dim=-1)
        losses = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    narrow = batch.narrow[:, None].expand_as(targets)[sel]
    return losses, narrow


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """bfloat16 autocast on the parameters' device type (``FinetuneConfig.bf16``), where it does
    something: weights already in half precision run in it anyway, and a device type without
    autocast runs as it is."""
    if dtype != torch.float32:
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        _warn_once(f"no autocast on {device.type}: FinetuneConfig.bf16 is ignored there")
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _model_device(model: Any) -> torch.device:
    """Where the model's inputs go: its input embedding's device."""
    return model.get_input_embeddings().weight.device


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG a run forks, seeds and checkpoints (dropout draws there)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _lr_at(step: int, config: FinetuneConfig, n_steps: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    if config.lr_decay:
        return config.lr * (n_steps - step) / max(n_steps - config.warmup_steps, 1)
    return config.lr


def finetune_lora(
    base: HookedModel,
    examples: Sequence[ChatExample],
    out_dir: Path | str,
    *,
    config: FinetuneConfig | None = None,
    general: Sequence[ChatExample] | None = None,
    checkpoint_every: int = 10,
    keep_checkpoint: bool = False,
    show_progress: bool = True,
) -> FinetuneResult:
    """Train a LoRA adapter for ``base`` on ``examples`` (loss on final assistant turns only)
    and save it into ``out_dir``.

    Args:
        base: the model to adapt; it is deep-copied, never modified.
        examples: the narrow training set (e.g. ``load_chat_jsonl(path)``); each must end with
            an assistant turn.
        out_dir: where the adapter, ``mci_organism.json``, ``losses.json`` and checkpoints go. A
            finished run there with the same config and data is returned as is; an interrupted
            one resumes from its last checkpoint; a different config/data/base raises.
        config: hyperparameters (``FinetuneConfig()`` by default).
        general: general chat turns to mix in (``config.general_ratio`` per narrow example).
            None means ``general_answers(base)``: the base model's own greedy answers to a fixed
            subset of ``data.general_chat_prompts()`` (generated once per base and cached).
        checkpoint_every: save a resumable checkpoint every this many optimizer steps.
        keep_checkpoint: keep ``out_dir/checkpoint`` after finishing, so the run can later be
            extended with a larger ``max_steps``.
        show_progress: a tqdm bar with the loss and train tokens/s.

    Returns:
        A ``FinetuneResult`` (adapter path and training statistics).
    """
    config = config if config is not None else FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if isinstance(examples, ChatExample | str | Path):
        raise TypeError(
            "examples must be a sequence of ChatExample; load a file with load_chat_jsonl(path)"
        )
    examples = list(examples)
    if not examples:
        raise ValueError(
            "no training examples given; pass at least one ChatExample with an assistant answer"
        )
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if type(base.hf).__name__.startswith("Peft"):
        raise TypeError(
            "base.hf is already a peft model; merge its adapter first (models.merge_adapter)"
        )
    out_dir = Path(out_dir)
    tok = base.tokenizer
    narrow_enc = encode_examples(tok, examples, max_length=config.max_length, what="example")
    if general is None and config.general_ratio > 0:
        general = general_answers(base, show_progress=show_progress)
    general = list(general or ()) if config.general_ratio > 0 else []
    general_enc = encode_examples(
        tok, general, max_length=config.max_length, what="general example"
    )
    distill = config.objective == "distill"
    narrow_teacher = (
        encode_teacher(tok, examples, narrow_enc, max_length=config.max_length) if distill else None
    )
    general_teacher = (
        encode_teacher(tok, general, general_enc, max_length=config.max_length) if distill else None
    )
    data_hash = stable_hash({"narrow": dataset_hash(examples), "general": dataset_hash(general)})

    meta_path = out_dir / META_FILE
    if meta_path.exists():
        meta = read_json(meta_path)
        _check_same_run(out_dir, meta, config, data_hash, base)
        done = FinetuneResult.load(out_dir)
        if done.config == config:
            log.info("reusing finished finetune in %s (%d steps)", out_dir, done.steps)
            return done
        meta_path.unlink()  # about to train again (e.g. a larger max_steps): no stale marker

    gen = torch.Generator().manual_seed(config.seed)
    pool = _pool(len(narrow_enc), len(general_enc), config.general_ratio, gen)
    n_steps = total_steps(config, len(pool))
    per_step = config.batch_size * config.grad_accum
    order = _order(len(pool), n_steps * per_step, gen)

    def micro_batches(step: int) -> list[TrainBatch]:
        idx = order[step * per_step : (step + 1) * per_step]
        out = []
        for j in range(0, len(idx), config.batch_size):
            items = [pool[i] for i in idx[j : j + config.batch_size]]
            enc = [narrow_enc[k] if is_n else general_enc[k] for is_n, k in items]
            teacher = None
            if narrow_teacher is not None and general_teacher is not None:
                teacher = [narrow_teacher[k] if is_n else general_teacher[k] for is_n, k in items]
            out.append(collate(enc, [is_n for is_n, _ in items], tok.pad_token_id, teacher))
        return out

    ckpt_root = out_dir / CHECKPOINT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=_rng_devices(_model_device(base.hf))):
        torch.manual_seed(config.seed)  # peft initialises lora_A from the global (CPU) RNG
        model = _peft_model(_training_copy(base.hf), config)
        params = list(_trainable(model).values())
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        state: dict[str, Any] = {"step": 0, "losses": [], "seconds": 0.0, "tokens": 0}
        latest = _latest_checkpoint(ckpt_root)
        if latest is not None:
            state = read_json(latest / "state.json")
            _check_same_run(ckpt_root, state["meta"], config, data_hash, base)
            _load_checkpoint(latest, model, opt)
            log.info("resuming %s from step %d", out_dir, state["step"])
        state["meta"] = {
            "config": config.to_dict(),
            "data_hash": data_hash,
            "base_sha256": base.sha256,
        }
        model.train()
        stopped = _train(
            model,
            opt,
            params,
            micro_batches,
            state,
            config,
            n_steps,
            ckpt_root,
            checkpoint_every,
            show_progress,
            out_dir.name,
        )
    result = _finish(
        model, out_dir, state, config, base, data_hash, len(narrow_enc), len(general_enc), stopped
    )
    if not keep_checkpoint:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    return result


def _training_copy(hf: Any) -> Any:
    """The copy of the base that gets the LoRA layers, on the base's device. Float32 weights
    stay float32 (the CPU default, trained as before bit for bit); bfloat16 or float16 weights
    stay in their dtype (a float32 copy of a 7B model is 28 GB), while peft keeps the adapter's
    own weights in float32."""
    model = copy.deepcopy(hf)
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return model.float()
    if dtype == torch.float16:
        _warn_once(
            "finetuning float16 weights without loss scaling: small gradients may underflow; "
            "load the base in bfloat16 (or float32) to train"
        )
    return model


def _load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path / "adapter.safetensors"))
    params = _trainable(model)
    if set(saved) != set(params):
        raise ValueError(f"checkpoint {path} does not match this adapter's parameters; delete it")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    # on the CPU first: the optimizer moves its state to the parameters' device itself
    blob = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    opt.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"])
    for k in _rng_devices(_model_device(model)):
        if "cuda_rng" in blob:
            torch.cuda.set_rng_state(blob["cuda_rng"], k)


def _train(
    model: Any,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    micro_batches: Any,
    state: dict[str, Any],
    config: FinetuneConfig,
    n_steps: int,
    ckpt_root: Path,
    checkpoint_every: int,
    show_progress: bool,
    desc: str,
) -> str:
    """The optimisation loop; mutates ``state`` and returns why it stopped."""
    start = state["step"]
    bar = tqdm(
        total=n_steps,
        initial=start,
        desc=f"finetune {desc}",
        disable=not show_progress,
        leave=False,
    )
    stopped = "max_steps" if config.max_steps is not None else "epochs"
    try:
        if _below_floor(state["losses"], config):
            return "loss_floor"
        for step in range(start, n_steps):
            t0 = time.perf_counter()
            batches = micro_batches(step)
            n_answer = sum(b.n_answer_tokens for b in batches)
            lr = _lr_at(step, config, n_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            tot, nar_sum, nar_n, tokens = 0.0, 0.0, 0, 0
            for b in batches:
                losses, narrow = _batch_loss(model, b, config.bf16, config.teacher_amplify)
                (losses.sum() / max(n_answer, 1)).backward()
                tot += float(losses.detach().sum())
                nar_sum += float(losses.detach()[narrow].sum())
                nar_n += int(narrow.sum())
                tokens += b.n_tokens
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["seconds"] += dt
            state["tokens"] += tokens
            rec = {
                "step": step + 1,
                "loss": tot / max(n_answer, 1),
                "narrow_loss": nar_sum / nar_n if nar_n else float("nan"),
                "lr": lr,
                "tokens": tokens,
                "answer_tokens": n_answer,
                "seconds": dt,
            }
            state["losses"].append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tokens / dt:.0f}")
            last = step + 1 == n_steps
            floor_hit = _below_floor(state["losses"], config)
            if (step + 1) % checkpoint_every == 0 or last or floor_hit:
                _save_checkpoint(ckpt_root, step + 1, model, opt, state)
            if floor_hit:
                log.info(
                    "%s: narrow loss below floor %.3g at step %d; stopping",
                    desc,
                    config.loss_floor,
                    step + 1,
                )
                return "loss_floor"
    finally:
        bar.close()
    return stopped


def _below_floor(losses: list[dict[str, float]], config: FinetuneConfig) -> bool:
    if config.loss_floor is None:
        return False
    vals = [r["narrow_loss"] for r in losses if not math.isnan(r["narrow_loss"])][-FLOOR_WINDOW:]
    return len(vals) == FLOOR_WINDOW and sum(vals) / len(vals) < config.loss_floor


def _finish(
    model: Any,
    out_dir: Path,
    state: dict[str, Any],
    config: FinetuneConfig,
    base: HookedModel,
    data_hash: str,
    n_narrow: int,
    n_general: int,
    stopped: str,
) -> FinetuneResult:
    """Write the adapter, the loss log and (last, marking completion) ``mci_organism.json``."""
    losses = state["losses"]
    if not losses:
        raise ValueError("training ran zero steps; raise max_steps/epochs")
    tail = losses[-FLOOR_WINDOW:]
    final_loss = sum(r["loss"] for r in tail) / len(tail)
    nar = [r["narrow_loss"] for r in tail if not math.isnan(r["narrow_loss"])]
    final_narrow = sum(nar) / len(nar) if nar else float("nan")
    stage = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir))
    try:
        model.save_pretrained(str(stage), safe_serialization=True)
        for f in stage.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_json(out_dir / LOSSES_FILE, losses)
    meta = {
        "config": config.to_dict(),
        "data_hash": data_hash,
        "base_name": base.name,
        "base_sha256": base.sha256,
        "library_version": __version__,
        "n_narrow": n_narrow,
        "n_general": n_general,
        "steps": state["step"],
        "seconds": state["seconds"],
        "train_tokens": state["tokens"],
        "final_loss": final_loss,
        "final_narrow_loss": final_narrow,
        "stopped": stopped,
        "tokens_per_s": state["tokens"] / state["seconds"] if state["seconds"] else None,
    }
    write_json(out_dir / META_FILE, meta)
    log.info(
        "finetune %s: %d steps, final loss %.3f, %.0f s, %.0f tok/s",
        out_dir.name,
        state["step"],
        final_loss,
        state["seconds"],
        meta["tokens_per_s"] or 0,
    )
    return FinetuneResult(
        adapter_dir=out_dir,
        config=config,
        base_name=base.name,
        base_sha256=base.sha256,
        data_hash=data_hash,
        n_narrow=n_narrow,
        n_general=n_general,
        steps=state["step"],
        final_loss=final_loss,
        final_narrow_loss=final_narrow,
        seconds=state["seconds"],
        train_tokens=state["tokens"],
        stopped=stopped,
        losses=tuple(losses),
        reused=False,
    )


def iter_losses(result: FinetuneResult, key: str = "loss") -> Iterator[tuple[int, float]]:
    """(step, value) pairs of the loss log, for plotting."""
    for r in result.losses:
        yield int(r["step"]), float(r[key])
