"""What `train` and `finetune` share: options, the loop over --runs seeds with per-epoch
checkpoints and --resume, progress on stderr, and the final report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

import mpocompress.cli.render as rendering
from mpocompress.compress import summarize
from mpocompress.errors import Interrupted, MPOCompressError
from mpocompress.io import (
    check_output_path,
    checkpoint_path_for,
    is_sharded_checkpoint,
    load_train_state,
    mpo_layer_specs,
    remove_train_state,
    save,
    save_sharded_train_state,
    save_train_state,
)  # fmt: skip
from mpocompress.io.data import (
    DATASETS,
    ImageSet,
    data_root,
    default_normalization,
    is_tensor_file,
    load_dataset,
    parse_normalize,
)
from mpocompress.io.data.calibration import check_token_ids, model_tokenizer, text_max_length
from mpocompress.io.data.unlabelled import TEXT_PREFIX, FeatureSet, TokenSet, is_unlabelled, load_unlabelled, read_lines
from mpocompress.train import (
    DistEnv,
    EpochStats,
    FitResult,
    StopOnSignal,
    count_params,
    fit,
    full_state_dict,
    is_sharded,
    load_state,
    mean_std,
)  # fmt: skip
from mpocompress.utils import is_causal_lm, is_hf_model

# ----------------------------------------------------------------------------- shared options

DATA_OPT = typer.Option(None, "--data", metavar="NAME|FILE", help="Dataset: text:FILE (plain text, one sample per line) for a Hugging Face text model; digits (bundled, no files), mnist, fashion-mnist, cifar10, svhn; or a .pt/.npz/.safetensors file holding x and y. Default: the data the model file records (trained, fine-tuned or calibrated on), else digits for an image model.", show_default=False)
IMAGE_SIZE_OPT = typer.Option(None, "--image-size", metavar="N", help="Serve N x N images: digits are rendered at N (8 = scikit-learn's own 8x8 digits), other images resized. Default: as the model file records, else the dataset's size.", show_default=False)
CHANNELS_OPT = typer.Option(None, "--channels", metavar="C", help="Serve C channels: 1 averages colour images, 3 repeats gray ones. Default: as the model file records, else the dataset's.", show_default=False)
NORMALIZE_OPT = typer.Option(None, "--normalize", metavar="none|dataset|MEAN,STD", help="How inputs are normalized: dataset (the training split's mean and std), none (raw values, [0, 1] for 8-bit images) or MEAN,STD. Default: as the model file records, else dataset for named datasets and none for files.", show_default=False)
DATA_DIR_OPT = typer.Option(None, "--data-dir", metavar="DIR", help="Folder with the dataset files (default: $MPOCOMPRESS_DATA, else ./data).", show_default=False)
AUGMENT_OPT = typer.Option(None, "--augment/--no-augment", help="Random crop and flip while training (default: on for cifar10 and svhn, which are the sets that use it).", show_default=False)
EPOCHS_HELP = "Passes over the training split."
BATCH_OPT = typer.Option(64, "--batch-size", metavar="B", help="Global batch size (split evenly over torchrun processes).")
MOMENTUM_OPT = typer.Option(0.9, "--momentum", metavar="M", help="SGD momentum.")
WD_OPT = typer.Option(5e-4, "--weight-decay", metavar="L", help="L2 coefficient lambda of Eq. 7 (SGD weight decay).")
SCHEDULE_OPT = typer.Option("cosine", "--schedule", metavar="cosine|step|constant", help="Learning-rate schedule over the run.")
WARMUP_OPT = typer.Option(0.0, "--warmup", metavar="EPOCHS", help="Linear learning-rate warm-up, in epochs.")
SEED_OPT = typer.Option(0, "--seed", metavar="S", help="Seed of run 1; run i uses S + i - 1.")
RUNS_OPT = typer.Option(1, "--runs", metavar="M", help="Train M times with seeds S..S+M-1 and report the mean +- sigma of Eqs. 10-11.")
FORCE_OPT = typer.Option(False, "--force", help="Overwrite OUT if it exists.")
RESUME_OPT = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.ckpt, the checkpoint written after every epoch.")
KEEP_CKPT_OPT = typer.Option(
    False, "--keep-checkpoint", help="Keep OUT.ckpt (the checkpoint written after every epoch) after the runs succeed; by default it is removed then.",
)  # fmt: skip
DEVICE_OPT = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="Where to train: auto takes a CUDA GPU when there is one.")
EVAL_DEVICE_OPT = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="Where to run the model: auto takes a CUDA GPU when there is one.")


def output_option(help_text: str) -> Any:
    return typer.Option(None, "--output", "-o", metavar="OUT", help=f"{help_text} [required]", show_default=False)


@dataclass(frozen=True)
class DataChoice:
    """The data a command runs on and how it is served, each field from its option, else from what
    the model file records, else the default; `origin` says where the dataset name came from."""

    name: str
    image_size: int | None = None
    channels: int | None = None
    normalize: str | None = None  # "none", "dataset" or "MEAN,STD"; None: the source's default
    origin: str = "default"  # "option", "file" or "default"
    data_dir: str | None = None  # a named set's folder: --data-dir, else $MPOCOMPRESS_DATA, else the file's record

    def record(self) -> dict[str, Any]:
        """What the output file records (paths absolute, so the record holds wherever it is read;
        a named set's folder too, so the next command finds it without --data-dir)."""
        name = str(Path(self.name).resolve()) if is_tensor_file(self.name) else self.name
        if self.name.startswith(TEXT_PREFIX):
            name = TEXT_PREFIX + str(Path(self.name[len(TEXT_PREFIX):]).resolve())
        rec = {"name": name, "image_size": self.image_size, "channels": self.channels, "normalize": self.normalize}
        if self.name in DATASETS and self.name != "digits":  # digits are bundled: no folder
            rec["data_dir"] = str(data_root(self.data_dir).resolve())
        return rec

    def options(self) -> dict[str, Any]:
        """The report's `data_options`."""
        norm = self.normalize
        if norm is None and not is_unlabelled(self.name):  # the source's default, said outright
            norm = default_normalization(self.name)
        return {"image_size": self.image_size, "channels": self.channels, "normalize": norm, "from": self.origin}

    def split(self, split: str, data_dir: Path | None = None, augment: bool | None = None) -> ImageSet:
        norm = parse_normalize(self.normalize) if self.normalize is not None else None
        folder = data_dir if data_dir is not None else self.data_dir
        return load_dataset(self.name, split, folder, augment, self.image_size, channels=self.channels, normalize=norm)


def takes_text(model: nn.Module | None) -> bool:
    """Whether `model` reads token ids (a transformers text model: BERT, Llama, GPT-2, ...)."""
    return model is not None and is_hf_model(model) and getattr(model, "main_input_name", None) == "input_ids"


def choose_data(
    data: str | None, image_size: int | None, channels: int | None, normalize: str | None,
    recorded: dict[str, Any] | None = None, what: str = "the model", data_dir: Path | None = None,
    model: nn.Module | None = None,
) -> DataChoice:  # fmt: skip
    """--data and its serving options, each defaulting to the model file's record. Without either,
    an image model gets the bundled digits and a text model a clear error asking for text:FILE."""
    rec = recorded or {}
    if normalize is not None:
        parse_normalize(normalize)  # a bad value is named before anything is read
    origin = "option" if data is not None else "file" if rec.get("name") else "default"
    if origin == "default" and takes_text(model):
        raise MPOCompressError(f"{what} reads text and records no data to default to; give its data with --data "
                               "text:FILE (plain text, one sentence or paragraph per line)")  # fmt: skip
    name = data if data is not None else rec.get("name") or "digits"
    if model is not None and takes_text(model) and not name.startswith(TEXT_PREFIX) and name.lower() in DATASETS:
        raise MPOCompressError(f"{what} reads text, and {name} is a set of images; give its data with --data text:FILE "
                               "(plain text, one sentence or paragraph per line)")  # fmt: skip
    if model is not None and not takes_text(model) and name.startswith(TEXT_PREFIX):
        raise MPOCompressError(f"{what} does not read text (it is no Hugging Face text model), so {name} cannot feed it; "
                               "give the data it was trained on (a dataset name or a file of tensors x and y)")  # fmt: skip
    if origin == "file":
        path = name[len(TEXT_PREFIX):] if name.startswith(TEXT_PREFIX) else name if is_tensor_file(name) else None
        if path is not None and not Path(path).is_file():
            raise MPOCompressError(f"{what} was trained on {name}, which is not there any more; give the data with --data")
    folder = data_dir if data_dir is not None else os.environ.get("MPOCOMPRESS_DATA") or None
    if folder is None and rec.get("data_dir") and name == rec.get("name"):
        folder = rec["data_dir"]
    return DataChoice(
        name,
        image_size if image_size is not None else rec.get("image_size"),
        channels if channels is not None else rec.get("channels"),
        normalize if normalize is not None else rec.get("normalize"),
        origin,
        str(folder) if folder is not None else None,
    )


def load_data(data: DataChoice, data_dir: Path | None, augment: bool | None) -> tuple[ImageSet, ImageSet]:
    return data.split("train", data_dir, augment), data.split("test", data_dir, augment)


def load_unlabelled_data(
    data: str, model: nn.Module, teacher: nn.Module | None, max_length: int | None, max_samples: int | None
) -> tuple[TokenSet | FeatureSet, TokenSet | FeatureSet]:
    """The train and held-out splits of text:FILE (tokenized with the model's tokenizer, else the
    teacher's; a causal LM's as packed windows, see `text_max_length`) or of a tensors file holding x only."""
    tokenizer = None
    causal = is_causal_lm(model)
    length = text_max_length(model, max_length)
    if data.startswith(TEXT_PREFIX):
        read_lines(Path(data[len(TEXT_PREFIX) :]), max_samples)  # a missing or empty file is named first
        tokenizer = model_tokenizer(model, teacher)
    splits = tuple(load_unlabelled(data, split, tokenizer, length, 0, max_samples, pack=causal) for split in ("train", "test"))
    for ds in splits:
        check_token_ids(ds, data, model, teacher)
    return splits  # type: ignore[return-value]


def run_output(out: Path, run: int) -> Path:
    """OUT for run 1, OUT's stem + .runI + suffix for the others."""
    return out if run == 0 else out.with_name(f"{out.stem}.run{run + 1}{out.suffix}")


# ----------------------------------------------------------------------------- the runs


@dataclass
class RunOutcome:
    seed: int
    result: FitResult
    output: Path | None
    summary: dict[str, Any]
    trainable: int
    curve: list[dict[str, float]] = field(default_factory=list)  # (step, metric, loss, seconds) every job.eval_every steps
    kept: str | None = None  # with Job.start: which state was saved ("start", "epoch N")
    start: dict[str, Any] = field(default_factory=dict)  # with Job.measure_start: the agreement measured before training


@dataclass
class Job:
    """One `train` or `finetune` invocation."""

    command: str  # "train" or "finetune"
    make_model: Callable[[int], tuple[nn.Module, str | None, int]]  # seed -> (model, arch, trainable params)
    train_set: ImageSet | TokenSet | FeatureSet
    test_set: ImageSet | TokenSet | FeatureSet
    config: Any  # TrainConfig, or DistillConfig for distillation
    runs: int
    output: Path | None  # checked beforehand by check_outputs
    resume: bool
    device: torch.device
    env: DistEnv
    describe: dict[str, Any] = field(default_factory=dict)  # what must match for --resume (data, arch, ...)
    teacher: nn.Module | None = None
    trainer: Callable[..., FitResult] | None = None  # None: fit (labels); or train.distill.distill (matching the teacher)
    metric: str = "accuracy"  # what the result's accuracy measures: accuracy, agreement_cosine or top1_agreement
    eval_every: int = 0  # distillation: also measure the agreement every this many steps (the curve)
    keep_checkpoint: bool = False  # keep OUT.ckpt after the runs succeed
    data_record: dict[str, Any] | None = None  # the data recorded in the output files (`DataChoice.record`)
    start: tuple[float, float] | None = None  # distillation: the held-out (metric, loss) before training; the best
    # held-out state (by loss, lower is better, when `by_loss`; else by metric) is what gets saved, the start included
    by_loss: bool = False
    shard: bool = False  # FSDP2 under torchrun (finetune --shard): sharded checkpoints, the whole model gathered to save
    measure_start: bool = False  # distillation without `start`: the trainer measures it, after sharding (RunOutcome.start)
    shard_size: int | None = None  # --shard-size: each output a folder of safetensors shards of at most this many bytes


def data_inputs(data: str | None) -> tuple[Path, ...]:
    """The files --data reads (a tensors file, text:FILE), which no output may replace."""
    if data is None:
        return ()
    if data.startswith(TEXT_PREFIX):
        return (Path(data[len(TEXT_PREFIX) :]),)
    return (Path(data),) if is_tensor_file(data) else ()


def check_outputs(
    command: str, output: Path | None, runs: int, overwrite: bool, env: DistEnv, inputs: tuple[Path, ...] = (), folder: bool = False
) -> None:
    """Fail before any loading or training when an output cannot or must not be written."""
    if runs < 1:
        raise MPOCompressError(f"--runs must be at least 1, got {runs}")
    if output is None:
        raise MPOCompressError(f"{command} needs an output file: add -o OUT.safetensors")
    if env.is_main:
        for r in range(runs):
            out = run_output(output, r)
            check_output_path(out, overwrite, inputs, folder=folder)
            ckpt = checkpoint_path_for(out)
            for src in inputs:  # the checkpoint is written too: it must not be an input either (links resolved)
                if src.exists() and ckpt.exists() and ckpt.resolve() == src.resolve():
                    raise MPOCompressError(f"{src} is the checkpoint {ckpt} this run would write over; choose another -o "
                                           "(inputs are never modified)")  # fmt: skip
            if ckpt.exists() and not (ckpt.is_file() or is_sharded_checkpoint(ckpt)):
                raise MPOCompressError(f"the checkpoint path {ckpt} is not a regular file (nor a sharded checkpoint folder); choose another -o")


def run_all(job: Job, console: Console) -> list[RunOutcome]:
    """Train job.runs models, each with its own seed, checkpoint and output file. SIGINT / SIGTERM
    stop the run after the current step with a resumable checkpoint (`Interrupted`). Once every run
    is complete their checkpoints are removed, unless `job.keep_checkpoint`."""
    with StopOnSignal() as stop:
        outcomes = [_one_run(job, r, console, stop) for r in range(job.runs)]
    if not job.keep_checkpoint and job.env.is_main and not stop():  # every run is complete: no resume needs them
        for o in outcomes:
            if o.output is not None:
                remove_train_state(checkpoint_path_for(o.output))
    return outcomes


def _one_run(job: Job, r: int, console: Console, stop: StopOnSignal) -> RunOutcome:
    seed = job.config.seed + r
    config = replace(job.config, seed=seed)
    torch.manual_seed(seed)
    model, arch, trainable = job.make_model(seed)
    out = run_output(job.output, r) if job.output is not None else None
    ckpt = checkpoint_path_for(out) if out is not None else None
    identity = json.loads(json.dumps({**job.describe, "command": job.command, "arch": arch, "config": config.to_dict(),
                                      "mpo_layers": mpo_layer_specs(model)}, sort_keys=True, default=str))  # fmt: skip
    resume_state = _resume_state(ckpt, identity, first=(r == 0), out=out) if (job.resume and ckpt is not None) else None

    def save_state(state: dict[str, Any]) -> None:
        if ckpt is None:
            return
        if state.get("sharded"):  # every process writes its own shards
            meta = {k: v for k, v in state.items() if k != "tensors"}
            save_sharded_train_state(ckpt, {**meta, "job": json.dumps(identity, sort_keys=True)}, state["tensors"])
        else:
            save_train_state(ckpt, {**state, "job": json.dumps(identity, sort_keys=True)})

    label = f"run {r + 1}/{job.runs} (seed {seed})" if job.runs > 1 else f"seed {seed}"
    with _progress(console, job.env) as progress:
        task = progress.add_task(label, total=None, stats="")

        plain = {"at": time.monotonic()}  # not a terminal: a plain line every PLAIN_EVERY_S instead of the bar

        def on_batch(epoch: int, step: int, steps: int, loss: float, acc: float) -> None:
            # one bar over the whole run (steps of all epochs): its clock runs until the last step
            stats = f"loss {loss:.4f}" + (f"  acc {acc:.2%}" if job.metric == "accuracy" else "")  # what the run optimizes
            progress.update(task, description=f"{label} epoch {epoch}/{config.epochs}", completed=(epoch - 1) * steps + step,
                            total=config.epochs * steps, stats=stats)  # fmt: skip
            if not console.is_terminal and job.env.is_main and time.monotonic() - plain["at"] >= rendering.PLAIN_EVERY_S:
                plain["at"] = time.monotonic()
                console.print(f"{label} epoch {epoch}/{config.epochs} step {step}/{steps}: {stats}", markup=False, highlight=False, soft_wrap=True)

        best: dict[str, Any] = {}
        if job.start is not None and resume_state is None:  # the start is a candidate: never save worse than it
            best.update(score=_score(job, *job.start), at="start", state=_cpu_state(model), values=job.start)

        def on_epoch(s: EpochStats) -> None:
            if best and _score(job, s.test_accuracy, s.test_loss) > best["score"]:
                best.update(score=_score(job, s.test_accuracy, s.test_loss), at=f"epoch {s.epoch}", state=_cpu_state(model),
                            values=(s.test_accuracy, s.test_loss))  # fmt: skip
            if job.metric == "accuracy":
                text = (f"train loss {s.train_loss:.4f} acc {s.train_accuracy:.2%} | test loss {s.test_loss:.4f} "
                        f"acc {s.test_accuracy:.2%}")  # fmt: skip
            else:
                text = f"train loss {s.train_loss:.4f} | held-out {job.metric} {s.test_accuracy:.4f}, output error {s.test_loss:.4f}"
            if job.env.is_main:  # a sharded run calls this on every process, for the best state
                progress.console.print(f"{label} epoch {s.epoch}/{config.epochs}: {text} | lr {s.lr:.3g} | {s.time_s:.1f} s", highlight=False)

        curve: list[dict[str, float]] = []
        began = time.perf_counter()

        def on_eval(step: int, metric: float, loss: float, more: dict[str, float] | None = None) -> None:
            # seconds: wall time since the run began, evaluations included; a causal LM's perplexity and KL too
            curve.append({"step": step, job.metric: metric, "output_rel_error": loss, **(more or {}),
                          "seconds": round(time.perf_counter() - began, 3)})  # fmt: skip
            progress.console.print(f"{label} step {step}: {job.metric} {metric:.4f}, output error {loss:.4f}", highlight=False)

        extra = {"eval_every": job.eval_every, "on_eval": on_eval} if job.eval_every else {}
        if job.shard:
            extra["shard"] = True
        measured: dict[str, Any] = {}
        if job.measure_start:
            whole = _cpu_state(model) if resume_state is None else None  # the start's state, taken whole before sharding

            def on_start(rep: dict[str, Any]) -> None:
                measured.update(rep)
                if whole is not None:  # the start is a candidate: never save worse than it
                    values = (rep[job.metric], rep["output_rel_error"])
                    best.update(score=_score(job, *values), at="start", state=whole, values=values)

            extra["on_start"] = on_start
        try:
            trainer = job.trainer or fit
            result = trainer(model, job.train_set, job.test_set, config, teacher=job.teacher, device=job.device,
                                 resume_state=resume_state, save_state=save_state, on_batch=on_batch, on_epoch=on_epoch,
                                 env=job.env, should_stop=stop, **extra)  # fmt: skip
        except Interrupted as e:
            where = f"{ckpt} holds the run" if ckpt is not None and ckpt.exists() else "nothing was saved"
            raise Interrupted(f"{e} ({label}); {where}; rerun the same command with --resume to continue", e.signum) from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, the last checkpoint stays
            if ckpt is not None and ckpt.exists() and job.env.is_main:
                console.print(f"interrupted: {ckpt} holds the last checkpoint; add --resume to continue", highlight=False)
            raise
    kept = None
    if best:
        kept = best["at"]
        if kept != f"epoch {result.epochs}":  # a later epoch did worse on held-out data: save the best one
            load_state(model, best["state"])  # the start's state is whole, a sharded run's later ones sharded
            result.accuracy, result.loss = best["values"]
            if job.env.is_main:
                console.print(f"{label}: the held-out {'loss' if job.by_loss else job.metric} was best {'at the start' if kept == 'start' else 'after ' + kept}; "
                              f"saving that state", highlight=False)  # fmt: skip
    if is_sharded(model):  # the whole model gathered to rank 0, into a plain copy that is saved as any other
        whole = full_state_dict(model)
        if job.env.is_main:
            model = job.make_model(seed)[0]
            model.load_state_dict(whole)
    model = model.cpu()
    if out is not None and job.env.is_main:
        extra = {"source_format": job.command, "training": {**job.describe, "config": config.to_dict(),
                 "accuracy": result.accuracy, "loss": result.loss, "epochs": result.epochs}}  # fmt: skip
        if job.data_record is not None:
            extra["data"] = job.data_record
        save(model, out, arch, force=True, extra_metadata=extra, shard_size=job.shard_size)
    if stop() and r + 1 < job.runs:
        raise Interrupted(f"interrupted after run {r + 1}/{job.runs}: {out} is complete; rerun the same command "
                          "with --resume for the remaining runs", stop())  # fmt: skip
    return RunOutcome(seed, result, out, summarize(model) if job.env.is_main else {}, trainable, curve, kept, measured)


def _score(job: Job, metric: float, loss: float) -> float:
    """Higher is better: the held-out metric, or minus the loss with `job.by_loss`."""
    return -loss if job.by_loss else metric


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _resume_state(ckpt: Path, identity: dict[str, Any], first: bool, out: Path) -> dict[str, Any] | None:
    if not ckpt.exists() and not first:
        return None  # an earlier run was the one interrupted; this one starts afresh
    if not ckpt.exists() and out.exists():
        raise MPOCompressError(
            f"no checkpoint to resume from at {ckpt}: {out} exists, so the run finished and its checkpoint was removed "
            "(--keep-checkpoint keeps it); drop --resume to train afresh (with --force to replace the output)"
        )
    state = load_train_state(ckpt)
    saved = json.loads(state.get("job", "{}"))
    differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differ:
        key = differ[0]
        detail = ""
        if key == "config":
            sub = sorted(k for k in set(saved.get(key, {})) | set(identity[key]) if saved[key].get(k) != identity[key].get(k))
            detail = f" ({', '.join(f'{k}: {saved[key].get(k)} then, {identity[key].get(k)} now' for k in sub)})"
        raise MPOCompressError(
            f"{ckpt} was written by a different run: its {key} differs{detail}; rerun with the same options "
            "to resume, or drop --resume to start afresh"
        )
    return state


def _progress(console: Console, env: DistEnv) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), console=console, transient=True, disable=not env.is_main,
    )  # fmt: skip


# ----------------------------------------------------------------------------- report


def report(job: Job, outcomes: list[RunOutcome], extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of `train` / `finetune`: means over runs, then each run."""
    accs = [o.result.accuracy for o in outcomes]
    acc, std = mean_std(accs)
    loss, _ = mean_std([o.result.loss for o in outcomes])
    s = outcomes[0].summary
    if job.metric == "accuracy":
        measured = {"accuracy": acc, "accuracy_std": std, "loss": loss}
    else:  # distillation without labels: agreement with the teacher on the held-out split
        measured = {"accuracy": None, "accuracy_std": None, "metric": job.metric, job.metric: acc,
                    f"{job.metric}_std": std, "output_rel_error": loss}  # fmt: skip
    return {
        "command": job.command,
        **extra,
        **measured,
        "rho": s["rho"],
        "params_model_after": s["params_model"],
        "params_model_dense": s["params_model_dense"],
        "params_mpo": s["params_mpo"],
        "trainable_params": outcomes[0].trainable,
        "epochs": job.config.epochs,
        "wall_time_s": sum(o.result.wall_time_s for o in outcomes),
        "n_runs": len(outcomes),
        "output": str(job.output) if job.output else None,
        "mpo_layers": s["mpo_layers"],
        "config": job.config.to_dict(),
        "runs": [
            {"seed": o.seed, "output": str(o.output) if o.output else None, **o.result.to_dict(),
             **({"curve": o.curve} if job.eval_every else {}), **({"kept": o.kept} if o.kept is not None else {})}
            for o in outcomes
        ],  # fmt: skip
    }


def render(console: Console, rep: dict[str, Any]) -> None:
    t = Table(title=f"mpocompress {rep['command']}", title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows = []
    if rep.get("data"):
        opts = rep.get("data_options") or {}
        served = [f"{k.replace('_', ' ')} {opts[k]}" for k in ("image_size", "channels", "normalize") if opts.get(k) is not None]
        whence = " (recorded in the model file)" if opts.get("from") == "file" else ""
        rows.append(("data", f"{rep['data']}{whence}" + (f"; {', '.join(served)}" if served else "")))
    metric = rep.get("metric", "accuracy")
    if metric == "accuracy":
        acc = f"{rep['accuracy']:.2%}"
        if rep["accuracy_std"] is not None:
            acc += f" +- {rep['accuracy_std']:.2%} over {rep['n_runs']} runs"
        if "accuracy_teacher" in rep:
            rows.append(("teacher -> before -> after", f"{rep['accuracy_teacher']:.2%} -> {rep['accuracy_before']:.2%} -> {rep['accuracy']:.2%}"))
        if "accuracy_before" in rep:
            rows.append(("test accuracy before", f"{rep['accuracy_before']:.2%}"))
        rows += [("test accuracy", acc), ("test loss", f"{rep['loss']:.4f}")]
    else:
        value = f"{rep[metric]:.4f}" + (f" +- {rep[metric + '_std']:.4f} over {rep['n_runs']} runs" if rep[metric + "_std"] is not None else "")
        if f"{metric}_before" in rep:
            rows.append((f"held-out {metric} before", f"{rep[metric + '_before']:.4f}"))
        rows += [(f"held-out {metric}", value), ("held-out output error", f"{rep['output_rel_error']:.4f}")]
    rows += [
        ("parameters", f"{rep['params_model_after']:,} (dense equivalent {rep['params_model_dense']:,})"),
        ("trainable parameters", f"{rep['trainable_params']:,}"),
        *([("rho (factorized / dense weights, Eq. 9)", f"{rep['rho']:.4g}"),
           ("factorized layers", ", ".join(f"{m['name']} {m['notation']}" for m in rep["mpo_layers"]))] if rep["mpo_layers"] else []),
        ("epochs, wall time", f"{rep['epochs']}, {rep['wall_time_s']:.1f} s"),
        ("written", ", ".join(str(r["output"]) for r in rep["runs"]) or "-"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if "accuracy_teacher" in rep:  # the whole story in one line: the original, the conversion, the fine-tuning
        console.print(
            f"summary: dense {rep['accuracy_teacher']:.2%} -> converted {rep['accuracy_before']:.2%} -> fine-tuned "
            f"{rep['accuracy']:.2%}; parameters {rep['params_teacher']:,} -> {rep['params_model_after']:,}", highlight=False,
        )  # fmt: skip


def count_trainable(model: nn.Module) -> int:
    return count_params(model, trainable_only=True)
