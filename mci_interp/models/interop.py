"""Hand a ``HookedModel`` to TransformerLens (and so to sae-lens tooling): the only place a
TransformerLens loader is called."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from mci_interp.models.hooked import HookedModel


def to_hooked_transformer(model: HookedModel, *, dtype: torch.dtype | None = None) -> Any:
    """Convert to a TransformerLens ``HookedTransformer`` with raw weights (no folding/centring),
    on the model's device and, unless ``dtype`` says otherwise, in its dtype. The HookedModel
    itself is left as it was. In float32, log-probs agree with the HF model to ~1e-4."""
    from transformer_lens import HookedTransformer, loading

    model._check_serving()
    if model._adapters is not None and model._adapters.base is not model:
        raise ValueError(
            f"{model.name} is an unmerged adapter sharing its base's weights; convert a merged "
            "copy: to_hooked_transformer(merge_adapter(base, model.spec.path))"
        )
    if model.is_peft:
        raise ValueError(
            f"{model.name} has an unmerged peft adapter; merge it first "
            "(HookedModel.from_hf(model.hf.merge_and_unload(), model.tokenizer))"
        )
    want = model.dtype if dtype is None else dtype
    with tempfile.TemporaryDirectory() as d:
        # TransformerLens reads the architecture from a directory; the weights come from the
        # model in memory, so only the config and tokenizer are written
        model.hf.config.save_pretrained(d)
        model.tokenizer.save_pretrained(d)
        cfg = loading.get_pretrained_model_config(
            d,
            hf_cfg=model.hf.config.to_dict(),
            fold_ln=False,
            dtype=want,
            device=model.device,
        )
        state = loading.get_pretrained_state_dict(d, cfg, hf_model=model.hf, dtype=want)
    ht = HookedTransformer(cfg, model.tokenizer, move_to_device=False)
    ht.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return ht if model.device.type == "cpu" else ht.to(model.device)
