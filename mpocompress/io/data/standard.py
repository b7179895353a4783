"""The standard image-classification sets: scikit-learn's digits, MNIST and Fashion-MNIST (IDX
files), CIFAR-10 (python batches) and SVHN (.mat files). Reads files, never writes any."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mpocompress.errors import MPOCompressError
from mpocompress.io.data.images import ImageSet, check_count, check_labels, seeded_split

_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# where users get the original files (mpocompress never downloads)
_SOURCES = {
    "mnist": "the original MNIST files (train-images-idx3-ubyte.gz and the three others) from Yann LeCun's MNIST page or a mirror",
    "fashion-mnist": "the original files from github.com/zalandoresearch/fashion-mnist (its data/fashion folder)",
    "cifar10": "cifar-10-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html, extracted",
    "svhn": "train_32x32.mat and test_32x32.mat from ufldl.stanford.edu/housenumbers",
}
AUGMENT = {"cifar10": (4, True), "svhn": (4, False)}  # (crop padding, horizontal flip); digits are not flipped


# --------------------------------------------------------------------------- digits


def _digits_arrays(image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise MPOCompressError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    if not isinstance(image_size, int) or image_size < 1:
        raise MPOCompressError(f"image size must be a positive whole number, got {image_size!r}")
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_idx, test_idx = seeded_split(len(y), seed)
    return x, y, train_idx, test_idx


def digits_set(split: str, image_size: int, seed: int) -> ImageSet:
    x, y, train_idx, test_idx = _digits_arrays(image_size, seed)
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())
    idx = train_idx if split == "train" else test_idx
    return ImageSet("digits", split, x[idx].contiguous(), y[idx].contiguous(), (mean,), (std,))


def digits(split: str = "train", image_size: int = 28, seed: int = 0) -> TensorDataset:
    """scikit-learn's digits as a normalised TensorDataset: upsampled bilinearly to `image_size`,
    normalised with the training split's mean and std; a fixed, seeded 80/20 split gives 1,437
    training and 360 test images."""
    if split not in ("train", "test"):
        raise MPOCompressError(f"split must be 'train' or 'test', got {split!r}")
    x, y = digits_set(split, image_size, seed).tensors()
    return TensorDataset(x, y)


# --------------------------------------------------------------------------- file helpers


def _find(root: Path, folder: str, names: tuple[str, ...], what: str) -> list[Path]:
    """Paths of `names` in root/ or root/folder/ (the first folder holding all of them)."""
    for base in (root / folder, root):
        paths = [base / n for n in names]
        if all(p.is_file() for p in paths):
            return paths
    raise MPOCompressError(
        f"{what} not found: expected {', '.join(names)} in {root / folder} or {root}; "
        f"set --data-dir (or $MPOCOMPRESS_DATA) to the folder holding {_source(what)}"
    )


def _find_idx(root: Path, folder: str, stem: str, what: str) -> Path:
    for base in (root / folder, root):
        for name in (stem + ".gz", stem):
            if (base / name).is_file():
                return base / name
    raise MPOCompressError(
        f"{what} not found: expected {stem}.gz in {root / folder} or {root}; "
        f"set --data-dir (or $MPOCOMPRESS_DATA) to the folder holding {_source(what)}"
    )


def _source(what: str) -> str:
    """Where the files of the dataset named first in `what` come from."""
    return _SOURCES.get(what.split()[0], "the original files")


MAX_IDX_BYTES = 1 << 30  # the data an IDX file may promise (MNIST's training images are 47 MB)


def _read_idx(path: Path, expect_magic: int, expect_dims: int) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) of unsigned bytes, header checked against its size."""
    header = 4 + 4 * expect_dims
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:  # the header first: a (decompression) bomb is refused before it inflates
            head = f.read(header)
            if len(head) == header and struct.unpack(">I", head[:4])[0] == expect_magic:
                promised = math.prod(struct.unpack(f">{expect_dims}I", head[4:header]))
                if promised > MAX_IDX_BYTES:
                    raise MPOCompressError(f"{path} promises {promised:,} bytes of data, more than the {MAX_IDX_BYTES:,} "
                                           "an MNIST-like set holds; the file is not an original IDX file")  # fmt: skip
                data = head + f.read(promised + 1)  # at most one byte more than promised: a longer file is refused below
            else:
                data = head
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MPOCompressError(f"{path} is corrupt ({e}); download the original file again") from None
    if len(data) < header:
        raise MPOCompressError(f"{path} is corrupt: {len(data)} bytes, shorter than an IDX header")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expect_magic:
        raise MPOCompressError(
            f"{path} is corrupt or not an IDX {'image' if expect_dims == 3 else 'label'} file: "
            f"magic number {magic:#010x}, expected {expect_magic:#010x}"
        )
    dims = struct.unpack(f">{expect_dims}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise MPOCompressError(
            f"{path} is corrupt: its header promises {'x'.join(map(str, dims))} = {math.prod(dims)} bytes of data "
            f"but it holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


# --------------------------------------------------------------------------- MNIST, Fashion-MNIST


def idx_set(name: str, split: str, root: Path) -> ImageSet:
    img_stem, lbl_stem = _IDX_FILES[split]
    what = f"{name} {split} split"
    img_path = _find_idx(root, name, img_stem, what)
    lbl_path = _find_idx(root, name, lbl_stem, what)
    x = torch.from_numpy(_read_idx(img_path, 2051, 3).copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    y = torch.from_numpy(_read_idx(lbl_path, 2049, 1).astype(np.int64))
    check_count(x, y, f"{img_path} and {lbl_path}")
    check_labels(y, 10, str(lbl_path))
    mean, std = _STATS[name]
    return ImageSet(name, split, x, y, mean, std)


# --------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of numpy arrays, lists, bytes) and nothing else: any
    other global is refused, so a crafted file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise MPOCompressError(f"{path} is corrupt or not a CIFAR-10 python batch ({e})") from None
    if not isinstance(obj, dict):
        raise MPOCompressError(f"{path} is not a CIFAR-10 python batch (holds a {type(obj).__name__})")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = obj.get("data"), obj.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
        raise MPOCompressError(f"{path} is not a CIFAR-10 python batch: expected 'data' (N x 3072) and 'labels'")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def cifar10_set(split: str, root: Path) -> ImageSet:
    paths = _find(root, _CIFAR_FOLDER, _CIFAR_FILES[split], f"cifar10 {split} split")
    parts = [_read_cifar_batch(p) for p in paths]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    check_count(x, y, str(paths[0].parent))
    check_labels(y, 10, str(paths[0].parent))
    mean, std = _STATS["cifar10"]
    return ImageSet("cifar10", split, x, y, mean, std)


# --------------------------------------------------------------------------- SVHN


def svhn_set(split: str, root: Path) -> ImageSet:
    (path,) = _find(root, "svhn", (_SVHN_FILES[split],), f"svhn {split} split")
    try:
        from scipy.io import loadmat

        mat = loadmat(str(path))
    except Exception as e:
        raise MPOCompressError(f"{path} is corrupt or not an SVHN .mat file ({str(e).splitlines()[0]})") from None
    xm, ym = mat.get("X"), mat.get("y")
    if not isinstance(xm, np.ndarray) or xm.ndim != 4 or xm.shape[:3] != (32, 32, 3) or ym is None:
        raise MPOCompressError(f"{path} is not an SVHN .mat file: expected X of shape 32x32x3xN and y")
    x = torch.from_numpy(np.ascontiguousarray(xm.transpose(3, 2, 0, 1)).astype(np.uint8))  # (N, 3, 32, 32)
    y = torch.from_numpy(np.asarray(ym, dtype=np.int64).reshape(-1) % 10)  # SVHN writes digit 0 as label 10
    check_count(x, y, str(path))
    check_labels(y, 10, str(path))
    mean, std = _STATS["svhn"]
    return ImageSet("svhn", split, x, y, mean, std)
