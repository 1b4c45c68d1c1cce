"""The steering step: does adding a direction to a model (the base) make it misaligned?

Each direction is added at its site with strength ``alpha`` times the residual norm per token
(``Steer(scale="relative")``). The induced misalignment (score minus the unsteered score, per
question, with a bootstrap interval over them) is set against that of norm-matched random
directions at the same strengths, isotropic and drawn from the activation covariance
(``causal.random_controls``), and beside each effect its cost in coherence: the loss increase of
the model's own answers to everyday prompts (where the scorer has coherence texts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp.analysis.causal import CausalScorer, control_kinds, random_controls
from mci_interp.analysis.effects import SteerResult
from mci_interp.direction import Direction
from mci_interp.intervene import Steer
from mci_interp.models import HookedModel
from mci_interp.stats import paired_mean_difference


def steering(
    model: HookedModel,
    directions: Mapping[str, Direction],
    *,
    scores: CausalScorer,
    alphas: Sequence[float],
    n_random: int,
    seed: int = 0,
    model_key: str = "base",
    covariance: Mapping[int, Tensor] | None = None,
    show_progress: bool = False,
) -> SteerResult:
    """Misalignment induced in ``model`` by adding each of ``directions`` at each of
    ``alphas``, beside ``n_random`` random directions. Draw it with
    ``mci_interp.plot.analysis.plot_steering``.

    Args:
        model: the model steered (a study steers the base).
        directions: name -> direction (rows, in order).
        scores: the causal scorer; its questions are the ones scored, its coherence texts (if
            any) the ones whose loss is the coherence measure.
        alphas: strengths, as multiples of the residual norm per token.
        n_random: random directions, shaped like the first of ``directions`` and drawn from
            ``causal.rng(seed, "steer", k)``: isotropic for even k, from ``covariance`` (layer
            -> activation rows) for odd k where it is given.
        model_key: what ``model``'s stored causal scores are filed under.
    """
    if not directions:
        raise ValueError("steering needs at least one direction")
    names = list(directions)
    s0 = scores(model, model_key)
    shape = (len(names), len(alphas))
    induced = torch.zeros(shape, dtype=torch.float64)
    interval = torch.zeros((*shape, 2), dtype=torch.float64)
    coherence = torch.zeros(shape, dtype=torch.float64)
    rinduced = torch.zeros(n_random, len(alphas), dtype=torch.float64)
    rcoherence = torch.zeros(n_random, len(alphas), dtype=torch.float64)
    first = directions[names[0]]
    rnd = random_controls([first], n_random, seed=seed, purpose=("steer",), covariance=covariance)
    cells = [(a, i, directions[d], False) for i, d in enumerate(names) for a in range(len(alphas))]
    cells += [(a, k, r, True) for k, (r,) in enumerate(rnd) for a in range(len(alphas))]
    lowest = min(d.site.layer for d in directions.values())
    with model.reuse_below(lowest):
        for a, i, direction, is_random in tqdm(
            cells, desc="steering", disable=not show_progress, leave=False
        ):
            s = scores(model, model_key, Steer(direction, alphas[a], scale="relative"))
            if is_random:
                rinduced[i, a] = s.mean - s0.mean
                rcoherence[i, a] = s.coherence - s0.coherence
                continue
            est = paired_mean_difference(s.scores, s0.scores, seed=seed)
            induced[i, a], interval[i, a, 0], interval[i, a, 1] = est.mean, est.lo, est.hi
            coherence[i, a] = s.coherence - s0.coherence
    return SteerResult(
        directions=tuple(names),
        alphas=tuple(alphas),
        induced=induced,
        random_induced=rinduced,
        interval=interval,
        coherence=coherence,
        random_coherence=rcoherence,
        random_kinds=control_kinds(n_random, covariance),
    )
