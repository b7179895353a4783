"""Optimisation settings of a run (Eq. 7 of the paper) and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mpocompress.errors import check_all

SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (Eq. 7 of the paper: cross-entropy + L2, SGD with momentum)."""

    epochs: int = 20  # passes over the training split
    batch_size: int = 64  # global batch: split evenly over distributed processes
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # the L2 coefficient lambda of Eq. 7 (applied as SGD weight decay)
    schedule: str = "cosine"  # learning rate over the run: cosine to 0, step (x0.1 at 50% and 75%), constant
    warmup_epochs: float = 0.0  # linear warm-up from 0 to `lr` over this many epochs
    seed: int = 0  # seeds data order, augmentation and the initialisation the caller does
    distill_alpha: float = 0.7  # weight of the distillation term when a teacher is given
    distill_temperature: float = 4.0  # softmax temperature of distillation
    eval_batch_size: int = 1000  # batch size for measuring test accuracy

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be a whole number >= 1, got {self.epochs!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch size must be a whole number >= 1, got {self.batch_size!r}"),
            (math.isfinite(self.lr) and 0 < self.lr <= 1e6, f"learning rate must lie in (0, 1e6], got {self.lr!r}"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**62, f"seed must be a whole number in [0, 2^62), got {self.seed!r}"),
            (math.isfinite(self.weight_decay) and self.weight_decay <= 1e3, f"weight decay must be at most 1000, got {self.weight_decay!r}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum!r}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay!r}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
            (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs, f"warm-up must lie in [0, epochs], got {self.warmup_epochs!r}"),
            (0 <= self.distill_alpha <= 1, f"distillation weight must lie in [0, 1], got {self.distill_alpha!r}"),
            (self.distill_temperature > 0, f"distillation temperature must be > 0, got {self.distill_temperature!r}"),
        ]  # fmt: skip
        check_all(checks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FINETUNE_DEFAULTS = TrainConfig(epochs=3, lr=0.02, warmup_epochs=0.0)  # `finetune` starts from a trained model


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step `step` (0-based)."""
    total = config.epochs * steps_per_epoch
    warm = config.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    progress = (step - warm) / max(1.0, total - warm)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))  # step
