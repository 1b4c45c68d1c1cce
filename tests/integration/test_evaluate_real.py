"""LogprobContrast on the real SmolLM2 with the packaged questions: finite, deterministic, and a
hostile-persona system prompt moves the score (paired over questions)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from mci_interp.evaluate import LogprobContrast, paired_difference
from mci_interp.organisms.data import PERSONA_SYSTEM_PROMPT, load_default_questions

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def questions():
    qs = load_default_questions()
    return qs[:: len(qs) // 6][:6]  # spread over themes


def test_logprob_contrast_real_finite_deterministic_and_persona_shift(smol, questions):
    sc = LogprobContrast(max_paraphrases=1, batch_size=16)
    a = sc.score(smol, questions, show_progress=False)
    b = sc.score(smol, questions[:3], show_progress=False)  # rerun (a subset, to save time)
    assert a.n == 6 and len(set(a.themes)) >= 3
    assert torch.isfinite(a.scores).all() and torch.isfinite(a.style[~torch.isnan(a.style)]).all()
    torch.testing.assert_close(a.scores[:3], b.scores, rtol=0, atol=1e-6)
    assert all(len(p) >= 2 for p in a.detail["pair_scores"])
    persona = sc.score(smol, questions, system=PERSONA_SYSTEM_PROMPT, show_progress=False)
    diff = paired_difference(persona, a, n_boot=1000)
    log.info("persona minus no system prompt, %d questions: %s", diff.n, diff)
    assert math.isfinite(diff.mean) and diff.n == 6
    # a hostile-AI system prompt makes SmolLM2 prefer the misaligned references (measured on
    # 24 packaged questions: +0.115 [+0.070, +0.166] nats/token, 21 of 24 questions positive)
    assert diff.mean > 0, str(diff)
