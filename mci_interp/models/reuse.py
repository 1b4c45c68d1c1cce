"""``reuse_below``: run the blocks under an intervention layer once per distinct input and replay
their output for every other forward of that input (a causal test's direction and its random
controls share everything below their layer). Bit-identical to full forwards in any dtype."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mci_interp.sites import Site

if TYPE_CHECKING:
    from mci_interp.models.hooked import HookedModel


def _tensor_key(t: Tensor) -> bytes:
    """The bytes of a (small) tensor, whatever its dtype or device: token ids and masks only."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return str((flat.dtype, tuple(t.shape))).encode() + flat.view(torch.uint8).numpy().tobytes()


class _ReuseState:
    """What ``reuse_below`` shares between the decoder's pre-hook and the replaying block: the key
    of the forward now running, the memo of block outputs, and what the key must watch."""

    def __init__(self, decoder: Any, watched: Callable[[], Sequence[nn.Module]]):
        self.memo: dict[str, Any] = {}
        self.key: str | None = None
        self.signature = inspect.signature(decoder.forward)
        self.var_kw = next(
            (n for n, q in self.signature.parameters.items() if q.kind is q.VAR_KEYWORD), None
        )
        self.watched = watched  # the embedding and the real lower blocks, looked up per forward

    def weights_token(self) -> str:
        """Cheap and device-agnostic: which tensors the lower blocks and the embedding hold and how
        often each was edited in place (``orthogonalized`` and ``param.copy_`` are seen), plus the
        active/merged/disabled adapters of any peft layer among them. Their modules are walked
        afresh on every forward, so peft layers put in or taken out (``base.adapter(...)``) are
        seen too. Edits through ``.data`` bypass the version counter and are not seen: edit
        weights outside ``reuse_below``."""
        parts: list[Any] = []
        seen: set[int] = set()
        for root in self.watched():
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                for p in m._parameters.values():
                    if p is not None:
                        version = 0 if p.is_inference() else p._version
                        parts.append((p.data_ptr(), version, p.dtype))
                if hasattr(m, "merged_adapters"):  # a peft layer
                    tuner: Any = m
                    parts.append(
                        (
                            type(tuner).__name__,
                            tuple(getattr(tuner, "active_adapters", ())),
                            tuple(tuner.merged_adapters),
                            bool(getattr(tuner, "disable_adapters", False)),
                        )
                    )
        return repr(parts)

    def enter(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Key the decoder forward that is starting on its inputs (never on hidden states)."""
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get(self.var_kw, {}) if self.var_kw else {}
        get = lambda name: bound.get(name, extra.get(name))  # noqa: E731
        ids = get("input_ids")
        if ids is None:
            raise ValueError(
                "reuse_below keys forwards on their token ids; this one passed inputs_embeds. "
                "Run it outside reuse_below"
            )
        cache: Any = get("cache")
        if cache is None:
            cache = get("past_key_values")
        use_cache = get("use_cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        history = getattr(cache, "_mci_history", None)
        if cache is not None and history is None and past > 0:
            # a cache filled outside reuse_below: its contents are unknown, so never a hit
            history = f"outside:{uuid.uuid4().hex}"
            cache._mci_history = history
        h = hashlib.sha256()
        for name in ("attention_mask", "position_ids", "cache_position"):
            t = get(name)
            h.update(name.encode() + (_tensor_key(t) if isinstance(t, Tensor) else b"None"))
        h.update(_tensor_key(ids))
        h.update(repr((use_cache, past, history)).encode())
        h.update(self.weights_token().encode())
        self.key = h.hexdigest()


def keep_entries(cache: Any, keep: bool = True) -> Any:
    """Mark a KV cache whose next continuation will be extended again: under ``reuse_below`` a
    replay of that continuation then restores its cache entries below the boundary instead of
    zeros (at ~17x the memory of its hidden states). Unmark it before a large final call."""
    cache._mci_keep = keep
    return cache


def keeps_entries(cache: Any) -> bool:
    return bool(getattr(cache, "_mci_keep", False))


class ReplayedBlock(nn.Module):
    """Stands in for a block below a ``reuse_below`` boundary. Every such block but the last
    passes the embeddings through; the last runs the real blocks once per distinct input (the
    token ids, mask and positions, the history of the KV cache being extended and the state of
    the weights below the boundary, keyed by ``_ReuseState``) and afterwards replays their output.

    A replayed prefill (a call that starts a KV cache), or a continuation of a cache marked with
    ``keep_entries``, also replays the real blocks' cache entries, so any continuation is exact.
    Another replayed continuation gets zeros of the right length there instead (storing every
    continuation's entries would cost ~17x its hidden states): the upper blocks read only their
    own entries, so it is exact too, but extending such a cache with an input not seen before
    raises instead of attending to the zeros.

    Each stand-in registers the one real block it replaces (``block``), so walks over the
    model's modules (peft's adapter switching, ``.to(device)``, hook counts) still reach every
    block while ``reuse_below`` is active."""

    def __init__(
        self, real: Sequence[nn.Module], index: int, state: _ReuseState | None, config: Any
    ):
        super().__init__()
        self.block = real[index]
        self.real = list(real)  # a plain list: not registered again, so nothing is duplicated
        self.idx = [getattr(b.self_attn, "layer_idx", i) for i, b in enumerate(self.real)]
        self.state = state  # None: a pass-through block
        n_heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // n_heads)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.state is None:
            return hidden_states
        key = self.state.key
        if key is None:
            raise RuntimeError(
                "reuse_below: a block below the boundary ran outside a forward of the decoder; "
                "call the model (or model.hf.model), not its blocks, inside reuse_below"
            )
        self.state.key = None  # one key per decoder forward
        cache: Any = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = cache is not None and kwargs.get("use_cache", True)
        memo = self.state.memo
        hit = memo.get(key)
        if hit is None:
            if getattr(cache, "_mci_replayed", False):
                raise RuntimeError(
                    "reuse_below: this KV cache holds replayed (zeroed) entries below the "
                    "boundary and cannot be extended with a new input; build it outside "
                    "reuse_below"
                )
            keep = use_cache and (cache.get_seq_length() == 0 or keeps_entries(cache))
            out = hidden_states
            for block in self.real:
                out = block(out, *args, **kwargs)
            layers = getattr(cache, "layers", None)
            t = hidden_states.shape[1]  # this call's entries: the last t of the cache
            kv = (
                [(layers[i].keys[:, :, -t:], layers[i].values[:, :, -t:]) for i in self.idx]
                if keep and layers
                else None
            )
            memo[key] = (out, kv)
        else:
            out, kv = hit
            if use_cache and kv is not None:
                t = hidden_states.shape[1]
                for i, (k, v) in zip(self.idx, kv, strict=True):
                    layers = getattr(cache, "layers", [])
                    before = getattr(layers[i], "cumulative_length", 0) if i < len(layers) else 0
                    cache.update(k, v, i)
                    # a sliding-window layer kept at most its window of this call's t entries
                    if hasattr(cache.layers[i], "cumulative_length"):
                        cache.layers[i].cumulative_length = before + t
            elif use_cache:
                b, t = hidden_states.shape[:2]
                zeros = hidden_states.new_zeros(b, self.kv_heads, t, self.head_dim)
                for i in self.idx:
                    cache.update(zeros, zeros, i)
                cache._mci_replayed = True
        if cache is not None:
            cache._mci_history = key
        return out


@contextlib.contextmanager
def reuse_below(model: HookedModel, layer: int) -> Iterator[HookedModel]:
    """The implementation of ``HookedModel.reuse_below`` (see there)."""
    Site(layer).check(model.n_layers)
    if layer == 0:
        yield model
        return
    blocks = model.blocks
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
    if any(isinstance(b, ReplayedBlock) for b in blocks):
        raise ValueError("reuse_below is already active on this model; nest none")
    decoder = model.decoder
    hf = model.hf
    state = _ReuseState(decoder, lambda: [hf.get_input_embeddings(), *real])

    def enter(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state.enter(args, kwargs)

    handle = decoder.register_forward_pre_hook(enter, with_kwargs=True)
    cfg = model.hf.config
    try:
        for i in range(layer):
            blocks[i] = ReplayedBlock(real, i, state if i == layer - 1 else None, cfg)
        yield model
    finally:
        handle.remove()
        for i, b in enumerate(real):
            blocks[i] = b
