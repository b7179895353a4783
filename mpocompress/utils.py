"""Small helpers shared across packages: module surgery by dotted path, importing user code from
the working directory, short error texts, and a status line long steps report to."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

_STATUS: ContextVar[Callable[[str], None] | None] = ContextVar("mpocompress_status", default=None)


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    Tensors under glibc's mmap threshold (which rises to 32 MB as large blocks are freed) live in
    the heap, and the heap keeps what they free: over a streamed conversion's blocks, the process
    held about 0.5 GB more than its live tensors. Called between blocks, it keeps the resident
    size near what the next block needs."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


MMAP_THRESHOLD = 4 << 20  # bytes: larger blocks are mapped, and unmapped when freed


def map_large_blocks() -> None:
    """Have glibc map every block of MMAP_THRESHOLD bytes or more on its own and unmap it when
    freed (mallopt(M_MMAP_THRESHOLD), which also stops the threshold's rise to 32 MB), so tensors
    of a few MB (a block's weights, its hidden states) never strand memory in the heap. Process-wide;
    the streamed conversions set it: on TinyLlama's width it lowered the peak resident size from 1.71
    to 1.50 GB (benchmarks/scale.py, docs/performance.md). Nothing where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


@functools.cache
def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl has no malloc_trim)
        return None


def status(message: str) -> None:
    """Say what a long step is doing now ("calibration pass 3/8"), to whoever watches (the CLI's
    progress line, see `watching`); silent when nobody does. The library never prints."""
    fn = _STATUS.get()
    if fn is not None:
        fn(message)


@contextlib.contextmanager
def watching(fn: Callable[[str], None]) -> Iterator[None]:
    """Within the block, `status(message)` calls fn(message)."""
    token = _STATUS.set(fn)
    try:
        yield
    finally:
        _STATUS.reset(token)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` of `model` (e.g. 'features.conv5_1.linear')."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


@contextlib.contextmanager
def cwd_on_path() -> Iterator[None]:
    """Let imports find modules in the working directory (where a user's model code usually
    lives) for the duration of the block; sys.path is restored afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def short_error(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), at most `limit` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers model: it carries a config naming its model_type (a duck
    test, so transformers is never imported for it)."""
    return isinstance(getattr(getattr(model, "config", None), "model_type", None), str)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a transformers decoder language model (LlamaForCausalLM, GPT2LMHeadModel,
    ...): a transformers model with an output embedding (the LM head) that is not an encoder-decoder
    and not a masked LM. A duck test on the class, so transformers is never imported for it."""
    if not is_hf_model(model) or getattr(model.config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) and callable(getattr(model, "get_output_embeddings", None))


def call_with(model: nn.Module, inputs: Mapping[str, torch.Tensor], hidden_states: bool = False) -> Any:
    """A model called on a batch as the datasets serve it: model(x) for {"x": ...}, model(**inputs)
    for token inputs (with every block's output when asked)."""
    if set(inputs) == {"x"}:
        return model(inputs["x"])
    return model(**inputs, output_hidden_states=True) if hidden_states else model(**inputs)


def batch_to(batch: Mapping[str, Any], device: torch.device | str | None) -> dict[str, Any]:
    """A batch with its tensors on `device` (as it was when None)."""
    if device is None:
        return dict(batch)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def main_output(out: Any) -> torch.Tensor:
    """The main output of a model call: the tensor itself, a Hugging Face output's logits (a
    classifier) or last hidden state (an encoder), else the first tensor of a mapping or tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, Mapping):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return main_output(out[0])


MAX_DEPTH = 64  # nesting of the JSON in a file's metadata (ours is at most 4 deep)


def bounded_json(text: str) -> Any:
    """json.loads for metadata, refusing nesting deeper than MAX_DEPTH before parsing (a 100,000-deep
    bracket bomb would otherwise be a RecursionError). Raises ValueError like json.loads."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH}")
        elif ch in "]}":
            depth -= 1
    return json.loads(text)
