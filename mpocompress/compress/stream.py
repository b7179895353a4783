"""Streamed compression (`convert --stream`, and `analyze --stream` through `stream_analyze`): a
transformer whose blocks are never all in memory.

The model arrives with its blocks on the meta device (everything else real: embeddings, final norm,
head, buffers). The calibration batches run once up to the first block, whose inputs are kept (in a
`HiddenStore`: memory, or disk with `--offload disk`). Then, block by block: `load_block` fills the
block's weights, the block's statistics are gathered from the kept inputs, its layers are factorized
and swapped, the kept inputs move through it, `write_block` takes its tensors, and it goes back to
the meta device. Peak memory is one block (twice: the original beside the compressed one), its
statistics and the kept hidden states, whatever the depth.

Each block is calibrated on what the blocks already compressed give it, and fitted to reproduce what
the original block gave on the original inputs: the semantics of `--sequential`, whose factors the
stream equals (tests check it).

Sizes: a D or an eps per layer as in memory. A budget (`--target-params`, `--remove`) needs every
layer's forms before any is chosen, so a first streamed pass runs the original blocks on the original
inputs and weighs each layer's forms from its block's statistics, keeping only their sizes and
predicted errors. Each layer's sensitivity is the in-memory allocator's, at the model's output (for a
causal LM next-token KL through the head's Fisher): the first pass keeps the hidden states entering
every block for a few calibration batches, and a reverse pass carries the output's gradient back
through the blocks, read again one at a time (`_Backward`). The allocator then spends the budget on
sensitivity x predicted squared output error, as in memory.

A causal LM's tied embedding/LM head, outside the blocks, is offered to a budget too, and priced as
in memory (`_TablePasses`): some of its forms are run through the blocks side by side on the
reverse pass's probe and their real next-token KL measured; the projections allocated alone are
made from a second streamed pass's Grams and their joint KL measured, to put their predicted costs
on the table's scale. If the table is chosen it is factorized first, and the blocks are calibrated
on what it gives them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from mpocompress.compress.calibrate import (
    FISHER_CHUNK,
    BlockStream,
    Calibration,
    HiddenStore,
    KeptOutputs,
    _grid_rows,
    _real_rows,
    _row_mask,
    block_hidden,
    calibration_passes,
    call_block,
    call_groups,
    capture_block_inputs,
    collect_grams,
    final_states,
    head_fisher,
    lm_head,
    model_output,
    projection_grid,
    projection_rows,
    twice_kl,
)
from mpocompress.compress.choose import (
    CURVES_ONLY,
    NO_SIZE,
    Decision,
    LayerPlan,
    _fixed_option,
    _fixed_params,
    _make,
    _make_trying,
    curves_of,
    factorized,
    fixed_structure,
    probe_picks,
    probed_ratios,
    refit_whitening,
    report_of,
    spend,
    weigh,
    white_for,
)  # fmt: skip
from mpocompress.compress.config import CompressionConfig
from mpocompress.compress.convert import swap_in
from mpocompress.compress.report import CompressionReport, count_params, totals
from mpocompress.compress.select import FilterFn, transformer_blocks
from mpocompress.compress.structures import Option, make_factors
from mpocompress.compress.targets import LayerTarget, select_targets, weight_of
from mpocompress.errors import MPOCompressError, is_out_of_memory
from mpocompress.tensors import TableWeighting, table_weighting
from mpocompress.utils import is_causal_lm, map_large_blocks, return_free_memory, set_module, status

Batch = Mapping[str, torch.Tensor]
T = TypeVar("T")
CPU = torch.device("cpu")
LoadBlock = Callable[[nn.Module, str], None]  # fill block's parameters (on meta) from the files, by its full name
WriteBlock = Callable[[str, nn.Module], None]  # take the compressed block's tensors (its full name, the block)


class Ranks:
    """How the processes of a torchrun launch share a streamed conversion (one process: nothing to
    share). Each runs its own shard of the calibration batches through the current block; the
    statistics, sums over batches, are all-reduced, so every process holds those of all the data;
    each layer's forms and factors are made by one process (layers dealt round-robin) and broadcast,
    so every process swaps in the same factors and moves its hidden states through the same block."""

    def __init__(self) -> None:
        on = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.dealt = 0

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce (sum) every tensor in place, each once."""
        if self.world == 1:
            return
        seen: set[int] = set()
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                dist.all_reduce(t)

    def count(self, n: int) -> int:
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t)

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def deal(self, make: Callable[[], T]) -> T:
        """make() on the process whose turn it is, its result on every process."""
        if self.world == 1:
            return make()
        owner, self.dealt = self.dealt % self.world, self.dealt + 1
        box = [make() if self.rank == owner else None]
        dist.broadcast_object_list(box, src=owner)
        return box[0]


def _summed_grams(cal: Calibration, ranks: Ranks) -> Calibration:
    ranks.sum_(list({id(t): t for t in (*cal.grams.values(), *cal.sums.values())}.values()))  # a shared Gram once
    cal.rows = {name: ranks.count(n) for name, n in cal.rows.items()}
    cal.samples = ranks.count(cal.samples)
    return cal


def _summed_cross(stats: dict, ranks: Ranks) -> dict:
    summed: dict[int, torch.Tensor] = {}  # a group's shared tensors once
    for st in stats.values():
        summed.update((id(t), t) for t in st.tensors())
        st.rows = ranks.count(st.rows)
    ranks.sum_(list(summed.values()))
    return stats


def stream_blocks(model: nn.Module) -> str:
    """The name of the one stack of blocks a streamed conversion walks."""
    stacks = transformer_blocks(model)
    if len(stacks) != 1:
        found = ", ".join(stacks) if stacks else "none"
        raise MPOCompressError(
            f"--stream walks a transformer's one stack of blocks, and this model has {len(stacks)} ({found}); "
            "convert it without --stream"
        )
    return stacks[0]


def _release(block: nn.Module) -> None:
    """Back to the meta device: the block's tensors are freed, and the heap's free pages returned."""
    block.to("meta")
    return_free_memory()


def stream_compress_(
    model: nn.Module,
    config: CompressionConfig,
    batches: Sequence[Batch],
    load_block: LoadBlock,
    write_block: WriteBlock,
    store: HiddenStore | None = None,
    filter_fn: FilterFn | None = None,
    ranks: Ranks | None = None,
    device: torch.device | str = "cpu",
) -> CompressionReport:
    """Compress the layers of `model`'s stack of blocks one block at a time (see the module's text).

    Args:
        model: the model, its blocks on the meta device, everything else real.
        config: the sizes (D, eps, or a budget for the allocator) and structures, as `compress_`.
        batches: calibration batches (required: a streamed conversion always calibrates).
        load_block: fills a block's parameters; called once per block per pass.
        write_block: receives each compressed block before it is freed.
        store: where the hidden states between blocks are kept (memory by default).
        filter_fn: optional restriction of the candidates (only layers inside the blocks are ever taken).
        ranks: the processes sharing the work under torchrun (`batches` is then this process's shard);
            by default those of the process group, if one is initialized.
        device: where the blocks run and are factorized (`batches` must be there); each block is
            read into CPU memory, moved there, and written back from CPU memory. The model's parts
            outside the blocks move there too, and stay.
    """
    sel = _select_streamed(model, config, batches, filter_fn, "compresses")
    map_large_blocks()  # a block's freed tensors go back to the system, not to the heap
    device = _outside_to(model, sel.blocks, device)
    blocks, skipped, before, per_block, fixed, free = sel.blocks, sel.skipped, sel.before, sel.per_block, sel.fixed, sel.free
    store = store if store is not None else HiddenStore()
    ranks = ranks if ranks is not None else Ranks()
    masks = [_row_mask(b) for b in batches]
    notes = [(f"streamed block by block through the {len(per_block)} blocks of {blocks}: each block calibrated on what the "
              "blocks already compressed give it and refitted to the original block's outputs (as --sequential)")]  # fmt: skip
    if free and not config.allocating:
        raise MPOCompressError(
            f"no bond dimension for {', '.join(t.cand.name for t in free)}: give --bond-dim D (or NAME=D for each), "
            "--eps E, or a budget with --target-params P"
        )
    allocated: dict[str, Decision] = {}
    plan = LayerPlan([], config, None, batches)
    precision: list[str] = []
    with calibration_passes(config.calib_dtype, model, precision):  # the outside parts are on the device now
        try:
            if free:
                allocated = _allocate_streamed(model, config, fixed, free, batches, masks, per_block, load_block, store, notes, ranks,
                                               None, device, plan.tables)  # fmt: skip
            _compress_streamed(model, config, batches, masks, per_block, allocated, load_block, write_block, store, plan, ranks, device)
        finally:
            store.close()
    report = totals(plan.layers, skipped + plan.kept, before, config.bond_dim, config.eps, applied=True, model_after=count_params(model))
    report.notes += notes + plan.notes + precision
    return report


@dataclass
class _Selected:
    """What a streamed pass works on: the stack's name, its selected layers (per block too), those
    with a size given (fixed) and those the budget sizes (free)."""

    blocks: str
    targets: list[LayerTarget]
    skipped: list
    before: int
    per_block: list[list[LayerTarget]]
    fixed: list[LayerTarget]
    free: list[LayerTarget]


def _select_streamed(model: nn.Module, config: CompressionConfig, batches: Sequence[Batch], filter_fn: FilterFn | None, verb: str) -> _Selected:
    if not batches:
        raise MPOCompressError("the calibration data is empty; give at least one sample")
    blocks = stream_blocks(model)
    stack, prefix = model.get_submodule(blocks), blocks + "."
    table = _tied_table(model) if config.budgeted else None  # a budget offers it, as in memory

    def streamed(m: nn.Module, n: str) -> bool:
        return (n.startswith(prefix) or m is table) and (filter_fn is None or filter_fn(m, n))

    targets, skipped = select_targets(model, config, streamed)
    if not any(t.cand.name.startswith(prefix) for t in targets):
        raise MPOCompressError(f"no layer inside {blocks} is selected; --stream {verb} the layers of the blocks")
    per_block: list[list[LayerTarget]] = [[] for _ in stack]
    for t in targets:
        if t.cand.module is not table:
            per_block[int(t.cand.name[len(prefix) :].split(".", 1)[0])].append(t)
    fixed = [t for t in targets if t.bond_dim is not None or t.eps is not None]
    free = [t for t in targets if t.bond_dim is None and t.eps is None]
    for t in fixed:
        if t.cand.module is table:
            raise MPOCompressError(
                f"--stream sizes the tied embedding/LM head ({t.cand.name}) by the budget only; drop its D or eps, "
                f"or leave it dense with --exclude {t.cand.name}"
            )
    return _Selected(blocks, targets, skipped, count_params(model), per_block, fixed, free)


def _tied_table(model: nn.Module) -> nn.Module | None:
    """A causal LM's input embedding when its LM head shares its weight (tied embeddings): the one
    layer outside the blocks a streamed budget offers (see `_TablePasses`)."""
    if not is_causal_lm(model):
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(emb, "weight", None)
    return emb if weight is not None and not weight.is_meta and getattr(head, "weight", None) is weight else None


def stream_analyze(
    model: nn.Module,
    config: CompressionConfig,
    batches: Sequence[Batch],
    load_block: LoadBlock,
    store: HiddenStore | None = None,
    filter_fn: FilterFn | None = None,
    ranks: Ranks | None = None,
    device: torch.device | str = "cpu",
) -> CompressionReport:
    """What `stream_compress_` would choose, without changing or writing anything (`analyze --stream`):
    every free layer's forms with their predicted output errors (the report's curves) from the first
    streamed pass, the allocation at the budget, and, in a second pass over the original blocks on the
    original inputs, the chosen forms made as in-memory `analyze` makes them (whitened by the
    original inputs' Grams, refined, no refit) for their reports. Arguments as
    `stream_compress_`; the blocks go back to the meta device."""
    sel = _select_streamed(model, config, batches, filter_fn, "analyzes")
    map_large_blocks()  # a block's freed tensors go back to the system, not to the heap
    device = _outside_to(model, sel.blocks, device)
    blocks, targets, skipped, before, per_block, fixed, free = sel.blocks, sel.targets, sel.skipped, sel.before, sel.per_block, sel.fixed, sel.free
    stack, prefix = model.get_submodule(blocks), blocks + "."
    store = store if store is not None else HiddenStore()
    ranks = ranks if ranks is not None else Ranks()
    masks = [_row_mask(b) for b in batches]
    notes = [f"streamed block by block through the {len(per_block)} blocks of {blocks}: the original blocks on the original inputs"]
    curves: dict[str, list] = {}
    plan = LayerPlan([], config, None, batches)
    precision: list[str] = []
    with calibration_passes(config.calib_dtype, model, precision):  # the outside parts are on the device now
        try:
            decided = _allocate_streamed(model, config, fixed, free, batches, masks, per_block, load_block, store, notes, ranks, curves, device,
                                         plan.tables)  # fmt: skip
            made = {n: d for n, d in decided.items() if d.option is not None}
            for name, white in plan.tables.items():  # the tied table, outside the blocks
                if name in made:
                    t = made[name].target
                    plan.layers.append(report_of(t, ranks.deal(lambda t=t, white=white: _make(t, made[t.cand.name].option, white, config.refine_steps))))
            last = max((i for i, ts in enumerate(per_block) if any(t.cand.name in made for t in ts)), default=-1)
            if last >= 0:
                stream = BlockStream(blocks, (stack,), [capture_block_inputs(model, stack[0], batches)], masks, store)
                for i in range(last + 1):
                    block, ts = stack[i], [t for t in per_block[i] if t.cand.name in made]
                    status(f"making the chosen forms of block {i + 1}/{len(stack)}")
                    with _block_memory(f"{prefix}{i}", block, ts, stream, sides=1):
                        _load(load_block, block, f"{prefix}{i}", device)
                        if ts:
                            cal = _summed_grams(_block_grams(stream, 0, block, ts, batches, prefix), ranks)
                            for t in ts:
                                f = ranks.deal(lambda t=t, cal=cal: _make(t, made[t.cand.name].option, white_for(t, cal, spend=True), config.refine_steps))
                                plan.layers.append(report_of(t, f))
                                for table in (cal.grams, cal.sums):
                                    table.pop(t.cand.name, None)
                            del cal
                        if i < last:
                            stream.advance()
                    _release(block)
        finally:
            store.close()
    order = {t.cand.name: k for k, t in enumerate(targets)}
    plan.decisions = sorted(decided.values(), key=lambda d: order[d.target.cand.name])
    after = before - sum(t.cand.numel for t in targets if t.cand.name in made) + sum(lr.params_mpo for lr in plan.layers)
    report = totals(plan.layers, skipped + plan.kept, before, config.bond_dim, config.eps, False, after)
    report.curves = curves_of(curves)
    report.notes += notes + precision
    if not made and not config.allocating:
        report.notes.append(CURVES_ONLY)
    return report


def _in_block(name: str, prefix: str) -> str:
    """A layer's name inside its block: model.layers.3.mlp.up_proj -> mlp.up_proj (prefix "model.layers.")."""
    return name[len(prefix) :].split(".", 1)[1]


def _block_grams(stream: BlockStream, side: int, block: nn.Module, ts: Sequence[LayerTarget], batches: Sequence[Batch], prefix: str) -> Calibration:
    """The Gram matrices of the inputs of a block's selected layers (those of `block`, the current
    block of `stream` on `side`), from the kept hidden states: what `collect_grams` gives in memory."""
    mods = _block_modules(block, ts, prefix)
    return collect_grams(block, mods, batches, stop_after=set(mods), run=lambda k, b: stream.run(side, k))


def _block_groups(stream: BlockStream, side: int, block: nn.Module, ts: Sequence[LayerTarget], batches: Sequence[Batch], prefix: str) -> list[list[str]]:
    """`_block_grams(...).groups` alone (`call_groups`): the block's selected layers in call order,
    grouped by the input they share."""
    return call_groups(block, _block_modules(block, ts, prefix), batches, run=lambda k, b: stream.run(side, k))


def _block_modules(block: nn.Module, ts: Sequence[LayerTarget], prefix: str) -> dict[str, nn.Module]:
    """The selected layers' modules in `block`, by their names in the model."""
    return {t.cand.name: block.get_submodule(_in_block(t.cand.name, prefix)) for t in ts}


def _allocate_streamed(
    model: nn.Module, config: CompressionConfig, fixed: list[LayerTarget], free: list[LayerTarget], batches: Sequence[Batch],
    masks: list, per_block: list[list[LayerTarget]], load_block: LoadBlock, store: HiddenStore, notes: list[str], ranks: Ranks,
    options: dict[str, list] | None, device: torch.device, tables: dict[str, TableWeighting],
) -> dict[str, Decision]:  # fmt: skip
    """The first pass, over the original blocks on the original inputs: every layer's decision. A
    layer with a D or an eps gets its form as in memory; the free layers' forms are weighed, their
    sensitivities at the model's output come from the reverse pass (`_Backward`), and the budget is
    spent on them; a free tied table is priced by `_TablePasses`, and `tables` receives its weighting
    (for its factors). `options`, when given, receives every free layer's weighed forms (analyze's
    curves); without a budget the free layers are then only weighed, and stay undecided (dense, with
    the reason)."""
    blocks = stream_blocks(model)
    stack, prefix = model.get_submodule(blocks), blocks + "."
    stream = BlockStream(blocks, (stack,), [capture_block_inputs(model, stack[0], batches)], masks, store)
    free_ids = {id(t) for t in free}
    last = max(i for i, ts in enumerate(per_block) if ts)
    weighed: dict[int, tuple[list, float]] = {}
    decided: list[Decision] = []
    plan = LayerPlan([], config, None, batches)
    plan.screen = options is None  # analyze's curves show every form, as in memory
    plan.spend = True  # each layer's Gram serves its one whitening
    # what the budget is spent on needs the output's gradients; curves and error caps alone need none
    back = _Backward(model, stream, batches, ranks, [[t for t in ts if id(t) in free_ids] for ts in per_block]) if config.budgeted and free else None
    end = len(stack) - 1 if back is not None else last  # the gradients start at the model's output
    for i in range(end + 1):
        block, ts = stack[i], per_block[i]
        status(f"weighing the forms of block {i + 1}/{len(stack)}")
        with _block_memory(f"{prefix}{i}", block, ts, stream, sides=1):
            _load(load_block, block, f"{prefix}{i}", device)
            if back is not None:
                back.keep(i)
            if ts:
                plan.calibration = _summed_grams(_block_grams(stream, 0, block, ts, batches, prefix), ranks)
                for t in ts:
                    if id(t) in free_ids:
                        weighed[id(t)] = ranks.deal(lambda t=t: weigh(t, config, plan))
                    else:
                        decided.append(Decision(t, *_fixed_option(t, fixed_structure(config), plan._white(t) if t.eps is not None else None)))
                    plan._whites.clear()  # one layer's whitening and Gram at a time
                    for table in (plan.calibration.grams, plan.calibration.sums):
                        table.pop(t.cand.name, None)
                plan.calibration = None
            if i < end:
                stream.advance()
            elif back is not None:
                back.keep_output()
        _release(block)
    sens = back.sensitivities(load_block, device) if back is not None else {}
    table = next((t for t in free if t.cand.converter.serves_head), None)
    passes = _TablePasses(model, table, back, batches, masks, per_block, load_block, device) if table is not None and back is not None else None
    if passes is not None:
        status("weighing the forms of the tied embedding/LM head")
        opts, energy, white = passes.weigh(config)
        weighed[id(table)] = (opts, energy)
        tables[table.cand.name] = white
    plan.decisions = decided
    if options is not None:
        options.update({t.cand.name: weighed[id(t)][0] for t in free})
        if not config.allocating:
            return {d.target.cand.name: d for d in [*decided, *(Decision(t, None, NO_SIZE) for t in free)]}
    forms = [weighed[id(t)][0] for t in free]
    costs = [weighed[id(t)][1] for t in free]
    fixed_params = _fixed_params(decided)
    scale = [[1.0] * len(o) for o in forms]
    joint = None
    if passes is not None:
        k = free.index(table)
        measured = passes.forms_kl(forms[k], white)
        scale[k] = probed_ratios(forms[k], probe_picks(forms[k])[0], measured, costs[k])

        def joint(chosen: list[Option]) -> float:
            return passes.joint_kl({t.cand.name: o for t, o in zip(free, chosen) if o.structure != "dense" and t is not table})

        notes.append(
            f"the tied input embedding and LM head ({' = '.join(table.cand.names)}) are one candidate, a low-rank table serving both "
            f"ends: {len(measured)} of its forms were swapped in and run through the blocks, their real next-token KL measured over "
            f"{back.tokens:,} calibration tokens"
        )
    decisions = spend(config, free, forms, costs, [1.0 if t is table else sens.get(t.cand.name, 1.0) for t in free], scale, plan,
                      count_params(model), fixed_params, joint)  # fmt: skip
    notes += plan.notes
    if back is not None:
        notes.append(
            "allocated from a first streamed pass over the original blocks: each form's cost is its predicted squared output "
            "error on the block's calibration inputs times the layer's sensitivity at the model's output ("
            + ("next-token KL through the LM head's Fisher" if back.causal else "its main output")
            + f"), from gradients carried back through the blocks in reverse order over {back.tokens:,} calibration tokens"
        )
    return {d.target.cand.name: d for d in [*decided, *decisions]}


@contextlib.contextmanager
def _block_memory(name: str, block: nn.Module, ts: Sequence[LayerTarget], stream: BlockStream, sides: int) -> Iterator[None]:
    """Turn running out of memory inside a block into a one-line error naming the block and what it needs."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        weights = sum(p.numel() * p.element_size() for p in block.parameters()) * sides
        stats = sum(3 * t.cand.nx**2 * 8 for t in ts)  # float64 Grams and cross moments of its layers' inputs
        held = stream.store.held_bytes()
        raise MPOCompressError(
            f"out of memory while streaming block {name}: the block itself needs about {_gib(weights + stats + held)} beyond what the process holds (its weights "
            f"{_gib(weights)}{' twice, original and compressed' if sides == 2 else ''}, its layers' input statistics "
            f"{_gib(stats)}, the hidden states kept between blocks {_gib(held)}); raise the memory limit"
            + (", or keep the hidden states on disk with --offload disk" if held else ", or calibrate on fewer samples (--calib-samples)")
        ) from None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


SENSITIVITY_TOKENS = 2048  # calibration tokens (all processes together) the streamed sensitivities run on
KEPT = 2  # the store's sides from which the reverse pass keeps the hidden states entering block i (KEPT + i)


class _Given(nn.Module):
    """Stands in for a block on the meta device while the model runs past its stack: passes the
    hidden states on, or (the last block) gives those in `given[0]`, with the block's plain
    attributes (a layer type, an index) for the model's loop to read."""

    def __init__(self, block: nn.Module, given: list[torch.Tensor] | None, wrapped: bool) -> None:
        super().__init__()
        for k, v in vars(block).items():
            if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor):
                self.__dict__[k] = v
        self.given, self.wrapped = given, wrapped

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor | tuple[torch.Tensor]:
        out = self.given[0] if self.given is not None else hidden
        return (out,) if self.wrapped else out


@dataclass
class _Probe:
    """A calibration batch the reverse pass runs on, cut to its leading `rows` samples."""

    b: int  # the local batch
    index: int  # its index among the batches of all processes
    rows: int  # its leading samples kept
    batch: Batch
    mask: torch.Tensor | None
    args: tuple  # what the model passes each block besides the hidden states, cut alike
    kwargs: dict


def _leading(obj: object, n: int, rows: int) -> object:
    """`obj` (a block's argument: a tensor, or tuples and dicts of them) cut to its leading `rows`
    samples: each tensor whose first dimension is the batch's `n` samples; others (a mask or rotary
    table broadcast over the batch) as they are."""
    if rows >= n:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[:rows] if obj.dim() >= 1 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_leading(x, n, rows) for x in obj)
    if isinstance(obj, dict):
        return {k: _leading(v, n, rows) for k, v in obj.items()}
    return obj


class _Backward:
    """The free layers' sensitivities at the model's output, as the in-memory allocator measures them
    (`gradient_sensitivity`: next-token KL through the LM head's Fisher for a causal LM, else the
    model's main output), with one block in memory at a time. The first pass keeps the hidden states
    entering every block from the first free layer's on, for the leading SENSITIVITY_TOKENS tokens of
    the calibration batches of all processes together (the last batch cut to its leading samples);
    at the end of the stack the output's random projection (seeded per batch, as in memory) is drawn
    and its gradient carried back block by block in reverse order, each block read again and run
    forward on its kept inputs. The gradient reaching each layer's output is the one a backward pass
    through the whole model gives, so the sensitivities equal the in-memory ones on the same batches
    (tests check it)."""

    def __init__(self, model: nn.Module, stream: BlockStream, batches: Sequence[Batch], ranks: Ranks, free: list[list[LayerTarget]]) -> None:
        self.model, self.stream, self.ranks, self.free = model, stream, ranks, free
        self.causal = is_causal_lm(model)
        self.first = min((i for i, ts in enumerate(free) if ts), default=len(free))  # none: only the tied table is free
        shapes = [tuple(next(iter(b.values())).shape[:2]) for b in batches]
        counts = ranks.gather([(int(s[0]), int(torch.Size(s).numel())) for s in shapes])  # (samples, tokens) per local batch, per process
        n = g = 0  # batch g of all processes together is local batch g // world of process g % world
        cut: dict[int, int] = {}  # global batch -> its leading samples kept
        while n < SENSITIVITY_TOKENS and g // ranks.world < len(counts[g % ranks.world]):
            samples, tokens = counts[g % ranks.world][g // ranks.world]
            cut[g] = min(samples, -(-(SENSITIVITY_TOKENS - n) * samples // max(tokens, 1)))
            n, g = n + tokens * cut[g] // samples, g + 1
        self.probe: list[_Probe] = []
        for b, batch in enumerate(batches):
            index = b * ranks.world + ranks.rank
            if index in cut:
                samples, rows = shapes[b][0], cut[index]
                args, kwargs = stream.extra[0][b]
                small = {k: _leading(v, samples, rows) for k, v in batch.items()}
                self.probe.append(_Probe(b, index, rows, small, _row_mask(small), _leading(args, samples, rows), _leading(kwargs, samples, rows)))
        # the real tokens (padding left out) the gradients run on, of all processes
        self.tokens = ranks.count(sum(int(p.mask.sum()) if p.mask is not None else int(next(iter(p.batch.values())).numel()) for p in self.probe))

    def keep(self, i: int) -> None:
        """Block i is the stream's current one: keep what enters it."""
        if i >= self.first:
            for p in self.probe:
                x = self.stream.store.get((0, p.b))
                self.stream.store.put((KEPT + i, p.b), x if p.rows == x.shape[0] else x[: p.rows].clone())

    @torch.no_grad()
    def keep_output(self) -> None:
        """The stream's current block is the last: keep what leaves it."""
        i = self.stream.index
        block = self.stream.stacks[0][i]
        block.eval()
        for p in self.probe:
            out = call_block(block, self.stream.store.get((KEPT + i, p.b)), p.args, p.kwargs)
            self.stream.store.put((KEPT + i + 1, p.b), block_hidden(out))

    def sensitivities(self, load_block: LoadBlock, device: torch.device) -> dict[str, float]:
        store, stack, n = self.stream.store, self.stream.stacks[0], len(self.stream.stacks[0])
        prefix = self.stream.prefix
        try:
            grads = self._output_gradients(load_block)
            grad2: dict[str, float] = {}
            entries: dict[str, int] = {}
            for i in range(n - 1, self.first - 1, -1):
                status(f"sensitivities: block {i + 1}/{n}, backward")
                block = stack[i]
                with _block_memory(f"{prefix}{i}", block, [], self.stream, sides=1):
                    _load(load_block, block, f"{prefix}{i}", device)
                    flags = [p.requires_grad for p in block.parameters()]
                    block.eval().requires_grad_(False)  # gradients reach the hidden states, not the weights
                    mods = _block_modules(block, self.free[i], prefix)
                    for p in self.probe:
                        grads[p.b] = self._back_through(block, p, store.get((KEPT + i, p.b)), grads[p.b], mods, grad2, entries)
                        store.drop((KEPT + i, p.b))
                    for p, f in zip(block.parameters(), flags):
                        p.requires_grad_(f)
                _release(block)
        finally:
            for i in range(self.first, n + 1):
                for p in self.probe:
                    store.drop((KEPT + i, p.b))
        names = [t.cand.name for ts in self.free for t in ts]
        both = torch.tensor([[grad2.get(k, 0.0), float(entries.get(k, 0))] for k in names], dtype=torch.float64)
        self.ranks.sum_([both])
        return {k: float(s / e) if e > 0 else 0.0 for k, (s, e) in zip(names, both.tolist())}

    def _back_through(self, block: nn.Module, p: _Probe, x: torch.Tensor, grad: torch.Tensor, mods: Mapping[str, nn.Module],
                      grad2: dict[str, float], entries: dict[str, int]) -> torch.Tensor:  # fmt: skip
        """The block on a probe's kept input once more, the gradient at its output carried to its
        input (returned) and to its free layers' outputs (squared sums added)."""
        x = x.detach().requires_grad_(True)
        with KeptOutputs(mods) as keeper, torch.enable_grad():
            y = keeper.run(lambda: block_hidden(call_block(block, x, p.args, p.kwargs)))
            names = [k for k in mods if k in keeper.kept]
            got = torch.autograd.grad(y, [x, *(keeper.kept[k] for k in names)], grad_outputs=grad, allow_unused=True)
        for k, g in zip(names, got[1:]):
            if g is not None:
                g = _real_rows(g, p.mask)
                grad2[k] = grad2.get(k, 0.0) + float(g.double().square().sum())
                entries[k] = entries.get(k, 0) + g.numel()
        return got[0] if got[0] is not None else torch.zeros_like(x)

    def _output_gradients(self, load_block: LoadBlock) -> dict[int, torch.Tensor]:
        """Per probe batch: the gradient, at the last block's output, of the output's random projection
        (for a causal LM the final hidden states times a root of the head's Fisher, made here from
        the probe tokens of every process)."""
        store, stack, n = self.stream.store, self.stream.stacks[0], len(self.stream.stacks[0])
        given: list[torch.Tensor] = []
        net = self.model.base_model if self.causal else self.model
        kept, outs = [], []  # per probe: the last block's output (a leaf) and what the model makes of it
        with _past_the_blocks(stack, given, self.stream.wrapped), torch.enable_grad():
            for p in self.probe:
                kept.append(store.get((KEPT + n, p.b)).detach().requires_grad_(True))
                given[:] = kept[-1:]
                outs.append(model_output(net, {**p.batch, "use_cache": False} if self.causal else p.batch))
            given.clear()
        self.final = [y.detach() for y in outs]  # the original's final hidden states (real tokens), for the table's passes
        root = self._fisher_root(torch.cat(self.final), load_block) if self.causal else None
        grads: dict[int, torch.Tensor] = {}
        for p, h, y in zip(self.probe, kept, outs):
            status(f"sensitivities: the output's gradient, batch {p.b + 1}")
            with torch.enable_grad():
                if root is not None:  # the final hidden states times a root of the head's Fisher
                    y = y @ root.to(y.device)
                y = y.reshape(-1, y.shape[-1])
                grid = projection_grid(0, p.index, (*_grid_rows(p.batch), y.shape[-1]))
                u = projection_rows(grid, p.mask, y.shape[0]).to(y)
                grads[p.b] = torch.autograd.grad((y * u).sum(), h)[0]
        return grads

    def _fisher_root(self, h: torch.Tensor, load_block: LoadBlock) -> torch.Tensor:
        head = lm_head(self.model)
        read = head.weight.is_meta  # an untied head, read from the files for this alone
        if read:
            _load(load_block, head, next(k for k, m in self.model.named_modules() if m is head), h.device)
        try:
            root, self.mean_p = head_fisher(head, h, reduce=self.ranks.sum_)
        finally:
            if read:
                _release(head)
        gram = h.T @ h  # the second moment of what the head reads, all processes' tokens
        count = torch.tensor([float(h.shape[0])], dtype=torch.float64, device=h.device)
        self.ranks.sum_([gram, count])
        self.head_gram = gram / count.clamp_min(1)
        return root

    @torch.no_grad()
    def final_states(self, side: int) -> list[torch.Tensor]:
        """Per probe batch, what follows the blocks (the final norm) makes of the last block's
        outputs kept on `side` of the store: the final hidden states of its real tokens."""
        stack, given = self.stream.stacks[0], []
        net = self.model.base_model
        out = []
        with _past_the_blocks(stack, given, self.stream.wrapped):
            for p in self.probe:
                given[:] = [self.stream.store.get((side, p.b))]
                out.append(final_states(net, p.batch))
        return out

    @torch.no_grad()
    def swap_kl(self, finals: Sequence[torch.Tensor], head: nn.Module) -> float:
        """`measure_swap_kl`'s units over the probe (twice the next-token KL summed over the real tokens,
        over the samples; all processes): the original's final hidden states through its own head
        against `finals` through `head`."""
        ref = lm_head(self.model)
        total = torch.zeros(2, dtype=torch.float64)
        for p, h0, h1 in zip(self.probe, self.final, finals):
            for a, b in zip(h0.split(FISHER_CHUNK), h1.split(FISHER_CHUNK)):
                total[0] += twice_kl(ref(a.to(ref.weight.dtype)), head(b.to(ref.weight.dtype)))
            total[1] += p.rows
        self.ranks.sum_([total])
        return float(total[0] / total[1].clamp_min(1))


TABLE_SIDES = 1000  # the store's sides for the probe's hidden states under the tied table's probed forms (TABLE_SIDES + k)
JOINT_SIDE = 999  # and under the projections' allocated forms swapped in together


class _TablePasses:
    """The tied embedding/LM head offered to a streamed budget, priced as the in-memory allocator
    prices it (`choose._probed`, `choose._on_the_table_scale`), with one block in memory at a time.
    Its weighting (`TableWeighting`) comes from the reverse pass's final hidden states and head
    distributions on the probe; its forms are weighed as in memory. Then two more streamed passes
    over the probe batches of `_Backward`:
    - `forms_kl`: PROBES of its forms, each swapped in at both ends, run through the original blocks
      side by side (each block read once for all of them); the real next-token KL of each;
    - `joint_kl` (called by `spend` with the projections allocated alone, the table dense): the
      original blocks run once more on all the calibration batches for their layers' Grams, each
      block's allocated forms made from them (as in memory, no refit) and swapped in for the probe;
      the real next-token KL of them all together, which puts the projections' predicted costs on
      the scale of the table's measured ones."""

    def __init__(self, model: nn.Module, t: LayerTarget, back: _Backward, batches: Sequence[Batch], masks: list,
                 per_block: list[list[LayerTarget]], load_block: LoadBlock, device: torch.device) -> None:  # fmt: skip
        self.model, self.t, self.back, self.batches, self.masks = model, t, back, batches, masks
        self.per_block, self.load_block, self.device = per_block, load_block, device
        self.stack = back.stream.stacks[0]

    def weigh(self, config: CompressionConfig) -> tuple[list[Option], float, TableWeighting]:
        """The table's forms and output energy, weighted by the head's statistics on the probe (as
        `plan_layers` weights it in memory) and the token counts of all calibration batches."""
        t, ranks = self.t, self.back.ranks
        white = table_weighting(self.back.head_gram, self.back.mean_p)
        counts = torch.zeros(t.cand.nx, dtype=torch.float64)
        samples = torch.zeros(1, dtype=torch.float64)
        for b, mask in zip(self.batches, self.masks):
            ids = b["input_ids"][mask] if mask is not None else b["input_ids"].reshape(-1)
            counts += torch.bincount(ids.cpu(), minlength=t.cand.nx)[: t.cand.nx].to(torch.float64)
            samples += int(b["input_ids"].shape[0])
        ranks.sum_([counts, samples])
        plan = LayerPlan([], config, Calibration({t.cand.name: counts}, {}, int(samples)), None)
        plan.tables[t.cand.name] = white
        opts, energy = ranks.deal(lambda: weigh(t, config, plan))
        return opts, energy, white

    def _start(self, side: int, table: nn.Module | None) -> None:
        """Keep on `side` what the model gives its first block for each probe batch, with `table`
        (None: the original) swapped in at both ends."""
        olds = [self.model.get_submodule(n) for n in self.t.cand.names]
        try:
            if table is not None:
                for n in self.t.cand.names:
                    set_module(self.model, n, table)
            inputs = capture_block_inputs(self.model, self.stack[0], [p.batch for p in self.back.probe])
        finally:
            for n, old in zip(self.t.cand.names, olds):
                set_module(self.model, n, old)
        for p, (x, _, _) in zip(self.back.probe, inputs):
            self.back.stream.store.put((side, p.b), x)

    def _through_the_blocks(self, sides: Sequence[int], joint: Mapping[str, Option] | None = None) -> None:
        """Run the probe's hidden states kept on each of `sides` (see `_start`) through every block in
        order, each block read once for all sides. With `joint` (layer name -> allocated form), the
        calibration batches run through the original blocks too, each block's allocated layers are
        made from their Grams, and JOINT_SIDE runs through the block with them swapped in."""
        back, store, prefix = self.back, self.back.stream.store, self.back.stream.prefix
        probe = back.probe
        stream, last = None, -1
        if joint is not None:
            stream = BlockStream(self.back.stream.prefix[:-1], (self.stack,), [capture_block_inputs(self.model, self.stack[0], self.batches)],
                                 self.masks, store)  # fmt: skip
            last = max((i for i, ts in enumerate(self.per_block) if any(t.cand.name in joint for t in ts)), default=-1)
        for i, block in enumerate(self.stack):
            status(f"{'the allocated layers together' if joint is not None else 'the tied table forms'}: block {i + 1}/{len(self.stack)}")
            with _block_memory(f"{prefix}{i}", block, [], back.stream, sides=1):
                _load(self.load_block, block, f"{prefix}{i}", self.device)
                block.eval()
                swapped: list[tuple[str, nn.Module]] = []
                try:
                    with torch.no_grad():
                        for side in sides:
                            for p in probe:
                                store.put((side, p.b), block_hidden(call_block(block, store.get((side, p.b)), p.args, p.kwargs)))
                    if stream is not None:
                        swapped = self._swap_allocated(i, block, stream, joint)
                        with torch.no_grad():
                            for p in probe:
                                store.put((JOINT_SIDE, p.b), block_hidden(call_block(block, store.get((JOINT_SIDE, p.b)), p.args, p.kwargs)))
                finally:
                    for inner, old in swapped:
                        set_module(block, inner, old)
                if stream is not None and i < last:
                    stream.advance()
            _release(block)
        del stream
        for b in range(len(self.batches)):
            store.drop((0, b))

    def _swap_allocated(self, i: int, block: nn.Module, stream: BlockStream, joint: Mapping[str, Option]) -> list[tuple[str, nn.Module]]:
        """Block i's allocated layers made as the in-memory joint measure makes them (whitened by their
        inputs' Grams over all calibration batches, no refinement) and swapped into the block; returns
        (name in the block, original) for each."""
        prefix, ranks = self.back.stream.prefix, self.back.ranks
        ts = [t for t in self.per_block[i] if t.cand.name in joint]
        swapped: list[tuple[str, nn.Module]] = []
        if not ts:
            return swapped
        cal = _summed_grams(_block_grams(stream, 0, block, ts, self.batches, prefix), ranks)
        for t in ts:
            o = joint[t.cand.name]
            f = ranks.deal(lambda t=t, o=o: make_factors(weight_of(t), o, white_for(t, cal, spend=True), 0, errors=False))
            cal.sums.pop(t.cand.name, None)
            inner = _in_block(t.cand.name, prefix)
            swapped.append((inner, block.get_submodule(inner)))
            set_module(block, inner, factorized(t, f).eval())
        return swapped

    def forms_kl(self, opts: list[Option], white: TableWeighting) -> dict[int, tuple[float, float]]:
        """The probed forms' (real next-token KL, weighted error), by option index (see `probe_picks`).
        Each form is made twice, for the first block's inputs and for the head, so that one table
        (a vocabulary wide) is held at a time, not all."""
        w = weight_of(self.t)
        _, picks = probe_picks(opts)

        def table(k: int) -> nn.Module:
            f = self.back.ranks.deal(lambda: make_factors(w, opts[k], white, 0, errors=False))
            return factorized(self.t, f).eval()

        for j, k in enumerate(picks):
            self._start(TABLE_SIDES + j, table(k))
        self._through_the_blocks([TABLE_SIDES + j for j in range(len(picks))])
        out = {}
        for j, k in enumerate(picks):
            status(f"measuring the next-token KL of the tied table's form {j + 1}/{len(picks)}")
            out[k] = (self.back.swap_kl(self.back.final_states(TABLE_SIDES + j), table(k)), opts[k].rel_error)
            for p in self.back.probe:
                self.back.stream.store.drop((TABLE_SIDES + j, p.b))
        return out

    def joint_kl(self, allocated: Mapping[str, Option]) -> float:
        """The real next-token KL with the projections' `allocated` forms swapped in together (the table dense)."""
        self._start(JOINT_SIDE, None)
        self._through_the_blocks([], allocated)
        status(f"measuring the next-token KL of {len(allocated)} layers together")
        kl = self.back.swap_kl(self.back.final_states(JOINT_SIDE), lm_head(self.model))
        for p in self.back.probe:
            self.back.stream.store.drop((JOINT_SIDE, p.b))
        return kl


@contextlib.contextmanager
def _past_the_blocks(stack: nn.Module, given: list[torch.Tensor], wrapped: bool) -> Iterator[None]:
    """The model runs past its stack of blocks (on the meta device): each passes its input on, the
    last gives `given[0]` instead, so the model's output is what follows the blocks applied to it."""
    blocks = dict(stack._modules)
    keys = list(blocks)
    try:
        for k in keys:
            stack._modules[k] = _Given(blocks[k], given if k == keys[-1] else None, wrapped)
        yield
    finally:
        stack._modules.update(blocks)


def _load(load_block: LoadBlock, block: nn.Module, name: str, device: torch.device) -> None:
    load_block(block, name)
    if any(p.is_meta for p in block.parameters()):
        missing = next(n for n, p in block.named_parameters() if p.is_meta)
        raise MPOCompressError(f"the weights of {name}.{missing} were not found in the model's files; the folder is incomplete")
    block.to(device)


def _outside_to(model: nn.Module, blocks: str, device: torch.device | str) -> torch.device:
    """Move the model's tensors outside its stack of blocks (embeddings, norms, rotary tables; not
    those still on the meta device, like an untied head a streamed pass never runs) to `device`."""
    device = torch.device(device)
    if device.type == "cpu":
        return device
    moved: dict[int, torch.Tensor] = {}  # by the original's id: a tied parameter moves once and stays tied
    for name, mod in model.named_modules(remove_duplicate=False):
        if name == blocks or name.startswith(blocks + "."):
            continue
        for table in (mod._parameters, mod._buffers):
            for k, t in table.items():
                if t is None or t.is_meta:
                    continue
                if id(t) not in moved:
                    on = t.detach().to(device)
                    moved[id(t)] = nn.Parameter(on, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else on
                table[k] = moved[id(t)]
    return device


def _compress_streamed(
    model: nn.Module, config: CompressionConfig, batches: Sequence[Batch], masks: list, per_block: list[list[LayerTarget]],
    allocated: Mapping[str, Decision], load_block: LoadBlock, write_block: WriteBlock, store: HiddenStore, plan: LayerPlan,
    ranks: Ranks, device: torch.device = CPU,
) -> None:  # fmt: skip
    """The second pass: each block factorized and refitted on the compressed blocks' outputs, written, freed."""
    blocks = stream_blocks(model)
    stack, prefix = model.get_submodule(blocks), blocks + "."
    references: list[nn.Module | None] = [None] * len(stack)
    inputs = capture_block_inputs(model, stack[0], batches)
    given = inputs
    for name, white in plan.tables.items():  # the tied table first: the blocks are calibrated on what it gives them
        d = allocated[name]
        plan.decisions.append(d)
        if d.option is not None:
            status("factorizing the tied embedding/LM head")
            f = ranks.deal(lambda d=d, white=white: _make_trying(d.target, d.option, white, config))
            plan.layers.append(report_of(d.target, f))
            swap_in(model, d.target, f)
            del f  # the table's module holds its own copies: these (80 MiB on SmolLM2) would stay to block 0's first refit
            _release(d.target.cand.module)  # the dense table, replaced at both ends
            given = capture_block_inputs(model, stack[0], batches)
    stream = BlockStream(blocks, (references, stack), [inputs, given], masks, store)
    del inputs, given
    for i, block in enumerate(stack):
        status(f"compressing block {i + 1}/{len(stack)}")
        name, ts = f"{prefix}{i}", per_block[i]
        with _block_memory(name, block, ts, stream, sides=2):
            _load(load_block, block, name, device)
            if ts:
                references[i] = copy.deepcopy(block)  # the original block, the refits' reference
                # the original inputs' Grams serve only a layer sized by an eps here; the refits take their own statistics,
                # group by group, and need only the groups (the call order, from the first batch that calls them all)
                cal = None
                if any(t.cand.name not in allocated and t.eps is not None for t in ts):
                    cal = _summed_grams(_block_grams(stream, 0, references[i], ts, batches, prefix), ranks)
                    groups = cal.groups
                else:
                    groups = _block_groups(stream, 0, references[i], ts, batches, prefix)
                decisions = {}
                for t in ts:
                    if t.cand.name in allocated:
                        decisions[t.cand.name] = allocated[t.cand.name]
                    else:
                        option, reason = _fixed_option(t, fixed_structure(config), white_for(t, cal) if t.eps is not None else None)
                        decisions[t.cand.name] = Decision(t, option, reason)
                del cal
                for group in groups:
                    todo = [decisions[n] for n in group if n in decisions]
                    plan.decisions += todo
                    todo = [d for d in todo if d.option is not None]
                    if not todo:
                        continue
                    fresh = _summed_cross(stream.cross([d.target.cand.name for d in todo]), ranks)
                    for d in todo:
                        t = d.target
                        status(f"factorizing {t.cand.name}")
                        st = fresh.pop(t.cand.name)  # each layer's statistics freed once whitened
                        f = ranks.deal(lambda t=t, d=d, st=st: _make_trying(t, d.option, refit_whitening(t, st), config))
                        del st
                        plan.layers.append(report_of(t, f))
                        swap_in(model, t, f)
                        return_free_memory()  # a wide layer's refit leaves hundreds of MB of freed pages
                    del fresh
            else:
                references[i] = block
            if i + 1 < len(stack):
                stream.advance()
        write_block(name, block.to("cpu"))  # written from CPU memory
        references[i] = None
        _release(block)
        for t in ts:  # the replaced layers, still held by their targets
            _release(t.cand.module)
