#!/usr/bin/env bash
# Convert-then-finetune of the paper's networks with and without calibration (docs/results.md,
# "Calibration on the paper's networks"). About 15 minutes on 2 CPU cores.
#
#   MPOCOMPRESS_DATA=../shared/data bash examples/calib_results.sh [OUT_DIR]
#
# Trains one dense FC2 (20 epochs) and one dense LeNet-5 (8 epochs) on MNIST (seed 0), converts each with the
# paper's shapes at D = 4 and 16, once from the weights alone and once calibrated on the first 512
# MNIST training images (--calib mnist), fine-tunes each for 3 epochs, and keeps every JSON report in
# OUT_DIR (default runs/calib). `python examples/results_table.py --calib OUT_DIR` prints the table.
set -euo pipefail
OUT=${1:-runs/calib}
mkdir -p "$OUT"
run() {  # run NAME mpocompress ARGS...: keep the JSON report as OUT/NAME.json
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" --json > "$OUT/$name.json"
}
[ -f "$OUT/fc2_dense.safetensors" ] || run fc2_dense mpocompress train --arch fc2 --data mnist --epochs 20 -o "$OUT/fc2_dense.safetensors" --force --resume
FC2_SHAPES=(--shape fc1=4x7x7x4:4x4x4x4 --shape fc2=4x4x4x4:1x1x10x1 --bond-dim fc2=4)
LENET_SHAPES=(--shape conv3=2x10x10x2:2x5x6x2 --shape fc1=2x5x6x2:2x3x7x2 --shape fc2=2x3x7x2:1x5x2x1)
for NET in fc2 lenet5; do
  if [ "$NET" = lenet5 ]; then
    [ -f "$OUT/lenet5_dense.safetensors" ] || run lenet5_dense mpocompress train --arch lenet5 --data mnist --epochs 8 \
      -o "$OUT/lenet5_dense.safetensors" --force --resume
    SHAPES=("${LENET_SHAPES[@]}")
  else
    SHAPES=("${FC2_SHAPES[@]}")
  fi
  for D in 4 16; do
    for MODE in weight calib; do
      CAL=(); [ "$MODE" = calib ] && CAL=(--calib mnist)
      run "${NET}_${MODE}_D$D" mpocompress convert "$OUT/${NET}_dense.safetensors" "${SHAPES[@]}" --bond-dim "$D" "${CAL[@]}" \
        -o "$OUT/${NET}_${MODE}_D$D.safetensors" --force
      run "${NET}_${MODE}_D${D}_ft" mpocompress finetune "$OUT/${NET}_${MODE}_D$D.safetensors" --data mnist --epochs 3 \
        -o "$OUT/${NET}_${MODE}_D${D}_ft.safetensors" --force
    done
  done
done
python "$(dirname "$0")/results_table.py" --calib "$OUT"
