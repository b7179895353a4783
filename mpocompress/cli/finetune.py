"""`mpocompress finetune`: recover the accuracy of a converted model by further training."""

from __future__ import annotations

from pathlib import Path

import typer

from mpocompress.cli import app
from mpocompress.cli.common import ARCH_OPT, JSON_OPT, MODEL_ARG, TRUST_OPT, handle_errors, print_json
from mpocompress.cli.render import make_console, make_err_console
from mpocompress.cli.training import (
    AUGMENT_OPT, BATCH_OPT, DATA_DIR_OPT, DATA_OPT, DEVICE_OPT, EPOCHS_HELP, FORCE_OPT, MOMENTUM_OPT, RESUME_OPT,
    RUNS_OPT, SCHEDULE_OPT, SEED_OPT, WARMUP_OPT, WD_OPT, Job, check_outputs, load_data, output_option, render,
    report, run_all,
)  # fmt: skip
from mpocompress.io import load_model
from mpocompress.train import (
    FINETUNE_DEFAULTS, TrainConfig, dist_env, evaluate, freeze_, init_distributed, prepare_finetune_, resolve_device,
)  # fmt: skip

_D = FINETUNE_DEFAULTS


@app.command()
@handle_errors
def finetune(
    model: Path = MODEL_ARG,
    arch: str | None = ARCH_OPT,
    data: str = DATA_OPT,
    data_dir: Path | None = DATA_DIR_OPT,
    augment: bool | None = AUGMENT_OPT,
    output: Path | None = output_option("Where to write the fine-tuned model (safetensors)."),
    distill_from: Path | None = typer.Option(None, "--distill-from", metavar="ORIGINAL", help="Distil from this model (usually the uncompressed original): train on its softened outputs as well as the labels.", show_default=False),
    teacher_arch: str | None = typer.Option(None, "--teacher-arch", metavar="SPEC", help="Architecture of ORIGINAL when it is a state_dict (default: that of MODEL).", show_default=False),
    distill_alpha: float = typer.Option(_D.distill_alpha, "--distill-alpha", metavar="A", help="Weight of the soft-target term against cross-entropy, in [0, 1]."),
    distill_temperature: float = typer.Option(_D.distill_temperature, "--distill-temperature", metavar="T", help="Softmax temperature of the soft targets."),
    freeze: list[str] = typer.Option([], "--freeze", metavar="central|dense", help="Train only part of the model: 'central' freezes the central core of every MPO, 'dense' every layer that is not an MPO (repeatable).", show_default=False),
    epochs: int = typer.Option(_D.epochs, "--epochs", metavar="N", help=EPOCHS_HELP),
    batch_size: int = BATCH_OPT,
    lr: float = typer.Option(_D.lr, "--lr", metavar="LR", help="Peak learning rate of SGD."),
    momentum: float = MOMENTUM_OPT,
    weight_decay: float = WD_OPT,
    schedule: str = SCHEDULE_OPT,
    warmup: float = typer.Option(_D.warmup_epochs, "--warmup", metavar="EPOCHS", help=WARMUP_OPT.help),
    balance: bool = typer.Option(True, "--balance/--no-balance", help="Before training, spread each bond's singular values evenly over the two cores it joins (a canonical gauge: the same matrix, better-conditioned gradients)."),
    seed: int = SEED_OPT,
    runs: int = RUNS_OPT,
    force: bool = FORCE_OPT,
    resume: bool = RESUME_OPT,
    device: str = DEVICE_OPT,
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Fine-tune a converted model (typically the output of `mpocompress convert`) and save it.

    Reports the test accuracy before and after, rho, and the number of trainable parameters.
    The input file is never modified.
    """
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         schedule=schedule, warmup_epochs=warmup, seed=seed, distill_alpha=distill_alpha,
                         distill_temperature=distill_temperature)  # fmt: skip
    env = dist_env()
    dev = resolve_device(device, env)
    inputs = (model,) + ((distill_from,) if distill_from else ())
    check_outputs("finetune", output, runs, force or resume, env, inputs)
    loaded = load_model(model, arch, trust_pickle)  # errors about the model before the data is read
    teacher = None
    if distill_from is not None:
        teacher = load_model(distill_from, teacher_arch or loaded.arch, trust_pickle).model
    train_set, test_set = load_data(data, data_dir, augment)
    accuracy_before, loss_before = evaluate(loaded.model, test_set, dev)
    parts = tuple(dict.fromkeys(freeze))
    freeze_(loaded.model.cpu(), parts)  # validates --freeze now

    def make_model(seed: int):
        m = load_model(model, arch, trust_pickle).model
        if balance:
            prepare_finetune_(m)
        return m, loaded.arch, freeze_(m, parts)

    job = Job("finetune", make_model, train_set, test_set, config, runs, output, resume, dev, env,
              describe={"data": train_set.name, "model": str(model), "freeze": list(parts), "balance": balance,
                        "distill_from": str(distill_from) if distill_from else None}, teacher=teacher)  # fmt: skip
    init_distributed(dev, env)
    outcomes = run_all(job, make_err_console())
    if not env.is_main:
        return
    rep = report(job, outcomes, {"model": str(model), "arch": loaded.arch, "data": train_set.name,
                                 "accuracy_before": accuracy_before, "loss_before": loss_before,
                                 "params_model_before": sum(p.numel() for p in loaded.model.parameters()),
                                 "distill_from": str(distill_from) if distill_from else None, "freeze": list(parts),
                                 "device": str(dev), "world_size": env.world_size})  # fmt: skip
    if json_out:
        print_json(rep)
    else:
        render(make_console(), rep)
