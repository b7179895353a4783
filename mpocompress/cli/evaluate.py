"""`mpocompress evaluate`: test accuracy, loss, parameters and rho of a model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mpocompress.cli import app
from mpocompress.cli.common import ARCH_OPT, JSON_OPT, MODEL_ARG, TRUST_OPT, handle_errors, print_json
from mpocompress.cli.render import make_console
from mpocompress.cli.training import DATA_DIR_OPT, DATA_OPT, DEVICE_OPT
from mpocompress.io.data import load_dataset
from mpocompress.errors import MPOCompressError
from mpocompress.io import load_model
from mpocompress.compress import summarize
from mpocompress.train import evaluate as evaluate_model
from mpocompress.train import resolve_device


@app.command()
@handle_errors
def evaluate(
    model: Path = MODEL_ARG,
    arch: str | None = ARCH_OPT,
    data: str = DATA_OPT,
    data_dir: Path | None = DATA_DIR_OPT,
    batch_size: int = typer.Option(1000, "--batch-size", metavar="B", help="Images per forward pass."),
    device: str = DEVICE_OPT,
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Top-1 accuracy and loss on the test split, with the model's parameters and rho."""
    if batch_size < 1:
        raise MPOCompressError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    loaded = load_model(model, arch, trust_pickle)
    test_set = load_dataset(data, "test", data_dir)
    accuracy, loss = evaluate_model(loaded.model, test_set, dev, batch_size)
    s = summarize(loaded.model)
    rep = {
        "model": str(model),
        "arch": loaded.arch,
        "data": test_set.name,
        "examples": len(test_set),
        "accuracy": accuracy,
        "loss": loss,
        "rho": s["rho"],
        "params_model_after": s["params_model"],
        "params_model_dense": s["params_model_dense"],
        "params_mpo": s["params_mpo"],
        "mpo_layers": s["mpo_layers"],
    }
    if json_out:
        print_json(rep)
        return
    t = Table(title=f"{model} on {test_set.name} (test split, {len(test_set):,} images)", title_justify="left",
              show_header=False, box=None, pad_edge=False)  # fmt: skip
    t.add_column(style="bold")
    t.add_column()
    t.add_row("test accuracy", f"{accuracy:.2%}")
    t.add_row("test loss", f"{loss:.4f}")
    t.add_row("parameters", f"{s['params_model']:,} (dense equivalent {s['params_model_dense']:,})")
    t.add_row("rho (MPO layers)", f"{s['rho']:.4g}")
    t.add_row("MPO layers", ", ".join(f"{m['name']} {m['notation']}" for m in s["mpo_layers"]) or "none")
    make_console().print(t)
