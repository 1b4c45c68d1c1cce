"""The settings of one finetune (``FinetuneConfig``, part of every cached organism's key), what
a finished run records (``FinetuneResult``) and the names of the files a run writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mci_interp._io import check_keys, read_json

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
        check_keys(d, cls, "FinetuneConfig")
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
