"""Low-rank layers: W = B A with A (r x N_x) and B (N_y x r), run as two skinny products.

`LowRankLinear` computes x A^T B^T + b; `LowRankConv2d` is a k x k convolution to r channels (A, with
the original geometry) followed by a 1x1 convolution (B, with the bias), or two matrix products of the
flattened input when the kernel covers it whole (`ConvGeometry.covers_input`). As an MPO this is the 2-core
MPO with input modes (1, N_x), output modes (N_y, 1) and bond r, which is how the report counts it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn.conv_geometry import ConvGeometry
from mpocompress.nn.factorized import FactorizedLayer, dense_linear, whole_field
from mpocompress.tensors.contract import tracing

FORMS = ("rows", "transposed")  # how LowRankLinear orders its first product (see LowRankLinear.pin_form)


def _uniform_factors(nx: int, ny: int, rank: int, device: Any, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors whose product has the elementwise std of PyTorch's default init, 1/sqrt(3 nx)."""
    dtype = dtype or torch.get_default_dtype()
    std = (1.0 / math.sqrt(3 * nx)) ** 0.5 / rank**0.25
    return (torch.randn(ny, rank, device=device, dtype=dtype) * std, torch.randn(rank, nx, device=device, dtype=dtype) * std)


class _LowRank(FactorizedLayer):
    structure = "lowrank"
    first: nn.Parameter  # A (r, N_x)
    second: nn.Parameter  # B (N_y, r)

    def _set_factors(self, second: torch.Tensor, first: torch.Tensor, bias: torch.Tensor | None) -> None:
        if first.ndim != 2 or second.ndim != 2 or first.shape[0] != second.shape[1]:
            raise MPOCompressError(f"factors of shapes {tuple(second.shape)} and {tuple(first.shape)} do not multiply")
        self.first = nn.Parameter(first)
        self.second = nn.Parameter(second)
        if bias is not None:
            self.bias = nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        self._forms: dict[int, str] = {}  # rows -> form, see LowRankLinear.pin_form

    def __setstate__(self, state: dict[str, Any]) -> None:  # pickles from before forms were pinned
        super().__setstate__(state)
        self.__dict__.setdefault("_forms", {})

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])

    @property
    def ranks(self) -> list[int]:
        return [self.rank]

    @property
    def num_mpo_params(self) -> int:
        return self.first.numel() + self.second.numel()

    @property
    def weight_numel(self) -> int:
        return self.first.shape[1] * self.second.shape[0]

    def weight_matrix(self) -> torch.Tensor:
        return self.second @ self.first

    def notation(self) -> str:
        return f"lowrank(r={self.rank})"


class LowRankLinear(_LowRank):
    """y = B (A x) + b, a drop-in replacement for nn.Linear."""

    kind = "lowrank_linear"

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise MPOCompressError(f"rank must be a whole number >= 1, got {rank!r}")
        self.in_features, self.out_features = in_features, out_features
        second, first = _uniform_factors(in_features, out_features, rank, device, dtype)
        bound = 1.0 / math.sqrt(in_features)
        b = torch.empty(out_features, device=device, dtype=second.dtype).uniform_(-bound, bound) if bias else None
        self._set_factors(second, first, b)

    @classmethod
    def from_factors(cls, second: torch.Tensor, first: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """A layer holding copies of B (N_y, r), A (r, N_x) and the bias."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = int(first.shape[1]), int(second.shape[0])
        layer._set_factors(second.detach().clone(), first.detach().clone(), bias.detach().clone() if bias is not None else None)
        return layer

    def pin_form(self, rows: int, form: str | None) -> None:
        """How calls of `rows` input vectors that need no gradient (and every call in eval mode) take
        the first product: "rows", x A^T (the default), or "transposed", (A x^T)^T, the same numbers
        from a GEMM with the short side first, which BLAS runs faster for some shapes (a low rank
        against a long input, as MiniLM's 1536 -> 384 FFN outputs) and slower for others, so
        `optimize_for_inference` measures which. None unpins."""
        if form is None:
            self._forms.pop(rows, None)
            return
        if form not in FORMS:
            raise MPOCompressError(f"unknown form {form!r}; choose one of {FORMS}")
        self._forms[rows] = form

    @property
    def pinned_forms(self) -> dict[int, str]:
        """The form pinned per row count (`pin_form`)."""
        return dict(self._forms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pinned = self._forms and x.dim() > 0 and x.shape[-1] == self.in_features
        if pinned and not tracing() and not (self.training and torch.is_grad_enabled()):
            rows = x.numel() // self.in_features
            if self._forms.get(rows) == "transposed":
                h = torch.mm(self.first, x.reshape(rows, self.in_features).t()).t()  # (rows, r), from (r, rows)
                y = torch.addmm(self.bias, h, self.second.t()) if self.bias is not None else h @ self.second.t()
                return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(F.linear(x, self.first), self.second, self.bias)

    def to_dense(self) -> nn.Linear:
        """The equivalent dense nn.Linear."""
        return dense_linear(self.weight_matrix().detach(), self.bias)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
            "bias": self.bias is not None,
        }  # fmt: skip

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        nx, ny = whole_field(spec, "in_features"), whole_field(spec, "out_features")
        _check_rank(spec, nx, ny)
        return nx, ny

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankLinear:
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])

    def extra_repr(self) -> str:
        return f"{self.notation()}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _check_rank(spec: dict[str, Any], nx: int, ny: int) -> None:
    r = whole_field(spec, "rank")
    if r > min(nx, ny):
        raise ValueError(f"rank {r} exceeds min(N_x, N_y) = {min(nx, ny)}")


class LowRankConv2d(ConvGeometry, _LowRank):
    """A k x k convolution to r channels (A, the original stride/padding/dilation) and a 1x1
    convolution to C_out channels (B, with the bias): a drop-in replacement for nn.Conv2d (groups=1)."""

    kind = "lowrank_conv2d"

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], rank: int,
        stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
        bias: bool = True, padding_mode: str = "zeros", device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise MPOCompressError(f"rank must be a whole number >= 1, got {rank!r}")
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        nx = in_channels * self.kernel_size[0] * self.kernel_size[1]
        second, first = _uniform_factors(nx, out_channels, rank, device, dtype)
        bound = 1.0 / math.sqrt(nx)
        b = torch.empty(out_channels, device=device, dtype=second.dtype).uniform_(-bound, bound) if bias else None
        self._set_factors(second, first, b)

    @classmethod
    def from_factors(
        cls, second: torch.Tensor, first: torch.Tensor, *, in_channels: int, kernel_size: int | tuple[int, int],
        stride: Any = 1, padding: Any = 0, dilation: Any = 1, padding_mode: str = "zeros", bias: torch.Tensor | None = None,
    ) -> LowRankConv2d:  # fmt: skip
        """A layer holding copies of B (C_out, r), A (r, C_in*kh*kw) and the bias, with this geometry."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_geometry(in_channels, int(second.shape[0]), kernel_size, stride, padding, dilation, padding_mode)
        nx = in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        if first.shape[1] != nx:
            raise MPOCompressError(f"factor A takes {first.shape[1]} inputs but the convolution has C_in*kh*kw = {nx}")
        layer._set_factors(second.detach().clone(), first.detach().clone(), bias.detach().clone() if bias is not None else None)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, pad = self._padded(x)
        if self.covers_input(xp, pad):  # two GEMMs on the flattened input
            y = F.linear(F.linear(xp.reshape(-1, self.first.shape[1]), self.first), self.second, self.bias)
            return y.reshape(*xp.shape[:-3], self.out_channels, 1, 1)
        k = self.first.view(self.rank, self.in_channels, *self.kernel_size)
        h = F.conv2d(xp, k, None, self.stride, pad, self.dilation)
        return F.conv2d(h, self.second[:, :, None, None], self.bias)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense nn.Conv2d."""
        k = self.weight_matrix().detach().reshape(self.out_channels, self.in_channels, *self.kernel_size)
        return self.dense_conv(k, self.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.geometry_spec(), "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        nx, ny = cls.geometry_dims(spec)
        _check_rank(spec, nx, ny)
        return nx, ny

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankConv2d:
        return cls(
            spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), spec["rank"], stride=tuple(spec["stride"]),
            padding=spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
            dilation=tuple(spec["dilation"]), bias=spec["bias"], padding_mode=spec["padding_mode"],
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.notation()}, {self.geometry_repr()}, bias={self.bias is not None}"


class LowRankTable(_LowRank):
    """A token table E (V x d) held as E^T = B A (B: d x r, A: r x V), serving both ends of a causal LM
    whose input embedding and output head share one matrix (tied embeddings), as one module
    reachable under both names: integer token ids are looked up, (A^T)[ids] B^T, and hidden states
    give logits over the vocabulary, (h B) A, never forming E. In the role of the head it costs
    r (d + V) multiply-adds a token instead of d V."""

    kind = "lowrank_table"

    def __init__(
        self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise MPOCompressError(f"rank must be a whole number >= 1, got {rank!r}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        second, first = _uniform_factors(num_embeddings, embedding_dim, rank, device, dtype)
        self._set_factors(second, first, None)

    @classmethod
    def from_factors(cls, second: torch.Tensor, first: torch.Tensor, padding_idx: int | None = None) -> LowRankTable:
        """A table holding copies of B (d, r) and A (r, V)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.num_embeddings, layer.embedding_dim, layer.padding_idx = int(first.shape[1]), int(second.shape[0]), padding_idx
        layer._set_factors(second.detach().clone(), first.detach().clone(), None)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The table E (V x d), multiplied out (for code that reads `embedding.weight`)."""
        return self.weight_matrix().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():  # the head: logits of hidden states
            return (x @ self.second) @ self.first
        return F.embedding(x, self.first.t()) @ self.second.t()

    def to_dense(self) -> nn.Embedding:
        """The equivalent nn.Embedding (tie a dense head to its weight to serve both ends)."""
        w = self.weight_matrix().detach()
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w.T)
        return dense

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "rank": self.rank,
            "padding_idx": self.padding_idx, "bias": False,
        }  # fmt: skip

    @classmethod
    def spec_dims(cls, spec: dict[str, Any]) -> tuple[int, int]:
        v, d = whole_field(spec, "num_embeddings"), whole_field(spec, "embedding_dim")
        _check_rank(spec, v, d)
        pad = spec.get("padding_idx")
        if pad is not None and (type(pad) is not int or not -v <= pad < v):
            raise ValueError(f"padding_idx must be empty or a token index within [-{v}, {v}), got {pad!r}")
        if spec.get("bias") is not False:
            raise ValueError("a token table has no bias (bias must be false)")
        return v, d

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankTable:
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["rank"], padding_idx=spec["padding_idx"])

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.notation()}, {self.num_embeddings}, {self.embedding_dim}{pad}, tied embedding and head"
