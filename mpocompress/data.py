"""Datasets. `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download),
served as 1x28x28 images so that every MNIST network runs on it unchanged."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mpocompress.errors import MPOCompressError

DIGITS_TEST_FRACTION = 0.2


def digits(split: str = "train", image_size: int = 28, seed: int = 0) -> TensorDataset:
    """scikit-learn's digits, upsampled bilinearly to `image_size`, normalised with the training
    split's mean and std. A fixed, seeded 80/20 split gives 1,437 training and 360 test images.

    Args:
        split: "train" or "test".
        image_size: side of the square images served (8 keeps the originals).
        seed: seed of the train/test permutation.
    """
    if split not in ("train", "test"):
        raise MPOCompressError(f"split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise MPOCompressError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = math.ceil(len(y) * DIGITS_TEST_FRACTION)  # as scikit-learn's train_test_split
    train_idx, test_idx = perm[n_test:], perm[:n_test]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    idx = train_idx if split == "train" else test_idx
    return TensorDataset(x[idx], y[idx])
