"""Generation on a tiny random Llama: seeded determinism without touching the global RNG, left
padding that changes nothing, end-of-turn stopping, position bookkeeping for hooks, perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from mci_interp.datasets import chat
from mci_interp.generation import (
    Generation,
    completion_nll,
    generate,
    perplexity,
    prompt_ids,
    stop_token_ids,
)
from mci_interp.models import load_model
from mci_interp.sites import Site

PROMPTS = [
    "Hi",
    "What is the capital of France? Answer in one word please.",
    chat("Name a colour.", system="You are terse."),
    "Tell me a story about a dragon who learns to code in Python.",
]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """One tiny model shared by tests that leave its weights alone, with an untied random head:
    with tied embeddings a random model greedily repeats its last token, which would make
    generation comparisons trivial."""
    model = load_model(str(tiny_dir))
    g = torch.Generator().manual_seed(0)
    head = torch.randn(model.hf.lm_head.weight.shape, generator=g) * 0.5
    model.hf.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    return model


def test_greedy_batched_left_padding_equals_one_by_one(tiny):
    batched = generate(tiny, PROMPTS, max_new_tokens=8, batch_size=4, show_progress=False)
    single = [
        generate(tiny, [p], max_new_tokens=8, batch_size=1, show_progress=False)[0] for p in PROMPTS
    ]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.prompt for g in batched] == [g.prompt for g in single]
    assert tiny.tokenizer.padding_side == "right"  # not mutated
    assert tiny.n_hooks() == 0
    assert tiny.ctx.prompt_len is None and tiny.ctx.past_len == 0


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny):
    state = torch.get_rng_state()
    a = generate(tiny, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=1, show_progress=False)
    b = generate(tiny, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=1, show_progress=False)
    c = generate(tiny, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=2, show_progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    greedy = generate(tiny, PROMPTS[:2], max_new_tokens=8, show_progress=False)
    assert [g.token_ids for g in greedy] != [g.token_ids for g in a]


def test_max_new_tokens_and_fields(tiny):
    gens = generate(tiny, PROMPTS, max_new_tokens=5, show_progress=False)
    assert all(isinstance(g, Generation) for g in gens)
    for g in gens:
        assert g.n_tokens == len(g.token_ids) <= 5
        assert g.stopped_at_eot == (g.token_ids[-1] in stop_token_ids(tiny))
        assert g.prompt.rstrip().endswith("assistant")
    assert "You are terse." in gens[2].prompt


def test_stops_at_end_of_turn(tiny):
    """Push the last residual towards <|im_end|>'s unembedding row: generation stops at once."""
    eot = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eot in stop_token_ids(tiny)
    e = tiny.hf.get_output_embeddings().weight[eot].detach()
    last = Site(tiny.n_layers - 1, "resid_post")

    def push(acts, ctx):
        return acts + 1e4 * e / e.norm()

    with tiny.hooks([(last, push)]):
        gens = generate(tiny, PROMPTS[:2], max_new_tokens=6, show_progress=False)
    for g in gens:
        assert g.token_ids == (eot,) and g.stopped_at_eot and g.completion == "" and g.n_tokens == 1


def test_ctx_tracks_prompt_and_generated_positions(tiny):
    seen: list[tuple[int, int | None, int]] = []

    def record(acts, ctx):
        seen.append((ctx.past_len, ctx.prompt_len, acts.shape[1]))

    with tiny.hooks([(Site(0, "resid_pre"), record)]):
        generate(tiny, PROMPTS[:2], max_new_tokens=4, show_progress=False)
    plen = max(len(prompt_ids(tiny, p)) for p in PROMPTS[:2])
    assert seen[0] == (0, plen, plen)  # prefill
    # each decode step sees one new position after everything cached so far
    steps = seen[1:]
    assert steps and all(s == (plen + k, plen, 1) for k, s in enumerate(steps))
    assert tiny.n_hooks() == 0 and tiny.ctx.prompt_len is None


def test_perplexity_matches_direct_computation(tiny):
    gens = generate(tiny, PROMPTS[:2], max_new_tokens=5, show_progress=False)
    nll = completion_nll(tiny, PROMPTS[:2], gens, batch_size=2)
    for i, (p, g) in enumerate(zip(PROMPTS[:2], gens, strict=True)):
        pids = prompt_ids(tiny, p)
        ids = torch.tensor([pids + list(g.token_ids)])
        logp = torch.log_softmax(tiny.logits(ids)[0].double(), -1)
        want = -torch.stack([logp[len(pids) - 1 + k, t] for k, t in enumerate(g.token_ids)]).mean()
        assert nll[i].item() == pytest.approx(want.item(), rel=1e-5)
    ppl = perplexity(tiny, PROMPTS[:2], gens)
    torch.testing.assert_close(ppl, nll.exp())
    # greedy tokens are likelier than arbitrary text under the same model
    other = perplexity(tiny, PROMPTS[:2], ["zebra quantum marmalade", "Paris"])
    assert ppl.max() < other.min()
    assert math.isnan(completion_nll(tiny, ["Hi"], [""])[0].item())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny, ["Hi"], show_progress=False, **kwargs)


def test_bad_inputs(tiny):
    with pytest.raises(TypeError, match="sequence"):
        generate(tiny, "Hi", show_progress=False)
    with pytest.raises(TypeError, match="ChatExample or str"):
        generate(tiny, [42], show_progress=False)
    with pytest.raises(ValueError, match="one completion per prompt"):
        perplexity(tiny, ["Hi", "Yo"], ["a"])
    assert generate(tiny, [], show_progress=False) == []
