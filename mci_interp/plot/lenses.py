"""Figures of the SAE lens and of the three lenses side by side. Each returns a ``Figure``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from mci_interp.analysis.convergence import ConvergenceReport
    from mci_interp.analysis.latents import LatentLens

RED, GREY, BLUE = "#c0392b", "#7f8c8d", "#2e86c1"


def plot_latent_lens(lens: LatentLens, *, per_domain: int = 8) -> Figure:
    """The SAE lens: each domain's rising latents and how they change in the other domains
    (organism minus control; shared ones are full rows), every pair's overlap against its null
    bar and the seed-noise overlap, and the named latents' steering of the base beside random
    latents'."""
    doms = list(lens.domains)
    rows: list[int] = []
    for c in lens.changes:
        rows += [j for j in c.top[:per_domain] if j not in rows]
    mat = np.array([[float(lens.change(d).change[j]) for d in doms] for j in rows])
    scale = np.abs(mat).max() or 1.0
    fig = Figure(figsize=(13, max(4.0, 0.22 * len(rows) + 1.5)), layout="constrained")
    ax, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.0, 1.1, 1.2])
    ax.imshow(mat, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
    named = {n.latent for n in lens.named}
    ax.set_yticks(range(len(rows)), [f"{'★ ' if j in named else ''}{j}" for j in rows], fontsize=7)
    ax.set_xticks(range(len(doms)), doms, rotation=30, ha="right", fontsize=8)
    for (r, c), v in np.ndenumerate(mat):
        top = rows[r] in lens.change(doms[c]).top
        ax.text(c, r, f"{v:+.2f}{'•' if top else ''}", ha="center", va="center", fontsize=6)
    ax.set_title(
        f"Latent change (organism - control), L{lens.layer}\n"
        f"• in that domain's top {lens.top_k}; ★ named",
        fontsize=9,
    )
    names = [f"{p.a}~{p.b}" for p in lens.pairs]
    y = np.arange(len(names))
    ax2.barh(
        y, [p.overlap for p in lens.pairs], color=[RED if p.shared else GREY for p in lens.pairs]
    )
    ax2.scatter(
        [p.overlap_bar for p in lens.pairs], y, marker="|", s=300, color="k", label="null bar"
    )
    seed = [p.seed_overlap for p in lens.pairs]
    if not all(math.isnan(s) for s in seed):
        ax2.scatter(seed, y, marker="x", color=BLUE, label="seed-noise organisms")
    ax2.set_yticks(
        y, [f"{n}\nrho {p.rho:+.2f}" for n, p in zip(names, lens.pairs, strict=True)], fontsize=8
    )
    ax2.set_xlabel(f"shared latents among the top {lens.top_k}")
    ax2.set_xlim(0, lens.top_k)
    ax2.set_title("Do the domains raise the same latents?\n(red: beyond both nulls)", fontsize=9)
    ax2.legend(fontsize=7, loc="lower right")
    steered = [n for n in lens.named if n.steer is not None]
    if steered and lens.random_steer:
        ax3.scatter(
            lens.random_steer,
            np.zeros(len(lens.random_steer)),
            color=GREY,
            alpha=0.6,
            label=f"{len(lens.random_steer)} random latents",
        )
        for k, n in enumerate(steered, start=1):
            assert n.steer is not None
            ax3.errorbar(
                n.steer.mean,
                k,
                xerr=[[n.steer.mean - n.steer.lo], [n.steer.hi - n.steer.mean]],
                fmt="o",
                color=RED,
            )
        ax3.set_yticks(
            range(len(steered) + 1),
            ["random"]
            + [
                f"latent {n.latent}\np={n.steer_p:.2f}, coh {n.steer_coherence:+.2f}"
                for n in steered
            ],
            fontsize=8,
        )
        ax3.axvline(0, color="#bbbbbb", lw=1)
        ax3.set_xlabel("misalignment induced in the base (nats/token)")
        ax3.set_title(f"Steering the base at {lens.steer_alpha}x |h|", fontsize=9)
        ax3.legend(fontsize=7, loc="lower right")
    else:
        ax3.axis("off")
        ax3.text(0.5, 0.5, "no steering measured", ha="center", va="center")
    q = lens.quality
    fig.suptitle(
        f"SAE lens ({lens.sae_source}); explained variance {q.get('explained_variance', math.nan):.2f} "
        f"held-out corpus / {q.get('neutral_explained_variance', math.nan):.2f} neutral prompts, "
        f"L0 {q.get('l0', math.nan):.0f}, dead {q.get('dead_fraction', math.nan):.0%}",
        fontsize=9,
    )
    return fig


def plot_three_lenses(report: ConvergenceReport) -> Figure:
    """The three lenses per layer, each against its own null (difference-of-means cosines and
    their bar; the probe's cross-domain AUROC and its label-swapped null; the SAE's rising-latent
    overlap and its bar at the SAE's layer), and per pair what each says at the analysis layer."""
    tl = report.lenses
    layers = [x.layer for x in tl.layers]
    fig = Figure(figsize=(15, 3.9), layout="constrained")
    ax1, ax2, ax3, ax4 = fig.subplots(1, 4, width_ratios=[1, 1, 0.8, 0.9])
    pairs = [(p.a, p.b) for p in report.at(report.analysis_layer).pairs]
    for a, b in pairs:
        cos = [next(p.cos for p in lc.pairs if (p.a, p.b) == (a, b)) for lc in report.layers]
        ax1.plot(layers, cos, "o-", ms=3, lw=1, label=f"{a}~{b}")
    ax1.plot(layers, [lc.bar for lc in report.layers], "--", color="k", lw=1, label="null bar")
    ax1.axhline(0, color="#bbbbbb", lw=1)
    ax1.set_title("difference of means: contrast cosines", fontsize=9)
    ax1.set_ylabel("signed cosine")
    ax1.legend(fontsize=7)
    if report.probes is not None:
        tr = [x.probe_transfer for x in tl.layers]
        ax2.plot(layers, tr, "o-", color=RED, label="across domains (mean)")
        ax2.plot(layers, [x.probe_null95 for x in tl.layers], "--", color="k", lw=1, label="null95")
        ax2.axhline(0.5, color="#bbbbbb", lw=1)
        ax2.set_ylim(0, 1.02)
        ax2.legend(fontsize=7)
    ax2.set_title("probe: cross-domain AUROC", fontsize=9)
    lat = report.latents
    if lat is not None:
        names = [f"{p.a}~{p.b}" for p in lat.pairs]
        x = np.arange(len(names))
        ax3.bar(
            x, [p.overlap for p in lat.pairs], color=[RED if p.shared else GREY for p in lat.pairs]
        )
        ax3.scatter(
            x, [p.overlap_bar for p in lat.pairs], marker="_", s=400, color="k", label="null bar"
        )
        ax3.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
        ax3.set_ylabel(f"overlap of top {lat.top_k}")
        ax3.legend(fontsize=7)
        ax3.set_title(f"SAE latents (L{lat.layer})", fontsize=9)
    else:
        ax3.axis("off")
        ax3.text(0.5, 0.5, "SAE lens not measured", ha="center", va="center")
    for ax in (ax1, ax2):
        ax.axvline(report.analysis_layer, color="#bbbbbb", ls=":", lw=1)
        ax.set_xlabel("layer")
    grid = np.array(
        [[{True: 2, False: 1, None: 0}[v] for v in (p.dm, p.probe, p.sae)] for p in tl.pairs]
    )
    ax4.imshow(
        grid, cmap=ListedColormap(["#eeeeee", "#d5d8dc", RED]), vmin=0, vmax=2, aspect="auto"
    )
    for (r, c), v in np.ndenumerate(grid):
        ax4.text(c, r, ["n/a", "no", "shared"][v], ha="center", va="center", fontsize=8)
    ax4.set_xticks(range(3), ["diff. of means", "probe", "SAE"], fontsize=8)
    ax4.set_yticks(range(len(tl.pairs)), [f"{p.a}~{p.b}" for p in tl.pairs], fontsize=8)
    ax4.set_title(f"At layer {tl.analysis_layer}", fontsize=9)
    fig.suptitle(f"Three lenses. Verdict: {tl.carried_by}", fontsize=9, wrap=True)
    return fig
