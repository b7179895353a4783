"""What every MPO layer shares: its cores as parameters, its shape, the contraction plan per input
size, and the explicit weight cache (`mpocompress.nn.cache`).

The forward pass follows a contraction plan chosen per input row count by the cost model of
`mpocompress.tensors.cost` and remembered (`plan_for`): rebuild W and call the dense op, contract
the input through the cores, or merge consecutive cores into groups and contract through those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn.cache import WeightCache, stamp
from mpocompress.nn.factorized import FactorizedLayer
from mpocompress.tensors import (
    ContractionPlan,
    MPOShape,
    choose_plan,
    merge_cores,
    mpo_contract,
    mpo_to_matrix,
    random_cores,
    resolve_bonds,
    resolve_modes,
    tt_svd,
)
from mpocompress.tensors.contract import tracing

Strategy = Literal["auto", "contract", "merged", "dense"]
STRATEGIES = ("auto", "contract", "merged", "dense")
_MAX_PLANS = 64  # plans remembered per layer (one per input row count and mode)
_NOMINAL_ROWS = 64  # the row count a plan is chosen for when the real one is symbolic
_FEW_ROWS = 8  # up to this many input rows, merged groups are laid out for the contraction (see _groups)


def copied(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous, detached copies of the cores (what a layer built from given cores holds)."""
    return [c.detach().clone(memory_format=torch.contiguous_format) for c in cores]


def factorized_cores(
    w: torch.Tensor, bond_dim: int | None, eps: float | None, in_modes: Sequence[int] | None,
    out_modes: Sequence[int] | None, n_cores: int,
) -> list[torch.Tensor]:  # fmt: skip
    """Cores of the N_y x N_x matrix w by TT-SVD truncated at bond dim D and/or relative error eps,
    with given modes or balanced splits into `n_cores` modes."""
    if bond_dim is None and eps is None:
        raise MPOCompressError("give a bond dimension or a relative error eps to factorize a layer")
    in_modes, out_modes = resolve_modes(w.shape[1], w.shape[0], in_modes, out_modes, n_cores)
    return tt_svd(w, in_modes, out_modes, max_bond=bond_dim, eps=eps).cores


class MPOCores:
    """What a layer storing MPO cores (D_{k-1}, J_k, I_k, D_k) in `cores`, with `in_modes` and
    `out_modes`, can say about its shape (MPOLayer, MPOEmbedding)."""

    cores: nn.ParameterList
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]

    @property
    def bond_dims(self) -> list[int]:
        return [int(c.shape[3]) for c in self.cores][:-1]

    @property
    def shape(self) -> MPOShape:
        return MPOShape(self.in_modes, self.out_modes, tuple(self.bond_dims))

    @property
    def num_mpo_params(self) -> int:
        return self.shape.param_count

    @property
    def ranks(self) -> list[int]:
        return self.bond_dims

    def notation(self) -> str:
        return self.shape.notation()


class MPOLayer(MPOCores, FactorizedLayer):
    """Base of MPOLinear and MPOConv2d: a dense map from N_x inputs to N_y outputs whose weight
    matrix is an MPO with cores (D_{k-1}, J_k, I_k, D_k), plus an optional bias."""

    structure = "mpo"
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
        self.weight_cache = WeightCache()
        self._plans: dict[tuple[Any, ...], ContractionPlan] = {}
        self._pinned: dict[int, tuple[ContractionPlan, bool]] = {}  # rows -> (plan, keep), see pin_plan

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles never carry remembered plans
        return {**self.__dict__, "_plans": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:  # pickles from before plans were pinned
        super().__setstate__(state)
        self.__dict__.setdefault("_pinned", {})

    def _init_random(
        self, nx: int, ny: int, bond_dim: int | Sequence[int], in_modes: Sequence[int] | None,
        out_modes: Sequence[int] | None, n_cores: int, bias: bool, device: Any, dtype: torch.dtype | None,
    ) -> None:  # fmt: skip
        """Random cores and bias at the scale of PyTorch's default init for a layer of fan-in nx:
        weights of std 1/sqrt(3 nx) (those of U(-1/sqrt(nx), 1/sqrt(nx))), bias U(-1/sqrt(nx), 1/sqrt(nx))."""
        in_modes, out_modes = resolve_modes(nx, ny, in_modes, out_modes, n_cores)
        shape = resolve_bonds(in_modes, out_modes, bond_dim)
        dtype = dtype or torch.get_default_dtype()
        cores = random_cores(shape, 1.0 / math.sqrt(3 * nx), dtype=dtype, device=device)
        bound = 1.0 / math.sqrt(nx)
        b = torch.empty(ny, device=device, dtype=dtype).uniform_(-bound, bound) if bias else None
        self._set_params(cores, b)

    # ------------------------------------------------------------------ shape

    @property
    def weight_numel(self) -> int:
        """Number of weights of the dense layer this MPO stands for."""
        return math.prod(self.in_modes) * math.prod(self.out_modes)

    def weight_matrix(self) -> torch.Tensor:
        """W (N_y x N_x) rebuilt from the cores; differentiable."""
        return mpo_to_matrix(list(self.cores))

    # ------------------------------------------------------------------ plans and cache

    def set_forward_strategy(self, strategy: Strategy) -> None:
        """Force a kind of plan: "contract" (one core at a time), "merged" (the best plan that
        merges cores into 2..n-1 groups), "dense" (rebuild W) or "auto" (the fastest estimate)."""
        if strategy not in STRATEGIES:
            raise MPOCompressError(f"unknown forward strategy {strategy!r}; choose one of {STRATEGIES}")
        self.forward_strategy = strategy
        self._plans.clear()
        self._pinned.clear()

    def pin_plan(self, rows: int, plan: ContractionPlan | None, keep: bool = False) -> None:
        """Use `plan` for calls of `rows` input vectors that need no gradient (what
        `optimize_for_inference` measured fastest there); with `keep`, its merged cores are kept
        between calls while the layer is materialized, and never without `keep`. None unpins.
        Calls that train, and other row counts, keep the cost model's choice."""
        if plan is None:
            self._pinned.pop(rows, None)
            return
        if sum(plan.sizes) != len(self.in_modes) or len(plan.forms) != max(len(plan.sizes) - 1, 0):
            raise MPOCompressError(f"plan {plan.describe()} does not fit a layer of {len(self.in_modes)} cores")
        self._pinned[rows] = (plan, keep)

    @property
    def pinned_plans(self) -> dict[int, tuple[ContractionPlan, bool]]:
        """The (plan, keep) pinned per row count (`pin_plan`)."""
        return dict(self._pinned)

    def materialize(self) -> MPOLayer:
        """Keep the merged cores (W for the dense plan) between calls that need no gradient for the
        cores, until `release()`. Do not write the cores through `.data` meanwhile (see
        `mpocompress.nn.cache`)."""
        self.weight_cache.enabled = True
        return self

    def release(self) -> MPOLayer:
        """Stop caching and free what was cached: every call computes from the cores again."""
        self.weight_cache.enabled = False
        self.weight_cache.clear()
        return self

    def _core_params(self) -> list[torch.Tensor]:
        return list(self._modules["cores"]._parameters.values())  # self.cores, without the ParameterList iterator

    def plan_for(self, rows: int, backward: bool = False, cached: bool = False) -> ContractionPlan:
        """The contraction plan for `rows` input vectors (batch x positions for a conv): chosen
        once per (rows, backward, cached) by the cost model, then reused."""
        if isinstance(rows, torch.Tensor) and torch.jit.is_tracing():  # torch.jit.trace sees sizes as tensors
            rows = int(rows)  # the traced row count, as the trace's other shapes are
        if not isinstance(rows, int):  # a symbolic size (torch.export, torch.compile): plan for a typical batch
            rows = _NOMINAL_ROWS
        if rows == 0:  # an empty batch: rebuild W and let the dense op return the empty output
            return ContractionPlan((len(self.in_modes),))
        kind = None if self.forward_strategy == "auto" else self.forward_strategy
        if torch.jit.is_tracing():  # every traced call reads the same attributes: no remembered plan
            # torch.jit.trace checks its graph by tracing again without grad: one plan for both modes
            return choose_plan(self.shape, rows, cached, False, kind)
        key = (rows, backward, cached, self.forward_strategy)
        plan = self._plans.get(key)
        if plan is None:
            plan = choose_plan(self.shape, rows, cached, backward, kind)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _groups(self, sizes: tuple[int, ...], use_cache: bool, rows: int = _NOMINAL_ROWS) -> list[torch.Tensor]:
        """The cores merged into consecutive groups of the given sizes (cached when allowed).

        For a few rows (`_FEW_ROWS`) the groups are laid out for the contraction (`merge_cores`'s
        `for_contraction`: one copy per group instead of two), which pays where the merges are most
        of a call (batch 1; docs/performance.md); for large batches the usual layout multiplies
        faster. A kept entry serves every row count in the layout it was made in."""
        cores = self._core_params()
        if use_cache:
            current = stamp(cores)
            hit = self.weight_cache.get(sizes, current)
            if hit is not None:
                return hit
        laid_out = len(sizes) > 1 and isinstance(rows, int) and rows <= _FEW_ROWS
        groups, k = [], 0
        for m in sizes:
            groups.append(merge_cores(cores[k : k + m], for_contraction=laid_out))
            k += m
        if use_cache:
            self.weight_cache.put(sizes, current, [g.detach() for g in groups])
        return groups

    def _plan_call(self, n_rows: int, x: torch.Tensor) -> tuple[ContractionPlan, bool]:
        """This call's plan and whether it may use cached merged cores (only when materialized and
        no gradient must reach the cores): the plan pinned for this row count if any, else the cost
        model's."""
        enabled = self.weight_cache.enabled and not tracing()  # a graph computes from the cores
        if torch.is_grad_enabled():
            core_grad = any(c.requires_grad for c in self._core_params())
            use_cache, backward = enabled and not core_grad, core_grad or x.requires_grad
        else:
            use_cache, backward = enabled, False
        # a plan measured for inference serves calls that take no gradient, and every call in eval mode
        pinned = None if (backward and self.training) or not isinstance(n_rows, int) else self._pinned.get(n_rows)
        if pinned is not None:  # kept merged cores only where they paid (and never when the cores need a gradient)
            return pinned[0], pinned[1] and use_cache
        return self.plan_for(n_rows, backward, use_cache), use_cache

    def _contract(self, rows: torch.Tensor, plan: ContractionPlan, use_cache: bool) -> torch.Tensor:
        """y = W rows + bias through the plan's merged groups."""
        y = mpo_contract(rows, self._groups(plan.sizes, use_cache, rows.shape[0]), plan.forms)
        return y + self.bias if self.bias is not None else y

    def _weight(self, use_cache: bool) -> torch.Tensor:
        """W (N_y x N_x) for the dense plan, cached when allowed."""
        merged = self._groups((len(self.cores),), use_cache)[0]
        return merged.view(merged.shape[1], merged.shape[2])
