"""The command-line contract: options, JSON keys, and one-line errors with exit status 2."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mpocompress import build_model, load
from mpocompress.tensors import MPOShape, rebuild_macs
from mpocompress.cli import app, main

runner = CliRunner()
LAYER_KEYS = {"name", "kind", "in_modes", "out_modes", "bond_dims", "params_original", "params_mpo", "rho", "rel_error", "entropy"}
TOTAL_KEYS = {"layers", "params_original", "params_mpo", "rho", "params_model_before", "params_model_after"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    torch.save(build_model("fc2").state_dict(), d / "fc2.pt")
    torch.save(build_model("lenet5").state_dict(), d / "lenet5.pt")
    torch.save(build_model("fc2"), d / "whole.pt")
    return d


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- analyze


def test_analyze_table_without_bond_dim_shows_sweep(ckpts):
    r = invoke("analyze", ckpts / "lenet5.pt", "--arch", "lenet5")
    assert r.exit_code == 0, r.output
    for text in ["conv3", "fc1", "Bond dimension sweep", "entropy", "Left dense"]:
        assert text in r.stdout


def test_analyze_json_keys(ckpts):
    r = invoke("analyze", ckpts / "fc2.pt", "--arch", "fc2", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # nothing but one JSON object on stdout
    assert TOTAL_KEYS <= set(data) and [s["bond_dim"] for s in data["sweep"]] == [2, 4, 8, 16, 32]
    for layer in data["layers"] + [lr for s in data["sweep"] for lr in s["layers"]]:
        assert LAYER_KEYS <= set(layer)
        assert len(layer["entropy"]) == len(layer["bond_dims"]) == len(layer["in_modes"]) - 1


def test_analyze_at_bond_dim_with_paper_shapes(ckpts):
    r = invoke(
        "analyze", ckpts / "fc2.pt", "--arch", "fc2", "--json", "--bond-dim", "fc1=2", "--bond-dim", "fc2=4",
        "--shape", "fc1=4x7x7x4:4x4x4x4", "--shape", "fc2=4x4x4x4:1x1x10x1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["params_mpo"] == 1024 and data["params_original"] == 784 * 256 + 2560
    assert data["rho"] == pytest.approx(1024 / (784 * 256 + 2560))
    assert {lr["name"]: lr["bond_dims"] for lr in data["layers"]} == {"fc1": [2, 2, 2], "fc2": [4, 4, 4]}
    assert data["params_model_before"] == sum(p.numel() for p in build_model("fc2").parameters())


def test_analyze_layers_eps_and_cores(ckpts):
    r = invoke("analyze", ckpts / "lenet5.pt", "--arch", "lenet5", "--json", "--layers", "re:fc.*", "--eps", "0.5", "--cores", "3")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [lr["name"] for lr in data["layers"]] == ["fc1", "fc2"]
    assert all(len(lr["in_modes"]) == 3 and lr["rel_error"] <= 0.5 for lr in data["layers"])


# ----------------------------------------------------------------------------- convert


def test_convert_writes_a_loadable_file(ckpts, tmp_path):
    src = ckpts / "lenet5.pt"
    digest = _sha(src)
    out = tmp_path / "lenet5_d4.safetensors"
    r = invoke("convert", src, "--arch", "lenet5", "--bond-dim", "4", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["output"] == str(out) and TOTAL_KEYS <= set(data)
    assert [lr["name"] for lr in data["layers"]] == ["conv3", "fc1"]
    model = load(out)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert data["params_model_after"] == sum(p.numel() for p in model.parameters())
    assert _sha(src) == digest  # the input is never modified
    # a converted file is itself an input: analyze it, and convert it again to a smaller D
    r = invoke("analyze", out, "--json", "-D", "2")
    assert r.exit_code == 0, r.output
    assert all(max(lr["bond_dims"]) == 2 for lr in json.loads(r.stdout)["layers"])
    out2 = tmp_path / "lenet5_d2.safetensors"
    r = invoke("convert", out, "-D", "2", "-o", out2)
    assert r.exit_code == 0, r.output
    assert load(out2).conv3.bond_dims == [2, 2, 2]


def test_convert_table_and_force(ckpts, tmp_path):
    out = tmp_path / "fc2.safetensors"
    r = invoke("convert", ckpts / "fc2.pt", "--arch", "fc2", "-D", "4", "-o", out)
    assert r.exit_code == 0 and "Converted to MPO" in r.stdout and "fc1" in r.stdout
    stamp = _sha(out)
    r = invoke("convert", ckpts / "fc2.pt", "--arch", "fc2", "-D", "8", "-o", out)
    assert r.exit_code == 2 and "already exists" in r.stderr and _sha(out) == stamp
    r = invoke("convert", ckpts / "fc2.pt", "--arch", "fc2", "-D", "8", "-o", out, "--force")
    assert r.exit_code == 0 and _sha(out) != stamp


def test_convert_trusted_pickle(ckpts, tmp_path):
    out = tmp_path / "w.safetensors"
    r = invoke("convert", ckpts / "whole.pt", "-D", "4", "-o", out, "--trust-pickle")
    assert r.exit_code == 0, r.output
    assert "records no architecture" in r.stdout
    assert load(out, arch="fc2")(torch.randn(1, 784)).shape == (1, 10)


# ----------------------------------------------------------------------------- errors
# The table of broken and hostile inputs for every command is tests/test_broken_inputs.py.


def test_main_turns_usage_errors_into_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--no-such-option" in err[0]
    with pytest.raises(SystemExit) as e:
        main([])  # bare command: help, success
    assert e.value.code == 0 and "convert" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0
    assert "--bond-dim" in capsys.readouterr().out


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "mpocompress", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "analyze" in r.stdout and "convert" in r.stdout


def test_analyze_reports_macs_per_layer_and_model(ckpts):
    """MACs per sample: dense = rows x N_y x N_x per layer; MPO = the planned contraction's count;
    the model totals add every Linear/Conv2d (LeNet-5's convolutions from its 1x28x28 input)."""
    r = invoke("analyze", ckpts / "lenet5.pt", "--arch", "lenet5", "--bond-dim", "4", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    conv1 = 6 * 1 * 5 * 5 * 28 * 28  # LeNet-5's conv1 (padding 2) has 28x28 output positions
    assert d["macs_model_dense"] > conv1
    # the model's MPO total swaps each reported layer's dense count for its MPO count
    swapped = sum(layer["macs_mpo"] - layer["macs_dense"] for layer in d["layers"])
    assert d["macs_model_mpo"] == d["macs_model_dense"] + swapped
    for layer in d["layers"]:
        assert layer["macs_dense"] == layer["rows_per_sample"] * layer["params_original"]
        assert 0 < layer["macs_mpo"] and layer["plan"]
        if layer["plan"] == "dense":  # a training step of 64 samples rebuilds W once, then the dense product
            shape = MPOShape(tuple(layer["in_modes"]), tuple(layer["out_modes"]), tuple(layer["bond_dims"]))
            assert layer["macs_mpo"] == layer["macs_dense"] + rebuild_macs(shape) // 64
    bad = invoke("analyze", ckpts / "lenet5.pt", "--arch", "lenet5", "--input-shape", "1,x,28")
    assert bad.exit_code != 0 and "--input-shape" in bad.output


def test_version_and_help_texts():
    from mpocompress import __version__

    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"mpocompress {__version__}" and r.stderr == ""
    for command in ("convert", "train", "finetune", "export"):
        help_text = " ".join(invoke(command, "--help").stdout.split())
        assert "-o, --output OUT" in help_text and "[required]" in help_text.split("-o, --output OUT")[1][:200], command
    evaluate_help = " ".join(invoke("evaluate", "--help").stdout.split())
    assert "Where to run the model" in evaluate_help and "Where to train" not in evaluate_help
