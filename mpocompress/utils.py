"""Small helpers shared across packages: module surgery by dotted path, importing user code from
the working directory, and short error texts."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from torch import nn


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
