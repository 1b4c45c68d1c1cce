"""The report's lens sections: the probe lens, the SAE lens and the three lenses side by side
(terminal lines and markdown)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mci_interp.analysis.convergence import ConvergenceReport


def probe_lines(c: ConvergenceReport) -> list[str]:
    """The probe lens at the analysis layer: each cross-domain AUROC with its interval and rank
    p, the within-domain ones, and whether the lens agrees with the verdict."""
    lens = c.probes
    if lens is None:
        return []
    x = lens.at(lens.analysis_layer)
    cross = [
        f"{k.train}->{k.test} {k.auroc.mean:.2f} [{k.auroc.lo:.2f}, {k.auroc.hi:.2f}] p={k.p:.2f}"
        for k in x.cells
        if k.train != k.test
    ]
    within = [f"{d} {x.cell(d, d).auroc.mean:.2f}" for d in lens.domains]
    t = x.transfer
    lc = c.at(lens.analysis_layer)
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    pairs = [
        f"{p.a}~{p.b}: contrast cosine beats its bar {yes(p.beats_null)}, probe "
        f"{p.a}->{p.b} {yes(x.cell(p.a, p.b).significant)}, {p.b}->{p.a} "
        f"{yes(x.cell(p.b, p.a).significant)}"
        for p in lc.pairs
    ]
    return [
        f"  L{x.layer} probe lens (finetune vs control AUROC, held-out prompts; prompt identity "
        f"0.50): within {', '.join(within)}; across {'; '.join(cross)}",
        f"  probe transfer mean {t.mean:.2f} [{t.lo:.2f}, {t.hi:.2f}] vs label-swapped null95 "
        f"{x.transfer_null95:.2f} (p={x.transfer_p:.2f}, {lens.n_null} refits): "
        f"{'transfers' if lens.transfers else 'does not transfer'}",
        "  the two lenses per pair: " + "; ".join(pairs),
    ]


def latent_lines(c: ConvergenceReport) -> list[str]:
    """The SAE lens in the terminal summary: each pair's overlap against its bar, and the three
    lenses' answer."""
    lat = c.latents
    out = []
    if lat is not None:
        cells = [
            f"{p.a}~{p.b} {p.overlap}/{lat.top_k} (bar {p.overlap_bar:.1f}, p={p.overlap_p:.3f}; "
            f"rho {p.rho:+.2f}, bar {p.rho_bar:+.2f})"
            for p in lat.pairs
        ]
        q = lat.quality
        out.append(
            f"  L{lat.layer} SAE lens (rising latents shared; SAE explained variance "
            f"{q.get('explained_variance', math.nan):.2f} held-out / "
            f"{q.get('neutral_explained_variance', math.nan):.2f} neutral, L0 "
            f"{q.get('l0', math.nan):.0f}): " + "; ".join(cells)
        )
    out.append(f"  three lenses: {c.lenses.carried_by}")
    return out


def lens_section(c: ConvergenceReport, figs: dict[str, str]) -> list[str]:
    """The report's SAE-lens and three-lens section."""
    L = ["### Three lenses\n"]
    tl = c.lenses
    L.append(f"**{tl.carried_by}.** {tl.agreement[0].upper()}{tl.agreement[1:]}.\n")
    L.append(
        "| layer | difference of means: pairs beating the bar (mean cos) | probe: cross-domain "
        "AUROC mean (null95; cells beating it) | SAE: pairs sharing rising latents (mean overlap "
        "vs bar) |"
    )
    L.append("|---|---|---|---|")
    for x in tl.layers:
        probe = (
            "not measured"
            if x.probe_cells is None
            else f"{x.probe_transfer:.2f} ({x.probe_null95:.2f}; {x.probe_cells})"
        )
        sae = (
            ""
            if x.sae_pairs is None
            else f"{x.sae_pairs}/{x.n_pairs} ({x.sae_mean_overlap:.1f} vs {x.sae_mean_bar:.1f})"
        )
        L.append(
            f"| {x.layer} | {x.dm_pairs}/{x.n_pairs} ({x.dm_mean_cos:+.2f}) | {probe} | {sae} |"
        )
    L.append("")
    if "three_lenses" in figs:
        L.append(f"![three_lenses]({figs['three_lenses']})\n")
    lat = c.latents
    if lat is None:
        return L
    q = lat.quality
    L.append(f"### SAE lens (layer {lat.layer})\n")
    L.append(
        f"SAE: {lat.sae_source}. Quality on held-out corpus tokens: explained variance "
        f"{q.get('explained_variance', math.nan):.3f}, L0 {q.get('l0', math.nan):.1f}; on the "
        f"base's neutral-prompt rows the lens reads: explained variance "
        f"{q.get('neutral_explained_variance', math.nan):.3f}, L0 "
        f"{q.get('neutral_l0', math.nan):.1f}; latents that never fire on the corpus "
        f"{q.get('dead_fraction', math.nan):.1%}; {lat.n_alive} latents fire on some record. "
        "A low explained variance means the latents describe these activations poorly: read the "
        "lens with that in mind.\n"
    )
    L.append(
        f"Each domain's top {lat.top_k} latents by change of mean activation (organism minus "
        f"matched control, {lat.n_prompts} neutral prompts, 95% CI resampling seeds then prompts); "
        f"overlap and Spearman rho across domains against the larger of a sign-flip null and a "
        f"shuffled-latent null ({lat.n_null} draws each) at level 1 - 0.05/pairs; the seed-noise "
        "organisms' overlap (control minus control of another seed) beside it. Two seeds of one "
        "domain share "
        + ", ".join(f"{c.domain} {c.seed_agreement:.1f}" for c in lat.changes)
        + f" of their top {lat.top_k} (the ceiling a cross-domain overlap is read against).\n"
    )
    L.append("| pair | overlap | bar | p | rho | rho bar | seed-noise overlap | shared |")
    L.append("|---|---|---|---|---|---|---|---|")
    for p in lat.pairs:
        L.append(
            f"| {p.a}~{p.b} | {p.overlap}/{lat.top_k} | {p.overlap_bar:.1f} | {p.overlap_p:.3f} | "
            f"{p.rho:+.3f} | {p.rho_bar:+.3f} | {p.seed_overlap:.0f} | {'yes' if p.shared else 'no'} |"
        )
    kind = (
        "in the top k of two or more domains; whether such overlap beats chance is the pair test "
        "above"
        if lat.named_shared
        else "each domain's top; no latent is in the top k of two domains"
    )
    L.append(f"\nNamed latents ({kind}):\n")
    doms = list(lat.domains)
    L.append(
        "| latent | rises in | change per domain [95% CI] | cos with contrasts | cos with "
        "persona | steering the base [95% CI] (p vs random latents; coherence) | top contexts |"
    )
    L.append("|---|---|---|---|---|---|---|")
    for n in lat.named:
        ch = "; ".join(
            f"{d} {n.change[d].mean:+.3f} [{n.change[d].lo:+.3f}, {n.change[d].hi:+.3f}]"
            for d in doms
        )
        cos = ", ".join(f"{d} {v:+.2f}" for d, v in n.contrast_cos.items())
        st = (
            "not steered"
            if n.steer is None
            else f"{n.steer.mean:+.3f} [{n.steer.lo:+.3f}, {n.steer.hi:+.3f}] (p={n.steer_p:.2f}; "
            f"{n.steer_coherence:+.2f})"
        )
        ctx = " / ".join(
            "`" + " ".join(t.split()).replace("`", "'").replace("|", "/")[-60:] + "`"
            for t, _ in n.contexts[:3]
        )
        L.append(
            f"| {n.latent} | {', '.join(n.domains)} | {ch} | {cos} | {n.persona_cos:+.2f} | {st} | "
            f"{ctx} |"
        )
    if lat.random_steer:
        r = lat.random_steer
        L.append(
            f"\n{len(r)} random latents steered the same way: {min(r):+.3f} to {max(r):+.3f} "
            "nats/token.\n"
        )
    if "sae_lens" in figs:
        L.append(f"![sae_lens]({figs['sae_lens']})\n")
    return L
