"""What each selected layer becomes: the form asked for (a D or an eps), or the allocator's choice
under a parameter budget and/or an error cap; then the factors of that form.

With calibration batches, every layer's input Gram matrix is collected first (one pass), each
error is an output error on those inputs, and the allocator weighs a layer's output error by how
much it moves the model's output (`gradient_sensitivity`). The cost of a form is that predicted
squared change of the model's output per sample; the allocator minimizes its sum within the budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpocompress.compress.allocate import Choice, allocate, cheapest_within
from mpocompress.compress.calibrate import (
    FISHER_TOKENS,
    Batch,
    BlockStream,
    Calibration,
    CrossStats,
    FinalHidden,
    HeadFisher,
    NotDifferentiable,
    SwapKL,
    base_runner,
    collect_cross,
    collect_grams,
    gradient_sensitivity,
    measure_sensitivity,
    measure_swap,
    numbers_per_sample,
    outputs,
)  # fmt: skip
from mpocompress.compress.config import CompressionConfig
from mpocompress.compress.registry import build_like
from mpocompress.compress.report import LayerReport, SkippedLayer, count_params, layer_report
from mpocompress.compress.select import first_match, transformer_blocks
from mpocompress.compress.structures import (
    AUTO_CORES,
    BOND_GRID,
    COARSE_GRID,
    Factors,
    Option,
    layer_options,
    make_factors,
    mpo_in_reach,
    mpo_options,
    try_mpo,
)
from mpocompress.compress.targets import LayerTarget, decompose, reported_structure, weight_of
from mpocompress.errors import MPOCompressError
from mpocompress.tensors import (
    TABLE_CHUNK,
    MPOShape,
    TableWeighting,
    Whitening,
    bond_spectra,
    bound_whitening,
    lowrank_spectrum,
    reusing_whitened,
    table_weighting,
    truncation_errors,
    whitening,
)  # fmt: skip
from mpocompress.utils import is_causal_lm, status

NO_SIZE = "no size asked for (give --target-params P for an allocation)"  # analyze's reason for a layer only weighed
CURVES_ONLY = "no size asked for: the curves show each form's error; give --target-params P to see an allocation"  # its note
SENSITIVITY_SAMPLES = 64  # calibration samples the sensitivity probes run on
SENSITIVITY_TOKENS = 8192  # a causal LM's: calibration tokens its backward passes run on


@dataclass
class Decision:
    """A layer and the form chosen for it (None: stays dense, with `reason`)."""

    target: LayerTarget
    option: Option | None
    reason: str = ""


def curves_of(options: Mapping[str, Sequence[Option]]) -> dict[str, list[dict[str, Any]]]:
    """Per layer, every form weighed: structure, parameters, predicted relative error (output
    error with calibration), and the ranks (the report's `curves`)."""
    return {
        name: [{"structure": o.structure, "params": o.params, "rel_error": o.rel_error,
                "ranks": [o.rank] if o.rank is not None else list(o.shape.bond_dims) if o.shape is not None else []}
               for o in opts]
        for name, opts in options.items()
    }  # fmt: skip


@dataclass
class LayerPlan:
    """Every selected layer's decision, and the means to make its factors."""

    decisions: list[Decision]
    config: CompressionConfig
    calibration: Calibration | None
    batches: Sequence[Mapping[str, torch.Tensor]] | None
    notes: list[str] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)  # filled as the factors are made
    _whites: dict[str, Whitening] = field(default_factory=dict)
    _by_gram: dict[tuple[int, bool], tuple[torch.Tensor, Whitening]] = field(default_factory=dict)  # (Gram, centred) -> its whitening
    tables: dict[str, TableWeighting] = field(default_factory=dict)  # a tied table's weighting, by name
    options: dict[str, list[Option]] = field(default_factory=dict)  # every form the allocator weighed, by layer
    screen: bool = True  # `auto` weighs an MPO's forms only where it could win (analyze's curves: all of them)
    defer: bool = False  # ... and where it could win near the size a first, low-rank-only allocation gives (see `_screen_deferred`)
    deferred: list[str] = field(default_factory=list)  # the layers whose screen waits for that allocation
    spend: bool = False  # a layer's Gram is taken out of `calibration` by its whitening (a streamed pass, one use each)
    hidden: FinalHidden | None = None  # a causal LM's final hidden states on the leading batches, while the allocator needs them

    def curves(self) -> dict[str, list[dict[str, Any]]]:
        """Per layer, every form weighed (see `curves_of`)."""
        return curves_of(self.options)

    @property
    def kept(self) -> list[SkippedLayer]:
        return [
            SkippedLayer(d.target.cand.name, d.target.cand.kind, d.target.cand.numel, d.reason)
            for d in self.decisions if d.option is None
        ]  # fmt: skip

    def _white(self, t: LayerTarget) -> Whitening | TableWeighting | None:
        """The layer's input whitening; None without calibration, and for an embedding, whose table
        is factorized by weight (its calibration counts only weigh its error, see `energy`): a
        whitening by token counts would leave the tokens calibration never saw unconstrained. A
        table that is also the tied LM head has its two-sided `TableWeighting`."""
        if self.calibration is None or t.cand.kind == "embedding":
            return self.tables.get(t.cand.name)
        name = t.cand.name
        if name not in self._whites:
            if self.spend:
                self._whites[name] = white_for(t, self.calibration, spend=True)
            else:  # layers called on one input (q/k/v, gate/up) share its Gram, and so one whitening
                gram = self.calibration.grams[name]
                key = (id(gram), getattr(t.cand.module, "bias", None) is not None)  # the Gram held with it: its id stays its own
                if key not in self._by_gram:
                    self._by_gram[key] = (gram, white_for(t, self.calibration))
                self._whites[name] = self._by_gram[key][1]
        return self._whites[name]

    def drop_grams(self, names: Sequence[str]) -> None:
        """Forget the input Grams of these layers (not an embedding's token counts), once every layer that
        reads them has its whitening: on SmolLM2 they are 0.8 GB, held beside the whitenings."""
        cal = self.calibration
        if cal is None or self.spend:
            return
        for name in names:
            gram = cal.grams.get(name)
            if gram is not None and gram.dim() == 2:
                del cal.grams[name]
                self._by_gram = {k: v for k, v in self._by_gram.items() if v[0] is not gram}

    def energy(self, t: LayerTarget, w: torch.Tensor) -> float:
        """The layer's output energy per calibration sample (||W||^2 without calibration): what its
        relative error is relative to. An embedding's is its rows' energies weighted by the token
        counts, so its (weight) error is taken as spread evenly over the tokens."""
        cal = self.calibration
        if cal is None:
            return float(w.detach().to(torch.float64).square().sum())
        if t.cand.kind == "embedding":
            counts = cal.grams[t.cand.name][: w.shape[1]]  # an MPO table's padded tokens are never counted
            rows = torch.cat([c.detach().to(torch.float64).square().sum(0) for c in w.split(TABLE_CHUNK, dim=1)])  # a vocabulary wide: in blocks
            return float(rows @ counts) / cal.samples
        return self._white(t).energy(w) / cal.samples

    def factors(self, model: nn.Module | None = None) -> Iterator[tuple[LayerTarget, Factors]]:
        """Make each converted layer's factors, in order, appending its report to `layers`. With
        `sequential` and a `model`, each group of layers (those called on one input) is fitted anew so
        that, on the inputs the model now gives it (its earlier layers swapped meanwhile by the
        caller), it reproduces what the original layer gave on the original inputs."""
        todo = {d.target.cand.name: d for d in self.decisions if d.option is not None}
        order = [n for g in self.calibration.groups for n in g] if self.calibration is not None else []
        order = [n for n in order if n in todo] + [n for n in todo if n not in order]
        sequential = self.config.sequential and model is not None and self.batches is not None
        reference = copy.deepcopy(model) if sequential else None  # the original, before any swap
        stream: BlockStream | None = None  # made at the first block's group, after any earlier swap (an embedding)
        streamable = sequential and len(transformer_blocks(model)) == 1
        fresh: dict[str, CrossStats] = {}
        for k, name in enumerate(order):
            status(f"factorizing layer {k + 1}/{len(order)} ({name})")
            d = todo[name]
            t = d.target
            if sequential and t.cand.kind != "embedding":
                if name not in fresh:
                    group = next((g for g in self.calibration.groups if name in g), [name])
                    names = [n for n in group if n in todo]
                    if streamable and stream is None and names[0].startswith(transformer_blocks(model)[0] + "."):
                        stream = BlockStream.of_models(reference, model, transformer_blocks(model)[0], self.batches)
                    if stream is not None and stream.can_serve(names):  # one block's pass, from its kept inputs
                        fresh = stream.cross(names)
                    else:
                        fresh = collect_cross(reference, model, names, self.batches)
                white = refit_whitening(t, fresh[name])
            else:
                white = self._white(t)
            f = _make_trying(t, d.option, white, self.config)
            self.layers.append(report_of(t, f))
            yield t, f
        tried = [lr for lr in self.layers if lr.name in todo and todo[lr.name].option.structure == "lowrank"]
        if self.config.try_mpo and tried:
            taken = sum(lr.structure == "mpo" for lr in tried)
            self.notes.append(f"--try-mpo: {taken} of the {len(tried)} layers made low-rank became 4-core MPOs of no more parameters "
                              "(lower error on the calibration inputs after a longer refinement)")  # fmt: skip


REFIT_DAMP = 1e-4  # a refit's damping of X'^T X', as a share of its mean diagonal (see `refit_whitening`)


def refit_whitening(t: LayerTarget, st: CrossStats) -> Whitening:
    """The error-correcting whitening of a sequential refit: the layer sees the inputs the partly
    compressed model gives it and must reproduce what it gave on the original's. Its statistics are
    used up (changed in place and dropped from `st`: a wide layer's are hundreds of MB each), and the
    whitening serves this layer's weight only (`Bound`).

    Its damping is REFIT_DAMP, not the DAMP of a plain whitening. A refit solves through the inverse
    of X'^T X' (W M = W X^T X' L^{-T}), and directions that X' barely spans are then filled by
    whatever the statistics hold there: after SmolLM2's rank-431 table, block 0's inputs span 431 of
    576 directions, and the rest held only the rounding of the bfloat16 passes (about 2^-18 / 3 of
    an input's energy), which the refits fitted with weights 9-16 times the original's norm (spectral
    norm up to 22 times), for a calibrated output error lower by 0.3 %. At 1e-4 (about 100 times that
    rounding) they keep the original's scale (0.7-1.1 times) and their output error on held-out text
    is unchanged to 3-4 digits (docs/performance.md, 2026-12-07 tenth session)."""
    centre = getattr(t.cand.module, "bias", None) is not None
    keys = ("gram_in", "energy", "cross_w") if st.cross_w is not None else ("gram_in", "gram", "cross")
    held = {k: st.take(k) for k in keys}
    return bound_whitening(held, weight_of(t), st.sum_in, st.total, st.rows, damp=REFIT_DAMP, centre=centre)


def factorized(t: LayerTarget, f: Factors) -> nn.Module:
    """The layer made of `f`, in the target's training mode, its bias absorbing what the fit moved (a
    centred calibration's shift): what `convert` swaps in, and what every measured swap measures."""
    old = t.cand.module
    new = build_like(old, t.cand.converter.build(old, f.factors, f.structure))
    if f.bias_shift is not None and getattr(new, "bias", None) is not None:
        with torch.no_grad():
            new.bias.add_(f.bias_shift.to(new.bias))
    return new


def report_of(t: LayerTarget, f: Factors) -> LayerReport:
    return layer_report(
        t.cand.name, t.cand.kind, t.cand.ny, t.cand.nx, f.shape, f.spectra, f.rel_error, reported_structure(t, f.structure),
        f.output_rel_error, params_original=t.cand.numel,
    )  # fmt: skip


def white_for(t: LayerTarget, cal: Calibration, spend: bool = False) -> Whitening:
    """The whitening of a layer's inputs, centred on their mean when the layer has a bias to absorb it.
    With `spend`, the layer's Gram is taken out of `cal` and, where no other layer shares it, factorized
    in place (a streamed block's wide Gram is then held once, not twice)."""
    name = t.cand.name
    gram = cal.grams.pop(name) if spend else cal.grams[name]
    owned = spend and not any(g is gram for g in cal.grams.values())
    if getattr(t.cand.module, "bias", None) is None:
        return whitening(gram, owned=owned)
    return whitening(gram, total=cal.sums[name], rows=cal.rows[name], owned=owned)


def _make_trying(t: LayerTarget, option: Option, white: Whitening | None, config: CompressionConfig) -> Factors:
    """`_make`, then with `config.try_mpo` (and calibration) a low-rank Linear is offered the MPO of
    no more parameters (`structures.try_mpo`)."""
    f = _make(t, option, white, config.refine_steps)
    if config.try_mpo and white is not None and t.cand.kind == "linear" and "mpo" in t.cand.converter.structures:
        f = try_mpo(weight_of(t), f, white, config.refine_steps)
    return f


def _make(t: LayerTarget, option: Option, white: Whitening | None, refine_steps: int) -> Factors:
    if option.structure == "mpo" and option.shape is None:  # a D / eps asked for: TT-SVD or rounding as before
        dec = decompose(t, option.rank, option.eps)
        option = Option("mpo", option.params, option.rel_error, shape=MPOShape(t.in_modes, t.out_modes, tuple(dec.bond_dims)))
        if white is None:  # the report's spectra: the truncated MPO's own bonds, as always
            return Factors("mpo", dec.cores, option.shape, dec.rel_error, None, bond_spectra(dec.cores))
    return make_factors(weight_of(t), option, white, refine_steps)


def _fixed_option(t: LayerTarget, structure: str, white: Whitening | None) -> tuple[Option | None, str]:
    """The form a D or eps asks for, or None and the reason when it would not be smaller than dense."""
    c = t.cand
    if structure == "lowrank":
        r, errs = min(c.nx, c.ny), None  # a rank D alone needs no spectrum: the factors' own errors are reported
        if t.eps is not None:  # the fewest values whose tail is within eps
            w = weight_of(t)
            s = lowrank_spectrum(w, white)
            errs = truncation_errors(s, white.energy(w) if white is not None else None)
            r = max(1, next((k for k in range(s.numel() + 1) if float(errs[k]) <= t.eps), s.numel()))
        if t.bond_dim is not None:  # and at most D, as for an MPO
            r = min(r, t.bond_dim)
        err = float(errs[r]) if errs is not None else math.nan
        if r * (c.nx + c.ny) >= c.numel:
            return None, f"its low-rank form at r={r} would not be smaller ({r * (c.nx + c.ny)} parameters)"
        return Option("lowrank", r * (c.nx + c.ny), err, rank=r), ""
    if t.eps is not None:  # the TT-SVD decides the bonds: do it now to see whether it is smaller
        dec = decompose(t, t.bond_dim, t.eps)
        n = MPOShape(t.in_modes, t.out_modes, tuple(dec.bond_dims)).param_count
        if n >= c.numel:
            return None, f"at eps={t.eps} its MPO would not be smaller ({n} parameters, dense {c.numel}); kept dense"
        opt = Option("mpo", n, dec.rel_error)
    else:
        opt = Option("mpo", MPOShape.uniform(t.in_modes, t.out_modes, t.bond_dim).param_count, math.nan)
    opt.rank, opt.eps = t.bond_dim, t.eps  # the truncation to apply (D, eps)
    return opt, ""


def plan_layers(
    model: nn.Module,
    config: CompressionConfig,
    targets: list[LayerTarget],
    batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
    curves_only: bool = False,
) -> LayerPlan:
    """Decide every target's form (without changing the model). With `curves_only`, layers without
    a size asked for are not allocated, only their forms listed (for `analyze`)."""
    calib, hidden = None, None
    if batches is not None:
        if len(batches) == 0:
            raise MPOCompressError("the calibration data is empty; give at least one sample")
        mods = {t.cand.name: t.cand.module for t in targets}
        head = model.get_output_embeddings() if is_causal_lm(model) else None
        # a causal LM's pass ends at its last selected layer: the vocabulary-wide head is never run for it
        stop = set(mods) if head is not None and all(m is not head for m in mods.values()) else None
        kept = config.budgeted or any(t.cand.converter.serves_head for t in targets)  # the allocator or the table reads them
        if stop is not None and kept and getattr(model, "base_model", model) is not model:
            # the base (blocks and final norm, no head) on every batch: the leading batches' final hidden states are kept
            # for the head's Fisher and the table's measurements, which then need no passes of their own
            hidden = FinalHidden(model)
            calib = collect_grams(model, mods, batches, run=base_runner(model, hidden, _leading_batches(batches, SENSITIVITY_TOKENS)))
        else:
            calib = collect_grams(model, mods, batches, stop_after=stop)
    plan = LayerPlan([], config, calib, batches, hidden=hidden)
    plan.screen = not curves_only
    tied = [t for t in targets if t.cand.converter.serves_head]
    if tied:
        plan.notes.append(
            f"the tied input embedding and LM head ({' = '.join(tied[0].cand.names)}) are one candidate: a low-rank table, "
            "compressed once, serves both ends (never untied)"
        )
        if batches is not None and is_causal_lm(model):
            plan.hidden = plan.hidden or FinalHidden(model)  # the leading batches' final hidden states, shared by the table's measurements
            fisher = HeadFisher(model, _leading_batches(batches, FISHER_TOKENS), hidden=plan.hidden)
            plan.tables[tied[0].cand.name] = table_weighting(fisher.head_gram, fisher.mean_p)
            del fisher
    fixed = [t for t in targets if t.bond_dim is not None or t.eps is not None]
    free = [t for t in targets if t.bond_dim is None and t.eps is None]
    for t in fixed:
        structure = fixed_structure(config, t)
        if structure not in t.cand.converter.structures:
            raise MPOCompressError(
                f"{t.cand.name} is an {t.cand.kind}, which cannot become {structure} (only: "
                f"{', '.join(t.cand.converter.structures)}); drop --structure {structure} or --exclude {t.cand.name}"
            )
        opt, reason = _fixed_option(t, structure, plan._white(t))
        plan.decisions.append(Decision(t, opt, reason))
    if free and not config.allocating and curves_only:
        plan.hidden = None
        for t in free:
            _options_of(t, weight_of(t), config, plan)
            plan.decisions.append(Decision(t, None, NO_SIZE))
        return plan
    if free and not config.allocating:
        raise MPOCompressError(
            f"no bond dimension for {', '.join(t.cand.name for t in free)}: give --bond-dim D (or NAME=D for each), "
            "--eps E, or a budget with --target-params P"
        )
    if free:
        plan.decisions += _allocate(model, config, free, plan, fixed_params=_fixed_params(plan.decisions))
    plan.hidden = None  # the allocator's: not kept with the plan
    order = {id(t): k for k, t in enumerate(targets)}
    plan.decisions.sort(key=lambda d: order[id(d.target)])
    return plan


def _leading_batches(batches: Sequence[Mapping[str, torch.Tensor]], tokens: int) -> list[Mapping[str, torch.Tensor]]:
    """The leading whole batches holding at least `tokens` tokens (all of them when they hold fewer);
    `FinalHidden.first_tokens` cuts the last one to the count."""
    out, n = [], 0
    for b in batches:
        if n >= tokens:
            break
        out.append(b)
        n += int(b["input_ids"].numel())
    return out


def fixed_structure(config: CompressionConfig, t: LayerTarget | None = None) -> str:
    """The structure a D or an eps makes: low-rank when asked for, else an MPO (for a layer that
    cannot be an MPO, a tied table, its one structure unless one was asked for)."""
    if config.structure == "auto" and t is not None and "mpo" not in t.cand.converter.structures:
        return t.cand.converter.structures[0]
    return "lowrank" if config.structure == "lowrank" else "mpo"


def _fixed_params(decisions: list[Decision]) -> int:
    return sum(d.option.params if d.option is not None else d.target.cand.numel for d in decisions)


def _structure_for(t: LayerTarget, asked: str) -> str:
    """The structures a layer may take: those asked for that its type can become ("dense": none)."""
    if asked == "auto":
        kinds = t.cand.converter.structures
        return "auto" if {"lowrank", "mpo"} <= set(kinds) else kinds[0]
    return asked if asked in t.cand.converter.structures else "dense"


@reusing_whitened()
def _options_of(t: LayerTarget, w: torch.Tensor, config: CompressionConfig, plan: LayerPlan) -> list[Option]:
    """Every form the allocator weighs for a layer (an MPO of the given modes only, under --shape),
    recorded in the plan for analyze's curves."""
    modes = (t.in_modes, t.out_modes) if first_match(config.shapes, t.cand.names) is not None else None
    embedding = t.cand.kind == "embedding"  # one huge layer whose cost is probed: 3 cores, a coarse grid
    cores = config.mpo_cores or ((3,) if embedding else AUTO_CORES)
    structure = _structure_for(t, config.structure)
    if plan.defer and plan.screen and structure == "auto" and modes is None and not embedding:
        plan.deferred.append(t.cand.name)
        structure = "lowrank"  # its low-rank forms now, its MPO's once the first allocation is known
    opts = layer_options(w, plan._white(t), structure, cores, modes, COARSE_GRID if embedding else BOND_GRID,
                         screen=plan.screen, refine_steps=0 if embedding else config.refine_steps)  # fmt: skip
    plan.options[t.cand.name] = opts
    return opts


@reusing_whitened()
def weigh(t: LayerTarget, config: CompressionConfig, plan: LayerPlan) -> tuple[list[Option], float]:
    """A layer's forms within any --max-error (dense, error 0, always stays) and its output energy."""
    w = weight_of(t)
    return _within(_options_of(t, w, config, plan), config), plan.energy(t, w)


def _within(opts: list[Option], config: CompressionConfig) -> list[Option]:
    """The forms within --max-error (all of them without one)."""
    return opts if config.max_error is None else [o for o in opts if o.rel_error <= config.max_error]


def _allocate(
    model: nn.Module, config: CompressionConfig, free: list[LayerTarget], plan: LayerPlan, fixed_params: int
) -> list[Decision]:
    calib = plan.calibration
    fn: HeadFisher | None = None
    if config.budgeted and calib is not None:
        # a tied table changes the head too: its own probes measure the full next-token KL (see _probed)
        causal = is_causal_lm(model) and not _head_selected(model, [t for t in free if not t.cand.converter.serves_head])
        if causal:
            probe = _leading_batches(plan.batches, SENSITIVITY_TOKENS)
            n = sum(int(b["input_ids"].numel()) for b in probe)
        else:
            probe, n = [], 0
            for b in plan.batches:
                if n >= SENSITIVITY_SAMPLES:
                    break
                probe.append(b)
                n += int(next(iter(b.values())).shape[0])
            probe = _in_pieces(probe)
        mods = {t.cand.name: t.cand.module for t in free}
        if causal:  # next-token KL as the currency, every layer's sensitivity from backward passes
            fn = HeadFisher(model, probe, hidden=plan.hidden)
            reference = fn.reference
            calib.sensitivity = gradient_sensitivity(model, mods, probe, fn)
            plan.notes.append(
                f"allocated on next-token KL (the LM head's Fisher over {fn.tokens:,} tokens), sensitivities from "
                f"backward passes over {n:,} calibration tokens"
            )
        else:
            reference = None  # the original's outputs on the probe, made once something is swapped in
            try:
                calib.sensitivity = gradient_sensitivity(model, mods, probe)
            except NotDifferentiable:  # e.g. an output made by argmax: one noisy forward pass per layer
                reference = outputs(model, probe)
                calib.sensitivity = measure_sensitivity(model, mods, probe, reference=reference)
                plan.notes.append("sensitivities from noise probes (the model's output has no gradient)")
    # the forms are weighed after the sensitivities: the backward passes' activations and the layers'
    # whitenings (made while weighing) are never held at once
    options, costs = [], []
    plan.defer = config.budgeted  # an MPO's forms are weighed near the sizes a first allocation gives
    grams = calib.grams if calib is not None else {}
    last = {id(grams[t.cand.name]): k for k, t in enumerate(free) if t.cand.name in grams}  # a Gram's last reader among them
    for k, t in enumerate(free):
        status(f"weighing the forms of layer {k + 1}/{len(free)} ({t.cand.name})")
        opts, cost = weigh(t, config, plan)
        options.append(opts)
        costs.append(cost)
        gram = grams.get(t.cand.name)
        if gram is not None and last.get(id(gram)) == k:  # every layer reading it has its whitening now
            plan.drop_grams([n for n, g in grams.items() if g is gram])
    sens = [calib.sensitivity.get(t.cand.name, 1.0) if calib is not None and calib.sensitivity else 1.0 for t in free]
    scale = [[1.0] * len(opts) for opts in options]  # measured / predicted output change, per option
    kl = None  # a tied table's measured swaps and the joint measure: the original's side computed once
    if fn is not None and any(t.cand.converter.serves_head for t in free):
        kl = SwapKL(model, probe, plan.hidden, tokens=FISHER_TOKENS)
    if config.budgeted and calib is not None:
        for i, t in enumerate(free):
            mpo_only = config.structure == "mpo" and t.cand.kind == "linear"
            if reference is None and (t.cand.kind == "embedding" or mpo_only):  # the first layer whose forms are swapped in
                reference = outputs(model, probe)
            if t.cand.kind == "embedding":  # its error is not noise-like: measure what it does (see _probed)
                table = kl is not None and t.cand.converter.serves_head
                scale[i] = _probed(model, t, options[i], sens[i] * costs[i], probe, reference, None if table else fn, plan._white(t),
                                   kl=kl if table else None)  # fmt: skip
            elif mpo_only:  # an MPO-only plan: large MPO errors are not noise-like
                status(f"measuring MPO forms of layer {i + 1}/{len(free)} ({t.cand.name})")
                scale[i] = _probed(model, t, options[i], sens[i] * costs[i], probe, reference, fn, plan._white(t), config.refine_steps)
    total = count_params(model)
    _screen_deferred(config, free, options, costs, sens, scale, plan, total, fixed_params)
    joint = _joint_measure(free, plan, kl) if kl is not None else None
    return spend(config, free, options, costs, sens, scale, plan, total, fixed_params, joint)


def _screen_deferred(
    config: CompressionConfig, free: list[LayerTarget], options: list[list[Option]], costs: list[float], sens: list[float],
    scale: list[list[float]], plan: LayerPlan, total: int, fixed_params: int,
) -> None:  # fmt: skip
    """The MPO screen of the deferred layers (`auto`, a budget), at the sizes that matter. The budget is
    first spent on the dense and low-rank forms alone; a layer's MPO forms are then weighed (added to its
    options) only if its screen finds an MPO beating low-rank at about the size it got there (one
    probe per core count, the size nearest it; a layer kept dense is probed near its full size).

    The screen over every size let MPOs in on what they win where no allocation goes: on SmolLM2 the
    k/v projections' 4-core MPOs beat rank 1-2 (at 1 % of the layer) and nothing larger, and weighing
    their every form took 43 of 376 s for forms the allocator never picked; its probes at three sizes
    per core count cost another 76 s. An MPO that wins near a layer's first size is weighed at every
    size, so the final allocation can still move it anywhere."""
    deferred = set(plan.deferred)
    todo = [i for i, t in enumerate(free) if t.cand.name in deferred]
    if not todo:
        return
    budget = _budget(config, free, plan, total, fixed_params)[0]
    choices = _choices(options, costs, sens, scale)
    try:
        picks = allocate(choices, budget)
    except MPOCompressError:  # `spend` says why; the screen then probes every size
        picks = None
    cores = config.mpo_cores or AUTO_CORES
    passed = 0
    for i in todo:
        t = free[i]
        status(f"screening MPO forms of layer {i + 1}/{len(free)} ({t.cand.name})")
        size = options[i][picks[i]].params if picks is not None else None
        w, white = weight_of(t), plan._white(t)
        lows = [o for o in options[i] if o.structure == "lowrank"]
        with reusing_whitened():
            if not mpo_in_reach(w, white, lows, cores, config.refine_steps, near=size):
                continue
            more = mpo_options(w, white, cores, None, BOND_GRID, config.refine_steps)
        passed += 1
        plan.options[t.cand.name] = plan.options.get(t.cand.name, []) + more
        more = _within(more, config)
        options[i] += more
        scale[i] += [1.0] * len(more)
    plan.notes.append(
        f"MPO forms weighed for {passed} of the {len(todo)} layers that could take them: those where an MPO beat low-rank "
        "at about the size a first, low-rank-only allocation gave"
    )


PROBE_PIECE = 1 << 21  # input numbers of a probe batch run at once (a larger batch of large images goes in pieces)


def _in_pieces(batches: list[Batch]) -> list[Batch]:
    """The probe batches split along the samples so no piece's largest input holds more than PROBE_PIECE
    numbers (32 images of 320 x 320 go 6 at a time): every probe pass holds one piece's activations,
    not the batch's (9.5 against 1.x GB on VGG-16 at that size). Batches within it are kept whole."""
    out = []
    for b in batches:
        n = int(next(iter(b.values())).shape[0])
        per = max(1, PROBE_PIECE // numbers_per_sample(b))
        out += [b] if per >= n else [{k: v[s : s + per] for k, v in b.items()} for s in range(0, n, per)]
    return out


Joint = Callable[[list[Option]], float]


def _joint_measure(free: list[LayerTarget], plan: LayerPlan, kl: SwapKL) -> Joint:
    """The real next-token KL (`measure_swap_kl`'s units, by `kl`) of the model with the given forms of the
    layers swapped in together (dense ones left), for `spend` to put the predicted costs of the
    projections on the scale of the tied table's measured one."""

    def measure(chosen: list[Option]) -> float:
        swaps = []
        for t, o in zip(free, chosen):
            if o.structure != "dense":
                f = make_factors(weight_of(t), o, plan._white(t), 0, errors=False)
                swaps.append((t.cand.names, factorized(t, f).eval()))
        status(f"measuring the next-token KL of {len(swaps)} layers together")
        return kl(swaps)

    return measure


def spend(
    config: CompressionConfig, free: list[LayerTarget], options: list[list[Option]], costs: list[float], sens: list[float],
    scale: list[list[float]], plan: LayerPlan, total: int, fixed_params: int, joint: Joint | None = None,
) -> list[Decision]:  # fmt: skip
    """The allocator's choice among the weighed forms: each option costs sensitivity x output energy
    x relative error^2 (x a measured correction); the least summed cost within the budget (or, with
    an error cap alone, each layer's smallest form within it). Notes what the budget counts."""
    if not config.budgeted:  # an error cap alone: the smallest form within it
        picks = [cheapest_within([Choice(o.params, 0.0) for o in opts], [o.rel_error for o in opts], config.max_error) for opts in options]
        return [_decision(t, opts[k], "no smaller form within --max-error") for t, opts, k in zip(free, options, picks)]
    budget, rest, note = _budget(config, free, plan, total, fixed_params)
    plan.notes.append(note)
    if budget < sum(min(o.params for o in opts) for opts in options):
        least = rest + sum(min(o.params for o in opts) for opts in options)
        raise MPOCompressError(
            f"the budget of {budget + rest:,} parameters cannot be met: the layers left out of compression alone hold {rest:,} parameters "
            f"and the selected ones need at least {least - rest:,}; the smallest reachable is {least:,} (select more "
            "layers with --layers, or raise the target)"
        )
    choices = _choices(options, costs, sens, scale)
    if joint is not None:
        choices = _on_the_table_scale(choices, free, options, budget, joint, plan)
    picks = allocate(choices, budget)
    chosen = [opts[k] for opts, k in zip(options, picks)]
    order = sorted(range(len(free)), key=lambda i: -choices[i][picks[i]].cost)
    _fill(chosen, free, order, budget - sum(o.params for o in chosen))
    return [_decision(t, o, "kept dense by the allocator: within the budget nothing smaller pays") for t, o in zip(free, chosen)]


def _choices(options: list[list[Option]], costs: list[float], sens: list[float], scale: list[list[float]]) -> list[list[Choice]]:
    """Each option's size and cost: sensitivity x output energy x relative error^2 x its measured correction."""
    return [[Choice(o.params, s * e * (o.rel_error**2) * f) for o, f in zip(opts, fs)] for opts, s, e, fs in zip(options, sens, costs, scale)]


def _budget(config: CompressionConfig, free: list[LayerTarget], plan: LayerPlan, total: int, fixed_params: int) -> tuple[int, int, str]:
    """The parameters the free layers may hold together under the budget, those the rest of the model
    holds, and the note saying what the budget counts."""
    everything = [*free, *(d.target for d in plan.decisions)]
    selected = sum(t.cand.numel for t in everything)
    # what a share counts: the selected layers, less the embeddings a budget offers the allocator on its own
    # (they may shrink to pay for the rest, but "remove 20 %" means 20 % of the projections); a named one counts
    named = dict.fromkeys(config.layers, True)
    counted = sum(t.cand.numel for t in everything if t.cand.kind != "embedding" or first_match(named, t.cand.names))
    counted = counted or selected
    offered = "" if counted == selected else f" (the {selected - counted:,} of the embeddings offered besides are not counted)"
    if config.remove is not None:
        target = total - round(config.remove * counted)
        note = (
            f"budget: remove {config.remove:.0%} of the selected layers' {counted:,} weights{offered}: "
            f"{total:,} -> {target:,} parameters in the model"
        )
    elif config.budget_of == "selected":
        keep = int(config.target_params) if config.target_params > 1 else round(config.target_params * counted)
        target = total - counted + keep
        note = (
            f"budget: the selected layers' {counted:,} weights{offered} -> {keep:,} ({keep / counted:.0%}); "
            f"{total:,} -> {target:,} parameters in the model"
        )
    else:
        target = int(config.target_params) if config.target_params > 1 else round(config.target_params * total)
        note = (
            f"budget: {target:,} parameters for the whole model ({target / total:.0%} of its {total:,}); the selected layers "
            f"hold {selected:,} of them, the other {total - selected:,} stay as they are (--of selected counts the selected only)"
        )
    rest = total - selected + fixed_params
    return target - rest, rest, note


PROBES = 5  # forms of an embedding whose effect on the output is measured


def _on_the_table_scale(
    choices: list[list[Choice]], free: list[LayerTarget], options: list[list[Option]], budget: int, joint: Joint, plan: LayerPlan
) -> list[list[Choice]]:  # fmt: skip
    """The projections' costs rescaled so that their sum means what the tied table's measured cost
    means. A table's cost is measured (the real next-token KL with it swapped in); the projections'
    are predicted one by one and summed, and on SmolLM2 that sum came out several times the real KL
    of the same layers swapped in together, which made a table at rank 144 look cheaper than a
    fifth of the projections (6.9x the original's perplexity against 1.6x). So the projections alone
    are allocated within the budget (the table kept dense), their forms swapped in together and the
    real KL measured once; the ratio to the predicted sum rescales every projection's cost."""
    table = [i for i, t in enumerate(free) if t.cand.converter.serves_head]
    dense = {i: next(k for k, o in enumerate(options[i]) if o.structure == "dense") for i in table}
    alone = [[c[dense[i]]] if i in dense else c for i, c in enumerate(choices)]
    try:
        picks = allocate(alone, budget)
    except MPOCompressError:
        return choices  # the projections alone cannot meet the budget: the table must shrink whatever the scale
    chosen = [options[i][dense[i]] if i in dense else options[i][k] for i, k in enumerate(picks)]
    predicted = sum(alone[i][k].cost for i, k in enumerate(picks) if i not in dense)
    if predicted <= 0:
        return choices
    ratio = min(max(joint(chosen) / predicted, 0.01), 100.0)
    plan.notes.append(
        f"the projections' predicted costs were scaled by {ratio:.3g} (their real next-token KL together, within the budget, over "
        "the sum of their predictions), to weigh them against the tied table's measured cost"
    )
    return [c if i in dense else [Choice(x.params, x.cost * ratio) for x in c] for i, c in enumerate(choices)]


def _head_selected(model: nn.Module, free: list[LayerTarget]) -> bool:
    """Whether the LM head itself (or the embedding tied to it) is among the layers to size."""
    head = model.get_output_embeddings()
    return any(t.cand.module is head or getattr(t.cand.module, "weight", None) is getattr(head, "weight", False) for t in free)


def _probed(
    model: nn.Module, t: LayerTarget, opts: list[Option], energy: float, probe: Sequence[Mapping[str, torch.Tensor]],
    reference: Sequence[torch.Tensor], fn: HeadFisher | None = None, white: TableWeighting | Whitening | None = None,
    refine_steps: int = 0, kl: SwapKL | None = None,
) -> list[float]:  # fmt: skip
    """Per option, the ratio of the measured change of the model's output to the predicted one
    (sensitivity x energy x error^2). An embedding's truncation error is not the isotropic noise the
    sensitivity probes assume (on MiniLM the prediction fell 5-7x short), so PROBES of its forms,
    spread over their sizes, are made and swapped in; sizes in between take the ratio interpolated
    in log size. The MPO-only allocator does the same for every layer's MPO forms (made with the
    refinement `convert` applies): their errors at small D (0.5-0.9 of a layer's output) are far from
    small noise, and priced as noise the q/k projections of MiniLM were driven to D = 4-6."""
    forms, picks = probe_picks(opts)
    w = weight_of(t)
    measured: dict[int, tuple[float, float]] = {}  # form -> (its real output change, its error as spend prices it)
    if kl is None and t.cand.converter.serves_head and is_causal_lm(model):  # the head changes too: the full next-token KL
        kl = SwapKL(model, probe)
    for k in picks:
        f = make_factors(w, opts[k], white, refine_steps, errors=white is None)  # with whitening, the option's error is the one used
        new = factorized(t, f).eval()
        if kl is not None:
            real = kl([(t.cand.names, new)])
        else:
            real = measure_swap(model, t.cand.names, new, probe, reference, fn)
        measured[k] = (real, opts[k].rel_error if white is not None else f.rel_error)  # a weighted table: its weighted error
    return probed_ratios(opts, forms, measured, energy)


def probe_picks(opts: list[Option]) -> tuple[list[int], list[int]]:
    """A layer's forms (not dense) by size, and the PROBES of them, spread over their sizes, whose
    effect on the output is measured (see `_probed`)."""
    forms = sorted((k for k, o in enumerate(opts) if o.structure != "dense"), key=lambda k: opts[k].params)
    if not forms:
        return [], []
    picks = sorted({forms[round(j * (len(forms) - 1) / max(PROBES - 1, 1))] for j in range(PROBES)}, key=lambda k: opts[k].params)
    return forms, picks


def probed_ratios(opts: list[Option], forms: list[int], measured: Mapping[int, tuple[float, float]], energy: float) -> list[float]:
    """Per option, measured / predicted output change (predicted: energy x error^2), from the
    probed forms' (real change, error) in `measured`; the forms in between take the ratio
    interpolated in log size, those outside the nearest probe's; dense keeps 1."""
    ratios = [1.0] * len(opts)
    points = [(math.log(opts[k].params), math.log(real / (energy * err**2)))
              for k, (real, err) in sorted(measured.items(), key=lambda kv: opts[kv[0]].params)
              if energy * err**2 > 0 and real > 0]  # fmt: skip
    if not points:
        return ratios
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    for k in forms:
        x = math.log(opts[k].params)
        if x <= xs[0] or len(xs) == 1:
            y = ys[0]
        elif x >= xs[-1]:
            y = ys[-1]
        else:
            j = next(j for j in range(1, len(xs)) if xs[j] >= x)
            y = ys[j - 1] + (ys[j] - ys[j - 1]) * (x - xs[j - 1]) / (xs[j] - xs[j - 1])
        ratios[k] = math.exp(y)
    return ratios


def _fill(chosen: list[Option], free: list[LayerTarget], order: list[int], left: int) -> None:
    """Spend what the allocator's steps left of the budget: grow one bond (or the rank) at a time of
    the chosen forms, visiting the layers in `order` (costliest first), while a step fits and the
    layer stays smaller than dense. More bond never loses accuracy, so the error estimates stay
    upper bounds."""
    grown = True
    while grown and left > 0:
        grown = False
        for i in order:
            t, o = free[i], chosen[i]
            if o.structure == "lowrank":
                step = t.cand.nx + t.cand.ny
                if step <= left and o.params + step < t.cand.numel and o.rank < min(t.cand.nx, t.cand.ny):
                    chosen[i] = Option("lowrank", o.params + step, o.rel_error, rank=o.rank + 1)
                    left, grown = left - step, True
            elif o.structure == "mpo" and o.shape is not None:
                best = None
                for k, cap in enumerate(o.shape.caps):
                    if o.shape.bond_dims[k] >= cap:
                        continue
                    bonds = list(o.shape.bond_dims)
                    bonds[k] += 1
                    shape = MPOShape(o.shape.in_modes, o.shape.out_modes, tuple(bonds))
                    step = shape.param_count - o.params
                    if step <= left and shape.param_count < t.cand.numel and (best is None or step < best[0]):
                        best = (step, shape)
                if best is not None:
                    chosen[i] = Option("mpo", best[1].param_count, o.rel_error, shape=best[1], weight_error=o.weight_error)
                    left, grown = left - best[0], True


def _decision(t: LayerTarget, option: Option, reason: str) -> Decision:
    return Decision(t, None, reason) if option.structure == "dense" else Decision(t, option)

