"""Sharded output (issue 25): `convert --shard-size SIZE` and `save(..., shard_size=)` write a folder of
safetensors shards with an index, as Hugging Face shards a large model.

The reference is the one-file output of the same model: the sharded folder must load to the same
tensors bit for bit and record the same metadata (digests included); the shards hold runs of names,
each within the size unless one tensor alone is larger. Damaged folders (a missing shard, an index
naming a file outside the folder, a flipped byte, a tensor in the wrong shard, edited metadata) are
refused with one line and exit 2, and a failed write leaves nothing behind.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_models import make_lm, write_folder
from safetensors.torch import load_file
from test_cli_train import fails, invoke, run_json

from mpocompress import load
from mpocompress.cli.common import build_config, parse_shard_size
from mpocompress.compress import compress_
from mpocompress.errors import MPOCompressError
from mpocompress.io import read_metadata, save, tensor_files
from mpocompress.io.tensor_files import INDEX, plan_shards

SHARD = 16_000  # bytes per shard: the tiny Llama's 66 kB table alone, the rest in runs


@pytest.fixture(scope="module")
def converted():
    """A tiny tied Llama with MPO (D 4) and low-rank (rank 8) layers, as convert makes it."""
    model = make_lm("llama")
    config = build_config(["4"], [], ["model.layers.0.*"], [], None, None, "mpo", None, None, False, None, "model")
    compress_(model, config)
    config = build_config(["8"], [], ["model.layers.1.*"], [], None, None, "lowrank", None, None, False, None, "model")
    compress_(model, config)
    return model


def test_plan_shards_keeps_runs_within_the_size():
    """Random sizes: the runs cover every tensor once, in order; each run fits the size or is one
    tensor; and no run could take the next tensor without passing the size (as Hugging Face fills)."""
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([0, rng.randint(1, 100), rng.randint(100, 400)]) for _ in range(rng.randint(0, 30))]
        limit = rng.randint(1, 300)
        runs = plan_shards(sizes, limit)
        assert [i for a, b in runs for i in range(a, b)] == list(range(len(sizes)))
        for k, (a, b) in enumerate(runs):
            assert b > a
            assert sum(sizes[a:b]) <= limit or b - a == 1
            if k + 1 < len(runs):
                assert sum(sizes[a : b + 1]) > limit


def test_a_sharded_save_loads_as_the_one_file_does(converted, tmp_path):
    save(converted, tmp_path / "one.safetensors")
    save(converted, tmp_path / "sharded", shard_size=SHARD)
    shards = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert len(shards) > 3 and shards[-1] == INDEX and shards[0].startswith("model-00001-of-")
    one, many = load(tmp_path / "one.safetensors"), load(tmp_path / "sharded")
    a, b = one.state_dict(), many.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert many.lm_head.weight is many.model.embed_tokens.weight  # the tie restored
    ma, mb = read_metadata(tmp_path / "one.safetensors"), read_metadata(tmp_path / "sharded")
    assert ma == mb  # every key, both digests included: the tensors digest spans the shards in name order
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    stored = {}
    for name in shards[:-1]:
        tensors = load_file(str(tmp_path / "sharded" / name))  # plain safetensors files
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= SHARD or len(tensors) == 1
        stored.update(dict.fromkeys(tensors, name))
    assert stored == index["weight_map"] and "lm_head.weight" not in stored  # stored once, under the embedding
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "one.safetensors")).values())
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(many(x).logits, converted(x).logits, rtol=0, atol=0)


def test_convert_writes_shards_in_memory_and_streamed(tmp_path):
    """The same tiny Llama folder, --sequential in memory and --stream, each one file and sharded: the
    four outputs hold the same tensors, and nothing else is left beside them."""
    folder = write_folder("llama", tmp_path / "llama")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"the stream reads block {i} and writes what it made" for i in range(300)))
    common = ("--calib", f"text:{text}", "-D", "8", "--calib-samples", "16")
    outs = tmp_path / "out"
    outs.mkdir()
    for name, extra in (("mem.safetensors", ("--sequential",)), ("mem", ("--sequential", "--shard-size", "40KB")),
                        ("stream.safetensors", ("--stream",)), ("stream", ("--stream", "--shard-size", "40KB"))):  # fmt: skip
        rep = run_json("convert", folder, *common, *extra, "-o", outs / name)
        assert rep["output"] == str(outs / name)
    ref = load(outs / "mem.safetensors").state_dict()
    for name in ("mem", "stream.safetensors", "stream"):
        got = load(outs / name).state_dict()
        assert sorted(got) == sorted(ref)
        assert max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ref) < 1e-5, name
    assert read_metadata(outs / "stream") == read_metadata(outs / "stream.safetensors")
    assert len(list((outs / "stream").glob("model-*-of-*.safetensors"))) > 2
    assert sorted(p.name for p in outs.iterdir()) == ["mem", "mem.safetensors", "stream", "stream.safetensors"]
    # --force replaces a sharded folder with one of other shards (none of the old ones left)
    run_json("convert", folder, *common, "--stream", "--shard-size", "1MB", "-o", outs / "stream", "--force")
    assert sorted(p.name for p in (outs / "stream").iterdir()) == ["model-00001-of-00001.safetensors", INDEX]
    assert read_metadata(outs / "stream") == read_metadata(outs / "stream.safetensors")
    assert sorted(p.name for p in outs.iterdir()) == ["mem", "mem.safetensors", "stream", "stream.safetensors"]


def _rewrite_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index)
    (folder / INDEX).write_text(json.dumps(index))


def _damaged(converted, tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    """A sharded save to damage, and its shards' names in order (at least four)."""
    folder = tmp_path / name
    save(converted, folder, shard_size=SHARD)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 4
    return folder, shards


def test_damaged_sharded_folders_are_named(converted, tmp_path):
    missing, shards = _damaged(converted, tmp_path, "missing")
    (missing / shards[1]).unlink()
    assert "is missing; copy every shard" in fails("evaluate", missing, "--data", "text:x.txt")

    outside, _ = _damaged(converted, tmp_path, "outside")
    (tmp_path / "evil.safetensors").write_bytes((outside / shards[1]).read_bytes())
    _rewrite_index(outside, lambda ix: ix["weight_map"].update({k: "../evil.safetensors" for k, v in ix["weight_map"].items() if v == shards[1]}))
    assert "lies outside the model folder" in fails("evaluate", outside, "--data", "text:x.txt")

    flipped, _ = _damaged(converted, tmp_path, "flipped")
    shard = flipped / shards[2]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(MPOCompressError, match="do not match the SHA-256"):
        load(flipped)

    moved, _ = _damaged(converted, tmp_path, "moved")
    first = next(k for k, v in json.loads((moved / INDEX).read_text())["weight_map"].items() if v == shards[2])
    _rewrite_index(moved, lambda ix: ix["weight_map"].update({first: shards[3]}))
    with pytest.raises(MPOCompressError, match="does not hold the tensors"):
        load(moved)

    edited, _ = _damaged(converted, tmp_path, "edited")
    _rewrite_index(edited, lambda ix: ix["metadata"].update(layers=ix["metadata"]["layers"].replace('"bond_dims": [4', '"bond_dims": [3')))
    with pytest.raises(MPOCompressError, match="does not match the metadata_sha256"):
        load(edited)

    garbled, _ = _damaged(converted, tmp_path, "garbled")
    (garbled / INDEX).write_text("{not json")
    assert "not a readable index" in fails("evaluate", garbled, "--data", "text:x.txt")


def test_bad_shard_options_and_a_failed_write_leave_nothing(converted, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    save(converted, folder / "model.safetensors")
    model = folder / "model.safetensors"
    assert "not a size" in fails("convert", model, "-D", "4", "--shard-size", "lots", "-o", tmp_path / "o")
    assert "not a size" in fails("convert", model, "-D", "4", "--shard-size", "0", "-o", tmp_path / "o")
    (tmp_path / "file").write_text("x")
    assert "writes a folder" in fails("convert", model, "-D", "4", "--shard-size", "1MB", "-o", tmp_path / "file", "--force")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    assert "no part of a model" in fails("convert", model, "-D", "4", "--shard-size", "1MB", "-o", other, "--force")
    assert (other / "thesis.tex").read_text() == "mine"

    calls = []
    real = tensor_files._write_data

    def fail_on_the_second_shard(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(tensor_files, "_write_data", fail_on_the_second_shard)
    r = invoke("convert", model, "-D", "4", "--shard-size", "40KB", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "No space left" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in", "notes"]  # no output, no temporary


def test_parse_shard_size_units():
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size(" 500 mb ") == 500 * 10**6
    assert parse_shard_size("1.5kB") == 1500
    assert parse_shard_size("123") == 123
    assert parse_shard_size(None) is None
    for bad in ("", "5XB", "-1GB", "0.1b", "GB"):
        with pytest.raises(MPOCompressError, match="not a size"):
            parse_shard_size(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a killed writer's staging folder: Linux process checks")
def test_a_killed_sharded_write_is_cleaned_by_the_next(converted, tmp_path):
    """A run killed while it writes shards leaves only its hidden staging folder; the next write of the
    same output removes it."""
    out = tmp_path / "out"
    code = ("import os, sys, torch; from mpocompress.io import save, tensor_files; from mpocompress import load\n"
            "model = load(sys.argv[1])\n"
            "real = tensor_files._write_data\n"
            "def die(*a):\n"
            "    real(*a); os._exit(9)\n"
            "tensor_files._write_data = die\n"
            f"save(model, sys.argv[2], shard_size={SHARD})\n")  # fmt: skip
    save(converted, tmp_path / "m.safetensors")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.safetensors"), str(out)], capture_output=True, text=True, check=False)
    assert r.returncode == 9, r.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(left) == 1 and not out.exists()
    save(converted, out, shard_size=SHARD)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] and load(out) is not None
    assert os.listdir(out)


def test_finetune_writes_shards_and_reads_them(tmp_path):
    """finetune --shard-size writes what it writes as one file (the same seed: the same weights bit for
    bit) as a folder of shards, and a sharded model is a finetune input like a file."""
    from mpocompress.models import build_model

    torch.manual_seed(0)
    model = build_model("fc2")
    compress_(model, build_config(["4"], [], ["fc1"], [], None, None, "mpo", None, None, False, None, "model"))
    save(model, tmp_path / "small", arch="fc2", shard_size=4_000)
    common = ("--epochs", "1", "--batch-size", "64", "--data", "digits")
    run_json("finetune", tmp_path / "small", *common, "-o", tmp_path / "one.safetensors")
    run_json("finetune", tmp_path / "small", *common, "--shard-size", "4kB", "-o", tmp_path / "healed")
    assert len(list((tmp_path / "healed").glob("model-*.safetensors"))) > 1
    a, b = load(tmp_path / "one.safetensors").state_dict(), load(tmp_path / "healed").state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(tmp_path / "healed") == read_metadata(tmp_path / "one.safetensors")
    assert "already exists" in fails("finetune", tmp_path / "small", *common, "--shard-size", "4kB", "-o", tmp_path / "healed")


def test_a_file_whose_tensors_overlap_or_leave_holes_is_refused(tmp_path):
    """The reader checks a header before reading any tensor: data spans that overlap, or leave a hole,
    name the file as damaged (safetensors' own rule: the buffer is indexed entirely, without holes);
    a well-formed file's tensors come back equal."""
    import struct

    from mpocompress.io.tensor_files import read_safetensors

    def write(path, spans, data=bytes(32)):
        header = {f"t{i}": {"dtype": "F32", "shape": [(b - a) // 4], "data_offsets": [a, b]} for i, (a, b) in enumerate(spans)}
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        return path

    good = read_safetensors(write(tmp_path / "good.safetensors", [(0, 16), (16, 32)], torch.arange(8.0).numpy().tobytes()))
    assert torch.equal(good["t0"], torch.arange(4.0)) and torch.equal(good["t1"], torch.arange(4.0, 8.0))
    for name, spans in (("overlap", [(0, 16), (8, 24)]), ("hole", [(0, 8), (16, 32)]), ("late", [(8, 24)])):
        with pytest.raises(MPOCompressError, match="overlap or leave holes"):
            read_safetensors(write(tmp_path / f"{name}.safetensors", spans))
