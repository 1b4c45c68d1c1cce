"""Training a sparse autoencoder with sae-lens on cached activation rows (no model re-run), and
the encoding and reconstruction measures that training and the study share.

The loop is sae-lens' ``SAETrainer``; this module only feeds it shuffled batches from a tensor
and turns the result into sae-lens' inference form. It trains on the activations' device unless
told otherwise. The SAE's weights, Adam state and compute are float32 by default whatever the
activations' dtype (bf16/fp16 rows are upcast one batch at a time on the training device):
Adam updates on bf16 weights are lost to rounding. The initial weights are drawn on the CPU from
``seed``, so one seed gives one starting SAE on every device.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jaxtyping import Float
from torch import Tensor

from mci_interp._io import check_keys
from mci_interp.extract._base import as_device, as_dtype, check_rows

log = logging.getLogger(__name__)

TRAIN_DTYPE = torch.float32  # the default for the SAE's weights and compute (see above)
ARCHITECTURES = ("batchtopk", "topk")


@dataclass(frozen=True, kw_only=True)
class SaeTrainConfig:
    """Settings for training an SAE on cached activations (see ``sae_configs/*.yaml``).

    ``training_samples`` activation rows are drawn (with reshuffling each epoch) in batches of
    ``batch_size``; ``lr_end`` defaults to ``lr`` (sae-lens' trainer needs it set explicitly).
    ``hook_name``/``model`` record what the SAE is for; a mismatch with the data is refused.
    """

    architecture: str = "batchtopk"
    d_in: int | None = None
    d_sae: int = 4096
    k: float = 16
    lr: float = 3e-4
    lr_end: float | None = None
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    batch_size: int = 1024
    training_samples: int = 1_000_000
    normalize_activations: str = "expected_average_only_in"
    aux_loss_coefficient: float = 1.0 / 32
    decoder_init_norm: float | None = 0.1
    rescale_acts_by_decoder_norm: bool = True
    dead_feature_window: int = 1000
    n_batches_for_norm_estimate: int = 50
    hook_name: str | None = None
    model: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        for name in ("d_sae", "batch_size", "training_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in (0, d_sae={self.d_sae}], got {self.k}")
        if self.training_samples < self.batch_size:
            raise ValueError(
                f"training_samples ({self.training_samples}) is below one batch ({self.batch_size})"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SaeTrainConfig:
        check_keys(d, cls, "SAE config")
        return cls(**dict(d))

    @classmethod
    def from_yaml(cls, path: Path | str) -> SaeTrainConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"SAE config {path} does not exist (see sae_configs/*.yaml)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path} must hold a YAML mapping of settings")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SaeTrainConfig:
        return dataclasses.replace(self, **changes)


def resolve_config(config: SaeTrainConfig | Mapping[str, Any] | str | Path) -> SaeTrainConfig:
    if isinstance(config, SaeTrainConfig):
        return config
    if isinstance(config, Mapping):
        return SaeTrainConfig.from_dict(config)
    return SaeTrainConfig.from_yaml(config)


# --- encoding ------------------------------------------------------------------------------------
def _sae_place(sae: Any) -> tuple[torch.device, torch.dtype]:
    w = sae.W_dec
    return w.device, w.dtype


@torch.no_grad()
def encode_rows(sae: Any, X: Tensor, *, batch_size: int = 4096) -> Tensor:
    """SAE latent activations of rows, ``[rows, d_sae]``, on the SAE's device in its dtype."""
    dev, dt = _sae_place(sae)
    parts = [
        sae.encode(X[start : start + batch_size].to(device=dev, dtype=dt))
        for start in range(0, X.shape[0], batch_size)
    ]
    return torch.cat(parts)


@torch.no_grad()
def reconstruction_quality(sae: Any, X: Float[Tensor, "rows d_in"]) -> dict[str, float]:
    """How well ``sae`` reconstructs rows ``X``: ``mse`` (squared error per row),
    ``explained_variance`` (1 - that error over the rows' variance about their mean), ``l0``
    (mean active latents per row) and ``dead_fraction`` (latents that fire on none of the rows)."""
    z = encode_rows(sae, X)
    recon = sae.decode(z).float().cpu()
    x = X.float().cpu()
    err = ((recon - x) ** 2).sum(1).mean()
    var = ((x - x.mean(0)) ** 2).sum(1).mean().clamp_min(1e-12)
    active = z > 0
    return {
        "mse": float(err),
        "explained_variance": float(1 - err / var),
        "l0": float(active.float().sum(1).mean()),
        "dead_fraction": float(1 - active.any(0).float().mean()),
        "rows": float(x.shape[0]),
    }


def activation_batches(
    acts: Float[Tensor, "rows d_in"],
    batch_size: int,
    *,
    generator: torch.Generator,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[Tensor]:
    """Endless shuffled minibatches of rows (reshuffled every epoch) for ``SAETrainer``, moved to
    ``device`` and cast to ``dtype`` one batch at a time. ``generator`` is a CPU generator, so a
    seed draws the same rows on every device."""
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < batch_size:  # fewer rows than one batch: sample with replacement
                idx = torch.randint(n, (batch_size,), generator=generator)
            yield acts[idx.to(acts.device)].to(device=device, dtype=dtype)


@dataclass(eq=False)
class TrainedSae:
    """An inference sae-lens SAE trained here, and what the training measured."""

    sae: Any
    metrics: dict[str, float]


def train_sae(
    acts: Float[Tensor, "rows d_in"],
    config: SaeTrainConfig | Mapping[str, Any] | str | Path,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    show_progress: bool = False,
) -> TrainedSae:
    """Train a sparse autoencoder with sae-lens' ``SAETrainer`` on cached activation rows.

    No model is run: batches come straight from ``acts``. ``device`` defaults to the device of
    ``acts`` and ``dtype`` (the SAE's weights and compute) to float32. The result is converted to
    sae-lens' inference form (BatchTopK saves as JumpReLU) so encoding no longer depends on the
    batch; it stays on the training device.
    """
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from sae_lens.util import dtype_to_str

    cfg = resolve_config(config)
    x = check_rows(acts, "acts")
    dev = as_device(device) or x.device
    wdtype = as_dtype(dtype) or TRAIN_DTYPE
    d_in = int(x.shape[1])
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise ValueError(f"SAE config says d_in={cfg.d_in} but the activations have d_in={d_in}")
    hook = hook_name or cfg.hook_name
    if cfg.hook_name is not None and hook_name is not None and cfg.hook_name != hook_name:
        raise ValueError(
            f"SAE config is for hook {cfg.hook_name!r} but the activations come from {hook_name!r}"
        )
    common = dict(
        d_in=d_in,
        d_sae=cfg.d_sae,
        dtype=dtype_to_str(wdtype),
        normalize_activations=cfg.normalize_activations,
        aux_loss_coefficient=cfg.aux_loss_coefficient,
        decoder_init_norm=cfg.decoder_init_norm,
        rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm,
    )
    with torch.random.fork_rng(devices=[]):  # seeded CPU init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        if cfg.architecture == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(cfg.k), **common))
        else:
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=int(cfg.k), **common))
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = model_name or cfg.model
    trainer_cfg = SAETrainerConfig(
        total_training_samples=int(cfg.training_samples),
        train_batch_size_samples=int(cfg.batch_size),
        lr=cfg.lr,
        lr_end=cfg.lr if cfg.lr_end is None else cfg.lr_end,
        lr_scheduler_name=cfg.lr_scheduler_name,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        dead_feature_window=cfg.dead_feature_window,
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        logger=LoggingConfig(log_to_wandb=False),
        device=str(dev),  # the trainer moves the CPU-initialised SAE here
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = activation_batches(x, cfg.batch_size, generator=gen, device=dev, dtype=wdtype)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    t0 = time.perf_counter()
    if show_progress:
        trainer.fit()
    else:  # sae-lens draws its bars (training, the norm estimate) with no switch: silence them
        import tqdm.auto as tqdm_auto
        from sae_lens.training import activation_scaler, sae_trainer

        mods = (sae_trainer, activation_scaler)
        orig = [m.tqdm for m in mods]
        for m in mods:
            m.tqdm = lambda *a, **k: tqdm_auto.tqdm(*a, **{**k, "disable": True})  # type: ignore[attr-defined]
        try:
            trainer.fit()
        finally:
            for m, o in zip(mods, orig, strict=True):
                m.tqdm = o  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    dead = float(trainer.dead_neurons.float().mean())
    with tempfile.TemporaryDirectory() as d:
        sae.save_inference_model(d)
        inf = SAE.load_from_disk(d, device=str(dev))
    q = reconstruction_quality(inf, x[: min(4096, x.shape[0])].to(wdtype))
    metrics = {
        "seconds": seconds,
        "samples_per_s": cfg.training_samples / max(seconds, 1e-9),
        "steps": float(trainer.n_training_steps),
        "dead_fraction": dead,
        "l0": q["l0"],
        "fvu": 1 - q["explained_variance"],
        "mse": q["mse"],
    }
    log.info(
        "trained SAE d_sae=%d on %d rows (%s, %s): %s", cfg.d_sae, x.shape[0], dev, wdtype, metrics
    )
    return TrainedSae(sae=inf, metrics=metrics)
