"""`train`, `finetune` and `evaluate` from the command line: JSON contract, files, resume, errors,
and a two-process torchrun run."""

import io
import json
import os
import statistics
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import pytest
import torch
import mpocompress.cli.training as cli_training
from mpocompress import build_model, load
from mpocompress.cli import main

FAST = ["--epochs", "2", "--batch-size", "64"]


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def invoke(*args):
    """Run a command as the console script does (mpocompress.cli.main), capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def fails(*args):
    """A command that must refuse its input: exit 2 and one line on stderr, which is returned."""
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def run_json(*args):
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense FC2 trained on digits, and its D=4 conversion."""
    d = tmp_path_factory.mktemp("trained")
    rep = run_json("train", "--arch", "fc2", *FAST, "-o", d / "fc2.safetensors")
    r = invoke("convert", d / "fc2.safetensors", "-D", "4", "--layers", "fc1", "-o", d / "fc2_d4.safetensors")
    assert r.exit_code == 0, r.output
    return d, rep


def test_train_json_contract_and_output(trained):
    d, rep = trained
    assert {"accuracy", "loss", "rho", "params_model_after", "accuracy_std", "epochs", "wall_time_s", "runs"} <= set(rep)
    assert 0.85 < rep["accuracy"] <= 1 and rep["rho"] == 1.0 and rep["params_model_after"] == 203530
    assert rep["accuracy_std"] is None and rep["epochs"] == 2 and len(rep["runs"][0]["history"]) == 2
    from mpocompress.io.data import load_dataset

    assert rep["runs"][0]["steps"] == 2 * -(-len(load_dataset("digits")) // 64)  # two epochs of batches of 64
    assert not (d / "fc2.safetensors.ckpt").exists()  # the per-epoch checkpoint, removed once the run succeeded
    model = load(d / "fc2.safetensors")  # no --arch needed: the file records it
    ev = run_json("evaluate", d / "fc2.safetensors")
    assert ev["accuracy"] == rep["accuracy"] and ev["loss"] == pytest.approx(rep["loss"], rel=1e-6)
    assert ev["params_model_after"] == sum(p.numel() for p in model.parameters())


def test_train_mpo_net_and_runs(tmp_path):
    rep = run_json("train", "--arch", "fc2", "--mpo", "-D", "4", "--runs", "2", *FAST, "-o", tmp_path / "m.safetensors")
    accs = [r["accuracy"] for r in rep["runs"]]
    assert rep["accuracy"] == pytest.approx(statistics.mean(accs)) and rep["accuracy_std"] == pytest.approx(statistics.stdev(accs))
    assert [r["seed"] for r in rep["runs"]] == [0, 1] and rep["n_runs"] == 2
    assert (tmp_path / "m.safetensors").is_file() and (tmp_path / "m.run2.safetensors").is_file()
    assert rep["params_mpo"] == 1024 + 736 and rep["rho"] == pytest.approx(1760 / 203264)  # M(4) for fc1 and fc2
    assert [m["notation"] for m in rep["mpo_layers"]] == ["M^{4,4,4,4}_{4,7,7,4}(D=4)", "M^{1,1,10,1}_{4,4,4,4}(D=4)"]
    ev = run_json("evaluate", tmp_path / "m.run2.safetensors")
    assert ev["accuracy"] == rep["runs"][1]["accuracy"] and ev["rho"] == rep["rho"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.run2.safetensors", "m.safetensors"]  # no checkpoint left


def test_keep_checkpoint_keeps_every_runs_checkpoint_and_resume_reads_them(tmp_path):
    out = tmp_path / "m.safetensors"
    rep = run_json("train", "--arch", "fc2", "--runs", "2", "--epochs", "1", "--keep-checkpoint", "-o", out)
    assert (tmp_path / "m.safetensors.ckpt").is_file() and (tmp_path / "m.run2.safetensors.ckpt").is_file()
    again = run_json("train", "--arch", "fc2", "--runs", "2", "--epochs", "1", "--resume", "-o", out)  # complete: nothing to train
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in rep["runs"]]
    assert not (tmp_path / "m.safetensors.ckpt").exists()  # this run did not ask to keep them


def test_finetune_reports_before_and_after(trained, tmp_path):
    d, _ = trained
    before = run_json("evaluate", d / "fc2_d4.safetensors")
    src = (d / "fc2_d4.safetensors").read_bytes()
    rep = run_json("finetune", d / "fc2_d4.safetensors", "--epochs", "2", "-o", tmp_path / "ft.safetensors")
    assert rep["accuracy_before"] == before["accuracy"] and rep["accuracy"] > rep["accuracy_before"]
    assert rep["rho"] == before["rho"] < 0.01 and rep["params_model_after"] == before["params_model_after"]
    assert (d / "fc2_d4.safetensors").read_bytes() == src  # the input is never modified
    after = run_json("evaluate", tmp_path / "ft.safetensors")
    assert after["accuracy"] == rep["accuracy"]


def test_finetune_freeze_and_distill(trained, tmp_path):
    d, _ = trained
    rep = run_json("finetune", d / "fc2_d4.safetensors", "--freeze", "central", "--freeze", "dense", "--epochs", "1",
                   "--distill-from", d / "fc2.safetensors", "-o", tmp_path / "ft.safetensors")  # fmt: skip
    model = load(d / "fc2_d4.safetensors")
    cores = [c.numel() for c in model.fc1.cores]
    assert rep["trainable_params"] == sum(cores) - max(cores) + model.fc1.bias.numel()
    assert rep["distill_from"] == str(d / "fc2.safetensors") and rep["freeze"] == ["central", "dense"]
    teacher = run_json("evaluate", d / "fc2.safetensors")  # the teacher's accuracy on the same test split
    assert rep["accuracy_teacher"] == teacher["accuracy"] and rep["loss_teacher"] == pytest.approx(teacher["loss"], rel=1e-6)
    r = invoke("finetune", d / "fc2_d4.safetensors", "--epochs", "1", "--distill-from", d / "fc2.safetensors",
               "-o", tmp_path / "ft2.safetensors")  # fmt: skip
    assert r.exit_code == 0 and f"{teacher['accuracy']:.2%} -> " in r.stdout and "teacher -> before -> after" in r.stdout
    frozen_before = load(d / "fc2_d4.safetensors").fc2.weight
    torch.testing.assert_close(load(tmp_path / "ft.safetensors").fc2.weight, frozen_before, rtol=0, atol=0)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    args = ["train", "--arch", "fc2", "--mpo", "-D", "2", "--epochs", "3", "--seed", "3"]
    full = run_json(*args, "-o", tmp_path / "full.safetensors")

    real_fit = cli_training.fit

    def interrupted_fit(*a, on_epoch=None, **kw):
        def stop(stats):
            if stats.epoch == 1:
                raise KeyboardInterrupt
        return real_fit(*a, on_epoch=stop, **kw)

    monkeypatch.setattr(cli_training, "fit", interrupted_fit)
    r = invoke(*args, "-o", tmp_path / "part.safetensors")
    assert r.exit_code == 130 and not (tmp_path / "part.safetensors").exists()
    monkeypatch.setattr(cli_training, "fit", real_fit)
    resumed = run_json(*args, "-o", tmp_path / "part.safetensors", "--resume")
    assert resumed["accuracy"] == full["accuracy"]
    a, b = load(tmp_path / "full.safetensors"), load(tmp_path / "part.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    # a finished run has no checkpoint left (without --keep-checkpoint): --resume says so and changes nothing
    before = (tmp_path / "part.safetensors").read_bytes()
    r = invoke(*args, "-o", tmp_path / "part.safetensors", "--resume")
    assert r.exit_code == 2 and "the run finished and its checkpoint was removed" in r.stderr
    assert (tmp_path / "part.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--arch", "fc2", "-D", "4", "-o", "{tmp}/x.safetensors"], "add --mpo"),
        (["train", "--arch", "fc2", "--data", "imagenet", "-o", "{tmp}/x.safetensors"], "unknown dataset 'imagenet'"),
        (["train", "--arch", "fc2", "--data", "mnist", "--data-dir", "{tmp}/none", "-o", "{tmp}/x.safetensors"], "mnist train split not found"),
        (["train", "--arch", "fc2"], "needs an output file"),
        (["train", "--arch", "fc2", "--runs", "0", "-o", "{tmp}/x.safetensors"], "--runs must be at least 1"),
        (["train", "--arch", "fc2", "--epochs", "0", "-o", "{tmp}/x.safetensors"], "epochs must be"),
        (["train", "--arch", "fc2", "--schedule", "linear", "-o", "{tmp}/x.safetensors"], "unknown schedule"),
        (["train", "--arch", "fc2", "--lr", "abc", "-o", "{tmp}/x.safetensors"], "Invalid value for '--lr'"),
        (["train", "--arch", "nosuch", "-o", "{tmp}/x.safetensors"], "unknown architecture 'nosuch'"),
        (["train", "--arch", "lenet5(in_channels=3)", "-o", "{tmp}/x.safetensors"], "does not take digits images"),
        (["train", "--arch", "fc2", "--resume", "-o", "{tmp}/x.safetensors"], "no checkpoint to resume from"),
        (["finetune", "{trained}/fc2.safetensors", "--freeze", "central", "-o", "{tmp}/x.safetensors"], "no MPO layers"),
        (["finetune", "{trained}/fc2_d4.safetensors", "--freeze", "middle", "-o", "{tmp}/x.safetensors"], "unknown part"),
        (["finetune", "{trained}/fc2_d4.safetensors", "-o", "{trained}/fc2_d4.safetensors"], "is the input file"),
        (["finetune", "{trained}/fc2_d4.safetensors", "-o", "{trained}/fc2.safetensors"], "already exists"),
        (["finetune", "{trained}/fc2_d4.safetensors", "--distill-from", "{tmp}/none.pt", "-o", "{tmp}/x.safetensors"], "no such file"),
        (["evaluate", "{trained}/fc2.safetensors", "--data", "{tmp}/none.npz"], "not found"),
        (["evaluate", "{tmp}/none.safetensors"], "no such file"),
    ],
)
def test_errors_are_one_line(trained, tmp_path, args, message):
    d, _ = trained
    r = invoke(*[a.format(tmp=tmp_path, trained=d) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_resume_refuses_a_different_run(tmp_path):
    out = tmp_path / "m.safetensors"
    assert invoke("train", "--arch", "fc2", "--epochs", "1", "-o", out, "--keep-checkpoint").exit_code == 0
    r = invoke("train", "--arch", "fc2", "--epochs", "1", "--lr", "0.1", "-o", out, "--resume")
    assert r.exit_code == 2 and "lr: 0.05 then, 0.1 now" in r.output


def test_device_choice():
    r = invoke("evaluate", "nothing.safetensors", "--device", "tpu")
    assert r.exit_code == 2 and "unknown device 'tpu'" in r.output
    r = invoke("train", "--arch", "fc2", "--device", "cuda", "--epochs", "1", "-o", "/nonexistent/x.safetensors")
    expected = "does not exist" if torch.cuda.is_available() else "no CUDA GPU is available"
    assert r.exit_code == 2 and expected in r.output


def test_torchrun_two_processes_match_one(tmp_path):
    """Two gloo processes with batch 32 each train like one process with batch 64: the same global
    batches in the same order, gradients averaged. Compared on the weights after one epoch of 20
    steps on 1,280 samples (a multiple of the global batch, so DistributedSampler pads nothing):
    equal up to float32 summation order (1e-5). A run that never averaged gradients ends far off."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1600, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) * 40).long() % 10
    data = tmp_path / "d.pt"
    torch.save({"x_train": x[:1280], "y_train": y[:1280], "x_test": x[1280:], "y_test": y[1280:]}, data)
    common = ["train", "--arch", "fc2", "--data", str(data), "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mpocompress", *common, "-o", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mpocompress",
         *common, "-o", str(tmp_path / "two.safetensors")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    rep_one, rep_two = json.loads(one.stdout), json.loads(two.stdout)  # one JSON object: only rank 0 reports
    assert rep_two["world_size"] == 2 and rep_one["world_size"] == 1
    torch.manual_seed(0)  # the initial weights of both runs (seed 0)
    start = build_model("fc2")
    a, b = load(tmp_path / "one.safetensors"), load(tmp_path / "two.safetensors")
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), start.parameters()))
    assert moved > 1e-3  # it trained
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["d.pt", "one.safetensors", "two.safetensors"]
    )  # rank 1 wrote nothing; the checkpoints went once the runs succeeded


# ----------------------------------------------------------------------------- data defaults from the file


def test_the_data_a_model_was_trained_on_is_the_default_down_the_chain(tmp_path):
    """train records its data (and how it was served) in the file; convert carries it; finetune and
    evaluate use it when --data is not given, and say so. A tensors file is served as it is: the
    loss evaluate reports is plain PyTorch's on the raw inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long() + 2 * (x[:, 0, 0, 0] > 0.5).long()
    data = tmp_path / "raw.pt"
    torch.save({"x": x, "y": y}, data)
    rep = run_json("train", "--arch", "fc2", "--data", data, "--epochs", "3", "-o", tmp_path / "a.safetensors")
    assert rep["data"] == "raw.pt" and rep["data_options"] == {"image_size": None, "channels": None, "normalize": "none", "from": "option"}
    ev = run_json("evaluate", tmp_path / "a.safetensors")
    assert ev["data"] == "raw.pt" and ev["data_options"]["from"] == "file" and ev["accuracy"] == rep["accuracy"]
    model = load(tmp_path / "a.safetensors")
    from mpocompress.io.data.images import seeded_split

    _, test_idx = seeded_split(300, 0)
    with torch.no_grad():
        plain = float(torch.nn.functional.cross_entropy(model(x[test_idx]), y[test_idx]))
    assert ev["loss"] == pytest.approx(plain, rel=1e-5)  # no normalization the model never saw
    assert invoke("convert", tmp_path / "a.safetensors", "-D", "4", "-o", tmp_path / "b.safetensors").exit_code == 0
    ft = run_json("finetune", tmp_path / "b.safetensors", "--epochs", "1", "-o", tmp_path / "c.safetensors")
    assert ft["data"] == "raw.pt" and ft["data_options"]["from"] == "file"
    r = invoke("evaluate", tmp_path / "c.safetensors")
    assert r.exit_code == 0 and "the data the file records" in r.stdout
    data.unlink()
    r = invoke("evaluate", tmp_path / "c.safetensors")
    assert r.exit_code == 2 and "which is not there any more; give the data with --data" in r.stderr


def test_image_size_channels_and_normalize_serve_the_data_as_the_model_takes_it(tmp_path):
    rep = run_json("train", "--arch", "fc2", "--data", "digits", "--image-size", "8", "--normalize", "none", "--epochs", "2",
                   "-o", tmp_path / "d8.safetensors")  # fmt: skip
    assert rep["data_options"]["image_size"] == 8 and rep["params_model_after"] == 64 * 256 + 256 + 256 * 10 + 10
    ev = run_json("evaluate", tmp_path / "d8.safetensors")  # 8x8, unnormalized: as recorded
    assert ev["data"] == "digits" and ev["data_options"]["image_size"] == 8 and ev["accuracy"] == rep["accuracy"]
    r = invoke("evaluate", tmp_path / "d8.safetensors", "--image-size", "28")
    assert r.exit_code == 2 and "--image-size N" in r.stderr
    lenet = run_json("train", "--arch", "lenet5(in_channels=3,image_size=32)", "--data", "digits", "--channels", "3",
                     "--image-size", "32", "--epochs", "1", "-o", tmp_path / "l.safetensors")  # fmt: skip
    assert lenet["data_options"]["channels"] == 3
    assert run_json("evaluate", tmp_path / "l.safetensors")["accuracy"] == lenet["accuracy"]
    r = invoke("train", "--arch", "fc2", "--normalize", "0.5,-1", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "STD > 0" in r.stderr and not (tmp_path / "x.safetensors").exists()


def test_newcomer_small_things(tmp_path):
    """rho in plain words in --help and under tables; no rho row for a dense model; a missing dataset
    says where its files come from."""
    for command in ("convert", "analyze", "evaluate", "finetune"):
        r = invoke(command, "--help")
        assert r.exit_code == 0 and "factorized weights / dense weights" in " ".join(r.stdout.split()), command
    assert invoke("train", "--arch", "fc2", "--epochs", "1", "-o", tmp_path / "d.safetensors").exit_code == 0
    r = invoke("evaluate", tmp_path / "d.safetensors")
    assert r.exit_code == 0 and "rho" not in r.stdout and "factorized layers" not in r.stdout
    r = invoke("analyze", tmp_path / "d.safetensors")
    assert "above 1 the factorized form is larger than the dense layer" in " ".join(r.stdout.split())
    r = invoke("evaluate", tmp_path / "d.safetensors", "--data", "mnist", "--data-dir", tmp_path)
    assert r.exit_code == 2 and "Yann LeCun's MNIST page" in r.stderr
