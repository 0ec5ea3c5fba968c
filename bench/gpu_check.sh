#!/usr/bin/env bash
# One-shot GPU check of dsrl.py: one command, unattended, under 8 minutes on one GPU (see bench/README.md).
#   bash bench/gpu_check.sh           -> bench/results/gpu-<name>.json and gpu-<name>.md
#   bash bench/gpu_check.sh --tiny    -> the same code path on CPU with a tiny model, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
