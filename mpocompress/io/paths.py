"""Paths: what may be read, what may be written, and writing a file atomically. Every file
mpocompress writes goes through `atomic_write`."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
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


MAX_NAME = 255 - 40  # a file name's bytes, leaving room for the temporary's ".NAME.PID.XXXXXXXX.tmp"


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
    if folder and path.is_dir() and force:  # --force replaces a model folder, never the user's other files
        from mpocompress.io.hf import foreign_entries

        if path.resolve() == Path.cwd().resolve() or path.resolve() in Path.cwd().resolve().parents:
            raise MPOCompressError(f"output {path} is the current folder (or holds it); give a new folder name with -o")
        other = foreign_entries(path)
        if other:
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            raise MPOCompressError(f"output {path} holds files that are no part of a model ({shown}); --force replaces only a "
                                   "model folder: choose a new -o, or empty that folder yourself")  # fmt: skip
    if not folder and path.is_dir():
        raise MPOCompressError(f"output {path} is a folder; give a file name such as {path / 'model.safetensors'}")
    if not folder and path.exists() and not path.is_file():  # a device, FIFO or socket: never replaced
        raise MPOCompressError(f"output {path} is not a regular file (a device, pipe or socket); choose another -o")
    if len(os.fsencode(path.name)) > MAX_NAME:
        raise MPOCompressError(f"output file name is {len(os.fsencode(path.name))} bytes long; at most {MAX_NAME} fit (with the "
                               "temporary's suffix, within the file system's 255); choose a shorter -o")  # fmt: skip
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MPOCompressError(f"cannot write {path}: folder {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK):
        raise MPOCompressError(f"cannot write {path}: folder {parent} is not writable; choose another -o")
    if path.exists() and not force:
        raise MPOCompressError(f"{path} already exists; pass --force to overwrite it")
    return path


REMOVED_STALE: list[Path] = []  # stale temporaries removed by this process (the CLI says so)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporaries of `path` that a killed run left (ours are named .NAME.PID.XXXX.tmp; one
    whose process is gone is stale). Returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and int(parts[0]) != os.getpid() and not _alive(int(parts[0])):
            try:
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()  # an export stages a folder
                removed.append(tmp)
            except OSError:
                pass
    REMOVED_STALE.extend(removed)
    return removed


def usual_modes(root: Path) -> None:
    """Give `root` (and, for a folder, everything in it) the modes the user's umask gives a new file
    or folder: temporary files (mkstemp, and libraries that write through them) are 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, fsync it, and rename it into place:
    a killed process leaves either the old file or the complete new one. The temporary is removed on
    any exception (the CLI turns SIGTERM into one); one left by a SIGKILL is removed by the next
    write of the same path (`remove_stale_temporaries`)."""
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        usual_modes(Path(tmp))  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_output(out: Path, is_dir: bool) -> Iterator[Path]:
    """A temporary path in a hidden folder beside `out` (a folder of its own when `is_dir`); it replaces
    `out` (by a rename) only when the block succeeds, and the hidden folder is removed in any case. A
    folder `out` being replaced is first renamed into the hidden folder, so a killed process leaves the
    old output or the new one, or (killed between the two renames) the old one in the hidden folder."""
    remove_stale_temporaries(out)  # one a killed run left (its process is gone)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        staged = tmpdir / out.name
        if is_dir:
            staged.mkdir()
        yield staged
        usual_modes(staged)  # what the libraries wrote through temporaries is 0600
        if out.is_dir() and not out.is_symlink():
            os.replace(out, tmpdir / "old")  # removed with the hidden folder
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def checkpoint_path_for(output: str | os.PathLike) -> Path:
    """Where train/finetune keep the resumable state of the run writing `output`."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt")
