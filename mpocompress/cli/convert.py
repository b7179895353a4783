"""`mpocompress convert`: factorize the chosen layers by TT-SVD, swap in MPO layers, save."""

from __future__ import annotations

from pathlib import Path

import typer

from mpocompress.cli import app
from mpocompress.cli.common import (
    ARCH_OPT, BOND_OPT, CORES_OPT, EPS_OPT, EXCLUDE_OPT, JSON_OPT, LAYERS_OPT, MODEL_ARG, SHAPE_OPT, TRUST_OPT,
    build_config, fail, handle_errors, print_json,
)  # fmt: skip
from mpocompress.cli.render import make_console, render_report
from mpocompress.io import check_output_path, load_model, save
from mpocompress.compress import compress_


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
    cores: str = CORES_OPT,
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Write the chosen layers as MPOs (sequential SVD at bond dimension D) and save the model.

    The output is safetensors with metadata to rebuild the model: `mpocompress.load(OUT)` returns it.
    The input file is never modified.
    """
    config = build_config(bond_dim, shape, layers, exclude, eps, cores)
    if output is None:
        fail("convert needs an output file: add -o OUT.safetensors")
    if config.bond_dim is None and config.eps is None and not config.bond_dims:
        fail("convert needs a truncation: add --bond-dim D (e.g. --bond-dim 4) or --eps E; `mpocompress analyze` helps choose")
    out = check_output_path(output, force, inputs=(model,))
    loaded = load_model(model, arch, trust_pickle, check_values=False)  # checked per layer and by save
    report = compress_(loaded.model, config)
    if loaded.arch is None:
        report.notes.append(f"{out} records no architecture (the input was a pickled model): pass --arch when loading it")
    save(loaded.model, out, loaded.arch, force=force, extra_metadata={"source_format": loaded.source, "compression": config.to_dict()})
    if json_out:
        print_json({"model": str(model), "output": str(out), "arch": loaded.arch, **report.to_dict()})
    else:
        render_report(make_console(), report, f"{model} -> {out}")
