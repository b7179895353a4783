"""Hugging Face model folders: reading one (config.json plus model.safetensors or pytorch_model.bin,
offline, never with remote code), the tokenizer files beside it, and writing one.

A tokenizer travels inside mpocompress's own files: its files are recorded in the metadata
(`hf_tokenizer`, base64 by file name), so a converted model can tokenize text without its original
folder.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io as _io
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.models.hf import check_config, hf_class, transformers_module
from mpocompress.utils import bounded_json, short_error

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
)  # fmt: skip
MAX_TOKENIZER_BYTES = 32 << 20
# a sentence-transformers model's own files (pooling, normalization, max length), carried with the tokenizer so
# that an exported folder loads in SentenceTransformer as the original did; a module's config sits in its folder
SENTENCE_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
MODULE_CONFIG = re.compile(r"[0-9]+_[A-Za-z][A-Za-z0-9_]*/config\.json")


EXPORT_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
EXPORT_FILES = ("config.json", "generation_config.json")


def foreign_entries(folder: Path) -> list[str]:
    """What in `folder` no Hugging Face export writes (a model's config, weights, tokenizer and
    sentence-transformers files): `export --force` replaces a model folder, never one holding these."""
    out = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if p.is_dir() and not p.is_symlink() and re.fullmatch(r"[0-9]+_[A-Za-z][A-Za-z0-9_]*", name):
            out += [f"{name}/{q.name}" for q in sorted(p.iterdir()) if q.name != "config.json" or not q.is_file()]
        elif not (p.is_file() and not p.is_symlink() and (name in EXPORT_FILES or _carried(name) or EXPORT_WEIGHTS.fullmatch(name))):
            out.append(name)
    return out


def _carried(name: str) -> bool:
    return name in TOKENIZER_FILES or name in SENTENCE_FILES or MODULE_CONFIG.fullmatch(name) is not None


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model folder, checked (see `models.hf.check_config`)."""
    try:
        config = bounded_json((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MPOCompressError(f"{path / CONFIG_FILE} is not readable JSON ({short_error(e)}); the folder is damaged") from None
    return check_config(config, str(path))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own log lines and warnings stay off stderr while we load (errors are ours)."""
    transformers = transformers_module()
    logger = logging.getLogger("transformers")
    level = logger.level
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        logger.setLevel(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_hf_dir(path: Path, arch: str | None) -> tuple[nn.Module, str, dict[str, str]]:
    """The model in a Hugging Face folder, in eval mode, with its spec (hf:CLASS) and its tokenizer
    files. Weights load offline; a .bin file is read with weights_only=True."""
    config = read_config(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise MPOCompressError(
            f"{path} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])}); copy the model's weights beside it"
        )
    check_weight_paths(path)
    cls = hf_class(config, arch, str(path))
    check_sizes(config, cls, path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if cls.__name__.startswith("Auto"):
        kwargs["trust_remote_code"] = False
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except MPOCompressError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or truncated file surfaces as many exception types
        raise MPOCompressError(
            f"cannot load the Hugging Face model in {path} ({short_error(e)}); the weights may be truncated or damaged"
        ) from None
    check_loaded(model, info, path)
    return model.eval(), "hf:" + type(model).__name__, read_tokenizer_files(path)


def check_weight_paths(path: Path) -> None:
    """Every weights file the folder names (its own, and the shards a sharded index lists) must be a
    regular file inside the folder, links resolved: nothing outside it is read, and no FIFO or
    device is opened as weights."""
    root = path.resolve()
    names = [f.name for f in path.iterdir() if EXPORT_WEIGHTS.fullmatch(f.name)]
    for index in [n for n in names if n.endswith(".index.json")]:
        f = path / index
        try:
            if not f.resolve().is_relative_to(root) or not f.resolve().is_file() or f.stat().st_size > 64 << 20:
                raise ValueError
            mapping = bounded_json(f.read_text(encoding="utf-8")).get("weight_map")
            names += sorted(set(mapping.values())) if isinstance(mapping, dict) else []
        except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError):
            raise MPOCompressError(f"{f}: not a readable index of weights files inside {path}; the folder is damaged") from None
    for name in names:
        f = path / name if isinstance(name, str) else None
        target = f.resolve() if f is not None else None
        if target is None or not target.is_relative_to(root):
            raise MPOCompressError(f"{path}: the weights file {str(name)[:80]!r} lies outside the model folder; mpocompress reads "
                                   "only what is inside the folder it is given")  # fmt: skip
        if target.exists() and not target.is_file():
            raise MPOCompressError(f"{path}: the weights file {name} is not a regular file (a pipe, device or folder); give the real file")


MAX_LAYERS = 1024  # layers of a stack a config may ask for (the largest published models have under 200)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers", "num_encoder_layers")
SIZE_SLACK = 4  # a config may describe a model up to this many times the bytes of its weights files (at 2 bytes a weight)


def check_sizes(config: Mapping[str, Any], cls: type, path: Path) -> None:
    """Refuse a config that asks for far more than its weights hold before anything is allocated:
    its layer counts are bounded, then the model is built on the meta device (no memory) and its
    parameters counted against the bytes of the folder's weights files."""
    for key in LAYER_KEYS:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_LAYERS:
            raise MPOCompressError(f"{path}: config.json asks for {v:,} layers ({key}); no model has more than {MAX_LAYERS:,}: the config is damaged")
    transformers = transformers_module()
    try:
        cfg = transformers.CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
        with quiet_transformers(), torch.device("meta"):
            meta = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls(cfg)
    except Exception:  # noqa: BLE001 - loading proper names what it cannot build
        return
    params = sum(p.numel() for p in meta.parameters())
    held = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and EXPORT_WEIGHTS.fullmatch(f.name) and not f.name.endswith(".json"))
    if params * 2 > SIZE_SLACK * held + (64 << 20):
        raise MPOCompressError(f"{path}: config.json describes a model of {params:,} parameters, but its weights files hold "
                               f"{held:,} bytes; the config does not describe these weights (or it is damaged)")  # fmt: skip


def check_loaded(model: nn.Module, info: Mapping[str, Any], path: Path) -> None:
    """Refuse a model transformers built with some of its weights left at random, or with weights of
    the file left unused, unless that is a head the file never had (a classifier on an encoder's
    checkpoint) or one the class does not have (an encoder read from a classifier's checkpoint):
    a weights file missing tensors, a config whose layer count disagrees with the file, and a class
    that is not the file's all fail here, naming the tensors."""
    mine = set(model.state_dict())
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]
    top = {k.split(".", 1)[0] for k in (mine - missing) | unexpected}  # what the file holds, by first name
    def shown(keys: Any) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if mismatched:
        raise MPOCompressError(f"{path}: tensors of the wrong shape for its config ({shown(mismatched)}); the config and the weights are not of one model")
    real_missing = {k for k in missing if k.split(".", 1)[0] in top} if len(missing) * 2 < len(mine) else missing
    if real_missing:
        raise MPOCompressError(f"{path}: the weights lack {len(real_missing)} of the model's tensors ({shown(real_missing)}); "
                               "they would be random: give the complete weights, or the --arch of the class they belong to")  # fmt: skip
    mine_top = {name for name, _ in model.named_children()} | {k.split(".", 1)[0] for k in mine}  # (an empty stack too)
    stray = {k for k in unexpected if k.split(".", 1)[0] in mine_top}
    if stray:
        raise MPOCompressError(f"{path}: the weights hold {len(stray)} tensors the config's model has no place for ({shown(stray)}); "
                               "the config (its layer count, sizes or class) does not describe these weights")  # fmt: skip


GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (llama.cpp's format): by its suffix, or by its magic bytes."""
    if not path.is_file():
        return False
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def load_gguf(path: Path, arch: str | None) -> tuple[nn.Module, str, dict[str, str]]:
    """The model in a GGUF file, dequantized to float32 by transformers' GGUF reader, in eval mode,
    with its spec (hf:CLASS, a causal LM unless --arch names another class) and its tokenizer files
    (the tokenizer the file carries, written as tokenizer.json)."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise MPOCompressError(f"{path} is not a GGUF file (it lacks the GGUF magic bytes); give a .gguf model or a model folder")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MPOCompressError(
            f"reading {path} needs transformers' GGUF reader: pip install {' '.join(missing)} (or pip install -e '.[gguf]')"
        )
    transformers = transformers_module(f"{path} (a GGUF model)")
    cls = hf_class({}, arch, str(path)) if arch is not None else transformers.AutoModelForCausalLM
    folder, name = str(path.parent), path.name
    try:
        with quiet_transformers(), contextlib.redirect_stderr(_io.StringIO()), _one_gguf_reader():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            model = cls.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    except MPOCompressError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds for a file it cannot take
        raise MPOCompressError(
            f"cannot load the GGUF model {path} ({short_error(e)}); transformers reads GGUF files of the architectures it "
            "lists (llama, mistral, qwen2, gemma, gpt2, phi3, ...)"
        ) from None
    with tempfile.TemporaryDirectory(prefix="mpocompress-gguf-tok-") as tmp:
        with quiet_transformers():
            tokenizer.save_pretrained(tmp)
        files = read_tokenizer_files(Path(tmp))
    return model.eval(), "hf:" + type(model).__name__, files


@contextlib.contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """Parse a GGUF file once while transformers loads it. transformers parses the file anew for the
    tokenizer, the config and the weights (3.4 s each for SmolLM2's, most of it its 49,152-token
    vocabulary in Python), and builds gguf's tensor-name map again for every module of the model
    (6 s). Within this block the file's reader and each name map are made once and shared (both
    are only read). transformers imports both names from `gguf` where it uses them, so they are
    served by swapping those names for the block; elsewhere nothing changes."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple[Any, int], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        if mode != "r":
            return reader(path, mode)
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    def shared_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def read_tokenizer_files(path: Path) -> dict[str, str]:
    """The tokenizer files of a folder, base64 by name (empty when it has none)."""
    out, total = {}, 0
    for name in (*TOKENIZER_FILES, *SENTENCE_FILES, *_module_configs(path)):
        f = path / name
        if f.is_file() and f.resolve().is_relative_to(path.resolve()):  # nothing from outside the folder
            data = f.read_bytes()
            total += len(data)
            if total > MAX_TOKENIZER_BYTES:
                raise MPOCompressError(f"{path}: tokenizer files over {MAX_TOKENIZER_BYTES >> 20} MB; is this a tokenizer?")
            out[name] = base64.b64encode(data).decode("ascii")
    return out


def _module_configs(path: Path) -> list[str]:
    """The config files of the sentence-transformers modules modules.json lists (1_Pooling/config.json)."""
    f = path / "modules.json"
    if not f.is_file() or f.stat().st_size > 1 << 20:
        return []
    try:
        modules = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError):
        return []
    names = [f"{m.get('path')}/config.json" for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    return [n for n in names if MODULE_CONFIG.fullmatch(n)]


def decode_tokenizer_files(recorded: Any, source: str) -> dict[str, bytes]:
    """Tokenizer files recorded in a file's metadata, checked: plain file names, base64 contents."""
    if not isinstance(recorded, Mapping):
        raise MPOCompressError(f"{source}: the recorded tokenizer is not a mapping of files; the file is damaged")
    out = {}
    for name, data in recorded.items():
        if not isinstance(name, str) or not _carried(name) or not isinstance(data, str):
            raise MPOCompressError(f"{source}: the recorded tokenizer holds an unexpected entry {name!r}; the file is damaged")
        try:
            out[name] = base64.b64decode(data, validate=True)
        except ValueError:
            raise MPOCompressError(f"{source}: the recorded tokenizer file {name} is not base64; the file is damaged") from None
    return out


def write_files(folder: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(exist_ok=True)  # a sentence-transformers module's folder
        (folder / name).write_bytes(data)


def load_tokenizer(files: Mapping[str, bytes], source: str) -> Any:
    """A transformers tokenizer from its files (written to a temporary folder, removed after)."""
    if not files:
        raise MPOCompressError(
            f"{source} has no tokenizer (no tokenizer.json or vocabulary files); text data needs the model's tokenizer: "
            "convert from the model's Hugging Face folder with its tokenizer files beside config.json"
        )
    transformers = transformers_module("tokenizing text")
    with tempfile.TemporaryDirectory(prefix="mpocompress-tok-") as tmp:
        write_files(Path(tmp), files)
        try:
            with quiet_transformers():
                return transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise MPOCompressError(f"cannot build the tokenizer of {source} ({short_error(e)})") from None


def save_pretrained_quietly(model: nn.Module, folder: Path) -> None:
    """model.save_pretrained(folder) as safetensors, with transformers' messages kept off stderr."""
    with quiet_transformers(), contextlib.redirect_stdout(_io.StringIO()):
        model.save_pretrained(str(folder), safe_serialization=True)


def made_buffers(model: nn.Module, module: nn.Module, skip: str | None = None) -> None:
    """The buffers the model makes rather than stores (rotary frequencies, position ids), on the CPU
    and initialised as transformers does after building on the meta device: empty, then each owner
    through the model's `_init_weights` (its parameters, still on the meta device, are untouched)."""
    owners: dict[str, nn.Module] = {}
    for name, owner in module.named_modules():
        if skip is not None and f"{name}.".startswith(skip):
            continue
        for leaf in owner._non_persistent_buffers_set:
            b = owner._buffers.get(leaf)
            if b is not None and b.is_meta:
                owner._buffers[leaf] = torch.empty_like(b, device="cpu")
                owners[name] = owner
    init = getattr(model, "_init_weights", None)
    for owner in owners.values():
        if init is None:
            raise MPOCompressError(f"cannot make the buffers of {type(owner).__name__} (its model has no _init_weights)")
        with torch.no_grad():
            init(owner)
