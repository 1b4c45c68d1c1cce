"""False-positive rate and power of the convergence test, measured on simulated studies.

Runs the real ``layer_convergence`` on synthetic studies (``mci_interp.analysis.simulate``)
with a known answer and prints, per scenario, how often a pair beats the null ("partly" from
the cosines) and how often every pair does, for the current rule and for the rule it replaced
(two-sided |cos| against the 95th percentile of the isotropic and seed-noise nulls, no
correction over pairs). Under the null (no shared direction) the rate should be <= alpha = 5%.

    .venv/bin/python scripts/bench_calibration.py            # 200 studies per scenario
    .venv/bin/python scripts/bench_calibration.py --n 50     # quicker
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from mci_interp.analysis.convergence import layer_convergence
from mci_interp.analysis.simulate import synthetic_study
from mci_interp.stats import quantile, rate_ci

SCENARIOS = [  # (label, shared strength, mismatch)
    ("null", 0.0, 0.0),
    ("null, misaligned directions steeper than the noise", 0.0, 1.0),
    ("shared 0.25", 0.25, 0.0),
    ("shared 0.5", 0.5, 0.0),
    ("shared 1.0", 1.0, 0.0),
    ("shared 2.0", 2.0, 0.0),
]


def old_rule(lc) -> list[bool]:
    """The rule before this benchmark: the CI's lower end above the larger 95th percentile of
    |cos| under the isotropic and the seed-noise null, each pair on its own."""
    bar = max(
        quantile(lc.null_random.abs(), 0.95),
        quantile(lc.null_seed.abs(), 0.95) if lc.null_seed.numel() else 0.0,
    )
    return [p.ci[0] > bar for p in lc.pairs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="simulated studies per scenario")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--d-model", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"{args.n} simulated studies per scenario: 3 domains x 3 seeds, 42 prompts, "
        f"d_model {args.d_model}, {args.n_boot} bootstrap resamples; rates with 95% Wilson CIs"
    )
    print(
        f"{'scenario':52s} {'any pair (now)':>22s} {'all pairs (now)':>22s} {'any pair (old)':>22s}"
    )
    t0 = time.perf_counter()
    for label, shared, mismatch in SCENARIOS:
        any_now = all_now = any_old = 0
        for r in tqdm(range(args.n), desc=label, leave=False):
            study = synthetic_study(shared=shared, mismatch=mismatch, d_model=args.d_model, seed=r)
            lc = layer_convergence(0, *study.layer_inputs(), n_boot=args.n_boot, seed=r)
            beats = [p.beats_null for p in lc.pairs]
            any_now += any(beats)
            all_now += all(beats)
            any_old += any(old_rule(lc))
        cells = [rate_ci(k, args.n) for k in (any_now, all_now, any_old)]
        print(
            f"{label:52s} "
            + " ".join(f"{e.mean:6.1%} [{e.lo:5.1%},{e.hi:6.1%}]".rjust(22) for e in cells)
        )
    print(f"{time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
