"""The paper's MPO-Nets: a built-in architecture with the layers its registration names replaced by
randomly initialised MPO layers."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.models.registry import ARCHITECTURES, ArchSpec, MPONetLayer, build_model, parse_arch
from mpocompress.nn import MPOConv2d, MPOLinear, conv_geometry
from mpocompress.tensors import factorize
from mpocompress.utils import set_module


def paper_modes(
    n_in: int, n_out: int, paper_in: tuple[int, ...], paper_out: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The paper's modes where they fit the layer; a balanced split with as many modes otherwise
    (other input sizes or class counts)."""
    i = paper_in if math.prod(paper_in) == n_in else factorize(n_in, len(paper_in))
    o = paper_out if math.prod(paper_out) == n_out else factorize(n_out, len(paper_out))
    return i, o


def build_mpo_net(
    arch: ArchSpec | str, bond_dim: int | None = None, bond_dims: Mapping[str, int] | None = None
) -> tuple[nn.Module, str, list[MPONetLayer]]:
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
    entry = ARCHITECTURES.get(spec.target) if spec.is_builtin else None
    if entry is None or entry.mpo_net is None:
        with_nets = [name for name, a in ARCHITECTURES.items() if a.mpo_net is not None]
        raise MPOCompressError(
            f"--mpo knows the paper's MPO-Nets of {', '.join(with_nets)}, not {spec.target!r}; "
            "for another model train it dense and use `mpocompress convert`"
        )
    spec = ArchSpec(spec.target, {**spec.kwargs, **entry.mpo_net_args})
    model = build_model(spec)
    layers = entry.mpo_net({**entry.defaults, **spec.kwargs})
    known = {p.name for p in layers}
    for name in bond_dims or {}:
        if name not in known:
            raise MPOCompressError(f"--bond-dim {name}=...: {spec.target} has no MPO layer {name!r}; its MPO layers are {', '.join(sorted(known))}")
    out = []
    for p in layers:
        d = (bond_dims or {}).get(p.name, bond_dim if (bond_dim is not None and p.varied) else p.bond_dim)
        if not isinstance(d, int) or d < 1:
            raise MPOCompressError(f"bond dimension of {p.name} must be a whole number >= 1, got {d!r}")
        p = MPONetLayer(p.name, p.in_modes, p.out_modes, d, p.varied)
        _replace(model, p)
        out.append(p)
    return model, str(spec), out


def _replace(model: nn.Module, p: MPONetLayer) -> None:
    old = model.get_submodule(p.name)
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        new: nn.Module = MPOLinear(old.in_features, old.out_features, p.bond_dim, p.in_modes, p.out_modes, bias=bias)
    elif isinstance(old, nn.Conv2d):
        g = conv_geometry(old)
        new = MPOConv2d(g.pop("in_channels"), old.out_channels, g.pop("kernel_size"), p.bond_dim, bias=bias,
                        in_modes=p.in_modes, out_modes=p.out_modes, **g)  # fmt: skip
    else:  # pragma: no cover - the MPO-Nets name Linear and Conv2d layers only
        raise MPOCompressError(f"cannot place an MPO at {p.name} ({type(old).__name__})")
    set_module(model, p.name, new)
