"""`mpocompress finetune`: recover the accuracy of a converted model by further training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

from mpocompress.cli import app
from mpocompress.cli.common import (
    ARCH_OPT,
    JSON_OPT,
    MAX_LENGTH_OPT,
    MODEL_ARG,
    SHARD_SIZE_OPT,
    TRUST_OPT,
    fail,
    handle_errors,
    parse_shard_size,
    print_json,
)
from mpocompress.cli.render import make_console, make_err_console, working
from mpocompress.cli.training import (
    AUGMENT_OPT,
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
    SEED_OPT,
    Job,
    check_outputs,
    choose_data,
    data_inputs,
    load_data,
    load_unlabelled_data,
    output_option,
    render,
    report,
    run_all,
    takes_text,
)  # fmt: skip
from mpocompress.io import arch_for_second, load_model
from mpocompress.io.data.unlabelled import is_unlabelled
from mpocompress.train import (
    FINETUNE_DEFAULTS,
    TrainConfig,
    dist_env,
    evaluate,
    finish_distributed,
    freeze_,
    init_distributed,
    prepare_finetune_,
    resolve_device,
)  # fmt: skip
from mpocompress.train.distill import DistillConfig, agreement, distill, metric_of
from mpocompress.utils import call_with, is_causal_lm, main_output, short_error

LM_BATCH_SIZE = 4  # windows per step of a causal LM: 4 x 512 tokens x a 49k vocabulary is 0.4 GB per logits tensor
_D = FINETUNE_DEFAULTS
_DD = DistillConfig()


@app.command()
@handle_errors
def finetune(
    model: Path = MODEL_ARG,
    arch: str | None = ARCH_OPT,
    data: str | None = DATA_OPT,
    data_dir: Path | None = DATA_DIR_OPT,
    image_size: int | None = IMAGE_SIZE_OPT,
    channels: int | None = CHANNELS_OPT,
    normalize: str | None = NORMALIZE_OPT,
    augment: bool | None = AUGMENT_OPT,
    output: Path | None = output_option("Where to write the fine-tuned model (safetensors)."),
    distill_from: Path | None = typer.Option(None, "--distill-from", metavar="ORIGINAL", help="Distil from this model (usually the uncompressed original): train on its softened outputs as well as the labels.", show_default=False),
    teacher_arch: str | None = typer.Option(None, "--teacher-arch", metavar="SPEC", help="Architecture of ORIGINAL when it is a state_dict (default: that of MODEL).", show_default=False),
    distill_alpha: float = typer.Option(_D.distill_alpha, "--distill-alpha", metavar="A", help="Weight of the soft-target term against cross-entropy, in [0, 1]."),
    distill_temperature: float = typer.Option(_D.distill_temperature, "--distill-temperature", metavar="T", help="Softmax temperature of the soft targets."),
    freeze: list[str] = typer.Option([], "--freeze", metavar="central|dense", help="Train only part of the model: 'central' freezes the central core of every MPO, 'dense' every layer that is not an MPO (repeatable).", show_default=False),
    epochs: int = typer.Option(_D.epochs, "--epochs", metavar="N", help=EPOCHS_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", metavar="B", help="Global batch size (split evenly over torchrun processes). [default: 64; 4 windows for a causal LM, whose vocabulary-wide logits dominate memory]", show_default=False),
    lr: float | None = typer.Option(None, "--lr", metavar="LR", help=f"Peak learning rate (default: {_D.lr:g} for SGD on labels, {_DD.lr:g} for AdamW when distilling without labels).", show_default=False),
    momentum: float = MOMENTUM_OPT,
    weight_decay: float | None = typer.Option(None, "--weight-decay", metavar="L", help=f"L2 coefficient lambda of Eq. 7 for SGD (default {_D.weight_decay:g}); AdamW's decoupled decay when distilling (default {_DD.weight_decay:g}).", show_default=False),
    schedule: str | None = typer.Option(None, "--schedule", metavar="NAME", help="Learning rate over the run: cosine|step|constant for SGD (default cosine), linear|cosine|constant for AdamW (default linear).", show_default=False),
    warmup: float | None = typer.Option(None, "--warmup", metavar="EPOCHS", help=f"Linear learning-rate warm-up, in epochs (default: {_D.warmup_epochs:g} for SGD, {_DD.warmup:g} of the run when distilling).", show_default=False),
    loss: str = typer.Option("auto", "--loss", metavar="auto|ce|kd|match", help="ce: cross-entropy on labels (plus soft targets with --distill-from); kd: soft targets only; match: reproduce the teacher's outputs (an encoder's hidden states and pooled embedding, a classifier's logits). auto: ce for labelled data, match without labels. A causal LM distils its next-token distributions (KL at --distill-temperature)."),
    max_length: int | None = MAX_LENGTH_OPT,
    max_samples: int | None = typer.Option(None, "--max-samples", metavar="N", help="Use at most N samples: of text:FILE, the first 80 % of N of its training lines and 20 % of its held-out ones (the file is split 80/20 whole, so every command holds out the same lines); of x-only data, the first N before its split.", show_default=False),
    match_blocks: float = typer.Option(_DD.layer_weight, "--match-blocks", metavar="W", help="When matching an encoder, also match every block's output with this weight."),
    eval_every: int = typer.Option(0, "--eval-every", metavar="STEPS", help="When distilling, also measure the held-out agreement every this many steps (a learning curve in the JSON's runs)."),
    balance: bool = typer.Option(True, "--balance/--no-balance", help="Before training, spread each bond's singular values evenly over the two cores it joins (a canonical gauge: the same matrix, better-conditioned gradients)."),
    seed: int = SEED_OPT,
    runs: int = RUNS_OPT,
    shard_size: str | None = SHARD_SIZE_OPT,
    force: bool = FORCE_OPT,
    resume: bool = RESUME_OPT,
    keep_checkpoint: bool = KEEP_CKPT_OPT,
    device: str = DEVICE_OPT,
    shard: bool = typer.Option(False, "--shard", help="Under torchrun: shard parameters, gradients and optimizer states over the processes (FSDP2) instead of a full replica per process (DDP), for models larger than one device; OUT.ckpt is then a folder of torch.distributed.checkpoint shards, resumable with --resume --shard on as many processes."),
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Fine-tune a converted model (typically the output of `mpocompress convert`) and save it.

    Reports the test accuracy before and after, rho (factorized weights / dense weights, Eq. 9), and
    the number of trainable parameters.
    The input file is never modified.

    \b
    Examples:
      mpocompress finetune small.safetensors --distill-from MODEL_DIR --data text:sentences.txt -o healed.safetensors
      mpocompress finetune runs/fc2_d8.safetensors --data digits -o runs/fc2_d8_ft.safetensors
      torchrun --nproc_per_node 2 -m mpocompress finetune small.safetensors --distill-from MODEL_DIR --data text:sentences.txt --shard -o healed.safetensors
    """
    env = dist_env()
    dev = resolve_device(device, env)
    if shard and not env.distributed:
        fail("--shard splits the model over torchrun processes; launch with torchrun --nproc_per_node N (N >= 2), or drop --shard")
    inputs = (model,) + ((distill_from,) if distill_from else ()) + data_inputs(data)
    shard_bytes = parse_shard_size(shard_size)
    check_outputs("finetune", output, runs, force or resume, env, inputs, folder=shard_bytes is not None)
    err = make_err_console()
    with working(err, f"loading {model}"):
        loaded = load_model(model, arch, trust_pickle)  # errors about the model before the data is read
    choice = choose_data(data, image_size, channels, normalize, (loaded.metadata or {}).get("data"), str(model), data_dir, loaded.model)
    data = choice.name
    distilling = _distilling(loss, data, distill_from, max_samples, eval_every)
    if batch_size is None:
        batch_size = LM_BATCH_SIZE if is_causal_lm(loaded.model) else 64
    if distilling:
        config: TrainConfig | DistillConfig = DistillConfig(
            epochs=epochs, batch_size=batch_size, lr=_DD.lr if lr is None else lr,
            weight_decay=_DD.weight_decay if weight_decay is None else weight_decay,
            warmup=_DD.warmup if warmup is None else warmup / epochs, schedule=schedule or _DD.schedule, seed=seed,
            loss="kd" if loss == "kd" else "match", layer_weight=match_blocks, temperature=distill_temperature,
        )  # fmt: skip
    else:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=_D.lr if lr is None else lr, momentum=momentum,
                             weight_decay=_D.weight_decay if weight_decay is None else weight_decay,
                             schedule=schedule or _D.schedule, warmup_epochs=_D.warmup_epochs if warmup is None else warmup,
                             seed=seed, distill_alpha=distill_alpha, distill_temperature=distill_temperature)  # fmt: skip
    teacher = None
    if distill_from is not None:
        with working(err, f"loading the teacher {distill_from}"):
            taught = load_model(distill_from, arch_for_second(distill_from, teacher_arch, loaded.arch), trust_pickle)
        teacher = taught.model
        if takes_text(teacher) != takes_text(loaded.model):  # before any data is read for the wrong one
            fail(_mismatch(model, loaded, distill_from, taught, "reads different inputs"))
    parts = tuple(dict.fromkeys(freeze))
    freeze_(loaded.model.cpu(), parts)  # validates --freeze now

    def make_model(seed: int):
        m = load_model(model, arch, trust_pickle).model
        if balance:
            prepare_finetune_(m)
        return m, loaded.arch, freeze_(m, parts)

    describe = {"model": str(model), "freeze": list(parts), "balance": balance,
                "distill_from": str(distill_from) if distill_from else None}  # fmt: skip
    if shard:  # a sharded checkpoint resumes only sharded, over as many processes
        describe.update(shard=True, world_size=env.world_size)
    if distilling:
        with working(err, f"reading {data}"):
            train_set, test_set = load_unlabelled_data(data, loaded.model, teacher, max_length, max_samples)
        shape = _check_outputs_match(model, loaded, distill_from, taught, test_set)
        metric = "top1_agreement" if is_causal_lm(teacher) or len(shape) == 2 else "agreement_cosine"  # as metric_of picks
        start = None
        if not shard:  # sharded, the start is measured by the runs, after sharding (no whole copy on any device)
            with working(err, f"measuring the start on the held-out split ({len(test_set)} samples)"):
                before = agreement(loaded.model.to(dev), teacher.to(dev), test_set, dev)
            loaded.model.cpu()  # only measured: the runs train fresh copies (make_model)
            start = (metric_of(before)[1], before["output_rel_error"])
        extra = {"loss_kind": config.loss}
        job = Job("finetune", make_model, train_set, test_set, config, runs, output, resume, dev, env, keep_checkpoint=keep_checkpoint,
                  data_record=choice.record(),
                  describe={**describe, "data": data, "max_length": max_length, "max_samples": max_samples},
                  teacher=teacher, trainer=distill, metric=metric, eval_every=eval_every,
                  start=start, by_loss=is_causal_lm(teacher), shard=shard, measure_start=shard, shard_size=shard_bytes)  # fmt: skip
    else:
        train_set, test_set = load_data(choice, data_dir, augment)
        if teacher is not None:
            _check_outputs_match(model, loaded, distill_from, taught, test_set)
        accuracy_before, loss_before = evaluate(loaded.model.to(dev), test_set, dev)
        loaded.model.cpu()  # only measured: the runs train fresh copies (make_model)
        extra = {"accuracy_before": accuracy_before, "loss_before": loss_before}
        if teacher is not None:  # what distillation pulls towards, measured on the same test split
            extra["accuracy_teacher"], extra["loss_teacher"] = evaluate(teacher.to(dev), test_set, dev)
            extra["params_teacher"] = sum(p.numel() for p in teacher.parameters())
        job = Job("finetune", make_model, train_set, test_set, config, runs, output, resume, dev, env, keep_checkpoint=keep_checkpoint,
                  data_record=choice.record(), describe={"data": train_set.name, **describe}, teacher=teacher, shard=shard,
                  shard_size=shard_bytes)  # fmt: skip
    init_distributed(dev, env)
    outcomes = run_all(job, err)
    finish_distributed(env)
    if not env.is_main:
        return
    if distilling:  # what the start scored on the held-out split: measured here, or by the (sharded) runs
        scored = (start[0], start[1]) if start is not None else (outcomes[0].start[metric], outcomes[0].start["output_rel_error"])
        extra = {f"{metric}_before": scored[0], "output_rel_error_before": scored[1], **extra}
    rep = report(job, outcomes, {"model": str(model), "arch": loaded.arch, "data": train_set.name,
                                 "data_options": choice.options(), **extra,
                                 "params_model_before": sum(p.numel() for p in loaded.model.parameters()),
                                 "distill_from": str(distill_from) if distill_from else None, "freeze": list(parts),
                                 "device": str(dev), "world_size": env.world_size, "sharded": shard})  # fmt: skip
    if json_out:
        print_json(rep)
    else:
        render(make_console(), rep)


def _what(model: nn.Module, arch: str | None) -> str:
    kind = "a text model" if takes_text(model) else "a model of tensor inputs"
    return f"{kind} ({arch or type(model).__name__})"


def _mismatch(model: Path, loaded: Any, distill_from: Path, taught: Any, how: str) -> str:
    return (f"the teacher {distill_from} does not match the student {model}: the teacher is {_what(taught.model, taught.arch)}, "
            f"the student {_what(loaded.model, loaded.arch)}, and it {how}; distil from the original the student was converted from")  # fmt: skip


@torch.no_grad()
def _check_outputs_match(model: Path, loaded: Any, distill_from: Path, taught: Any, data: Any) -> torch.Size:
    """Both models on one held-out sample: the teacher must run on the student's data and give
    outputs of the student's shape (a wrong teacher is named as such, not met as an internal error);
    returns that shape."""
    b = data.batch(torch.arange(1))
    inputs = {"x": b[0]} if isinstance(b, tuple) else dict(b)
    was = [loaded.model.training, taught.model.training]
    loaded.model.eval()
    taught.model.eval()
    try:
        mine = main_output(call_with(loaded.model, inputs)).shape
        try:
            theirs = main_output(call_with(taught.model, inputs)).shape
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            fail(_mismatch(model, loaded, distill_from, taught, f"cannot run on the student's data ({short_error(e, 120)})"))
    finally:
        loaded.model.train(was[0])
        taught.model.train(was[1])
    if mine != theirs:
        fail(_mismatch(model, loaded, distill_from, taught, f"gives outputs of shape {tuple(theirs)} where the student's are {tuple(mine)}"))
    return mine


def _distilling(loss: str, data: str, distill_from: Path | None, max_samples: int | None, eval_every: int) -> bool:
    """Whether this run distils (no labels, or --loss kd|match) rather than training on labels; the
    options that go with it are checked."""
    if loss not in ("auto", "ce", "kd", "match"):
        fail(f"unknown --loss {loss!r}; choose auto, ce, kd or match")
    unlabelled = is_unlabelled(data)
    distilling = unlabelled or loss in ("kd", "match")
    if distilling and distill_from is None:
        fail(f"{'data without labels' if unlabelled else '--loss ' + loss} trains the model to reproduce a teacher: add --distill-from ORIGINAL")
    if unlabelled and loss == "ce":
        fail(f"{data} has no labels for cross-entropy; use --loss match (or kd) with --distill-from ORIGINAL")
    if max_samples is not None and max_samples < 2:
        fail(f"--max-samples must be at least 2, got {max_samples}")
    if eval_every < 0:
        fail(f"--eval-every must be >= 0, got {eval_every}")
    return distilling
