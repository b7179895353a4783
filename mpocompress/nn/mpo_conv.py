"""MPOConv2d: a drop-in replacement for nn.Conv2d whose kernel is an MPO."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn.mpo_base import MPOLayer, copied, factorized_cores, whole_field


def conv_geometry(conv: nn.Module) -> dict[str, Any]:
    """What an nn.Conv2d or MPOConv2d does besides its weights: in_channels, kernel_size, stride,
    padding, dilation and padding_mode (the keyword arguments of `MPOConv2d.from_cores`)."""
    return {
        "in_channels": conv.in_channels, "kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        "dilation": tuple(conv.dilation), "padding_mode": conv.padding_mode,
    }  # fmt: skip


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class MPOConv2d(MPOLayer):
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

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode) -> None:
        if padding_mode not in _PAD_MODES:
            raise MPOCompressError(f"unknown padding_mode {padding_mode!r}; choose one of {list(_PAD_MODES)}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise MPOCompressError(f"padding must be 'same', 'valid' or integers, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise MPOCompressError("padding='same' needs stride 1 (as in nn.Conv2d)")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair(padding)
        self.padding_mode = padding_mode

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
        kh, kw = _pair(kernel_size)
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
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=k.device, dtype=k.dtype,
        )  # fmt: skip
        with torch.no_grad():
            dense.weight.copy_(k)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    # ------------------------------------------------------------------ metadata

    def spec(self) -> dict[str, Any]:
        g = conv_geometry(self)
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(g["kernel_size"]),
            "stride": list(g["stride"]),
            "padding": g["padding"] if isinstance(g["padding"], str) else list(g["padding"]),
            "dilation": list(g["dilation"]),
            "padding_mode": g["padding_mode"],
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "bond_dims": self.bond_dims,
            "bias": self.bias is not None,
        }

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        kernel = spec.get("kernel_size")
        if not isinstance(kernel, list) or not all(type(k) is int and k >= 1 for k in kernel):
            raise ValueError(f"kernel_size must be a list of whole numbers >= 1, got {kernel!r}")
        if len(kernel) != 2:
            raise ValueError(f"kernel_size must hold 2 numbers, got {kernel}")
        return whole_field(spec, "in_channels") * kernel[0] * kernel[1], whole_field(spec, "out_channels")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MPOConv2d:
        return cls(
            spec["in_channels"], spec["out_channels"], spec["kernel_size"], bond_dim=spec["bond_dims"],
            stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"], bias=spec["bias"],
            padding_mode=spec["padding_mode"], in_modes=spec["in_modes"], out_modes=spec["out_modes"],
        )  # fmt: skip

    # ------------------------------------------------------------------ forward

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Apply any padding the unfold/conv call cannot express; return the padding left for it."""
        if self.padding == "valid":
            return x, (0, 0)
        if self.padding == "same":
            pads = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            (ht, hb), (wl, wr) = pads
            if self.padding_mode == "zeros" and ht == hb and wl == wr:
                return x, (ht, wl)
            return F.pad(x, (wl, wr, ht, hb), mode=_PAD_MODES[self.padding_mode]), (0, 0)
        ph, pw = self.padding  # type: ignore[misc]
        if self.padding_mode == "zeros":
            return x, (ph, pw)
        return F.pad(x, (pw, pw, ph, ph), mode=_PAD_MODES[self.padding_mode]), (0, 0)

    def _output_hw(self, xp: torch.Tensor, pad: tuple[int, int]) -> tuple[int, int]:
        """Output size for the already padded input `xp` and the padding left to the conv/unfold call."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h, w = xp.shape[-2:]
        return (h + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        b = x.shape[0]
        xp, pad = self._padded(x)
        oh, ow = self._output_hw(xp, pad)
        plan, use_cache = self._plan_call(b * oh * ow, x)
        if plan.kind == "dense":
            kernel = self._weight(use_cache).reshape(self.out_channels, self.in_channels, *self.kernel_size)
            y = F.conv2d(xp, kernel, self.bias, self.stride, pad, self.dilation)
        else:
            cols = F.unfold(xp, self.kernel_size, dilation=self.dilation, padding=pad, stride=self.stride)  # (B, Nx, L)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B L, Nx)
            y = self._contract(rows, plan, use_cache)  # (B L, C_out)
            y = y.reshape(b, oh * ow, self.out_channels).transpose(1, 2).reshape(b, self.out_channels, oh, ow)
        return y if batched else y.squeeze(0)

    def extra_repr(self) -> str:
        s = (
            f"{self.notation()}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"
