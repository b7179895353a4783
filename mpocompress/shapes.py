"""Integer factorisation of layer dimensions into MPO modes (Eq. 4 of the paper).

A dimension N is split into n modes whose product is N. The default split is the most balanced
one (smallest largest mode), arranged small-large-small like the paper's (4, 7, 7, 4), with 1 used
as a mode where N has fewer than n prime factors.
"""

from __future__ import annotations

import math
from functools import lru_cache

from mpocompress.errors import MPOCompressError

Modes = tuple[int, ...]


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


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
        while d ** k <= remaining:
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
        raise MPOCompressError(
            f"cannot read modes {text!r}: every mode must be a whole number, like 4x7x7x4"
        ) from None
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


def parse_shape_spec(text: str) -> tuple[Modes, Modes]:
    """Parse 'I1xI2x..:J1xJ2x..' (input modes, then output modes) into two mode tuples."""
    if text.count(":") != 1:
        raise MPOCompressError(
            f"cannot read shape {text!r}: write input modes, a colon, then output modes, "
            "like 4x7x7x4:4x4x4x4"
        )
    left, right = text.split(":")
    in_modes, out_modes = parse_modes(left), parse_modes(right)
    if len(in_modes) != len(out_modes):
        raise MPOCompressError(
            f"shape {text!r} has {len(in_modes)} input modes but {len(out_modes)} output modes; "
            "both sides need the same number of modes (use 1 as a mode to pad, e.g. 1x1x10x1)"
        )
    return in_modes, out_modes
