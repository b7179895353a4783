"""What to compress (`LayerSelection`) and how (`MPOSettings`), and `CompressionConfig`, the flat
form users and files know that holds both."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mpocompress.errors import MPOCompressError
from mpocompress.tensors import Modes


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
    def selection(self) -> LayerSelection:
        return LayerSelection(tuple(self.layers), tuple(self.exclude), self.coverage)

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
        )
