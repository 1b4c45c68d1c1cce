"""SAEs in sae-lens' format: local directories, sae-lens' pretrained registry (faked offline),
hook names as Sites, and training/encoding on the rows' device and dtype (bf16 on the CPU)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mci_interp.compare import cosine
from mci_interp.direction import Direction
from mci_interp.extract import (
    SaeLatents,
    SaeTrainConfig,
    check_sae_fits,
    extract,
    load_sae,
    sae_site,
    train_sae,
)
from mci_interp.sites import Site

SAE_CONFIGS = Path(__file__).resolve().parents[2] / "sae_configs"
HOOK = "blocks.1.hook_resid_post"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dictionary(d_in=16, d_sae=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(d_sae, d_in, generator=g)
    return D / D.norm(dim=1, keepdim=True)


def save_tiny_sae(path: Path, *, d_in=16, d_sae=32, hook=HOOK) -> torch.Tensor:
    """A ReLU SAE whose decoder is a known unit dictionary, saved by sae-lens itself."""
    from sae_lens import StandardSAE, StandardSAEConfig

    D = dictionary(d_in, d_sae)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = "tiny-llama"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(D)
        sae.W_enc.copy_(D.T)
        sae.b_enc.fill_(-0.3)
        sae.b_dec.zero_()
    sae.save_model(path)
    return D


def rows(D: torch.Tensor, n=600, p_plant=0.0, seed=1):
    """Sparse codes on the dictionary; latent 0 fires with probability ``p_plant``."""
    g = torch.Generator().manual_seed(seed)
    on = (torch.rand(n, D.shape[0], generator=g) < 0.05).float()
    codes = on * (0.5 + torch.rand(n, D.shape[0], generator=g))
    codes[:, 0] = (torch.rand(n, generator=g) < p_plant).float() * (1 + torch.rand(n, generator=g))
    return codes @ D + 0.01 * torch.randn(n, D.shape[1], generator=g)


def contrast(D):
    ft, base = rows(D, p_plant=0.6, seed=1), rows(D, p_plant=0.02, seed=2)
    return torch.cat([ft, base]), torch.cat([torch.ones(len(ft)), torch.zeros(len(base))])


def fake_model(d_model=16, n_layers=4):
    return SimpleNamespace(
        name="tiny", d_model=d_model, n_layers=n_layers, device=torch.device("cpu")
    )


# --- local directories -----------------------------------------------------------------------------
def test_local_sae_lens_directory_loads_and_finds_the_planted_latent(tmp_path):
    D = save_tiny_sae(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert torch.equal(sae.W_dec.detach(), D) and sae_site(sae) == Site(1)
    X, y = contrast(D)
    est = SaeLatents.from_disk(tmp_path / "sae", model=fake_model(), site=HOOK, top_k=3).fit(X, y)
    assert int(est.latents_[0]) == 0 and cosine(est.direction_, D[0]) > 0.99
    assert est.get_params()["sae_path"] == str(tmp_path / "sae") and est.hook_name == HOOK
    # the path hyperparameter loads the same SAE lazily, in fit
    lazy = SaeLatents(sae_path=str(tmp_path / "sae"), top_k=3).fit(X, y)
    assert torch.equal(lazy.scores_, est.scores_)
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors missing"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "cfg.json").write_text("{}")
        load_sae(tmp_path / "half")


def test_sae_is_checked_against_the_model_site_and_width(tmp_path):
    save_tiny_sae(tmp_path / "sae")
    with pytest.raises(
        ValueError,
        match=r"hook_name='blocks.1.hook_resid_post', d_in=16.*site 'blocks.2.hook_resid_post'",
    ):
        SaeLatents.from_disk(tmp_path / "sae", site=Site(2))
    with pytest.raises(ValueError, match=r"d_in=16\).*model tiny.*d_model=24"):
        SaeLatents.from_disk(tmp_path / "sae", model=fake_model(d_model=24))
    with pytest.raises(ValueError, match="reads block 1 but the model has 1 blocks"):
        SaeLatents.from_disk(tmp_path / "sae", model=fake_model(n_layers=1))
    X, y = contrast(dictionary())
    est = SaeLatents.from_disk(tmp_path / "sae")
    with pytest.raises(ValueError, match="blocks.1.hook_resid_post.*blocks.3.hook_resid_pre"):
        extract(est, X, y, site="blocks.3.hook_resid_pre")
    assert extract(est, X, y, site=1).site == Site(1)  # a layer number means resid_post
    # hooks that are not whole sites are refused with the reason
    sae = load_sae(tmp_path / "sae")
    sae.cfg.metadata.hook_name = "blocks.1.attn.hook_z"
    with pytest.raises(ValueError, match="blocks.1.attn.hook_z.*not a site"):
        check_sae_fits(sae, site=Site(1))
    sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index = HOOK, 3
    with pytest.raises(ValueError, match="one attention head"):
        sae_site(sae)


def test_sae_against_a_real_tiny_model(tmp_path, tiny_model):
    save_tiny_sae(tmp_path / "sae", d_in=tiny_model.d_model, hook="blocks.1.hook_resid_post")
    est = SaeLatents.from_disk(tmp_path / "sae", model=tiny_model)
    assert est.sae.W_dec.device == tiny_model.device and est.hook_name == HOOK
    save_tiny_sae(tmp_path / "deep", d_in=tiny_model.d_model, hook="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=f"model {tiny_model.name}.*reads block 7"):
        SaeLatents.from_disk(tmp_path / "deep", model=tiny_model)


# --- sae-lens' registry, offline -------------------------------------------------------------------
@pytest.fixture()
def fake_registry(monkeypatch, tmp_path):
    """sae-lens' pretrained-SAE directory holds one toy release, and its Hugging Face downloads
    read a local folder: ``SAE.from_pretrained`` runs its own code end to end, offline."""
    import sae_lens  # noqa: F401  (imports the loading modules patched below)
    from huggingface_hub.utils import EntryNotFoundError
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

    hub = tmp_path / "hub"
    D = save_tiny_sae(hub / "toy" / "saes" / "layer_1")
    lookup = PretrainedSAELookup(
        release="toy-release",
        repo_id="toy/saes",
        model="tiny-llama",
        conversion_func=None,
        saes_map={"layer_1": "layer_1"},
        expected_var_explained={},
        expected_l0={},
        neuronpedia_id={},
        norm_scaling_factor={},
        config_overrides=None,
    )
    downloads: list[str] = []

    def hf_hub_download(repo_id, filename, **kwargs):
        path = hub / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{repo_id}/{filename} not in the fake hub")
        downloads.append(f"{repo_id}/{filename}")
        return str(path)

    for name, module in list(sys.modules.items()):
        if name.startswith("sae_lens"):
            if hasattr(module, "get_pretrained_saes_directory"):
                monkeypatch.setattr(
                    module, "get_pretrained_saes_directory", lambda: {"toy-release": lookup}
                )
            if hasattr(module, "hf_hub_download"):
                monkeypatch.setattr(module, "hf_hub_download", hf_hub_download)
    return SimpleNamespace(D=D, downloads=downloads)


def test_from_pretrained_goes_through_the_registry(fake_registry, tmp_path):
    est = SaeLatents.from_pretrained(
        "toy-release", "layer_1", model=fake_model(), site=Site(1), dtype=torch.bfloat16, top_k=2
    )
    assert "toy/saes/layer_1/sae_weights.safetensors" in fake_registry.downloads
    assert est.sae.W_dec.dtype == torch.bfloat16 and est.hook_name == HOOK
    assert (est.release, est.sae_id) == ("toy-release", "layer_1")
    X, y = contrast(fake_registry.D)
    d = extract(est, X, y, site=HOOK, model="ft")
    assert int(est.latents_[0]) == 0 and cosine(d.vector, fake_registry.D[0]) > 0.99
    params = d.provenance.params
    assert (params["release"], params["sae_id"], params["dtype"]) == (
        "toy-release",
        "layer_1",
        "torch.bfloat16",
    )
    assert "StandardSAE(d_in=16, d_sae=32" in str(params["sae"])
    back = Direction.load(d.save(tmp_path / "d.safetensors"))
    assert back.provenance == d.provenance
    # the hyperparameters alone load the same SAE through the registry in fit
    lazy = SaeLatents(release="toy-release", sae_id="layer_1", dtype="bfloat16", top_k=2)
    assert torch.equal(lazy.fit(X, y, site=Site(1)).scores_, est.scores_)
    with pytest.raises(ValueError, match="ID layer_9 not found in release toy-release"):
        SaeLatents.from_pretrained("toy-release", "layer_9")
    with pytest.raises(ValueError, match=r"d_in=16\).*d_model=64"):
        SaeLatents.from_pretrained("toy-release", "layer_1", model=fake_model(d_model=64))
    with pytest.raises(ValueError, match="several SAE sources"):
        SaeLatents(release="toy-release", sae_id="layer_1", config="x.yaml").fit(X, y)


def test_clones_share_the_sae_instead_of_copying_it(tmp_path):
    import sklearn
    from sklearn.base import clone

    save_tiny_sae(tmp_path / "sae")
    est = SaeLatents.from_disk(tmp_path / "sae", top_k=4)
    twin = clone(est)
    assert (
        twin.sae is est.sae
        and twin.get_params(deep=False).keys() == est.get_params(deep=False).keys()
    )
    assert not hasattr(twin, "sae_")
    with sklearn.config_context(enable_metadata_routing=True):
        routed = clone(est.set_fit_request(groups=True))
        assert routed.sae is est.sae
        assert routed.get_metadata_routing().fit.requests["groups"] is True


# --- devices and dtypes --------------------------------------------------------------------------
def test_bf16_rows_encode_like_their_float32_values(tmp_path):
    D = save_tiny_sae(tmp_path / "sae")
    X, y = contrast(D)
    Xb = X.bfloat16()
    a = SaeLatents(sae_path=str(tmp_path / "sae")).fit(Xb, y)
    b = SaeLatents(sae_path=str(tmp_path / "sae")).fit(Xb.float(), y)
    assert torch.equal(a.scores_, b.scores_) and a.scores_.dtype == torch.float64
    assert a.sae_.W_dec.dtype == torch.float32  # the stored dtype, not the rows'
    lat = a.transform(Xb)
    assert lat.shape == (len(y), 32) and lat.dtype == torch.float32
    # an SAE loaded in bf16 encodes in bf16; NumPy callers get float32 arrays
    half = SaeLatents(sae_path=str(tmp_path / "sae"), dtype="bfloat16").fit(X, y)
    assert half.sae_.W_dec.dtype == torch.bfloat16 and int(half.latents_[0]) == 0
    assert half.transform(X).dtype == torch.bfloat16
    as_np = half.transform(X.numpy())
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32


def test_train_sae_on_bf16_rows_trains_in_float32_identically():
    """bf16 rows are upcast batch by batch, so they train exactly the SAE their float32 values
    train; the SAE stays float32 (deliberately: Adam on bf16 weights loses updates)."""
    cfg = SaeTrainConfig.from_yaml(SAE_CONFIGS / "tiny_test.yaml").replace(training_samples=2048)
    X, _ = contrast(dictionary(d_in=32, d_sae=48))
    Xb = X.bfloat16()
    a = train_sae(Xb, cfg, hook_name=HOOK)
    b = train_sae(Xb.float(), cfg, hook_name=HOOK)
    assert a.sae.W_dec.dtype == torch.float32 and a.sae.W_dec.device == Xb.device
    for name, p in a.sae.state_dict().items():
        assert torch.equal(p, b.sae.state_dict()[name]), name
    assert a.metrics["fvu"] == b.metrics["fvu"] and np.isfinite(a.metrics["fvu"])
    assert sae_site(a.sae) == Site(1)
    with pytest.raises(ValueError, match="floating torch dtype"):
        train_sae(Xb, cfg, dtype="int8")


@pytest.mark.parametrize("device", DEVICES)
def test_training_and_encoding_follow_the_rows_device(device):
    cfg = SaeTrainConfig.from_yaml(SAE_CONFIGS / "tiny_test.yaml")
    D = dictionary(d_in=32, d_sae=48)
    X, y = contrast(D)
    X = X.to(device, torch.bfloat16)
    est = SaeLatents(config=cfg.to_dict(), top_k=3).fit(X, y)
    assert est.sae_.W_dec.device.type == device and est.sae_.W_dec.dtype == torch.float32
    assert est.scores_.device.type == "cpu" and est.direction_.dtype == torch.float64
    assert est.transform(X).device.type == device
    assert abs(cosine(est.direction_, D[0])) > 0.8 and est.train_metrics_["fvu"] < 0.5
