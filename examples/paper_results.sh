#!/usr/bin/env bash
# Reproduce docs/results.md: FC2 and LeNet-5 on MNIST, dense and MPO-Net (the paper's Fig. 2 and
# Table I), and convert-then-finetune of trained dense models. About 30 minutes on 2 CPU cores.
#
#   MPOCOMPRESS_DATA=../shared/data bash examples/paper_results.sh [OUT_DIR] [RUNS]
#
# Every command writes its JSON report to OUT_DIR (default runs/results); then
# `python examples/results_table.py OUT_DIR` prints the tables of docs/results.md.
set -euo pipefail
OUT=${1:-runs/results}
RUNS=${2:-3}
mkdir -p "$OUT"
run() {  # run NAME mpocompress ARGS...: keep the JSON report as OUT/NAME.json
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" --json > "$OUT/$name.json"
}

# FC2 (Fig. 2): dense, and MPO-Net with D = 2, 4, 8, 16 for the first layer
run fc2_dense mpocompress train --arch fc2 --data mnist --epochs 20 --runs "$RUNS" -o "$OUT/fc2_dense.safetensors" --force
for D in 2 4 8 16; do
  run "fc2_mpo_D$D" mpocompress train --arch fc2 --mpo --bond-dim "$D" --data mnist --epochs 20 --runs "$RUNS" \
    -o "$OUT/fc2_mpo_D$D.safetensors" --force
done

# LeNet-5 (Table I): dense, and MPO-Net with the three MPOs of Sec. III A 2
run lenet5_dense mpocompress train --arch lenet5 --data mnist --epochs 20 --runs "$RUNS" -o "$OUT/lenet5_dense.safetensors" --force
run lenet5_mpo mpocompress train --arch lenet5 --mpo --data mnist --epochs 20 --runs "$RUNS" -o "$OUT/lenet5_mpo.safetensors" --force

# convert-then-finetune, from run 1 of each trained dense model, with the paper's shapes
FC2_SHAPES=(--shape fc1=4x7x7x4:4x4x4x4 --shape fc2=4x4x4x4:1x1x10x1)
LENET_SHAPES=(--shape conv3=2x10x10x2:2x5x6x2 --shape fc1=2x5x6x2:2x3x7x2 --shape fc2=2x3x7x2:1x5x2x1)
for D in 4 16; do
  run "fc2_convert_D$D" mpocompress convert "$OUT/fc2_dense.safetensors" "${FC2_SHAPES[@]}" --bond-dim "$D" --bond-dim fc2=4 \
    -o "$OUT/fc2_D$D.safetensors" --force
  run "fc2_finetune_D$D" mpocompress finetune "$OUT/fc2_D$D.safetensors" --data mnist --epochs 3 \
    -o "$OUT/fc2_D${D}_ft.safetensors" --force
  run "fc2_distill_D$D" mpocompress finetune "$OUT/fc2_D$D.safetensors" --data mnist --epochs 3 \
    --distill-from "$OUT/fc2_dense.safetensors" -o "$OUT/fc2_D${D}_kd.safetensors" --force
  run "lenet5_convert_D$D" mpocompress convert "$OUT/lenet5_dense.safetensors" "${LENET_SHAPES[@]}" --bond-dim "$D" \
    -o "$OUT/lenet5_D$D.safetensors" --force
  run "lenet5_finetune_D$D" mpocompress finetune "$OUT/lenet5_D$D.safetensors" --data mnist --epochs 3 \
    -o "$OUT/lenet5_D${D}_ft.safetensors" --force
done
python "$(dirname "$0")/results_table.py" "$OUT"
