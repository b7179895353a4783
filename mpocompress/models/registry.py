"""The architecture registry: every built-in network with its paper MPO-Net attached, and the
architecture specs that name them.

An architecture spec is a string: a built-in name (`fc2`, `lenet5`, `vgg16`, `vgg19`, `resnet`,
`densenet`) or `package.module:callable`, optionally followed by keyword arguments in parentheses:
`lenet5(in_channels=3,image_size=32)`, `mymodels:Net(width=64)`. Checkpoints store the spec; a
`package.module:callable` spec is imported only when the caller names it again (a file never makes
mpocompress import code by itself).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.utils import cwd_on_path, short_error


@dataclass(frozen=True)
class MPONetLayer:
    """One layer of an MPO-Net: its name, modes (inputs I, outputs J), bond dimension, and whether
    a single --bond-dim D sets it (the D the paper varies) or it keeps the paper's value."""

    name: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    bond_dim: int
    varied: bool = True


@dataclass(frozen=True)
class Architecture:
    """A built-in architecture: its constructor and, when the paper gives one, its MPO-Net, i.e. the
    layers written as MPOs (`mpo_net(kwargs)`) in the dense skeleton built with `mpo_net_args` added."""

    name: str
    fn: Callable[..., nn.Module]
    mpo_net: Callable[[dict[str, Any]], list[MPONetLayer]] | None = None
    mpo_net_args: dict[str, Any] = field(default_factory=dict)

    def __call__(self, **kwargs: Any) -> nn.Module:
        return self.fn(**kwargs)

    @property
    def defaults(self) -> dict[str, Any]:
        params = inspect.signature(self.fn).parameters.items()
        return {k: v.default for k, v in params if v.default is not inspect.Parameter.empty}

    @property
    def accepts(self) -> set[str]:
        return set(inspect.signature(self.fn).parameters)


ARCHITECTURES: dict[str, Architecture] = {}


def register_arch(
    name: str,
    mpo_net: Callable[[dict[str, Any]], list[MPONetLayer]] | None = None,
    mpo_net_args: dict[str, Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the built-in architectures, with its MPO-Net if any."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = Architecture(name, fn, mpo_net, dict(mpo_net_args or {}))
        return fn

    return deco


def arch_accepts(arch: ArchSpec | str) -> set[str]:
    """Keyword arguments a built-in architecture takes (empty for user architectures)."""
    spec = parse_arch(arch) if isinstance(arch, str) else arch
    if not spec.is_builtin or spec.target not in ARCHITECTURES:
        return set()
    return ARCHITECTURES[spec.target].accepts


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
    if spec.target.startswith("hf:"):
        raise MPOCompressError(
            f"architecture {spec.target} is a Hugging Face class: it is built from a model folder (config.json and "
            "weights), so give the folder as MODEL"
        )
    if spec.is_builtin:
        if spec.target not in ARCHITECTURES:
            raise MPOCompressError(
                f"unknown architecture {spec.target!r}: built-in ones are {', '.join(sorted(ARCHITECTURES))}; "
                "for your own model pass package.module:callable"
            )
        fn = ARCHITECTURES[spec.target]
        _check_size(spec, fn)
    else:
        fn = _import_callable(spec.target)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # what user code prints never mixes with --json on stdout
            model = fn(**spec.kwargs)
    except MPOCompressError:
        raise
    except TypeError as e:
        raise MPOCompressError(f"cannot build architecture {spec}: {e}") from None
    except (Exception, SystemExit) as e:
        if spec.is_builtin:
            raise
        raise MPOCompressError(f"architecture {spec} failed while building the model ({type(e).__name__}: {short_error(e)}); fix the callable") from None
    if not isinstance(model, nn.Module):
        raise MPOCompressError(f"architecture {spec} returned {type(model).__name__}, not a torch.nn.Module")
    model.mpocompress_arch = str(spec)  # what `save` records when not told
    return model


MAX_PARAMS = 2_000_000_000  # a built-in architecture larger than this is refused before anything is allocated
MAX_MODULES = 5000  # a built-in architecture deeper than this is refused (the paper's largest has a few hundred)
MAX_ARG = 4096  # the largest whole-number argument of a built-in architecture (depths, widths, image sizes, classes)


def _check_size(spec: ArchSpec, fn: Callable[..., nn.Module]) -> None:
    """Build a built-in architecture on the meta device (no memory) and refuse it when its arguments
    make no sense or its parameters would not fit: a small file must not make us allocate gigabytes."""
    for key, value in spec.kwargs.items():  # a depth or width this large would take minutes even to describe
        if type(value) is int and not 1 <= value <= MAX_ARG:
            raise MPOCompressError(f"architecture {spec}: {key}={value} is outside [1, {MAX_ARG:,}]; choose {key} within it")
    try:
        with torch.device("meta"):
            probe = fn(**spec.kwargs)
    except MPOCompressError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:
        raise MPOCompressError(f"cannot build architecture {spec}: {short_error(e)}") from None
    modules = sum(1 for _ in probe.modules())
    if modules > MAX_MODULES:  # depth: its activations, not its parameters, would exhaust memory
        raise MPOCompressError(f"architecture {spec} would have {modules:,} modules, more than the {MAX_MODULES:,} mpocompress builds; "
                               "choose a smaller depth")  # fmt: skip
    n = sum(p.numel() for p in probe.parameters())
    if n > MAX_PARAMS:
        raise MPOCompressError(
            f"architecture {spec} would have {n:,} parameters ({4 * n / 2**30:.1f} GiB in float32), more than the "
            f"{MAX_PARAMS:,} mpocompress builds; choose smaller arguments"
        )


def _import_callable(target: str) -> Callable[..., nn.Module]:
    module_name, _, attr = target.partition(":")
    try:
        with cwd_on_path(), contextlib.redirect_stdout(sys.stderr):  # prints on import go to stderr, never into --json
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise MPOCompressError(
            f"cannot import {module_name!r} for architecture {target!r} ({e}); run from the folder that "
            "holds it or install its package"
        ) from None
    except (Exception, SystemExit) as e:  # a syntax error, or code that raises (or exits) on import
        raise MPOCompressError(
            f"importing {module_name!r} for architecture {target!r} failed ({type(e).__name__}: {short_error(e)}); fix the module"
        ) from None
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
    defaults = ARCHITECTURES[spec.target].defaults
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
    kw = {**ARCHITECTURES[spec.target].defaults, **spec.kwargs}
    if "in_channels" not in kw or "image_size" not in kw:
        return None
    return (int(kw["in_channels"]), int(kw["image_size"]), int(kw["image_size"]))
