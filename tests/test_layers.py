"""MPO layers against their dense counterparts, on both forward paths."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn import MPOConv2d, MPOLinear, layer_from_spec
from mpocompress.nn.cache import stamp

TOL = dict(rtol=1e-4, atol=1e-5)  # float32


def _set(layer, strategy):
    layer.set_forward_strategy(strategy)
    return layer


@pytest.mark.parametrize("strategy", ["contract", "dense", "auto"])
@pytest.mark.parametrize(
    "in_f, out_f, d, modes",
    [(784, 256, 16, None), (256, 10, 4, ((4, 4, 4, 4), (1, 1, 10, 1))), (120, 84, 3, ((2, 5, 6, 2), (2, 3, 7, 2))), (12, 6, 2, None)],
)
def test_linear_equals_dense_layer(strategy, in_f, out_f, d, modes):
    dense = nn.Linear(in_f, out_f)
    kwargs = dict(in_modes=modes[0], out_modes=modes[1]) if modes else {}
    mpo = _set(MPOLinear.from_linear(dense, bond_dim=d, **kwargs), strategy)
    ref = mpo.to_dense()
    x = torch.randn(5, 3, in_f)  # leading dims are kept
    torch.testing.assert_close(mpo(x), ref(x), **TOL)
    torch.testing.assert_close(mpo(x), x @ mpo.weight_matrix().T + mpo.bias, **TOL)


def test_linear_full_bond_reproduces_the_original():
    dense = nn.Linear(60, 24)
    mpo = MPOLinear.from_linear(dense, bond_dim=10_000, in_modes=(3, 4, 5), out_modes=(2, 3, 4))
    x = torch.randn(8, 60)
    for s in ("contract", "dense"):
        torch.testing.assert_close(_set(mpo, s)(x), dense(x), **TOL)


@pytest.mark.parametrize("strategy", ["contract", "dense"])
@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=6, out_channels=16, kernel_size=5),
        dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1),
        dict(in_channels=3, out_channels=12, kernel_size=(3, 5), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
        dict(in_channels=4, out_channels=6, kernel_size=(2, 3), padding="same", dilation=(2, 1)),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid", bias=False),
        dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=2, out_channels=4, kernel_size=3, padding=2, padding_mode="circular"),
        dict(in_channels=2, out_channels=4, kernel_size=4, padding="same", padding_mode="replicate"),
    ],
)
def test_conv_equals_dense_conv(strategy, conv):
    dense = nn.Conv2d(**conv)
    mpo = _set(MPOConv2d.from_conv(dense, bond_dim=10_000), strategy)  # full bonds: the same kernel
    x = torch.randn(2, conv["in_channels"], 11, 9)
    torch.testing.assert_close(mpo(x), dense(x), **TOL)
    torch.testing.assert_close(mpo(x[0]), dense(x[0]), **TOL)  # unbatched input
    truncated = _set(MPOConv2d.from_conv(dense, bond_dim=2), strategy)
    torch.testing.assert_close(truncated(x), truncated.to_dense()(x), **TOL)


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_gradients_flow_to_cores_and_agree_between_paths(layer_kind):
    if layer_kind == "linear":
        layer = MPOLinear(84, 30, bond_dim=4)
        x = torch.randn(6, 84, requires_grad=True)
    else:
        layer = MPOConv2d(4, 8, 3, bond_dim=3, stride=2, padding=1)
        x = torch.randn(2, 4, 7, 7, requires_grad=True)
    grads = {}
    for s in ("contract", "dense"):
        layer.zero_grad()
        x.grad = None
        _set(layer, s)(x).square().sum().backward()
        grads[s] = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    for g in grads["contract"][:-1]:
        assert g.abs().sum() > 0  # every core and the bias receive gradient
    for a, b in zip(grads["contract"], grads["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and against autograd through the plain dense op on the rebuilt weight
    layer.zero_grad()
    x.grad = None
    w = layer.weight_matrix()
    y = x @ w.T + layer.bias if layer_kind == "linear" else nn.functional.conv2d(x, layer.kernel(), layer.bias, 2, 1)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, grads["contract"][-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d", [2, 8, 32])
@torch.no_grad()
def test_random_init_matches_pytorch_default_scale(d):
    std_ref = float(torch.stack([nn.Linear(784, 256).weight.std() for _ in range(3)]).mean())
    stds = [float(MPOLinear(784, 256, bond_dim=d).weight_matrix().std()) for _ in range(5)]
    assert abs(sum(stds) / len(stds) / std_ref - 1) < 0.2
    conv_ref = float(nn.Conv2d(16, 120, 5).weight.std())
    conv_std = float(MPOConv2d(16, 120, 5, bond_dim=d).kernel().std())
    assert abs(conv_std / conv_ref - 1) < 0.2
    bias = MPOLinear(784, 256, bond_dim=d).bias
    assert float(bias.abs().max()) <= 1 / 784**0.5


def test_repr_uses_paper_notation():
    layer = MPOLinear(784, 256, bond_dim=16, in_modes=(4, 7, 7, 4), out_modes=(4, 4, 4, 4))
    assert "M^{4,4,4,4}_{4,7,7,4}(D=16)" in repr(layer)
    capped = MPOLinear(256, 10, bond_dim=4, in_modes=(4, 4, 4, 4), out_modes=(1, 1, 10, 1))
    assert "M^{1,1,10,1}_{4,4,4,4}(D=4)" in repr(capped)
    assert capped.num_mpo_params == 736
    conv = MPOConv2d(16, 120, 5, bond_dim=4, in_modes=(2, 10, 10, 2), out_modes=(2, 5, 6, 2))
    assert "M^{2,5,6,2}_{2,10,10,2}(D=4)" in repr(conv) and "kernel_size=(5, 5)" in repr(conv)


def test_plan_choice_follows_the_cost_model():
    small = MPOLinear(784, 256, bond_dim=4, in_modes=(4, 7, 7, 4), out_modes=(4, 4, 4, 4))
    assert small.plan_for(1).kind != "dense"  # one vector: rebuilding W costs more than contracting
    assert small.plan_for(65536).kind == "dense"  # a huge batch amortises the rebuild
    heavy = MPOLinear(784, 256, bond_dim=16, in_modes=(4, 7, 7, 4), out_modes=(4, 4, 4, 4))
    assert heavy.plan_for(512).kind == "dense"  # the rebuild is cheap next to 512 products
    assert heavy.plan_for(64).kind == "dense"  # and, since merge_cores joins halves, next to 64 (measured fastest too)
    assert heavy.plan_for(1).kind != "dense"  # ... but not next to one vector
    assert heavy.plan_for(64, cached=True).kind == "dense"  # eval mode: the cached W wins
    wide = MPOLinear(4096, 4096, bond_dim=16, in_modes=(8,) * 4, out_modes=(8,) * 4)
    assert wide.plan_for(512).sizes == (2, 2)  # halves: half the dense MACs, no rebuild
    assert wide.plan_for(512, backward=True).sizes == (2, 2)
    small.set_forward_strategy("dense")
    assert small.plan_for(1).kind == "dense"
    small.set_forward_strategy("merged")
    assert small.plan_for(1).kind == "merged"
    with pytest.raises(MPOCompressError):
        small.set_forward_strategy("fastest")


def test_plans_are_cached_per_shape_not_replanned(monkeypatch):
    layer = MPOLinear(64, 64, bond_dim=4)
    calls = []
    import mpocompress.nn.mpo_base as layers_mod

    real = layers_mod.choose_plan
    monkeypatch.setattr(layers_mod, "choose_plan", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(8, 64)
    for _ in range(5):
        layer(x)
    layer(torch.randn(3, 64))
    assert calls == [8, 3]  # one plan per row count, reused afterwards


def _every_plan(layer):
    from mpocompress.tensors import candidate_plans

    return candidate_plans(len(layer.cores))


@pytest.mark.parametrize(
    "in_f,out_f,d,modes",
    [(24, 30, 3, dict(in_modes=(2, 3, 4), out_modes=(5, 3, 2))), (48, 20, 2, dict(in_modes=(2, 2, 3, 4), out_modes=(1, 5, 2, 2)))],
)
def test_every_plan_matches_the_dense_product_and_its_gradients(in_f, out_f, d, modes):
    """Forward and gradients (cores, bias, input) of every plan against F.linear on the rebuilt W,
    in float64 (tolerance 1e-10)."""
    torch.manual_seed(0)
    layer = MPOLinear(in_f, out_f, bond_dim=d, dtype=torch.float64, **modes)
    x = torch.randn(5, in_f, dtype=torch.float64)
    gy = torch.randn(5, out_f, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    cores_ref = [c.detach().clone().requires_grad_() for c in layer.cores]
    bias_ref = layer.bias.detach().clone().requires_grad_()
    from mpocompress.tensors import mpo_to_matrix

    y_ref = F.linear(xr, mpo_to_matrix(cores_ref), bias_ref)
    g_ref = torch.autograd.grad(y_ref, [xr, *cores_ref, bias_ref], gy)
    plans = _every_plan(layer)
    assert {p.kind for p in plans} == {"dense", "contract", "merged"}
    assert {f for p in plans for f in p.forms} == {"fold", "bmm"}
    for plan in plans:
        layer._plans = {(5, True, False, "auto"): plan}  # force this plan for the call below
        xi = x.clone().requires_grad_()
        y = layer(xi)
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10, msg=plan.describe())
        g = torch.autograd.grad(y, [xi, *layer.cores, layer.bias], gy)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=plan.describe())


@pytest.mark.parametrize("strategy", ["contract", "merged", "dense"])
def test_conv_plans_match_dense_conv(strategy):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    mpo = MPOConv2d.from_conv(conv, bond_dim=10_000, in_modes=(2, 2, 9), out_modes=(1, 2, 3))
    mpo.set_forward_strategy(strategy)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    y = mpo(x)
    torch.testing.assert_close(y, conv(x), atol=1e-10, rtol=1e-10)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (gx_ref,) = torch.autograd.grad(conv(x).sum(), [x])
    torch.testing.assert_close(gx, gx_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("strategy", ["contract", "merged", "dense"])
def test_a_kernel_that_covers_its_input_is_one_matrix_product(strategy, monkeypatch):
    """LeNet-5's conv3 (16 -> 120 channels, 5x5 kernel on 5x5 maps) is a linear map of the flattened
    input: every plan, cached or not, with gradients, against the float64 dense convolution, and
    without a call to the convolution routine."""
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 120, 5).double()
    mpo = MPOConv2d.from_conv(conv, bond_dim=10_000, in_modes=(2, 5, 10, 4), out_modes=(2, 5, 6, 2))
    mpo.set_forward_strategy(strategy)
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    y_ref = conv(x)
    gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), [x, conv.weight])
    assert mpo.covers_input(x, (0, 0))

    def no_conv(*args, **kwargs):
        raise AssertionError("a kernel that covers its input must not reach F.conv2d")

    monkeypatch.setattr(F, "conv2d", no_conv)
    y = mpo(x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    gx, *g_cores = torch.autograd.grad(y.square().sum(), [x, *mpo.cores])
    torch.testing.assert_close(gx, gx_ref, atol=1e-10, rtol=1e-10)
    # the cores' gradient is the dense kernel's gradient pulled back through W = merge(cores)
    g_via_w = torch.autograd.grad(mpo.weight_matrix(), list(mpo.cores), gw_ref.reshape(120, -1))
    for a, b in zip(g_cores, g_via_w):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    mpo.eval().materialize()
    with torch.no_grad():
        for _ in range(2):  # the second call takes the cached fast path
            torch.testing.assert_close(mpo(x), y_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(mpo(x[0]), y_ref[0], atol=1e-10, rtol=1e-10)  # an unbatched input


@pytest.mark.parametrize("conv, hw, covers", [
    (dict(kernel_size=5), (5, 5), True),
    (dict(kernel_size=(3, 5)), (3, 5), True),
    (dict(kernel_size=5), (6, 5), False),  # two positions
    (dict(kernel_size=5, padding=1), (3, 3), False),  # zero padding left to the conv
    (dict(kernel_size=3, dilation=2), (5, 5), False),  # dilated: one position, but it skips pixels
    (dict(kernel_size=3, stride=4), (3, 3), True),  # one position whatever the stride
])  # fmt: skip
def test_covers_input_only_when_the_kernel_sees_everything_once(conv, hw, covers):
    layer = MPOConv2d(2, 4, bond_dim=2, **conv)
    x = torch.randn(3, 2, *hw)
    xp, pad = layer._padded(x)
    assert layer.covers_input(xp, pad) is covers
    torch.testing.assert_close(layer(x), layer.to_dense()(x), **TOL)  # either way, the dense kernel's numbers


@pytest.mark.parametrize("rows, laid_out", [(1, True), (8, True), (9, False), (64, False)])
def test_merged_groups_are_laid_out_for_the_contraction_only_for_a_few_rows(rows, laid_out):
    from mpocompress.tensors import ContractionPlan

    torch.manual_seed(0)
    layer = MPOLinear(96, 60, bond_dim=4, in_modes=(2, 4, 3, 4), out_modes=(3, 2, 5, 2)).double().eval()
    plan = ContractionPlan((2, 2), ("bmm",))
    layer.pin_plan(rows, plan, keep=True)
    layer.materialize()
    x = torch.randn(rows, 96, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        first, last = layer.weight_cache.get((2, 2), stamp(layer._core_params()))
    torch.testing.assert_close(y, x @ layer.weight_matrix().detach().T + layer.bias.detach(), rtol=1e-10, atol=1e-10)
    for g in (first, last):  # memory (D_a, I, J, D_b) when laid out, else (D_a, J, I, D_b)
        assert g.transpose(1, 2).is_contiguous() is laid_out
        assert g.is_contiguous() is not laid_out


def test_materialized_layer_reuses_w_until_the_cores_change():
    torch.manual_seed(0)
    layer = MPOLinear(784, 256, bond_dim=16, in_modes=(4, 7, 7, 4), out_modes=(4, 4, 4, 4)).eval().materialize()
    x = torch.randn(64, 784)  # eval, 64 rows: the cached-W plan
    with torch.no_grad():
        y1 = layer(x)
        w_cached = layer._groups((4,), use_cache=True)[0]
        layer(x)
        assert layer._groups((4,), use_cache=True)[0] is w_cached  # reused, not rebuilt
    torch.testing.assert_close(y1, x @ layer.weight_matrix().detach().T + layer.bias.detach(), **TOL)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).square().mean().backward()  # a training step: no cache while gradients are needed
    opt.step()
    layer.eval()
    with torch.no_grad():
        y2 = layer(x)
        assert layer._groups((4,), use_cache=True)[0] is not w_cached  # the optimizer step changed the cores
    torch.testing.assert_close(y2, x @ layer.weight_matrix().detach().T + layer.bias.detach(), **TOL)
    layer.load_state_dict({k: v * 0.5 for k, v in layer.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight_matrix().T + layer.bias, **TOL)
    # new Parameter objects whose version counters equal the old ones (assign=True, or set by hand)
    for k in range(2):
        other = {n: v + 0.1 * v.std() * torch.randn_like(v) for n, v in layer.state_dict().items()}
        if k == 0:
            layer.load_state_dict(other, assign=True)
        else:
            for i in range(len(layer.cores)):
                layer.cores[i] = torch.nn.Parameter(other[f"cores.{i}"])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ layer.weight_matrix().T + layer.bias, **TOL)
    # vector_to_parameters gives the cores new storage: seen by the stamp
    vec = torch.nn.utils.parameters_to_vector(layer.parameters())
    torch.nn.utils.vector_to_parameters(vec * 1.5, layer.parameters())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight_matrix().T + layer.bias, **TOL)
    layer.release()
    with torch.no_grad():
        layer(x)
    assert len(layer.weight_cache) == 0
    clone = copy.deepcopy(layer.materialize())
    assert len(clone.weight_cache) == 0 and clone._plans == {}


@pytest.mark.parametrize("batch", [1, 64])
def test_writes_through_data_are_seen_when_not_materialized(batch):
    """The default keeps no cache: a write through .data (which bypasses version counters) and
    vector_to_parameters change the output at once, in eval and under no_grad."""
    torch.manual_seed(0)
    layer = MPOLinear(784, 256, bond_dim=4).eval()
    x = torch.randn(batch, 784)
    with torch.no_grad():
        layer(x)
        layer(x)
        layer.cores[0].data.mul_(2)
        torch.testing.assert_close(layer(x), x @ layer.weight_matrix().T + layer.bias, **TOL)
        vec = torch.nn.utils.parameters_to_vector(layer.parameters())
        torch.nn.utils.vector_to_parameters(vec * 0.5, layer.parameters())
        torch.testing.assert_close(layer(x), x @ layer.weight_matrix().T + layer.bias, **TOL)
    assert len(layer.weight_cache) == 0


def test_materialized_context_caches_only_inside_and_restores_the_state():
    from mpocompress.nn import materialized

    torch.manual_seed(0)
    model = torch.nn.Sequential(MPOLinear(64, 32, bond_dim=4), torch.nn.ReLU(), MPOLinear(32, 8, bond_dim=2)).eval()
    model[2].materialize()
    x = torch.randn(5, 64)
    with torch.no_grad(), materialized(model):
        y = model(x)
        assert len(model[0].weight_cache) > 0 and len(model[2].weight_cache) > 0
    assert not model[0].weight_cache.enabled and len(model[0].weight_cache) == 0  # back to the default
    assert model[2].weight_cache.enabled  # it was materialized before the block: it stays so
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)


def test_gradients_still_reach_the_cores_in_eval_mode():
    layer = MPOLinear(64, 32, bond_dim=4).eval().materialize()
    x = torch.randn(300, 64)
    with torch.no_grad():
        layer(x)  # fills the cache
    assert len(layer.weight_cache) > 0
    layer(x).sum().backward()  # grad enabled, cores require grad: the cache must not be used
    assert all(c.grad is not None and bool(c.grad.abs().sum() > 0) for c in layer.cores)


def test_grouped_convolutions_are_refused():
    with pytest.raises(MPOCompressError, match="groups=1"):
        MPOConv2d(4, 8, 3, bond_dim=2, groups=2)
    with pytest.raises(MPOCompressError, match="groups"):
        MPOConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=4), bond_dim=2)


def test_bad_modes_and_bonds_are_errors():
    with pytest.raises(MPOCompressError, match="try"):
        MPOLinear(784, 256, bond_dim=4, in_modes=(4, 7, 7))
    with pytest.raises(MPOCompressError):
        MPOLinear(784, 256, bond_dim=[4, 4])  # 4 cores need 3 bonds
    with pytest.raises(MPOCompressError):
        MPOLinear(784, 256, bond_dim=[4, 10_000, 4])  # above the cap


@pytest.mark.parametrize("make", [lambda: MPOLinear(120, 84, bond_dim=3), lambda: MPOConv2d(6, 16, (5, 3), bond_dim=3, stride=2, padding="valid", padding_mode="zeros")])
def test_spec_round_trip(make):
    layer = make()
    clone = layer_from_spec(layer.spec())
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 120) if isinstance(layer, MPOLinear) else torch.randn(2, 6, 12, 12)
    assert torch.equal(clone(x), layer(x))


def test_to_dense_round_trip_types():
    lin = MPOLinear(20, 6, bond_dim=2, bias=False)
    assert isinstance(lin.to_dense(), nn.Linear) and lin.to_dense().bias is None
    conv = MPOConv2d(3, 4, 3, bond_dim=2, padding=1)
    assert isinstance(conv.to_dense(), nn.Conv2d) and conv.to_dense().padding == (1, 1)


@pytest.mark.parametrize("grad", [True, False])
def test_an_empty_batch_gives_an_empty_output_as_the_dense_layers_do(grad):
    lin = MPOLinear(784, 256, bond_dim=4)
    conv = MPOConv2d(3, 8, 3, bond_dim=2, padding=1)
    with torch.set_grad_enabled(grad):
        y = lin(torch.randn(0, 784, requires_grad=grad))
        z = conv(torch.randn(0, 3, 8, 8))
    assert y.shape == torch.nn.Linear(784, 256)(torch.randn(0, 784)).shape == (0, 256)
    assert z.shape == (0, 8, 8, 8)
    if grad:
        y.sum().backward()  # the graph is intact: zero gradients reach the cores
        assert all(c.grad is not None and float(c.grad.abs().sum()) == 0.0 for c in lin.cores)
