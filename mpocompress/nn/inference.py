"""Running a compressed model for inference: how each factorized layer computes, chosen per layer
under a memory policy, and what the model then keeps in memory.

By default (`model.eval()` and nothing else) an MPO layer holds only its cores and picks its
contraction plan from the cost model (`mpocompress.tensors.cost`). `optimize_for_inference` replaces
that guess by measurement on the batch sizes the model will serve:

- `prefer="memory"`: the layer keeps nothing besides its cores; for each row count the fastest of
  the cost model's best plans, timed on the layer's real inputs, is pinned (`MPOLayer.pin_plan`).
- `prefer="speed"`: plans that reuse merged cores kept between calls (W itself for the dense plan)
  compete too; a layer whose fastest option needs them is materialized. `max_cache_bytes` bounds
  what all layers keep together: the layers that save the most time per byte keep theirs first.

Low-rank layers always run as two GEMMs (they are never larger than the dense layer, and W would
be); for a low-rank Linear both orders of the first GEMM are timed and the faster is pinned
(`LowRankLinear.pin_form`), whatever the preference, since neither keeps anything. MPO embeddings
look tokens up from the cores. All are reported with their measured time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.nn.cache import cached_bytes, cached_layers, parameter_bytes
from mpocompress.nn.conv_geometry import ConvGeometry
from mpocompress.nn.factorized import FactorizedLayer
from mpocompress.nn.lowrank import FORMS, LowRankLinear
from mpocompress.nn.mpo_base import MPOLayer
from mpocompress.nn.mpo_embedding import MPOEmbedding
from mpocompress.tensors import ContractionPlan, candidate_plans, plan_cost, plan_numbers

Prefer = Literal["memory", "speed"]
PREFERENCES = ("memory", "speed")
SHORTLIST = 4  # plans of each kind (from the cores, from kept groups) the cost model puts forward for timing


@dataclass(frozen=True)
class LayerInference:
    """How one factorized layer runs for one batch size."""

    name: str
    structure: str  # "mpo", "lowrank", "mpo_embedding"
    batch: int
    rows: int  # input vectors per call (batch x positions for a conv, batch x tokens for a sequence)
    plan: str  # ContractionPlan.describe(), "two GEMMs" or "two GEMMs (transposed first)" (low-rank), "lookup" (embedding)
    kept: bool  # whether the plan reuses merged cores kept between calls
    kept_bytes: int  # bytes those kept cores take (0 when not kept)
    time_ms: float  # measured median time of one call on the layer's inputs
    default_time_ms: float | None  # the cost model's own choice from the cores, measured the same way


@dataclass(frozen=True)
class InferenceReport:
    """What `optimize_for_inference` chose, and the model's resident weights after it."""

    prefer: str
    batches: list[int]
    layers: list[LayerInference]
    parameter_bytes: int  # parameters and buffers
    cache_bytes: int  # merged cores kept by materialized layers, after a call at every batch size
    max_cache_bytes: int | None

    @property
    def resident_bytes(self) -> int:
        return self.parameter_bytes + self.cache_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resident_bytes": self.resident_bytes}


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model holds for its weights now: parameters, buffers and every kept merged core."""
    return parameter_bytes(model) + cached_bytes(model)


def call_model(model: nn.Module, example: Any) -> Any:
    """model(example), model(*example) or model(**example) for a tensor, a tuple or a mapping."""
    if isinstance(example, torch.Tensor):
        return model(example)
    if isinstance(example, Mapping):
        return model(**example)
    return model(*example)


def resized(example: Any, batch: int) -> Any:
    """The example with `batch` samples: its samples repeated (or cut) along the first dimension."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = -(-batch // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch] if reps > 1 else t[:batch]

    if isinstance(example, Mapping):
        return {k: one(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(one(v) for v in example)
    return one(example)


def _leading(example: Any) -> int:
    for t in example.values() if isinstance(example, Mapping) else [example] if isinstance(example, torch.Tensor) else example:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise MPOCompressError("the example batch holds no tensor with a batch dimension: pass the inputs the model takes")


def median_ms(fn: Callable[[], Any], device: torch.device, budget_s: float, max_reps: int = 30) -> float:
    """Median wall time of fn() in milliseconds over repeats filling about `budget_s`, after one
    call that warms up (and fills what a kept plan keeps)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _layer_inputs(model: nn.Module, example: Any) -> dict[str, torch.Tensor]:
    """The input each factorized layer receives when the model runs on `example`."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and names[module] not in seen:
            seen[names[module]] = args[0].detach()

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _rows(layer: FactorizedLayer, x: torch.Tensor) -> int:
    """Input vectors one call of `layer` on x multiplies (what an MPO layer's `plan_for` is asked
    for): batch x positions for a convolution, every token for an embedding, else every vector."""
    if isinstance(layer, ConvGeometry):
        xb = x if x.dim() == 4 else x.unsqueeze(0)
        xp, pad = layer._padded(xb)
        oh, ow = layer._output_hw(xp, pad)
        return int(xb.shape[0] * oh * ow)
    if isinstance(layer, MPOEmbedding):
        return x.numel()
    return x.numel() // x.shape[-1]


@dataclass
class _Option:
    plan: ContractionPlan
    kept: bool
    ms: float


def _time_options(layer: MPOLayer, x: torch.Tensor, rows: int, prefer: str, budget_s: float) -> tuple[list[_Option], float]:
    """Measured options of one MPO layer on its input x: the cost model's best plans from the cores
    (and, for "speed", with kept merged cores), and the time of its own unpinned choice."""
    shape = layer.shape
    plans = candidate_plans(shape.n_cores)
    dense = ContractionPlan((shape.n_cores,))
    options = []
    for kept in [False, True] if prefer == "speed" else [False]:
        ranked = sorted(plans, key=lambda p, k=kept: (plan_cost(shape, p, rows, k), len(p.sizes)))[:SHORTLIST]
        for plan in ranked if dense in ranked else [*ranked, dense]:  # a conv's dense plan skips the patches
            layer.release()  # nothing kept from the option before
            layer.pin_plan(rows, plan, keep=kept)
            if kept:
                layer.materialize()
            options.append(_Option(plan, kept, median_ms(lambda: layer(x), x.device, budget_s)))
    layer.release()
    layer.pin_plan(rows, None)
    default_ms = median_ms(lambda: layer(x), x.device, budget_s)
    return options, default_ms


def optimize_for_inference(
    model: nn.Module,
    example: Any,
    *,
    prefer: Prefer = "memory",
    batch: int | Sequence[int] | None = None,
    max_cache_bytes: int | None = None,
    budget_s: float = 0.03,
) -> InferenceReport:
    """Put `model` in eval mode and choose how each factorized layer computes, by timing its options
    on the inputs it receives from `example` (a batch as the model takes it: a tensor, a tuple, or a
    mapping of keyword arguments).

    Args:
        prefer: "memory" keeps nothing besides the stored factors; "speed" may keep merged cores
            (W for the dense plan) where that is faster, within `max_cache_bytes` (all layers).
        batch: the batch size(s) to choose for (the example's samples repeated or cut to each);
            default: the example's own. Batch 1 and a serving batch may want different plans:
            give both, e.g. batch=(1, 64).
        budget_s: time spent timing each option of each layer (median of the repeats).

    The choices are pinned on the layers (`MPOLayer.pinned_plans`) and last until
    `set_forward_strategy` or a new call; they are not saved with the model. With kept cores, the
    layer is materialized: do not write its cores through `.data` meanwhile (`mpocompress.nn.cache`).
    """
    if prefer not in PREFERENCES:
        raise MPOCompressError(f"unknown preference {prefer!r}; choose memory or speed")
    if max_cache_bytes is not None and max_cache_bytes < 0:
        raise MPOCompressError(f"max_cache_bytes must be >= 0, got {max_cache_bytes}")
    batches = [_leading(example)] if batch is None else [batch] if isinstance(batch, int) else list(batch)
    if not batches or any(not isinstance(b, int) or b < 1 for b in batches):
        raise MPOCompressError(f"batch sizes must be whole numbers >= 1, got {batch!r}")
    model.eval()
    for m in cached_layers(model):
        m.release()
    named = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    mpo = {n: m for n, m in named.items() if isinstance(m, MPOLayer)}
    for m in mpo.values():
        m._pinned.clear()
    for m in named.values():
        if isinstance(m, LowRankLinear):
            m._forms.clear()
    rows_done: set[tuple[str, int]] = set()
    results: list[tuple[str, int, int, list[_Option], float]] = []
    others: list[LayerInference] = []
    with torch.no_grad():
        for b in batches:
            inputs = _layer_inputs(model, resized(example, b))
            for name, layer in named.items():
                x = inputs.get(name)
                if x is None:
                    continue  # not reached by this example
                rows = _rows(layer, x)
                if isinstance(layer, MPOLayer):
                    if (name, rows) in rows_done:
                        continue
                    rows_done.add((name, rows))
                    options, default_ms = _time_options(layer, x, rows, prefer, budget_s)
                    results.append((name, b, rows, options, default_ms))
                elif isinstance(layer, LowRankLinear):
                    others.append(_pin_fastest_form(name, layer, x, b, rows, budget_s))
                else:
                    ms = median_ms(lambda layer=layer, x=x: layer(x), x.device, budget_s)
                    how = "lookup" if isinstance(layer, MPOEmbedding) else "two GEMMs"
                    others.append(LayerInference(name, layer.structure, b, rows, how, False, 0, ms, None))
    chosen = _choose(mpo, results, max_cache_bytes)
    layers = []
    for (name, b, rows, options, default_ms), opt in zip(results, chosen):
        mpo[name].pin_plan(rows, opt.plan, keep=opt.kept)
        if opt.kept:
            mpo[name].materialize()
        size = plan_numbers(mpo[name].shape, opt.plan) * mpo[name].cores[0].element_size() if opt.kept else 0
        layers.append(LayerInference(name, "mpo", b, rows, opt.plan.describe(), opt.kept, size, opt.ms, default_ms))
    with torch.no_grad():  # one call per batch size fills what the chosen plans keep
        for b in batches:
            call_model(model, resized(example, b))
    return InferenceReport(prefer, batches, layers + others, parameter_bytes(model), cached_bytes(model), max_cache_bytes)


def _pin_fastest_form(name: str, layer: LowRankLinear, x: torch.Tensor, batch: int, rows: int, budget_s: float) -> LayerInference:
    """Time both orders of a low-rank Linear's first GEMM on its input and pin the faster."""
    times = {}
    for form in FORMS:
        layer.pin_form(rows, form)
        times[form] = median_ms(lambda: layer(x), x.device, budget_s)
    best = min(FORMS, key=lambda f: times[f])
    layer.pin_form(rows, best)
    how = "two GEMMs" if best == "rows" else "two GEMMs (transposed first)"
    return LayerInference(name, layer.structure, batch, rows, how, False, 0, times[best], times["rows"])


def _choose(
    mpo: dict[str, MPOLayer], results: list[tuple[str, int, int, list[_Option], float]], max_cache_bytes: int | None
) -> list[_Option]:  # fmt: skip
    """Per (layer, rows): the fastest option from the cores, upgraded to the fastest with kept cores
    where that is faster, best time saved per byte first, while the kept bytes fit the budget."""
    chosen = [min((o for o in opts if not o.kept), key=lambda o: o.ms) for _, _, _, opts, _ in results]
    upgrades = []
    for k, (name, _, _, opts, _) in enumerate(results):
        kept = [o for o in opts if o.kept]
        if kept:
            best = min(kept, key=lambda o: o.ms)
            saved = chosen[k].ms - best.ms
            if saved > 0:
                size = plan_numbers(mpo[name].shape, best.plan) * mpo[name].cores[0].element_size()
                upgrades.append((saved / max(size, 1), k, best, size))
    spent = 0
    for _, k, best, size in sorted(upgrades, key=lambda u: -u[0]):
        if max_cache_bytes is None or spent + size <= max_cache_bytes:
            chosen[k] = best
            spent += size
    return chosen
