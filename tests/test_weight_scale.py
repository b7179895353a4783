"""benchmarks/weight_scale.py, which the performance notes' weight-scale figures come from: each
factorized layer's norms over the original's, checked against the factors' own product."""

import pytest
import torch
from benchmark_scripts import benchmark_script
from lm_models import write_folder
from test_cli_train import invoke


def test_each_factorized_layer_is_measured_against_its_original(tmp_path, capsys, monkeypatch):
    """A tiny Llama at rank 4 (its tied table included): one row per factorized module, its Frobenius
    and spectral ratios those of B A against the original weight (within 1e-6: the layer's dense
    equivalent is its float32 product), largest first."""
    from mpocompress.io.model_files import load_model

    folder = write_folder("llama", tmp_path / "llama")
    out = tmp_path / "small.safetensors"
    assert invoke("convert", str(folder), "-D", "4", "--structure", "lowrank", "-o", str(out)).exit_code == 0
    mod = benchmark_script("weight_scale")
    small, orig = load_model(out).model, load_model(folder).model
    rows = mod.scales(small, orig)
    factorized = {n for n, m in small.named_modules() if hasattr(m, "first") and hasattr(m, "second")}
    assert {r[0] for r in rows} <= factorized and len(rows) >= 7
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    name, frob, spectral = rows[-1]
    m = small.get_submodule(name)
    a = m.second.detach().double() @ m.first.detach().double()
    w = orig.get_submodule(name).weight.detach().double()
    a = a if a.shape == w.shape else a.T
    assert abs(frob - float(a.norm() / w.norm())) < 1e-6  # the dense equivalent is the layer's float32 product
    assert abs(spectral - float(torch.linalg.matrix_norm(a, 2) / torch.linalg.matrix_norm(w, 2))) < 1e-6
    monkeypatch.setattr("sys.argv", ["weight_scale.py", str(out), str(folder), "--top", "3"])
    mod.main()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{len(rows)} factorized layers") and len(printed) == 2 + 3
    monkeypatch.setattr("sys.argv", ["weight_scale.py", str(folder), str(folder)])  # nothing factorized: one line
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 2 and "has no factorized layers" in capsys.readouterr().err
