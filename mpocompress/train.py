"""Training and fine-tuning: the paper's protocol (Eq. 7: cross-entropy + L2, SGD with momentum),
knowledge distillation, partial freezing of MPOs, resumable state and DistributedDataParallel.

`fit(model, train_set, test_set, config)` trains in place and returns a `FitResult`. It is silent:
progress goes to the `on_batch` / `on_epoch` callbacks, and the resumable state to `save_state`,
which the caller writes where it likes (the CLI uses `serialization.save_train_state`).

Resuming from a saved state gives the same weights as an uninterrupted run (bit for bit on CPU),
whether the state was saved after an epoch or mid-epoch on a stop request (`should_stop`, e.g. a
signal caught by `StopOnSignal`): the data order of each epoch is seeded by (seed, epoch), the
augmentation of each batch by (seed, epoch, rank, batch), and the global RNG, optimizer state,
step count and the epoch's running loss and accuracy are restored.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mpocompress.data import ImageSet, batch_indices
from mpocompress.errors import Interrupted, MPOCompressError
from mpocompress.layers import MPO_LAYERS
from mpocompress.mpo import balance_cores

SCHEDULES = ("cosine", "step", "constant")
FREEZE_PARTS = ("central", "dense")
STATE_FORMAT = "mpocompress-train-state"
STATE_VERSION = 2  # 2: mid-epoch states ("batch", "partial"); version 1 states (epoch ends) are still read


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (Eq. 7 of the paper: cross-entropy + L2, SGD with momentum)."""

    epochs: int = 20  # passes over the training split
    batch_size: int = 64  # global batch: split evenly over distributed processes
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # the L2 coefficient lambda of Eq. 7 (applied as SGD weight decay)
    schedule: str = "cosine"  # learning rate over the run: cosine to 0, step (x0.1 at 50% and 75%), constant
    warmup_epochs: float = 0.0  # linear warm-up from 0 to `lr` over this many epochs
    seed: int = 0  # seeds data order, augmentation and the initialisation the caller does
    distill_alpha: float = 0.7  # weight of the distillation term when a teacher is given
    distill_temperature: float = 4.0  # softmax temperature of distillation
    eval_batch_size: int = 1000  # batch size for measuring test accuracy

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be a whole number >= 1, got {self.epochs!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch size must be a whole number >= 1, got {self.batch_size!r}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr!r}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum!r}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay!r}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
            (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs, f"warm-up must lie in [0, epochs], got {self.warmup_epochs!r}"),
            (0 <= self.distill_alpha <= 1, f"distillation weight must lie in [0, 1], got {self.distill_alpha!r}"),
            (self.distill_temperature > 0, f"distillation temperature must be > 0, got {self.distill_temperature!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise MPOCompressError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FINETUNE_DEFAULTS = TrainConfig(epochs=3, lr=0.02, warmup_epochs=0.0)  # `finetune` starts from a trained model


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step `step` (0-based)."""
    total = config.epochs * steps_per_epoch
    warm = config.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    progress = (step - warm) / max(1.0, total - warm)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))  # step


# --------------------------------------------------------------------------- results


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    lr: float  # learning rate at the epoch's last step
    time_s: float


@dataclass
class FitResult:
    accuracy: float  # top-1 on the test split after the last epoch, in [0, 1]
    loss: float  # mean cross-entropy on the test split
    epochs: int
    wall_time_s: float
    history: list[EpochStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "history"}, "history": [asdict(h) for h in self.history]}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Eqs. 10-11: the mean and the sample standard deviation (None for a single run)."""
    m = len(values)
    if m == 0:
        raise MPOCompressError("no runs to average")
    mean = sum(values) / m
    if m == 1:
        return mean, None
    return mean, math.sqrt(sum((a - mean) ** 2 for a in values) / (m - 1))


# --------------------------------------------------------------------------- devices, processes


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun launch (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise MPOCompressError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (set by torchrun)") from None


def resolve_device(name: str, env: DistEnv | None = None) -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda' (each torchrun process takes GPU LOCAL_RANK)."""
    env = env or dist_env()
    if name not in ("auto", "cpu", "cuda"):
        raise MPOCompressError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MPOCompressError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def init_distributed(device: torch.device, env: DistEnv | None = None) -> DistEnv:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when launched with several processes."""
    env = env or dist_env()
    if env.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return env


# --------------------------------------------------------------------------- parameters


def central_core_index(layer: nn.Module) -> int:
    """The central core of an MPO: the one holding the most parameters, the middle one on ties."""
    sizes = [c.numel() for c in layer.cores]
    mid = (len(sizes) - 1) / 2
    return max(range(len(sizes)), key=lambda i: (sizes[i], -abs(i - mid)))


def freeze_(model: nn.Module, parts: Sequence[str]) -> int:
    """Freeze parts of a model in place and return the number of trainable parameters left.

    Args:
        parts: "central" freezes the central core of every MPO layer (fine-tune only the auxiliary
            cores and biases, as in later MPO work on light fine-tuning); "dense" freezes every
            parameter outside the MPO layers.
    """
    for p in parts:
        if p not in FREEZE_PARTS:
            raise MPOCompressError(f"unknown part to freeze {p!r}; choose from {', '.join(FREEZE_PARTS)}")
    mpo_layers = [m for m in model.modules() if isinstance(m, MPO_LAYERS)]
    if parts and not mpo_layers:
        raise MPOCompressError("the model has no MPO layers to fine-tune partially; convert it first or drop --freeze")
    if "dense" in parts:
        in_mpo = {id(p) for m in mpo_layers for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in in_mpo:
                p.requires_grad_(False)
    if "central" in parts:
        for m in mpo_layers:
            m.cores[central_core_index(m)].requires_grad_(False)
    trainable = count_params(model, trainable_only=True)
    if trainable == 0:
        raise MPOCompressError("nothing left to train after --freeze; freeze fewer parts")
    return trainable


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: ImageSet, device: torch.device | str = "cpu", batch_size: int = 1000
) -> tuple[float, float]:
    """Top-1 accuracy (a fraction) and mean cross-entropy of `model` on `dataset`, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for idx in torch.arange(len(dataset)).split(batch_size):
            x, y = dataset.batch(idx, device)
            logits = _forward(model, x, dataset)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset), loss_sum / len(dataset)


def _forward(model: nn.Module, x: torch.Tensor, dataset: ImageSet) -> torch.Tensor:
    try:
        logits = model(x)
    except RuntimeError as e:
        if "shape" in str(e) or "size" in str(e):
            raise MPOCompressError(
                f"the model does not take {dataset.name} images of shape {'x'.join(map(str, dataset.image_shape))} "
                f"({str(e).splitlines()[0]}); pick the architecture's in_channels / image_size to match, "
                "e.g. --arch 'lenet5(in_channels=3,image_size=32)'"
            ) from None
        raise
    if logits.ndim != 2 or logits.shape[1] < dataset.num_classes:
        raise MPOCompressError(
            f"the model gives outputs of shape {tuple(logits.shape)} but {dataset.name} has {dataset.num_classes} "
            "classes; set num_classes in the architecture"
        )
    return logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target term: T^2 KL(softmax(teacher/T) || softmax(student/T))."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t


# --------------------------------------------------------------------------- stopping on a signal


class StopOnSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM do not kill the process: they are recorded, and
    `fit(..., should_stop=stop)` stops after the current step with a resumable state. A second
    signal interrupts at once (KeyboardInterrupt). Handlers are installed only in the main thread
    and restored on exit.

        with StopOnSignal() as stop:
            fit(model, train, test, config, save_state=..., should_stop=stop)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __call__(self) -> int:
        """The signal received (0 while none was)."""
        return self.signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


# --------------------------------------------------------------------------- the loop


BatchCallback = Callable[[int, int, int, float, float], None]  # (epoch, step, steps, loss, accuracy)
EpochCallback = Callable[[EpochStats], None]
StateCallback = Callable[[dict[str, Any]], None]


def fit(
    model: nn.Module,
    train_set: ImageSet,
    test_set: ImageSet,
    config: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    resume_state: Mapping[str, Any] | None = None,
    save_state: StateCallback | None = None,
    on_batch: BatchCallback | None = None,
    on_epoch: EpochCallback | None = None,
    env: DistEnv | None = None,
    should_stop: Callable[[], int] | None = None,
) -> FitResult:
    """Train `model` in place: SGD with momentum and L2 weight decay on cross-entropy (plus the
    distillation term when a `teacher` is given), for `config.epochs` epochs.

    Args:
        resume_state: a state passed earlier to `save_state`; training continues after its epoch.
        save_state: called after every epoch with a state that `resume_state` accepts.
        on_batch, on_epoch: progress callbacks (rank 0 only in distributed runs).
        env: the torchrun environment (read from the environment variables by default).
        should_stop: polled after every optimizer step; a non-zero value (a signal number) stops
            the run there: the state, mid-epoch, goes to `save_state` and `Interrupted` is raised.
            In a distributed run the processes agree on the step to stop at.

    Raises:
        MPOCompressError: when the loss becomes NaN or Inf (the last saved state is kept).
        Interrupted: when `should_stop` asked for a stop (after the state was saved).
    """
    env = env or dist_env()
    device = torch.device(device)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if config.batch_size % env.world_size:
        raise MPOCompressError(
            f"batch size {config.batch_size} does not split evenly over {env.world_size} processes; "
            f"use a multiple of {env.world_size}"
        )
    local_batch = config.batch_size // env.world_size
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MPOCompressError("the model has no trainable parameters")
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / env.world_size) / local_batch)
    start_epoch, skip, partial, history = 0, 0, None, []
    if resume_state is not None:
        start_epoch, skip, partial, history = _restore(model, optimizer, resume_state, device)
    net: nn.Module = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if start_epoch == 0 and skip == 0:  # a clear error now if the model does not fit the data, not a traceback later
        with torch.no_grad():
            _forward(model.eval(), train_set.batch(torch.arange(min(2, len(train_set))), device)[0], train_set)

    def stop_requested() -> int:
        if should_stop is None:
            return 0
        flag = int(should_stop() or 0)
        if env.distributed:  # every process stops at the same step, or the collectives would hang
            t = torch.tensor([flag], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t)
        return flag

    def check_loss(avg: float, epoch: int, batch: int) -> None:
        if not math.isfinite(avg):
            raise MPOCompressError(
                f"the training loss became {avg} in epoch {epoch + 1} (step {batch}); lower --lr "
                f"(now {config.lr:g}) or check the data; the last good checkpoint was kept"
            )

    t_start = time.perf_counter()
    step = start_epoch * steps_per_epoch + skip
    lr = lr_at(config, max(step - 1, 0), steps_per_epoch)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        net.train()
        batches = batch_indices(len(train_set), local_batch, True, config.seed, epoch, env.rank, env.world_size)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        if skip:  # resuming mid-epoch: the epoch's first `skip` batches are done, their sums restored
            loss_sum, correct, seen = partial["loss_sum"].to(device), partial["correct"].to(device), int(partial["seen"])
        for i, idx in enumerate(batches):
            if i < skip:
                continue
            lr = lr_at(config, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = torch.Generator().manual_seed(_mix(config.seed, epoch, env.rank, i)) if train_set.augment else None
            x, y = train_set.batch(idx, device, gen)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                a = config.distill_alpha
                loss = (1 - a) * loss + a * distillation_loss(logits, t_logits, config.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if (i + 1) % 20 == 0 or i + 1 == len(batches):
                avg = float(loss_sum) / seen
                check_loss(avg, epoch, i + 1)
                if on_batch is not None and env.is_main:
                    on_batch(epoch + 1, i + 1, len(batches), avg, int(correct) / seen)
            signum = stop_requested()
            if signum:
                check_loss(float(loss_sum) / seen, epoch, i + 1)  # never replace a good checkpoint by a diverged one
                if save_state is not None and env.is_main:
                    partial = {"loss_sum": loss_sum.detach().cpu().clone(), "correct": correct.cpu().clone(), "seen": seen}
                    save_state(_state(model, optimizer, epoch, history, batch=i + 1, partial=partial))
                raise Interrupted(
                    f"interrupted by {_signal_name(signum)} in epoch {epoch + 1}/{config.epochs} "
                    f"after batch {i + 1}/{len(batches)}", signum,
                )  # fmt: skip
        skip = 0
        test_acc, test_loss = evaluate(model, test_set, device, config.eval_batch_size)
        stats = EpochStats(epoch + 1, float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1), test_loss, test_acc,
                           lr, time.perf_counter() - t0)  # fmt: skip
        history.append(stats)
        if save_state is not None and env.is_main:
            save_state(_state(model, optimizer, epoch + 1, history))
        if on_epoch is not None and env.is_main:
            on_epoch(stats)
        signum = stop_requested() if epoch + 1 < config.epochs else 0
        if signum:
            raise Interrupted(f"interrupted by {_signal_name(signum)} after epoch {epoch + 1}/{config.epochs}", signum)
    if history:
        acc, loss = history[-1].test_accuracy, history[-1].test_loss
    else:
        acc, loss = evaluate(model, test_set, device, config.eval_batch_size)
    return FitResult(acc, loss, len(history), time.perf_counter() - t_start, history)


def _mix(seed: int, epoch: int, rank: int, batch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + batch * 15_485_863) % (2**63)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _state(
    model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list[EpochStats],
    batch: int = 0, partial: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A resumable state: `epoch` epochs done, plus `batch` batches of the next one (with the
    running sums `partial` of its loss and accuracy)."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "epoch": epoch,
        "batch": batch,
        "partial": partial or {},
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),  # a snapshot: training goes on updating the buffers
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": [asdict(h) for h in history],
    }


def _restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any], device: torch.device
) -> tuple[int, int, dict[str, Any] | None, list[EpochStats]]:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = [EpochStats(**h) for h in state["history"]]
        epoch, batch = int(state["epoch"]), int(state.get("batch", 0))
        partial = dict(state["partial"]) if batch else None
        if partial is not None and not {"loss_sum", "correct", "seen"} <= set(partial):
            raise KeyError("partial")
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise MPOCompressError(f"the checkpoint to resume from does not fit this run ({str(e).splitlines()[0]})") from None
    for st in optimizer.state.values():  # momentum buffers onto the training device
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                st[k] = v.to(device)
    return epoch, batch, partial, history


@torch.no_grad()
def prepare_finetune_(model: nn.Module) -> nn.Module:
    """Put every MPO layer's cores in the balanced gauge (`mpo.balance_cores`), in place: the
    layer computes the same map, and SGD trains its cores at comparable rates."""
    for m in model.modules():
        if isinstance(m, MPO_LAYERS):
            for p, c in zip(m.cores, balance_cores(list(m.cores))):
                p.copy_(c)
    return model
