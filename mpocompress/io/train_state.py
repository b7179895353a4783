"""Resumable training states (`OUT.ckpt`): written atomically with the SHA-256 of their tensors,
read with `weights_only=True`. A sharded run (`finetune --shard`, FSDP2) writes a folder instead:
torch.distributed.checkpoint's files (each process writes its own shards) beside
`mpocompress-state.json` (the run's position and identity), swapped into place whole."""

from __future__ import annotations

import json
import os
import shutil
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
    with weights_only=True: a state file can hold tensors and plain values only, never code. A
    sharded checkpoint (a folder) gives its recorded values and `"sharded": PATH`; its tensors are
    read into the sharded model by `load_sharded_tensors`."""
    path = Path(path)
    if not path.exists():
        raise MPOCompressError(f"no checkpoint to resume from at {path}; run without --resume to start afresh")
    if path.is_dir():
        return _sharded_meta(path)
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


SHARDED_META = "mpocompress-state.json"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARDED_META).is_file()


def save_sharded_train_state(path: str | os.PathLike, meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> Path:
    """Every process of a sharded run calls this together: `tensors` (state dicts of DTensors, plain
    tensors kept once) go through torch.distributed.checkpoint into a fresh folder beside `path`,
    rank 0 adds `meta` (JSON) and swaps the folder into place; a killed run leaves the old
    checkpoint or the new one, never a mix (a stale fresh folder is replaced by the next save)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    fresh, old = path.with_name(f".{path.name}.new"), path.with_name(f".{path.name}.old")
    main = dist.get_rank() == 0
    if main:
        for p in (fresh, old):
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    dcp.save(dict(tensors), checkpoint_id=str(fresh))
    if main:
        atomic_write(fresh / SHARDED_META, lambda tmp: Path(tmp).write_text(json.dumps(dict(meta), sort_keys=True)))
        if path.exists():
            os.replace(path, old)
        os.replace(fresh, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_sharded_tensors(path: str | os.PathLike, template: dict[str, Any]) -> None:
    """Fill `template` (the sharded run's own state dicts) in place from a sharded checkpoint;
    every process calls it together."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(template, checkpoint_id=str(path))
    except Exception as e:
        raise MPOCompressError(f"cannot read the sharded checkpoint {path} ({short_error(e)}); delete it and start afresh without --resume") from None


def remove_train_state(path: str | os.PathLike) -> None:
    """Delete a checkpoint, a file or a sharded folder."""
    path = Path(path)
    if path.is_dir() and is_sharded_checkpoint(path):
        shutil.rmtree(path)
    elif path.is_file() or path.is_symlink():
        path.unlink()


def _sharded_meta(path: Path) -> dict[str, Any]:
    meta_file = path / SHARDED_META
    if not meta_file.is_file():
        raise MPOCompressError(f"{path} is a folder but not a sharded mpocompress checkpoint (it has no {SHARDED_META}); move it away or choose another -o")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise MPOCompressError(f"cannot read checkpoint {meta_file} ({short_error(e)}); delete {path} and start afresh without --resume") from None
    if not isinstance(meta, dict) or meta.get("format") != "mpocompress-train-state":
        raise MPOCompressError(f"{path} is not an mpocompress training checkpoint")
    return {**meta, "sharded": str(path)}
