"""Option parsing and error handling shared by the commands."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import typer

from mpocompress.cli.render import working
from mpocompress.compress import CompressionConfig
from mpocompress.errors import Interrupted, MPOCompressError, is_out_of_memory
from mpocompress.io.data.calibration import calibration_batches
from mpocompress.tensors import parse_shape_spec
from mpocompress.utils import batch_to

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2  # bad input: the message says what to change
EXIT_INTERNAL_ERROR = 1  # a bug in mpocompress


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print one error line on stderr and exit with `code`."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and a non-zero exit; never a traceback unless
    MPOCOMPRESS_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except MPOCompressError as e:
            fail(str(e))
        except Interrupted as e:  # a stop on SIGINT / SIGTERM, after saving a resumable checkpoint
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as e:
            if e.errno not in USER_OS_ERRORS:
                raise_internal(e)
            where = f" at {e.filename}" if e.filename else ""
            fail(f"{os.strerror(e.errno)}{where}: {USER_OS_ERRORS[e.errno]}")
        except Exception as e:  # noqa: BLE001 - last line of defence for the user
            if is_out_of_memory(e):
                fail("out of memory: the model or the data is too large for this machine; use smaller sizes or a larger machine"
                     " (a Hugging Face folder converts block by block with convert --stream)")  # fmt: skip
            raise_internal(e)

    return wrapper  # type: ignore[return-value]


USER_OS_ERRORS = {  # errors of the machine or the user's paths, not of mpocompress: exit 2 with what to do
    errno.ENOSPC: "free some space or write elsewhere (-o)",
    errno.EDQUOT: "the disk quota is full; free some space or write elsewhere (-o)",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EROFS: "the file system is read-only; write elsewhere (-o)",
    errno.EACCES: "check the permissions, or write elsewhere (-o)",
    errno.EPIPE: "the output pipe was closed",
}


def raise_internal(e: BaseException) -> None:
    """Our own bug: exit 1, with the traceback under MPOCOMPRESS_DEBUG=1."""
    if os.environ.get("MPOCOMPRESS_DEBUG"):
        traceback.print_exc()
    fail(
        f"internal error: {type(e).__name__}: {e} (this is a bug in mpocompress; "
        "rerun with MPOCOMPRESS_DEBUG=1 for a traceback and report it)",
        EXIT_INTERNAL_ERROR,
    )


def _positive_int(text: str, what: str, example: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise MPOCompressError(f"{what} {text!r} is not a whole number; {example}") from None
    if value < 1:
        raise MPOCompressError(f"{what} must be at least 1, got {value}; {example}")
    return value


def parse_bond_dims(values: list[str]) -> tuple[int | None, dict[str, int]]:
    """`--bond-dim 4` (every layer) and `--bond-dim NAME=8` (one layer or pattern)."""
    global_d: int | None = None
    per_layer: dict[str, int] = {}
    example = "use e.g. --bond-dim 4 or --bond-dim fc1=8"
    for v in values:
        if "=" in v:
            name, _, d = v.rpartition("=")
            if not name:
                raise MPOCompressError(f"--bond-dim {v!r} names no layer; {example}")
            per_layer[name] = _positive_int(d, f"--bond-dim for {name}", example)
        else:
            if global_d is not None:
                raise MPOCompressError(f"--bond-dim given twice without a layer name ({global_d} and {v}); give one D")
            global_d = _positive_int(v, "--bond-dim", example)
    return global_d, per_layer


def parse_shapes(values: list[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """`--shape NAME=I1xI2x..:J1xJ2x..` (input modes, then output modes)."""
    out = {}
    for v in values:
        name, sep, spec = v.partition("=")
        if not sep or not name:
            raise MPOCompressError(f"--shape {v!r} needs a layer name: write NAME=I1xI2x..:J1xJ2x.., e.g. fc1=4x7x7x4:4x4x4x4")
        try:
            out[name] = parse_shape_spec(spec)
        except MPOCompressError as e:
            raise MPOCompressError(f"--shape {v!r}: {e}") from None
    return out


def parse_fraction(text: str | None, option: str, hint: str, example: str) -> float | None:
    """A number strictly between 0 and 1 given as `option` (None stays None)."""
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        raise MPOCompressError(f"{option} {text!r} is not a number; {hint}") from None
    if not 0.0 < v < 1.0:
        raise MPOCompressError(f"{option} must lie strictly between 0 and 1, got {text}; {example}")
    return v


def parse_eps(text: str | None) -> float | None:
    return parse_fraction(text, "--eps", "give a relative error such as 0.05", "e.g. --eps 0.05")


_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_target_params(text: str | None) -> float | None:
    """`--target-params 0.5` (a fraction of the model's parameters now), `12000000`, `12M` or `300k`."""
    if text is None:
        return None
    t = text.strip().lower().replace("_", "").replace(",", "")
    scale = _SUFFIXES.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise MPOCompressError(f"--target-params {text!r} is not a number; give a count (12000000, 12M) or a fraction such as 0.5") from None
    if not (math.isfinite(value) and value > 0):
        raise MPOCompressError(f"--target-params must be positive, got {text}; e.g. --target-params 0.5")
    if value > 1 and value != int(value) and scale == 1:
        raise MPOCompressError(f"--target-params {text} is neither a fraction (at most 1) nor a whole count; e.g. 0.5 or 1500000")
    return float(round(value)) if value > 1 else value


def build_config(
    bond_dim: list[str], shape: list[str], layers: list[str], exclude: list[str], eps: str | None, cores: str | None,
    structure: str = "auto", target_params: str | None = None, max_error: str | None = None, sequential: bool = False,
    remove: str | None = None, budget_of: str = "model", try_mpo: bool = False, calib_dtype: str = "auto",
) -> CompressionConfig:  # fmt: skip
    if budget_of not in ("model", "selected"):
        raise MPOCompressError(f"unknown --of {budget_of!r}: choose model (the whole model's size) or selected (the selected layers')")
    if budget_of != "model" and target_params is None:
        raise MPOCompressError("--of says what --target-params counts; give --target-params P with it (--remove always counts the selected layers)")
    d, per_layer = parse_bond_dims(bond_dim)
    n = _positive_int(cores, "--cores", "use e.g. --cores 4") if cores is not None else None
    if n is not None and n > 8:
        raise MPOCompressError(f"--cores must be at most 8, got {n}")
    return CompressionConfig(
        bond_dim=d,
        eps=parse_eps(eps),
        n_cores=n or 4,
        layers=tuple(layers),
        exclude=tuple(exclude),
        bond_dims=per_layer,
        shapes=parse_shapes(shape),
        structure=structure,
        target_params=parse_target_params(target_params),
        max_error=parse_fraction(max_error, "--max-error", *["give a relative error such as 0.2"] * 2),
        mpo_cores=(n,) if n is not None else (),
        sequential=sequential,
        budget_of=budget_of,
        try_mpo=try_mpo,
        calib_dtype=calib_dtype,
        remove=parse_fraction(remove, "--remove", "give the share of the selected layers' weights to remove, e.g. 0.2", "e.g. --remove 0.2") if remove is not None else None,
    )


def read_calibration(
    err: Any, calib: str | None, loaded: Any, samples: int | None, data_dir: Path | None, max_length: int | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]] | None:  # fmt: skip
    """--calib's batches (None without it), served as the model file records its data, with a
    spinner on `err` while they are read; on `device` when one is given."""
    if calib is None:
        return None
    with working(err, f"reading calibration data {calib}"):
        batches = calibration_batches(calib, loaded.model, samples, data_dir, max_length, served=(loaded.metadata or {}).get("data"))
    return [batch_to(b, device) for b in batches] if device is not None else batches


def print_json(obj: Any) -> None:
    """One strict JSON object on stdout: NaN and Inf (which JSON lacks) are written as null."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


# ----------------------------------------------------------------------------- shared options

MODEL_ARG = typer.Argument(..., metavar="MODEL", help="Model: a state_dict (.pt/.pth/.safetensors, with --arch), a file mpocompress wrote, a Hugging Face model folder (config.json with its weights), or a pickled model (with --trust-pickle).", show_default=False)
ARCH_OPT = typer.Option(None, "--arch", metavar="SPEC", help="Architecture: a built-in name (fc2, lenet5, vgg16, vgg19, resnet, densenet), optionally with arguments like lenet5(in_channels=3,image_size=32), package.module:callable importable from the working directory, or hf:CLASS (e.g. hf:AutoModelForSequenceClassification) for a Hugging Face folder.")
BOND_OPT = typer.Option([], "--bond-dim", "-D", metavar="D|NAME=D", help="Bond dimension D for every selected layer, or NAME=D for one layer (repeatable).", show_default=False)
SHAPE_OPT = typer.Option([], "--shape", metavar="NAME=IxI..:JxJ..", help="Modes of a layer: NAME=I1xI2x..:J1xJ2x.. (input modes, then output modes; repeatable).", show_default=False)
LAYERS_OPT = typer.Option([], "--layers", metavar="PATTERN", help="Convert only these layers: exact name, glob (features.*) or re:REGEX (repeatable).", show_default=False)
EXCLUDE_OPT = typer.Option([], "--exclude", metavar="PATTERN", help="Leave these layers dense (same patterns as --layers; repeatable).", show_default=False)
EPS_OPT = typer.Option(None, "--eps", metavar="E", help="Target relative Frobenius error of each layer's weight, in (0, 1); bonds are cut to meet it (and D, if given).")
CORES_OPT = typer.Option(None, "--cores", metavar="N", help="Number of MPO cores n (2-6 typical) for layers without --shape. [default: 4; with --target-params the allocator tries 3 and 4]", show_default=False)
STRUCTURE_OPT = typer.Option("auto", "--structure", metavar="auto|mpo|lowrank", help="Forms a layer may take: lowrank (two factors), mpo, or auto (the allocator picks per layer; with --bond-dim/--eps alone, auto means mpo).")
REMOVE_OPT = typer.Option(None, "--remove", metavar="R", help="The budget as the LLM literature counts it: remove this share of the selected layers' weights (e.g. 0.2: 20 % of a decoder's block projections), instead of --target-params.", show_default=False)
OF_OPT = typer.Option("model", "--of", metavar="model|selected", help="What --target-params counts: model (its size after, embeddings and every layer left dense included) or selected (the layers chosen for compression: 0.5 keeps half of their weights). --remove always counts the selected.")
TARGET_OPT = typer.Option(None, "--target-params", metavar="P", help="The model's size after: a count (12000000, 12M) or a fraction of its size now (0.5). The allocator spreads it over the layers; a layer that nothing smaller serves stays dense.", show_default=False)
MAX_ERROR_OPT = typer.Option(None, "--max-error", metavar="E", help="Largest relative error a layer may have, in (0, 1): its output error on --calib data, else its weight error. Alone: each layer takes its smallest form within E.", show_default=False)
CALIB_OPT = typer.Option(None, "--calib", metavar="DATA", help="Calibration data (anything --data accepts: a dataset name, a tensors file, a folder of images, text:FILE for a text model). Factorizations then minimize each layer's error on its real inputs.", show_default=False)
CALIB_SAMPLES_OPT = typer.Option(None, "--calib-samples", metavar="N", help="Samples of --calib to use (the first N of its training split). [default: 512; for a causal LM 64 windows of --max-length tokens]", show_default=False)
TRY_MPO_OPT = typer.Option(False, "--try-mpo", help="With --calib: offer every layer made low-rank a 4-core MPO of no more parameters, refined 10x longer, and keep the MPO where its error on the calibration inputs is lower (slower: a short MPO fit per low-rank layer, a long one where the short one comes close).")
CALIB_DTYPE_OPT = typer.Option("auto", "--calib-dtype", metavar="auto|float32|bfloat16", help="Precision of the calibration passes' matrix products (autocast; the statistics and factorizations stay float32/float64): auto takes bfloat16 for a float32 model on a device that multiplies it natively (a CUDA GPU with bfloat16, an x86 CPU with AVX512-BF16 or AMX; about 2x faster passes there), else float32; the block-by-block passes of --sequential and --stream too.")
SEQUENTIAL_OPT = typer.Option(False, "--sequential", help="Calibrate each layer on the inputs the already compressed layers give it (slower: a pass per layer group), so errors do not compound.")
MAX_LENGTH_OPT = typer.Option(None, "--max-length", metavar="N", help="Tokens per sample of text:FILE data: a causal LM's text is one stream cut into windows of N tokens, other models' lines are cut at N. [default: 512 for a causal LM, else 128; at most the model's positions]", show_default=False)
CALIB_DATA_DIR_OPT = typer.Option(None, "--data-dir", metavar="DIR", help="Folder with the dataset files of --calib (default: $MPOCOMPRESS_DATA, else ./data).", show_default=False)
TRUST_OPT = typer.Option(False, "--trust-pickle", help="Allow loading a whole pickled model. Unpickling can run arbitrary code: only for files you trust.")
STREAM_OPT = typer.Option(False, "--stream", help="Stream a Hugging Face folder of safetensors weights block by block: the blocks are read, calibrated, factorized and written one at a time, so peak memory is one block, its statistics and the calibration activations, whatever the depth (implies --sequential; needs --calib).")
SHARD_SIZE_OPT = typer.Option(None, "--shard-size", metavar="SIZE", help="Write OUT as a folder of safetensors shards of at most SIZE each (5GB, 500MB, 2GiB) with an index, as Hugging Face shards a large model; it loads as the one file does. [default: one file]", show_default=False)
OFFLOAD_OPT = typer.Option(None, "--offload", metavar="cpu|disk", help="With --stream: keep the hidden states between blocks in memory (cpu) or in files beside OUT (disk). [default: cpu]", show_default=False)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")
COMPUTE_DEVICE_OPT = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="Where the calibration passes, statistics and factorizations run: auto takes a CUDA GPU when there is one. The model is read and written through CPU memory either way; activations run in the model's dtype, statistics in float64.")


def check_stream_options(stream: bool, offload: str | None, calib: str | None) -> None:
    """--stream's companions: --offload only with it, cpu or disk; --calib always with it."""
    if offload is not None and offload not in ("cpu", "disk"):
        fail(f"--offload must be cpu or disk, got {offload!r}")
    if offload is not None and not stream:
        fail("--offload says where --stream keeps the hidden states between blocks; add --stream")
    if stream and calib is None:
        fail("--stream calibrates block by block and needs --calib DATA (text:FILE for a language model)")


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_shard_size(text: str | None) -> int | None:
    """`--shard-size 5GB` (as Hugging Face writes sizes: GB = 10^9 bytes, GiB = 2^30), `500MB` or bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = _BYTE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None or float(m.group(1)) * unit < 1:
        raise MPOCompressError(f"--shard-size {text!r} is not a size; give bytes per shard such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * unit)


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,28,28' -> (1, 28, 28); None stays None."""
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise MPOCompressError(f"--input-shape must be positive whole numbers like 1,28,28 (C,H,W), got {text!r}")
    if math.prod(dims) > MAX_SAMPLE:
        raise MPOCompressError(f"--input-shape {text} is {math.prod(dims):,} numbers per sample, more than {MAX_SAMPLE:,}; give the shape of one sample (C,H,W)")
    return dims


MAX_SAMPLE = 1 << 26  # numbers in one sample of --input-shape (a 3 x 4096 x 4096 image is 50M)
