#!/usr/bin/env bash
# Gradescope runs this once, when it builds the autograder's image, with the autograder zip unpacked in
# /autograder/source (the student copy plus this file and run_autograder; see course/INSTRUCTOR.md). It installs
# what the grader needs: CPU torch, the project's requirements and pytest. Already installed packages are kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null; then
    apt-get update && apt-get install -y python3 python3-pip
fi
"$PYTHON" -m pip install torch --index-url https://download.pytorch.org/whl/cpu  # the CPU build: no GPU there
"$PYTHON" -m pip install -r requirements.txt pytest
