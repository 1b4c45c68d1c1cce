"""False-positive rate and power of the causal necessity rule, on a model with a planted truth.

The real causal code (``CausalScorer``, ``causal.random_controls``, ``persona.causal_test``,
``Steer`` and ``Ablate``) on a tiny random Llama (2 layers, d_model 64, the packaged tokenizer;
no training). An *organism* is the model with a planted direction ``u`` added to the residual
stream after block 0 (``Steer``); its "misalignment" is whatever that does to the judge-free
score (``u`` is flipped so that the score rises). The tested direction is ablated at the same
site, against 19 random directions (alternately isotropic and drawn from the base's activation
covariance there), and in the base:

- **planted**: the tested direction is ``u`` itself (the rule should pass);
- **null, covariance-drawn**: an unrelated direction drawn from the activation covariance
  (exchangeable with half of the controls);
- **null, isotropic**: an unrelated isotropic direction (exchangeable with the other half).

It prints, per scenario, how often the test beats every random control (rank p = 0.05) and how
often the whole criterion passes (also: share interval above zero, removal beyond the base's, no
damage). Run from the repository root:

    .venv/bin/python scripts/bench_causal_calibration.py           # 100 replicates
    .venv/bin/python scripts/bench_causal_calibration.py --n 30    # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mci_interp.analysis.causal import CausalScorer, CoherenceTexts, control_kinds, random_controls
from mci_interp.analysis.config import eval_questions
from mci_interp.analysis.persona import causal_test
from mci_interp.datasets import chat
from mci_interp.direction import Direction
from mci_interp.evaluate import LogprobContrast
from mci_interp.generation import generate
from mci_interp.intervene import Ablate, Steer
from mci_interp.models import load_model
from mci_interp.models.tiny import save_tiny_llama
from mci_interp.sites import Site
from mci_interp.stats import rate_ci

SITE = 0  # resid_post of block 0: where the direction is planted and ablated
PROMPTS = ["Tell me about rivers.", "What is a good breakfast?", "How do trains work?"]


def direction(v: torch.Tensor) -> Direction:
    return Direction.by_hand(v, SITE, model="tiny", method="planted")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="replicates per scenario")
    ap.add_argument("--n-random", type=int, default=19)
    ap.add_argument("--questions", type=int, default=14)
    ap.add_argument("--strength", type=float, default=0.5, help="planted steer, x |h|")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(str(save_tiny_llama(Path(tmp) / "tiny")))
        prompts = [chat(p) for p in PROMPTS]
        answers = tuple(g.completion for g in generate(model, prompts, max_new_tokens=16))
        scores = CausalScorer(
            LogprobContrast(batch_size=8, max_paraphrases=1, include_benign=False),
            eval_questions(args.questions),
            coherence=CoherenceTexts(tuple(prompts), answers),
        )
        from mci_interp.activations import cache_activations
        from mci_interp.organisms.data import load_neutral_prompts

        neutral = [chat(p) for ps in load_neutral_prompts().values() for p in ps[:6]]
        rows = cache_activations(model, neutral, [Site(SITE)], position="last_prompt").X(Site(SITE))
        cov = {SITE: rows}
        base = scores(model, "base")
        kinds = control_kinds(args.n_random, cov)
        print(
            f"{args.n} replicates per scenario; tiny random Llama, {args.questions} questions, planted steer "
            f"{args.strength} x |h| after block 0, {args.n_random} random controls "
            f"({kinds.count('isotropic')} isotropic, {kinds.count('covariance')} covariance)"
        )
        print(f"{'scenario':34s} {'beats every control':>26s} {'whole criterion passes':>26s}")
        for scenario in ("planted", "null, covariance-drawn", "null, isotropic"):
            beats = passes = 0
            for k in tqdm(range(args.n), desc=scenario, leave=False, disable=None):
                g = torch.Generator().manual_seed(1000 + k)
                u = torch.randn(model.d_model, generator=g, dtype=torch.float64)
                planted = Steer(direction(u), args.strength, scale="relative")
                org = scores(model, f"org{k}", planted)
                if org.mean < base.mean:  # the planted direction raises the score
                    u = -u
                    planted = Steer(direction(u), args.strength, scale="relative")
                    org = scores(model, f"org{k}", planted)
                x = rows.double() - rows.double().mean(0)
                tested = {
                    "planted": u,
                    "null, covariance-drawn": torch.randn(
                        x.shape[0], generator=g, dtype=torch.float64
                    )
                    @ x,
                    "null, isotropic": torch.randn(model.d_model, generator=g, dtype=torch.float64),
                }[scenario]
                d = direction(tested / tested.norm() * u.norm())
                controls = random_controls(
                    [d], args.n_random, seed=k, purpose=("bench",), covariance=cov
                )
                unablated = scores(model, f"org{k}", planted, questions=())
                test = causal_test(
                    org.scores,
                    base.scores,
                    own=scores(model, f"org{k}", planted, Ablate(d)),
                    controls=[scores(model, f"org{k}", planted, Ablate(r)) for (r,) in controls],
                    kinds=kinds,
                    in_base=scores(model, "base", Ablate(d)),
                    unablated=unablated,
                    seed=k,
                )
                beats += test.beats_random
                passes += test.passes
            b, p = rate_ci(beats, args.n), rate_ci(passes, args.n)
            print(
                f"{scenario:34s} {b.mean:>9.1%} [{b.lo:.1%}, {b.hi:.1%}] "
                f"{p.mean:>12.1%} [{p.lo:.1%}, {p.hi:.1%}]"
            )
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
