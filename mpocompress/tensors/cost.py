"""What an MPO layer's forward pass costs: contraction plans (which cores to merge, how to run each
step), a roofline cost model that ranks them, and multiply-add counts. Pure arithmetic on an
`MPOShape`: no tensors are touched.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from mpocompress.tensors.shape import MPOShape


def group_sizes(n: int) -> list[tuple[int, ...]]:
    """Every way to split n cores into consecutive groups, as tuples of group sizes (2^(n-1) ways)."""
    if n <= 1:
        return [(n,)] if n else []
    out = []
    for cuts in range(1 << (n - 1)):
        sizes, run = [], 1
        for k in range(n - 1):
            if cuts >> k & 1:
                sizes.append(run)
                run = 1
            else:
                run += 1
        out.append((*sizes, run))
    return out


@dataclass(frozen=True)
class ContractionPlan:
    """How an MPO layer computes y = W x: the cores are merged into consecutive groups of the
    given sizes, then the input is contracted through the groups left to right, each step but
    the last in the given form ("fold" or "bmm", see `mpo_contract`). One group means rebuilding
    W and one dense product."""

    sizes: tuple[int, ...]
    forms: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        if len(self.sizes) == 1:
            return "dense"
        return "contract" if all(m == 1 for m in self.sizes) else "merged"

    def describe(self) -> str:
        if self.kind == "dense":
            return "dense"
        forms = sorted(set(self.forms))
        return f"{self.kind} {'+'.join(map(str, self.sizes))} ({'/'.join(forms)})"


@dataclass(frozen=True)
class CostModel:
    """A roofline estimate of a plan's time: each kernel costs a fixed launch overhead, its
    multiply-adds at peak rate, and the bytes it moves through memory when they do not fit in
    cache; a batched GEMM of small slices runs below peak. The defaults are round figures for a
    small CPU; only the ranking of plans matters, not the absolute times. `benchmarks/bench.py
    --sections plans` times every plan against this ranking (docs/performance.md, "The cost model
    against the clock"); `optimize_for_inference` times its shortlist rather than trusting it."""

    macs_per_s: float = 1e11
    bytes_per_s: float = 5e9
    cache_bytes: int = 8 << 20
    overhead_s: float = 8e-6
    slice_overhead_s: float = 6e-7
    copy_s_per_element: float = 1.2e-9  # a transposing copy of the contraction (small inner runs), in cache or not
    join_copy_s_per_element: float = 0.25e-9  # merge_cores' 4-index transpose (long inner runs) in cache
    item_bytes: int = 4

    def traffic(self, elements: int) -> float:
        b = elements * self.item_bytes
        return b / self.bytes_per_s if b > self.cache_bytes else 0.0

    def gemm(self, m: int, k: int, n: int) -> float:
        return self.overhead_s + m * k * n / self.macs_per_s + self.traffic(m * n)

    def copy(self, elements: int) -> float:
        return self.overhead_s + elements * self.copy_s_per_element

    def join_copy(self, elements: int) -> float:
        """The copy that ends each join of `merge_cores`; beyond the cache it reads and writes memory."""
        return self.overhead_s + elements * self.join_copy_s_per_element + 2 * self.traffic(elements)

    def bmm(self, batch: int, m: int, k: int, n: int) -> float:
        """`batch` products (m x k) @ (k x n); slices with a small dimension run below peak."""
        eff = min(1.0, min(m, k, n) / 48)
        return (
            self.overhead_s + batch * self.slice_overhead_s + batch * m * k * n / (self.macs_per_s * eff)
            + self.traffic(batch * m * n)
        )  # fmt: skip


Core = tuple[int, int, int, int]


def merge_steps(chain: Sequence[Core]) -> tuple[Core, list[tuple[int, int, int]]]:
    """The merged shape of `merge_cores` on cores of the given shapes, and the GEMMs (m, k, n) it
    runs (each join of two halves: one GEMM over the shared bond, then a copy of its m x n output)."""
    if len(chain) == 1:
        return chain[0], []
    half = len(chain) // 2
    (da, j1, i1, dk), left = merge_steps(chain[:half])
    (_, j2, i2, db), right = merge_steps(chain[half:])
    return (da, j1 * j2, i1 * i2, db), [*left, *right, (da * j1 * i1, dk, j2 * i2 * db)]


def _merge_time(chain: Sequence[Core], model: CostModel) -> float:
    """Estimated time of `merge_cores` on cores of the given shapes."""
    return sum(model.gemm(m, k, n) + model.join_copy(m * n) for m, k, n in merge_steps(chain)[1])


def plan_cost(
    shape: MPOShape,
    plan: ContractionPlan,
    rows: int,
    merged_cached: bool = False,
    backward: bool = False,
    model: CostModel | None = None,
) -> float:
    """Estimated time of y = W x for `rows` inputs under `plan` (and of its backward pass, with
    `backward`). With `merged_cached` the merged groups are at hand (eval mode) and cost nothing."""
    model = model or CostModel()
    chain = shape.core_shapes()
    merge, k = 0.0, 0
    for m in plan.sizes:
        merge += 0.0 if merged_cached else _merge_time(chain[k : k + m], model)
        k += m
    shapes = shape.grouped(plan.sizes)
    if len(shapes) == 1:
        _, j, i, _ = shapes[0]
        fwd = model.gemm(rows, i, j)
        return merge + fwd + (2 * (merge + fwd) if backward else 0.0)
    ins = [sh[2] for sh in shapes]
    fwd = bwd = 0.0
    m_rows = rows
    for g, (r0, j, i, r1) in enumerate(shapes):
        kk, nn = r0 * i, j * r1
        if g == len(shapes) - 1:
            step = model.gemm(m_rows, kk, nn)
            fwd += step
            bwd += 2 * step
            break
        rest = math.prod(ins[g + 1 :])
        if plan.forms[g] == "bmm":
            step = model.bmm(m_rows, nn, kk, rest)
            fwd += step
            # _SharedBmm's backward: a bmm for the input's gradient; for the core's, chunks of the
            # output gradient and of the input laid side by side (copies in cache) and one GEMM
            bwd += step + model.copy(m_rows * nn * rest) + model.copy(m_rows * kk * rest) + model.gemm(nn, m_rows * rest, kk)
        else:
            step = model.copy(m_rows * kk * rest) + model.gemm(m_rows * rest, kk, nn) + model.copy(m_rows * nn * rest)
            fwd += step
            bwd += 2 * step
        m_rows *= j
    return merge + fwd + (2 * merge + bwd if backward else 0.0)


def dense_cost(rows: int, n_in: int, n_out: int, backward: bool = False, model: CostModel | None = None) -> float:
    """Estimated time of a dense layer y = W x (N_y x N_x) for `rows` inputs (and of its backward)."""
    model = model or CostModel()
    fwd = model.gemm(rows, n_in, n_out)
    return fwd * (3 if backward else 1)


def lowrank_cost(
    rows: int, n_in: int, n_out: int, rank: int, backward: bool = False, model: CostModel | None = None
) -> float:  # fmt: skip
    """Estimated time of a low-rank layer y = B (A x), two GEMMs through r numbers per row (and of
    its backward)."""
    model = model or CostModel()
    fwd = model.gemm(rows, n_in, rank) + model.gemm(rows, rank, n_out)
    return fwd * (3 if backward else 1)


def plan_numbers(shape: MPOShape, plan: ContractionPlan) -> int:
    """Numbers a layer keeps for `plan` when its merged groups are cached: the groups' sizes (W for
    the dense plan; the cores themselves for groups of one, which cost nothing extra)."""
    return sum(
        r0 * j * i * r1 for m, (r0, j, i, r1) in zip(plan.sizes, shape.grouped(plan.sizes)) if m > 1
    )  # fmt: skip


def grouped_macs(shape: MPOShape, sizes: Sequence[int], rows: int, merged_cached: bool = False) -> int:
    """Multiply-adds of a forward pass for `rows` inputs with the cores merged into groups of the
    given sizes (the merging itself counted unless cached; one group: rebuild W, dense product)."""
    total, k = 0, 0
    if not merged_cached:
        chain = shape.core_shapes()
        for m in sizes:
            total += sum(a * b * c for a, b, c in merge_steps(chain[k : k + m])[1])
            k += m
    shapes = shape.grouped(sizes)
    ins = [sh[2] for sh in shapes]
    j_done = 1
    for g, (r0, j, i, r1) in enumerate(shapes):
        total += rows * math.prod(ins[g + 1 :]) * j_done * r0 * i * j * r1
        j_done *= j
    return total


def candidate_plans(n: int, kind: str | None = None) -> list[ContractionPlan]:
    """Every plan for n cores (of one kind: "dense", "contract" or "merged", if given)."""
    plans = []
    for sizes in group_sizes(n):
        for forms in itertools.product(("fold", "bmm"), repeat=len(sizes) - 1):
            plan = ContractionPlan(sizes, forms)
            if kind is None or plan.kind == kind:
                plans.append(plan)
    return plans


def choose_plan(
    shape: MPOShape,
    rows: int,
    merged_cached: bool = False,
    backward: bool = False,
    kind: str | None = None,
    model: CostModel | None = None,
) -> ContractionPlan:
    """The plan with the lowest estimated time (ties: fewer groups, then "fold"). With `kind`,
    the best plan of that kind; "merged" falls back to "contract" for two cores, where there is no
    plan between contracting and rebuilding W."""
    n = shape.n_cores
    cands = candidate_plans(n, kind)
    if not cands:
        cands = candidate_plans(n, "contract" if n > 1 else "dense")
    best, best_key = cands[0], None
    for p in cands:  # a plain loop, not min(key=...): torch.compile traces this choice (fullgraph)
        key = (plan_cost(shape, p, rows, merged_cached, backward, model), len(p.sizes), p.forms.count("bmm"))
        if best_key is None or key < best_key:
            best, best_key = p, key
    return best


def contract_macs(shape: MPOShape, batch: int) -> int:
    """Multiply-adds of `mpo_contract` through the unmerged cores for `batch` rows: at step k every
    (b, j_<k, i_>k) slice multiplies a D_{k-1} I_k vector by a (D_{k-1} I_k) x (J_k D_k) matrix."""
    return grouped_macs(shape, (1,) * shape.n_cores, batch)


def rebuild_macs(shape: MPOShape) -> int:
    """Multiply-adds of `mpo_to_matrix`."""
    return grouped_macs(shape, (shape.n_cores,), 0)
