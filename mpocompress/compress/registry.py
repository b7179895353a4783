"""The registry from module type to converter: how a module of each type becomes a factorized
layer. Adding a structure or a source type is one `register_converter` call; nothing else in
`mpocompress.compress` looks at module types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.nn import (
    LowRankConv2d,
    LowRankLinear,
    LowRankTable,
    MPOConv2d,
    MPOEmbedding,
    MPOLayer,
    MPOLinear,
    conv_geometry,
    dense_patches,
    padded_vocab,
)  # fmt: skip
from mpocompress.nn.conv_geometry import ConvGeometry

Builder = Callable[[nn.Module, list[torch.Tensor]], nn.Module]


@dataclass(frozen=True)
class Converter:
    """How modules of one type are read and replaced.

    Attributes:
        kind: "linear", "conv2d" or "embedding": the report's kind, and how outputs count input
            vectors (an embedding's input vectors are one-hot tokens: calibration counts them).
        dims: (N_y, N_x) of the module's weight matrix (an embedding's N_x: its padded vocabulary).
        weight: that matrix, dense (differentiable where the module is).
        builders: per structure ("mpo", "lowrank"), the factorized layer holding the given factors
            (the MPO's cores; [B, A] for low-rank), with the module's bias and geometry.
        rows: the input vectors the weight multiplies, (rows, N_x), from the module's input x.
        problem: why the module cannot be converted (None when it can).
        cores: for a module that is already an MPO, its cores (it is then rounded, W never formed).
        transposed: the module stores its weight as (N_x, N_y) (transformers' Conv1D, nn.Embedding).
        numel: the dense module's weight count, when it differs from N_y * N_x (a padded vocabulary).
        serves_head: the table is also a causal LM's output head (tied embeddings): its errors are
            weighed at both ends (`TableWeighting`) and measured on the full next-token KL.
    """

    kind: str
    dims: Callable[[nn.Module], tuple[int, int]]
    weight: Callable[[nn.Module], torch.Tensor]
    builders: dict[str, Builder]
    rows: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    problem: Callable[[nn.Module], str | None] = lambda m: None
    cores: Callable[[nn.Module], list[torch.Tensor]] | None = None
    transposed: bool = False
    numel: Callable[[nn.Module], int] | None = None
    serves_head: bool = False

    def build(self, module: nn.Module, factors: list[torch.Tensor], structure: str = "mpo") -> nn.Module:
        return self.builders[structure](module, factors)

    def set_dense(self, module: nn.Module, w: torch.Tensor) -> None:
        """Write the dense matrix w (N_y, N_x) into a dense module of this type, in its own layout."""
        with torch.no_grad():
            module.weight.copy_((w.T if self.transposed else w).reshape(module.weight.shape))

    def rows_per_output(self, out: torch.Tensor) -> int:
        """Input vectors a call handled, from its output: positions for a conv, rows for a linear."""
        return out.numel() // (out.shape[-3] if self.kind == "conv2d" else out.shape[-1])

    @property
    def structures(self) -> tuple[str, ...]:
        """The structures this type can become."""
        return tuple(self.builders)


CONVERTERS: dict[type[nn.Module] | str, Converter] = {}


def register_converter(module_type: type[nn.Module] | str, converter: Converter) -> None:
    """Make modules of `module_type` (and its subclasses) convertible. A type from an optional
    package is named by its qualified name ("package.module.Class"), so the package is never imported
    here: the converter applies when such modules turn up."""
    CONVERTERS[module_type] = converter


def converter_for(module: nn.Module) -> Converter | None:
    """The converter of the module's type or of its nearest registered base class."""
    for cls in type(module).__mro__:
        conv = CONVERTERS.get(cls) or CONVERTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if conv is not None:
            return conv
    return None


def build_like(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` in `old`'s training mode, keeping an MPO layer's forward strategy."""
    if isinstance(old, MPOLayer) and isinstance(new, MPOLayer):
        new.forward_strategy = old.forward_strategy
    return new.train(old.training)


def _grouped_problem(m: nn.Module) -> str | None:
    return f"grouped convolution (groups={m.groups}); only groups=1 can become an MPO" if m.groups != 1 else None


def _mpo_cores(m: nn.Module) -> list[torch.Tensor]:
    return list(m.cores)


_LINEAR_BUILDERS: dict[str, Builder] = {
    "mpo": lambda m, cores: MPOLinear.from_cores(cores, m.bias),
    "lowrank": lambda m, f: LowRankLinear.from_factors(f[0], f[1], m.bias),
}
_CONV_BUILDERS: dict[str, Builder] = {
    "mpo": lambda m, cores: MPOConv2d.from_cores(cores, bias=m.bias, **conv_geometry(m)),
    "lowrank": lambda m, f: LowRankConv2d.from_factors(f[0], f[1], bias=m.bias, **conv_geometry(m)),
}


def _linear_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _conv_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.patches(x) if isinstance(m, ConvGeometry) else dense_patches(m, x)


def _factored_weight(m: nn.Module) -> torch.Tensor:
    return m.weight_matrix()


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    return m.out_features, m.in_features


def _conv_dims(m: nn.Module) -> tuple[int, int]:
    return m.out_channels, m.in_channels * m.kernel_size[0] * m.kernel_size[1]


register_converter(nn.Linear, Converter("linear", _linear_dims, lambda m: m.weight, _LINEAR_BUILDERS, _linear_rows))
register_converter(MPOLinear, Converter(
    "linear", _linear_dims, _factored_weight, _LINEAR_BUILDERS, _linear_rows, cores=_mpo_cores,
))  # fmt: skip
register_converter(LowRankLinear, Converter("linear", _linear_dims, _factored_weight, _LINEAR_BUILDERS, _linear_rows))
register_converter(nn.Conv2d, Converter(
    "conv2d", _conv_dims, lambda m: m.weight.reshape(m.out_channels, -1), _CONV_BUILDERS, _conv_rows,
    problem=_grouped_problem,
))  # fmt: skip
register_converter(MPOConv2d, Converter(
    "conv2d", _conv_dims, _factored_weight, _CONV_BUILDERS, _conv_rows, cores=_mpo_cores,
))  # fmt: skip
register_converter(LowRankConv2d, Converter("conv2d", _conv_dims, _factored_weight, _CONV_BUILDERS, _conv_rows))


def _embedding_problem(m: nn.Module) -> str | None:
    return "an embedding with max_norm renormalizes its rows on lookup; only plain embeddings can become MPOs" if getattr(m, "max_norm", None) is not None else None


def _embedding_dims(m: nn.Module) -> tuple[int, int]:
    return m.embedding_dim, padded_vocab(m.num_embeddings)


def _padded(w: torch.Tensor) -> torch.Tensor:
    """W = E^T (d x V) with zero columns up to the padded vocabulary."""
    return F.pad(w, (0, padded_vocab(w.shape[1]) - w.shape[1]))


def _token_ids(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1)


_EMBEDDING_BUILDERS: dict[str, Builder] = {
    "mpo": lambda m, cores: MPOEmbedding.from_cores(cores, m.num_embeddings, m.padding_idx),
}
register_converter(nn.Embedding, Converter(
    "embedding", _embedding_dims, lambda m: _padded(m.weight.T), _EMBEDDING_BUILDERS, _token_ids,
    problem=_embedding_problem, transposed=True, numel=lambda m: m.weight.numel(),
))  # fmt: skip
register_converter(MPOEmbedding, Converter(
    "embedding", _embedding_dims, lambda m: _padded(m.weight_matrix()), _EMBEDDING_BUILDERS, _token_ids,
    cores=_mpo_cores, transposed=True, numel=lambda m: m.weight_numel,
))  # fmt: skip
# transformers' Conv1D (GPT-2 and relatives): y = x @ weight + bias with weight (N_x, N_y)
register_converter("transformers.pytorch_utils.Conv1D", Converter(
    "linear", lambda m: (m.weight.shape[1], m.weight.shape[0]), lambda m: m.weight.T, _LINEAR_BUILDERS, _linear_rows,
    transposed=True,
))  # fmt: skip

# a causal LM's input embedding whose weight its LM head shares (tied embeddings): one candidate under
# both names, made a LowRankTable that serves both ends (never untied); E^T is its W (d x V, unpadded)
_TABLE_BUILDERS: dict[str, Builder] = {"lowrank": lambda m, f: LowRankTable.from_factors(f[0], f[1], m.padding_idx)}
TIED_TABLE = Converter(
    "embedding", lambda m: (m.embedding_dim, m.num_embeddings), lambda m: m.weight.T, _TABLE_BUILDERS, _token_ids,
    transposed=True, numel=lambda m: m.weight.numel(), serves_head=True,
)  # fmt: skip
register_converter(LowRankTable, Converter(
    "embedding", lambda m: (m.embedding_dim, m.num_embeddings), _factored_weight, _TABLE_BUILDERS, _token_ids,
    transposed=True, numel=lambda m: m.weight_numel, serves_head=True,
))  # fmt: skip
