"""What every factorized layer shares, whatever its structure (MPO, low-rank): a dense map from
N_x inputs to N_y outputs stored in fewer numbers, that can be multiplied out, described in file
metadata and rebuilt from it."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


def whole_field(spec: dict[str, Any], key: str) -> int:
    """A metadata field that must be a whole number >= 1 (ValueError with the reason otherwise)."""
    v = spec.get(key)
    if type(v) is not int or v < 1:
        raise ValueError(f"{key} must be a whole number >= 1, got {v!r}")
    return v


def dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of W (N_y x N_x) and the bias."""
    dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


class FactorizedLayer(nn.Module):
    """Base of the factorized layers (`MPOLayer`, `LowRankLinear`, `LowRankConv2d`)."""

    kind: ClassVar[str]  # the layer's name in file metadata ("linear", "conv2d", "lowrank_linear", ...)
    structure: ClassVar[str]  # what the report calls it: "mpo" or "lowrank"
    bias: torch.Tensor | None

    @property
    def num_mpo_params(self) -> int:
        """Parameters of the factorized weight (biases excluded), as in Eq. 9."""
        raise NotImplementedError

    @property
    def weight_numel(self) -> int:
        """Number of weights of the dense layer this one stands for."""
        raise NotImplementedError

    @property
    def ranks(self) -> list[int]:
        """Inner dimensions: the MPO's bond dims, or [r] for a low-rank layer."""
        raise NotImplementedError

    def weight_matrix(self) -> torch.Tensor:
        """W (N_y x N_x) multiplied out; differentiable."""
        raise NotImplementedError

    def notation(self) -> str:
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """The equivalent dense nn.Linear or nn.Conv2d."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this layer's skeleton (for checkpoints)."""
        raise NotImplementedError

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        """(N_x, N_y) that a metadata spec of this kind describes, after checking its own fields;
        raises ValueError with the reason when a field is invalid."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FactorizedLayer:
        """A skeleton (random values) with the shapes a checkpoint's metadata describes."""
        raise NotImplementedError
