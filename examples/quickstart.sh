#!/usr/bin/env bash
# First run on an embedded default: train a dense FC2 on scikit-learn's bundled digits (no download),
# analyze it, convert it to MPO form at bond dimension 16, and check the converted model's accuracy.
# Files go to $RUNS_DIR (default: runs/).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
runs="${RUNS_DIR:-runs}"
mkdir -p "$runs"
python "$here/quickstart.py" train "$runs/fc2_digits.pt"
mpocompress analyze "$runs/fc2_digits.pt" --arch fc2
mpocompress convert "$runs/fc2_digits.pt" --arch fc2 --bond-dim 16 -o "$runs/fc2_digits_d16.safetensors" --force
python "$here/quickstart.py" evaluate "$runs/fc2_digits_d16.safetensors"
