"""Hook sites: the only place a TransformerLens-style hook name is built or parsed."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal, get_args

Component = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
COMPONENTS: tuple[str, ...] = get_args(Component)
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")


@dataclass(frozen=True, slots=True, order=True)
class Site:
    """A place in the residual stream: block ``layer`` and a component of it.

    ``resid_pre`` is the input of block ``layer`` (the persona-vectors convention), ``resid_post``
    its output (the model-organisms convention, equal to Hugging Face ``hidden_states[layer+1]``).
    """

    layer: int
    component: str = "resid_post"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"Site layer must be a non-negative int, got {self.layer!r}")
        if self.component not in COMPONENTS:
            raise ValueError(
                f"unknown site component {self.component!r}; choose one of {', '.join(COMPONENTS)}"
            )

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.component}"

    @classmethod
    def parse(cls, hook_name: str) -> Site:
        """Parse ``blocks.12.hook_resid_post``; a bare integer means that layer's resid_post."""
        text = str(hook_name).strip()
        if text.isdigit():
            return cls(int(text))
        m = _HOOK_RE.match(text)
        if m is None:
            raise ValueError(
                f"cannot parse hook name {hook_name!r}: expected e.g. 'blocks.12.hook_resid_post' "
                f"with a component in {COMPONENTS}, or a bare layer number"
            )
        return cls(int(m.group(1)), m.group(2))

    def check(self, n_layers: int) -> Site:
        """Return self, or raise if the model has no such block."""
        if self.layer >= n_layers:
            raise ValueError(
                f"site {self.hook_name} is beyond the model's depth: it has {n_layers} blocks "
                f"(layers 0..{n_layers - 1})"
            )
        return self

    def __str__(self) -> str:
        return self.hook_name


def as_site(site: Site | int | str, *, component: str = "resid_post") -> Site:
    """The one way user input becomes a Site: a ``Site`` as is, a layer number (that layer's
    ``component``), or a TransformerLens hook name such as ``"blocks.12.hook_resid_post"`` (a bare
    ``"12"`` is a layer number). Anything else is a ValueError naming it."""
    if isinstance(site, Site):
        return site
    if isinstance(site, str):
        text = site.strip()
        return Site(int(text), component) if text.isdigit() else Site.parse(text)
    if not isinstance(site, bool) and hasattr(site, "__index__"):
        return Site(operator.index(site), component)
    raise ValueError(
        f"site {site!r} ({type(site).__name__}) is not a Site, a layer number or a hook name such "
        "as 'blocks.12.hook_resid_post'"
    )


def parse_layers(spec: str | int | list[int], n_layers: int) -> list[int]:
    """Turn 'all', 'middle', '10', '5,10,15', '0-12' or '0-29:3' into a sorted list of layers."""
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, list):
        layers = [int(x) for x in spec]
    else:
        text = spec.strip().lower()
        if text == "all":
            layers = list(range(n_layers))
        elif text == "middle":
            layers = [n_layers // 2]
        else:
            layers = []
            for part in text.split(","):
                part = part.strip()
                m = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?", part)
                if m:
                    lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
                    layers.extend(range(lo, hi + 1, step))
                elif part.isdigit():
                    layers.append(int(part))
                else:
                    raise ValueError(
                        f"cannot parse layer spec {spec!r}: use 'all', 'middle', '12', '4,8,12' "
                        f"or '0-29:3'"
                    )
    bad = [x for x in layers if x < 0 or x >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} are beyond the model's depth (0..{n_layers - 1})")
    return sorted(set(layers))
