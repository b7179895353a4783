"""--try-mpo: each layer made low-rank is offered a 4-core MPO of no more parameters, refined longer,
and takes it only where its error on the calibration inputs is lower."""

from __future__ import annotations

import functools

import torch
from torch import nn

from mpocompress import CompressionConfig, compress_
from mpocompress.compress.calibrate import collect_grams
from mpocompress.compress.structures import TRY_MPO_REFINE, make_factors, try_mpo
from mpocompress.compress.structures import Option as StructOption
from mpocompress.tensors import MPOShape, whitening


def _model(seed: int = 0) -> nn.Sequential:
    """Layer 0: a Kronecker product of four 2 x 2 matrices (full rank 16, an MPO of bond 1); layer 1:
    exactly rank 4. Low-rank at rank 4 cannot hold the first; nothing beats it on the second."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        m[0].weight.copy_(functools.reduce(torch.kron, [torch.randn(2, 2, generator=g) for _ in range(4)]))
        m[1].weight.copy_(torch.randn(16, 4, generator=g) @ torch.randn(4, 16, generator=g))
    return m


def _batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(128, 16, generator=g)} for _ in range(2)]


def test_the_mpo_is_taken_where_it_is_better_and_never_larger():
    config = {"bond_dim": 4, "structure": "lowrank", "layers": ("0", "1")}
    plain, tried = _model(), _model()
    a = compress_(plain, CompressionConfig(**config), calibration=_batches())
    b = compress_(tried, CompressionConfig(**config, try_mpo=True), calibration=_batches())
    assert [lr.structure for lr in a.layers] == ["lowrank", "lowrank"]
    assert [lr.structure for lr in b.layers] == ["mpo", "lowrank"]
    assert b.layers[0].params_mpo <= a.layers[0].params_mpo  # never larger than the low-rank form it replaces
    assert b.layers[0].output_rel_error < 1e-3 < a.layers[0].output_rel_error  # the Kronecker layer is an MPO of bond 1
    x = _batches(seed=7)[0]["x"]  # held-out inputs: the whole model moves less with the MPO
    with torch.no_grad():
        ref = _model()(x)
    with torch.no_grad():
        err = [float((m(x) - ref).norm() / ref.norm()) for m in (plain, tried)]
    assert err[1] < err[0]
    assert any("--try-mpo: 1 of the 2" in n for n in b.notes)


def test_a_layer_without_structure_keeps_low_rank_after_one_short_fit(monkeypatch):
    """Weights of rank 8 plus a little noise (no Kronecker structure): the MPO of the rank-8 form's
    size loses after the usual refinement by more than the screen allows, so the low-rank factors come
    back unchanged and no longer refinement is paid for (one MPO fit, counted)."""
    from mpocompress.compress import structures

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 8) @ torch.randn(8, 64) + 0.01 * torch.randn(48, 64))
    white = whitening(collect_grams(lin, {"l": lin}, [{"x": torch.randn(400, 64)}]).grams["l"])
    w = lin.weight.detach()
    lows = make_factors(w, StructOption("lowrank", 0, 0.0, rank=8), white)
    fits = []
    real = structures.make_factors
    monkeypatch.setattr(structures, "make_factors", lambda *a, **k: fits.append(a[3] if len(a) > 3 else k) or real(*a, **k))
    got = try_mpo(w, lows, white, refine_steps=5)
    assert got is lows
    assert fits == [5]  # the short fit only: the long one (TRY_MPO_REFINE x 5 steps) was screened out
    shape = MPOShape.of_cores(make_factors(w, StructOption("mpo", 0, 0.0, shape=structures.MPOShape.uniform(*structures._best_modes(w, 4)[0], 2)), white, 5).factors)
    assert shape.param_count <= sum(f.numel() for f in lows.factors) and TRY_MPO_REFINE > 1


def test_cli_try_mpo_needs_calibration_and_low_rank_layers(tmp_path):
    from test_cli_train import invoke

    from mpocompress.io import save

    src = tmp_path / "m.safetensors"
    save(_model(), src, arch=None)
    out = tmp_path / "o.safetensors"
    for extra, says in ((["--remove", "0.5"], "needs --calib"), (["--calib", "digits", "--structure", "mpo", "-D", "2"], "--structure mpo makes none")):
        r = invoke("convert", src, "--try-mpo", *extra, "-o", out)
        assert r.exit_code == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_the_library_refuses_try_mpo_with_mpo_only():
    import pytest

    from mpocompress.errors import MPOCompressError

    with pytest.raises(MPOCompressError, match="makes none low-rank"):
        CompressionConfig(structure="mpo", try_mpo=True, bond_dim=4)
