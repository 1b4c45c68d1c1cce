"""The probe lens of the convergence test: does a probe that tells one domain's misaligned
finetune from its matched control tell another domain's apart too?

Per layer and ordered pair of domains (A trains, B is tested): a ``LinearProbe`` (standardised
L2 logistic regression) is fitted on A's rows (every seed's organism, label 1, and its control,
label 0, on the neutral prompts) of the training prompts and scores B's rows of the held-out
prompts. The folds split the prompts, the same split for every domain, so no prompt is in a
probe's training set and its test set; the diagonal (A = B) is the within-domain AUROC. The AUROC
is pooled over the out-of-fold scores; its interval resamples prompts. The null refits with A's
labels swapped at random within each prompt and seed (a probe that can learn nothing about
the finetunes), ``n_null`` times: p is the rank of the observed AUROC among them.

Prompt identity carries no label here: every prompt appears once with each label per seed, so a
scorer that knows only the prompt (``LinearProbe``'s prompt-identity baseline) is at 0.5 exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mci_interp._io import read_json_verified, stable_hash, write_json
from mci_interp.analysis.causal import rng
from mci_interp.analysis.contrasts import MatchedPair
from mci_interp.analysis.records import Record, acts_of
from mci_interp.extract.probe import LinearProbe
from mci_interp.stats import (
    Estimate,
    empirical_p_value,
    index_counts,
    percentile_interval,
    quantile,
)

PROMPT_IDENTITY_AUROC = 0.5
"""What a scorer that knows only each row's prompt reaches on these balanced rows."""


@dataclass(frozen=True, slots=True)
class ProbeCell:
    """A probe trained on ``train``'s finetunes, tested on ``test``'s (held-out prompts)."""

    train: str
    test: str
    auroc: Estimate
    null95: float  # 95th percentile of the label-swapped null
    p: float  # rank p against that null

    @property
    def significant(self) -> bool:
        return self.auroc.lo > PROMPT_IDENTITY_AUROC and self.auroc.mean > self.null95

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": self.train,
            "test": self.test,
            "auroc": self.auroc.to_dict(),
            "null95": self.null95,
            "p": self.p,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeCell:
        return cls(
            str(d["train"]),
            str(d["test"]),
            Estimate.from_dict(d["auroc"]),
            float(d["null95"]),
            float(d["p"]),
        )


@dataclass(frozen=True, slots=True)
class ProbeLayer:
    """Every (train, test) cell at one layer, and the mean cross-domain AUROC against its null."""

    layer: int
    cells: tuple[ProbeCell, ...]
    transfer: Estimate  # mean over the off-diagonal cells
    transfer_null95: float
    transfer_p: float

    def cell(self, train: str, test: str) -> ProbeCell:
        return next(c for c in self.cells if c.train == train and c.test == test)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "cells": [c.to_dict() for c in self.cells],
            "transfer": self.transfer.to_dict(),
            "transfer_null95": self.transfer_null95,
            "transfer_p": self.transfer_p,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeLayer:
        return cls(
            layer=int(d["layer"]),
            cells=tuple(ProbeCell.from_dict(c) for c in d["cells"]),
            transfer=Estimate.from_dict(d["transfer"]),
            transfer_null95=float(d["transfer_null95"]),
            transfer_p=float(d["transfer_p"]),
        )


@dataclass(frozen=True, slots=True)
class ProbeLens:
    """The probe lens at every convergence layer, read at the analysis layer."""

    domains: tuple[str, ...]
    layers: tuple[ProbeLayer, ...]
    analysis_layer: int
    n_folds: int
    n_null: int

    def at(self, layer: int) -> ProbeLayer:
        return next(x for x in self.layers if x.layer == layer)

    @property
    def transfers(self) -> bool:
        """At the analysis layer every cross-domain probe beats 0.5 and its null, and so does
        their mean."""
        x = self.at(self.analysis_layer)
        off = [c for c in x.cells if c.train != c.test]
        return bool(off) and all(c.significant for c in off) and x.transfer_p <= 0.05

    def to_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "layers": [x.to_dict() for x in self.layers],
            "analysis_layer": self.analysis_layer,
            "n_folds": self.n_folds,
            "n_null": self.n_null,
            "transfers": self.transfers,
            "prompt_identity_auroc": PROMPT_IDENTITY_AUROC,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeLens:
        """Back from ``to_dict`` (its derived keys are recomputed, not read)."""
        return cls(
            domains=tuple(d["domains"]),
            layers=tuple(ProbeLayer.from_dict(x) for x in d["layers"]),
            analysis_layer=int(d["analysis_layer"]),
            n_folds=int(d["n_folds"]),
            n_null=int(d["n_null"]),
        )


def _rows(pairs: Sequence[MatchedPair], base: Record, layer: int) -> tuple[Tensor, Tensor]:
    """``x [seeds * 2 * prompts, d]`` (per seed: the organism's prompts, then the reference's)
    and the labels."""
    xs, ys = [], []
    for p in pairs:
        for rec, label in ((p.organism, 1), (p.reference(base), 0)):
            a = acts_of(rec)[:, layer].double()
            xs.append(a)
            ys.append(torch.full((a.shape[0],), label))
    return torch.cat(xs), torch.cat(ys)


def _auroc_weighted(score: Tensor, label: Tensor, weights: Tensor) -> Tensor:
    """AUROC (ties count half) of ``score`` for every row weighting in ``weights [m, rows]``
    (a bootstrap's prompt counts): ``[m]``."""
    pos, neg = score[label == 1], score[label == 0]
    cmp = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    wp, wn = weights[:, label == 1], weights[:, label == 0]
    return ((wp @ cmp) * wn).sum(1) / (wp.sum(1) * wn.sum(1))


def _auroc(score: Tensor, label: Tensor) -> float:
    return float(_auroc_weighted(score, label, torch.ones(1, len(label), dtype=torch.float64))[0])


def _out_of_fold(
    data: Mapping[str, tuple[Tensor, Tensor]],
    fold_of: Mapping[str, Tensor],
    train: str,
    labels: Tensor,
    n_folds: int,
    *,
    C: float,
    seed: int,
) -> dict[str, Tensor]:
    """Out-of-fold scores of every domain's rows by probes fitted on ``train``'s rows (with
    ``labels``) of the other prompt folds (``fold_of[d]``: the fold of each of d's rows)."""
    scores = {d: torch.empty(len(y), dtype=torch.float64) for d, (_, y) in data.items()}
    for k in range(n_folds):
        tr = fold_of[train] != k
        probe = LinearProbe(C=C, cv=None, ungrouped_baseline=False, seed=seed)
        probe.fit(data[train][0][tr], labels[tr])  # it silences lbfgs convergence notes itself
        for d, (x, _) in data.items():
            te = fold_of[d] == k
            scores[d][te] = torch.as_tensor(probe.decision_function(x[te]))
    return scores


def probe_lens(
    pairs: Mapping[str, Sequence[MatchedPair]],
    base: Record,
    *,
    layers: Sequence[int],
    analysis_layer: int,
    n_folds: int = 5,
    n_null: int = 19,
    n_boot: int = 1000,
    C: float = 1.0,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> ProbeLens:
    """The probe lens (module docstring) over ``pairs`` (domain -> matched pairs per seed, all
    recorded on the same prompts) at ``layers``. With ``cache_dir`` it is stored there under
    the hash of its inputs' bytes and settings, and read back instead of refitted (its ~300
    fits per layer are most of a warm study's time)."""
    settings = dict(
        layers=sorted(set(layers) | {analysis_layer}),
        analysis_layer=analysis_layer,
        n_folds=n_folds,
        n_null=n_null,
        n_boot=n_boot,
        C=C,
        seed=seed,
    )
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(stable_hash(settings | {"domains": sorted(pairs)}).encode())
        for d in sorted(pairs):
            for p in pairs[d]:
                for rec in (p.organism, p.reference(base)):
                    h.update(acts_of(rec).float().contiguous().numpy().tobytes())
        path = Path(cache_dir) / f"probe-lens-{h.hexdigest()[:20]}.json"
        if path.exists():
            return ProbeLens.from_dict(
                read_json_verified(path, fix=f"delete {path} to refit the probe lens")
            )
    lens = _probe_lens(pairs, base, **settings)  # type: ignore[arg-type]
    if path is not None:
        write_json(path, lens.to_dict())
    return lens


def _probe_lens(
    pairs: Mapping[str, Sequence[MatchedPair]],
    base: Record,
    *,
    layers: Sequence[int],
    analysis_layer: int,
    n_folds: int,
    n_null: int,
    n_boot: int,
    C: float,
    seed: int,
) -> ProbeLens:
    domains = tuple(sorted(pairs))
    if len(domains) < 2:
        raise ValueError(f"the probe lens compares domains; got {list(domains)}")
    n_prompts = acts_of(pairs[domains[0]][0].organism).shape[0]
    if n_prompts < n_folds:
        raise ValueError(f"{n_prompts} prompts cannot make {n_folds} prompt folds")
    # the same prompt folds for every domain and layer
    fold = torch.randperm(n_prompts, generator=rng(seed, "probe folds")) % n_folds
    out = [
        _probe_layer(
            {d: _rows(pairs[d], base, layer) for d in domains},
            layer,
            fold,
            n_null=n_null,
            n_boot=n_boot,
            C=C,
            seed=seed,
        )
        for layer in layers
    ]
    return ProbeLens(
        domains=domains,
        layers=tuple(out),
        analysis_layer=analysis_layer,
        n_folds=n_folds,
        n_null=n_null,
    )


def _probe_layer(
    data: Mapping[str, tuple[Tensor, Tensor]],
    layer: int,
    fold: Tensor,
    *,
    n_null: int,
    n_boot: int,
    C: float,
    seed: int,
) -> ProbeLayer:
    """Every (train, test) cell at one layer: ``data[d]`` = (rows, labels) as ``_rows`` makes
    them; ``fold[p]``: prompt p's fold."""
    domains = tuple(data)
    n_prompts, n_folds = len(fold), int(fold.max()) + 1
    prompt_of = {d: torch.arange(len(y)) % n_prompts for d, (_, y) in data.items()}
    fold_of = {d: fold[prompt_of[d]] for d in domains}
    real = {a: _out_of_fold(data, fold_of, a, data[a][1], n_folds, C=C, seed=seed) for a in domains}
    # the null: per seed and prompt, the organism's and the reference's labels swapped at random
    gn = rng(seed, "probe null", layer)
    null: dict[tuple[str, str], list[float]] = {(a, b): [] for a in domains for b in domains}
    for _ in range(n_null):
        for a in domains:
            y = data[a][1].view(-1, 2, n_prompts).clone()  # [seeds, organism/reference, prompts]
            swap = torch.rand(y.shape[0], n_prompts, generator=gn) < 0.5
            y[:, 0], y[:, 1] = torch.where(swap, 0, 1), torch.where(swap, 1, 0)
            sc = _out_of_fold(data, fold_of, a, y.flatten(), n_folds, C=C, seed=seed)
            for b in domains:
                null[a, b].append(float(_auroc(sc[b], data[b][1])))
    counts = index_counts(
        torch.randint(
            0, n_prompts, (n_boot, n_prompts), generator=rng(seed, "probe bootstrap", layer)
        ),
        n_prompts,
    )
    cells, boots = [], {}
    for a in domains:
        for b in domains:
            score, y = real[a][b], data[b][1]
            boots[a, b] = _auroc_weighted(score, y, counts[:, prompt_of[b]])
            obs = _auroc(score, y)
            lo, hi = percentile_interval(boots[a, b])
            nl = torch.tensor(null[a, b], dtype=torch.float64)
            cells.append(
                ProbeCell(
                    train=a,
                    test=b,
                    auroc=Estimate(obs, lo, hi, n_prompts),
                    null95=quantile(nl, 0.95),
                    p=empirical_p_value(obs, nl),
                )
            )
    off = [(a, b) for a in domains for b in domains if a != b]
    mean_obs = float(np.mean([c.auroc.mean for c in cells if c.train != c.test]))
    mean_null = torch.tensor([null[k] for k in off], dtype=torch.float64).mean(0)
    lo, hi = percentile_interval(torch.stack([boots[k] for k in off]).mean(0))
    return ProbeLayer(
        layer=layer,
        cells=tuple(cells),
        transfer=Estimate(mean_obs, lo, hi, n_prompts),
        transfer_null95=quantile(mean_null, 0.95),
        transfer_p=empirical_p_value(mean_obs, mean_null),
    )
