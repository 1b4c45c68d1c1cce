"""The ``mci`` command line: paths, printing, progress bars and config; no math lives here.

One module per group of commands, each holding its commands and the arguments they take:
``directions`` (``models``, ``cache``, ``extract``, ``compare``), ``evaluate`` (``evaluate``) and
``study`` (``organisms``, ``demo``, ``finetune``, ``converge``, ``records``); ``_common`` holds
the model arguments every command that loads a model shares. Reports are built by
``mci_interp.report``, statistics are saved by the types that hold them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mci_interp.cli import directions, evaluate, study

DESCRIPTION = (
    "The ``mci`` command line: paths, printing, progress bars and config; no math lives here."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mci", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (directions, evaluate, study):  # the order of `mci --help`
        group.add_commands(sub)
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


__all__ = ["build_parser", "main"]
