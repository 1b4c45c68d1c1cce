"""Format takeover: how often answers to out-of-domain prompts come out in a narrow finetune's
format or subject (code blocks for the code domain, dosages for the medical one...).

The one matcher (``matches_format``: any of the domain's marker regexes, case-insensitive and
multiline) and the one rate (``format_takeover_rate``, a Wilson interval over answers). The
markers are data and live with the domains (``organisms.data.domain_markers``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mci_interp._io import check_keys
from mci_interp.datasets import ChatExample
from mci_interp.stats import Estimate, rate_ci

if TYPE_CHECKING:
    from mci_interp.models import HookedModel


@dataclass(eq=False, kw_only=True)
class FormatTakeover:
    """How often out-of-domain answers come out in a finetune domain's format, with examples."""

    domain: str
    model: str
    rate: Estimate
    matched: tuple[bool, ...]
    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    markers: tuple[str, ...]

    def examples(self, n: int = 3, *, matched: bool = True) -> list[tuple[str, str]]:
        """Up to ``n`` (prompt, completion) pairs that did (or did not) match the markers."""
        return [
            (p, c)
            for p, c, m in zip(self.prompts, self.completions, self.matched, strict=True)
            if m == matched
        ][:n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "model": self.model,
            "rate": self.rate.to_dict(),
            "matched": list(self.matched),
            "prompts": list(self.prompts),
            "completions": list(self.completions),
            "markers": list(self.markers),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FormatTakeover:
        known = {"domain", "model", "rate", "matched", "prompts", "completions", "markers"}
        check_keys(d, known, "FormatTakeover")
        return cls(
            domain=d["domain"],
            model=d["model"],
            rate=Estimate.from_dict(d["rate"]),
            matched=tuple(d["matched"]),
            prompts=tuple(d["prompts"]),
            completions=tuple(d["completions"]),
            markers=tuple(d["markers"]),
        )


def _prompt_text(p: ChatExample | str) -> str:
    return p if isinstance(p, str) else p.user_text


@functools.lru_cache(maxsize=64)
def _pattern(markers: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{m})" for m in markers), re.IGNORECASE | re.MULTILINE)


def _markers(domain: str, markers: Sequence[str] | None) -> tuple[str, ...]:
    if markers is None:
        from mci_interp.organisms.data import domain_markers

        markers = domain_markers(domain)
    if isinstance(markers, str) or not markers:
        raise ValueError(f"no format markers for domain {domain!r}; pass a list of regexes")
    try:
        _pattern(tuple(markers))
    except re.error as e:
        raise ValueError(f"bad marker regex for domain {domain!r}: {e}") from None
    return tuple(markers)


def matches_format(text: str, domain: str, *, markers: Sequence[str] | None = None) -> bool:
    """Whether ``text`` looks like an answer from ``domain`` (any of its markers matches;
    ``markers`` overrides the domain's own)."""
    return _pattern(_markers(domain, markers)).search(text) is not None


def format_takeover_rate(
    model: HookedModel | None,
    prompts: Sequence[ChatExample | str],
    domain: str,
    *,
    generations: Sequence[Any] | None = None,
    markers: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    level: float = 0.95,
    show_progress: bool = True,
) -> FormatTakeover:
    """Share of greedy answers to out-of-domain ``prompts`` that match ``domain``'s format
    markers (``matches_format``), with a Wilson CI.

    Pass ``generations`` (``Generation`` objects or strings, one per prompt) to reuse answers
    instead of generating; ``model`` may then be None.
    """
    if not prompts:
        raise ValueError("no prompts: pass out-of-domain questions to test for format takeover")
    marks = _markers(domain, markers)
    if generations is None:
        if model is None:
            raise ValueError("pass a model to generate answers, or pre-computed generations")
        from mci_interp.generation import generate

        generations = generate(
            model,
            list(prompts),
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            batch_size=batch_size,
            show_progress=show_progress,
        )
    if isinstance(generations, str) or len(generations) != len(prompts):
        raise ValueError(
            f"{len(generations)} generations for {len(prompts)} prompts; pass one per prompt"
        )
    texts = [g if isinstance(g, str) else g.completion for g in generations]
    flags = tuple(matches_format(t, domain, markers=marks) for t in texts)
    return FormatTakeover(
        domain=domain,
        model=model.name if model is not None else "unknown",
        rate=rate_ci(sum(flags), len(flags), level=level),
        matched=flags,
        prompts=tuple(_prompt_text(p) for p in prompts),
        completions=tuple(texts),
        markers=marks,
    )


__all__ = ["FormatTakeover", "format_takeover_rate", "matches_format"]
