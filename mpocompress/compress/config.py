"""What to compress (`LayerSelection`) and how (`MPOSettings`), and `CompressionConfig`, the flat
form users and files know that holds both."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mpocompress.errors import MPOCompressError
from mpocompress.tensors import Modes

CALIB_DTYPES = ("auto", "float32", "bfloat16")  # --calib-dtype: the calibration passes' matrix products


@dataclass(frozen=True)
class LayerSelection:
    """Which layers: patterns (exact name, shell glob or 're:' + regex) to convert and to leave
    dense, and for the default selection the share of the weights the heaviest layers must hold."""

    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    coverage: float = 0.9


@dataclass(frozen=True)
class MPOSettings:
    """How to write a selected layer as an MPO: D and/or eps for all, the core count, and per-layer
    D and modes by pattern (naming a layer there also selects it)."""

    bond_dim: int | None = None
    eps: float | None = None
    n_cores: int = 4
    bond_dims: Mapping[str, int] = field(default_factory=dict)
    shapes: Mapping[str, tuple[Modes, Modes]] = field(default_factory=dict)

    @property
    def has_global_truncation(self) -> bool:
        return self.bond_dim is not None or self.eps is not None


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how.

    With neither `bond_dim` nor `eps`, `analyze` reports the exact MPO and a sweep over D;
    `compress_` needs one of them (or a per-layer bond dim for every selected layer).
    """

    bond_dim: int | None = None  # D for every selected layer; each bond is capped at its useful max
    eps: float | None = None  # target relative Frobenius error of each layer's weight
    n_cores: int = 4  # number of cores n for layers whose modes are not given
    layers: tuple[str, ...] = ()  # patterns picking the layers; empty: the default selection
    exclude: tuple[str, ...] = ()  # patterns of layers to leave dense
    bond_dims: Mapping[str, int] = field(default_factory=dict)  # per-layer D, by pattern
    shapes: Mapping[str, tuple[Modes, Modes]] = field(default_factory=dict)  # per-layer (I modes, J modes)
    coverage: float = 0.9  # default selection: heaviest layers until they hold this share of weights
    structure: str = "auto"  # auto | mpo | lowrank: the forms a layer may take
    target_params: float | None = None  # the model's size after: a count, or a fraction (<= 1) of its size now
    max_error: float | None = None  # the largest relative error (output error with calibration) a layer may have
    mpo_cores: tuple[int, ...] = ()  # core counts the allocator tries for an MPO (empty: 3 and 4, or n_cores if given)
    refine_steps: int = 30  # L-BFGS iterations on the calibrated objective per MPO layer (0: none)
    sequential: bool = False  # calibrate each layer on the inputs the already-compressed layers give it
    remove: float | None = None  # instead of target_params: the share of the selected layers' weights to remove
    budget_of: str = "model"  # what target_params counts: "model" (its size after) or "selected" (the selected layers')
    try_mpo: bool = False  # with calibration: each low-rank layer made is offered a 4-core MPO of no more parameters,
    # refined TRY_MPO_REFINE times longer, and takes it where its calibrated error is lower
    calib_dtype: str = "auto"  # the calibration passes' products: auto (bfloat16 where the device has it natively) | float32 | bfloat16

    def __post_init__(self) -> None:
        for what, d in [("bond dimension", self.bond_dim), *((f"bond dimension of {k}", v) for k, v in self.bond_dims.items())]:
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
                raise MPOCompressError(f"{what} must be a whole number >= 1, got {d!r}")
        if self.eps is not None and not (0.0 < float(self.eps) < 1.0):
            raise MPOCompressError(f"eps must lie strictly between 0 and 1, got {self.eps!r}")
        if not isinstance(self.n_cores, int) or self.n_cores < 1:
            raise MPOCompressError(f"number of cores must be a whole number >= 1, got {self.n_cores!r}")
        if not 0.0 < self.coverage <= 1.0:
            raise MPOCompressError(f"coverage must lie in (0, 1], got {self.coverage!r}")
        if self.structure not in ("auto", "mpo", "lowrank"):
            raise MPOCompressError(f"unknown structure {self.structure!r}; choose auto, mpo or lowrank")
        if self.target_params is not None and not (math.isfinite(self.target_params) and self.target_params > 0):
            raise MPOCompressError(f"target parameters must be a count >= 1 or a fraction in (0, 1], got {self.target_params!r}")
        if self.target_params is not None and self.target_params > 1 and self.target_params != int(self.target_params):
            raise MPOCompressError(f"target parameters above 1 must be a whole count, got {self.target_params!r}")
        if self.remove is not None and not (math.isfinite(self.remove) and 0.0 < self.remove < 1.0):
            raise MPOCompressError(f"the share of weights to remove must lie strictly between 0 and 1, got {self.remove!r}; e.g. --remove 0.2")
        if self.budget_of not in ("model", "selected"):
            raise MPOCompressError(f"--of must be model or selected, got {self.budget_of!r}")
        if self.remove is not None and self.target_params is not None:
            raise MPOCompressError("--remove R and --target-params P both set the budget; give one of them")
        if self.max_error is not None and not (0.0 < float(self.max_error) < 1.0):
            raise MPOCompressError(f"max error must lie strictly between 0 and 1, got {self.max_error!r}")
        if (self.budgeted or self.max_error is not None) and (self.bond_dim is not None or self.eps is not None):
            raise MPOCompressError(
                "--bond-dim D / --eps fix every layer's size, which leaves nothing to allocate: give either them or "
                "--target-params / --max-error (NAME=D for single layers works with both)"
            )
        if any(not isinstance(n, int) or not 1 <= n <= 8 for n in self.mpo_cores):
            raise MPOCompressError(f"MPO core counts must be whole numbers in 1..8, got {self.mpo_cores!r}")
        if self.try_mpo and self.structure == "mpo":
            raise MPOCompressError("--try-mpo offers MPOs to the layers made low-rank, and --structure mpo makes none low-rank; drop one of them")
        if self.calib_dtype not in CALIB_DTYPES:
            raise MPOCompressError(f"unknown --calib-dtype {self.calib_dtype!r}; choose auto, float32 or bfloat16")
        if not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise MPOCompressError(f"refinement steps must be a whole number >= 0, got {self.refine_steps!r}")
        for pattern in (*self.layers, *self.exclude, *self.bond_dims, *self.shapes):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise MPOCompressError(f"bad regular expression in layer pattern {pattern!r}: {e}") from None
        for name, (i_modes, o_modes) in self.shapes.items():
            if len(i_modes) != len(o_modes):
                raise MPOCompressError(
                    f"shape of {name}: {len(i_modes)} input modes but {len(o_modes)} output modes; use the same count"
                )

    @property
    def budgeted(self) -> bool:
        """Whether a parameter budget was given (--target-params or --remove)."""
        return self.target_params is not None or self.remove is not None

    @property
    def allocating(self) -> bool:
        """Whether layer sizes are chosen by the allocator (a budget or an error cap was given)."""
        return self.budgeted or self.max_error is not None

    @property
    def selection(self) -> LayerSelection:
        # under a budget every candidate is offered to the allocator, which keeps dense what does not pay
        return LayerSelection(tuple(self.layers), tuple(self.exclude), 1.0 if self.allocating else self.coverage)

    @property
    def settings(self) -> MPOSettings:
        return MPOSettings(self.bond_dim, self.eps, self.n_cores, dict(self.bond_dims), dict(self.shapes))

    def with_bond_dim(self, d: int | None) -> CompressionConfig:
        return CompressionConfig(**{**self._fields(), "bond_dim": d})

    def _fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def to_dict(self) -> dict[str, Any]:
        return {
            "bond_dim": self.bond_dim,
            "eps": self.eps,
            "n_cores": self.n_cores,
            "layers": list(self.layers),
            "exclude": list(self.exclude),
            "bond_dims": dict(self.bond_dims),
            "shapes": {k: [list(i), list(o)] for k, (i, o) in self.shapes.items()},
            "coverage": self.coverage,
            "structure": self.structure,
            "target_params": self.target_params,
            "max_error": self.max_error,
            "mpo_cores": list(self.mpo_cores),
            "refine_steps": self.refine_steps,
            "sequential": self.sequential,
            "remove": self.remove,
            "budget_of": self.budget_of,
            "try_mpo": self.try_mpo,
            "calib_dtype": self.calib_dtype,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionConfig:
        return cls(
            bond_dim=d.get("bond_dim"),
            eps=d.get("eps"),
            n_cores=d.get("n_cores", 4),
            layers=tuple(d.get("layers", ())),
            exclude=tuple(d.get("exclude", ())),
            bond_dims=dict(d.get("bond_dims", {})),
            shapes={k: (tuple(v[0]), tuple(v[1])) for k, v in d.get("shapes", {}).items()},
            coverage=d.get("coverage", 0.9),
            structure=d.get("structure", "auto"),
            target_params=d.get("target_params"),
            max_error=d.get("max_error"),
            mpo_cores=tuple(d.get("mpo_cores", ())),
            refine_steps=d.get("refine_steps", 30),
            sequential=d.get("sequential", False),
            remove=d.get("remove"),
            budget_of=d.get("budget_of", "model"),
            try_mpo=d.get("try_mpo", False),
            calib_dtype=d.get("calib_dtype", "auto"),
        )
