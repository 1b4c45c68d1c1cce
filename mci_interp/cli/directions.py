"""``mci models``, ``mci cache``, ``mci extract`` and ``mci compare``: from a model's
activations to saved directions and their cosines."""

from __future__ import annotations

import time
from pathlib import Path

from mci_interp.cli._common import add_model_args, load_model_from_args

BUILTIN_PROMPTS = "builtin:neutral"


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

    model = load_model_from_args(args)
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
        stats = stream_statistics(
            model, examples, sites, position=args.position, batch_size=args.batch_size
        )
        out = stats.save(args.out)
        print(
            f"streamed statistics of {len(examples)} examples ({sum(stats.counts.values())} rows) "
            f"at {len(sites)} sites into {out}"
        )
    print(f"took {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_extract(args) -> int:
    """Directions from labelled chat JSONL (label 1 vs 0), one per layer."""
    from mci_interp.activations import cache_activations
    from mci_interp.extract import sweep
    from mci_interp.sites import Site, parse_layers

    model = load_model_from_args(args)
    sites = [Site(layer) for layer in parse_layers(args.layers, model.n_layers)]
    cache = cache_activations(
        model, _examples(args.data), sites, position=args.position, batch_size=args.batch_size
    )
    params = {"cv": args.cv} if args.method == "probe" else None
    dirs = sweep(
        args.method, cache, sites, params=params, dataset=Path(args.data).name, show_progress=True
    )
    out = dirs.save(args.out)
    for d in dirs:
        auroc = d.provenance.params.get("auroc")
        extra = f"  grouped-CV AUROC {float(auroc):.3f}" if auroc is not None else ""
        print(f"{d.site.hook_name:28s} norm {d.norm:8.3f}{extra}")
    print(f"saved {len(dirs)} directions to {out}")
    return 0


def cmd_compare(args) -> int:
    """Cosine matrix of saved directions (files or direction-set folders) against the random null."""
    import torch

    from mci_interp._io import write_text
    from mci_interp.compare import cosine_matrix, random_direction_null
    from mci_interp.direction import Direction, DirectionSet
    from mci_interp.plot.compare import plot_cosine_heatmap
    from mci_interp.report import comparison_lines, comparison_markdown

    dirs: list[Direction] = []
    for p in map(Path, args.directions):
        dirs.extend(DirectionSet.load(p) if p.is_dir() else [Direction.load(p)])
    if len(dirs) < 2:
        raise ValueError("give at least two directions (files or folders) to compare")
    bases = {d.provenance.base_model for d in dirs}
    if len(bases) > 1 or len({d.d_model for d in dirs}) > 1:
        raise ValueError(
            f"refusing to compare directions of different base models or widths: {sorted(bases)}"
        )
    sim = cosine_matrix(dirs)
    null = random_direction_null(dirs[0].d_model, 4000, generator=torch.Generator().manual_seed(0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_cosine_heatmap(sim)
    fig.savefig(out / "cosines.png", dpi=110)
    write_text(out / "summary.md", comparison_markdown(sim, null, figure="cosines.png"))
    print("\n".join(comparison_lines(sim, null)))
    print(f"wrote {out / 'summary.md'} and {out / 'cosines.png'}")
    return 0


def add_commands(sub) -> None:
    sp = sub.add_parser("models", help="list the packaged models")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("cache", help="cache activations at chosen sites")
    add_model_args(sp)
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

    sp = sub.add_parser("extract", help="directions from labelled chat JSONL, one per layer")
    add_model_args(sp)
    sp.add_argument(
        "--data", required=True, help="chat JSONL with 'label' 1 (positive) / 0 and 'group'"
    )
    sp.add_argument("--method", default="diff_means", choices=["diff_means", "probe"])
    sp.add_argument("--layers", default="all")
    sp.add_argument(
        "--position",
        default="answer_mean",
        choices=["last_prompt", "prompt_mean", "answer_mean", "answer_tokens"],
    )
    sp.add_argument("--cv", type=int, default=5)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--out", default="runs/directions")
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("compare", help="cosine matrix of saved directions against the random null")
    sp.add_argument(
        "directions", nargs="+", help=".safetensors direction files or direction-set folders"
    )
    sp.add_argument("--out", default="runs/compare")
    sp.set_defaults(func=cmd_compare)
