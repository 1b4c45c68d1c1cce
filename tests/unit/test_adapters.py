"""LoRA adapters of one base share its weights (``base.load_adapter`` / ``with base.adapter``):
nothing of the base is copied, each adapter gives its merged model's logits up to float
rounding, and the base is exactly itself again after every block, an exception, and unload."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from conftest import TINY
from torch import nn

from mci_interp.models import HookedModel, load_model, merge_adapter
from mci_interp.organisms.suite import (
    Organism,
    OrganismSpec,
    checkpoint_organism,
)
from mci_interp.organisms.weights import load_organism, organism_model
from mci_interp.sites import Site

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3]])
MASK = torch.ones_like(IDS)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference, relative to the largest value (unmerged ``W x + s B A x`` against
    merged ``(W + s B A) x``)."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _save_adapters(base: HookedModel, root, n: int = 3, *, targets="all-linear") -> list:
    """``n`` random LoRA adapters of ``base`` (B not zero), rank 4, saved as safetensors."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        pm = get_peft_model(copy.deepcopy(base.hf).float(), cfg)
        d = root / f"ad{i}"
        pm.save_pretrained(d)
        dirs.append(d)
    return dirs


def _tree(model: HookedModel) -> list[tuple[str, int, type]]:
    return [(n, id(m), type(m)) for n, m in model.hf.named_modules()]


def _storages(model: HookedModel) -> dict[str, tuple[int, int]]:
    return {
        n: (p.data_ptr(), p.untyped_storage().data_ptr()) for n, p in model.hf.named_parameters()
    }


@pytest.fixture(params=["float32", "bfloat16"])
def base_and_adapters(request, tiny_dir, tmp_path):
    base = load_model(str(tiny_dir), dtype=request.param)
    return base, _save_adapters(base, tmp_path)


def test_three_adapters_share_the_base_weights(base_and_adapters):
    base, dirs = base_and_adapters
    before, tree, keys = _storages(base), _tree(base), list(base.hf.state_dict())
    n_base = sum(p.numel() for p in base.hf.parameters())
    ref = base.logits(IDS, MASK)
    names = [base.load_adapter(d) for d in dirs]
    assert names == ["ad0", "ad1", "ad2"] and base.adapters.names == tuple(names)
    # outside a block the base is the base: same modules, tensors, keys and logits
    assert _storages(base) == before and _tree(base) == tree
    assert list(base.hf.state_dict()) == keys
    assert torch.equal(base.logits(IDS, MASK), ref)
    lora = {}
    for name in names:
        with base.adapter(name) as org:
            params = dict(org.hf.named_parameters())
            lora = {n: p for n, p in params.items() if "lora_" in n}
            # every base tensor is the base's own (no copy), the rest are the LoRA matrices
            shared = {n: p for n, p in params.items() if "lora_" not in n}
            ptrs = {p.data_ptr() for p in shared.values()}
            assert ptrs == {p for p, _ in before.values()}
            assert len(shared) == len(before)
            assert sum(p.numel() for p in shared.values()) == n_base
    n_lora = sum(p.numel() for p in lora.values())  # all three adapters' matrices
    rank4 = sum(4 * (m.in_features + m.out_features) for m in _linears(base))
    assert n_lora == 3 * rank4
    # the adapters' own weights stay float32 (peft's default), whatever the base's dtype
    assert {p.dtype for p in lora.values()} == {torch.float32}


def _linears(base: HookedModel) -> list[nn.Linear]:
    return [m for b in base.blocks for m in b.modules() if isinstance(m, nn.Linear)]


def test_each_adapter_gives_its_merged_models_logits(base_and_adapters, tiny_dir):
    """float32: the merged model's logits and activations within 1e-5 (relative). bfloat16:
    the merged bf16 model is itself a rounding of the float32 one; the unmerged adapter is no
    further from the float32 merged model than 1.5x that rounding (peft keeps the adapter's
    matrices in float32, so it is usually closer)."""
    base, dirs = base_and_adapters
    merged = [merge_adapter(base, d) for d in dirs]
    want = [m.logits(IDS, MASK) for m in merged]
    acts = [m.run_to_sites(IDS, MASK, [1])[Site(1)] for m in merged]
    if base.dtype == torch.float32:
        ref, tol = want, [1e-5] * len(dirs)
    else:
        base32 = load_model(str(tiny_dir))
        ref = [merge_adapter(base32, d).logits(IDS, MASK) for d in dirs]
        tol = [max(1.5 * _rel(w, r), 1e-3) for w, r in zip(want, ref, strict=True)]
    names = [base.load_adapter(d) for d in dirs]
    for _ in range(2):  # switch back and forth
        for i, name in enumerate(names):
            with base.adapter(name) as org:
                assert _rel(org.logits(IDS, MASK), ref[i]) <= tol[i]
                m = merged[i]
                assert org.sha256 == m.sha256 and org.name == m.name and org.is_peft
                assert org.base_name == base.name and org.dtype == base.dtype
                # the decoder path (activations, the scorers' head) carries the adapter too
                got = org.run_to_sites(IDS, MASK, [1])[Site(1)]
                assert _rel(got, acts[i]) <= (1e-5 if base.dtype == torch.float32 else 5e-2)
    # the adapters differ from each other far beyond those tolerances
    assert min(_rel(w, want[0]) for w in want[1:]) > 5 * max(tol)


def test_exit_and_exceptions_restore_the_base_exactly(base_and_adapters):
    base, dirs = base_and_adapters
    ref, tree, n_hooks = base.logits(IDS, MASK), _tree(base), base.n_hooks()
    name = base.load_adapter(dirs[0])
    with base.adapter(name) as org:
        assert not torch.equal(org.logits(IDS, MASK), ref)
        with pytest.raises(RuntimeError, match="serving adapter 'ad0'"):
            base.logits(IDS, MASK)
        with pytest.raises(RuntimeError, match="one adapter at a time"), base.adapter(name):
            pass
    assert torch.equal(base.logits(IDS, MASK), ref) and _tree(base) == tree
    with pytest.raises(RuntimeError, match="closed when its with-block ended"):
        org.logits(IDS, MASK)
    with pytest.raises(ZeroDivisionError), base.adapter(name) as org:
        org.logits(IDS, MASK)
        raise ZeroDivisionError
    assert torch.equal(base.logits(IDS, MASK), ref) and _tree(base) == tree
    assert base.n_hooks() == n_hooks and base.adapters.active is None
    with (
        pytest.raises(KeyError, match="no adapter named 'nope'.*loaded: ad0"),
        base.adapter("nope"),
    ):
        pass


def test_unload_restores_the_original_modules(base_and_adapters):
    base, dirs = base_and_adapters
    types = {n: type(m) for n, m in base.hf.named_modules()}
    tree, before, ref = _tree(base), _storages(base), base.logits(IDS, MASK)
    for d in dirs:
        base.load_adapter(d)
    with base.adapter("ad1") as org:
        assert any("lora" in type(m).__module__ for m in org.hf.modules())
    base.unload_adapters()
    assert {n: type(m) for n, m in base.hf.named_modules()} == types
    assert _tree(base) == tree and _storages(base) == before
    assert not hasattr(base.hf, "peft_config") and base.adapters.names == ()
    assert torch.equal(base.logits(IDS, MASK), ref)
    # and loading again works from scratch
    assert base.load_adapter(dirs[2]) == "ad2"
    base.adapters.delete("ad2")  # the last one: unloads peft
    assert _tree(base) == tree and not hasattr(base.hf, "peft_config")


def test_loading_is_idempotent_and_names_are_checked(tiny_model, tiny_dir, tmp_path):
    dirs = _save_adapters(tiny_model, tmp_path, 2)
    a = tiny_model.load_adapter(dirs[0])
    assert tiny_model.load_adapter(dirs[0]) == a and len(tiny_model.adapters) == 1
    assert tiny_model.adapters.find(dirs[0]) == a and tiny_model.adapters.find(dirs[1]) is None
    with pytest.raises(ValueError, match="already loaded as 'ad0'"):
        tiny_model.load_adapter(dirs[0], name="other")
    with pytest.raises(ValueError, match="named 'ad0' is already loaded"):
        tiny_model.load_adapter(dirs[1], name="ad0")
    with pytest.raises(ValueError, match="letters, digits"):
        tiny_model.load_adapter(dirs[1], name="a.b")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        tiny_model.load_adapter(tmp_path)
    # an adapter of another width is refused and leaves the base as it was, whether it is the
    # first adapter (peft was not there yet) or a later one
    other = load_model(str(_wider(tmp_path, tiny_dir)))
    (bad,) = _save_adapters(other, tmp_path / "wide", 1)
    ref = tiny_model.logits(IDS, MASK)
    with pytest.raises(ValueError, match="does not fit base"):
        tiny_model.load_adapter(bad)
    assert tiny_model.adapters.names == (a,)
    assert torch.equal(tiny_model.logits(IDS, MASK), ref)
    fresh = load_model(str(tiny_dir))
    tree = _tree(fresh)
    with pytest.raises(ValueError, match="does not fit base"):
        fresh.load_adapter(bad)
    assert _tree(fresh) == tree and not hasattr(fresh.hf, "peft_config")
    assert torch.equal(fresh.logits(IDS, MASK), ref) and fresh.adapters.names == ()
    assert fresh.load_adapter(dirs[1]) == "ad1"
    with tiny_model.adapter(a) as org:
        with pytest.raises(RuntimeError, match="cannot load an adapter while"):
            tiny_model.load_adapter(dirs[1])
        with pytest.raises(ValueError, match="load adapters onto the base"):
            org.load_adapter(dirs[1])


def _wider(tmp_path, tiny_dir):
    """A base of another width (32) than the tiny model's (64)."""
    from mci_interp.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path / "wide_base", hidden_size=32, intermediate_size=48)


def test_reuse_below_notices_adapter_switches(tiny_model, tmp_path):
    dirs = _save_adapters(tiny_model, tmp_path, 2)
    names = [tiny_model.load_adapter(d) for d in dirs]
    ref = tiny_model.logits(IDS, MASK)
    want = {}
    for n in names:
        with tiny_model.adapter(n) as org:
            want[n] = org.logits(IDS, MASK)
    with tiny_model.reuse_below(1):
        assert torch.equal(tiny_model.logits(IDS, MASK), ref)
        for n in (*names, *names):
            with tiny_model.adapter(n) as org:
                assert torch.equal(org.logits(IDS, MASK), want[n])
            assert torch.equal(tiny_model.logits(IDS, MASK), ref)
    # and an adapter's own reuse_below sees peft's disable_adapter
    with tiny_model.adapter(names[0]) as org, org.reuse_below(1):
        assert torch.equal(org.logits(IDS, MASK), want[names[0]])
        with org.hf.disable_adapter():
            assert torch.equal(org.logits(IDS, MASK), ref)
        assert torch.equal(org.logits(IDS, MASK), want[names[0]])
    with tiny_model.reuse_below(1), pytest.raises(ValueError, match="inside reuse_below"):
        tiny_model.load_adapter(tmp_path / "ad0", name="again")


def test_a_base_with_adapters_loaded_keeps_every_tool(tiny_model, tmp_path):
    """Hooks, orthogonalized, saving, a merged copy and TransformerLens all see the plain base
    outside a block; an adapter's model refuses what would miss or damage its adapter."""
    from mci_interp.intervene import Steer, apply, orthogonalized
    from mci_interp.models import to_hooked_transformer

    (d,) = _save_adapters(tiny_model, tmp_path, 1)
    direction = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(0))
    steer = Steer(direction, 3.0, sites=[1])
    ref = tiny_model.logits(IDS, MASK)
    with apply(tiny_model, steer):
        steered = tiny_model.logits(IDS, MASK)
    with orthogonalized(tiny_model, direction):
        ortho = tiny_model.logits(IDS, MASK)
    name = tiny_model.load_adapter(d)
    with apply(tiny_model, steer):
        assert torch.equal(tiny_model.logits(IDS, MASK), steered)
    with orthogonalized(tiny_model, direction):
        assert torch.equal(tiny_model.logits(IDS, MASK), ortho)
    assert torch.equal(tiny_model.logits(IDS, MASK), ref)
    ht = to_hooked_transformer(tiny_model)
    torch.testing.assert_close(ht(IDS).float(), ref, atol=1e-4, rtol=0)
    copy_ = merge_adapter(tiny_model, d)  # a merged copy, of the plain base
    assert not any("lora" in type(m).__module__ for m in copy_.hf.modules())
    tiny_model.save_pretrained(tmp_path / "saved")
    assert torch.equal(load_model(str(tmp_path / "saved")).logits(IDS, MASK), ref)
    with tiny_model.adapter(name) as org:
        with apply(org, steer):  # interventions hook the adapter's model as any other
            assert not torch.equal(org.logits(IDS, MASK), steered)
        with pytest.raises(ValueError, match="merge_adapter"), orthogonalized(org, direction):
            pass
        with pytest.raises(ValueError, match="merge_adapter"):
            to_hooked_transformer(org)
        with pytest.raises(ValueError, match="merge_adapter"):
            org.save_pretrained(tmp_path / "nope")
        with pytest.raises(RuntimeError, match="serving adapter"):
            merge_adapter(tiny_model, d)


def test_user_gradients_are_kept(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir)
    hf.requires_grad_(True)
    base = HookedModel.from_hf(hf, AutoTokenizer.from_pretrained(tiny_dir), sha256="x")
    (d,) = _save_adapters(base, tmp_path, 1)
    name = base.load_adapter(d)
    assert all(p.requires_grad for p in base.hf.parameters())
    with base.adapter(name) as org:
        assert not any(p.requires_grad for n, p in org.hf.named_parameters() if "lora_" in n)


def test_organism_model_shares_the_base_and_keys_like_the_merged_copy(tiny_model, tmp_path):
    dirs = _save_adapters(tiny_model, tmp_path, 2)
    spec = OrganismSpec(
        name="narrow-medical-s0", kind="narrow", domain="medical", n_examples=4, config=TINY
    )
    narrow = Organism(name=spec.name, spec=spec, adapter_dir=dirs[0])
    user = checkpoint_organism(dirs[1], label="medical", kind="control")
    base_o = Organism(name="base", spec=OrganismSpec(name="base", kind="base"))
    ref, tree = tiny_model.logits(IDS, MASK), _tree(tiny_model)
    with organism_model(tiny_model, base_o) as m:
        assert m is tiny_model
    for org in (narrow, user):
        merged = load_organism(tiny_model, org)  # the standalone merged copy, as before
        with organism_model(tiny_model, org) as m:
            assert m is not tiny_model and m.hf.get_base_model() is tiny_model.hf
            assert _rel(m.logits(IDS, MASK), merged.logits(IDS, MASK)) <= 1e-5
            assert (m.sha256, m.name, m.spec.source) == (merged.sha256, merged.name, "lora")
            assert tiny_model.adapters.names == (org.key,)
        # loaded for the block only: the base is bare again
        assert tiny_model.adapters.names == () and _tree(tiny_model) == tree
        assert torch.equal(tiny_model.logits(IDS, MASK), ref)
    # a preloaded adapter is used as it is, and stays
    name = tiny_model.load_adapter(dirs[0], name="mine")
    with organism_model(tiny_model, narrow) as m:
        assert tiny_model.adapters.active == "mine"
    with pytest.raises(ZeroDivisionError), organism_model(tiny_model, user):
        raise ZeroDivisionError
    assert tiny_model.adapters.names == (name,)
    assert torch.equal(tiny_model.logits(IDS, MASK), ref)
    # a full-weight checkpoint is loaded on its own
    full = tmp_path / "full"
    with torch.no_grad():
        merge_adapter(tiny_model, dirs[1]).save_pretrained(full)
    full_o = checkpoint_organism(full, label="medical")
    with organism_model(tiny_model, full_o) as m:
        assert m.hf is not tiny_model.hf and m.sha256 != tiny_model.sha256
    missing = Organism(name=spec.name, spec=spec, adapter_dir=tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="missing"), organism_model(tiny_model, missing):
        pass
    with (
        pytest.raises(ValueError, match="no adapter"),
        organism_model(tiny_model, Organism(name=spec.name, spec=spec)),
    ):
        pass


COMMIT = "c" * 40


def test_hub_adapters_load_by_id_and_key_on_the_commit(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    (d,) = _save_adapters(tiny_model, tmp_path, 1)
    repo = tmp_path / "hub" / "models--org--em-lora"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(d / f, snap / f)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    local = tiny_model.load_adapter(d)
    hub = tiny_model.load_adapter("org/em-lora")
    assert hub == "em-lora" and tiny_model.load_adapter("org/em-lora", revision=COMMIT) == hub
    info = tiny_model.adapters.info(hub)
    assert info.sha256 == f"hub:org/em-lora@{COMMIT}" and info.spec.revision == COMMIT
    assert tiny_model.adapters.find("org/em-lora") == hub
    with tiny_model.adapter(local) as a:
        want = a.logits(IDS, MASK)
    with tiny_model.adapter(hub) as h:
        assert torch.equal(h.logits(IDS, MASK), want) and h.sha256 == info.sha256
    with pytest.raises(ValueError, match="at revision 'nope'"):
        tiny_model.load_adapter("org/em-lora", revision="nope")
