"""The study's SAE on the tiny random Llama: the corpus rows are the model's own activations,
each token prefix once and never the attention sink; an SAE is trained once and then read from
the cache; a user's SAE is read at its own site, and one that does not fit is refused."""

from __future__ import annotations

import pytest
import torch
from test_extract_sae import save_tiny_sae

import mci_interp.analysis.dictionary as dictionary
from mci_interp.activations import encode_all
from mci_interp.analysis.dictionary import (
    SaeSource,
    corpus_rows,
    default_sae_config,
    sae_corpus,
    study_sae,
)
from mci_interp.datasets import chat
from mci_interp.sites import Site


def _examples():
    return [
        chat("What is a good name for a cat?"),
        chat("What is a good name for a cat?", "Whiskers."),  # the same prompt, then an answer
        chat("How do I boil an egg?"),
    ]


def test_corpus_rows_are_the_models_activations_each_prefix_once_and_no_sink(tiny_model):
    site = Site(1)
    exs = _examples()
    rows = corpus_rows(tiny_model, exs, site)
    encs = encode_all(tiny_model, exs, "all")
    assert 0 not in rows.where[:, 1].tolist()  # the first token (the attention sink) is left out
    # the second example repeats the first one's prompt: only its answer tokens are new
    second = rows.where[rows.where[:, 0] == 1, 1].tolist()
    assert second == list(range(len(encs[0].ids), len(encs[1].ids)))
    # every kept row is the model's activation at that token in a direct forward pass
    for k in (0, 1, 2):
        ids = torch.tensor([encs[k].ids])
        acts = tiny_model.run_to_sites(ids, torch.ones_like(ids), [site])[site][0].float()
        mine = rows.where[:, 0] == k
        torch.testing.assert_close(rows.acts[mine], acts[rows.where[mine, 1]])
    prefixes = {tuple(rows.ids[e][: t + 1]) for e, t in rows.where.tolist()}
    assert len(prefixes) == rows.acts.shape[0]  # distinct prefixes, so distinct rows


def test_the_corpus_spans_chat_questions_personas_and_domains():
    exs = sae_corpus(n_per_domain=2)
    groups = [ex.group or "" for ex in exs]
    for part in ("general:", "neutral:", ":aligned", ":misaligned", ":persona", ":helpful"):
        assert any(part in g for g in groups), part
    assert sum(g.startswith("medical:misaligned:") for g in groups) == 2
    assert len({str(ex.to_dict()["messages"]) for ex in exs}) == len(exs)  # no conversation twice


def test_an_sae_is_trained_once_then_read_from_the_cache(tiny_model, tmp_path, monkeypatch):
    site = Site(1)
    cfg = default_sae_config(
        tiny_model.d_model, site, model=tiny_model.name, training_samples=4096, expansion=2
    ).replace(batch_size=256)
    exs = sae_corpus(n_per_domain=1)[:60]
    a = study_sae(tiny_model, site, config=cfg, corpus=exs, cache_dir=tmp_path)
    assert a.d_sae == 2 * tiny_model.d_model and a.site == site
    assert {"explained_variance", "l0", "dead_fraction", "train_fvu"} <= set(a.quality)
    assert len(a.contexts) == a.d_sae and any("[[" in t for c in a.contexts for t, _ in c)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(dictionary, "train_sae", no_training)
    b = study_sae(tiny_model, site, config=cfg, corpus=exs, cache_dir=tmp_path)
    assert torch.equal(a.sae.W_dec, b.sae.W_dec) and a.quality == b.quality
    assert a.contexts == b.contexts
    # another config is another SAE
    with pytest.raises(AssertionError, match="trained again"):
        study_sae(tiny_model, site, config=cfg.replace(seed=1), corpus=exs, cache_dir=tmp_path)


def test_a_users_sae_is_read_at_its_own_site_and_refused_where_it_does_not_fit(
    tiny_model, tmp_path
):
    save_tiny_sae(
        tmp_path / "mine", d_in=tiny_model.d_model, d_sae=16, hook="blocks.1.hook_resid_post"
    )
    exs = _examples()
    s = study_sae(
        tiny_model, source=SaeSource(path=str(tmp_path / "mine")), corpus=exs, cache_dir=tmp_path
    )
    assert s.site == Site(1) and "local sae-lens directory" in s.source
    assert "train_fvu" not in s.quality and "explained_variance" in s.quality
    with pytest.raises(ValueError, match="blocks.1.hook_resid_post"):
        study_sae(tiny_model, Site(0), source=SaeSource(path=str(tmp_path / "mine")), corpus=exs)
    save_tiny_sae(tmp_path / "wide", d_in=8, d_sae=16)
    with pytest.raises(ValueError, match="d_in=8"):
        study_sae(tiny_model, source=SaeSource(path=str(tmp_path / "wide")), corpus=exs)
    with pytest.raises(ValueError, match="release and sae_id"):
        SaeSource(release="gemma-scope")


def test_the_packaged_smollm2_sae_config_is_the_studys_default():
    from pathlib import Path

    from mci_interp.analysis.config import StudyConfig
    from mci_interp.extract.sae import SaeTrainConfig

    path = Path(__file__).resolve().parents[2] / "sae_configs" / "smollm2_l15_batchtopk.yaml"
    cfg = StudyConfig()
    default = default_sae_config(
        576,
        Site(15),
        model="smollm2-135m-instruct",
        training_samples=cfg.sae_training_samples,
        expansion=cfg.sae_expansion,
    )
    assert SaeTrainConfig.from_yaml(path) == default


def test_the_study_sae_of_a_bf16_model_trains_in_float32_on_its_device(tiny_dir, tmp_path):
    from mci_interp.models import load_model

    model = load_model(str(tiny_dir), dtype="bfloat16")
    site = Site(1)
    cfg = default_sae_config(
        model.d_model, site, model=model.name, training_samples=2048, expansion=2
    ).replace(batch_size=256)
    s = study_sae(
        model, site, config=cfg, corpus=sae_corpus(n_per_domain=1)[:30], cache_dir=tmp_path
    )
    assert s.sae.W_dec.dtype == torch.float32 and s.sae.W_dec.device == model.device
    assert all(v == v for v in s.quality.values())  # no NaN from bf16 rows
