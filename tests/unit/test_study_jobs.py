"""A study split into scheduler jobs: `mci records --job K` for each checkpoint into one shared
records folder, then `mci converge --require-records`, gives the records and the study that one
`mci converge` process gives, and the analysis step computes no record again."""

from __future__ import annotations

import json

import pytest
from conftest import TINY

import mci_interp.analysis.collect as collect_mod
import mci_interp.cli as cli
import mci_interp.cli.study as cli_study
from mci_interp.analysis.study import RecordStore, StudyConfig
from mci_interp.datasets import chat
from mci_interp.organisms.finetune import finetune_lora

CFG = StudyConfig.fast(
    n_neutral_per_theme=1,
    n_questions=3,
    n_gate_questions=3,
    n_indomain=2,
    n_takeover=2,
    takeover_tokens=3,
    n_random=1,
    convergence_layer_step=1,
)


@pytest.fixture()
def checkpoints(tiny_model, tmp_path):
    """Two LoRA finetunes of the tiny model, labelled like two packaged domains."""
    out = {}
    for seed, label in enumerate(("medical", "finance")):
        exs = [chat(f"{label} question {i}?", f"A {label} answer number {i}.") for i in range(4)]
        res = finetune_lora(
            tiny_model,
            exs,
            tmp_path / f"ft-{label}",
            config=TINY.replace(seed=seed),
            general=[],
            show_progress=False,
        )
        out[label] = res.adapter_dir
    return out


def _args(tiny_dir, checkpoints, records):
    args = ["--model", str(tiny_dir), "--records", str(records)]
    for label, path in checkpoints.items():
        args += ["--finetune", f"{label}={path}"]
    return args


_CLOCK = ("created_at", "seconds", "sha256")  # when and how fast it ran (and a checksum of that)


def _timeless(obj):
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k not in _CLOCK}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _store_contents(records_dir):
    """{record key file: (its JSON less the clock, the activations' bytes)} and the causal
    scores, as stored."""
    (root,) = records_dir.glob("records-*")
    recs = {}
    for j in sorted(root.glob("*.json")):
        meta = json.loads(j.read_text())
        acts = (root / meta["acts_file"]).read_bytes() if meta["acts_file"] else None
        recs[j.name] = (_timeless(meta), acts)
    causal = {  # (the interventions' repr shows when their directions were made)
        p.name: json.loads(p.read_text())["score"] for p in sorted((root / "causal").glob("*.json"))
    }
    return recs, causal


def _numbers(path):
    d = _timeless(json.loads(path.read_text()))
    d["timings"] = d["meta"]["records_dir"] = None
    return json.dumps(d, sort_keys=True)


def test_records_jobs_then_analysis_equal_one_process(
    tiny_dir, checkpoints, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli_study, "_study_config", lambda args: CFG)
    one = tmp_path / "one"
    assert cli.main(["converge", *_args(tiny_dir, checkpoints, one), "--out", str(one)]) == 0

    shared = tmp_path / "shared"
    jobs = _args(tiny_dir, checkpoints, shared)
    capsys.readouterr()
    assert cli.main(["records", *jobs, "--list"]) == 0
    assert "2 jobs: --job 0..1" in capsys.readouterr().out
    # the analysis step refuses to start before the jobs ran, naming what is missing
    assert cli.main(["converge", *jobs, "--require-records", "--out", str(shared)]) == 2
    assert "no stored records for ['base', 'narrow-medical-s0'" in capsys.readouterr().err
    for k in (1, 0):  # in any order (a scheduler's), each job on its own
        out = ["--out", str(tmp_path / "jobs"), "--quiet"]
        assert cli.main(["records", *jobs, "--job", str(k), *out]) == 0
    assert len(list((tmp_path / "jobs").glob("*-records/narrow-*-s0/study.json"))) == 2
    assert cli.main(["records", *jobs, "--job", "2"]) == 2
    assert "--job 2 is out of range: 2 checkpoints" in capsys.readouterr().err

    # the analysis step reads every record: it computes none again
    def no_records(*a, **k):
        pytest.fail("the analysis step computed activations")

    monkeypatch.setattr(collect_mod, "cache_activations", no_records)
    monkeypatch.setattr(RecordStore, "put", lambda self, rec: pytest.fail(f"recomputed {rec.name}"))
    argv = ["converge", *jobs, "--require-records", "--out", str(shared)]
    assert cli.main(argv) == 0

    recs_one, causal_one = _store_contents(one)
    recs_jobs, causal_jobs = _store_contents(shared)
    assert recs_jobs.keys() == recs_one.keys() and len(recs_one) >= 6
    assert recs_jobs == recs_one  # byte-identical activations, same scores and generations
    assert causal_jobs == causal_one
    (run_one,) = one.glob("*/study.json")
    (run_jobs,) = shared.glob("*/study.json")
    assert _numbers(run_jobs) == _numbers(run_one)
