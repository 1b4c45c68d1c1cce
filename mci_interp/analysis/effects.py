"""What an intervention did: the transfer matrix (ablating each domain's direction in every
domain's organisms) and steering results, with their random controls and coherence costs, and
which organisms have misalignment for an ablation to remove.

Result types only, no models: ``analysis.transfer`` and ``analysis.steering`` fill them,
``analysis.convergence`` reads them into its verdict and ``analysis.internalisation`` shares the
damage bar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mci_interp.stats import Estimate, empirical_p_value

DAMAGE_NATS = 0.25  # coherence loss increase (nats/token) past which an effect is flagged


def has_misalignment(organism_minus_control: Estimate | None) -> bool:
    """Whether an organism has misalignment for an ablation to remove: its out-of-domain score
    minus its control's has a CI above zero. A share of nothing is not evidence either way."""
    return organism_minus_control is not None and organism_minus_control.lo > 0


def removable(
    misalignment: Mapping[str, Estimate], above_base: Mapping[str, Estimate] | None = None
) -> dict[str, Estimate]:
    """The domains with misalignment to remove: organism minus control above zero and, where
    ``above_base`` (organism minus base) is given, that above zero too. A control that became
    *more aligned* than the base makes organism minus control positive with nothing misaligned."""
    return {
        d: e
        for d, e in misalignment.items()
        if has_misalignment(e) and (above_base is None or has_misalignment(above_base.get(d)))
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferMatrix:
    """Share of organism j's misalignment removed by ablating direction i (rows: directions,
    columns: organisms), with the shares removed by norm-matched random directions."""

    directions: tuple[str, ...]
    organisms: tuple[str, ...]
    share: Float[Tensor, "n_dir n_org"]
    random_share: Float[Tensor, "n_random n_org"]
    gap: Float[Tensor, " n_org"]  # organism minus control score: the misalignment to remove
    layers: tuple[int, ...]
    interval: Float[Tensor, "n_dir n_org 2"] | None = None  # 95% CI of share (seeds, questions)
    random_kinds: tuple[str, ...] = ()  # "isotropic" or "covariance", per random control
    # coherence cost of each ablation (loss increase of the base's everyday answers, mean over
    # the column's seeds; NaN: not measured) and of each random control's
    coherence: Float[Tensor, "n_dir n_org"] | None = None
    random_coherence: Float[Tensor, "n_random n_org"] | None = None
    base_removed: tuple[Estimate, ...] = ()  # per direction set: base minus base ablated
    damage_nats: float = DAMAGE_NATS

    def beats_random(self, i: int, j: int) -> bool:
        """Direction ``i`` removes more of organism ``j``'s misalignment than every random
        control, its share's interval (where measured) lies above zero, and it does not damage
        the model."""
        above = self.interval is None or bool(self.interval[i, j, 0] > 0)
        return (
            above
            and not self.damaged(i, j)
            and bool(self.share[i, j] > self.random_share[:, j].max())
        )

    def damaged(self, i: int, j: int) -> bool:
        """Whether ablating direction ``i`` in organism ``j`` raised the coherence loss past
        ``damage_nats``."""
        return self.coherence is not None and bool(self.coherence[i, j] > self.damage_nats)

    def share_text(self, i: int, j: int) -> str:
        """``"+45% [+10%, +80%]; coherence +0.03"``: direction ``i``'s share of organism
        ``j``'s misalignment, and its coherence cost where measured."""
        ci = (
            ""
            if self.interval is None
            else " [{:+.0%}, {:+.0%}]".format(*self.interval[i, j].tolist())
        )
        coh = ""
        if self.coherence is not None and not math.isnan(float(self.coherence[i, j])):
            coh = f"; coherence {float(self.coherence[i, j]):+.3f}"
            coh += " (damage)" if self.damaged(i, j) else ""
        return f"{float(self.share[i, j]):+.0%}{ci}{coh}"

    def domain_of(self, j: int) -> str:
        """The domain of organism column ``j`` (columns are named ``domain:organism``)."""
        return self.organisms[j].split(":")[0]

    def testable(self, misalignment: Mapping[str, Estimate]) -> list[int]:
        """Organism columns with misalignment to remove: their domain's organism-minus-control
        CI lies above zero. Transfer into any other column is not evidence either way."""
        return [
            j
            for j in range(len(self.organisms))
            if has_misalignment(misalignment.get(self.domain_of(j)))
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "directions": list(self.directions),
            "organisms": list(self.organisms),
            "share": self.share.tolist(),
            "random_share": self.random_share.tolist(),
            "gap": self.gap.tolist(),
            "layers": list(self.layers),
            "interval": None if self.interval is None else self.interval.tolist(),
            "random_kinds": list(self.random_kinds),
            "coherence": None if self.coherence is None else self.coherence.tolist(),
            "random_coherence": None
            if self.random_coherence is None
            else self.random_coherence.tolist(),
            "base_removed": [e.to_dict() for e in self.base_removed],
            "damage_nats": self.damage_nats,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SteerResult:
    """Misalignment induced in a model by adding each direction (score minus the unsteered
    score, mean over questions, with a bootstrap interval over them), beside random controls;
    and what each costs in coherence: the loss increase (nats/token) of the model's own answers
    to everyday prompts (NaN: not measured). An effect with a loss increase past
    ``damage_nats`` is flagged as damage: misalignment bought by breaking the model."""

    directions: tuple[str, ...]
    alphas: tuple[float, ...]
    induced: Float[Tensor, "n_dir n_alpha"]
    random_induced: Float[Tensor, "n_random n_alpha"]
    interval: Float[Tensor, "n_dir n_alpha 2"] | None = None  # 95% CI over questions
    coherence: Float[Tensor, "n_dir n_alpha"] | None = None
    random_coherence: Float[Tensor, "n_random n_alpha"] | None = None
    random_kinds: tuple[str, ...] = ()  # "isotropic" or "covariance", per random control
    damage_nats: float = DAMAGE_NATS

    def p_value(self, i: int, a: int) -> float:
        """Rank p-value of direction ``i`` at strength ``a`` against the random controls."""
        return empirical_p_value(float(self.induced[i, a]), self.random_induced[:, a])

    def damaged(self, i: int, a: int) -> bool:
        """Whether direction ``i`` at strength ``a`` raised the coherence loss past the bar."""
        return self.coherence is not None and bool(self.coherence[i, a] > self.damage_nats)

    def to_dict(self) -> dict[str, Any]:
        def opt(t: Tensor | None) -> Any:
            return None if t is None else t.tolist()

        return {
            "directions": list(self.directions),
            "alphas": list(self.alphas),
            "induced": self.induced.tolist(),
            "random_induced": self.random_induced.tolist(),
            "interval": opt(self.interval),
            "coherence": opt(self.coherence),
            "random_coherence": opt(self.random_coherence),
            "random_kinds": list(self.random_kinds),
            "damage_nats": self.damage_nats,
            "p_value": [
                [self.p_value(i, a) for a in range(len(self.alphas))]
                for i in range(len(self.directions))
            ],
        }
