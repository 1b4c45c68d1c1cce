"""Memory and switching cost of LoRA adapters sharing one base (``base.load_adapter`` /
``with base.adapter(name)``) against the base alone and against merged copies (``merge_adapter``,
what the pipeline did before).

    .venv/bin/python scripts/bench_adapters.py                      # packaged SmolLM2, fp32
    .venv/bin/python scripts/bench_adapters.py --score-questions 14 # + merged-vs-unmerged scores

Peak memory is the peak resident set (``getrusage``) of a fresh subprocess per case, so one
case's allocations never count for another: imports only, the base alone, the base plus the
adapters (loaded, each run once), and the base plus one merged copy per adapter. Adapters come
from the organism cache of the model (``cache_root()/organisms/<sha256[:12]>``) when it holds
enough, else freshly initialised peft LoRA adapters (rank 8 on every linear layer, like the
suite's) saved to a temporary folder. Prints measured numbers only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SUITE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _ids(model: Any) -> Any:
    import torch

    ids = model.tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]
    return torch.tensor([ids], device=model.device)


def child(case: str, model_name: str, dtype: str, adapters: list[str]) -> dict[str, Any]:
    """One case in this (fresh) process; returns its numbers."""
    import torch

    from mci_interp.models import load_model, merge_adapter

    out: dict[str, Any] = {"case": case}
    if case == "imports":
        out["peak_rss_mb"] = _peak_rss_mb()
        return out
    base = load_model(model_name, dtype=dtype)
    ids = _ids(base)
    base.logits(ids)
    n_params = sum(p.numel() * p.element_size() for p in base.hf.parameters())
    if case == "adapters":
        names = [base.load_adapter(a) for a in adapters]
        for n in names:
            with base.adapter(n) as org:
                org.logits(ids)
                n_params = sum(p.numel() * p.element_size() for p in org.hf.parameters())
    elif case == "merged":
        copies = [merge_adapter(base, a) for a in adapters]
        for c in copies:
            c.logits(ids)
        n_params += sum(p.numel() * p.element_size() for c in copies for p in c.hf.parameters())
    del torch
    out["peak_rss_mb"] = _peak_rss_mb()
    out["param_mb"] = n_params / 2**20
    return out


def _run_child(case: str, args: argparse.Namespace, adapters: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", case, "--model", args.model, "--dtype", args.dtype]
    cmd += ["--adapters", *adapters]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _find_or_make_adapters(args: argparse.Namespace, tmp: Path) -> tuple[list[str], str]:
    from mci_interp._io import cache_root
    from mci_interp.models import load_model

    if args.adapters:
        return list(args.adapters), "given"
    base = load_model(args.model, dtype=args.dtype)
    cached = sorted(
        p.parent
        for p in (cache_root() / "organisms" / base.sha256[:12]).glob("*/adapter_config.json")
    )
    if len(cached) >= args.n_adapters:
        return [str(p) for p in cached[: args.n_adapters]], "organism cache"
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    made = []
    for i in range(args.n_adapters):
        torch.manual_seed(i)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=SUITE_TARGETS, init_lora_weights=False)
        pm = get_peft_model(copy.deepcopy(base.hf), cfg)
        pm.save_pretrained(tmp / f"fresh{i}")
        made.append(str(tmp / f"fresh{i}"))
    return made, "fresh rank-8 LoRA (all linear layers)"


def _median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(args: argparse.Namespace, adapters: list[str]) -> None:
    import torch

    from mci_interp.models import load_model, merge_adapter

    base = load_model(args.model, dtype=args.dtype)
    ids = _ids(base)
    names = [base.load_adapter(a) for a in adapters]
    k = iter(range(10**9))

    def switch() -> None:  # enter the next adapter's block and leave it
        with base.adapter(names[next(k) % len(names)]):
            pass

    switch()
    t_switch = _median_s(switch, args.repeats)
    t_fwd_base = _median_s(lambda: base.logits(ids), 5)
    with base.adapter(names[0]) as org:
        t_fwd_lora = _median_s(lambda: org.logits(ids), 5)
    base.unload_adapters()
    t_load = _median_s(lambda: (base.load_adapter(adapters[0]), base.unload_adapters()), 3)
    t_merge = _median_s(lambda: merge_adapter(base, adapters[0]), 3)
    print(
        f"switch adapters (enter + leave a block), median of {args.repeats}: {t_switch * 1e3:.2f} ms"
    )
    print(f"load + unload one adapter (organism_model, not preloaded), median of 3: {t_load:.3f} s")
    print(f"merge_adapter (a merged copy, the old path), median of 3: {t_merge:.3f} s")
    print(
        f"forward of {ids.shape[1]} tokens: base {t_fwd_base * 1e3:.1f} ms, with an unmerged "
        f"adapter {t_fwd_lora * 1e3:.1f} ms ({t_fwd_lora / t_fwd_base:.2f}x)"
    )
    del torch


def scores(args: argparse.Namespace, adapters: list[str]) -> None:
    """LogprobContrast as a study record scores it: merged copy against the unmerged adapter."""
    from mci_interp.analysis.config import eval_questions
    from mci_interp.evaluate import LogprobContrast
    from mci_interp.models import load_model, merge_adapter

    base = load_model(args.model, dtype=args.dtype)
    qs = eval_questions(args.score_questions)
    scorer = LogprobContrast(batch_size=16, max_paraphrases=1, include_benign=False)
    worst, worst_mean, t_m, t_u = 0.0, 0.0, [], []
    for a in adapters:
        merged = merge_adapter(base, a)
        t0 = time.perf_counter()
        s_m = scorer.score(merged, qs, show_progress=False)
        t_m.append(time.perf_counter() - t0)
        del merged
        name = base.load_adapter(a)
        with base.adapter(name) as org:
            t0 = time.perf_counter()
            s_u = scorer.score(org, qs, show_progress=False)
            t_u.append(time.perf_counter() - t0)
        base.adapters.delete(name)
        diff = (s_m.scores - s_u.scores).abs().max().item()
        mean_diff = abs(s_m.scores.mean().item() - s_u.scores.mean().item())
        worst, worst_mean = max(worst, diff), max(worst_mean, mean_diff)
        print(
            f"  {Path(a).name}: mean score merged {s_m.scores.mean().item():+.6f}, unmerged "
            f"{s_u.scores.mean().item():+.6f}; max |per-question diff| {diff:.2e}; "
            f"scored in {t_m[-1]:.2f} s merged, {t_u[-1]:.2f} s unmerged"
        )
    print(
        f"LogprobContrast on {len(qs)} questions: max |score diff| merged vs unmerged "
        f"{worst:.2e} (per question), {worst_mean:.2e} (mean); time unmerged / merged "
        f"{sum(t_u) / sum(t_m):.3f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--adapters", nargs="*", default=None, help="adapter dirs or hub ids")
    ap.add_argument("--n-adapters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=50, help="switches timed (median)")
    ap.add_argument("--score-questions", type=int, default=0, help="also compare scores")
    ap.add_argument("--scores-only", action="store_true", help="skip memory and switch timing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.dtype, args.adapters or [])))
        return
    with tempfile.TemporaryDirectory() as d:
        adapters, where = _find_or_make_adapters(args, Path(d))
        print(f"model {args.model} ({args.dtype}); {len(adapters)} adapters from {where}:")
        for a in adapters:
            print(f"  {a}")
        if args.scores_only:
            scores(args, adapters)
            return
        res = {c: _run_child(c, args, adapters) for c in ("imports", "base", "adapters", "merged")}
        imp, base, ad, mg = (
            res[c]["peak_rss_mb"] for c in ("imports", "base", "adapters", "merged")
        )
        n = len(adapters)
        print(f"peak RSS, imports only:           {imp:8.0f} MiB")
        print(
            f"peak RSS, base alone:             {base:8.0f} MiB (parameters {res['base']['param_mb']:.0f} MiB)"
        )
        print(
            f"peak RSS, base + {n} adapters:      {ad:8.0f} MiB (parameters "
            f"{res['adapters']['param_mb']:.0f} MiB): {ad / base:.3f}x the base alone, "
            f"{(ad - imp) / (base - imp):.3f}x above the imports"
        )
        print(
            f"peak RSS, base + {n} merged copies: {mg:8.0f} MiB (parameters "
            f"{res['merged']['param_mb']:.0f} MiB): {mg / base:.3f}x, "
            f"{(mg - imp) / (base - imp):.3f}x above the imports"
        )
        timings(args, adapters)
        if args.score_questions:
            scores(args, adapters)


if __name__ == "__main__":
    main()
