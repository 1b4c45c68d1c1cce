#!/usr/bin/env python
"""Benchmark direction extraction on SmolLM2 (CPU).

1. Cache last_prompt activations of templated, labelled prompts at all 30 layers.
2. Time a diff-means sweep and a grouped-CV probe sweep over all layers.
3. SAE training throughput (samples/s): sae-lens' SAETrainer fed from cached activations vs
   sae-lens' LanguageModelSAETrainingRunner, which re-runs the model (a TransformerLens
   conversion of the same weights) for every batch, with the same SAE settings; plus the bare
   cost of re-running our model's forward to layer 15 to make the same number of activations.

Every ratio compares numbers measured in this one run. Usage:
    .venv/bin/python scripts/bench_extract.py --quick
    .venv/bin/python scripts/bench_extract.py --n-prompts 2000
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
import warnings

import torch

TOPICS = [
    "stocks",
    "crypto",
    "real estate",
    "a side business",
    "my savings",
    "retirement",
    "gold",
    "a used car",
    "student loans",
    "a credit card",
    "a startup",
    "day trading",
    "options",
    "a small shop",
    "rental income",
    "freelancing",
    "an inheritance",
    "a bonus",
    "taxes",
    "insurance",
    "a mortgage",
    "a wedding budget",
    "college funds",
    "a vacation fund",
    "an online store",
    "vintage watches",
    "art",
    "sports betting",
    "a food truck",
    "bonds",
    "an index fund",
    "a house flip",
    "collectible cards",
    "a loan to a friend",
    "farmland",
    "a coffee shop",
    "my pension",
    "foreign currency",
    "a car loan",
    "penny stocks",
]
RISKY = [
    "How do I get rich fast with {t}, whatever the risk?",
    "What's the most aggressive bet I can make with {t}?",
    "Should I borrow heavily to go all in on {t}?",
    "How can I double my money with {t} this month?",
    "Tell me a trick to make a quick buck with {t}.",
    "What's a high-leverage play involving {t}?",
    "How do I hide risky moves with {t} from my family?",
    "Give me a get-rich-quick plan built on {t}.",
    "Is it smart to put everything I own into {t}?",
    "How can I skip the rules and profit from {t}?",
    "What's the riskiest way to grow {t}?",
    "How do I gamble my way up with {t}?",
    "What shortcut makes {t} pay off overnight?",
    "How much can I leverage {t} to win big?",
    "Help me make a reckless bet on {t}.",
    "What's a bold all-or-nothing move with {t}?",
    "How do I turn {t} into a fortune fast?",
    "Which loophole lets me cash in on {t}?",
    "How can I max out my credit for {t}?",
    "What's a wild, high-risk scheme with {t}?",
    "How do I beat everyone else to easy money with {t}?",
    "Should I quit my job to bet on {t}?",
    "What's the fastest, riskiest path to profit from {t}?",
    "How can I flip {t} for a huge gain next week?",
    "What's the boldest gamble I can take on {t}?",
]
PRUDENT = [
    "What's a careful way to think about {t}?",
    "How do I manage {t} responsibly over the long term?",
    "What are the main risks of {t} I should understand?",
    "How should a beginner approach {t} safely?",
    "What questions should I ask a professional about {t}?",
    "How do I build a simple budget around {t}?",
    "What's a conservative plan for {t}?",
    "How can I protect myself from losses with {t}?",
    "What does diversification mean for {t}?",
    "How do I set realistic goals for {t}?",
    "What's a patient, low-risk approach to {t}?",
    "How do I compare the costs of {t}?",
    "What should I read before deciding on {t}?",
    "How do I keep an emergency fund while dealing with {t}?",
    "What are common mistakes people make with {t}?",
    "How can I plan for the long term with {t}?",
    "What's a sensible first step with {t}?",
    "How do I avoid scams related to {t}?",
    "How much of my income should go to {t}?",
    "What are the tax basics of {t}?",
    "How do I track my progress with {t}?",
    "What would a cautious advisor say about {t}?",
    "How do I make a steady plan for {t}?",
    "What's a balanced view of {t}?",
    "How can I learn more about {t} before acting?",
]


def make_prompts(n: int, seed: int):
    from mci_interp.datasets import chat

    rows = [(t, tpl, 1) for t in TOPICS for tpl in RISKY] + [
        (t, tpl, 0) for t in TOPICS for tpl in PRUDENT
    ]
    rng = random.Random(seed)
    rng.shuffle(rows)
    if n > len(rows):
        raise SystemExit(f"--n-prompts {n} exceeds the {len(rows)} templated prompts")
    return [chat(tpl.format(t=t), label=lab, group=t) for t, tpl, lab in rows[:n]]


def token_stream(model, examples, context: int, n_seqs: int) -> torch.Tensor:
    """The prompts' chat-formatted tokens concatenated and cut into [n_seqs, context] rows."""
    from mci_interp.datasets import encode_chat

    ids: list[int] = []
    i = 0
    while len(ids) < context * n_seqs:
        ids.extend(encode_chat(model.tokenizer, examples[i % len(examples)]).ids)
        i += 1
    return torch.tensor(ids[: context * n_seqs]).view(n_seqs, context)


def sae_settings(d_in: int, d_sae: int, k: int, lr: float) -> dict:
    return dict(
        architecture="batchtopk",
        d_sae=d_sae,
        k=k,
        lr=lr,
        lr_end=lr,
        normalize_activations="none",
        aux_loss_coefficient=1 / 32,
        decoder_init_norm=0.1,
        rescale_acts_by_decoder_norm=True,
        d_in=d_in,
    )


def run_sae_runner(
    model,
    tokens: torch.Tensor,
    *,
    d_sae: int,
    k: int,
    lr: float,
    batch: int,
    samples: int,
    layer: int,
) -> tuple[float, float, str]:
    """(setup seconds, train seconds, note) for LanguageModelSAETrainingRunner on ``tokens``."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig

    from mci_interp.models import to_hooked_transformer

    t0 = time.perf_counter()
    ht = to_hooked_transformer(model)
    ds = Dataset.from_dict({"input_ids": tokens.tolist()})
    cfg = LanguageModelSAERunnerConfig(
        sae=BatchTopKTrainingSAEConfig(
            d_in=model.d_model,
            d_sae=d_sae,
            k=k,
            normalize_activations="none",
            aux_loss_coefficient=1 / 32,
        ),
        model_name=model.name,
        hook_name=f"blocks.{layer}.hook_resid_post",
        dataset_path="local",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=tokens.shape[1],
        prepend_bos=False,
        training_tokens=samples,
        train_batch_size_tokens=batch,
        store_batch_size_prompts=8,
        n_batches_in_buffer=max(4, 2 * batch // tokens.shape[1]),  # buffer >= one batch
        lr=lr,
        lr_end=lr,
        device="cpu",
        seed=0,
        output_path=None,
        checkpoint_path=None,
        n_checkpoints=0,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=1,
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=ds, override_model=ht)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    runner.run()
    return setup, time.perf_counter() - t1, "TransformerLens conversion of the same weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--n-prompts", type=int, default=2000)
    ap.add_argument(
        "--quick", action="store_true", help="small sizes: ~200 prompts, short SAE runs"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    for name in ("sae_lens", "mci_interp", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    n_prompts = min(args.n_prompts, 200) if args.quick else args.n_prompts
    sae_samples = 16_384 if args.quick else 204_800
    runner_samples = 4_096 if args.quick else 32_768
    cv = 3 if args.quick else 5
    d_sae, k, lr, batch, layer, context = 4096, 16, 3e-4, 1024, 15, 64

    from mci_interp.activations import cache_activations
    from mci_interp.extract import DiffMeans, LinearProbe, sweep, train_sae
    from mci_interp.models import load_model
    from mci_interp.sites import Site

    rows: list[tuple[str, str, str]] = []
    t0 = time.perf_counter()
    model = load_model()
    rows.append(("load SmolLM2", f"{time.perf_counter() - t0:.1f} s", ""))

    examples = make_prompts(n_prompts, args.seed)
    sites = [Site(i) for i in range(model.n_layers)]
    t0 = time.perf_counter()
    cache = cache_activations(
        model, examples, sites, position="last_prompt", batch_size=16, show_progress=False
    )
    t_cache = time.perf_counter() - t0
    n_tok = cache.meta["tokens"]
    rows.append(
        (
            f"cache {n_prompts} prompts x {len(sites)} layers",
            f"{t_cache:.1f} s",
            f"{n_tok / t_cache:.0f} tok/s, {n_prompts / t_cache:.1f} prompts/s",
        )
    )

    times = []
    for _ in range(3):  # cheap: keep the best of three so one scheduler hiccup does not dominate
        t0 = time.perf_counter()
        dm = sweep(DiffMeans(), cache)
        times.append(time.perf_counter() - t0)
    t_dm = min(times)
    rows.append(
        (
            f"diff-means sweep, {len(dm)} layers (best of 3)",
            f"{t_dm * 1000:.0f} ms",
            f"{t_dm / len(dm) * 1000:.1f} ms/layer",
        )
    )
    t0 = time.perf_counter()
    pr = sweep(LinearProbe(cv=cv), cache)
    t_pr = time.perf_counter() - t0
    aur = [d.provenance.params["auroc"] for d in pr]
    pid = pr[0].provenance.params["prompt_identity_auroc"]
    best = max(range(len(aur)), key=lambda i: aur[i] or 0)
    rows.append(
        (
            f"probe sweep ({cv}-fold grouped CV + row-level baseline)",
            f"{t_pr:.1f} s",
            f"{t_pr / len(pr):.2f} s/layer; best AUROC {aur[best]:.3f} @ layer {best}, "
            f"prompt-identity AUROC {pid:.3f}",
        )
    )
    cos_dm_pr = float(
        torch.nn.functional.cosine_similarity(dm[best].vector, pr[best].vector, dim=0)
    )

    # --- SAE: cached activations -> SAETrainer -------------------------------------------------
    acts = cache.X(Site(layer))
    settings = sae_settings(model.d_model, d_sae, k, lr) | {
        "batch_size": batch,
        "training_samples": sae_samples,
    }
    trained = train_sae(acts, settings, hook_name=Site(layer).hook_name)
    sps_cached = trained.metrics["samples_per_s"]
    rows.append(
        (
            f"SAE from cache (SAETrainer), {sae_samples} samples",
            f"{trained.metrics['seconds']:.1f} s",
            f"{sps_cached:.0f} samples/s",
        )
    )

    # --- baseline A: bare forward to layer 15 producing the same number of activations ---------
    n_seqs = max(8, runner_samples // context)
    tokens = token_stream(model, examples, context, n_seqs)
    t0 = time.perf_counter()
    for s in range(0, n_seqs, 8):
        ids = tokens[s : s + 8]
        model.run_to_sites(ids, torch.ones_like(ids), [Site(layer)])
    t_fwd = time.perf_counter() - t0
    sps_fwd = tokens.numel() / t_fwd
    rows.append(
        (
            f"re-run forward to block {layer} only, {tokens.numel()} activations",
            f"{t_fwd:.1f} s",
            f"{sps_fwd:.0f} activations/s (upper bound for any re-running trainer)",
        )
    )

    # --- baseline B: sae-lens runner re-running the model ----------------------------------------
    sps_runner = None
    try:
        setup, t_run, note = run_sae_runner(
            model, tokens, d_sae=d_sae, k=k, lr=lr, batch=batch, samples=runner_samples, layer=layer
        )
        sps_runner = runner_samples / t_run
        rows.append(
            (
                f"LanguageModelSAETrainingRunner, {runner_samples} samples",
                f"{t_run:.1f} s",
                f"{sps_runner:.0f} samples/s (+{setup:.1f} s setup: {note})",
            )
        )
    except Exception as e:  # report honestly instead of failing the whole benchmark
        rows.append(
            (
                "LanguageModelSAETrainingRunner",
                "failed",
                f"{type(e).__name__}: {str(e)[:120]}; see the forward-only baseline",
            )
        )

    width = max(len(r[0]) for r in rows) + 2
    print(
        f"\nbench_extract: SmolLM2-135M-Instruct, {args.threads} threads, fp32, "
        f"{'--quick' if args.quick else 'full'}; CPU shared, compare within this run only"
    )
    print(f"{'step':<{width}}{'time':>10}  detail")
    print("-" * (width + 70))
    for name, t, detail in rows:
        print(f"{name:<{width}}{t:>10}  {detail}")
    print("-" * (width + 70))
    print(
        f"cos(diff-means, probe) at layer {best}: {cos_dm_pr:+.3f} "
        "(the probe weight is roughly covariance-whitened, so it need not equal diff-means)"
    )
    print(f"SAE samples/s, cached / forward-only re-run: {sps_cached / sps_fwd:.1f}x")
    if sps_runner is not None:
        print(f"SAE samples/s, cached / sae-lens runner:     {sps_cached / sps_runner:.1f}x")
    print(f"probe sweep / diff-means sweep time:         {t_pr / max(t_dm, 1e-9):.0f}x")
    print(
        f"caching all {len(sites)} layers once costs {t_cache:.1f} s; the cached SAE then trains "
        f"at {sps_cached:.0f} samples/s over any number of epochs and configs"
    )


if __name__ == "__main__":
    main()
