import pytest
import torch

from mpocompress.errors import MPOCompressError
from mpocompress.zoo import build_model, parse_arch


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
