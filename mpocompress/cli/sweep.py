"""`mpocompress sweep`: accuracy against rho over several bond dimensions or budgets (the paper's Fig. 2)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mpocompress.cli import app
from mpocompress.cli.common import (
    ARCH_OPT,
    CALIB_OPT,
    CALIB_SAMPLES_OPT,
    CORES_OPT,
    EXCLUDE_OPT,
    JSON_OPT,
    LAYERS_OPT,
    MODEL_ARG,
    SHAPE_OPT,
    STRUCTURE_OPT,
    TRUST_OPT,
    build_config,
    handle_errors,
    print_json,
    read_calibration,
)  # fmt: skip
from mpocompress.cli.render import make_console, make_err_console
from mpocompress.cli.training import (
    BATCH_OPT,
    CHANNELS_OPT,
    DATA_DIR_OPT,
    DATA_OPT,
    DEVICE_OPT,
    FORCE_OPT,
    IMAGE_SIZE_OPT,
    NORMALIZE_OPT,
    SEED_OPT,
    choose_data,
    load_data,
    output_option,
    takes_text,
)  # fmt: skip
from mpocompress.errors import Interrupted, MPOCompressError
from mpocompress.io import load_model
from mpocompress.io.data.unlabelled import is_unlabelled
from mpocompress.io.sweep_files import FILES, prepare_folder, write_csv, write_plot, write_state
from mpocompress.train import FINETUNE_DEFAULTS, StopOnSignal, evaluate, resolve_device
from mpocompress.train.signals import signal_name
from mpocompress.train.sweep import parse_settings, sweep_point

_D = FINETUNE_DEFAULTS


@app.command()
@handle_errors
def sweep(
    model: Path = MODEL_ARG,
    arch: str | None = ARCH_OPT,
    output: Path | None = output_option("Folder for sweep.json, sweep.csv and sweep.png (created if missing)."),
    bond_dim: str | None = typer.Option(None, "--bond-dim", "-D", metavar="D1,D2,..", help="Bond dimensions to try, each for every selected layer. [default: 2,4,8,16,32]", show_default=False),
    target_params: str | None = typer.Option(None, "--target-params", metavar="P1,P2,..", help="Instead of bond dimensions: the model's size after, as fractions of its size now (e.g. 0.1,0.3,0.5); the allocator picks each layer's form.", show_default=False),
    data: str | None = DATA_OPT,
    data_dir: Path | None = DATA_DIR_OPT,
    image_size: int | None = IMAGE_SIZE_OPT,
    channels: int | None = CHANNELS_OPT,
    normalize: str | None = NORMALIZE_OPT,
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", metavar="N", help="Fine-tune each converted model for N epochs (0: measure right after conversion only)."),
    runs: int = typer.Option(1, "--runs", metavar="M", help="Fine-tuning runs per setting (seeds S..S+M-1): mean +- sigma of Eqs. 10-11."),
    lr: float = typer.Option(_D.lr, "--lr", metavar="LR", help="Peak learning rate of the fine-tuning (SGD)."),
    batch_size: int = BATCH_OPT,
    seed: int = SEED_OPT,
    layers: list[str] = LAYERS_OPT,
    exclude: list[str] = EXCLUDE_OPT,
    shape: list[str] = typer.Option([], "--shape", metavar="NAME=IxI..:JxJ..", help=SHAPE_OPT.help, show_default=False),
    cores: str | None = CORES_OPT,
    structure: str = STRUCTURE_OPT,
    calib: str | None = CALIB_OPT,
    calib_samples: int | None = CALIB_SAMPLES_OPT,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep in OUT: the settings already measured are kept."),
    force: bool = FORCE_OPT,
    device: str = DEVICE_OPT,
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Convert MODEL at each setting, measure the test accuracy right after conversion and, with
    --finetune-epochs, after fine-tuning (--runs times); print the table and write OUT/sweep.json,
    OUT/sweep.csv and OUT/sweep.png (accuracy against rho = factorized weights / dense weights,
    Eq. 9, with the dense model's accuracy as a line: the paper's Fig. 2). Ctrl-C stops after the
    current setting's step; --resume continues from the settings already measured.

    \b
    Examples:
      mpocompress sweep runs/fc2.safetensors -D 2,4,8,16 --finetune-epochs 1 -o runs/sweep
    """
    if output is None:
        raise MPOCompressError("sweep needs an output folder: add -o DIR")
    if finetune_epochs < 0 or runs < 1:
        raise MPOCompressError(f"--finetune-epochs must be >= 0 and --runs >= 1, got {finetune_epochs} and {runs}")
    settings = parse_settings(bond_dim, target_params)
    base = build_config([], shape, layers, exclude, None, cores, structure, None, None)
    config = dataclasses.replace(FINETUNE_DEFAULTS, lr=lr, batch_size=batch_size)  # checked before anything is written
    saved = prepare_folder(output, (model,), resume, force, [s.label for s in settings])
    created = not Path(output).exists()  # removed again if the sweep fails before it measures anything
    dev = resolve_device(device)
    loaded = load_model(model, arch, trust_pickle)
    if takes_text(loaded.model) and (data is None or is_unlabelled(data)):  # a text model's data has no labels
        raise MPOCompressError(
            f"sweep measures accuracy on labelled data, and {model} is a text model: for its error against size use "
            f"`mpocompress analyze {model} --calib text:FILE`, or convert at each size and `mpocompress evaluate OUT "
            f"--data text:FILE --reference {model}`"
        )  # fmt: skip
    choice = choose_data(data, image_size, channels, normalize, (loaded.metadata or {}).get("data"), str(model), data_dir, loaded.model)
    if is_unlabelled(choice.name):
        raise MPOCompressError(f"{choice.name} has no labels; sweep measures accuracy, so give labelled data with --data")
    train_set, test_set = load_data(choice, data_dir, None)
    identity = {"model": str(Path(model).resolve()), "data": choice.record(), "settings": [s.label for s in settings],
                "finetune_epochs": finetune_epochs, "runs": runs, "seed": seed, "lr": lr, "batch_size": batch_size,
                "layers": list(layers), "exclude": list(exclude), "shape": list(shape), "cores": cores, "structure": structure,
                "calib": calib, "calib_samples": calib_samples}  # fmt: skip
    identity = json.loads(json.dumps(identity))  # as the state file holds it (tuples become lists)
    if saved is not None and saved["identity"] != identity:
        differ = sorted(k for k in identity if saved["identity"].get(k) != identity[k])
        raise MPOCompressError(f"{output}/sweep.json was written by a different sweep (its {', '.join(differ)} differ); "
                               "rerun with the same options to resume, or drop --resume and add --force to start over")  # fmt: skip
    err = make_err_console()
    calibration = read_calibration(err, calib, loaded, calib_samples, data_dir)
    if saved is None:
        acc, loss = evaluate(loaded.model, test_set, dev)
        state: dict[str, Any] = {
            "model": str(model), "arch": loaded.arch, "data": test_set.name, "data_options": choice.options(),
            "finetune_epochs": finetune_epochs, "runs": runs, "identity": identity,
            "dense": {"accuracy": acc, "loss": loss, "params_model": sum(p.numel() for p in loaded.model.parameters())},
            "points": [], "complete": False,
        }  # fmt: skip
        write_state(output, state)
    else:
        state = saved
    done = {p["setting"] for p in state["points"]}
    with StopOnSignal() as stop:
        for k, s in enumerate(settings):
            if s.label in done:
                continue
            err.print(f"setting {k + 1}/{len(settings)}: {s.label}", highlight=False)
            try:
                point = sweep_point(loaded.model, s, base, train_set, test_set, finetune_epochs, runs, seed, dev, calibration,
                                    config, should_stop=stop)  # fmt: skip
            except MPOCompressError:
                if saved is None and not state["points"]:  # nothing measured: leave no sweep to block a corrected rerun
                    (Path(output) / FILES[0]).unlink(missing_ok=True)
                    if created:
                        with contextlib.suppress(OSError):
                            Path(output).rmdir()
                raise
            except Interrupted as e:
                raise Interrupted(f"interrupted during {s.label}: {output}/sweep.json holds {len(state['points'])} of "
                                  f"{len(settings)} settings; rerun the same command with --resume to continue", e.signum) from None  # fmt: skip
            state["points"].append(point.to_dict())
            write_state(output, state)
            if stop():
                raise Interrupted(f"{signal_name(stop())} after {s.label}: {output}/sweep.json holds {len(state['points'])} of "
                                  f"{len(settings)} settings; rerun the same command with --resume to continue", stop())  # fmt: skip
    order = {s.label: i for i, s in enumerate(settings)}
    state["points"].sort(key=lambda p: order[p["setting"]])
    state["complete"] = True
    write_state(output, state)
    write_csv(output, state["points"])
    state["plot"] = str(output / "sweep.png") if write_plot(output, state) else None
    if state["plot"] is None:
        state.setdefault("notes", []).append("sweep.png not drawn: matplotlib is not installed (pip install -e '.[plot]')")
    rep = {k: v for k, v in state.items() if k != "identity"}
    rep["output"] = str(output)
    if json_out:
        print_json(rep)
    else:
        _render(rep)


def _render(rep: dict[str, Any]) -> None:
    tuned = rep["finetune_epochs"] > 0
    t = Table(title=f"{rep['model']} on {rep['data']}: accuracy against rho", title_justify="left")
    for col in ("setting", "rho", "parameters", "after conversion", *(["after fine-tuning"] if tuned else [])):
        t.add_column(col, justify="left" if col == "setting" else "right", no_wrap=True)
    dense = rep["dense"]
    t.add_row("dense", "1", f"{dense['params_model']:,}", f"{dense['accuracy']:.2%}", *(["-"] if tuned else []))
    for p in rep["points"]:
        after = []
        if tuned:
            after = [f"{p['accuracy_finetuned_mean']:.2%}" + (f" +- {p['accuracy_finetuned_std']:.2%}" if p["accuracy_finetuned_std"] is not None else "")]
        t.add_row(p["setting"], f"{p['rho']:.4g}", f"{p['params_model']:,}", f"{p['accuracy_converted']:.2%}", *after)
    t.caption = "rho = factorized weights / dense weights of the converted layers [Eq. 9]"
    console = make_console()
    console.print(t)
    written = ", ".join(str(Path(rep["output"]) / n) for n in ("sweep.json", "sweep.csv")) + (f", {rep['plot']}" if rep["plot"] else "")
    console.print(f"written: {written}", highlight=False)
    for note in rep.get("notes", []):
        console.print(f"note: {note}", highlight=False)
