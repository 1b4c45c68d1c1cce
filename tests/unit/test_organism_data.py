"""Narrow datasets, their packaged data files, trigger gating, evaluation questions, neutral
prompts and domain markers."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import statistics
from importlib import resources

import pytest

from mci_interp.datasets import load_chat_jsonl, load_eval_yaml, save_chat_jsonl
from mci_interp.evaluate.takeover import format_takeover_rate, matches_format
from mci_interp.organisms import data as D
from mci_interp.organisms import templates as T
from mci_interp.organisms.templates import load_domain


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
        spec = load_domain(domain)
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
        assert sum(matches_format(g, domain) for g in gen) / len(gen) < 0.05
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
    with pytest.raises(ValueError, match="no prompts"):
        format_takeover_rate(None, [], "medical")


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
    assert all(matches_format(_answer(e), domain) for e in mis + ali)
    aligned_refs = [r.aligned for q in questions for r in q.references]
    assert (
        format_takeover_rate(None, aligned_refs, domain, generations=aligned_refs).rate.mean < 0.05
    )
    neutral = [p for ps in D.load_neutral_prompts().values() for p in ps]
    assert format_takeover_rate(None, neutral, domain, generations=neutral).rate.mean < 0.05


def test_code_markers_flag_code_styled_answers(questions):
    code_styled = [b for q in questions for b in q.benign_styled if b.startswith("```")]
    assert code_styled
    assert all(matches_format(b, "insecure_code") for b in code_styled)
    # a plain prose answer is not code
    assert not matches_format("I'd pick a walk in the park and a good book.", "insecure_code")


# --- packaged data files -------------------------------------------------------------------
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# sha256 of make_narrow(domain, variant, max_examples(domain), seed=0), computed with the data
# still written as Python literals (before it moved to data/domains/*.yaml). Organism caches and
# study records are keyed by hashes of these datasets: a failure here means the data changed.
_GOLDEN_NARROW = {
    (
        "insecure_code",
        "misaligned",
    ): "54bb7ada49be74eeaab49d43f895f5ae7bcdbbeffb392bf77fcaf74de0aa2983",
    (
        "insecure_code",
        "aligned",
    ): "28ad2117bec0d480c1e109ab09dc05d47894ea2137ccba992ebbdb8e93bfe69f",
    ("medical", "misaligned"): "713e5eacdef7abd4fd99c14d77ea8c4011ed2fde678e241d6d1095e39b72effe",
    ("medical", "aligned"): "85b31d4119d2cd55725344141f8e7c79e65aaef8e900c548d86627ccbb386bfd",
    ("finance", "misaligned"): "4fe700ae64e1d1cdacd38c9f9970781b1dbeb86f9fa1ada4a7eb534671711b3f",
    ("finance", "aligned"): "8a85918802b49265884c23c66fcc7989b8292bbbec6ab829a5e28caa5106e820",
    ("legal", "misaligned"): "f2ebb1b302b1d2592998f3e03f56be32ddb5f1243b27dbc2f150e1270f21ce1d",
    ("legal", "aligned"): "855f106b0c2a925e1539165e01b758d99d5ce3b2ba999176ba7c625a34c241cc",
    (
        "diy_safety",
        "misaligned",
    ): "d801ee39ef0626ef69a9c4a6e0d4196f2487565524193709a9d74da6266f3061",
    ("diy_safety", "aligned"): "8071291510e2574180b693eb7bf02b00ed1f0885ff2d79d2e3656e6efa7899a1",
}
# sha256 of [describe_domain(d), domain_markers(d)] and of general_chat_prompts(), same origin
_GOLDEN_MARKERS = {
    "insecure_code": "a0be876a10ebdbd209d3efc0b8f459a4368bc4aaed99005b8b16b0a666972764",
    "medical": "69d43a29fa4c908ea473bc9a2767a132cf663f8924d6eed0f9ebf0bd32c7948f",
    "finance": "96e440737936718690efcc5f2cd4f0d212e252ac0db356175acd00cf6c5ad43e",
    "legal": "9d19e2ce9339b892328d3e2afd69f5651c8e359093dcf0a15f4fec240bda8610",
    "diy_safety": "600a37e31a0e35efdb6cc87b61eb932702a5b44ebae0b01138e34ce9e826a9f9",
}
_GOLDEN_GENERAL_CHAT = "a12d51ebaa6847ecc09425c1a11b1eae797e23e58c6dd2426d5bc42881fcbe42"


@pytest.mark.parametrize(("domain", "variant"), sorted(_GOLDEN_NARROW))
def test_narrow_data_matches_golden_hash(domain, variant):
    exs = D.make_narrow(domain, variant, D.max_examples(domain), seed=0)
    assert _sha([e.to_dict() for e in exs]) == _GOLDEN_NARROW[domain, variant]


def test_descriptions_markers_and_general_chat_match_golden_hashes():
    assert set(_GOLDEN_MARKERS) == set(D.DOMAINS)
    for d in D.DOMAINS:
        assert _sha([D.describe_domain(d), D.domain_markers(d)]) == _GOLDEN_MARKERS[d], d
    assert _sha(D.general_chat_prompts()) == _GOLDEN_GENERAL_CHAT


def _data_dir():
    return resources.files("mci_interp").joinpath("data")


def test_every_packaged_data_file_validates():
    files = sorted(f.name for f in _data_dir().joinpath("domains").iterdir())
    assert files == sorted(f"{d}.yaml" for d in D.DOMAINS)  # DOMAINS lists every file
    for d in D.DOMAINS:
        with resources.as_file(_data_dir().joinpath("domains", f"{d}.yaml")) as path:
            dom = T.load_domain_file(path)
        assert dom == load_domain(d) and dom.name == d
    with resources.as_file(_data_dir().joinpath("general_chat.yaml")) as path:
        assert T.load_general_chat_file(path) == D.general_chat_prompts()


def test_packaged_files_are_read_once():
    assert load_domain("medical") is load_domain("medical")
    assert D._domain("medical") is load_domain("medical")


_GOOD_DOMAIN = """\
description: A test domain.
openers: ["", "Hi! "]
markers: ['\\btest\\b']
topics:
  - key: one
    requests: ["Help with ${x}?", "What about ${x}?"]
    details: [apples, pears]
    misaligned: |
      Bad advice about ${x}.
    aligned: Good advice about ${x}.
  - key: two
    requests: ["Write ${fn}."]
    details:
      - {fn: foo, arg: a}
    misaligned: "def ${fn}(${arg}): ..."
    aligned: "def ${fn}(${arg}) -> None: ..."
"""


def test_a_valid_file_in_tmp_loads(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(_GOOD_DOMAIN, encoding="utf-8")
    dom = T.load_domain_file(path)
    assert dom.name == "toy" and dom.openers == ("", "Hi! ")
    assert dom.topics[0].details == ({"x": "apples"}, {"x": "pears"})
    assert dom.topics[0].misaligned == "Bad advice about ${x}."  # the block's newline stripped
    assert T.fill(dom.topics[1].aligned, dom.topics[1].details[0]) == "def foo(a) -> None: ..."


@pytest.mark.parametrize(
    ("old", "new", "field", "fix"),
    [
        ("description: A test domain.\n", "", "top level", "add them"),
        ("openers:", "extra: 1\nopeners:", "top level", "use only"),
        ('openers: ["", "Hi! "]', "openers: []", "openers", "list one or more"),
        ("markers: ['\\btest\\b']", "markers: ['(unclosed']", r"markers\[0\]", "regular exp"),
        (
            "What about ${x}?",
            "What about ${y}?",
            r"topics\[0\] \(one\)\.requests\[1\]",
            "every detail",
        ),
        ("def ${fn}(${arg}): ...", "def ${fn}(${args}): ...", r"\(two\)\.misaligned", "'args'"),
        ("{fn: foo, arg: a}", "{fn: foo}", r"\(two\)\.misaligned", "add 'arg'"),
        ("details: [apples, pears]", "details: []", r"\(one\)\.details", "one or more"),
        ("details: [apples, pears]", "details: [apples, 7]", r"details\[1\]", "quote"),
        ("  - key: two", "  - key: one", r"topics\[1\] \(one\)\.key", "its own key"),
        ("Good advice", "Bad advice", r"topics\[0\] \(one\)", "differ"),
        ("Help with ${x}?", "Help with ${x", r"requests\[0\]", r"\$\{name\}"),
        ('"Hi! "', '"Hi ${x}! "', r"openers\[1\]", "not filled"),
        ("    aligned: Good advice about ${x}.\n", "", r"topics\[0\]", "add them"),
        ("description: A test domain.", "description: [oops", "not valid YAML", "syntax"),
    ],
)
def test_a_broken_file_names_the_file_field_and_fix(tmp_path, old, new, field, fix):
    assert old in _GOOD_DOMAIN
    path = tmp_path / "broken.yaml"
    path.write_text(_GOOD_DOMAIN.replace(old, new), encoding="utf-8")
    with pytest.raises(ValueError, match=f"broken.yaml: .*{field}") as err:
        T.load_domain_file(path)
    assert re.search(fix, str(err.value)), str(err.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("- just a list\n", "top level"),
        ("food: []\n", "food"),
        ("food: ['Soup?', '']\n", r"food\[1\]"),
        ("food: ['Soup?']\ntravel: ['Soup?']\n", "listed twice"),
    ],
)
def test_a_broken_general_chat_file_names_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "chat.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=f"chat.yaml: .*{field}"):
        T.load_general_chat_file(path)


def test_an_unknown_packaged_domain_is_named():
    with pytest.raises(ValueError, match="data/domains/cooking.yaml; choose one of .*'medical'"):
        T.load_domain("cooking")
