"""Load a ModelSpec into a ``HookedModel``: a Hugging Face causal LM with TransformerLens-named
hook points on its raw, unprocessed weights.

Why not TransformerLens' ``HookedTransformer`` as the engine: it rejects SmolLM2/Qwen by name,
needs weight processing to be switched off by hand, and its ``run_with_cache`` runs at ~0.85x of
a bare HF forward here. Hooking the HF modules directly keeps the exact HF basis (directions match
``hidden_states``), HF's KV-cached ``generate`` and peft's LoRA on the same object.
``to_hooked_transformer`` converts for users who want TransformerLens (and sae-lens tooling).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mci_interp._io import cache_root, read_json, sha256_files, write_json
from mci_interp.sites import Site
from mci_interp.specs import ModelSpec, known_names, resolve_spec

log = logging.getLogger(__name__)

HookFn = Callable[[Tensor, "HookContext"], Tensor | None]


class _StopForward(Exception):
    """Raised by the truncation hook after the deepest requested block."""


class _Replayed(nn.Module):
    """Stands in for a block below a ``reuse_below`` boundary. Every such block but the last
    passes the embeddings through; the last runs the real blocks once per distinct input (the
    embeddings, the mask and positions, and the history of the KV cache being extended) and
    afterwards replays their output.

    A replayed prefill (a call that starts a KV cache) also replays the real blocks' cache
    entries, so any continuation is exact. A replayed continuation gets zeros of the right length
    there instead (storing every continuation's entries would cost ~17x its hidden states): the
    upper blocks read only their own entries, so it is exact too, but extending such a cache with
    an input not seen before raises instead of attending to the zeros."""

    def __init__(self, real: Sequence[nn.Module], memo: dict[str, Any] | None, config: Any):
        super().__init__()
        self.real = list(real)  # a plain list: not registered, so no parameters are duplicated
        self.idx = [getattr(b.self_attn, "layer_idx", i) for i, b in enumerate(self.real)]
        self.memo = memo  # None: a pass-through block
        n_heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // n_heads)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.memo is None:
            return hidden_states
        cache: Any = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = cache is not None and kwargs.get("use_cache", True)
        h = hashlib.sha256()
        for t in (hidden_states, kwargs.get("attention_mask"), kwargs.get("position_ids")):
            if isinstance(t, Tensor):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
            else:
                h.update(repr(t).encode())
        h.update(str((use_cache, getattr(cache, "_mci_history", None))).encode())
        key = h.hexdigest()
        hit = self.memo.get(key)
        if hit is None:
            if getattr(cache, "_mci_replayed", False):
                raise RuntimeError(
                    "reuse_below: this KV cache holds replayed (zeroed) entries below the "
                    "boundary and cannot be extended with a new input; build it outside "
                    "reuse_below"
                )
            starts = use_cache and cache.get_seq_length() == 0
            out = hidden_states
            for block in self.real:
                out = block(out, *args, **kwargs)
            layers = getattr(cache, "layers", None)
            kv = (
                [(layers[i].keys, layers[i].values) for i in self.idx]
                if starts and layers
                else None
            )
            self.memo[key] = (out, kv)
        else:
            out, kv = hit
            if use_cache and kv is not None:
                for i, (k, v) in zip(self.idx, kv, strict=True):
                    cache.update(k, v, i)
            elif use_cache:
                b, t = hidden_states.shape[:2]
                zeros = hidden_states.new_zeros(b, self.kv_heads, t, self.head_dim)
                for i in self.idx:
                    cache.update(zeros, zeros, i)
                cache._mci_replayed = True
        if cache is not None:
            cache._mci_history = key
        return out


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


@dataclass(eq=False)
class HookedModel:
    """A causal LM with hook points named like TransformerLens (``blocks.{l}.hook_resid_post``).

    Holds the HF model (``hf``), its tokenizer, the spec it came from and the sha256 of its
    weights' source. Hooks are added only through ``hooks(...)``, a context manager that removes
    them on exit, exceptions included.
    """

    hf: Any
    tokenizer: Any
    spec: ModelSpec
    sha256: str
    ctx: HookContext = field(default_factory=HookContext)

    # --- shape facts -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_name(self) -> str:
        return self.spec.base_name

    @property
    def blocks(self) -> Any:
        inner = getattr(self.hf, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            # peft wraps the model: PeftModel.base_model.model.model.layers
            base = getattr(self.hf, "base_model", None)
            layers = getattr(getattr(getattr(base, "model", None), "model", None), "layers", None)
        if layers is None:
            raise TypeError(
                f"{type(self.hf).__name__} is not a Llama-style decoder (model.layers); supported "
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
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

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

    def _attach(self, site: Site, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        self._check_site(site)
        block: Any = self.blocks[site.layer]
        if isinstance(block, _Replayed):
            raise ValueError(
                f"cannot hook {site.hook_name}: reuse_below is replaying block {site.layer}; "
                "intervene at or above its boundary layer"
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
    def hooks(self, fwd_hooks: Sequence[tuple[Site, HookFn]]) -> Iterator[HookedModel]:
        """Attach ``(site, fn)`` hooks for the body of a ``with``; always removed on exit.

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

    @contextlib.contextmanager
    def reuse_below(self, layer: int) -> Iterator[HookedModel]:
        """Inside, blocks ``0..layer-1`` run once per distinct input and their output (the
        residual entering block ``layer``) is replayed on every later forward of that input.

        For many interventions at ``layer`` or above on one model and one prompt set (a causal
        test's direction and its random controls): each forward after the first costs only the
        blocks the interventions can change. Results are bit-identical to full forwards. Hooks
        below ``layer`` are refused while it is active, and it refuses to start with hooks there.
        ``layer=0`` reuses nothing.
        """
        Site(layer).check(self.n_layers)
        if layer == 0:
            yield self
            return
        blocks = self.blocks
        real = [blocks[i] for i in range(layer)]
        hooked = [
            i
            for i, b in enumerate(real)
            if any(m._forward_hooks or m._forward_pre_hooks for m in b.modules())
        ]
        if hooked:
            raise ValueError(
                f"reuse_below({layer}): blocks {hooked} have hooks attached; their output would "
                "be replayed without them. Start reuse_below before applying interventions, and "
                f"keep them at layer {layer} or above"
            )
        memo: dict[str, Any] = {}
        cfg = self.hf.config
        try:
            for i in range(layer):
                blocks[i] = _Replayed(real, memo if i == layer - 1 else None, cfg)
            yield self
        finally:
            for i, b in enumerate(real):
                blocks[i] = b

    def n_hooks(self) -> int:
        """Number of forward hooks currently attached anywhere in the model (tests use it)."""
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.hf.modules())

    # --- forward passes ----------------------------------------------------------------------
    @torch.inference_mode()
    def run_to_sites(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        sites: Sequence[Site],
        *,
        extra_hooks: Sequence[tuple[Site, HookFn]] = (),
    ) -> dict[Site, Float[Tensor, "batch pos d_model"]]:
        """Activations at ``sites``, stopping the forward pass after the deepest block needed."""
        if not sites:
            raise ValueError("no sites requested")
        store: dict[Site, Tensor] = {}

        def grab(site: Site) -> HookFn:
            def fn(acts: Tensor, ctx: HookContext) -> None:
                store[site] = acts.detach()

            return fn

        deepest = max(s.layer for s in sites)

        def stop(acts: Tensor, ctx: HookContext) -> None:
            raise _StopForward

        hooks = [*extra_hooks, *[(s, grab(s)) for s in sites], (Site(deepest, "resid_post"), stop)]
        self.ctx.past_len, self.ctx.prompt_len, self.ctx.attention_mask = 0, None, attention_mask
        with self.hooks(hooks):
            try:
                self.hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        return {s: store[s] for s in sites}

    def logits(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Full forward pass (with whatever hooks are active) returning float32 logits."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.ctx.past_len, self.ctx.prompt_len, self.ctx.attention_mask = 0, None, attention_mask
        with torch.inference_mode():
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float()

    def hidden_and_head(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        *,
        past: Any = None,
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Final normed hidden states and the unembedding, so callers can apply the 49k-vocab
        head only at the positions they score (much cheaper than full logits).

        ``past``: a KV cache from ``prefill`` (one row per batch row) that ``input_ids``
        continue; ``attention_mask`` then covers the cached positions too. Hooks see the new
        positions with ``ctx.past_len`` = the cached length, as during generation. The cache is
        extended in place."""
        past_len = 0 if past is None else int(past.get_seq_length())
        if attention_mask.shape[1] != past_len + input_ids.shape[1]:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} positions; expected the cached "
                f"{past_len} plus the {input_ids.shape[1]} new ones"
            )
        self.ctx.past_len, self.ctx.prompt_len = past_len, None
        self.ctx.attention_mask = attention_mask
        with torch.inference_mode():
            out = self.hf.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=past is not None,
                **{self._cache_kwarg: past},
            )
        head = self.hf.get_output_embeddings()
        return out.last_hidden_state, head

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """Name of the decoder's KV-cache argument (``cache`` in recent transformers releases,
        ``past_key_values`` before)."""
        params = inspect.signature(self.hf.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def prefill(self, input_ids: Int[Tensor, "1 pos"], copies: int = 1) -> Any:
        """KV cache of one unpadded sequence (hooks active), repeated ``copies`` times along the
        batch, for ``hidden_and_head(..., past=...)`` to continue ``copies`` different ways."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(
                f"prefill takes one non-empty sequence [1, pos], got {input_ids.shape}"
            )
        self.ctx.past_len, self.ctx.prompt_len, self.ctx.attention_mask = 0, None, None
        with torch.inference_mode():
            out = self.hf.model(input_ids=input_ids, use_cache=True)
        cache = getattr(out, self._cache_kwarg)
        if copies > 1:
            cache.batch_repeat_interleave(copies)
        return cache

    # --- weights -----------------------------------------------------------------------------
    def residual_writers(self) -> list[tuple[str, Any]]:
        """Every weight that writes into the residual stream: embedding, attention-out and
        MLP-out matrices (and their biases). Each is ``[d_model, *]`` or, for the embedding,
        ``[vocab, d_model]``."""
        out: list[tuple[str, Any]] = [("embed", self.hf.get_input_embeddings().weight)]
        for i, block in enumerate(self.blocks):
            out.append((f"blocks.{i}.attn.o_proj", block.self_attn.o_proj.weight))
            if block.self_attn.o_proj.bias is not None:
                out.append((f"blocks.{i}.attn.o_proj.bias", block.self_attn.o_proj.bias))
            out.append((f"blocks.{i}.mlp.down_proj", block.mlp.down_proj.weight))
            if block.mlp.down_proj.bias is not None:
                out.append((f"blocks.{i}.mlp.down_proj.bias", block.mlp.down_proj.bias))
        return out

    def save_pretrained(self, path: Path | str) -> Path:
        path = Path(path)
        self.hf.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path


# --- loading ----------------------------------------------------------------------------------
def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_files(spec: ModelSpec) -> list[Path]:
    files = []
    for f in spec.files:
        pkg, _, rel = f.rpartition(":")
        pkg = pkg or (spec.package or "")
        p = _package_dir(pkg, spec.install_hint) / rel
        if not p.exists():
            raise FileNotFoundError(
                f"{spec.name}: expected model file {p} is missing; reinstall with: {spec.install_hint}"
            )
        files.append(p)
    return files


def _strip_gguf_quantizer(hf: Any) -> None:
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.is_quantized = False


def convert_packaged(spec: ModelSpec, *, show_progress: bool = True) -> tuple[Path, str]:
    """Dequantise a packaged GGUF once into ``cache_root()/models/<sha256>``; return (dir, sha)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = _gguf_files(spec)
    digest = None
    key_file = cache_root() / "models" / f"{spec.name}.sha256"
    # sha256 of a 500 MB file takes a few seconds; remember it keyed by size+mtime
    stat_key = ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    if key_file.exists():
        rec = read_json(key_file)
        if rec.get("stat") == stat_key:
            digest = rec["sha256"]
    if digest is None:
        digest = sha256_files(files)
        write_json(key_file, {"stat": stat_key, "sha256": digest})
    if spec.sha256 is not None and digest != spec.sha256:
        key_file.unlink(missing_ok=True)
        raise ValueError(
            f"{spec.name}: GGUF sha256 {digest} does not match the pinned {spec.sha256}; the "
            f"package files are corrupt or a different version. Reinstall: {spec.install_hint}"
        )
    out = cache_root() / "models" / digest[:16]
    if (out / "config.json").exists() and (out / "mci_done.json").exists():
        return out, digest
    log.info("converting %s from GGUF into %s (once, ~20 s)", spec.name, out)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmpd:
        tmp = Path(tmpd)
        if len(files) == 1:
            gdir, gname = files[0].parent, files[0].name
        else:
            gdir, gname = tmp, "model.gguf"
            with open(tmp / gname, "wb") as w:
                for p in files:
                    with open(p, "rb") as r:
                        shutil.copyfileobj(r, w)
        try:
            tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
            hf = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        except Exception as e:  # corrupt file, missing gguf package, ...
            raise ValueError(f"{spec.name}: could not read GGUF {files[0]}: {e}") from e
        _strip_gguf_quantizer(hf)
        stage = tmp / "hf"
        hf.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        write_json(stage / "mci_done.json", {"source": spec.name, "sha256": digest})
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), str(out))
    return out, digest


def _dir_sha(path: Path) -> str:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors or *.bin weights")
    return sha256_files(files)


def _load_hf_dir(path: Path | str, dtype: torch.dtype, *, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None
    )
    return hf, tok


def _prepare(hf: Any, tok: Any) -> None:
    hf.eval()
    hf.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if getattr(hf.generation_config, "pad_token_id", None) is None:
        hf.generation_config.pad_token_id = tok.pad_token_id


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_dir(name_or_spec: str | ModelSpec) -> Path:
    """A Hugging Face directory for a spec (converting a packaged GGUF if needed)."""
    spec = resolve_spec(name_or_spec)
    if spec.source == "packaged_gguf":
        return convert_packaged(spec)[0]
    if spec.source == "local_hf" and spec.path:
        return Path(spec.path)
    raise ValueError(f"{spec.name} ({spec.source}) has no local directory")


def load_model(
    name_or_spec: str | ModelSpec = "smollm2-135m-instruct",
    *,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
) -> HookedModel:
    """Load a model by registry name, local HF directory or hub id, optionally merging a LoRA
    adapter. Weights stay raw (no LayerNorm folding, no centring)."""
    try:
        spec = resolve_spec(name_or_spec, adapter=adapter)
    except ValueError as e:
        raise ValueError(f"{e}. Known models: {', '.join(known_names())}") from None
    torch_dtype = parse_dtype(dtype)
    if spec.source == "lora":
        assert spec.base is not None and spec.path is not None
        base = load_model(spec.base, dtype="float32", trust_remote_code=trust_remote_code)
        return merge_adapter(base, spec.path, dtype=torch_dtype)
    if spec.source == "packaged_gguf":
        path, digest = convert_packaged(spec)
        hf, tok = _load_hf_dir(path, torch_dtype)
    elif spec.source == "local_hf":
        path = Path(spec.path or spec.name)
        hf, tok = _load_hf_dir(path, torch_dtype, trust_remote_code=trust_remote_code)
        digest = _dir_sha(path)
    else:  # hub
        hf, tok = _load_hf_dir(spec.name, torch_dtype, trust_remote_code=trust_remote_code)
        digest = f"hub:{spec.name}@{spec.revision or 'main'}"
    _prepare(hf, tok)
    return HookedModel(hf=hf, tokenizer=tok, spec=spec, sha256=digest)


def merge_adapter(
    base: HookedModel, adapter_dir: Path | str, *, dtype: str | torch.dtype = "float32"
) -> HookedModel:
    """A new HookedModel: a deep copy of ``base`` with the LoRA adapter merged in."""
    import copy

    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter (no adapter_config.json)")
    cfg = read_json(cfg_path)
    meta_path = adapter_dir / "mci_organism.json"
    if meta_path.exists():
        want = read_json(meta_path).get("base_sha256")
        if want and want != base.sha256:
            raise ValueError(
                f"adapter {adapter_dir} was trained on base sha256 {want[:12]}, but the base given "
                f"is {base.name} with sha256 {base.sha256[:12]}; load the matching base"
            )
    hf = copy.deepcopy(base.hf).float()
    try:
        with warnings.catch_warnings():  # peft asks a deprecated transformers property, each load
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = PeftModel.from_pretrained(hf, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(
            f"adapter {adapter_dir} does not fit base {base.name} "
            f"(adapter says base {cfg.get('base_model_name_or_path')!r}): {e}"
        ) from e
    merged = peft_model.merge_and_unload().to(parse_dtype(dtype))
    _prepare(merged, base.tokenizer)
    from mci_interp._io import sha256_file

    weights = adapter_dir / "adapter_model.safetensors"
    digest = sha256_file(weights) if weights.exists() else "unknown"
    spec = ModelSpec(
        name=f"{base.name}+{adapter_dir.name}", source="lora", base=base.spec, path=str(adapter_dir)
    )
    return HookedModel(hf=merged, tokenizer=base.tokenizer, spec=spec, sha256=digest)


def to_hooked_transformer(model: HookedModel):
    """Convert to a TransformerLens ``HookedTransformer`` with raw weights (no folding/centring),
    for TransformerLens/sae-lens tooling. Log-probs agree with the HF model to ~1e-4."""
    from transformer_lens import HookedTransformer, loading

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg = loading.get_pretrained_model_config(
            d, hf_cfg=model.hf.config.to_dict(), fold_ln=False, dtype=torch.float32
        )
        state = loading.get_pretrained_state_dict(d, cfg, hf_model=model.hf.float())
    ht = HookedTransformer(cfg, model.tokenizer, move_to_device=False)
    ht.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return ht


def save_atomic_dir(model: HookedModel, path: Path | str) -> Path:
    """Save the model as a normal HF directory: written beside ``path``, then renamed into place,
    so an interrupted export never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(stage)
        if path.exists():
            shutil.rmtree(path)
        stage.rename(path)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return path
