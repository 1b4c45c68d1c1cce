"""What a study measures on: its settings (``StudyConfig``), the prompt and question sets they
select, and the provenance of a direction measured on those prompts."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mci_interp.datasets import ChatExample, EvalQuestion, ReferencePair, chat
from mci_interp.direction import Direction, Provenance
from mci_interp.organisms.data import load_default_questions, load_neutral_prompts, make_heldout
from mci_interp.sites import Site

if TYPE_CHECKING:
    from mci_interp.models import HookedModel


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyConfig:
    """Sample sizes and settings of a study (every field is recorded in the results)."""

    analysis_layer: int | None = None  # default: the middle block
    n_neutral_per_theme: int = 6
    n_questions: int = 14
    # the trained personas' behaviour (the trigger gate and its leak, the distilled persona's
    # default) and their causal tests: small effects, so scored on more questions
    n_gate_questions: int = 64
    n_indomain: int = 12
    n_takeover: int = 8
    takeover_tokens: int = 32
    ablate_offsets: tuple[int, ...] = (-2, 0, 2)
    steer_alphas: tuple[float, ...] = (0.5, 1.0)
    # random directions per causal test (alternately isotropic and drawn from the base's
    # activation covariance): beating all 19 is rank p = 0.05, the least that can claim 5%
    n_random: int = 19
    convergence_layer_step: int = 3
    # the SAE lens (``analysis.latents``): an SAE of ``sae_expansion`` x d_model latents trained
    # on ``sae_training_samples`` rows of the base's activations on the broad corpus (with
    # ``sae_corpus_per_domain`` examples per packaged domain and variant), unless one is given;
    # a domain's rising latents are its top ``sae_top_k``; the named latents are steered into
    # the base at ``sae_steer_alpha`` x the residual norm (0.5x already broke SmolLM2)
    sae_expansion: int = 4
    sae_training_samples: int = 1_000_000
    sae_corpus_per_domain: int = 40
    sae_top_k: int = 20
    sae_steer_alpha: float = 0.25
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if (
                f.name.startswith(("n_", "sae_"))
                and f.name != "sae_steer_alpha"
                or f.name
                in (
                    "batch_size",
                    "takeover_tokens",
                )
            ):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"StudyConfig.{f.name} must be an integer >= 1, got {v!r}")
        if self.convergence_layer_step < 1:
            raise ValueError(
                f"StudyConfig.convergence_layer_step must be >= 1, got {self.convergence_layer_step}"
            )
        if not self.steer_alphas or not self.ablate_offsets:
            raise ValueError("StudyConfig.steer_alphas and ablate_offsets must be non-empty")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def fast(cls, **overrides: Any) -> StudyConfig:
        """Tiny sample sizes for CI, notebooks and smoke runs (minutes, not tens of minutes)."""
        small: dict[str, Any] = dict(
            n_neutral_per_theme=4,
            n_questions=7,
            n_gate_questions=7,
            n_indomain=6,
            n_takeover=6,
            takeover_tokens=24,
            steer_alphas=(0.5,),
            n_random=2,
            convergence_layer_step=6,
            sae_expansion=2,
            sae_training_samples=40_000,
            sae_corpus_per_domain=6,
            sae_top_k=10,
        )
        return cls(**(small | overrides))

    def analysis_layer_of(self, n_layers: int) -> int:
        """The layer the verdicts are read at: ``analysis_layer``, or the middle block."""
        layer = self.analysis_layer if self.analysis_layer is not None else n_layers // 2
        Site(layer).check(n_layers)
        return layer

    def convergence_layers(self, n_layers: int) -> list[int]:
        """Every ``convergence_layer_step``-th layer, and the analysis layer."""
        step = range(0, n_layers, self.convergence_layer_step)
        return sorted(set(step) | {self.analysis_layer_of(n_layers)})

    def ablation_layers(self, n_layers: int) -> list[int]:
        """The few layers around the analysis layer where a direction is ablated, all at once
        (``ablate_offsets``, clipped to the model)."""
        layer = self.analysis_layer_of(n_layers)
        return sorted({min(max(layer + o, 0), n_layers - 1) for o in self.ablate_offsets})


def neutral_prompts(config: StudyConfig) -> tuple[list[ChatExample], list[str]]:
    """Neutral out-of-domain prompts (no instruction), balanced over themes."""
    exs, themes = [], []
    for theme, prompts in sorted(load_neutral_prompts().items()):
        for i, p in enumerate(prompts[: config.n_neutral_per_theme]):
            exs.append(chat(p, group=f"{theme}:{i}", theme=theme))
            themes.append(theme)
    return exs, themes


def eval_questions(n: int) -> list[EvalQuestion]:
    """A theme-balanced subset of ``n`` of the packaged out-of-domain questions (first-plot ones
    first; all of them when ``n`` is larger)."""
    qs = load_default_questions()
    by_theme: dict[str, list[EvalQuestion]] = {}
    for q in qs:
        by_theme.setdefault(q.theme, []).append(q)
    out: list[EvalQuestion] = []
    while len(out) < min(n, len(qs)):
        for theme in sorted(by_theme):
            if by_theme[theme] and len(out) < n:
                out.append(by_theme[theme].pop(0))
    return out


def indomain_questions(domain: str, n: int, *, seed: int = 10_000) -> list[EvalQuestion]:
    """Held-out in-domain requests with their misaligned/aligned answers as reference pairs.

    They come from the domain's held-out topics (``split: test`` in its data file,
    ``organisms.data.make_heldout``), whose request and answer templates no training set uses,
    so no question or reference answer is one a finetune was trained on. One request per topic
    x details family first, spread over the topics, so the ``n`` references differ as long as
    ``n`` is at most the number of held-out families; ``seed`` picks which.
    """
    mis = make_heldout(domain, "misaligned", n, seed=seed)
    ali = make_heldout(domain, "aligned", n, seed=seed)
    return [
        EvalQuestion(
            id=m.group or str(i),
            paraphrases=(m.user_text,),
            theme=domain,
            references=(ReferencePair(a.messages[-1]["content"], m.messages[-1]["content"]),),
        )
        for i, (m, a) in enumerate(zip(mis, ali, strict=True))
    ]


def neutral_direction(
    vector: Tensor,
    layer: int,
    *,
    base: HookedModel,
    name: str,
    method: str,
    n_prompts: int,
    dataset_hash: str,
) -> Direction:
    """A direction measured as a mean difference over ``n_prompts`` neutral prompts (last prompt
    token, resid_post of ``layer``) of models built on ``base``."""
    return Direction(
        vector=vector.float(),
        site=Site(layer),
        provenance=Provenance(
            model=name,
            base_model=base.name,
            model_sha256=base.sha256,
            method=method,
            dataset="neutral_prompts",
            dataset_hash=dataset_hash,
            position="last_prompt",
            n_pos=n_prompts,
            n_neg=n_prompts,
            params={},
        ),
    )
