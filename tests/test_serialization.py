import hashlib
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mpocompress.io as ser
from mpocompress import CompressionConfig, MPOLinear, build_model, compress_, load, load_model, save
from mpocompress.errors import MPOCompressError


class Hostile:
    """Unpickling this creates a folder: a stand-in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _compressed(arch="lenet5", **cfg):
    model = build_model(arch)
    compress_(model, CompressionConfig(bond_dim=3, **cfg))
    return model.eval()


@pytest.mark.parametrize("arch", ["fc2", "lenet5", "lenet5(in_channels=3,image_size=32)"])
def test_save_load_round_trip_is_bit_identical(tmp_path, arch):
    model = _compressed(arch)
    path = save(model, tmp_path / "m.safetensors", arch=arch)
    loaded = load(path)  # the file alone suffices for built-in architectures
    assert not loaded.training
    size = 32 if "32" in arch else 28
    x = torch.randn(5, 3 if "in_channels=3" in arch else 1, size, size)
    assert torch.equal(loaded(x), model(x))
    assert repr(loaded) == repr(model)


def test_metadata_describes_the_model(tmp_path):
    model = _compressed("lenet5")
    path = save(model, tmp_path / "m.safetensors", arch="lenet5", extra_metadata={"compression": {"bond_dim": 3}})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert meta["format"] == "mpocompress" and meta["format_version"] == "3" and meta["arch"] == "lenet5"
    # the digest is SHA-256 over name, dtype, shape and bytes of each tensor in name order (hashlib, recomputed here)
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode() + t.numpy().tobytes())
    assert meta["tensors_sha256"] == h.hexdigest()
    layers = json.loads(meta["layers"])
    assert set(layers) == {"conv3", "fc1"}
    assert layers["conv3"]["kind"] == "conv2d" and layers["conv3"]["in_modes"] == list(model.conv3.in_modes)
    assert json.loads(meta["compression"]) == {"bond_dim": 3}
    assert "conv3.cores.0" in keys and "conv3.weight" not in keys


def test_state_dict_inputs(tmp_path):
    model = build_model("fc2")
    sd = model.state_dict()
    x = torch.randn(2, 1, 28, 28)
    torch.save(sd, tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "c.pt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "d.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "e.safetensors"))
    for name in ["a.pt", "b.pth", "c.pt", "d.pt", "e.safetensors"]:
        loaded = load_model(tmp_path / name, arch="fc2")
        assert loaded.source == "state_dict"
        assert torch.equal(loaded.model(x), model(x)), name


def test_state_dict_needs_an_arch_that_fits(tmp_path):
    torch.save(build_model("fc2").state_dict(), tmp_path / "m.pt")
    with pytest.raises(MPOCompressError, match="--arch"):
        load_model(tmp_path / "m.pt")
    with pytest.raises(MPOCompressError, match="do not fit architecture lenet5"):
        load_model(tmp_path / "m.pt", arch="lenet5")
    with pytest.raises(MPOCompressError, match=r"fc1.weight is \(256, 784\) in the file but \(256, 3072\)"):
        load_model(tmp_path / "m.pt", arch="fc2(in_channels=1,image_size=28*2)" if False else "fc2(in_channels=3,image_size=32)")


def test_pickled_module_needs_trust(tmp_path):
    model = build_model("fc2")
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(MPOCompressError, match="--trust-pickle"):
        load_model(tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", trust_pickle=True)
    assert loaded.source == "pickled_module" and loaded.arch is None
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.model(x), model(x))


def test_hostile_pickle_runs_nothing_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weights": torch.zeros(2), "payload": Hostile(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(MPOCompressError, match="--trust-pickle"):
        load_model(tmp_path / "evil.pt", arch="fc2")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"not a checkpoint at all" * 10, "cannot read"), (b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "safetensors")],
)
def test_broken_files(tmp_path, content, message):
    p = tmp_path / "broken.pt"
    p.write_bytes(content)
    with pytest.raises(MPOCompressError, match=message):
        load_model(p, arch="fc2")


def test_truncated_outputs_are_reported(tmp_path):
    path = save(_compressed("fc2"), tmp_path / "m.safetensors", arch="fc2")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MPOCompressError):
        load(tmp_path / "cut.safetensors")


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(MPOCompressError, match="no such file"):
        load_model(tmp_path / "nope.pt", arch="fc2")
    with pytest.raises(MPOCompressError, match="folder"):
        load_model(tmp_path, arch="fc2")


def test_user_architecture_must_be_named_again(tmp_path, monkeypatch):
    (tmp_path / "user_nets_ser.py").write_text(
        "import torch.nn as nn\n"
        "def net(width=512):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "user_nets_ser", raising=False)
    spec = "user_nets_ser:net(width=256)"
    model = build_model(spec)
    compress_(model, CompressionConfig(bond_dim=4))
    path = save(model, tmp_path / "u.safetensors", arch=spec)
    monkeypatch.delitem(sys.modules, "user_nets_ser", raising=False)
    with pytest.raises(MPOCompressError, match="pass --arch"):
        load(path)
    assert "user_nets_ser" not in sys.modules  # nothing was imported because of the file
    x = torch.randn(3, 64)
    assert torch.equal(load(path, arch=spec)(x), model.eval()(x))


def test_pickled_model_output_needs_arch_to_load(tmp_path):
    model = _compressed("fc2")
    path = save(model, tmp_path / "m.safetensors", arch=None)
    with pytest.raises(MPOCompressError, match="records no architecture|does not record"):
        load(path)
    assert torch.equal(load(path, arch="fc2")(torch.ones(1, 784)), model(torch.ones(1, 784)))


def test_newer_format_is_refused(tmp_path):
    model = _compressed("fc2")
    path = save(model, tmp_path / "m.safetensors", arch="fc2")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = "99"
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata=meta)
    with pytest.raises(MPOCompressError, match="upgrade mpocompress"):
        load(tmp_path / "new.safetensors")


def test_outputs_are_never_overwritten_without_force(tmp_path):
    model = _compressed("fc2")
    path = save(model, tmp_path / "m.safetensors", arch="fc2")
    stamp = path.read_bytes()
    with pytest.raises(MPOCompressError, match="--force"):
        save(build_model("fc2"), path, arch="fc2")
    assert path.read_bytes() == stamp
    save(build_model("fc2"), path, arch="fc2", force=True)
    assert path.read_bytes() != stamp
    with pytest.raises(MPOCompressError, match="does not exist"):
        save(model, tmp_path / "missing" / "m.safetensors", arch="fc2")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    model = _compressed("fc2")
    old = save(model, tmp_path / "m.safetensors", arch="fc2").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import mpocompress.io.model_files as model_files

    monkeypatch.setattr(model_files, "save_file", boom)
    with pytest.raises(OSError):
        save(model, tmp_path / "new.safetensors", arch="fc2")
    with pytest.raises(OSError):
        save(model, tmp_path / "m.safetensors", arch="fc2", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no partial or temporary file
    assert (tmp_path / "m.safetensors").read_bytes() == old  # the old file is intact


def test_shared_tensors_are_saved_once_with_the_tie_recorded(tmp_path):
    shared = MPOLinear(256, 256, bond_dim=4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    path = save(model, tmp_path / "s.safetensors", arch=None)
    with safe_open(str(path), framework="pt") as f:
        keys, tied = set(f.keys()), json.loads(f.metadata()["tied"])
    assert "0.cores.0" in keys and "2.cores.0" not in keys
    assert tied == {f"2.cores.{k}": f"0.cores.{k}" for k in range(4)} | ({"2.bias": "0.bias"} if shared.bias is not None else {})


def test_tensor_digest_is_verified_and_version_1_files_still_load(tmp_path):
    model = _compressed("fc2")
    path = save(model, tmp_path / "m.safetensors", arch="fc2")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tensors["fc1.cores.0"] = tensors["fc1.cores.0"] * (1 + 1e-7)  # a change no shape or NaN check can see
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(MPOCompressError, match=r"edited.safetensors is corrupt: its tensors do not match the SHA-256"):
        load(tmp_path / "edited.safetensors")
    old = {k: v for k, v in meta.items() if k != "tensors_sha256"} | {"format_version": "1"}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=old)  # written before digests existed
    assert torch.equal(load(tmp_path / "v1.safetensors").fc1.cores[0], tensors["fc1.cores.0"])


def test_training_checkpoints_carry_a_verified_digest(tmp_path):
    state = {"format": "mpocompress-train-state", "version": 2, "epoch": 1, "model": {"w": torch.arange(100_000.0)},
             "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": []}}  # fmt: skip
    path = ser.save_train_state(tmp_path / "run.ckpt", state)
    loaded = ser.load_train_state(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and "tensors_sha256" not in loaded
    raw = torch.load(path, weights_only=True)
    raw["optimizer"]["state"][0]["momentum_buffer"][1] = 5.0  # edited behind the digest's back, rewritten validly
    torch.save(raw, tmp_path / "edited.ckpt")
    with pytest.raises(MPOCompressError, match="edited.ckpt is corrupt: its tensors do not match"):
        ser.load_train_state(tmp_path / "edited.ckpt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "flipped.ckpt").write_bytes(bytes(data))
    with pytest.raises(MPOCompressError, match="flipped.ckpt is (corrupt|damaged)"):
        ser.load_train_state(tmp_path / "flipped.ckpt")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_a_transformers_file_loads_without_building_the_model_whole(kind, tmp_path, monkeypatch):
    """The made buffers (rotary frequencies, position ids) are made on the meta skeleton as
    from_pretrained makes them, so loading never builds a randomly initialised copy (which held the
    model twice: 1.32 against 0.78 GB peak for SmolLM2 at rank 128). Every tensor, buffers included,
    and the outputs equal those of the model built whole."""
    import transformers
    from lm_models import make_lm

    from mpocompress.io import model_files as mf

    if kind == "bert":
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                               num_attention_heads=4, max_position_embeddings=64)).eval()  # fmt: skip
    else:
        model = make_lm(kind)
    compress_(model, CompressionConfig(bond_dim=4, layers=["*.0.*"]))
    save(model, tmp_path / "m.safetensors")
    built = []
    real = mf._build
    monkeypatch.setattr(mf, "_build", lambda arch, cfg=None, on_meta=False: built.append(on_meta) or real(arch, cfg, on_meta))
    fast = load(tmp_path / "m.safetensors")
    assert built == [True]  # the meta skeleton only
    monkeypatch.setattr(mf, "_skeleton", lambda *a: None)  # the reference: the model built whole, the file's tensors copied in
    whole = load(tmp_path / "m.safetensors")
    assert built == [True, False]
    a, b = fast.state_dict(keep_vars=True), whole.state_dict(keep_vars=True)
    assert all(torch.equal(a[k], b[k]) for k in b) and sorted(a) == sorted(b)
    fb, wb = dict(fast.named_buffers()), dict(whole.named_buffers())
    assert sorted(fb) == sorted(wb) and all(torch.equal(fb[k], wb[k]) for k in wb) and not any(t.is_meta for t in fb.values())
    x = torch.randint(0, 90, (2, 10))
    with torch.no_grad():
        out_a, out_b = fast(x), whole(x)
    key = "logits" if "logits" in out_a else "last_hidden_state"
    assert torch.equal(out_a[key], out_b[key])
