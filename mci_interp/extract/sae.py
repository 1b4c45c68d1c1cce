"""Sparse-autoencoder latents whose activation rises after finetuning (the persona-features method).

Three ways to get an SAE, all in sae-lens' format: a pretrained one from sae-lens' registry
(Gemma Scope, Llama Scope, ...; ``SaeLatents.from_pretrained``), a local sae-lens directory
(``cfg.json`` + ``sae_weights.safetensors``; ``SaeLatents.from_disk``), or one trained here from
cached activations (``sae_train``). An SAE's hook name is a TransformerLens name such as
``blocks.12.hook_resid_post``, the same string as our ``Site``; an SAE is refused at a site or
width other than its own, naming both. Latents are ranked by the increase of their mean
activation from the base model to the finetune on the same prompts (optionally minus the same
increase for a control finetune), and the top latents' decoder vectors are the candidate
directions. Encoding runs on the SAE's device in its dtype; rows are moved there batch by batch.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from sklearn.base import TransformerMixin, clone
from torch import Tensor

from mci_interp.direction import Param
from mci_interp.extract._base import (
    Estimator,
    as_device,
    as_dtype,
    as_labels,
    check_rows,
    like_input,
    wide_dtype,
)
from mci_interp.extract.sae_train import (
    ARCHITECTURES,
    SaeTrainConfig,
    TrainedSae,
    _sae_place,
    activation_batches,
    encode_rows,
    reconstruction_quality,
    resolve_config,
    train_sae,
)
from mci_interp.sites import Site, as_site

if TYPE_CHECKING:
    from mci_interp.models import HookedModel

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "SaeLatents",
    "SaeTrainConfig",
    "TrainedSae",
    "activation_batches",
    "check_sae_fits",
    "encode_mean",
    "encode_rows",
    "load_pretrained_sae",
    "load_sae",
    "reconstruction_quality",
    "resolve_config",
    "sae_hook_name",
    "sae_site",
    "train_sae",
]

SAE_FILES = ("cfg.json", "sae_weights.safetensors")  # sae-lens' on-disk format


# --- loading -------------------------------------------------------------------------------------
def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    from sae_lens.util import dtype_to_str

    dt = as_dtype(dtype)
    return None if dt is None else dtype_to_str(dt)


def load_sae(
    path: Path | str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """Load a local SAE saved in sae-lens' format (``cfg.json`` + ``sae_weights.safetensors``,
    as ``SAE.save_model`` writes it) onto ``device`` (default CPU) in ``dtype`` (default: the
    dtype in ``cfg.json``). Weights are read with safetensors, never unpickled."""
    from sae_lens import SAE

    path = Path(path)
    missing = [name for name in SAE_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a sae-lens SAE directory: {' and '.join(missing)} missing (expected "
            f"{' + '.join(SAE_FILES)}, as sae_lens.SAE.save_model writes)"
        )
    dev = as_device(device) or torch.device("cpu")
    return SAE.load_from_disk(str(path), device=str(dev), dtype=_dtype_name(dtype))


def load_pretrained_sae(
    release: str,
    sae_id: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """A pretrained SAE from sae-lens' registry (``sae_lens.SAE.from_pretrained``; downloads
    through the Hugging Face cache) onto ``device`` (default CPU) in ``dtype`` (default float32,
    sae-lens' default). ``release`` and ``sae_id`` are names from
    ``sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()``."""
    from sae_lens import SAE

    dev = as_device(device) or torch.device("cpu")
    return SAE.from_pretrained(
        release, sae_id, device=str(dev), dtype=_dtype_name(dtype) or "float32"
    )


# --- hook names and widths -----------------------------------------------------------------------
def sae_hook_name(sae: Any) -> str | None:
    """The hook the SAE reads (a TransformerLens name), or None where its config records none."""
    hook = sae.cfg.metadata.hook_name  # sae-lens' metadata answers None for a missing key
    return None if hook is None else str(hook)


def sae_site(sae: Any) -> Site | None:
    """The ``Site`` an SAE reads (its TransformerLens hook name parsed), or None where unrecorded;
    ValueError for a hook that is not a whole residual-stream site (one attention head, ``hook_z``)."""
    hook = sae_hook_name(sae)
    if hook is None:
        return None
    head = sae.cfg.metadata.hook_head_index
    if head is not None:
        raise ValueError(
            f"the SAE reads one attention head ({hook!r}, head {head}); only whole sites "
            "(blocks.L.hook_resid_post and the like) can be used"
        )
    try:
        return Site.parse(hook)
    except ValueError:
        raise ValueError(
            f"the SAE reads hook {hook!r}, which is not a site this toolkit caches (expected "
            "blocks.L.hook_resid_pre/resid_mid/resid_post/attn_out/mlp_out); use an SAE trained "
            "on one of those"
        ) from None


def check_sae_fits(
    sae: Any,
    *,
    d_model: int | None = None,
    site: Site | str | int | None = None,
    n_layers: int | None = None,
    what: str = "the activations",
) -> None:
    """Refuse an SAE read from another width, hook or depth than ``what`` (the activations or a
    model), naming the SAE's ``hook_name``/``d_in`` and the other side's site/``d_model``."""
    d_in = int(sae.cfg.d_in)
    want = None if site is None else as_site(site)
    sae_desc = f"the SAE (hook_name={sae_hook_name(sae)!r}, d_in={d_in})"
    target = what + ("" if want is None else f" at site {want.hook_name!r}")
    target += "" if d_model is None else f" (d_model={d_model})"
    if d_model is not None and d_in != int(d_model):
        raise ValueError(
            f"{sae_desc} does not fit {target}: it was trained on another model's width; use an "
            "SAE for this model"
        )
    if want is None and n_layers is None:
        return
    trained = sae_site(sae)
    if trained is None:
        return
    if want is not None and trained != want:
        raise ValueError(
            f"{sae_desc} does not fit {target}: it reads {trained.hook_name!r}, not "
            f"{want.hook_name!r}; use an SAE for this site or cache {trained.hook_name!r}"
        )
    if n_layers is not None and trained.layer >= n_layers:
        raise ValueError(
            f"{sae_desc} does not fit {target}: it reads block {trained.layer} but the model has "
            f"{n_layers} blocks (0..{n_layers - 1})"
        )


# --- encoding ------------------------------------------------------------------------------------
@torch.no_grad()
def encode_mean(sae: Any, X: Tensor, *, batch_size: int = 4096) -> Tensor:
    """Mean SAE latent activation over rows, ``[d_sae]`` float64 on the CPU. Rows are encoded on
    the SAE's device in its dtype and summed there in float64 (float32 on MPS)."""
    dev, dt = _sae_place(sae)
    wide = wide_dtype(dev)
    total = torch.zeros(int(sae.cfg.d_sae), dtype=wide, device=dev)
    for start in range(0, X.shape[0], batch_size):
        batch = X[start : start + batch_size].to(device=dev, dtype=dt)
        total += sae.encode(batch).to(wide).sum(0)
    return (total / X.shape[0]).to("cpu", torch.float64)


def _describe(sae: Any) -> str:
    return (
        f"{type(sae).__name__}(d_in={int(sae.cfg.d_in)}, d_sae={int(sae.cfg.d_sae)}, "
        f"hook_name={sae_hook_name(sae)!r})"
    )


# --- the estimator -------------------------------------------------------------------------------
class SaeLatents(TransformerMixin, Estimator):
    """Rank SAE latents by how much more they fire on the finetune than on the base model.

    ``fit(X, y)``: rows with ``y == 1`` are finetune activations and ``y == 0`` base activations
    on the same prompts. ``score_[i] = mean_ft[i] - mean_base[i]``, minus the control finetune's
    increase when ``control`` rows are given. The SAE is ``sae`` (an sae-lens SAE in memory, as
    the ``from_pretrained``/``from_disk`` constructors set it; clones share it, it is never
    modified), else it is loaded from ``sae_path`` (a local sae-lens directory) or from sae-lens'
    registry (``release`` + ``sae_id``), or trained on ``train_acts`` (default: all rows of ``X``)
    with ``config``. ``device``/``dtype`` place an SAE this estimator loads or trains (default:
    the rows' device; a loaded SAE keeps its stored dtype, a trained one is float32, see
    ``sae_train``); rows are then encoded where the SAE is. ``transform(X)`` is the SAE's latent
    activations, ``[rows, d_sae]``.

    Fitted: ``sae_``, ``scores_`` [d_sae], ``latents_`` (top ``top_k`` ids), ``decoder_``
    [top_k, d_in] (unit decoder rows), ``direction_`` (the best latent's decoder row),
    ``mean_base_``, ``mean_ft_``, ``train_metrics_`` (empty for a loaded SAE),
    ``n_features_in_``; all but ``sae_`` float64 on the CPU.
    """

    method = "sae_latent"

    def __init__(
        self,
        *,
        config: str | Mapping[str, Any] | None = None,
        sae_path: str | None = None,
        release: str | None = None,
        sae_id: str | None = None,
        sae: Any = None,
        top_k: int = 5,
        hook_name: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        show_progress: bool = False,
    ) -> None:
        self.config = config
        self.sae_path = sae_path
        self.release = release
        self.sae_id = sae_id
        self.sae = sae
        self.top_k = top_k
        self.hook_name = hook_name
        self.device = device
        self.dtype = dtype
        self.show_progress = show_progress

    # --- constructors ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        release: str,
        sae_id: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        model: HookedModel | None = None,
        site: Site | str | int | None = None,
        top_k: int = 5,
    ) -> SaeLatents:
        """An estimator around a pretrained SAE from sae-lens' registry, loaded now onto
        ``device`` (default: ``model``'s device, else CPU) in ``dtype`` (default float32).

        With ``model`` and/or ``site``, the SAE must read that site (its hook name, parsed as a
        ``Site``) and the model's width; a mismatch raises ValueError naming both.
        """
        dev = device if device is not None or model is None else model.device
        sae = load_pretrained_sae(release, sae_id, device=dev, dtype=dtype)
        return cls._around(
            sae,
            model=model,
            site=site,
            what=f"SAE {release}/{sae_id}",
            params={
                "release": release,
                "sae_id": sae_id,
                "top_k": top_k,
                "device": device,
                "dtype": dtype,
            },
        )

    @classmethod
    def from_disk(
        cls,
        path: Path | str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        model: HookedModel | None = None,
        site: Site | str | int | None = None,
        top_k: int = 5,
    ) -> SaeLatents:
        """An estimator around a local sae-lens SAE directory, loaded now (see ``load_sae``;
        ``device`` defaults to ``model``'s, else CPU) and checked like ``from_pretrained``."""
        dev = device if device is not None or model is None else model.device
        sae = load_sae(path, device=dev, dtype=dtype)
        return cls._around(
            sae,
            model=model,
            site=site,
            what=f"SAE {path}",
            params={"sae_path": str(path), "top_k": top_k, "device": device, "dtype": dtype},
        )

    @classmethod
    def _around(
        cls,
        sae: Any,
        *,
        model: HookedModel | None,
        site: Site | str | int | None,
        what: str,
        params: dict[str, Any],
    ) -> SaeLatents:
        if model is not None:
            check_sae_fits(
                sae,
                d_model=model.d_model,
                site=site,
                n_layers=model.n_layers,
                what=f"model {model.name}",
            )
        elif site is not None:
            check_sae_fits(sae, site=site)
        where = as_site(site) if site is not None else sae_site(sae)
        log.info("%s: %s", what, _describe(sae))
        hook = None if where is None else where.hook_name
        return cls(sae=sae, hook_name=hook, **params)

    def __sklearn_clone__(self) -> SaeLatents:
        """An unfitted copy that shares the (read-only) SAE object instead of deep-copying it."""
        params = self.get_params(deep=False)
        sae = params.pop("sae")
        new = type(self)(sae=sae, **clone(params, safe=False))
        if hasattr(self, "_metadata_request"):  # requests set with set_fit_request(...)
            new._metadata_request = copy.deepcopy(self._metadata_request)
        return new

    # --- fit -----------------------------------------------------------------------------------
    def _where(self, site: Site | str | int | None) -> Site | None:
        given = None if site is None else as_site(site)
        mine = None if self.hook_name is None else as_site(self.hook_name)
        if given is not None and mine is not None and given != mine:
            raise ValueError(
                f"SaeLatents was set up for hook {mine.hook_name!r} but the rows come from "
                f"{given.hook_name!r}"
            )
        return given or mine

    def _get_sae(
        self, x: Tensor, train_acts: Any, where: Site | None
    ) -> tuple[Any, dict[str, float]]:
        """The SAE to score with, and its training metrics (empty unless trained here)."""
        if self.sae is not None:
            return self.sae, {}
        sources = [
            name
            for name, value in (
                ("sae_path", self.sae_path),
                ("release", self.release),
                ("config", self.config),
            )
            if value is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"SaeLatents got several SAE sources ({', '.join(sources)}); set one")
        device = as_device(self.device) or x.device
        if self.sae_path is not None:
            return load_sae(self.sae_path, device=device, dtype=self.dtype), {}
        if self.release is not None:
            if self.sae_id is None:
                raise ValueError(f"release={self.release!r} needs sae_id= (an id in that release)")
            sae = load_pretrained_sae(self.release, self.sae_id, device=device, dtype=self.dtype)
            return sae, {}
        if self.config is None:
            raise ValueError(
                "SaeLatents needs an SAE: set sae_path=<sae-lens dir>, release= and sae_id= "
                "(sae-lens' registry), config=<sae_configs/*.yaml> (train one) or sae=<SAE>"
            )
        data = x if train_acts is None else check_rows(train_acts, "train_acts")
        trained = train_sae(
            data,
            self.config,
            hook_name=None if where is None else where.hook_name,
            device=device,
            dtype=self.dtype,
            show_progress=self.show_progress,
        )
        return trained.sae, trained.metrics

    def fit(
        self,
        X: Float[Tensor, "rows d_model"],
        y: Any,
        groups: Sequence[Any] | None = None,
        *,
        control: Float[Tensor, "rows d_model"] | None = None,
        train_acts: Float[Tensor, "rows d_model"] | None = None,
        site: Site | str | int | None = None,
    ) -> SaeLatents:
        """Score latents on finetune (``y == 1``) vs base (``y == 0``) rows. ``groups`` is accepted
        for the common signature and unused. Fit metadata: ``control`` (a control finetune's
        rows), ``train_acts`` (rows to train an SAE on) and ``site`` (where the rows come from;
        ``extract`` passes it), which must be the SAE's own hook."""
        if self.sae_id is not None and self.release is None:
            raise ValueError(f"sae_id={self.sae_id!r} needs release= (a sae-lens release name)")
        where = self._where(site)
        x = check_rows(X)
        lab = as_labels(y, x.shape[0])
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        sae, self.train_metrics_ = self._get_sae(x, train_acts, where)
        check_sae_fits(sae, d_model=int(x.shape[1]), site=where)
        self.sae_ = sae
        pos = (lab == 1).to(x.device)
        self.mean_base_ = encode_mean(sae, x[~pos])
        self.mean_ft_ = encode_mean(sae, x[pos])
        scores = self.mean_ft_ - self.mean_base_
        if control is not None:
            c = check_rows(control, "control")
            if c.shape[1] != x.shape[1]:
                raise ValueError(f"control has d_model {c.shape[1]} but X has {x.shape[1]}")
            self.mean_control_ = encode_mean(sae, c)
            scores = scores - (self.mean_control_ - self.mean_base_)
        self.scores_ = scores
        k = min(self.top_k, scores.numel())
        self.latents_ = torch.topk(scores, k).indices
        W = sae.W_dec.detach()[self.latents_.to(sae.W_dec.device)].to("cpu", torch.float64)
        self.decoder_ = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.direction_ = self.decoder_[0].clone()
        self.n_features_in_ = int(x.shape[1])
        return self

    def transform(self, X: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_sae"]:
        """The SAE's latent activations of rows, ``[rows, d_sae]``, in the SAE's dtype (a tensor
        on ``X``'s device for a tensor, else a NumPy array)."""
        self.check_fitted()
        x = check_rows(X)
        check_sae_fits(self.sae_, d_model=int(x.shape[1]))
        return like_input(X, encode_rows(self.sae_, x))

    # --- provenance ----------------------------------------------------------------------------
    def provenance_params(self) -> dict[str, Param]:
        """As for every estimator, with an in-memory ``sae`` recorded by its description."""
        out = super().provenance_params()
        out["sae"] = None if self.sae is None else _describe(self.sae)
        return out

    def fit_summary(self) -> dict[str, Param]:
        self.check_fitted()
        out: dict[str, Param] = {
            "latent": int(self.latents_[0]),
            "score": float(self.scores_[self.latents_[0]]),
            "d_sae": int(self.scores_.numel()),
        }
        for k in ("fvu", "l0", "dead_fraction"):
            if k in self.train_metrics_:
                out[f"sae_{k}"] = round(float(self.train_metrics_[k]), 6)
        return out
