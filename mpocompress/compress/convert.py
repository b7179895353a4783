"""The module swap: `compress_(model, config, filter_fn, calibration)` writes the selected layers in
the forms `mpocompress.compress.choose` picks, in place, and returns a CompressionReport."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mpocompress.compress.calibrate import calibration_passes
from mpocompress.compress.choose import factorized, plan_layers
from mpocompress.compress.config import CompressionConfig
from mpocompress.compress.report import CompressionReport, count_params, totals
from mpocompress.compress.select import FilterFn
from mpocompress.compress.structures import Factors
from mpocompress.compress.targets import LayerTarget, select_targets
from mpocompress.utils import set_module


def compress_(
    model: nn.Module,
    config: CompressionConfig,
    filter_fn: FilterFn | None = None,
    calibration: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> CompressionReport:
    """Replace the chosen Linear/Conv2d layers of `model` by factorized layers, in place.

    Args:
        model: the model to change.
        config: which layers; their sizes (a D, an eps, or a budget / error cap for the allocator);
            which structures.
        filter_fn: optional `filter_fn(module, full_name) -> bool` restricting the candidates.
        calibration: batches of the model's inputs (as the datasets serve them); with them every
            factorization minimizes the error on the layers' real inputs. The passes over them run
            in `config.calib_dtype` (`calibration_passes`).

    Returns:
        The report of what was replaced and what was left dense.
    """
    chosen, skipped = select_targets(model, config, filter_fn)
    before = count_params(model)
    precision: list[str] = []
    with calibration_passes(config.calib_dtype, model, precision, calibrated=calibration is not None):
        plan = plan_layers(model, config, chosen, calibration)
        for t, factors in plan.factors(model):  # swapped at once: a sequential plan calibrates on the layers swapped so far
            swap_in(model, t, factors)
    report = totals(plan.layers, skipped + plan.kept, before, config.bond_dim, config.eps, applied=True,
                    model_after=count_params(model))  # fmt: skip
    report.notes += plan.notes + precision
    return report


def swap_in(model: nn.Module, t: LayerTarget, factors: Factors) -> None:
    """Put the factorized layer made of `factors` in place of the target, under every name it has;
    the bias absorbs what the factors' fit moved (a centred calibration)."""
    new = factorized(t, factors)
    for name in t.cand.names:
        set_module(model, name, new)
