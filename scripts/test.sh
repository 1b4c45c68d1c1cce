#!/usr/bin/env bash
# Install (idempotent) and run every check CI runs: lint, format, types, layering, tests, notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
echo "== ruff (lint + format)"; .venv/bin/ruff check mci_interp tests scripts && .venv/bin/ruff format --check mci_interp tests scripts
echo "== mypy"; .venv/bin/mypy mci_interp
echo "== import layering"; .venv/bin/lint-imports
echo "== pytest (unit, integration on the packaged SmolLM2, notebooks)"
.venv/bin/pytest tests -q -p no:cacheprovider --durations=15 "$@"
