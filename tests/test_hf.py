"""Hugging Face models in and out, on tiny randomly initialised models built from configs (no
download): a 2-layer BERT with a tokenizer, and a 2-layer GPT-2 (whose projections are Conv1D).

Loading a folder, the default selection of a transformer, the Conv1D converter against the dense
layer, save/load without an architecture, the three export formats checked against the model, and
broken folders.
"""

import hashlib
import json
import logging
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
import transformers

import mpocompress
from mpocompress import CompressionConfig, MPOCompressError, MPOLinear, compress_, load, load_model, save
from mpocompress.io.export import export_model
from mpocompress.models.hf import probe_inputs
from test_cli_train import invoke, run_json

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(100)], "the", "a", "model", "is", "."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert_cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(bert_cfg).eval().save_pretrained(d / "bert")
    (d / "bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(d / "bert" / "vocab.txt")).save_pretrained(d / "bert")
    gpt_cfg = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2Model(gpt_cfg).eval().save_pretrained(d / "gpt2")
    return d


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_a_folder_loads_offline_as_the_class_its_config_names(folders):
    loaded = load_model(folders / "bert")
    assert loaded.arch == "hf:BertModel" and loaded.source == "huggingface" and not loaded.model.training
    ref = transformers.BertModel.from_pretrained(folders / "bert", local_files_only=True).eval()
    x = probe_inputs(ref)
    assert torch.equal(_out(loaded.model, x), _out(ref, x))
    assert set(loaded.model.mpocompress_tokenizer) >= {"tokenizer.json", "vocab.txt"}
    # --arch hf:CLASS picks another head on the same weights
    seq = load_model(folders / "bert", arch="hf:AutoModelForSequenceClassification").model
    assert type(seq).__name__ == "BertForSequenceClassification"


def test_default_selection_takes_every_projection_of_the_blocks_alike(folders):
    bert = load(folders / "bert")
    rep = compress_(bert, CompressionConfig(bond_dim=4))
    names = [lr.name for lr in rep.layers]
    assert len(names) == 12 and all(n.startswith("encoder.layer.") for n in names)  # 6 per block, both blocks
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"query", "key", "value", "dense"}
    assert [(s.name, s.reason.split(";")[0]) for s in rep.skipped] == [("pooler.dense", "outside the transformer blocks")]
    gpt = load(folders / "gpt2")
    rep = compress_(gpt, CompressionConfig(bond_dim=4))
    assert sorted(lr.name for lr in rep.layers) == sorted(f"h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(isinstance(gpt.get_submodule(lr.name), MPOLinear) for lr in rep.layers)


def test_conv1d_becomes_an_mpo_of_its_transposed_weight(folders):
    """GPT-2's Conv1D computes x @ weight + bias with weight (N_x, N_y): at full bond the MPO layer
    reproduces it, and the whole model, to float64 rounding."""
    gpt = load(folders / "gpt2").double()
    x = probe_inputs(gpt)
    ref = _out(gpt, x)
    conv = gpt.h[0].mlp.c_fc
    rows = torch.randn(5, conv.weight.shape[0], dtype=torch.float64)
    ref_rows = conv(rows)
    compress_(gpt, CompressionConfig(bond_dim=10_000, layers=("h.*",)))  # every bond at its cap: exact
    torch.testing.assert_close(gpt.h[0].mlp.c_fc(rows), ref_rows, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_out(gpt, x), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_save_needs_no_arch_and_load_rebuilds_bit_identically(folders, tmp_path, name):
    model = load(folders / name)
    compress_(model, CompressionConfig(bond_dim=3, layers=_WITH_EMBEDDING[name]))
    assert type(model.get_input_embeddings()).__name__ == "MPOEmbedding"
    path = save(model, tmp_path / "c.safetensors")  # no arch: inferred, config recorded
    back = load(path)
    assert type(back) is type(model)
    x = probe_inputs(model)
    assert torch.equal(_out(back, x), _out(model, x))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (getattr(back, "mpocompress_tokenizer", None) is not None) == (name == "bert")


def test_save_asks_for_an_arch_only_when_it_cannot_tell(tmp_path):
    with pytest.raises(MPOCompressError, match="pass arch="):
        save(torch.nn.Sequential(torch.nn.Linear(4, 2)), tmp_path / "m.safetensors")
    model = mpocompress.build_model("lenet5(in_channels=3,image_size=32)")
    back = load(save(model, tmp_path / "l.safetensors"))  # built-in: the spec it was built with
    assert back.conv1.in_channels == 3
    assert not (tmp_path / "m.safetensors").exists()


_WITH_EMBEDDING = {"bert": ["encoder.*", "embeddings.word_embeddings"], "gpt2": ["h.*", "wte"]}  # blocks and the word embedding


@pytest.fixture(scope="module")
def compressed(folders, tmp_path_factory):
    """Both models with every block projection and the word embedding (an MPO embedding) at D=4."""
    d = tmp_path_factory.mktemp("compressed")
    out = {}
    for name in ("bert", "gpt2"):
        m = load(folders / name)
        compress_(m, CompressionConfig(bond_dim=4, layers=_WITH_EMBEDDING[name]))
        out[name] = save(m, d / f"{name}.safetensors")
    return out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_export_hf_loads_with_plain_transformers_without_warnings(compressed, tmp_path):
    model = load(compressed["bert"])
    rep = export_model(model, tmp_path / "out", "hf", model.mpocompress_arch)
    assert rep.rel_error <= 1e-4 and rep.params == sum(p.numel() for p in transformers.BertModel(model.config).parameters())
    handler = _Records()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert handler.records == [] and [w for w in caught if "weight" in str(w.message).lower()] == []
    assert type(plain).__name__ == "BertModel" and not any(isinstance(m, MPOLinear) for m in plain.modules())
    x = probe_inputs(model, batch=3, length=11, seed=1)
    assert float((_out(plain, x) - _out(model, x)).abs().max()) <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("the model is")["input_ids"][0] == VOCAB.index("[CLS]")


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_export_onnx_takes_the_tokenizer_inputs_and_runs_in_onnxruntime(compressed, tmp_path, name):
    import onnxruntime as ort

    model = load(compressed[name])
    rep = export_model(model, tmp_path / "m.onnx", "onnx", model.mpocompress_arch)
    assert rep.rel_error <= 1e-4 and rep.dynamic
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if name == "bert" else [])
    assert [i.name for i in session.get_inputs()] == expected
    x = probe_inputs(model, batch=3, length=11, seed=1)  # other batch and sequence sizes than the probe's
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
    assert np.abs(got - _out(model, x).numpy()).max() <= 1e-4  # the first output is the last hidden state


def test_export_pt2_keeps_the_mpo_layers_and_free_batch_and_sequence(compressed, tmp_path):
    model = load(compressed["gpt2"])
    rep = export_model(model, tmp_path / "m.pt2", "pt2", model.mpocompress_arch)
    assert rep.rel_error <= 1e-4 and rep.dynamic
    program = torch.export.load(str(tmp_path / "m.pt2"))
    n_params = sum(v.numel() for v in program.state_dict.values())
    assert n_params == sum(p.numel() for p in model.parameters())  # cores, not dense weights
    x = probe_inputs(model, batch=3, length=11, seed=1)
    with torch.no_grad():
        assert float((program.module()(*x.values()) - _out(model, x)).abs().max()) <= 1e-4


def test_the_papers_networks_export_too(tmp_path):
    model = mpocompress.build_model("lenet5")
    compress_(model, CompressionConfig(bond_dim=4))
    for fmt in ("onnx", "pt2"):
        rep = export_model(model.eval(), tmp_path / f"l.{fmt}", fmt, "lenet5", (1, 28, 28))
        assert rep.rel_error <= 1e-4 and (tmp_path / f"l.{fmt}").is_file()
    with pytest.raises(MPOCompressError, match="--format onnx or pt2"):
        export_model(model, tmp_path / "hfout", "hf", "lenet5", (1, 28, 28))


def test_an_export_that_disagrees_is_refused_and_leaves_nothing(compressed, tmp_path, monkeypatch):
    import mpocompress.io.export as export_mod

    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # nothing can pass
    model = load(compressed["bert"])
    for fmt, out in [("hf", tmp_path / "out"), ("onnx", tmp_path / "m.onnx"), ("pt2", tmp_path / "m.pt2")]:
        with pytest.raises(MPOCompressError, match="does not reproduce the model"):
            export_model(model, out, fmt, model.mpocompress_arch)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary


def test_cli_convert_and_export_a_folder(folders, tmp_path):
    rep = run_json("convert", folders / "bert", "--bond-dim", "4", "-o", tmp_path / "c.safetensors")
    assert rep["arch"] == "hf:BertModel" and len(rep["layers"]) == 12
    assert [s["name"] for s in rep["skipped"]] == ["pooler.dense"]
    rep = run_json("export", tmp_path / "c.safetensors", "--format", "hf", "-o", tmp_path / "dense")
    assert rep["rel_error"] <= 1e-4 and (tmp_path / "dense" / "config.json").is_file()
    r = invoke("export", tmp_path / "c.safetensors", "--format", "hf", "-o", tmp_path / "dense")
    assert r.exit_code == 2 and "already exists" in r.stderr
    rep = run_json("export", tmp_path / "c.safetensors", "--format", "onnx", "-o", tmp_path / "c.onnx")
    assert rep["format"] == "onnx" and rep["probe_shapes"]["input_ids"] == [2, 8]
    rep = run_json("analyze", folders / "gpt2", "--bond-dim", "4")
    assert rep["arch"] == "hf:GPT2Model" and len(rep["layers"]) == 8


def test_cli_export_device(folders, tmp_path):
    """export --device cpu writes what the default does; cuda where there is none is one line, exit 2,
    and nothing written (the CUDA path itself: benchmarks/gpu_check.py)."""
    run_json("convert", folders / "gpt2", "--bond-dim", "4", "-o", tmp_path / "c.safetensors")
    a = run_json("export", tmp_path / "c.safetensors", "--format", "pt2", "-o", tmp_path / "a.pt2")
    b = run_json("export", tmp_path / "c.safetensors", "--format", "pt2", "--device", "cpu", "-o", tmp_path / "b.pt2")
    assert a["rel_error"] == b["rel_error"] <= 1e-4
    x = probe_inputs(load(tmp_path / "c.safetensors"), batch=3, length=11, seed=1)
    with torch.no_grad():
        ya, yb = (torch.export.load(str(tmp_path / f)).module()(*x.values()) for f in ("a.pt2", "b.pt2"))
    assert torch.equal(ya, yb)
    if not torch.cuda.is_available():
        r = invoke("export", tmp_path / "c.safetensors", "--format", "onnx", "--device", "cuda", "-o", tmp_path / "c.onnx")
        assert r.exit_code == 2 and "no CUDA GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "c.onnx").exists()
    r = invoke("export", tmp_path / "c.safetensors", "--format", "onnx", "--device", "tpu", "-o", tmp_path / "c.onnx")
    assert r.exit_code == 2 and "unknown device 'tpu'" in r.stderr


def test_cli_calibrates_a_transformer_on_text_and_exports_its_lowrank_layers(folders, sentences, tmp_path):
    """--calib text:FILE tokenizes with the folder's own tokenizer (padding left out of the Gram
    matrices); GPT-2's Conv1D takes low-rank too; both export to plain models and ONNX."""
    for name in ("bert", "gpt2"):
        calib = ["--calib", f"text:{sentences}"] if name == "bert" else ["--calib", f"text:{sentences}", "--structure", "lowrank"]
        if name == "gpt2":
            (tmp_path / "gpt2").mkdir()
            for f in (folders / "gpt2").iterdir():
                (tmp_path / "gpt2" / f.name).write_bytes(f.read_bytes())
            shutil.copy(folders / "bert" / "tokenizer.json", tmp_path / "gpt2" / "tokenizer.json")
        src = folders / "bert" if name == "bert" else tmp_path / "gpt2"
        out = tmp_path / f"{name}.safetensors"
        rep = run_json("convert", src, "--target-params", "0.85", *calib, "--calib-samples", "64", "--max-length", "16", "-o", out)
        assert rep["params_model_after"] <= 0.85 * rep["params_model_before"]
        assert all(lr["output_rel_error"] is not None for lr in rep["layers"]) and rep["layers"]
        exported = run_json("export", out, "--format", "hf", "-o", tmp_path / f"{name}_dense")
        assert exported["rel_error"] <= 1e-4
        onnx = run_json("export", out, "--format", "onnx", "-o", tmp_path / f"{name}.onnx")
        assert onnx["rel_error"] <= 1e-4


# ----------------------------------------------------------------------------- broken folders


def _broken(folders, tmp_path):
    """Broken copies of the BERT folder, by case."""
    def copy(name):
        shutil.copytree(folders / "bert", tmp_path / name)
        return tmp_path / name

    def edit_config(name, edit):
        d = copy(name)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    (tmp_path / "noconfig").mkdir(parents=True)
    shutil.copy(folders / "bert" / "model.safetensors", tmp_path / "noconfig")
    edit_config("unknown", lambda c: c.update(model_type="no-such-model-type"))
    edit_config("remote", lambda c: c.update(auto_map={"AutoModel": "modeling_evil.EvilModel"}))
    edit_config("noarch", lambda c: c.pop("architectures"))
    d = copy("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    d = copy("noweights")
    (d / "model.safetensors").unlink()
    d = copy("badjson")
    (d / "config.json").write_text("{not json")
    return tmp_path


BROKEN = [
    ("noconfig", [], "folder without config.json"),
    ("unknown", [], "no-such-model-type"),
    ("remote", [], "custom code"),
    ("noarch", [], "names no architecture"),
    ("truncated", [], "truncated or damaged"),
    ("noweights", [], "no weights"),
    ("badjson", [], "not readable JSON"),
    ("bert", ["--arch", "hf:NoSuchModelClass"], "no model class"),
    ("bert", ["--arch", "fc2"], "hf:CLASS"),
]


@pytest.mark.parametrize("case, extra, fragment", BROKEN, ids=[c + (" " + " ".join(e) if e else "") for c, e, _ in BROKEN])
@pytest.mark.parametrize("command", ["analyze", "convert", "export"])
def test_broken_folders_are_one_line_errors(folders, tmp_path, case, extra, fragment, command):
    root = _broken(folders, tmp_path / "in")
    src = root / case if case != "bert" else folders / "bert"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}
    args = {"analyze": [], "convert": ["-D", "4", "-o", tmp_path / "o.safetensors"], "export": ["--format", "pt2", "-o", tmp_path / "o.pt2"]}[command]
    r = invoke(command, src, *extra, *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert r.stdout == "" and not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.pt2").exists()
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_without_transformers_a_folder_names_the_extra(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(MPOCompressError, match=r"pip install -e '\.\[hf\]'"):
        load_model(folders / "bert")


# ----------------------------------------------------------------------------- distillation without labels


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    """400 'sentences' of the tiny vocabulary (the tokenizer knows every word)."""
    g = np.random.default_rng(0)
    words = VOCAB[5:]
    lines = [" ".join(g.choice(words, size=int(g.integers(4, 20)))) for _ in range(400)]
    path = tmp_path_factory.mktemp("text") / "s.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _text_sets(model, path):
    from mpocompress.io.data.unlabelled import load_unlabelled
    from mpocompress.io.hf import decode_tokenizer_files, load_tokenizer

    tok = load_tokenizer(decode_tokenizer_files(model.mpocompress_tokenizer, "m"), "m")
    return [load_unlabelled(f"text:{path}", split, tok, 32) for split in ("train", "test")]


def test_label_free_distillation_reduces_the_output_error(folders, sentences):
    from mpocompress.train.distill import DistillConfig, agreement, distill

    teacher = load(folders / "bert")
    student = load(folders / "bert")
    compress_(student, CompressionConfig(bond_dim=2))
    train, test = _text_sets(teacher, sentences)
    assert (len(train), len(test)) == (320, 80)
    before = agreement(student, teacher, test)
    result = distill(student, train, test, DistillConfig(epochs=3, lr=3e-3, batch_size=16), teacher=teacher)
    after = agreement(student, teacher, test)
    assert after["output_rel_error"] < 0.5 * before["output_rel_error"]
    assert after["agreement_cosine"] >= before["agreement_cosine"] and after["top1_agreement"] is None
    assert result.accuracy == pytest.approx(after["agreement_cosine"]) and result.loss == pytest.approx(after["output_rel_error"])
    same = agreement(teacher, teacher, test)
    assert same["agreement_cosine"] == pytest.approx(1.0, abs=1e-6) and same["output_rel_error"] == 0.0


def test_distillation_resumes_bit_identically_after_a_stop(folders, sentences):
    from mpocompress.errors import Interrupted
    from mpocompress.train.distill import DistillConfig, distill

    teacher = load(folders / "bert")
    config = DistillConfig(epochs=2, lr=3e-3, batch_size=32)

    def student():
        m = load(folders / "bert")
        compress_(m, CompressionConfig(bond_dim=2))
        return m

    train, test = _text_sets(teacher, sentences)
    torch.manual_seed(0)
    full = student()
    distill(full, train, test, config, teacher=teacher)
    torch.manual_seed(0)
    part, states, calls = student(), [], []

    def stop():
        calls.append(1)
        return 15 if len(calls) == 13 else 0  # SIGTERM after step 13 of 20, mid-way through epoch 2

    with pytest.raises(Interrupted):
        distill(part, train, test, config, teacher=teacher, save_state=states.append, should_stop=stop)
    resumed = student()
    distill(resumed, train, test, config, teacher=teacher, resume_state=states[-1])
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_finetune_distils_on_text_and_evaluate_measures_agreement(folders, sentences, tmp_path):
    run_json("convert", folders / "bert", "-D", "2", "-o", tmp_path / "c.safetensors")
    rep = run_json("finetune", tmp_path / "c.safetensors", "--data", f"text:{sentences}", "--distill-from", folders / "bert",
                   "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--eval-every", "10", "-o", tmp_path / "ft.safetensors")
    assert rep["metric"] == "agreement_cosine" and rep["accuracy"] is None and rep["loss_kind"] == "match"
    assert rep["output_rel_error"] < rep["output_rel_error_before"]
    assert [c["step"] for c in rep["runs"][0]["curve"]] == [10, 20, 30, 40]
    assert rep["runs"][0]["curve"][-1]["agreement_cosine"] == pytest.approx(rep["agreement_cosine"])
    seconds = [c["seconds"] for c in rep["runs"][0]["curve"]]  # wall time since the run began, for curves against time
    assert all(0 < a < b for a, b in zip(seconds, seconds[1:]))
    ev = run_json("evaluate", tmp_path / "ft.safetensors", "--data", f"text:{sentences}", "--reference", folders / "bert")
    assert {"agreement_cosine", "agreement_cosine_min", "output_rel_error", "top1_agreement"} <= set(ev)
    assert ev["output_rel_error"] == pytest.approx(rep["output_rel_error"], rel=1e-5) and ev["top1_agreement"] is None
    # text goes 64 sentences a pass by default (1,000 at once held 5 GB for MiniLM): the same figures as one pass of all
    whole = run_json("evaluate", tmp_path / "ft.safetensors", "--data", f"text:{sentences}", "--reference", folders / "bert", "--batch-size", "1000")
    assert ev["examples"] == whole["examples"] > 64
    for key in ("agreement_cosine", "agreement_cosine_min", "output_rel_error"):
        assert ev[key] == pytest.approx(whole[key], rel=1e-6), key


def test_cli_distils_a_classifier_on_inputs_without_labels(tmp_path):
    """FC2 on digits: a tensors file with x only; the metric is top-1 agreement with the teacher."""
    run_json("train", "--arch", "fc2", "--data", "digits", "--epochs", "2", "-o", tmp_path / "fc2.safetensors")
    run_json("convert", tmp_path / "fc2.safetensors", "-D", "2", "--layers", "fc1", "-o", tmp_path / "c.safetensors")
    x = mpocompress.io.data.load_dataset("digits", "train").tensors()[0]
    np.savez(tmp_path / "x.npz", x=x.numpy())
    rep = run_json("finetune", tmp_path / "c.safetensors", "--data", tmp_path / "x.npz", "--distill-from", tmp_path / "fc2.safetensors",
                   "--epochs", "3", "--lr", "1e-2", "-o", tmp_path / "ft.safetensors")
    assert rep["metric"] == "top1_agreement" and rep["top1_agreement"] >= rep["top1_agreement_before"]
    ev = run_json("evaluate", tmp_path / "ft.safetensors", "--data", "digits", "--reference", tmp_path / "fc2.safetensors")
    assert ev["accuracy"] is not None and 0 <= ev["top1_agreement"] <= 1


@pytest.mark.parametrize(
    "make, args, fragment",
    [
        ("gpt2", ["--data", "text:{text}", "--distill-from", "{gpt2}"], "tokenizer"),
        ("bert", ["--data", "text:{empty}", "--distill-from", "{bert}"], "0 non-empty lines"),
        ("bert", ["--data", "text:{text}"], "add --distill-from"),
        ("bert", ["--data", "text:{text}", "--distill-from", "{bert}", "--loss", "ce"], "has no labels"),
        ("bert", ["--data", "text:{text}", "--distill-from", "{bert}", "--loss", "mse"], "unknown --loss"),
        ("bert", ["--data", "text:{text}", "--distill-from", "{bert}", "--max-length", "1"], "--max-length"),
        ("bert", ["--data", "text:{nofile}", "--distill-from", "{bert}"], "not found"),
    ],
)
def test_broken_text_data_is_a_one_line_error(folders, sentences, tmp_path, make, args, fragment):
    (tmp_path / "empty.txt").write_text("\n  \n")
    fill = {"text": sentences, "empty": tmp_path / "empty.txt", "nofile": tmp_path / "none.txt", "bert": folders / "bert", "gpt2": folders / "gpt2"}
    r = invoke("finetune", folders / make, *[a.format(**fill) for a in args], "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert not (tmp_path / "o.safetensors").exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_weights_load_with_weights_only_and_a_pickle_payload_is_refused(folders, tmp_path):
    """pytorch_model.bin loads like model.safetensors; a .bin whose unpickling would create a file is
    refused with one line, and the file is never created."""
    model = transformers.BertModel.from_pretrained(folders / "bert", local_files_only=True)
    (tmp_path / "bin").mkdir()
    shutil.copy(folders / "bert" / "config.json", tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the older format, a zip pickle
    x = probe_inputs(model)
    assert torch.equal(_out(load(tmp_path / "bin"), x), _out(model.eval(), x))
    shutil.copytree(tmp_path / "bin", tmp_path / "evil")
    torch.save({"weight": _Evil(str(tmp_path / "pwned"))}, tmp_path / "evil" / "pytorch_model.bin")
    (tmp_path / "pwned").unlink(missing_ok=True)  # torch.save itself does not run it; make sure
    r = invoke("analyze", tmp_path / "evil")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "pwned").exists()


def _png_folder(folder, n=40, size=28, odd=None):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    x = mpocompress.io.data.load_dataset("digits", "train").x[:n]  # float images in [0, 1], 1x28x28
    for i, img in enumerate(x):
        arr = (img[0].numpy() * 255).clip(0, 255).astype("uint8")
        Image.fromarray(arr, mode="L").resize((size, size)).save(folder / f"{i:03d}.png")
    if odd is not None:
        Image.fromarray(np.zeros((odd, odd), dtype="uint8"), mode="L").save(folder / "odd.png")
    return folder


def test_cli_distils_on_a_folder_of_images(tmp_path):
    run_json("train", "--arch", "fc2", "--data", "digits", "--epochs", "1", "-o", tmp_path / "fc2.safetensors")
    run_json("convert", tmp_path / "fc2.safetensors", "-D", "2", "--layers", "fc1", "-o", tmp_path / "c.safetensors")
    folder = _png_folder(tmp_path / "imgs")
    rep = run_json("finetune", tmp_path / "c.safetensors", "--data", folder, "--distill-from", tmp_path / "fc2.safetensors",
                   "--epochs", "2", "--lr", "1e-2", "--batch-size", "8", "-o", tmp_path / "ft.safetensors")
    assert rep["metric"] == "top1_agreement" and rep["data"] == "imgs" and 0 <= rep["top1_agreement"] <= 1
    from mpocompress.io.data.unlabelled import load_unlabelled

    train, test = (load_unlabelled(str(folder), s) for s in ("train", "test"))
    assert (len(train), len(test)) == (32, 8) and tuple(train.x.shape[1:]) == (1, 28, 28) and train.x.dtype == torch.uint8


@pytest.mark.parametrize("case, fragment", [("sizes", "differ in size"), ("corrupt", "cannot read image"), ("empty", "holds 0 images")])
def test_broken_image_folders_are_one_line_errors(tmp_path, case, fragment):
    run_json("train", "--arch", "fc2", "--data", "digits", "--epochs", "1", "-o", tmp_path / "fc2.safetensors")
    folder = tmp_path / "imgs"
    if case == "sizes":
        _png_folder(folder, n=3, odd=32)
    elif case == "corrupt":
        _png_folder(folder, n=3)
        (folder / "001.png").write_bytes((folder / "001.png").read_bytes()[:40])
    else:
        folder.mkdir()
    r = invoke("finetune", tmp_path / "fc2.safetensors", "--data", folder, "--distill-from", tmp_path / "fc2.safetensors",
               "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.output
    assert not (tmp_path / "o.safetensors").exists()


def test_torchrun_distils_like_one_process(folders, sentences, tmp_path):
    """Two gloo processes with batch 16 each distil like one with batch 32 (the same global batches,
    gradients averaged; the pooler, whose output is not matched, gets no gradient and DDP is told)."""
    import json as _json
    import os
    import subprocess

    run_json("convert", folders / "bert", "-D", "2", "-o", tmp_path / "c.safetensors")
    common = ["finetune", str(tmp_path / "c.safetensors"), "--data", f"text:{sentences}", "--distill-from", str(folders / "bert"),
              "--epochs", "2", "--batch-size", "32", "--lr", "3e-3", "--device", "cpu", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mpocompress", *common, "-o", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mpocompress",
                          *common, "-o", str(tmp_path / "two.safetensors")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    rep_one, rep_two = _json.loads(one.stdout), _json.loads(two.stdout)
    assert rep_two["world_size"] == 2 and rep_one["world_size"] == 1
    assert rep_two["output_rel_error"] == pytest.approx(rep_one["output_rel_error"], rel=1e-2)
    # the two students compute the same function (parameters whose gradient is nothing but rounding
    # noise, such as the key biases, which softmax ignores, may differ; AdamW amplifies such noise)
    from mpocompress.train.distill import agreement

    one_model, two_model = load(tmp_path / "one.safetensors"), load(tmp_path / "two.safetensors")
    _, test = _text_sets(one_model, sentences)
    assert agreement(two_model, one_model, test)["output_rel_error"] < 1e-3


def test_cli_converts_a_named_embedding_and_refuses_it_as_lowrank(folders, tmp_path):
    rep = run_json("convert", folders / "bert", "-D", "4", "--layers", "embeddings.word_embeddings", "-o", tmp_path / "e.safetensors")
    (layer,) = rep["layers"]
    assert layer["structure"] == "mpo_embedding" and layer["kind"] == "embedding"
    assert layer["params_original"] == len(VOCAB) * 32 and layer["params_mpo"] < layer["params_original"]
    model = load(tmp_path / "e.safetensors")
    assert type(model.embeddings.word_embeddings).__name__ == "MPOEmbedding"
    r = invoke("convert", folders / "bert", "-D", "4", "--structure", "lowrank", "--layers", "embeddings.word_embeddings",
               "-o", tmp_path / "l.safetensors")  # fmt: skip
    assert r.exit_code == 2 and "cannot become lowrank" in r.stderr and not (tmp_path / "l.safetensors").exists()
