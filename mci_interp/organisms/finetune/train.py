"""The training loop: ``finetune_lora`` sets up the run (data, pool, order, peft model, resume),
``_train`` optimises, ``_finish`` writes the adapter and marks the run complete. Why this loop is
our own rather than a maintained trainer's is the package docstring's last part."""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mci_interp import __version__
from mci_interp._io import read_json, stable_hash, write_json
from mci_interp.datasets import ChatExample, dataset_hash
from mci_interp.models import HookedModel
from mci_interp.organisms.finetune.batches import (
    TrainBatch,
    _order,
    _pool,
    collate,
    encode_examples,
    encode_teacher,
    total_steps,
)
from mci_interp.organisms.finetune.checkpoint import (
    _check_same_run,
    _latest_checkpoint,
    _load_checkpoint,
    _model_device,
    _rng_devices,
    _save_checkpoint,
    _trainable,
)
from mci_interp.organisms.finetune.config import (
    CHECKPOINT_DIR,
    FLOOR_WINDOW,
    LOSSES_FILE,
    META_FILE,
    FinetuneConfig,
    FinetuneResult,
)
from mci_interp.organisms.finetune.general import general_answers
from mci_interp.organisms.finetune.loss import _batch_loss, _warn_once

log = logging.getLogger(__name__)


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
