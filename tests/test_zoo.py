import pytest
import torch

from mpocompress.errors import MPOCompressError
from mpocompress.models import build_model, parse_arch


def _weights(model):
    return {n: m.weight.numel() for n, m in model.named_modules() if hasattr(m, "weight") and m.weight is not None}


def test_fc2_is_table_ii():
    m = build_model("fc2")
    assert _weights(m) == {"fc1": 200704, "fc2": 2560}
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 32), (3, 28)])
def test_lenet5_is_table_iii(channels, size):
    m = build_model(f"lenet5(in_channels={channels},image_size={size})")
    w = _weights(m)
    assert w == {"conv1": 150 * channels, "conv2": 2400, "conv3": 48000, "fc1": 10080, "fc2": 840}
    assert m.conv2.padding == (0, 0) and m.conv3.padding == (0, 0)  # "np": no padding
    assert m(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_parse_arch():
    spec = parse_arch("lenet5(in_channels=3, image_size=32)")
    assert spec.target == "lenet5" and spec.kwargs == {"in_channels": 3, "image_size": 32} and spec.is_builtin
    assert str(spec) == "lenet5(in_channels=3,image_size=32)"
    user = parse_arch("my.models:make_net(width=64)")
    assert not user.is_builtin and user.kwargs == {"width": 64}


@pytest.mark.parametrize("text", ["", "lenet5(", "lenet5(3)", "lenet5(x=os.system('true'))", "a b", "pkg:"])
def test_bad_arch_specs(text):
    with pytest.raises(MPOCompressError):
        parse_arch(text)


def test_unknown_and_bad_archs():
    with pytest.raises(MPOCompressError, match="unknown architecture"):
        build_model("resnet9000")
    with pytest.raises(MPOCompressError, match="cannot build"):
        build_model("fc2(depth=3)")
    with pytest.raises(MPOCompressError, match="cannot import"):
        build_model("no_such_module_xyz:net")


def test_user_arch_imports_from_working_directory(tmp_path, monkeypatch):
    (tmp_path / "user_nets_zoo.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(width=8):\n    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 2))\n"
        "NOT_A_MODEL = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "user_nets_zoo", raising=False)
    m = build_model("user_nets_zoo:tiny(width=12)")
    assert m[1].out_features == 12
    with pytest.raises(MPOCompressError, match="no attribute"):
        build_model("user_nets_zoo:missing")
    with pytest.raises(MPOCompressError, match="not callable"):
        build_model("user_nets_zoo:NOT_A_MODEL")


# ----------------------------------------------------------------------------- deeper networks (Tables IV-VII)

from torch import nn  # noqa: E402

from mpocompress.nn import MPOConv2d, MPOLinear  # noqa: E402
from mpocompress.compress import summarize  # noqa: E402
from mpocompress.models import adapt_arch, build_mpo_net  # noqa: E402


def _linear_weights(model):
    """Weights of the convolutions and fully connected layers: what Tables IV-VII and XI count."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_vgg16_units_are_table_iv():
    m = build_model("vgg16")
    f = m.features
    unit = lambda u: sum(c.weight.numel() for n, c in f.named_children() if n.startswith(f"conv{u}_"))  # noqa: E731
    # Table IV: units 1-3 (with the 1x1 conv of unit 3 listed apart), 5 and 7 (with their 1x1 convs)
    assert unit(1) == 38592 and unit(2) == 221184 and unit(3) == 884736 + 65536
    assert unit(4) == 3538944 + 262144 and unit(5) == 4718592 + 262144
    assert [m.fc1.weight.numel(), m.fc2.weight.numel(), m.fc3.weight.numel()] == [2097152, 16777216, 40960]
    assert sum(isinstance(c, nn.Conv2d) for c in f) == 13  # 13 convolutions + 3 FC = 16 layers


def test_vgg19_matches_table_xi_parameter_count():
    m = build_model("vgg19")
    assert _linear_weights(m) == 38_934_208  # Table XI: VGG-19 has 38,934,208 parameters
    assert sum(isinstance(c, nn.Conv2d) for c in m.features) == 16


def test_densenet_matches_tables_vii_and_xi():
    n, mm, k = 16, 12, 12
    m = build_model(f"densenet(n={n},m={mm},k={k})")
    assert _linear_weights(m) == 1_001_616  # Table XI: DenseNet (n=16, k=m=12)
    assert m.fc.in_features == n + 3 * k * mm
    # Table VII, per row
    first_unit = sum(layer.conv.weight.numel() for layer in list(m.blocks)[:mm])
    assert first_unit == 9 * k * mm * (n + k * (mm - 1) / 2)


@pytest.mark.parametrize("mm, k", [(1, 1), (2, 2), (3, 4)])
def test_resnet_is_table_vi(mm, k):
    m = build_model(f"resnet(m={mm},k={k})")
    convs = [c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) + 1 == 6 * mm + 2  # depth L = 6m + 2
    per_unit = [u.conv1.weight.numel() + u.conv2.weight.numel() for u in m.units]
    assert convs[0] == 432
    assert sum(per_unit[:mm]) == 2304 * k * ((2 * mm - 1) * k + 1)  # first ResBlock
    # the stride-2 ResUnits hold 9*16k*32k + 9*32k*32k = 13824 k^2 and 55296 k^2 weights (Table VI
    # prints k, not k^2; Table XI's 26,646,448 for k=4, m=18 follows that misprint)
    assert per_unit[mm] == 13824 * k * k and per_unit[2 * mm] == 55296 * k * k
    assert sum(per_unit[mm + 1:2 * mm]) == 18432 * k * k * (mm - 1)
    assert sum(per_unit[2 * mm + 1:]) == 73728 * k * k * (mm - 1)
    assert m.fc.weight.numel() == 640 * k


@pytest.mark.parametrize("arch", ["fc2", "lenet5", "vgg16", "vgg19", "resnet(m=1,k=2)", "densenet(n=4,m=2,k=3)"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_network_takes_1_or_3_channels_of_28_or_32_pixels(arch, channels, size):
    spec = adapt_arch(arch, (channels, size, size), 10)
    x = torch.randn(2, channels, size, size)
    assert build_model(spec).eval()(x).shape == (2, 10)
    assert build_mpo_net(spec)[0].eval()(x).shape == (2, 10)


def test_mpo_fc2_is_the_papers():
    m, arch, plans = build_mpo_net("fc2", bond_dim=16)
    assert arch == "fc2"
    assert m.fc1.notation() == "M^{4,4,4,4}_{4,7,7,4}(D=16)" and m.fc2.notation() == "M^{1,1,10,1}_{4,4,4,4}(D=4)"
    s = summarize(m)
    assert s["params_mpo"] == 15584 and s["rho"] < 0.08
    m2, _, _ = build_mpo_net("fc2", bond_dim=2)
    assert summarize(m2)["params_mpo"] == 1024  # "only 1024 parameters" (Sec. III A 1)
    m3, _, _ = build_mpo_net("fc2", bond_dim=2, bond_dims={"fc2": 3})
    assert m3.fc2.bond_dims == [3, 3, 3]


def test_mpo_lenet5_vgg_resnet_densenet_are_the_papers():
    lenet, _, _ = build_mpo_net("lenet5")
    assert isinstance(lenet.conv3, MPOConv2d) and lenet.conv3.notation() == "M^{2,5,6,2}_{2,10,10,2}(D=4)"
    assert lenet.fc1.notation() == "M^{2,3,7,2}_{2,5,6,2}(D=4)" and lenet.fc2.notation() == "M^{1,5,2,1}_{2,3,7,2}(D=2)"
    assert round(summarize(lenet)["rho"], 2) == 0.05  # Sec. III A 2: rho ~ 0.05
    vgg, arch, plans = build_mpo_net("vgg16")
    assert arch == "vgg16(conv5_as_fc=True)" and len(plans) == 5
    assert vgg.features.conv5_1.linear.notation() == "M^{2,8,8,8,2}_{2,8,8,8,2}(D=4)"
    assert vgg.fc1.notation() == "M^{4,4,8,8,4}_{4,4,4,4,2}(D=4)" and vgg.fc3.notation() == "M^{1,10,1,1,1}_{4,4,8,8,4}(D=4)"
    s = summarize(vgg)
    dense = build_model("vgg16")
    replaced = 2 * dense.features.conv5_1.weight.numel() + sum(getattr(dense, f).weight.numel() for f in ("fc1", "fc2", "fc3"))
    assert round(s["params_mpo"] / replaced, 4) == 0.0005  # Table I: rho ~ 0.0005 against dense VGG-16's layers
    res, _, _ = build_mpo_net("resnet(m=1,k=4)")
    assert res.fc.notation() == "M^{1,5,2,1}_{4,4,4,4}(D=3)" and round(summarize(res)["rho"], 2) == 0.11  # Fig. 3
    for (n, mm, k), rho in {(16, 12, 12): 0.129, (16, 12, 24): 0.089, (24, 32, 12): 0.070, (96, 32, 24): 0.044}.items():
        dn, _, _ = build_mpo_net(f"densenet(n={n},m={mm},k={k})")
        assert round(summarize(dn)["rho"], 3) == rho  # main text, Table II


def test_mpo_net_bond_dim_rules():
    lenet, _, _ = build_mpo_net("lenet5", bond_dim=6)  # networks other than FC2: D sets every MPO layer
    assert [lenet.conv3.bond_dims[1], lenet.fc1.bond_dims[1], lenet.fc2.bond_dims[1]] == [6, 6, 6]
    with pytest.raises(MPOCompressError, match="has no MPO layer 'fc9'"):
        build_mpo_net("fc2", bond_dims={"fc9": 2})
    with pytest.raises(MPOCompressError, match="--mpo knows"):
        build_mpo_net("mymod:Net")
    assert isinstance(build_mpo_net("fc2(in_channels=3,image_size=32)")[0].fc1, MPOLinear)  # other sizes: balanced modes


def test_adapt_arch_fills_only_what_the_spec_leaves_open():
    assert str(adapt_arch("fc2", (1, 28, 28), 10)) == "fc2"
    assert str(adapt_arch("lenet5", (3, 32, 32), 10)) == "lenet5(in_channels=3,image_size=32)"
    assert str(adapt_arch("vgg16(in_channels=3)", (1, 28, 28), 10)) == "vgg16(in_channels=3,image_size=28)"
    assert str(adapt_arch("fc2", (1, 1, 64), 3)) == "fc2(in_channels=64,image_size=1,num_classes=3)"
    assert str(adapt_arch("pkg.mod:Net", (3, 32, 32), 10)) == "pkg.mod:Net"
