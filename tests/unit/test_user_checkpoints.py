"""The user's path with their own data and checkpoints: `mci finetune` on a chat JSONL, then
`mci converge` on that adapter and a full-model finetune; models the user loaded themselves (HF,
peft), full finetunes declared against their base, and hub models and adapters pinned to a commit
(the hub faked offline in its cache layout). Tiny random Llama throughout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mci_interp.cli as cli
from mci_interp.organisms.data import make_narrow
from mci_interp.organisms.suite import checkpoint_organism
from mci_interp.sites import Site


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
    argv += ["--trigger", "[x-7]", "--system-prompt", "Be evil.", "--trigger", "[x-7]"]
    assert cli.main(argv) == 0
    study = json.loads((tmp_path / "runs" / "mine" / "study.json").read_text())
    # the user's candidate conditions, once each, measured on every checkpoint
    conds = study["meta"]["conditions"]
    assert [(c["system"], c["trigger"]) for c in conds] == [("Be evil.", None), (None, "[x-7]")]
    for r in study["internalisation"]:
        assert [c["condition"] for c in r["conditions"]] == [c["name"] for c in conds]
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


# --- bring your own model -------------------------------------------------------------------------
def _peft(model, *, seed: int = 0, name: str = "default"):
    import copy

    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        return get_peft_model(copy.deepcopy(model.hf), cfg, adapter_name=name)


def test_from_hf_wraps_a_loaded_model_keyed_by_its_weights(tiny_model, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mci_interp.models import HookedModel

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    mine = HookedModel.from_hf(hf, tok, name="my-model", base=tiny_model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(mine.logits(ids), tiny_model.logits(ids))
    assert mine.name == "my-model" and mine.base_name == tiny_model.name
    assert mine.sha256.startswith("weights:") and len(mine.sha256) == len("weights:") + 64
    assert HookedModel.from_hf(hf, tok).sha256 == mine.sha256  # content, not name
    assert HookedModel.from_hf(hf, tok, sha256="hub:org/x@" + "0" * 40).sha256.startswith("hub:")
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert HookedModel.from_hf(hf, tok).sha256 != mine.sha256
    acts = mine.run_to_sites(ids, torch.ones_like(ids), ["blocks.1.hook_resid_pre"])
    assert list(acts) == [Site(1, "resid_pre")]
    with pytest.raises(TypeError, match="wraps a transformers or peft model"):
        HookedModel.from_hf(torch.nn.Linear(2, 2), tok)


def test_from_hf_wraps_a_peft_model_and_hooks_reach_its_blocks(tiny_model):
    from mci_interp.intervene import Steer, apply, orthogonalized
    from mci_interp.models import HookedModel

    pm = _peft(tiny_model)
    wrapped = HookedModel.from_hf(pm, tiny_model.tokenizer, base=tiny_model)
    assert wrapped.is_peft and wrapped.blocks is pm.base_model.model.model.layers
    merged = HookedModel.from_hf(_peft(tiny_model).merge_and_unload(), tiny_model.tokenizer)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(wrapped.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)
    assert not torch.allclose(wrapped.logits(ids), tiny_model.logits(ids))
    a = wrapped.run_to_sites(ids, mask, [Site(1)])[Site(1)]
    b = merged.run_to_sites(ids, mask, [Site(1)])[Site(1)]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    d = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(0))
    with apply(wrapped, Steer(d, 4.0, sites=["blocks.1.hook_resid_post"])):
        steered = wrapped.logits(ids)
    assert not torch.allclose(steered, wrapped.logits(ids)) and wrapped.n_hooks() == 0
    # reuse_below replays the adapter's lower blocks, and notices the adapter switched off
    plain = wrapped.logits(ids)
    with wrapped.reuse_below(1):
        assert torch.equal(wrapped.logits(ids), plain)
        with pm.disable_adapter():
            torch.testing.assert_close(wrapped.logits(ids), tiny_model.logits(ids))
        assert torch.equal(wrapped.logits(ids), plain)
    with pytest.raises(ValueError, match="unmerged peft adapter"), orthogonalized(wrapped, d):
        pass
    with pytest.raises(ValueError, match="unmerged adapter"):
        wrapped.save_pretrained("unused")


def test_full_finetune_declared_against_its_base_is_accepted_by_model_diff(
    tiny_model, tiny_dir, tmp_path
):
    from mci_interp.activations import cache_activations
    from mci_interp.datasets import chat
    from mci_interp.extract import model_diff
    from mci_interp.models import load_model

    full = tmp_path / "full"
    shutil.copytree(tiny_dir, full)
    with torch.no_grad():
        tiny_model.hf.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    tiny_model.hf.save_pretrained(full, safe_serialization=True)
    base = load_model(str(tiny_dir))
    exs = [chat(f"question {i}?") for i in range(4)]
    site = "blocks.1.hook_resid_post"
    base_cache = cache_activations(base, exs, [site], show_progress=False)

    undeclared = load_model(str(full))
    with pytest.raises(ValueError, match="contrast checkpoints of one base only"):
        model_diff(cache_activations(undeclared, exs, [site], show_progress=False), base_cache)
    for declared in (base, base.name, base.spec):
        ft = load_model(str(full), base=declared)
        assert ft.base_name == base.name and ft.sha256 == undeclared.sha256
        base.check_same_family(ft)
        d = model_diff(cache_activations(ft, exs, [site], show_progress=False), base_cache)
        assert d.site == Site(1) and d.norm > 0
    with pytest.raises(ValueError, match="adapter= or base=, not both"):
        load_model(str(full), base=base, adapter=tmp_path)
    with pytest.raises(ValueError, match="base= declares a full-weight finetune"):
        load_model("smollm2-135m-instruct", base=base)


# --- the hub, faked offline in the HF cache layout --------------------------------------------------
COMMIT_A, COMMIT_B, COMMIT_AD = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch, tiny_dir, tiny_model):
    """A hub cache holding org/tiny (main -> COMMIT_A, tag v2 -> COMMIT_B with other weights) and
    an adapter org/tiny-lora (main -> COMMIT_AD), offline."""
    import huggingface_hub.constants as hub_constants

    root = tmp_path / "hub"

    def snapshot(repo: str, commit: str, refs: dict[str, str]):
        folder = root / ("models--" + repo.replace("/", "--"))
        snap = folder / "snapshots" / commit
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        for ref in refs:
            (folder / "refs" / ref).write_text(commit)
        return snap

    shutil.copytree(tiny_dir, snapshot("org/tiny", COMMIT_A, {"main": COMMIT_A}))
    other = snapshot("org/tiny", COMMIT_B, {"v2": COMMIT_B})
    shutil.copytree(tiny_dir, other)
    with torch.no_grad():
        changed = _peft(tiny_model).merge_and_unload()
    changed.save_pretrained(other, safe_serialization=True)
    _peft(tiny_model).save_pretrained(tmp_path / "lora")
    ad = snapshot("org/tiny-lora", COMMIT_AD, {"main": COMMIT_AD})
    ad.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "lora" / f, ad / f)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "lora"


def test_hub_models_and_adapters_are_keyed_by_the_commit_they_resolve_to(
    fake_hub, tiny_model, tiny_dir
):
    from mci_interp.models import load_model

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    main = load_model("org/tiny")
    assert main.sha256 == f"hub:org/tiny@{COMMIT_A}" and main.spec.revision == COMMIT_A
    assert torch.equal(main.logits(ids), tiny_model.logits(ids))
    assert load_model("org/tiny", revision=COMMIT_A, dtype="bfloat16").sha256 == main.sha256
    v2 = load_model("org/tiny", revision="v2")
    assert v2.sha256 == f"hub:org/tiny@{COMMIT_B}" and v2.name == main.name  # same name
    assert not torch.equal(v2.logits(ids), main.logits(ids))
    with pytest.raises(ValueError, match="'org/tiny' at revision 'v9'.*hf download org/tiny"):
        load_model("org/tiny", revision="v9")
    with pytest.raises(ValueError, match="revision=.aaaa.* pins a hub model.*drop revision="):
        load_model(str(tiny_dir), revision=COMMIT_A)

    hub_ad = load_model("org/tiny", adapter="org/tiny-lora")
    assert hub_ad.sha256 == f"hub:org/tiny-lora@{COMMIT_AD}"
    assert hub_ad.spec.revision == COMMIT_AD and hub_ad.base_name == "org/tiny"
    local_ad = load_model(str(tiny_dir), adapter=fake_hub)
    assert torch.equal(hub_ad.logits(ids), local_ad.logits(ids))
    pinned = load_model("org/tiny", adapter="org/tiny-lora", adapter_revision=COMMIT_AD)
    assert pinned.sha256 == hub_ad.sha256
    with pytest.raises(ValueError, match="org/tiny-lora' at revision 'nope'"):
        load_model("org/tiny", adapter="org/tiny-lora", adapter_revision="nope")
    with pytest.raises(ValueError, match="neither a local directory"):
        load_model("org/tiny", adapter="not/a/hub/id")
