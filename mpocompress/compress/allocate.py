"""Spreading a parameter budget over layers: pick one option per layer (dense, or a factorized form
of some size) so that the summed cost (predicted error at the model's output) is least and the
summed parameters stay within the budget.

This is a multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into
at most `resolution` buckets (an option's size is rounded up to whole buckets, so the budget is
never exceeded; with bucket size 1 the answer equals an exhaustive search).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpocompress.errors import MPOCompressError

RESOLUTION = 20_000


@dataclass(frozen=True)
class Choice:
    """One way to write one layer: its parameter count and its cost (lower is better)."""

    params: int
    cost: float


def allocate(options: Sequence[Sequence[Choice]], budget: int, resolution: int = RESOLUTION) -> list[int]:
    """The index of the chosen option of every layer: least total cost with total params <= budget.

    Raises MPOCompressError when even the smallest option of every layer exceeds the budget.
    """
    if any(len(o) == 0 for o in options):
        raise ValueError("every layer needs at least one option")
    least = sum(min(c.params for c in o) for o in options)
    if least > budget:
        raise MPOCompressError(f"the budget leaves {budget:,} parameters for the selected layers but their smallest forms need {least:,}")
    if not options:
        return []
    bucket = max(1, math.ceil(budget / resolution))
    cap = budget // bucket
    inf = math.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    back = []
    for opts in options:
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int32)
        for k, c in enumerate(opts):
            w = math.ceil(c.params / bucket)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + c.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        back.append(arg)
        best = new
    if not np.isfinite(best).any():  # rounding up to buckets lost the last few parameters
        raise MPOCompressError(f"the budget of {budget:,} parameters is too tight for the selected layers; raise it")
    end = int(np.argmin(best))
    picks = []
    for opts, arg in zip(reversed(options), reversed(back)):
        k = int(arg[end])
        picks.append(k)
        end -= math.ceil(opts[k].params / bucket)
    return picks[::-1]


def cheapest_within(options: Sequence[Choice], errors: Sequence[float], max_error: float) -> int | None:
    """The index of the option with the fewest parameters whose error is at most max_error."""
    ok = [k for k, e in enumerate(errors) if e <= max_error]
    return min(ok, key=lambda k: options[k].params) if ok else None
