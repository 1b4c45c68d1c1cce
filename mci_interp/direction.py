"""Directions: a vector in the residual stream, the site it lives at, and where it came from.

A ``Direction`` saves to ONE ``.safetensors`` file whose header metadata carries the provenance
JSON; a ``DirectionSet`` saves to a folder with an ``index.json``. Loading is strict: unknown or
missing provenance keys raise.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from mci_interp import __version__
from mci_interp._io import atomic_path, check_keys, read_json, write_json
from mci_interp.sites import Site, as_site

Param = str | int | float | bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """Everything needed to say where a direction came from."""

    model: str
    base_model: str
    model_sha256: str
    method: str
    dataset: str
    dataset_hash: str
    position: str
    n_pos: int
    n_neg: int
    params: Mapping[str, Param] = field(default_factory=dict)
    library_version: str = __version__
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["params"] = dict(self.params)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        check_keys(d, cls, "provenance")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = required - set(d)
        if missing:
            raise ValueError(f"provenance is missing keys {sorted(missing)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> Provenance:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True, eq=False, kw_only=True)
class Direction:
    """A candidate direction at one site. ``vector`` is float32 on CPU, in raw HF basis."""

    vector: Float[Tensor, " d_model"]
    site: Site
    provenance: Provenance

    def __post_init__(self) -> None:
        if not isinstance(self.site, Site):  # a hook name or layer number given by the user
            object.__setattr__(self, "site", as_site(self.site))
        v = self.vector
        if not isinstance(v, Tensor) or v.ndim != 1:
            raise ValueError(
                f"Direction.vector must be a 1-D tensor, got {getattr(v, 'shape', v)!r}"
            )
        if not torch.isfinite(v).all():
            raise ValueError(f"Direction at {self.site} has NaN or inf entries")
        object.__setattr__(self, "vector", v.detach().to("cpu", torch.float32).contiguous())

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def name(self) -> str:
        p = self.provenance
        return f"{p.method}:{p.model}@{self.site.hook_name}"

    def unit(self) -> Direction:
        n = self.vector.norm()
        if n == 0:
            raise ValueError(f"direction {self.name} has zero norm and cannot be normalised")
        return dataclasses.replace(self, vector=self.vector / n)

    def project(self, acts: Float[Tensor, "*b d_model"]) -> Float[Tensor, "*b"]:
        """Scalar projection of activations onto the unit direction."""
        if acts.shape[-1] != self.d_model:
            raise ValueError(
                f"activations have d_model {acts.shape[-1]} but direction {self.name} has {self.d_model}"
            )
        u = self.unit().vector.to(acts.device, acts.dtype)
        return acts @ u

    def cosine(self, other: Direction) -> float:
        if other.d_model != self.d_model:
            raise ValueError(f"cannot compare d_model {self.d_model} with {other.d_model}")
        return float(torch.nn.functional.cosine_similarity(self.vector, other.vector, dim=0))

    @classmethod
    def by_hand(
        cls, vector: Tensor, site: Site | int | str, *, model: str = "", method: str = "by_hand"
    ) -> Direction:
        """A direction made by hand, not measured (a planted truth, a vector from elsewhere):
        its provenance says so, with no data set or sample behind it."""
        prov = Provenance(
            model=model,
            base_model=model,
            model_sha256="",
            method=method,
            dataset="none",
            dataset_hash="",
            position="none",
            n_pos=0,
            n_neg=0,
        )
        return cls(vector=vector.float(), site=as_site(site), provenance=prov)

    def with_vector(self, vector: Tensor, **provenance_changes: Any) -> Direction:
        prov = (
            self.provenance.replace(**provenance_changes) if provenance_changes else self.provenance
        )
        return Direction(vector=vector, site=self.site, provenance=prov)

    def check_compatible(
        self, *, d_model: int, n_layers: int, model_name: str | None = None
    ) -> None:
        """Raise if this direction cannot live in a model of this size."""
        if self.d_model != d_model:
            raise ValueError(
                f"direction {self.name} has d_model {self.d_model} but model "
                f"{model_name or ''} has d_model {d_model}: it comes from another model"
            )
        self.site.check(n_layers)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        meta = {
            "format": "mci_interp.direction/1",
            "site": self.site.hook_name,
            "provenance": json.dumps(self.provenance.to_dict(), sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file({"vector": self.vector}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path | str) -> Direction:
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        if meta.get("format") != "mci_interp.direction/1" or keys != {"vector"}:
            raise ValueError(
                f"{path} is not an mci_interp direction file (format={meta.get('format')!r}, "
                f"tensors={sorted(keys)})"
            )
        extra = set(meta) - {"format", "site", "provenance"}
        if extra:
            raise ValueError(f"{path}: unknown header keys {sorted(extra)}")
        vec = load_file(str(path))["vector"]
        prov = Provenance.from_dict(json.loads(meta["provenance"]))
        return cls(vector=vec, site=Site.parse(meta["site"]), provenance=prov)


def random_direction(
    like: Direction,
    *,
    generator: torch.Generator,
    norm: float | None = None,
    method: str = "random",
) -> Direction:
    """A Gaussian direction with the same site and (by default) the same norm as ``like``."""
    v = torch.randn(like.d_model, generator=generator, dtype=torch.float64).float()
    target = like.norm if norm is None else norm
    v = v / v.norm() * target
    return like.with_vector(v, method=method, params={"norm_matched_to": like.name})


@dataclass(frozen=True, slots=True)
class DirectionSet(Sequence[Direction]):
    """An ordered collection of directions (a layer sweep, or one per checkpoint)."""

    directions: tuple[Direction, ...]

    def __init__(self, directions: Sequence[Direction] = ()) -> None:
        object.__setattr__(self, "directions", tuple(directions))

    def __len__(self) -> int:
        return len(self.directions)

    def __getitem__(self, i):  # type: ignore[override]
        return self.directions[i]

    def __iter__(self) -> Iterator[Direction]:
        return iter(self.directions)

    def at(self, site: Site) -> Direction:
        for d in self.directions:
            if d.site == site:
                return d
        raise KeyError(f"no direction at {site}; have {[str(d.site) for d in self.directions]}")

    def by_layer(self) -> dict[int, Direction]:
        return {d.site.layer: d for d in self.directions}

    def stack(self) -> Tensor:
        return torch.stack([d.vector for d in self.directions])

    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, d in enumerate(self.directions):
            fname = f"{i:03d}_{d.site.hook_name}.safetensors"
            d.save(folder / fname)
            names.append(fname)
        write_json(folder / "index.json", {"format": "mci_interp.direction_set/1", "files": names})
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> DirectionSet:
        folder = Path(folder)
        index = read_json(folder / "index.json")
        if index.get("format") != "mci_interp.direction_set/1":
            raise ValueError(f"{folder}/index.json is not an mci_interp direction set index")
        return cls([Direction.load(folder / n) for n in index["files"]])
