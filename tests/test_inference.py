"""Inference: every plan, from the cores or with kept merged cores, equals the dense product; the
memory policy of `optimize_for_inference` is honoured (resident tensors counted); its pinned plans
are the ones used; an optimized model still trains, traces, exports and compiles."""

import pickle
import warnings

import pytest
import torch
from torch import nn

from mpocompress import MPOCompressError, optimize_for_inference, resident_bytes
from mpocompress.nn import (
    LowRankConv2d,
    LowRankLinear,
    MPOConv2d,
    MPOEmbedding,
    MPOLinear,
    cached_bytes,
    parameter_bytes,
)
from mpocompress.tensors import ContractionPlan, candidate_plans, plan_numbers


def _dense_reference(layer, x):
    """The layer's output from its rebuilt dense form, in float64."""
    dense = layer.to_dense().double()
    return dense(x.double())


@pytest.mark.parametrize("keep", [False, True], ids=["from cores", "kept"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_every_pinned_plan_kept_or_not_equals_the_dense_product(kind, keep):
    """Every plan of a 4-core layer, pinned for the batch's rows, in float64 against the dense
    layer (1e-10), also after the cores change in place (a kept W must not be reused)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = MPOLinear(48, 36, bond_dim=3, in_modes=(2, 3, 4, 2), out_modes=(3, 2, 3, 2), dtype=torch.float64)
        x = torch.randn(7, 48, dtype=torch.float64)
        rows = 7
    else:
        layer = MPOConv2d(4, 6, 3, bond_dim=3, padding=1, in_modes=(2, 2, 3, 3), out_modes=(1, 2, 3, 1), dtype=torch.float64)
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        rows = 2 * 5 * 5
    layer.eval()
    plans = candidate_plans(4)
    assert len(plans) == 27
    for plan in plans:
        layer.release()
        layer.pin_plan(rows, plan, keep=keep)
        if keep:
            layer.materialize()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _dense_reference(layer, x), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(layer(x), _dense_reference(layer, x), rtol=1e-10, atol=1e-10)  # from the kept groups
            kept = cached_bytes(layer)
            assert (kept > 0) == (keep and plan.kind != "contract"), plan.describe()  # groups of one are the cores
            layer.cores[1].mul_(1.5)
            torch.testing.assert_close(layer(x), _dense_reference(layer, x), rtol=1e-10, atol=1e-10)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(
        MPOConv2d(3, 8, 3, bond_dim=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        MPOLinear(8 * 6 * 6, 64, bond_dim=4),
        nn.ReLU(),
        LowRankLinear(64, 32, rank=6),
        nn.ReLU(),
        MPOLinear(32, 10, bond_dim=2),
    )


def _mpo_layers(model):
    return [m for m in model.modules() if isinstance(m, (MPOLinear, MPOConv2d))]


def test_memory_policy_keeps_nothing_but_the_stored_factors():
    model = _model().eval()
    x = torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    report = optimize_for_inference(model, x, prefer="memory", batch=(1, 16), budget_s=0.002)
    assert not model.training
    with torch.no_grad():
        after = model(x)
        model(x[:1])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # resident tensors counted: the parameters and nothing else, and every cache is empty
    assert cached_bytes(model) == 0 and report.cache_bytes == 0
    assert resident_bytes(model) == parameter_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    assert all(len(m.weight_cache) == 0 for m in _mpo_layers(model))
    assert all(not lr.kept for lr in report.layers)
    # one choice per MPO layer and batch size, for the rows the layer really saw
    rows = {(lr.name, lr.batch): lr.rows for lr in report.layers if lr.structure == "mpo"}
    assert rows == {("0", 1): 36, ("0", 16): 576, ("3", 1): 1, ("3", 16): 16, ("7", 1): 1, ("7", 16): 16}
    assert [lr.plan for lr in report.layers if lr.name == "5"] == ["two GEMMs", "two GEMMs"]
    for m in _mpo_layers(model):
        assert all(not keep for _, keep in m.pinned_plans.values())


def test_speed_policy_keeps_only_what_it_reports_and_within_the_budget():
    model = _model().eval()
    x = torch.randn(16, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    report = optimize_for_inference(model, x, prefer="speed", batch=(1, 16), budget_s=0.002)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        model(x[:1])
    kept = [lr for lr in report.layers if lr.kept]
    assert cached_bytes(model) == report.cache_bytes <= sum(lr.kept_bytes for lr in kept)
    for lr in kept:
        assert lr.kept_bytes == plan_numbers(dict(model.named_modules())[lr.name].shape, _plan(lr.plan, 4)) * 4
    # no budget for kept cores: the speed policy keeps nothing
    report0 = optimize_for_inference(model, x, prefer="speed", batch=(1, 16), max_cache_bytes=0, budget_s=0.002)
    assert report0.cache_bytes == 0 == cached_bytes(model)
    # a budget below everything one layer would keep: what is kept fits it
    if kept:
        budget = max(lr.kept_bytes for lr in kept) - 1
        report1 = optimize_for_inference(model, x, prefer="speed", batch=(1, 16), max_cache_bytes=budget, budget_s=0.002)
        assert sum({(lr.name, lr.plan): lr.kept_bytes for lr in report1.layers if lr.kept}.values()) <= budget


def _plan(described, n):
    return next(p for p in candidate_plans(n) if p.describe() == described)


def test_pinned_plans_are_used_without_asking_the_cost_model(monkeypatch):
    model = _model()
    x = torch.randn(4, 3, 6, 6)
    optimize_for_inference(model, x, prefer="memory", budget_s=0.002)
    import mpocompress.nn.mpo_base as base

    def refuse(*a, **k):
        raise AssertionError("the cost model was asked for a pinned row count")

    monkeypatch.setattr(base, "choose_plan", refuse)
    for m in _mpo_layers(model):
        m._plans.clear()
    with torch.no_grad():
        model(x)
    with torch.no_grad(), pytest.raises(AssertionError, match="cost model"):
        model(torch.randn(3, 3, 6, 6))  # a batch size nothing was measured for


def test_an_optimized_model_still_trains_and_its_gradients_reach_the_cores():
    model = _model()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
    optimize_for_inference(model, x, prefer="speed", budget_s=0.002)
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for m in _mpo_layers(model):
        assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in m.cores)
    # and the training plan's gradient is the dense product's
    layer = model[3]
    inp = torch.randn(8, layer.in_features)
    layer.zero_grad()
    (layer(inp) ** 2).sum().backward()
    ref = torch.autograd.grad((nn.functional.linear(inp, layer.weight_matrix(), layer.bias) ** 2).sum(), list(layer.cores))
    for core, g in zip(layer.cores, ref):
        torch.testing.assert_close(core.grad, g, rtol=1e-3, atol=1e-5)  # float32, different summation orders


@pytest.mark.parametrize("prefer", ["memory", "speed"])
@pytest.mark.parametrize("how", ["trace", "export", "compile"])
def test_an_optimized_small_model_traces_exports_and_compiles(prefer, how, graph_of):
    model = _model()
    x = torch.randn(4, 3, 6, 6)
    optimize_for_inference(model, x, prefer=prefer, budget_s=0.002)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(graph_of(model, x, how)(x), eager, rtol=1e-5, atol=1e-5)


def test_embeddings_and_token_models_are_timed_and_reported():
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = MPOEmbedding(500, 32, bond_dim=4)
            self.proj = MPOLinear(32, 16, bond_dim=3)

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.emb(input_ids))

    model = Tiny()
    ids = torch.randint(0, 500, (2, 9))
    report = optimize_for_inference(model, {"input_ids": ids}, prefer="memory", batch=(1, 4), budget_s=0.002)
    by = {(lr.name, lr.batch): lr for lr in report.layers}
    assert by[("emb", 4)].plan == "lookup" and by[("emb", 4)].rows == 36
    assert by[("proj", 1)].rows == 9 and by[("proj", 4)].rows == 36  # batch x tokens
    assert report.to_dict()["resident_bytes"] == parameter_bytes(model)


def test_a_low_rank_convolution_is_reported_by_its_positions():
    model = nn.Sequential(LowRankConv2d(3, 4, 3, rank=2, padding=1, stride=2))
    report = optimize_for_inference(model, torch.randn(2, 3, 6, 6), budget_s=0.002)
    assert [(lr.plan, lr.rows) for lr in report.layers] == [("two GEMMs", 2 * 3 * 3)]


@pytest.mark.parametrize("bias", [True, False])
def test_both_forms_of_a_low_rank_linear_equal_the_dense_product(bias):
    """"transposed" takes the first product as (A x^T)^T: the same numbers as x A^T B^T + b (float64,
    3-D input), with the input's gradient too (eval mode, where pins apply)."""
    torch.manual_seed(0)
    layer = LowRankLinear(40, 24, rank=7, bias=bias).double().eval()
    x = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    ref = _dense_reference(layer, x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), [x])
    for form in ("rows", "transposed"):
        layer.pin_form(10, form)
        y = layer(x)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(y.square().sum(), [x])
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(MPOCompressError, match="unknown form"):
        layer.pin_form(10, "columns")


def _first_product_shapes(layer, x):
    """The input shapes of the matrix products one call of `layer` runs."""
    with torch.profiler.profile(record_shapes=True) as prof:
        layer(x)
    return [tuple(map(tuple, e.input_shapes[:2])) for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]


def test_optimize_pins_the_faster_form_per_row_count_and_training_ignores_it(monkeypatch):
    import mpocompress.nn.inference as inference

    model = nn.Sequential(LowRankLinear(64, 48, rank=8), nn.ReLU(), LowRankLinear(48, 16, rank=4))
    times = iter([2.0, 1.0, 1.0, 2.0] * 2)  # per layer and batch: rows, then transposed
    monkeypatch.setattr(inference, "median_ms", lambda fn, device, budget_s: next(times))
    report = optimize_for_inference(model, torch.randn(5, 64), batch=(1, 5))
    got = {(lr.name, lr.rows): (lr.plan, lr.time_ms, lr.default_time_ms) for lr in report.layers}
    assert got[("0", 1)] == ("two GEMMs (transposed first)", 1.0, 2.0)
    assert got[("2", 1)] == ("two GEMMs", 1.0, 1.0)
    assert model[0].pinned_forms == {1: "transposed", 5: "transposed"} and model[2].pinned_forms == {1: "rows", 5: "rows"}
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert ((8, 64), (64, 5)) in _first_product_shapes(model[0], x)  # A x^T: the transposed form ran
        assert ((5, 64), (64, 8)) not in _first_product_shapes(model[0], x)
        assert ((3, 64), (64, 8)) in _first_product_shapes(model[0], torch.randn(3, 64))  # 3 rows: nothing pinned
    model.train()
    assert ((5, 64), (64, 8)) in _first_product_shapes(model[0], x)  # training with gradients: the default form
    model[0].pin_form(5, None)
    assert model[0].pinned_forms == {1: "transposed"}


def test_bad_requests_are_one_line_errors():
    model = _model()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(MPOCompressError, match="choose memory or speed"):
        optimize_for_inference(model, x, prefer="fast")
    with pytest.raises(MPOCompressError, match="batch sizes"):
        optimize_for_inference(model, x, batch=0)
    with pytest.raises(MPOCompressError, match="max_cache_bytes"):
        optimize_for_inference(model, x, prefer="speed", max_cache_bytes=-1)
    with pytest.raises(MPOCompressError, match="does not fit"):
        model[3].pin_plan(2, ContractionPlan((1, 1), ("fold",)))


@pytest.mark.parametrize("make, field", [
    (lambda: MPOLinear(16, 8, bond_dim=2), "_pinned"), (lambda: LowRankLinear(16, 8, rank=3), "_forms"),
], ids=["mpo", "lowrank"])  # fmt: skip
def test_layers_pickled_before_pinning_existed_still_run(make, field):
    layer = make()
    state = layer.__getstate__()
    del state[field]
    old = type(layer).__new__(type(layer))
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    x = torch.randn(3, 16)
    torch.testing.assert_close(again(x), layer(x))
    assert getattr(again, field) == {}


def test_evaluate_prefer_reports_what_the_served_model_holds(tmp_path):
    """`evaluate --prefer memory|speed`: the same accuracy and loss as a plain evaluation, the
    resident weights counted (memory: the parameters only), and a one-line error for other values."""
    import json

    from typer.testing import CliRunner

    from mpocompress import CompressionConfig, build_model, compress_, save
    from mpocompress.cli import app

    torch.manual_seed(0)
    model = build_model("lenet5")
    compress_(model, CompressionConfig(bond_dim=3))
    path = tmp_path / "m.safetensors"
    save(model, path, arch="lenet5")
    runner = CliRunner()

    def run(*extra):
        r = runner.invoke(app, ["evaluate", str(path), "--data", "digits", "--image-size", "28", "--batch-size", "50", "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    plain, memory, speed = run(), run("--prefer", "memory"), run("--prefer", "speed")
    assert "inference" not in plain
    for rep in (memory, speed):
        assert rep["accuracy"] == plain["accuracy"]
        assert rep["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert memory["inference"]["resident_bytes"] == memory["inference"]["parameter_bytes"] == params
    assert memory["inference"]["cache_bytes"] == 0
    assert speed["inference"]["resident_bytes"] == params + speed["inference"]["cache_bytes"]
    assert {lr["name"] for lr in memory["inference"]["layers"]} == {"conv3", "fc1"}
    bad = runner.invoke(app, ["evaluate", str(path), "--data", "digits", "--image-size", "28", "--prefer", "fast"])
    assert bad.exit_code == 2 and "--prefer takes memory or speed" in bad.output


def test_the_prepared_gpu_check_passes_on_the_cpu():
    """benchmarks/gpu_check.py is what a session lent a GPU runs; CI runs the same checks on the
    CPU so the script is known to work (and to fail loudly: it exits 1 on a difference)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--no-timing"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("\nok  ") >= 2 * 27 * 2 and "0 failed" in r.stdout


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo exporter", "TorchScript exporter"])
@pytest.mark.parametrize("prefer", ["memory", "speed"])
def test_an_optimized_small_model_exports_to_onnx_with_both_exporters(tmp_path, prefer, dynamo):
    """torch.onnx.export (both exporters) of a model of MPO and low-rank layers after
    optimize_for_inference; onnxruntime's output equals eager within 1e-5."""
    import onnxruntime as ort

    model = _model()
    x = torch.randn(4, 3, 6, 6)
    optimize_for_inference(model, x, prefer=prefer, budget_s=0.002)
    with torch.no_grad():
        eager = model(x)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
