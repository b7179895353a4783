"""The files of a streamed conversion (`convert --stream`): the model's skeleton on the meta device, its
weights read lazily, tensor by tensor, from the folder's (sharded) safetensors files; the hidden states
between blocks kept on disk (`--offload disk`); and the output written block by block into a staging
folder beside it, then assembled into one mpocompress file or a folder of shards (the same format and
metadata as `save`), one tensor in memory at a time, and renamed into place.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mpocompress.compress.calibrate import HiddenStore
from mpocompress.compress.stream import stream_blocks
from mpocompress.errors import MPOCompressError
from mpocompress.io.hf import (
    check_sizes,
    check_weight_paths,
    is_hf_dir,
    made_buffers,
    quiet_transformers,
    read_config,
    read_tokenizer_files,
)
from mpocompress.io.metadata import check_finite
from mpocompress.io.model_files import LoadedModel, own_metadata, remember, tensors_for_saving, tied_parameters
from mpocompress.io.paths import atomic_write, replace_with, usual_modes
from mpocompress.io.tensor_files import INDEX, ITEMSIZE, TORCH_DTYPES, Entry, held_entries, write_file, write_shards
from mpocompress.models.hf import HF_PREFIX, check_config, hf_class, transformers_module
from mpocompress.utils import bounded_json, short_error

SINGLE = "model.safetensors"


class SafetensorsSource:
    """The tensors of a Hugging Face folder's safetensors weights (one file, or the shards its index
    lists), read one at a time when asked for: each file's header is parsed once, and a tensor's bytes
    are read from their offsets into memory of their own (no file is memory-mapped, so a process under
    an address-space cap holds only what it reads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, str] = {}  # tensor name -> file name
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, start, end) in its file
        if (folder / INDEX).is_file():
            try:
                mapping = bounded_json((folder / INDEX).read_text(encoding="utf-8")).get("weight_map")
            except (OSError, ValueError, UnicodeDecodeError, AttributeError):
                mapping = None
            if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
                raise MPOCompressError(f"{folder / INDEX}: not a readable index of weights files; the folder is damaged")
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
        source.folder, source.where, source.entries = folder, {}, {}
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


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the module's (meta) parameter or buffer `name`, shape checked."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
    if old is not None and tuple(old.shape) != tuple(tensor.shape):
        raise MPOCompressError(f"the weights' {name} has shape {tuple(tensor.shape)}, the model's config asks for {tuple(old.shape)}; "
                               "the folder's config.json and weights do not match")  # fmt: skip
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    else:
        owner._buffers[leaf] = tensor


def _fill(module: nn.Module, prefix: str, source: SafetensorsSource, base: str, skip: tuple[str, ...] | str | None = None) -> None:
    """Read every meta tensor of `module` (named under `prefix`) from the files; those under `skip`
    (prefixes) are left on the meta device."""
    names = [n for n, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers()) if t.is_meta]
    for n in names:
        full = f"{prefix}{n}"
        if skip is not None and full.startswith(skip):
            continue
        key = source.key_for(full, base)
        if key is None:
            continue  # a tied name, or left to the check after tying
        _assign(module, n, source.get(key))


def open_streamed(path: Path, arch: str | None) -> tuple[LoadedModel, SafetensorsSource, str]:
    """A Hugging Face folder's model with its stack of blocks left on the meta device and everything
    else read (embeddings, norms, head; buffers are built, as the config makes them), the lazy
    source of its weights, and the blocks' name."""
    if not path.is_dir() or not is_hf_dir(path):
        raise MPOCompressError(
            f"--stream reads a Hugging Face model folder (config.json beside safetensors weights); {path} is not one: "
            "drop --stream, or write it as such a folder first (mpocompress export MODEL --format hf -o DIR)"
        )
    config = check_config(read_config(path), str(path))
    check_weight_paths(path)
    cls = hf_class(config, arch, str(path))
    check_sizes(config, cls, path)
    source = SafetensorsSource(path)
    transformers = transformers_module()
    cfg = transformers.CONFIG_MAPPING[config["model_type"]].from_dict(config)
    try:
        with quiet_transformers(), torch.device("meta"):
            model = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a config it cannot build
        raise MPOCompressError(f"cannot build {cls.__name__} from {path}/config.json ({short_error(e)})") from None
    model.eval()
    model.config._name_or_path = str(path)  # as from_pretrained records it, so the file's config is the in-memory path's
    blocks = stream_blocks(model)
    base = getattr(model, "base_model_prefix", "") or ""
    made_buffers(model, model, skip=blocks + ".")
    head = _untied_head(model)  # never run while streaming: read only when the output is written
    _fill(model, "", source, base, skip=(blocks + ".", *([head + "."] if head else [])))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_meta and not n.startswith(blocks + ".") and not (head and n.startswith(head + "."))]  # fmt: skip
    if head:
        missing = [n for n, _ in model.get_submodule(head).named_parameters(prefix=head) if source.key_for(n, base) is None]
        left += missing
    if left:
        raise MPOCompressError(f"{path}: the weights files hold no {left[0]}; the folder is incomplete (copy every shard)")
    spec = HF_PREFIX + type(model).__name__
    remember(model, spec, read_tokenizer_files(path))
    return LoadedModel(model, spec, "huggingface", path), source, blocks


def _untied_head(model: nn.Module) -> str | None:
    """The name of a causal LM's output head when it has weights of its own (not tied to the embedding)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or getattr(model.config, "tie_word_embeddings", False) or (inputs is not None and head.weight is inputs.weight):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def block_loader(source: SafetensorsSource, model: nn.Module) -> Any:
    """load_block for `stream_compress_`: a block's tensors, read from the files into its meta slots."""
    base = getattr(model, "base_model_prefix", "") or ""

    def load(block: nn.Module, name: str) -> None:
        made_buffers(model, block)
        _fill(block, name + ".", source, base)

    return load


class DiskStore(HiddenStore):
    """The hidden states between blocks in files of a private folder (`--offload disk`): one batch's
    states in memory at a time. The folder goes when the store is closed."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, key: tuple[int, int], hidden: torch.Tensor) -> None:
        self._device[key] = hidden.device
        torch.save(hidden.detach().contiguous().cpu(), self.folder / f"{key[0]}-{key[1]}.pt")

    def get(self, key: tuple[int, int]) -> torch.Tensor:
        return torch.load(self.folder / f"{key[0]}-{key[1]}.pt", weights_only=True, map_location=self._device[key])

    def drop(self, key: tuple[int, int]) -> None:
        self._device.pop(key, None)
        (self.folder / f"{key[0]}-{key[1]}.pt").unlink(missing_ok=True)

    def held_bytes(self) -> int:
        return 0

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class StreamWriter:
    """The output of a streamed conversion: each compressed block's tensors go to a file of a staging
    folder beside `path` as the block is done; `finish` assembles them and the model's other tensors
    into one mpocompress file or a folder of shards (tensors in name order, hashed as they are copied)
    and renames it into place. The staging folder is removed either way; one left by a killed run is removed by the next
    write of the same path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
        self.parts: list[str] = []  # the staged files, one per block

    def write_block(self, name: str, block: nn.Module) -> None:
        tensors = {f"{name}.{k}": v for k, v in tensors_for_saving(block).items()}
        check_finite(tensors, f"block {name}")
        file = f"{len(self.parts):05d}.safetensors"
        save_file(tensors, str(self.staging / file))
        self.parts.append(file)

    def finish(
        self, model: nn.Module, blocks: str, arch: str, extra_metadata: Mapping[str, Any], source: SafetensorsSource | None = None,
        shard_size: int | None = None,
    ) -> Path:  # fmt: skip
        """Write the output: the staged blocks and the model's tensors outside `blocks`, with `save`'s
        metadata, as one file or (with `shard_size`, bytes per file) a folder of shards; those still on
        the meta device (an untied head, never run) are read from `source`."""
        tied = tied_parameters(model)
        base = getattr(model, "base_model_prefix", "") or ""
        outside = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks + ".") and k not in tied}
        entries = held_entries({k: v.detach().contiguous().cpu() for k, v in outside.items() if not v.is_meta})
        staged = SafetensorsSource.of_files(self.staging, self.parts)
        entries.update(staged.entries_for_writing({k: k for k in staged.entries}))
        later = [k for k, v in outside.items() if v.is_meta]
        if later:
            keys = {k: source.key_for(k, base) for k in later} if source is not None else {}
            if source is None or None in keys.values():
                raise MPOCompressError("internal: a tensor outside the blocks was never read")
            entries.update(source.entries_for_writing(keys))  # read from the model's files as written, checked then
        metadata = own_metadata(model, arch, extra_metadata)
        if shard_size is None:
            atomic_write(self.path, lambda tmp: write_file(tmp, metadata, entries))
        else:
            folder = self.staging / "output"
            folder.mkdir()
            write_shards(folder, metadata, entries, shard_size)
            usual_modes(folder)
            replace_with(folder, self.path, self.staging / "old")
        return self.path

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def stream_output(path: Path, writes: bool = True) -> Iterator[StreamWriter]:
    """A StreamWriter whose staging folder is removed however the block ends; with `writes` False (a
    torchrun process other than rank 0) one that writes nothing, its hidden states in a private folder."""
    writer = StreamWriter(path) if writes else _Silent(path)
    try:
        yield writer
    finally:
        writer.close()


class _Silent(StreamWriter):
    """The writer of a process that does not write the output (its staging folder is a private
    temporary one, for --offload disk's hidden states only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.staging = Path(tempfile.mkdtemp(prefix="mpocompress-stream-"))
        self.parts = []

    def write_block(self, name: str, block: nn.Module) -> None:
        pass
