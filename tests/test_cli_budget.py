"""The command line of issue 14: --target-params, --max-error, --structure, --calib, --calib-samples,
--sequential, and analyze's error-against-size curves; each error path is one line with exit 2 and
writes nothing."""

import hashlib

import pytest
import torch

from mpocompress import build_model, load
from mpocompress.nn import FactorizedLayer, LowRankLinear
from test_cli_train import invoke, run_json

LAYER_KEYS = {"name", "structure", "ranks", "rel_error", "output_rel_error", "bond_dims", "params_mpo", "rho"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    torch.manual_seed(0)
    torch.save(build_model("fc2").state_dict(), d / "fc2.pt")
    torch.save(build_model("lenet5").state_dict(), d / "lenet5.pt")
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.rand(64, 1, 28, 28, generator=g)}, d / "images.pt")  # inputs without labels
    torch.save({"x": torch.rand(64, 5, generator=g)}, d / "wrong.pt")  # inputs the model cannot take
    (d / "s.txt").write_text("A first sentence.\nA second one.\n")
    return d


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _size(data):
    return data["params_model_after"]


def test_convert_to_a_budget_with_calibration(files, tmp_path):
    out = tmp_path / "m.safetensors"
    data = run_json("convert", files / "fc2.pt", "--arch", "fc2", "--target-params", "0.3", "--calib", "digits",
                    "--calib-samples", "128", "-o", out)  # fmt: skip
    before = data["params_model_before"]
    left = round(0.3 * before) - _size(data)
    # within 1 % of the target, or short of it by less than one rank step (FC2's fc1: 784 + 256 per rank)
    steps = [sum(lr["weight_shape"]) for lr in data["layers"] if lr["structure"] == "lowrank"]
    assert 0 <= left and (left <= 0.01 * 0.3 * before or left < min(steps))
    for layer in data["layers"]:
        assert LAYER_KEYS <= set(layer) and layer["structure"] in ("lowrank", "mpo") and layer["output_rel_error"] is not None
        assert layer["ranks"] == layer["bond_dims"] and layer["params_mpo"] < layer["params_original"]
    assert all(s["structure"] == "dense" for s in data["skipped"])
    assert any("calibrated on 128 samples of digits" in n for n in data["notes"])
    model = load(out)
    assert sum(p.numel() for p in model.parameters()) == _size(data)
    assert any(isinstance(m, FactorizedLayer) for m in model.modules())


def test_absolute_counts_with_suffixes(files, tmp_path):
    data = run_json("convert", files / "fc2.pt", "--arch", "fc2", "--target-params", "60k", "-o", tmp_path / "m.safetensors")
    assert 59_400 <= _size(data) <= 60_000 and all(lr["output_rel_error"] is None for lr in data["layers"])


def test_structure_lowrank_with_a_rank(files, tmp_path):
    out = tmp_path / "m.safetensors"
    data = run_json("convert", files / "fc2.pt", "--arch", "fc2", "--structure", "lowrank", "-D", "12", "-o", out)
    assert [lr["ranks"] for lr in data["layers"]] == [[12]] and data["layers"][0]["in_modes"] == [1, 784]
    assert isinstance(load(out).fc1, LowRankLinear)


def test_max_error_alone(files, tmp_path):
    data = run_json("convert", files / "fc2.pt", "--arch", "fc2", "--max-error", "0.5", "--calib", "digits",
                    "--calib-samples", "64", "-o", tmp_path / "m.safetensors")  # fmt: skip
    assert data["layers"] and all(lr["output_rel_error"] <= 0.5 + 1e-6 for lr in data["layers"])


def test_sequential_and_a_tensors_file_without_labels(files, tmp_path):
    data = run_json("convert", files / "lenet5.pt", "--arch", "lenet5", "--target-params", "0.5", "--calib",
                    files / "images.pt", "--sequential", "-o", tmp_path / "m.safetensors")  # fmt: skip
    assert {lr["name"] for lr in data["layers"]} and _size(data) <= 0.5 * data["params_model_before"]


def test_tables_show_structure_and_output_error(files, tmp_path):
    r = invoke("convert", files / "fc2.pt", "--arch", "fc2", "--target-params", "0.3", "--calib", "digits",
               "--calib-samples", "64", "-o", tmp_path / "m.safetensors")  # fmt: skip
    assert r.exit_code == 0, r.output
    for text in ("structure", "output error", "ranks", "Model parameters"):
        assert text in r.stdout


def test_analyze_with_calibration_shows_curves_and_the_allocation(files):
    before = _sha(files / "fc2.pt")
    data = run_json("analyze", files / "fc2.pt", "--arch", "fc2", "--calib", "digits", "--calib-samples", "64",
                    "--target-params", "0.3")  # fmt: skip
    assert set(data["curves"]) == {"fc1", "fc2"} and data["layers"]
    for points in data["curves"].values():
        assert {p["structure"] for p in points} >= {"dense", "lowrank", "mpo"}
        assert all(set(p) == {"structure", "params", "rel_error", "ranks"} for p in points)
    r = invoke("analyze", files / "fc2.pt", "--arch", "fc2", "--calib", "digits", "--calib-samples", "64")
    assert r.exit_code == 0 and "Error against size" in r.stdout and "--target-params" in r.stdout
    assert _sha(files / "fc2.pt") == before


@pytest.mark.parametrize("args, fragment", [
    (["--target-params", "100"], "cannot be met"),
    (["--target-params", "0.3", "--calib", "{d}/wrong.pt"], "does not run on the calibration data"),
    (["--target-params", "0.3", "--calib", "{d}/missing.pt"], "missing.pt"),
    (["--target-params", "0.3", "--calib", "text:{d}/s.txt"], "tokenizer"),
    (["--target-params", "abc"], "--target-params 'abc' is not a number"),
    (["--target-params", "-3"], "must be positive"),
    (["--target-params", "1.5"], "whole count"),
    (["--max-error", "2"], "--max-error must lie strictly between 0 and 1"),
    (["--target-params", "0.5", "-D", "4"], "give either"),
    (["--target-params", "0.5", "--sequential"], "--sequential calibrates layer by layer and needs --calib"),
    (["--structure", "tucker", "-D", "4"], "unknown structure 'tucker'"),
    (["--target-params", "0.5", "--calib", "digits", "--calib-samples", "0"], "--calib-samples must be a whole number >= 1"),
    (["--cores", "9", "-D", "4"], "--cores must be at most 8"),
])  # fmt: skip
def test_bad_budgets_and_calibration_are_one_line_errors(files, tmp_path, args, fragment):
    out = tmp_path / "m.safetensors"
    r = invoke("convert", files / "fc2.pt", "--arch", "fc2", *[a.format(d=files) for a in args], "-o", out)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_calibration_data_with_nan_is_refused(files, tmp_path):
    x = torch.rand(16, 1, 28, 28)
    x[3, 0, 5, 5] = float("nan")
    torch.save({"x": x}, tmp_path / "nan.pt")
    r = invoke("convert", files / "fc2.pt", "--arch", "fc2", "--target-params", "0.3", "--calib", tmp_path / "nan.pt",
               "-o", tmp_path / "m.safetensors")  # fmt: skip
    assert r.exit_code == 2 and "NaN" in r.stderr and not (tmp_path / "m.safetensors").exists()


def test_eps_keeps_dense_what_would_grow(files, tmp_path):
    data = run_json("convert", files / "fc2.pt", "--arch", "fc2", "--eps", "0.3", "--layers", "fc1", "--layers", "fc2",
                    "-o", tmp_path / "m.safetensors")  # fmt: skip
    assert _size(data) <= data["params_model_before"]
    assert any("would not be smaller" in s["reason"] for s in data["skipped"])
