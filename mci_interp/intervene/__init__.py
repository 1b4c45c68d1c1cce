"""Causal interventions on a ``HookedModel``: steering, directional ablation, projection setting,
weight orthogonalisation, dose-response sweeps and a KL distance to the unsteered model.

Interventions are frozen values with ``hooks(model) -> [(Site, HookFn)]``; ``apply(model, *ivs)``
validates all of them against the model *before* any forward pass, attaches their hooks and
removes them on exit, exceptions included. ``orthogonalized`` edits weights and restores the exact
original tensors on exit.

Devices and dtypes: every tensor a hook creates lives on the device of the activations it meets;
the arithmetic runs in float32 (float64 for float64 activations) and the result is cast back to
the activations' dtype, because a projection computed in bfloat16 would leave ``|h.u|`` at ~1e-2
of ``|h|`` instead of removing it. Sites may be given as ``Site`` values, layer numbers (the
direction's component at that layer) or TransformerLens hook names (``"blocks.12.hook_resid_post"``).

Position rules (``positions=``) use absolute positions of the (padded) sequence as the model
sees it, i.e. ``ctx.past_len + index``:

- ``"all"``: every position, prompt and generated;
- ``"prompt"``: positions before ``ctx.prompt_len`` (every position outside generation);
- ``"generated"``: positions at or after ``ctx.prompt_len`` (none outside generation);
- a ``slice`` or a list of ints: prompt positions; negative numbers count back from the end of
  the prompt (``-1`` is the last prompt token when prompts are left-padded, as in ``generate``).

Where things are: ``interventions`` (``Steer``, ``Ablate``, ``SetProjection``, ``apply``),
``positions`` (the rules above), ``weights`` (``orthogonalized``, ``export_orthogonalized``) and
``measure`` (``kl_vs_unsteered``, ``dose_response``).
"""

from mci_interp.intervene.interventions import (
    Ablate,
    Intervention,
    Scale,
    SetProjection,
    SitesArg,
    Steer,
    all_writer_sites,
    apply,
)
from mci_interp.intervene.measure import DoseResponse, dose_response, kl_vs_unsteered
from mci_interp.intervene.positions import PositionRule, position_mask
from mci_interp.intervene.weights import export_orthogonalized, orthogonalized

__all__ = [
    "Ablate",
    "DoseResponse",
    "Intervention",
    "PositionRule",
    "Scale",
    "SetProjection",
    "SitesArg",
    "Steer",
    "all_writer_sites",
    "apply",
    "dose_response",
    "export_orthogonalized",
    "kl_vs_unsteered",
    "orthogonalized",
    "position_mask",
]
