"""Factorizations that minimize a layer's error on its real inputs, not on its weights.

With X the (rows x N_x) matrix of a layer's calibration inputs and G = X^T X their second moment
(the Gram matrix, accumulated in float64), the output error of a replacement W~ is

    ||(W - W~) X^T||_F^2 = tr((W - W~) G (W - W~)^T) = ||(W - W~) L||_F^2,   L L^T = G.

So the best rank-r W~ is (W L)_r L^{-1}: the truncated SVD of the whitened matrix W L, mapped back
(the activation-whitened SVD of SVD-LLM). `whitening` regularizes G (G + lambda I, lambda a small
share of its mean diagonal, raised until the Cholesky factorization succeeds). For an MPO no closed
form exists; `refine_cores` improves given cores on the calibrated objective by L-BFGS and never
returns cores worse than those it was given. Pure tensor math: no modules, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from mpocompress.errors import MPOCompressError
from mpocompress.tensors.contract import mpo_to_matrix
from mpocompress.tensors.decompose import _eig_desc, _gram_eig, _nearly_exact
from mpocompress.tensors.numeric import all_finite

DAMP = 1e-6  # default regularization of a Gram matrix, as a share of its mean diagonal
_MAX_DAMP = 1e-1


@dataclass
class Bound:
    """What an error-correcting whitening needs of the one weight W it was made for: W M (float64)
    and the original outputs' centred energy tr(W G W^T). Holding these instead of M and G (each
    N_x^2 in float64: 254 MB for a 5632-wide input) is what lets a wide layer's refit fit in a
    streamed block's memory."""

    weight: torch.Tensor  # W as given (not copied)
    whitened: torch.Tensor  # W M
    energy: float

    def check(self, w: torch.Tensor) -> Bound:
        b = self.weight
        same = w.shape == b.shape and (
            (w.data_ptr() == b.data_ptr() and w.stride() == b.stride() and w.dtype == b.dtype) or torch.equal(w.detach().to(b.dtype), b.detach())
        )  # fmt: skip
        if not same:
            raise RuntimeError("internal: a whitening made for one weight was asked about another")
        return self


@dataclass
class Whitening:
    """A lower-triangular L with L L^T = G + damp * mean(diag G) * I (float64), and the damp used.

    Centred (`mean` given): G is the inputs' scatter about their mean, sum (x - mu)(x - mu)^T, and a
    replacement W~ also moves the bias by W mu - W~ mu, which removes the mean of its output error; the
    error is then ||(W - W~) L|| and the output energy it is relative to still includes the mean.

    Error-correcting (`bound` given, see `bound_whitening`): the replacement sees other inputs X'
    than the original layer X (those of a model whose earlier layers are already compressed) and
    should still give the original outputs: min ||X W^T - X' W~^T||. Then L is the factor of X'^T X',
    W L becomes W M with M = (X^T X') L^{-T}, and what no W~ can fix of the input change is `offset`.
    Such a whitening serves the one W it was made for: it keeps W M and the energy, not M.
    """

    factor: torch.Tensor
    damp: float
    mean: torch.Tensor | None = None  # mu of the inputs the outputs should be reproduced on (float64), when centred
    rows: int = 0  # input vectors behind the statistics (for the mean's share of the energy)
    mean_in: torch.Tensor | None = None  # mu' of the inputs W~ will see (error-correcting); None: mu
    bound: Bound | None = None  # error-correcting, for one weight: W M and its energy

    def whiten(self, w: torch.Tensor) -> torch.Tensor:
        """W L (W M when error-correcting) in float64: what W~ L should approach (not to be changed in
        place). Within `reusing_whitened`, made once per W."""
        if self.bound is not None:
            return self.bound.check(w).whitened
        memo = _WHITENED.get()
        if memo is None:
            return w.detach().to(torch.float64) @ self.factor
        key = (id(self), id(w), w._version)
        held = memo.get(key)
        if held is None or held[0] is not w:  # the W itself is held with it: its id cannot pass to another
            held = memo[key] = (w, w.detach().to(torch.float64) @ self.factor)
        return held[1]

    def _centred_energy(self, w: torch.Tensor) -> float:
        if self.bound is not None:
            return self.bound.check(w).energy
        return float(self.whiten(w).square().sum())

    def energy(self, w: torch.Tensor) -> float:
        """||W X^T||^2 over the calibration inputs (the denominator of every relative output error)."""
        e = self._centred_energy(w)
        if self.mean is not None:
            e += self.rows * float((w.detach().to(torch.float64) @ self.mean).square().sum())
        return e

    def offset(self, w: torch.Tensor) -> float:
        """The part of the output error no W~ can remove (0 unless error-correcting)."""
        if self.bound is None:
            return 0.0
        return max(0.0, self._centred_energy(w) - float(self.whiten(w).square().sum()))

    def bias_shift(self, w: torch.Tensor, approx: torch.Tensor) -> torch.Tensor | None:
        """W mu - W~ mu', what the bias gains (None when not centred)."""
        if self.mean is None:
            return None
        mean_in = self.mean_in if self.mean_in is not None else self.mean
        return w.detach().to(torch.float64) @ self.mean - approx.detach().to(torch.float64) @ mean_in

    def unwhiten_rows(self, a: torch.Tensor) -> torch.Tensor:
        """A L^{-1} for rows A (r x N_x): solves (A L^{-1}) L = A."""
        return torch.linalg.solve_triangular(self.factor, a, upper=False, left=False)

    def apply(self, approx: torch.Tensor) -> torch.Tensor:
        """W~ L in float64: an approximation weighed as `whiten` weighs W."""
        return approx.detach().to(torch.float64) @ self.factor

    def unwhiten_cols(self, b: torch.Tensor) -> torch.Tensor:
        """The output-side factor B of a whitened truncation, unchanged (no output-side weight)."""
        return b


_WHITENED: ContextVar[dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar("_WHITENED", default=None)


@contextmanager
def reusing_whitened() -> Iterator[None]:
    """Within it, a `Whitening`'s W L is made once per W (a float64 product of N_y x N_x^2) and reused,
    not remade by every spectrum, error meter, energy and refinement that reads it: weighing one
    layer's forms read it 20-40 times. What was made is let go at the exit (one layer's worth when
    entered per layer); nested, the outermost keeps them."""
    if _WHITENED.get() is not None:
        yield
        return
    token = _WHITENED.set({})
    try:
        yield
    finally:
        _WHITENED.reset(token)


TABLE_FLOOR = 0.1  # a token's weight floor in a table's weighting, as a share of the uniform 1/V
TABLE_CHUNK = 8192  # tokens of a table weighted at once


@dataclass
class TableWeighting:
    """Weights on both sides of a token table W = E^T (d x V) that also serves as a tied LM head.

    The head's logits are z = E h. With S the second moment of the hidden states h it reads and p
    the mean next-token distribution, the next-token KL a change dE causes is about
    1/2 sum_v p_v E_h[(dE h)_v^2] ~ 1/2 ||diag(p)^{1/2} dE S^{1/2}||^2 (the logits' Fisher, diag p - p p^T,
    taken by its diagonal, decoupled from h). In W's terms that is ||R dW C||^2 with R^T R = S
    (upper-triangular) and C = diag(sqrt(p + floor)): the best rank-r W~ is R^{-1} (R W C)_r C^{-1},
    a closed form. The floor (TABLE_FLOOR / V per token) keeps tokens the calibration text never
    predicts from being left unconstrained; the input end of the table is served by the same
    weights, since the tokens read most are the tokens predicted most."""

    left: torch.Tensor  # R (d x d), upper-triangular, float64
    columns: torch.Tensor  # sqrt(p + floor) per token (V,), float64
    mean = None  # never centred: a table has no bias to move
    _held: tuple[tuple, torch.Tensor, TableSVD] | None = field(default=None, init=False, repr=False, compare=False)

    def svd(self, w: torch.Tensor) -> TableSVD:
        """The SVD of R W C that every low-rank form of this table truncates (`TableSVD`), made once
        and held for the table last asked about (its d x d matrices, not R W C). The table is known
        by its memory, layout and version counter and by a sample of its entries (64 columns), not
        held: a table let go is not kept alive by its weighting (108 MiB for SmolLM2's)."""
        key, sample = _identity(w)
        held = self._held
        if held is not None and held[0] == key and torch.equal(held[1], sample):
            return held[2]
        g = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64, device=w.device)
        for cols, x in self._blocks(w):
            xc = x * self.columns[cols]
            g.addmm_(xc, xc.T)  # W C^2 W^T
        g = self.left @ g @ self.left.T
        energy = float(g.diagonal().sum())
        values, vectors = _eig_desc(g)
        out = TableSVD(values, vectors, energy)
        self._held = (key, sample, out)
        return out

    def _blocks(self, w: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """W's columns TABLE_CHUNK tokens at a time, in float64 (a vocabulary-wide table is hundreds
        of MB in float64: whole copies are never made)."""
        for s in range(0, w.shape[1], TABLE_CHUNK):
            cols = slice(s, s + TABLE_CHUNK)
            yield cols, w[:, cols].detach().to(torch.float64)

    def whiten(self, w: torch.Tensor) -> torch.Tensor:
        """R W C in float64 (one copy held, filled a block of tokens at a time)."""
        out = torch.empty(w.shape, dtype=torch.float64, device=w.device)
        for cols, x in self._blocks(w):
            torch.matmul(self.left, x, out=out[:, cols])
        return out.mul_(self.columns)

    apply = whiten

    def energy(self, w: torch.Tensor) -> float:
        """||R W C||^2 (the trace of the Gram `svd` diagonalizes)."""
        return self.svd(w).energy

    def weight_error(self, w: torch.Tensor, second: torch.Tensor, first: torch.Tensor) -> float:
        """The relative weight error ||W - B A|| / ||W|| of a low-rank table B A, a block of tokens at a
        time (B A is never formed whole). Its weighted error needs no pass: the discarded share of `svd`'s values."""
        diff_sq = total = 0.0
        second = second.to(torch.float64)
        for cols, x in self._blocks(w):  # no temporaries of the block's size besides B A's
            total += float(torch.linalg.vector_norm(x)) ** 2
            diff_sq += float(torch.linalg.vector_norm((second @ first[:, cols].to(torch.float64)).sub_(x))) ** 2
        return math.sqrt(diff_sq / total) if total > 0 else 0.0

    def lowrank(self, w: torch.Tensor, rank: int, dtype: torch.dtype) -> LowRank | None:
        """The rank-r table minimizing ||R (W - B A) C||: B = R^{-1} U_r S_r^{1/2} and A = S_r^{-1/2}
        U_r^T R W, from `svd` (U_r, S_r its top left vectors and values: C cancels, so R W C is never
        formed; A is made a block of tokens at a time). None where the Gram's rounding is not trusted
        (`_gram_trusted`): the caller then takes the SVD of R W C itself."""
        svd = self.svd(w)
        s, r = svd.values, min(rank, svd.values.numel())
        if not _gram_trusted(s, r):
            return None
        u, root = svd.vectors[:, :r], s[:r].sqrt()
        second = torch.linalg.solve_triangular(self.left, u * root, upper=True)
        coef = (u.T @ self.left).div_(root[:, None])
        first = torch.empty(r, w.shape[1], dtype=dtype, device=w.device)
        for cols, x in self._blocks(w):
            first[:, cols] = coef @ x
        return LowRank(second.to(dtype).contiguous(), first, s)

    def offset(self, w: torch.Tensor) -> float:
        return 0.0

    def bias_shift(self, w: torch.Tensor, approx: torch.Tensor) -> None:
        return None

    def unwhiten_rows(self, a: torch.Tensor) -> torch.Tensor:
        """A C^{-1} for rows A (r x V), in place (A is the caller's own, a vocabulary wide)."""
        return a.div_(self.columns)

    def unwhiten_cols(self, b: torch.Tensor) -> torch.Tensor:
        """R^{-1} B for columns B (d x r)."""
        return torch.linalg.solve_triangular(self.left, b, upper=True)


@dataclass(eq=False)
class TableSVD:
    """The SVD of a weighted table R W C (d x V) that its low-rank forms truncate, without R W C (hundreds
    of MB in float64): its singular values and left vectors from the d x d Gram R (W C^2 W^T) R^T,
    accumulated a block of tokens at a time, and that Gram's trace, the weighted energy. Every form
    of the table (five measured swaps, the weighing, the final one) shares it."""

    values: torch.Tensor  # descending, float64
    vectors: torch.Tensor  # left singular vectors (columns), float64
    energy: float  # ||R W C||^2


def _identity(w: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """What tells one table from another without holding it: where and how it lies in memory, its
    version counter (bumped by any change in place), and a copy of 64 of its columns."""
    step = max(1, w.shape[1] // 64)
    key = (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device, w._version)
    return key, w[:, ::step].clone()


def table_weighting(gram: torch.Tensor, mean_p: torch.Tensor, damp: float = DAMP) -> TableWeighting:
    """The `TableWeighting` of a tied table from the head inputs' Gram matrix (d x d, any scale) and
    the mean next-token distribution over the vocabulary (V,)."""
    if not (all_finite(gram) and all_finite(mean_p)):
        raise MPOCompressError("the LM head's calibration statistics hold NaN or Inf (the model produced them on the calibration data); check the data")
    low = whitening(gram, damp).factor  # L L^T = G + damping
    p = mean_p.detach().to(torch.float64).clamp_min(0)
    p = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1.0 / p.numel())
    return TableWeighting(low.T.contiguous(), (p + TABLE_FLOOR / p.numel()).sqrt())


def whitening(gram: torch.Tensor, damp: float = DAMP, total: torch.Tensor | None = None, rows: int = 0, owned: bool = False) -> Whitening:
    """The Cholesky factor of the regularized Gram matrix G = X^T X; centred on the inputs' mean when
    their sum `total` and count `rows` are given. Raises on NaN/Inf or a Gram matrix that is not
    square; a singular or indefinite one (rounding, dead inputs) gets more damping, up to 10 % of its
    mean diagonal, before giving up. With `owned` (a float64 G the caller gives up) G itself is
    centred and damped in place instead of a copy."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise MPOCompressError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    # one copy of G, changed in place (an MLP's 5632-wide Gram is 254 MB in float64): centred by a rank-one
    # update, damped on its diagonal; the Cholesky factorization reads its lower triangle only
    g = gram.detach() if owned and gram.dtype == torch.float64 else gram.detach().to(torch.float64, copy=True)
    mean = None
    if total is not None and rows > 0:
        mean = total.detach().to(torch.float64) / rows
        g.addr_(mean, mean, alpha=-rows)
    if not all_finite(g):
        raise MPOCompressError("the calibration inputs' Gram matrix holds NaN or Inf (the model produced them on the calibration data); check the data")
    scale = float(g.diagonal().mean())
    if scale <= 0:
        return Whitening(torch.eye(g.shape[0], dtype=torch.float64, device=g.device), 1.0, mean, rows)
    d, added = damp, 0.0
    diagonal = g.diagonal().clone() if _in_place(g) else None
    while True:
        if diagonal is not None:  # the factor overwrites G's lower triangle; the upper one keeps G
            g.diagonal().copy_(diagonal).add_(d * scale)
            if _cholesky_in_place(g):
                return Whitening(g, d, mean, rows)
        else:
            g.diagonal().add_(d * scale - added)
            added = d * scale
            factor, info = torch.linalg.cholesky_ex(g)
            if int(info) == 0:
                return Whitening(factor, d, mean, rows)
            del factor
        if d >= _MAX_DAMP:
            raise MPOCompressError("the calibration inputs' Gram matrix is not positive semi-definite; check the data")
        d = max(d * 10, 1e-10)


def _in_place(g: torch.Tensor) -> bool:
    """Whether `_cholesky_in_place` serves G: a contiguous float64 matrix in CPU memory, with SciPy."""
    if g.device.type != "cpu" or g.dtype != torch.float64 or not g.is_contiguous():
        return False
    try:
        from scipy.linalg import lapack  # noqa: F401  (tensorly's dependency)
    except ImportError:
        return False
    return True


def _cholesky_in_place(g: torch.Tensor) -> bool:
    """L with L L^T = G written over G's lower triangle, and G's strict upper triangle zeroed; False
    (G's lower triangle restored from its upper one, the diagonal left to the caller) where G is not
    positive definite. LAPACK's potrf on G's own memory: a 5632-wide Gram's factor costs no second
    254 MB matrix, and is the factor torch.linalg.cholesky gives to rounding (tested)."""
    from scipy.linalg import lapack

    # G in C order is G^T = G in Fortran order, whose upper triangle is G's lower one: potrf(upper)
    # on that view writes U = L^T there, and `clean=0` leaves the other triangle as it was
    _, info = lapack.dpotrf(g.numpy().T, lower=0, clean=0, overwrite_a=1)
    if info == 0:
        g.tril_()
        return True
    n, step = g.shape[0], 512
    for i in range(0, n, step):  # strict lower triangle := strict upper transposed, by blocks (no N^2 copy)
        j = min(i + step, n)
        g[i:j, :i] = g[:i, i:j].T
        block = g[i:j, i:j]
        block.copy_(block.triu(1) + block.triu(1).T)  # the diagonal is reset by the caller
    return False


def cross_whitening(
    gram_in: torch.Tensor, sum_in: torch.Tensor, gram: torch.Tensor, total: torch.Tensor, cross: torch.Tensor, rows: int,
    weight: torch.Tensor, damp: float = DAMP, centre: bool = True,
) -> Whitening:  # fmt: skip
    """The error-correcting whitening of `weight`: W~ will see inputs X' (Gram `gram_in`, sum `sum_in`)
    where W saw X (`gram`, `total`), row for row, with cross moment `cross` = X'^T X. Minimizing
    ||X W^T - X' W~^T|| (about the means when `centre`, the bias absorbing W mu - W~ mu') becomes
    min ||W M - W~ L||. `bound_whitening` on copies: the caller's statistics are left as they are."""
    held = {k: t.detach().to(torch.float64, copy=True) for k, t in (("gram_in", gram_in), ("gram", gram), ("cross", cross))}
    return bound_whitening(held, weight, sum_in, total, rows, damp, centre)


def bound_whitening(
    held: dict[str, torch.Tensor], weight: torch.Tensor, sum_in: torch.Tensor, total: torch.Tensor, rows: int,
    damp: float = DAMP, centre: bool = True,
) -> Whitening:  # fmt: skip
    """The error-correcting whitening of the one weight W (`Bound`) from float64 statistics in `held`
    that the caller gives up (each taken out, changed in place and freed as it is spent): "gram_in"
    (X'^T X'), and either "gram" and "cross" (X^T X, X'^T X) or their projections on W, "energy"
    (sum ||W x||^2, a scalar) and "cross_w" (X'^T X W^T, N_x x N_y). The energy comes first, then
    C W^T, then the factor of X'^T X' and W M = (L^{-1} C W^T)^T: at most two N_x^2 matrices at once."""
    if not all(all_finite(t) for t in (*held.values(), sum_in, total)):
        raise MPOCompressError("the calibration statistics hold NaN or Inf (the model produced them on the calibration data); check the data")
    w64 = weight.detach().to(torch.float64)
    mean = total.detach().to(torch.float64) / rows if centre else None
    if "energy" in held:
        raw = float(held.pop("energy"))
    else:
        g = held.pop("gram")
        raw = float(((w64 @ g) * w64).sum())  # tr(W X^T X W^T)
        del g
    energy = raw - rows * float((w64 @ mean).square().sum()) if mean is not None else raw  # about the mean
    if "cross_w" in held:
        cw = held.pop("cross_w")
    else:
        c = held.pop("cross")
        cw = c @ w64.T  # X'^T X W^T (N_x x N_y)
        del c
    if mean is not None:  # (X' - mu')^T (X - mu) W^T
        cw.addr_(sum_in.detach().to(torch.float64) / rows, w64 @ mean, alpha=-rows)
    inner = whitening(held.pop("gram_in"), damp, sum_in if centre else None, rows, owned=True)
    whitened = torch.linalg.solve_triangular(inner.factor, cw, upper=False).T.contiguous()  # (L^{-1} C W^T)^T = W M
    del cw
    return Whitening(inner.factor, inner.damp, mean, rows, mean_in=inner.mean, bound=Bound(weight, whitened, energy))


@dataclass
class LowRank:
    """W ~ B A with B (N_y x r), A (r x N_x); `spectrum` holds every singular value of the matrix
    that was truncated (W L with calibration, W without), largest first, float64."""

    second: torch.Tensor  # B
    first: torch.Tensor  # A
    spectrum: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])


def lowrank_spectrum(w: torch.Tensor, white: Whitening | None = None) -> torch.Tensor:
    """Singular values of W L (or of W): what rank-r truncation keeps and loses, for every r at once.

    From the eigenvalues of the smaller Gram matrix in float64 (one GEMM and a symmetric
    eigensolver, about twice as fast as LAPACK's singular values): each squared value is exact to
    about 1e-16 of the total energy, so every truncation error sqrt(tail / total) is too."""
    if isinstance(white, TableWeighting):
        return white.svd(w).values
    m = white.whiten(w) if white is not None else w.detach().to(torch.float64)
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt()


def truncated_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (m x r), every singular value (descending) and V_r^T (r x n) of a float64 matrix.

    From the eigendecomposition of the smaller Gram matrix (`tt_svd`'s "auto" steps, `_gram_eig`): V_r
    (or U_r) are its top eigenvectors, orthonormal to rounding, and the other side is M V_r / s (or
    U_r^T M / s), so U_r diag(s_r) V_r^T is M's projection on the kept directions, whatever the
    rounding in s. Where that rounding could matter (a truncation discarding under 1e-8 of the
    energy, `_nearly_exact`, or a kept value below 1e-7 of the largest) it is LAPACK's SVD instead."""
    wide = m.shape[0] <= m.shape[1]
    s, vec = _gram_eig(m)
    r = min(rank, s.numel())
    if not _gram_trusted(s, r):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :r], s, vh[:r]
    top = vec[:, :r]
    inv = torch.where(s[:r] > 0, 1.0 / s[:r], torch.zeros_like(s[:r]))
    if wide:  # top: left singular vectors
        return top, s, (top.T @ m).mul_(inv[:, None])
    return (m @ top).mul_(inv), s, top.T


def _gram_trusted(s: torch.Tensor, r: int) -> bool:
    """Whether the rank-r truncation may be taken from a Gram matrix's eigendecomposition (values `s`,
    descending): not where its rounding could matter, a truncation discarding under 1e-8 of the energy
    (`_nearly_exact`) or a kept value below 1e-7 of the largest."""
    return not (_nearly_exact(s, r) or float(s[r - 1]) < 1e-7 * float(s[0]))


def truncation_errors(spectrum: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Relative error of keeping the first r values, for r = 0..len: sqrt(tail energy / total), the
    total being the spectrum's energy unless given (a centred whitening's `energy`)."""
    sq = spectrum.to(torch.float64).square()
    total = float(sq.sum()) if total is None else total
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
    return (tail / total).sqrt() if total > 0 else torch.zeros_like(tail)


def lowrank(w: torch.Tensor, rank: int, white: Whitening | None = None, dtype: torch.dtype | None = None) -> LowRank:
    """The rank-r factorization minimizing ||(W - BA) L|| (or ||W - BA|| without whitening): the
    truncated SVD of W L, mapped back by L^{-1}. The singular values are split evenly between B and A."""
    if not isinstance(rank, int) or rank < 1:
        raise MPOCompressError(f"rank must be a whole number >= 1, got {rank!r}")
    if not all_finite(w):
        raise MPOCompressError("cannot factorize a matrix with NaN or Inf entries")
    if isinstance(white, TableWeighting):
        lr = white.lowrank(w, rank, dtype or w.dtype)
        if lr is not None:
            return lr
    m = white.whiten(w) if white is not None else w.detach().to(torch.float64)
    u, s, vh = truncated_svd(m, rank)
    del m  # a vocabulary-wide table's is hundreds of MB
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    second = u[:, :r] * root
    first = vh[:r].mul_(root[:, None])  # V_r^T is truncated_svd's own: scaled in place
    del vh
    if white is not None:
        first, second = white.unwhiten_rows(first), white.unwhiten_cols(second)
    out = dtype or w.dtype
    return LowRank(second.to(out).contiguous(), first.to(out).contiguous(), s)


def product_spectrum(second: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of B A for factors B (m x r) and A (r x n): those of
    R_B R_A^T, R_B and R_A the triangular factors of B's and A^T's QR. R_A comes from A's columns
    TABLE_CHUNK at a time, in float64, each block's QR taken with the R so far on top (a sequential
    TSQR: the R of the stacked blocks is that of A^T), so a vocabulary-wide A (431 x 49,152 on SmolLM2)
    is never copied whole to float64 nor factored whole (two such copies were the stream's peak)."""
    r_b = torch.linalg.qr(second.to(torch.float64), mode="r")[1]
    r_a = None
    for s in range(0, first.shape[1], TABLE_CHUNK):
        block = first[:, s : s + TABLE_CHUNK].T.to(torch.float64)
        r_a = torch.linalg.qr(block if r_a is None else torch.cat([r_a, block]), mode="r")[1]
    return torch.linalg.svdvals(r_b @ r_a.T)


def error_meter(w: torch.Tensor, white: Whitening | None = None) -> Callable[[torch.Tensor], float]:
    """A function giving the relative output error ||W X^T - W~ X'^T|| / ||W X^T|| of approximations W~
    of this W on the calibration inputs (the relative weight error without whitening). What depends on
    W alone (W L, the energy, the offset) is computed once, here."""
    w64 = w.detach().to(torch.float64)
    if white is None:
        norm = float(torch.linalg.matrix_norm(w64))
        return lambda approx: float(torch.linalg.matrix_norm(w64 - approx.detach().to(torch.float64))) / norm if norm > 0 else 0.0
    target, total, offset = white.whiten(w), white.energy(w), white.offset(w)

    def relative(approx: torch.Tensor) -> float:
        r = float((target - white.apply(approx)).square().sum()) + offset
        return math.sqrt(r / total) if total > 0 else 0.0

    return relative


def output_error(w: torch.Tensor, approx: torch.Tensor, white: Whitening | None = None) -> float:
    """||(W - W~) L|| / ||W L|| (relative output error on the calibration inputs), or the relative
    weight error without whitening (one approximation; `error_meter` for several)."""
    return error_meter(w, white)(approx)


@dataclass
class Refined:
    cores: list[torch.Tensor]
    errors: list[float]  # relative output error before and after each L-BFGS call (non-increasing)


def refine_cores(
    cores: Sequence[torch.Tensor], w: torch.Tensor, white: Whitening, steps: int = 40, rounds: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Refined:  # fmt: skip
    """Improve MPO cores on the calibrated objective ||W L - W~(cores) L||^2 by L-BFGS (strong Wolfe
    line search). The search runs in `dtype` (float32: about 3x faster than float64 on a CPU); every
    round's end is scored in float64 and kept only if it beats the best so far, so the returned
    error is never above the starting one.

    Why not ALS: with a general G the normal equations of one core couple all of its D_{k-1} I_k D_k
    entries (a dense matrix of that size squared, 2 GB at D = 64), where one L-BFGS step costs two
    dense products W~ L.
    """
    norm_sq = white.energy(w)
    if norm_sq == 0:
        return Refined([c.detach().clone() for c in cores], [0.0])
    out_dtype = cores[0].dtype
    target, factor = white.whiten(w).to(dtype), white.factor.to(dtype)
    scale = 1.0 / norm_sq
    meter = error_meter(w, white)

    def exact(cs: Sequence[torch.Tensor]) -> float:  # relative squared error, float64
        with torch.no_grad():
            return meter(mpo_to_matrix([c.detach().to(torch.float64) for c in cs])) ** 2

    params = [c.detach().to(dtype).clone(memory_format=torch.contiguous_format).requires_grad_(True) for c in cores]  # L-BFGS views flat grads
    best_cores = [c.detach().to(torch.float64).clone() for c in cores]
    best = exact(best_cores)
    errors = [math.sqrt(max(best, 0.0))]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (target - mpo_to_matrix(params) @ factor).square().sum() * scale
        loss.backward()
        return loss

    for _ in range(rounds):
        opt.step(closure)
        now = exact(params)
        if math.isfinite(now) and now < best:
            best, best_cores = now, [p.detach().to(torch.float64).clone() for p in params]
        else:  # restart from the best point
            with torch.no_grad():
                for p, c in zip(params, best_cores):
                    p.copy_(c)
        errors.append(math.sqrt(max(best, 0.0)))
    return Refined([c.to(out_dtype).contiguous() for c in best_cores], errors)


def mpo_output_error(cores: Sequence[torch.Tensor], w: torch.Tensor, white: Whitening | None) -> float:
    """Relative output (or weight) error of the MPO with these cores."""
    with torch.no_grad():
        return output_error(w, mpo_to_matrix([c.to(torch.float64) for c in cores]), white)
