"""`mpocompress export`: a model for use without mpocompress (Hugging Face folder, ONNX, torch.export)."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from mpocompress.cli import app
from mpocompress.cli.common import (
    ARCH_OPT,
    JSON_OPT,
    MODEL_ARG,
    TRUST_OPT,
    fail,
    handle_errors,
    parse_input_shape,
    print_json,
)
from mpocompress.cli.render import make_console
from mpocompress.io import check_output_path, load_model
from mpocompress.io.export import FORMATS, export_model
from mpocompress.models import default_input_shape
from mpocompress.train.distributed import resolve_device

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@app.command()
@handle_errors
def export(
    model: Path = MODEL_ARG,
    output: Path | None = typer.Option(None, "--output", "-o", metavar="OUT", help="Where to write: a folder for hf, a file for onnx (.onnx) and pt2 (.pt2). [required]", show_default=False),
    fmt: str = typer.Option(..., "--format", metavar="hf|onnx|pt2", help="hf: a Hugging Face folder with dense weights (factorized layers multiplied out); onnx: an ONNX file; pt2: a torch.export program (factorized layers kept factorized in both).", show_default=False),
    arch: str | None = ARCH_OPT,
    input_shape: str | None = typer.Option(None, "--input-shape", metavar="C,H,W", help="Shape of one input sample for the probe batch of a non-text model (default: from a built-in --arch)."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="float32|bfloat16|float16", help="Cast the weights to this dtype before exporting (onnxruntime's CPU kernels need float32). [default: as stored]", show_default=False),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    device: str = typer.Option("cpu", "--device", metavar="auto|cpu|cuda", help="Where the model runs the probe batch and is traced (auto takes a CUDA GPU when there is one). The files written are the same either way (a pt2 traced on a GPU is moved to the CPU before it is saved), and each is checked on the CPU."),
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Export a model so that it runs without mpocompress.

    The export is run on a probe batch after writing and must agree with the model within 1e-4
    (relative); otherwise nothing is written. A text model's ONNX graph takes input_ids,
    attention_mask (and token_type_ids) and returns the last hidden state first.

    \b
    Examples:
      mpocompress export small.safetensors --format onnx -o small.onnx
      mpocompress export small.safetensors --format hf -o small_hf
    """
    if fmt not in FORMATS:
        fail(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output is None:
        fail("export needs an output: add -o OUT (a folder for --format hf, a file for onnx and pt2)")
    sample = parse_input_shape(input_shape)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        fail(f"unknown --dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    dev = resolve_device(device)
    out = check_output_path(output, force, inputs=(model,), folder=fmt == "hf")
    loaded = load_model(model, arch, trust_pickle)
    if dtype is not None:
        loaded.model.to(EXPORT_DTYPES[dtype])
    rep = export_model(loaded.model, out, fmt, loaded.arch, sample or default_input_shape(loaded.arch), device=dev)
    if json_out:
        print_json({"model": str(model), "arch": loaded.arch, **rep.to_dict()})
        return
    t = Table(title=f"{model} -> {out} ({fmt})", title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("written", str(out))
    t.add_row("parameters", f"{rep.params:,}")
    t.add_row("probe batch", ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in rep.probe_shapes.items()))
    t.add_row("relative output error", f"{rep.rel_error:.3g} (allowed 1e-4)")
    t.add_row("factorized layers", "kept" if rep.factorized else "multiplied out: dense weights, the original's size (onnx and pt2 keep the factors)")
    make_console().print(t)
