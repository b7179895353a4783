"""Work is never lost: SIGINT / SIGTERM during `train` / `finetune` save a resumable checkpoint
mid-epoch, and the resumed run ends bit-identical (on CPU) to one that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mpocompress.cli.training as cli_training
from mpocompress import load
from mpocompress.io import checkpoint_path_for, load_train_state
from mpocompress.train import StopOnSignal
from mpocompress.train import fit as real_fit
from test_cli_train import invoke, run_json

TRAIN = ["train", "--arch", "fc2", "--mpo", "-D", "2", "--epochs", "3", "--batch-size", "16", "--seed", "7"]


def _assert_same_weights(a, b):
    sa, sb = load(a).state_dict(), load(b).state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _signal_at(monkeypatch, signum, epoch, step):
    """Make the real training loop send `signum` to this very process when it reports (epoch, step)."""
    real_fit = cli_training.fit
    sent = []

    def fit_with_signal(*a, on_batch=None, **kw):
        def hook(e, s, steps, loss, acc):
            if (e, s) == (epoch, step) and not sent:
                sent.append((e, s))
                os.kill(os.getpid(), signum)  # handled by mpocompress's handler, as from `kill` or Ctrl-C
            if on_batch is not None:
                on_batch(e, s, steps, loss, acc)
        return real_fit(*a, on_batch=hook, **kw)

    monkeypatch.setattr(cli_training, "fit", fit_with_signal)
    return sent


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_epoch_saves_and_resume_is_bit_identical(tmp_path, monkeypatch, signum, code):
    full = run_json(*TRAIN, "-o", tmp_path / "full.safetensors")
    out = tmp_path / "part.safetensors"
    sent = _signal_at(monkeypatch, signum, epoch=2, step=40)  # digits: 90 batches of 16 per epoch
    r = invoke(*TRAIN, "-o", out)
    assert sent == [(2, 40)]
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]  # besides the per-epoch progress lines
    assert len(lines) == 1 and r.stderr.strip().endswith(lines[0]) and lines[0].startswith(f"error: interrupted by {signal.Signals(signum).name} in epoch 2/3 after batch 40/90")
    assert "--resume" in lines[0] and "Traceback" not in r.output
    assert not out.exists()  # no half-trained output, only the checkpoint
    state = load_train_state(checkpoint_path_for(out))
    assert (state["epoch"], state["batch"], state["partial"]["seen"]) == (1, 40, 40 * 16)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    monkeypatch.setattr(cli_training, "fit", real_fit)
    resumed = run_json(*TRAIN, "-o", out, "--resume")
    _assert_same_weights(tmp_path / "full.safetensors", out)
    assert resumed["accuracy"] == full["accuracy"] and resumed["loss"] == full["loss"]

    def untimed(rep):
        return [{k: v for k, v in h.items() if k != "time_s"} for h in rep["runs"][0]["history"]]

    assert untimed(resumed) == untimed(full)  # the interrupted epoch's running loss and accuracy were restored too


def test_finetune_is_interruptible_too(tmp_path, monkeypatch):
    base = tmp_path / "fc2.safetensors"
    assert invoke("train", "--arch", "fc2", "--epochs", "1", "-o", base).exit_code == 0
    conv = tmp_path / "d4.safetensors"
    assert invoke("convert", base, "-D", "4", "--layers", "fc1", "-o", conv).exit_code == 0
    args = ["finetune", conv, "--epochs", "2", "--batch-size", "16", "--distill-from", base]
    full = run_json(*args, "-o", tmp_path / "full.safetensors")
    _signal_at(monkeypatch, signal.SIGTERM, epoch=1, step=60)
    r = invoke(*args, "-o", tmp_path / "part.safetensors")
    assert r.exit_code == 143 and "after batch 60/90" in r.stderr
    monkeypatch.setattr(cli_training, "fit", real_fit)
    resumed = run_json(*args, "-o", tmp_path / "part.safetensors", "--resume")
    assert resumed["accuracy"] == full["accuracy"]
    _assert_same_weights(tmp_path / "full.safetensors", tmp_path / "part.safetensors")


def test_sigterm_from_outside_a_real_process(tmp_path):
    """`kill -TERM` on a running `python -m mpocompress train`, at whatever point of its second
    epoch the signal lands: exit 143 with a one-line message, a checkpoint, no output; --resume
    then ends bit-identical to an uninterrupted process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "mpocompress", "train", "--arch", "fc2", "--epochs", "2", "--batch-size", "1",
            "--seed", "3", "--device", "cpu"]  # fmt: skip
    full = subprocess.run([*args, "-o", str(tmp_path / "full.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "part.safetensors"
    ckpt = checkpoint_path_for(out)
    proc = subprocess.Popen([*args, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the checkpoint of epoch 1 appears: epoch 2 (1437 batches of 1) is starting
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "--resume" in lines[0], stderr
    assert "Traceback" not in stderr and not out.exists()
    state = load_train_state(ckpt)
    assert state["epoch"] == 1 and 0 < state["batch"] < 1437  # stopped mid-epoch
    resumed = subprocess.run([*args, "-o", str(out), "--resume", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == 2
    _assert_same_weights(tmp_path / "full.safetensors", out)


def test_stop_on_signal_records_then_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() == signal.SIGTERM  # recorded, the process goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal stops at once
    assert signal.getsignal(signal.SIGTERM) is before
