"""The forms one layer can take and what each would lose: dense, low-rank at every rank, and MPOs of
a few core counts, mode orders and bond dimensions. With calibration (a `Whitening` of the layer's
input Gram matrix) errors are output errors on the calibration inputs; without, weight errors.

`layer_options` lists them with their sizes and predicted errors (spectra once: low-rank errors for
every rank come from one SVD; an MPO's from one TT-SVD rounded to each bond dimension).
`factorize` makes the chosen form's factors: the closed-form whitened SVD for low-rank, TT-SVD then
L-BFGS on the calibrated objective for an MPO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mpocompress.tensors import (
    MPOShape,
    TableWeighting,
    Whitening,
    error_meter,
    factorize,
    lowrank,
    lowrank_spectrum,
    mpo_to_matrix,
    output_error,
    product_spectrum,
    refine_cores,
    reusing_whitened,
    truncation_errors,
    tt_round,
    tt_svd,
)  # fmt: skip

STRUCTURES = ("auto", "mpo", "lowrank")
AUTO_CORES = (3, 4)  # MPO core counts `auto` considers unless --cores names one
BOND_GRID = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
COARSE_GRID = (4, 16, 64, 256)  # for an embedding: its costs are measured (a few probes) and interpolated anyway
_EVAL_LIMIT = 1 << 26  # N_y * N_x^2 above which an MPO's predicted error is its weight error, not measured per D


@dataclass
class Option:
    """One form of one layer: its structure, size and predicted relative error."""

    structure: str  # "dense", "lowrank" or "mpo"
    params: int
    rel_error: float  # output error with calibration, else weight error (relative)
    rank: int | None = None
    shape: MPOShape | None = None  # the MPO's modes and bonds
    weight_error: float | None = None
    eps: float | None = None  # for an MPO asked for by --eps: the truncation to apply


@dataclass
class Factors:
    """The chosen form of a layer, made: factors ([B, A] or the cores) and its errors."""

    structure: str
    factors: list[torch.Tensor]
    shape: MPOShape
    rel_error: float  # weight error
    output_rel_error: float | None  # calibrated output error (None without calibration)
    spectra: list[torch.Tensor] = field(default_factory=list)
    bias_shift: torch.Tensor | None = None  # (W - W~) mu, added to the bias (centred calibration)


def lowrank_shape(nx: int, ny: int, r: int) -> MPOShape:
    """A rank-r matrix as a 2-core MPO: input modes (1, N_x), output modes (N_y, 1), bond r."""
    return MPOShape((1, nx), (ny, 1), (r,))


def mode_candidates(nx: int, ny: int, n: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Mode factorizations of N_x and N_y into n modes to try: the balanced split (largest modes in
    the middle), ascending and descending orders of the same modes."""
    i_modes, o_modes = factorize(nx, n), factorize(ny, n)
    out = [(i_modes, o_modes)]
    for order in (sorted, lambda m: sorted(m, reverse=True)):
        pair = (tuple(order(i_modes)), tuple(order(o_modes)))
        if pair not in out:
            out.append(pair)
    return out


def _lowrank_options(w: torch.Tensor, white: Whitening | None) -> list[Option]:
    ny, nx = w.shape
    s = lowrank_spectrum(w, white)
    errs = truncation_errors(s, white.energy(w) if white is not None else None)
    opts = []
    for r in range(1, s.numel() + 1):
        p = r * (nx + ny)
        if p >= nx * ny:
            break
        opts.append(Option("lowrank", p, float(errs[r]), rank=r))
    return opts


def mpo_options(
    w: torch.Tensor, white: Whitening | None, cores: Sequence[int], modes: tuple[tuple[int, ...], tuple[int, ...]] | None,
    bond_grid: Sequence[int] = BOND_GRID, refine_steps: int = 0,
) -> list[Option]:  # fmt: skip
    """MPO forms: one TT-SVD at the largest useful D per mode choice, rounded down the D of a coarse
    grid, each from the one above (errors measured there: the calibrated error exactly, the weight
    error accumulated); every D in between gets its exact size and an error interpolated between its
    grid neighbours (linearly in the squared error against parameters).

    With calibration and `refine_steps`, the calibrated errors are those of the cores after the L-BFGS
    refinement `make_factors` applies, not the TT-SVD's: the refinement is run at REFINE_POINTS of the
    grid (smallest, middle, largest D) and the ratio refined / TT-SVD error is interpolated in log D
    between them (held constant beyond them) for the rest. Without it the allocator judges small MPOs
    by an error refinement then lowers a lot, and starves them."""
    ny, nx = w.shape
    opts: list[Option] = []
    measure = white is not None and ny * nx * nx <= _EVAL_LIMIT
    pairs = [modes] if modes is not None else [p for n in cores for p in _best_modes(w, n)]
    for i_modes, o_modes in pairs:
        if len(i_modes) < 2:
            continue
        cap = max(MPOShape.exact(i_modes, o_modes).bond_dims)
        fits = [d for d in range(1, cap + 1) if MPOShape.uniform(i_modes, o_modes, d).param_count < nx * ny]
        if not fits:
            continue
        grid = sorted({d for d in bond_grid if d <= fits[-1]} | {fits[-1]})
        top = tt_svd(w, i_modes, o_modes, max_bond=grid[-1])
        meter = error_meter(w, white) if measure else None
        measured: dict[int, tuple[float, float]] = {}  # D -> (error, weight error)
        refine_at = {grid[round(k * (len(grid) - 1) / (REFINE_POINTS - 1))] for k in range(REFINE_POINTS)} if meter and refine_steps else set()
        gains: dict[int, float] = {}  # D -> refined / TT-SVD calibrated error, where refined
        dec, werr = top, top.rel_error
        for d in reversed(grid):  # each D rounded from the next larger one: every rounding is cheaper than the last
            if d < max(dec.bond_dims):
                dec = tt_round(dec.cores, max_bond=d)
                werr = math.sqrt(min(1.0, werr**2 + dec.rel_error**2 * (1.0 - werr**2)))  # the two errors are ~orthogonal
            err = meter(mpo_to_matrix([c.to(torch.float64) for c in dec.cores])) if meter is not None else werr
            if d in refine_at and err > 0:
                gains[d] = min(1.0, refine_cores(dec.cores, w, white, steps=refine_steps).errors[-1] / err)
            measured[d] = (err, werr)
        if gains:
            measured = {d: (e * _gain_at(gains, d), we) for d, (e, we) in measured.items()}
        for d in fits:
            if d < grid[0]:
                continue
            shape = MPOShape.uniform(i_modes, o_modes, d)
            if d in measured:
                err, werr = measured[d]
            else:
                lo = max(g for g in grid if g < d)
                hi = min(g for g in grid if g > d)
                p_lo, p_hi = (MPOShape.uniform(i_modes, o_modes, g).param_count for g in (lo, hi))
                a = (shape.param_count - p_lo) / (p_hi - p_lo)
                err, werr = (math.sqrt((1 - a) * measured[lo][k] ** 2 + a * measured[hi][k] ** 2) for k in (0, 1))
            opts.append(Option("mpo", shape.param_count, err, shape=shape, weight_error=werr))
    return opts


REFINE_POINTS = 3  # grid points per mode choice at which the allocator refines an MPO to predict its refined error


def _gain_at(gains: Mapping[int, float], d: int) -> float:
    """The refined / TT-SVD error ratio at D, linear in log D between the refined points, constant beyond them."""
    ds = sorted(gains)
    return float(np.interp(math.log(d), [math.log(g) for g in ds], [gains[g] for g in ds]))


def _best_modes(w: torch.Tensor, n: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Of the mode candidates for n cores, the one whose TT-SVD at a middle bond loses least weight."""
    ny, nx = w.shape
    cands = mode_candidates(nx, ny, n)
    if len(cands) == 1:
        return cands
    d = 16
    scored = [(tt_svd(w, i, o, max_bond=d).rel_error, (i, o)) for i, o in cands]
    return [min(scored, key=lambda t: t[0])[1]]


def largest_uniform_bond(in_modes: Sequence[int], out_modes: Sequence[int], params: int) -> int | None:
    """The largest uniform D (up to its useful maximum) whose MPO of these modes has at most `params`
    parameters; None when not even D = 1 fits."""
    cap = max(MPOShape.exact(in_modes, out_modes).bond_dims)
    fits = [d for d in range(1, cap + 1) if MPOShape.uniform(in_modes, out_modes, d).param_count <= params]
    return fits[-1] if fits else None


TRY_MPO_REFINE = 10  # --try-mpo refines the challenging MPO this many times the refinement steps convert uses
TRY_MPO_SCREEN = 1.3  # ... once its error after the usual refinement is within this factor of the low-rank form's


@reusing_whitened()
def try_mpo(w: torch.Tensor, lows: Factors, white: Whitening, refine_steps: int) -> Factors:
    """`--try-mpo`: the low-rank factors `lows` of W against a 4-core MPO of no more parameters (W's
    best 4-core modes, the largest uniform D that fits), fitted on the same calibrated objective: the
    MPO is refined as `convert` refines; if its error comes within TRY_MPO_SCREEN of low-rank's, it is
    refined TRY_MPO_REFINE times longer, and returned if its calibrated error is then lower. On the FFN
    down projections of pretrained encoders the longer refinement is what lets the MPO win (docs/results.md,
    issue 29); elsewhere the screen keeps the cost to one short refinement per layer."""
    if lows.structure != "lowrank" or lows.output_rel_error is None or refine_steps < 1:
        return lows
    modes = _best_modes(w, 4)
    d = largest_uniform_bond(*modes[0], sum(f.numel() for f in lows.factors)) if modes else None
    if d is None or d < 2:
        return lows
    shape = MPOShape.uniform(*modes[0], d)
    option = Option("mpo", shape.param_count, math.nan, shape=shape)
    quick = make_factors(w, option, white, refine_steps)
    if quick.output_rel_error is None or quick.output_rel_error > TRY_MPO_SCREEN * lows.output_rel_error:
        return lows
    long = make_factors(w, option, white, TRY_MPO_REFINE * refine_steps)
    return long if long.output_rel_error is not None and long.output_rel_error < lows.output_rel_error else lows


def layer_options(
    w: torch.Tensor,
    white: Whitening | None,
    structure: str = "auto",
    cores: Sequence[int] = AUTO_CORES,
    modes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    bond_grid: Sequence[int] = BOND_GRID,
    screen: bool = True,
    refine_steps: int = 0,
) -> list[Option]:
    """Every form considered for the N_y x N_x weight w, smallest error first within a structure;
    the dense form (error 0) is always first. MPO errors are measured at the D of `bond_grid` and
    interpolated in between. Under "auto", with `screen`, an MPO's forms are weighed only where
    `mpo_in_reach` says it could beat low-rank (analyze's curves show them all). `refine_steps`: an
    MPO's calibrated errors are predicted after that much refinement (see `mpo_options`)."""
    ny, nx = w.shape
    opts = [Option("dense", nx * ny, 0.0)]
    lows = _lowrank_options(w, white) if structure in ("auto", "lowrank") and modes is None else []
    opts += lows
    if structure == "mpo" or (structure == "auto" and (modes is not None or not screen or mpo_in_reach(w, white, lows, cores, refine_steps))):
        opts += mpo_options(w, white, cores, modes, bond_grid, refine_steps)
    return opts


SCREEN_POINTS = 3  # sizes at which `auto` first checks an MPO against low-rank


def mpo_in_reach(
    w: torch.Tensor, white: Whitening | None, lows: Sequence[Option], cores: Sequence[int], refine_steps: int = 0,
    near: float | None = None,
) -> bool:  # fmt: skip
    """Whether an MPO could beat low-rank on this layer, before its forms are weighed: for each core
    count, the balanced modes' MPO at SCREEN_POINTS sizes of the bond grid (from the smallest low-rank
    form's size up to dense) has its error measured exactly as low-rank's is (output error with
    calibration, weight error without) and compared with the best low-rank form no larger. If low-rank
    is better at every probed size, the MPO's forms (every mode choice and D, most of `auto`'s time on a
    pretrained model) are not weighed; one probe where the MPO wins and they all are. A screen, not a
    proof: another mode order or a D between the probes could still have won there. With
    `refine_steps`, a probe's error is the refined one wherever `mpo_options` would predict refined
    errors (calibration, and a layer small enough to measure), so the screen and the forms agree.
    Every probe is made and measured before any is refined, and the refinements (most of the screen's
    time) go nearest first, error / best low-rank error ascending, until one wins: the same answer as
    refining in any order, with fewer refinements where one wins (242 -> 174 on SmolLM2's k/v).

    `near`: one probe per core count, the bond whose size is nearest that many parameters (in log
    size): the allocator's question is whether an MPO beats low-rank at about the size a first,
    low-rank-only allocation gave the layer (see `choose._screen_deferred`)."""
    if not lows:
        return True
    ny, nx = w.shape
    smallest = min(o.params for o in lows)
    meter = error_meter(w, white)
    refine = refine_steps if white is not None and ny * nx * nx <= _EVAL_LIMIT else 0
    losing: list[tuple[float, list[torch.Tensor], float]] = []  # (error / best, cores, best) of each probe low-rank beats
    for n in cores:
        i_modes, o_modes = mode_candidates(nx, ny, n)[0]
        if len(i_modes) < 2:
            continue
        sizes = {d: MPOShape.uniform(i_modes, o_modes, d).param_count for d in BOND_GRID}
        ds = [d for d, p in sizes.items() if smallest <= p < nx * ny and d <= max(MPOShape.exact(i_modes, o_modes).bond_dims)]
        if ds and near is not None:
            ds = [min(ds, key=lambda d: abs(math.log(sizes[d] / near)))]
        if not ds:
            continue
        probes = sorted({ds[round(k * (len(ds) - 1) / max(SCREEN_POINTS - 1, 1))] for k in range(SCREEN_POINTS)}, reverse=True)
        dec = tt_svd(w, i_modes, o_modes, max_bond=probes[0])
        for d in probes:
            if d < max(dec.bond_dims):
                dec = tt_round(dec.cores, max_bond=d)
            p = MPOShape.of_cores(dec.cores).param_count
            err = meter(mpo_to_matrix([c.to(torch.float64) for c in dec.cores]))
            best = min((o.rel_error for o in lows if o.params <= p), default=math.inf)
            if err < best:
                return True
            losing.append((err / best if best > 0 else math.inf, dec.cores, best))
    if refine:  # only refinement could make one win
        for _, cs, best in sorted(losing, key=lambda t: t[0]):
            if refine_cores(cs, w, white, steps=refine).errors[-1] < best:
                return True
    return False


@reusing_whitened()
def make_factors(
    w: torch.Tensor, option: Option, white: Whitening | None, refine_steps: int = 30, dtype: torch.dtype | None = None,
    errors: bool = True,
) -> Factors:  # fmt: skip
    """The factors of the chosen option (not "dense"), with their weight and output errors.

    `errors=False`: a low-rank form's factors (and bias shift) alone, its errors NaN and its spectra
    not taken, for a form only swapped in to measure what it does (on a vocabulary-wide table, the
    errors and spectrum cost more than the factors)."""
    dtype = dtype or w.dtype
    ny, nx = w.shape
    if option.structure == "lowrank":
        table = isinstance(white, TableWeighting)
        lr = lowrank(w, option.rank, white, dtype=dtype if table else torch.float64)  # a table's A is made in its saved dtype
        if white is None:  # B A is W's truncated SVD: its error and its bond's spectrum are W's singular values
            werr = float(truncation_errors(lr.spectrum)[lr.rank])
            return Factors("lowrank", [lr.second.to(dtype), lr.first.to(dtype)], lowrank_shape(nx, ny, lr.rank), werr,
                           None, [lr.spectrum[: lr.rank].clone()])  # fmt: skip
        if not errors:
            shift = None if table else white.bias_shift(w, lr.second @ lr.first)
            return Factors("lowrank", [lr.second.to(dtype), lr.first.to(dtype)], lowrank_shape(nx, ny, lr.rank), math.nan, None, [], shift)
        if table:  # a vocabulary-wide table: B A never whole; the weighted error is its spectrum's discarded share
            werr, oerr, shift = white.weight_error(w, lr.second, lr.first), float(truncation_errors(lr.spectrum, white.energy(w))[lr.rank]), None
        else:
            approx = lr.second @ lr.first
            werr, oerr, shift = output_error(w, approx, None), output_error(w, approx, white), white.bias_shift(w, approx)
        spectrum = product_spectrum(lr.second, lr.first)  # the bond's spectrum: the singular values of B A itself
        return Factors("lowrank", [lr.second.to(dtype), lr.first.to(dtype)], lowrank_shape(nx, ny, lr.rank), werr, oerr,
                       [spectrum], shift)  # fmt: skip
    shape = option.shape
    dec = tt_svd(w, shape.in_modes, shape.out_modes, max_bond=max(shape.bond_dims), dtype=torch.float64)
    cores = dec.cores
    if any(b > s for b, s in zip(dec.bond_dims, shape.bond_dims)):
        cores = tt_round(cores, bonds=shape.bond_dims).cores
    oerr = None
    if white is not None and refine_steps > 0:
        refined = refine_cores(cores, w, white, steps=refine_steps)
        cores, oerr = refined.cores, refined.errors[-1]
    elif white is not None:
        oerr = output_error(w, mpo_to_matrix(cores), white)
    final = tt_round(cores)  # canonical form: the report's spectra are the bonds' singular values
    approx = mpo_to_matrix(final.cores)
    werr = output_error(w, approx, None)
    return Factors("mpo", [c.to(dtype) for c in final.cores], MPOShape.of_cores(final.cores), werr, oerr,
                   final.singular_values, white.bias_shift(w, approx) if white is not None else None)  # fmt: skip
