"""Broken and hostile inputs, table-driven, for every command.

Each case must give exactly one line `error: ...` on stderr naming the problem, exit status 2, no
traceback, nothing on stdout, no output file (not even a temporary one), and leave every input
file byte-for-byte unchanged. The tables below are the inventory the README's guards section
counts: model files, architectures, conversion options, outputs, datasets and training options.
"""

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mpocompress import CompressionConfig, build_model, compress_, save
from mpocompress.io import tensors_digest
from mpocompress.io.metadata import metadata_digest
from test_cli_train import invoke

# ----------------------------------------------------------------------------- the broken files


def _own_parts(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, meta=None, tensors=None, drop=(), redigest=True):
    """Copy an mpocompress file with edited metadata / tensors; by default with digests that match
    the new tensors and metadata (as an editor who recomputes them would leave them), so that the
    check under test (not a digest) is what must fire."""
    m, t = _own_parts(src)
    m.update(meta or {})
    t.update(tensors or {})
    for k in drop:
        m.pop(k)
    if redigest and "tensors_sha256" in m:
        m["tensors_sha256"] = tensors_digest(t)
    if redigest and "metadata_sha256" in m:
        m["metadata_sha256"] = metadata_digest(m)
    save_file(t, str(dst), metadata=m)


def _layers_edit(src, edit):
    m, _ = _own_parts(src)
    layers = json.loads(m["layers"])
    edit(layers["fc1"])
    return {"layers": json.dumps(layers)}


def _flip(data, at):
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def _idx(magic, dims, payload):
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + (payload if isinstance(payload, bytes) else np.asarray(payload, dtype=np.uint8).tobytes())


def _write_idx_set(folder, test_images=None, test_labels=None, drop=()):
    """A tiny MNIST in the original IDX gz format (20 train, 10 test images), optionally damaged."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte.gz": _idx(2051, (20, 28, 28), rng.integers(0, 256, 20 * 784, dtype=np.uint8)),
        "train-labels-idx1-ubyte.gz": _idx(2049, (20,), np.arange(20) % 10),
        "t10k-images-idx3-ubyte.gz": test_images or _idx(2051, (10, 28, 28), rng.integers(0, 256, 10 * 784, dtype=np.uint8)),
        "t10k-labels-idx1-ubyte.gz": test_labels or _idx(2049, (10,), np.arange(10)),
    }
    for name, data in files.items():
        if name not in drop:
            (folder / name).write_bytes(gzip.compress(data))
    return folder


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    torch.manual_seed(0)
    fc2 = build_model("fc2")
    torch.save(fc2.state_dict(), d / "fc2.pt")
    zip_bytes = (d / "fc2.pt").read_bytes()
    (d / "truncated.pt").write_bytes(zip_bytes[: len(zip_bytes) // 2])
    (d / "flipped.pt").write_bytes(_flip(zip_bytes, len(zip_bytes) // 2))  # inside fc1.weight's data
    torch.save(fc2.state_dict(), d / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (d / "legacy.pt").read_bytes()
    (d / "legacy_truncated.pt").write_bytes(legacy[: len(legacy) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt").write_bytes(b"hello, I am not a model" * 8)
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({}, d / "emptydict.pt")
    torch.save(fc2, d / "whole.pt")
    for name, value in [("nan", float("nan")), ("inf", float("-inf")), ("nan_dense", float("nan"))]:
        m = build_model("fc2")
        with torch.no_grad():
            (m.fc2.bias if name == "nan_dense" else m.fc1.weight)[3] = value
        torch.save(m.state_dict(), d / f"{name}.pt")
    marker = d / "pwned"
    code = (
        "import os, torch\nclass H:\n    def __reduce__(self):\n        return (os.mkdir, (%r,))\n"
        "torch.save({'fc1.weight': torch.zeros(1), 'x': H()}, %r)\n" % (str(marker), str(d / "hostile.pt"))
    )
    subprocess.run([sys.executable, "-c", code], check=True)

    # files in mpocompress's own format: fc2 with fc1 as an MPO, D=4
    compress_(fc2, CompressionConfig(bond_dim=4, layers=("fc1",)))
    own = save(fc2, d / "own.safetensors", arch="fc2")
    data = own.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    (d / "own_truncated.safetensors").write_bytes(data[: len(data) - 100])
    (d / "own_flipped.safetensors").write_bytes(_flip(data, header + (len(data) - header) // 2))
    save_file({k: v.contiguous() for k, v in build_model("fc2").state_dict().items()}, str(d / "foreign.safetensors"))
    foreign = (d / "foreign.safetensors").read_bytes()
    (d / "foreign_header.safetensors").write_bytes(_flip(foreign, 12))  # inside the JSON header
    _rewrite(own, d / "own_v99.safetensors", {"format_version": "99"})
    _rewrite(own, d / "own_vx.safetensors", {"format_version": "x"})
    _rewrite(own, d / "own_nodigest.safetensors", drop=("tensors_sha256",))
    _rewrite(own, d / "own_layers_json.safetensors", {"layers": "{not json"})
    _rewrite(own, d / "own_modes.safetensors", _layers_edit(own, lambda s: s.update(in_modes=[4, 7, 7, 5])))
    _rewrite(own, d / "own_bond_cap.safetensors", _layers_edit(own, lambda s: s.update(bond_dims=[4, 999, 4])))
    _rewrite(own, d / "own_bond_type.safetensors", _layers_edit(own, lambda s: s.update(bond_dims=["4", 4, 4])))
    _rewrite(own, d / "own_kind.safetensors", _layers_edit(own, lambda s: s.update(kind="attention")))
    _rewrite(own, d / "own_shape.safetensors", _layers_edit(own, lambda s: s.update(bond_dims=[3, 3, 3])))
    _rewrite(own, d / "own_lacks.safetensors", {"layers": json.dumps({"fc9": json.loads(_own_parts(own)[0]["layers"])["fc1"]})})
    _rewrite(own, d / "own_user_arch.safetensors", {"arch": "evil_module_xyz:net"})
    cores = _own_parts(own)[1]
    bad = cores["fc1.cores.1"].clone()
    bad[0, 0, 0, 0] = float("nan")
    _rewrite(own, d / "own_nan.safetensors", tensors={"fc1.cores.1": bad})
    _rewrite(own, d / "own_v_negative.safetensors", {"format_version": "-7"})
    _rewrite(own, d / "own_v_zero.safetensors", {"format_version": "0"})
    _rewrite(own, d / "own_meta_edited.safetensors", _layers_edit(own, lambda s: s.update(bond_dims=[2, 4, 4])), redigest=False)
    _rewrite(own, d / "own_arch_edited.safetensors", {"arch": "fc2(hidden=128)"}, redigest=False)
    lenet = build_model("lenet5")  # an MPO convolution, whose geometry the metadata holds
    compress_(lenet, CompressionConfig(bond_dim=4, layers=("conv3",)))
    conv = save(lenet, d / "conv.safetensors", arch="lenet5")

    def geometry(**edit):
        m, _ = _own_parts(conv)
        layers = json.loads(m["layers"])
        layers["conv3"].update(edit)
        return {"layers": json.dumps(layers)}

    _rewrite(conv, d / "conv_stride0.safetensors", geometry(stride=[0, 1]))
    _rewrite(conv, d / "conv_negative_pad.safetensors", geometry(padding=[-1, 0]))
    _rewrite(conv, d / "conv_dilation.safetensors", geometry(dilation=[1, "2"]))
    _rewrite(conv, d / "conv_padding_mode.safetensors", geometry(padding_mode="mirror"))
    _rewrite(conv, d / "conv_stride_unsigned.safetensors", geometry(stride=[2, 2]), redigest=False)

    # datasets
    _write_idx_set(d / "data_ok" / "mnist")
    (d / "data_empty").mkdir()
    _write_idx_set(d / "data_missing" / "mnist", drop=("t10k-labels-idx1-ubyte.gz",))
    _write_idx_set(d / "data_magic" / "mnist", test_images=_idx(2049, (10, 28, 28), bytes(7840)))
    _write_idx_set(d / "data_short" / "mnist", test_images=_idx(2051, (10, 28, 28), bytes(7000)))
    _write_idx_set(d / "data_labels" / "mnist", test_labels=_idx(2049, (10,), [0, 1, 2, 3, 12, 5, 6, 7, 8, 9]))
    _write_idx_set(d / "data_gz" / "mnist")
    gz = d / "data_gz" / "mnist" / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    x = np.random.default_rng(0).random((30, 28, 28), dtype=np.float32)
    np.savez(d / "classes12.npz", x=x, y=np.arange(30) % 12)
    np.savez(d / "negative.npz", x=x, y=np.arange(30) % 10 - 1)
    x_nan = x.copy()
    x_nan[3, 4, 5] = np.nan
    np.savez(d / "nan_images.npz", x=x_nan, y=np.arange(30) % 10)
    np.savez(d / "no_y.npz", x=x)
    return d


# ----------------------------------------------------------------------------- the tables

# (id, arguments, fragment of the one-line message). {f}: the folder of broken files.
MODEL_CASES = [
    ("missing file", ["{f}/nope.pt", "--arch", "fc2"], "no such file"),
    ("empty file", ["{f}/empty.pt", "--arch", "fc2"], "is empty"),
    ("folder", ["{f}", "--arch", "fc2"], "is a folder"),
    ("garbage bytes", ["{f}/garbage.pt", "--arch", "fc2"], "neither a PyTorch checkpoint"),
    ("truncated zip checkpoint", ["{f}/truncated.pt", "--arch", "fc2"], "is damaged"),
    ("byte-flipped zip checkpoint", ["{f}/flipped.pt", "--arch", "fc2"], "fails the CRC-32 check"),
    ("truncated legacy pickle", ["{f}/legacy_truncated.pt", "--arch", "fc2"], "cannot read"),
    ("pickle of a list", ["{f}/list.pt", "--arch", "fc2"], "not a state_dict"),
    ("pickle of an empty dict", ["{f}/emptydict.pt", "--arch", "fc2"], "not a state_dict"),
    ("hostile pickle", ["{f}/hostile.pt", "--arch", "fc2"], "needs trust"),
    ("whole model without trust", ["{f}/whole.pt"], "--trust-pickle"),
    ("NaN weights", ["{f}/nan.pt", "--arch", "fc2"], "NaN or Inf"),
    ("Inf weights", ["{f}/inf.pt", "--arch", "fc2"], "NaN or Inf"),
    ("state_dict without --arch", ["{f}/fc2.pt"], "--arch NAME"),
    ("state_dict that does not fit --arch", ["{f}/fc2.pt", "--arch", "lenet5"], "do not fit architecture lenet5"),
    ("unknown --arch", ["{f}/fc2.pt", "--arch", "resnet9000"], "unknown architecture"),
    ("bad --arch syntax", ["{f}/fc2.pt", "--arch", "fc2(("], "cannot read"),
    ("--arch not importable", ["{f}/fc2.pt", "--arch", "no_such_module_xyz:net"], "cannot import"),
    ("truncated safetensors", ["{f}/own_truncated.safetensors"], "not a readable safetensors"),
    ("byte-flipped safetensors data", ["{f}/own_flipped.safetensors"], "SHA-256"),
    ("byte-flipped safetensors header", ["{f}/foreign_header.safetensors", "--arch", "fc2"], "not a readable safetensors"),
    ("newer file format", ["{f}/own_v99.safetensors"], "upgrade mpocompress"),
    ("unreadable format version", ["{f}/own_vx.safetensors"], "no valid format_version"),
    ("digest missing", ["{f}/own_nodigest.safetensors"], "lacks the tensors_sha256"),
    ("layer metadata not JSON", ["{f}/own_layers_json.safetensors"], "unreadable layer metadata"),
    ("modes not multiplying to the layer", ["{f}/own_modes.safetensors"], "multiply to 980 -> 256, not the layer's 784 -> 256"),
    ("bond dim above its cap", ["{f}/own_bond_cap.safetensors"], "within their caps"),
    ("bond dim not a number", ["{f}/own_bond_type.safetensors"], "within their caps"),
    ("unknown layer kind", ["{f}/own_kind.safetensors"], "unknown layer kind 'attention'"),
    ("tensor shapes not matching metadata", ["{f}/own_shape.safetensors"], "do not fit architecture fc2"),
    ("MPO layer the architecture lacks", ["{f}/own_lacks.safetensors"], "architecture fc2 lacks"),
    ("user architecture named only by the file", ["{f}/own_user_arch.safetensors"], "pass --arch"),
    ("NaN in an MPO core", ["{f}/own_nan.safetensors"], "NaN or Inf"),
    # metadata that changes what the model computes is validated and covered by metadata_sha256 (format 3)
    ("format version that never existed (-7)", ["{f}/own_v_negative.safetensors"], "never existed"),
    ("format version 0", ["{f}/own_v_zero.safetensors"], "never existed"),
    ("layer metadata edited, digest not", ["{f}/own_meta_edited.safetensors"], "does not match the metadata_sha256"),
    ("architecture edited, digest not", ["{f}/own_arch_edited.safetensors"], "does not match the metadata_sha256"),
    ("conv stride edited, digest not", ["{f}/conv_stride_unsigned.safetensors"], "does not match the metadata_sha256"),
    ("conv stride 0 (digest recomputed)", ["{f}/conv_stride0.safetensors"], "stride must be 2 whole numbers in [1, 4096]"),
    ("conv negative padding", ["{f}/conv_negative_pad.safetensors"], "padding must be 'same', 'valid' or 2 whole numbers"),
    ("conv dilation not a number", ["{f}/conv_dilation.safetensors"], "dilation must be"),
    ("conv unknown padding mode", ["{f}/conv_padding_mode.safetensors"], "padding_mode must be one of"),
]

CONVERSION_CASES = [  # analyze and convert, on a good state_dict
    ("--shape modes not multiplying", ["--shape", "fc1=4x7x7x5:4x4x4x4"], "try 4x7x7x4"),
    ("--shape wrong count", ["--shape", "fc1=4x7x7x4:16x16"], "same number of modes"),
    ("--shape zero", ["--shape", "fc1=0x7x7x4:4x4x4x4"], ">= 1"),
    ("--shape non-numeric", ["--shape", "fc1=axb:4x4"], "whole number"),
    ("--shape without a name", ["--shape", "4x7x7x4:4x4x4x4"], "needs a layer name"),
    ("--shape for no layer", ["--shape", "fc9=4x7x7x4:4x4x4x4"], "matches no layer"),
    ("--bond-dim 0", ["--bond-dim", "0"], "at least 1"),
    ("--bond-dim negative", ["--bond-dim", "-3"], "at least 1"),
    ("--bond-dim non-numeric", ["--bond-dim", "four"], "not a whole number"),
    ("--bond-dim NAME=non-numeric", ["--bond-dim", "fc1=x"], "not a whole number"),
    ("--bond-dim twice", ["-D", "2", "-D", "4"], "twice"),
    ("--eps 0", ["--eps", "0"], "between 0 and 1"),
    ("--eps 1", ["--eps", "1"], "between 0 and 1"),
    ("--eps negative", ["--eps", "-0.1"], "between 0 and 1"),
    ("--eps non-numeric", ["--eps", "tiny"], "not a number"),
    ("--layers matching nothing", ["--layers", "conv*"], "matches no layer"),
    ("--exclude matching nothing", ["--exclude", "fc9"], "matches no layer"),
    ("--layers bad regex", ["--layers", "re:(fc"], "regular expression"),
    ("--cores 0", ["--cores", "0"], "at least 1"),
]

OUTPUT_CASES = [  # convert, finetune and train; {t}: an empty folder for outputs
    ("output folder missing", ["-o", "{t}/no/such/dir/out.safetensors"], "does not exist"),
    ("output folder read-only", ["-o", "{t}/ro/out.safetensors"], "not writable"),
    ("output is a folder", ["-o", "{t}"], "is a folder"),
    ("output exists, no --force", ["-o", "{f}/garbage.pt"], "already exists"),
]

DATA_CASES = [  # finetune, evaluate and train
    ("unknown dataset", ["--data", "imagenet"], "unknown dataset 'imagenet'"),
    ("dataset folder missing", ["--data", "mnist", "--data-dir", "{f}/no_such_dir"], "split not found"),
    ("dataset folder empty", ["--data", "mnist", "--data-dir", "{f}/data_empty"], "not found"),
    ("dataset file missing", ["--data", "mnist", "--data-dir", "{f}/data_missing"], "expected t10k-labels-idx1-ubyte.gz"),
    ("IDX header with a wrong magic number", ["--data", "mnist", "--data-dir", "{f}/data_magic"], "magic number"),
    ("IDX header promising more data", ["--data", "mnist", "--data-dir", "{f}/data_short"], "header promises"),
    ("IDX gzip cut short", ["--data", "mnist", "--data-dir", "{f}/data_gz"], "is corrupt"),
    ("IDX labels out of range", ["--data", "mnist", "--data-dir", "{f}/data_labels"], "labels outside 0..9"),
    ("labels beyond the model's classes", ["--data", "{f}/classes12.npz"], "12 classes"),
    ("negative labels", ["--data", "{f}/negative.npz"], "labels"),
    ("NaN images", ["--data", "{f}/nan_images.npz"], "NaN or Inf"),
    # data without labels: training needs labels; finetune distils (with a teacher); evaluate measures agreement (with a reference)
    ("tensors file without y", ["--data", "{f}/no_y.npz"],
     {"train": "needs tensors x and y", "finetune": "add --distill-from", "evaluate": "add --reference"}),
    ("tensors file missing", ["--data", "{f}/none.npz"], "not found"),
]

TRAINING_CASES = [  # finetune and train
    ("--epochs 0", ["--epochs", "0"], "epochs must be"),
    ("--epochs non-numeric", ["--epochs", "two"], "Invalid value for '--epochs'"),
    ("--batch-size 0", ["--batch-size", "0"], "batch size must be"),
    ("--lr 0", ["--lr", "0"], "learning rate must lie in"),
    ("--lr nan", ["--lr", "nan"], "learning rate must lie in"),
    ("--momentum 1", ["--momentum", "1"], "momentum must lie"),
    ("--weight-decay negative", ["--weight-decay", "-1"], "weight decay must be"),
    ("--schedule unknown", ["--schedule", "linear"], "unknown schedule"),
    ("--warmup beyond the epochs", ["--epochs", "2", "--warmup", "3"], "warm-up must lie"),
    ("--runs 0", ["--runs", "0"], "--runs must be at least 1"),
    ("--device unknown", ["--device", "tpu"], "unknown device 'tpu'"),
    ("--resume without a checkpoint", ["--resume"], "no checkpoint to resume from"),
]

FINETUNE_ONLY = [
    ("--freeze unknown part", ["--freeze", "middle"], "unknown part"),
    ("--distill-from missing", ["--distill-from", "{f}/nope.pt"], "no such file"),
    ("--distill-from hostile pickle", ["--distill-from", "{f}/hostile.pt", "--teacher-arch", "fc2"], "needs trust"),
    ("--distill-alpha above 1", ["--distill-alpha", "2"], "distillation weight"),
    ("output is the input", ["-o", "{f}/own.safetensors", "--force"], "is the input file"),
    ("no output", [], "needs an output file"),
]

TRAIN_ONLY = [
    ("unknown --arch", ["--arch", "resnet9000"], "unknown architecture"),
    ("bad --arch syntax", ["--arch", "fc2(("], "cannot read"),
    ("--arch not importable", ["--arch", "no_such_module_xyz:net"], "cannot import"),
    ("--arch not fitting the data", ["--arch", "lenet5(in_channels=3)"], "does not take digits images"),
    ("--bond-dim without --mpo", ["--arch", "fc2", "-D", "4"], "add --mpo"),
    ("--bond-dim 0", ["--arch", "fc2", "--mpo", "-D", "0"], "at least 1"),
    ("--bond-dim non-numeric", ["--arch", "fc2", "--mpo", "-D", "x"], "not a whole number"),
    ("--bond-dim for no layer", ["--arch", "fc2", "--mpo", "-D", "fc9=4"], "has no MPO layer 'fc9'"),
    ("no output", ["--arch", "fc2"], "needs an output file"),
]


def _table():
    """(command, id, args, fragment) for every case each command takes."""
    own = ["{f}/own.safetensors"]
    good_sd = ["{f}/fc2.pt", "--arch", "fc2"]
    out = ["-o", "{t}/out.safetensors"]
    rows = []
    for cmd in ("analyze", "convert", "finetune", "evaluate"):
        extra = {"convert": ["-D", "4", *out], "finetune": out}.get(cmd, [])
        rows += [(cmd, i, [*a, *extra], m) for i, a, m in MODEL_CASES]
    for cmd in ("analyze", "convert"):
        rows += [(cmd, i, [*good_sd, *a, *(["-o", "{t}/out.safetensors"] if cmd == "convert" else [])]
                  + (["-D", "4"] if cmd == "convert" and not {"-D", "--bond-dim", "--eps"} & set(a) else []), m)
                 for i, a, m in CONVERSION_CASES]  # fmt: skip
    rows += [("convert", i, [*good_sd, "-D", "4", *a], m) for i, a, m in OUTPUT_CASES]
    rows += [("convert", "output is the input", [*good_sd, "-D", "4", "-o", "{f}/fc2.pt", "--force"], "is the input file")]
    rows += [("convert", "no output", [*good_sd, "-D", "4"], "needs an output file")]
    rows += [("convert", "no truncation", [*good_sd, *out], "needs a truncation")]
    rows += [("convert", "NaN in a layer left dense", ["{f}/nan_dense.pt", "--arch", "fc2", "--layers", "fc1", "-D", "4", *out],
              "tensor fc2.bias holds NaN or Inf")]  # fmt: skip
    for cmd in ("finetune", "evaluate"):
        rows += [(cmd, i, [*own, *a, *(out if cmd == "finetune" else [])], m[cmd] if isinstance(m, dict) else m) for i, a, m in DATA_CASES]
    rows += [("finetune", i, [*own, *a], m) for i, a, m in OUTPUT_CASES]
    rows += [("finetune", i, [*own, *a, *out], m) for i, a, m in TRAINING_CASES]
    rows += [("finetune", i, [*own, *a] + (out if "-o" not in a and i != "no output" else []), m) for i, a, m in FINETUNE_ONLY]
    rows += [("evaluate", "--batch-size 0", [*own, "--batch-size", "0"], "at least 1"),
             ("evaluate", "--device unknown", [*own, "--device", "tpu"], "unknown device 'tpu'")]  # fmt: skip
    fc2 = ["--arch", "fc2"]
    rows += [("train", i, [*fc2, *a, *out], m["train"] if isinstance(m, dict) else m) for i, a, m in DATA_CASES if "model's classes" not in i]  # train adapts to them
    rows += [("train", i, [*fc2, *a], m) for i, a, m in OUTPUT_CASES]
    rows += [("train", i, [*fc2, *a, *out], m) for i, a, m in TRAINING_CASES]
    rows += [("train", i, [*a] + (out if i != "no output" else []), m) for i, a, m in TRAIN_ONLY]
    return rows


TABLE = _table()


def _digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, case, args, fragment", TABLE, ids=[f"{c}: {i}" for c, i, _, _ in TABLE])
def test_broken_input(f, tmp_path, monkeypatch, command, case, args, fragment):
    (tmp_path / "ro").mkdir()
    real_access = os.access  # root may write anywhere: make the permission check see what a user would
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(tmp_path / "ro") else real_access(p, mode))
    monkeypatch.delitem(sys.modules, "evil_module_xyz", raising=False)
    before = _digests(f)
    r = invoke(command, *[a.format(f=f, t=tmp_path) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.output and r.stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ro"]  # no output, no temporary, no checkpoint
    assert _digests(f) == before  # inputs untouched
    assert not (f / "pwned").exists() and "evil_module_xyz" not in sys.modules  # nothing ran, nothing imported


def test_every_command_meets_at_least_30_broken_inputs():
    counts = {c: sum(1 for row in TABLE if row[0] == c) for c in ("analyze", "convert", "finetune", "evaluate", "train")}
    assert min(counts.values()) >= 30, counts
