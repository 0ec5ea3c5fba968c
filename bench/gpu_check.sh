#!/usr/bin/env bash
# One-shot GPU check of dsrl.py: one command, unattended, under 10 minutes on one GPU (see bench/README.md).
#   bash bench/gpu_check.sh                  -> bench/results/gpu-<name>.json and gpu-<name>.md
#   bash bench/gpu_check.sh --out-dir DIR    -> DIR/gpu-<name>.json and .md
#   bash bench/gpu_check.sh --tiny           -> the same code path on CPU with a tiny model, in about a minute
# PYTHON names the interpreter (default python3: many GPU machines have no `python`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
