"""Reliability, third round (issue 28), the classes fixed so far: a Hugging Face folder whose weights
do not make its model is refused (class 1), nothing outside a model folder is read (class 2), a
config asking for far more than its weights is refused before anything is allocated (class 3), text
data is bounded before the tokenizer (class 4), data of the wrong modality and token ids beyond the
model's vocabulary are named (class 5), an export never deletes what is no part of a model and names
a probe the model cannot take, one too large to run, and a runtime that cannot check it (class 6),
and leaves no staging folder behind for good (class 8). Graph capture at real sizes (class 9) is in
tests/test_graphs.py. The sweep's cases (classes 7 and 8) are in tests/test_sweep.py."""

import os

import pytest
import torch
from test_cli_train import invoke, run_json
from test_hf import folders  # noqa: F401 - the tiny BERT folder


@pytest.fixture(scope="module")
def converted(folders, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("conv") / "c.safetensors"
    run_json("convert", folders / "bert", "-D", "2", "-o", out)
    return out


def _one_line(r, fragment):
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.output


@pytest.mark.parametrize("foreign", ["notes.txt", "data/train.csv", "1_Pooling/weights.bin", "README.md"])
def test_export_force_never_deletes_a_folder_that_holds_more_than_a_model(converted, tmp_path, foreign):
    out = tmp_path / "out"
    run_json("export", converted, "--format", "hf", "-o", out)
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("mine")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    _one_line(invoke("export", converted, "--format", "hf", "-o", out, "--force"), "no part of a model")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before and (out / foreign).read_text() == "mine"


def test_export_force_replaces_an_earlier_export_and_refuses_the_current_folder(converted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_json("export", converted, "--format", "hf", "-o", out)
    (out / "model.safetensors").write_bytes(b"stale")  # what a replace must overwrite
    run_json("export", converted, "--format", "hf", "-o", out, "--force")
    assert (out / "model.safetensors").stat().st_size > 100
    monkeypatch.chdir(out)
    _one_line(invoke("export", converted, "--format", "hf", "-o", ".", "--force"), "current folder")
    _one_line(invoke("export", converted, "--format", "hf", "-o", "..", "--force"), "current folder")
    assert (out / "config.json").is_file()


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    from mpocompress import build_model, compress_, save
    from mpocompress.compress import CompressionConfig

    torch.manual_seed(0)
    model = build_model("vgg16")
    compress_(model, CompressionConfig(bond_dim=4))
    path = tmp_path_factory.mktemp("cnn") / "vgg.safetensors"
    save(model, path, arch="vgg16")
    return path


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("shape", ["1,32,32", "3,32", "5"])
def test_a_probe_the_model_does_not_take_is_named(small_cnn, tmp_path, fmt, shape):
    out = tmp_path / f"m.{fmt}"
    _one_line(invoke("export", small_cnn, "--format", fmt, "--input-shape", shape, "-o", out), "does not run on the probe batch")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_probe_too_large_to_run_is_refused_before_it_runs(small_cnn, tmp_path):
    """3 x 4096 x 4096 passes the cap on one sample (2^26 numbers) but its activations through VGG-16
    are about 100 GiB: refused from a meta-device run, with the process's peak memory barely moved."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _one_line(invoke("export", small_cnn, "--format", "onnx", "--input-shape", "3,4096,4096", "-o", tmp_path / "m.onnx"),
              "GiB of activations")  # fmt: skip
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 1 << 20  # under 1 GB more at peak
    assert not (tmp_path / "m.onnx").exists()


def test_a_half_precision_model_onnxruntime_cannot_run_is_named_and_dtype_float32_exports_it(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16).eval().save_pretrained(tmp_path / "bf16")
    _one_line(invoke("export", tmp_path / "bf16", "--format", "onnx", "-o", tmp_path / "m.onnx"), "--dtype float32")
    assert not (tmp_path / "m.onnx").exists()
    _one_line(invoke("export", tmp_path / "bf16", "--format", "onnx", "--dtype", "int8", "-o", tmp_path / "m.onnx"), "unknown --dtype")
    rep = run_json("export", tmp_path / "bf16", "--format", "onnx", "--dtype", "float32", "-o", tmp_path / "m.onnx")
    assert rep["rel_error"] <= 1e-4 and (tmp_path / "m.onnx").is_file()
    assert transformers.AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16  # the input is unchanged


def test_a_staging_folder_left_by_a_killed_export_is_removed_by_the_next(converted, tmp_path):
    out = tmp_path / "m.pt2"
    pid = 2**22 + 12345  # above any pid this machine hands out: a process that is gone
    while True:
        try:
            os.kill(pid, 0)
            pid += 1
        except ProcessLookupError:
            break
    stale = tmp_path / f".m.pt2.{pid}.abcd1234.tmp"
    (stale / "m.pt2").mkdir(parents=True)
    (stale / "m.pt2" / "part").write_bytes(b"x" * 10)
    run_json("export", converted, "--format", "pt2", "-o", out)
    assert out.is_file() and not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


# ----------------------------------------------------------------------------- class 1: silent wrong models


def _bert_copy(folders, tmp_path, edit_weights=None, edit_config=None):  # noqa: F811
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "bert"
    shutil.copytree(folders / "bert", d)
    if edit_weights is not None:
        save_file(edit_weights(load_file(d / "model.safetensors")), d / "model.safetensors")
    if edit_config is not None:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case, fragment", [
    ("one layer missing", "lack"),
    ("every weight missing", "lack"),
    ("layer count 0", "no place for"),
    ("layer count 1 of 2", "no place for"),
    ("another class", "lack"),
])  # fmt: skip
def test_a_folder_whose_weights_do_not_make_the_model_is_refused(folders, tmp_path, case, fragment):  # noqa: F811
    edits = {
        "one layer missing": dict(edit_weights=lambda t: {k: v for k, v in t.items() if not k.startswith("encoder.layer.1.")}),
        "every weight missing": dict(edit_weights=lambda t: {"unrelated": torch.zeros(1)}),
        "layer count 0": dict(edit_config=lambda c: c.update(num_hidden_layers=0)),
        "layer count 1 of 2": dict(edit_config=lambda c: c.update(num_hidden_layers=1)),
        "another class": {},
    }
    src = _bert_copy(folders, tmp_path, **edits[case])
    arch = ["--arch", "hf:GPT2Model"] if case == "another class" else []
    for cmd in (["analyze"], ["convert", "-D", "2", "-o", tmp_path / "o.safetensors"]):
        _one_line(invoke(cmd[0], src, *arch, *cmd[1:]), fragment)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_new_head_on_an_encoders_weights_still_loads(folders):  # noqa: F811
    from mpocompress import load_model

    model = load_model(folders / "bert", arch="hf:AutoModelForSequenceClassification").model
    assert type(model).__name__ == "BertForSequenceClassification"  # its classifier is new: the file never had one


# ----------------------------------------------------------------------------- class 4: text data


def test_a_huge_line_is_cut_before_the_tokenizer_and_an_absurd_max_length_is_named(folders, tmp_path, monkeypatch):  # noqa: F811
    import mpocompress.io.data.unlabelled as unlabelled

    text = tmp_path / "t.txt"
    text.write_text("the model is a model .\n" * 20 + "the " * 2_000_000 + "\n" + "a model .\n" * 20)  # an 8 MB line
    seen = []
    real = unlabelled.load_unlabelled

    def spy(*a, **k):
        ds = real(*a, **k)
        seen.append(ds)
        return ds

    monkeypatch.setattr("mpocompress.io.data.calibration.load_unlabelled", spy)
    rep = run_json("convert", folders / "bert", "--calib", f"text:{text}", "--target-params", "0.9", "-o", tmp_path / "c.safetensors")
    assert rep["params_model_after"] < rep["params_model_before"] and seen[0].inputs["input_ids"].shape[1] <= 64
    for args in (["--max-length", "1000000000"], ["--max-length", "65"]):
        _one_line(invoke("evaluate", tmp_path / "c.safetensors", "--data", f"text:{text}", "--reference", folders / "bert", *args),
                  "positions the model takes")  # fmt: skip


def test_a_packed_stream_is_tokenized_in_pieces_that_give_the_same_tokens(monkeypatch):
    from lm_models import byte_tokenizer

    from mpocompress.io.data import unlabelled
    from mpocompress.io.data.unlabelled import pack_windows

    monkeypatch.setattr(unlabelled, "PACK_CHARS", 1 << 12)  # pieces of 4 kB: the same cuts as of 1 MB, in a fraction of the time
    tok = byte_tokenizer()
    lines = ["short line"] * 700 + ["x y " * (unlabelled.PACK_CHARS // 2)] + ["after"] * 3  # a line twice PACK_CHARS long
    ids = pack_windows(lines, tok, 64)
    whole = tok("\n".join(lines) + "\n", add_special_tokens=False)["input_ids"]  # bytes: pieces cut nothing
    n = len(whole) // 64
    assert ids.shape == (n, 64) and ids.reshape(-1).tolist() == whole[: n * 64]


# ----------------------------------------------------------------------------- class 5: model and data that do not fit


def test_data_of_the_wrong_modality_is_named_not_an_internal_error(folders, tmp_path):  # noqa: F811
    (tmp_path / "s.txt").write_text("the model is a model .\n" * 10)
    assert invoke("train", "--arch", "fc2", "--epochs", "1", "-o", tmp_path / "fc2.safetensors").exit_code == 0
    for cmd in (["evaluate", folders / "bert", "--data", "digits"],
                ["finetune", folders / "bert", "--data", "mnist", "-o", tmp_path / "o.safetensors"]):  # fmt: skip
        _one_line(invoke(*cmd), "reads text")
    for cmd in (["evaluate", tmp_path / "fc2.safetensors", "--data", f"text:{tmp_path / 's.txt'}"],
                ["sweep", tmp_path / "fc2.safetensors", "--data", f"text:{tmp_path / 's.txt'}", "-o", tmp_path / "sw"]):  # fmt: skip
        _one_line(invoke(*cmd), "does not read text")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "sw").exists()


def _bert_with_tokenizer(path, vocab_size, words):
    """A tiny BERT folder of `vocab_size` embeddings whose tokenizer maps `words` to ids 0.. in order."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(cfg).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_token_ids_beyond_the_models_vocabulary_are_named_for_every_command(tmp_path):
    words = ["[PAD]", "[UNK]", *[f"w{i}" for i in range(98)], "the", "model", "is", "a", "."]  # ids 100-104 past 100
    small = _bert_with_tokenizer(tmp_path / "small", 100, words)
    fits = _bert_with_tokenizer(tmp_path / "fits", len(words), words)
    (tmp_path / "s.txt").write_text("w1 w2 the model is a w3 .\n" * 40)
    data = f"text:{tmp_path / 's.txt'}"
    out = tmp_path / "o.safetensors"
    for cmd in (["analyze", small, "--calib", data],
                ["convert", small, "--calib", data, "-D", "2", "-o", out],
                ["evaluate", small, "--data", data, "--reference", fits],
                ["evaluate", fits, "--data", data, "--reference", small],  # the reference's embedding is the short one
                ["finetune", small, "--distill-from", fits, "--data", data, "--epochs", "1", "-o", out]):  # fmt: skip
        _one_line(invoke(*cmd), "gives token ids up to 104, beyond the 100 tokens")
    assert not out.exists()
    assert invoke("evaluate", fits, "--data", data, "--reference", fits).exit_code == 0  # the check lets what fits through


# ----------------------------------------------------------------------------- class 3: bombs in a config


@pytest.mark.parametrize("edit, fragment", [
    (dict(vocab_size=10**9), "describes a model of"),  # 32e9 embedding weights: refused on the meta device
    (dict(intermediate_size=10**8), "describes a model of"),
    (dict(num_hidden_layers=100_000), "100,000 layers"),
])  # fmt: skip
def test_a_config_that_asks_for_far_more_than_its_weights_is_refused_before_allocating(folders, tmp_path, edit, fragment):  # noqa: F811
    import resource

    src = _bert_copy(folders, tmp_path, edit_config=lambda c: c.update(edit))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for cmd in (["analyze"], ["convert", "-D", "2", "-o", tmp_path / "o.safetensors"], ["export", "--format", "hf", "-o", tmp_path / "o"]):
        _one_line(invoke(cmd[0], src, *cmd[1:]), fragment)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 2 << 20  # the peak grew by under 2 GB: nothing of the config's size was allocated
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- class 2: reading outside the folder


def test_nothing_outside_the_folder_is_read_and_no_pipe_is_opened_as_weights(folders, tmp_path):  # noqa: F811
    import json
    import shutil

    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    cases = {}
    d = _bert_copy(folders, tmp_path / "index")  # a sharded index that points outside
    (d / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embeddings.word_embeddings.weight": "../../outside.safetensors"}}))
    cases["index"] = (d, "outside the model folder")
    d = _bert_copy(folders, tmp_path / "link")  # weights through a link that leaves the folder
    shutil.move(d / "model.safetensors", tmp_path / "real.safetensors")
    (d / "model.safetensors").symlink_to(tmp_path / "real.safetensors")
    cases["link"] = (d, "outside the model folder")
    d = _bert_copy(folders, tmp_path / "fifo")  # a pipe named as the weights: never opened (it would hang)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    cases["fifo"] = (d, "no weights")
    d = _bert_copy(folders, tmp_path / "shard")  # a pipe as the shard an index lists
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"pooler.dense.weight": "model-00001-of-00001.safetensors"}}))
    os.mkfifo(d / "model-00001-of-00001.safetensors")
    cases["shard"] = (d, "not a regular file")
    for name, (src, fragment) in cases.items():
        _one_line(invoke("analyze", src), fragment)
    d = _bert_copy(folders, tmp_path / "tok")  # a tokenizer file linked to a private file: not carried
    (d / "vocab.txt").unlink()
    (d / "special_tokens_map.json").symlink_to(secret)
    run_json("convert", d, "-D", "2", "-o", tmp_path / "c.safetensors")
    assert b"private" not in (tmp_path / "c.safetensors").read_bytes() and "cHJpdmF0ZQ" not in (tmp_path / "c.safetensors").read_text(errors="ignore")
