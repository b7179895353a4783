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

import math
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
    channels: int | None = None,
    normalize: str | tuple[float, float] | None = None,
) -> ImageSet:
    """One split of a dataset.

    Args:
        name: digits, mnist, fashion-mnist, cifar10, svhn, or the path of a tensors file.
        split: "train" or "test".
        data_dir: folder holding the files (default: $MPOCOMPRESS_DATA, else ./data).
        augment: crop-and-flip for the training split of cifar10 and svhn (default: on for those).
        image_size: the side of the served images: digits are rendered at that size (default 28,
            8 gives scikit-learn's own 8x8 images), other images are resized (bilinear, antialiased).
        seed: for digits and tensors files holding a single split, the seed of the 80/20 split.
        channels: serve this many channels (1 -> C repeats a gray image, C -> 1 averages).
        normalize: "dataset" (the training split's per-channel mean and std; the default for named
            datasets), "none" (raw [0, 1] values, or the file's floats as they are; the default for
            tensors files), or (MEAN, STD) for every channel.
    """
    if split not in ("train", "test"):
        raise MPOCompressError(f"split must be 'train' or 'test', got {split!r}")
    key = name.lower()
    if is_tensor_file(name):
        ds = tensor_file_set(Path(name), split, seed)
    elif key == "digits":
        ds = digits_set(split, 28 if image_size is None else image_size, seed)
    elif key in ("mnist", "fashion-mnist", "fashion_mnist", "fmnist"):
        key = "mnist" if key == "mnist" else "fashion-mnist"
        ds = idx_set(key, split, data_root(data_dir))
    elif key in ("cifar10", "cifar-10"):
        key = "cifar10"
        ds = cifar10_set(split, data_root(data_dir))
    elif key == "svhn":
        ds = svhn_set(split, data_root(data_dir))
    else:
        text = f"for a text model's plain text give text:{name}; else " if Path(name).is_file() or key.endswith((".txt", ".text", ".md")) else ""
        raise MPOCompressError(
            f"unknown dataset {name!r}: {text}choose one of {', '.join(DATASETS)}, or give a .pt/.npz/.safetensors "
            "file holding tensors x and y"
        )
    _serve(ds, key, image_size, channels, normalize if normalize is not None else default_normalization(name))
    pad, flip = AUGMENT.get(key, (0, False))
    ds.crop_pad, ds.flip = pad, flip
    ds.augment = (pad > 0 or flip) and split == "train" and (augment is None or augment)
    return ds


def _serve(ds: ImageSet, key: str, image_size: int | None, channels: int | None, normalize: str | tuple[float, float]) -> None:
    """Set how `ds` serves its images: size, channels, normalization."""
    if image_size is not None:
        if type(image_size) is not int or not 1 <= image_size <= 4096:
            raise MPOCompressError(f"--image-size must be a whole number of pixels in [1, 4096], got {image_size!r}")
        if key != "digits":  # digits are rendered at that size already
            ds.size = image_size
    if channels is not None:
        c = int(ds.x.shape[1])
        if channels not in (1, 3, 4) or (c != 1 and channels != 1 and channels != c):
            raise MPOCompressError(f"--channels {channels} cannot be served from {ds.name}'s {c}-channel images; "
                                   "use 1 (gray) or, from gray images, 3 or 4 (repeated)")  # fmt: skip
        ds.channels = channels
    if normalize == "none":
        ds.mean, ds.std = (0.0,), (1.0,)
    elif isinstance(normalize, tuple):
        mean, std = _mean_std(*normalize)
        ds.mean, ds.std = (mean,), (std,)
    elif normalize != "dataset":
        raise MPOCompressError(f"unknown normalization {normalize!r}: use none, dataset or MEAN,STD")


def default_normalization(name: str) -> str:
    """What --normalize means when not given: a file's values as they are, a named set's statistics."""
    return "none" if is_tensor_file(name) else "dataset"


def parse_normalize(text: str) -> str | tuple[float, float]:
    """--normalize none | dataset | MEAN,STD."""
    t = text.strip().lower()
    if t in ("none", "dataset"):
        return t
    parts = t.split(",")
    try:
        mean, std = (float(p) for p in parts)
    except ValueError:
        raise MPOCompressError(f"cannot read --normalize {text!r}: use none, dataset or MEAN,STD (e.g. 0.1307,0.3081)") from None
    return _mean_std(mean, std)


def _mean_std(mean: float, std: float) -> tuple[float, float]:
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise MPOCompressError(f"--normalize MEAN,STD needs finite numbers and STD > 0, got {mean},{std}")
    return float(mean), float(std)


__all__ = [
    "DATASETS", "DIGITS_TEST_FRACTION", "TENSOR_FILE_SUFFIXES", "ImageSet", "batch_indices", "data_root", "digits",
    "default_normalization", "is_tensor_file", "load_dataset", "parse_normalize",
]  # fmt: skip
