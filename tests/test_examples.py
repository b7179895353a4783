"""The README's first command runs examples/quickstart.sh: run it for real, end to end."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import mpocompress
from mpocompress.io.data import load_dataset
from mpocompress.train import evaluate

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_runs_end_to_end(tmp_path):
    bindir = Path(sys.executable).parent
    env = {**os.environ, "RUNS_DIR": str(tmp_path), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Bond dimension sweep" in r.stdout and "Converted to MPO" in r.stdout and "test accuracy before" in r.stdout
    test = load_dataset("digits", "test")
    dense = mpocompress.load(tmp_path / "fc2_digits.safetensors")
    tuned = mpocompress.load(tmp_path / "fc2_digits_d16_ft.safetensors")
    assert isinstance(tuned.fc1, mpocompress.MPOLinear) and tuned.fc1.bond_dims == [16, 16, 16]
    dense_acc, tuned_acc = evaluate(dense, test)[0], evaluate(tuned, test)[0]
    assert dense_acc > 0.9  # a real model, trained on real data
    assert tuned_acc > dense_acc - 0.05  # fine-tuning recovers what the truncation lost
    assert f"{tuned_acc:.2%}" in r.stdout  # the accuracy `finetune` measured
    last = r.stdout.strip().splitlines()[-1]  # one line sums it up
    conv = evaluate(mpocompress.load(tmp_path / "fc2_digits_d16.safetensors"), test)[0]
    n_dense, n_tuned = (sum(p.numel() for p in m.parameters()) for m in (dense, tuned))
    assert last == f"summary: dense {dense_acc:.2%} -> converted {conv:.2%} -> fine-tuned {tuned_acc:.2%}; parameters {n_dense:,} -> {n_tuned:,}"
    assert tuned(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
