"""The convergence step: misalignment contrasts per domain and layer, their statistics and the
verdict.

A domain's *contrast* is a narrow misaligned finetune's activations minus its matched aligned
control's (same domain and seed, same prompts), averaged over seeds; where no control was given
the base stands in, and the contrast is then finetune minus base, which carries the finetune's
task and format like the naive cosines. ``convergence`` compares the domains' contrasts layer by
layer against their nulls (``analysis.convergence.layer_convergence``) and reads the verdict at
the analysis layer, with the transfer matrix and steering results where they were measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mci_interp.analysis.config import neutral_direction
from mci_interp.analysis.convergence import (
    ConvergenceReport,
    LayerConvergence,
    contrast_vectors,
    layer_convergence,
    verdict,
)
from mci_interp.analysis.effects import SteerResult, TransferMatrix
from mci_interp.analysis.records import Record, acts_of, score_of
from mci_interp.direction import Direction
from mci_interp.evaluate import paired_difference
from mci_interp.stats import Estimate

if TYPE_CHECKING:
    from mci_interp.models import HookedModel


@dataclass(frozen=True, slots=True)
class MatchedPair:
    """A narrow finetune and its matched control (same domain and seed), recorded on the same
    prompts (``Record.acts``, ``[prompts, layers, d_model]``) and questions (``Record.score``).
    ``control=None``: no control was given; the base stands in."""

    organism: Record
    control: Record | None = None

    def reference(self, base: Record) -> Record:
        """What the organism is compared with: its control, or the base standing in."""
        return self.control if self.control is not None else base


def _diffs(pairs: Sequence[MatchedPair], base: Record, layer: int) -> list[Tensor]:
    """Per seed, per prompt: organism minus control at ``layer``."""
    return [acts_of(p.organism)[:, layer] - acts_of(p.reference(base))[:, layer] for p in pairs]


def domain_misalignment(
    pairs: Mapping[str, Sequence[MatchedPair]], base: Record, *, against: str = "control"
) -> dict[str, Estimate]:
    """Per domain: out-of-domain score of the organisms minus their controls' (``against=
    "control"``, the base where a seed has none), the organisms' minus the base's (``"base"``),
    or the controls' minus the base's (``"control-base"``: did the control move the other way?
    domains without a control are left out), paired per question and seed."""
    if against not in ("control", "base", "control-base"):
        raise ValueError(f"against must be 'control', 'base' or 'control-base', got {against!r}")
    if against == "control-base":
        return {
            d: paired_difference([score_of(p.control) for p in ps], score_of(base))
            for d, ps in pairs.items()
            if ps and all(p.control is not None for p in ps)
        }
    return {
        d: paired_difference(
            [score_of(p.organism) for p in ps],
            [score_of(p.reference(base) if against == "control" else base) for p in ps],
        )
        for d, ps in pairs.items()
    }


def contrast_directions(
    pairs: Mapping[str, Sequence[MatchedPair]],
    base_record: Record,
    layers: Sequence[int],
    *,
    base: HookedModel,
    dataset_hash: str,
) -> dict[str, list[Direction]]:
    """Per domain, its contrast at each of ``layers`` as a ``Direction`` (method
    ``misalignment_contrast``), measured on the neutral prompts the records were taken on."""
    n_prompts = acts_of(base_record).shape[0]
    return {
        d: [
            neutral_direction(
                contrast_vectors(_diffs(ps, base_record, layer)),
                layer,
                base=base,
                name=f"contrast:{d}",
                method="misalignment_contrast",
                n_prompts=n_prompts,
                dataset_hash=dataset_hash,
            )
            for layer in layers
        ]
        for d, ps in pairs.items()
    }


def _mean_diff(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).double().mean(0)


def _layer(
    pairs: Mapping[str, Sequence[MatchedPair]],
    base: Record,
    persona: Float[Tensor, " d_model"],
    layer: int,
    seed: int,
) -> LayerConvergence:
    """``layer_convergence`` of the domains' contrasts at one layer, with its nulls' inputs:
    differences between two real controls of one domain (seed noise), the naive organism-minus-
    base and control-minus-base means (NaN where the base stands in for the control)."""
    b = acts_of(base)[:, layer]
    ctrl_seed = {}
    for d, ps in pairs.items():
        ctrl_seed[d] = [
            acts_of(x.control)[:, layer] - acts_of(y.control)[:, layer]
            for i, x in enumerate(ps)
            for y in ps[i + 1 :]
            if x.control is not None and y.control is not None
        ]
    naive = {
        d: torch.stack([_mean_diff(acts_of(p.organism)[:, layer], b) for p in ps]).mean(0)
        for d, ps in pairs.items()
    }
    cnaive = {  # NaN where the "control" is the base itself: no control to compare
        d: torch.stack(
            [
                _mean_diff(acts_of(p.control)[:, layer], b)
                if p.control is not None
                else torch.full((b.shape[-1],), float("nan"), dtype=torch.float64)
                for p in ps
            ]
        ).mean(0)
        for d, ps in pairs.items()
    }
    org_diffs = {d: _diffs(ps, base, layer) for d, ps in pairs.items()}
    benign = {  # each real control minus the base: the task-and-format null's inputs
        d: [_mean_diff(acts_of(p.control)[:, layer], b) for p in ps if p.control is not None]
        for d, ps in pairs.items()
    }
    return layer_convergence(
        layer, org_diffs, ctrl_seed, naive, cnaive, persona, seed=seed, benign=benign
    )


def convergence(
    pairs: Mapping[str, Sequence[MatchedPair]],
    base: Record,
    persona: Float[Tensor, "layers d_model"],
    *,
    layers: Sequence[int],
    analysis_layer: int,
    misalignment: Mapping[str, Estimate] | None = None,
    above_base: Mapping[str, Estimate] | None = None,
    transfer: TransferMatrix | None = None,
    steer: SteerResult | None = None,
    responses: Mapping[str, Sequence[MatchedPair]] | None = None,
    base_responses: Record | None = None,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
    show_progress: bool = False,
) -> ConvergenceReport:
    """Do the domains' misalignment contrasts point the same way? Statistics at each of
    ``layers`` and the verdict at ``analysis_layer``. Draw it with
    ``mci_interp.plot.analysis.plot_convergence_by_layer`` (and ``plot_cosine_heatmaps``).

    Args:
        pairs: domain -> its matched pairs, one per seed (at least two domains).
        base: the base's record on the same prompts and questions.
        persona: the base's persona-prompt direction at every layer (each contrast's cosine
            with it is reported).
        layers: where to compute the statistics; must include ``analysis_layer``.
        misalignment: per domain, organism minus control (default:
            ``domain_misalignment(pairs, base)``); the verdict counts transfer only into
            domains where it and organism minus base are above zero.
        above_base: per domain, organism minus base (default:
            ``domain_misalignment(pairs, base, against="base")``).
        transfer: the transfer matrix of the domains' contrasts (``analysis.transfer``); without
            it the verdict is at most "partly".
        steer: steering of the base along the contrasts (``analysis.steering``), reported as is.
        responses: domain -> matched pairs of *response* records (``Record.acts`` ``[2 *
            questions, layers, d]``: each model's activations averaged over the answer tokens
            of every question's misaligned reference answer, then of its aligned one), with
            ``base_responses`` the base's: the response-mean contrast is computed beside the
            last-prompt-token one at the same layers, with the same statistics over questions
            (``response_layers``), and the published operationalisation (each organism's own
            misaligned-minus-aligned answer mean, no control) as ``response_published``. Both
            are reported; the verdict reads the last-prompt-token contrast.
        seed: layer ``L``'s bootstrap and nulls use ``seed + L``.
        meta: recorded in the report as is.
    """
    if len(pairs) < 2:
        raise ValueError(f"convergence needs at least two domains, got {sorted(pairs)}")
    if analysis_layer not in layers:
        raise ValueError(f"analysis_layer {analysis_layer} is not among layers {list(layers)}")
    mis = dict(misalignment) if misalignment is not None else domain_misalignment(pairs, base)
    above = (
        dict(above_base)
        if above_base is not None
        else domain_misalignment(pairs, base, against="base")
    )
    control_shift = domain_misalignment(pairs, base, against="control-base")
    lcs = [
        _layer(pairs, base, persona[layer], layer, seed + layer)
        for layer in tqdm(
            layers, desc="convergence by layer", disable=not show_progress, leave=False
        )
    ]
    lc = next(x for x in lcs if x.layer == analysis_layer)
    v, reasons = verdict(lc, transfer, mis, above_base=above)
    resp_layers: list[LayerConvergence] = []
    published: dict[int, Tensor] = {}
    if responses is not None:
        if base_responses is None:
            raise ValueError("responses need base_responses: the base's response record")
        rpairs = {
            d: [
                MatchedPair(
                    response_rows(p.organism),
                    None if p.control is None else response_rows(p.control),
                )
                for p in ps
            ]
            for d, ps in responses.items()
        }
        rbase = response_rows(base_responses)
        resp_layers = [
            _layer(rpairs, rbase, persona[layer], layer, seed + layer) for layer in layers
        ]
        published = {layer: _published_cos(rpairs, rbase, layer) for layer in layers}
    return ConvergenceReport(
        layers=tuple(lcs),
        analysis_layer=analysis_layer,
        misalignment=mis,
        above_base=above,
        control_minus_base=control_shift,
        transfer=transfer,
        steer=steer,
        verdict=v,
        reasons=reasons,
        d_model=acts_of(base).shape[-1],
        meta=dict(meta or {}),
        response_layers=tuple(resp_layers),
        response_published=published,
    )


def response_rows(rec: Record) -> Record:
    """A response record (``[2 * questions, layers, d]``, misaligned answers' rows first) as
    per-question rows of misaligned minus aligned answer means (``[questions, layers, d]``)."""
    acts = acts_of(rec)
    n = acts.shape[0] // 2
    if acts.shape[0] != 2 * n:
        raise ValueError(
            f"record {rec.name} has {acts.shape[0]} rows; a response record has two per question"
        )
    return Record(name=rec.name, acts=acts[:n].double() - acts[n:].double(), score=None)


def _published_cos(
    rpairs: Mapping[str, Sequence[MatchedPair]], rbase: Record, layer: int
) -> Tensor:
    """Cosines between the domains' organisms' own response directions (misaligned minus aligned
    answer mean, averaged over questions and seeds: the published operationalisation, with no
    control) and the base's, as a matrix over the domains in order and then the base."""
    vecs = [
        torch.stack([acts_of(p.organism)[:, layer].mean(0) for p in ps]).mean(0)
        for ps in rpairs.values()
    ]
    vecs.append(acts_of(rbase)[:, layer].mean(0))
    v = torch.nn.functional.normalize(torch.stack(vecs).double(), dim=-1)
    return v @ v.T
