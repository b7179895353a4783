import copy

import pytest
import torch
from torch import nn

from mpocompress import CompressionConfig, MPOConv2d, MPOLinear, analyze, build_model, compress_
from mpocompress.errors import MPOCompressError
from mpocompress.tensors import entanglement_entropy, unfolding_spectra

FC2_PAPER = dict(
    shapes={"fc1": ((4, 7, 7, 4), (4, 4, 4, 4)), "fc2": ((4, 4, 4, 4), (1, 1, 10, 1))},
    bond_dims={"fc2": 4},
)
LENET_PAPER = dict(
    shapes={"conv3": ((2, 10, 10, 2), (2, 5, 6, 2)), "fc1": ((2, 5, 6, 2), (2, 3, 7, 2)), "fc2": ((2, 3, 7, 2), (1, 5, 2, 1))},
    bond_dims={"conv3": 4, "fc1": 4, "fc2": 2},
)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_default_selection_is_heaviest_until_90_percent():
    fc2 = build_model("fc2")
    r = compress_(fc2, CompressionConfig(bond_dim=4))
    assert [lr.name for lr in r.layers] == ["fc1"] and isinstance(fc2.fc1, MPOLinear) and isinstance(fc2.fc2, nn.Linear)
    lenet = build_model("lenet5")
    r = compress_(lenet, CompressionConfig(bond_dim=4))
    assert [lr.name for lr in r.layers] == ["conv3", "fc1"]
    assert isinstance(lenet.conv3, MPOConv2d) and isinstance(lenet.fc1, MPOLinear)
    assert {s.name for s in r.skipped} == {"conv1", "conv2", "fc2"}


@pytest.mark.parametrize("d, expected", [(2, 1024), (16, 15584)])
def test_paper_fc2_counts_through_surgery(d, expected):
    model = build_model("fc2")
    r = compress_(model, CompressionConfig(bond_dims={**FC2_PAPER["bond_dims"], "fc1": d}, shapes=FC2_PAPER["shapes"]))
    assert r.params_mpo == expected
    assert r.params_original == 784 * 256 + 256 * 10
    if d == 16:
        assert r.rho < 0.08
    assert r.params_model_after == _params(model)
    assert r.params_model_before - r.params_model_after == r.params_original - r.params_mpo


def test_paper_lenet5_rho():
    model = build_model("lenet5")
    r = compress_(model, CompressionConfig(**LENET_PAPER))
    assert r.params_mpo == 2860 and r.rho == pytest.approx(2860 / 58920)
    assert 0.045 < r.rho < 0.055
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_compressed_model_computes_its_reconstruction():
    model = build_model("lenet5")
    compress_(model, CompressionConfig(bond_dim=3))
    dense = copy.deepcopy(model)
    dense.conv3 = model.conv3.to_dense()
    dense.fc1 = model.fc1.to_dense()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)


def test_full_bond_conversion_keeps_the_function():
    model = build_model("lenet5")
    ref = copy.deepcopy(model)
    r = compress_(model, CompressionConfig(bond_dim=100_000, layers=("conv3", "fc1", "fc2")))
    assert max(lr.rel_error for lr in r.layers) < 1e-6
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_layer_patterns_exclusion_and_overrides():
    model = build_model("lenet5")
    r = compress_(model, CompressionConfig(bond_dim=2, layers=("re:fc\\d",)))
    assert [lr.name for lr in r.layers] == ["fc1", "fc2"]
    model = build_model("lenet5")
    r = compress_(model, CompressionConfig(bond_dim=2, layers=("conv*",), exclude=("conv1",)))
    assert sorted(lr.name for lr in r.layers) == ["conv2", "conv3"]
    model = build_model("lenet5")
    r = compress_(model, CompressionConfig(bond_dim=2, exclude=("conv3",), bond_dims={"fc2": 3}))
    names = {lr.name: lr for lr in r.layers}
    assert "conv3" not in names and max(names["fc2"].bond_dims) == 3 and max(names["fc1"].bond_dims) == 2


@pytest.mark.parametrize(
    "config, message",
    [
        (CompressionConfig(bond_dim=2, layers=("nothing*",)), "matches no layer"),
        (CompressionConfig(bond_dim=2, layers=("pool",)), "MaxPool2d"),
        (CompressionConfig(bond_dim=2, exclude=("nope",)), "matches no layer"),
        (CompressionConfig(bond_dims={"fc9": 2}), "matches no layer"),
        (CompressionConfig(bond_dim=2, shapes={"fc1": ((2, 5, 6, 3), (2, 3, 7, 2))}), "multiply to 180, not 120"),
        (CompressionConfig(layers=("fc1",)), "no bond dimension"),
    ],
)
def test_bad_selections_are_clear_errors(config, message):
    with pytest.raises(MPOCompressError, match=message):
        compress_(build_model("lenet5"), config)


@pytest.mark.parametrize(
    "kwargs", [dict(bond_dim=0), dict(bond_dim=-3), dict(eps=0.0), dict(eps=1.0), dict(n_cores=0), dict(layers=("re:(",))]
)
def test_config_validation(kwargs):
    with pytest.raises(MPOCompressError):
        CompressionConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = CompressionConfig(bond_dim=4, eps=0.1, layers=("fc*",), **FC2_PAPER)
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg


def test_layers_whose_mpo_would_not_be_smaller_are_skipped():
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(MPOCompressError, match="would not be smaller"):
        compress_(model, CompressionConfig(bond_dim=16, n_cores=2))
    big = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(16, 16))  # 16x16 at D=8: 288 > 256
    r = analyze(big, CompressionConfig(bond_dim=8, coverage=1.0))
    assert [lr.name for lr in r.layers] == ["0"]
    assert any(s.name == "2" and "not be smaller" in s.reason for s in r.skipped)


def test_grouped_conv_and_attention_are_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(64, 64, 3, groups=64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.head = nn.Linear(64, 10)

    model = Net()
    r = analyze(model, CompressionConfig(bond_dim=2, coverage=1.0))
    reasons = {s.name: s.reason for s in r.skipped}
    assert "groups=64" in reasons["dw"] and "MultiheadAttention" in reasons["attn.out_proj"]
    with pytest.raises(MPOCompressError, match="groups"):
        compress_(model, CompressionConfig(bond_dim=2, layers=("dw",)))


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(256, 256)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    compress_(model, CompressionConfig(bond_dim=4))
    assert isinstance(model[0], MPOLinear) and model[0] is model[2]


def test_analyze_does_not_touch_the_model():
    model = build_model("lenet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = analyze(model, CompressionConfig(bond_dim=4))
    assert not r.applied and isinstance(model.conv3, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    applied = compress_(copy.deepcopy(model), CompressionConfig(bond_dim=4))
    assert [lr.params_mpo for lr in r.layers] == [lr.params_mpo for lr in applied.layers]
    assert [lr.rel_error for lr in r.layers] == pytest.approx([lr.rel_error for lr in applied.layers])
    assert r.params_model_after == applied.params_model_after


def test_analyze_without_bond_dim_gives_exact_mpo_and_sweep():
    model = build_model("fc2")
    r = analyze(model, CompressionConfig())
    (layer,) = r.layers
    assert layer.rel_error == 0 and layer.bond_dims == [16, 448, 16]
    spectra = unfolding_spectra(model.fc1.weight, (4, 7, 7, 4), (4, 4, 4, 4))
    assert layer.entropy == pytest.approx([entanglement_entropy(s) for s in spectra], rel=1e-6)
    assert [s.bond_dim for s in r.sweep] == [2, 4, 8, 16, 32]
    errors = [s.layers[0].rel_error for s in r.sweep]
    assert errors == sorted(errors, reverse=True)  # more bond, less error
    assert [s.params_mpo for s in r.sweep] == sorted(s.params_mpo for s in r.sweep)


def test_eps_truncation_meets_the_target():
    model = build_model("fc2")
    r = compress_(model, CompressionConfig(eps=0.5))
    assert r.layers[0].rel_error <= 0.5


def test_recompressing_an_mpo_model_rounds_its_bonds():
    model = build_model("fc2")
    compress_(model, CompressionConfig(bond_dim=16))
    w16 = model.fc1.weight_matrix().detach()
    r = compress_(model, CompressionConfig(bond_dim=4))
    assert model.fc1.bond_dims == [4, 4, 4] and r.layers[0].params_original == 784 * 256
    rebuilt = model.fc1.weight_matrix().detach()
    rel = float((rebuilt - w16).norm() / w16.norm())
    assert rel == pytest.approx(r.layers[0].rel_error, rel=1e-4)


def test_filter_fn_restricts_candidates():
    model = build_model("lenet5")
    r = compress_(model, CompressionConfig(bond_dim=2), filter_fn=lambda m, name: isinstance(m, nn.Linear))
    assert {lr.name for lr in r.layers} <= {"fc1", "fc2"} and isinstance(model.conv3, nn.Conv2d)


def test_training_mode_and_dtype_are_preserved():
    model = build_model("fc2").double().eval()
    compress_(model, CompressionConfig(bond_dim=4))
    assert not model.fc1.training and model.fc1.cores[0].dtype == torch.float64


def test_analyze_of_an_mpo_model_reports_its_own_bonds():
    model = build_model("fc2")
    compress_(model, CompressionConfig(bond_dim=4))
    r = analyze(model, CompressionConfig())
    fc1 = next(lr for lr in r.layers if lr.name == "fc1")
    assert fc1.bond_dims == [4, 4, 4] and fc1.params_mpo == model.fc1.num_mpo_params == 1024
    assert fc1.params_original == 784 * 256 and fc1.rel_error == 0


def test_per_layer_settings_alone_convert_exactly_those_layers():
    model = build_model("fc2")
    r = compress_(model, CompressionConfig(bond_dims={"fc2": 4}))
    assert [lr.name for lr in r.layers] == ["fc2"] and isinstance(model.fc1, nn.Linear)
    assert [(s.name, s.reason) for s in r.skipped] == [("fc1", "not named")]
    # with a global D the default selection applies too, and the per-layer D overrides it
    r = compress_(build_model("fc2"), CompressionConfig(bond_dim=2, bond_dims={"fc2": 4}))
    assert {lr.name: max(lr.bond_dims) for lr in r.layers} == {"fc1": 2, "fc2": 4}


def test_analyze_of_a_model_with_mpo_layers_counts_what_they_hold():
    """FC2 with fc1 already an MPO at D=4, analyzed at D=2: the predicted size is the size the model
    has after converting it (it was negative, counting fc1 as dense)."""
    model = build_model("fc2")
    compress_(model, CompressionConfig(bond_dim=4, layers=("fc1",)))
    for config in (CompressionConfig(bond_dim=2), CompressionConfig()):
        report = analyze(model, config)
        reports = [report] if config.bond_dim else report.sweep
        for r in reports:
            copy_ = build_model("fc2")
            compress_(copy_, CompressionConfig(bond_dim=4, layers=("fc1",)))
            compress_(copy_, CompressionConfig(bond_dim=r.bond_dim, layers=tuple(lr.name for lr in r.layers)))
            assert r.params_model_after == sum(p.numel() for p in copy_.parameters()) > 0
