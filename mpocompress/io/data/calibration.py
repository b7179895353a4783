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
from mpocompress.utils import is_causal_lm

Batch = dict[str, torch.Tensor]

LM_MAX_LENGTH = 512  # tokens per window of a causal LM's packed text (SVD-LLM uses 2048 on a GPU)
TEXT_MAX_LENGTH = 128  # tokens per line of an encoder's text
LM_CALIB_WINDOWS = 64  # calibration windows of a causal LM (--calib-samples; 32,768 tokens); 512 samples for other models
CALIB_SAMPLES = 512
LM_BATCH = 8  # windows per calibration batch of a causal LM


MAX_LENGTH_CAP = 1 << 20  # tokens per sample, whatever the model says


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a transformers model takes (its position table), if its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def text_max_length(model: nn.Module, asked: int | None) -> int:
    """--max-length: as asked (checked against the model's positions), else 512 tokens per window
    for a causal LM and 128 per line for other text models, at most the model's positions."""
    longest = max_positions(model)
    if asked is None:
        default = LM_MAX_LENGTH if is_causal_lm(model) else TEXT_MAX_LENGTH
        return min(default, longest) if longest else default  # never past the model's positions
    if not isinstance(asked, int) or asked < 2:
        raise MPOCompressError(f"--max-length must be a whole number >= 2, got {asked!r}")
    if longest is not None and asked > longest:  # an encoder's position table bounds it as a decoder's does
        raise MPOCompressError(f"--max-length {asked} is longer than the {longest} positions the model takes; give at most {longest}")
    if asked > MAX_LENGTH_CAP:
        raise MPOCompressError(f"--max-length {asked} is over {MAX_LENGTH_CAP:,} tokens; give a window the model can take")
    return asked


def vocabulary_size(model: nn.Module) -> int | None:
    """The number of token ids a transformers model's input embedding holds (factorized or not), if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else None


def check_token_ids(ds: object, spec: str, model: nn.Module, teacher: nn.Module | None = None) -> None:
    """Text whose token ids the model (or the teacher) has no embedding for is named, with the likely
    cause, before any forward pass fails on it."""
    ids = getattr(ds, "inputs", {}).get("input_ids") if hasattr(ds, "inputs") else None
    if ids is None or ids.numel() == 0:
        return
    top = int(ids.max())
    for who, m in (("the model", model), ("the teacher or reference", teacher)):
        n = vocabulary_size(m) if m is not None else None
        if n is not None and top >= n:
            fix = "give models whose tokenizers and embeddings match" if teacher is not None else "give the model's own tokenizer files beside its config.json"
            raise MPOCompressError(
                f"{spec} gives token ids up to {top}, beyond the {n:,} tokens {who}'s embedding holds: the tokenizer "
                f"does not belong to it; {fix}"
            )


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
    spec: str, model: nn.Module, samples: int | None = None, data_dir: str | os.PathLike | None = None,
    max_length: int | None = None, batch_size: int | None = None, served: Mapping[str, Any] | None = None,
    split: str = "train",
) -> list[Batch]:  # fmt: skip
    """Up to `samples` samples of the training split of `spec` (or of `split`), in batches of `batch_size`. Images
    are served as `served` says (`image_size`, `channels`, `normalize`: how the model was trained,
    from its file's data record). A causal LM's text comes as packed windows (default: 64 windows
    of 512 tokens, 8 a batch); other models' default is 512 samples, 32 a batch."""
    causal = is_causal_lm(model)
    samples = (LM_CALIB_WINDOWS if causal else CALIB_SAMPLES) if samples is None else samples
    batch_size = (LM_BATCH if causal else 32) if batch_size is None else batch_size
    if not isinstance(samples, int) or samples < 1:
        raise MPOCompressError(f"--calib-samples must be a whole number >= 1, got {samples!r}")
    if spec.startswith(TEXT_PREFIX):
        read_lines(Path(spec[len(TEXT_PREFIX) :]))  # a missing or empty file is named before the tokenizer
        ds = load_unlabelled(spec, split, model_tokenizer(model), text_max_length(model, max_length), pack=causal, first=samples)
        check_token_ids(ds, spec, model)
    elif is_unlabelled(spec):
        ds = load_unlabelled(spec, split)
    else:
        opts = served or {}
        norm = opts.get("normalize")
        ds = load_dataset(spec, split, data_dir, augment=False, image_size=opts.get("image_size"), channels=opts.get("channels"),
                          normalize=parse_normalize(norm) if norm is not None else None)  # fmt: skip
    n = min(samples, len(ds))
    out = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        b = ds.batch(idx)
        out.append({"x": b[0]} if isinstance(b, tuple) else dict(b))
    return out
