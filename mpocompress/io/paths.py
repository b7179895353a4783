"""Paths: what may be read, what may be written, and writing a file atomically. Every file
mpocompress writes goes through `atomic_write`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from mpocompress.errors import MPOCompressError


def check_readable(path: Path) -> None:
    if not path.exists():
        raise MPOCompressError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise MPOCompressError(f"{path} is a folder; give the model file inside it")
    if path.stat().st_size == 0:
        raise MPOCompressError(f"{path} is empty (0 bytes); the file was not written completely, save it again")


def check_output_path(
    path: str | os.PathLike, force: bool = False, inputs: tuple[Path, ...] = (), folder: bool = False
) -> Path:
    """Fail early, before any work, when `path` cannot or must not be written (`folder`: the
    output is a folder, such as a Hugging Face model folder)."""
    path = Path(path)
    for src in inputs:
        if src.exists() and path.exists() and path.resolve() == src.resolve():
            raise MPOCompressError(f"output {path} is the input file; choose another -o (inputs are never modified)")
        if folder and src.exists() and path.resolve() in src.resolve().parents:
            raise MPOCompressError(f"output {path} holds the input {src}; choose another -o (inputs are never modified)")
    if folder and path.exists() and not path.is_dir():
        raise MPOCompressError(f"output {path} is a file, but this format writes a folder; choose another -o")
    if not folder and path.is_dir():
        raise MPOCompressError(f"output {path} is a folder; give a file name such as {path / 'model.safetensors'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MPOCompressError(f"cannot write {path}: folder {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK):
        raise MPOCompressError(f"cannot write {path}: folder {parent} is not writable; choose another -o")
    if path.exists() and not force:
        raise MPOCompressError(f"{path} already exists; pass --force to overwrite it")
    return path


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, fsync it, and rename it into place:
    a killed process leaves either the old file or the complete new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_path_for(output: str | os.PathLike) -> Path:
    """Where train/finetune keep the resumable state of the run writing `output`."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt")
