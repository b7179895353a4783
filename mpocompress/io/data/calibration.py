"""Calibration batches: the first samples of the training split of anything `--data` accepts (a
dataset name, a tensors file with or without labels, a folder of images, text:FILE tokenized with
the model's own tokenizer), served as the model's inputs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.io.data import load_dataset, parse_normalize
from mpocompress.io.data.unlabelled import TEXT_PREFIX, is_unlabelled, load_unlabelled, read_lines
from mpocompress.io.hf import decode_tokenizer_files, load_tokenizer

Batch = dict[str, torch.Tensor]


def model_tokenizer(model: nn.Module, teacher: nn.Module | None = None) -> object:
    """The tokenizer recorded with the model (from its Hugging Face folder), else with the teacher,
    or a clear error."""
    files = getattr(model, "mpocompress_tokenizer", None) or getattr(teacher, "mpocompress_tokenizer", None)
    if not files:
        who = "the model records none" if teacher is None else "neither the model nor the teacher records one"
        raise MPOCompressError(
            f"text data needs the model's tokenizer, and {who}; convert from a Hugging Face folder that has its "
            "tokenizer files (tokenizer.json or vocab files) beside config.json"
        )
    return load_tokenizer(decode_tokenizer_files(files, "the model"), "the model")


def calibration_batches(
    spec: str, model: nn.Module, samples: int = 512, data_dir: str | os.PathLike | None = None,
    max_length: int = 128, batch_size: int = 32, served: Mapping[str, Any] | None = None,
) -> list[Batch]:  # fmt: skip
    """Up to `samples` samples of the training split of `spec`, in batches of `batch_size`. Images
    are served as `served` says (`image_size`, `channels`, `normalize`: how the model was trained,
    from its file's data record)."""
    if not isinstance(samples, int) or samples < 1:
        raise MPOCompressError(f"--calib-samples must be a whole number >= 1, got {samples!r}")
    if spec.startswith(TEXT_PREFIX):
        read_lines(Path(spec[len(TEXT_PREFIX) :]))  # a missing or empty file is named before the tokenizer
        ds = load_unlabelled(spec, "train", model_tokenizer(model), max_length)
    elif is_unlabelled(spec):
        ds = load_unlabelled(spec, "train")
    else:
        opts = served or {}
        norm = opts.get("normalize")
        ds = load_dataset(spec, "train", data_dir, augment=False, image_size=opts.get("image_size"), channels=opts.get("channels"),
                          normalize=parse_normalize(norm) if norm is not None else None)  # fmt: skip
    n = min(samples, len(ds))
    out = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        b = ds.batch(idx)
        out.append({"x": b[0]} if isinstance(b, tuple) else dict(b))
    return out
