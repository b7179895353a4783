"""Broken and hostile inputs, second round (issue 16): colliding paths, outputs that are not regular
files, signals during a write and stale temporaries, reading instead of mapping small files,
degenerate data and strict JSON, terminals that cannot encode, user code that prints, exits or
fails on import, edited resume states, and plain pickles that name code. Class 4 (metadata
validated and covered by a digest) is in the MODEL_CASES table of tests/test_broken_inputs.py.

As there: exit status 2 and one `error:` line, inputs byte-for-byte unchanged, nothing half-written.
"""

import hashlib
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpocompress.cli.common import print_json
from test_cli_train import invoke


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line_error(r, fragment):
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.output


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("r2")
    assert invoke("train", "--arch", "fc2", "--epochs", "1", "-o", d / "fc2.safetensors").exit_code == 0
    assert invoke("convert", d / "fc2.safetensors", "-D", "4", "-o", d / "fc2_d4.safetensors").exit_code == 0
    return d


# ----------------------------------------------------------------------------- 1. colliding paths


def test_class1_an_input_named_like_the_checkpoint_is_never_overwritten(model, tmp_path):
    inp = tmp_path / "out.safetensors.ckpt"  # the input is named as the run's checkpoint
    inp.write_bytes((model / "fc2_d4.safetensors").read_bytes())
    before = _sha(inp)
    r = invoke("finetune", inp, "--epochs", "1", "-o", tmp_path / "out.safetensors")
    _one_line_error(r, "is the checkpoint")
    teacher = tmp_path / "t.safetensors.ckpt"
    teacher.write_bytes((model / "fc2.safetensors").read_bytes())
    r = invoke("finetune", model / "fc2_d4.safetensors", "--distill-from", teacher, "--epochs", "1", "-o", tmp_path / "t.safetensors")
    _one_line_error(r, "is the checkpoint")
    link = tmp_path / "l.safetensors.ckpt"  # through a symbolic link
    link.symlink_to(model / "fc2_d4.safetensors")
    r = invoke("finetune", model / "fc2_d4.safetensors", "--epochs", "1", "-o", tmp_path / "l.safetensors")
    _one_line_error(r, "is the checkpoint")
    assert _sha(inp) == before and not (tmp_path / "out.safetensors").exists()


def test_class1_the_data_file_is_an_input_too(tmp_path):
    data = tmp_path / "d.pt"
    torch.save({"x": torch.rand(40, 1, 8, 8), "y": torch.arange(40) % 2}, data)
    before = _sha(data)
    _one_line_error(invoke("train", "--arch", "fc2", "--data", data, "-o", data, "--force"), "is the input file")
    ckpt_named = tmp_path / "e.pt"
    torch.save({"x": torch.rand(40, 1, 8, 8), "y": torch.arange(40) % 2}, ckpt_named)
    (tmp_path / "e").mkdir()
    os.rename(ckpt_named, tmp_path / "e" / "m.safetensors.ckpt")
    data2 = tmp_path / "e" / "m.safetensors.ckpt"
    r = invoke("train", "--arch", "fc2", "--data", data2, "--epochs", "1", "-o", tmp_path / "e" / "m.safetensors")
    assert r.exit_code == 2  # a .ckpt name is not a dataset file: refused before anything is written
    assert _sha(data) == before


# ----------------------------------------------------------------------------- 2. outputs that are not regular files


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_class2_an_output_that_is_not_a_regular_file_is_refused_even_with_force(model, tmp_path, kind):
    out = tmp_path / "o.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(out))
    for args in (["convert", model / "fc2.safetensors", "-D", "4"], ["train", "--arch", "fc2", "--epochs", "1"]):
        _one_line_error(invoke(*args, "-o", out, "--force"), "is not a regular file")
    assert not out.is_file() and out.exists()


def test_class2_a_checkpoint_path_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "m.safetensors.ckpt")
    _one_line_error(invoke("train", "--arch", "fc2", "--epochs", "1", "-o", tmp_path / "m.safetensors"), "not a regular file")


# ----------------------------------------------------------------------------- 3. signals during a write, stale temporaries


def test_class3_sigterm_during_a_write_leaves_no_temporary(model, tmp_path):
    """convert is stopped by SIGTERM while its output is being written (the write is slowed down):
    exit 143, one line, neither the output nor a temporary is left."""
    out = tmp_path / "c.safetensors"
    code = (
        "import time, mpocompress.io.model_files as mf\n"
        "orig = mf.save_file\n"
        "def slow(*a, **k):\n    orig(*a, **k)\n    time.sleep(30)\n"
        "mf.save_file = slow\n"
        "from mpocompress.cli import main\n"
        f"main(['convert', {str(model / 'fc2.safetensors')!r}, '-D', '4', '-o', {str(out)!r}])\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".c.safetensors.*.tmp")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".c.safetensors.*.tmp")), "the write never started"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip().splitlines()[-1].startswith("error: terminated"), err
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_class3_a_temporary_a_killed_run_left_is_removed_by_the_next_write(model, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".c.safetensors.{pid}.abcd1234.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / f".c.safetensors.{os.getpid()}.live0000.tmp"  # a live process's: left alone
    other.write_bytes(b"live")
    r = invoke("convert", model / "fc2.safetensors", "-D", "4", "-o", tmp_path / "c.safetensors")
    assert r.exit_code == 0 and not stale.exists() and other.exists()
    assert "removed 1 temporary file(s) a killed earlier run left" in r.stderr


# ----------------------------------------------------------------------------- 6. files read, not mapped


def test_class6_files_are_read_tensor_by_tensor_not_memory_mapped(model, monkeypatch):
    """A file that is memory-mapped and truncated under the reader kills it with SIGBUS; mpocompress
    reads every tensor into memory of its own (SafetensorsSource), so safetensors' loaders, which map
    the file, are never called, and a model loads whatever its size."""
    import safetensors.torch

    def mapped(*a, **k):
        raise AssertionError("memory-mapped")

    monkeypatch.setattr(safetensors.torch, "load_file", mapped)
    monkeypatch.setattr(safetensors.torch, "load", mapped)
    assert invoke("evaluate", model / "fc2_d4.safetensors").exit_code == 0


# ----------------------------------------------------------------------------- 7. degenerate data, strict JSON


@pytest.mark.parametrize("x, y, fragment", [
    (torch.rand(1, 1, 8, 8), torch.tensor([0]), "needs at least 2 samples"),
    (torch.rand(20, 0), torch.arange(20) % 2, "x has no features"),
    (torch.rand(20, 3, 0, 4), torch.arange(20) % 2, "x has no features"),
])  # fmt: skip
def test_class7_data_that_cannot_train_is_refused(tmp_path, x, y, fragment):
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    r = invoke("train", "--arch", "fc2", "--data", tmp_path / "d.pt", "--epochs", "1", "-o", tmp_path / "m.safetensors", "--json")
    _one_line_error(r, fragment)
    assert r.stdout == "" and not (tmp_path / "m.safetensors").exists()


def test_class7_json_output_is_strict_json(capsys):
    print_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -math.inf}})
    out = capsys.readouterr().out

    def bad(c):
        raise ValueError(c)

    assert json.loads(out, parse_constant=bad) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


# ----------------------------------------------------------------------------- 9. terminals that cannot encode


def test_class9_an_ascii_terminal_and_a_non_ascii_output_name(model, tmp_path):
    out = tmp_path / "modèle_ü.safetensors"
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    r = subprocess.run([sys.executable, "-m", "mpocompress", "convert", str(model / "fc2.safetensors"), "-D", "4", "-o", str(out)],
                       capture_output=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert out.is_file() and b"Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mpocompress", "evaluate", str(tmp_path / "nicht_da_ß.safetensors")],
                       capture_output=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stderr.decode("ascii").startswith("error: ")


# ----------------------------------------------------------------------------- 10. user code, edited resume states


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    (tmp_path / "noisy_arch.py").write_text(
        "print('hello from import')\nimport torch\n"
        "def net():\n    print('building')\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))\n"
    )
    (tmp_path / "syntax_arch.py").write_text("def net(:\n")
    (tmp_path / "raising_arch.py").write_text("raise RuntimeError('boom on import')\n")
    (tmp_path / "notmodule_arch.py").write_text("def net():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    for name in ("noisy_arch", "syntax_arch", "raising_arch", "notmodule_arch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_class10_what_user_code_prints_never_reaches_json_stdout(user_modules):
    r = invoke("train", "--arch", "noisy_arch:net", "--epochs", "1", "-o", user_modules / "m.safetensors", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["arch"] == "noisy_arch:net"
    assert "hello from import" in r.stderr and "building" in r.stderr


@pytest.mark.parametrize("arch, fragment", [
    ("builtins:exit", "failed while building the model (SystemExit"),
    ("syntax_arch:net", "failed (SyntaxError"),
    ("raising_arch:net", "failed (RuntimeError: boom on import)"),
    ("notmodule_arch:net", "returned int, not a torch.nn.Module"),
])  # fmt: skip
def test_class10_user_code_that_exits_or_fails_is_a_user_error(user_modules, arch, fragment):
    r = invoke("train", "--arch", arch, "--epochs", "1", "-o", user_modules / "m.safetensors", "--json")
    _one_line_error(r, fragment)
    assert r.stdout == "" and not (user_modules / "m.safetensors").exists()


def test_class10_a_checkpoint_edited_to_claim_a_later_epoch_is_refused(tmp_path):
    from mpocompress.io import load_train_state, save_train_state

    out = tmp_path / "m.safetensors"
    assert invoke("train", "--arch", "fc2", "--epochs", "2", "-o", out, "--keep-checkpoint").exit_code == 0
    ckpt = tmp_path / "m.safetensors.ckpt"
    state = load_train_state(ckpt)
    for edit in ({"epoch": 9}, {"epoch": 1}, {"batch": 10_000}):  # past the run; history says 2; no such step
        save_train_state(ckpt, {**state, **edit})  # a valid digest: only the consistency check can tell
        r = invoke("train", "--arch", "fc2", "--epochs", "2", "-o", out, "--resume")
        _one_line_error(r, "cannot have written")


# ----------------------------------------------------------------------------- 11. plain pickles that name code


class _Evil:
    def __reduce__(self):
        return (open, ("/nonexistent/never-created", "w"))


def test_class11_a_plain_pickle_naming_a_callable_needs_trust_in_one_line(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    for command in ("analyze", "evaluate"):
        r = invoke(command, path, "--arch", "fc2")
        _one_line_error(r, "needs trust")
        assert "Warning" not in r.stderr


# ----------------------------------------------------------------------------- 5. resource bombs


def _edited_copy(src, dst, **meta):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mpocompress.io import tensors_digest
    from mpocompress.io.metadata import metadata_digest

    with safe_open(str(src), framework="pt") as f:
        m, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    m.update(meta)
    m["tensors_sha256"], m["metadata_sha256"] = tensors_digest(t), metadata_digest(m)
    save_file(t, str(dst), metadata=m)


@pytest.mark.parametrize("arch, fragment", [
    ("fc2(hidden=100000000)", "hidden=100000000 is outside"),
    ("fc2(hidden=4096,image_size=4096)", "parameters (256.0 GiB in float32)"),
    ("resnet(m=30000)", "m=30000 is outside"),
    ("resnet(m=1000)", "modules, more than the 5,000"),
])  # fmt: skip
def test_class5_an_architecture_too_large_is_refused_before_anything_is_allocated(model, tmp_path, arch, fragment):
    start = time.time()
    _one_line_error(invoke("train", "--arch", arch, "--epochs", "1", "-o", tmp_path / "m.safetensors"), fragment)
    small = tmp_path / "small.safetensors"  # a small file naming the same architecture (digests recomputed)
    _edited_copy(model / "fc2.safetensors", small, arch=arch)
    _one_line_error(invoke("evaluate", small), fragment)
    assert time.time() - start < 120


def test_class5_nesting_bombs_in_metadata(model, tmp_path):
    for key in ("layers", "data"):
        bomb = tmp_path / f"{key}.safetensors"
        _edited_copy(model / "fc2_d4.safetensors", bomb, **{key: "[" * 100_000 + "]" * 100_000})
        r = invoke("evaluate", bomb)
        _one_line_error(r, "the file is damaged")


def test_class5_an_idx_file_promising_gigabytes_is_refused_before_it_inflates(tmp_path):
    import gzip
    import struct

    folder = tmp_path / "mnist"
    folder.mkdir()
    for stem, magic, dims in (("train-images-idx3-ubyte", 2051, (3_000_000, 28, 28)), ("train-labels-idx1-ubyte", 2049, (60_000,)),
                              ("t10k-images-idx3-ubyte", 2051, (10, 28, 28)), ("t10k-labels-idx1-ubyte", 2049, (10,))):  # fmt: skip
        with gzip.open(folder / f"{stem}.gz", "wb") as f:
            f.write(struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(1000))
    r = invoke("train", "--arch", "fc2", "--data", "mnist", "--data-dir", tmp_path, "--epochs", "1", "-o", tmp_path / "m.safetensors")
    _one_line_error(r, "promises 2,352,000,000 bytes")


# ----------------------------------------------------------------------------- 8. user errors are exit 2, not bugs


@pytest.mark.parametrize("args, fragment", [
    (["train", "--arch", "fc2(hidden=-1)"], "hidden=-1 is outside [1, 4,096]"),
    (["train", "--arch", "fc2(hidden=0)"], "hidden=0 is outside [1, 4,096]"),
    (["train", "--arch", "fc2", "--lr", "1e308"], "learning rate must lie in (0, 1e6]"),
    (["train", "--arch", "fc2", "--seed", str(2**64)], "seed must be a whole number in [0, 2^62)"),
    (["train", "--arch", "fc2", "--data", "{t}/biglabel.pt"], "class indices must be below 1,000,000"),
    (["convert", "{m}/fc2.safetensors", "--cores", "2000", "-D", "4"], "--cores must be at most 8"),
    (["convert", "{m}/fc2.safetensors", "--shape", "fc1=" + "x".join(["1"] * 9999 + ["784"]) + ":4x4x4x4", "-D", "4"], "--shape"),
])  # fmt: skip
def test_class8_user_errors(model, tmp_path, args, fragment):
    torch.save({"x": torch.rand(20, 1, 8, 8), "y": torch.tensor([2**40] + [0] * 19)}, tmp_path / "biglabel.pt")
    args = [a.format(t=tmp_path, m=model) for a in args]
    _one_line_error(invoke(*args, "-o", tmp_path / "out.safetensors"), fragment)
    assert not (tmp_path / "out.safetensors").exists()


def test_class8_input_shape_too_large(model):
    _one_line_error(invoke("analyze", model / "fc2.safetensors", "--input-shape", "100000,100000,100000"), "numbers per sample")


def test_class8_a_file_name_too_long(model, tmp_path):
    _one_line_error(invoke("convert", model / "fc2.safetensors", "-D", "4", "-o", tmp_path / ("a" * 300 + ".safetensors")), "shorter")


@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}, "RANK=3, WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
])  # fmt: skip
def test_class8_a_torchrun_environment_that_makes_no_sense(tmp_path, monkeypatch, env, fragment):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _one_line_error(invoke("train", "--arch", "fc2", "--epochs", "1", "-o", tmp_path / "m.safetensors"), fragment)


def test_class8_a_full_disk_is_a_user_error(model, tmp_path, monkeypatch):
    import errno

    import mpocompress.io.paths as paths

    def full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(paths, "atomic_write", full)
    monkeypatch.setattr("mpocompress.io.model_files.atomic_write", full)
    monkeypatch.setattr("mpocompress.io.train_state.atomic_write", full)
    _one_line_error(invoke("convert", model / "fc2.safetensors", "-D", "4", "-o", tmp_path / "c.safetensors"), "No space left on device")
    _one_line_error(invoke("train", "--arch", "fc2", "--epochs", "1", "-o", tmp_path / "t.safetensors"), "No space left on device")
    r = subprocess.run(f"{sys.executable} -m mpocompress analyze {model / 'fc2.safetensors'} --json > /dev/full", shell=True,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = r.stderr.strip().splitlines()  # progress lines first when the analysis takes over 2 s (a loaded machine)
    assert r.returncode == 2 and lines[-1] == "error: No space left on device: free some space or write elsewhere (-o)"
    assert not [x for x in lines[:-1] if x.startswith(("error", "Traceback"))], r.stderr
