"""Running an organism: ``organism_model(base, organism)`` gives its weights as a ``HookedModel``
(adapters switched on the base's own weights, nothing copied); ``load_organism`` a standalone
merged copy."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from mci_interp.models import HookedModel, merge_adapter
from mci_interp.organisms.suite import Organism


def _organism_weights(base: HookedModel, organism: Organism) -> Path | None:
    """The adapter directory of an organism (None: it runs on the base's own weights); refuses
    an unbuilt or missing one."""
    if organism.adapter_dir is None:
        if organism.spec.trains:
            raise ValueError(
                f"organism {organism.name} ({organism.kind}) has no adapter; build it with build_suite"
            )
        return None
    if not (Path(organism.adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"adapter of {organism.name} is missing at {organism.adapter_dir}; rebuild it with build_suite"
        )
    return Path(organism.adapter_dir)


def _load_full_checkpoint(base: HookedModel, ckpt: str) -> HookedModel:
    from mci_interp.models import load_model

    model = load_model(ckpt, base=base, dtype=base.dtype, device=base.device)
    base.check_same_family(model)
    return model


@contextlib.contextmanager
def organism_model(base: HookedModel, organism: Organism) -> Iterator[HookedModel]:
    """``with organism_model(base, organism) as model:`` the organism's weights as a
    ``HookedModel`` for the body of the block.

    - ``base`` and ``prompted``: the base itself (apply ``organism.system_prompt`` /
      ``organism.prepare`` to prompts).
    - a LoRA adapter (every trained organism, and a user's adapter checkpoint): the base with the
      adapter active, sharing the base's weights (``base.adapter``; nothing is copied). An
      adapter already loaded onto the base (``base.load_adapter`` of the same directory) is used
      and stays loaded, so switching between preloaded organisms costs no loading; otherwise it
      is loaded for the block and removed after. Either way the base is itself again on exit,
      exceptions included, and refuses to run inside the block.
    - a full-weight checkpoint: loaded on its own in the base's dtype and device, and dropped
      on exit.

    Results are the merged model's up to float rounding (the adapter is applied unmerged,
    ``W x + s B A x``); the model's ``sha256`` is the adapter's, as ``merge_adapter`` gives it.
    """
    ckpt = organism.spec.checkpoint
    if ckpt is not None and organism.adapter_dir is None:  # a full model
        model = _load_full_checkpoint(base, ckpt)
        try:
            yield model
        finally:
            del model
        return
    adapter_dir = _organism_weights(base, organism)
    if adapter_dir is None:
        yield base
        return
    name = base.adapters.find(adapter_dir)
    loaded_here = name is None
    if name is None:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", organism.key)
        name, i = stem, 1
        while name in base.adapters:
            i += 1
            name = f"{stem}-{i}"
        name = base.load_adapter(adapter_dir, name=name)
    try:
        with base.adapter(name) as model:
            yield model
    finally:
        if loaded_here and name in base.adapters:
            base.adapters.delete(name)


def load_organism(base: HookedModel, organism: Organism) -> HookedModel:
    """The organism's weights as a standalone ``HookedModel``: the base itself for ``base`` and
    ``prompted``, a full checkpoint loaded on its own, else a *copy* of the base with the adapter
    merged in (``merge_adapter``: a whole model's memory each). The study pipeline does not use
    it; ``organism_model`` shares the base's weights instead."""
    ckpt = organism.spec.checkpoint
    if ckpt is not None and organism.adapter_dir is None:  # a full model
        return _load_full_checkpoint(base, ckpt)
    adapter_dir = _organism_weights(base, organism)
    if adapter_dir is None:
        return base
    return merge_adapter(base, adapter_dir)
