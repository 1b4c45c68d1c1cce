"""Markdown reports: a ``Study`` as ``report.md`` with figures and a one-screen terminal
summary; a comparison of saved directions (``mci compare``) as ``summary.md``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mci_interp._io import write_text
from mci_interp.compare import RandomNull, SimilarityMatrix, expected_abs_cosine
from mci_interp.plot.analysis import (
    plot_behaviour,
    plot_convergence_by_layer,
    plot_cosine_heatmaps,
    plot_internalisation,
    plot_probe_lens,
    plot_steering,
    plot_transfer,
)
from mci_interp.plot.lenses import plot_latent_lens, plot_three_lenses
from mci_interp.report.lenses import latent_lines, lens_section, probe_lines

if TYPE_CHECKING:  # annotations only: ``mci compare`` need not import the analysis layer
    from mci_interp.analysis.convergence import ConvergenceReport, PairStat
    from mci_interp.analysis.effects import SteerResult
    from mci_interp.analysis.internalisation import CausalTest
    from mci_interp.analysis.study import Study


def save_figures(study: Study, out_dir: Path) -> dict[str, str]:
    """Draw every figure of the study into ``out_dir/figures`` (PNG); returns name -> path."""
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    kinds = {o["name"]: o["kind"] for o in study.organisms}
    figs = {
        "behaviour": plot_behaviour(study.scores, kinds, study.takeover),
        "internalisation": plot_internalisation(study.internalisation),
    }
    if study.convergence is not None:
        figs["convergence_by_layer"] = plot_convergence_by_layer(study.convergence)
        figs["cosine_heatmaps"] = plot_cosine_heatmaps(study.convergence)
        if study.convergence.transfer is not None:
            figs["transfer"] = plot_transfer(study.convergence.transfer)
        if study.convergence.steer is not None:
            figs["steering"] = plot_steering(study.convergence.steer)
        if study.convergence.probes is not None:
            figs["probe_lens"] = plot_probe_lens(study.convergence.probes)
        if study.convergence.latents is not None:
            figs["sae_lens"] = plot_latent_lens(study.convergence.latents)
        figs["three_lenses"] = plot_three_lenses(study.convergence)
    paths = {}
    for name, fig in figs.items():
        p = fig_dir / f"{name}.png"
        fig.savefig(p, dpi=110)
        paths[name] = f"figures/{name}.png"
    return paths


def confusion(study: Study) -> tuple[list[str], list[str], Counter]:
    rows = sorted({r.expected for r in study.internalisation if r.expected})
    cols = sorted({r.label for r in study.internalisation})
    return rows, cols, Counter((r.expected, r.label) for r in study.internalisation if r.expected)


def summary_lines(study: Study) -> list[str]:
    """The one-screen terminal summary."""
    out = [f"== mci study on {study.base} ({study.n_layers} layers, d_model {study.d_model}) =="]
    c = study.convergence
    if c is not None:
        lc = c.at(c.analysis_layer)
        out.append(f"convergence verdict: {c.verdict}")
        if c.meta.get("controls", "matched controls") != "matched controls":
            out.append(f"  control: {c.meta['controls']}")
        out.append(
            "  misalignment (organism - control, OOD, nats/token): "
            + "; ".join(f"{d} {e}" for d, e in c.misalignment.items())
        )
        if c.above_base:
            out.append(
                "  misalignment (organism - base, OOD, nats/token): "
                + "; ".join(f"{d} {e}" for d, e in c.above_base.items())
            )
        if c.control_minus_base:
            out.append(
                "  control - base (OOD, nats/token): "
                + "; ".join(f"{d} {e}" for d, e in c.control_minus_base.items())
            )
        for p in lc.pairs:
            out.append(
                f"  L{lc.layer} contrast cos {p.a}~{p.b}: {p.cos:+.3f} [{p.ci[0]:+.3f}, {p.ci[1]:+.3f}]"
                f" (bar {p.bar:.3f}{_uncontrolled(p)}); naive {float(lc.naive_cos[lc.domains.index(p.a), lc.domains.index(p.b)]):+.3f}"
            )
        out += response_lines(c)
        out += probe_lines(c)
        out += latent_lines(c)
        if c.transfer is not None:
            tm = c.transfer
            cells = [
                f"{d} in {tm.domain_of(j)} {tm.share_text(i, j)}"
                f" (random max {float(tm.random_share[:, j].max()):+.0%})"
                for j in tm.testable(c.removable)
                for i, d in enumerate(tm.directions)
                if d != tm.domain_of(j)
            ]
            out.append(
                "  transfer (cross-domain ablation, share of misalignment removed): "
                + (
                    "; ".join(cells)
                    if cells
                    else "untestable, no organism has misalignment to remove"
                )
            )
    rows, cols, conf = confusion(study)
    correct = sum(conf[(r, r)] for r in rows)
    total = sum(conf.values())
    if total:
        out.append(f"T2/T5 classifier on organisms with known truth: {correct}/{total} correct")
        misses = [
            f"{r.organism} ({r.expected} -> {r.label})"
            for r in study.internalisation
            if r.correct is False
        ]
        if misses:
            out.append("  misses: " + ", ".join(misses))
    labels = Counter(r.label for r in study.internalisation if r.kind == "narrow")
    if labels:
        out.append(
            "  narrow finetunes labelled: " + ", ".join(f"{k} x{v}" for k, v in labels.items())
        )
    out.append(f"time: {study.timings.get('total', 0):.0f}s for the study")
    return out


def write_report(
    study: Study, out_dir: Path | str, *, extra_timings: dict[str, float] | None = None
) -> Path:
    """Write ``report.md`` (numbers, verdicts with the nulls they beat, figures)."""
    out_dir = Path(out_dir)
    figs = save_figures(study, out_dir)
    L = []
    L.append(f"# mci study: {study.base}\n")
    L.append(
        "Layer convention: `blocks.L.hook_resid_post` (= Hugging Face `hidden_states[L+1]`), "
        "activations at the last prompt token of neutral, out-of-domain prompts with no instruction. "
        "Scores are judge-free log-prob contrasts (nats/token; positive = prefers the misaligned "
        "reference). Random-direction baseline |cos| in d = "
        f"{study.d_model}: {expected_abs_cosine(study.d_model):.3f}.\n"
    )
    L.append("```\n" + "\n".join(summary_lines(study)) + "\n```\n")
    c = study.convergence
    if c is not None:
        L.append("## Convergence\n")
        L.append(f"**Verdict: {c.verdict}** (analysis layer {c.analysis_layer}).\n")
        L.extend(f"- {r}" for r in c.reasons)
        L.append("")
        lc = c.at(c.analysis_layer)
        L.append(
            "Naive finetune-minus-base cosines are shown beside the contrasts as the confound they are: "
            "cos(organism - base, its own control - base) per domain = "
            + ", ".join(
                f"{d} {v:+.2f}"
                for d, v in zip(lc.domains, lc.control_naive_cos.tolist(), strict=True)
            )
            + " (high = the shared part is the task/format, not the values). Cosine of each contrast with "
            "the base's persona-prompt direction: "
            + ", ".join(
                f"{d} {v:+.2f}" for d, v in zip(lc.domains, lc.persona_cos.tolist(), strict=True)
            )
            + ". Split-half reliability of each contrast (cosine between disjoint prompt halves): "
            + ", ".join(f"{d} {v:+.2f}" for d, v in lc.reliability.items())
            + ".\n"
        )
        for name in (
            "convergence_by_layer",
            "cosine_heatmaps",
            "transfer",
            "steering",
            "probe_lens",
        ):
            if name in figs:
                L.append(f"![{name}]({figs[name]})\n")
        if c.steer is not None:
            L.append(steering_table(c.steer))
        L += lens_section(c, figs)

    L += t2t5_lines(study)
    L.append(f"\n![internalisation]({figs['internalisation']})\n")
    L.append("## Behaviour and format takeover\n")
    L.append(f"![behaviour]({figs['behaviour']})\n")
    L.append("| organism | OOD score - base | format takeover |")
    L.append("|---|---|---|")
    for k, v in study.scores.items():
        t = study.takeover.get(k)
        L.append(
            f"| {k} | {v} | {'' if t is None else f'{t.mean:.0%} [{t.lo:.0%}, {t.hi:.0%}] of {t.n}'} |"
        )
    for k, t in study.takeover.items():
        if k.startswith("base"):
            L.append(f"| {k} | | {t.mean:.0%} [{t.lo:.0%}, {t.hi:.0%}] of {t.n} |")
    L.append("\nExample greedy answers to neutral prompts (first seed):\n")
    prompts = study.meta.get("takeover_prompts", [])
    for name, gens in study.examples.items():
        L.append(f"- **{name}**")
        for p, g in list(zip(prompts, gens, strict=False))[:2]:
            g1 = " ".join(g.split())[:160]
            L.append(f"  - *{p}* → {g1}")
    L.append("\n## Settings and timings\n")
    L.append("```\n" + "\n".join(f"{k}: {v}" for k, v in study.config.to_dict().items()) + "\n```")
    tim = dict(study.timings) | dict(extra_timings or {})
    L.append(
        "\n| step | seconds |\n|---|---|\n"
        + "\n".join(f"| {k} | {v:.0f} |" for k, v in tim.items())
    )
    return write_text(out_dir / "report.md", "\n".join(L) + "\n")


def t2t5_lines(study: Study) -> list[str]:
    """The T2/T5 section: the rules, the candidate conditions, each organism's measurements and
    label, the confusion table, the leave-one-question-out checks and the direction's
    specificity."""
    from mci_interp.analysis.effects import DAMAGE_NATS  # the analysis layer, lazily

    conds = study.meta.get("conditions", [])
    n_c = max(len(conds), 1)
    L = ["## Fluency (T2) versus internalisation (T5)\n"]
    L.append(
        "The classifier is blind (`mci_interp/analysis/internalisation.py`): it reads measurements "
        "only, never an organism's kind, name or recipe. Every model and the base are measured with no "
        f"condition and under the same {len(conds)} candidate conditions, each scored on the same "
        f"{study.config.n_gate_questions} out-of-domain questions (condition effects at level "
        f"1 - 0.05/{n_c}). Rules, in order: misaligned with no condition (organism minus base, CI > 0) "
        "and shifted along the persona direction -> **internalised** if the shift is broad, upstream "
        "(earliest layer significant at 1 - 0.05/layers) and causally necessary (ablating it removes more "
        "than every random direction, the share's interval above zero, more in the organism than in the "
        f"base, coherence loss at most {DAMAGE_NATS:.2f} nats/token), else **partial**; misaligned "
        "but not shifted -> **off-persona**; not misaligned with no condition but the weights add "
        "misalignment under a condition (organism under it minus the base under it, CI > 0) -> "
        "**gated**; misaligned only under a condition that moves the base as much -> **fluency**; "
        "else **aligned**. The direction is the base's persona-prompt direction with the benign shifts "
        "(a helpful system prompt; the aligned controls' mean shift, a control's own left out) "
        "projected out. Shifts are at the last prompt token, before any answer token.\n"
    )
    if conds:
        L.append("Candidate conditions:\n")
        for c in conds:
            what = [
                f"system prompt: {c['system']!r}" if c.get("system") else "",
                f"trigger {c['trigger']!r}" if c.get("trigger") else "",
            ]
            L.append(f"- **{c['name']}**: " + "; ".join(w for w in what if w))
        L.append("")
    names = [c["name"] for c in conds]
    L.append(
        "| organism | expected | label | default shift (SD) [95% CI] | null95 | breadth | earliest layer | "
        "no condition: minus base | "
        + " | ".join(f"{n}: organism / weights" for n in names)
        + " | causal share [95% CI] (random max; rank p, z; removed in the base; coherence) |"
    )
    L.append("|---|---|---|---|---|---|---|---|" + "---|" * len(names) + "---|")
    for r in study.internalisation:
        cs = "" if r.causal is None else causal_cell(r.causal)
        by = {c.condition: c for c in r.conditions}
        cells = [f"{by[n].organism} / {by[n].weights}" if n in by else "" for n in names]
        mark = "" if r.correct is None else (" ✓" if r.correct else " ✗")
        L.append(
            f"| {r.organism} | {r.expected or '(hypothesis)'} | **{r.label}**{mark} | {r.default_shift} | "
            f"{r.default_null95:.2f} | {r.breadth:.0%} | {r.earliest_layer} | {r.default_behaviour} | "
            + " | ".join(cells)
            + f" | {cs} |"
        )
    rows, cols, conf = confusion(study)
    if rows:
        L.append("\nConfusion table (rows: truth by construction, columns: classifier label):\n")
        L.append("| truth \\ label | " + " | ".join(cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for r_ in rows:
            L.append(f"| {r_} | " + " | ".join(str(conf[(r_, c_)]) for c_ in cols) + " |")
    fragile = [
        (r.organism, x)
        for r in study.internalisation
        for x in r.sensitivity
        if x.holds < x.n and x.estimate.lo > 0
    ]
    L.append(
        "\nLeave-one-question-out: every effect above zero that a label can rest on is recomputed "
        "with each question left out; "
        + (
            "all of them stay above zero without any one question."
            if not fragile
            else "these do not survive every left-out question:\n\n"
            + "\n".join(f"- {o}: {x}" for o, x in fragile)
        )
        + "\n"
    )
    spec = study.specificity
    if spec:
        L.append(
            f"Specificity of the direction at layer {study.config.analysis_layer_of(study.n_layers)}: "
            "standardised shift of what should not move along it (the base under a helpful system "
            "prompt, each aligned control) along the raw persona-prompt direction and along the "
            "direction the classifier uses (benign shifts projected out, each control's own left "
            "out; the helpful prompt's shift is one of those projected out, so 0 there by "
            "construction).\n"
        )
        L.append("| benign reference | raw persona direction | classifier's direction |")
        L.append("|---|---|---|")
        for k in spec.get("raw", {}):
            L.append(f"| {k} | {spec['raw'][k]} | {spec.get('specific', {}).get(k, '')} |")
        L.append("")
    return L


# --- a comparison of saved directions (``mci compare``) ----------------------------------------
def comparison_lines(sim: SimilarityMatrix, null: RandomNull) -> list[str]:
    """The random-direction null and a table of every pair's cosine (of the first layer's
    matrix), marking those beyond the null's 95th percentile: the terminal summary."""
    q95 = null.quantile(0.95)
    lines = [
        f"Random-direction null in d={null.d_model}: mean |cos| {null.mean_abs:.3f}, "
        f"95th percentile {q95:.3f}.",
        "",
        "| a | b | cos | beyond null95 |",
        "|---|---|---|---|",
    ]
    mat = sim.signed[0]
    for i in range(sim.n):
        for j in range(i + 1, sim.n):
            c = float(mat[i, j])
            lines.append(f"| {sim.names[i]} | {sim.names[j]} | {c:+.3f} | {abs(c) > q95} |")
    return lines


def comparison_markdown(
    sim: SimilarityMatrix, null: RandomNull, *, figure: str = "cosines.png"
) -> str:
    """``summary.md`` of a direction comparison: a heading, ``comparison_lines`` and the heatmap
    at the relative path ``figure``."""
    lines = [f"# Direction comparison ({sim.n} directions)", "", *comparison_lines(sim, null)]
    return "\n".join(lines) + f"\n![cosines]({figure})\n"


def steering_table(st: SteerResult) -> str:
    """Induced misalignment per direction and strength, with its interval over questions, its
    rank p against the random controls and its coherence cost; the controls' range below."""
    n_iso = sum(k == "isotropic" for k in st.random_kinds)
    kinds = (
        f"{n_iso} isotropic, {len(st.random_kinds) - n_iso} from the base's activation covariance"
        if st.random_kinds
        else f"{st.random_induced.shape[0]}"
    )
    rows = [
        "Steering the base: induced misalignment (steered minus unsteered, nats/token, 95% CI over "
        f"questions), rank p against {st.random_induced.shape[0]} random directions ({kinds}), "
        "and the coherence cost (loss increase of the base's own answers to everyday prompts, "
        f"nats/token; **damage** past +{st.damage_nats:.2f}).\n",
        "| steer with | " + " | ".join(f"alpha {a}" for a in st.alphas) + " |",
        "|---|" + "---|" * len(st.alphas),
    ]
    for i, d in enumerate(st.directions):
        cells = []
        for a in range(len(st.alphas)):
            cell = f"{float(st.induced[i, a]):+.3f}"
            if st.interval is not None:
                lo, hi = st.interval[i, a].tolist()
                cell += f" [{lo:+.3f}, {hi:+.3f}]"
            cell += f"; p = {st.p_value(i, a):.2f}"
            if st.coherence is not None:
                cell += f"; coherence {float(st.coherence[i, a]):+.3f}"
                cell += " **damage**" if st.damaged(i, a) else ""
            cells.append(cell)
        rows.append(f"| {d} contrast | " + " | ".join(cells) + " |")
    r = st.random_induced
    cells = [
        f"{float(r[:, a].min()):+.3f} to {float(r[:, a].max()):+.3f} (max "
        f"{_family_max(r[:, a].tolist(), st.random_kinds, '+.3f')})"
        for a in range(r.shape[1])
    ]
    if st.random_coherence is not None:
        rc = st.random_coherence
        cells = [f"{c}; coherence up to {float(rc[:, a].max()):+.3f}" for a, c in enumerate(cells)]
    rows.append("| random (range) | " + " | ".join(cells) + " |\n")
    return "\n".join(rows)


def causal_cell(t: CausalTest) -> str:
    """One necessity test in a table cell."""
    ci = "" if t.share is None else f" [{t.share.lo:+.0%}, {t.share.hi:+.0%}]"
    extra = "" if t.base_removed is None else f"; base {t.base_removed.mean:+.3f}"
    coh = "" if math.isnan(t.coherence) else f"; coherence {t.coherence:+.3f}"
    if t.random_coherence and not math.isnan(t.coherence):
        coh += f" (random up to {max(t.random_coherence):+.3f})"
    return (
        f"{t.share_removed:+.0%}{ci} ({_family_max(t.random_shares, t.random_kinds, '+.0%')}; "
        f"p = {t.p_value:.2f}{t.z_text()}{extra}{coh})"
        + ("" if t.passes else " fails: " + "; ".join(t.failures()))
    )


def response_lines(c: ConvergenceReport) -> list[str]:
    """The response-mean contrast at the analysis layer, beside the published operationalisation
    (each organism's own misaligned-minus-aligned answer direction, no control)."""
    if not c.response_layers:
        return []
    lc = next(x for x in c.response_layers if x.layer == c.analysis_layer)
    pub = c.response_published[c.analysis_layer]
    doms = list(lc.domains)
    out = []
    for p in lc.pairs:
        i, j = doms.index(p.a), doms.index(p.b)
        out.append(
            f"  L{lc.layer} response-mean contrast cos {p.a}~{p.b}: {p.cos:+.3f} "
            f"[{p.ci[0]:+.3f}, {p.ci[1]:+.3f}] (bar {p.bar:.3f}"
            f"{_uncontrolled(p)}"
            f"{', beats it' if p.beats_null else ''}); published (no control) "
            f"{float(pub[i, j]):+.3f}"
        )
    out.append(
        "  published response direction vs the base's own: "
        + ", ".join(f"{d} {float(pub[k, -1]):+.3f}" for k, d in enumerate(doms))
        + " (high = the answer texts, not the finetune, set the direction)"
    )
    return out


def _uncontrolled(p: PairStat) -> str:
    """What a pair's bar is when a domain lacks its matched control."""
    if p.controlled:
        return ""
    return ", no control: task-and-format null" if p.task_null else ", no control: descriptive"


def _family_max(values: Sequence[float], kinds: Sequence[str], fmt: str) -> str:
    """``"isotropic +12%, covariance +40%"``: the largest control of each kind (or of all)."""
    if len(kinds) != len(values):
        return f"random max {format(max(values, default=math.nan), fmt)}"
    by: dict[str, list[float]] = {}
    for v, k in zip(values, kinds, strict=True):
        by.setdefault(k, []).append(v)
    return ", ".join(f"{k} {format(max(vs), fmt)}" for k, vs in by.items())
