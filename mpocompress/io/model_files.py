"""Reading and writing model files.

Inputs: a state_dict (`.pt`, `.pth` or `.safetensors`) with an architecture spec; a whole pickled
nn.Module, only when the caller trusts it; or a file mpocompress wrote. Outputs: safetensors with
metadata describing how to rebuild the model (architecture spec, every MPO layer's geometry,
format version, digest), written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mpocompress._version import __version__
from mpocompress.errors import MPOCompressError
from mpocompress.io.hf import decode_tokenizer_files, is_gguf, is_hf_dir, load_gguf, load_hf_dir, made_buffers
from mpocompress.io.metadata import (
    DIGEST_KEY,
    FORMAT,
    FORMAT_VERSION,
    META_DIGEST_KEY,
    check_finite,
    check_layer_spec,
    metadata_digest,
    parse_own_metadata,
    tensors_digest,
)  # fmt: skip
from mpocompress.io.paths import atomic_write, check_output_path, check_readable
from mpocompress.io.pickles import torch_load, unwrap_state_dict
from mpocompress.io.tensor_files import (
    held_entries,
    is_safetensors,
    read_safetensors,
    read_shards,
    sharded_metadata,
    write_shards,
)
from mpocompress.models import ARCHITECTURES, ArchSpec, build_model, parse_arch
from mpocompress.models.hf import HF_PREFIX, build_hf, hf_arch, hf_config_json
from mpocompress.nn import FactorizedLayer, layer_from_spec
from mpocompress.utils import is_hf_model, set_module, short_error


@dataclass
class LoadedModel:
    """A model read from a file, with what is known of where it came from."""

    model: nn.Module
    arch: str | None  # the architecture spec, if one is known
    source: str  # "state_dict", "pickled_module", "mpocompress", "huggingface" or "gguf"
    path: Path
    metadata: dict[str, Any] | None = None  # parsed metadata of an mpocompress file


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The raw safetensors metadata of a file (of a sharded model folder: its index's), or None when it
    is not a safetensors file."""
    path = Path(path)
    if path.is_dir():
        meta = sharded_metadata(path)
        if meta is not None:
            return meta
    check_readable(path)
    if not is_safetensors(path):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise MPOCompressError(f"{path} is not a readable safetensors file ({short_error(e)})") from None


# --------------------------------------------------------------------------- loading


def load_model(
    path: str | os.PathLike, arch: str | ArchSpec | None = None, trust_pickle: bool = False, check_values: bool = True
) -> LoadedModel:
    """Read a model from any supported file.

    Args:
        path: the checkpoint.
        arch: architecture spec; needed for state_dicts and for mpocompress files made from a user
            architecture, which is imported only because the caller names it here.
        trust_pickle: allow unpickling arbitrary objects (a whole nn.Module). Never set this for a
            file you did not make: unpickling can run any code.
        check_values: refuse NaN or Inf in any tensor now. This reads every weight, so a
            memory-mapped checkpoint becomes resident at once; `convert` passes False and relies on
            the checks of the layers it factorizes and of `save`, which reads every tensor anyway.
    """
    path = Path(path)
    arch_text = str(arch) if arch is not None else None
    if path.is_dir():
        meta = sharded_metadata(path) if not is_hf_dir(path) else None
        if meta is not None:
            return _load_own(path, meta, arch_text, check_values)
        if not is_hf_dir(path):
            raise MPOCompressError(
                f"{path} is a folder without config.json; give a model file, a Hugging Face model folder "
                "(config.json beside model.safetensors or pytorch_model.bin), or a sharded model mpocompress wrote"
            )
        model, spec, tokenizer = load_hf_dir(path, arch_text)
        if check_values:
            check_finite(model.state_dict(), path)
        remember(model, spec, tokenizer)
        return LoadedModel(model, spec, "huggingface", path)
    check_readable(path)
    if is_gguf(path):
        model, spec, tokenizer = load_gguf(path, arch_text)
        if check_values:
            check_finite(model.state_dict(), path)
        remember(model, spec, tokenizer)
        return LoadedModel(model, spec, "gguf", path)
    if is_safetensors(path):
        meta = read_metadata(path)
        if meta is not None and meta.get("format") == FORMAT:
            return _load_own(path, meta, arch_text, check_values)
        state = read_safetensors(path)
        if check_values:
            check_finite(state, path)
        return LoadedModel(_model_from_state(state, path, arch_text), arch_text, "state_dict", path)

    obj = torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        if check_values:
            check_finite(obj.state_dict(), path)
        return LoadedModel(obj, arch_text, "pickled_module", path)
    state = unwrap_state_dict(obj, path)
    if check_values:
        check_finite(state, path)
    return LoadedModel(_model_from_state(state, path, arch_text), arch_text, "state_dict", path)


def arch_for_second(path: str | os.PathLike, asked: str | None, model_arch: str | None) -> str | None:
    """The architecture to read a second model (a reference, a teacher) with: the one asked for; else
    none for a model that says what it is (a Hugging Face folder, a GGUF file, a file mpocompress
    wrote), and the first model's for a bare state_dict."""
    if asked is not None:
        return asked
    p = Path(path)
    if (p.is_dir() and sharded_metadata(p) is None) or (not p.is_dir() and is_gguf(p)):
        return None
    try:
        own = (read_metadata(p) or {}).get("format") == FORMAT
    except MPOCompressError:
        own = False
    return None if own else model_arch


def load(path: str | os.PathLike, arch: str | ArchSpec | None = None, trust_pickle: bool = False) -> nn.Module:
    """A working nn.Module in eval mode from a file or a Hugging Face folder; see `load_model`. For a
    file mpocompress wrote from a built-in architecture or a Hugging Face model, the file alone suffices."""
    return load_model(path, arch, trust_pickle).model.eval()


def remember(model: nn.Module, arch: str | None, tokenizer: Mapping[str, str] | None = None) -> None:
    """Record on the model what `save` will write without being told: its architecture spec and
    (for a text model) its tokenizer files."""
    if arch is not None:
        model.mpocompress_arch = arch
    if tokenizer:
        model.mpocompress_tokenizer = dict(tokenizer)


def infer_arch(model: nn.Module) -> str:
    """The architecture spec of a model: the one it was built or loaded with, or hf:CLASS for a
    transformers model; a one-line error when neither is known."""
    arch = getattr(model, "mpocompress_arch", None)
    if isinstance(arch, str) and arch:
        return arch
    if is_hf_model(model):
        return hf_arch(model)
    raise MPOCompressError(
        f"cannot tell which architecture this {type(model).__name__} is; pass arch= (a built-in spec such as "
        "'lenet5(in_channels=3)', or 'package.module:callable' for your own)"
    )


def _fit_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str, assign: bool = False
) -> None:
    """load_state_dict(strict=True) with a one-line message saying what does not fit."""
    expected = model.state_dict()
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel / DDP
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} is {tuple(state[k].shape)} in the file but {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if wrong:
        problems.append(wrong[0] + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problems:
        raise MPOCompressError(
            f"the weights in {path} do not fit architecture {arch}: {'; '.join(problems)}; "
            "check --arch and its arguments, e.g. lenet5(in_channels=3,image_size=32)"
        )
    model.load_state_dict(state, strict=True, assign=assign)


def _model_from_state(state: Mapping[str, torch.Tensor], path: Path, arch: str | None) -> nn.Module:
    if arch is None:
        raise MPOCompressError(
            f"{path} holds a state_dict (weights only); say which architecture it belongs to with "
            f"--arch NAME (built-in: {', '.join(sorted(ARCHITECTURES))}) or --arch package.module:callable"
        )
    if arch.startswith(HF_PREFIX):
        raise MPOCompressError(
            f"--arch {arch} builds a Hugging Face model from its folder (config.json with the weights); give that "
            f"folder instead of {path}"
        )
    model = _skeleton(arch)
    if model is not None and all(
        state.get(k) is not None and state[k].dtype == v.dtype for k, v in model.state_dict().items()
    ):  # fmt: skip
        _fit_state_dict(model, state, path, arch, assign=True)  # the file's tensors become the weights
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return model
    model = build_model(arch)
    _fit_state_dict(model, state, path, arch)
    return model


def _build(arch: str, hf_config: str | None = None, on_meta: bool = False) -> nn.Module:
    """The architecture `arch`, randomly initialised (or on the meta device); an hf:CLASS spec is
    built from the recorded Hugging Face config."""
    if arch.startswith(HF_PREFIX):
        if hf_config is None:
            raise MPOCompressError(f"architecture {arch} needs the Hugging Face config the file should record; the file is damaged")
        return build_hf(hf_config, arch, on_meta=on_meta)
    if on_meta:
        with torch.device("meta"):
            return build_model(arch)
    return build_model(arch)


def _skeleton(arch: str, hf_config: str | None = None) -> nn.Module | None:
    """The architecture built on the meta device (no memory, no random init), or None when its
    code cannot be built there; the loaded tensors are then assigned in place of the parameters,
    so a checkpoint is held in memory once."""
    try:
        return _build(arch, hf_config, on_meta=True)
    except MPOCompressError:
        raise
    except Exception:
        return None


def _load_own(path: Path, meta: Mapping[str, str], arch: str | None, check_values: bool) -> LoadedModel:
    info = parse_own_metadata(path, meta)
    if info["format_version"] >= 3 and meta.get(META_DIGEST_KEY) != metadata_digest(meta):
        raise MPOCompressError(
            f"{path} is corrupt: its metadata (architecture, layer shapes or geometry, config) does not match the "
            f"{META_DIGEST_KEY} it records (edited or damaged); get a fresh copy or write it again"
        )
    file_arch = info["arch"]
    if arch is None:
        if file_arch is None:
            raise MPOCompressError(
                f"{path} does not record its architecture (it was converted from a pickled model); pass --arch"
            )
        if not file_arch.startswith(HF_PREFIX) and not parse_arch(file_arch).is_builtin:
            raise MPOCompressError(
                f"{path} was made from the user architecture {file_arch}; pass --arch {file_arch!r} again to "
                "load it (mpocompress never imports code named in a file)"
            )
        arch = file_arch
    for name, spec in info["layers"].items():
        check_layer_spec(path, name, spec)  # before anything is built from it
    state = read_shards(path) if path.is_dir() else read_safetensors(path)
    if info["format_version"] >= 2:
        recorded = meta.get(DIGEST_KEY)
        if recorded is None:
            raise MPOCompressError(f"{path} is corrupt: its metadata lacks the {DIGEST_KEY} every file of format 2 records")
        if tensors_digest(state) != recorded:
            raise MPOCompressError(
                f"{path} is corrupt: its tensors do not match the SHA-256 recorded in its metadata "
                "(damaged on disk or in transit, or edited); get a fresh copy or write it again"
            )
    if check_values:
        check_finite(state, path)
    tied = _tied_record(meta, path)
    state = _untie_state(state, tied, path)

    hf_config = info["hf_config"] if arch.startswith(HF_PREFIX) else None
    tokenizer = info["hf_tokenizer"]
    if tokenizer:
        decode_tokenizer_files(tokenizer, str(path))  # checked before anything uses it
    skeleton = _skeleton(arch, hf_config)
    if skeleton is not None and hf_config is not None:
        try:  # what a transformers model makes rather than stores (rotary frequencies), made as from_pretrained does
            made_buffers(skeleton, skeleton)
        except MPOCompressError:
            pass  # left on the meta device: the model is then built whole, below
    if skeleton is not None:  # shapes checked on the meta device, then the file's tensors become the weights
        model = _assemble(skeleton, info["layers"], path, arch, on_meta=True, tied=tied)
        _fit_state_dict(model, state, path, arch, assign=True)
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            _retie(model, tied)
            remember(model, arch, tokenizer)
            return LoadedModel(model, arch, "mpocompress", path, info)
    model = _assemble(_build(arch, hf_config), info["layers"], path, arch, on_meta=False, tied=tied)
    _fit_state_dict(model, state, path, arch)
    _retie(model, tied)
    remember(model, arch, tokenizer)
    return LoadedModel(model, arch, "mpocompress", path, info)


def _tied_record(meta: Mapping[str, str], path: Path) -> dict[str, str]:
    text = meta.get("tied")
    if text is None:
        return {}
    try:
        tied = json.loads(text)
    except ValueError:
        tied = None
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise MPOCompressError(f"{path}: its record of tied parameters is not a mapping of names; the file is damaged")
    return tied


def _assemble(
    model: nn.Module, layers: Mapping[str, Any], path: Path, arch: str, on_meta: bool, tied: Mapping[str, str] | None = None
) -> nn.Module:  # fmt: skip
    """Put an MPO layer skeleton, built from its validated metadata, at every name `layers` lists
    (once per module: a layer reachable under two names stays one module, whether the skeleton
    shares a module there or the file records the layer's parameters as tied, a table serving a tied
    embedding and LM head)."""
    made: dict[int, nn.Module] = {}
    by_name: dict[str, nn.Module] = {}
    alias = {k.rpartition(".")[0]: v.rpartition(".")[0] for k, v in (tied or {}).items()}
    for name, spec in sorted(layers.items(), key=lambda kv: kv[0] in alias):  # the names shared first
        shared = by_name.get(alias.get(name, ""))
        if shared is not None and layers.get(alias[name]) == spec:
            set_module(model, name, shared)
            by_name[name] = shared
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise MPOCompressError(
                f"{path} has an MPO layer {name!r} that architecture {arch} lacks; pass the --arch it was made from"
            ) from None
        if id(old) not in made:
            try:
                with torch.device("meta" if on_meta else "cpu"):
                    made[id(old)] = layer_from_spec(spec)
            except (KeyError, TypeError, ValueError) as e:
                raise MPOCompressError(f"{path}: metadata of MPO layer {name!r} is invalid ({short_error(e)})") from None
        set_module(model, name, made[id(old)])
        by_name[name] = made[id(old)]
    return model


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Parameters reachable under a second name (a tied input embedding and LM head; a module shared
    by two parents): {second name: first name}. A file stores each once and records the rest."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _untie_state(state: Mapping[str, torch.Tensor], tied: Mapping[str, str], path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors with every tied name filled from the one it shares (checked: a tied name is
    not stored, the name it shares is)."""
    out = dict(state)
    for name, source in tied.items():
        if name in state or source not in state:
            raise MPOCompressError(f"{path}: its record of tied parameters ({name} -> {source}) does not fit its tensors; the file is damaged")
        out[name] = state[source]
    return out


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Make each tied name hold the very Parameter of the name it shares (load_state_dict with assign
    gives each name a Parameter of its own)."""
    for name, source in tied.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))


def tensors_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as safetensors takes them: each tie stored once, shared or strided ones cloned, on the CPU."""
    seen: set[tuple[int, int]] = set()
    out = {}
    tied = tied_parameters(model)
    for k, v in model.state_dict().items():
        if k in tied:
            continue  # stored once, under the name it shares; the file records the tie
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen or not v.is_contiguous():
            v = v.clone().contiguous()  # safetensors refuses shared or strided tensors
        seen.add(key)
        out[k] = v.cpu()
    return out


def mpo_layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Geometry of every factorized layer (MPO or low-rank), by every full name it is reachable under."""
    return {name: m.spec() for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, FactorizedLayer)}


_INFER = "infer"


def save(
    model: nn.Module,
    path: str | os.PathLike,
    arch: str | ArchSpec | None = _INFER,
    force: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
    shard_size: int | None = None,
) -> Path:
    """Write `model` as safetensors with the metadata `load` needs, atomically.

    `arch` defaults to what the model is known to be (`infer_arch`: the spec it was built or
    loaded with, or hf:CLASS for a transformers model, whose config and tokenizer are recorded
    too); None records no architecture (then loading needs --arch). With `shard_size` (bytes of
    tensor data per file) `path` is a folder of shards with an index (see `tensor_files`). The file
    or folder appears complete or not at all: it is written under a temporary name in the same folder
    and renamed into place. An existing output is replaced only with `force=True`.
    """
    path = check_output_path(path, force, folder=shard_size is not None)
    metadata = own_metadata(model, arch, extra_metadata)
    tensors = tensors_for_saving(model)
    if shard_size is not None:
        write_shards(path, metadata, held_entries(tensors), shard_size)
        return path
    check_finite(tensors, "the model to save")  # reads every tensor, as the digest does
    metadata[DIGEST_KEY] = tensors_digest(tensors)
    metadata[META_DIGEST_KEY] = metadata_digest(metadata)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def own_metadata(model: nn.Module, arch: str | ArchSpec | None = _INFER, extra_metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What `save` records beside the tensors, but for the two digests: format, versions,
    architecture, every factorized layer's spec, the Hugging Face config and tokenizer, the ties."""
    if isinstance(arch, str) and arch == _INFER:
        arch = infer_arch(model)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "mpocompress_version": __version__,
        "torch_version": torch.__version__,
        "arch": str(arch) if arch is not None else "",
        "layers": json.dumps(mpo_layer_specs(model), sort_keys=True),
    }
    if arch is not None and str(arch).startswith(HF_PREFIX):
        metadata["hf_config"] = hf_config_json(model)
        tokenizer = getattr(model, "mpocompress_tokenizer", None)
        if tokenizer:
            metadata["hf_tokenizer"] = json.dumps(tokenizer, sort_keys=True)
    tied = tied_parameters(model)
    if tied:
        metadata["tied"] = json.dumps(tied, sort_keys=True)
    for k, v in (extra_metadata or {}).items():
        metadata[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return metadata
