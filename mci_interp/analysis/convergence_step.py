"""The convergence test inside a study: the domains' contrasts, transfer, steering and the
verdict, with the probe and SAE lenses beside them, over the narrow finetunes and their matched
controls (``analysis.study.run_study`` calls it; each step it wires is public on its own)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from mci_interp.analysis.collect import BaseRecords, OrganismRecords, _Runner
from mci_interp.analysis.contrasts import (
    MatchedPair,
    contrast_directions,
    convergence,
    domain_misalignment,
)
from mci_interp.analysis.convergence import ConvergenceReport
from mci_interp.analysis.dictionary import SaeSource, default_sae_config, sae_corpus, study_sae
from mci_interp.analysis.effects import removable
from mci_interp.analysis.latents import LatentLens, latent_lens, steer_latents
from mci_interp.analysis.probes import probe_lens
from mci_interp.analysis.records import Record, score_of
from mci_interp.analysis.steering import steering
from mci_interp.analysis.transfer import Target, transfer
from mci_interp.datasets import dataset_hash
from mci_interp.organisms.suite import Organism
from mci_interp.sites import Site


def convergence_step(
    R: _Runner,
    organisms: Sequence[Organism],
    recs: dict[str, OrganismRecords],
    base_recs: BaseRecords,
    persona_vecs: Tensor,
    covariance: dict[int, Tensor],
    out_dir: Path,
    sae: SaeSource,
    timings: dict[str, float],
) -> ConvergenceReport | None:
    """Contrasts, transfer, steering and the verdict over the narrow finetunes' domains (None
    with fewer than two), and the probe and SAE lenses beside them; the contrasts are saved
    under ``out_dir/directions``; the SAE lens's parts are timed into ``timings``."""
    base, cfg, base_rec = R.base, R.config, base_recs.default
    L, ab_layers = cfg.analysis_layer_of(base.n_layers), cfg.ablation_layers(base.n_layers)
    narrow = {(o.spec.domain, o.spec.seed): o for o in organisms if o.spec.kind == "narrow"}
    control = {(o.spec.domain, o.spec.seed): o for o in organisms if o.spec.kind == "control"}
    domains = sorted({str(d) for d, _ in narrow})
    if len(domains) < 2:
        return None
    seeds_of = {d: sorted(s for dd, s in narrow if dd == d) for d in domains}
    # a finetune without its matched control is compared with the base: the contrast is then
    # finetune minus base, which carries its task and format (the report says so)
    unmatched = sorted(k for k in narrow if k not in control)
    pairs = {
        d: [
            MatchedPair(
                recs[narrow[d, s].name].default,
                recs[control[d, s].name].default if (d, s) in control else None,
            )
            for s in seeds_of[d]
        ]
        for d in domains
    }
    responses = None
    if base_recs.responses is not None and all(
        recs[o.name].responses is not None for o in [*narrow.values(), *control.values()]
    ):
        responses = {
            d: [
                MatchedPair(
                    recs[narrow[d, s].name].responses,  # type: ignore[arg-type]
                    recs[control[d, s].name].responses if (d, s) in control else None,
                )
                for s in seeds_of[d]
            ]
            for d in domains
        }
    misalignment = domain_misalignment(pairs, base_rec)
    above_base = domain_misalignment(pairs, base_rec, against="base")
    to_remove = removable(misalignment, above_base)
    contrast = contrast_directions(
        pairs, base_rec, ab_layers, base=base, dataset_hash=dataset_hash(R.neutral)
    )
    # transfer: ablate each domain's contrast in every seed's organism of every domain that
    # has misalignment to remove (other columns stay NaN, shown as n/a: nothing to measure)
    targets = {
        d: [
            Target(
                organism=narrow[d, s],
                score=score_of(p.organism).values(),
                reference=score_of(p.reference(base_rec)).values(),
            )
            for s, p in zip(seeds_of[d], pairs[d], strict=True)
        ]
        for d in domains
    }
    show = R.show
    tm = transfer(
        base,
        contrast,
        targets,
        scores=R.causal,
        n_random=cfg.n_random,
        misalignment=to_remove,
        seed=cfg.seed,
        covariance=covariance,
        show_progress=show,
    )
    # steering the base with each domain's contrast at the analysis layer
    at_L = {d: next(x for x in contrast[d] if x.site.layer == L) for d in domains}
    st = steering(
        base,
        at_L,
        scores=R.causal,
        alphas=cfg.steer_alphas,
        n_random=cfg.n_random,
        seed=cfg.seed,
        covariance=covariance,
        show_progress=show,
    )
    controls = (
        "matched controls"
        if not unmatched
        else "the base for "
        + ", ".join(f"{d} s{s}" for d, s in unmatched)
        + " (no matched control given: that contrast is finetune minus base and carries the "
        "finetune's task and format, like the naive cosines)"
    )
    conv = convergence(
        pairs,
        base_rec,
        persona_vecs,
        layers=cfg.convergence_layers(base.n_layers),
        analysis_layer=L,
        misalignment=misalignment,
        above_base=above_base,
        transfer=tm,
        steer=st,
        responses=responses,
        base_responses=base_recs.responses,
        seed=cfg.seed,
        meta={
            "ablation_layers": ab_layers,
            "steer_scale": "relative to |h| per token",
            "controls": controls,
        },
        show_progress=show,
    )
    # the probe lens on the same matched pairs and layers, beside the verdict
    probes = probe_lens(
        pairs,
        base_rec,
        layers=cfg.convergence_layers(base.n_layers),
        analysis_layer=L,
        n_null=cfg.n_random,
        seed=cfg.seed,
        cache_dir=R.store.root / "lenses",
    )
    for d in domains:
        for x in contrast[d]:
            x.save(out_dir / "directions" / f"contrast_{d}_L{x.site.layer}.safetensors")
    latents = None if sae.off else _latents(R, pairs, base_rec, persona_vecs, sae, timings)
    return replace(conv, probes=probes, latents=latents)


def _latents(
    R: _Runner,
    pairs: dict[str, list[MatchedPair]],
    base_rec: Record,
    persona_vecs: Tensor,
    source: SaeSource,
    timings: dict[str, float],
) -> LatentLens:
    """The SAE lens: the study's SAE (trained once per base and layer, or the user's), the
    domains' rising latents and their overlap, the named latents steered into the base (each
    part timed into ``timings``)."""
    base, cfg = R.base, R.config
    site = Site(cfg.analysis_layer_of(base.n_layers))
    t0 = time.perf_counter()
    sae = study_sae(
        base,
        None if source.path or source.release else site,
        source=source,
        config=default_sae_config(
            base.d_model,
            site,
            model=base.name,
            training_samples=cfg.sae_training_samples,
            expansion=cfg.sae_expansion,
        ),
        corpus=sae_corpus(n_per_domain=cfg.sae_corpus_per_domain),
        show_progress=R.show,
    )
    t_sae = time.perf_counter() - t0
    layer = sae.site.layer
    contrast = contrast_directions(
        pairs, base_rec, [layer], base=base, dataset_hash=dataset_hash(R.neutral)
    )
    lens = latent_lens(
        pairs,
        base_rec,
        sae,
        top_k=cfg.sae_top_k,
        contrasts={d: c[0].vector for d, c in contrast.items()},
        persona=persona_vecs[layer],
        seed=cfg.seed,
    )
    t1 = time.perf_counter()
    lens = steer_latents(
        base,
        lens,
        sae,
        scores=R.causal,
        alpha=cfg.sae_steer_alpha,
        n_random=cfg.n_random,
        seed=cfg.seed,
        show_progress=R.show,
    )
    timings |= {
        "SAE (train or load)": t_sae,
        "SAE lens": t1 - t0 - t_sae,
        "SAE latent steering": time.perf_counter() - t1,
    }
    return lens
