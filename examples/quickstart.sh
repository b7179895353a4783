#!/usr/bin/env bash
# First run on an embedded default (scikit-learn's bundled digits, no download): train a dense FC2,
# analyze it, convert it to MPO form at bond dimension 16, evaluate the converted model, and fine-tune
# it with distillation from the original; the last line sums it up (dense -> converted -> fine-tuned
# accuracy, parameters before -> after). Files go to $RUNS_DIR (default: runs/).
set -euo pipefail
runs="${RUNS_DIR:-runs}"
mkdir -p "$runs"
mpocompress train --arch fc2 --data digits --epochs 10 -o "$runs/fc2_digits.safetensors" --force
mpocompress analyze "$runs/fc2_digits.safetensors"
mpocompress convert "$runs/fc2_digits.safetensors" --bond-dim 16 -o "$runs/fc2_digits_d16.safetensors" --force
mpocompress evaluate "$runs/fc2_digits_d16.safetensors"
mpocompress finetune "$runs/fc2_digits_d16.safetensors" --distill-from "$runs/fc2_digits.safetensors" \
    -o "$runs/fc2_digits_d16_ft.safetensors" --force
