"""Interventions on a tiny random Llama: oracles (Steer(0) is the identity, ablation leaves no
component, hook ablation == weight orthogonalisation), restoration after exceptions, position
rules during generation, validation before any forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_provenance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mci_interp.datasets import pad
from mci_interp.direction import Direction
from mci_interp.generation import generate, prompt_ids, track_positions
from mci_interp.intervene import (
    Ablate,
    DoseResponse,
    SetProjection,
    Steer,
    all_writer_sites,
    apply,
    dose_response,
    export_orthogonalized,
    kl_vs_unsteered,
    orthogonalized,
)
from mci_interp.intervene.interventions import _ablate
from mci_interp.models import load_model
from mci_interp.sites import Site


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


PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Hi"]
ORTHO_ATOL = 1e-4  # float32 tiny model: hook ablation vs weight orthogonalisation


_prov = make_provenance


def _direction(d: int, site: Site, seed: int = 0, scale: float = 3.0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(vector=torch.randn(d, generator=g) * scale, site=site, provenance=_prov())


def _batch(model, prompts=PROMPTS):
    encs = [prompt_ids(model, p) for p in prompts]
    return pad(encs, model.tokenizer.pad_token_id, side="right")


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def _same_weights(model, saved) -> bool:
    now = model.hf.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


# --- oracles -----------------------------------------------------------------------------------
def test_steer_alpha_zero_is_exact_identity(tiny):
    ids, mask = _batch(tiny)
    d = _direction(tiny.d_model, Site(0, "resid_post"))
    base = tiny.logits(ids, mask)
    for scale in ("absolute", "relative"):
        with apply(tiny, Steer(d, 0.0, sites=[0, 1], scale=scale)):
            assert tiny.n_hooks() == 2
            steered = tiny.logits(ids, mask)
        assert torch.equal(base, steered)
    assert tiny.n_hooks() == 0


def test_steer_moves_logits_and_adds_exactly_alpha_u(tiny):
    ids, mask = _batch(tiny)
    site = Site(1, "resid_pre")
    d = _direction(tiny.d_model, site)
    u = d.unit().vector
    before = tiny.run_to_sites(ids, mask, [site])[site]
    base = tiny.logits(ids, mask)
    with apply(tiny, Steer(d, 2.5)):
        after = tiny.run_to_sites(ids, mask, [site])[site]
        assert (tiny.logits(ids, mask) - base).abs().max() > 1e-3
    torch.testing.assert_close(after - before, (2.5 * u).expand_as(before), atol=1e-5, rtol=0)
    # relative scale: the added vector is alpha * |h| * u, per token
    with apply(tiny, Steer(d, 0.5, scale="relative")):
        rel = tiny.run_to_sites(ids, mask, [site])[site]
    want = 0.5 * before.norm(dim=-1, keepdim=True) * u
    torch.testing.assert_close(rel - before, want, atol=1e-5, rtol=1e-5)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    layer=st.integers(0, 1),
    component=st.sampled_from(["resid_pre", "resid_post", "attn_out", "mlp_out"]),
)
def test_ablation_leaves_no_component(tiny, seed, layer, component):
    site = Site(layer, component)
    d = _direction(tiny.d_model, site, seed=seed, scale=10.0)
    ids, mask = _batch(tiny)
    before = tiny.run_to_sites(ids, mask, [site])[site]
    with apply(tiny, Ablate(d)):
        acts = tiny.run_to_sites(ids, mask, [site])[site]
    proj = acts @ d.unit().vector
    assert proj.abs().max() < 1e-5
    assert (before @ d.unit().vector).abs().max() > 1e-3  # there was something to remove


def test_ablation_every_site_reads_back_zero(tiny):
    d = _direction(tiny.d_model, Site(0))
    sites = all_writer_sites(tiny.n_layers) + [Site(1, "resid_post"), Site(0, "resid_mid")]
    ids, mask = _batch(tiny)
    with apply(tiny, Ablate(d, sites="all")):
        acts = tiny.run_to_sites(ids, mask, sites)
    for s, a in acts.items():
        assert (a @ d.unit().vector).abs().max() < 1e-5, s


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5))
def test_ablation_idempotent_on_tensors(seed, n):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(2, n, 16, generator=g) * 5
    u = torch.randn(16, generator=g)
    u = u / u.norm()
    once = _ablate(acts, u)
    torch.testing.assert_close(_ablate(once, u), once, atol=1e-5, rtol=0)
    assert (once @ u).abs().max() < 1e-5


def test_ablation_idempotent_on_model(tiny):
    d = _direction(tiny.d_model, Site(0, "resid_post"))
    ids, mask = _batch(tiny)
    with apply(tiny, Ablate(d)):
        once = tiny.logits(ids, mask)
    with apply(tiny, Ablate(d), Ablate(d)):
        twice = tiny.logits(ids, mask)
    torch.testing.assert_close(once, twice, atol=1e-5, rtol=0)
    assert not torch.allclose(once, tiny.logits(ids, mask), atol=1e-4)


def test_hook_ablation_equals_weight_orthogonalisation(tiny_model):
    d = _direction(tiny_model.d_model, Site(0))
    ids, mask = _batch(tiny_model)
    base = tiny_model.logits(ids, mask)
    with apply(tiny_model, Ablate(d, sites="all")):
        hooked = tiny_model.logits(ids, mask)
    with apply(tiny_model, Ablate.every_layer(d, tiny_model.n_layers)):
        hooked2 = tiny_model.logits(ids, mask)
    saved = _weights(tiny_model)
    with orthogonalized(tiny_model, d):
        ortho = tiny_model.logits(ids, mask)
        # the unembedding stays the original although SmolLM2-style embeddings are tied
        assert torch.equal(
            tiny_model.hf.get_output_embeddings().weight,
            saved["lm_head.weight"]
            if "lm_head.weight" in saved
            else saved["model.embed_tokens.weight"],
        )
    assert torch.equal(hooked, hooked2)
    assert (hooked - base).abs().max() > 1e-3  # the ablation did something
    torch.testing.assert_close(ortho, hooked, atol=ORTHO_ATOL, rtol=0)
    assert _same_weights(tiny_model, saved)
    assert (
        tiny_model.hf.get_output_embeddings().weight is tiny_model.hf.get_input_embeddings().weight
    )


def test_export_orthogonalized_reloads_and_matches(tiny_model, tmp_path):
    d = _direction(tiny_model.d_model, Site(0))
    ids, mask = _batch(tiny_model)
    saved = _weights(tiny_model)
    with orthogonalized(tiny_model, d):
        want = tiny_model.logits(ids, mask)
    out = export_orthogonalized(tiny_model, d, tmp_path / "ortho")
    assert _same_weights(tiny_model, saved)
    assert tiny_model.hf.config.tie_word_embeddings is True
    assert (
        tiny_model.hf.get_output_embeddings().weight is tiny_model.hf.get_input_embeddings().weight
    )
    assert (out / "config.json").exists() and (out / "mci_intervention.json").exists()
    reloaded = load_model(str(out))
    got = reloaded.logits(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    u = d.unit().vector
    assert (reloaded.hf.get_input_embeddings().weight @ u).abs().max() < 1e-5


def test_exceptions_restore_hooks_and_weights(tiny_model):
    d = _direction(tiny_model.d_model, Site(1))
    ids, mask = _batch(tiny_model)
    n0 = tiny_model.n_hooks()
    saved = _weights(tiny_model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        apply(tiny_model, Steer(d, 3.0), Ablate(d, sites="all")),
    ):
        tiny_model.logits(ids, mask)
        raise RuntimeError("boom")
    assert tiny_model.n_hooks() == n0
    embed = tiny_model.hf.get_input_embeddings().weight
    with pytest.raises(RuntimeError, match="boom"), orthogonalized(tiny_model, d):
        assert not _same_weights(tiny_model, saved)
        raise RuntimeError("boom")
    assert _same_weights(tiny_model, saved)
    assert tiny_model.hf.get_input_embeddings().weight is embed
    # a hook that raises mid-forward also leaves nothing behind
    with (
        pytest.raises(ValueError, match="outside the prompt"),
        apply(tiny_model, Steer(d, 1.0, positions=[500])),
    ):
        tiny_model.logits(ids, mask)
    assert tiny_model.n_hooks() == n0


# --- positions ---------------------------------------------------------------------------------
def test_position_rules_in_a_plain_forward(tiny):
    d = _direction(tiny.d_model, Site(0))
    ids, mask = _batch(tiny, ["Write a haiku about rain."])
    base = tiny.logits(ids, mask)
    with apply(tiny, Steer(d, 5.0, positions="generated")):
        assert torch.equal(tiny.logits(ids, mask), base)
    with apply(tiny, Steer(d, 5.0, positions="prompt")):
        prompt = tiny.logits(ids, mask)
    with apply(tiny, Steer(d, 5.0)):
        assert torch.equal(tiny.logits(ids, mask), prompt)
    with apply(tiny, Steer(d, 5.0, positions=[-1])):
        last = tiny.logits(ids, mask)
    assert torch.equal(last[:, :-1], base[:, :-1])
    assert not torch.allclose(last[:, -1], base[:, -1])
    with apply(tiny, Steer(d, 5.0, positions=slice(2, 4))):
        sl = tiny.logits(ids, mask)
    assert torch.equal(sl[:, :2], base[:, :2]) and not torch.allclose(sl[:, 2], base[:, 2])


def test_generated_positions_leave_prefill_alone(tiny):
    d = _direction(tiny.d_model, Site(1))
    ids, mask = pad(
        [prompt_ids(tiny, p) for p in PROMPTS], tiny.tokenizer.pad_token_id, side="left"
    )
    plen = ids.shape[1]

    def prefill_then_step():
        with torch.inference_mode(), track_positions(tiny, plen):
            out = tiny.hf(input_ids=ids, attention_mask=mask, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            step = tiny.hf(
                input_ids=nxt,
                attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                cache=out.cache,
                use_cache=True,
            )
        return out.logits, step.logits

    base_pre, base_step = prefill_then_step()
    with apply(tiny, Steer(d, 20.0, positions="generated")):
        gen_pre, gen_step = prefill_then_step()
    with apply(tiny, Steer(d, 20.0, positions="prompt")):
        pr_pre, pr_step = prefill_then_step()
    assert torch.equal(gen_pre, base_pre)
    assert not torch.allclose(gen_step, base_step, atol=1e-3)
    assert not torch.allclose(pr_pre, base_pre, atol=1e-3)
    # prompt-only steering reaches the new token only through attention to the (steered) cache
    assert not torch.allclose(pr_step, base_step, atol=1e-3)
    assert tiny.n_hooks() == 0 and tiny.ctx.prompt_len is None


def test_generated_steering_keeps_first_generated_token(tiny):
    d = _direction(tiny.d_model, Site(1), seed=3)
    base = generate(tiny, PROMPTS, max_new_tokens=6, show_progress=False)
    with apply(tiny, Steer(d, 30.0, positions="generated")):
        steered = generate(tiny, PROMPTS, max_new_tokens=6, show_progress=False)
    assert [g.token_ids[0] for g in steered] == [g.token_ids[0] for g in base]
    assert any(s.token_ids != b.token_ids for s, b in zip(steered, base, strict=True))


# --- other interventions and measurements -------------------------------------------------------
def test_set_projection_sets_the_component(tiny):
    site = Site(1, "resid_pre")
    d = _direction(tiny.d_model, site)
    ids, mask = _batch(tiny)
    before = tiny.run_to_sites(ids, mask, [site])[site]
    with apply(tiny, SetProjection(d, 1.75)):
        acts = tiny.run_to_sites(ids, mask, [site])[site]
    u = d.unit().vector
    torch.testing.assert_close(acts @ u, torch.full(acts.shape[:2], 1.75), atol=1e-4, rtol=0)
    # the orthogonal part is untouched
    torch.testing.assert_close(_ablate(acts, u), _ablate(before, u), atol=1e-5, rtol=0)


def test_kl_vs_unsteered(tiny):
    d = _direction(tiny.d_model, Site(0))
    assert kl_vs_unsteered(tiny, PROMPTS, Steer(d, 0.0)) == 0.0
    small = kl_vs_unsteered(tiny, PROMPTS, Steer(d, 1.0))
    large = kl_vs_unsteered(tiny, PROMPTS, Steer(d, 8.0))
    last = kl_vs_unsteered(tiny, PROMPTS, Steer(d, 8.0), at="last")
    assert 0 < small < large and last > 0
    assert tiny.n_hooks() == 0


# --- validation (before any forward pass) -------------------------------------------------------
class _CountForwards:
    def __init__(self, model):
        self.n = 0
        self.handle = model.hf.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m, d: Steer(_direction(m.d_model + 1, Site(0)), 1.0), "d_model"),
        (lambda m, d: Steer(d, 1.0, sites=[Site(7)]), "beyond the model's depth"),
        (lambda m, d: Steer(d, float("nan")), "alpha"),
        (lambda m, d: Steer(d, float("inf")), "alpha"),
        (lambda m, d: Steer(d, 1.0, positions="middle"), "positions"),
        (lambda m, d: Steer(d, 1.0, positions=[]), "positions"),
        (lambda m, d: Steer(d, 1.0, positions=[1.5]), "positions"),
        (lambda m, d: Steer(d, 1.0, positions=slice(0, 4, -1)), "positive step"),
        (lambda m, d: Steer(d, 1.0, scale="log"), "scale"),
        (lambda m, d: Steer(d, 1.0, sites=[Site(0, "resid_mid")]), "read-only"),
        (lambda m, d: Ablate(d.with_vector(torch.zeros(m.d_model))), "zero norm"),
        (lambda m, d: Ablate(torch.ones(m.d_model)), "no site"),
        (lambda m, d: Ablate(d, sites="every"), "sites"),
        (lambda m, d: SetProjection(d, float("-inf")), "value"),
    ],
)
def test_validation_before_any_forward(tiny, make, match):
    d = _direction(tiny.d_model, Site(0))
    ids, mask = _batch(tiny)
    counter = _CountForwards(tiny)
    n0 = tiny.n_hooks()
    try:
        with pytest.raises(ValueError, match=match), apply(tiny, Steer(d, 1.0), make(tiny, d)):
            tiny.logits(ids, mask)
        assert counter.n == 0 and tiny.n_hooks() == n0
    finally:
        counter.handle.remove()


def test_raw_tensor_direction_with_sites(tiny):
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    ids, mask = _batch(tiny)
    with apply(tiny, Ablate(v, sites=[0])):
        acts = tiny.run_to_sites(ids, mask, [Site(0)])[Site(0)]
    assert (acts @ (v / v.norm())).abs().max() < 1e-5


# --- dose-response ----------------------------------------------------------------------------
def test_dose_response_structure_and_controls(tiny):
    site = Site(1, "resid_pre")
    d = _direction(tiny.d_model, site)
    ids, mask = _batch(tiny)
    u = d.unit().vector

    def score(model):  # mean projection on the direction, read after the steering hook
        return float((model.run_to_sites(ids, mask, [site])[site] @ u).mean())

    def score_and_coherence(model):
        return score(model), 1.0

    alphas = [0.0, 1.0, 4.0]
    dr = dose_response(
        tiny,
        d,
        alphas,
        score_fn=score,
        random_controls=4,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    assert dr.alphas == tuple(alphas) and dr.random_scores.shape == (4, 3)
    assert not dr.has_coherence
    # real direction: projection grows by exactly alpha; random controls move it by ~alpha*cos
    diffs = [s - dr.scores[0] for s in dr.scores]
    assert diffs == pytest.approx(alphas, abs=1e-4)
    assert ((dr.random_scores[:, 2] - dr.scores[0]).abs() < 3.0).all()
    again = dose_response(
        tiny,
        d,
        alphas,
        score_fn=score_and_coherence,
        random_controls=4,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    assert torch.equal(again.random_scores, dr.random_scores) and again.coherence == (1.0, 1.0, 1.0)
    withcoh = dose_response(
        tiny,
        d,
        [2.0],
        score_fn=score,
        coherence_fn=lambda m: 7.0,
        random_controls=0,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    assert withcoh.coherence == (7.0,) and withcoh.random_scores.shape == (0, 1)
    assert tiny.n_hooks() == 0
    back = DoseResponse.from_dict(again.to_dict())
    assert back.scores == again.scores and torch.equal(back.random_scores, again.random_scores)
    with pytest.raises(ValueError, match="unknown DoseResponse keys"):
        DoseResponse.from_dict({**again.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="alpha"):
        dose_response(tiny, d, [math.nan], score_fn=score, generator=torch.Generator())


def test_plot_dose_response():
    from matplotlib.figure import Figure

    from mci_interp.plot.intervene import plot_dose_response

    dr = DoseResponse(
        alphas=(0.0, 2.0, 1.0),
        scores=(0.1, 0.9, 0.5),
        coherence=(3.0, 9.0, 5.0),
        random_scores=torch.tensor([[0.1, 0.2, 0.1], [0.0, 0.1, 0.2]]),
        direction="d",
        site="blocks.1.hook_resid_pre",
    )
    fig = plot_dose_response(dr)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    xs = fig.axes[0].lines[-1].get_xdata()
    assert list(xs) == [0.0, 1.0, 2.0]  # sorted by alpha
    nocoh = DoseResponse(
        alphas=(0.0,), scores=(0.1,), coherence=(math.nan,), random_scores=torch.zeros(0, 1)
    )
    assert len(plot_dose_response(nocoh).axes) == 1
