"""Numerical checks shared by the decompositions, the datasets and the file readers: NaN/Inf
detection and an accurate Frobenius norm, both in slices so large tensors need no full-size
temporaries."""

from __future__ import annotations

import math

import torch


def all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """Whether a tensor holds no NaN or Inf, checked in slices: torch.isfinite on a whole tensor
    makes temporaries as large as the tensor (|x| among them), which a large layer cannot afford."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return all(bool(torch.isfinite(part).all()) for part in t.detach().reshape(-1).split(chunk))


def frobenius_norm(t: torch.Tensor, row: int = 1 << 16) -> float:
    """||t||_F accurate to about 1e-7 in any dtype: float32 norms of rows of 65,536 numbers, summed
    in float64. (A single float32 reduction over 10^8 numbers is off by about 1 %.)"""
    flat = t.detach().reshape(-1)
    k = flat.numel() // row
    sq = float(torch.linalg.vector_norm(flat[: k * row].view(k, row), dim=1).double().square().sum()) if k else 0.0
    return math.sqrt(sq + float(torch.linalg.vector_norm(flat[k * row :]).double()) ** 2)

