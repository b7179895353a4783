"""MPOConv2d: a drop-in replacement for nn.Conv2d whose kernel is an MPO."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn.cache import stamp
from mpocompress.nn.conv_geometry import ConvGeometry, conv_geometry, pair
from mpocompress.nn.mpo_base import MPOLayer, copied, factorized_cores
from mpocompress.tensors.contract import tracing


class MPOConv2d(ConvGeometry, MPOLayer):
    """A 2-D convolution whose kernel, seen as the linear map from C_in*kh*kw inputs to C_out
    outputs (input index (c, u, v) row-major, as in `weight.reshape(C_out, -1)`), is an MPO.

    Stride, padding (ints or 'same'/'valid'), dilation and padding_mode are honoured per axis.
    Grouped convolutions are not supported. Random initialisation matches the std of PyTorch's
    default nn.Conv2d kernel, 1 / sqrt(3 * C_in * kh * kw).
    """

    kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        bond_dim: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        n_cores: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise MPOCompressError(
                f"MPOConv2d supports groups=1 only, got groups={groups}; leave grouped convolutions dense"
            )
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        nx = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_random(nx, out_channels, bond_dim, in_modes, out_modes, n_cores, bias, device, dtype)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_cores(
        cls,
        cores: Sequence[torch.Tensor],
        *,
        in_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        padding_mode: str = "zeros",
        bias: torch.Tensor | None = None,
    ) -> MPOConv2d:
        """Wrap given cores (and bias) with the given convolution geometry."""
        out_channels = math.prod(int(c.shape[1]) for c in cores)
        kh, kw = pair(kernel_size)
        nx = math.prod(int(c.shape[2]) for c in cores)
        if nx != in_channels * kh * kw:
            raise MPOCompressError(
                f"cores take {nx} inputs but the convolution has C_in*kh*kw = {in_channels}*{kh}*{kw} = {in_channels * kh * kw}"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        layer._set_params(copied(cores), bias.detach().clone() if bias is not None else None)
        return layer

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        bond_dim: int | None = None,
        eps: float | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        n_cores: int = 4,
    ) -> MPOConv2d:
        """Factorize a dense nn.Conv2d's kernel by TT-SVD truncated at D and/or eps."""
        if conv.groups != 1:
            raise MPOCompressError(
                f"cannot convert a convolution with groups={conv.groups}: only groups=1 is supported; leave it dense"
            )
        cores = factorized_cores(conv.weight.reshape(conv.out_channels, -1), bond_dim, eps, in_modes, out_modes, n_cores)
        return cls.from_cores(cores, bias=conv.bias, **conv_geometry(conv))

    def kernel(self) -> torch.Tensor:
        """The dense kernel (C_out, C_in, kh, kw) rebuilt from the cores; differentiable."""
        return self.weight_matrix().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense nn.Conv2d."""
        k = self.kernel().detach()
        return self.dense_conv(k, self.bias)

    # ------------------------------------------------------------------ metadata

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **self.geometry_spec(),
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "bond_dims": self.bond_dims,
            "bias": self.bias is not None,
        }

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        return cls.geometry_dims(spec)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MPOConv2d:
        return cls(
            spec["in_channels"], spec["out_channels"], spec["kernel_size"], bond_dim=spec["bond_dims"],
            stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"], bias=spec["bias"],
            padding_mode=spec["padding_mode"], in_modes=spec["in_modes"], out_modes=spec["out_modes"],
        )  # fmt: skip

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        cache = self.weight_cache
        fast = cache.enabled and not torch.is_grad_enabled() and not tracing()
        if fast:  # materialized, no grad: the weight of the last dense-plan call on this input shape
            current = stamp(self._core_params())
            hit = cache.get("fast", current)
            if hit is not None and hit[0] == x.shape:
                xp, pad = self._padded(x)
                if hit[2]:
                    y = F.linear(xp.reshape(x.shape[0], -1), hit[1], self._parameters["bias"])[:, :, None, None]
                else:
                    y = F.conv2d(xp, hit[1], self._parameters["bias"], self.stride, pad, self.dilation)
                return y if batched else y.squeeze(0)
        b = x.shape[0]
        xp, pad = self._padded(x)
        oh, ow = self._output_hw(xp, pad)
        whole = self.covers_input(xp, pad)
        plan, use_cache = self._plan_call(b * oh * ow, x)
        if plan.kind == "dense":
            w = self._weight(use_cache)
            if not whole:
                w = w.reshape(self.out_channels, self.in_channels, *self.kernel_size)
            if fast and use_cache:
                cache.put("fast", current, (x.shape, w, whole))
            if whole:
                y = F.linear(xp.reshape(b, -1), w, self.bias)[:, :, None, None]
            else:
                y = F.conv2d(xp, w, self.bias, self.stride, pad, self.dilation)
        else:
            y = self._contract(self._unfolded(xp, pad), plan, use_cache)  # (B L, C_out)
            y = y.reshape(b, oh * ow, self.out_channels).transpose(1, 2).reshape(b, self.out_channels, oh, ow)
        return y if batched else y.squeeze(0)

    def extra_repr(self) -> str:
        return f"{self.notation()}, {self.geometry_repr()}, bias={self.bias is not None}"
