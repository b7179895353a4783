"""A user's dataset as a tensors file (.pt, .npz or .safetensors) holding x and y, or x_train,
y_train, x_test and y_test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpocompress.errors import MPOCompressError
from mpocompress.io.data.images import ImageSet, check_count, seeded_split
from mpocompress.tensors import all_finite

TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")


# --------------------------------------------------------------------------- tensors file


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MPOCompressError(f"dataset file {path} not found; give a .pt, .npz or .safetensors file holding x and y")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MPOCompressError(f"cannot read dataset file {path} ({str(e).strip().splitlines()[0]})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MPOCompressError(f"dataset file {path} must hold a dict of tensors with keys x and y")
    return obj


MAX_CLASSES = 1_000_000  # a label above this is a damaged file, not a classification task


def _as_images(x: torch.Tensor, source: str) -> torch.Tensor:
    if x.ndim >= 2 and any(d == 0 for d in x.shape[1:]):
        raise MPOCompressError(f"{source}: x has no features (shape {tuple(x.shape)}); each sample needs at least one value")
    if x.ndim == 2:
        return x[:, None, None, :]  # (N, F): vectors, served as 1 x 1 x F
    if x.ndim == 3:
        return x[:, None]  # (N, H, W)
    if x.ndim == 4:
        return x
    raise MPOCompressError(f"{source}: x must be (N, F), (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")


def not_data(path: Path, tensors: dict[str, Any]) -> str:
    """Why a tensors file is not a dataset, in one short line: a few of its names, and what --data
    wants when it is a model's weights (names like `fc1.weight`) rather than data."""
    names = sorted(tensors)
    if not names:
        return f"dataset file {path} holds nothing; it needs tensors x and y"
    shown = ", ".join(n[:40] for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if any("." in n or n.endswith(("weight", "bias")) for n in names):
        return (f"{path} holds a model's weights ({shown}), not data; --data wants what the model runs on: text:FILE "
                "for a text model, a dataset name (digits, mnist, ...), or a file of tensors x and y")  # fmt: skip
    return f"dataset file {path} holds {shown}; it needs tensors x and y"


def tensor_file_set(path: Path, split: str, seed: int) -> ImageSet:
    t = read_tensor_file(path)
    if "x_train" in t or "x_test" in t:
        if not all(k in t for k in ("x_train", "y_train", "x_test", "y_test")):
            raise MPOCompressError(f"dataset file {path} must hold x_train, y_train, x_test and y_test together")
        pairs = {s: (t[f"x_{s}"], t[f"y_{s}"]) for s in ("train", "test")}
    elif "x" in t and "y" in t:
        pairs = {"all": (t["x"], t["y"])}
    else:
        raise MPOCompressError(not_data(path, t))
    for x, y in pairs.values():  # the whole file is checked, whichever split is asked for
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
            raise MPOCompressError(f"{path}: labels y must be a 1-D tensor of class indices, got {y.dtype} {tuple(y.shape)}")
        if not (x.dtype == torch.uint8 or x.dtype.is_floating_point):
            raise MPOCompressError(f"{path}: x must be uint8 or floating point, got {x.dtype}")
        check_count(_as_images(x, str(path)), y, str(path))
        if not all_finite(x):
            raise MPOCompressError(f"{path}: x holds NaN or Inf values; remove or repair those examples")
        if int(y.min()) < 0:
            raise MPOCompressError(f"{path}: labels must be class indices >= 0, found {int(y.min())}")
    num_classes = max(int(y.max()) for _, y in pairs.values()) + 1
    if num_classes > MAX_CLASSES:
        raise MPOCompressError(f"{path}: labels go up to {num_classes - 1:,}; class indices must be below {MAX_CLASSES:,} (labels are 0..C-1)")
    if "all" in pairs:
        x_all, y_all = _as_images(pairs["all"][0], str(path)), pairs["all"][1]
        train_idx, test_idx = seeded_split(len(y_all), seed)
        x_train = x_all[train_idx]
        idx = train_idx if split == "train" else test_idx
        x, y = x_all[idx], y_all[idx]
    else:
        x_train = _as_images(pairs["train"][0], str(path))
        x, y = _as_images(pairs[split][0], str(path)), pairs[split][1]
    if len(y) == 0 or len(x_train) == 0:
        which = f"its {split} split" if len(y) == 0 else "its training split"
        raise MPOCompressError(
            f"{path}: {which} is empty ({len(y_all) if 'all' in pairs else len(y)} samples in all; a single x/y pair is split "
            "80/20, so it needs at least 2 samples); give more samples, or x_train/y_train and x_test/y_test"
        )
    y = y.to(torch.int64)
    ref = x_train.float() / 255.0 if x_train.dtype == torch.uint8 else x_train.float()
    dims = (0, 2, 3)
    mean = tuple(float(v) for v in ref.mean(dims))
    std = tuple(max(float(v), 1e-8) for v in ref.std(dims))
    return ImageSet(path.name, split, x.contiguous(), y.contiguous(), mean, std, num_classes=num_classes)
