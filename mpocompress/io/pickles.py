"""PyTorch checkpoints (.pt/.pth): zip integrity, `weights_only` loading, and pickled objects only
on trust. Reads files, never writes any."""

from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import MPOCompressError
from mpocompress.utils import cwd_on_path, short_error

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch's zip format, or a raw pickle
        raise MPOCompressError(
            f"cannot read {path}: it is neither a PyTorch checkpoint (.pt/.pth) nor a safetensors file"
        )
    if magic == b"PK\x03\x04":
        check_zip(path)
    # large zip checkpoints are memory-mapped (private, never written back); files up to 1 GiB are read
    # whole, so a file truncated while it is read is an error, not a SIGBUS
    mmap = magic == b"PK\x03\x04" and path.stat().st_size > (1 << 30)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and not (magic[:1] == b"\x80" and _names_code(path)):  # damaged, not code that needs trust
            reason = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), short_error(e))
            raise MPOCompressError(f"cannot read {path} as a PyTorch checkpoint; it may be damaged ({reason})") from None
        if not trust_pickle:
            raise MPOCompressError(
                f"{path} holds pickled Python objects (a whole model?) and needs trust: unpickling can run "
                "arbitrary code; if you trust the file pass --trust-pickle, or save model.state_dict() and pass --arch"
            ) from None
    except Exception as e:
        raise MPOCompressError(f"cannot read {path} as a PyTorch checkpoint ({short_error(e)})") from None
    try:
        with cwd_on_path():  # the pickled classes usually live beside the user's script
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MPOCompressError(
            f"cannot unpickle {path} ({short_error(e)}); the classes it names must be importable from here"
        ) from None


_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _names_code(path: Path) -> bool:
    """Whether a plain pickle names classes or callables (it would run code when loaded), read by its
    opcodes without executing anything; False when it is not even a readable pickle."""
    try:
        with open(path, "rb") as f:
            return any(op.name in _CODE_OPS for op, _, _ in pickletools.genops(f))
    except Exception:
        return False


def check_zip(path: Path) -> None:
    """Check every member of a PyTorch zip checkpoint against the CRC-32 its zip directory records
    (torch.load itself does not): a truncated or bit-flipped file is named as damaged, not loaded."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise MPOCompressError(
            f"{path} is damaged: not a complete PyTorch zip checkpoint ({short_error(e)}); it may be truncated, get a fresh copy"
        ) from None
    if bad is not None:
        raise MPOCompressError(
            f"{path} is corrupt: its entry {bad} fails the CRC-32 check of the zip format; get a fresh copy of the file"
        )


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    def is_state(d: Any) -> bool:
        return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if is_state(obj.get(key)):
                return dict(obj[key])
    raise MPOCompressError(
        f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; save model.state_dict() "
        f"(or a dict with one under one of the keys {', '.join(WRAPPER_KEYS)})"
    )
