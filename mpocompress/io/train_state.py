"""Resumable training states (`OUT.ckpt`): written atomically with the SHA-256 of their tensors,
read with `weights_only=True`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import MPOCompressError
from mpocompress.io.metadata import DIGEST_KEY, tensors_digest
from mpocompress.io.paths import atomic_write, check_readable
from mpocompress.io.pickles import check_zip
from mpocompress.utils import short_error


def nested_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts / lists, by its path ("model/fc1.weight", "optimizer/state/0/...")."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(nested_tensors(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def save_train_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a resumable training state (tensors, numbers, strings, lists, dicts) atomically, with
    the SHA-256 of its tensors."""
    path = Path(path)
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    state[DIGEST_KEY] = tensors_digest(nested_tensors(state))
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by `save_train_state`, checked against its CRC-32s and SHA-256. Loaded
    with weights_only=True: a state file can hold tensors and plain values only, never code."""
    path = Path(path)
    if not path.exists():
        raise MPOCompressError(f"no checkpoint to resume from at {path}; run without --resume to start afresh")
    check_readable(path)
    fresh = "; delete it and start afresh without --resume"
    try:
        check_zip(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MPOCompressError as e:
        raise MPOCompressError(f"checkpoint {e}{fresh}") from None
    except Exception as e:
        raise MPOCompressError(f"cannot read checkpoint {path}; it is damaged ({short_error(e)}){fresh}") from None
    if not isinstance(state, dict) or state.get("format") != "mpocompress-train-state":
        raise MPOCompressError(f"{path} is not an mpocompress training checkpoint")
    recorded = state.pop(DIGEST_KEY, None)
    if recorded is None and int(state.get("version", 1)) >= 2:
        raise MPOCompressError(f"checkpoint {path} is corrupt: it lacks its {DIGEST_KEY}{fresh}")
    if recorded is not None and tensors_digest(nested_tensors(state)) != recorded:
        raise MPOCompressError(f"checkpoint {path} is corrupt: its tensors do not match their recorded SHA-256{fresh}")
    return state
