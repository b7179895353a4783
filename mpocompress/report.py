"""Report dataclasses returned by the library. Rendering lives in `mpocompress.cli.render`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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


@dataclass
class SkippedLayer:
    """A Linear or Conv2d layer left dense, with the reason."""

    name: str
    kind: str
    params: int
    reason: str


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
    notes: list[str] = field(default_factory=list)  # anything the user should know

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "sweep"}
        if self.sweep:
            d["sweep"] = [s.to_dict() for s in self.sweep]
        return d
