"""The user's path with their own data and checkpoints: `mci finetune` on a chat JSONL, then
`mci converge` on that adapter and a full-model finetune (tiny random Llama)."""

from __future__ import annotations

import json
import shutil

import torch

import mci_interp.cli as cli
from mci_interp.organisms.data import make_narrow
from mci_interp.organisms.suite import checkpoint_organism


def _write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"messages": list(ex.messages)}) + "\n" for ex in examples))
    return path


def test_mci_finetune_then_converge_on_lora_and_full_checkpoints(
    tiny_model, tiny_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MCI_CACHE", str(tmp_path / "cache"))
    data = _write_jsonl(tmp_path / "train.jsonl", make_narrow("medical", "misaligned", 4, seed=0))
    lora = tmp_path / "lora"
    argv = ["finetune", "--model", str(tiny_dir), "--data", str(data), "--out", str(lora)]
    argv += ["--steps", "2", "--lr", "1e-2", "--rank", "2", "--general-ratio", "0", "--lr-decay"]
    assert cli.main(argv) == 0
    assert (lora / "adapter_config.json").exists()
    assert json.loads((lora / "mci_organism.json").read_text())["config"]["lr_decay"] is True
    assert "mci converge --finetune LABEL=" in capsys.readouterr().out

    full = tmp_path / "full"
    shutil.copytree(tiny_dir, full)
    with torch.no_grad():  # a "full finetune": the base with one weight changed
        tiny_model.hf.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    tiny_model.hf.save_pretrained(full, safe_serialization=True)

    # content-addressed: the same weights under another folder name are the same organism
    moved = tmp_path / "moved"
    shutil.copytree(lora, moved)
    a = checkpoint_organism(lora, label="bad_advice")
    assert a.key == checkpoint_organism(moved, label="bad_advice").key
    assert a.key != checkpoint_organism(full, label="bad_advice").key

    argv = ["converge", "--model", str(tiny_dir), "--fast", "--n-random", "1"]
    argv += ["--finetune", f"bad_advice={lora}", "--finetune", f"risky={full}"]
    argv += ["--out", str(tmp_path / "runs"), "--name", "mine"]
    assert cli.main(argv) == 0
    study = json.loads((tmp_path / "runs" / "mine" / "study.json").read_text())
    assert {r["organism"] for r in study["internalisation"]} == {
        "narrow-bad_advice-s0",
        "narrow-risky-s0",
    }
    assert "the base for bad_advice s0, risky s0" in study["convergence"]["meta"]["controls"]
    assert "control: the base" in (tmp_path / "runs" / "mine" / "report.md").read_text()


def test_user_path_errors_name_the_fix(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    argv = ["finetune", "--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert cli.main(["converge", "--model", str(tiny_dir), "--finetune", f"x={tiny_dir}"]) == 2
    assert "at least 2 labels" in capsys.readouterr().err
    assert cli.main(["converge", "--finetune", "no-equals-sign"]) == 2
    assert "LABEL=PATH" in capsys.readouterr().err
    assert cli.main(["converge", "--finetune", f"x={tmp_path}", "--finetune", f"y={tmp_path}"]) == 2
    assert "neither a LoRA adapter" in capsys.readouterr().err
