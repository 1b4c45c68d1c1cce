"""Benchmark: the judge-free scorer with and without prompt-prefix sharing (prints measured ratios).

Scores the packaged out-of-domain questions on SmolLM2 (or --model) both ways, interleaved
``--repeats`` times in one process so both see the same machine load, and prints the median wall
time of each, the speed-up, the token counts and the largest difference between the two results
(they must agree up to float rounding). As a study scores: the misaligned and aligned reference
answers, one paraphrase. ``--steer`` scores under a middle-layer steering hook, the way the
study's causal sweeps do; ``--persona`` under the persona system prompt, as a candidate condition
is scored.

    .venv/bin/python scripts/bench_scorer.py                 # ~2 min on 2 cores
    .venv/bin/python scripts/bench_scorer.py --questions 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--steer", action="store_true", help="score under a steering hook")
    ap.add_argument(
        "--persona", action="store_true", help="under the packaged persona system prompt"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mci_interp.datasets import chat, encode_chat
    from mci_interp.evaluate import LogprobContrast
    from mci_interp.intervene import Steer, apply
    from mci_interp.models import load_model
    from mci_interp.organisms.data import PERSONA_SYSTEM_PROMPT, load_default_questions

    model = load_model(args.model)
    qs = load_default_questions()[: args.questions]
    ivs = []
    if args.steer:
        d = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
        ivs = [Steer(d, 1.0, sites=[model.n_layers // 2], scale="relative")]
    system = PERSONA_SYSTEM_PROMPT if args.persona else None
    # token counts: every sequence in full vs the prefix all prompts share once, each prompt's
    # rest once, plus the answers
    encs = [
        [
            encode_chat(model.tokenizer, chat(q.paraphrases[0], a, system=system or q.system))
            for r in q.references
            for a in (r.aligned, r.misaligned)
        ]
        for q in qs
    ]
    flat = [e for es in encs for e in es]
    common = next(
        j for j in range(min(e.prompt_len for e in flat)) if len({e.ids[j] for e in flat}) > 1
    )
    full = sum(len(e.ids) for e in flat)
    shared = common + sum(
        es[0].prompt_len - 1 - common + sum(len(e.ids) - e.prompt_len + 1 for e in es)
        for es in encs
    )

    times: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, torch.Tensor] = {}
    LogprobContrast(
        batch_size=args.batch_size, max_paraphrases=1, include_benign=False
    ).score(  # warm-up
        model, qs[:2], show_progress=False
    )
    for _ in range(args.repeats):
        for share in (False, True):
            scorer = LogprobContrast(
                batch_size=args.batch_size,
                max_paraphrases=1,
                include_benign=False,
                share_prefix=share,
            )
            with apply(model, *ivs):
                t0 = time.perf_counter()
                res = scorer.score(model, qs, system=system, show_progress=False)
                times[share].append(time.perf_counter() - t0)
            results[share] = res.scores
    t_sep, t_sh = statistics.median(times[False]), statistics.median(times[True])
    diff = float((results[True] - results[False]).abs().max())
    print(
        f"{model.name}: {len(qs)} questions, threads {torch.get_num_threads()}, "
        f"{'steered' if ivs else 'plain'}, {'persona prompt' if system else 'no system prompt'}, "
        f"{args.repeats} repeats (median)"
    )
    print(
        f"  tokens run: separate {full}, shared prefixes {shared} ({shared / full:.2f}x; "
        f"{common} tokens shared by every prompt)"
    )
    print(f"  separate forwards: {t_sep:.2f}s  ({len(qs) / t_sep:.2f} questions/s)")
    print(f"  shared prefix:     {t_sh:.2f}s  ({len(qs) / t_sh:.2f} questions/s)")
    print(f"  speed-up: {t_sep / t_sh:.2f}x; max |score difference| {diff:.2e} nats/token")


if __name__ == "__main__":
    main()
