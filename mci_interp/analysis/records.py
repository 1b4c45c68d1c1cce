"""Records: one model under one condition, measured once and kept on disk.

A ``Record`` holds activations at every layer on the study's neutral prompts, the judge-free
scores and a few greedy answers; a ``RecordStore`` keeps them in a folder, content-addressed and
verified on read (what the study measures, and under which keys, is ``analysis.collect``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from mci_interp._io import (
    IntegrityError,
    canonical_sha256,
    load_safetensors_verified,
    read_json_verified,
    sha256_file,
    write_json,
)
from mci_interp.evaluate import EvalResult

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Record:
    """One model under one condition: activations ``[prompts, layers, d]`` and scores."""

    name: str
    acts: Tensor | None
    score: EvalResult | None
    indomain: EvalResult | None = None
    generations: list[str] = field(default_factory=list)


def acts_of(rec: Record | None) -> Tensor:
    """``rec.acts``, or a ValueError naming the record that lacks them."""
    if rec is None or rec.acts is None:
        raise _missing(rec, "activations")
    return rec.acts


def score_of(rec: Record | None, *, indomain: bool = False) -> EvalResult:
    """``rec.score`` (``rec.indomain`` with ``indomain``), or a ValueError naming the record."""
    out = None if rec is None else rec.indomain if indomain else rec.score
    if out is None:
        raise _missing(rec, "in-domain score" if indomain else "out-of-domain score")
    return out


def _missing(rec: Record | None, what: str) -> ValueError:
    name = "a missing record" if rec is None else f"record {rec.name}"
    return ValueError(f"no {what} in {name}: the records given do not fit this step")


class RecordStore:
    """Records on disk, verified on read, safe to share between concurrent jobs.

    One JSON per (model, condition), ``<key>.json``: the scores, the generations, the name and
    sha256 of the activations file, and its own checksum. The activations file is named by its
    content (``<key>.<sha256[:16]>.safetensors``) and written before the JSON, each atomically:
    two jobs that write the same record at once can only leave a JSON that points at a complete
    file with the bytes it names. On read, a JSON or activations file that is missing, cannot be
    parsed, differs from its checksum or holds a NaN is refused with an ``IntegrityError`` naming
    the file and the fix. Records of the older layout (``<key>.safetensors`` beside a JSON
    without checksums) are read unverified, with one warning per store.
    """

    _FIELDS = ("score", "indomain", "generations")

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._warned = False

    def _paths(self, key: str) -> tuple[Path, Path]:
        """The older layout's activations file and the record's JSON."""
        safe = key.replace("/", "_").replace(":", "_")
        return self.root / f"{safe}.safetensors", self.root / f"{safe}.json"

    def has(self, key: str) -> bool:
        """Whether a record is stored under ``key`` (not verified: ``get`` does that)."""
        return self._paths(key)[1].exists()

    def get(self, key: str) -> Record | None:
        t, j = self._paths(key)
        if not j.exists():
            return None
        fix = (
            f"delete {j.name} in {self.root} and re-run the same study (or `mci records`) to "
            "recompute this record"
        )
        meta = read_json_verified(j, fix=fix)
        missing = [k for k in self._FIELDS if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise IntegrityError(f"{j} lacks the fields {missing}; {fix}")
        if "sha256" in meta:
            body = {k: v for k, v in meta.items() if k != "sha256"}
            if canonical_sha256(body) != meta["sha256"]:
                raise IntegrityError(
                    f"{j} does not match the checksum recorded in it: it was altered; {fix}"
                )
            name = meta.get("acts_file")
            if name is not None and (not isinstance(name, str) or Path(name).name != name):
                raise IntegrityError(f"{j} names an activations file outside {self.root}; {fix}")
            acts = (
                None
                if name is None
                else load_safetensors_verified(
                    self.root / name, sha256=meta.get("acts_sha256"), fix=fix, keys=["acts"]
                )["acts"]
            )
        else:  # written before records kept checksums
            if not self._warned:
                log.warning(
                    "%s holds records without checksums (written by an older version): read "
                    "unverified",
                    self.root,
                )
                self._warned = True
            acts = (
                load_safetensors_verified(t, sha256=None, fix=fix, keys=["acts"])["acts"]
                if t.exists()
                else None
            )
        return Record(
            name=key,
            acts=acts,
            score=None if meta["score"] is None else EvalResult.from_dict(meta["score"]),
            indomain=None if meta["indomain"] is None else EvalResult.from_dict(meta["indomain"]),
            generations=meta["generations"],
        )

    def put(self, rec: Record) -> Record:
        """Store ``rec`` (activations first, then the JSON that names them), atomically."""
        t, j = self._paths(rec.name)
        acts_file = acts_sha = None
        if rec.acts is not None:
            if not torch.isfinite(rec.acts).all():
                raise ValueError(
                    f"record {rec.name}: the model produced non-finite activations (NaN or inf); "
                    "nothing was stored. In float16 this is usually an overflow: load the model "
                    "in bfloat16 or float32"
                )
            fd, staged = tempfile.mkstemp(prefix=f".{t.stem}.", suffix=".tmp", dir=self.root)
            os.close(fd)
            try:
                save_file({"acts": rec.acts.contiguous()}, staged)
                acts_sha = sha256_file(staged)
                acts_file = f"{t.stem}.{acts_sha[:16]}.safetensors"
                os.replace(staged, self.root / acts_file)  # its name says what it holds
            finally:
                if os.path.exists(staged):
                    os.unlink(staged)
        body = {
            "score": None if rec.score is None else rec.score.to_dict(),
            "indomain": None if rec.indomain is None else rec.indomain.to_dict(),
            "generations": rec.generations,
            "acts_file": acts_file,
            "acts_sha256": acts_sha,
        }
        # the checksum of the body as it reads back from JSON (tuples become lists, ...)
        body = json.loads(json.dumps(body, default=str))
        write_json(j, body | {"sha256": canonical_sha256(body)})
        return rec
