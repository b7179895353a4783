"""Decomposition of a matrix into an MPO and back to canonical form: TT-SVD (Eq. 5), rounding,
entanglement spectra and entropies (supplement II C). Pure tensor math: no modules, no I/O.

Notation follows the paper (Eqs. 3-9). A weight matrix W has shape (N_y, N_x). Its output index y is
split row-major into (j_1..j_n) with mode sizes J_k, its input index x into (i_1..i_n) with sizes
I_k. Core k is stored as a tensor of shape (D_{k-1}, J_k, I_k, D_k), D_0 = D_n = 1, so that for
fixed (j_k, i_k) it is the D_{k-1} x D_k matrix w(k)[j_k, i_k] of Eq. 5. This is also tensorly's
TT-matrix layout, with the matrix rows being the outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpocompress.errors import MPOCompressError
from mpocompress.tensors.numeric import all_finite, frobenius_norm


def entanglement_entropy(singular_values: torch.Tensor) -> float:
    """S = -sum(lambda ln lambda) with lambda = v^2 / sum(v^2) (supplement, Eq. 1)."""
    v2 = singular_values.detach().to(torch.float64) ** 2
    total = v2.sum()
    if total <= 0:
        return 0.0
    lam = v2 / total
    lam = lam[lam > 0]
    return float(-(lam * lam.log()).sum())




@dataclass
class TTDecomposition:
    """Result of a sequential SVD (or of rounding an MPO).

    Attributes:
        cores: the n cores, shapes (D_{k-1}, J_k, I_k, D_k).
        singular_values: for each inner bond, every singular value seen at that bond before
            truncation (float64), largest first.
        bond_dims: the kept dimension of each inner bond.
        rel_error: ||W - W_mpo||_F / ||W||_F. With orthonormal left factors the errors made at each
            bond are orthogonal, so this is exactly sqrt(sum of squared discarded values) / ||W||.
    """

    cores: list[torch.Tensor]
    singular_values: list[torch.Tensor]
    bond_dims: list[int]
    rel_error: float


def _interleave_perm(n: int) -> list[int]:
    # (J_1..J_n, I_1..I_n) -> (J_1, I_1, J_2, I_2, ..., J_n, I_n)
    return [p for k in range(n) for p in (k, n + k)]


def _keep(s: torch.Tensor, max_bond: int | None, delta: float) -> int:
    """How many singular values to keep: at most max_bond, and as few as leave a tail <= delta."""
    r = s.numel()
    if max_bond is not None:
        r = min(r, max_bond)
    if delta > 0:
        # tail[i] = sqrt(sum_{l >= i} s_l^2); keep the smallest r with tail[r] <= delta
        tail = s.flip(0).square().cumsum(0).flip(0).sqrt()
        r = min(r, max(1, int((tail > delta).sum())))
    return max(r, 1)


def _check_truncation(max_bond: int | None, eps: float | None) -> None:
    if max_bond is not None and (not isinstance(max_bond, int) or max_bond < 1):
        raise MPOCompressError(f"bond dimension must be a whole number >= 1, got {max_bond!r}")
    if eps is not None and not (0.0 < eps < 1.0):
        raise MPOCompressError(f"relative error eps must lie strictly between 0 and 1, got {eps!r}")


_BLOCK = 1 << 19  # numbers per float64 block (4 MB) when a Gram matrix or U^T A is accumulated from a float32 matrix
_GRAM_FLOOR = 1e-8  # below this share of the energy discarded, a Gram step is redone by exact SVD
TT_METHODS = ("auto", "svd", "gram")


def _gram_rows(a: torch.Tensor) -> torch.Tensor:
    """A A^T in float64, accumulated over column blocks (A may be float32 and large)."""
    m, n = a.shape
    g = torch.zeros(m, m, dtype=torch.float64, device=a.device)
    step = max(1, _BLOCK // max(m, 1))
    for c in range(0, n, step):
        blk = a[:, c : c + step].to(torch.float64)
        g.addmm_(blk, blk.T)
    return g


def _left_times(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """U^T A in float64 for a float64 U and a possibly float32 A, by column blocks."""
    m, n = a.shape
    out = torch.empty(u.shape[1], n, dtype=torch.float64, device=a.device)
    step = max(1, _BLOCK // max(m, 1))
    for c in range(0, n, step):
        out[:, c : c + step] = u.T @ a[:, c : c + step].to(torch.float64)
    return out


def _eig_desc(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and vectors from a Gram matrix's eigendecomposition."""
    lam, vec = torch.linalg.eigh(g)
    return lam.flip(0).clamp_min(0).sqrt(), vec.flip(1)


def _gram_eig(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and vectors of the short side of A from its smaller Gram matrix."""
    return _eig_desc(_gram_rows(a) if a.shape[0] <= a.shape[1] else _gram_rows(a.T))


def _split(
    a: torch.Tensor, max_bond: int | None, delta: float, method: str,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One TT-SVD step on the unfolding A (m x n): an orthonormal left factor U_r (m x r), the
    remainder U_r^T A (r x n) and every singular value of A, all float64.

    "svd" is LAPACK's SVD. "gram" diagonalizes the smaller Gram matrix (A A^T or A^T A) in float64,
    which costs one GEMM and an eigendecomposition of the short side instead of an SVD of A; the
    kept subspace is the same as the SVD's up to rounding of order 1e-16 ||A||^2 in captured energy.
    "auto" is "gram", except that a step discarding less than 1e-8 of the energy (a nearly exact
    factorization, where that rounding could matter) is redone by exact SVD. `eig`: `_gram_eig(a)`
    if already made (one per unfolding serves every truncation of it).
    """
    m, n = a.shape
    if method != "svd":
        s, vecs = eig if eig is not None else _gram_eig(a)
        r = _keep(s, max_bond, delta)
        if not (method == "auto" and _nearly_exact(s, r)):
            if m <= n:  # vecs are A's left singular vectors
                u = vecs[:, :r].contiguous()
                return u, _left_times(u, a), s
            v = vecs[:, :r]  # right singular vectors: A V_r = Q R, and Q spans A's top r directions
            u, tri = torch.linalg.qr(a.to(torch.float64) @ v)
            return u, tri @ v.T, s
    u_full, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    r = _keep(s, max_bond, delta)
    return u_full[:, :r], s[:r, None] * vh[:r], s


def _split_first(
    w: torch.Tensor, out_modes: tuple[int, ...], in_modes: tuple[int, ...], max_bond: int | None, delta: float,
    method: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """The first TT-SVD step ("gram"/"auto") read straight from W, without the permuted copy of W.

    The first unfolding A has rows (j1, i1) and columns (j2, i2, ..., jn, in). Its Gram matrix does
    not depend on the order of the columns, so it is accumulated from blocks of W viewed as
    (J1, J', I1, I'), J' = (j2..jn), I' = (i2..in); so is U^T A, whose columns are put in the
    interleaved order at the end (r x N_y N_x / (J1 I1) numbers, small). Returns None where `_split`
    must do the step (exact SVD asked for or needed, or A taller than wide).
    """
    j1, i1 = out_modes[0], in_modes[0]
    ny, nx = w.shape
    jr, ir = ny // j1, nx // i1
    m = j1 * i1
    if method == "svd" or m > jr * ir:
        return None
    w4 = w.contiguous().view(j1, jr, i1, ir)
    step = max(1, _BLOCK // (m * ir))

    def block(start: int, count: int) -> torch.Tensor:  # columns (J' in [start, start+count), I') of A, float64
        part = w4[:, start : start + count]
        out = torch.empty(j1, i1, part.shape[1], ir, dtype=torch.float64, device=w.device)
        out.copy_(part.permute(0, 2, 1, 3))
        return out.view(m, -1)

    g = torch.zeros(m, m, dtype=torch.float64, device=w.device)
    for start in range(0, jr, step):
        b = block(start, step)
        g.addmm_(b, b.T)
    s, vecs = _eig_desc(g)
    r = _keep(s, max_bond, delta)
    if method == "auto" and _nearly_exact(s, r):
        return None
    u = vecs[:, :r].contiguous()
    # U^T A, written straight into the interleaved layout (r, j2, i2, ..., jn, in) one j2 slab at a
    # time: a slab is (r, j3..jn, i2..in), put in the order (r, i2, j3, i3, ..., jn, in)
    n = len(out_modes)
    rest = torch.empty(r, *[d for k in range(1, n) for d in (out_modes[k], in_modes[k])], dtype=torch.float64, device=w.device)
    per_slab = jr // out_modes[1]
    to_slab = [0, n - 1] + [x for k in range(n - 2) for x in (1 + k, n + k)]
    for a in range(out_modes[1]):
        slab = torch.empty(r, per_slab, ir, dtype=torch.float64, device=w.device)
        for start in range(0, per_slab, step):
            count = min(step, per_slab - start)
            slab[:, start : start + count] = (u.T @ block(a * per_slab + start, count)).view(r, count, ir)
        rest[:, a] = slab.view(r, *out_modes[2:], *in_modes[1:]).permute(to_slab)
    return u, rest.view(r, -1), s


def _nearly_exact(s: torch.Tensor, r: int) -> bool:
    """Whether truncating to r values discards a positive share of energy below _GRAM_FLOOR."""
    sq = s.square()
    tail, total = float(sq[r:].sum()), float(sq.sum())
    return 0.0 < tail < _GRAM_FLOOR * total


def _checked(
    matrix: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int], method: str
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], float]:
    """W detached, the modes as tuples and ||W||, once the method, modes and entries are checked."""
    if method not in TT_METHODS:
        raise MPOCompressError(f"unknown TT-SVD method {method!r}; choose one of {TT_METHODS}")
    in_modes, out_modes = tuple(in_modes), tuple(out_modes)
    if len(out_modes) != len(in_modes):
        raise MPOCompressError(f"need as many input modes as output modes, got {in_modes} and {out_modes}")
    ny, nx = matrix.shape
    if math.prod(in_modes) != nx or math.prod(out_modes) != ny:
        raise MPOCompressError(
            f"modes {in_modes} -> {out_modes} do not fit a {ny}x{nx} matrix "
            f"(they multiply to {math.prod(in_modes)} and {math.prod(out_modes)})"
        )
    w = matrix.detach()
    if not all_finite(w):
        raise MPOCompressError("cannot factorize a matrix with NaN or Inf entries")
    return w, in_modes, out_modes, frobenius_norm(w)


def tt_svd_sweep(
    matrix: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int], bond_dims: Sequence[int],
    dtype: torch.dtype | None = None, method: str = "auto",
) -> dict[int, TTDecomposition]:  # fmt: skip
    """`tt_svd(matrix, in_modes, out_modes, max_bond=D)` for every D of `bond_dims`, equal to those
    calls bit for bit, with the work they share done once: W is checked once, and each step's
    unfolding, which depends only on the bonds kept before it, is decomposed once for every D that
    reaches it with the same bonds (D = 16 and 32 share every step before the first bond that D = 16 caps)."""
    for d in bond_dims:
        _check_truncation(d, None)
    w, in_modes, out_modes, norm = _checked(matrix, in_modes, out_modes, method)
    n, out_dtype = len(in_modes), dtype or matrix.dtype
    found: dict[int, TTDecomposition] = {}

    def descend(k: int, rest: torch.Tensor, ds: list[int], cores: list, spectra: list, discarded_sq: float) -> None:
        r_prev = cores[-1].shape[3] if cores else 1
        if k == n - 1:
            last = rest.to(torch.float64).reshape(r_prev, out_modes[-1], in_modes[-1], 1).to(out_dtype).contiguous()
            rel = math.sqrt(discarded_sq) / norm if norm > 0 else 0.0
            for d in ds:
                found[d] = TTDecomposition(cores=[*cores, last], singular_values=list(spectra),
                                           bond_dims=[int(c.shape[3]) for c in cores], rel_error=rel)  # fmt: skip
            return
        unfolding = rest.reshape(r_prev * out_modes[k] * in_modes[k], -1) if rest is not None else None
        eig = _gram_eig(unfolding) if unfolding is not None and method != "svd" else None
        kept: dict[int, list[int]] = {}  # bonds kept at this step -> the Ds keeping them
        rows = r_prev * out_modes[k] * in_modes[k]
        cap = min(rows, (w.numel() // (out_modes[0] * in_modes[0])) if unfolding is None else unfolding.shape[1])
        for d in ds:
            kept.setdefault(min(d, cap), []).append(d)
        for group in kept.values():
            if unfolding is None:  # the first step read straight from W, as tt_svd does it
                first = _split_first(w, out_modes, in_modes, group[0], 0.0, method)
                if first is None:
                    whole = w.reshape(*out_modes, *in_modes).permute(_interleave_perm(n)).contiguous()
                    descend(k, whole, group, cores, spectra, discarded_sq)
                    continue
                u, nxt, s = first
            else:
                u, nxt, s = _split(unfolding, group[0], 0.0, method, eig=eig)
            r = u.shape[1]
            core = u.reshape(r_prev, out_modes[k], in_modes[k], r).to(out_dtype).contiguous()
            descend(k + 1, nxt, group, [*cores, core], [*spectra, s], discarded_sq + float(s[r:].square().sum()))

    if n == 1:
        return {d: tt_svd(w, in_modes, out_modes, max_bond=d, dtype=dtype, method=method) for d in bond_dims}
    descend(0, None, sorted(set(bond_dims)), [], [], 0.0)
    return {d: found[d] for d in bond_dims}


def tt_svd(
    matrix: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    max_bond: int | None = None,
    eps: float | None = None,
    dtype: torch.dtype | None = None,
    method: str = "auto",
) -> TTDecomposition:
    """Factorize W (N_y x N_x) into an MPO by sequential SVD (TT-SVD), in float64 arithmetic.

    Args:
        matrix: the weight matrix W, rows are outputs (Eq. 2: y = W x).
        in_modes: I_1..I_n, product N_x. out_modes: J_1..J_n, product N_y.
        max_bond: bond dimension D; each bond is also capped at its largest useful value.
        eps: target relative Frobenius error; each of the n-1 SVDs may discard eps*||W||/sqrt(n-1).
        dtype: dtype of the returned cores (default: that of `matrix`).
        method: how each unfolding is split: "svd" (exact SVD), "gram" (eigendecomposition of the
            smaller Gram matrix) or "auto" (Gram, with exact SVD where a step is nearly exact);
            see `_split`. W is never copied whole to float64: the first Gram matrix is
            accumulated block by block.
    """
    _check_truncation(max_bond, eps)
    w, in_modes, out_modes, norm = _checked(matrix, in_modes, out_modes, method)
    n = len(in_modes)
    out_dtype = dtype or matrix.dtype
    delta = eps * norm / math.sqrt(n - 1) if (eps and n > 1) else 0.0

    cores: list[torch.Tensor] = []
    spectra: list[torch.Tensor] = []
    bonds: list[int] = []
    discarded_sq = 0.0
    r_prev = 1
    first = _split_first(w, out_modes, in_modes, max_bond, delta, method) if n > 1 else None
    if first is None:  # (J1, I1, ..., Jn, In): a copy in W's own dtype; float64 only block by block
        rest = w.reshape(*out_modes, *in_modes).permute(_interleave_perm(n)).contiguous()
    for k in range(n - 1):
        if k == 0 and first is not None:
            u, rest, s = first
        else:
            rows = r_prev * out_modes[k] * in_modes[k]
            unfolding = rest.reshape(rows, -1)  # (D_{k-1} J_k I_k, J_{k+1} I_{k+1} ... Jn In)
            u, rest, s = _split(unfolding, max_bond, delta, method)
        r = u.shape[1]
        discarded_sq += float(s[r:].square().sum())
        cores.append(u.reshape(r_prev, out_modes[k], in_modes[k], r).to(out_dtype).contiguous())
        spectra.append(s)
        bonds.append(r)
        r_prev = r
    rest = rest.to(torch.float64)
    cores.append(rest.reshape(r_prev, out_modes[-1], in_modes[-1], 1).to(out_dtype).contiguous())
    rel = math.sqrt(discarded_sq) / norm if norm > 0 else 0.0
    return TTDecomposition(cores=cores, singular_values=spectra, bond_dims=bonds, rel_error=rel)


def tt_round(
    cores: Sequence[torch.Tensor],
    max_bond: int | None = None,
    eps: float | None = None,
    bonds: Sequence[int] | None = None,
) -> TTDecomposition:
    """Bring an MPO to canonical form and truncate its bonds, without forming W.

    Right-orthogonalizes the cores by QR, then sweeps left to right with SVDs. The singular values
    seen at each bond are then exactly the singular values of W's matching unfolding (the MPO's
    entanglement spectrum); with no max_bond, eps or bonds nothing is truncated. `bonds` caps each
    inner bond separately (n - 1 numbers).
    """
    _check_truncation(max_bond, eps)
    if bonds is not None and len(bonds) != len(cores) - 1:
        raise MPOCompressError(f"need {len(cores) - 1} bond caps for {len(cores)} cores, got {list(bonds)}")
    caps: list[int | None] = list(bonds) if bonds is not None else [max_bond] * (len(cores) - 1)
    if bonds is not None and max_bond is not None:
        caps = [min(b, max_bond) for b in bonds]
    out_dtype = cores[0].dtype
    cs = [c.detach().to(torch.float64) for c in cores]
    if not all(all_finite(c) for c in cs):
        raise MPOCompressError("cannot round an MPO with NaN or Inf entries")
    n = len(cs)
    # right-orthogonalize: cores 1..n-1 become right-orthonormal, the norm moves into core 0
    for k in range(n - 1, 0, -1):
        r0, j, i, r1 = cs[k].shape
        q, r = torch.linalg.qr(cs[k].reshape(r0, j * i * r1).T)  # (j i r1, m), (m, r0)
        m = q.shape[1]
        cs[k] = q.T.reshape(m, j, i, r1)
        cs[k - 1] = torch.tensordot(cs[k - 1], r.T, dims=([3], [0]))  # (.., r0) x (r0, m)
    norm = float(torch.linalg.vector_norm(cs[0]))
    delta = eps * norm / math.sqrt(n - 1) if (eps and n > 1) else 0.0
    spectra, bonds, discarded_sq = [], [], 0.0
    for k in range(n - 1):
        r0, j, i, r1 = cs[k].shape
        u, s, vh = torch.linalg.svd(cs[k].reshape(r0 * j * i, r1), full_matrices=False)
        r = _keep(s, caps[k], delta)
        discarded_sq += float(s[r:].square().sum())
        cs[k] = u[:, :r].reshape(r0, j, i, r)
        carry = s[:r, None] * vh[:r]  # (r, r1)
        cs[k + 1] = torch.tensordot(carry, cs[k + 1], dims=([1], [0]))
        spectra.append(s)
        bonds.append(r)
    rel = math.sqrt(discarded_sq) / norm if norm > 0 else 0.0
    return TTDecomposition([c.to(out_dtype).contiguous() for c in cs], spectra, bonds, rel)


def bond_spectra(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Exact singular values of every inner bond of an MPO (its entanglement spectra)."""
    return tt_round(cores).singular_values


def unfolding_spectra(
    matrix: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]
) -> list[torch.Tensor]:
    """Singular values of W's n-1 bond unfoldings, (J_1 I_1 .. J_k I_k) x (J_{k+1} I_{k+1} ..):
    the entanglement spectra of the exact (untruncated) MPO, without building it. Each comes from
    the eigenvalues of the unfolding's smaller Gram matrix, in float64 (values below about 1e-8 of
    the largest lose their relative precision, which entropies and errors do not feel)."""
    n = len(in_modes)
    t = matrix.detach().to(torch.float64).reshape(*out_modes, *in_modes).permute(_interleave_perm(n))
    t = t.contiguous()
    out = []
    left = 1
    for k in range(n - 1):
        left *= in_modes[k] * out_modes[k]
        a = t.reshape(left, -1)
        g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
        out.append(torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt())
    return out
