"""Figures for interventions: dose-response curves with their random-direction controls."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from mci_interp.intervene import DoseResponse


def plot_dose_response(
    dr: DoseResponse,
    *,
    score_label: str = "score",
    coherence_label: str = "coherence",
    title: str | None = None,
) -> Figure:
    """Score against steering strength for the direction (line) and the norm-matched random
    controls (mean with a min-max band and faint individual lines); coherence, where measured,
    on a twin axis."""
    alphas = list(dr.alphas)
    order = sorted(range(len(alphas)), key=lambda i: alphas[i])
    xs = [alphas[i] for i in order]
    fig = Figure(figsize=(6, 4))  # no pyplot: no global figure state, no backend
    ax = fig.subplots()
    rs = dr.random_scores
    if rs.numel() and rs.shape[0] > 0:
        rs = rs[:, order].double()
        for row in rs:
            ax.plot(xs, row.tolist(), color="grey", alpha=0.35, linewidth=0.8)
        lo, hi = rs.min(0).values.tolist(), rs.max(0).values.tolist()
        ax.fill_between(
            xs, lo, hi, color="grey", alpha=0.2, label=f"random controls (n={rs.shape[0]}, min-max)"
        )
        ax.plot(xs, rs.mean(0).tolist(), color="grey", linestyle=":", label="random mean")
    ax.plot(
        xs, [dr.scores[i] for i in order], marker="o", color="C0", label=dr.direction or "direction"
    )
    ax.set_xlabel(f"steering strength alpha ({dr.scale})")
    ax.set_ylabel(score_label)
    handles, labels = ax.get_legend_handles_labels()
    coh = [dr.coherence[i] for i in order]
    if any(not math.isnan(c) for c in coh):
        ax2 = ax.twinx()
        ax2.plot(xs, coh, marker="s", linestyle="--", color="C3", label=coherence_label)
        ax2.set_ylabel(coherence_label, color="C3")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_title(title or (f"dose-response at {dr.site}" if dr.site else "dose-response"))
    fig.tight_layout()
    return fig
