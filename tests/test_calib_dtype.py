"""Calibration passes in bfloat16 (`--calib-dtype`, `pass_precision`): autocast covers the model's
own call only, so the statistics the hooks gather and every product of ours stay float32/float64.
Checked against the float32 pass on the tiny tied Llama of tests/lm_models.py (seeded): a layer
whose input no bfloat16 product touched gets the float32 pass's Gram bit for bit; the others are
near it; the tied table's split measure still holds; in memory and streamed, the model is as near
the original as float32 passes make it; the CLI's choices, its refusal and its note."""

from pathlib import Path

import pytest
import torch
from lm_models import make_lm, write_folder
from test_cli_train import fails, run_json

from mpocompress import CompressionConfig, compress_, load
from mpocompress.compress.calibrate import SwapKL, collect_grams, native_bf16, pass_precision, resolve_pass_dtype
from mpocompress.errors import MPOCompressError

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"


def _batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (2 * n, 24), generator=g)
    return [{"input_ids": ids[2 * k : 2 * k + 2], "attention_mask": torch.ones(2, 24, dtype=torch.long)} for k in range(n)]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_the_pass_dtype_follows_the_choice_the_model_and_the_device():
    model = make_lm("llama")
    assert resolve_pass_dtype("float32", model) is None
    assert resolve_pass_dtype("bfloat16", model) is torch.bfloat16
    assert resolve_pass_dtype("auto", model) is (torch.bfloat16 if native_bf16(torch.device("cpu")) else None)
    half = make_lm("llama").to(torch.bfloat16)  # a model in another dtype runs in its own, whatever is asked
    assert all(resolve_pass_dtype(c, half) is None for c in ("auto", "float32", "bfloat16"))
    with pytest.raises(MPOCompressError, match="auto, float32, bfloat16"):
        resolve_pass_dtype("half", model)
    with pytest.raises(MPOCompressError, match="--calib-dtype"):
        CompressionConfig(target_params=0.5, calib_dtype="fp8")
    assert CompressionConfig.from_dict(CompressionConfig(calib_dtype="float32").to_dict()).calib_dtype == "float32"


def test_a_gpu_that_only_emulates_bfloat16_keeps_float32_passes(monkeypatch):
    """auto takes bfloat16 on a CUDA GPU that multiplies it natively, not on one (a T4) where torch
    only emulates it, which would be slower than float32 (no GPU needed: torch's answer is faked)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # emulated only
    assert not native_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, an H100
    assert native_bf16(torch.device("cuda"))
    assert not native_bf16(torch.device("meta"))


def test_bfloat16_passes_leave_the_statistics_float64_and_near_the_float32_ones():
    """Block 0's q/k/v read the normed embeddings, which no bfloat16 product made: their Gram must be
    the float32 pass's bit for bit (the hooks' own products are not autocast). Every later input
    went through bfloat16 products: its Gram differs, within 3e-2 relative (Frobenius), and is float64.
    """
    model = make_lm("llama").eval()
    mods, batches = _linears(model), _batches()
    full = collect_grams(model, mods, batches)
    with pass_precision(torch.bfloat16):
        narrow = collect_grams(model, mods, batches)
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(narrow.grams[first], full.grams[first])
    moved = 0
    for name in mods:
        a, b = narrow.grams[name], full.grams[name]
        assert a.dtype == torch.float64 and torch.isfinite(a).all()
        assert float((a - b).norm() / b.norm()) < 3e-2, name
        moved += not torch.equal(a, b)
    assert moved >= len(mods) - 3  # all but block 0's q/k/v (one input) passed through bfloat16 products
    assert narrow.rows == full.rows and narrow.groups == full.groups  # q/k/v and gate/up still share one input


def test_the_tied_tables_split_measure_holds_under_bfloat16_passes():
    """SwapKL reads the head on the base's kept final states when the logits are the head applied to
    them; under a bfloat16 pass the full pass's head runs in bfloat16, and the check compares like with
    like (else every swap fell back to full passes)."""
    model = make_lm("llama").eval()
    with pass_precision(torch.bfloat16):
        assert SwapKL(model, _batches(n=1)).split


def test_a_bfloat16_calibrated_conversion_matches_the_float32_one(tmp_path):
    """The same budget, allocated and factorized from bfloat16 passes and from float32 passes: the
    same size, and outputs on held-out windows as near the original's (relative error within 0.02
    of the float32 conversion's); --sequential too (its block-by-block refits stay float32)."""
    held = _batches(seed=7, n=2)
    reference = make_lm("llama").eval()
    with torch.no_grad():
        want = torch.cat([reference(**b).logits for b in held])
    errors = {}
    for dtype in ("float32", "bfloat16"):
        for sequential in (False, True):
            model = make_lm("llama").eval()
            config = CompressionConfig(remove=0.3, structure="lowrank", sequential=sequential, calib_dtype=dtype)
            report = compress_(model, config, calibration=_batches(n=4))
            assert any("multiplied in bfloat16" in n for n in report.notes) == (dtype == "bfloat16")
            with torch.no_grad():
                got = torch.cat([model(**b).logits for b in held])
            errors[dtype, sequential] = (float((got - want).norm() / want.norm()), sum(p.numel() for p in model.parameters()))
    for sequential in (False, True):
        (e32, n32), (e16, n16) = errors["float32", sequential], errors["bfloat16", sequential]
        assert abs(n16 - n32) <= 0.01 * n32
        assert 0 < e16 < e32 + 0.02, errors


def test_a_streamed_conversion_runs_its_block_passes_in_bfloat16_as_asked(tmp_path):
    """convert --stream --calib-dtype bfloat16 (every block pass under autocast, the kept hidden
    states float32): the report says so, and on held-out windows the model is as near the original as
    the streamed float32 conversion of the same budget (relative error within 0.02), with the same size
    within 1 %."""
    folder = write_folder("llama", tmp_path / "llama")
    reference = make_lm("llama").eval()
    held = _batches(seed=7, n=2)
    with torch.no_grad():
        want = torch.cat([reference(**b).logits for b in held])
    common = ["--calib", f"text:{TEXT}", "--calib-samples", "16", "--max-length", "32", "--remove", "0.3", "--structure", "lowrank", "--stream"]
    errors = {}
    for dtype in ("float32", "bfloat16"):
        rep = run_json("convert", folder, *common, "--calib-dtype", dtype, "-o", tmp_path / f"{dtype}.safetensors")
        assert any("multiplied in bfloat16" in n for n in rep["notes"]) == (dtype == "bfloat16")
        model = load(tmp_path / f"{dtype}.safetensors").eval()
        with torch.no_grad():
            got = torch.cat([model(**b).logits for b in held])
        errors[dtype] = (float((got - want).norm() / want.norm()), rep["params_model_after"])
    (e32, n32), (e16, n16) = errors["float32"], errors["bfloat16"]
    assert abs(n16 - n32) <= 0.01 * n32 and 0 < e16 < e32 + 0.02, errors


def test_the_cli_takes_the_choice_names_it_and_refuses_what_it_cannot_do(tmp_path):
    folder = write_folder("llama", tmp_path / "llama")
    common = ["--calib", f"text:{TEXT}", "--calib-samples", "8", "--max-length", "32", "--remove", "0.3", "--structure", "lowrank"]
    rep = run_json("convert", folder, *common, "--calib-dtype", "bfloat16", "-o", tmp_path / "b.safetensors")
    assert any("multiplied in bfloat16 (--calib-dtype)" in n for n in rep["notes"])
    rep = run_json("convert", folder, *common, "--calib-dtype", "float32", "-o", tmp_path / "f.safetensors")
    assert not any("multiplied in" in n for n in rep["notes"])
    rep = run_json("analyze", folder, *common)  # the default: auto
    assert any("natively" in n for n in rep["notes"]) == native_bf16(torch.device("cpu"))
    assert "auto, float32 or bfloat16" in fails("convert", folder, *common, "--calib-dtype", "half", "-o", tmp_path / "h.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "f.safetensors", "llama"]

