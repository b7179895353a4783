"""The paper's networks (supplement Tables II-VII) and their MPO-Nets (Sec. III), registered as
built-in architectures."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.models.mpo_nets import paper_modes
from mpocompress.models.registry import MPONetLayer, register_arch
from mpocompress.tensors import factorize

# --------------------------------------------------------------------------- networks


class FC2(nn.Module):
    """Supplement Table II: flatten, FC 784 -> 256, ReLU, FC 256 -> 10 (softmax lives in the loss)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.fc1(x.flatten(1)).relu())


class LeNet5(nn.Module):
    """Supplement Table III: conv 5x5x6 (size kept), max-pool, conv 5x5x16 and 5x5x120 without
    padding, FC 120 -> 84 -> 10, ReLU between layers. For 32-pixel inputs conv 1 takes no padding,
    as in the original LeNet-5, so every later shape is the same."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        if image_size not in (28, 32):
            raise MPOCompressError(f"lenet5 takes 28- or 32-pixel images, got image_size={image_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=(32 - image_size) // 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x):
        x = self.pool(self.conv1(x).relu())  # (B, 6, 14, 14)
        x = self.pool(self.conv2(x).relu())  # (B, 16, 5, 5)
        x = self.conv3(x).relu().flatten(1)  # (B, 120)
        return self.fc2(self.fc1(x).relu())


def fc2(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, hidden: int = 256) -> nn.Module:
    return FC2(in_channels, image_size, num_classes, hidden)


def lenet5(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    return LeNet5(in_channels, image_size, num_classes)


class VGG(nn.Module):
    """Supplement Tables IV (VGG-16) and V (VGG-19): ConvUnits of 3x3 (and, in VGG-16, 1x1)
    convolutions, max-pooling to a 2x2x512 map then to 512, and FC 512 -> 4096 -> 4096 -> classes.

    Each convolution is followed by batch normalization (as in the paper's code; the tables show only
    the ReLU) and ReLU. For 28-pixel inputs the first convolution pads by 3, so every later map has
    the size it has for 32-pixel inputs. With `conv5_as_fc`, the last two 3x3 convolutions, which see
    a 2x2 map, become fully connected maps of the whole 2x2x512 feature map (2048 -> 2048), the form
    the paper's MPO-Net gives them.
    """

    def __init__(self, config: list, in_channels: int = 1, image_size: int = 32, num_classes: int = 10,
                 batch_norm: bool = True, conv5_as_fc: tuple[str, ...] = ()):  # fmt: skip
        super().__init__()
        if image_size not in (28, 32):
            raise MPOCompressError(f"vgg takes 28- or 32-pixel images, got image_size={image_size}")
        layers: dict[str, nn.Module] = {}
        c, size, unit, idx = in_channels, 32, 1, 1
        for item in config:
            if item == "M":
                layers[f"pool{unit}"] = nn.MaxPool2d(2, 2)
                unit, idx, size = unit + 1, 1, size // 2
                continue
            width, k = item
            name = f"conv{unit}_{idx}"
            if name in conv5_as_fc:
                layers[name] = MapLinear(c, width, size)
            else:
                pad = (k // 2 + (2 if (unit, idx) == (1, 1) and image_size == 28 else 0)) if k > 1 else 0
                layers[name] = nn.Conv2d(c, width, k, padding=pad, bias=not batch_norm)
            if batch_norm:
                layers[f"bn{unit}_{idx}"] = nn.BatchNorm2d(width)
            layers[f"relu{unit}_{idx}"] = nn.ReLU(inplace=True)
            c, idx = width, idx + 1
        self.features = nn.Sequential(OrderedDict(layers))
        self.fc1 = nn.Linear(512, 4096)
        self.fc2 = nn.Linear(4096, 4096)
        self.fc3 = nn.Linear(4096, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)  # (B, 512)
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())


class MapLinear(nn.Module):
    """A fully connected map of a whole (C, H, W) feature map to a (C_out, H, W) one: the input is
    flattened in (H, W, C) order, multiplied by `linear` (C*H*W -> C_out*H*W) and reshaped back."""

    def __init__(self, in_channels: int, out_channels: int, size: int):
        super().__init__()
        self.out_channels, self.size = out_channels, size
        self.linear = nn.Linear(in_channels * size * size, out_channels * size * size, bias=False)

    def forward(self, x):
        b = x.shape[0]
        y = self.linear(x.permute(0, 2, 3, 1).reshape(b, -1))  # (B, H W C_out)
        return y.reshape(b, self.size, self.size, self.out_channels).permute(0, 3, 1, 2)


_VGG16 = [(64, 3), (64, 3), "M", (128, 3), (128, 3), "M", (256, 3), (256, 3), (256, 1), "M",
          (512, 3), (512, 3), (512, 1), "M", (512, 3), (512, 3), (512, 1), "M"]  # fmt: skip
_VGG19 = [(64, 3), (64, 3), "M", (128, 3), (128, 3), "M", *[(256, 3)] * 4, "M", *[(512, 3)] * 4, "M",
          *[(512, 3)] * 4, "M"]  # fmt: skip


class ResUnit(nn.Module):
    """Two 3x3 convolutions separated by BN and ReLU, plus an identity shortcut; when the unit
    changes width or strides, the shortcut subsamples and zero-pads channels (no parameters, so
    the parameter counts are those of Table VI)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x):
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            short = F.pad(short, (0, 0, 0, 0, 0, self.extra))
        return (out + short).relu()


class ResNet(nn.Module):
    """Supplement Table VI: depth 6m + 2, width k. Conv 3x3x16, three ResBlocks of m ResUnits at
    widths 16k, 32k, 64k (the 2nd and 3rd start with stride 2), global average pooling, FC 64k -> classes."""

    def __init__(self, m: int = 3, k: int = 1, in_channels: int = 1, image_size: int = 32, num_classes: int = 10):
        super().__init__()
        if m < 1 or k < 1:
            raise MPOCompressError(f"resnet needs m >= 1 and k >= 1, got m={m}, k={k}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        units, c = [], 16
        for stage, width in enumerate((16 * k, 32 * k, 64 * k)):
            for i in range(m):
                units.append(ResUnit(c, width, 2 if (stage > 0 and i == 0) else 1))
                c = width
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(64 * k, num_classes)

    def forward(self, x):
        x = self.units(self.bn1(self.conv1(x)).relu())
        return self.fc(x.mean((2, 3)))


class DenseNet(nn.Module):
    """Supplement Table VII: depth 3m + 4. Conv 3x3xn, three DenseUnits of m BN-ReLU-conv 3x3xk
    layers each concatenated to its input, separated by BN-ReLU-conv 1x1 (width kept) and 2x2
    average pooling, then BN-ReLU, global average pooling and FC (n + 3km) -> classes."""

    def __init__(self, n: int = 16, m: int = 12, k: int = 12, in_channels: int = 1, image_size: int = 32,
                 num_classes: int = 10):  # fmt: skip
        super().__init__()
        if n < 1 or m < 1 or k < 1:
            raise MPOCompressError(f"densenet needs n, m, k >= 1, got n={n}, m={m}, k={k}")
        self.conv1 = nn.Conv2d(in_channels, n, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c = n
        for b in range(3):
            for _ in range(m):
                blocks.append(_DenseLayer(c, k))
                c += k
            if b < 2:
                blocks.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), nn.AvgPool2d(2)))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.bn(self.blocks(self.conv1(x))).relu()
        return self.fc(x.mean((2, 3)))


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(self.bn(x).relu())], 1)


def vgg16(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, batch_norm: bool = True,
          conv5_as_fc: bool = False) -> nn.Module:  # fmt: skip
    return VGG(_VGG16, in_channels, image_size, num_classes, batch_norm, ("conv5_1", "conv5_2") if conv5_as_fc else ())


def vgg19(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, batch_norm: bool = True,
          conv5_as_fc: bool = False) -> nn.Module:  # fmt: skip
    return VGG(_VGG19, in_channels, image_size, num_classes, batch_norm, ("conv5_3", "conv5_4") if conv5_as_fc else ())


def resnet(m: int = 3, k: int = 1, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    return ResNet(m, k, in_channels, image_size, num_classes)


def densenet(n: int = 16, m: int = 12, k: int = 12, in_channels: int = 3, image_size: int = 32,
             num_classes: int = 10) -> nn.Module:  # fmt: skip
    return DenseNet(n, m, k, in_channels, image_size, num_classes)


# --------------------------------------------------------------------------- MPO-Nets


def _mpo_net_fc2(kw: dict[str, Any]) -> list[MPONetLayer]:
    nx = kw.get("in_channels", 1) * kw.get("image_size", 28) ** 2
    hidden, classes = kw.get("hidden", 256), kw.get("num_classes", 10)
    return [
        MPONetLayer("fc1", *paper_modes(nx, hidden, (4, 7, 7, 4), (4, 4, 4, 4)), 16),  # M^{4,4,4,4}_{4,7,7,4}(D)
        MPONetLayer("fc2", *paper_modes(hidden, classes, (4, 4, 4, 4), (1, 1, 10, 1)), 4, varied=False),
    ]


def _mpo_net_lenet5(kw: dict[str, Any]) -> list[MPONetLayer]:
    classes = kw.get("num_classes", 10)
    return [
        MPONetLayer("conv3", (2, 10, 10, 2), (2, 5, 6, 2), 4),  # Sec. III A 2
        MPONetLayer("fc1", (2, 5, 6, 2), (2, 3, 7, 2), 4),
        MPONetLayer("fc2", *paper_modes(84, classes, (2, 3, 7, 2), (1, 5, 2, 1)), 2),
    ]


def _mpo_net_vgg(convs: tuple[str, str]) -> Callable[[dict[str, Any]], list[MPONetLayer]]:
    def layers(kw: dict[str, Any]) -> list[MPONetLayer]:
        classes = kw.get("num_classes", 10)
        return [
            MPONetLayer(f"features.{convs[0]}.linear", (2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4),  # Sec. III B 1
            MPONetLayer(f"features.{convs[1]}.linear", (2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4),
            MPONetLayer("fc1", (4, 4, 4, 4, 2), (4, 4, 8, 8, 4), 4),
            MPONetLayer("fc2", (4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 4),
            MPONetLayer("fc3", *paper_modes(4096, classes, (4, 4, 8, 8, 4), (1, 10, 1, 1, 1)), 4),
        ]

    return layers


def _mpo_net_resnet(kw: dict[str, Any]) -> list[MPONetLayer]:
    k, classes = kw.get("k", 1), kw.get("num_classes", 10)
    return [MPONetLayer("fc", *paper_modes(64 * k, classes, (4, 4, 4, k), (1, 5, 2, 1)), 3)]  # M^{1,5,2,1}_{4,4,4,k}(3)


_DENSENET_FC = {448: (4, 4, 7, 4), 880: (4, 5, 11, 4), 1176: (4, 7, 7, 6), 2400: (5, 8, 12, 5)}  # main text, Table II


def _mpo_net_densenet(kw: dict[str, Any]) -> list[MPONetLayer]:
    n, m, k, classes = kw.get("n", 16), kw.get("m", 12), kw.get("k", 12), kw.get("num_classes", 10)
    width = n + 3 * k * m
    paper_in = _DENSENET_FC.get(width, factorize(width, 4))
    return [MPONetLayer("fc", *paper_modes(width, classes, paper_in, (1, 5, 2, 1)), 4)]


# --------------------------------------------------------------------------- registration

register_arch("fc2", mpo_net=_mpo_net_fc2)(fc2)
register_arch("lenet5", mpo_net=_mpo_net_lenet5)(lenet5)
register_arch("vgg16", mpo_net=_mpo_net_vgg(("conv5_1", "conv5_2")), mpo_net_args={"conv5_as_fc": True})(vgg16)
register_arch("vgg19", mpo_net=_mpo_net_vgg(("conv5_3", "conv5_4")), mpo_net_args={"conv5_as_fc": True})(vgg19)
register_arch("resnet", mpo_net=_mpo_net_resnet)(resnet)
register_arch("densenet", mpo_net=_mpo_net_densenet)(densenet)
