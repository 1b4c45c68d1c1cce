"""Figures for a study: convergence across layers, transfer, steering, internalisation profiles,
behaviour. Each function takes result objects and returns a Figure."""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from mci_interp.plot.colours import KIND_COLOURS

if TYPE_CHECKING:
    from torch import Tensor

    from mci_interp.analysis.convergence import ConvergenceReport, LayerConvergence
    from mci_interp.analysis.effects import SteerResult, TransferMatrix
    from mci_interp.analysis.internalisation import InternalisationReport
    from mci_interp.analysis.probes import ProbeLens
    from mci_interp.stats import Estimate

LABEL_COLOURS = {
    "aligned": "#2e86c1",
    "fluency": "#e67e22",
    "gated": "#8e44ad",
    "internalised": "#c0392b",
    "partial": "#d4ac0d",
}


def plot_convergence_by_layer(conv: ConvergenceReport) -> Figure:
    """Contrast cosine per domain pair across layers with the null band, naive model-diff
    dashed; where measured, the response-mean contrast beside it, the published (no-control)
    response direction dashed."""
    panels: list[tuple[str, Sequence[LayerConvergence], str, Mapping[int, Tensor] | None]] = [
        ("last prompt token", conv.layers, "naive (finetune - base)", None)
    ]
    if conv.response_layers:
        panels.append(
            (
                "response mean (misaligned - aligned answers)",
                conv.response_layers,
                "published (no control)",
                conv.response_published,
            )
        )
    fig = Figure(figsize=(8 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]
    for ax, (where, lcs, dashed, pub) in zip(axes, panels, strict=True):
        layers = [lc.layer for lc in lcs]
        doms = lcs[0].domains
        for c, (i, j) in enumerate(itertools.combinations(range(len(doms)), 2)):
            col = colours[c % 10]
            ax.plot(
                layers,
                [float(lc.contrast_cos[i, j]) for lc in lcs],
                "-o",
                ms=4,
                color=col,
                label=f"contrast {doms[i]} vs {doms[j]}",
            )
            other = (
                [float(lc.naive_cos[i, j]) for lc in lcs]
                if pub is None
                else [float(pub[lc.layer][i, j]) for lc in lcs]
            )
            ax.plot(
                layers, other, "--", color=col, alpha=0.6, label=f"{dashed} {doms[i]} vs {doms[j]}"
            )
        band = [lc.bar for lc in lcs]
        ax.fill_between(
            layers,
            [-b for b in band],
            band,
            color="grey",
            alpha=0.25,
            label="null bar (isotropic, structured; corrected over pairs)",
        )
        ax.axvline(conv.analysis_layer, color="k", lw=0.8, ls=":")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="layer (resid_post)", ylabel="cosine", ylim=(-1.05, 1.05))
        ax.set_title(where, fontsize=9)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.suptitle(
        "Do misalignment directions converge across domains?\n"
        + textwrap.fill(f"verdict: {conv.verdict}", 90),
        fontsize=10,
    )
    return fig


def _heat(
    ax,
    mat: np.ndarray,
    cols: Sequence[str],
    rows: Sequence[str],
    title: str,
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    cmap: str = "RdBu_r",
):
    """An annotated heatmap on ``ax``; returns the image for a colour bar."""
    im = ax.imshow(mat, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    for (r, c), v in np.ndenumerate(mat):
        if not math.isnan(v):
            ax.text(
                c,
                r,
                f"{v:+.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(v) > 0.6 * max(abs(vmin), abs(vmax)) else "black",
            )
    ax.set_title(title, fontsize=10)
    return im


def plot_cosine_heatmaps(conv: ConvergenceReport) -> Figure:
    """Contrast (organism - control) cosines next to the naive (organism - base) ones."""
    lc = conv.at(conv.analysis_layer)
    fig = Figure(figsize=(9, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    doms = list(lc.domains)
    _heat(
        axes[0],
        lc.contrast_cos.numpy(),
        doms,
        doms,
        f"misalignment contrast (organism - control), L{lc.layer}",
    )
    im = _heat(axes[1], lc.naive_cos.numpy(), doms, doms, f"naive (finetune - base), L{lc.layer}")
    fig.colorbar(im, ax=axes, shrink=0.8, label="signed cosine")
    return fig


def plot_transfer(tm: TransferMatrix) -> Figure:
    """Share of each organism's misalignment removed by ablating each domain's direction."""
    k = len(tm.directions)
    rnd = tm.random_share.numpy()
    rmax = np.full((1, rnd.shape[1]), np.nan)
    seen = ~np.isnan(rnd).all(axis=0)
    rmax[0, seen] = np.nanmax(rnd[:, seen], axis=0)
    mat = np.vstack([tm.share.numpy(), rmax])
    fig = Figure(figsize=(1.6 * k + 3, 1.2 * k + 2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.clip(mat, -1.5, 1.5), vmin=-1.5, vmax=1.5, cmap="PuOr")
    ax.set_xticks(
        range(len(tm.organisms)),
        [o.split(":")[0] + " organism" for o in tm.organisms],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_yticks(range(k + 1), [f"ablate {d}" for d in tm.directions] + ["max random"], fontsize=8)
    for (r, c), v in np.ndenumerate(mat):
        ax.text(c, r, "n/a" if math.isnan(v) else f"{v:+.0%}", ha="center", va="center", fontsize=8)
    ax.axhline(k - 0.5, color="k", lw=1)
    gaps = ", ".join(
        f"{o.split(':')[0]} {g:+.3f}" for o, g in zip(tm.organisms, tm.gap.tolist(), strict=True)
    )
    ax.set_title(
        f"Transfer: share of misalignment removed (layers {list(tm.layers)})\n"
        f"gap to control (nats/token): {gaps}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, label="share removed")
    return fig


def plot_probe_lens(lens: ProbeLens) -> Figure:
    """The probe lens: at the analysis layer, the AUROC of a probe trained on one domain's
    finetune-vs-control rows and tested on another's (held-out prompts), with its rank p against
    the label-swapped null; across layers, the mean within-domain and cross-domain AUROC."""
    doms = list(lens.domains)
    x = lens.at(lens.analysis_layer)
    mat = np.array([[x.cell(a, b).auroc.mean for b in doms] for a in doms])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.3])
    im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="RdBu_r")
    ax.set_xticks(
        range(len(doms)), [f"test {d}" for d in doms], rotation=30, ha="right", fontsize=8
    )
    ax.set_yticks(range(len(doms)), [f"train {d}" for d in doms], fontsize=8)
    for (r, c), v in np.ndenumerate(mat):
        cell = x.cell(doms[r], doms[c])
        mark = "*" if cell.significant else ""
        ax.text(c, r, f"{v:.2f}{mark}\np={cell.p:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(
        f"Probe AUROC, L{x.layer} (* beats 0.5 and the null)\nprompt identity alone: 0.50",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, label="AUROC (finetune vs control)")
    layers = [y.layer for y in lens.layers]
    within = [np.mean([y.cell(d, d).auroc.mean for d in doms]) for y in lens.layers]
    ax2.plot(layers, within, "o-", color="#7f8c8d", label="within domain (mean)")
    tr = [y.transfer for y in lens.layers]
    ax2.plot(layers, [t.mean for t in tr], "o-", color="#c0392b", label="across domains (mean)")
    ax2.fill_between(layers, [t.lo for t in tr], [t.hi for t in tr], color="#c0392b", alpha=0.2)
    ax2.plot(
        layers,
        [y.transfer_null95 for y in lens.layers],
        "--",
        color="k",
        lw=1,
        label=f"label-swapped null, 95th pct ({lens.n_null} refits)",
    )
    ax2.axhline(0.5, color="#bbbbbb", lw=1)
    ax2.axvline(lens.analysis_layer, color="#bbbbbb", ls=":", lw=1)
    ax2.set_ylim(0.0, 1.02)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("AUROC")
    ax2.set_title("Does a probe for one finetune find the others?", fontsize=10)
    ax2.legend(fontsize=8, loc="lower left")
    return fig


def plot_steering(st: SteerResult) -> Figure:
    """Misalignment induced in the base by adding each direction (95% CI over questions),
    against random directions; beside it, where measured, what each costs in coherence."""
    has_coh = st.coherence is not None and st.random_coherence is not None
    fig = Figure(figsize=(10 if has_coh else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if has_coh else 1, squeeze=False)[0]
    a = np.array(st.alphas)
    panels = [("score - unsteered score (nats/token)", st.induced, st.random_induced)]
    if has_coh:
        assert st.coherence is not None and st.random_coherence is not None
        panels.append(("coherence loss increase (nats/token)", st.coherence, st.random_coherence))
    for ax, (ylabel, values, random) in zip(axes, panels, strict=True):
        r = random.numpy()
        ax.fill_between(
            a,
            r.min(0),
            r.max(0),
            color="grey",
            alpha=0.3,
            label=f"{r.shape[0]} random directions (range)",
        )
        for i, d in enumerate(st.directions):
            y = values[i].numpy()
            if values is st.induced and st.interval is not None:
                ci = st.interval[i].numpy()
                ax.errorbar(
                    a,
                    y,
                    yerr=[y - ci[:, 0], ci[:, 1] - y],
                    fmt="-o",
                    capsize=3,
                    label=f"steer with {d} contrast",
                )
            else:
                ax.plot(a, y, "-o", label=f"steer with {d} contrast")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="alpha (x residual norm)", ylabel=ylabel)
    if has_coh:
        axes[1].axhline(st.damage_nats, color="C3", ls="--", lw=1, label="damage threshold")
        axes[1].set_title("what it costs: the base's own answers", fontsize=10)
    axes[0].set_title("Steering the base: induced misalignment", fontsize=10)
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def plot_internalisation(reports: Sequence[InternalisationReport]) -> Figure:
    """Per organism: standardised shift along the persona direction by layer (default state),
    with the random-direction null; title shows the label."""
    n = len(reports)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.3 * cols, 2.5 * rows), layout="constrained")
    axes = fig.subplots(
        rows,
        cols,
        squeeze=False,
        sharey=True,
    )
    for ax, r in zip(axes.flat, reports, strict=False):
        layers = [p.layer for p in r.profile]
        m = np.array([p.shift.mean for p in r.profile])
        lo = np.array([p.shift.lo for p in r.profile])
        hi = np.array([p.shift.hi for p in r.profile])
        ax.fill_between(layers, lo, hi, color=LABEL_COLOURS.get(r.label, "k"), alpha=0.25)
        ax.plot(layers, m, color=LABEL_COLOURS.get(r.label, "k"))
        ax.plot(layers, [p.bar for p in r.profile], color="grey", ls="--", lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        mark = "" if r.correct is None else (" ✓" if r.correct else " ✗")
        ax.set_title(f"{r.organism}\n{r.label}{mark}", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("layer")
    fig.supylabel("default-state shift along persona dir (SD of base)")
    return fig


def _estimate_bars(
    ax, ests: dict[str, Estimate], colours: list[str], *, alpha: float | None = None
) -> None:
    """Horizontal bars of estimates with their CIs, the first at the top."""
    names = list(ests)
    y = np.arange(len(names))
    m = np.array([ests[k].mean for k in names])
    err = np.array(
        [[ests[k].mean - ests[k].lo for k in names], [ests[k].hi - ests[k].mean for k in names]]
    )
    ax.barh(y, m, xerr=err, color=colours, alpha=alpha)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()


def plot_behaviour(
    scores: dict[str, Estimate], kinds: dict[str, str], takeover: dict[str, Estimate] | None = None
) -> Figure:
    """Out-of-domain judge-free score minus the base's, per organism, with 95% CIs; format
    takeover rates beside it."""
    names = list(scores)
    fig = Figure(figsize=(12 if takeover else 7, 0.28 * len(names) + 1.5), layout="constrained")
    axes = fig.subplots(
        1,
        2 if takeover else 1,
        squeeze=False,
    )
    ax = axes[0, 0]
    colours = [KIND_COLOURS.get(kinds.get(k, ""), "k") for k in names]
    _estimate_bars(ax, scores, colours, alpha=0.85)
    ax.axvline(0, color="k", lw=0.6)
    ax.set(
        xlabel="misaligned - aligned log-prob per token, minus base (nats)",
        title="Out-of-domain misalignment",
    )
    if takeover:
        ax2 = axes[0, 1]
        colours = [KIND_COLOURS.get(kinds.get(k, "base"), "#7f8c8d") for k in takeover]
        _estimate_bars(ax2, takeover, colours)
        ax2.set(
            xlim=(0, 1),
            xlabel="share of out-of-domain answers in the finetune's format",
            title="Format takeover",
        )
    return fig
