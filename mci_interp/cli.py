"""The ``mci`` command line: paths, printing, progress bars and config; no math lives here."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("mci_interp")

BUILTIN_PROMPTS = "builtin:neutral"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="registry name (see `mci models`), local HF directory or hub id",
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter directory merged on load")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16 is ~3x faster on CPUs with AMX",
    )


def _load(args):
    from mci_interp.models import load_model

    t0 = time.perf_counter()
    m = load_model(args.model, adapter=args.adapter, dtype=args.dtype)
    print(
        f"loaded {m.name} ({m.n_layers} layers, d_model {m.d_model}, {args.dtype}) in "
        f"{time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return m


def _examples(source: str):
    """A JSONL path, or builtin:neutral (the packaged out-of-domain prompts)."""
    from mci_interp.datasets import chat, load_chat_jsonl

    if source == BUILTIN_PROMPTS:
        from mci_interp.organisms.data import load_neutral_prompts

        return [
            chat(p, group=f"{theme}:{i}", theme=theme)
            for theme, ps in load_neutral_prompts().items()
            for i, p in enumerate(ps)
        ]
    return load_chat_jsonl(source, require_answer=False)


def cmd_models(args) -> int:
    from mci_interp.specs import REGISTRY

    for spec in REGISTRY.values():
        print(f"{spec.name:32s} {spec.description}\n{'':32s} install: {spec.install_hint}")
    return 0


def cmd_cache(args) -> int:
    from mci_interp.activations import cache_to_disk, stream_statistics
    from mci_interp.sites import Site, parse_layers

    model = _load(args)
    layers = parse_layers(args.layers, model.n_layers)
    sites = [Site(layer, args.component) for layer in layers]
    examples = _examples(args.data)
    t0 = time.perf_counter()
    if args.mode == "stored":
        out = cache_to_disk(
            model,
            examples,
            sites,
            args.out,
            position=args.position,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
        )
        print(f"stored activations of {len(examples)} examples at {len(sites)} sites in {out}")
    else:
        from safetensors.torch import save_file

        from mci_interp._io import atomic_path, write_json

        stats = stream_statistics(
            model, examples, sites, position=args.position, batch_size=args.batch_size
        )
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{s.hook_name}/label{lab}/{kind}": t.contiguous()
            for s in sites
            for kind, table in (("sum", stats.sums), ("sumsq", stats.sumsq))
            for lab, t in table[s].items()
        }
        with atomic_path(out / "stats.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(out / "stats.json", stats.meta | {"counts": stats.counts})
        print(
            f"streamed statistics of {len(examples)} examples ({sum(stats.counts.values())} rows) "
            f"at {len(sites)} sites into {out}"
        )
    print(f"took {time.perf_counter() - t0:.1f}s")
    return 0


def _study_config(args):
    from mci_interp.analysis.study import StudyConfig

    if args.fast:
        return StudyConfig(
            analysis_layer=args.layer,
            n_neutral_per_theme=4,
            n_questions=7,
            n_indomain=6,
            n_takeover=6,
            takeover_tokens=24,
            steer_alphas=(0.5,),
            n_random=2,
            convergence_layer_step=6,
            seed=args.seed,
        )
    return StudyConfig(analysis_layer=args.layer, n_questions=args.n_questions, seed=args.seed)


def _suite(args):
    from mci_interp.organisms.suite import default_suite

    seeds = tuple(int(s) for s in str(args.seeds).split(","))
    domains = tuple(d.strip() for d in args.domains.split(","))
    return default_suite(seeds=seeds, domains=domains, fast=args.fast)


def cmd_organisms(args) -> int:
    from mci_interp.organisms.suite import build_suite

    model = _load(args)
    t0 = time.perf_counter()
    orgs = build_suite(model, _suite(args))
    print(f"{len(orgs)} organisms ready in {time.perf_counter() - t0:.0f}s:")
    for o in orgs:
        where = o.adapter_dir or (
            f"system prompt ({len(o.system_prompt or '')} chars)" if o.system_prompt else "base"
        )
        print(f"  {o.name:36s} {o.spec.kind:10s} {where}")
    return 0


def cmd_demo(args) -> int:
    """Build or reuse the organism suite, run the whole study, write runs/<name>/report.md."""
    from mci_interp.analysis.study import run_study
    from mci_interp.organisms.suite import build_suite
    from mci_interp.report import summary_lines, write_report

    t_all = time.perf_counter()
    model = _load(args)
    out = Path(args.out) / (
        args.name or f"{model.name.split('/')[-1]}{'-fast' if args.fast else ''}"
    )
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[1/3] organisms: building or reusing {args.domains} x seeds {args.seeds}", file=sys.stderr
    )
    t0 = time.perf_counter()
    orgs = build_suite(model, _suite(args))
    t_org = time.perf_counter() - t0
    print(
        f"[2/3] study: records, directions, convergence, transfer, internalisation -> {out}",
        file=sys.stderr,
    )
    study = run_study(model, orgs, out, config=_study_config(args))
    print("[3/3] report and figures", file=sys.stderr)
    report = write_report(
        study,
        out,
        extra_timings={
            "organism suite (build or reuse)": t_org,
            "demo total": time.perf_counter() - t_all,
        },
    )
    print("\n".join(summary_lines(study)))
    print(f"organisms: {t_org:.0f}s; total {time.perf_counter() - t_all:.0f}s")
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mci", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("models", help="list the packaged models")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("cache", help="cache activations at chosen sites")
    _add_model_args(sp)
    sp.add_argument("--data", default=BUILTIN_PROMPTS, help=f"chat JSONL file or {BUILTIN_PROMPTS}")
    sp.add_argument("--layers", default="all", help="'all', 'middle', '12', '4,8,12', '0-29:3'")
    sp.add_argument(
        "--component",
        default="resid_post",
        choices=["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"],
    )
    sp.add_argument(
        "--position",
        default="last_prompt",
        choices=["last_prompt", "prompt_mean", "answer_mean", "answer_tokens", "all"],
    )
    sp.add_argument("--mode", default="stream", choices=["stream", "stored"])
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--shard-size", type=int, default=256)
    sp.add_argument("--out", default="runs/cache")
    sp.set_defaults(func=cmd_cache)

    for name, func, helptext in (
        ("organisms", cmd_organisms, "build or reuse the model-organism suite"),
        (
            "demo",
            cmd_demo,
            "the whole study on the default model: organisms, "
            "directions, convergence, transfer, T2/T5 report",
        ),
    ):
        sp = sub.add_parser(name, help=helptext)
        _add_model_args(sp)
        sp.add_argument("--domains", default="insecure_code,medical,finance")
        sp.add_argument("--seeds", default="0,1,2")
        sp.add_argument(
            "--fast", action="store_true", help="tiny settings (CI, notebooks): minutes, not tens"
        )
        sp.set_defaults(func=func)
        if name == "demo":
            sp.add_argument(
                "--layer", type=int, default=None, help="analysis layer (default: middle)"
            )
            sp.add_argument("--n-questions", type=int, default=14)
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--out", default="runs")
            sp.add_argument("--name", default=None, help="run folder name under --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            "\ninterrupted; completed work is kept (re-run the same command to resume)",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, TypeError) as e:
        if args.verbose:
            raise
        print(f"mci: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
