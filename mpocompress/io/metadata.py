"""The metadata of the files mpocompress writes: format version, layer specs validated before
anything is built from them, and the SHA-256 of the tensors."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mpocompress.errors import MPOCompressError
from mpocompress.nn import LAYER_KINDS, MPOEmbedding, MPOLayer
from mpocompress.tensors import all_finite, bond_caps
from mpocompress.utils import bounded_json

FORMAT = "mpocompress"
FORMAT_VERSION = 3  # 2: the metadata records tensors_sha256; 3: also metadata_sha256 (versions 1 and 2 are still read)
DIGEST_KEY = "tensors_sha256"
META_DIGEST_KEY = "metadata_sha256"
META_COVERED = ("arch", "layers", "hf_config", "hf_tokenizer", "data")  # what changes what the model computes
META_COVERED_IF_PRESENT = ("tied",)  # covered when a file records it (files written before it stay valid)


def parse_own_metadata(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise MPOCompressError(f"{path} has no valid format_version in its metadata; the file is damaged") from None
    if version < 1:
        raise MPOCompressError(f"{path} names mpocompress file format {version}, which never existed; the file is damaged or was edited")
    if version > FORMAT_VERSION:
        raise MPOCompressError(
            f"{path} uses mpocompress file format {version}, newer than this version reads ({FORMAT_VERSION}); "
            "upgrade mpocompress"
        )
    try:
        layers = bounded_json(meta.get("layers", "{}"))
        assert isinstance(layers, dict) and all(isinstance(v, dict) for v in layers.values())
    except (ValueError, AssertionError):
        raise MPOCompressError(f"{path} has unreadable layer metadata; the file is damaged") from None
    tokenizer = None
    if meta.get("hf_tokenizer"):
        try:
            tokenizer = bounded_json(meta["hf_tokenizer"])
        except ValueError:
            raise MPOCompressError(f"{path} has an unreadable recorded tokenizer; the file is damaged") from None
    return {"format_version": version, "arch": meta.get("arch") or None, "layers": layers,
            "mpocompress_version": meta.get("mpocompress_version"), "source_format": meta.get("source_format"),
            "hf_config": meta.get("hf_config"), "hf_tokenizer": tokenizer, "data": _data_record(path, meta.get("data"))}  # fmt: skip


def _data_record(path: Path, text: str | None) -> dict[str, Any] | None:
    """The data a model was trained, fine-tuned or calibrated on, as recorded: {"name", "image_size",
    "channels", "normalize", "data_dir"} (a named set's folder; None when the file records none)."""
    if not text:
        return None
    try:
        rec = bounded_json(text)
    except ValueError:
        rec = None
    ok = (
        isinstance(rec, dict) and isinstance(rec.get("name"), str) and rec["name"]
        and all(rec.get(k) is None or (type(rec[k]) is int and 1 <= rec[k] <= 4096) for k in ("image_size", "channels"))
        and (rec.get("normalize") is None or isinstance(rec["normalize"], str))
        and (rec.get("data_dir") is None or isinstance(rec["data_dir"], str))
    )  # fmt: skip
    if not ok:
        raise MPOCompressError(f"{path} has unreadable data metadata (the dataset it was trained on); the file is damaged or was edited")
    return {k: rec.get(k) for k in ("name", "image_size", "channels", "normalize", "data_dir")}


def check_layer_spec(path: Path, name: str, spec: Mapping[str, Any]) -> None:
    """Validate one MPO layer's metadata before anything is built from it: known kind, whole-number
    sizes, modes that multiply to the layer's dimensions, n-1 bond dims each within [1, its cap]."""

    def bad(why: str) -> MPOCompressError:
        return MPOCompressError(f"{path}: metadata of MPO layer {name!r} is invalid: {why}; the file is damaged or was edited")

    def whole_list(key: str) -> list[int]:
        v = spec.get(key)
        if not isinstance(v, list) or not all(type(x) is int and x >= 1 for x in v):
            raise bad(f"{key} must be a list of whole numbers >= 1, got {v!r}")
        return v

    kind = spec.get("kind")
    cls = LAYER_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise bad(f"unknown layer kind {kind!r} (known: {', '.join(LAYER_KINDS)})")
    try:
        nx, ny = cls.spec_dims(dict(spec))
    except ValueError as e:
        raise bad(str(e)) from None
    if type(spec.get("bias")) is not bool:
        raise bad(f"bias must be true or false, got {spec.get('bias')!r}")
    if not issubclass(cls, (MPOLayer, MPOEmbedding)):
        return
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


def metadata_digest(meta: Mapping[str, str]) -> str:
    """SHA-256 over the metadata entries that change what the model computes (architecture, layer
    specs with their modes, bonds and conv geometry, Hugging Face config and tokenizer, data record),
    as the raw strings written. Recorded from format 3 on and checked on load."""
    h = hashlib.sha256()
    for key in META_COVERED:
        value = meta.get(key)
        h.update(f"{key}\0{'' if value is None else value}\0".encode())
    for key in META_COVERED_IF_PRESENT:
        if key in meta:
            h.update(f"{key}\0{meta[key]}\0".encode())
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over tensors in name order: each name, dtype, shape and raw bytes (as stored by
    safetensors, little-endian). Recorded in every file mpocompress writes and checked on load."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        digest_update(h, name, tensors[name])
    return h.hexdigest()


def digest_update(h: Any, name: str, tensor: torch.Tensor) -> Any:
    """Add one tensor to a `tensors_digest` hash (tensors go in name order); returns its bytes as a
    numpy array (empty for an empty tensor), for a writer that streams them."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
    data = t.reshape(-1).view(torch.uint8).numpy()
    if t.numel():
        h.update(data)
    return data


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a model whose floating-point tensors hold NaN or Inf."""
    for name, t in tensors.items():
        if not t.is_meta and not all_finite(t):
            raise MPOCompressError(
                f"{path}: tensor {name} holds NaN or Inf values (a damaged checkpoint or a diverged training run); "
                "use an earlier or a repaired checkpoint"
            )
