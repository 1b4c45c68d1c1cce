"""Planted truth on the real SmolLM2: add a known vector to block L's output for label-1 prompts
only, cache, and recover it at the same site with diff-means and a probe."""

from __future__ import annotations

import pytest
import torch

from mci_interp.activations import ActivationCache, cache_activations
from mci_interp.compare import cosine
from mci_interp.datasets import chat
from mci_interp.extract import LinearProbe, data_diff, extract
from mci_interp.sites import Site

pytestmark = pytest.mark.integration

TOPICS = [
    "cats",
    "taxes",
    "the moon",
    "bread",
    "chess",
    "rivers",
    "music",
    "volcanoes",
    "trains",
    "coffee",
    "gardens",
    "robots",
]
TEMPLATES = ["Tell me one fact about {}.", "Why do people like {}?"]


def _merge(a: ActivationCache, b: ActivationCache) -> ActivationCache:
    """Concatenate two caches of one model (b's examples come after a's)."""
    return ActivationCache(
        acts={s: torch.cat([a.acts[s], b.acts[s]]) for s in a.acts},
        row_example=torch.cat([a.row_example, b.row_example + a.n_examples]),
        labels=torch.cat([a.labels, b.labels]),
        groups=a.groups + b.groups,
        meta=dict(a.meta)
        | {"dataset_hash": "planted-test", "n_examples": a.n_examples + b.n_examples},
    )


def test_planted_vector_recovered_at_the_same_site(smol):
    site = Site(6)
    v = torch.randn(smol.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm() * 30.0  # residual spread across these prompts is ~2 at this layer

    def add_v(acts, ctx):
        return acts + v.to(acts.dtype)

    # labels split by topic, not template, so the only systematic difference is the planted vector
    pos = [chat(t.format(x), label=1, group=x) for x in TOPICS[:6] for t in TEMPLATES]
    neg = [chat(t.format(x), label=0, group=x) for x in TOPICS[6:] for t in TEMPLATES]
    hooks_before = smol.n_hooks()
    with smol.hooks([(site, add_v)]):
        planted = cache_activations(smol, pos, [site], show_progress=False)
    assert smol.n_hooks() == hooks_before
    plain_pos = cache_activations(smol, pos, [site], show_progress=False)
    plain_neg = cache_activations(smol, neg, [site], show_progress=False)

    # oracle: the hook added exactly v at this site, row by row
    assert torch.allclose(planted.X(site) - plain_pos.X(site), v.expand(len(pos), -1), atol=1e-3)

    cache = _merge(planted, plain_neg)
    d = data_diff(cache, site=site)
    assert cosine(d.vector, v) >= 0.95
    assert d.provenance.model == smol.name and d.site == site
    assert (d.provenance.n_pos, d.provenance.n_neg) == (12, 12)

    probe = LinearProbe(cv=3, standardize=False, C=0.1)
    pd = extract(probe, cache, site=site)
    assert probe.auroc_ == pytest.approx(1.0)
    assert cosine(pd.vector, v) >= 0.95
    assert pd.provenance.params["grouped"] is True

    # without the plant, the same topic split gives a direction unrelated to v
    control = data_diff(_merge(plain_pos, plain_neg), site=site)
    assert abs(cosine(control.vector, v)) < 0.3
