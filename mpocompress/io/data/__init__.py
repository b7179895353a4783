"""Datasets: reading the standard image-classification sets and serving normalised batches.

`load_dataset(name, split, data_dir)` returns an `ImageSet`: the whole split held in memory as a
tensor (uint8 where the original is, so CIFAR-10 takes 150 MB, not 600), normalised and augmented a
batch at a time. Sets:

- `digits`: scikit-learn's bundled 8x8 digits (1,797 images, no files needed), served as 1x28x28.
- `mnist`, `fashion-mnist`: the original IDX files (`train-images-idx3-ubyte.gz`, ...).
- `cifar10`: the original python pickle batches (`cifar-10-batches-py/data_batch_1` ... `test_batch`).
- `svhn`: the original `train_32x32.mat` / `test_32x32.mat`.
- a tensors file (`.pt`, `.npz` or `.safetensors`) holding `x` and `y`, or `x_train`, `y_train`,
  `x_test`, `y_test`.

File-based sets are looked up in `data_dir`, else `$MPOCOMPRESS_DATA`, else `./data`, either directly
or in a sub-folder named after the set. This module reads dataset files and never writes any.
"""

from __future__ import annotations

import os
from pathlib import Path

from mpocompress.errors import MPOCompressError
from mpocompress.io.data.images import SPLIT_TEST_FRACTION, ImageSet, batch_indices
from mpocompress.io.data.standard import AUGMENT, cifar10_set, digits, digits_set, idx_set, svhn_set
from mpocompress.io.data.tensor_file import TENSOR_FILE_SUFFIXES, tensor_file_set

DIGITS_TEST_FRACTION = SPLIT_TEST_FRACTION
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn")


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $MPOCOMPRESS_DATA, else ./data."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("MPOCOMPRESS_DATA") or "data")


def is_tensor_file(name: str) -> bool:
    return name.lower().endswith(TENSOR_FILE_SUFFIXES)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    augment: bool | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """One split of a dataset.

    Args:
        name: digits, mnist, fashion-mnist, cifar10, svhn, or the path of a tensors file.
        split: "train" or "test".
        data_dir: folder holding the files (default: $MPOCOMPRESS_DATA, else ./data).
        augment: crop-and-flip for the training split of cifar10 and svhn (default: on for those).
        image_size: for digits only, the side of the served images (default 28).
        seed: for digits and tensors files holding a single split, the seed of the 80/20 split.
    """
    if split not in ("train", "test"):
        raise MPOCompressError(f"split must be 'train' or 'test', got {split!r}")
    key = name.lower()
    if is_tensor_file(name):
        ds = tensor_file_set(Path(name), split, seed)
    elif key == "digits":
        ds = digits_set(split, 28 if image_size is None else image_size, seed)
    elif image_size is not None:
        raise MPOCompressError(f"--image-size applies to digits only; {name} images keep their size")
    elif key in ("mnist", "fashion-mnist", "fashion_mnist", "fmnist"):
        key = "mnist" if key == "mnist" else "fashion-mnist"
        ds = idx_set(key, split, data_root(data_dir))
    elif key in ("cifar10", "cifar-10"):
        key = "cifar10"
        ds = cifar10_set(split, data_root(data_dir))
    elif key == "svhn":
        ds = svhn_set(split, data_root(data_dir))
    else:
        raise MPOCompressError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or give a .pt/.npz/.safetensors "
            "file holding tensors x and y"
        )
    pad, flip = AUGMENT.get(key, (0, False))
    ds.crop_pad, ds.flip = pad, flip
    ds.augment = (pad > 0 or flip) and split == "train" and (augment is None or augment)
    return ds


__all__ = [
    "DATASETS", "DIGITS_TEST_FRACTION", "TENSOR_FILE_SUFFIXES", "ImageSet", "batch_indices", "data_root", "digits",
    "is_tensor_file", "load_dataset",
]  # fmt: skip
