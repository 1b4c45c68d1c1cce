"""Small file helpers shared by every rung: atomic writes, hashing, cache locations, and reads
that verify what an earlier job (or another machine) wrote."""

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


# --- verified reads ----------------------------------------------------------------------------
class IntegrityError(ValueError):
    """A stored file failed verification on read: missing, unreadable, altered or non-finite.

    The message names the file and the fix (usually: delete it and re-run to recompute).
    """


def read_json_verified(path: Path | str, *, fix: str) -> Any:
    """``read_json`` that names the file and ``fix`` when it is missing or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is unreadable (truncated or damaged: {e}); {fix}") from None


def verify_sha256(path: Path | str, expected: str | None, *, fix: str) -> None:
    """``IntegrityError`` naming the file if it is missing or its sha256 differs from
    ``expected`` (None: nothing recorded, so only its presence is checked)."""
    path = Path(path)
    if not path.exists():
        raise IntegrityError(f"{path} is missing; {fix}")
    if expected is None:
        return
    got = sha256_file(path)
    if expected is not None and got != expected:
        raise IntegrityError(
            f"{path} does not match the sha256 recorded when it was written (recorded "
            f"{expected[:16]}..., found {got[:16]}...): it was altered or damaged; {fix}"
        )


def load_safetensors_verified(
    path: Path | str,
    *,
    sha256: str | None,
    fix: str,
    keys: Iterable[str] = (),
) -> dict[str, Any]:
    """Read a safetensors file we wrote, refusing (``IntegrityError`` naming the file and
    ``fix``) a file that is missing, whose sha256 differs from ``sha256`` (None: not checked, an
    older index kept none), that safetensors cannot parse (e.g. truncated), that lacks one of
    ``keys``, or whose floating-point tensors hold a NaN or an infinity."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    verify_sha256(path, sha256, fix=fix)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type, or OSError, or ValueError
        raise IntegrityError(
            f"{path} is unreadable (truncated or not a safetensors file: {e}); {fix}"
        ) from None
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise IntegrityError(f"{path} lacks the tensors {missing}; {fix}")
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise IntegrityError(
                    f"{path} holds {bad} non-finite values (NaN or inf) in {name!r}; {fix}"
                )
    return tensors


def canonical_sha256(obj: Any) -> str:
    """sha256 of a JSON-serialisable object written with sorted keys (a JSON file's own
    checksum: what was written parses back to an object with the same digest)."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


def check_keys(d: Any, known: Any, what: str) -> None:
    """Refuse keys of a stored dict that ``known`` (a dataclass or an iterable of names) lacks,
    naming them and the valid ones (a record written by another version fails loudly)."""
    import dataclasses

    names = (
        {f.name for f in dataclasses.fields(known)}
        if dataclasses.is_dataclass(known)
        else set(known)
    )
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; valid keys: {sorted(names)}")
