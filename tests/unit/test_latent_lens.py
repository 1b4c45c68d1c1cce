"""The SAE lens and the three lenses together on planted truth: a direction every finetune shares
is found by all three lenses; one each domain has alone is found by none of the cross-domain
tests (and is still there within its domain)."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import pytest

from mci_interp.analysis import contrasts
from mci_interp.analysis.convergence import ConvergenceReport, verdict
from mci_interp.analysis.dictionary import StudySae
from mci_interp.analysis.latents import latent_lens
from mci_interp.analysis.lenses import three_lenses
from mci_interp.analysis.probes import probe_lens
from mci_interp.analysis.simulate import planted_study
from mci_interp.extract.sae import SaeTrainConfig, reconstruction_quality, train_sae
from mci_interp.sites import Site
from mci_interp.stats import Estimate

SAE_CONFIGS = Path(__file__).resolve().parents[2] / "sae_configs"
SOME = Estimate(0.1, 0.05, 0.15, 10)  # a misalignment to remove, for the verdict's bookkeeping


@functools.cache
def _study(shared: float, specific: float):
    s = planted_study(shared=shared, specific=specific)
    cfg = SaeTrainConfig.from_yaml(SAE_CONFIGS / "tiny_test.yaml").replace(training_samples=100_000)
    trained = train_sae(s.corpus, cfg, hook_name=Site(0).hook_name)
    sae = StudySae(
        sae=trained.sae,
        site=Site(0),
        source="trained in the test",
        quality=reconstruction_quality(trained.sae, s.corpus),
        contexts=[[("ctx", 1.0)] for _ in range(cfg.d_sae)],
    )
    return s, sae


def _all_lenses(shared: float, specific: float):
    s, sae = _study(shared, specific)
    persona = s.features[:1].double()  # [layers=1, d]
    # the difference-of-means lens as ``contrasts.convergence`` computes it, without the
    # behavioural scores planted records do not have
    lc = contrasts._layer(s.pairs, s.base, persona[0], 0, 0)
    some = {d: SOME for d in s.domains}
    v, reasons = verdict(lc, None, some, above_base=some)
    conv = ConvergenceReport(
        layers=(lc,),
        analysis_layer=0,
        misalignment=some,
        above_base=some,
        transfer=None,
        steer=None,
        verdict=v,
        reasons=reasons,
        d_model=persona.shape[1],
        probes=probe_lens(s.pairs, s.base, layers=[0], analysis_layer=0, n_boot=200),
        latents=latent_lens(s.pairs, s.base, sae, top_k=3, persona=persona[0]),
    )
    return s, sae, conv


def test_the_tiny_sae_learns_the_planted_features():
    s, sae = _study(2.0, 0.0)
    dec = sae.decoder()
    for f in s.features[: 1 + len(s.domains)]:
        assert (dec @ f.double()).max() > 0.9  # one latent per planted feature
    assert sae.quality["explained_variance"] > 0.7


def test_a_shared_direction_is_found_by_all_three_lenses():
    s, sae, conv = _all_lenses(shared=2.0, specific=0.0)
    lens = conv.latents
    assert lens is not None and lens.shares
    assert all(p.overlap >= 1 and p.overlap_p <= 1 - p.level for p in lens.pairs)
    assert all(c.seed_agreement >= 2 for c in lens.changes)  # seeds agree on the shared latents
    # the named latent is the shared feature's, rising in every domain, read out by its decoder
    top = lens.named[0]
    assert lens.named_shared and set(top.domains) == set(s.domains)
    assert float(sae.decoder()[top.latent] @ s.features[0].double()) > 0.9
    assert top.persona_cos > 0.9
    assert all(top.change[d].lo > 0 for d in s.domains)
    tl = three_lenses(conv)
    assert tl.says == {
        "difference of means": "all pairs",
        "probe": "all pairs",
        "SAE latents": "all pairs",
    }
    assert "they agree on" in tl.agreement and "disagree" not in tl.agreement


def test_a_domain_specific_direction_is_found_by_no_cross_domain_test():
    s, sae, conv = _all_lenses(shared=0.0, specific=2.0)
    lens = conv.latents
    assert lens is not None and not lens.shares
    assert not any(p.shared for p in lens.pairs)
    # each domain's own feature is its top rising latent: found within the domain
    dec = sae.decoder()
    for k, d in enumerate(s.domains):
        j = lens.change(d).top[0]
        assert float(dec[j] @ s.features[1 + k].double()) > 0.9
        assert lens.change(d).lo[j] > 0
    assert not lens.named_shared
    tl = three_lenses(conv)
    assert tl.says == {
        "difference of means": "no pair",
        "probe": "no pair",
        "SAE latents": "no pair",
    }
    assert tl.carried_by.startswith("not converged: no lens finds a shared direction")


def test_the_sae_lens_refuses_one_domain_and_a_site_the_records_do_not_hold():
    s, sae = _study(2.0, 0.0)
    with pytest.raises(ValueError, match="compares domains"):
        latent_lens({"d0": s.pairs["d0"]}, s.base, sae)
    wrong = replace(sae, site=Site(0, "mlp_out"))
    with pytest.raises(ValueError, match="resid_post"):
        latent_lens(s.pairs, s.base, wrong)
    with pytest.raises(ValueError, match="top_k"):
        latent_lens(s.pairs, s.base, sae, top_k=0)


def test_the_sae_lens_is_reproducible_and_serialises():
    s, sae = _study(2.0, 0.0)
    a = latent_lens(s.pairs, s.base, sae, top_k=3, n_null=19).to_dict()
    b = latent_lens(s.pairs, s.base, sae, top_k=3, n_null=19).to_dict()
    assert a == b
    assert a["n_null"] == 19 and len(a["pairs"]) == 3 and len(a["rising"]["d0"]) == 3
    assert set(a["quality"]) >= {"explained_variance", "neutral_explained_variance", "neutral_l0"}
