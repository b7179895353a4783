"""The paper's networks and the architecture specs that name them.

An architecture spec is a string: a built-in name (`fc2`, `lenet5`, `vgg16`, `vgg19`, `resnet`,
`densenet`) or `package.module:callable`,
optionally followed by keyword arguments in parentheses: `lenet5(in_channels=3,image_size=32)`,
`mymodels:Net(width=64)`. Checkpoints store the spec; a `package.module:callable` spec is imported
only when the caller names it again (a file never makes mpocompress import code by itself).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.layers import MPOConv2d, MPOLinear
from mpocompress.shapes import factorize
from mpocompress.surgery import set_module

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_arch(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the built-in architectures."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn

    return deco


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


@register_arch("fc2")
def fc2(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, hidden: int = 256) -> nn.Module:
    return FC2(in_channels, image_size, num_classes, hidden)


@register_arch("lenet5")
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


@register_arch("vgg16")
def vgg16(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, batch_norm: bool = True,
          conv5_as_fc: bool = False) -> nn.Module:  # fmt: skip
    return VGG(_VGG16, in_channels, image_size, num_classes, batch_norm, ("conv5_1", "conv5_2") if conv5_as_fc else ())


@register_arch("vgg19")
def vgg19(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, batch_norm: bool = True,
          conv5_as_fc: bool = False) -> nn.Module:  # fmt: skip
    return VGG(_VGG19, in_channels, image_size, num_classes, batch_norm, ("conv5_3", "conv5_4") if conv5_as_fc else ())


@register_arch("resnet")
def resnet(m: int = 3, k: int = 1, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    return ResNet(m, k, in_channels, image_size, num_classes)


@register_arch("densenet")
def densenet(n: int = 16, m: int = 12, k: int = 12, in_channels: int = 3, image_size: int = 32,
             num_classes: int = 10) -> nn.Module:  # fmt: skip
    return DenseNet(n, m, k, in_channels, image_size, num_classes)


# --------------------------------------------------------------------------- MPO-Nets


@dataclass(frozen=True)
class MPOLayerPlan:
    """One layer of an MPO-Net: its name, modes (inputs I, outputs J), bond dimension, and whether
    a single --bond-dim D sets it (the D the paper varies) or it keeps the paper's value."""

    name: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    bond_dim: int
    varied: bool = True


def _modes(n_in: int, n_out: int, paper_in: tuple[int, ...], paper_out: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The paper's modes where they fit the layer; a balanced split with as many modes otherwise
    (other input sizes or class counts)."""
    i = paper_in if math.prod(paper_in) == n_in else factorize(n_in, len(paper_in))
    o = paper_out if math.prod(paper_out) == n_out else factorize(n_out, len(paper_out))
    return i, o


def _plan_fc2(kw: dict[str, Any]) -> list[MPOLayerPlan]:
    nx = kw.get("in_channels", 1) * kw.get("image_size", 28) ** 2
    hidden, classes = kw.get("hidden", 256), kw.get("num_classes", 10)
    return [
        MPOLayerPlan("fc1", *_modes(nx, hidden, (4, 7, 7, 4), (4, 4, 4, 4)), 16),  # M^{4,4,4,4}_{4,7,7,4}(D)
        MPOLayerPlan("fc2", *_modes(hidden, classes, (4, 4, 4, 4), (1, 1, 10, 1)), 4, varied=False),
    ]


def _plan_lenet5(kw: dict[str, Any]) -> list[MPOLayerPlan]:
    classes = kw.get("num_classes", 10)
    return [
        MPOLayerPlan("conv3", (2, 10, 10, 2), (2, 5, 6, 2), 4),  # Sec. III A 2
        MPOLayerPlan("fc1", (2, 5, 6, 2), (2, 3, 7, 2), 4),
        MPOLayerPlan("fc2", *_modes(84, classes, (2, 3, 7, 2), (1, 5, 2, 1)), 2),
    ]


def _plan_vgg(convs: tuple[str, str]) -> Callable[[dict[str, Any]], list[MPOLayerPlan]]:
    def plan(kw: dict[str, Any]) -> list[MPOLayerPlan]:
        classes = kw.get("num_classes", 10)
        return [
            MPOLayerPlan(f"features.{convs[0]}.linear", (2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4),  # Sec. III B 1
            MPOLayerPlan(f"features.{convs[1]}.linear", (2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4),
            MPOLayerPlan("fc1", (4, 4, 4, 4, 2), (4, 4, 8, 8, 4), 4),
            MPOLayerPlan("fc2", (4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 4),
            MPOLayerPlan("fc3", *_modes(4096, classes, (4, 4, 8, 8, 4), (1, 10, 1, 1, 1)), 4),
        ]

    return plan


def _plan_resnet(kw: dict[str, Any]) -> list[MPOLayerPlan]:
    k, classes = kw.get("k", 1), kw.get("num_classes", 10)
    return [MPOLayerPlan("fc", *_modes(64 * k, classes, (4, 4, 4, k), (1, 5, 2, 1)), 3)]  # M^{1,5,2,1}_{4,4,4,k}(3)


_DENSENET_FC = {448: (4, 4, 7, 4), 880: (4, 5, 11, 4), 1176: (4, 7, 7, 6), 2400: (5, 8, 12, 5)}  # main text, Table II


def _plan_densenet(kw: dict[str, Any]) -> list[MPOLayerPlan]:
    n, m, k, classes = kw.get("n", 16), kw.get("m", 12), kw.get("k", 12), kw.get("num_classes", 10)
    width = n + 3 * k * m
    paper_in = _DENSENET_FC.get(width, factorize(width, 4))
    return [MPOLayerPlan("fc", *_modes(width, classes, paper_in, (1, 5, 2, 1)), 4)]


MPO_NETS: dict[str, Callable[[dict[str, Any]], list[MPOLayerPlan]]] = {
    "fc2": _plan_fc2,
    "lenet5": _plan_lenet5,
    "vgg16": _plan_vgg(("conv5_1", "conv5_2")),
    "vgg19": _plan_vgg(("conv5_3", "conv5_4")),
    "resnet": _plan_resnet,
    "densenet": _plan_densenet,
}
_NEEDS_ARGS = {"vgg16": {"conv5_as_fc": True}, "vgg19": {"conv5_as_fc": True}}


def build_mpo_net(
    arch: ArchSpec | str, bond_dim: int | None = None, bond_dims: Mapping[str, int] | None = None
) -> tuple[nn.Module, str, list[MPOLayerPlan]]:
    """The paper's MPO-Net counterpart of a built-in architecture, randomly initialised.

    Args:
        arch: a built-in architecture spec (fc2, lenet5, vgg16, vgg19, resnet, densenet, with arguments).
        bond_dim: the D the paper varies (FC2: the first layer's; the others: every MPO layer's);
            layers it does not set keep the paper's bond dimension.
        bond_dims: D for single layers, by name (overrides `bond_dim`).

    Returns:
        The model, the architecture spec of its dense skeleton (what a checkpoint records), and the
        MPO layers placed in it.
    """
    spec = parse_arch(arch) if isinstance(arch, str) else arch
    if spec.target not in MPO_NETS:
        raise MPOCompressError(
            f"--mpo knows the paper's MPO-Nets of {', '.join(MPO_NETS)}, not {spec.target!r}; "
            "for another model train it dense and use `mpocompress convert`"
        )
    spec = ArchSpec(spec.target, {**spec.kwargs, **_NEEDS_ARGS.get(spec.target, {})})
    model = build_model(spec)
    kwargs = {**_defaults(ARCHITECTURES[spec.target]), **spec.kwargs}
    plans = MPO_NETS[spec.target](kwargs)
    known = {p.name for p in plans}
    for name in bond_dims or {}:
        if name not in known:
            raise MPOCompressError(f"--bond-dim {name}=...: {spec.target} has no MPO layer {name!r}; its MPO layers are {', '.join(sorted(known))}")
    out = []
    for p in plans:
        d = (bond_dims or {}).get(p.name, bond_dim if (bond_dim is not None and p.varied) else p.bond_dim)
        if not isinstance(d, int) or d < 1:
            raise MPOCompressError(f"bond dimension of {p.name} must be a whole number >= 1, got {d!r}")
        p = MPOLayerPlan(p.name, p.in_modes, p.out_modes, d, p.varied)
        _replace(model, p)
        out.append(p)
    return model, str(spec), out


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not inspect.Parameter.empty}


def _replace(model: nn.Module, p: MPOLayerPlan) -> None:
    old = model.get_submodule(p.name)
    if isinstance(old, nn.Linear):
        new: nn.Module = MPOLinear(old.in_features, old.out_features, p.bond_dim, p.in_modes, p.out_modes,
                                   bias=old.bias is not None)  # fmt: skip
    elif isinstance(old, nn.Conv2d):
        new = MPOConv2d(old.in_channels, old.out_channels, old.kernel_size, p.bond_dim, stride=old.stride,
                        padding=old.padding, dilation=old.dilation, bias=old.bias is not None,
                        padding_mode=old.padding_mode, in_modes=p.in_modes, out_modes=p.out_modes)  # fmt: skip
    else:  # pragma: no cover - the plans name Linear and Conv2d layers only
        raise MPOCompressError(f"cannot place an MPO at {p.name} ({type(old).__name__})")
    set_module(model, p.name, new)


def arch_accepts(arch: ArchSpec | str) -> set[str]:
    """Keyword arguments a built-in architecture takes (empty for user architectures)."""
    spec = parse_arch(arch) if isinstance(arch, str) else arch
    if not spec.is_builtin or spec.target not in ARCHITECTURES:
        return set()
    return set(inspect.signature(ARCHITECTURES[spec.target]).parameters)


# --------------------------------------------------------------------------- specs

_SPEC = re.compile(r"^\s*(?P<target>[A-Za-z_][\w.]*(?::[A-Za-z_][\w.]*)?)\s*(?:\((?P<args>.*)\))?\s*$", re.S)


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture spec: a built-in name or 'package.module:callable', plus kwargs."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_builtin(self) -> bool:
        return ":" not in self.target

    def __str__(self) -> str:
        if not self.kwargs:
            return self.target
        args = ",".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.target}({args})"


def parse_arch(text: str) -> ArchSpec:
    """Parse 'lenet5', 'lenet5(in_channels=3)' or 'pkg.mod:make(width=64)'."""
    m = _SPEC.match(text or "")
    if not m:
        raise MPOCompressError(
            f"cannot read architecture {text!r}: use a built-in name ({', '.join(sorted(ARCHITECTURES))}) "
            "or package.module:callable, optionally with keyword arguments like lenet5(in_channels=3)"
        )
    kwargs: dict[str, Any] = {}
    if m.group("args") and m.group("args").strip():
        try:
            call = ast.parse(f"f({m.group('args')})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
            if len(kwargs) != len(call.keywords):
                raise ValueError
        except (SyntaxError, ValueError, AssertionError):
            raise MPOCompressError(
                f"cannot read the arguments of architecture {text!r}: give keyword arguments with literal "
                "values, like lenet5(in_channels=3,image_size=32)"
            ) from None
    return ArchSpec(m.group("target"), kwargs)


def build_model(spec: ArchSpec | str) -> nn.Module:
    """Instantiate an architecture. A 'package.module:callable' target is imported from the current
    working directory or the installed packages."""
    spec = parse_arch(spec) if isinstance(spec, str) else spec
    if spec.is_builtin:
        if spec.target not in ARCHITECTURES:
            raise MPOCompressError(
                f"unknown architecture {spec.target!r}: built-in ones are {', '.join(sorted(ARCHITECTURES))}; "
                "for your own model pass package.module:callable"
            )
        fn = ARCHITECTURES[spec.target]
    else:
        fn = _import_callable(spec.target)
    try:
        model = fn(**spec.kwargs)
    except MPOCompressError:
        raise
    except TypeError as e:
        raise MPOCompressError(f"cannot build architecture {spec}: {e}") from None
    if not isinstance(model, nn.Module):
        raise MPOCompressError(f"architecture {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_callable(target: str) -> Callable[..., nn.Module]:
    module_name, _, attr = target.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MPOCompressError(
            f"cannot import {module_name!r} for architecture {target!r} ({e}); run from the folder that "
            "holds it or install its package"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MPOCompressError(f"module {module_name!r} has no attribute {attr!r} (architecture {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MPOCompressError(f"architecture {target!r} is not callable")
    return obj


def adapt_arch(arch: ArchSpec | str, image_shape: tuple[int, int, int], num_classes: int) -> ArchSpec:
    """Fill in a built-in architecture's in_channels, image_size and num_classes from the data,
    where the spec does not set them: `fc2` on CIFAR-10 becomes fc2(in_channels=3,image_size=32)."""
    spec = parse_arch(arch) if isinstance(arch, str) else arch
    accepted = arch_accepts(spec)
    if not accepted:
        return spec
    c, h, w = image_shape
    if h == 1 and "in_channels" in accepted and "image_size" in accepted:  # flat vectors: (1, 1, F)
        c, h, w = w * c, 1, 1
    fill: dict[str, Any] = {}
    if h == w:
        fill.update(in_channels=c, image_size=h)
    fill["num_classes"] = num_classes
    defaults = _defaults(ARCHITECTURES[spec.target])
    kwargs = dict(spec.kwargs)
    for k, v in fill.items():
        if k in accepted and k not in kwargs and defaults.get(k) != v:
            kwargs[k] = v
    return ArchSpec(spec.target, kwargs)


def default_input_shape(arch: str | None) -> tuple[int, ...] | None:
    """One sample's input shape for a built-in architecture spec: (C, H, W) from its
    in_channels and image_size; None for a user architecture."""
    if not arch:
        return None
    try:
        spec = parse_arch(arch)
    except MPOCompressError:
        return None
    if spec.target not in ARCHITECTURES:
        return None
    kw = {**_defaults(ARCHITECTURES[spec.target]), **spec.kwargs}
    if "in_channels" not in kw or "image_size" not in kw:
        return None
    return (int(kw["in_channels"]), int(kw["image_size"]), int(kw["image_size"]))
