"""MPO layers against their dense counterparts, on both forward paths."""

import pytest
import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.layers import MPOConv2d, MPOLinear, layer_from_spec

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


def test_strategy_choice_follows_the_cost_model():
    small = MPOLinear(784, 256, bond_dim=16)
    assert small.strategy_for(1) == "contract"  # rebuilding W costs more than one vector's contraction
    assert small.strategy_for(8192) == "dense"  # large batches amortise the rebuild
    wide = MPOLinear(4096, 4096, bond_dim=4)
    assert wide.strategy_for(64) == "contract"
    small.set_forward_strategy("dense")
    assert small.strategy_for(1) == "dense"
    with pytest.raises(MPOCompressError):
        small.set_forward_strategy("fastest")


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
