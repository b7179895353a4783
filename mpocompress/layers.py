"""MPO layers: drop-in replacements for nn.Linear and nn.Conv2d whose weight is an MPO.

Each layer holds its cores as parameters and calls the pure functions of `mpocompress.mpo`. The
forward pass follows a contraction plan chosen per input shape and cached (`plan_for`): rebuild W
and call the dense op, contract the input through the cores, or merge consecutive cores into
groups and contract through those, whichever the cost model of `mpocompress.mpo` says is fastest.
While no gradient is needed for the cores (eval, `torch.no_grad()`), the merged groups (W itself
for the dense plan) are cached and reused until the cores change (`cache_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.mpo import (
    ContractionPlan,
    bond_caps,
    bond_dims_for,
    choose_plan,
    merge_cores,
    mpo_contract,
    mpo_param_count,
    mpo_to_matrix,
    random_cores,
    tt_svd,
)
from mpocompress.shapes import check_modes, factorize

Strategy = Literal["auto", "contract", "merged", "dense"]
STRATEGIES = ("auto", "contract", "merged", "dense")
_MAX_PLANS = 64  # plans cached per layer (one per input row count and mode)


def mpo_notation(in_modes: Sequence[int], out_modes: Sequence[int], bond_dims: Sequence[int]) -> str:
    """The paper's M^{J_1..J_n}_{I_1..I_n}(D) (Eq. 8). D is shown as one number when every bond is
    min(D, its cap), else as the list of inner bonds."""
    top = ",".join(map(str, out_modes))
    bottom = ",".join(map(str, in_modes))
    d = max(bond_dims) if bond_dims else 1
    uniform = list(bond_dims) == bond_dims_for(in_modes, out_modes, d) if bond_dims else True
    dtext = str(d) if uniform else ",".join(map(str, bond_dims))
    return f"M^{{{top}}}_{{{bottom}}}(D={dtext})"


def _resolve_bonds(in_modes: Sequence[int], out_modes: Sequence[int], bond_dim: int | Sequence[int]) -> list[int]:
    if isinstance(bond_dim, int):
        return bond_dims_for(in_modes, out_modes, bond_dim)
    bonds = [int(b) for b in bond_dim]
    if len(bonds) != len(in_modes) - 1:
        raise MPOCompressError(
            f"an MPO with {len(in_modes)} cores has {len(in_modes) - 1} inner bonds, got {len(bonds)} bond dims"
        )
    caps = bond_caps(in_modes, out_modes)
    if any(b < 1 or b > c for b, c in zip(bonds, caps)):
        raise MPOCompressError(f"bond dims {bonds} must each lie between 1 and their caps {caps}")
    return bonds


def resolve_modes(
    nx: int, ny: int, in_modes: Sequence[int] | None, out_modes: Sequence[int] | None, n_cores: int = 4
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Modes for an N_y x N_x weight: given ones are checked, missing ones are balanced splits into
    as many modes as the given side has (else n_cores)."""
    n = len(in_modes) if in_modes is not None else len(out_modes) if out_modes is not None else n_cores
    i_modes = check_modes(in_modes, nx, "input modes") if in_modes is not None else factorize(nx, n)
    o_modes = check_modes(out_modes, ny, "output modes") if out_modes is not None else factorize(ny, n)
    if len(i_modes) != len(o_modes):
        raise MPOCompressError(f"{len(i_modes)} input modes but {len(o_modes)} output modes; both need the same count")
    return i_modes, o_modes


def _copied(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [c.detach().clone(memory_format=torch.contiguous_format) for c in cores]


class _MPOBase(nn.Module):
    """Cores, shapes, cost model and strategy choice shared by MPOLinear and MPOConv2d."""

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]

    def _set_params(self, cores: Sequence[torch.Tensor], bias: torch.Tensor | None) -> None:
        self.in_modes = tuple(int(c.shape[2]) for c in cores)
        self.out_modes = tuple(int(c.shape[1]) for c in cores)
        self.cores = nn.ParameterList([nn.Parameter(c) for c in cores])
        if bias is not None:
            self.bias = nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        self.forward_strategy: Strategy = "auto"
        self.cache_weights = True
        self._plans: dict[tuple[Any, ...], ContractionPlan] = {}
        self._merged: dict[tuple[int, ...], tuple[tuple[Any, ...], list[torch.Tensor]]] = {}
        self._fast: tuple[int, tuple[int, ...], torch.Tensor] | None = None  # (rows, core versions, cached W)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles never carry caches
        return {**self.__dict__, "_plans": {}, "_merged": {}, "_fast": None}

    def _init_random(
        self, nx: int, ny: int, bond_dim: int | Sequence[int], in_modes: Sequence[int] | None,
        out_modes: Sequence[int] | None, n_cores: int, bias: bool, device: Any, dtype: torch.dtype | None,
    ) -> None:  # fmt: skip
        """Random cores and bias at the scale of PyTorch's default init for a layer of fan-in nx:
        weights of std 1/sqrt(3 nx) (those of U(-1/sqrt(nx), 1/sqrt(nx))), bias U(-1/sqrt(nx), 1/sqrt(nx))."""
        in_modes, out_modes = resolve_modes(nx, ny, in_modes, out_modes, n_cores)
        bonds = _resolve_bonds(in_modes, out_modes, bond_dim)
        dtype = dtype or torch.get_default_dtype()
        cores = random_cores(in_modes, out_modes, bonds, 1.0 / math.sqrt(3 * nx), dtype=dtype, device=device)
        bound = 1.0 / math.sqrt(nx)
        b = torch.empty(ny, device=device, dtype=dtype).uniform_(-bound, bound) if bias else None
        self._set_params(cores, b)

    @property
    def bond_dims(self) -> list[int]:
        return [int(c.shape[3]) for c in self.cores][:-1]

    @property
    def num_mpo_params(self) -> int:
        return mpo_param_count(self.in_modes, self.out_modes, self.bond_dims)

    @property
    def weight_numel(self) -> int:
        """Number of weights of the dense layer this MPO stands for."""
        return math.prod(self.in_modes) * math.prod(self.out_modes)

    def notation(self) -> str:
        return mpo_notation(self.in_modes, self.out_modes, self.bond_dims)

    def weight_matrix(self) -> torch.Tensor:
        """W (N_y x N_x) rebuilt from the cores; differentiable."""
        return mpo_to_matrix(list(self.cores))

    def set_forward_strategy(self, strategy: Strategy) -> None:
        """Force a kind of plan: "contract" (one core at a time), "merged" (the best plan that
        merges cores into 2..n-1 groups), "dense" (rebuild W) or "auto" (the fastest estimate)."""
        if strategy not in STRATEGIES:
            raise MPOCompressError(f"unknown forward strategy {strategy!r}; choose one of {STRATEGIES}")
        self.forward_strategy = strategy
        self._plans.clear()
        self._fast = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:  # .to(), .cuda(), .half(): new tensors
        self._merged.clear()
        self._plans.clear()
        self._fast = None
        return super()._apply(fn, *args, **kwargs)

    def clear_weight_cache(self) -> None:
        """Drop the cached merged cores (and W); they are rebuilt on the next no-grad call."""
        self._merged.clear()
        self._fast = None

    def _core_params(self) -> list[torch.Tensor]:
        return list(self._modules["cores"]._parameters.values())  # self.cores, without the ParameterList iterator

    def _versions(self) -> tuple[int, ...]:
        """The cores' identities and version counters: a cache built from them is valid while these
        are unchanged (in-place updates bump a counter; new Parameter objects change an identity)."""
        cores = self._modules["cores"]._parameters.values()  # what self.cores gives, without nn.Module's __getattr__
        return tuple([v for c in cores for v in (id(c), c._version)])

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_weight_cache()  # load_state_dict, with assign=True too: new values, old caches go
        super()._load_from_state_dict(*args, **kwargs)

    def plan_for(self, rows: int, backward: bool = False, cached: bool = False) -> ContractionPlan:
        """The contraction plan for `rows` input vectors (batch x positions for a conv): chosen
        once per (rows, backward, cached) by the cost model, then reused."""
        key = (rows, backward, cached, self.forward_strategy)
        plan = self._plans.get(key)
        if plan is None:
            kind = None if self.forward_strategy == "auto" else self.forward_strategy
            plan = choose_plan(self.in_modes, self.out_modes, self.bond_dims, rows, cached, backward, kind)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def strategy_for(self, rows: int) -> str:
        """The kind of plan ("dense", "contract" or "merged") a training step with `rows` inputs takes."""
        return self.plan_for(rows, backward=True).kind

    def _groups(self, sizes: tuple[int, ...], use_cache: bool) -> list[torch.Tensor]:
        """The cores merged into consecutive groups of the given sizes (cached when allowed)."""
        cores = self._core_params()
        if use_cache:
            stamp = self._versions()
            hit = self._merged.get(sizes)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        groups, k = [], 0
        for m in sizes:
            groups.append(merge_cores(cores[k : k + m]))
            k += m
        if use_cache:
            self._merged[sizes] = (stamp, [g.detach() for g in groups])
        return groups

    def _plan_call(self, n_rows: int, x: torch.Tensor) -> tuple[ContractionPlan, bool]:
        """This call's plan and whether it may use cached merged cores (only when no gradient
        must reach the cores)."""
        if torch.is_grad_enabled():
            core_grad = any(c.requires_grad for c in self._core_params())
            use_cache, backward = self.cache_weights and not core_grad, core_grad or x.requires_grad
        else:
            use_cache, backward = self.cache_weights, False
        return self.plan_for(n_rows, backward, use_cache), use_cache

    def _contract(self, rows: torch.Tensor, plan: ContractionPlan, use_cache: bool) -> torch.Tensor:
        """y = W rows + bias through the plan's merged groups."""
        y = mpo_contract(rows, self._groups(plan.sizes, use_cache), plan.forms)
        return y + self.bias if self.bias is not None else y

    def _weight(self, use_cache: bool) -> torch.Tensor:
        """W (N_y x N_x) for the dense plan, cached when allowed."""
        merged = self._groups((len(self.cores),), use_cache)[0]
        return merged.view(merged.shape[1], merged.shape[2])


class MPOLinear(_MPOBase):
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
        in_f = math.prod(int(c.shape[2]) for c in cores)
        out_f = math.prod(int(c.shape[1]) for c in cores)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_f, out_f
        layer._set_params(_copied(cores), bias.detach().clone() if bias is not None else None)
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
        if bond_dim is None and eps is None:
            raise MPOCompressError("give a bond dimension or a relative error eps to factorize a layer")
        in_modes, out_modes = resolve_modes(linear.in_features, linear.out_features, in_modes, out_modes, n_cores)
        dec = tt_svd(linear.weight, in_modes, out_modes, max_bond=bond_dim, eps=eps)
        return cls.from_cores(dec.cores, linear.bias)

    def to_dense(self) -> nn.Linear:
        """The equivalent dense nn.Linear."""
        w = self.weight_matrix().detach()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this layer's skeleton (for checkpoints)."""
        return {
            "kind": "linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "bond_dims": self.bond_dims,
            "bias": self.bias is not None,
        }

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast  # eval fast path: same row count, no grad, cores unchanged since W was cached
        if (
            fast is not None and x.dim() == 2 and x.shape[0] == fast[0] and self.cache_weights
            and not torch.is_grad_enabled() and fast[1] == self._versions()
        ):  # fmt: skip
            return F.linear(x, fast[2], self._parameters["bias"])  # self.bias, looked up directly
        lead = x.shape[:-1]
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (B, N_x)
        plan, use_cache = self._plan_call(rows.shape[0], x)
        if plan.kind == "dense":
            w = self._weight(use_cache)
            if use_cache and not torch.is_grad_enabled():
                self._fast = (rows.shape[0], self._versions(), w)
            y = F.linear(rows, w, self.bias)
        else:
            y = self._contract(rows, plan, use_cache)  # (B, N_y)
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.notation()}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class MPOConv2d(_MPOBase):
    """A 2-D convolution whose kernel, seen as the linear map from C_in*kh*kw inputs to C_out
    outputs (input index (c, u, v) row-major, as in `weight.reshape(C_out, -1)`), is an MPO.

    Stride, padding (ints or 'same'/'valid'), dilation and padding_mode are honoured per axis.
    Grouped convolutions are not supported. Random initialisation matches the std of PyTorch's
    default nn.Conv2d kernel, 1 / sqrt(3 * C_in * kh * kw).
    """

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
        layer._set_params(_copied(cores), bias.detach().clone() if bias is not None else None)
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
        if bond_dim is None and eps is None:
            raise MPOCompressError("give a bond dimension or a relative error eps to factorize a layer")
        w = conv.weight.reshape(conv.out_channels, -1)
        in_modes, out_modes = resolve_modes(w.shape[1], w.shape[0], in_modes, out_modes, n_cores)
        dec = tt_svd(w, in_modes, out_modes, max_bond=bond_dim, eps=eps)
        return cls.from_cores(
            dec.cores,
            in_channels=conv.in_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            bias=conv.bias,
        )

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

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "conv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "padding_mode": self.padding_mode,
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "bond_dims": self.bond_dims,
            "bias": self.bias is not None,
        }

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


MPO_LAYERS = (MPOLinear, MPOConv2d)


def layer_from_spec(spec: dict[str, Any]) -> MPOLinear | MPOConv2d:
    """An MPO layer skeleton (random values) with the shapes a checkpoint's metadata describes."""
    kind = spec.get("kind")
    if kind == "linear":
        return MPOLinear(
            spec["in_features"], spec["out_features"], bond_dim=spec["bond_dims"], in_modes=spec["in_modes"],
            out_modes=spec["out_modes"], bias=spec["bias"],
        )  # fmt: skip
    if kind == "conv2d":
        return MPOConv2d(
            spec["in_channels"], spec["out_channels"], spec["kernel_size"], bond_dim=spec["bond_dims"],
            stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"], bias=spec["bias"],
            padding_mode=spec["padding_mode"], in_modes=spec["in_modes"], out_modes=spec["out_modes"],
        )  # fmt: skip
    raise MPOCompressError(f"unknown MPO layer kind {kind!r} in checkpoint metadata")
