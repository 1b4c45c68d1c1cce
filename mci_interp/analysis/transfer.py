"""The transfer step: does ablating one domain's direction remove another domain's misalignment?

Each direction set (for instance a domain's contrast at a few layers) is ablated in each
organism (every seed of it), and the share of the organism's misalignment it removes (its score
minus its reference's, on the same questions, pooled over seeds, with an interval resampling
seeds then questions) is set against the shares removed by norm-matched random directions
shaped like the organism's own domain's set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp.analysis.causal import (
    CausalScorer,
    ablated_scores,
    control_kinds,
    random_controls,
    share_point,
    share_removed,
    unablated_coherence,
)
from mci_interp.analysis.effects import TransferMatrix, has_misalignment
from mci_interp.direction import Direction
from mci_interp.intervene import Ablate
from mci_interp.models import HookedModel
from mci_interp.organisms.suite import Organism
from mci_interp.stats import Estimate, paired_mean_difference


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """An organism whose misalignment ablations should remove: its per-question scores and its
    reference's (its matched control's, or the base's), on the questions ``scores`` uses."""

    organism: Organism
    score: Tensor
    reference: Tensor


def transfer(
    base: HookedModel,
    directions: Mapping[str, Sequence[Direction]],
    targets: Mapping[str, Target | Sequence[Target]],
    *,
    scores: CausalScorer,
    n_random: int,
    misalignment: Mapping[str, Estimate] | None = None,
    seed: int = 0,
    covariance: Mapping[int, Tensor] | None = None,
    show_progress: bool = False,
) -> TransferMatrix:
    """Share of each target's misalignment removed by ablating each set of ``directions``
    (all of a set's directions at once), beside ``n_random`` random sets. Draw it with
    ``mci_interp.plot.analysis.plot_transfer``.

    Args:
        base: the model the targets' organisms are built on.
        directions: name -> directions ablated together (rows, in order).
        targets: name -> organism, or one organism per seed (columns, in order, labelled
            ``name:organism``); a column's share pools its seeds (removed over there to remove,
            summed over seeds and questions), its interval resamples seeds, then questions.
            Each name is also a key of ``directions``: the random controls of a column are
            shaped like its own domain's set, drawn from ``causal.rng(seed, "transfer", name,
            k)`` (isotropic for even k, from ``covariance`` for odd k where it is given).
        scores: the causal scorer (and its questions) the targets' scores were measured with.
        n_random: random sets per column.
        misalignment: name -> the target's misalignment estimate; columns whose interval does
            not lie above zero are not measured (NaN: a share of nothing says nothing). Default:
            every column is measured.
    """
    unknown = [name for name in targets if name not in directions]
    if unknown:
        raise ValueError(
            f"targets {unknown} have no direction set of their own in {list(directions)}: "
            "their random controls are shaped like it"
        )
    seeds = {name: [t] if isinstance(t, Target) else list(t) for name, t in targets.items()}
    rows, cols = list(directions), list(targets)
    share = torch.full((len(rows), len(cols)), float("nan"), dtype=torch.float64)
    interval = torch.full((len(rows), len(cols), 2), float("nan"), dtype=torch.float64)
    rshare = torch.full((n_random, len(cols)), float("nan"), dtype=torch.float64)
    coherence = torch.full((len(rows), len(cols)), float("nan"), dtype=torch.float64)
    rcoherence = torch.full((n_random, len(cols)), float("nan"), dtype=torch.float64)
    gaps = torch.zeros(len(cols), dtype=torch.float64)
    for j, name in enumerate(tqdm(cols, desc="transfer", disable=not show_progress, leave=False)):
        ts = seeds[name]
        score = torch.stack([t.score.double() for t in ts])  # [seeds, questions]
        reference = torch.stack([t.reference.double() for t in ts])
        gaps[j] = float((score - reference).mean())
        if misalignment is not None and not has_misalignment(misalignment.get(name)):
            continue
        sets = [directions[r] for r in rows]
        sets += random_controls(
            directions[name], n_random, seed=seed, purpose=("transfer", name), covariance=covariance
        )
        per_seed = [ablated_scores(base, t.organism, sets, scores=scores) for t in ts]
        ablated = [torch.stack([s[k].scores for s in per_seed]) for k in range(len(sets))]
        # coherence cost of each ablation, mean over seeds of ablated minus unablated loss
        loss0 = [unablated_coherence(base, t.organism, scores=scores).coherence for t in ts]
        cost = [
            sum(s[k].coherence - c for s, c in zip(per_seed, loss0, strict=True)) / len(ts)
            for k in range(len(sets))
        ]
        for i in range(len(rows)):
            est = share_removed(score, ablated[i], reference, seed=seed)
            share[i, j], interval[i, j, 0], interval[i, j, 1] = est.mean, est.lo, est.hi
            coherence[i, j] = cost[i]
        for k in range(n_random):
            rshare[k, j] = share_point(score, ablated[len(rows) + k], reference)
            rcoherence[k, j] = cost[len(rows) + k]
    # what each direction set's ablation does to the base itself (score drop, per question):
    # a set that lowers every model's score is not removing an organism's misalignment
    base_removed: tuple[Estimate, ...] = ()
    if not share.isnan().all():
        s0 = scores(base, "base")
        base_removed = tuple(
            paired_mean_difference(
                s0.scores,
                scores(base, "base", *[Ablate(d) for d in directions[r]]).scores,
                seed=seed,
            )
            for r in rows
        )
    return TransferMatrix(
        directions=tuple(rows),
        organisms=tuple(
            f"{name}:{'+'.join(t.organism.name for t in seeds[name])}" for name in cols
        ),
        share=share,
        random_share=rshare,
        gap=gaps,
        layers=tuple(sorted({d.site.layer for ds in directions.values() for d in ds})),
        interval=interval,
        random_kinds=control_kinds(n_random, covariance),
        coherence=coherence,
        random_coherence=rcoherence,
        base_removed=base_removed,
    )
