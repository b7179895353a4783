"""`mpocompress train`: train a network from scratch, dense or as the paper's MPO-Net."""

from __future__ import annotations

from pathlib import Path

import typer

from mpocompress.cli import app
from mpocompress.cli.common import BOND_OPT, JSON_OPT, fail, handle_errors, parse_bond_dims, print_json
from mpocompress.cli.render import make_console, make_err_console
from mpocompress.cli.training import (
    AUGMENT_OPT,
    BATCH_OPT,
    CHANNELS_OPT,
    DATA_DIR_OPT,
    DATA_OPT,
    DEVICE_OPT,
    EPOCHS_HELP,
    FORCE_OPT,
    IMAGE_SIZE_OPT,
    KEEP_CKPT_OPT,
    MOMENTUM_OPT,
    NORMALIZE_OPT,
    RESUME_OPT,
    RUNS_OPT,
    SCHEDULE_OPT,
    SEED_OPT,
    WARMUP_OPT,
    WD_OPT,
    Job,
    check_outputs,
    choose_data,
    count_trainable,
    data_inputs,
    load_data,
    output_option,
    render,
    report,
    run_all,
)  # fmt: skip
from mpocompress.models import adapt_arch, build_model, build_mpo_net
from mpocompress.train import TrainConfig, dist_env, finish_distributed, init_distributed, resolve_device


@app.command()
@handle_errors
def train(
    arch: str = typer.Option(..., "--arch", metavar="SPEC", help="Architecture: fc2, lenet5, vgg16, vgg19, resnet(m=..,k=..), densenet(n=..,m=..,k=..), or package.module:callable. in_channels, image_size and num_classes default to the data's.", show_default=False),
    mpo: bool = typer.Option(False, "--mpo", help="Build the paper's MPO-Net counterpart: its linear maps are MPOs, trained from random initialisation."),
    bond_dim: list[str] = BOND_OPT,
    data: str | None = DATA_OPT,
    data_dir: Path | None = DATA_DIR_OPT,
    image_size: int | None = IMAGE_SIZE_OPT,
    channels: int | None = CHANNELS_OPT,
    normalize: str | None = NORMALIZE_OPT,
    augment: bool | None = AUGMENT_OPT,
    output: Path | None = output_option("Where to write the trained model (safetensors, readable by convert, finetune, evaluate and mpocompress.load)."),
    epochs: int = typer.Option(20, "--epochs", metavar="N", help=EPOCHS_HELP),
    batch_size: int = BATCH_OPT,
    lr: float = typer.Option(0.05, "--lr", metavar="LR", help="Peak learning rate of SGD."),
    momentum: float = MOMENTUM_OPT,
    weight_decay: float = WD_OPT,
    schedule: str = SCHEDULE_OPT,
    warmup: float = WARMUP_OPT,
    seed: int = SEED_OPT,
    runs: int = RUNS_OPT,
    force: bool = FORCE_OPT,
    resume: bool = RESUME_OPT,
    keep_checkpoint: bool = KEEP_CKPT_OPT,
    device: str = DEVICE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Train a network from scratch (cross-entropy + L2, SGD with momentum, Eq. 7) and save it.

    With --mpo the network is the paper's MPO-Net: e.g. --arch fc2 --mpo --bond-dim 16 is FC2 with
    M^{4,4,4,4}_{4,7,7,4}(16) and M^{1,1,10,1}_{4,4,4,4}(4). --bond-dim D sets the D the paper varies
    (FC2: the first layer's; other networks: every MPO layer's); --bond-dim NAME=D sets one layer's.

    \b
    Examples:
      mpocompress train --arch fc2 --data digits -o runs/fc2.safetensors
    """
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         schedule=schedule, warmup_epochs=warmup, seed=seed)  # fmt: skip
    d, per_layer = parse_bond_dims(bond_dim)
    if (d is not None or per_layer) and not mpo:
        fail("--bond-dim sets the bond dimensions of an MPO-Net: add --mpo (or train dense and use `mpocompress convert`)")
    env = dist_env()
    dev = resolve_device(device, env)
    check_outputs("train", output, runs, force or resume, env, data_inputs(data))
    choice = choose_data(data, image_size, channels, normalize, data_dir=data_dir)
    train_set, test_set = load_data(choice, data_dir, augment)
    spec = adapt_arch(arch, train_set.image_shape, train_set.num_classes)
    build_mpo_net(spec, d, per_layer) if mpo else build_model(spec)  # a bad spec fails now, before any work

    def make_model(seed: int):
        if mpo:
            model, arch_text, _ = build_mpo_net(spec, d, per_layer)
        else:
            model, arch_text = build_model(spec), str(spec)
        return model, arch_text, count_trainable(model)

    job = Job("train", make_model, train_set, test_set, config, runs, output, resume, dev, env, keep_checkpoint=keep_checkpoint,
              describe={"data": train_set.name, "mpo": mpo}, data_record=choice.record())  # fmt: skip
    init_distributed(dev, env)
    outcomes = run_all(job, make_err_console())
    finish_distributed(env)
    if not env.is_main:
        return
    rep = report(job, outcomes, {"arch": str(spec), "mpo": mpo, "data": train_set.name, "data_options": choice.options(), "device": str(dev),
                                 "world_size": env.world_size})  # fmt: skip
    if json_out:
        print_json(rep)
    else:
        render(make_console(), rep)
