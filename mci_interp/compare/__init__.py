"""Comparing directions: cosine matrices, principal angles, null distributions, bootstrap CIs.

Pure math on torch tensors (float64 inside); no model code. Anything with a ``.vector`` (a
``Direction``), a mapping ``name -> vector`` or a ``[n, d_model]`` tensor can be compared.
Every resampling function takes a ``torch.Generator`` and never touches the global RNG; the
resampling itself (bootstrap, split halves, p-values, quantiles) is ``mci_interp.stats``'s.

Conventions: cosines are reported both signed and absolute (some public helpers return |cos| by
default, which hides anti-aligned directions); nulls resample *prompts* (groups), never rows,
so answers to one question move together.

Where things are: ``similarity`` (cosines, ``SimilarityMatrix``, principal angles), ``nulls``
(random-direction and permutation nulls, ``compare_to_null``) and ``resampling`` (bootstrap CIs
and split-half reliability of diff-means directions).
"""

from mci_interp.compare.nulls import (
    NullComparison,
    PermutationNull,
    RandomNull,
    compare_to_null,
    permutation_null,
    random_direction_null,
    structured_direction_null,
)
from mci_interp.compare.resampling import (
    BootstrapCI,
    SplitHalf,
    bootstrap_cosine,
    split_half_reliability,
)
from mci_interp.compare.similarity import (
    SimilarityMatrix,
    cosine,
    cosine_matrix,
    expected_abs_cosine,
    principal_angles,
)

__all__ = [
    "BootstrapCI",
    "NullComparison",
    "PermutationNull",
    "RandomNull",
    "SimilarityMatrix",
    "SplitHalf",
    "bootstrap_cosine",
    "compare_to_null",
    "cosine",
    "cosine_matrix",
    "expected_abs_cosine",
    "permutation_null",
    "principal_angles",
    "random_direction_null",
    "structured_direction_null",
    "split_half_reliability",
]
