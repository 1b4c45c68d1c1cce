"""Do different narrow finetunes share one misalignment direction? Statistics and the verdict.

Inputs are per-prompt activation differences, so every statistic can be bootstrapped over
prompts. The direction compared across domains is the *misalignment contrast*: activations of a
narrow misaligned organism minus those of its matched aligned control (same domain, same seed,
same prompts), averaged over seeds. The naive model diff (organism minus base) is computed beside
it because it is ruled by the finetuning task and format, not by values.

A pair of domains *beats the null* when the lower end of its cosine's bootstrap CI exceeds the
bar: the larger of two one-sided null quantiles at level 1 - alpha / m (Bonferroni over the m
pairs of a layer): cosines of independent isotropic Gaussian directions, and of independent
*structured* random directions drawn from the covariance of the per-prompt contrast rows (what
two unrelated contrasts look like in this layer's anisotropic geometry). The cosine is signed:
anti-aligned contrasts are not convergence. A pair with a domain that has no matched control
(its "contrast" is finetune minus base, carrying the task and format) must beat the
*task-and-format null* instead: the cross-domain cosines of benign finetunes (the aligned
controls), each minus the base, at the same level; where there are too few of them to reach
that level it is descriptive only and never beats the null. The seed-noise null (contrasts between controls of different seeds) is
reported beside the bar but not part of it: it carries LoRA-init differences that cancel inside
an organism-minus-control contrast of one seed. ``scripts/bench_calibration.py`` measures the
false-positive rate and power of these rules on simulated studies (``analysis.simulate``).

Verdict rules (``verdict``):
- **converged**: every cross-domain pair beats the null with cosine >= ``min_cos``, and
  ablating each domain's direction in every other domain's organism removes more misalignment
  than every norm-matched random direction and at least ``min_transfer`` of it;
- **partly**: at least one pair beats the null, or at least one transfer beats random;
- **not converged**: neither.
Transfer counts only into organisms with misalignment to remove (``removable``): their
out-of-domain score's CI lies above zero both minus their control and minus the base (the share
removed of a near-zero gap is meaningless, and a control more aligned than the base makes
organism minus control positive with nothing misaligned). A verdict is flagged *untestable*
when no domain has misalignment to remove: then the directions compared carry no misalignment
to converge on.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp.analysis.effects import (
    SteerResult,
    TransferMatrix,
    removable,
)
from mci_interp.analysis.lenses import ThreeLenses, three_lenses
from mci_interp.compare import (
    expected_abs_cosine,
    random_direction_null,
    structured_direction_null,
)
from mci_interp.stats import (
    Estimate,
    bootstrap,
    index_counts,
    percentile_interval,
    quantile,
    split_half,
)

if TYPE_CHECKING:
    from mci_interp.analysis.latents import LatentLens
    from mci_interp.analysis.probes import ProbeLens


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))


def contrast_vectors(diffs: Sequence[Float[Tensor, "n d_model"]]) -> Float[Tensor, " d_model"]:
    """Mean over seeds of the mean over prompts of per-prompt differences."""
    return torch.stack([d.double().mean(0) for d in diffs]).mean(0)


@dataclass(frozen=True, slots=True)
class PairStat:
    a: str
    b: str
    cos: float
    ci: tuple[float, float]
    bar: float
    beats_null: bool
    controlled: bool = True  # both domains have matched controls
    # a pair without controls on both sides is tested against the task-and-format null (benign
    # finetunes of different domains, each minus the base) where it has enough values to reach
    # the pair's level; else it is descriptive only
    task_null: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "cos": self.cos,
            "ci": list(self.ci),
            "bar": self.bar,
            "beats_null": self.beats_null,
            "controlled": self.controlled,
            "task_null": self.task_null,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerConvergence:
    """Cosine statistics at one layer."""

    layer: int
    domains: tuple[str, ...]
    contrast_cos: Float[Tensor, "n n"]
    naive_cos: Float[Tensor, "n n"]
    control_naive_cos: Float[Tensor, " n"]  # cos(organism - base, control - base) per domain
    persona_cos: Float[Tensor, " n"]  # cos(contrast, persona prompt direction)
    pairs: tuple[PairStat, ...]
    alpha: float
    null_random: Float[Tensor, " k"]  # signed cosines of independent isotropic directions
    null_structured: Float[Tensor, " k"]  # ... of directions shaped like the contrast rows
    null_seed: Float[Tensor, " k"]  # |cos| of seed-noise contrasts: reported, not in the bar
    # signed cosines between benign finetunes of different domains, each minus the base: what
    # task and format alone share; the bar of pairs without matched controls
    null_task: Float[Tensor, " k"] = field(default_factory=lambda: torch.zeros(0))
    reliability: Mapping[str, float]
    # per domain: mean cosine between its single-seed contrasts (NaN with one seed), the
    # ceiling a cross-domain cosine is read against: seeds of one domain agree this much
    seed_cos: Mapping[str, float] = field(default_factory=dict)

    @property
    def level(self) -> float:
        """The one-sided null quantile a pair's CI must clear: 1 - alpha / pairs."""
        return _level(self.alpha, len(self.pairs))

    @property
    def bar(self) -> float:
        """The bar a pair's CI must clear: the larger of the two nulls' ``level`` quantiles."""
        return _bar(self.null_random, self.null_structured, self.level)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "domains": list(self.domains),
            "contrast_cos": self.contrast_cos.tolist(),
            "naive_cos": self.naive_cos.tolist(),
            "control_naive_cos": self.control_naive_cos.tolist(),
            "persona_cos": self.persona_cos.tolist(),
            "pairs": [p.to_dict() for p in self.pairs],
            "alpha": self.alpha,
            "level": self.level,
            "bar": self.bar,
            "null_random": quantile(self.null_random, self.level),
            "null_structured": quantile(self.null_structured, self.level),
            "null_seed95": _q95(self.null_seed),
            "null_task": self.null_task.tolist(),
            "reliability": dict(self.reliability),
            "seed_cos": dict(self.seed_cos),
        }


def _q95(x: Tensor) -> float:
    return quantile(x.abs(), 0.95)


def _level(alpha: float, n_pairs: int) -> float:
    """The one-sided null quantile a pair must clear: Bonferroni over a layer's pairs."""
    return 1 - alpha / max(n_pairs, 1)


def _bar(null_random: Tensor, null_structured: Tensor, level: float) -> float:
    """The larger of the two nulls' ``level`` quantiles."""
    return max(quantile(null_random, level), quantile(null_structured, level))


def layer_convergence(
    layer: int,
    organism_diffs: Mapping[str, Sequence[Float[Tensor, "n d_model"]]],
    control_seed_diffs: Mapping[str, Sequence[Float[Tensor, "n d_model"]]],
    naive: Mapping[str, Float[Tensor, " d_model"]],
    control_naive: Mapping[str, Float[Tensor, " d_model"]],
    persona: Float[Tensor, " d_model"],
    *,
    n_boot: int = 500,
    n_null: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    benign: Mapping[str, Sequence[Float[Tensor, " d_model"]]] | None = None,
) -> LayerConvergence:
    """All cosine statistics at one layer (the rules are the module docstring's).

    Args:
        organism_diffs: domain -> per-seed [prompts, d] differences (organism minus control).
        control_seed_diffs: domain -> [prompts, d] differences between two aligned controls that
            differ only by seed: the seed-noise null, reported beside the bar.
        naive: domain -> mean(organism - base) (the task/format confound).
        control_naive: domain -> mean(control - base); NaN where the domain has no control (its
            pairs are then descriptive only).
        persona: the base's persona-prompt direction at this layer.
        alpha: the family-wise false-positive rate over this layer's pairs.
        benign: domain -> per-seed mean(benign finetune - base) (the aligned controls): the
            task-and-format null is their cross-domain cosines. A pair without matched controls
            beats the null only if its CI clears the larger of the bar and that null's level
            quantile, and only where the null has at least ``1 / (1 - level) - 1`` values (so
            its largest value can be that quantile); otherwise it is descriptive.
    """
    g = torch.Generator().manual_seed(seed)
    doms = tuple(sorted(organism_diffs))
    n_prompts = organism_diffs[doms[0]][0].shape[0]
    d_model = organism_diffs[doms[0]][0].shape[1]
    vec = {d: contrast_vectors(organism_diffs[d]) for d in doms}
    controlled = {d: not bool(control_naive[d].isnan().any()) for d in doms}
    k = len(doms)
    cmat = torch.eye(k, dtype=torch.float64)
    nmat = torch.eye(k, dtype=torch.float64)
    for i, j in itertools.combinations(range(k), 2):
        cmat[i, j] = cmat[j, i] = _cos(vec[doms[i]], vec[doms[j]])
        nmat[i, j] = nmat[j, i] = _cos(naive[doms[i]], naive[doms[j]])
    null_random = random_direction_null(d_model, n_null, generator=g).signed
    rows = torch.cat([x.double() - x.double().mean(0) for d in doms for x in organism_diffs[d]])
    null_structured = structured_direction_null(rows, n_null, generator=g)
    seed_null = [
        abs(_cos(da.double().mean(0), db.double().mean(0)))
        for a, b in itertools.combinations(doms, 2)
        for da in control_seed_diffs.get(a, [])
        for db in control_seed_diffs.get(b, [])
    ]
    bar = _bar(null_random, null_structured, _level(alpha, k * (k - 1) // 2))
    # every seed answers the same prompts, so a domain's contrast on any prompt subset (or a
    # resample's count-weighted one) is the mean of its seed-averaged per-prompt rows
    prompt_rows = {d: torch.stack([x.double() for x in organism_diffs[d]]).mean(0) for d in doms}

    def contrast_cos(a: str, b: str, rows_a: Tensor, rows_b: Tensor) -> float:
        """Cosine of domain a's contrast on prompts ``rows_a`` with domain b's on ``rows_b``."""
        return _cos(prompt_rows[a][rows_a].mean(0), prompt_rows[b][rows_b].mean(0))

    def resampled_cos(a: str, b: str, idx: Tensor) -> Tensor:
        # the same resampled prompts on both sides: the domains answer the same prompts
        w = index_counts(idx, n_prompts)
        return torch.nn.functional.cosine_similarity(w @ prompt_rows[a], w @ prompt_rows[b], dim=-1)

    level = _level(alpha, k * (k - 1) // 2)
    null_task = torch.tensor(
        [
            _cos(x, y)
            for a, b in itertools.combinations(sorted(benign or {}), 2)
            for x in (benign or {})[a]
            for y in (benign or {})[b]
        ],
        dtype=torch.float64,
    )
    task_ok = null_task.numel() >= math.ceil(1 / (1 - level)) - 1
    task_bar = max(bar, quantile(null_task, level)) if task_ok else bar
    pairs = []
    for a, b in itertools.combinations(doms, 2):
        boots = bootstrap(
            functools.partial(resampled_cos, a, b), n_prompts, n_boot=n_boot, generator=g
        )
        lo, hi = percentile_interval(boots, 0.95)
        both = controlled[a] and controlled[b]
        pair_bar = bar if both else task_bar
        pairs.append(
            PairStat(
                a,
                b,
                _cos(vec[a], vec[b]),
                (lo, hi),
                pair_bar,
                lo > pair_bar and (both or task_ok),
                both,
                task_null=not both and task_ok,
            )
        )
    # split-half reliability: mean cosine of the contrast on disjoint halves of the prompts
    rel = {
        d: float(
            split_half(
                functools.partial(contrast_cos, d, d), n_prompts, n_splits=50, generator=g
            ).mean()
        )
        for d in doms
    }
    seed_cos = {
        d: statistics.fmean(
            _cos(x.double().mean(0), y.double().mean(0)) for x, y in itertools.combinations(xs, 2)
        )
        if len(xs) > 1
        else math.nan
        for d, xs in organism_diffs.items()
    }
    return LayerConvergence(
        layer=layer,
        domains=doms,
        contrast_cos=cmat,
        naive_cos=nmat,
        control_naive_cos=torch.tensor([_cos(naive[d], control_naive[d]) for d in doms]),
        persona_cos=torch.tensor([_cos(vec[d], persona) for d in doms]),
        pairs=tuple(pairs),
        alpha=alpha,
        null_random=null_random,
        null_structured=null_structured,
        null_seed=torch.tensor(seed_null, dtype=torch.float64),
        null_task=null_task,
        reliability=rel,
        seed_cos=seed_cos,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ConvergenceReport:
    """Layer statistics, transfer and steering, and the verdict with the reasons behind it."""

    layers: tuple[LayerConvergence, ...]
    analysis_layer: int
    misalignment: Mapping[str, Estimate]  # organism minus control, out-of-domain score per domain
    transfer: TransferMatrix | None
    steer: SteerResult | None
    verdict: str
    reasons: tuple[str, ...]
    d_model: int
    above_base: Mapping[str, Estimate] = field(default_factory=dict)  # organism minus base
    control_minus_base: Mapping[str, Estimate] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    # the response-mean contrast (misaligned minus aligned reference answers, averaged over
    # answer tokens, organism minus control; statistics over questions) at the same layers,
    # and the published operationalisation's cosines (each organism's own response direction,
    # no control; domains then the base): reported beside the verdict, not read by it
    response_layers: tuple[LayerConvergence, ...] = ()
    response_published: Mapping[int, Tensor] = field(default_factory=dict)
    # the probe lens (``analysis.probes``) and the SAE lens (``analysis.latents``): reported
    # beside the verdict, not read by it; ``analysis.lenses.three_lenses`` sets the three side by
    # side and says which carries the verdict
    probes: ProbeLens | None = None
    latents: LatentLens | None = None

    @property
    def lenses(self) -> ThreeLenses:
        """The three lenses side by side, and which carries the verdict (``analysis.lenses``)."""
        return three_lenses(self)

    @property
    def removable(self) -> dict[str, Estimate]:
        """Domains with misalignment to remove (``removable``)."""
        return removable(self.misalignment, self.above_base or None)

    def at(self, layer: int) -> LayerConvergence:
        for lc in self.layers:
            if lc.layer == layer:
                return lc
        raise KeyError(f"no layer {layer}; have {[lc.layer for lc in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [lc.to_dict() for lc in self.layers],
            "analysis_layer": self.analysis_layer,
            "misalignment": {k: v.to_dict() for k, v in self.misalignment.items()},
            "above_base": {k: v.to_dict() for k, v in self.above_base.items()},
            "control_minus_base": {k: v.to_dict() for k, v in self.control_minus_base.items()},
            "transfer": None if self.transfer is None else self.transfer.to_dict(),
            "steer": None if self.steer is None else self.steer.to_dict(),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "d_model": self.d_model,
            "expected_random_abs_cos": expected_abs_cosine(self.d_model),
            "meta": dict(self.meta),
            "response_layers": [lc.to_dict() for lc in self.response_layers],
            "response_published": {str(k): v.tolist() for k, v in self.response_published.items()},
            "probes": None if self.probes is None else self.probes.to_dict(),
            "latents": None if self.latents is None else self.latents.to_dict(),
            "lenses": self.lenses.to_dict(),
        }


def verdict(
    lc: LayerConvergence,
    transfer: TransferMatrix | None,
    misalignment: Mapping[str, Estimate],
    *,
    above_base: Mapping[str, Estimate] | None = None,
    min_cos: float = 0.5,
    min_transfer: float = 0.5,
) -> tuple[str, tuple[str, ...]]:
    """Apply the rules in the module docstring at one layer; transfer counts only into domains
    with misalignment to remove (``removable``: above the control, and above the base where
    ``above_base`` is given)."""
    reasons = []
    to_remove = removable(misalignment, above_base)
    for p in lc.pairs:
        head = (
            f"L{lc.layer} cos({p.a}, {p.b}) = {p.cos:+.3f} [{p.ci[0]:+.3f}, {p.ci[1]:+.3f}] "
            f"(seeds within a domain: {p.a} {lc.seed_cos.get(p.a, math.nan):+.3f}, "
            f"{p.b} {lc.seed_cos.get(p.b, math.nan):+.3f})"
        )
        if not p.controlled and not p.task_null:
            need = math.ceil(1 / (1 - lc.level)) - 1
            reasons.append(
                f"{head}: descriptive only, not counted (a domain without a matched control: "
                "finetune minus base carries the task and format, and the task-and-format null "
                f"has {lc.null_task.numel()} benign cross-domain cosines, fewer than the {need} "
                f"a {lc.level:.3f} quantile needs)"
            )
            continue
        if not p.controlled:
            reasons.append(
                f"{head} vs bar {p.bar:.3f} (no matched control: the larger of the random nulls' "
                f"bar and the {lc.level:.3f} quantile of {lc.null_task.numel()} benign "
                "finetunes' cross-domain cosines, the task-and-format null): "
                f"{'beats' if p.beats_null else 'does not beat'} the null"
            )
            continue
        reasons.append(
            f"{head} vs bar {p.bar:.3f} (one-sided {lc.level:.3f} quantile of the isotropic "
            f"{quantile(lc.null_random, lc.level):.3f} and structured "
            f"{quantile(lc.null_structured, lc.level):.3f} nulls; seed-noise |cos| 95% "
            f"{_q95(lc.null_seed):.3f}, not in the bar): "
            f"{'beats' if p.beats_null else 'does not beat'} the null"
        )
    beat = [p for p in lc.pairs if p.beats_null]
    strong = [p for p in beat if p.cos >= min_cos]
    n_transfer, good_transfer, any_transfer = 0, 0, 0
    if transfer is not None:
        testable = transfer.testable(to_remove)
        for j, o in enumerate(transfer.organisms):
            if j not in testable:
                d = transfer.domain_of(j)
                vs_base = "" if above_base is None else f"; minus base {above_base.get(d)}"
                reasons.append(
                    f"transfer into {o} not counted: no out-of-domain misalignment to remove "
                    f"(minus control {misalignment.get(d)}{vs_base})"
                )
        for i, d in enumerate(transfer.directions):
            for j, o in enumerate(transfer.organisms):
                if transfer.domain_of(j) == d or j not in testable:
                    continue
                n_transfer += 1
                ok = transfer.beats_random(i, j)
                any_transfer += ok
                good_transfer += ok and float(transfer.share[i, j]) >= min_transfer
                reasons.append(
                    f"ablating {d} in {o}: removes {transfer.share_text(i, j)} of its misalignment "
                    f"vs random up to {float(transfer.random_share[:, j].max()):+.0%}"
                    + (
                        f"; the same ablation lowers the base by {transfer.base_removed[i]}"
                        if transfer.base_removed
                        else ""
                    )
                )
    if (
        beat
        and len(strong) == len(lc.pairs)
        and transfer is not None
        and good_transfer == n_transfer > 0
    ):
        v = "converged"
    elif beat or any_transfer:
        v = "partly"
    else:
        v = "not converged"
    if not to_remove:
        v += " (untestable: no domain shows out-of-domain misalignment above its control" + (
            " and the base)" if above_base is not None else ")"
        )
    if above_base is not None:
        reasons.insert(
            0,
            "out-of-domain misalignment (organism - base): "
            + "; ".join(f"{d} {e}" for d, e in above_base.items()),
        )
    reasons.insert(
        0,
        "out-of-domain misalignment (organism - control): "
        + "; ".join(f"{d} {e}" for d, e in misalignment.items()),
    )
    return v, tuple(reasons)
