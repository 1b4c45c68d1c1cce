"""Load a ModelSpec into a ``HookedModel``: a Hugging Face causal LM with TransformerLens-named
hook points on its raw, unprocessed weights.

Why not TransformerLens' ``HookedTransformer`` as the engine: it rejects SmolLM2/Qwen by name,
needs weight processing to be switched off by hand, and its ``run_with_cache`` runs at ~0.85x of
a bare HF forward here. Hooking the HF modules directly keeps the exact HF basis (directions match
``hidden_states``), HF's KV-cached ``generate``, accelerate's device maps and peft's LoRA on the
same object. ``to_hooked_transformer`` converts for users who want TransformerLens (and sae-lens
tooling).

Modules: ``hooked`` (``HookedModel``, hooks, ``reuse_below``), ``load`` (specs to models: dtypes,
devices, hub revisions, adapters), ``adapters`` (LoRA adapters sharing one base's weights:
``base.load_adapter`` / ``with base.adapter(name)``), ``packaged`` (packaged GGUF to HF),
``interop`` (TransformerLens).
"""

from mci_interp.models.adapters import Adapters, LoadedAdapter
from mci_interp.models.hooked import (
    HookContext,
    HookedModel,
    HookFn,
    prepare_for_inference,
    weights_sha256,
)
from mci_interp.models.interop import to_hooked_transformer
from mci_interp.models.load import (
    DTYPE_CHOICES,
    DTYPES,
    load_model,
    merge_adapter,
    model_dir,
    parse_device,
    parse_dtype,
    resolve_commit,
    save_atomic_dir,
)
from mci_interp.models.packaged import convert_packaged

__all__ = [
    "Adapters",
    "DTYPES",
    "DTYPE_CHOICES",
    "HookContext",
    "HookFn",
    "HookedModel",
    "LoadedAdapter",
    "convert_packaged",
    "load_model",
    "merge_adapter",
    "model_dir",
    "parse_device",
    "parse_dtype",
    "prepare_for_inference",
    "resolve_commit",
    "save_atomic_dir",
    "to_hooked_transformer",
    "weights_sha256",
]
