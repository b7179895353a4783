"""Safetensors files written one tensor at a time, as one file or as a folder of shards, and read back.

A sharded model is a folder laid out as Hugging Face shards a large checkpoint:
`model-00001-of-0000N.safetensors` ... and `model.safetensors.index.json`. The index's "weight_map"
names each tensor's shard; its "metadata" holds what one mpocompress file's header holds (format,
architecture, layer specs, ties, both digests) beside Hugging Face's "total_size". The shards hold runs
of tensor names in name order, so the tensors digest (every tensor in name order) is the same whether a
model is one file or sharded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import MPOCompressError
from mpocompress.io.hf import check_weight_paths
from mpocompress.io.metadata import DIGEST_KEY, FORMAT, META_DIGEST_KEY, check_finite, digest_update, metadata_digest
from mpocompress.io.paths import staged_output
from mpocompress.utils import bounded_json, short_error

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
MAX_SHARDS = 99_999  # what five digits name
MAX_INDEX_BYTES = 64 << 20
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # fmt: skip
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {name: torch.empty(0, dtype=t).element_size() for name, t in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its safetensors dtype and shape (known before it is read), how to read it,
    and where it comes from (named when it holds NaN or Inf)."""

    dtype: str
    shape: list[int]
    read: Callable[[], torch.Tensor]
    origin: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def held_entries(tensors: Mapping[str, torch.Tensor], origin: str = "the model to save") -> dict[str, Entry]:
    """Entries for tensors in memory."""
    out = {}
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise MPOCompressError(f"{name} is {t.dtype}, which mpocompress cannot write; cast the model to float32 first")
        out[name] = Entry(DTYPES[t.dtype], list(t.shape), lambda t=t: t, origin)
    return out


def _header(names: list[str], entries: Mapping[str, Entry]) -> dict[str, Any]:
    header, offset = {}, 0
    for name in names:
        size = entries[name].nbytes
        header[name] = {"dtype": entries[name].dtype, "shape": entries[name].shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header


def _encoded(header: Mapping[str, Any], metadata: Mapping[str, str]) -> bytes:
    text = json.dumps({"__metadata__": dict(metadata), **header}, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _write_data(out: Any, names: list[str], entries: Mapping[str, Entry], h: Any) -> None:
    """Each tensor's bytes in order, read one at a time, checked finite and hashed as `tensors_digest` hashes."""
    for name in names:
        t = entries[name].read().contiguous()
        check_finite({name: t}, entries[name].origin)
        data = digest_update(h, name, t)
        if t.numel():
            out.write(memoryview(data))  # no copy of the tensor's bytes


def write_file(path: str | os.PathLike, metadata: Mapping[str, str], entries: Mapping[str, Entry]) -> None:
    """One mpocompress safetensors file: `metadata` with both digests added, the tensors in name order.
    The header is written with a placeholder digest of the digest's length, then the data, then the
    header again with the real digest."""
    names = sorted(entries)
    header = _header(names, entries)
    meta = dict(metadata)
    meta[META_DIGEST_KEY] = metadata_digest(meta)
    h = hashlib.sha256()
    first = _encoded(header, {**meta, DIGEST_KEY: "0" * 64})
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(first)) + first)
        _write_data(out, names, entries, h)
        final = _encoded(header, {**meta, DIGEST_KEY: h.hexdigest()})
        if len(final) != len(first):
            raise MPOCompressError("internal: the file's header changed size")
        out.seek(0)
        out.write(struct.pack("<Q", len(final)) + final)


def plan_shards(sizes: list[int], max_bytes: int) -> list[tuple[int, int]]:
    """Runs [start, end) of consecutive tensors, each at most `max_bytes` of data unless one tensor
    alone is larger (it then has a shard of its own), as Hugging Face shards."""
    runs: list[tuple[int, int]] = []
    start, held = 0, 0
    for i, size in enumerate(sizes):
        if i > start and held + size > max_bytes:
            runs.append((start, i))
            start, held = i, 0
        held += size
    if sizes:
        runs.append((start, len(sizes)))
    return runs


def write_shards(path: Path, metadata: Mapping[str, str], entries: Mapping[str, Entry], max_bytes: int) -> None:
    """A sharded mpocompress model at `path` (a folder), staged beside it and renamed into place
    (`staged_output`): it appears complete or not at all."""
    with staged_output(path, is_dir=True) as folder:
        _write_shards_into(folder, metadata, entries, max_bytes)


def _write_shards_into(folder: Path, metadata: Mapping[str, str], entries: Mapping[str, Entry], max_bytes: int) -> None:
    """The shards and the index into the empty `folder`; each file is flushed to disk. The index, with
    the tensors digest over all shards, is written last."""
    names = sorted(entries)
    runs = plan_shards([entries[n].nbytes for n in names], max_bytes)
    if len(runs) > MAX_SHARDS:
        raise MPOCompressError(f"--shard-size {max_bytes:,} bytes would make {len(runs):,} shards, more than {MAX_SHARDS:,}; give a larger one")
    h = hashlib.sha256()
    weight_map = {}
    for i, (lo, hi) in enumerate(runs):
        file = SHARD.format(i + 1, len(runs))
        part = names[lo:hi]
        head = _encoded(_header(part, entries), {"format": "pt"})
        with open(folder / file, "wb") as out:
            out.write(struct.pack("<Q", len(head)) + head)
            _write_data(out, part, entries, h)
            out.flush()
            os.fsync(out.fileno())
        weight_map.update(dict.fromkeys(part, file))
    meta = {**metadata, DIGEST_KEY: h.hexdigest()}
    meta[META_DIGEST_KEY] = metadata_digest(meta)
    index = {"metadata": {"total_size": sum(entries[n].nbytes for n in names), **meta}, "weight_map": weight_map}
    with open(folder / INDEX, "w", encoding="utf-8") as out:
        json.dump(index, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())


# --------------------------------------------------------------------------- reading


class SafetensorsSource:
    """The tensors of a Hugging Face folder's safetensors weights (one file, or the shards its index
    lists), read one at a time when asked for: each file's header is parsed once, and a tensor's bytes
    are read from their offsets into memory of their own (no file is memory-mapped, so a process under
    an address-space cap holds only what it reads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, str] = {}  # tensor name -> file name
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, start, end) in its file
        self.weight_map: dict[str, str] | None = None  # the index's tensor name -> file name, when there is one
        index = _read_index(folder)
        if index is not None:
            mapping = index.get("weight_map")
            if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
                raise MPOCompressError(f"{folder / INDEX}: not a readable index of weights files; the folder is damaged")
            self.weight_map = mapping
            files = sorted(set(mapping.values()))
        elif (folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise MPOCompressError(
                f"{folder} has no safetensors weights ({SINGLE} or {INDEX}); --stream reads safetensors: convert without "
                "--stream, or save the model as safetensors first (mpocompress export MODEL --format hf -o DIR)"
            )
        for name in files:
            if not (folder / name).is_file():
                raise MPOCompressError(f"{folder}: the weights file {name} named by {INDEX} is missing; copy every shard of the model")
        self.add(files)

    @classmethod
    def of_files(cls, folder: Path, files: list[str]) -> SafetensorsSource:
        """The tensors of the named files of a folder (a streamed conversion's staged blocks)."""
        source = cls.__new__(cls)
        source.folder, source.where, source.entries, source.weight_map = folder, {}, {}, None
        source.add(files)
        return source

    def add(self, files: list[str]) -> None:
        for name in files:
            for key, entry in self._header(name).items():
                self.where[key], self.entries[key] = name, entry

    def _header(self, name: str) -> dict[str, tuple[str, list[int], int, int]]:
        """A file's tensors, checked: known dtypes, whole shapes, offsets inside the file that agree with them."""
        path = self.folder / name
        bad = f"{path} is not a readable safetensors file"
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > min(size - 8, 100 << 20):
                    raise ValueError
                header = bounded_json(f.read(n).decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, struct.error):
            raise MPOCompressError(f"{bad} (its header cannot be read); the file is truncated or damaged") from None
        out = {}
        for key, info in header.items() if isinstance(header, dict) else ():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
                if dtype not in ITEMSIZE or min(shape, default=0) < 0 or not 0 <= start <= end <= size - 8 - n:
                    raise ValueError
                if end - start != math.prod(shape) * ITEMSIZE[dtype]:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise MPOCompressError(f"{bad} (tensor {key[:80]!r} is described wrongly); the file is damaged") from None
            out[key] = (dtype, shape, 8 + n + start, 8 + n + end)
        spans = sorted((start, end) for _, _, start, end in out.values())
        if any(a[1] != b[0] for a, b in itertools.pairwise(spans)) or (spans and spans[0][0] != 8 + n):
            raise MPOCompressError(f"{bad} (its tensors' data overlap or leave holes); the file is damaged")
        return out

    def key_for(self, name: str, prefix: str) -> str | None:
        """The file's name for the model's tensor `name` (the same, or with the base model's prefix
        added or dropped, as transformers matches them)."""
        for key in (name, f"{prefix}.{name}" if prefix else name, name.removeprefix(prefix + ".") if prefix else name):
            if key in self.where:
                return key
        return None

    def entries_for_writing(self, keys: Mapping[str, str]) -> dict[str, Entry]:
        """What a writer needs of the tensors `keys` names (output name -> this source's key): dtype,
        shape, and a read of the tensor when it is written."""
        return {name: Entry(self.entries[key][0], self.entries[key][1], lambda key=key: self.get(key), str(self.folder / self.where[key]))
                for name, key in keys.items()}  # fmt: skip

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[key]
        buf = bytearray(end - start)
        try:
            with open(self.folder / self.where[key], "rb") as f:
                f.seek(start)
                if f.readinto(buf) != len(buf):
                    raise OSError("short read")
        except OSError as e:
            raise MPOCompressError(f"{self.folder / self.where[key]}: cannot read {key} ({short_error(e)}); the file may be truncated") from None
        if not buf:
            return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
        return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype]).reshape(shape)


def is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read one at a time into memory of their own (`SafetensorsSource`:
    the header checked first; nothing memory-mapped, so a file truncated while it is read is an error,
    not a SIGBUS, and the file's bytes are never held beside its tensors)."""
    source = SafetensorsSource.of_files(path.parent, [path.name])
    return {key: source.get(key) for key in source.entries}


def _read_index(folder: Path) -> dict[str, Any] | None:
    """The folder's index as written, or None when it has none."""
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError
        index = bounded_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        index = None
    if not isinstance(index, dict):
        raise MPOCompressError(f"{path} is not a readable index of weights files; the folder is damaged")
    return index


def sharded_metadata(folder: Path) -> dict[str, str] | None:
    """The metadata of the sharded mpocompress model in `folder` (the index's string entries), or None
    when the folder is not one."""
    index = _read_index(folder)
    meta = index.get("metadata") if index is not None else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return {k: v for k, v in meta.items() if isinstance(v, str)}


def read_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded model: every shard a regular file inside the folder, its header
    checked, holding exactly the tensors the index gives it."""
    check_weight_paths(folder)
    source = SafetensorsSource(folder)
    given = source.weight_map or {}
    odd = sorted(k for k in source.where.keys() | given.keys() if source.where.get(k) != given.get(k))
    if odd:
        shard = given.get(odd[0]) or source.where[odd[0]]
        raise MPOCompressError(f"{folder / shard} does not hold the tensors {INDEX} gives it ({odd[0][:80]} differs); the folder is damaged")
    return {key: source.get(key) for key in source.entries}
