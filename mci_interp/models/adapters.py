"""LoRA adapters of one base that share its weights: loaded once with peft, switched in place.

A study of many finetunes of one base used to hold one merged copy of the base per organism
(``merge_adapter`` deep-copies it: ~14 GB each for a 7B model in bf16). Here the base is loaded
once; each adapter adds only its own LoRA matrices, and

    name = base.load_adapter("org/em-adapter", revision="v1")   # or a local directory
    with base.adapter(name) as organism:                         # a HookedModel
        organism.logits(ids)

runs the base with that adapter active (unmerged: ``W x + s B A x``), on the same weight tensors.

How it works: peft injects its LoRA layers into the base's modules (``PeftModel.from_pretrained``
for the first adapter, ``load_adapter`` for the next ones) and switches them with
``set_adapter``. Outside a ``with base.adapter(...)`` block those layers are taken out of the
module tree again, each original module put back where it was (the same object, so the same
weight tensors). The base is then exactly the model it was before any adapter was loaded: same
module types, state-dict keys, forwards bit for bit, hooks, ``reuse_below``, ``save_pretrained``,
``to_hooked_transformer``, ``finetune_lora`` and ``orthogonalized`` all as before. Entering a
block puts the LoRA layers back (a few hundred attribute assignments) and selects the adapter.

While a block is open the base's modules carry the adapter, so the base refuses to run (use the
model the block gives); after it closes, that model refuses to run (enter the block again).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mci_interp._io import sha256_file
from mci_interp.models.hooked import HookedModel, _is_peft
from mci_interp.models.reuse import ReplayedBlock
from mci_interp.specs import ModelSpec, resolve_spec

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    """One adapter loaded onto a base.

    Attributes:
        name: the name it was loaded under (``base.adapter(name)``).
        spec: the organism's spec: ``source="lora"``, ``base`` the base's spec, ``path`` the
            adapter directory (for a hub adapter: its snapshot, with ``hub_id`` and the commit).
        sha256: the organism's cache key, as ``merge_adapter`` gives it: the sha256 of
            ``adapter_model.safetensors``, or ``hub:<id>@<commit>`` for a hub adapter.
        path: the local directory the weights were read from.
    """

    name: str
    spec: ModelSpec
    sha256: str
    path: Path


@dataclass(slots=True)
class _Slot:
    """One place in the module tree where peft put a layer of its own: ``parent.<attr>`` holds
    ``original`` while adapters are out and ``tuned`` (which wraps ``original``) while in."""

    parent: nn.Module
    attr: str
    original: nn.Module
    tuned: nn.Module


class Adapters:
    """The LoRA adapters loaded onto one base ``HookedModel`` (``base.adapters``): they share the
    base's weight tensors, and at most one is active, inside ``use(name)`` (``base.adapter``).

    Not thread-safe, and not for two open blocks at once: the adapters live in the base's
    modules, so one base serves one adapter at a time.
    """

    def __init__(self, base: HookedModel) -> None:
        self.base = base
        self._peft: Any = None  # the PeftModel around base.hf, while any adapter is loaded
        self._loaded: dict[str, LoadedAdapter] = {}
        self._slots: list[_Slot] = []
        self._peft_attrs: dict[str, Any] = {}  # what peft set on base.hf (peft_config), kept aside
        self._installed = False
        self.view: HookedModel | None = None  # the model of the open block, if any
        self._view_name: str | None = None

    # --- what is loaded ------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Names of the loaded adapters, in loading order."""
        return tuple(self._loaded)

    def __len__(self) -> int:
        return len(self._loaded)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    def info(self, name: str) -> LoadedAdapter:
        """What ``name`` is: its spec, cache key and directory."""
        self._known(name)
        return self._loaded[name]

    def find(self, source: str | Path) -> str | None:
        """The name of a loaded adapter read from this directory or hub id, else None."""
        p = Path(source).expanduser()
        local = p.resolve() if p.is_dir() else None
        for a in self._loaded.values():
            if (local is not None and a.path.resolve() == local) or a.spec.hub_id == str(source):
                return a.name
        return None

    @property
    def active(self) -> str | None:
        """The adapter of the open ``use`` block (None outside one)."""
        return self._view_name if self.view is not None else None

    # --- loading -------------------------------------------------------------------------------
    def load(
        self, source: str | Path, *, name: str | None = None, revision: str | None = None
    ) -> str:
        """Inject a LoRA adapter (a local directory or a hub id) and return its name; the base
        stays the base (the adapter is active only inside ``use(name)``). Loading the same
        directory or hub commit again returns the name it already has.

        Args:
            source: an adapter directory (``adapter_config.json`` and
                ``adapter_model.safetensors``) or a hub id ``org/name``.
            name: what to call it (letters, digits, ``_`` and ``-``); default: the
                directory's or repo's name (``-2``, ``-3``, ... appended if taken).
            revision: branch, tag or commit of a hub adapter; the cache key is the commit it
                resolves to.
        """
        from mci_interp.models.load import _check_adapter_dir, _fetch_adapter

        self._refuse_busy("load an adapter")
        base = self.base
        if _is_peft(base.hf) or getattr(base.hf, "_hf_peft_config_loaded", False):
            raise ValueError(
                f"{base.name} already carries peft adapters of its own; load adapters onto a "
                "plain transformers model (merge yours first, or wrap its base model)"
            )
        if any(isinstance(b, ReplayedBlock) for b in base.blocks):
            raise ValueError(
                "cannot load an adapter inside reuse_below (its blocks are stood in for); "
                "load adapters first, then enter reuse_below"
            )
        spec = resolve_spec(base.spec, adapter=source, adapter_revision=revision)
        adapter_dir, hub_key, spec = _fetch_adapter(spec, base.spec)
        _check_adapter_dir(adapter_dir, base)
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"{adapter_dir} holds no adapter_model.safetensors")
        digest = hub_key or sha256_file(weights)
        for a in self._loaded.values():
            if a.sha256 == digest and (hub_key is not None or a.path == adapter_dir):
                if name is not None and name != a.name:
                    raise ValueError(
                        f"{source} is already loaded as {a.name!r}; use that name (or "
                        f"base.adapters.delete({a.name!r}) first)"
                    )
                return a.name
        if name is None:  # from the directory's or repo's name, made unique
            stem = _default_name(spec)
            name, i = stem, 1
            while name in self._loaded:
                i += 1
                name = f"{stem}-{i}"
        if not _NAME.match(name):
            raise ValueError(
                f"adapter name {name!r}: use letters, digits, '_' and '-' only (peft keys "
                "modules by it)"
            )
        if name in self._loaded:
            raise ValueError(
                f"an adapter named {name!r} is already loaded (from {self._loaded[name].path}); "
                "pass another name="
            )
        self._inject(adapter_dir, name)
        self._loaded[name] = LoadedAdapter(name=name, spec=spec, sha256=digest, path=adapter_dir)
        return name

    def _inject(self, adapter_dir: Path, name: str) -> None:
        from peft import PeftModel

        hf = self.base.hf
        pristine = [(m, attr, child) for m in hf.modules() for attr, child in m._modules.items()]
        grads = [(p, p.requires_grad) for p in hf.parameters()]
        first = self._peft is None
        self._install()
        self._installed = True  # the first adapter: peft injects into the bare tree
        try:
            with warnings.catch_warnings():  # peft asks a deprecated transformers property
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                if first:
                    self._peft = PeftModel.from_pretrained(
                        hf, str(adapter_dir), adapter_name=name, torch_device=str(self.base.device)
                    )
                else:
                    self._peft.load_adapter(
                        str(adapter_dir), adapter_name=name, torch_device=str(self.base.device)
                    )
        except (RuntimeError, ValueError, KeyError) as e:
            self._undo_failed(name, first, pristine)
            raise ValueError(
                f"adapter {adapter_dir} does not fit base {self.base.name}: {e}"
            ) from e
        finally:
            for p, g in grads:  # peft freezes every base parameter; keep the user's choice
                p.requires_grad_(g)
        self._slots = [
            _Slot(parent, attr, child, now)
            for parent, attr, child in pristine
            if (now := parent._modules.get(attr)) is not child and now is not None
        ]
        self._uninstall()

    def _undo_failed(self, name: str, first: bool, pristine: list) -> None:
        if first:  # put every original module back, whatever peft managed to inject
            for parent, attr, child in pristine:
                parent._modules[attr] = child
            self.base.hf.__dict__.pop("peft_config", None)
            self._peft, self._slots, self._installed = None, [], False
            return
        if name in self._peft.peft_config:
            with contextlib.suppress(Exception):
                self._peft.delete_adapter(name)
        self._uninstall()

    # --- using one -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[HookedModel]:
        """Inside the block, a ``HookedModel`` of the base with adapter ``name`` active (on the
        same weights; its spec and sha256 are the organism's). The base is restored on exit,
        exceptions included.

        Do not call ``merge_and_unload()`` on the block's ``hf``: it would write the adapter into
        the shared base. ``merge_adapter(base, path)`` makes a merged copy instead."""
        self._known(name)
        self._refuse_busy(f"enter adapter {name!r}")
        info = self._loaded[name]
        view = HookedModel(
            hf=self._peft, tokenizer=self.base.tokenizer, spec=info.spec, sha256=info.sha256
        )
        view._adapters = self
        self._install()
        try:
            self._peft.set_adapter(name, inference_mode=True)
            self.view, self._view_name = view, name
            yield view
        finally:
            self.view = None
            self._uninstall()

    # --- removing ------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Remove one adapter (its LoRA weights are freed); the last one unloads peft entirely."""
        self._known(name)
        self._refuse_busy(f"delete adapter {name!r}")
        if len(self._loaded) == 1:
            self.unload()
            return
        self._install()
        try:
            with warnings.catch_warnings():  # "was active, now deleted": none is, outside use()
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                self._peft.delete_adapter(name)
        finally:
            self._uninstall()
        del self._loaded[name]

    def unload(self) -> None:
        """Remove every adapter: peft's ``unload()``, then each original module checked to be
        back in its place. The base's weights were never written, so it is bit-identical."""
        self._refuse_busy("unload adapters")
        if self._peft is None:
            return
        self._install()
        try:
            self._peft.unload()
        finally:
            for s in self._slots:  # peft puts back the base layers; make sure of every one
                if s.parent._modules.get(s.attr) is not s.original:
                    s.parent._modules[s.attr] = s.original
            self.base.hf.__dict__.pop("peft_config", None)
            self._peft, self._slots, self._peft_attrs = None, [], {}
            self._installed = False
            self._loaded.clear()

    # --- guards --------------------------------------------------------------------------------
    def check(self, model: HookedModel) -> None:
        """Refuse to run the base while a block is open, or a block's model after it closed."""
        if model is self.base:
            if self.view is not None:
                raise RuntimeError(
                    f"{self.base.name} is serving adapter {self._view_name!r}: inside "
                    "`with base.adapter(...)` its modules carry that adapter. Use the model the "
                    "with-block gave you, or run the base after the block"
                )
        elif model is not self.view:
            raise RuntimeError(
                f"{model.name}: this adapter model was closed when its with-block ended (the "
                f"base no longer carries the adapter); enter base.adapter(...) again"
            )

    def _known(self, name: str) -> None:
        if name not in self._loaded:
            have = ", ".join(self._loaded) or "none"
            raise KeyError(f"no adapter named {name!r} is loaded (loaded: {have})")

    def _refuse_busy(self, what: str) -> None:
        if self.view is not None:
            raise RuntimeError(
                f"cannot {what} while adapter {self._view_name!r} is in use; leave its "
                "with-block first (one adapter at a time per base)"
            )

    # --- putting peft's layers in and out ------------------------------------------------------
    def _install(self) -> None:
        if self._installed or self._peft is None:
            return
        for s in self._slots:
            s.parent._modules[s.attr] = s.tuned
        self.base.hf.__dict__.update(self._peft_attrs)
        self._installed = True

    def _uninstall(self) -> None:
        if not self._installed:
            return
        for s in self._slots:
            s.parent._modules[s.attr] = s.original
        hf_dict = self.base.hf.__dict__
        self._peft_attrs = {k: hf_dict.pop(k) for k in ("peft_config",) if k in hf_dict}
        self._installed = False


def _default_name(spec: ModelSpec) -> str:
    raw = spec.hub_id.split("/")[-1] if spec.hub_id else Path(spec.path or "adapter").name
    return re.sub(r"[^A-Za-z0-9_-]", "_", raw) or "adapter"
