"""Execute the tutorial notebooks with their committed settings and write the outputs into them
(the figures readers see on GitHub). CI runs them separately on FAST settings and never rewrites
them (tests/integration/test_notebooks.py).

    .venv/bin/python scripts/run_notebooks.py             # every notebook
    .venv/bin/python scripts/run_notebooks.py 03 05       # those whose name starts so
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop stream outputs that hold only whitespace (what a finished ``leave=False`` progress
    bar leaves behind once its carriage returns are resolved)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [
                o for o in cell.outputs if o.output_type != "stream" or o.get("text", "").strip()
            ]
    return nb


def main(prefixes: list[str]) -> int:
    # the kernel's own inline backend puts figures into the outputs (Agg would leave only their
    # repr); a plain progress bar, not the widget one, with its carriage returns resolved
    os.environ.pop("MPLBACKEND", None)
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"
    paths = sorted(
        p for p in NOTEBOOKS.glob("*.ipynb") if not prefixes or p.name.startswith(tuple(prefixes))
    )
    if not paths:
        raise SystemExit(f"no notebook in {NOTEBOOKS} starts with {prefixes}")
    for path in paths:
        t0 = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(
            nb,
            timeout=3600,
            kernel_name="python3",
            coalesce_streams=True,
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
        nbformat.write(tidy(nb), path)
        print(f"{path.name}: executed and written in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
