"""What a compression did (or would do): report dataclasses, the totals of Eq. 9, and the summary
of a model's MPO layers. Rendering lives in `mpocompress.cli.render`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mpocompress.nn import FactorizedLayer
from mpocompress.tensors import MPOShape, compression_ratio, entanglement_entropy


@dataclass
class LayerReport:
    """One layer written (or, in an analysis, that would be written) as an MPO.

    `params_original` and `params_mpo` count weights only, like the paper's Eq. 9; biases stay dense.
    """

    name: str  # full dotted name of the module in the model
    kind: str  # "linear" or "conv2d"
    weight_shape: list[int]  # [N_y, N_x] of the dense weight matrix
    in_modes: list[int]  # I_1..I_n
    out_modes: list[int]  # J_1..J_n
    bond_dims: list[int]  # D_1..D_{n-1}
    params_original: int
    params_mpo: int
    rho: float  # params_mpo / params_original
    rel_error: float  # ||W - W_mpo||_F / ||W||_F
    entropy: list[float]  # entanglement entropy of each inner bond (supplement Eq. 1)
    notation: str  # M^{J..}_{I..}(D=..)
    rows_per_sample: int | None = None  # input vectors the layer sees per sample (conv: output positions)
    macs_dense: int | None = None  # multiply-adds per sample of the dense layer
    macs_mpo: int | None = None  # ... of the MPO layer with its chosen plan (training step, batch `macs_batch`)
    plan: str = ""  # that plan: dense (rebuild W), contract, or merged groups
    structure: str = "mpo"  # "mpo" or "lowrank" (a low-rank layer is the 2-core MPO (1, N_x) -> (N_y, 1), bond r)
    ranks: list[int] = field(default_factory=list)  # the bond dims, or [r] for low-rank
    output_rel_error: float | None = None  # ||(W - W~) X|| / ||W X|| on the calibration inputs (with --calib)


@dataclass
class SkippedLayer:
    """A Linear or Conv2d layer left dense, with the reason."""

    name: str
    kind: str
    params: int
    reason: str
    structure: str = "dense"


@dataclass
class CompressionReport:
    """What a compression did (or would do). Totals follow Eq. 9 over the MPO layers."""

    layers: list[LayerReport]
    skipped: list[SkippedLayer]
    params_original: int  # weights of the layers written as MPOs
    params_mpo: int  # their MPO parameters
    rho: float  # params_mpo / params_original
    params_model_before: int  # every parameter of the model before
    params_model_after: int  # every parameter after (or as it would be)
    bond_dim: int | None  # the global D asked for; None when none was
    eps: float | None  # the relative error asked for
    applied: bool  # True once the modules have been swapped in the model
    macs_batch: int = 64  # batch size the MPO plans (and their MACs per sample) are chosen for
    macs_model_dense: int | None = None  # multiply-adds per sample of every Linear/Conv2d, all dense
    macs_model_mpo: int | None = None  # ... with the MPO layers as planned
    sweep: list[CompressionReport] = field(default_factory=list)  # analyze without D: one report per D
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # analyze --calib: per layer, each form's params and error
    notes: list[str] = field(default_factory=list)  # anything the user should know

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "sweep"}
        if self.sweep:
            d["sweep"] = [s.to_dict() for s in self.sweep]
        if not self.curves:
            d.pop("curves")
        return d


def layer_report(
    name: str, kind: str, ny: int, nx: int, shape: MPOShape, spectra: list[torch.Tensor], rel_error: float,
    structure: str = "mpo", output_rel_error: float | None = None, params_original: int | None = None,
) -> LayerReport:  # fmt: skip
    """The report of one layer written as an MPO of `shape` (a low-rank layer: the 2-core MPO
    (1, N_x) -> (N_y, 1)), with the entanglement spectra of its bonds. `params_original` is the
    dense layer's weight count when it is not N_y * N_x (an embedding's padded vocabulary)."""
    n_mpo = shape.param_count
    dense = params_original if params_original is not None else ny * nx
    return LayerReport(
        name=name,
        kind=kind,
        weight_shape=[ny, nx],
        in_modes=list(shape.in_modes),
        out_modes=list(shape.out_modes),
        bond_dims=list(shape.bond_dims),
        params_original=dense,
        params_mpo=n_mpo,
        rho=compression_ratio(n_mpo, dense),
        rel_error=rel_error,
        entropy=[entanglement_entropy(s) for s in spectra],
        notation=f"lowrank(r={shape.bond_dims[0]})" if structure == "lowrank" else shape.notation(),
        structure=structure,
        ranks=list(shape.bond_dims),
        output_rel_error=output_rel_error,
    )


def totals(
    layers: list[LayerReport], skipped: list[SkippedLayer], model_before: int, bond_dim: int | None,
    eps: float | None, applied: bool, model_after: int | None = None,
) -> CompressionReport:  # fmt: skip
    """The report over all layers: Eq. 9 over the MPO layers, the model's size before and after."""
    orig = sum(lr.params_original for lr in layers)
    mpo = sum(lr.params_mpo for lr in layers)
    after = model_after if model_after is not None else model_before - orig + mpo
    return CompressionReport(
        layers=layers,
        skipped=skipped,
        params_original=orig,
        params_mpo=mpo,
        rho=compression_ratio(mpo, orig),
        params_model_before=model_before,
        params_model_after=after,
        bond_dim=bond_dim,
        eps=eps,
        applied=applied,
    )


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def summarize(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of a model and rho (Eq. 9) of its MPO layers.

    Keys: params_model (all parameters), params_mpo (in MPO cores), params_original (the weights
    of the dense layers the MPOs stand for), params_model_dense (the model with dense layers in
    their place), rho (params_mpo / params_original; 1.0 for a model without MPO layers) and
    mpo_layers (each MPO layer's name and notation).
    """
    mpo = {id(m): (name, m) for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    params_mpo = sum(m.num_mpo_params for _, m in mpo.values())
    params_original = sum(m.weight_numel for _, m in mpo.values())
    params_model = count_params(model)
    return {
        "params_model": params_model,
        "params_mpo": params_mpo,
        "params_original": params_original,
        "params_model_dense": params_model - params_mpo + params_original,
        "rho": compression_ratio(params_mpo, params_original) if mpo else 1.0,
        "mpo_layers": [{"name": name, "notation": m.notation()} for name, m in mpo.values()],
    }
