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
    """||t||_F accurate to about 1e-6 in any dtype: norms of rows of 65,536 numbers computed in at
    least float32 (float16 and bfloat16 overflow or round badly on their own), summed in float64, and
    redone in float64 row by row when the squares overflow float32. (A single float32 reduction over
    10^8 numbers is off by about 1 %.)"""
    flat = t.detach().reshape(-1)
    acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
    k = flat.numel() // row
    sq = float(torch.linalg.vector_norm(flat[: k * row].view(k, row), dim=1, dtype=acc).double().square().sum()) if k else 0.0
    norm = math.sqrt(sq + float(torch.linalg.vector_norm(flat[k * row :], dtype=acc).double()) ** 2)
    if math.isinf(norm) and acc != torch.float64 and all_finite(flat):  # squares beyond float32's range
        sq = sum(float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2 for part in flat.split(row))
        norm = math.sqrt(sq)
    return norm

