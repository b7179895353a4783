"""MPOLinear: a drop-in replacement for nn.Linear whose weight is an MPO."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.nn.cache import stamp
from mpocompress.nn.factorized import dense_linear, whole_field
from mpocompress.nn.mpo_base import MPOLayer, copied, factorized_cores
from mpocompress.tensors.contract import tracing


class MPOLinear(MPOLayer):
    """y = W x + b with W an MPO of cores (D_{k-1}, J_k, I_k, D_k).

    Args:
        in_features, out_features: N_x and N_y.
        bond_dim: D (each bond capped at its useful maximum) or the list of n-1 inner bond dims.
        in_modes, out_modes: I_1..I_n and J_1..J_n; balanced splits into `n_cores` modes if omitted.
        bias: whether to learn an additive bias.
        n_cores: number of cores when modes are not given.

    The cores are initialised at random so that the rebuilt W has the elementwise standard
    deviation of PyTorch's default nn.Linear initialisation, 1 / sqrt(3 * in_features).
    """

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bond_dim: int | Sequence[int],
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        bias: bool = True,
        n_cores: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_random(in_features, out_features, bond_dim, in_modes, out_modes, n_cores, bias, device, dtype)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None) -> MPOLinear:
        """A layer holding copies of the given cores (D_{k-1}, J_k, I_k, D_k) and bias."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = math.prod(int(c.shape[2]) for c in cores)
        layer.out_features = math.prod(int(c.shape[1]) for c in cores)
        layer._set_params(copied(cores), bias.detach().clone() if bias is not None else None)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bond_dim: int | None = None,
        eps: float | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        n_cores: int = 4,
    ) -> MPOLinear:
        """Factorize a dense nn.Linear by TT-SVD truncated at bond dim D and/or relative error eps."""
        return cls.from_cores(factorized_cores(linear.weight, bond_dim, eps, in_modes, out_modes, n_cores), linear.bias)

    def to_dense(self) -> nn.Linear:
        """The equivalent dense nn.Linear."""
        return dense_linear(self.weight_matrix().detach(), self.bias)

    # ------------------------------------------------------------------ metadata

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "bond_dims": self.bond_dims,
            "bias": self.bias is not None,
        }

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        return whole_field(spec, "in_features"), whole_field(spec, "out_features")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MPOLinear:
        return cls(
            spec["in_features"], spec["out_features"], bond_dim=spec["bond_dims"], in_modes=spec["in_modes"],
            out_modes=spec["out_modes"], bias=spec["bias"],
        )  # fmt: skip

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.weight_cache
        fast = cache.enabled and x.dim() == 2 and not torch.is_grad_enabled() and not tracing()
        if fast:  # materialized, no grad: W of the last dense-plan call, if the cores are unchanged
            current = stamp(self._core_params())
            hit = cache.get("fast", current)
            if hit is not None and hit[0] == x.shape[0]:
                return F.linear(x, hit[1], self._parameters["bias"])  # self.bias, looked up directly
        lead = x.shape[:-1]
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (B, N_x)
        plan, use_cache = self._plan_call(rows.shape[0], x)
        if plan.kind == "dense":
            w = self._weight(use_cache)
            if fast and use_cache:
                cache.put("fast", current, (rows.shape[0], w))
            y = F.linear(rows, w, self.bias)
        else:
            y = self._contract(rows, plan, use_cache)  # (B, N_y)
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.notation()}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
