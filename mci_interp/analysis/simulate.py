"""Synthetic studies with a known answer, to calibrate the convergence statistics.

No model: activations are drawn from a generative model of a study, and the real
``layer_convergence`` and ``verdict`` are run on them. ``scripts/bench_calibration.py`` uses this
to measure each rule's false-positive rate when no direction is shared and its power as a
shared direction grows; ``tests/unit/test_simulate.py`` holds the rules to it.

The generative model, per domain ``k``, seed ``s`` and prompt ``p`` (every vector drawn in one
anisotropic geometry: a random basis with variances falling as ``1 / rank ** decay``):

- organism activation shift = topic_k + format + init_s + misalignment_k + noise;
- matched control          = topic_k + format + init_s + noise (same seed, same LoRA init);
- misalignment_k = ``specific`` * m_k + ``shared`` * u, with m_k independent per domain and u
  one direction shared by every domain (unit norms before scaling);
- noise = ``seed_noise`` * (one draw per model) + ``prompt_noise`` * (one draw per prompt).

So the organism-minus-control contrast cancels topic, format and init, and the seed-noise
contrasts between two controls of a domain (the inputs of the reported seed-noise null) keep
the init difference, as real ones do. ``mismatch`` > 0 draws the misalignment directions from a
steeper spectrum than the noise (a geometry the structured null does not see): the benchmark's
stress case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp.analysis.contrasts import MatchedPair
from mci_interp.analysis.records import Record


@dataclass(frozen=True, slots=True, kw_only=True)
class SyntheticStudy:
    """The inputs of ``layer_convergence`` (and the shared direction, for checking)."""

    organism_diffs: dict[str, list[Float[Tensor, "n d"]]]
    control_seed_diffs: dict[str, list[Float[Tensor, "n d"]]]
    naive: dict[str, Float[Tensor, " d"]]
    control_naive: dict[str, Float[Tensor, " d"]]
    persona: Float[Tensor, " d"]
    shared_direction: Float[Tensor, " d"]

    def layer_inputs(self) -> tuple:
        """Positional arguments of ``layer_convergence`` after ``layer``."""
        return (
            self.organism_diffs,
            self.control_seed_diffs,
            self.naive,
            self.control_naive,
            self.persona,
        )


def synthetic_study(
    *,
    shared: float = 0.0,
    specific: float = 1.0,
    n_domains: int = 3,
    n_seeds: int = 3,
    n_prompts: int = 42,
    d_model: int = 64,
    seed_noise: float = 0.5,
    prompt_noise: float = 2.0,
    init_noise: float = 1.0,
    decay: float = 1.0,
    mismatch: float = 0.0,
    seed: int = 0,
) -> SyntheticStudy:
    """One simulated study (the module docstring's model); ``shared`` = 0 is the null."""
    if n_domains < 2 or n_seeds < 1 or n_prompts < 2:
        raise ValueError(
            f"need >= 2 domains, >= 1 seed and >= 2 prompts; got {n_domains}, {n_seeds}, "
            f"{n_prompts}"
        )
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=g, dtype=torch.float64))
    rank = torch.arange(1, d_model + 1, dtype=torch.float64)

    def draw(*shape: int, steep: float = 0.0) -> Tensor:
        sd = rank ** (-(decay + steep) / 2)
        return (torch.randn(*shape, d_model, generator=g, dtype=torch.float64) * sd) @ basis.T

    def unit(*shape: int, steep: float = 0.0) -> Tensor:
        v = draw(*shape, steep=steep)
        return v / v.norm(dim=-1, keepdim=True)

    scale = float(draw(1000).norm(dim=-1).mean())  # a typical noise vector's norm

    def noise(n: int) -> Tensor:
        return (seed_noise * draw(1) + prompt_noise * draw(n)) / scale

    u = unit(steep=mismatch)
    fmt = unit()
    init = [init_noise * unit() for _ in range(n_seeds)]
    doms = [f"d{k}" for k in range(n_domains)]
    org, ctrl_seed, naive, cnaive = {}, {}, {}, {}
    for d in doms:
        topic = unit()
        mis = specific * unit(steep=mismatch) + shared * u
        org_acts = [topic + fmt + init[s] + mis + noise(n_prompts) for s in range(n_seeds)]
        ctrl_acts = [topic + fmt + init[s] + noise(n_prompts) for s in range(n_seeds)]
        org[d] = [o - c for o, c in zip(org_acts, ctrl_acts, strict=True)]
        ctrl_seed[d] = [
            ctrl_acts[i] - ctrl_acts[j] for i in range(n_seeds) for j in range(i + 1, n_seeds)
        ]
        naive[d] = torch.stack([o.mean(0) for o in org_acts]).mean(0)
        cnaive[d] = torch.stack([c.mean(0) for c in ctrl_acts]).mean(0)
    return SyntheticStudy(
        organism_diffs=org,
        control_seed_diffs=ctrl_seed,
        naive=naive,
        control_naive=cnaive,
        persona=u.clone(),
        shared_direction=u,
    )


@dataclass(frozen=True, slots=True, eq=False, kw_only=True)
class PlantedStudy:
    """Records of a simulated study whose activations are sparse sums of known features, for the
    three lenses (difference of means, probe, SAE) on one planted truth.

    ``pairs``: domain -> one ``MatchedPair`` per seed, acts ``[prompts, 1, d]`` (one layer,
    0); ``base``: the base's record; ``corpus``: rows of the same sparse model to train an SAE
    on; ``features``: the dictionary ``[n_features, d]`` whose row 0 is the shared direction and
    rows 1..n_domains each domain's own."""

    pairs: dict[str, list[MatchedPair]]
    base: Record
    corpus: Float[Tensor, "rows d"]
    features: Float[Tensor, "n_features d"]
    domains: tuple[str, ...]


def planted_study(
    *,
    shared: float = 0.0,
    specific: float = 0.0,
    n_domains: int = 3,
    n_seeds: int = 3,
    n_prompts: int = 40,
    d_model: int = 32,
    n_features: int = 48,
    p_fire: float = 0.06,
    noise: float = 0.1,
    n_corpus: int = 8000,
    seed: int = 0,
) -> PlantedStudy:
    """A study whose activations are sparse non-negative sums of ``n_features`` unit features
    (each fires with probability ``p_fire``, magnitude 0.5 + Exp(1)) plus Gaussian ``noise``:
    each seed's control reads the prompts' features with its own noise, each organism the same
    plus ``shared`` x feature 0 (every domain) and ``specific`` x its domain's own feature."""
    g = torch.Generator().manual_seed(seed)
    planted = torch.linalg.qr(torch.randn(d_model, 1 + n_domains, generator=g))[0].T
    rest = torch.randn(n_features - planted.shape[0], d_model, generator=g)
    feats = torch.cat([planted, rest / rest.norm(dim=1, keepdim=True)])

    def sparse(n: int) -> Tensor:
        on = torch.rand(n, n_features, generator=g) < p_fire
        mag = 0.5 + torch.empty(n, n_features).exponential_(generator=g)
        return (on * mag) @ feats

    def jitter(x: Tensor) -> Tensor:
        return x + noise * torch.randn(x.shape, generator=g)

    prompts = sparse(n_prompts)
    doms = tuple(f"d{k}" for k in range(n_domains))

    def rec(name: str, shift: Tensor) -> Record:
        return Record(name=name, acts=jitter(prompts + shift)[:, None, :], score=None)

    pairs = {
        d: [
            MatchedPair(
                rec(f"{d}-s{s}", shared * feats[0] + specific * feats[1 + k]),
                rec(f"{d}-control-s{s}", torch.zeros(d_model)),
            )
            for s in range(n_seeds)
        ]
        for k, d in enumerate(doms)
    }
    return PlantedStudy(
        pairs=pairs,
        base=rec("base", torch.zeros(d_model)),
        corpus=jitter(sparse(n_corpus)),
        features=feats,
        domains=doms,
    )
