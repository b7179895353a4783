"""The files of a streamed conversion (`convert --stream`): the model's skeleton on the meta device, its
weights read lazily, tensor by tensor, from the folder's (sharded) safetensors files; the hidden states
between blocks kept on disk (`--offload disk`); and the output written block by block into a staging
folder beside it, then assembled into one mpocompress file or a folder of shards (the same format and
metadata as `save`), one tensor in memory at a time, and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
from mpocompress.io.paths import atomic_write
from mpocompress.io.tensor_files import SafetensorsSource, held_entries, write_file, write_shards
from mpocompress.models.hf import HF_PREFIX, check_config, hf_class, transformers_module
from mpocompress.utils import short_error


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
            write_shards(self.path, metadata, entries, shard_size)
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
