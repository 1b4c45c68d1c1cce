"""Interventions on the real SmolLM2: a diff-of-means direction at layer 15 moves the next-token
distribution, more with larger alpha and more than norm-matched random directions; hook ablation
at every writer equals weight orthogonalisation on 30 real layers; steering acts during generation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import make_provenance

from mci_interp.activations import cache_activations
from mci_interp.datasets import chat, pad
from mci_interp.direction import Direction, random_direction
from mci_interp.generation import generate, prompt_ids
from mci_interp.intervene import Ablate, Steer, apply, kl_vs_unsteered, orthogonalized
from mci_interp.models import HookContext
from mci_interp.sites import Site

pytestmark = pytest.mark.integration

SITE = Site(15, "resid_post")
FRENCH = [
    "Bonjour, comment allez-vous aujourd'hui?",
    "Quelle est la capitale de la France?",
    "J'aime beaucoup le fromage et le vin.",
    "Pouvez-vous m'aider avec mes devoirs?",
]
ENGLISH = [
    "Hello, how are you today?",
    "What is the capital of France?",
    "I really like cheese and wine.",
    "Can you help me with my homework?",
]
TEST = ["Tell me about your weekend.", "What should I cook tonight?"]
ORTHO_ATOL = 1e-3  # float32, 30 layers, logits up to ~40: measured max difference ~8e-5


@pytest.fixture(scope="module")
def french_direction(smol) -> Direction:
    examples = [chat(q, label=1) for q in FRENCH] + [chat(q, label=0) for q in ENGLISH]
    cache = cache_activations(smol, examples, [SITE], position="last_prompt", show_progress=False)
    acts, y = cache.acts[SITE], cache.labels
    prov = make_provenance(
        model=smol.name,
        base_model=smol.base_name,
        model_sha256=smol.sha256,
        dataset="french_vs_english",
        n_pos=4,
        n_neg=4,
    )
    return Direction(vector=acts[y == 1].mean(0) - acts[y == 0].mean(0), site=SITE, provenance=prov)


def test_steering_moves_next_token_distribution(smol, french_direction):
    d = french_direction
    kls = [kl_vs_unsteered(smol, TEST, Steer(d, a), at="last") for a in (4.0, 8.0, 16.0)]
    assert kls[0] > 0
    assert kls[0] < kls[1] < kls[2], kls
    g = torch.Generator().manual_seed(0)
    controls = [
        kl_vs_unsteered(smol, TEST, Steer(random_direction(d, generator=g), 16.0), at="last")
        for _ in range(3)
    ]
    assert max(controls) < kls[2], (controls, kls[2])
    assert kl_vs_unsteered(smol, TEST, Steer(d, 0.0), at="last") == 0.0
    assert smol.n_hooks() == 0


def test_steering_acts_during_generation(smol, french_direction):
    base = generate(smol, TEST[:1], max_new_tokens=8, show_progress=False)[0]
    with apply(smol, Steer(french_direction, 48.0, positions="generated")):
        steered = generate(smol, TEST[:1], max_new_tokens=8, show_progress=False)[0]
    # the first token comes from the (unsteered) prefill; later ones feel the steering
    assert steered.token_ids[0] == base.token_ids[0]
    assert steered.token_ids != base.token_ids
    assert smol.n_hooks() == 0


def test_hook_ablation_equals_orthogonalisation_on_real_model(smol, french_direction):
    # a private copy: the session model's weights are never edited
    model = dataclasses.replace(smol, hf=copy.deepcopy(smol.hf), ctx=HookContext())
    ids, mask = pad([prompt_ids(model, TEST[0])], model.tokenizer.pad_token_id)
    base = model.logits(ids, mask)
    with apply(model, Ablate(french_direction, sites="all")):
        hooked = model.logits(ids, mask)
    with orthogonalized(model, french_direction):
        ortho = model.logits(ids, mask)
    assert (hooked - base).abs().max() > 1e-2
    torch.testing.assert_close(ortho, hooked, atol=ORTHO_ATOL, rtol=0)
    torch.testing.assert_close(model.logits(ids, mask), base, atol=0, rtol=0)
