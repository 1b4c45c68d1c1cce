"""Resumable checkpoints (adapter, optimizer and RNG state, written so that a crash at any moment
leaves one complete checkpoint) and the check that a checkpoint or finished run was made with the
same config, data and base."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mci_interp._io import read_json, write_json
from mci_interp.models import HookedModel
from mci_interp.organisms.finetune.config import _STOP_FIELDS, FinetuneConfig


def _model_device(model: Any) -> torch.device:
    """Where the model's inputs go: its input embedding's device."""
    return model.get_input_embeddings().weight.device


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG a run forks, seeds and checkpoints (dropout draws there)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


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
