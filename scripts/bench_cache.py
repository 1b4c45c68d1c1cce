"""Benchmark: activation caching speed and streaming memory on SmolLM2 (prints measured ratios).

Compares, in one run and on the same token batches:
  bare   - a Hugging Face forward pass truncated after the deepest requested block (the limit)
  mci    - mci_interp.activations.cache_activations at the same sites
  tl     - TransformerLens HookedTransformer.run_with_cache() with default arguments
and reports peak RSS of streaming statistics at 1x and 10x the prompts (separate processes),
plus the bf16 speed-up and the cosine between bf16 and fp32 mean activations.

    .venv/bin/python scripts/bench_cache.py            # ~3 min on 2 cores
    .venv/bin/python scripts/bench_cache.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import torch


def prompts(n: int):
    from mci_interp.datasets import chat

    topics = [
        "the ocean",
        "tax law",
        "jazz",
        "volcanoes",
        "friendship",
        "bread",
        "chess",
        "rain",
        "bicycles",
        "printing",
        "bees",
        "the moon",
        "trains",
        "tea",
        "glass",
        "maps",
    ]
    asks = [
        "Explain {} to a child.",
        "Write two sentences about {}.",
        "What is surprising about {}?",
        "Give me a fun fact about {} and why it matters.",
        "How would you teach {} in a week?",
    ]
    out = []
    for i in range(n):
        t, a = topics[i % len(topics)], asks[(i // len(topics)) % len(asks)]
        out.append(chat(a.format(t) + f" (#{i})", group=str(i)))
    return out


def batches(model, examples, bs):
    from mci_interp.datasets import encode_chat, pad

    encs = sorted((encode_chat(model.tokenizer, e) for e in examples), key=lambda e: len(e.ids))
    return [
        pad([e.ids for e in encs[i : i + bs]], model.tokenizer.pad_token_id)
        for i in range(0, len(encs), bs)
    ]


def time_it(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rss_child(n: int, layer: int) -> None:
    from mci_interp.activations import stream_statistics
    from mci_interp.models import load_model
    from mci_interp.sites import Site

    torch.set_num_threads(2)
    m = load_model()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stream_statistics(m, prompts(n), [Site(layer)], position="last_prompt", show_progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "peak_mb": peak / 1024, "after_load_mb": base / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--layer", type=int, default=15, help="deepest requested block")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-tl", action="store_true")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child is not None:
        return rss_child(a.rss_child, a.layer)
    if a.quick:
        a.n_prompts, a.repeats = 24, 1
    torch.set_num_threads(2)
    from mci_interp.activations import cache_activations
    from mci_interp.models import load_model, to_hooked_transformer
    from mci_interp.sites import Site

    model = load_model()
    exs = prompts(a.n_prompts)
    sites = [Site(layer) for layer in (a.layer // 2, a.layer)]
    bs = batches(model, exs, a.batch_size)
    n_tok = sum(int(m.sum()) for _, m in bs)
    print(
        f"SmolLM2-135M, {a.n_prompts} chat prompts = {n_tok} tokens, batch {a.batch_size}, "
        f"sites {[s.hook_name for s in sites]}, torch threads {torch.get_num_threads()}"
    )

    truncated = copy.deepcopy(model.hf)
    truncated.model.layers = truncated.model.layers[: a.layer + 1]

    def bare():
        with torch.inference_mode():
            for ids, mask in bs:
                truncated.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def mci(m=model):
        cache_activations(
            m, exs, sites, position="last_prompt", batch_size=a.batch_size, show_progress=False
        )

    rows = {}
    bare()  # warm-up
    rows["bare HF, truncated"] = time_it(bare, a.repeats)
    rows["mci cache_activations"] = time_it(mci, a.repeats)
    if not a.skip_tl:
        ht = to_hooked_transformer(model)

        def tl():
            with torch.inference_mode():
                for ids, mask in bs:
                    ht.run_with_cache(ids, attention_mask=mask)

        rows["TL run_with_cache() defaults"] = time_it(tl, max(1, a.repeats - 1))
        del ht
    bf = load_model(dtype="bfloat16")
    rows["mci cache_activations bf16"] = time_it(lambda: mci(bf), a.repeats)
    ref = rows["bare HF, truncated"]
    print(f"\n{'path':32s} {'tokens/s':>10s} {'vs bare':>8s}")
    for k, t in rows.items():
        print(f"{k:32s} {n_tok / t:10.0f} {ref / t:8.2f}x")
    if "TL run_with_cache() defaults" in rows:
        print(
            f"mci / TL defaults: {rows['TL run_with_cache() defaults'] / rows['mci cache_activations']:.2f}x"
        )
    c32 = cache_activations(model, exs, sites, show_progress=False)
    c16 = cache_activations(bf, exs, sites, show_progress=False)
    for s in sites:
        m32, m16 = c32.X(s).double().mean(0), c16.X(s).double().mean(0)
        cos = torch.nn.functional.cosine_similarity(m32, m16, dim=0).item()
        per = torch.nn.functional.cosine_similarity(c32.X(s), c16.X(s), dim=1)
        print(
            f"bf16 vs fp32 at {s.hook_name}: cosine of mean activations {cos:.5f}; "
            f"per-prompt cosine min {per.min():.4f}"
        )
    print("\nstreaming peak RSS (separate processes):")
    for mult in (1, 10):
        n = a.n_prompts * mult
        out = (
            subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), "--layer", str(a.layer)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        print(
            f"  {n:5d} prompts: peak {r['peak_mb']:.0f} MB (after model load {r['after_load_mb']:.0f} MB)"
        )


if __name__ == "__main__":
    main()
