"""Sparse-autoencoder latents whose activation rises after finetuning (the persona-features method).

Two ways to get an SAE: train one with sae-lens from cached activations (no model re-run; a YAML
file in ``sae_configs/`` holds the settings) or load a local sae-lens SAE directory. Latents are
ranked by the increase of their mean activation from the base model to the finetune on the same
prompts (optionally minus the same increase for a control finetune), and the top latents'
decoder vectors are the candidate directions.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from jaxtyping import Float
from torch import Tensor

from mci_interp.direction import Param
from mci_interp.extract._base import Estimator, as_float64, as_labels

log = logging.getLogger(__name__)

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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown SAE config keys {sorted(unknown)}; valid keys: {sorted(names)}"
            )
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


def activation_batches(
    acts: Float[Tensor, "rows d_in"], batch_size: int, *, generator: torch.Generator
) -> Iterator[Tensor]:
    """Endless shuffled minibatches of rows (reshuffled every epoch) for ``SAETrainer``."""
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < batch_size:  # fewer rows than one batch: sample with replacement
                idx = torch.randint(n, (batch_size,), generator=generator)
            yield acts[idx]


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
    show_progress: bool = False,
) -> TrainedSae:
    """Train a sparse autoencoder with sae-lens' ``SAETrainer`` on cached activation rows.

    No model is run: batches come straight from ``acts``. The result is converted to sae-lens'
    inference form (BatchTopK saves as JumpReLU) so encoding no longer depends on the batch.
    """
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = resolve_config(config)
    x = as_float64(acts, "acts").float()
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
        normalize_activations=cfg.normalize_activations,
        aux_loss_coefficient=cfg.aux_loss_coefficient,
        decoder_init_norm=cfg.decoder_init_norm,
        rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
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
        device="cpu",
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    trainer = SAETrainer(
        cfg=trainer_cfg, sae=sae, data_provider=activation_batches(x, cfg.batch_size, generator=gen)
    )
    t0 = time.perf_counter()
    if show_progress:
        trainer.fit()
    else:
        import tqdm.auto as tqdm_auto
        from sae_lens.training import sae_trainer as trainer_mod

        orig = trainer_mod.tqdm
        trainer_mod.tqdm = lambda *a, **k: tqdm_auto.tqdm(*a, **{**k, "disable": True})
        try:
            trainer.fit()
        finally:
            trainer_mod.tqdm = orig
    seconds = time.perf_counter() - t0
    dead = float(trainer.dead_neurons.float().mean())
    with tempfile.TemporaryDirectory() as d:
        sae.save_inference_model(d)
        inf = SAE.load_from_disk(d, device="cpu")
    with torch.no_grad():
        probe = x[: min(4096, x.shape[0])]
        feats = inf.encode(probe)
        recon = inf.decode(feats)
        mse = float(((recon - probe) ** 2).sum(1).mean())
        fvu = mse / float(((probe - probe.mean(0)) ** 2).sum(1).mean().clamp_min(1e-12))
        l0 = float((feats > 0).float().sum(1).mean())
    metrics = {
        "seconds": seconds,
        "samples_per_s": cfg.training_samples / max(seconds, 1e-9),
        "steps": float(trainer.n_training_steps),
        "dead_fraction": dead,
        "l0": l0,
        "fvu": fvu,
        "mse": mse,
    }
    log.info("trained SAE d_sae=%d on %d rows: %s", cfg.d_sae, x.shape[0], metrics)
    return TrainedSae(sae=inf, metrics=metrics)


def load_sae(path: Path | str) -> Any:
    """Load a local sae-lens SAE directory (``cfg.json`` + ``sae_weights.safetensors``)."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"{path} is not a sae-lens SAE directory (no cfg.json)")
    return SAE.load_from_disk(str(path), device="cpu")


def sae_hook_name(sae: Any) -> str | None:
    return getattr(sae.cfg.metadata, "hook_name", None)


def check_sae_fits(sae: Any, *, d_in: int, hook_name: str | None) -> None:
    """Refuse an SAE trained on another width or hook point, naming both."""
    if int(sae.cfg.d_in) != int(d_in):
        raise ValueError(
            f"the SAE has d_in={sae.cfg.d_in} but the activations have d_in={d_in}: it was trained "
            "on another model or site"
        )
    trained = sae_hook_name(sae)
    if hook_name is not None and trained is not None and trained != hook_name:
        raise ValueError(
            f"the SAE was trained on hook {trained!r} but the activations come from {hook_name!r}; "
            "use an SAE for this site"
        )


@torch.no_grad()
def encode_mean(sae: Any, X: Tensor, *, batch_size: int = 4096) -> Tensor:
    """Mean SAE latent activation over rows, ``[d_sae]`` float64."""
    total = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64)
    for start in range(0, X.shape[0], batch_size):
        total += sae.encode(X[start : start + batch_size].float()).double().sum(0)
    return total / X.shape[0]


class SaeLatents(Estimator):
    """Rank SAE latents by how much more they fire on the finetune than on the base model.

    ``fit(X, y)``: rows with ``y == 1`` are finetune activations and ``y == 0`` base activations
    on the same prompts. ``score_[i] = mean_ft[i] - mean_base[i]``, minus the control finetune's
    increase when ``control`` rows are given. The SAE comes from ``sae_path`` (a local sae-lens
    directory) or is trained on ``train_acts`` (default: all rows of ``X``) with ``config``.

    Fitted: ``sae_``, ``scores_`` [d_sae], ``latents_`` (top ``top_k`` ids), ``decoder_``
    [top_k, d_in] (unit decoder rows), ``direction_`` (the best latent's decoder row),
    ``mean_base_``, ``mean_ft_``, ``train_metrics_`` (empty for a loaded SAE).
    """

    method = "sae_latent"

    def __init__(
        self,
        *,
        config: str | None = None,
        sae_path: str | None = None,
        top_k: int = 5,
        hook_name: str | None = None,
        show_progress: bool = False,
    ) -> None:
        self.config = config
        self.sae_path = sae_path
        self.top_k = top_k
        self.hook_name = hook_name
        self.show_progress = show_progress

    def fit(
        self,
        X: Float[Tensor, "rows d_model"],
        y: Any,
        groups: Sequence[Any] | None = None,
        *,
        control: Float[Tensor, "rows d_model"] | None = None,
        train_acts: Float[Tensor, "rows d_model"] | None = None,
        sae: Any = None,
        hook_name: str | None = None,
    ) -> SaeLatents:
        """Score latents on finetune (``y == 1``) vs base (``y == 0``) rows; ``sae`` overrides
        ``sae_path``/``config`` with an SAE object already in memory. ``hook_name`` (where the
        rows come from; ``extract`` passes the site) must match the hook the SAE was trained on."""
        hook = hook_name or self.hook_name
        if hook_name and self.hook_name and hook_name != self.hook_name:
            raise ValueError(
                f"SaeLatents was set up for hook {self.hook_name!r} but the rows come from "
                f"{hook_name!r}"
            )
        x = as_float64(X)
        lab = as_labels(y, x.shape[0])
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        self.train_metrics_: dict[str, float] = {}
        if sae is None and self.sae_path is not None:
            sae = load_sae(self.sae_path)
        if sae is None:
            if self.config is None:
                raise ValueError(
                    "SaeLatents needs an SAE: set sae_path=<sae-lens dir> or "
                    "config=<sae_configs/*.yaml>, or pass sae= to fit"
                )
            data = x if train_acts is None else as_float64(train_acts, "train_acts")
            trained = train_sae(data, self.config, hook_name=hook, show_progress=self.show_progress)
            sae, self.train_metrics_ = trained.sae, trained.metrics
        check_sae_fits(sae, d_in=x.shape[1], hook_name=hook)
        self.sae_ = sae
        self.mean_base_ = encode_mean(sae, x[lab == 0])
        self.mean_ft_ = encode_mean(sae, x[lab == 1])
        scores = self.mean_ft_ - self.mean_base_
        if control is not None:
            c = as_float64(control, "control")
            if c.shape[1] != x.shape[1]:
                raise ValueError(f"control has d_model {c.shape[1]} but X has {x.shape[1]}")
            self.mean_control_ = encode_mean(sae, c)
            scores = scores - (self.mean_control_ - self.mean_base_)
        self.scores_ = scores
        k = min(self.top_k, scores.numel())
        self.latents_ = torch.topk(scores, k).indices
        W = sae.W_dec.detach().double()[self.latents_]
        self.decoder_ = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.direction_ = self.decoder_[0].clone()
        return self

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
