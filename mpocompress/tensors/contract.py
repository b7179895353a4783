"""Contraction of an input through the cores of an MPO, without forming W: merging consecutive
cores, rebuilding W (Eq. 5), and the batched products with a hand-written backward. Pure tensor
math: no modules, no I/O. Core layout (D_{k-1}, J_k, I_k, D_k) as in `mpocompress.tensors.decompose`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable


def merge_cores(cores: Sequence[torch.Tensor], for_contraction: bool = False) -> torch.Tensor:
    """Contract consecutive cores (D_a, J_k, I_k, D_k) .. (D_{l-1}, J_l, I_l, D_b) into one core
    (D_a, J_k..J_l, I_k..I_l, D_b) whose mode sizes are the products. Differentiable.

    The run is split in halves, each merged alike, and the halves joined by one GEMM over their
    shared bond and one copy that moves the right half's J before the left half's I: every product
    has the bond as its inner dimension and every copy is a 4-index transpose, where merging left
    to right ends with a GEMM whose other side is a single small core and a 2n-index permutation
    (2-3x slower for small layers, 1.3x for large ones; docs/performance.md).

    With `for_contraction` the last join lays the group out as (D_a, I, J, D_b) in memory (a
    (D_a, J, I, D_b) view of it is returned): `mpo_contract` multiplies by the (J D_b) x (D_a I)
    matrix of each group, which is then a transposed view of that memory, and by (D_a I) x J for
    the last group, a plain view: one copy per group instead of two.
    """
    if len(cores) == 1:
        return cores[0]
    half = len(cores) // 2
    return _join(merge_cores(cores[:half]), merge_cores(cores[half:]), for_contraction)


def _join(left: torch.Tensor, right: torch.Tensor, for_contraction: bool = False) -> torch.Tensor:
    """(D_a, J1, I1, D_k) and (D_k, J2, I2, D_b) merged into (D_a, J1 J2, I1 I2, D_b)."""
    da, j1, i1, dk = left.shape
    _, j2, i2, db = right.shape
    t = left.reshape(da * j1 * i1, dk) @ right.reshape(dk, j2 * i2 * db)
    if for_contraction:
        t = t.reshape(da, j1, i1, j2, i2, db).permute(0, 2, 4, 1, 3, 5).reshape(da, i1 * i2, j1 * j2, db)
        return t.transpose(1, 2)
    return t.reshape(da, j1, i1, j2, i2 * db).transpose(2, 3).reshape(da, j1 * j2, i1 * i2, db)

def mpo_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild W (N_y x N_x) from the cores (Eq. 5). Differentiable."""
    merged = merge_cores(cores)
    return merged.reshape(merged.shape[1], merged.shape[2])


class _SharedBmm(torch.autograd.Function):
    """out[s] = A @ T[s] for every slice s: a batched GEMM with one shared matrix A (P x R).

    Autograd's backward of bmm(A.expand(...), T) forms A's gradient slice by slice, G[s] @ T[s]^T,
    as an (S, P, R) tensor and then sums it: for a 4096x4096 layer at batch 512 that tensor is
    134 MB of writes and reads. Here the sum over slices is folded into GEMMs instead: chunks of
    about 2^20 numbers of G and T are laid side by side (copies that stay in cache), so
    grad A = sum over chunks of G_c (P x cQ) @ T_c^T (cQ x R), with a long inner dimension.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, t)
        return torch.bmm(a.expand(t.shape[0], *a.shape), t)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, t = ctx.saved_tensors
        grad_a = grad_t = None
        if ctx.needs_input_grad[0]:
            s, p, q = g.shape
            r = a.shape[1]
            step = max(1, (1 << 20) // max(p * q, 1))
            grad_a = torch.zeros_like(a)
            for c in range(0, s, step):
                gc = g[c : c + step].permute(1, 0, 2).reshape(p, -1)  # (P, c Q)
                tc = t[c : c + step].permute(1, 0, 2).reshape(r, -1)  # (R, c Q)
                grad_a.addmm_(gc, tc.T)
        if ctx.needs_input_grad[1]:
            grad_t = torch.bmm(a.T.expand(g.shape[0], *a.T.shape), g)
        return grad_a, grad_t


def mpo_contract(
    x: torch.Tensor, cores: Sequence[torch.Tensor], forms: Sequence[str] | None = None
) -> torch.Tensor:
    """y = W x for a batch of rows x (B, N_x) -> (B, N_y), contracting through the cores left to
    right without forming W. Differentiable.

    Pass merged cores (`merge_cores` over consecutive groups) to contract through fewer, larger
    factors. Before step k the intermediate is laid out (B J_1..J_{k-1}, D_{k-1} I_k, I_{k+1}..I_n),
    so no step permutes it: each multiplies every slice by core k seen as the
    (J_k D_k) x (D_{k-1} I_k) matrix, giving (B J_1..J_k, D_k I_{k+1}, I_{k+2}..I_n). How each step
    does this is its form: "fold" (one large GEMM, torch transposes the slices in and out) or
    "bmm" (a batched GEMM over the slices, no copies). The last step, whose slices are vectors, is
    always one GEMM. `forms` has one entry per core but the last; default "fold".

    On the CPU, rows are taken in chunks small enough that the largest intermediate stays within
    about 2^22 numbers (16 MB in float32, about half of a server's L3), so that the intermediates of
    a large layer stay in cache (docs/performance.md has the measured effect).
    """
    b = x.shape[0]
    if b > 1 and x.device.type == "cpu" and not tracing():
        per_row = _largest_intermediate(cores)
        if per_row * b > _CHUNK_NUMBERS:
            step = max(1, _CHUNK_NUMBERS // per_row)
            return torch.cat([_contract_rows(x[r : r + step], cores, forms) for r in range(0, b, step)])
    return _contract_rows(x, cores, forms)


_CHUNK_NUMBERS = 1 << 22


def tracing() -> bool:
    """Whether the call is being traced, exported or compiled: then shapes may be symbolic, so the
    row chunks (a Python loop over the batch) and the hand-written batched step are left out; the
    result is the same product."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _largest_intermediate(cores: Sequence[torch.Tensor]) -> int:
    """Numbers per row in the largest intermediate of `mpo_contract`: prod(J_<=k) D_k prod(I_>k)."""
    left_j, right_i, largest = 1, math.prod(int(c.shape[2]) for c in cores), 0
    for core in cores[:-1]:
        _, j, i, r1 = core.shape
        left_j, right_i = left_j * j, right_i // i
        largest = max(largest, left_j * r1 * right_i)
    return largest


def _contract_rows(x: torch.Tensor, cores: Sequence[torch.Tensor], forms: Sequence[str] | None) -> torch.Tensor:
    b = x.shape[0]
    m = b
    t = x
    n = len(cores)
    for k, core in enumerate(cores):
        r0, j, i, r1 = core.shape
        if k == n - 1:  # the rest is a vector per slice: one GEMM (M, D I) @ (D I, J)
            t = t.reshape(m, r0 * i) @ core.permute(0, 2, 1, 3).reshape(r0 * i, j * r1)  # a view of a group merged for it
            break
        t = t.reshape(m, r0 * i, -1)
        mat = core.permute(1, 3, 0, 2).reshape(j * r1, r0 * i)  # (J_k D_k, D_{k-1} I_k)
        if forms is not None and forms[k] == "bmm" and not tracing():
            needs_grad = torch.is_grad_enabled() and (mat.requires_grad or t.requires_grad)
            # without a gradient to take, the plain batched GEMM (no autograd.Function to enter)
            t = _SharedBmm.apply(mat, t) if needs_grad else torch.bmm(mat.expand(t.shape[0], *mat.shape), t)
        else:
            t = torch.matmul(mat, t)
        m = m * j  # not in place: under torch.jit.trace the sizes are tensors, and b is m
    return t.reshape(b, -1)

