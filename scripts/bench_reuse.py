"""Benchmark: a causal test's scores with and without ``HookedModel.reuse_below`` (prints ratios).

A causal test scores one model under one direction and ``--n-random`` norm-matched random
controls, all at the same layers (the study's necessity and transfer tests ablate at the analysis
layer and 2 either side; steering adds at the analysis layer). Both ways run in one process,
alternating ``--repeats`` times so both see the same machine load; it prints the median wall time
of a whole test each way, the speed-up, and whether every score is bit-identical.

    .venv/bin/python scripts/bench_reuse.py                    # ~3 min on 2 cores
    .venv/bin/python scripts/bench_reuse.py --steer --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", type=int, default=14)
    ap.add_argument("--n-random", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steer", action="store_true", help="steer at the middle layer, not ablate")
    args = ap.parse_args()

    from mci_interp.evaluate import LogprobContrast
    from mci_interp.intervene import Ablate, Steer, apply
    from mci_interp.models import load_model
    from mci_interp.organisms.data import load_default_questions

    model = load_model(args.model)
    qs = load_default_questions()[: args.questions]
    mid = model.n_layers // 2
    layers = [mid] if args.steer else [mid - 2, mid, mid + 2]
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(model.d_model, generator=g) for _ in range(1 + args.n_random)]
    if args.steer:
        ivs = [Steer(d, 0.5, sites=layers, scale="relative") for d in dirs]
    else:
        ivs = [Ablate(d, sites=layers) for d in dirs]
    scorer = LogprobContrast(batch_size=16, max_paraphrases=1, include_benign=False)
    scorer.score(model, qs[:2], show_progress=False)  # warm-up

    def test(reuse: bool) -> tuple[float, list[torch.Tensor]]:
        ctx = model.reuse_below(min(layers)) if reuse else contextlib.nullcontext()
        out = []
        t0 = time.perf_counter()
        with ctx:
            for iv in ivs:
                with apply(model, iv):
                    out.append(scorer.score(model, qs, show_progress=False).scores)
        return time.perf_counter() - t0, out

    times: dict[bool, list[float]] = {False: [], True: []}
    scores: dict[bool, list[torch.Tensor]] = {}
    for _ in range(args.repeats):
        for reuse in (False, True):
            t, scores[reuse] = test(reuse)
            times[reuse].append(t)
    full, reused = statistics.median(times[False]), statistics.median(times[True])
    same = all(torch.equal(a, b) for a, b in zip(scores[False], scores[True], strict=True))
    what = "steer" if args.steer else "ablate"
    print(
        f"{model.name}: {what} at layers {layers}, {len(ivs)} scores of {len(qs)} questions per "
        f"test, threads {torch.get_num_threads()}, {args.repeats} repeats (median)"
    )
    print(f"  full forwards      {full:7.1f} s per test")
    print(f"  reuse_below({min(layers):2d})    {reused:7.1f} s per test")
    print(f"  speed-up {full / reused:.2f}x; scores bit-identical: {same}")


if __name__ == "__main__":
    main()
