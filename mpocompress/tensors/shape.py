"""The shape of an MPO as one value: its modes and bonds (Eqs. 4-6), and the integer factorisation
of layer dimensions into modes.

A dimension N is split into n modes whose product is N. The default split is the most balanced one
(smallest largest mode), arranged small-large-small like the paper's (4, 7, 7, 4), with 1 used as a
mode where N has fewer than n prime factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from mpocompress.errors import MPOCompressError

Modes = tuple[int, ...]


# --------------------------------------------------------------------------- the value type


@dataclass(frozen=True)
class MPOShape:
    """Modes and bonds of an MPO for an N_y x N_x matrix: input modes I_1..I_n (product N_x), output
    modes J_1..J_n (product N_y) and the n-1 inner bond dimensions D_1..D_{n-1}. Core k then has
    shape (D_{k-1}, J_k, I_k, D_k) with D_0 = D_n = 1."""

    in_modes: Modes
    out_modes: Modes
    bond_dims: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_modes", tuple(int(m) for m in self.in_modes))
        object.__setattr__(self, "out_modes", tuple(int(m) for m in self.out_modes))
        object.__setattr__(self, "bond_dims", tuple(int(b) for b in self.bond_dims))

    @classmethod
    def uniform(cls, in_modes: Sequence[int], out_modes: Sequence[int], max_bond: int) -> MPOShape:
        """Bond dimension D: each bond is min(D, its cap)."""
        return cls(tuple(in_modes), tuple(out_modes), tuple(bond_dims_for(in_modes, out_modes, max_bond)))

    @classmethod
    def exact(cls, in_modes: Sequence[int], out_modes: Sequence[int]) -> MPOShape:
        """Every bond at its cap: the MPO represents any matrix exactly."""
        return cls(tuple(in_modes), tuple(out_modes), tuple(bond_caps(in_modes, out_modes)))

    @classmethod
    def of_cores(cls, cores: Sequence[object]) -> MPOShape:
        """The shape of cores (D_{k-1}, J_k, I_k, D_k)."""
        shapes = [tuple(int(s) for s in c.shape) for c in cores]  # type: ignore[attr-defined]
        return cls(tuple(s[2] for s in shapes), tuple(s[1] for s in shapes), tuple(s[3] for s in shapes[:-1]))

    @property
    def n_cores(self) -> int:
        return len(self.in_modes)

    @property
    def nx(self) -> int:
        return math.prod(self.in_modes)

    @property
    def ny(self) -> int:
        return math.prod(self.out_modes)

    @property
    def full_bonds(self) -> list[int]:
        """[1, D_1, ..., D_{n-1}, 1]."""
        return [1, *self.bond_dims, 1]

    @property
    def caps(self) -> list[int]:
        return bond_caps(self.in_modes, self.out_modes)

    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        full = self.full_bonds
        return [(full[k], j, i, full[k + 1]) for k, (i, j) in enumerate(zip(self.in_modes, self.out_modes))]

    def grouped(self, sizes: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Shapes (D_a, J, I, D_b) of the merged cores when the cores are split into consecutive groups."""
        full = self.full_bonds
        shapes, k = [], 0
        for m in sizes:
            shapes.append((full[k], math.prod(self.out_modes[k : k + m]), math.prod(self.in_modes[k : k + m]), full[k + m]))
            k += m
        return shapes

    @property
    def param_count(self) -> int:
        """Number of MPO parameters: sum_k D_{k-1} J_k I_k D_k (Eq. 6, with unequal D_k allowed)."""
        return sum(a * j * i * b for a, j, i, b in self.core_shapes())

    def is_uniform(self) -> bool:
        """Whether every bond is min(D, its cap) for D = the largest bond."""
        return not self.bond_dims or list(self.bond_dims) == bond_dims_for(self.in_modes, self.out_modes, max(self.bond_dims))

    def notation(self) -> str:
        """The paper's M^{J_1..J_n}_{I_1..I_n}(D) (Eq. 8). D is shown as one number when every bond is
        min(D, its cap), else as the list of inner bonds."""
        top = ",".join(map(str, self.out_modes))
        bottom = ",".join(map(str, self.in_modes))
        d = max(self.bond_dims) if self.bond_dims else 1
        dtext = str(d) if self.is_uniform() else ",".join(map(str, self.bond_dims))
        return f"M^{{{top}}}_{{{bottom}}}(D={dtext})"


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


def compression_ratio(params_mpo: int, params_original: int) -> float:
    """rho of Eq. 9: MPO parameters over the original parameters of the replaced layers."""
    return params_mpo / params_original if params_original else float("nan")


# --------------------------------------------------------------------------- factorisation


@lru_cache(maxsize=4096)
def _best_multiset(n: int, parts: int) -> Modes:
    """Non-decreasing tuple of `parts` integers >= 1 with product n: smallest maximum, then
    smallest sum of squared logs (the most even split)."""
    best: tuple[tuple[int, float], Modes] | None = None

    def walk(remaining: int, k: int, lo: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            if remaining >= lo:
                cand = tuple(acc + [remaining])
                key = (max(cand), sum(math.log(c) ** 2 for c in cand))
                if best is None or key < best[0]:
                    best = (key, cand)
            return
        d = lo
        # the smallest of the remaining k factors is at most remaining ** (1/k)
        while d**k <= remaining:
            if remaining % d == 0:
                walk(remaining // d, k - 1, d, acc + [d])
            d += 1

    walk(n, parts, 1, [])
    assert best is not None  # (1, ..., 1, n) always qualifies
    return best[1]


def _mountain(sorted_modes: Modes) -> Modes:
    """Arrange ascending modes small at both ends, large in the middle: 4,4,7,7 -> 4,7,7,4."""
    left: list[int] = []
    right: list[int] = []
    for i, m in enumerate(sorted_modes):
        (left if i % 2 == 0 else right).append(m)
    return tuple(left + right[::-1])


def factorize(n: int, parts: int) -> Modes:
    """Balanced split of `n` into `parts` modes, e.g. 784 -> (4, 7, 7, 4), 10 -> (1, 2, 5, 1).

    Raises:
        MPOCompressError: if n or parts is not a positive integer.
    """
    if not isinstance(n, int) or n < 1:
        raise MPOCompressError(f"cannot factorize dimension {n!r}: it must be a positive integer")
    if not isinstance(parts, int) or parts < 1:
        raise MPOCompressError(f"number of MPO cores must be a positive integer, got {parts!r}")
    return _mountain(_best_multiset(n, parts))


def format_modes(modes: Modes) -> str:
    return "x".join(str(m) for m in modes)


def parse_modes(text: str) -> Modes:
    """Parse '4x7x7x4' (also '4,7,7,4' or '4*7*7*4') into (4, 7, 7, 4)."""
    cleaned = text.strip().replace("*", "x").replace(",", "x").replace("X", "x")
    parts = [p.strip() for p in cleaned.split("x")]
    if not cleaned or any(not p for p in parts):
        raise MPOCompressError(f"cannot read modes {text!r}: write them like 4x7x7x4")
    try:
        modes = tuple(int(p) for p in parts)
    except ValueError:
        raise MPOCompressError(f"cannot read modes {text!r}: every mode must be a whole number, like 4x7x7x4") from None
    if any(m < 1 for m in modes):
        raise MPOCompressError(f"modes {text!r} contain a mode below 1: every mode must be >= 1")
    return modes


def check_modes(modes: Modes, dim: int, what: str) -> Modes:
    """Check that explicit modes multiply to `dim`; otherwise propose a split with as many modes."""
    modes = tuple(int(m) for m in modes)
    if not modes or any(m < 1 for m in modes):
        raise MPOCompressError(f"{what}: modes {format_modes(modes) or '(none)'} must all be >= 1")
    prod = math.prod(modes)
    if prod != dim:
        proposal = format_modes(factorize(dim, len(modes)))
        raise MPOCompressError(
            f"{what}: modes {format_modes(modes)} multiply to {prod}, not {dim}; "
            f"try {proposal} (or any {len(modes)} numbers whose product is {dim})"
        )
    return modes


def resolve_modes(
    nx: int, ny: int, in_modes: Sequence[int] | None, out_modes: Sequence[int] | None, n_cores: int = 4
) -> tuple[Modes, Modes]:
    """Modes for an N_y x N_x weight: given ones are checked, missing ones are balanced splits into
    as many modes as the given side has (else n_cores)."""
    n = len(in_modes) if in_modes is not None else len(out_modes) if out_modes is not None else n_cores
    i_modes = check_modes(tuple(in_modes), nx, "input modes") if in_modes is not None else factorize(nx, n)
    o_modes = check_modes(tuple(out_modes), ny, "output modes") if out_modes is not None else factorize(ny, n)
    if len(i_modes) != len(o_modes):
        raise MPOCompressError(f"{len(i_modes)} input modes but {len(o_modes)} output modes; both need the same count")
    return i_modes, o_modes


def resolve_bonds(in_modes: Sequence[int], out_modes: Sequence[int], bond_dim: int | Sequence[int]) -> MPOShape:
    """The MPOShape for bond dimension D (capped per bond) or for an explicit list of n-1 bonds."""
    if isinstance(bond_dim, int):
        return MPOShape.uniform(in_modes, out_modes, bond_dim)
    bonds = [int(b) for b in bond_dim]
    if len(bonds) != len(in_modes) - 1:
        raise MPOCompressError(
            f"an MPO with {len(in_modes)} cores has {len(in_modes) - 1} inner bonds, got {len(bonds)} bond dims"
        )
    caps = bond_caps(in_modes, out_modes)
    if any(b < 1 or b > c for b, c in zip(bonds, caps)):
        raise MPOCompressError(f"bond dims {bonds} must each lie between 1 and their caps {caps}")
    return MPOShape(tuple(in_modes), tuple(out_modes), tuple(bonds))


def parse_shape_spec(text: str) -> tuple[Modes, Modes]:
    """Parse 'I1xI2x..:J1xJ2x..' (input modes, then output modes) into two mode tuples."""
    if text.count(":") != 1:
        raise MPOCompressError(
            f"cannot read shape {text!r}: write input modes, a colon, then output modes, like 4x7x7x4:4x4x4x4"
        )
    left, right = text.split(":")
    in_modes, out_modes = parse_modes(left), parse_modes(right)
    if len(in_modes) != len(out_modes):
        raise MPOCompressError(
            f"shape {text!r} has {len(in_modes)} input modes but {len(out_modes)} output modes; "
            "both sides need the same number of modes (use 1 as a mode to pad, e.g. 1x1x10x1)"
        )
    return in_modes, out_modes
