"""Pure tensor math for matrix product operators: no modules, no I/O.

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

Modes = tuple[int, ...]


# --------------------------------------------------------------------------- bonds and counts


def bond_caps(in_modes: Sequence[int], out_modes: Sequence[int]) -> list[int]:
    """Largest useful dimension of each of the n-1 inner bonds: min(prod of I_l J_l left of the
    bond, prod right of it). A larger bond adds parameters but no expressive power."""
    sizes = [i * j for i, j in zip(in_modes, out_modes)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def bond_dims_for(in_modes: Sequence[int], out_modes: Sequence[int], max_bond: int) -> list[int]:
    """Inner bond dimensions for bond dimension D: each bond is min(D, its cap)."""
    if max_bond < 1:
        raise MPOCompressError(f"bond dimension must be >= 1, got {max_bond}")
    return [min(max_bond, cap) for cap in bond_caps(in_modes, out_modes)]


def mpo_param_count(in_modes: Sequence[int], out_modes: Sequence[int], bond_dims: Sequence[int]) -> int:
    """Number of MPO parameters: sum_k D_{k-1} J_k I_k D_k (Eq. 6, with unequal D_k allowed)."""
    full = [1, *bond_dims, 1]
    return sum(full[k] * j * i * full[k + 1] for k, (i, j) in enumerate(zip(in_modes, out_modes)))


def compression_ratio(params_mpo: int, params_original: int) -> float:
    """rho of Eq. 9: MPO parameters over the original parameters of the replaced layers."""
    return params_mpo / params_original if params_original else float("nan")


def entanglement_entropy(singular_values: torch.Tensor) -> float:
    """S = -sum(lambda ln lambda) with lambda = v^2 / sum(v^2) (supplement, Eq. 1)."""
    v2 = singular_values.detach().to(torch.float64) ** 2
    total = v2.sum()
    if total <= 0:
        return 0.0
    lam = v2 / total
    lam = lam[lam > 0]
    return float(-(lam * lam.log()).sum())


# --------------------------------------------------------------------------- decomposition


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


def tt_svd(
    matrix: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    max_bond: int | None = None,
    eps: float | None = None,
    dtype: torch.dtype | None = None,
) -> TTDecomposition:
    """Factorize W (N_y x N_x) into an MPO by sequential SVD (TT-SVD), in float64.

    Args:
        matrix: the weight matrix W, rows are outputs (Eq. 2: y = W x).
        in_modes: I_1..I_n, product N_x. out_modes: J_1..J_n, product N_y.
        max_bond: bond dimension D; each bond is also capped at its largest useful value.
        eps: target relative Frobenius error; each of the n-1 SVDs may discard eps*||W||/sqrt(n-1).
        dtype: dtype of the returned cores (default: that of `matrix`).
    """
    _check_truncation(max_bond, eps)
    in_modes, out_modes = tuple(in_modes), tuple(out_modes)
    n = len(in_modes)
    if len(out_modes) != n:
        raise MPOCompressError(f"need as many input modes as output modes, got {in_modes} and {out_modes}")
    ny, nx = matrix.shape
    if math.prod(in_modes) != nx or math.prod(out_modes) != ny:
        raise MPOCompressError(
            f"modes {in_modes} -> {out_modes} do not fit a {ny}x{nx} matrix "
            f"(they multiply to {math.prod(in_modes)} and {math.prod(out_modes)})"
        )
    out_dtype = dtype or matrix.dtype
    w = matrix.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise MPOCompressError("cannot factorize a matrix with NaN or Inf entries")
    norm = float(torch.linalg.vector_norm(w))
    delta = eps * norm / math.sqrt(n - 1) if (eps and n > 1) else 0.0

    rest = w.reshape(*out_modes, *in_modes).permute(_interleave_perm(n))  # (J1, I1, ..., Jn, In)
    cores: list[torch.Tensor] = []
    spectra: list[torch.Tensor] = []
    bonds: list[int] = []
    discarded_sq = 0.0
    r_prev = 1
    for k in range(n - 1):
        rows = r_prev * out_modes[k] * in_modes[k]
        unfolding = rest.reshape(rows, -1)  # (D_{k-1} J_k I_k, J_{k+1} I_{k+1} ... Jn In)
        u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)
        r = _keep(s, max_bond, delta)
        discarded_sq += float(s[r:].square().sum())
        cores.append(u[:, :r].reshape(r_prev, out_modes[k], in_modes[k], r).to(out_dtype).contiguous())
        rest = s[:r, None] * vh[:r]  # (D_k, remaining)
        spectra.append(s)
        bonds.append(r)
        r_prev = r
    cores.append(rest.reshape(r_prev, out_modes[-1], in_modes[-1], 1).to(out_dtype).contiguous())
    rel = math.sqrt(discarded_sq) / norm if norm > 0 else 0.0
    return TTDecomposition(cores=cores, singular_values=spectra, bond_dims=bonds, rel_error=rel)


def tt_round(
    cores: Sequence[torch.Tensor],
    max_bond: int | None = None,
    eps: float | None = None,
) -> TTDecomposition:
    """Bring an MPO to canonical form and truncate its bonds, without forming W.

    Right-orthogonalizes the cores by QR, then sweeps left to right with SVDs. The singular values
    seen at each bond are then exactly the singular values of W's matching unfolding (the MPO's
    entanglement spectrum); with no max_bond and no eps nothing is truncated.
    """
    _check_truncation(max_bond, eps)
    out_dtype = cores[0].dtype
    cs = [c.detach().to(torch.float64) for c in cores]
    if not all(bool(torch.isfinite(c).all()) for c in cs):
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
        r = _keep(s, max_bond, delta)
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
    the entanglement spectra of the exact (untruncated) MPO, without building it."""
    n = len(in_modes)
    t = matrix.detach().to(torch.float64).reshape(*out_modes, *in_modes).permute(_interleave_perm(n))
    t = t.contiguous()
    out = []
    left = 1
    for k in range(n - 1):
        left *= in_modes[k] * out_modes[k]
        out.append(torch.linalg.svdvals(t.reshape(left, -1)))
    return out


# --------------------------------------------------------------------------- contraction


def mpo_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild W (N_y x N_x) from the cores (Eq. 5). Differentiable."""
    out_modes = [c.shape[1] for c in cores]
    in_modes = [c.shape[2] for c in cores]
    n = len(cores)
    acc = cores[0].reshape(-1, cores[0].shape[3])  # (J1 I1, D1)
    for core in cores[1:]:
        acc = acc @ core.reshape(core.shape[0], -1)  # (J1 I1 .. Jk Ik, D_k)
        acc = acc.reshape(-1, core.shape[3])
    t = acc.reshape([m for k in range(n) for m in (out_modes[k], in_modes[k])])
    inv = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))  # -> (J1..Jn, I1..In)
    return t.permute(inv).reshape(math.prod(out_modes), math.prod(in_modes))


def mpo_contract(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """y = W x for a batch of rows x (B, N_x) -> (B, N_y), contracting through the cores one by
    one without forming W. Differentiable."""
    b = x.shape[0]
    t = x.reshape(b, 1, -1)  # (M, D_0 I_1, I_2 .. I_n) with M = B
    m = b
    for core in cores:
        r0, j, i, r1 = core.shape
        t = t.reshape(m, r0 * i, -1)  # (M, D_{k-1} I_k, I_{k+1} .. I_n)
        mat = core.permute(1, 3, 0, 2).reshape(j * r1, r0 * i)  # (J_k D_k, D_{k-1} I_k)
        t = torch.matmul(mat, t)  # (M, J_k D_k, I_{k+1} .. I_n)
        m *= j  # M now runs over (B, J_1 .. J_k); the next D_k I_{k+1} group is contiguous
    return t.reshape(b, -1)


# --------------------------------------------------------------------------- costs and init


def contract_macs(
    in_modes: Sequence[int], out_modes: Sequence[int], bond_dims: Sequence[int], batch: int
) -> int:
    """Multiply-adds of `mpo_contract` for `batch` rows: at step k every (b, j_<k, i_>k) slice
    multiplies a D_{k-1} I_k vector by a (D_{k-1} I_k) x (J_k D_k) matrix."""
    full = [1, *bond_dims, 1]
    total = 0
    for k in range(len(in_modes)):
        left_j = math.prod(out_modes[:k])
        right_i = math.prod(in_modes[k + 1 :])
        total += batch * left_j * right_i * full[k] * in_modes[k] * out_modes[k] * full[k + 1]
    return total


def rebuild_macs(in_modes: Sequence[int], out_modes: Sequence[int], bond_dims: Sequence[int]) -> int:
    """Multiply-adds of `mpo_to_matrix`."""
    full = [1, *bond_dims, 1]
    total, left = 0, in_modes[0] * out_modes[0]
    for k in range(1, len(in_modes)):
        total += left * full[k] * in_modes[k] * out_modes[k] * full[k + 1]
        left *= in_modes[k] * out_modes[k]
    return total


def random_cores(
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    bond_dims: Sequence[int],
    target_std: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Random cores whose product W has elementwise std `target_std`.

    Each element of W is a sum over prod(D_k) paths of products of n independent core entries, so
    with entries of std s, Var(W) = prod(D_k) * s^(2n). We solve for s.
    """
    n = len(in_modes)
    full = [1, *bond_dims, 1]
    s = (target_std**2 / math.prod(bond_dims)) ** (1.0 / (2 * n)) if n else target_std
    return [
        torch.randn(full[k], out_modes[k], in_modes[k], full[k + 1], generator=generator, dtype=dtype, device=device)
        * s
        for k in range(n)
    ]


def balance_cores(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The same MPO in a balanced gauge: at every bond, the SVD of the two cores it joins,
    A B = U S Vh, is split evenly, A = U sqrt(S) and B = sqrt(S) Vh (one sweep, left to right);
    then the cores are rescaled to equal Frobenius norms (scalars whose product is 1).

    TT-SVD leaves every core but the last an isometry and puts the whole norm in the last one;
    gradient steps then move the cores at very different relative rates. Balanced cores have
    comparable norms and condition training better. W is unchanged up to rounding; bond
    dimensions are kept.
    """
    cs = [c.detach().to(torch.float64) for c in cores]
    for k in range(len(cs) - 1):
        r0, j, i, r1 = cs[k].shape
        _, j2, i2, r2 = cs[k + 1].shape
        pair = cs[k].reshape(r0 * j * i, r1) @ cs[k + 1].reshape(r1, j2 * i2 * r2)
        u, s, vh = torch.linalg.svd(pair, full_matrices=False)
        keep = min(r1, s.shape[0])  # never more than the bond holds; a bond wider than its cap keeps zeros
        root = s[:keep].sqrt()
        left = torch.zeros(r0 * j * i, r1, dtype=torch.float64, device=pair.device)
        right = torch.zeros(r1, j2 * i2 * r2, dtype=torch.float64, device=pair.device)
        left[:, :keep] = u[:, :keep] * root
        right[:keep] = root[:, None] * vh[:keep]
        cs[k] = left.reshape(r0, j, i, r1)
        cs[k + 1] = right.reshape(r1, j2, i2, r2)
    norms = [float(torch.linalg.vector_norm(c)) for c in cs]
    if all(n > 0 for n in norms):  # then equal Frobenius norms: scale core k by g / |core k|, product 1
        g = math.exp(sum(math.log(n) for n in norms) / len(norms))
        cs = [c * (g / n) for c, n in zip(cs, norms)]
    return [c.to(cores[0].dtype).contiguous() for c in cs]
