"""`mpocompress analyze`: which layers are heavy, what an MPO of bond D would cost and lose."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from mpocompress.cli import app
from mpocompress.cli.common import (
    ARCH_OPT,
    BOND_OPT,
    CALIB_DATA_DIR_OPT,
    CALIB_DTYPE_OPT,
    CALIB_OPT,
    CALIB_SAMPLES_OPT,
    COMPUTE_DEVICE_OPT,
    CORES_OPT,
    EPS_OPT,
    EXCLUDE_OPT,
    JSON_OPT,
    LAYERS_OPT,
    MAX_ERROR_OPT,
    MAX_LENGTH_OPT,
    MODEL_ARG,
    OF_OPT,
    REMOVE_OPT,
    SHAPE_OPT,
    STRUCTURE_OPT,
    TARGET_OPT,
    TRUST_OPT,
    build_config,
    check_stream_options,
    fail,
    handle_errors,
    parse_input_shape,
    print_json,
    read_calibration,
)  # fmt: skip
from mpocompress.cli.render import make_console, make_err_console, render_report, working
from mpocompress.compress import add_macs, rows_per_sample
from mpocompress.compress import analyze as analyze_model
from mpocompress.compress.stream import stream_analyze
from mpocompress.io import load_model
from mpocompress.io.stream import DiskStore, block_loader, open_streamed
from mpocompress.models import default_input_shape
from mpocompress.train.distributed import dist_env, resolve_device


@app.command()
@handle_errors
def analyze(
    model: Path = MODEL_ARG,
    arch: str | None = ARCH_OPT,
    bond_dim: list[str] = BOND_OPT,
    shape: list[str] = SHAPE_OPT,
    layers: list[str] = LAYERS_OPT,
    exclude: list[str] = EXCLUDE_OPT,
    eps: str | None = EPS_OPT,
    cores: str | None = CORES_OPT,
    structure: str = STRUCTURE_OPT,
    target_params: str | None = TARGET_OPT,
    remove: str | None = REMOVE_OPT,
    budget_of: str = OF_OPT,
    max_error: str | None = MAX_ERROR_OPT,
    calib: str | None = CALIB_OPT,
    calib_samples: int | None = CALIB_SAMPLES_OPT,
    calib_dtype: str = CALIB_DTYPE_OPT,
    max_length: int | None = MAX_LENGTH_OPT,
    data_dir: Path | None = CALIB_DATA_DIR_OPT,
    stream: bool = typer.Option(False, "--stream", help="Read a Hugging Face folder of safetensors weights block by block, as convert --stream does: "
                                "the blocks' forms weighed and the budget allocated from one streamed pass, the chosen forms made in a "
                                "second; peak memory is one block, its statistics and the calibration activations (needs --calib)."),
    offload: str | None = typer.Option(None, "--offload", metavar="cpu|disk", help="With --stream: keep the hidden states between blocks "
                                       "in memory (cpu) or in files of a temporary folder (disk). [default: cpu]", show_default=False),
    device: str = COMPUTE_DEVICE_OPT,
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
    input_shape: str | None = typer.Option(
        None, "--input-shape", metavar="C,H,W",
        help="Shape of one input sample, to count multiply-adds of convolutions (default: from a built-in --arch).",
    ),
) -> None:
    """Show the heaviest layers and what an MPO of bond dimension D would cost and lose.

    Without --bond-dim or --eps: the exact MPO of each candidate layer and a sweep over
    D = 2, 4, 8, 16, 32. With --calib, --target-params or --max-error: each layer's error against
    its size for every structure (output errors on the calibration data with --calib) and the
    allocation at the budget. Multiply-adds per sample are shown dense and as MPO with the plan a
    training step of batch 64 takes. rho = factorized weights / dense weights of a layer (Eq. 9;
    above 1 means larger than dense). The model file is only read.

    \b
    Examples:
      mpocompress analyze MODEL_DIR --calib text:sentences.txt --remove 0.3
      mpocompress analyze MODEL_DIR --stream --calib text:sentences.txt --remove 0.3
      mpocompress analyze runs/fc2.safetensors --bond-dim 8
    """
    config = build_config(bond_dim, shape, layers, exclude, eps, cores, structure, target_params, max_error, remove=remove, budget_of=budget_of,
                          calib_dtype=calib_dtype)  # fmt: skip
    sample = parse_input_shape(input_shape)
    check_stream_options(stream, offload, calib)
    if dist_env().distributed:
        fail("analyze runs in one process; launch it without torchrun")
    err = make_err_console()
    dev = resolve_device(device)
    if stream:
        with working(err, f"opening {model} (its blocks stay on disk)"):
            loaded, source, _ = open_streamed(model, arch)
    else:
        with working(err, f"loading {model}"):
            loaded = load_model(model, arch, trust_pickle)
    batches = read_calibration(err, calib, loaded, calib_samples, data_dir, max_length, dev)
    with working(err, "analyzing the layers (spectra" + (", calibration" if calib else "") + (", block by block" if stream else "") + ")"):
        if stream:
            with tempfile.TemporaryDirectory(prefix="mpocompress-hidden-") as tmp:
                store = DiskStore(Path(tmp)) if offload == "disk" else None
                report = stream_analyze(loaded.model, config, batches, block_loader(source, loaded.model), store=store, device=dev)
        else:
            report = analyze_model(loaded.model.to(dev), config, calibration=batches)
            loaded.model.cpu()  # what follows counts multiply-adds (a forward pass of zeros for an image model) on CPU
        sample = sample or default_input_shape(loaded.arch)
        add_macs(report, loaded.model, rows_per_sample(loaded.model, sample) if sample else None)
    if json_out:
        print_json({"model": str(model), "arch": loaded.arch, **report.to_dict()})
    else:
        render_report(make_console(), report, f"{model} ({loaded.arch or type(loaded.model).__name__})")
