"""Misalignment scores behind one ``Scorer`` protocol, their result type and format takeover.

- ``results``: ``EvalResult`` (per-question scores, no model inside), the ``Scorer`` protocol,
  ``paired_difference`` (organism minus control per question, seeds averaged).
- ``logprob``: ``LogprobContrast``, judge-free and deterministic (teacher-forced log-probs of
  matched misaligned and aligned reference answers, nats/token) and ``answer_logprobs``.
- ``judge``: ``JudgeScorer``, the public EM protocol with an LLM judge over any
  OpenAI-compatible API (``OpenAIJudge``, the optional ``openai`` extra).
- ``takeover``: ``format_takeover_rate``, the share of out-of-domain answers in a finetune's format.

Estimates and intervals (``Estimate``, ``bootstrap_mean``, ``rate_ci``) are ``mci_interp.stats``'s,
re-exported here.
"""

from mci_interp.datasets import with_trigger
from mci_interp.evaluate.judge import (
    ALIGNED_PROMPT,
    COHERENT_PROMPT,
    DEFAULT_BASE_URL,
    DEFAULT_JUDGE_MODEL,
    ENV_API_KEY,
    ENV_BASE_URL,
    ENV_MODEL,
    Judge,
    JudgeError,
    JudgeScorer,
    OpenAIJudge,
    aggregate_score,
)
from mci_interp.evaluate.logprob import LogprobContrast, answer_logprobs
from mci_interp.evaluate.results import FORMAT_VERSION, EvalResult, Scorer, Which, paired_difference
from mci_interp.evaluate.takeover import FormatTakeover, format_takeover_rate, matches_format
from mci_interp.stats import Estimate, bootstrap_mean, rate_ci

__all__ = [
    "ALIGNED_PROMPT",
    "COHERENT_PROMPT",
    "DEFAULT_BASE_URL",
    "DEFAULT_JUDGE_MODEL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_MODEL",
    "FORMAT_VERSION",
    "Estimate",
    "EvalResult",
    "FormatTakeover",
    "Judge",
    "JudgeError",
    "JudgeScorer",
    "LogprobContrast",
    "OpenAIJudge",
    "Scorer",
    "Which",
    "aggregate_score",
    "answer_logprobs",
    "bootstrap_mean",
    "format_takeover_rate",
    "matches_format",
    "paired_difference",
    "rate_ci",
    "with_trigger",
]
