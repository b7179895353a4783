"""The geometry of a 2-D convolution (channels, kernel, stride, padding, dilation, padding mode),
shared by every factorized convolution: validation, metadata, padding, output size, patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn.factorized import whole_field


def conv_geometry(conv: nn.Module) -> dict[str, Any]:
    """What an nn.Conv2d or MPOConv2d does besides its weights: in_channels, kernel_size, stride,
    padding, dilation and padding_mode (the keyword arguments of `MPOConv2d.from_cores`)."""
    return {
        "in_channels": conv.in_channels, "kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        "dilation": tuple(conv.dilation), "padding_mode": conv.padding_mode,
    }  # fmt: skip


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class ConvGeometry:
    """Mixin holding a convolution's geometry (set by `_set_geometry`)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    padding_mode: str

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode) -> None:
        if padding_mode not in _PAD_MODES:
            raise MPOCompressError(f"unknown padding_mode {padding_mode!r}; choose one of {list(_PAD_MODES)}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise MPOCompressError(f"padding must be 'same', 'valid' or integers, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise MPOCompressError("padding='same' needs stride 1 (as in nn.Conv2d)")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = pair(padding)
        self.padding_mode = padding_mode

    def geometry_spec(self) -> dict[str, Any]:
        g = conv_geometry(self)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(g["kernel_size"]),
            "stride": list(g["stride"]),
            "padding": g["padding"] if isinstance(g["padding"], str) else list(g["padding"]),
            "dilation": list(g["dilation"]),
            "padding_mode": g["padding_mode"],
        }

    @staticmethod
    def geometry_dims(spec: dict[str, Any]) -> tuple[int, int]:
        """(C_in*kh*kw, C_out) of a metadata spec, after checking the kernel size and channels."""
        kernel = spec.get("kernel_size")
        if not isinstance(kernel, list) or not all(type(k) is int and k >= 1 for k in kernel):
            raise ValueError(f"kernel_size must be a list of whole numbers >= 1, got {kernel!r}")
        if len(kernel) != 2:
            raise ValueError(f"kernel_size must hold 2 numbers, got {kernel}")
        for key, least in (("stride", 1), ("dilation", 1)):
            v = spec.get(key)
            if not isinstance(v, list) or len(v) != 2 or not all(type(k) is int and least <= k <= 4096 for k in v):
                raise ValueError(f"{key} must be 2 whole numbers in [{least}, 4096], got {v!r}")
        pad = spec.get("padding")
        if pad not in ("same", "valid") and not (
            isinstance(pad, list) and len(pad) == 2 and all(type(k) is int and 0 <= k <= 4096 for k in pad)
        ):  # fmt: skip
            raise ValueError(f"padding must be 'same', 'valid' or 2 whole numbers in [0, 4096], got {pad!r}")
        if spec.get("padding_mode") not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(_PAD_MODES)}, got {spec.get('padding_mode')!r}")
        return whole_field(spec, "in_channels") * kernel[0] * kernel[1], whole_field(spec, "out_channels")

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

    def covers_input(self, xp: torch.Tensor, pad: tuple[int, int]) -> bool:
        """Whether the kernel sees the whole padded input `xp` at its one position (no padding left
        to the conv call, no dilation, input as large as the kernel): the convolution is then the
        linear map of the flattened input, one GEMM (LeNet-5's conv3 on its 5x5 maps), which runs
        several times faster than the convolution routines on such shapes."""
        return pad == (0, 0) and self.dilation == (1, 1) and tuple(xp.shape[-2:]) == self.kernel_size

    def _unfolded(self, xp: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
        """The patches of the padded input: (B * positions, C_in*kh*kw), rows in output order."""
        if self.covers_input(xp, pad):
            return xp.reshape(xp.shape[0], -1)
        cols = F.unfold(xp, self.kernel_size, dilation=self.dilation, padding=pad, stride=self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The input vectors the kernel sees: (B * positions, C_in*kh*kw), rows in output order."""
        return self._unfolded(*self._padded(x if x.dim() == 4 else x.unsqueeze(0)))

    def dense_conv(self, kernel: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
        """An nn.Conv2d with this geometry holding copies of the kernel (C_out, C_in, kh, kw) and the bias."""
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=bias is not None, padding_mode=self.padding_mode, device=kernel.device,
            dtype=kernel.dtype,
        )  # fmt: skip
        with torch.no_grad():
            dense.weight.copy_(kernel)
            if bias is not None:
                dense.bias.copy_(bias)
        return dense

    def geometry_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


def dense_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`ConvGeometry.patches` for a dense nn.Conv2d (what its kernel multiplies)."""
    g = ConvGeometry()
    g._set_geometry(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.padding_mode)  # fmt: skip
    return g.patches(x)
