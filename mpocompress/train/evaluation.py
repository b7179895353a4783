"""Measuring a classifier: accuracy and loss on a split, the distillation term, and the mean and
sigma over runs (Eqs. 10-11)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.io.data import ImageSet
from mpocompress.nn import InferenceReport, materialized, optimize_for_inference
from mpocompress.train.data import as_dataset


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Eqs. 10-11: the mean and the sample standard deviation (None for a single run)."""
    m = len(values)
    if m == 0:
        raise MPOCompressError("no runs to average")
    mean = sum(values) / m
    if m == 1:
        return mean, None
    return mean, math.sqrt(sum((a - mean) ** 2 for a in values) / (m - 1))


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: ImageSet, device: torch.device | str = "cpu", batch_size: int = 1000,
    materialize: bool = True,
) -> tuple[float, float]:  # fmt: skip
    """Top-1 accuracy (a fraction) and mean cross-entropy of `model` on `dataset` (mpocompress's, or
    any map-style Dataset of (x, y) pairs or a DataLoader over one), in eval mode. With `materialize`
    every factorized layer keeps W for the loop (freed after); without, the layers run as they are
    set (e.g. by `optimize_for_inference`)."""
    dataset = as_dataset(dataset)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        with materialized(model) if materialize else contextlib.nullcontext():  # nothing writes the cores meanwhile
            for idx in torch.arange(len(dataset)).split(batch_size):
                x, y = dataset.batch(idx, device)
                logits = forward_checked(model, x, dataset)
                loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset), loss_sum / len(dataset)


def optimize_on_first_batch(
    model: nn.Module, dataset: Any, prefer: str, device: torch.device | str = "cpu", batch_size: int = 1000
) -> InferenceReport:
    """`optimize_for_inference` on the first `batch_size` samples of `dataset` (images with labels,
    or the unlabelled sets' token or x-only batches), as the model will be run on them."""
    idx = torch.arange(min(batch_size, len(dataset)))
    batch = dataset.batch(idx, device)
    example = batch[0] if isinstance(batch, tuple) else batch["x"] if set(batch) == {"x"} else batch
    return optimize_for_inference(model, example, prefer=prefer)  # type: ignore[arg-type]


def forward_checked(model: nn.Module, x: torch.Tensor, dataset: ImageSet) -> torch.Tensor:
    """model(x), with a one-line error when the model does not take the dataset's images or
    gives fewer outputs than it has classes."""
    try:
        logits = model(x)
    except RuntimeError as e:
        if "shape" in str(e) or "size" in str(e):
            raise MPOCompressError(
                f"the model does not take {dataset.name} images of shape {'x'.join(map(str, dataset.image_shape))} "
                f"({str(e).splitlines()[0]}); serve the images in the shape the model takes with --image-size N "
                "and --channels C (e.g. --image-size 8 for a model of scikit-learn's 8x8 digits)"
            ) from None
        raise
    if logits.ndim != 2 or logits.shape[1] < dataset.num_classes:
        raise MPOCompressError(
            f"the model gives outputs of shape {tuple(logits.shape)} but {dataset.name} has {dataset.num_classes} "
            "classes; set num_classes in the architecture"
        )
    return logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target term: T^2 KL(softmax(teacher/T) || softmax(student/T))."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t
