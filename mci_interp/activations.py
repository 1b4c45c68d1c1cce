"""Batched, padding-aware activation caching at only the requested sites.

Three outputs, one forward loop:
- ``cache_activations``: per-example (or per-token) float32 tensors in memory (``ActivationCache``);
- ``stream_statistics``: per-label running sums in float64, memory independent of dataset size;
- ``cache_to_disk``: safetensors shards plus an index, written atomically; an interrupted run
  resumes at the first missing shard and gives byte-identical files. The index keeps each
  shard's sha256; ``load_cache`` refuses a shard that differs, cannot be parsed or holds a NaN.

(One module over ~500 lines because the three outputs share the one forward loop and its
batching.) The forward pass stops after the deepest requested block. Batches are formed from examples of
similar length (less padding) with right padding, so every selected activation equals the one
from an unpadded forward pass.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp import __version__
from mci_interp._io import (
    IntegrityError,
    atomic_path,
    load_safetensors_verified,
    read_json_verified,
    sha256_file,
    stable_hash,
    verify_sha256,
    write_json,
)
from mci_interp.datasets import ChatExample, Encoded, dataset_hash, encode_chat, pad
from mci_interp.models import HookedModel
from mci_interp.sites import Site, as_site

log = logging.getLogger(__name__)

Position = Literal["last_prompt", "prompt_mean", "answer_mean", "answer_tokens", "all"]
POSITIONS: tuple[str, ...] = ("last_prompt", "prompt_mean", "answer_mean", "answer_tokens", "all")


def _check_position(position: str) -> None:
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose one of {POSITIONS}")


def _select(acts: Tensor, enc: Encoded, position: str) -> Tensor:
    """Rows of one example's ``[pos, d]`` activations for a position rule (unpadded part only);
    means are taken in float32 at least, whatever the model's dtype."""
    n, p = len(enc.ids), enc.prompt_len
    if position == "last_prompt":
        return acts[p - 1 : p]
    if position == "prompt_mean":
        return acts[:p].to(torch.promote_types(acts.dtype, torch.float32)).mean(0, keepdim=True)
    if position == "answer_mean":
        return acts[p:n].to(torch.promote_types(acts.dtype, torch.float32)).mean(0, keepdim=True)
    if position == "answer_tokens":
        return acts[p:n]
    return acts[:n]


def encode_all(
    model: HookedModel,
    examples: Sequence[ChatExample],
    position: str,
    *,
    max_length: int | None = None,
) -> list[Encoded]:
    if not examples:
        raise ValueError("empty dataset: no examples to cache")
    _check_position(position)
    limit = max_length or int(getattr(model.hf.config, "max_position_embeddings", 10**9))
    encs = [encode_chat(model.tokenizer, ex, max_length=limit) for ex in examples]
    if position.startswith("answer"):
        bad = [i for i, e in enumerate(encs) if e.answer_len == 0]
        if bad:
            raise ValueError(
                f"position {position!r} needs assistant answers, but examples {bad[:5]} have none; "
                "use position='last_prompt' for prompts without answers"
            )
    return encs


def iter_selected(
    model: HookedModel,
    encs: Sequence[Encoded],
    sites: Sequence[Site | int | str],
    *,
    position: str,
    batch_size: int = 8,
    show_progress: bool = False,
    desc: str = "caching",
) -> Iterator[tuple[int, dict[Site, Tensor]]]:
    """Yield ``(example_index, {site: rows [k, d] float32 on the CPU})`` for every example, in
    index order within each length-sorted batch (callers that need order put rows back by index).
    The forward runs on the model's device and dtype; sites may be hook names."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = [as_site(s) for s in sites]
    for s in wanted:
        s.check(model.n_layers)
    order = sorted(range(len(encs)), key=lambda i: (len(encs[i].ids), i))
    pad_id = model.tokenizer.pad_token_id
    total = sum(len(e.ids) for e in encs)
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc=desc, disable=not show_progress, leave=False
    )
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad([encs[i].ids for i in idx], pad_id, side="right")
            acts = model.run_to_sites(ids.to(model.device), mask.to(model.device), wanted)
            for b, i in enumerate(idx):
                yield i, {s: _select(acts[s][b], encs[i], position).float().cpu() for s in wanted}
            bar.update(int(mask.sum()))
    finally:
        bar.close()


@dataclass(eq=False)
class ActivationCache:
    """Selected activations, one row per example (or per token for token positions).

    ``acts[site]`` is ``[rows, d_model]`` float32; ``row_example[r]`` is the example a row came
    from; ``labels`` and ``groups`` are per example.
    """

    acts: dict[Site, Tensor]
    row_example: Tensor
    labels: Tensor
    groups: list[str | None]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> list[Site]:
        return sorted(self.acts)

    @property
    def n_examples(self) -> int:
        return len(self.groups)

    def X(self, site: Site | int | str) -> Tensor:
        site = as_site(site)
        if site not in self.acts:
            raise KeyError(f"site {site} not cached; cached: {[str(s) for s in self.sites]}")
        return self.acts[site]

    def row_labels(self) -> Tensor:
        return self.labels[self.row_example]

    def row_groups(self) -> list[str | None]:
        return [self.groups[int(i)] for i in self.row_example]


def cache_activations(
    model: HookedModel,
    examples: Sequence[ChatExample],
    sites: Sequence[Site | int | str],
    *,
    position: Position = "last_prompt",
    batch_size: int = 8,
    max_length: int | None = None,
    show_progress: bool = True,
) -> ActivationCache:
    """Run the model on chat examples and keep the selected activations in memory (float32 on
    the CPU, whatever the model's device and dtype). Sites may be TransformerLens hook names."""
    wanted = [as_site(s) for s in sites]
    encs = encode_all(model, examples, position, max_length=max_length)
    rows: dict[int, dict[Site, Tensor]] = {}
    t0 = time.perf_counter()
    for i, acts in iter_selected(
        model, encs, wanted, position=position, batch_size=batch_size, show_progress=show_progress
    ):
        rows[i] = acts
    elapsed = time.perf_counter() - t0
    n_tok = sum(len(e.ids) for e in encs)
    out = {s: torch.cat([rows[i][s] for i in range(len(encs))]) for s in wanted}
    counts = [rows[i][wanted[0]].shape[0] for i in range(len(encs))]
    row_example = torch.repeat_interleave(torch.arange(len(encs)), torch.tensor(counts))
    return ActivationCache(
        acts=out,
        row_example=row_example,
        labels=_labels(examples),
        groups=[ex.group for ex in examples],
        meta=_meta(model, examples, wanted, position) | {"tokens": n_tok, "seconds": elapsed},
    )


def _labels(examples: Sequence[ChatExample]) -> Tensor:
    return torch.tensor(
        [-1 if ex.label is None else int(ex.label) for ex in examples], dtype=torch.long
    )


def _meta(
    model: HookedModel, examples: Sequence[ChatExample], sites: Sequence[Site], position: str
) -> dict[str, Any]:
    return {
        "model": model.name,
        "base_model": model.base_name,
        "model_sha256": model.sha256,
        "dtype": str(model.dtype).replace("torch.", ""),
        "dataset_hash": dataset_hash(examples),
        "n_examples": len(examples),
        "position": position,
        "sites": [s.hook_name for s in sorted(sites)],
        "layer_convention": "TransformerLens hook names; resid_post = HF hidden_states[layer+1]",
        "library_version": __version__,
    }


# --- streaming statistics ---------------------------------------------------------------------
_STATS_TENSORS = "stats.safetensors"
_STATS_JSON = "stats.json"
_STATS_KEY = re.compile(r"(?P<hook>[^/]+)/label(?P<label>-?\d+)/(?P<kind>sum|sumsq)")


@dataclass(eq=False)
class ActivationStats:
    """Per-site, per-label float64 sums: ``sums[site][label]``, ``sumsq``, ``counts[label]``.

    Memory is O(n_labels x d_model) whatever the number of prompts.
    """

    sums: dict[Site, dict[int, Tensor]]
    sumsq: dict[Site, dict[int, Tensor]]
    counts: dict[int, int]
    meta: dict[str, Any] = field(default_factory=dict)

    def mean(self, site: Site, label: int) -> Tensor:
        if self.counts.get(label, 0) == 0:
            raise ValueError(f"no rows with label {label}; labels present: {sorted(self.counts)}")
        return self.sums[site][label] / self.counts[label]

    def var(self, site: Site, label: int) -> Tensor:
        m = self.mean(site, label)
        return (self.sumsq[site][label] / self.counts[label] - m * m).clamp_min(0)

    def diff_means(self, site: Site, pos: int = 1, neg: int = 0) -> Tensor:
        return self.mean(site, pos) - self.mean(site, neg)

    def save(self, out_dir: Path | str) -> Path:
        """Write ``out_dir/stats.safetensors`` (one float64 tensor per site, label and kind, named
        ``<hook name>/label<k>/sum`` or ``.../sumsq``) and ``out_dir/stats.json`` (``meta`` plus
        ``counts``), each atomically; returns ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{s.hook_name}/label{lab}/{kind}": t.contiguous()
            for s in self.sums
            for kind, table in (("sum", self.sums), ("sumsq", self.sumsq))
            for lab, t in table[s].items()
        }
        with atomic_path(out_dir / _STATS_TENSORS) as tmp:
            save_file(tensors, str(tmp))
        write_json(out_dir / _STATS_JSON, self.meta | {"counts": self.counts})
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> ActivationStats:
        """Read statistics written by ``save`` (or ``mci cache --mode stream``); a file that is
        missing, unreadable or holds a NaN is refused with an ``IntegrityError``."""
        out_dir = Path(out_dir)
        fix = f"re-run the `mci cache --mode stream` command that wrote {out_dir}"
        info = read_json_verified(out_dir / _STATS_JSON, fix=fix)
        if not isinstance(info, dict) or not isinstance(info.get("counts"), dict):
            raise IntegrityError(f"{out_dir / _STATS_JSON} has no 'counts'; {fix}")
        counts = {int(k): int(v) for k, v in info.pop("counts").items()}
        tensors = load_safetensors_verified(out_dir / _STATS_TENSORS, sha256=None, fix=fix)
        tables: dict[str, dict[Site, dict[int, Tensor]]] = {"sum": {}, "sumsq": {}}
        for name, t in tensors.items():
            key = _STATS_KEY.fullmatch(name)
            if key is None:
                raise IntegrityError(
                    f"{out_dir / _STATS_TENSORS} holds an unexpected tensor {name!r}; {fix}"
                )
            tables[key["kind"]].setdefault(Site.parse(key["hook"]), {})[int(key["label"])] = t
        return cls(sums=tables["sum"], sumsq=tables["sumsq"], counts=counts, meta=info)


def stream_statistics(
    model: HookedModel,
    examples: Sequence[ChatExample],
    sites: Sequence[Site | int | str],
    *,
    position: Position = "last_prompt",
    batch_size: int = 8,
    max_length: int | None = None,
    show_progress: bool = True,
) -> ActivationStats:
    """Per-label running sums (float64) of the selected activations; unlabelled rows count as
    label -1. Token positions are token-weighted (every answer token one row)."""
    wanted = [as_site(s) for s in sites]
    encs = encode_all(model, examples, position, max_length=max_length)
    labels = _labels(examples).tolist()
    d = model.d_model
    sums: dict[Site, dict[int, Tensor]] = {s: {} for s in wanted}
    sumsq: dict[Site, dict[int, Tensor]] = {s: {} for s in wanted}
    counts: dict[int, int] = {}
    for i, acts in iter_selected(
        model,
        encs,
        wanted,
        position=position,
        batch_size=batch_size,
        show_progress=show_progress,
        desc="streaming",
    ):
        lab = labels[i]
        for s in wanted:
            rows = acts[s].double()
            sums[s].setdefault(lab, torch.zeros(d, dtype=torch.float64)).add_(rows.sum(0))
            sumsq[s].setdefault(lab, torch.zeros(d, dtype=torch.float64)).add_((rows * rows).sum(0))
        counts[lab] = counts.get(lab, 0) + int(acts[wanted[0]].shape[0])
    return ActivationStats(
        sums=sums, sumsq=sumsq, counts=counts, meta=_meta(model, examples, wanted, position)
    )


# --- stored shards ----------------------------------------------------------------------------
_INDEX = "index.json"
_FORMAT = "mci_interp.activation_cache/1"
_SHARD_SHA = "shard_sha256"
"""Index key: ``{shard file name: sha256}``, recorded before each shard appears (an index
written before checksums were kept has none: its shards are read unverified)."""
_GROUPS_HASH = "groups_hash"
_CHECKSUM_KEYS = (_SHARD_SHA, _GROUPS_HASH)


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _fix(out_dir: Path) -> str:
    return (
        "delete it and re-run the same `mci cache` command (or cache_to_disk call) to recompute "
        f"it; the other files of {out_dir} are kept"
    )


def _record_shard_sha(index_path: Path, name: str, sha: str) -> None:
    idx = read_json_verified(index_path, fix=_fix(index_path.parent))
    idx.setdefault(_SHARD_SHA, {})[name] = sha
    write_json(index_path, idx)


def _check_finite(tensors: dict[str, Tensor], lo: int, hi: int) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(
                f"the model produced non-finite activations (NaN or inf) at {name} for examples "
                f"{lo}..{hi - 1}; nothing was stored for them. In float16 this is usually an "
                "overflow: load the model in bfloat16 or float32"
            )


def cache_to_disk(
    model: HookedModel,
    examples: Sequence[ChatExample],
    sites: Sequence[Site],
    out_dir: Path | str,
    *,
    position: Position = "last_prompt",
    shard_size: int = 256,
    batch_size: int = 8,
    max_length: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Write activations to ``out_dir`` as safetensors shards of ``shard_size`` examples.

    Re-running with the same model, data and settings resumes at the first missing shard; a
    directory written for anything else is refused with the field that differs.
    """
    out_dir = Path(out_dir)
    encs = encode_all(model, examples, position, max_length=max_length)
    config: dict[str, Any] = _meta(model, examples, sites, position) | {
        "format": _FORMAT,
        "shard_size": shard_size,
    }
    config.pop("library_version")
    n_shards = (len(encs) + shard_size - 1) // shard_size
    config["n_shards"] = n_shards
    index_path = out_dir / _INDEX
    if index_path.exists():
        old = read_json_verified(index_path, fix=_fix(out_dir))
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            key, (was, now) = next(iter(diff.items()))
            raise ValueError(
                f"{out_dir} holds a cache written with {key}={was!r}, but this run has {key}={now!r}; "
                "refusing to mix caches: use a new directory or delete this one"
            )
    else:
        write_json(index_path, config)
    labels = _labels(examples)
    bar = tqdm(total=n_shards, unit="shard", desc="shards", disable=not show_progress)
    recorded = read_json_verified(index_path, fix=_fix(out_dir)).get(_SHARD_SHA, {})
    for k in range(n_shards):
        shard = out_dir / _shard_name(k)
        if shard.exists():
            verify_sha256(shard, recorded.get(shard.name), fix=_fix(out_dir))
            bar.update(1)
            continue
        lo, hi = k * shard_size, min(len(encs), (k + 1) * shard_size)
        rows: dict[int, dict[Site, Tensor]] = {}
        for i, acts in iter_selected(
            model,
            encs[lo:hi],
            sites,
            position=position,
            batch_size=batch_size,
            show_progress=show_progress,
            desc=f"shard {k + 1}/{n_shards}",
        ):
            rows[i] = acts
        tensors = {
            s.hook_name: torch.cat([rows[i][s] for i in range(hi - lo)]).contiguous() for s in sites
        }
        counts = torch.tensor([rows[i][sites[0]].shape[0] for i in range(hi - lo)])
        tensors["row_example"] = (
            torch.repeat_interleave(torch.arange(hi - lo), counts) + lo
        ).contiguous()
        tensors["labels"] = labels[lo:hi].contiguous()
        _check_finite(tensors, lo, hi)
        with atomic_path(shard) as tmp:
            save_file(
                tensors, str(tmp), metadata={"format": _FORMAT}
            )  # one key: safetensors orders metadata randomly
            # the checksum goes into the index before the shard appears under its name
            _record_shard_sha(index_path, shard.name, sha256_file(tmp))
        bar.update(1)
    bar.close()
    groups = [ex.group for ex in examples]
    idx = read_json_verified(index_path, fix=_fix(out_dir))
    if idx.get(_GROUPS_HASH) != stable_hash(groups, n=64):
        idx[_GROUPS_HASH] = stable_hash(groups, n=64)
        write_json(index_path, idx)
    write_json(out_dir / "groups.json", groups)
    return out_dir


def load_cache(out_dir: Path | str) -> ActivationCache:
    """Read a complete stored cache back into memory, verifying every shard on the way.

    A shard whose sha256 differs from the one in the index, that cannot be parsed (e.g.
    truncated) or that holds a NaN or an infinity is refused with an ``IntegrityError`` (a
    ``ValueError``) naming the file and the fix. A cache written before the index kept
    checksums is read unverified, with one warning.
    """
    out_dir = Path(out_dir)
    index_path = out_dir / _INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{out_dir} has no {_INDEX}: not an activation cache")
    fix = _fix(out_dir)
    cfg = read_json_verified(index_path, fix=fix)
    missing = [k for k in range(cfg["n_shards"]) if not (out_dir / _shard_name(k)).exists()]
    if missing:
        raise ValueError(
            f"{out_dir} is incomplete: shards {missing[:5]} missing; re-run the same "
            "`mci cache` command to resume"
        )
    recorded = cfg.get(_SHARD_SHA, {})
    unverified = [k for k in range(cfg["n_shards"]) if _shard_name(k) not in recorded]
    if unverified:
        log.warning(
            "%s: %d of %d shards have no sha256 in %s (written by an older version): read "
            "unverified (re-run `mci cache` into a new directory to get checksums)",
            out_dir,
            len(unverified),
            cfg["n_shards"],
            _INDEX,
        )
    sites = [Site.parse(s) for s in cfg["sites"]]
    keys = [s.hook_name for s in sites] + ["row_example", "labels"]
    parts = [
        load_safetensors_verified(
            out_dir / _shard_name(k), sha256=recorded.get(_shard_name(k)), fix=fix, keys=keys
        )
        for k in range(cfg["n_shards"])
    ]
    acts = {s: torch.cat([p[s.hook_name] for p in parts]) for s in sites}
    groups_path = out_dir / "groups.json"
    groups = read_json_verified(groups_path, fix=fix)
    if _GROUPS_HASH in cfg and stable_hash(groups, n=64) != cfg[_GROUPS_HASH]:
        raise IntegrityError(
            f"{groups_path} does not match the hash recorded in {index_path}: it was altered; "
            + fix
        )
    return ActivationCache(
        acts=acts,
        row_example=torch.cat([p["row_example"] for p in parts]),
        labels=torch.cat([p["labels"] for p in parts]),
        groups=groups,
        meta={k: v for k, v in cfg.items() if k not in _CHECKSUM_KEYS},
    )
