"""Accuracy against size, one setting at a time (the paper's Fig. 2): for each bond dimension or
parameter budget, convert a copy of the model, measure it right after conversion, and optionally
fine-tune it M times (seeds S..S+M-1) and measure each run (mean +- sigma, Eqs. 10-11).

The library part is silent and writes nothing: `sweep_point` returns one `SweepPoint`; the CLI
(`mpocompress sweep`) keeps the results, resumes per setting, and writes the JSON, CSV and picture.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpocompress.compress import CompressionConfig, compress_, summarize
from mpocompress.errors import MPOCompressError
from mpocompress.train.config import FINETUNE_DEFAULTS, TrainConfig
from mpocompress.train.evaluation import evaluate, mean_std
from mpocompress.train.loop import fit
from mpocompress.train.params import prepare_finetune_

BOND_DIMS = (2, 4, 8, 16, 32)  # the default settings


@dataclass(frozen=True)
class SweepSetting:
    """One point of the sweep: a bond dimension D for every selected layer, or a parameter budget."""

    bond_dim: int | None = None
    target_params: float | None = None

    @property
    def label(self) -> str:
        return f"D={self.bond_dim}" if self.bond_dim is not None else f"P={self.target_params:g}"


@dataclass
class SweepPoint:
    """What one setting gave: the size after conversion, the accuracy right after it and after each
    fine-tuning run."""

    setting: str
    bond_dim: int | None
    target_params: float | None
    rho: float  # factorized weights / dense weights of the converted layers (Eq. 9)
    params_model: int
    accuracy_converted: float
    loss_converted: float
    accuracy_finetuned: list[float] = field(default_factory=list)  # one per run (empty without fine-tuning)
    accuracy_finetuned_mean: float | None = None
    accuracy_finetuned_std: float | None = None  # sigma of Eq. 11 (None for fewer than 2 runs)
    layers: list[dict[str, Any]] = field(default_factory=list)  # name and notation of every converted layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_settings(bond_dims: str | None, target_params: str | None) -> list[SweepSetting]:
    """--bond-dim 2,4,8 or --target-params 0.1,0.3 (not both); BOND_DIMS when neither is given."""
    if bond_dims is not None and target_params is not None:
        raise MPOCompressError("give --bond-dim or --target-params, not both: a sweep varies one of them")
    if target_params is not None:
        out = []
        for part in target_params.split(","):
            try:
                p = float(part)
            except ValueError:
                raise MPOCompressError(f"cannot read --target-params {target_params!r}: write fractions like 0.1,0.3,0.5") from None
            if not (math.isfinite(p) and 0 < p <= 1):
                raise MPOCompressError(f"--target-params values must be fractions in (0, 1], got {part.strip()}")
            out.append(SweepSetting(target_params=p))
        return _distinct(out)
    if bond_dims is None:
        return [SweepSetting(bond_dim=d) for d in BOND_DIMS]
    out = []
    for part in bond_dims.split(","):
        if not part.strip().isdigit() or int(part) < 1 or int(part) > 100_000:
            raise MPOCompressError(f"cannot read --bond-dim {bond_dims!r}: write whole numbers >= 1 like 2,4,8,16,32")
        out.append(SweepSetting(bond_dim=int(part)))
    return _distinct(out)


def _distinct(settings: list[SweepSetting]) -> list[SweepSetting]:
    if len(set(settings)) != len(settings):
        raise MPOCompressError("a sweep setting is given twice; list each value once")
    return settings


def sweep_point(
    model: nn.Module,
    setting: SweepSetting,
    base: CompressionConfig,
    train_set: Any,
    test_set: Any,
    epochs: int = 0,
    runs: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    calibration: Sequence[Mapping[str, torch.Tensor]] | None = None,
    train_config: TrainConfig | None = None,
    should_stop: Callable[[], int] | None = None,
    on_epoch: Callable[[Any], None] | None = None,
) -> SweepPoint:
    """Convert a copy of `model` at `setting` (the other options from `base`), evaluate it, and
    fine-tune a fresh copy of the converted model `runs` times for `epochs` epochs. `model` is
    not changed."""
    config = dataclasses.replace(base, bond_dim=setting.bond_dim, target_params=setting.target_params)
    converted = copy.deepcopy(model).cpu()
    compress_(converted, config, calibration=calibration)
    s = summarize(converted)
    acc, loss = evaluate(converted, test_set, device)
    point = SweepPoint(setting.label, setting.bond_dim, setting.target_params, s["rho"], s["params_model"], acc, loss,
                       layers=s["mpo_layers"])  # fmt: skip
    if epochs > 0:
        cfg = dataclasses.replace(train_config or FINETUNE_DEFAULTS, epochs=epochs)
        for r in range(runs):
            tuned = prepare_finetune_(copy.deepcopy(converted))
            torch.manual_seed(seed + r)
            result = fit(tuned, train_set, test_set, dataclasses.replace(cfg, seed=seed + r), device=device,
                         should_stop=should_stop, on_epoch=on_epoch)  # fmt: skip
            point.accuracy_finetuned.append(result.accuracy)
        point.accuracy_finetuned_mean, point.accuracy_finetuned_std = mean_std(point.accuracy_finetuned)
    return point
