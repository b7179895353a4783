"""`mpocompress sweep`: each setting against `convert` + `evaluate` of the same setting, the
fine-tuning statistics against Eqs. 10-11, resume per setting, the files, and bad input."""

import csv
import json
import statistics

import pytest

from test_cli_train import invoke, run_json

SHAPES = ["--shape", "fc1=4x7x7x4:4x4x4x4"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    assert invoke("train", "--arch", "fc2", "--epochs", "3", "-o", d / "fc2.safetensors").exit_code == 0
    return d / "fc2.safetensors"


def test_each_setting_is_what_convert_then_evaluate_gives_and_the_files_agree(dense, tmp_path):
    out = tmp_path / "sw"
    rep = run_json("sweep", dense, "-D", "2,8", "--finetune-epochs", "1", "--runs", "2", *SHAPES, "-o", out)
    assert [p["setting"] for p in rep["points"]] == ["D=2", "D=8"] and rep["data"] == "digits"
    assert rep["dense"]["accuracy"] == run_json("evaluate", dense)["accuracy"]
    for p in rep["points"]:
        conv = run_json("convert", dense, "-D", str(p["bond_dim"]), *SHAPES, "-o", tmp_path / f"{p['setting']}.safetensors")
        assert p["rho"] == pytest.approx(conv["rho"]) and p["params_model"] == conv["params_model_after"]
        assert p["accuracy_converted"] == run_json("evaluate", tmp_path / f"{p['setting']}.safetensors")["accuracy"]
        assert len(p["accuracy_finetuned"]) == 2
        assert p["accuracy_finetuned_mean"] == pytest.approx(statistics.mean(p["accuracy_finetuned"]))
        assert p["accuracy_finetuned_std"] == pytest.approx(statistics.stdev(p["accuracy_finetuned"]))
    assert rep["points"][0]["rho"] < rep["points"][1]["rho"]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["complete"] and saved["points"] == rep["points"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["setting"] for r in rows] == ["D=2", "D=8"] and float(rows[1]["accuracy_converted"]) == rep["points"][1]["accuracy_converted"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rep["plot"] == str(out / "sweep.png")


def test_an_interrupted_sweep_resumes_with_the_settings_it_lacks(dense, tmp_path):
    out = tmp_path / "sw"
    full = run_json("sweep", dense, "-D", "2,4,8", *SHAPES, "-o", out)
    state = json.loads((out / "sweep.json").read_text())
    state["points"], state["complete"] = state["points"][:1], False  # as a stop after the first setting leaves it
    (out / "sweep.json").write_text(json.dumps(state))
    r = invoke("sweep", dense, "-D", "2,4,8", *SHAPES, "-o", out, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert "setting 1/3" not in r.stderr and "setting 2/3" in r.stderr and "setting 3/3" in r.stderr
    assert json.loads(r.stdout)["points"] == full["points"]
    r = invoke("sweep", dense, "-D", "2,4", *SHAPES, "-o", out, "--resume")
    assert r.exit_code == 2 and "different sweep (its settings differ)" in r.stderr
    r = invoke("sweep", dense, "-D", "2,4,8", *SHAPES, "-o", out)
    assert r.exit_code == 2 and "--resume to continue" in r.stderr


def test_a_budget_sweep_meets_each_budget(dense, tmp_path):
    rep = run_json("sweep", dense, "--target-params", "0.05,0.2", "-o", tmp_path / "sw")
    before = rep["dense"]["params_model"]
    for p, f in zip(rep["points"], (0.05, 0.2)):
        assert abs(p["params_model"] - f * before) <= 0.01 * before and p["setting"] == f"P={f:g}"


@pytest.mark.parametrize("args, fragment", [
    (["-D", "2,4", "--target-params", "0.5"], "not both"),
    (["-D", "2,x"], "cannot read --bond-dim"),
    (["-D", "4,4"], "given twice"),
    (["--target-params", "1.5"], "fractions in (0, 1]"),
    (["--runs", "0"], "--runs >= 1"),
    (["--data", "text:{tmp}/s.txt"], "does not read text"),
    (["--normalize", "x"], "cannot read --normalize"),
    (["--lr", "nan"], "learning rate must lie in"),
    (["--lr", "inf", "--finetune-epochs", "1"], "learning rate must lie in"),
])  # fmt: skip
def test_bad_sweeps_are_one_line_errors_and_write_nothing(dense, tmp_path, args, fragment):
    (tmp_path / "s.txt").write_text("one line\nanother line\n")
    r = invoke("sweep", dense, *[a.replace("{tmp}", str(tmp_path)) for a in args], "-o", tmp_path / "sw")
    assert r.exit_code == 2 and fragment in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "sw").exists()


def test_a_sweep_that_fails_before_measuring_anything_leaves_nothing_to_block_the_rerun(dense, tmp_path):
    out = tmp_path / "sw"
    r = invoke("sweep", dense, "--target-params", "0.0001", "-o", out)  # no setting can meet it
    assert r.exit_code == 2 and "cannot be met" in r.stderr and not out.exists()
    rep = run_json("sweep", dense, "-D", "2", *SHAPES, "-o", out)  # the corrected rerun needs no --force
    assert [p["setting"] for p in rep["points"]] == ["D=2"]


@pytest.mark.parametrize("damage", ["malformed point", "setting not asked", "NaN", "duplicated point", "deep nesting", "not JSON"])
def test_a_damaged_sweep_state_is_a_one_line_error_on_resume(dense, tmp_path, damage):
    out = tmp_path / "sw"
    run_json("sweep", dense, "-D", "2,4", *SHAPES, "-o", out)
    path = out / "sweep.json"
    state = json.loads(path.read_text())
    point = state["points"][0]
    text = {
        "malformed point": lambda: json.dumps({**state, "points": [5]}),
        "setting not asked": lambda: json.dumps({**state, "points": [{**point, "setting": "D=999"}]}),
        "NaN": lambda: json.dumps({**state, "points": [{**point, "rho": float("nan")}]}),
        "duplicated point": lambda: json.dumps({**state, "points": [point, point]}),
        "deep nesting": lambda: json.dumps({**state, "extra": 0})[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "not JSON": lambda: "{not json",
    }[damage]()
    path.write_text(text)
    r = invoke("sweep", dense, "-D", "2,4", *SHAPES, "-o", out, "--resume")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and str(path) in r.stderr, r.output
    assert path.read_text() == text  # the damaged state is left as it was
