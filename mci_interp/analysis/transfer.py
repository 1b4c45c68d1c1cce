"""The transfer step: does ablating one domain's direction remove another domain's misalignment?

Each direction set (for instance a domain's contrast at a few layers) is ablated in each
organism, and the share of the organism's misalignment it removes (its score minus its
reference's, on the same questions) is set against the shares removed by norm-matched random
directions shaped like the organism's own domain's set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mci_interp.analysis.causal import CausalScorer, random_controls, shares_removed
from mci_interp.analysis.convergence import TransferMatrix, has_misalignment
from mci_interp.direction import Direction
from mci_interp.models import HookedModel
from mci_interp.organisms.suite import Organism
from mci_interp.stats import Estimate


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """An organism whose misalignment ablations should remove: its mean score and its
    reference's (its matched control's, or the base's), on the questions ``scores`` uses."""

    organism: Organism
    score: float
    reference: float


def transfer(
    base: HookedModel,
    directions: Mapping[str, Sequence[Direction]],
    targets: Mapping[str, Target],
    *,
    scores: CausalScorer,
    n_random: int,
    misalignment: Mapping[str, Estimate] | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> TransferMatrix:
    """Share of each target's misalignment removed by ablating each set of ``directions``
    (all of a set's directions at once), beside ``n_random`` random sets. Draw it with
    ``mci_interp.plot.analysis.plot_transfer``.

    Args:
        base: the model the targets' organisms are built on.
        directions: name -> directions ablated together (rows, in order).
        targets: name -> organism (columns, in order, labelled ``name:organism``); each name
            is also a key of ``directions``: the random controls of a column are shaped like
            its own domain's set, drawn from ``causal.rng(seed, "transfer", name, k)``.
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
    rows, cols = list(directions), list(targets)
    share = torch.full((len(rows), len(cols)), float("nan"), dtype=torch.float64)
    rshare = torch.full((n_random, len(cols)), float("nan"), dtype=torch.float64)
    gaps = torch.zeros(len(cols), dtype=torch.float64)
    for j, name in enumerate(tqdm(cols, desc="transfer", disable=not show_progress, leave=False)):
        t = targets[name]
        gaps[j] = t.score - t.reference
        if misalignment is not None and not has_misalignment(misalignment.get(name)):
            continue
        sets = [directions[r] for r in rows]
        sets += random_controls(directions[name], n_random, seed=seed, purpose=("transfer", name))
        shares = shares_removed(
            base, t.organism, sets, scores=scores, score=t.score, reference=t.reference
        )
        share[:, j] = torch.tensor(shares[: len(rows)], dtype=torch.float64)
        rshare[:, j] = torch.tensor(shares[len(rows) :], dtype=torch.float64)
    return TransferMatrix(
        directions=tuple(rows),
        organisms=tuple(f"{name}:{targets[name].organism.name}" for name in cols),
        share=share,
        random_share=rshare,
        gap=gaps,
        layers=tuple(sorted({d.site.layer for ds in directions.values() for d in ds})),
    )
