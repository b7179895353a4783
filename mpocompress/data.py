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

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset

from mpocompress.errors import MPOCompressError
from mpocompress.mpo import all_finite

DIGITS_TEST_FRACTION = 0.2
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn")
TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")

# Per-channel statistics of each training set (the values used throughout the literature).
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
_AUGMENT = {"cifar10": (4, True), "svhn": (4, False)}  # (crop padding, horizontal flip); digits are not flipped


# --------------------------------------------------------------------------- the in-memory set


@dataclass
class ImageSet:
    """One split of a dataset, in memory.

    `x` is (N, C, H, W), uint8 (scaled by 1/255 when served) or float; `y` holds class indices.
    `batch(idx)` returns normalised float images, randomly cropped and flipped when `augment`.
    """

    name: str
    split: str
    x: torch.Tensor  # (N, C, H, W) uint8 or float32
    y: torch.Tensor  # (N,) int64 in [0, num_classes)
    mean: tuple[float, ...]  # per channel, of the served [0, 1] (or float) values
    std: tuple[float, ...]
    num_classes: int = 10
    augment: bool = False  # random crop (zero padding `crop_pad`) and, if `flip`, horizontal flip
    crop_pad: int = 0
    flip: bool = False

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def batch(
        self, idx: torch.Tensor, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `idx`, as normalised float32 on `device`, and their labels."""
        x = self.x[idx].to(device, non_blocking=True)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        c = x.shape[1]
        mean = torch.tensor(self.mean, device=x.device).reshape(1, c, 1, 1) if len(self.mean) > 1 else self.mean[0]
        std = torch.tensor(self.std, device=x.device).reshape(1, c, 1, 1) if len(self.std) > 1 else self.std[0]
        x = (x - mean) / std
        if self.augment and self.crop_pad + self.flip:
            x = _crop_flip(x, self.crop_pad, self.flip, generator)
        return x, self.y[idx].to(device, non_blocking=True)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split, normalised, without augmentation."""
        augment, self.augment = self.augment, False
        try:
            return self.batch(torch.arange(len(self)))
        finally:
            self.augment = augment


def _crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop after zero padding by `pad`, and a random horizontal flip, per image."""
    b, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))  # zero in normalised units: the mean image value
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * pad)
        x = xp.gather(2, rows)  # (B, C, H, W + 2 pad)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
        x = x.gather(3, cols)  # (B, C, H, W)
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def batch_indices(
    n: int, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """This process's index batches for one epoch.

    The order comes from torch's DistributedSampler (seeded by seed + epoch), so one process with
    batch size B and N processes with B / N each see the same global batches. The last, partial
    batch is kept.
    """
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)  # type: ignore[arg-type]
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.int64)
    return list(idx.split(batch_size)) if len(idx) else []


# --------------------------------------------------------------------------- entry point


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
        ds = _tensor_file(Path(name), split, seed)
    elif key == "digits":
        ds = _digits_set(split, 28 if image_size is None else image_size, seed)
    elif image_size is not None:
        raise MPOCompressError(f"--image-size applies to digits only; {name} images keep their size")
    elif key in ("mnist", "fashion-mnist", "fashion_mnist", "fmnist"):
        key = "mnist" if key == "mnist" else "fashion-mnist"
        ds = _idx_set(key, split, data_root(data_dir))
    elif key in ("cifar10", "cifar-10"):
        key = "cifar10"
        ds = _cifar10(split, data_root(data_dir))
    elif key == "svhn":
        ds = _svhn(split, data_root(data_dir))
    else:
        raise MPOCompressError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or give a .pt/.npz/.safetensors "
            "file holding tensors x and y"
        )
    pad, flip = _AUGMENT.get(key, (0, False))
    ds.crop_pad, ds.flip = pad, flip
    ds.augment = (pad > 0 or flip) and split == "train" and (augment is None or augment)
    return ds


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
    train_idx, test_idx = _split(len(y), seed)
    return x, y, train_idx, test_idx


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded 80/20 split (test size rounded up, as scikit-learn's train_test_split)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = math.ceil(n * DIGITS_TEST_FRACTION)
    return perm[n_test:], perm[:n_test]


def _digits_set(split: str, image_size: int, seed: int) -> ImageSet:
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
    x, y = _digits_set(split, image_size, seed).tensors()
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
        "set --data-dir (or $MPOCOMPRESS_DATA) to the folder holding the original files"
    )


def _find_idx(root: Path, folder: str, stem: str, what: str) -> Path:
    for base in (root / folder, root):
        for name in (stem + ".gz", stem):
            if (base / name).is_file():
                return base / name
    raise MPOCompressError(
        f"{what} not found: expected {stem}.gz in {root / folder} or {root}; "
        "set --data-dir (or $MPOCOMPRESS_DATA) to the folder holding the original IDX files"
    )


def _read_idx(path: Path, expect_magic: int, expect_dims: int) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) of unsigned bytes, header checked against its size."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MPOCompressError(f"{path} is corrupt ({e}); download the original file again") from None
    header = 4 + 4 * expect_dims
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


def _check_labels(y: torch.Tensor, num_classes: int, source: str) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise MPOCompressError(
            f"{source} has labels outside 0..{num_classes - 1} (found {int(y.min())}..{int(y.max())}); "
            "the file is corrupt or not this dataset"
        )


def _check_count(x: torch.Tensor, y: torch.Tensor, source: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise MPOCompressError(f"{source} holds {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise MPOCompressError(f"{source} holds no examples")


# --------------------------------------------------------------------------- MNIST, Fashion-MNIST


def _idx_set(name: str, split: str, root: Path) -> ImageSet:
    img_stem, lbl_stem = _IDX_FILES[split]
    what = f"{name} {split} split"
    img_path = _find_idx(root, name, img_stem, what)
    lbl_path = _find_idx(root, name, lbl_stem, what)
    x = torch.from_numpy(_read_idx(img_path, 2051, 3).copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    y = torch.from_numpy(_read_idx(lbl_path, 2049, 1).astype(np.int64))
    _check_count(x, y, f"{img_path} and {lbl_path}")
    _check_labels(y, 10, str(lbl_path))
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


def _cifar10(split: str, root: Path) -> ImageSet:
    paths = _find(root, _CIFAR_FOLDER, _CIFAR_FILES[split], f"cifar10 {split} split")
    parts = [_read_cifar_batch(p) for p in paths]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    _check_count(x, y, str(paths[0].parent))
    _check_labels(y, 10, str(paths[0].parent))
    mean, std = _STATS["cifar10"]
    return ImageSet("cifar10", split, x, y, mean, std)


# --------------------------------------------------------------------------- SVHN


def _svhn(split: str, root: Path) -> ImageSet:
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
    _check_count(x, y, str(path))
    _check_labels(y, 10, str(path))
    mean, std = _STATS["svhn"]
    return ImageSet("svhn", split, x, y, mean, std)


# --------------------------------------------------------------------------- tensors file


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
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


def _as_images(x: torch.Tensor, source: str) -> torch.Tensor:
    if x.ndim == 2:
        return x[:, None, None, :]  # (N, F): vectors, served as 1 x 1 x F
    if x.ndim == 3:
        return x[:, None]  # (N, H, W)
    if x.ndim == 4:
        return x
    raise MPOCompressError(f"{source}: x must be (N, F), (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")


def _tensor_file(path: Path, split: str, seed: int) -> ImageSet:
    t = _read_tensor_file(path)
    if "x_train" in t or "x_test" in t:
        if not all(k in t for k in ("x_train", "y_train", "x_test", "y_test")):
            raise MPOCompressError(f"dataset file {path} must hold x_train, y_train, x_test and y_test together")
        pairs = {s: (t[f"x_{s}"], t[f"y_{s}"]) for s in ("train", "test")}
    elif "x" in t and "y" in t:
        pairs = {"all": (t["x"], t["y"])}
    else:
        raise MPOCompressError(f"dataset file {path} holds {', '.join(sorted(t)) or 'nothing'}; it needs tensors x and y")
    for x, y in pairs.values():  # the whole file is checked, whichever split is asked for
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
            raise MPOCompressError(f"{path}: labels y must be a 1-D tensor of class indices, got {y.dtype} {tuple(y.shape)}")
        if not (x.dtype == torch.uint8 or x.dtype.is_floating_point):
            raise MPOCompressError(f"{path}: x must be uint8 or floating point, got {x.dtype}")
        _check_count(_as_images(x, str(path)), y, str(path))
        if not all_finite(x):
            raise MPOCompressError(f"{path}: x holds NaN or Inf values; remove or repair those examples")
        if int(y.min()) < 0:
            raise MPOCompressError(f"{path}: labels must be class indices >= 0, found {int(y.min())}")
    num_classes = max(int(y.max()) for _, y in pairs.values()) + 1
    if "all" in pairs:
        x_all, y_all = _as_images(pairs["all"][0], str(path)), pairs["all"][1]
        train_idx, test_idx = _split(len(y_all), seed)
        x_train = x_all[train_idx]
        idx = train_idx if split == "train" else test_idx
        x, y = x_all[idx], y_all[idx]
    else:
        x_train = _as_images(pairs["train"][0], str(path))
        x, y = _as_images(pairs[split][0], str(path)), pairs[split][1]
    y = y.to(torch.int64)
    ref = x_train.float() / 255.0 if x_train.dtype == torch.uint8 else x_train.float()
    dims = (0, 2, 3)
    mean = tuple(float(v) for v in ref.mean(dims))
    std = tuple(max(float(v), 1e-8) for v in ref.std(dims))
    return ImageSet(path.name, split, x.contiguous(), y.contiguous(), mean, std, num_classes=num_classes)
