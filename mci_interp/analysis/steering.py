"""The steering step: does adding a direction to a model (the base) make it misaligned?

Each direction is added at its site with strength ``alpha`` times the residual norm per token
(``Steer(scale="relative")``), and the induced misalignment (score minus the unsteered score)
is set against that of norm-matched random directions at the same strengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mci_interp.analysis.causal import CausalScorer, random_controls
from mci_interp.analysis.convergence import SteerResult
from mci_interp.direction import Direction
from mci_interp.intervene import Steer
from mci_interp.models import HookedModel


def steering(
    model: HookedModel,
    directions: Mapping[str, Direction],
    *,
    scores: CausalScorer,
    alphas: Sequence[float],
    n_random: int,
    seed: int = 0,
    model_key: str = "base",
    baseline: float | None = None,
    show_progress: bool = False,
) -> SteerResult:
    """Misalignment induced in ``model`` by adding each of ``directions`` at each of
    ``alphas``, beside ``n_random`` random directions. Draw it with
    ``mci_interp.plot.analysis.plot_steering``.

    Args:
        model: the model steered (a study steers the base).
        directions: name -> direction (rows, in order).
        scores: the causal scorer; its questions are the ones scored.
        alphas: strengths, as multiples of the residual norm per token.
        n_random: random directions, shaped like the first of ``directions`` and drawn from
            ``causal.rng(seed, "steer", k)``.
        model_key: what ``model``'s stored causal scores are filed under.
        baseline: ``model``'s unsteered mean score on those questions (default: scored).
    """
    if not directions:
        raise ValueError("steering needs at least one direction")
    names = list(directions)
    s0 = scores(model, model_key) if baseline is None else baseline
    induced = torch.zeros(len(names), len(alphas), dtype=torch.float64)
    rinduced = torch.zeros(n_random, len(alphas), dtype=torch.float64)
    rnd = random_controls([directions[names[0]]], n_random, seed=seed, purpose=("steer",))
    cells = [
        (a, i, directions[d], induced) for i, d in enumerate(names) for a in range(len(alphas))
    ]
    cells += [(a, k, r, rinduced) for k, (r,) in enumerate(rnd) for a in range(len(alphas))]
    lowest = min(d.site.layer for d in directions.values())
    with model.reuse_below(lowest):
        for a, i, direction, table in tqdm(
            cells, desc="steering", disable=not show_progress, leave=False
        ):
            steer = Steer(direction, alphas[a], scale="relative")
            table[i, a] = scores(model, model_key, steer) - s0
    return SteerResult(
        directions=tuple(names),
        alphas=tuple(alphas),
        induced=induced,
        random_induced=rinduced,
    )
