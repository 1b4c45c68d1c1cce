"""Direction estimators (scikit-learn conventions) and one ``extract(...) -> Direction``.

- ``DiffMeans``: mean(positive) - mean(negative), float64, example- or token-weighted.
- ``LinearProbe``: logistic regression, prompt-grouped CV, prompt-identity baseline; its
  direction is mapped back to raw activation space.
- ``SaeLatents``: sparse-autoencoder latents ranked by their activation increase after
  finetuning (train with sae-lens from cached activations, or load a local SAE).
- ``extract``, ``sweep`` and the three diff-means flavours ``data_diff``, ``model_diff``,
  ``prompt_diff`` turn activation caches into ``Direction``s with provenance.
"""

from mci_interp.extract._base import Estimator, clone
from mci_interp.extract.api import (
    METHODS,
    Contrast,
    data_diff,
    extract,
    latent_directions,
    model_contrast,
    model_diff,
    prompt_contrast,
    prompt_diff,
    stack_rows,
    sweep,
)
from mci_interp.extract.diff_means import DiffMeans
from mci_interp.extract.probe import LinearProbe
from mci_interp.extract.sae import SaeLatents, SaeTrainConfig, TrainedSae, load_sae, train_sae

__all__ = [
    "METHODS",
    "Contrast",
    "DiffMeans",
    "Estimator",
    "LinearProbe",
    "SaeLatents",
    "SaeTrainConfig",
    "TrainedSae",
    "clone",
    "data_diff",
    "extract",
    "latent_directions",
    "load_sae",
    "model_contrast",
    "model_diff",
    "prompt_contrast",
    "prompt_diff",
    "stack_rows",
    "sweep",
    "train_sae",
]
