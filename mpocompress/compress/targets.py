"""The selected layers and what was asked of each (`LayerTarget`: modes, D and/or eps), their dense
weights, and the plain TT-SVD (or rounding, for a layer that is already an MPO)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpocompress.compress.config import CompressionConfig, MPOSettings
from mpocompress.compress.report import LayerReport, SkippedLayer, layer_report
from mpocompress.compress.select import Candidate, FilterFn, first_match, select_layers
from mpocompress.errors import MPOCompressError
from mpocompress.nn import MPOEmbedding, MPOLayer
from mpocompress.tensors import (
    Modes,
    MPOShape,
    TTDecomposition,
    all_finite,
    bond_spectra,
    check_modes,
    factorize,
    tt_round,
    tt_svd,
)  # fmt: skip


@dataclass
class LayerTarget:
    """A selected layer and the MPO it is to become: modes, and D and/or eps."""

    cand: Candidate
    in_modes: Modes
    out_modes: Modes
    bond_dim: int | None
    eps: float | None


def _modes_for(c: Candidate, settings: MPOSettings) -> tuple[Modes, Modes]:
    given = first_match(settings.shapes, c.names)
    if given is not None:
        i_modes = check_modes(given[0], c.nx, f"input modes of {c.name} ({c.nx} inputs)")
        o_modes = check_modes(given[1], c.ny, f"output modes of {c.name} ({c.ny} outputs)")
        return i_modes, o_modes
    if isinstance(c.module, (MPOLayer, MPOEmbedding)):
        return tuple(c.module.in_modes), tuple(c.module.out_modes)
    return factorize(c.nx, settings.n_cores), factorize(c.ny, settings.n_cores)


def target_for(c: Candidate, settings: MPOSettings) -> LayerTarget:
    d = first_match(settings.bond_dims, c.names)
    i_modes, o_modes = _modes_for(c, settings)
    return LayerTarget(c, i_modes, o_modes, d if d is not None else settings.bond_dim, settings.eps)


def select_targets(
    model: nn.Module, config: CompressionConfig, filter_fn: FilterFn | None = None
) -> tuple[list[LayerTarget], list[SkippedLayer]]:
    """Choose the layers to convert and their modes and bond dims; report the ones left dense."""
    settings = config.settings

    def reject(c: Candidate) -> str | None:  # the default selection skips layers an MPO would not shrink
        t = target_for(c, settings)
        if t.bond_dim is not None and t.eps is None:
            n_mpo = MPOShape.uniform(t.in_modes, t.out_modes, t.bond_dim).param_count
            if n_mpo >= c.numel:
                return f"its MPO at D={t.bond_dim} would not be smaller ({n_mpo} parameters)"
        return None

    named = {"per-layer bond dim": tuple(settings.bond_dims), "per-layer shape": tuple(settings.shapes)}
    chosen, skipped = select_layers(
        model, config.selection, named, not settings.has_global_truncation, filter_fn, reject,
        embeddings=config.budgeted,
    )
    return [target_for(c, settings) for c in chosen], skipped


def check_layer_finite(t: LayerTarget, tensors: list[torch.Tensor]) -> None:
    if not all(all_finite(x) for x in tensors):
        raise MPOCompressError(
            f"layer {t.cand.name} has NaN or Inf weights (a damaged checkpoint or a diverged training run); "
            f"use a good checkpoint or leave the layer dense with --exclude {t.cand.name}"
        )


def current_cores(t: LayerTarget) -> list[torch.Tensor] | None:
    """The layer's own cores when it is already an MPO with the target's modes (it can be rounded)."""
    mod, conv = t.cand.module, t.cand.converter
    if conv.cores is not None and (tuple(mod.in_modes), tuple(mod.out_modes)) == (t.in_modes, t.out_modes):
        return conv.cores(mod)
    return None


def weight_of(t: LayerTarget) -> torch.Tensor:
    """The layer's dense weight matrix (N_y, N_x), checked for NaN and Inf."""
    w = t.cand.converter.weight(t.cand.module).detach().reshape(t.cand.ny, t.cand.nx)
    check_layer_finite(t, [w])
    return w


def decompose(t: LayerTarget, bond_dim: int | None, eps: float | None) -> TTDecomposition:
    cores = current_cores(t)
    if cores is not None:
        check_layer_finite(t, cores)
        return tt_round(cores, max_bond=bond_dim, eps=eps)  # round the MPO, never forming W
    return tt_svd(weight_of(t), t.in_modes, t.out_modes, max_bond=bond_dim, eps=eps)


def report_for(t: LayerTarget, dec: TTDecomposition) -> LayerReport:
    shape = MPOShape(t.in_modes, t.out_modes, tuple(dec.bond_dims))
    return layer_report(t.cand.name, t.cand.kind, t.cand.ny, t.cand.nx, shape, bond_spectra(dec.cores), dec.rel_error,
                        reported_structure(t, "mpo"), params_original=t.cand.numel)  # fmt: skip


def reported_structure(t: LayerTarget, structure: str) -> str:
    """What the report calls a layer's form: an embedding's MPO is an `mpo_embedding`."""
    return "mpo_embedding" if t.cand.kind == "embedding" and structure == "mpo" else structure


