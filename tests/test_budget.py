"""Structures, budgets and calibration through `compress_`: low-rank layers against the dense product,
a budget met within 1 % with no layer grown, eps never growing a layer, `--max-error` honoured,
calibration that lowers the output error, and files that load back."""

import copy
import itertools

import pytest
import torch
from torch import nn

from mpocompress import CompressionConfig, analyze, build_model, compress_, load, save
from mpocompress.errors import MPOCompressError
from mpocompress.nn import FactorizedLayer, LowRankConv2d, LowRankLinear, MPOLayer
from mpocompress.tensors import MPOShape


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _mlp(seed=0, width=1):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(48, 96 * width), nn.ReLU(), nn.Linear(96 * width, 64 * width), nn.ReLU(), nn.Linear(64 * width, 10)
    )


def _batches(seed=0, n=384, nx=48, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(nx, nx, generator=g) / nx**0.5
    x = torch.randn(n, nx, generator=g) @ mix * 3 + shift
    return [{"x": x[i : i + 64]} for i in range(0, n, 64)], x


# ----------------------------------------------------------------------------- low-rank layers


def test_lowrank_linear_is_the_product_of_its_factors():
    torch.manual_seed(0)
    layer = LowRankLinear(12, 7, 3)
    x = torch.randn(2, 5, 12)
    assert torch.allclose(layer(x), x @ (layer.second @ layer.first).T + layer.bias, atol=1e-6)
    assert layer.num_mpo_params == 3 * (12 + 7) and layer.weight_numel == 84
    dense = layer.to_dense()
    assert torch.allclose(dense(x), layer(x), atol=1e-6)
    # default init: the product has PyTorch's nn.Linear weight scale 1/sqrt(3 N_x)
    big = LowRankLinear(400, 300, 64)
    assert float(big.weight_matrix().detach().std()) == pytest.approx((1 / (3 * 400)) ** 0.5, rel=0.1)


@pytest.mark.parametrize("geom", [
    dict(), dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(padding=2, padding_mode="reflect"),
    dict(padding=(1, 2), stride=(2, 1), padding_mode="circular"),
])  # fmt: skip
def test_lowrank_conv_equals_its_dense_kernel(geom):
    torch.manual_seed(0)
    layer = LowRankConv2d(3, 8, 3, rank=4, **geom)
    x = torch.randn(2, 3, 9, 10)
    assert torch.allclose(layer(x), layer.to_dense()(x), atol=1e-5)
    assert torch.allclose(layer(x[0]), layer(x)[0], atol=1e-5)  # an unbatched input too


def test_lowrank_conv_whose_kernel_covers_its_input_is_two_matrix_products(monkeypatch):
    torch.manual_seed(0)
    layer = LowRankConv2d(16, 120, 5, rank=6).double()
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64)
    ref = layer.to_dense()(x)  # nn.Conv2d, before F.conv2d is taken away

    def no_conv(*args, **kwargs):
        raise AssertionError("a kernel that covers its input must not reach F.conv2d")

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_conv)
    torch.testing.assert_close(layer(x), ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(layer(x[0]), ref[0], atol=1e-12, rtol=1e-10)  # unbatched


def test_lowrank_layers_save_and_load(tmp_path):
    model = build_model("lenet5")
    compress_(model, CompressionConfig(bond_dim=6, structure="lowrank"))
    assert isinstance(model.conv3, LowRankConv2d) and isinstance(model.fc1, LowRankLinear)
    save(model, tmp_path / "m.safetensors", "lenet5")
    back = load(tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 28, 28)
    assert type(back.conv3) is LowRankConv2d and torch.equal(back.eval()(x), model.eval()(x))


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("structure", ["auto", "lowrank", "mpo"])
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_budget_is_met_within_one_percent_and_no_layer_grows(structure, fraction):
    """(Wide enough that one rank step of a layer is well under 1 % of the budget.)"""
    model = _mlp(width=4)
    before = _params(model)
    dense_sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    batches, _ = _batches()
    r = compress_(model, CompressionConfig(target_params=fraction, structure=structure), calibration=batches)
    target = round(fraction * before)
    assert r.params_model_after == _params(model) and r.params_model_after <= target
    if structure != "mpo":
        assert r.params_model_after >= 0.99 * target, (r.params_model_after, target)
    else:  # an MPO grows in coarse steps (one bond by 1 adds J_k I_k D + ...): no step may still fit
        left = target - r.params_model_after
        for m in model.modules():
            if isinstance(m, MPOLayer):
                for k, cap in enumerate(m.shape.caps):
                    bonds = list(m.bond_dims)
                    if bonds[k] < cap:
                        bonds[k] += 1
                        step = MPOShape(m.in_modes, m.out_modes, tuple(bonds)).param_count - m.num_mpo_params
                        assert step > left, (k, step, left)
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLayer):
            assert m.num_mpo_params < dense_sizes[name]
            assert structure == "auto" or m.structure == structure
    for lr in r.layers:
        assert lr.params_mpo < lr.params_original and lr.ranks == lr.bond_dims
        assert lr.structure in ("lowrank", "mpo") and lr.output_rel_error is not None


def test_an_absolute_budget_and_one_without_calibration():
    model = _mlp()
    r = compress_(model, CompressionConfig(target_params=5000))
    assert 4950 <= r.params_model_after <= 5000 and all(lr.output_rel_error is None for lr in r.layers)


def test_a_budget_that_cannot_be_met_is_refused_before_any_change():
    model = _mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(MPOCompressError, match="cannot be met.*smallest reachable"):
        compress_(model, CompressionConfig(target_params=100, layers=("0",)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and isinstance(model[0], nn.Linear)


def test_budget_conflicts_with_a_global_bond_dim():
    with pytest.raises(MPOCompressError, match="either"):
        CompressionConfig(target_params=0.5, bond_dim=4)


def test_per_layer_bond_dim_overrides_the_allocator():
    model = _mlp()
    r = compress_(model, CompressionConfig(target_params=0.5, bond_dims={"2": 3}), calibration=_batches()[0])
    layer = {lr.name: lr for lr in r.layers}["2"]
    assert layer.structure == "mpo" and max(layer.bond_dims) == 3
    assert r.params_model_after <= round(0.5 * _params(_mlp()))


def test_max_error_is_honoured_per_layer():
    model = _mlp()
    batches, _ = _batches()
    r = compress_(model, CompressionConfig(max_error=0.3), calibration=batches)
    assert r.layers and all(lr.output_rel_error <= 0.3 + 1e-6 for lr in r.layers)
    weight_based = compress_(_mlp(), CompressionConfig(max_error=0.3, structure="lowrank"))
    assert all(lr.rel_error <= 0.3 + 1e-9 for lr in weight_based.layers)


def test_eps_never_grows_a_layer():
    model = build_model("fc2")
    before = _params(model)
    r = compress_(model, CompressionConfig(eps=0.3, layers=("fc1", "fc2")))
    assert r.params_model_after <= before
    for lr in r.layers:
        assert lr.params_mpo < lr.params_original
    grown = [s for s in r.skipped if "would not be smaller" in s.reason]
    assert grown and all(isinstance(model.get_submodule(s.name), nn.Linear) for s in grown)


# ----------------------------------------------------------------------------- calibration


def test_calibration_lowers_the_output_error_at_the_same_size():
    batches, x = _batches(shift=0.5)
    ref = _mlp()
    errors = {}
    for name, cal in (("weight", None), ("calibrated", batches)):
        model = _mlp()
        compress_(model, CompressionConfig(bond_dim=6, structure="lowrank"), calibration=cal)
        with torch.no_grad():
            errors[name] = float((model(x) - ref(x)).norm() / ref(x).norm())
    assert errors["calibrated"] < 0.8 * errors["weight"], errors


def test_sequential_fits_each_layer_to_the_original_outputs():
    batches, x = _batches(shift=0.5)
    ref = _mlp()
    outs = {}
    for seq in (False, True):
        model = _mlp()
        compress_(model, CompressionConfig(bond_dim=5, structure="lowrank", sequential=seq), calibration=batches)
        with torch.no_grad():
            outs[seq] = float((model(x) - ref(x)).norm() / ref(x).norm())
    assert outs[True] < outs[False], outs


def test_sequential_refits_take_the_refit_damping(monkeypatch):
    """Every refit of a sequential conversion is damped by REFIT_DAMP, not the plain whitening's DAMP
    (why: tests/test_calibrated.py, the rounding of inputs that span fewer directions)."""
    from mpocompress.compress import choose

    used = []
    bound = choose.bound_whitening
    monkeypatch.setattr(choose, "bound_whitening", lambda *a, **k: used.append(k.get("damp")) or bound(*a, **k))
    batches, _ = _batches(shift=0.5)
    model = _mlp()
    compress_(model, CompressionConfig(bond_dim=5, structure="lowrank", sequential=True), calibration=batches)
    made = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert made >= 2 and used == [choose.REFIT_DAMP] * made


def test_calibration_data_that_does_not_fit_the_model():
    with pytest.raises(MPOCompressError, match="does not run on the calibration data"):
        compress_(_mlp(), CompressionConfig(target_params=0.5), calibration=[{"x": torch.randn(4, 7)}])


def test_a_model_producing_nan_on_the_calibration_data():
    model = _mlp()
    x = torch.randn(8, 48)
    x[0, 0] = float("inf")  # the first layer turns it into Inf/NaN activations downstream
    with pytest.raises(MPOCompressError, match="NaN or Inf"):
        compress_(model, CompressionConfig(target_params=0.5), calibration=[{"x": x}])


def test_analyze_with_calibration_lists_every_form_and_changes_nothing():
    model = _mlp()
    state = copy.deepcopy(model.state_dict())
    batches, _ = _batches()
    rep = analyze(model, CompressionConfig(target_params=0.4), calibration=batches)
    assert set(rep.curves) == {"0", "2", "4"} and not rep.applied
    structures = {p["structure"] for pts in rep.curves.values() for p in pts}
    assert structures == {"dense", "lowrank", "mpo"}
    assert rep.params_model_after <= round(0.4 * _params(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(m, (MPOLayer, LowRankLinear)) for m in model.modules())
    converted = compress_(copy.deepcopy(model), CompressionConfig(target_params=0.4), calibration=batches)
    assert [lr.ranks for lr in rep.layers] == [lr.ranks for lr in converted.layers]  # analyze shows what convert does


def test_the_allocation_on_a_small_model_equals_an_exhaustive_search():
    """Every combination of the forms the allocator weighed (dense, each rank, each MPO) within the
    budget, scored with the allocator's own cost: the best one costs what the allocator's choice does."""
    from mpocompress.compress.choose import plan_layers
    from mpocompress.compress.targets import select_targets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 16))
    x = torch.randn(256, 24) + 0.2
    batches = [{"x": x[i : i + 64]} for i in range(0, 256, 64)]
    config = CompressionConfig(target_params=0.45)
    targets, _ = select_targets(model, config)
    plan = plan_layers(model, config, targets, batches)
    cal = plan.calibration
    costs = {}
    for t in targets:
        white = plan._white(t)
        energy = white.energy(t.cand.module.weight) / cal.samples
        costs[t.cand.name] = [(o.params, cal.sensitivity[t.cand.name] * energy * o.rel_error**2) for o in plan.options[t.cand.name]]
    budget = round(0.45 * _params(model)) - sum(m.bias.numel() for m in (model[0], model[2]))
    names = [t.cand.name for t in targets]
    best = min(
        sum(c for _, c in combo)
        for combo in itertools.product(*[costs[n] for n in names])
        if sum(p for p, _ in combo) <= budget
    )
    chosen = {d.target.cand.name: d.option for d in plan.decisions}
    got = 0.0
    for n in names:
        o = chosen[n]
        err = 0.0 if o is None else o.rel_error  # None: kept dense
        got += cal.sensitivity[n] * (plan._white(next(t for t in targets if t.cand.name == n)).energy(model.get_submodule(n).weight) / cal.samples) * err**2
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_reported_spectra_are_those_of_the_factorized_weight():
    """entropy keeps its meaning for low-rank: the spectrum of B A itself (calibrated or not)."""
    from mpocompress.tensors import entanglement_entropy

    for cal in (None, _batches()[0]):
        model = _mlp()
        r = compress_(model, CompressionConfig(bond_dim=5, structure="lowrank", layers=("0",)), calibration=cal)
        w = model[0].weight_matrix().detach().double()
        s = torch.linalg.svdvals(w)[:5]
        assert r.layers[0].entropy == [pytest.approx(entanglement_entropy(s), rel=1e-6)]


def test_a_budget_and_an_error_cap_together():
    batches, _ = _batches()
    model = _mlp(width=2)
    r = compress_(model, CompressionConfig(target_params=0.6, max_error=0.4), calibration=batches)
    assert r.params_model_after <= round(0.6 * _params(_mlp(width=2)))
    assert all(lr.output_rel_error <= 0.4 + 1e-6 for lr in r.layers)
    with pytest.raises(MPOCompressError, match="cannot be met"):  # a tight cap leaves only large forms
        compress_(_mlp(width=2), CompressionConfig(target_params=0.2, max_error=0.05), calibration=batches)


def test_ci_sized_target_the_allocator_beats_uniform_ranks_on_held_out_data():
    """The MiniLM target in miniature (docs/results.md): a small MLP trained on digits, compressed to 30 %
    of its parameters with calibration on training images; on the held-out split, the budget
    allocator's outputs are closer to the original's than uniform calibrated ranks of the same size."""
    from mpocompress.io.data import load_dataset

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x_train, y_train = train.tensors()
    for _ in range(4):
        for idx in torch.randperm(len(y_train)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    x_test, y_test = test.tensors()
    assert (model(x_test).argmax(1) == y_test).float().mean() > 0.9
    calib = [{"x": x_train[i : i + 64]} for i in range(0, 512, 64)]
    uniform = copy.deepcopy(model)
    r_uniform = compress_(uniform, CompressionConfig(bond_dim=24, structure="lowrank", layers=("1", "3", "5")), calibration=calib)
    budgeted = copy.deepcopy(model)
    r_budget = compress_(budgeted, CompressionConfig(target_params=r_uniform.params_model_after, layers=("1", "3", "5")),
                         calibration=calib)  # fmt: skip
    assert r_budget.params_model_after <= r_uniform.params_model_after
    with torch.no_grad():
        ref = model(x_test)
        err = {name: float((m(x_test) - ref).norm() / ref.norm()) for name, m in (("uniform", uniform), ("budget", budgeted))}
    assert err["budget"] < err["uniform"], err


def test_lowrank_with_both_a_rank_and_eps_takes_the_smaller():
    """As for an MPO, D caps and eps truncates: the rank is the smaller of the two asks."""
    loose = compress_(_mlp(), CompressionConfig(bond_dim=20, eps=0.9, structure="lowrank", layers=("0",)))
    tight = compress_(_mlp(), CompressionConfig(bond_dim=3, eps=0.01, structure="lowrank", layers=("0",)))
    by_eps = compress_(_mlp(), CompressionConfig(eps=0.9, structure="lowrank", layers=("0",)))
    assert loose.layers[0].ranks == by_eps.layers[0].ranks and by_eps.layers[0].ranks[0] < 20
    assert tight.layers[0].ranks == [3]


def test_the_mpo_only_allocator_measures_its_mpo_forms(monkeypatch):
    """With --structure mpo and a calibrated budget every Linear's MPO forms are priced by swaps
    measured on the calibration data (`_probed`, as an embedding's are), made with convert's
    refinement; `auto` keeps the predictions (it never gets there for a Linear). The ratios it
    returns are real measurements: positive, and not all 1."""
    import mpocompress.compress.choose as choose

    seen = {}
    real = choose._probed

    def spy(model, t, opts, *a, **k):
        ratios = real(model, t, opts, *a, **k)
        seen[t.cand.name] = (k.get("refine_steps", a[5] if len(a) > 5 else 0), ratios)
        return ratios

    monkeypatch.setattr(choose, "_probed", spy)
    batches, _ = _batches()
    total = _params(_mlp())
    compress_(_mlp(), CompressionConfig(structure="auto", target_params=total // 2), calibration=batches)
    assert seen == {}
    compress_(_mlp(), CompressionConfig(structure="mpo", target_params=total // 2, refine_steps=7), calibration=batches)
    assert set(seen) == {"0", "2", "4"}  # the three Linears the budget sizes
    for steps, ratios in seen.values():
        assert steps == 7 and all(r > 0 for r in ratios)
    assert any(abs(r - 1.0) > 1e-6 for _, ratios in seen.values() for r in ratios)
