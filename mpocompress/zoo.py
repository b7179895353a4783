"""The paper's networks and the architecture specs that name them.

An architecture spec is a string: a built-in name (`fc2`, `lenet5`) or `package.module:callable`,
optionally followed by keyword arguments in parentheses: `lenet5(in_channels=3,image_size=32)`,
`mymodels:Net(width=64)`. Checkpoints store the spec; a `package.module:callable` spec is imported
only when the caller names it again (a file never makes mpocompress import code by itself).
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mpocompress.errors import MPOCompressError

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
