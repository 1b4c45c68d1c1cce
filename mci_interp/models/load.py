"""Specs to models: ``load_model`` (registry names, local HF directories, hub ids pinned to a
commit, LoRA adapters local or on the hub, full-weight finetunes declared against a base), dtypes
and devices, ``merge_adapter``, ``model_dir`` and ``save_atomic_dir``."""

from __future__ import annotations

import copy
import importlib.util
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from mci_interp._io import read_json, sha256_file, sha256_files
from mci_interp.models.hooked import HookedModel, prepare_for_inference
from mci_interp.models.packaged import convert_packaged
from mci_interp.specs import ModelSpec, known_names, resolve_spec

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# from_pretrained arguments load_model sets itself: refused in **hf_kwargs, naming the fix
_OWN_KEYS = {"torch_dtype": "dtype=", "gguf_file": "a packaged registry spec"}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float32|bfloat16|float16`` (or fp32/bf16/fp16/half) or a floating ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _FLOATS:
            raise ValueError(
                f"dtype {dtype} is not a floating-point dtype; use one of {', '.join(DTYPE_CHOICES)}"
            )
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)} (or a torch.dtype)"
        )
    return DTYPES[key]


def _dtype_arg(dtype: str | torch.dtype) -> torch.dtype | Literal["auto"]:
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return "auto"
    return parse_dtype(dtype)


def _more_precise(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype that loses nothing of either (bf16 with fp16 gives float32)."""
    return a if a == b else torch.promote_types(torch.promote_types(a, b), torch.float32)


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or a ValueError naming the value and the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"unknown device {device!r} ({e}); use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps', or "
            "device_map='auto' to spread a large model over every GPU"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} needs CUDA, but this torch ({torch.__version__}) sees no GPU; "
                "use device='cpu', or install a CUDA build of torch into this environment"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"device {device!r}: this machine has {n} GPU(s) (cuda:0..cuda:{n - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use device='cpu'")
    return dev


def _placement(
    device: str | torch.device | None, device_map: Any
) -> tuple[dict, torch.device | None]:
    """from_pretrained keyword arguments that place the weights, and a device to move to after."""
    if device is not None and device_map is not None:
        raise ValueError(
            f"pass device={device!r} or device_map={device_map!r}, not both: device puts the "
            "whole model on one device, device_map='auto' spreads it over several"
        )
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(
                f"device_map={device_map!r} is handled by accelerate, which is not installed; "
                "pip install accelerate (or pass device='cuda:0' for a model that fits one GPU)"
            )
        return {"device_map": device_map}, None
    if device is None:
        return {}, None
    dev = parse_device(device)
    if dev.type == "cpu":
        return {}, None
    if importlib.util.find_spec("accelerate") is not None:  # straight onto the device
        return {"device_map": {"": dev}}, None
    return {}, dev


def _check_hf_kwargs(hf_kwargs: dict[str, Any]) -> None:
    for key, use in _OWN_KEYS.items():
        if key in hf_kwargs:
            raise ValueError(
                f"{key}= in the extra from_pretrained arguments: load_model sets it itself; "
                f"use {use} instead"
            )


def _dir_sha(path: Path) -> str:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors or *.bin weights")
    return sha256_files(files)


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    names = (
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "HfHubHTTPError",
    )
    found = tuple(getattr(errors, n) for n in names if hasattr(errors, n))
    return (*found, OSError)


def resolve_commit(repo_id: str, revision: str | None, *, filename: str) -> tuple[Path, str]:
    """Fetch ``filename`` of a hub repo at ``revision`` (a branch, tag or commit; None = main),
    from the local cache when offline, and return its snapshot folder and the 40-hex commit."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision))
    except _hub_errors() as e:
        rev = revision or "main"
        raise ValueError(
            f"cannot fetch {filename} of hub repo {repo_id!r} at revision {rev!r}: "
            f"{type(e).__name__}: {str(e).rstrip('.')}. Check the id and revision; offline (HF_HUB_OFFLINE=1), "
            f"download it first with `hf download {repo_id} --revision {rev}`"
        ) from None
    commit = path.parent.name
    if not _COMMIT.match(commit):
        raise ValueError(
            f"hub repo {repo_id!r}: {filename} resolved to {path}, not inside a snapshots/<commit> "
            "folder, so its commit is unknown; pass revision=<40-hex commit>"
        )
    if revision is not None and _COMMIT.match(revision) and revision != commit:
        raise ValueError(f"hub repo {repo_id!r}: asked for commit {revision}, got {commit}")
    if revision is None or not _COMMIT.match(revision):
        log.info("%s: revision %s resolved to commit %s", repo_id, revision or "main", commit)
    return path.parent, commit


def _stored_dtype(config: Any) -> torch.dtype:
    got = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(got, str):
        got = DTYPES.get(got.removeprefix("torch."))
    return got if isinstance(got, torch.dtype) and got in _FLOATS else torch.float32


def _load_hf(
    source: str | Path,
    dtype: torch.dtype | Literal["auto"],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    placement: dict[str, Any] | None = None,
    hf_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rev = {} if revision is None else {"revision": revision}
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **rev)
    extra = {"use_safetensors": None, **(hf_kwargs or {})}
    hf = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        **rev,
        **(placement or {}),
        **extra,
    )
    return hf, tok


def _config_dtype(spec: ModelSpec, *, trust_remote_code: bool) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (read from its config; no weights loaded)."""
    from transformers import AutoConfig

    if spec.source == "packaged_gguf":
        return torch.float32  # dequantised into float32 by convert_packaged
    source = (spec.path or spec.name) if spec.source == "local_hf" else spec.hub_id or spec.name
    rev = {"revision": spec.revision} if spec.source == "hub" and spec.revision else {}
    cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **rev)
    return _stored_dtype(cfg)


def _load_weights(
    spec: ModelSpec,
    dtype: torch.dtype | Literal["auto"],
    *,
    trust_remote_code: bool,
    placement: dict[str, Any],
    move_to: torch.device | None,
    hf_kwargs: dict[str, Any],
) -> HookedModel:
    """One checkpoint (not an adapter) as a HookedModel; ``spec`` is resolved (hub: pinned)."""
    if spec.source == "packaged_gguf":
        path, digest = convert_packaged(spec)
        hf, tok = _load_hf(path, dtype, placement=placement, hf_kwargs=hf_kwargs)
    elif spec.source == "local_hf":
        path = Path(spec.path or spec.name)
        hf, tok = _load_hf(
            path,
            dtype,
            trust_remote_code=trust_remote_code,
            placement=placement,
            hf_kwargs=hf_kwargs,
        )
        digest = _dir_sha(path)
    elif spec.source == "hub":
        repo = spec.hub_id or spec.name
        if spec.revision is None or not _COMMIT.match(spec.revision):
            raise ValueError(f"internal: hub spec {repo} reached loading unpinned")
        hf, tok = _load_hf(
            repo,
            dtype,
            revision=spec.revision,
            trust_remote_code=trust_remote_code,
            placement=placement,
            hf_kwargs=hf_kwargs,
        )
        digest = f"hub:{repo}@{spec.revision}"
    else:
        raise ValueError(f"{spec.name}: source {spec.source!r} cannot be loaded by load_model")
    if move_to is not None:
        hf.to(move_to)
    prepare_for_inference(hf, tok)
    return HookedModel(hf=hf, tokenizer=tok, spec=spec, sha256=digest)


def _pin(spec: ModelSpec) -> ModelSpec:
    """A hub spec with its revision resolved to the commit (other specs unchanged)."""
    if spec.source == "hub":
        repo = spec.hub_id or spec.name
        _, commit = resolve_commit(repo, spec.revision, filename="config.json")
        return replace(spec, hub_id=repo, revision=commit)
    return spec  # a declared base (full-weight finetune) is compared by name, never loaded


def load_model(
    name_or_spec: str | Path | ModelSpec = "smollm2-135m-instruct",
    *,
    adapter: str | Path | None = None,
    adapter_revision: str | None = None,
    base: str | ModelSpec | HookedModel | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    **hf_kwargs: Any,
) -> HookedModel:
    """Load a model by registry name, local HF directory or hub id, optionally merging a LoRA
    adapter. Weights stay raw (no LayerNorm folding, no centring).

    Args:
        name_or_spec: a registry name (``mci models``), a local Hugging Face directory, a hub id
            ``org/name`` or a ``ModelSpec``.
        adapter: a LoRA adapter directory or hub id, merged into the weights on load.
        adapter_revision: branch, tag or commit of a hub adapter (default: main).
        base: declares ``name_or_spec`` a full-weight finetune of this base (a name, spec or
            loaded ``HookedModel``, checked for the same tokenizer and width), so
            ``model_diff`` and ``mci converge`` accept it against that base.
        device: put the whole model on this device (``"cuda:0"``, ``"mps"``, ``"cpu"``).
        device_map: accelerate's placement, e.g. ``"auto"`` to spread a model too large for one
            GPU over all of them (and CPU memory after). Exclusive with ``device``.
        dtype: ``float32`` (default), ``bfloat16``, ``float16``, ``auto`` (the dtype the
            checkpoint stores) or a ``torch.dtype``.
        revision: branch, tag or commit of a hub model. Either way, the model's ``sha256`` (its
            cache key) is ``hub:<id>@<commit it resolved to>``, never the name.
        trust_remote_code: run the checkpoint's own modelling code (off unless you trust it).
        **hf_kwargs: further ``from_pretrained`` arguments (``attn_implementation``, ``token``,
            ``quantization_config``, ...).
    """
    _check_hf_kwargs(hf_kwargs)
    want = _dtype_arg(dtype)
    placement, move_to = _placement(device, device_map)
    if adapter is not None and base is not None:
        raise ValueError(
            "pass adapter= or base=, not both: with an adapter the base is the model itself; "
            "base= declares a full-weight finetune"
        )
    base_spec = base.spec if isinstance(base, HookedModel) else base
    try:
        spec = resolve_spec(
            name_or_spec,
            adapter=adapter,
            base=base_spec,
            revision=revision,
            adapter_revision=adapter_revision,
        )
    except ValueError as e:
        if not str(e).startswith("unknown model"):
            raise
        raise ValueError(f"{e}. Known models: {', '.join(known_names())}") from None
    common = dict(
        trust_remote_code=trust_remote_code,
        placement=placement,
        move_to=move_to,
        hf_kwargs=hf_kwargs,
    )
    if spec.source == "lora":
        if spec.base is None:
            raise ValueError(f"internal: LoRA spec {spec.name} has no base")
        base_pinned = _pin(spec.base)
        adapter_dir, adapter_key, spec = _fetch_adapter(spec, base_pinned)
        # merge at the precision of the stored base or the dtype asked for, whichever is finer,
        # so the result equals merging in float32 and casting (one copy of the base in memory)
        if want == "auto":
            load_dtype: torch.dtype | Literal["auto"] = "auto"
        else:
            stored = _config_dtype(base_pinned, trust_remote_code=trust_remote_code)
            load_dtype = _more_precise(want, stored)
        base_model = _load_weights(base_pinned, load_dtype, **common)  # type: ignore[arg-type]
        return _merge_into(
            base_model.hf,
            base_model,
            adapter_dir,
            dtype=None if want == "auto" else want,
            spec=spec,
            sha256=adapter_key,
        )
    spec = _pin(spec)
    model = _load_weights(spec, want, **common)  # type: ignore[arg-type]
    if isinstance(base, HookedModel):
        base.check_same_family(model)
    return model


def _fetch_adapter(spec: ModelSpec, base: ModelSpec) -> tuple[Path, str | None, ModelSpec]:
    """A LoRA spec's adapter as a local directory, its cache key (None: hash its weights) and the
    spec with the pinned base and, for a hub adapter, the commit."""
    if spec.hub_id is None:
        return Path(spec.path or ""), None, replace(spec, base=base)
    cfg_dir, commit = resolve_commit(spec.hub_id, spec.revision, filename="adapter_config.json")
    resolve_commit(spec.hub_id, commit, filename="adapter_model.safetensors")
    pinned = replace(spec, base=base, revision=commit, path=str(cfg_dir))
    return cfg_dir, f"hub:{spec.hub_id}@{commit}", pinned


def merge_adapter(
    base: HookedModel,
    adapter_dir: Path | str,
    *,
    dtype: str | torch.dtype | None = None,
) -> HookedModel:
    """A new HookedModel: a copy of ``base`` (same device) with the LoRA adapter merged in; the
    base is left unchanged. The copy costs a whole model's memory; to study many adapters of one
    base, share its weights instead (``base.load_adapter`` and ``with base.adapter(name)``).

    The merge runs in the base's dtype, or in ``dtype`` first when that is finer, and the
    result is in ``dtype`` (default: the base's dtype). A bfloat16 base gives a bfloat16 model
    whose weights equal merging in float32 and rounding once.
    """
    adapter_dir = Path(adapter_dir)
    base._check_serving()  # a base serving an adapter right now would be copied with it
    if base._adapters is not None and base._adapters.base is not base:
        raise ValueError(
            f"{base.name} is an adapter sharing the weights of {base._adapters.base.name}; "
            "merge onto that base"
        )
    _check_adapter_dir(adapter_dir, base)
    want = None if dtype is None else parse_dtype(dtype)
    hf = copy.deepcopy(base.hf)  # the base's adapters (base.load_adapter) are out of its tree
    return _merge_into(hf, base, adapter_dir, dtype=want)


def _check_adapter_dir(adapter_dir: Path, base: HookedModel) -> dict[str, Any]:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter (no adapter_config.json)")
    if not (adapter_dir / "adapter_model.safetensors").exists() and any(adapter_dir.glob("*.bin")):
        raise ValueError(
            f"{adapter_dir} holds a pickled adapter (adapter_model.bin); checkpoints from "
            "strangers are not unpickled. Convert it to adapter_model.safetensors first"
        )
    meta_path = adapter_dir / "mci_organism.json"
    if meta_path.exists():
        want = read_json(meta_path).get("base_sha256")
        if want and want != base.sha256:
            raise ValueError(
                f"adapter {adapter_dir} was trained on base sha256 {want[:12]}, but the base given "
                f"is {base.name} with sha256 {base.sha256[:12]}; load the matching base"
            )
    return read_json(cfg_path)


def _merge_into(
    hf: Any,
    base: HookedModel,
    adapter_dir: Path,
    *,
    dtype: torch.dtype | None,
    spec: ModelSpec | None = None,
    sha256: str | None = None,
) -> HookedModel:
    """Merge the adapter into ``hf`` (a model the caller owns: it is changed in place)."""
    from peft import PeftModel

    cfg = _check_adapter_dir(adapter_dir, base)
    current = next(hf.parameters()).dtype
    if dtype is not None and _more_precise(dtype, current) != current:
        hf = hf.to(dtype)  # finer than the base: merge there
    try:
        with warnings.catch_warnings():  # peft asks a deprecated transformers property, each load
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = PeftModel.from_pretrained(hf, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(
            f"adapter {adapter_dir} does not fit base {base.name} "
            f"(adapter says base {cfg.get('base_model_name_or_path')!r}): {e}"
        ) from e
    merged = peft_model.merge_and_unload()
    if dtype is not None and next(merged.parameters()).dtype != dtype:
        merged = merged.to(dtype)
    prepare_for_inference(merged, base.tokenizer)
    if sha256 is None:
        weights = adapter_dir / "adapter_model.safetensors"
        sha256 = sha256_file(weights) if weights.exists() else "unknown"
    if spec is None:
        spec = ModelSpec(
            name=f"{base.name}+{adapter_dir.name}",
            source="lora",
            base=base.spec,
            path=str(adapter_dir),
        )
    return HookedModel(hf=merged, tokenizer=base.tokenizer, spec=spec, sha256=sha256)


def model_dir(name_or_spec: str | ModelSpec) -> Path:
    """A Hugging Face directory for a spec (converting a packaged GGUF if needed)."""
    spec = resolve_spec(name_or_spec)
    if spec.source == "packaged_gguf":
        return convert_packaged(spec)[0]
    if spec.source == "local_hf" and spec.path:
        return Path(spec.path)
    raise ValueError(f"{spec.name} ({spec.source}) has no local directory")


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
