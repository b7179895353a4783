"""Which parameters train: partial freezing of MPO layers, and the balanced gauge before
fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mpocompress.compress import count_params
from mpocompress.errors import MPOCompressError
from mpocompress.nn import FactorizedLayer, MPOLayer
from mpocompress.tensors import balance_cores

FREEZE_PARTS = ("central", "dense")


def central_core_index(layer: nn.Module) -> int:
    """The central core of an MPO: the one holding the most parameters, the middle one on ties."""
    sizes = [c.numel() for c in layer.cores]
    mid = (len(sizes) - 1) / 2
    return max(range(len(sizes)), key=lambda i: (sizes[i], -abs(i - mid)))


def freeze_(model: nn.Module, parts: Sequence[str]) -> int:
    """Freeze parts of a model in place and return the number of trainable parameters left.

    Args:
        parts: "central" freezes the central core of every MPO layer (fine-tune only the auxiliary
            cores and biases, as in later MPO work on light fine-tuning); "dense" freezes every
            parameter outside the MPO layers.
    """
    for p in parts:
        if p not in FREEZE_PARTS:
            raise MPOCompressError(f"unknown part to freeze {p!r}; choose from {', '.join(FREEZE_PARTS)}")
    mpo_layers = [m for m in model.modules() if isinstance(m, MPOLayer)]
    factorized = [m for m in model.modules() if isinstance(m, FactorizedLayer)]
    if parts and not factorized:
        raise MPOCompressError("the model has no MPO layers to fine-tune partially; convert it first or drop --freeze")
    if "central" in parts and not mpo_layers:
        raise MPOCompressError("--freeze central needs MPO layers and the model has none; convert it with --structure mpo or drop it")
    if "dense" in parts:
        in_mpo = {id(p) for m in factorized for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in in_mpo:
                p.requires_grad_(False)
    if "central" in parts:
        for m in mpo_layers:
            m.cores[central_core_index(m)].requires_grad_(False)
    trainable = count_params(model, trainable_only=True)
    if trainable == 0:
        raise MPOCompressError("nothing left to train after --freeze; freeze fewer parts")
    return trainable


@torch.no_grad()
def prepare_finetune_(model: nn.Module) -> nn.Module:
    """Put every MPO layer's cores in the balanced gauge (`tensors.balance_cores`), in place: the
    layer computes the same map, and SGD trains its cores at comparable rates."""
    for m in model.modules():
        if isinstance(m, MPOLayer):
            for p, c in zip(m.cores, balance_cores(list(m.cores))):
                p.copy_(c)
    return model
