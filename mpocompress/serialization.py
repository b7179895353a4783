"""Reading and writing model files: the only module of mpocompress that touches the filesystem.

Inputs: a state_dict (`.pt`, `.pth` or `.safetensors`) with an architecture spec; a whole pickled
nn.Module, only when the caller trusts it; or a file mpocompress wrote. Outputs: safetensors with
metadata describing how to rebuild the model (architecture spec, every MPO layer's geometry,
format version), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mpocompress import __version__
from mpocompress.errors import MPOCompressError
from mpocompress.layers import MPO_LAYERS, layer_from_spec
from mpocompress.mpo import all_finite, bond_caps
from mpocompress.surgery import set_module
from mpocompress.zoo import ARCHITECTURES, ArchSpec, build_model, parse_arch

FORMAT = "mpocompress"
FORMAT_VERSION = 2  # 2: the metadata records tensors_sha256 (version 1 files are still read)
DIGEST_KEY = "tensors_sha256"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class LoadedModel:
    """A model read from a file, with what is known of where it came from."""

    model: nn.Module
    arch: str | None  # the architecture spec, if one is known
    source: str  # "state_dict", "pickled_module" or "mpocompress"
    path: Path
    metadata: dict[str, Any] | None = None  # parsed metadata of an mpocompress file


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MPOCompressError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise MPOCompressError(f"{path} is a folder; give the model file inside it")
    if path.stat().st_size == 0:
        raise MPOCompressError(f"{path} is empty (0 bytes); the file was not written completely, save it again")


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The raw safetensors metadata of a file, or None when it is not a safetensors file."""
    path = Path(path)
    _check_readable(path)
    if not _is_safetensors(path):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise MPOCompressError(f"{path} is not a readable safetensors file ({_short(e)})") from None


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
    _check_readable(path)
    arch_text = str(arch) if arch is not None else None
    if _is_safetensors(path):
        meta = read_metadata(path)
        if meta is not None and meta.get("format") == FORMAT:
            return _load_own(path, meta, arch_text, check_values)
        try:
            state = load_file(str(path))
        except Exception as e:
            raise MPOCompressError(f"{path} is not a readable safetensors file ({_short(e)})") from None
        if check_values:
            _check_finite(state, path)
        return LoadedModel(_model_from_state(state, path, arch_text), arch_text, "state_dict", path)

    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        if check_values:
            _check_finite(obj.state_dict(), path)
        return LoadedModel(obj, arch_text, "pickled_module", path)
    state = _unwrap_state_dict(obj, path)
    if check_values:
        _check_finite(state, path)
    return LoadedModel(_model_from_state(state, path, arch_text), arch_text, "state_dict", path)


def load(path: str | os.PathLike, arch: str | ArchSpec | None = None, trust_pickle: bool = False) -> nn.Module:
    """A working nn.Module in eval mode from a file; see `load_model`. For a file mpocompress wrote
    from a built-in architecture, the file alone suffices."""
    return load_model(path, arch, trust_pickle).model.eval()


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch's zip format, or a raw pickle
        raise MPOCompressError(
            f"cannot read {path}: it is neither a PyTorch checkpoint (.pt/.pth) nor a safetensors file"
        )
    if magic == b"PK\x03\x04":
        _check_zip(path)
    try:  # memory-mapped (private, never written back): weights are paged in as they are read
        return torch.load(path, map_location="cpu", weights_only=True, mmap=magic == b"PK\x03\x04")
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # damaged data, not a pickled class or callable that needs trust
            reason = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), _short(e))
            raise MPOCompressError(f"cannot read {path} as a PyTorch checkpoint; it may be damaged ({reason})") from None
        if not trust_pickle:
            raise MPOCompressError(
                f"{path} holds pickled Python objects (a whole model?) and needs trust: unpickling can run "
                "arbitrary code; if you trust the file pass --trust-pickle, or save model.state_dict() and pass --arch"
            ) from None
    except Exception as e:
        raise MPOCompressError(f"cannot read {path} as a PyTorch checkpoint ({_short(e)})") from None
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)  # the pickled classes usually live beside the user's script
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MPOCompressError(
            f"cannot unpickle {path} ({_short(e)}); the classes it names must be importable from here"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)


def _check_zip(path: Path) -> None:
    """Check every member of a PyTorch zip checkpoint against the CRC-32 its zip directory records
    (torch.load itself does not): a truncated or bit-flipped file is named as damaged, not loaded."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise MPOCompressError(
            f"{path} is damaged: not a complete PyTorch zip checkpoint ({_short(e)}); it may be truncated, get a fresh copy"
        ) from None
    if bad is not None:
        raise MPOCompressError(
            f"{path} is corrupt: its entry {bad} fails the CRC-32 check of the zip format; get a fresh copy of the file"
        )


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    def is_state(d: Any) -> bool:
        return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if is_state(obj.get(key)):
                return dict(obj[key])
    raise MPOCompressError(
        f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; save model.state_dict() "
        f"(or a dict with one under one of the keys {', '.join(_WRAPPER_KEYS)})"
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


def _skeleton(arch: str) -> nn.Module | None:
    """The architecture built on the meta device (no memory, no random init), or None when its
    code cannot be built there; the loaded tensors are then assigned in place of the parameters,
    so a checkpoint is held in memory once."""
    try:
        with torch.device("meta"):
            return build_model(arch)
    except MPOCompressError:
        raise
    except Exception:
        return None


def _parse_own_metadata(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise MPOCompressError(f"{path} has no valid format_version in its metadata; the file is damaged") from None
    if version > FORMAT_VERSION:
        raise MPOCompressError(
            f"{path} uses mpocompress file format {version}, newer than this version reads ({FORMAT_VERSION}); "
            "upgrade mpocompress"
        )
    try:
        layers = json.loads(meta.get("layers", "{}"))
        assert isinstance(layers, dict) and all(isinstance(v, dict) for v in layers.values())
    except (ValueError, AssertionError):
        raise MPOCompressError(f"{path} has unreadable layer metadata; the file is damaged") from None
    return {"format_version": version, "arch": meta.get("arch") or None, "layers": layers,
            "mpocompress_version": meta.get("mpocompress_version"), "source_format": meta.get("source_format")}  # fmt: skip


def _load_own(path: Path, meta: Mapping[str, str], arch: str | None, check_values: bool) -> LoadedModel:
    info = _parse_own_metadata(path, meta)
    file_arch = info["arch"]
    if arch is None:
        if file_arch is None:
            raise MPOCompressError(
                f"{path} does not record its architecture (it was converted from a pickled model); pass --arch"
            )
        if not parse_arch(file_arch).is_builtin:
            raise MPOCompressError(
                f"{path} was made from the user architecture {file_arch}; pass --arch {file_arch!r} again to "
                "load it (mpocompress never imports code named in a file)"
            )
        arch = file_arch
    for name, spec in info["layers"].items():
        _check_layer_spec(path, name, spec)  # before anything is built from it
    try:
        state = load_file(str(path))
    except Exception as e:
        raise MPOCompressError(f"{path} is not a readable safetensors file ({_short(e)})") from None
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
        _check_finite(state, path)

    def assemble(model: nn.Module, on_meta: bool) -> nn.Module:
        made: dict[int, nn.Module] = {}
        for name, spec in info["layers"].items():
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
                    raise MPOCompressError(f"{path}: metadata of MPO layer {name!r} is invalid ({_short(e)})") from None
            set_module(model, name, made[id(old)])
        return model

    skeleton = _skeleton(arch)
    if skeleton is not None:  # shapes checked on the meta device, then the file's tensors become the weights
        model = assemble(skeleton, on_meta=True)
        _fit_state_dict(model, state, path, arch, assign=True)
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return LoadedModel(model, arch, "mpocompress", path, info)
    model = assemble(build_model(arch), on_meta=False)
    _fit_state_dict(model, state, path, arch)
    return LoadedModel(model, arch, "mpocompress", path, info)


def _check_layer_spec(path: Path, name: str, spec: Mapping[str, Any]) -> None:
    """Validate one MPO layer's metadata before anything is built from it: known kind, whole-number
    sizes, modes that multiply to the layer's dimensions, n-1 bond dims each within [1, its cap]."""

    def bad(why: str) -> MPOCompressError:
        return MPOCompressError(f"{path}: metadata of MPO layer {name!r} is invalid: {why}; the file is damaged or was edited")

    def whole(key: str) -> int:
        v = spec.get(key)
        if type(v) is not int or v < 1:
            raise bad(f"{key} must be a whole number >= 1, got {v!r}")
        return v

    def whole_list(key: str) -> list[int]:
        v = spec.get(key)
        if not isinstance(v, list) or not all(type(x) is int and x >= 1 for x in v):
            raise bad(f"{key} must be a list of whole numbers >= 1, got {v!r}")
        return v

    kind = spec.get("kind")
    if kind == "linear":
        nx, ny = whole("in_features"), whole("out_features")
    elif kind == "conv2d":
        kernel = whole_list("kernel_size")
        if len(kernel) != 2:
            raise bad(f"kernel_size must hold 2 numbers, got {kernel}")
        nx, ny = whole("in_channels") * kernel[0] * kernel[1], whole("out_channels")
    else:
        raise bad(f"unknown layer kind {kind!r} (known: linear, conv2d)")
    in_modes, out_modes, bonds = whole_list("in_modes"), whole_list("out_modes"), spec.get("bond_dims")
    if not in_modes or len(in_modes) != len(out_modes):
        raise bad(f"{len(in_modes)} input modes but {len(out_modes)} output modes")
    if math.prod(in_modes) != nx or math.prod(out_modes) != ny:
        raise bad(f"modes {in_modes} -> {out_modes} multiply to {math.prod(in_modes)} -> {math.prod(out_modes)}, "
                  f"not the layer's {nx} -> {ny}")  # fmt: skip
    caps = bond_caps(in_modes, out_modes)
    if not isinstance(bonds, list) or len(bonds) != len(caps) or not all(
        type(b) is int and 1 <= b <= c for b, c in zip(bonds, caps)
    ):  # fmt: skip
        raise bad(f"bond_dims must be {len(caps)} whole numbers within their caps {caps}, got {bonds!r}")
    if type(spec.get("bias")) is not bool:
        raise bad(f"bias must be true or false, got {spec.get('bias')!r}")


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over tensors in name order: each name, dtype, shape and raw bytes (as stored by
    safetensors, little-endian). Recorded in every file mpocompress writes and checked on load."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a model whose floating-point tensors hold NaN or Inf."""
    for name, t in tensors.items():
        if not t.is_meta and not all_finite(t):
            raise MPOCompressError(
                f"{path}: tensor {name} holds NaN or Inf values (a damaged checkpoint or a diverged training run); "
                "use an earlier or a repaired checkpoint"
            )


# --------------------------------------------------------------------------- saving


def check_output_path(path: str | os.PathLike, force: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Fail early, before any work, when `path` cannot or must not be written."""
    path = Path(path)
    for src in inputs:
        if src.exists() and path.exists() and path.resolve() == src.resolve():
            raise MPOCompressError(f"output {path} is the input file; choose another -o (inputs are never modified)")
    if path.is_dir():
        raise MPOCompressError(f"output {path} is a folder; give a file name such as {path / 'model.safetensors'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise MPOCompressError(f"cannot write {path}: folder {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK):
        raise MPOCompressError(f"cannot write {path}: folder {parent} is not writable; choose another -o")
    if path.exists() and not force:
        raise MPOCompressError(f"{path} already exists; pass --force to overwrite it")
    return path


def _tensors_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen or not v.is_contiguous():
            v = v.clone().contiguous()  # safetensors refuses shared or strided tensors
        seen.add(key)
        out[k] = v.cpu()
    return out


def mpo_layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Geometry of every MPO layer, by every full name it is reachable under."""
    return {name: m.spec() for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, MPO_LAYERS)}


def save(
    model: nn.Module,
    path: str | os.PathLike,
    arch: str | ArchSpec | None,
    force: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as safetensors with the metadata `load` needs, atomically.

    The file appears complete or not at all: it is written under a temporary name in the same
    folder and renamed into place. An existing file is replaced only with `force=True`.
    """
    path = check_output_path(path, force)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "mpocompress_version": __version__,
        "torch_version": torch.__version__,
        "arch": str(arch) if arch is not None else "",
        "layers": json.dumps(mpo_layer_specs(model), sort_keys=True),
    }
    for k, v in (extra_metadata or {}).items():
        metadata[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    tensors = _tensors_for_saving(model)
    _check_finite(tensors, "the model to save")  # reads every tensor, as the digest does
    metadata[DIGEST_KEY] = tensors_digest(tensors)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


# --------------------------------------------------------------------------- training state


def _atomic_write(path: Path, write: Any) -> None:
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


def _nested_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts / lists, by its path ("model/fc1.weight", "optimizer/state/0/...")."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_nested_tensors(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def save_train_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a resumable training state (tensors, numbers, strings, lists, dicts) atomically, with
    the SHA-256 of its tensors."""
    path = Path(path)
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    state[DIGEST_KEY] = tensors_digest(_nested_tensors(state))
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by `save_train_state`, checked against its CRC-32s and SHA-256. Loaded
    with weights_only=True: a state file can hold tensors and plain values only, never code."""
    path = Path(path)
    if not path.exists():
        raise MPOCompressError(f"no checkpoint to resume from at {path}; run without --resume to start afresh")
    _check_readable(path)
    fresh = "; delete it and start afresh without --resume"
    try:
        _check_zip(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MPOCompressError as e:
        raise MPOCompressError(f"checkpoint {e}{fresh}") from None
    except Exception as e:
        raise MPOCompressError(f"cannot read checkpoint {path}; it is damaged ({_short(e)}){fresh}") from None
    if not isinstance(state, dict) or state.get("format") != "mpocompress-train-state":
        raise MPOCompressError(f"{path} is not an mpocompress training checkpoint")
    recorded = state.pop(DIGEST_KEY, None)
    if recorded is None and int(state.get("version", 1)) >= 2:
        raise MPOCompressError(f"checkpoint {path} is corrupt: it lacks its {DIGEST_KEY}{fresh}")
    if recorded is not None and tensors_digest(_nested_tensors(state)) != recorded:
        raise MPOCompressError(f"checkpoint {path} is corrupt: its tensors do not match their recorded SHA-256{fresh}")
    return state
