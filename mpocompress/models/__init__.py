"""Architectures: the registry (`registry`), the paper's networks (`paper`) and their MPO-Nets
(`mpo_nets`). A new built-in architecture is one function decorated with `register_arch`."""

from mpocompress.models import paper as _paper  # noqa: F401  (registers the paper's networks)
from mpocompress.models.mpo_nets import build_mpo_net, paper_modes
from mpocompress.models.registry import (
    ARCHITECTURES,
    Architecture,
    ArchSpec,
    MPONetLayer,
    adapt_arch,
    arch_accepts,
    build_model,
    default_input_shape,
    parse_arch,
    register_arch,
)

__all__ = [
    "ARCHITECTURES", "ArchSpec", "Architecture", "MPONetLayer", "adapt_arch", "arch_accepts", "build_model",
    "build_mpo_net", "default_input_shape", "paper_modes", "parse_arch", "register_arch",
]  # fmt: skip
