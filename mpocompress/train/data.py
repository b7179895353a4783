"""The user's own data for `fit` and `evaluate`: any map-style dataset of (x, y) pairs, or a
DataLoader over one, seen as the training loop sees mpocompress's datasets (a length, and batches
by index, so that data order, resume and distributed sharding stay mpocompress's own).

A DataLoader contributes its dataset and its collate_fn; batching, shuffling and workers follow the
`TrainConfig` (its batch size, its seeded order), not the loader's settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from mpocompress.errors import MPOCompressError


class PairDataset:
    """A map-style dataset of (x, y) pairs with the interface of mpocompress's datasets: `len`,
    `batch(idx, device, generator)`, `name`, `image_shape` (of one x), `num_classes` (0 when the
    labels are not known without reading every sample) and `augment` (False)."""

    augment = False

    def __init__(self, dataset: Any, collate: Any = None, name: str | None = None) -> None:
        self.dataset = dataset
        self.collate = collate or default_collate
        self.name = name or type(dataset).__name__
        try:
            n = len(dataset)
        except TypeError:
            raise MPOCompressError(f"{self.name} has no length; give a map-style dataset of (x, y) pairs") from None
        if n == 0:
            raise MPOCompressError(f"{self.name} is empty; give at least one (x, y) pair")
        x, y = self._pair(0)
        self.image_shape = tuple(x.shape)
        self.num_classes = 0
        if isinstance(dataset, TensorDataset):
            labels = dataset.tensors[1]
            if labels.is_floating_point() or labels.dim() != 1:
                raise MPOCompressError(f"{self.name}'s labels must be one class index per sample, got {labels.dtype} of shape {tuple(labels.shape)}")
            self.num_classes = int(labels.max()) + 1

    def _pair(self, i: int) -> tuple[torch.Tensor, Any]:
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise MPOCompressError(f"{self.name} must yield (x, y) pairs; item 0 is a {type(item).__name__}")
        x, y = item
        return torch.as_tensor(x), y

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(
        self, idx: torch.Tensor, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.dataset, TensorDataset):
            x, y = (t[idx] for t in self.dataset.tensors[:2])
        else:
            x, y = self.collate([self.dataset[int(i)] for i in idx])
        y = torch.as_tensor(y)
        if y.is_floating_point():
            raise MPOCompressError(f"{self.name}'s labels must be class indices (integers), got {y.dtype}")
        return torch.as_tensor(x).to(device), y.long().to(device)


def as_dataset(data: Any) -> Any:
    """mpocompress's own datasets as they are; a DataLoader's dataset (with its collate_fn) or any
    map-style Dataset of (x, y) pairs wrapped in a `PairDataset`."""
    if hasattr(data, "batch") and hasattr(data, "__len__") and not isinstance(data, (Dataset, DataLoader)):
        return data
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise MPOCompressError("the DataLoader reads an IterableDataset; fit needs a map-style dataset (one with len and indexing)")
        return PairDataset(data.dataset, data.collate_fn)
    if isinstance(data, IterableDataset):
        raise MPOCompressError("an IterableDataset cannot be indexed; give fit a map-style dataset of (x, y) pairs")
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return PairDataset(data)
    raise MPOCompressError(f"cannot train on a {type(data).__name__}: give a DataLoader or a map-style dataset of (x, y) pairs")
