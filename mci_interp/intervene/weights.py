"""Weight orthogonalisation: the direction projected out of every residual writer for a ``with``
block (the exact tensors restored on exit), or saved as a model directory of its own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mci_interp._io import write_json
from mci_interp.direction import Direction
from mci_interp.intervene.interventions import _check_direction, _unit
from mci_interp.models import HookedModel, save_atomic_dir


def _tied(model: HookedModel) -> bool:
    out = model.hf.get_output_embeddings()
    return out is not None and out.weight is model.hf.get_input_embeddings().weight


@contextlib.contextmanager
def orthogonalized(model: HookedModel, direction: Direction | Tensor) -> Iterator[HookedModel]:
    """Project the direction out of every residual writer for the body of a ``with``.

    Matrices ``W [d_model, *]`` become ``W - u u^T W``, embedding rows ``E - (E u) u^T``, biases
    ``b - (b.u)u``; the exact original tensors come back on exit, exceptions included. With tied
    input/output embeddings (SmolLM2) only the *input* embedding is orthogonalised: it gets its own
    edited copy for the duration, the unembedding keeps the original, so the result equals
    ``Ablate(direction, sites="all")`` (which never touches the unembedding).
    """
    _check_direction(direction, model)
    u64 = _unit(direction).double()
    embed_module = model.hf.get_input_embeddings()
    tied = _tied(model)
    saved: list[tuple[torch.nn.Parameter, Tensor]] = []
    original_embed = embed_module.weight
    try:
        with torch.no_grad():
            for name, param in model.residual_writers():
                u = u64.to(param.device)
                w = param.detach().double()
                if name == "embed":
                    new = w - (w @ u)[:, None] * u[None, :]
                elif param.ndim == 1:
                    new = w - (w @ u) * u
                else:
                    new = w - u[:, None] * (u @ w)[None, :]
                new = new.to(param.dtype)
                if name == "embed" and tied:
                    embed_module.weight = torch.nn.Parameter(new, requires_grad=False)
                else:
                    saved.append((param, param.detach().clone()))
                    param.copy_(new)
        yield model
    finally:
        with torch.no_grad():
            for param, orig in saved:
                param.copy_(orig)
        embed_module.weight = original_embed


def export_orthogonalized(
    model: HookedModel, direction: Direction | Tensor, path: Path | str
) -> Path:
    """Save an orthogonalised copy of the model as a normal HF directory (reloads with
    ``load_model(path)``). Tied embeddings are saved untied (``tie_word_embeddings=False``) so the
    unembedding stays the original, matching ``orthogonalized``."""
    path = Path(path)
    config = model.hf.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    old_tie = getattr(text_config, "tie_word_embeddings", None)
    out_emb = model.hf.get_output_embeddings()
    old_out_weight = out_emb.weight if out_emb is not None else None
    tied = _tied(model)
    try:
        with orthogonalized(model, direction):
            if tied and old_out_weight is not None:
                text_config.tie_word_embeddings = False
                if config is not text_config:
                    config.tie_word_embeddings = False
                # a separate copy, so the saver cannot treat the head as shared
                out_emb.weight = torch.nn.Parameter(
                    old_out_weight.detach().clone(), requires_grad=False
                )
            save_atomic_dir(model, path)
    finally:
        if tied:
            out_emb.weight = old_out_weight
            text_config.tie_word_embeddings = old_tie
            if config is not text_config:
                config.tie_word_embeddings = old_tie
    meta: dict[str, Any] = {
        "intervention": "orthogonalized",
        "source_model": model.name,
        "source_sha256": model.sha256,
        "untied_embeddings": tied,
    }
    if isinstance(direction, Direction):
        meta.update(
            direction=direction.name,
            direction_site=direction.site.hook_name,
            direction_provenance=direction.provenance.to_dict(),
        )
    write_json(path / "mci_intervention.json", meta)
    return path
