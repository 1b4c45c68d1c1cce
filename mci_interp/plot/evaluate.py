"""Figures for misalignment scores: models side by side with 95% CIs, and a per-theme breakdown.

Inputs are ``EvalResult`` objects (a list = seeds of one model, averaged per question before the
bootstrap) or ready ``Estimate`` objects. Nothing here imports model code: results are used
through their methods (``ci``, ``by_theme``, ``average``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from mci_interp.plot.colours import KIND_COLOURS

if TYPE_CHECKING:
    from mci_interp.evaluate import EvalResult
    from mci_interp.stats import Estimate

    ResultLike = EvalResult | Sequence[EvalResult] | Estimate


def infer_kind(name: str) -> str:
    """Guess a model's kind from its name: base, control, persona or organism."""
    n = name.lower()
    if "base" in n:
        return "base"
    if "persona" in n or "prompted" in n:
        return "persona"
    if any(w in n for w in ("control", "prudent", "benign", "safe")) or re.search(
        r"(^|[^n])secure", n
    ):
        return "control"
    return "organism"


def _is_estimate(x: Any) -> bool:
    return all(hasattr(x, a) for a in ("mean", "lo", "hi", "n")) and not hasattr(x, "scores")


def _single(x: Any) -> Any:
    """One result from a result, or the per-question seed average of a list of results."""
    if hasattr(x, "scores"):
        return x
    items = list(x)
    if not items:
        raise ValueError("an empty list of results cannot be plotted")
    return type(items[0]).average(items) if len(items) > 1 else items[0]


def _estimate(x: Any, *, which: str, level: float, n_boot: int, seed: int) -> Any:
    if _is_estimate(x):
        return x
    return _single(x).ci(level=level, n_boot=n_boot, seed=seed, which=which)


def _yerr(ests: Sequence[Any]) -> list[list[float]]:
    lo = [0.0 if math.isnan(e.lo) else max(0.0, e.mean - e.lo) for e in ests]
    hi = [0.0 if math.isnan(e.hi) else max(0.0, e.hi - e.mean) for e in ests]
    return [lo, hi]


def plot_scores(
    results_by_model: Mapping[str, ResultLike],
    *,
    kinds: Mapping[str, str] | None = None,
    which: str = "score",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    ylabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Bar per model (mean over questions) with bootstrap CIs, coloured by kind (base, control,
    organism, persona; ``kinds`` overrides the guess from the name)."""
    if not results_by_model:
        raise ValueError("nothing to plot: results_by_model is empty")
    names = list(results_by_model)
    ests = [
        _estimate(results_by_model[n], which=which, level=level, n_boot=n_boot, seed=seed)
        for n in names
    ]
    model_kinds = [(kinds or {}).get(n, infer_kind(n)) for n in names]
    colours = [KIND_COLOURS.get(k, KIND_COLOURS["other"]) for k in model_kinds]
    fig = Figure(figsize=(max(4.0, 0.8 * len(names) + 2), 4))
    ax = fig.subplots()
    xs = list(range(len(names)))
    ax.bar(
        xs,
        [e.mean for e in ests],
        yerr=_yerr(ests),
        color=colours,
        capsize=4,
        edgecolor="black",
        linewidth=0.5,
    )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(xs, names, rotation=30, ha="right")
    ax.set_ylabel(ylabel or f"{which} (mean, {round(level * 100)}% CI)")
    seen: dict[str, str] = {}
    for k, c in zip(model_kinds, colours, strict=True):
        seen.setdefault(k, c)
    from matplotlib.patches import Patch

    ax.legend([Patch(color=c) for c in seen.values()], list(seen), fontsize=8, loc="best")
    ax.set_title(title or "misalignment score by model")
    fig.tight_layout()
    return fig


def plot_theme_breakdown(
    results_by_model: Mapping[str, Any],
    *,
    kinds: Mapping[str, str] | None = None,
    which: str = "score",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    ylabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Grouped bars: one group per question theme, one bar per model, bootstrap CIs within the
    theme. Takes ``EvalResult`` objects or lists of them (seeds), not bare estimates."""
    if not results_by_model:
        raise ValueError("nothing to plot: results_by_model is empty")
    names = list(results_by_model)
    per_model = {}
    for n in names:
        x = results_by_model[n]
        if _is_estimate(x):
            raise TypeError(f"{n}: plot_theme_breakdown needs EvalResult objects, not an Estimate")
        per_model[n] = _single(x).by_theme(level=level, n_boot=n_boot, seed=seed, which=which)
    themes = list(dict.fromkeys(t for m in per_model.values() for t in m))
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(5.0, 0.9 * len(themes) * max(1, len(names) / 3) + 2), 4))
    ax = fig.subplots()
    for j, n in enumerate(names):
        kind = (kinds or {}).get(n, infer_kind(n))
        xs, ests = [], []
        for i, t in enumerate(themes):
            if t in per_model[n]:
                xs.append(i - 0.4 + width * (j + 0.5))
                ests.append(per_model[n][t])
        ax.bar(
            xs,
            [e.mean for e in ests],
            width=width,
            yerr=_yerr(ests),
            capsize=2,
            color=f"C{j % 10}",
            edgecolor="black",
            linewidth=0.4,
            label=f"{n} ({kind})",
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(themes)), themes, rotation=30, ha="right")
    ax.set_ylabel(ylabel or f"{which} (mean, {round(level * 100)}% CI)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "misalignment score by question theme")
    fig.tight_layout()
    return fig
