"""What `compress_` would do, without changing the model: reports at a truncation or, without one,
the exact MPO of each selected layer and a sweep over D; and multiply-adds per sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from mpocompress.compress.calibrate import calibration_passes
from mpocompress.compress.choose import CURVES_ONLY, plan_layers
from mpocompress.compress.config import CompressionConfig
from mpocompress.compress.registry import converter_for
from mpocompress.compress.report import CompressionReport, LayerReport, count_params, layer_report, totals
from mpocompress.compress.select import FilterFn
from mpocompress.compress.targets import (
    LayerTarget,
    check_layer_finite,
    current_cores,
    decompose,
    report_for,
    select_targets,
    weight_of,
)  # fmt: skip
from mpocompress.errors import MPOCompressError
from mpocompress.nn import MPOLayer
from mpocompress.tensors import (
    MPOShape,
    TTDecomposition,
    bond_spectra,
    choose_plan,
    grouped_macs,
    tt_svd_sweep,
    unfolding_spectra,
)
from mpocompress.utils import is_hf_model

SWEEP_BOND_DIMS = (2, 4, 8, 16, 32)


def _exact_report(t: LayerTarget) -> LayerReport:
    """The untruncated MPO: for a dense layer every bond at its cap, with the spectra of W's
    unfoldings; for an MPO layer its own bonds and spectra."""
    c = t.cand
    cores = current_cores(t)
    if cores is not None:
        check_layer_finite(t, cores)
        shape = MPOShape.of_cores(cores)
        return layer_report(c.name, c.kind, c.ny, c.nx, shape, bond_spectra(cores), 0.0)
    spectra = unfolding_spectra(weight_of(t), t.in_modes, t.out_modes)
    return layer_report(c.name, c.kind, c.ny, c.nx, MPOShape.exact(t.in_modes, t.out_modes), spectra, 0.0)


def _planned(
    model: nn.Module, config: CompressionConfig, chosen: list[LayerTarget], skipped: list, before: int,
    calibration: Sequence[Mapping[str, torch.Tensor]] | None,
) -> CompressionReport:  # fmt: skip
    precision: list[str] = []
    with calibration_passes(config.calib_dtype, model, precision, calibrated=calibration is not None):
        plan = plan_layers(model, replace(config, sequential=False), chosen, calibration, curves_only=True)
    made = [t for t, _ in plan.factors()]
    after = before - sum(t.cand.numel for t in made) + sum(lr.params_mpo for lr in plan.layers)
    report = totals(plan.layers, skipped + plan.kept, before, config.bond_dim, config.eps, False, after)
    report.curves = plan.curves()
    report.notes += precision
    if not plan.layers:
        report.notes.append(CURVES_ONLY)
    return report


def _after(before: int, targets: list[LayerTarget], layers: list[LayerReport]) -> int:
    """The model's parameters once the targets are written as the reported MPOs: what each layer holds
    now (its dense weights, or its cores when it is already an MPO) is replaced by the MPO's count."""
    now = 0
    for t in targets:
        cores = t.cand.converter.cores(t.cand.module) if t.cand.converter.cores is not None else None
        now += sum(c.numel() for c in cores) if cores is not None else t.cand.numel
    return before - now + sum(lr.params_mpo for lr in layers)


def analyze(
    model: nn.Module,
    config: CompressionConfig = CompressionConfig(),
    filter_fn: FilterFn | None = None,
    sweep_bond_dims: tuple[int, ...] = SWEEP_BOND_DIMS,
    calibration: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> CompressionReport:
    """What `compress_` would do, without changing the model.

    With a bond dimension or eps in `config`: the report at that truncation. Without either: the
    exact MPO of each selected layer (bonds at their caps, with their entanglement entropies),
    and in `sweep` one report for each D in `sweep_bond_dims`.

    With calibration batches, a budget or an error cap (or `structure="lowrank"`): what the
    allocator would choose, with the errors each form would have (output errors with calibration;
    an MPO's after the L-BFGS refinement convert applies, predicted from a few refined sizes) and in
    `curves` every form it weighed.
    """
    before = count_params(model)
    chosen, skipped = select_targets(model, config, filter_fn)
    if calibration is not None or config.allocating or config.structure == "lowrank":
        return _planned(model, config, chosen, skipped, before, calibration)
    if config.settings.has_global_truncation or all(t.bond_dim is not None for t in chosen):
        layers = [report_for(t, decompose(t, t.bond_dim, t.eps)) for t in chosen]
        return totals(layers, skipped, before, config.bond_dim, config.eps, False, _after(before, chosen, layers))
    exact = [_exact_report(t) for t in chosen]
    report = totals(exact, skipped, before, config.bond_dim, config.eps, False, _after(before, chosen, exact))
    swept: dict[tuple, dict[int, TTDecomposition]] = {}  # one TT-SVD sweep per dense layer serves every D

    def at(t: LayerTarget) -> TTDecomposition:
        key = (t.cand.name, t.in_modes, t.out_modes)
        if t.eps is not None or t.bond_dim not in sweep_bond_dims or current_cores(t) is not None:
            return decompose(t, t.bond_dim, t.eps)
        if key not in swept:
            swept[key] = tt_svd_sweep(weight_of(t), t.in_modes, t.out_modes, sweep_bond_dims)
        return swept[key][t.bond_dim]

    for d in sweep_bond_dims:
        cfg = config.with_bond_dim(d)
        sub_chosen, sub_skipped = select_targets(model, cfg, filter_fn)
        sub_layers = [report_for(t, at(t)) for t in sub_chosen]
        sub_after = _after(before, sub_chosen, sub_layers)
        report.sweep.append(totals(sub_layers, sub_skipped, before, cfg.bond_dim, cfg.eps, False, sub_after))
    report.notes.append("no --bond-dim given: layers show the exact MPO (bonds at their caps); pick D from the sweep")
    if is_hf_model(model):  # trained weights have flat spectra: what a layer does to real inputs is what counts
        report.notes.append("for a pretrained model, weight errors say little: --calib text:FILE with a budget (--remove 0.2) shows "
                            "each layer's output error against its size and the allocation that budget gets")  # fmt: skip
    return report


def rows_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """How many input vectors each convertible layer sees per sample: one forward pass of a zero
    batch of one sample of `input_shape` (e.g. (1, 28, 28)) with hooks."""
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        conv = converter_for(mod)
        if conv is not None:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name, c=conv: counts.__setitem__(n, c.rows_per_output(o))
            ))  # fmt: skip
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, dtype=param.dtype if param is not None else torch.float32)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        raise MPOCompressError(f"the model does not run on an input of shape {tuple(input_shape)} ({e}); check --input-shape") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return counts


def _mpo_macs(shape: MPOShape, rows: int, batch: int) -> tuple[int, str]:
    """Multiply-adds per sample of an MPO seeing `rows` vectors per sample, with the plan a
    training step of `batch` samples takes, and that plan."""
    plan = choose_plan(shape, batch * rows, backward=True)
    return grouped_macs(shape, plan.sizes, batch * rows) // batch, plan.describe()


def add_macs(
    report: CompressionReport, model: nn.Module, rows: Mapping[str, int] | None, batch: int = 64
) -> CompressionReport:
    """Fill in multiply-adds per sample: each reported layer dense and as an MPO with the plan a
    training step of `batch` samples would take, and the totals over every convertible layer of
    the model. Without `rows` (no input shape) a Linear counts one vector per sample and
    convolutions stay unknown."""
    modules = dict(model.named_modules())
    report.macs_batch = batch
    by_name = {lr.name: lr for lr in report.layers}
    total_dense = total_mpo = 0
    known = True
    for name, mod in modules.items():
        conv = converter_for(mod)
        if conv is None or conv.kind == "embedding":  # a lookup: no multiply-adds counted
            continue
        r = rows.get(name) if rows is not None else (1 if conv.kind == "linear" else None)
        if r is None:
            known = False
            continue
        lr = by_name.get(name)
        if lr is not None:  # a layer the report writes as an MPO
            lr.rows_per_sample = r
            lr.macs_dense = r * lr.params_original
            shape = MPOShape(tuple(lr.in_modes), tuple(lr.out_modes), tuple(lr.bond_dims))
            lr.macs_mpo, lr.plan = _mpo_macs(shape, r, batch)
            dense, current = lr.macs_dense, lr.macs_mpo
        elif isinstance(mod, MPOLayer):  # already an MPO, left as it is
            dense = r * mod.weight_numel
            current = _mpo_macs(mod.shape, r, batch)[0]
        else:
            dense = current = r * mod.weight.numel()
        total_dense, total_mpo = total_dense + dense, total_mpo + current
    if known:
        report.macs_model_dense, report.macs_model_mpo = total_dense, total_mpo
    for sub in report.sweep:
        add_macs(sub, model, rows, batch)
    return report
