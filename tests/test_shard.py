"""Healing a model sharded over processes: `finetune --shard` under torchrun (FSDP2, gloo on the CPU)
against one process, and its sharded checkpoints (torch.distributed.checkpoint) through a stop by
SIGTERM and --resume.

Two processes with 2 windows each see the same global batches as one process with 4, and FSDP2
averages the gradients as DDP does, so the weights agree up to float32 summation order (1e-5
relative, the issue's bar). A resumed sharded run equals the uninterrupted sharded run exactly:
the same shards, optimizer states, generators and running sums come back.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from lm_models import write_folder
from test_cli_train import invoke
from test_lm import _lines

import mpocompress
from mpocompress.train import DistEnv, is_sharded, shard_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def healing(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    folder = write_folder("llama", d / "llama")
    text = d / "text.txt"
    text.write_text("\n".join(_lines(140)) + "\n")
    r = invoke("convert", folder, "--structure", "lowrank", "-D", "4", "-o", d / "small.safetensors")
    assert r.exit_code == 0, r.output
    return d


def _finetune(d, out, *extra, procs=1, wait=True):
    """The heal: in this process for one process (as the console script runs it), else under torchrun."""
    args = ["-m", "mpocompress", "finetune", str(d / "small.safetensors"), "--distill-from", str(d / "llama"),
            "--data", f"text:{d / 'text.txt'}", "--max-length", "32", "--batch-size", "4", "--device", "cpu",
            "--json", "-o", str(d / out), *extra]  # fmt: skip
    if procs == 1 and wait:
        r = invoke(*args[2:])
        return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)
    if procs > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args]
    if not wait:
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=600, check=False)


def _max_rel_diff(a, b):
    pb = dict(b.named_parameters())
    return max(float((p - pb[n]).detach().abs().max() / pb[n].detach().abs().max()) for n, p in a.named_parameters())


def test_sharded_heal_equals_one_process_and_resumes_exactly(healing):
    d = healing
    one = _finetune(d, "one.safetensors", "--epochs", "1")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _finetune(d, "two.safetensors", "--epochs", "1", "--shard", procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    rep = json.loads(two.stdout)  # one report: rank 0's
    assert two.stderr.count("epoch 1/1:") == 1  # and one progress line: rank 0 speaks for both
    assert rep["sharded"] is True and rep["world_size"] == 2
    first = json.loads(one.stdout)  # the start, measured after sharding there, whole here: the same
    for key in ("top1_agreement_before", "output_rel_error_before"):
        assert rep[key] == pytest.approx(first[key], rel=1e-6, abs=1e-9), key
    a, b, start = (mpocompress.load(d / f) for f in ("one.safetensors", "two.safetensors", "small.safetensors"))
    assert _max_rel_diff(start, a) > 1e-3  # it trained
    assert _max_rel_diff(b, a) < 1e-5
    assert b.lm_head.weight is b.model.embed_tokens.weight  # saved whole, the tie kept

    # stopped by SIGTERM once the first epoch's sharded checkpoint is written, then resumed
    full = _finetune(d, "full.safetensors", "--epochs", "3", "--shard", procs=2)
    assert full.returncode == 0, full.stderr[-3000:]
    run = _finetune(d, "cut.safetensors", "--epochs", "3", "--shard", procs=2, wait=False)
    ckpt = d / "cut.safetensors.ckpt"
    deadline = time.monotonic() + 300
    while not (ckpt / "mpocompress-state.json").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # torchrun passes it on; both workers stop at the same step and save
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0 and "--resume" in err, err[-3000:]
    state = json.loads((ckpt / "mpocompress-state.json").read_text())
    assert state["epoch"] >= 1 and (state["epoch"], state["batch"]) != (3, 0)  # a run cut short
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "mpocompress-state.json"]

    refused = _finetune(d, "cut.safetensors", "--epochs", "3", "--resume")  # a sharded state needs a sharded run
    assert refused.returncode == 2 and "shard" in refused.stderr.strip().splitlines()[-1]
    resumed = _finetune(d, "cut.safetensors", "--epochs", "3", "--shard", "--resume", procs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["output_rel_error_before"] == pytest.approx(rep["output_rel_error_before"], rel=1e-6)
    assert _max_rel_diff(mpocompress.load(d / "cut.safetensors"), mpocompress.load(d / "full.safetensors")) == 0.0
    assert not ckpt.exists()  # removed once the run is complete, as a file checkpoint is


def test_a_sharded_heal_whose_start_is_best_saves_the_start(healing):
    """Distilling the original into itself: the start is the best held-out state (no error at all),
    so it is what the sharded run saves; it was taken whole, before sharding, and each process cuts
    it to its shards to restore it."""
    d = healing
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mpocompress", "finetune",
            str(d / "llama"), "--distill-from", str(d / "llama"), "--data", f"text:{d / 'text.txt'}", "--max-length", "32",
            "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--shard", "--json", "-o", str(d / "same.safetensors")]  # fmt: skip
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["runs"][0]["kept"] == "start"
    assert rep["top1_agreement_before"] == 1.0 and rep["output_rel_error_before"] == pytest.approx(0.0, abs=1e-9)  # measured sharded
    assert _max_rel_diff(mpocompress.load(d / "same.safetensors"), mpocompress.load(d / "llama")) == 0.0


def test_shard_needs_torchrun(healing):
    r = invoke("finetune", healing / "small.safetensors", "--distill-from", healing / "llama", "--data",
               f"text:{healing / 'text.txt'}", "--shard", "-o", healing / "x.safetensors")  # fmt: skip
    assert r.exit_code == 2 and "torchrun" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (healing / "x.safetensors").exists()


def test_shard_model_refuses_one_process_and_a_folder_checkpoint_without_state_is_named(tmp_path):
    with pytest.raises(mpocompress.MPOCompressError, match="torchrun"):
        shard_model(torch.nn.Linear(2, 2), DistEnv())
    assert not is_sharded(torch.nn.Linear(2, 2))
    (tmp_path / "o.safetensors.ckpt").mkdir()
    from mpocompress.io import load_train_state

    with pytest.raises(mpocompress.MPOCompressError, match="not a sharded mpocompress checkpoint"):
        load_train_state(tmp_path / "o.safetensors.ckpt")


def test_only_rank_0_prints_progress(monkeypatch):
    """Progress lines come from rank 0 alone (each torchrun process would repeat them otherwise);
    error lines do not go through this console and still come from every process."""
    from mpocompress.cli.render import make_err_console

    for rank, quiet in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("RANK", rank)
        assert make_err_console().quiet is quiet
    monkeypatch.delenv("RANK")
    assert make_err_console().quiet is False
