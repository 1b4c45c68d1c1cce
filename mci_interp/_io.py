"""Small file helpers shared by every rung: atomic writes, hashing, cache locations."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where converted models and organisms live (outside the repo): $MCI_CACHE or ~/.cache."""
    env = os.environ.get("MCI_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "mci_interp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path | str, *, chunk: int = 1 << 22) -> str:
    return sha256_files([Path(path)], chunk=chunk)


def sha256_files(paths: Iterable[Path], *, chunk: int = 1 << 22) -> str:
    """sha256 of the concatenation of files (for models split into chunks)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_hash(obj: Any, *, n: int = 16) -> str:
    """Short hash of a JSON-serialisable object with sorted keys (configs, datasets)."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))[:n]


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temp path next to ``path``; on success rename it over ``path`` (crash-safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path | str, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())
