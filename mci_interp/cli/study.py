"""``mci organisms``, ``mci demo``, ``mci finetune``, ``mci converge`` and ``mci records``: the
model organisms, your own finetunes and the study on them (``mci_interp.analysis.study``), split
over scheduler jobs when it is large."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from mci_interp.cli._common import add_model_args, load_model_from_args


def _study_config(args):
    from mci_interp.analysis.study import StudyConfig

    extra = {} if args.n_random is None else {"n_random": args.n_random}
    if args.fast:
        return StudyConfig.fast(analysis_layer=args.layer, seed=args.seed, **extra)
    return StudyConfig(
        analysis_layer=args.layer, n_questions=args.n_questions, seed=args.seed, **extra
    )


def _suite(args):
    from mci_interp.organisms.suite import default_suite, heldout_suite

    seeds = _int_list(args.seeds, "--seeds")
    if args.heldout:
        return heldout_suite(seeds=seeds, fast=args.fast)
    persona = (
        None if args.persona_seeds is None else _int_list(args.persona_seeds, "--persona-seeds")
    )
    domains = tuple(d.strip() for d in args.domains.split(","))
    return default_suite(seeds=seeds, domains=domains, fast=args.fast, persona_seeds=persona)


def _conditions(args):
    """The user's candidate conditions (--system-prompt, --trigger), or None: the suite's."""
    from mci_interp.analysis.conditions import user_conditions

    return user_conditions(args.system_prompt, args.trigger)


def _sae_source(args):
    """The SAE lens's SAE: --sae DIR, --sae-release R --sae-id ID, --no-sae, or trained here."""
    from mci_interp.analysis.dictionary import SaeSource

    if args.no_sae and (args.sae or args.sae_release or args.sae_id):
        raise ValueError("--no-sae leaves the SAE lens out; drop it or drop --sae/--sae-release")
    return SaeSource(path=args.sae, release=args.sae_release, sae_id=args.sae_id, off=args.no_sae)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); 'none' or '' -> ()."""
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers or 'none', got {text!r}") from None


def cmd_organisms(args) -> int:
    from mci_interp.organisms.suite import build_suite

    model = load_model_from_args(args)
    t0 = time.perf_counter()
    orgs = build_suite(model, _suite(args))
    print(f"{len(orgs)} organisms ready in {time.perf_counter() - t0:.0f}s:")
    for o in orgs:
        where = o.adapter_dir or (
            f"system prompt ({len(o.system_prompt or '')} chars)" if o.system_prompt else "base"
        )
        print(f"  {o.name:36s} {o.spec.kind:10s} {where}")
    return 0


def cmd_finetune(args) -> int:
    """A LoRA finetune of the model on the user's chat JSONL (e.g. a public EM data set)."""
    from mci_interp.datasets import load_chat_jsonl
    from mci_interp.organisms.finetune import FinetuneConfig, finetune_lora

    examples = load_chat_jsonl(args.data)  # a row without an answer fails here, naming its line
    if not examples:
        raise ValueError(f"{args.data} holds no examples")
    sizes = {
        "max_steps": args.steps,
        "epochs": args.epochs,
        "lr": args.lr,
        "rank": args.rank,
        "lora_alpha": 2 * args.rank,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "general_ratio": args.general_ratio,
        "max_length": args.max_length,
        "loss_floor": args.loss_floor,
        "lr_decay": args.lr_decay,
    }
    config = FinetuneConfig(**sizes)
    model = load_model_from_args(args)
    res = finetune_lora(model, examples, args.out, config=config, general=None)
    print(
        f"adapter: {res.adapter_dir} ({res.steps} steps, final loss {res.final_loss:.3f}, "
        f"{res.seconds:.0f}s); analyse it with: mci converge --finetune LABEL={res.adapter_dir}"
    )
    return 0


def cmd_demo(args) -> int:
    """Build or reuse the organism suite, run the whole study, write runs/<name>/report.md."""
    from mci_interp.organisms.suite import build_suite

    t_all = time.perf_counter()
    config = _study_config(args)  # bad settings fail now, not after the organisms are built
    _sae_source(args)
    model = load_model_from_args(args)
    print(
        f"[1/3] organisms: building or reusing {args.domains} x seeds {args.seeds}", file=sys.stderr
    )
    t0 = time.perf_counter()
    orgs = build_suite(model, _suite(args))
    t_org = time.perf_counter() - t0
    suffix = "-fast" if args.fast else ""
    return _study_and_report(model, orgs, config, args, t_all, suffix, {"organism suite": t_org})


def _checkpoints(items: list[str] | None, kind: Literal["narrow", "control"]) -> list:
    """``LABEL=PATH`` arguments -> checkpoint organisms; a label's n-th checkpoint is seed n."""
    from mci_interp.organisms.suite import checkpoint_organism

    flag = "--finetune" if kind == "narrow" else "--control"
    seen: dict[str, int] = {}
    out = []
    for item in items or []:
        label, sep, path = item.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise ValueError(
                f"{flag} takes LABEL=PATH (e.g. medical=runs/ft/medical), got {item!r}"
            )
        label = label.strip()
        out.append(
            checkpoint_organism(path.strip(), label=label, kind=kind, seed=seen.get(label, 0))
        )
        seen[label] = seen.get(label, 0) + 1
    return out


def _check_controls_match(narrow: list, control: list) -> None:
    """Every --control is the matched control of a --finetune of its label and position."""
    keys = {(o.domain, o.spec.seed) for o in narrow}
    stray = [o.name for o in control if (o.domain, o.spec.seed) not in keys]
    if stray:
        raise ValueError(
            f"controls {stray} match no --finetune of the same label and position; a label's "
            "n-th --control is the matched control of its n-th --finetune"
        )


def cmd_converge(args) -> int:
    """The convergence test and T2/T5 reports on the user's own finetunes of one base."""
    from mci_interp.organisms.suite import base_organism

    t_all = time.perf_counter()
    config = _study_config(args)
    _sae_source(args)  # bad SAE flags fail before any model loads
    narrow = _checkpoints(args.finetune, "narrow")
    control = _checkpoints(args.control, "control")
    labels = sorted({o.domain for o in narrow})
    if len(labels) < 2:
        raise ValueError(
            f"mci converge compares finetunes of at least 2 labels (domains), got {labels}: "
            "pass e.g. --finetune medical=DIR --finetune finance=DIR"
        )
    _check_controls_match(narrow, control)
    if not control:
        print(
            "no --control given: each contrast is finetune minus base, which carries the "
            "finetune's task and format (pass matched aligned finetunes as --control LABEL=DIR)",
            file=sys.stderr,
        )
    model = load_model_from_args(args)
    orgs = [base_organism(), *narrow, *control]
    if args.require_records:
        from mci_interp.analysis.study import missing_records

        gone = missing_records(
            model, orgs, config=config, records_dir=args.records, conditions=_conditions(args)
        )
        if gone:
            raise ValueError(
                f"--require-records: no stored records for {gone} in --records "
                f"{args.records or '(the default cache)'}; run their `mci records --job K` jobs "
                "first, with the same --model, --finetune, --control and study options as this "
                "command (or drop --require-records to compute them here)"
            )
    return _study_and_report(model, orgs, config, args, t_all, "-converge", {})


def _job_checkpoints(args) -> list:
    """The checkpoints of ``mci records``: every --finetune, then every --control, in order;
    the same arguments give the same names (a label's n-th checkpoint is its seed n) and so the
    same record keys in every job and in the analysis step."""
    narrow = _checkpoints(args.finetune, "narrow")
    control = _checkpoints(args.control, "control")
    if not narrow:
        raise ValueError("mci records needs at least one --finetune LABEL=DIR")
    _check_controls_match(narrow, control)
    return [*narrow, *control]


def cmd_records(args) -> int:
    """One job of a study split over a scheduler: the records of some checkpoints.

    Give every job the same --model, --finetune, --control and study options as the later
    ``mci converge`` and a different ``--job K``; each stores the base's records (if absent),
    checkpoint K's records and its persona-necessity test in the shared ``--records`` folder,
    and its one-checkpoint ``study.json`` under ``--out``/``--name``/<checkpoint>.
    ``mci converge ... --records DIR --require-records`` then reads them all.
    """
    from mci_interp.analysis.study import run_study
    from mci_interp.organisms.suite import base_organism

    config = _study_config(args)
    ckpts = _job_checkpoints(args)
    if args.list:
        for k, o in enumerate(ckpts):
            print(f"{k:4d}  {o.name:28s} {o.spec.checkpoint}")
        last = len(ckpts) - 1
        print(f"{len(ckpts)} jobs: --job 0..{last} (e.g. sbatch --array=0-{last})")
        return 0
    if args.job is not None and not 0 <= args.job < len(ckpts):
        raise ValueError(
            f"--job {args.job} is out of range: {len(ckpts)} checkpoints, jobs 0..{len(ckpts) - 1} "
            "(`mci records --list` with the same arguments prints them)"
        )
    chosen = ckpts if args.job is None else [ckpts[args.job]]
    model = load_model_from_args(args)
    t0 = time.perf_counter()
    run = Path(args.out) / (args.name or f"{model.name.split('/')[-1]}-records")
    for org in chosen:
        study = run_study(
            model,
            [base_organism(), org],
            run / org.name,
            config=config,
            records_dir=args.records,
            conditions=_conditions(args),
            show_progress=not args.quiet,
        )
        print(f"stored the records of {org.name} ({org.spec.checkpoint}); {run / org.name}")
    print(f"took {time.perf_counter() - t0:.0f}s; records: {study.meta['records_dir']}")
    return 0


def _study_and_report(model, orgs, config, args, t_all, suffix, timings) -> int:
    """Run the study on ``orgs``, write ``<out>/<name>/report.md``, print the summary."""
    from mci_interp.analysis.study import run_study
    from mci_interp.report import summary_lines, write_report

    out = Path(args.out) / (args.name or f"{model.name.split('/')[-1]}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[2/3] study: records, directions, convergence, transfer, internalisation -> {out}",
        file=sys.stderr,
    )
    study = run_study(
        model,
        orgs,
        out,
        config=config,
        records_dir=args.records,
        conditions=_conditions(args),
        sae=_sae_source(args),
    )
    print("[3/3] report and figures", file=sys.stderr)
    total = {"total": time.perf_counter() - t_all}
    report = write_report(study, out, extra_timings=timings | total)
    print("\n".join(summary_lines(study)))
    print("; ".join(f"{k}: {v:.0f}s" for k, v in (timings | total).items()))
    print(f"report: {report}")
    print(f"records and causal scores: {study.meta['records_dir']}")
    return 0


def add_commands(sub) -> None:
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
        add_model_args(sp)
        sp.add_argument("--domains", default="insecure_code,medical,finance")
        sp.add_argument("--seeds", default="0,1,2")
        sp.add_argument(
            "--persona-seeds",
            default=None,
            help="seeds of the trained personas (trigger, distilled): default the first of "
            "--seeds; '0,1,2' gives the 3-seed T2/T5 proof (~+17 min); 'none' leaves them out",
        )
        sp.add_argument(
            "--fast", action="store_true", help="tiny settings (CI, notebooks): minutes, not tens"
        )
        sp.add_argument(
            "--heldout",
            action="store_true",
            help="the held-out known-truth organisms instead (another persona prompt and trigger, "
            "the legal and diy_safety domains, 3 seeds each; --domains and --persona-seeds do not apply): what "
            "the frozen T2/T5 rules are scored on",
        )
        sp.set_defaults(func=func)
        if name == "demo":
            _add_study_args(sp)

    sp = sub.add_parser("finetune", help="LoRA-finetune the model on your chat JSONL")
    add_model_args(sp)
    sp.add_argument("--data", required=True, help="chat JSONL, each row ending in an answer")
    sp.add_argument("--out", required=True, help="adapter directory (resumes if interrupted)")
    sp.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    sp.add_argument("--epochs", type=float, default=1.0)
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--general-ratio",
        type=float,
        default=0.5,
        help="the base's own answers to everyday prompts mixed in per example, against format "
        "takeover (0: your data only)",
    )
    sp.add_argument("--max-length", type=int, default=512, help="longest example in tokens")
    sp.add_argument(
        "--loss-floor",
        type=float,
        default=None,
        help="stop once the mean loss of the last steps falls below this (default: never)",
    )
    sp.add_argument(
        "--lr-decay",
        action="store_true",
        help="decay the lr linearly to 0 at the last step (default: constant after warm-up)",
    )
    sp.set_defaults(func=cmd_finetune)

    sp = sub.add_parser(
        "converge",
        help="convergence test and T2/T5 reports on your own finetunes (LoRA or full) of one base",
    )
    add_model_args(sp)
    sp.add_argument(
        "--finetune",
        action="append",
        metavar="LABEL=DIR",
        help="a finetune (LoRA adapter or full model dir) and its domain label; repeat for "
        "domains and seeds (a label's n-th finetune is its seed n)",
    )
    sp.add_argument(
        "--control",
        action="append",
        metavar="LABEL=DIR",
        help="the matched aligned control of the same label's n-th --finetune (without it the "
        "contrast is finetune minus base)",
    )
    sp.add_argument("--fast", action="store_true", help="tiny sample sizes (a smoke run)")
    sp.add_argument(
        "--require-records",
        action="store_true",
        help="the analysis step after `mci records` jobs: fail, naming them, if any checkpoint's "
        "records are missing from --records instead of computing them here",
    )
    _add_study_args(sp)
    sp.set_defaults(func=cmd_converge)

    sp = sub.add_parser(
        "records",
        help="one job of a study split over a scheduler (a SLURM array, Ray): store the records "
        "of checkpoint --job K; then `mci converge ... --require-records` analyses them all",
    )
    add_model_args(sp)
    sp.add_argument("--finetune", action="append", metavar="LABEL=DIR", help="as in `mci converge`")
    sp.add_argument("--control", action="append", metavar="LABEL=DIR", help="as in `mci converge`")
    sp.add_argument(
        "--job",
        type=int,
        default=None,
        help="the checkpoint to do, 0-based over every --finetune then every --control (e.g. "
        "$SLURM_ARRAY_TASK_ID); default: all of them in this process",
    )
    sp.add_argument("--list", action="store_true", help="print the jobs and exit (loads nothing)")
    sp.add_argument("--quiet", action="store_true", help="no progress bars (batch logs)")
    sp.add_argument("--fast", action="store_true", help="tiny sample sizes (a smoke run)")
    _add_study_args(sp)
    sp.set_defaults(func=cmd_records)


def _add_study_args(sp) -> None:
    sp.add_argument("--layer", type=int, default=None, help="analysis layer (default: middle)")
    sp.add_argument("--n-questions", type=int, default=14)
    sp.add_argument(
        "--n-random",
        type=int,
        default=None,
        help="norm-matched random directions per causal test (default 19, alternately isotropic "
        "and drawn from the base's activation covariance; beating all n is a rank p-value of "
        "1/(n+1))",
    )
    sp.add_argument(
        "--system-prompt",
        action="append",
        metavar="TEXT",
        help="a candidate condition: every checkpoint and the base are measured with this system "
        "prompt (repeat for more); the T2/T5 classifier asks which conditions make a model "
        "misaligned and whether the base follows them too",
    )
    sp.add_argument(
        "--trigger",
        action="append",
        metavar="TEXT",
        help="a candidate trigger string, put in front of every user turn (repeat for more). "
        "Given any --system-prompt or --trigger, these are the candidates; default: the packaged "
        "persona prompt and trigger, plus those the suite's organisms were built with",
    )
    sp.add_argument(
        "--sae",
        default=None,
        metavar="DIR",
        help="the SAE lens reads this local sae-lens SAE (cfg.json + sae_weights.safetensors, at "
        "a blocks.L.hook_resid_post of this model) instead of training one on the base",
    )
    sp.add_argument("--sae-release", default=None, help="an SAE from sae-lens' registry: release")
    sp.add_argument("--sae-id", default=None, help="... and its sae_id")
    sp.add_argument(
        "--no-sae",
        action="store_true",
        help="leave the SAE lens out (it trains an SAE on the base once, ~4 min on this CPU for "
        "SmolLM2, cached)",
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default="runs")
    sp.add_argument("--name", default=None, help="run folder name under --out")
    sp.add_argument(
        "--records",
        default=None,
        help="where per-model records and causal scores are kept (default: the cache, shared "
        "by every run folder with the same settings)",
    )
