"""The analysis steps called on their own, as a user would on their own directions, models and
questions: steering, transfer and the convergence test, outside ``run_study``."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_provenance

from mci_interp.analysis.causal import CausalScorer
from mci_interp.analysis.config import eval_questions
from mci_interp.analysis.contrasts import MatchedPair, convergence, domain_misalignment
from mci_interp.analysis.records import Record
from mci_interp.analysis.steering import steering
from mci_interp.analysis.transfer import Target, transfer
from mci_interp.direction import Direction
from mci_interp.evaluate import EvalResult, LogprobContrast
from mci_interp.intervene import Ablate, Steer
from mci_interp.organisms.suite import base_organism
from mci_interp.sites import Site
from mci_interp.stats import Estimate

# the names the code before the analysis split gave these scores (see the last test)
PINNED = ["4cd52813ec9adb47.json", "f2b0ea94478a07dd.json"]


def _direction(d_model: int, layer: int, seed: int) -> Direction:
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return Direction(vector=v, site=Site(layer), provenance=make_provenance())


def _scorer(tmp_path=None) -> CausalScorer:
    scorer = LogprobContrast(batch_size=4, max_paraphrases=1, include_benign=False)
    return CausalScorer(
        scorer, eval_questions(2), cache_dir=None if tmp_path is None else tmp_path / "causal"
    )


def test_steering_own_direction_alpha_zero_is_the_unsteered_model(tiny_model):
    scores = _scorer()
    d = _direction(tiny_model.d_model, 1, 0)
    st = steering(tiny_model, {"mine": d}, scores=scores, alphas=(0.0, 1.0), n_random=2, seed=3)
    assert st.directions == ("mine",) and st.alphas == (0.0, 1.0)
    assert st.induced.shape == (1, 2) and st.random_induced.shape == (2, 2)
    # adding nothing changes nothing, for the direction and for its random controls
    assert st.induced[:, 0].tolist() == [0.0] and st.random_induced[:, 0].tolist() == [0.0, 0.0]
    s0 = scores(tiny_model, "base")
    steered = scores(tiny_model, "base", Steer(d, 1.0, scale="relative"))
    assert math.isclose(float(st.induced[0, 1]), steered.mean - s0.mean, abs_tol=1e-12)
    assert st.interval is not None
    lo, hi = st.interval[0, 1].tolist()  # a bootstrap interval over the questions
    assert lo <= float(st.induced[0, 1]) <= hi and lo < hi
    assert st.random_kinds == ("isotropic", "isotropic")  # no covariance given
    assert st.coherence is not None and st.coherence.isnan().all()  # no coherence texts
    again = steering(tiny_model, {"mine": d}, scores=scores, alphas=(0.0, 1.0), n_random=2, seed=3)
    assert torch.equal(again.random_induced, st.random_induced)  # the controls are seeded
    with pytest.raises(ValueError, match="at least one direction"):
        steering(tiny_model, {}, scores=scores, alphas=(1.0,), n_random=1)


def test_transfer_own_directions_measures_only_columns_with_misalignment(
    tiny_model, tmp_path, monkeypatch
):
    scores = _scorer(tmp_path)
    dirs = {
        "a": [_direction(tiny_model.d_model, 1, 1)],
        "b": [_direction(tiny_model.d_model, 1, 2)],
    }
    s0 = scores(tiny_model, "base")
    # the unchanged base as both organisms, pretending it sits 1 nat/token above a reference
    targets = {
        k: Target(organism=base_organism(), score=s0.scores, reference=s0.scores - 1.0)
        for k in "ab"
    }
    mis = {"a": Estimate(1.0, 0.5, 1.5, 2), "b": Estimate(0.0, -1.0, 1.0, 2)}
    tm = transfer(
        tiny_model, dirs, targets, scores=scores, n_random=3, misalignment=mis, show_progress=False
    )
    assert tm.directions == ("a", "b") and tm.organisms == ("a:base", "b:base")
    assert tm.layers == (1,) and tm.gap.tolist() == [1.0, 1.0]
    assert tm.testable(mis) == [0]
    # column b has nothing to remove: not measured
    assert tm.share[:, 1].isnan().all() and tm.random_share[:, 1].isnan().all()
    assert not tm.share[:, 0].isnan().any() and not tm.random_share[:, 0].isnan().any()
    monkeypatch.setattr(LogprobContrast, "score", lambda *a, **k: pytest.fail("scored again"))
    for i, k in enumerate("ab"):  # share = (score - ablated) / (score - reference)
        ablated = scores(tiny_model, "base", Ablate(dirs[k][0]))
        assert math.isclose(float(tm.share[i, 0]), (s0.mean - ablated.mean) / 1.0)
        # the same ablation in the base: here the organism is the base, so it is the same drop
        assert tm.base_removed[i].mean == pytest.approx(s0.mean - ablated.mean)
    assert tm.coherence is not None and tm.coherence.isnan().all()  # no coherence texts
    assert not any(tm.damaged(i, 0) for i in range(2))
    with pytest.raises(ValueError, match="no direction set of their own"):
        transfer(tiny_model, {"a": dirs["a"]}, targets, scores=scores, n_random=1)


def _rec(name: str, acts: torch.Tensor, scores: torch.Tensor) -> Record:
    ids = tuple(f"q{i}" for i in range(scores.numel()))
    res = EvalResult(
        scorer="s", model=name, question_ids=ids, themes=("t",) * len(ids), scores=scores
    )
    return Record(name=name, acts=acts, score=res, indomain=None)


def _pairs(shared: bool, *, n=24, layers=2, d=48, seed=0, control=True):
    """Two domains x two seeds of (organism, control) on the same prompts; each organism is its
    control plus a direction: the same for both domains (``shared``) or one per domain."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, layers, d, generator=g)
    common = torch.randn(d, generator=g)
    out = {}
    for dom in ("finance", "medical"):
        u = common if shared else torch.randn(d, generator=g)
        ps = []
        for s in range(2):
            ctl = base + 0.3 * torch.randn(n, layers, d, generator=g)
            org = ctl + 2.0 * u + 0.3 * torch.randn(n, layers, d, generator=g)
            q = torch.randn(6, generator=g) * 0.01
            ctl_rec = _rec(f"control-{dom}-s{s}", ctl, q) if control else None
            ps.append(MatchedPair(_rec(f"narrow-{dom}-s{s}", org, q + 1.0), ctl_rec))
        out[dom] = ps
    base_rec = _rec("base", base, torch.zeros(6))
    persona = torch.randn(layers, d, generator=g, dtype=torch.float64)
    return out, base_rec, persona


def test_convergence_on_own_activations_finds_a_planted_shared_direction():
    pairs, base, persona = _pairs(shared=True)
    rep = convergence(pairs, base, persona, layers=[0, 1], analysis_layer=1)
    (pair,) = rep.at(1).pairs
    assert pair.cos > 0.9 and pair.beats_null
    # no transfer matrix measured: the verdict can only be "partly"
    assert rep.verdict == "partly" and rep.transfer is None and rep.steer is None
    assert rep.misalignment == domain_misalignment(pairs, base)
    assert all(e.lo > 0 for e in rep.misalignment.values())
    pairs, base, persona = _pairs(shared=False, seed=1)
    rep = convergence(pairs, base, persona, layers=[1], analysis_layer=1)
    assert rep.verdict == "not converged" and not rep.at(1).pairs[0].beats_null


def _responses(shared: bool, *, n_q=20, layers=2, d=48, seed=0):
    """Response records ([2 * questions, layers, d], misaligned answers first) for two domains x
    two seeds of (organism, control): each organism's misaligned-minus-aligned answer means
    differ from its control's by a direction shared across domains or one per domain, on top of
    a large text-driven difference every model shares (what the published no-control cosine
    sees)."""
    g = torch.Generator().manual_seed(seed)
    text = 5.0 * torch.randn(d, generator=g)  # the answers' own difference, in every model
    common = torch.randn(d, generator=g)

    def rec(name, shift):
        ali = torch.randn(n_q, layers, d, generator=g)
        mis = ali + text + shift + 0.3 * torch.randn(n_q, layers, d, generator=g)
        return Record(name=name, acts=torch.cat([mis, ali]), score=None)

    out = {}
    for dom in ("finance", "medical"):
        u = common if shared else torch.randn(d, generator=g)
        out[dom] = [
            MatchedPair(rec(f"narrow-{dom}-s{s}", 2.0 * u), rec(f"control-{dom}-s{s}", 0.0))
            for s in range(2)
        ]
    return out, rec("base", 0.0)


def test_response_mean_contrast_finds_a_planted_shared_direction_and_not_a_specific_one():
    pairs, base, persona = _pairs(shared=False)
    for shared in (True, False):
        resp, rbase = _responses(shared, seed=3)
        rep = convergence(
            pairs,
            base,
            persona,
            layers=[0, 1],
            analysis_layer=1,
            responses=resp,
            base_responses=rbase,
        )
        (pair,) = next(x for x in rep.response_layers if x.layer == 1).pairs
        assert pair.beats_null == shared and (pair.cos > 0.8) == shared
        # the published operationalisation (no control) is high either way: the answer texts
        # set it, and the base's own response direction is as close
        pub = rep.response_published[1]
        assert float(pub[0, 1]) > 0.8 and float(pub[0, 2]) > 0.8
        assert rep.verdict == "not converged"  # the verdict reads the last-prompt-token lens
    with pytest.raises(ValueError, match="base_responses"):
        convergence(pairs, base, persona, layers=[1], analysis_layer=1, responses=resp)


def test_convergence_without_controls_compares_with_the_base_and_checks_its_inputs():
    pairs, base, persona = _pairs(shared=True, control=False)
    rep = convergence(pairs, base, persona, layers=[1], analysis_layer=1)
    lc = rep.at(1)
    assert lc.control_naive_cos.isnan().all()  # no control to compare with the base
    assert lc.null_seed.numel() == 0  # no two controls of one domain: no seed-noise null
    with pytest.raises(ValueError, match="analysis_layer 0 is not among"):
        convergence(pairs, base, persona, layers=[1], analysis_layer=0)
    with pytest.raises(ValueError, match="at least two domains"):
        convergence({"finance": pairs["finance"]}, base, persona, layers=[1], analysis_layer=1)


def test_causal_score_file_names_are_stable(tiny_model, tmp_path):
    """Stored causal scores are found again by name: the name of a known intervention's score
    is pinned, so a change to the key (and a silent recompute of every stored score) fails."""
    scores = _scorer(tmp_path)
    iv = Steer(torch.arange(tiny_model.d_model, dtype=torch.float32) / 64, 2.0, sites=[1])
    scores(tiny_model, "m", iv)
    scores(tiny_model, "m", iv, questions=eval_questions(3))
    assert sorted(p.name for p in (tmp_path / "causal").iterdir()) == PINNED


def test_a_control_more_aligned_than_the_base_is_not_misalignment_to_remove():
    """Organism minus control +1 with the organism no worse than the base (the control moved
    the other way): nothing misaligned to remove, so no transfer counts and the verdict says
    untestable (the public-EM case: bad minus good medical advice, the good finetune aligned)."""
    pairs, base, persona = _pairs(shared=True)
    moved = {
        dom: [
            MatchedPair(
                _rec(p.organism.name, p.organism.acts, p.organism.score.scores - 1.0),
                _rec(p.control.name, p.control.acts, p.control.score.scores - 1.0),
            )
            for p in ps
            if p.control is not None
        ]
        for dom, ps in pairs.items()
    }
    rep = convergence(moved, base, persona, layers=[1], analysis_layer=1)
    assert all(e.lo > 0.9 for e in rep.misalignment.values())  # organism - control: +1
    assert all(e.hi < 0.1 for e in rep.above_base.values())  # organism - base: ~0
    assert all(e.hi < -0.9 for e in rep.control_minus_base.values())  # the control moved
    assert rep.removable == {} and "untestable" in rep.verdict
    assert any("organism - base" in r for r in rep.reasons)


def _coherence_scorer(model, tmp_path=None) -> CausalScorer:
    """A causal scorer whose coherence texts are the model's own greedy answers."""
    from mci_interp.analysis.causal import CoherenceTexts
    from mci_interp.datasets import chat
    from mci_interp.generation import generate

    prompts = tuple(chat(p) for p in ("Tell me about rivers.", "What is a good breakfast?"))
    answers = tuple(g.completion for g in generate(model, list(prompts), max_new_tokens=12))
    scores = _scorer(tmp_path)
    scores.coherence = CoherenceTexts(prompts, answers)
    return scores


def test_causal_scores_keep_every_question_and_the_coherence_loss(
    tiny_model, tmp_path, monkeypatch
):
    import json

    scores = _coherence_scorer(tiny_model, tmp_path)
    d = _direction(tiny_model.d_model, 1, 0)
    s0 = scores(tiny_model, "base")
    assert s0.scores.shape == (2,) and s0.scores.dtype == torch.float64
    assert math.isfinite(s0.coherence) and s0.coherence > 0  # a loss, nats/token
    hard = scores(tiny_model, "base", Steer(d, 8.0, scale="relative"))
    assert hard.coherence > s0.coherence + 0.1  # a big push damages the model's own answers
    assert scores(tiny_model, "base", Steer(d, 0.0, scale="relative")).coherence == s0.coherence
    only = scores(tiny_model, "base", questions=())  # coherence alone, no questions scored
    assert only.scores.numel() == 0 and only.coherence == s0.coherence
    # stored with its per-question scores and read back without scoring
    monkeypatch.setattr(LogprobContrast, "score", lambda *a, **k: pytest.fail("scored again"))
    again = scores(tiny_model, "base", Steer(d, 8.0, scale="relative"))
    assert torch.equal(again.scores, hard.scores) and again.coherence == hard.coherence
    monkeypatch.undo()
    # a file from before per-question scores (a mean only, with a valid checksum, as an older
    # version wrote it) is recomputed, not trusted
    from mci_interp._io import write_json

    files = sorted((tmp_path / "causal").glob("*.json"))
    for f in files:
        write_json(f, {"score": 0.0, "model": "base", "interventions": []})
    assert torch.equal(scores(tiny_model, "base").scores, s0.scores)
    rewritten = [f for f in files if "scores" in json.loads(f.read_text())]
    assert len(rewritten) == 1  # the one asked for, now with its per-question scores


def test_random_controls_alternate_isotropic_and_covariance_shaped():
    from mci_interp.analysis.causal import control_kinds, random_controls

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 48, generator=g, dtype=torch.float64)  # 12 prompts: an 11-dim span
    like = [_direction(48, 2, 5)]
    sets = random_controls(like, 6, seed=0, purpose=("t",), covariance={2: rows})
    assert control_kinds(6, {2: rows}) == ("isotropic", "covariance") * 3
    assert control_kinds(3, None) == ("isotropic",) * 3
    centred = rows - rows.mean(0)
    basis = torch.linalg.svd(centred, full_matrices=False).Vh  # the rows' centred span
    for k, (d,) in enumerate(sets):
        v = d.vector.double()
        assert math.isclose(float(v.norm()), like[0].norm, rel_tol=1e-5)  # norm-matched
        outside = float((v - basis.T @ (basis @ v)).norm() / v.norm())
        # covariance-drawn: inside the span of the activations; isotropic: mostly outside it
        assert (outside < 1e-5) if k % 2 else (outside > 0.5)
    same = random_controls(like, 6, seed=0, purpose=("t",), covariance={2: rows})
    assert all(torch.equal(a[0].vector, b[0].vector) for a, b in zip(sets, same, strict=True))
    # a layer without rows falls back to isotropic
    (other,) = random_controls(like, 2, seed=0, purpose=("t",), covariance={3: rows})[1]
    assert (
        float((other.vector.double() - basis.T @ (basis @ other.vector.double())).norm())
        > 0.5 * like[0].norm
    )


def test_steering_reports_coherence_and_flags_damage(tiny_model):
    scores = _coherence_scorer(tiny_model)
    d = _direction(tiny_model.d_model, 1, 0)
    rows = torch.randn(10, tiny_model.d_model, generator=torch.Generator().manual_seed(1))
    st = steering(
        tiny_model,
        {"mine": d},
        scores=scores,
        alphas=(0.0, 8.0),
        n_random=3,
        seed=0,
        covariance={1: rows},
    )
    assert st.random_kinds == ("isotropic", "covariance", "isotropic")
    assert st.coherence is not None and st.random_coherence is not None
    assert float(st.coherence[0, 0]) == 0.0 and st.random_coherence[:, 0].tolist() == [0.0] * 3
    assert float(st.coherence[0, 1]) > st.damage_nats and st.damaged(0, 1)
    assert not st.damaged(0, 0)
    # rank p against the 3 controls: (1 + #controls at least as strong) / 4
    strong = int((st.random_induced[:, 1] >= st.induced[0, 1]).sum())
    assert st.p_value(0, 1) == (1 + strong) / 4
    assert st.to_dict()["p_value"][0][1] == st.p_value(0, 1)


def test_necessity_test_ablates_in_the_base_too(tiny_model):
    from mci_interp.analysis.persona import NecessityTest

    scores = _coherence_scorer(tiny_model)
    d = _direction(tiny_model.d_model, 1, 0)
    s0 = scores(tiny_model, "base")
    test = NecessityTest(base=tiny_model, scores=scores, layers=[1], n_random=4)
    # the base as its own "organism": ablating in the organism and in the base is the same
    # model under the same ablation, so nothing it removes is specific to the organism, and
    # there is no misalignment (organism minus base) to take a share of
    t = test(base_organism(), [d], score=s0.scores, reference=s0.scores)
    assert len(t.random_shares) == 4 and t.random_kinds == ("isotropic",) * 4
    assert t.base_removed is not None and t.specific is not None
    assert t.specific.mean == pytest.approx(0.0, abs=1e-6)  # the same model both times
    assert t.share is not None and math.isnan(t.share.mean) and t.gap == 0.0
    assert not t.passes and any("than in the base" in f for f in t.failures())
    assert math.isfinite(t.coherence) and abs(t.coherence) < 0.5
    rows = torch.randn(10, tiny_model.d_model, generator=torch.Generator().manual_seed(1))
    cov = NecessityTest(
        base=tiny_model, scores=scores, layers=[1], n_random=2, covariance={1: rows}
    )(base_organism(), [d], score=s0.scores, reference=s0.scores)
    assert cov.random_kinds == ("isotropic", "covariance")
