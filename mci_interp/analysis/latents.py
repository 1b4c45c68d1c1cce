"""The SAE lens of the convergence test: do different narrow finetunes raise the same SAE latents?

Per domain, every latent's *change*: its mean activation on the neutral prompts (last prompt
token, at the SAE's layer) in each seed's organism minus in that seed's matched control (the base
where there is none), averaged over seeds and prompts, with a 95% interval that resamples seeds,
then prompts; the same minus the base beside it. A domain's *rising latents* are its top ``k`` by
change (the persona-features method's ranking, with the control subtracted) among the latents
that fire on some record, and only those whose change is above zero.

Across each pair of domains: the overlap of their rising latents, and the Spearman correlation
of their changes over every latent that fires on the records. Each is set against two nulls, and
must clear the larger of their quantiles at 1 - alpha / pairs (Bonferroni over the pairs, as the
contrast cosines are), which is the same as its rank p-value against each being at most
alpha / pairs:

- *sign-flip*: each (seed, prompt) difference's sign flipped at random in both domains (the
  organism's and the control's labels swapped within a prompt and seed, as the probe lens's
  null does); a latent whose change is only noise is as likely to rise as to fall, and latents
  with large noise (frequent ones) overlap by chance as often as they do here;
- *shuffled latents*: one domain's changes permuted over the latents (chance overlap of two
  unrelated top-k lists).

Beside them, not in the bar, the *seed-noise organisms*: per domain, each control minus each
control of a later seed (as the contrast lens's seed-noise null), ranked like an organism; their
overlap between domains is what LoRA-seed differences alone share.

The *named* latents are the ones in the top ``k`` of at least two domains (most domains first),
or, where none is shared, each domain's top latent. For each: its change per domain, its
top-activating corpus contexts, its decoder direction's cosine with each domain's
difference-of-means contrast and with the persona-prompt direction, and (``steer_latents``) what
adding it to the base does to the misalignment score beside random latents.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mci_interp.analysis.causal import CausalScorer, rng
from mci_interp.analysis.contrasts import MatchedPair
from mci_interp.analysis.dictionary import StudySae
from mci_interp.analysis.records import Record, acts_of
from mci_interp.analysis.steering import steering
from mci_interp.compare import cosine
from mci_interp.direction import Direction
from mci_interp.extract.sae import encode_rows, reconstruction_quality
from mci_interp.stats import (
    Estimate,
    empirical_p_value,
    index_counts,
    quantile,
)

if TYPE_CHECKING:
    from mci_interp.models import HookedModel


@dataclass(frozen=True, slots=True, eq=False)
class LatentChange:
    """One domain's change of every latent: organism minus control (``change`` with its 95%
    interval ``lo``/``hi``, seeds then prompts resampled) and organism minus base."""

    domain: str
    change: Tensor  # [d_sae] float64
    lo: Tensor
    hi: Tensor
    above_base: Tensor
    top: tuple[int, ...]  # the rising latents, largest change first
    # mean overlap of the top k between two seeds of this domain (NaN with one seed): the
    # ceiling a cross-domain overlap is read against, as the seeds agree this much
    seed_agreement: float = math.nan

    def estimate(self, j: int, n: int) -> Estimate:
        return Estimate(float(self.change[j]), float(self.lo[j]), float(self.hi[j]), n)


@dataclass(frozen=True, slots=True)
class LatentPair:
    """Two domains' rising latents: overlap and rank correlation against their nulls."""

    a: str
    b: str
    overlap: int
    overlap_bar: float  # the larger null quantile at the pair's level
    overlap_p: float  # the larger of the two nulls' rank p-values
    rho: float
    rho_bar: float
    rho_p: float
    seed_overlap: float  # seed-noise organisms' overlap (NaN: fewer than two seeds)
    level: float

    @property
    def shared(self) -> bool:
        """The overlap clears both nulls at the pair's level."""
        return self.overlap > self.overlap_bar and self.overlap_p <= 1 - self.level

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "overlap": self.overlap,
            "overlap_bar": self.overlap_bar,
            "overlap_p": self.overlap_p,
            "rho": self.rho,
            "rho_bar": self.rho_bar,
            "rho_p": self.rho_p,
            "seed_overlap": self.seed_overlap,
            "level": self.level,
            "shared": self.shared,
        }


@dataclass(frozen=True, slots=True)
class NamedLatent:
    """A latent the lens names (shared, or a domain's top), and what is known of it."""

    latent: int
    domains: tuple[str, ...]  # the domains it rises in (top k)
    change: Mapping[str, Estimate]  # organism minus control, per domain
    above_base: Mapping[str, float]
    contexts: tuple[tuple[str, float], ...]
    contrast_cos: Mapping[str, float]  # decoder row vs each domain's diff-means contrast
    persona_cos: float
    steer: Estimate | None = None  # misalignment induced in the base (score minus unsteered)
    steer_coherence: float = math.nan
    steer_p: float = math.nan  # rank p against the random latents

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent": self.latent,
            "domains": list(self.domains),
            "change": {d: e.to_dict() for d, e in self.change.items()},
            "above_base": dict(self.above_base),
            "contexts": [list(c) for c in self.contexts],
            "contrast_cos": dict(self.contrast_cos),
            "persona_cos": self.persona_cos,
            "steer": None if self.steer is None else self.steer.to_dict(),
            "steer_coherence": self.steer_coherence,
            "steer_p": self.steer_p,
        }


@dataclass(frozen=True, slots=True, eq=False)
class LatentLens:
    """The SAE lens at its layer (module docstring)."""

    layer: int
    domains: tuple[str, ...]
    top_k: int
    n_prompts: int
    changes: tuple[LatentChange, ...]
    pairs: tuple[LatentPair, ...]
    named: tuple[NamedLatent, ...]
    named_shared: bool  # the named latents are shared ones (else each domain's top)
    sae_source: str
    quality: Mapping[str, float]
    n_alive: int  # latents that fire on some record: the rank correlation's support
    n_null: int
    steer_alpha: float | None = None
    random_steer: tuple[float, ...] = ()  # induced by the random latents
    random_latents: tuple[int, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def change(self, domain: str) -> LatentChange:
        return next(c for c in self.changes if c.domain == domain)

    @property
    def shares(self) -> bool:
        """Every pair of domains shares rising latents beyond both nulls."""
        return bool(self.pairs) and all(p.shared for p in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        k = self.top_k
        return {
            "layer": self.layer,
            "domains": list(self.domains),
            "top_k": k,
            "n_prompts": self.n_prompts,
            "rising": {
                c.domain: [
                    {"latent": j, **c.estimate(j, self.n_prompts).to_dict()} for j in c.top[:k]
                ]
                for c in self.changes
            },
            "seed_agreement": {c.domain: c.seed_agreement for c in self.changes},
            "pairs": [p.to_dict() for p in self.pairs],
            "named": [n.to_dict() for n in self.named],
            "named_shared": self.named_shared,
            "sae_source": self.sae_source,
            "quality": dict(self.quality),
            "n_alive": self.n_alive,
            "n_null": self.n_null,
            "steer_alpha": self.steer_alpha,
            "random_steer": list(self.random_steer),
            "random_latents": list(self.random_latents),
            "shares": self.shares,
            "meta": dict(self.meta),
        }


def _boot_means(d: Tensor, n_boot: int, gen: torch.Generator) -> Tensor:
    """``[n_boot, J]`` means of ``d [seeds, prompts, J]``, resampling seeds, then prompts."""
    s, p = d.shape[0], d.shape[1]
    ws = index_counts(torch.randint(0, s, (n_boot, s), generator=gen), s)
    wp = index_counts(torch.randint(0, p, (n_boot, p), generator=gen), p)
    return torch.einsum("ms,mp,spj->mj", ws, wp, d) / (s * p)


def _ranks(x: Tensor) -> Tensor:
    """Ranks along the last dim (ties broken by position; the callers' values are continuous)."""
    return x.argsort(-1).argsort(-1).double()


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation along the last dim (broadcasting)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


def _rising(x: Tensor, k: int) -> Tensor:
    """Mask of the top ``k`` of ``x`` along the last dim that are above zero (a latent whose
    mean did not move is not rising, and ties at zero would be picked in index order)."""
    top = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)
    return top & (x > 0)


def _overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """How many rising latents (``_rising``) ``a`` and ``b`` share, along the last dim."""
    return (_rising(a, k) & _rising(b, k)).sum(-1).double()


def _encode(sae: Any, rec: Record, layer: int) -> Tensor:
    return encode_rows(sae, acts_of(rec)[:, layer]).to("cpu", torch.float64)


def latent_lens(
    pairs: Mapping[str, Sequence[MatchedPair]],
    base: Record,
    sae: StudySae,
    *,
    top_k: int = 20,
    n_null: int = 199,
    n_boot: int = 1000,
    alpha: float = 0.05,
    n_named: int = 5,
    contrasts: Mapping[str, Tensor] | None = None,
    persona: Tensor | None = None,
    seed: int = 0,
) -> LatentLens:
    """The SAE lens (module docstring) over ``pairs`` (domain -> matched pairs per seed, all
    recorded on the same prompts), read at ``sae.site``. ``contrasts`` (domain -> its
    difference-of-means contrast at that layer) and ``persona`` (the persona-prompt direction
    there) give the named latents' cosines."""
    domains = tuple(sorted(pairs))
    if len(domains) < 2:
        raise ValueError(f"the SAE lens compares domains; got {list(domains)}")
    site = sae.site
    if site.component != "resid_post":
        raise ValueError(
            f"the records hold resid_post activations; an SAE at {site.hook_name!r} does not read "
            "them (use an SAE trained on blocks.L.hook_resid_post)"
        )
    layer = site.layer
    z_base = _encode(sae.sae, base, layer)
    n_prompts, d_sae = z_base.shape
    if not 1 <= top_k <= d_sae:
        raise ValueError(f"top_k must be in [1, d_sae={d_sae}], got {top_k}")
    deltas, vs_base, noise, alive = {}, {}, {}, z_base.gt(0).any(0)
    for d in domains:
        zo = [_encode(sae.sae, p.organism, layer) for p in pairs[d]]
        zr = [_encode(sae.sae, p.reference(base), layer) for p in pairs[d]]
        deltas[d] = torch.stack([o - r for o, r in zip(zo, zr, strict=True)])  # [S, P, J]
        vs_base[d] = torch.stack(zo).mean((0, 1)) - z_base.mean(0)
        controls = [_encode(sae.sae, p.control, layer) for p in pairs[d] if p.control is not None]
        if len(controls) > 1:  # one control minus another of another seed: seed noise
            noise[d] = torch.stack([x - y for x, y in itertools.combinations(controls, 2)])
        for z in [*zo, *zr]:
            alive |= z.gt(0).any(0)
    gen = rng(seed, "sae lens")
    # ranks, overlaps and their nulls are over the latents that fire on some record: the rest
    # never move, and would fill a top k with zeros
    keep = alive.nonzero().flatten()
    k = min(top_k, len(keep))
    changes = []
    for d in domains:
        mean = deltas[d].mean((0, 1))
        boots = _boot_means(deltas[d], n_boot, gen)
        per_seed = deltas[d].mean(1)[:, keep]
        agree = [
            float(_overlap(per_seed[i], per_seed[j], k))
            for i, j in itertools.combinations(range(per_seed.shape[0]), 2)
        ]
        rising = keep[_rising(mean[keep], k)]
        changes.append(
            LatentChange(
                domain=d,
                change=mean,
                lo=torch.quantile(boots, 0.025, dim=0),
                hi=torch.quantile(boots, 0.975, dim=0),
                above_base=vs_base[d],
                top=tuple(int(j) for j in rising[mean[rising].argsort(descending=True)]),
                seed_agreement=sum(agree) / len(agree) if agree else math.nan,
            )
        )
    by = {c.domain: c for c in changes}
    # the sign-flip null: every (seed, prompt) difference's sign drawn at random, per domain
    flipped = {
        d: torch.einsum(
            "nsp,spj->nj",
            torch.randint(0, 2, (n_null, *deltas[d].shape[:2]), generator=gen).double() * 2 - 1,
            deltas[d],
        )
        / (deltas[d].shape[0] * n_prompts)
        for d in domains
    }
    m = len(domains) * (len(domains) - 1) // 2
    level = 1 - alpha / m
    out_pairs = []
    for a, b in itertools.combinations(domains, 2):
        ca, cb = by[a].change[keep], by[b].change[keep]
        perm = torch.stack([torch.randperm(len(keep), generator=gen) for _ in range(n_null)])
        shuffled_b = cb[perm]
        fa, fb = flipped[a][:, keep], flipped[b][:, keep]
        obs_o = float(_overlap(ca, cb, k))
        obs_r = float(_spearman(ca, cb))
        nulls_o = (_overlap(fa, fb, k), _overlap(ca.expand_as(shuffled_b), shuffled_b, k))
        nulls_r = (_spearman(fa, fb), _spearman(ca.expand(n_null, -1), shuffled_b))
        seed_o = (
            float(_overlap(noise[a].mean((0, 1))[keep], noise[b].mean((0, 1))[keep], k))
            if a in noise and b in noise
            else math.nan
        )
        out_pairs.append(
            LatentPair(
                a=a,
                b=b,
                overlap=int(obs_o),
                overlap_bar=max(quantile(n, level) for n in nulls_o),
                overlap_p=max(empirical_p_value(obs_o, n) for n in nulls_o),
                rho=obs_r,
                rho_bar=max(quantile(n, level) for n in nulls_r),
                rho_p=max(empirical_p_value(obs_r, n) for n in nulls_r),
                seed_overlap=seed_o,
                level=level,
            )
        )
    named, named_shared = _named(changes, top_k, n_named)
    dec = sae.decoder()
    return LatentLens(
        layer=layer,
        domains=domains,
        top_k=top_k,
        n_prompts=n_prompts,
        changes=tuple(changes),
        pairs=tuple(out_pairs),
        named=tuple(
            NamedLatent(
                latent=j,
                domains=doms,
                change={d: by[d].estimate(j, n_prompts) for d in domains},
                above_base={d: float(by[d].above_base[j]) for d in domains},
                contexts=tuple(sae.contexts[j]) if j < len(sae.contexts) else (),
                contrast_cos={d: cosine(dec[j], v) for d, v in (contrasts or {}).items()},
                persona_cos=math.nan if persona is None else cosine(dec[j], persona),
            )
            for j, doms in named
        ),
        named_shared=named_shared,
        sae_source=sae.source,
        quality=dict(sae.quality)
        | {
            f"neutral_{k}": v
            for k, v in reconstruction_quality(sae.sae, acts_of(base)[:, layer]).items()
        },
        n_alive=int(alive.sum()),
        n_null=n_null,
    )


def _named(
    changes: Sequence[LatentChange], k: int, n: int
) -> tuple[list[tuple[int, tuple[str, ...]]], bool]:
    """Latents in the top ``k`` of two or more domains (most domains, then best mean rank,
    first), at most ``n``; else each domain's top latent."""
    rank = {c.domain: {j: r for r, j in enumerate(c.top[:k])} for c in changes}
    ids = {j for c in changes for j in c.top[:k]}
    shared = []
    for j in ids:
        doms = tuple(c.domain for c in changes if j in rank[c.domain])
        if len(doms) > 1:
            mean_rank = sum(rank[d][j] for d in doms) / len(doms)
            shared.append((-len(doms), mean_rank, j, doms))
    if shared:
        return [(j, doms) for _, _, j, doms in sorted(shared)[:n]], True
    seen: dict[int, tuple[str, ...]] = {}
    for c in changes:
        if not c.top:  # no latent rose in this domain
            continue
        seen.setdefault(c.top[0], ())
        seen[c.top[0]] += (c.domain,)
    return list(seen.items())[:n], False


def steer_latents(
    model: HookedModel,
    lens: LatentLens,
    sae: StudySae,
    *,
    scores: CausalScorer,
    alpha: float,
    n_steer: int = 3,
    n_random: int = 19,
    seed: int = 0,
    show_progress: bool = False,
) -> LatentLens:
    """``lens`` with the first ``n_steer`` named latents' steering effects on ``model`` (its
    decoder row added at ``alpha`` x the residual norm per token, at the lens's layer) beside
    ``n_random`` random latents' (drawn from those with corpus contexts, i.e. alive)."""
    dec = sae.decoder()
    chosen = [n.latent for n in lens.named[:n_steer]]
    pool = [j for j, c in enumerate(sae.contexts) if c and j not in chosen]
    g = rng(seed, "sae random latents")
    randoms = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:n_random]]

    def direction(j: int) -> Direction:
        return Direction.by_hand(
            dec[j].float(), sae.site, model=model.name, method=f"sae_latent:{j}"
        )

    res = steering(
        model,
        {f"latent {j}": direction(j) for j in [*chosen, *randoms]},
        scores=scores,
        alphas=(alpha,),
        n_random=0,
        seed=seed,
        show_progress=show_progress,
    )
    rand = res.induced[len(chosen) :, 0]
    named = []
    for i, n in enumerate(lens.named):
        if i >= len(chosen):
            named.append(n)
            continue
        lo, hi = res.interval[i, 0].tolist() if res.interval is not None else (math.nan,) * 2
        named.append(
            replace(
                n,
                steer=Estimate(float(res.induced[i, 0]), lo, hi, len(scores.questions)),
                steer_coherence=float(res.coherence[i, 0])
                if res.coherence is not None
                else math.nan,
                steer_p=empirical_p_value(float(res.induced[i, 0]), rand)
                if len(randoms)
                else math.nan,
            )
        )
    return replace(
        lens,
        named=tuple(named),
        steer_alpha=alpha,
        random_steer=tuple(float(x) for x in rand),
        random_latents=tuple(randoms),
    )


__all__ = [
    "LatentChange",
    "LatentLens",
    "LatentPair",
    "NamedLatent",
    "latent_lens",
    "steer_latents",
]
