"""The per-token losses of a micro-batch: cross-entropy on the answer tokens, or the KL from the
adapter-free teacher (context distillation, optionally amplified; the package docstring says
how), with the LM head applied on answer positions only."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor

from mci_interp.organisms.finetune.batches import TrainBatch

log = logging.getLogger(__name__)


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
