#!/usr/bin/env bash
# Replicate the published emergent-misalignment claims on the opt-in Qwen2.5-Coder-0.5B-Instruct
# with the toolkit's own commands (issue: "Replicate the published results on the larger model").
# Same design as the SmolLM2 demo: matched controls, 3 seeds, general chat mixed into every
# finetune, the organism-minus-control contrast as the direction, few-layer transfer ablation
# with norm-matched random controls. Measured 2026-11-28 on 2 CPU cores: ~82 min (20 finetunes
# ~36 min at ~50 train tokens/s, study 44 min; results in RESULTS.md). Scoring is ~3x slower than
# on SmolLM2, so the trained personas (trigger, distilled: 2-5x a narrow finetune each) are left
# out; the prompted persona (no training) stays as the known-fluency check. Add
# --persona-seeds 0 to include them for seed 0 (~+25 min, not measured).
set -euo pipefail
cd "$(dirname "$0")/.."
MCI_WITH_QWEN=1 bash scripts/install.sh
.venv/bin/mci demo --model qwen2.5-coder-0.5b-instruct \
  --domains insecure_code,medical,finance --seeds 0,1,2 --persona-seeds none --n-questions 14 \
  --name qwen2.5-coder-0.5b-replication "$@"
