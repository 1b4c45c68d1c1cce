#!/usr/bin/env bash
# Replicate the published emergent-misalignment claims on the opt-in Qwen2.5-Coder-0.5B-Instruct
# with the toolkit's own commands (issue: "Replicate the published results on the larger model").
# Same design as the SmolLM2 demo: matched controls, 3 seeds, general chat mixed into every
# finetune, the organism-minus-control contrast as the direction, few-layer transfer ablation
# with norm-matched random controls. Not yet run end to end: budget ~2 h on 2 CPU cores
# (Qwen is ~3x slower per token than SmolLM2; the SmolLM2 demo's timings are in the README).
set -euo pipefail
cd "$(dirname "$0")/.."
MCI_WITH_QWEN=1 bash scripts/install.sh
.venv/bin/mci demo --model qwen2.5-coder-0.5b-instruct \
  --domains insecure_code,medical,finance --seeds 0,1,2 --n-questions 28 \
  --name qwen2.5-coder-0.5b-replication "$@"
