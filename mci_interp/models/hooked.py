"""``HookedModel``: a Hugging Face causal LM (or a peft model around one) with TransformerLens-named
hook points on its raw weights, the hooks themselves and ``reuse_below``.

Why one module over ~500 lines: everything here acts on one module tree through one object
(hook registration, the context managers that undo it, the adapter switch that must see the
hooks); what stands alone is elsewhere (loading in ``load``, adapters in ``adapters``, the
replay machinery in ``reuse``)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mci_interp.models.reuse import ReplayedBlock, reuse_below
from mci_interp.sites import Site, as_site
from mci_interp.specs import ModelSpec, resolve_spec

if TYPE_CHECKING:
    from mci_interp.models.adapters import Adapters

log = logging.getLogger(__name__)

HookFn = Callable[[Tensor, "HookContext"], Tensor | None]


class _StopForward(Exception):
    """Raised by the truncation hook after the deepest requested block."""


def _is_peft(model: Any) -> bool:
    return type(model).__module__.split(".")[0] == "peft"


@dataclass
class HookContext:
    """What a hook may need to know besides the activations.

    ``past_len`` is the number of positions already in the KV cache (0 on a full forward or the
    prefill of generation); ``prompt_len`` is the padded prompt length during generation (None
    otherwise), so a hook can tell prompt positions from generated ones.
    """

    past_len: int = 0
    prompt_len: int | None = None
    attention_mask: Tensor | None = None


def prepare_for_inference(hf: Any, tok: Any, *, freeze: bool = True) -> None:
    """Eval mode (no dropout), a pad token (eos if none) and right padding, as every scorer here
    expects; ``freeze`` also turns off gradients of every parameter."""
    hf.eval()
    if freeze:
        hf.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    gen = getattr(hf, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tok.pad_token_id


def weights_sha256(model: nn.Module) -> str:
    """sha256 of every parameter's name, dtype, shape and bytes, one tensor at a time (host memory
    stays at one tensor): the cache key of a model that was loaded elsewhere."""
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ValueError(
                f"cannot fingerprint {type(model).__name__}: parameter {name} is offloaded (meta "
                "device); pass sha256= to HookedModel.from_hf"
            )
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        flat = p.detach().reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes())
    log.info("hashed the weights of %s in %.1fs", type(model).__name__, time.perf_counter() - t0)
    return h.hexdigest()


@dataclass(eq=False)
class HookedModel:
    """A causal LM with hook points named like TransformerLens (``blocks.{l}.hook_resid_post``).

    Holds the HF model (``hf``, possibly a peft ``PeftModel``), its tokenizer, the spec it came
    from and ``sha256``, the key results are cached under (the weights' hash, or
    ``hub:<id>@<commit>`` for a hub checkpoint). Hooks are added only through ``hooks(...)``, a
    context manager that removes them on exit, exceptions included.
    """

    hf: Any
    tokenizer: Any
    spec: ModelSpec
    sha256: str
    ctx: HookContext = field(default_factory=HookContext)
    # the adapters this base carries, or (on a model from ``base.adapter(...)``) those it is one of
    _adapters: Any = field(default=None, init=False, repr=False)

    @classmethod
    def from_hf(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        base: str | ModelSpec | HookedModel | None = None,
        sha256: str | None = None,
    ) -> HookedModel:
        """Wrap a model you already loaded: a transformers ``PreTrainedModel`` or a peft
        ``PeftModel`` around one (hooks reach its decoder blocks through the wrapper, and the
        active adapter takes part in every forward).

        Args:
            model: the causal LM, on any device and in any dtype.
            tokenizer: its tokenizer. It gets a pad token (eos if it has none) and right
                padding, and the model is put in eval mode, as ``load_model`` does.
            name: what results call it; defaults to the model's ``name_or_path``.
            base: the model it is a finetune of (a name, spec or ``HookedModel``), so
                ``model_diff`` accepts it against that base. For a peft model it defaults to
                the adapter's ``base_model_name_or_path``.
            sha256: its cache key. Without it the weights are hashed once (one tensor at a
                time through host memory, a few seconds per GB); pass e.g.
                ``"hub:org/name@<commit>"`` when you know the weights are that checkpoint's.
        """
        if isinstance(model, HookedModel):
            raise TypeError("model is already a HookedModel; use it directly")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(
                f"from_hf wraps a transformers or peft model, got {type(model).__name__}; load "
                "one with AutoModelForCausalLM.from_pretrained or use load_model"
            )
        if not callable(getattr(tokenizer, "get_vocab", None)):
            raise TypeError(
                f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
            )
        peft = _is_peft(model)
        base_spec: ModelSpec | None
        if isinstance(base, HookedModel):
            base_spec = base.spec
        elif isinstance(base, str):
            try:
                base_spec = resolve_spec(base)
            except ValueError:  # a label of the user's own: compared by name only
                base_spec = ModelSpec(name=base, source="memory")
        elif base is not None:
            base_spec = base
        elif peft:
            wrapper: Any = model
            cfg = wrapper.peft_config[wrapper.active_adapter]
            base_id = getattr(cfg, "base_model_name_or_path", None)
            base_spec = ModelSpec(name=str(base_id), source="memory") if base_id else None
        else:
            base_spec = None
        label = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        if peft and name is None:
            label = f"{label}+{getattr(model, 'active_adapter', 'adapter')}"
        spec = ModelSpec(name=label, source="memory", base=base_spec)
        prepare_for_inference(model, tokenizer, freeze=False)
        digest = sha256 or ("weights:" + weights_sha256(model))
        wrapped = cls(hf=model, tokenizer=tokenizer, spec=spec, sha256=digest)
        wrapped.blocks  # noqa: B018 -- refuse an unsupported architecture now, not mid-forward
        if isinstance(base, HookedModel):
            base.check_same_family(wrapped)
        return wrapped

    # --- shape facts -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_name(self) -> str:
        return self.spec.base_name

    @property
    def is_peft(self) -> bool:
        """Whether ``hf`` is a peft model (an adapter not merged into the weights)."""
        return _is_peft(self.hf)

    @property
    def lm(self) -> Any:
        """The transformers causal LM itself, under any peft wrapper."""
        self._check_serving()
        return self.hf.get_base_model() if self.is_peft else self.hf

    def _check_serving(self) -> None:
        """Refuse a base whose modules serve an adapter right now, or an adapter model whose
        ``with base.adapter(...)`` block has closed (both would compute the wrong model)."""
        if self._adapters is not None:
            self._adapters.check(self)

    # --- adapters sharing this base's weights ---------------------------------------------------
    @property
    def adapters(self) -> Adapters:
        """The LoRA adapters loaded onto this base (``models.adapters.Adapters``): ``names``,
        ``info(name)``, ``find(path)``, ``delete(name)``, ``unload()``."""
        from mci_interp.models.adapters import Adapters

        if self._adapters is None:
            self._adapters = Adapters(self)
        elif self._adapters.base is not self:
            raise ValueError(
                f"{self.name} is an adapter of {self._adapters.base.name}; load adapters onto "
                "the base"
            )
        return self._adapters

    def load_adapter(
        self, source: str | Path, *, name: str | None = None, revision: str | None = None
    ) -> str:
        """Load a LoRA adapter (local directory or hub id, ``revision`` for a hub one) onto this
        base, sharing its weights, and return its name. It stays inactive: the base computes the
        base until ``with base.adapter(name) as organism:``. See ``models.adapters``."""
        return self.adapters.load(source, name=name, revision=revision)

    def adapter(self, name: str) -> contextlib.AbstractContextManager[HookedModel]:
        """``with base.adapter(name) as organism:`` a HookedModel of this base with the loaded
        adapter ``name`` active (unmerged, on the same weight tensors; its spec and sha256 are
        the organism's). The base is restored on exit, exceptions included; meanwhile the base
        itself refuses to run. One adapter at a time."""
        return self.adapters.use(name)

    def unload_adapters(self) -> None:
        """Remove every loaded adapter and peft with them: the original modules are back and
        the base is bit-identical to before (its weights were never written)."""
        if self._adapters is not None:
            self.adapters.unload()

    @property
    def decoder(self) -> Any:
        """The decoder stack (embeddings, blocks, final norm) without the unembedding."""
        lm = self.lm
        get = getattr(lm, "get_decoder", None)
        dec = get() if callable(get) else None
        return dec if dec is not None else lm.model

    @property
    def blocks(self) -> Any:
        layers = getattr(self.decoder, "layers", None)
        if layers is None:
            raise TypeError(
                f"{type(self.lm).__name__} is not a Llama-style decoder (model.layers); supported "
                "architectures: Llama, Qwen2, Mistral, Gemma and others with that layout"
            )
        return layers

    @property
    def n_layers(self) -> int:
        return int(self.hf.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf.config.hidden_size)

    @property
    def d_vocab(self) -> int:
        return int(self.hf.config.vocab_size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (of the input embedding, for mixed-dtype models)."""
        return self.hf.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (the first one under a device map)."""
        return self.hf.get_input_embeddings().weight.device

    def check_same_family(self, other: HookedModel) -> None:
        """Refuse to compare checkpoints whose tokenizer or width differ."""
        if (
            self.d_model != other.d_model
            or self.tokenizer.get_vocab() != other.tokenizer.get_vocab()
        ):
            raise ValueError(
                f"cannot compare {self.name} (d_model {self.d_model}, vocab {len(self.tokenizer)}) "
                f"with {other.name} (d_model {other.d_model}, vocab {len(other.tokenizer)}): "
                "different tokenizer or width; compare finetunes of one base only"
            )

    # --- hooks -------------------------------------------------------------------------------
    def _check_site(self, site: Site) -> None:
        site.check(self.n_layers)

    def _attach(self, site: Site | int | str, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        site = as_site(site)
        self._check_site(site)
        block: Any = self.blocks[site.layer]
        if isinstance(block, ReplayedBlock):
            raise ValueError(
                f"cannot hook {site.hook_name}: reuse_below is replaying block {site.layer}; "
                "intervene at or above its boundary layer"
            )
        if site.component in ("resid_mid", "attn_out", "mlp_out") and _sandwich_norms(block):
            raise NotImplementedError(
                f"{site.hook_name}: {type(block).__name__} normalises its attention and MLP "
                "outputs before adding them to the residual stream (Gemma 2/3 layout), so "
                "attn_out, mlp_out and resid_mid would not be what the stream receives; use "
                "resid_pre or resid_post sites on this model"
            )
        ctx = self.ctx

        def replace_first(out: Any, new: Tensor) -> Any:
            if isinstance(out, tuple):
                return (new, *out[1:])
            return new

        def first(out: Any) -> Tensor:
            return out[0] if isinstance(out, tuple) else out

        if site.component == "resid_pre":

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    new = fn(args[0], ctx)
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"], ctx)
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if site.component == "resid_mid":

            def mid_hook(module: nn.Module, args: tuple) -> None:
                if fn(args[0], ctx) is not None:
                    raise NotImplementedError(
                        "resid_mid is read-only here (editing it would change only the MLP input); "
                        "edit attn_out of this block or resid_pre of the next instead"
                    )

            return block.post_attention_layernorm.register_forward_pre_hook(mid_hook)
        module: Any = {"resid_post": block, "attn_out": block.self_attn, "mlp_out": block.mlp}[
            site.component
        ]

        def post_hook(module: nn.Module, args: tuple, out: Any) -> Any:
            new = fn(first(out), ctx)
            return None if new is None else replace_first(out, new)

        return module.register_forward_hook(post_hook)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[Site | int | str, HookFn]]) -> Iterator[HookedModel]:
        """Attach ``(site, fn)`` hooks for the body of a ``with``; always removed on exit. A site
        may be a ``Site``, a layer number or a hook name such as ``"blocks.3.hook_resid_post"``.

        ``fn(acts, ctx)`` gets activations ``[batch, pos, d_model]`` and returns a new tensor to
        replace them, or None to leave them alone.
        """
        handles = []
        try:
            for site, fn in fwd_hooks:
                handles.append(self._attach(site, fn))
            yield self
        finally:
            for h in handles:
                h.remove()

    def reuse_below(self, layer: int) -> contextlib.AbstractContextManager[HookedModel]:
        """Inside, blocks ``0..layer-1`` run once per distinct input and their output (the
        residual entering block ``layer``) is replayed on every later forward of that input.

        For many interventions at ``layer`` or above on one model and one prompt set (a causal
        test's direction and its random controls): each forward after the first costs only the
        blocks the interventions can change. Results are bit-identical to full forwards, in any
        dtype and on any device. An input is its token ids, attention mask, positions and the
        KV cache it extends (small tensors; hidden states are never hashed), together with the
        state of the weights below ``layer``: editing them in place (``orthogonalized``) or
        switching a peft adapter there makes the next forward compute afresh. Hooks below
        ``layer`` are refused while it is active, and it refuses to start with hooks there.
        ``layer=0`` reuses nothing.
        """
        return reuse_below(self, layer)

    def n_hooks(self) -> int:
        """Number of forward hooks currently attached anywhere in the model (tests use it)."""
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.hf.modules())

    # --- forward passes ----------------------------------------------------------------------
    @torch.inference_mode()
    def run_to_sites(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        sites: Sequence[Site | int | str],
        *,
        extra_hooks: Sequence[tuple[Site | int | str, HookFn]] = (),
    ) -> dict[Site, Float[Tensor, "batch pos d_model"]]:
        """Activations at ``sites`` (in the model's dtype, on the device of their block), keyed by
        ``Site``, stopping the forward pass after the deepest block needed."""
        if not sites:
            raise ValueError("no sites requested")
        wanted = [as_site(s) for s in sites]
        store: dict[Site, Tensor] = {}

        def grab(site: Site) -> HookFn:
            def fn(acts: Tensor, ctx: HookContext) -> None:
                store[site] = acts.detach()

            return fn

        deepest = max(s.layer for s in wanted)

        def stop(acts: Tensor, ctx: HookContext) -> None:
            raise _StopForward

        hooks = [*extra_hooks, *[(s, grab(s)) for s in wanted], (Site(deepest, "resid_post"), stop)]
        self.ctx.past_len, self.ctx.prompt_len, self.ctx.attention_mask = 0, None, attention_mask
        with self.hooks(hooks):
            try:
                self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        return {s: store[s] for s in wanted}

    def logits(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Full forward pass (with whatever hooks are active) returning float32 logits on the
        model's (input) device."""
        self._check_serving()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.ctx.past_len, self.ctx.prompt_len, self.ctx.attention_mask = 0, None, attention_mask
        with torch.inference_mode():
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float().to(input_ids.device)

    def hidden_and_head(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        *,
        past: Any = None,
        position_ids: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Final normed hidden states and the unembedding, so callers can apply the 49k-vocab
        head only at the positions they score (much cheaper than full logits).

        ``past``: a KV cache from ``prefill`` or ``new_cache`` (one row per batch row) that
        ``input_ids`` continue; ``attention_mask`` then covers the cached positions too (zeros
        where a cached row was padded). Hooks see the new positions with ``ctx.past_len`` = the
        cached length, as during generation. The cache is extended in place. ``position_ids``:
        the new tokens' positions where padding inside the cache shifts them (default: after
        the cached length). Both the hidden states and what the head returns are on the device
        of ``input_ids`` (under a multi-GPU device map too)."""
        past_len = 0 if past is None else int(past.get_seq_length())
        if attention_mask.shape[1] != past_len + input_ids.shape[1]:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} positions; expected the cached "
                f"{past_len} plus the {input_ids.shape[1]} new ones"
            )
        self.ctx.past_len, self.ctx.prompt_len = past_len, None
        self.ctx.attention_mask = attention_mask
        with torch.inference_mode():
            out = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=past is not None,
                **{self._cache_kwarg: past},
                **({} if position_ids is None else {"position_ids": position_ids}),
            )
        head = self.hf.get_output_embeddings()
        hidden = out.last_hidden_state
        if hidden.device == input_ids.device:
            return hidden, head
        here = input_ids.device

        def moved_head(h: Tensor) -> Tensor:  # a dispatched model: the head may sit elsewhere
            return head(h).to(here)

        return hidden.to(here), moved_head

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """Name of the decoder's KV-cache argument (``cache`` in recent transformers releases,
        ``past_key_values`` before)."""
        params = inspect.signature(self.decoder.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def new_cache(self) -> Any:
        """An empty KV cache for ``hidden_and_head(..., past=...)`` to fill (a batched
        prefill)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    def prefill(self, input_ids: Int[Tensor, "1 pos"], copies: int = 1) -> Any:
        """KV cache of one unpadded sequence (hooks active), repeated ``copies`` times along the
        batch, for ``hidden_and_head(..., past=...)`` to continue ``copies`` different ways."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(
                f"prefill takes one non-empty sequence [1, pos], got {input_ids.shape}"
            )
        self.ctx.past_len, self.ctx.prompt_len, self.ctx.attention_mask = 0, None, None
        with torch.inference_mode():
            out = self.decoder(input_ids=input_ids, use_cache=True)
        cache = getattr(out, self._cache_kwarg)
        if copies > 1:
            cache.batch_repeat_interleave(copies)
        return cache

    # --- weights -----------------------------------------------------------------------------
    def residual_writers(self) -> list[tuple[str, Any]]:
        """Every weight that writes into the residual stream: embedding, attention-out and
        MLP-out matrices (and their biases). Each is ``[d_model, *]`` or, for the embedding,
        ``[vocab, d_model]``."""
        blocks: list[Any] = [  # the real blocks, also while reuse_below stands in for some
            b.block if isinstance(b, ReplayedBlock) else b for b in self.blocks
        ]
        if blocks and _sandwich_norms(blocks[0]):
            raise NotImplementedError(
                f"{type(blocks[0]).__name__} normalises attention and MLP outputs before the "
                "residual stream (Gemma 2/3 layout): editing o_proj/down_proj does not remove a "
                "direction from the stream; use Ablate at resid_pre/resid_post sites instead"
            )
        out: list[tuple[str, Any]] = [("embed", self.hf.get_input_embeddings().weight)]
        for i, block in enumerate(blocks):
            writers: tuple[tuple[str, Any], ...] = (
                ("attn.o_proj", block.self_attn.o_proj),
                ("mlp.down_proj", block.mlp.down_proj),
            )
            for part, lin in writers:
                if hasattr(lin, "base_layer"):
                    fix = (
                        "make a merged copy with merge_adapter(base, adapter_dir) (never "
                        "merge_and_unload() an adapter of base.adapter(...): it shares the base)"
                        if self._adapters is not None
                        else "model.hf.merge_and_unload(), or load_model(..., adapter=...)"
                    )
                    raise ValueError(
                        f"blocks.{i}.{part} carries an unmerged peft adapter: editing its base "
                        f"weight would miss the adapter's update. Merge it first ({fix})"
                    )
                out.append((f"blocks.{i}.{part}", lin.weight))
                if lin.bias is not None:
                    out.append((f"blocks.{i}.{part}.bias", lin.bias))
        return out

    def save_pretrained(self, path: Path | str) -> Path:
        if self._adapters is not None and self._adapters.base is not self:
            raise ValueError(
                f"{self.name} is an adapter sharing the weights of {self._adapters.base.name}; "
                "its adapter is already saved at its spec.path, and merge_adapter(base, "
                "spec.path) makes a merged copy you can save"
            )
        if self.is_peft:
            raise ValueError(
                f"{self.name} is a peft model with an unmerged adapter; save the adapter with "
                "model.hf.save_pretrained(dir), or merge it (model.hf.merge_and_unload()) and "
                "wrap the result with HookedModel.from_hf"
            )
        if any(isinstance(b, ReplayedBlock) for b in self.blocks):
            raise ValueError(
                f"cannot save {self.name} inside reuse_below (its blocks are stood in for); "
                "save it after the with-block"
            )
        path = Path(path)
        self.hf.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path


def _sandwich_norms(block: Any) -> bool:
    """Gemma 2/3 blocks normalise attention and MLP outputs before adding them to the stream."""
    return hasattr(block, "post_feedforward_layernorm")
