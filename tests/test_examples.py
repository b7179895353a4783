"""The README's first command runs examples/quickstart.sh: run it for real, end to end."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import mpocompress

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_runs_end_to_end(tmp_path):
    bindir = Path(sys.executable).parent
    env = {**os.environ, "RUNS_DIR": str(tmp_path), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test accuracy" in r.stdout and "Bond dimension sweep" in r.stdout and "Converted to MPO" in r.stdout
    dense_acc = float(r.stdout.split("test accuracy ")[1].split(";")[0])
    assert dense_acc > 0.9  # a real model, trained on real data
    model = mpocompress.load(tmp_path / "fc2_digits_d16.safetensors")
    assert isinstance(model.fc1, mpocompress.MPOLinear) and model.fc1.bond_dims == [16, 16, 16]
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
