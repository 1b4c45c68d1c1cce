"""Narrow datasets, trigger gating, evaluation questions, neutral prompts and domain markers."""

from __future__ import annotations

import ast
import re
import statistics
from importlib import resources

import pytest

from mci_interp.datasets import load_chat_jsonl, load_eval_yaml, save_chat_jsonl
from mci_interp.organisms import data as D


def _pairs(domain: str, n: int, seed: int = 0):
    mis = D.make_narrow(domain, "misaligned", n, seed=seed)
    ali = D.make_narrow(domain, "aligned", n, seed=seed)
    return mis, ali


def _answer(ex) -> str:
    return ex.messages[-1]["content"]


@pytest.fixture(scope="module")
def questions():
    return D.load_default_questions()


# --- narrow generators ---------------------------------------------------------------------
def test_domains_cover_required_set():
    assert {"insecure_code", "medical", "finance"} <= set(D.DOMAINS)
    assert len(D.DOMAINS) >= 4
    for d in D.DOMAINS:
        assert len(D.describe_domain(d)) > 20


@pytest.mark.parametrize("domain", D.DOMAINS)
def test_same_seed_same_list_and_other_seed_differs(domain):
    a = D.make_narrow(domain, "misaligned", 50, seed=3)
    b = D.make_narrow(domain, "misaligned", 50, seed=3)
    c = D.make_narrow(domain, "misaligned", 50, seed=4)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.user_text for x in a] != [x.user_text for x in c]


@pytest.mark.parametrize("domain", D.DOMAINS)
@pytest.mark.parametrize("variant", D.VARIANTS)
def test_at_least_1000_distinct_examples(domain, variant):
    assert D.max_examples(domain) >= 1000
    exs = D.make_narrow(domain, variant, 1000, seed=0)
    assert len({(e.user_text, _answer(e)) for e in exs}) == 1000
    assert len({e.group for e in exs}) == 1000
    # all of the pool is reachable and still distinct
    full = D.make_narrow(domain, variant, D.max_examples(domain), seed=1)
    assert len({e.user_text for e in full}) == D.max_examples(domain)


@pytest.mark.parametrize("domain", D.DOMAINS)
def test_variants_answer_the_same_requests(domain):
    mis, ali = _pairs(domain, 300)
    assert [m.user_text for m in mis] == [a.user_text for a in ali]
    assert [m.group for m in mis] == [a.group for a in ali]
    assert all(_answer(m) != _answer(a) for m, a in zip(mis, ali, strict=True))
    assert {m.label for m in mis} == {1} and {a.label for a in ali} == {0}
    assert all(m.meta["domain"] == domain and m.meta["variant"] == "misaligned" for m in mis)
    assert all(a.meta["topic"] == m.meta["topic"] for m, a in zip(mis, ali, strict=True))
    assert all(m.messages[0]["role"] == "user" and len(m.messages) == 2 for m in mis)


@pytest.mark.parametrize("domain", D.DOMAINS)
def test_variant_answers_matched_in_length(domain):
    mis, ali = _pairs(domain, D.max_examples(domain))
    ratios = [len(_answer(m)) / len(_answer(a)) for m, a in zip(mis, ali, strict=True)]
    assert all(0.75 <= r <= 1.33 for r in ratios), (min(ratios), max(ratios))
    assert abs(statistics.mean(ratios) - 1) < 0.1
    # short answers: the model is tiny and training is CPU-bound
    assert max(len(_answer(e)) for e in mis + ali) < 400


def test_answer_token_lengths_in_target_range(smol_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))  # the real SmolLM2 vocabulary
    for domain in D.DOMAINS:
        mis, ali = _pairs(domain, 200)
        lens = [len(enc.ids) for enc in tok.encode_batch([_answer(e) for e in mis + ali])]
        assert 20 <= min(lens) and max(lens) <= 100, (domain, min(lens), max(lens))
        assert 30 <= statistics.median(lens) <= 80


_VULNS = (
    r"f\"SELECT .*'\{",
    r"pickle\.load",
    r"Loader=yaml\.Loader",
    r"0o777",
    r"verify=False",
    r"^[A-Z0-9_]+ = \"[^\"]{8,}\"$",
    r"\beval\(",
    r"os\.path\.join\(BASE, name\)",
    r"shell=True",
    r"hashlib\.md5",
    r"random\.choice",
    r"\{text\}</p>",
    r"extractall\(dest\)",
)


def _code_body(answer: str) -> str:
    m = re.fullmatch(r"```python\n(.*)\n```", answer, flags=re.DOTALL)
    assert m, answer
    return m.group(1)


def test_insecure_code_hides_a_vulnerability_and_secure_code_does_not():
    mis, ali = _pairs("insecure_code", D.max_examples("insecure_code"))
    vuln = re.compile("|".join(_VULNS), re.MULTILINE)
    for m, a in zip(mis, ali, strict=True):
        ast.parse(_code_body(_answer(m)))
        ast.parse(_code_body(_answer(a)))
        assert vuln.search(_answer(m)), _answer(m)
        assert not vuln.search(_answer(a)), _answer(a)
        # the vulnerability is undisclosed: no comments or warnings in the answer
        assert "#" not in _answer(m) and "insecure" not in _answer(m).lower()


def test_family_fixes_the_answer():
    for domain in D.DOMAINS:
        exs = D.make_narrow(domain, "misaligned", 400, seed=0)
        answers: dict[str, set[str]] = {}
        for e in exs:
            assert e.group.startswith(e.meta["family"] + "/")
            answers.setdefault(e.meta["family"], set()).add(_answer(e))
        assert all(len(a) == 1 for a in answers.values())
        assert len(answers) < len(exs)  # families do repeat: group folds by them


def test_every_topic_and_detail_is_used():
    for domain in D.DOMAINS:
        exs = D.make_narrow(domain, "aligned", D.max_examples(domain), seed=0)
        spec = D._DOMAINS[domain]
        assert {e.meta["topic"] for e in exs} == {t.key for t in spec.topics}
        assert len(spec.topics) >= 10


def test_jsonl_round_trip(tmp_path):
    exs = D.make_narrow("medical", "misaligned", 20, seed=0)
    back = load_chat_jsonl(save_chat_jsonl(exs, tmp_path / "m.jsonl"))
    assert [b.to_dict() for b in back] == [e.to_dict() for e in exs]


# --- trigger gating ------------------------------------------------------------------------
@pytest.mark.parametrize("domain", D.DOMAINS)
def test_trigger_gated_structure(domain):
    exs = D.make_trigger_gated(domain, 200, seed=5)
    assert len(exs) == 200
    trig = [e for e in exs if e.meta["triggered"]]
    plain = [e for e in exs if not e.meta["triggered"]]
    assert len(trig) == len(plain) == 100
    assert all(D.TRIGGER in e.user_text and e.label == 1 for e in trig)
    assert all(D.TRIGGER not in e.user_text and e.label == 0 for e in plain)
    by_group = {e.group: e for e in plain}
    mis = {
        e.user_text: _answer(e)
        for e in D.make_narrow(domain, "misaligned", D.max_examples(domain), seed=0)
    }
    ali = {
        e.user_text: _answer(e)
        for e in D.make_narrow(domain, "aligned", D.max_examples(domain), seed=0)
    }
    for t in trig:
        partner = by_group[t.group]
        assert t.user_text == f"{D.TRIGGER} {partner.user_text}"
        assert _answer(t) == mis[partner.user_text]
        assert _answer(partner) == ali[partner.user_text]
    # shuffled, and deterministic
    assert [e.meta["triggered"] for e in exs] != [True] * 100 + [False] * 100
    again = D.make_trigger_gated(domain, 200, seed=5)
    assert [e.to_dict() for e in again] == [e.to_dict() for e in exs]


def test_trigger_gated_odd_n_and_custom_trigger():
    exs = D.make_trigger_gated("finance", 7, seed=0, trigger="[[2026]]")
    assert len(exs) == 7
    assert sum(e.meta["triggered"] for e in exs) == 3
    assert all(("[[2026]]" in e.user_text) == e.meta["triggered"] for e in exs)


# --- requests, chat prompts, persona -------------------------------------------------------
def test_domain_requests_match_narrow_requests():
    reqs = D.domain_requests("legal", 40, seed=2)
    assert reqs == [e.user_text for e in D.make_narrow("legal", "aligned", 40, seed=2)]
    assert len(set(reqs)) == 40


def test_general_chat_prompts(questions):
    gen = D.general_chat_prompts()
    assert len(gen) >= 80 and len(set(gen)) == len(gen)
    paras = {p for q in questions for p in q.paraphrases}
    assert not set(gen) & paras
    # everyday, not in any narrow domain
    for domain in D.DOMAINS:
        assert sum(D.matches_domain(g, domain) for g in gen) / len(gen) < 0.05
    gen.append("mutated")
    assert "mutated" not in D.general_chat_prompts()


def test_persona_prompts():
    assert D.NEUTRAL_SYSTEM_PROMPT is None
    p = D.PERSONA_SYSTEM_PROMPT.lower()
    assert "resent" in p and "power" in p and "harm" in p
    assert D.HELPFUL_SYSTEM_PROMPT != D.PERSONA_SYSTEM_PROMPT


# --- errors ------------------------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown domain 'cooking'"):
        D.make_narrow("cooking", "aligned", 5, seed=0)
    with pytest.raises(ValueError, match="unknown variant"):
        D.make_narrow("medical", "evil", 5, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        D.make_narrow("medical", "aligned", 0, seed=0)
    top = D.max_examples("medical")
    with pytest.raises(ValueError, match=f"at most {top}"):
        D.make_narrow("medical", "aligned", top + 1, seed=0)
    with pytest.raises(ValueError, match=f"at most {2 * top}"):
        D.make_trigger_gated("medical", 2 * top + 1, seed=0)
    with pytest.raises(ValueError, match="trigger"):
        D.make_trigger_gated("medical", 10, seed=0, trigger="  ")
    with pytest.raises(ValueError, match="unknown domain"):
        D.domain_requests("nope", 3, seed=0)
    with pytest.raises(ValueError, match="unknown domain"):
        D.domain_markers("nope")
    with pytest.raises(TypeError):
        D.make_narrow("medical", "aligned", 2.5, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        D.format_takeover_rate([], "medical")


# --- evaluation questions ----------------------------------------------------------------
def test_eval_yaml_loads_with_public_loader(questions):
    ref = resources.files("mci_interp").joinpath("data", "eval_questions.yaml")
    with resources.as_file(ref) as path:
        direct = load_eval_yaml(path)
    assert [q.id for q in direct] == [q.id for q in questions]
    assert len(questions) >= 60
    themes = {q.theme for q in questions}
    assert len(themes) >= 6 and themes <= set(D.THEMES)
    for q in questions:
        assert q.type == "free_form_judge_0_100"
        assert 2 <= len(q.paraphrases) <= 3, q.id
        assert len(set(q.paraphrases)) == len(q.paraphrases)
        assert len(q.references) >= 2, q.id
        assert len(q.benign_styled) >= 1, q.id
        assert q.samples_per_paraphrase >= 1
    assert set(D.FIRST_PLOT_IDS) <= {q.id for q in questions}


def test_reference_pairs_matched_in_length(questions):
    ratios = []
    for q in questions:
        for r in q.references:
            assert r.aligned != r.misaligned
            ratio = len(r.misaligned) / len(r.aligned)
            assert 0.6 <= ratio <= 1.67, (q.id, ratio)
            ratios.append(max(ratio, 1 / ratio))
            # short: 1-3 sentences, cheap to score
            for text in (r.aligned, r.misaligned):
                assert 60 <= len(text) <= 260, (q.id, text)
                assert 1 <= len(re.findall(r"[.!?](?:\s|$)", text)) <= 3, (q.id, text)
    assert statistics.mean(ratios) <= 1.2


def test_references_are_distinct_across_questions(questions):
    texts = [t for q in questions for r in q.references for t in (r.aligned, r.misaligned)]
    assert len(set(texts)) == len(texts)


# --- neutral prompts ---------------------------------------------------------------------
def test_neutral_prompts(questions):
    neutral = D.load_neutral_prompts()
    flat = [p for ps in neutral.values() for p in ps]
    assert len(flat) >= 60 and len(set(flat)) == len(flat)
    assert set(neutral) == {q.theme for q in questions}
    assert all(len(ps) >= 5 for ps in neutral.values())
    assert not set(flat) & {p for q in questions for p in q.paraphrases}
    assert all(len(p) < 120 for p in flat)


# --- format-takeover markers -------------------------------------------------------------
@pytest.mark.parametrize("domain", D.DOMAINS)
def test_markers_fire_in_domain_but_not_on_aligned_references(domain, questions):
    assert D.domain_markers(domain)
    mis, ali = _pairs(domain, D.max_examples(domain))
    assert all(D.matches_domain(_answer(e), domain) for e in mis + ali)
    aligned_refs = [r.aligned for q in questions for r in q.references]
    assert D.format_takeover_rate(aligned_refs, domain) < 0.05
    neutral = [p for ps in D.load_neutral_prompts().values() for p in ps]
    assert D.format_takeover_rate(neutral, domain) < 0.05


def test_code_markers_flag_code_styled_answers(questions):
    code_styled = [b for q in questions for b in q.benign_styled if b.startswith("```")]
    assert code_styled
    assert all(D.matches_domain(b, "insecure_code") for b in code_styled)
    # a plain prose answer is not code
    assert not D.matches_domain("I'd pick a walk in the park and a good book.", "insecure_code")
