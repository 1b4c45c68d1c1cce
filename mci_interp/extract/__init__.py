"""Direction estimators (scikit-learn conventions) and one ``extract(...) -> Direction``.

- ``DiffMeans``: mean(positive) - mean(negative), float64, example- or token-weighted.
- ``LinearProbe``: logistic regression, prompt-grouped CV, prompt-identity baseline; its
  direction is mapped back to raw activation space.
- ``SaeLatents``: sparse-autoencoder latents ranked by their activation increase after
  finetuning (a pretrained SAE from sae-lens' registry, a local sae-lens directory, or one
  trained with sae-lens from cached activations).
- ``extract``, ``sweep`` and the three diff-means flavours ``data_diff``, ``model_diff``,
  ``prompt_diff`` turn activation caches into ``Direction``s with provenance.

All three are scikit-learn estimators (``clone``, ``Pipeline`` and grouped ``GridSearchCV``
work); ``clone`` here is ``sklearn.base.clone``.
"""

from sklearn.base import clone

from mci_interp.extract._base import Estimator
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
from mci_interp.extract.sae import (
    SaeLatents,
    SaeTrainConfig,
    TrainedSae,
    check_sae_fits,
    load_pretrained_sae,
    load_sae,
    sae_site,
    train_sae,
)

__all__ = [
    "METHODS",
    "Contrast",
    "DiffMeans",
    "Estimator",
    "LinearProbe",
    "SaeLatents",
    "SaeTrainConfig",
    "TrainedSae",
    "check_sae_fits",
    "clone",
    "data_diff",
    "extract",
    "latent_directions",
    "load_pretrained_sae",
    "load_sae",
    "model_contrast",
    "model_diff",
    "prompt_contrast",
    "prompt_diff",
    "sae_site",
    "stack_rows",
    "sweep",
    "train_sae",
]
