"""`mpocompress convert`: factorize the chosen layers (MPO or low-rank, sized by D, eps or a budget), swap them in, save."""

from __future__ import annotations

from pathlib import Path

import typer

from mpocompress.cli import app
from mpocompress.cli.common import (
    ARCH_OPT,
    BOND_OPT,
    CALIB_DATA_DIR_OPT,
    CALIB_OPT,
    CALIB_SAMPLES_OPT,
    CORES_OPT,
    EPS_OPT,
    EXCLUDE_OPT,
    JSON_OPT,
    LAYERS_OPT,
    MAX_ERROR_OPT,
    MAX_LENGTH_OPT,
    MODEL_ARG,
    REMOVE_OPT,
    SEQUENTIAL_OPT,
    SHAPE_OPT,
    STRUCTURE_OPT,
    TARGET_OPT,
    TRUST_OPT,
    build_config,
    fail,
    handle_errors,
    print_json,
    read_calibration,
)  # fmt: skip
from mpocompress.cli.render import make_console, make_err_console, render_report, working
from mpocompress.compress import compress_
from mpocompress.io import check_output_path, load_model, save


@app.command()
@handle_errors
def convert(
    model: Path = MODEL_ARG,
    output: Path | None = typer.Option(None, "--output", "-o", metavar="OUT", help="Where to write the compressed model (safetensors). [required]", show_default=False),
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
    max_error: str | None = MAX_ERROR_OPT,
    calib: str | None = CALIB_OPT,
    calib_samples: int | None = CALIB_SAMPLES_OPT,
    sequential: bool = SEQUENTIAL_OPT,
    max_length: int | None = MAX_LENGTH_OPT,
    data_dir: Path | None = CALIB_DATA_DIR_OPT,
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Write the chosen layers in factorized form (MPOs or low-rank) and save the model.

    Sizes: --bond-dim D or --eps E for every layer, or --target-params P (and/or --max-error E) for
    the allocator, which picks each layer's structure and size. With --calib the factorizations
    minimize each layer's error on its real inputs. The report's rho is factorized weights / dense
    weights of the converted layers (Eq. 9). The output is safetensors with metadata to
    rebuild the model: `mpocompress.load(OUT)` returns it. The input file is never modified.
    """
    config = build_config(bond_dim, shape, layers, exclude, eps, cores, structure, target_params, max_error, sequential, remove)
    if output is None:
        fail("convert needs an output file: add -o OUT.safetensors")
    if config.bond_dim is None and config.eps is None and not config.bond_dims and not config.allocating:
        fail("convert needs a truncation or a budget: add --bond-dim D (e.g. --bond-dim 4), --eps E, --target-params P (e.g. 0.5) or --remove R (e.g. 0.2); `mpocompress analyze` helps choose")
    if sequential and calib is None:
        fail("--sequential calibrates layer by layer and needs --calib DATA")
    out = check_output_path(output, force, inputs=(model,))
    err = make_err_console()
    with working(err, f"loading {model}"):
        loaded = load_model(model, arch, trust_pickle, check_values=False)  # checked per layer and by save
    batches = read_calibration(err, calib, loaded, calib_samples, data_dir, max_length)
    with working(err, "factorizing" + (" (calibrating, sizing the layers)" if calib or config.allocating else "")):
        report = compress_(loaded.model, config, calibration=batches)
    if calib:
        report.notes.append(f"calibrated on {sum(len(next(iter(b.values()))) for b in batches)} samples of {calib}")
    if loaded.arch is None:
        report.notes.append(f"{out} records no architecture (the input was a pickled model): pass --arch when loading it")
    extra = {"source_format": loaded.source, "compression": config.to_dict()}
    if loaded.metadata and loaded.metadata.get("data"):  # the data the original was trained on goes with it
        extra["data"] = loaded.metadata["data"]
    with working(err, f"writing {out}"):
        save(loaded.model, out, loaded.arch, force=force, extra_metadata=extra)
    if json_out:
        print_json({"model": str(model), "output": str(out), "arch": loaded.arch, **report.to_dict()})
    else:
        render_report(make_console(), report, f"{model} -> {out}")
