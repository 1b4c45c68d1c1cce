"""Figures for direction comparisons: cosine heatmaps, cosine by layer against a null band,
probe AUROC against the prompt-identity baseline, principal angles. Each returns a Figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:  # pragma: no cover
    from mci_interp.compare import SimilarityMatrix

_ANNOTATE_MAX = 12  # annotate heatmap cells when the matrix is at most this wide


def _arr(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _heat(ax: Any, mat: np.ndarray, names: Sequence[str], *, absolute: bool, title: str) -> Any:
    cmap, vmin = ("viridis", 0.0) if absolute else ("RdBu_r", -1.0)
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=1.0, interpolation="nearest")
    n = len(names)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    labels = [_short(x) for x in names]
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    if n <= _ANNOTATE_MAX:
        for i in range(n):
            for j in range(n):
                v = mat[i, j]
                dark = abs(v) > 0.6 if not absolute else v < 0.5
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7 if n > 6 else 8,
                    color="white" if dark else "black",
                )
    return im


def plot_cosine_heatmap(
    sim: SimilarityMatrix,
    *,
    layer: int | None = None,
    absolute: bool = False,
    title: str | None = None,
) -> Figure:
    """Cosine matrix as a heatmap (signed: fixed -1..1 diverging scale; absolute: 0..1).

    With several layers and no ``layer`` chosen, draws one panel per layer sharing one colour bar.
    """
    mats = _arr(sim.absolute if absolute else sim.signed)
    layers = list(sim.layers)
    if layer is not None:
        if layer not in layers:
            raise ValueError(f"layer {layer} not in this matrix; layers: {layers}")
        idx = [layers.index(layer)]
    else:
        idx = list(range(len(layers)))
    kind = "|cos|" if absolute else "signed cosine"
    n = len(sim.names)
    if len(idx) == 1:
        side = max(4.0, 0.55 * n + 2.5)
        fig = Figure(figsize=(side + 1.0, side), layout="constrained")
        ax = fig.add_subplot()
        lay = layers[idx[0]]
        sub = f"{kind} between directions" + ("" if lay is None else f", layer {lay}")
        im = _heat(ax, mats[idx[0]], sim.names, absolute=absolute, title=title or sub)
        fig.colorbar(im, ax=ax, shrink=0.8, label=kind)
        return fig
    ncols = min(5, len(idx))
    nrows = math.ceil(len(idx) / ncols)
    panel = max(2.6, 0.35 * n + 1.6)
    fig = Figure(figsize=(panel * ncols + 1.2, panel * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(idx):
            ax.set_visible(False)
            continue
        i = idx[k]
        im = _heat(
            ax,
            mats[i],
            sim.names if n <= _ANNOTATE_MAX else [""] * n,
            absolute=absolute,
            title=f"layer {layers[i]}",
        )
        if n > _ANNOTATE_MAX:
            ax.set_xticks([])
            ax.set_yticks([])
        if k % ncols:
            ax.set_yticklabels([])
    fig.colorbar(im, ax=axes, shrink=0.8, label=kind)
    fig.suptitle(title or f"{kind} between directions, by layer")
    return fig


def plot_cosine_by_layer(
    layers: Sequence[int],
    observed: Mapping[str, Sequence[float]],
    *,
    null_band: Sequence[tuple[float, float]] | None = None,
    null_label: str = "null 95% band",
    title: str = "Cosine between directions by layer",
    ylabel: str = "cosine",
) -> Figure:
    """One line per named comparison across layers, over a shaded null band (one ``(lo, hi)``
    per layer, e.g. the random-direction or permutation null's 2.5-97.5% quantiles)."""
    xs = np.asarray(list(layers))
    fig = Figure(figsize=(8.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if null_band is not None:
        band = _arr(null_band)
        if band.shape != (len(xs), 2):
            raise ValueError(
                f"null_band needs one (lo, hi) per layer: expected shape "
                f"({len(xs)}, 2), got {band.shape}"
            )
        ax.fill_between(
            xs, band[:, 0], band[:, 1], color="0.8", alpha=0.7, label=null_label, linewidth=0
        )
    for name, ys in observed.items():
        y = _arr(ys)
        if y.shape[0] != len(xs):
            raise ValueError(f"{name!r} has {y.shape[0]} values for {len(xs)} layers")
        ax.plot(xs, y, marker="o", markersize=3.5, linewidth=1.6, label=name)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    lo = min(-0.05, float(np.nanmin([np.nanmin(_arr(v)) for v in observed.values()] or [0])))
    ax.set_ylim(max(-1.05, lo - 0.05), 1.05)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_probe_auroc(
    layers: Sequence[int],
    auroc: Sequence[float],
    prompt_identity_auroc: Sequence[float] | None = None,
    *,
    auroc_ungrouped: Sequence[float] | None = None,
    auroc_folds: Sequence[Sequence[float]] | None = None,
    title: str = "Probe AUROC by layer (folds grouped by prompt)",
) -> Figure:
    """Grouped-CV probe AUROC per layer (with per-fold spread if given), the row-level AUROC and
    the prompt-identity baseline; chance at 0.5."""
    xs = np.asarray(list(layers))
    fig = Figure(figsize=(8.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    a = _arr(auroc)
    if auroc_folds is not None:
        folds = [_arr(f) for f in auroc_folds]
        lo = np.array([np.nanmin(f) for f in folds])
        hi = np.array([np.nanmax(f) for f in folds])
        ax.fill_between(xs, lo, hi, color="C0", alpha=0.18, linewidth=0, label="fold range")
    ax.plot(xs, a, marker="o", markersize=3.5, color="C0", label="probe, grouped CV")
    if auroc_ungrouped is not None:
        ax.plot(xs, _arr(auroc_ungrouped), linestyle="--", color="C1", label="probe, row-level CV")
    if prompt_identity_auroc is not None:
        ax.plot(
            xs,
            _arr(prompt_identity_auroc),
            linestyle=":",
            color="C3",
            linewidth=2,
            label="prompt identity only (row-level CV)",
        )
    ax.axhline(0.5, color="0.4", linewidth=0.8, linestyle="-", label="chance")
    ax.set_ylim(0.3, 1.02)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("AUROC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_principal_angles(
    angles: Any,
    *,
    title: str = "Principal angles between subspaces",
) -> Figure:
    """Principal angles in degrees (ascending), one series per named pair; 90 degrees means
    orthogonal. ``angles`` is one array of radians or a mapping ``name -> radians``."""
    series = dict(angles) if isinstance(angles, Mapping) else {"angles": angles}
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    kmax = 1
    for name, a in series.items():
        deg = np.degrees(_arr(a))
        k = np.arange(1, len(deg) + 1)
        kmax = max(kmax, len(deg))
        ax.plot(k, deg, marker="o", markersize=4, label=name)
        if len(deg) <= 8 and len(series) == 1:
            for x, v in zip(k, deg, strict=True):
                ax.annotate(
                    f"{v:.1f}°",
                    (x, v),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=8,
                )
    ax.axhline(90, color="0.4", linestyle="--", linewidth=0.8, label="orthogonal (90°)")
    ax.set_xlim(0.5, kmax + 0.5)
    ax.set_xticks(range(1, kmax + 1) if kmax <= 20 else np.linspace(1, kmax, 10, dtype=int))
    ax.set_ylim(0, 95)
    ax.set_xlabel("principal angle index")
    ax.set_ylabel("angle (degrees)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig
