"""The in-memory split every dataset is served as (`ImageSet`), batches of it, and the checks
and the seeded split its sources share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from mpocompress.errors import MPOCompressError

SPLIT_TEST_FRACTION = 0.2


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
    size: int | None = None  # serve images resized (bilinear, antialiased) to size x size
    channels: int | None = None  # serve this many channels: 1 -> C repeats the gray image, C -> 1 averages

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the served images (after --channels and --image-size)."""
        c, h, w = (int(s) for s in self.x.shape[1:])
        return (self.channels or c, self.size or h, self.size or w)

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
        if self.size is not None and tuple(x.shape[2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.channels is not None and self.channels != c:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1).contiguous()
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


def seeded_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded 80/20 split (test size rounded up, as scikit-learn's train_test_split)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = math.ceil(n * SPLIT_TEST_FRACTION)
    return perm[n_test:], perm[:n_test]


def check_labels(y: torch.Tensor, num_classes: int, source: str) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise MPOCompressError(
            f"{source} has labels outside 0..{num_classes - 1} (found {int(y.min())}..{int(y.max())}); "
            "the file is corrupt or not this dataset"
        )


def check_count(x: torch.Tensor, y: torch.Tensor, source: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise MPOCompressError(f"{source} holds {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise MPOCompressError(f"{source} holds no examples")
