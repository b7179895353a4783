"""Training and fine-tuning: the paper's protocol (Eq. 7: cross-entropy + L2, SGD with momentum),
with knowledge distillation, resumable state and DistributedDataParallel.

`fit(model, train_set, test_set, config)` trains in place and returns a `FitResult`. It is silent:
progress goes to the `on_batch` / `on_epoch` callbacks, and the resumable state to `save_state`,
which the caller writes where it likes (the CLI uses `mpocompress.io.save_train_state`).

Resuming from a saved state gives the same weights as an uninterrupted run (bit for bit on CPU),
whether the state was saved after an epoch or mid-epoch on a stop request (`should_stop`, e.g. a
signal caught by `StopOnSignal`): the data order of each epoch is seeded by (seed, epoch), the
augmentation of each batch by (seed, epoch, rank, batch), and the global RNG, optimizer state,
step count and the epoch's running loss and accuracy are restored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mpocompress.errors import Interrupted, MPOCompressError
from mpocompress.io.data import ImageSet, batch_indices
from mpocompress.train.config import TrainConfig, lr_at
from mpocompress.train.data import as_dataset
from mpocompress.train.distributed import DistEnv, dist_env, is_sharded, shard_model
from mpocompress.train.evaluation import distillation_loss, evaluate, forward_checked
from mpocompress.train.signals import signal_name
from mpocompress.train.state import EpochStats, restore_state, snapshot_state

BatchCallback = Callable[[int, int, int, float, float], None]  # (epoch, step, steps, loss, accuracy)
EpochCallback = Callable[[EpochStats], None]
StateCallback = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    accuracy: float  # top-1 on the test split after the last epoch, in [0, 1]
    loss: float  # mean cross-entropy on the test split
    epochs: int
    wall_time_s: float
    history: list[EpochStats] = field(default_factory=list)
    steps: int = 0  # optimizer steps of the whole run (those before a resume included)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "history"}, "history": [asdict(h) for h in self.history]}


Objective = Callable[[nn.Module, int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]
"""(net, epoch, batch number, indices) -> (loss, the batch's metric sum, examples): what a step minimises."""


@dataclass
class _Sums:
    """The running loss and metric (correct predictions, or summed agreement) of the epoch in progress."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    def average(self) -> float:
        return float(self.loss_sum) / self.seen

    def partial(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.detach().cpu().clone(), "correct": self.correct.cpu().clone(), "seen": self.seen}


@dataclass
class Loop:
    """The fixed parts of one training run and the steps of its epochs: `fit` (classification) and
    `train.distill.distill` (matching a teacher) differ only in the objective, optimizer, learning
    rate and evaluation they give it."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    train_set: Any  # len() and batches by index: an ImageSet, a TokenSet, ...
    objective: Objective
    lr_fn: Callable[[int], float]  # learning rate at optimizer step k
    peak_lr: float  # the configured learning rate (named in the divergence message)
    epochs: int
    seed: int
    device: torch.device
    env: DistEnv
    local_batch: int
    history: list[EpochStats]
    save_state: StateCallback | None
    on_batch: BatchCallback | None
    should_stop: Callable[[], int] | None
    step: int = 0
    metric_dtype: torch.dtype = torch.int64
    train_mode: bool = True  # False: dropout off and batch-norm statistics frozen while training (distillation)
    eval_every: int = 0  # also evaluate every this many optimizer steps (0: after each epoch only)
    on_eval: Callable[[int, float, float], None] | None = None  # (step, metric, loss) of those evaluations
    evaluate_fn: Callable[[], tuple[float, float]] | None = None

    @property
    def sharded(self) -> bool:
        """FSDP2: saving a state and keeping the best one involve every process, not rank 0 alone."""
        return is_sharded(self.model)

    def stop_requested(self) -> int:
        if self.should_stop is None:
            return 0
        flag = int(self.should_stop() or 0)
        if self.env.distributed:  # every process stops at the same step, or the collectives would hang
            t = torch.tensor([flag], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t)
        return flag

    def check_loss(self, avg: float, epoch: int, batch: int) -> None:
        if not math.isfinite(avg):
            raise MPOCompressError(
                f"the training loss became {avg} in epoch {epoch + 1} (step {batch}); lower --lr "
                f"(now {self.peak_lr:g}) or check the data; the last good checkpoint was kept"
            )

    def train_step(self, epoch: int, i: int, idx: torch.Tensor, sums: _Sums) -> float:
        """One optimizer step on batch i of the epoch; returns its learning rate."""
        lr = self.lr_fn(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, metric, n = self.objective(self.net, epoch, i, idx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        sums.loss_sum += loss.detach() * n
        sums.correct += metric
        sums.seen += n
        return lr

    def train_epoch(self, epoch: int, skip: int, partial: Mapping[str, Any] | None, lr: float) -> tuple[_Sums, float]:
        """The epoch's steps after the first `skip` (done before an interruption, with their sums
        `partial`); a stop request saves the state and raises `Interrupted`."""
        self.net.train(self.train_mode)
        env = self.env
        batches = batch_indices(len(self.train_set), self.local_batch, True, self.seed, epoch, env.rank, env.world_size)
        sums = _Sums(torch.zeros((), device=self.device), torch.zeros((), device=self.device, dtype=self.metric_dtype))
        if skip:  # resuming mid-epoch: the epoch's first `skip` batches are done, their sums restored
            sums = _Sums(partial["loss_sum"].to(self.device), partial["correct"].to(self.device), int(partial["seen"]))
        for i, idx in enumerate(batches):
            if i < skip:
                continue
            lr = self.train_step(epoch, i, idx, sums)
            if self.eval_every and self.step % self.eval_every == 0 and self.evaluate_fn is not None:
                metric, loss = self.evaluate_fn()
                self.net.train(self.train_mode)
                if self.on_eval is not None and env.is_main:
                    self.on_eval(self.step, metric, loss)
            if i == 0 or (i + 1) % 20 == 0 or i + 1 == len(batches):  # at once, then every 20 steps
                avg = sums.average()
                self.check_loss(avg, epoch, i + 1)
                if self.on_batch is not None and env.is_main:
                    self.on_batch(epoch + 1, i + 1, len(batches), avg, float(sums.correct) / sums.seen)
            signum = self.stop_requested()
            if signum:
                self.check_loss(sums.average(), epoch, i + 1)  # never replace a good checkpoint by a diverged one
                if self.save_state is not None and (env.is_main or self.sharded):
                    self.save_state(snapshot_state(self.model, self.optimizer, epoch, self.history, i + 1, sums.partial()))
                raise Interrupted(
                    f"interrupted by {signal_name(signum)} in epoch {epoch + 1}/{self.epochs} "
                    f"after batch {i + 1}/{len(batches)}", signum,
                )  # fmt: skip
        return sums, lr

    def run(
        self, start_epoch: int, skip: int, partial: Mapping[str, Any] | None,
        evaluate_fn: Callable[[], tuple[float, float]], on_epoch: EpochCallback | None,
    ) -> FitResult:  # fmt: skip
        """The epochs from `start_epoch` on (the first resumed after `skip` batches), each followed by
        `evaluate_fn()` -> (metric, loss) on the held-out split, a saved state and `on_epoch`."""
        t_start = time.perf_counter()
        self.evaluate_fn = evaluate_fn
        lr = self.lr_fn(max(self.step - 1, 0))
        for epoch in range(start_epoch, self.epochs):
            t0 = time.perf_counter()
            sums, lr = self.train_epoch(epoch, skip, partial, lr)
            skip = 0
            test_metric, test_loss = evaluate_fn()
            stats = EpochStats(epoch + 1, float(sums.loss_sum) / max(sums.seen, 1), float(sums.correct) / max(sums.seen, 1),
                               test_loss, test_metric, lr, time.perf_counter() - t0)  # fmt: skip
            self.history.append(stats)
            if self.save_state is not None and (self.env.is_main or self.sharded):
                self.save_state(snapshot_state(self.model, self.optimizer, epoch + 1, self.history))
            if on_epoch is not None and (self.env.is_main or self.sharded):
                on_epoch(stats)
            signum = self.stop_requested() if epoch + 1 < self.epochs else 0
            if signum:
                raise Interrupted(f"interrupted by {signal_name(signum)} after epoch {epoch + 1}/{self.epochs}", signum)
        if self.history:
            metric, loss = self.history[-1].test_accuracy, self.history[-1].test_loss
        else:
            metric, loss = evaluate_fn()
        return FitResult(metric, loss, len(self.history), time.perf_counter() - t_start, self.history, self.step)


def fit(
    model: nn.Module,
    train_set: ImageSet | Dataset | DataLoader,
    test_set: ImageSet | Dataset | DataLoader,
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
    shard: bool = False,
) -> FitResult:
    """Train `model` in place: SGD with momentum and L2 weight decay on cross-entropy (plus the
    distillation term when a `teacher` is given), for `config.epochs` epochs.

    Args:
        train_set, test_set: mpocompress's datasets, or any map-style Dataset of (x, y) pairs or a
            DataLoader over one (read by index and batched by `config.batch_size`; see
            `mpocompress.train.data`).
        resume_state: a state passed earlier to `save_state`; training continues after its epoch.
        save_state: called after every epoch with a state that `resume_state` accepts.
        on_batch, on_epoch: progress callbacks (rank 0 only in distributed runs).
        env: the torchrun environment (read from the environment variables by default).
        should_stop: polled after every optimizer step; a non-zero value (a signal number) stops
            the run there: the state, mid-epoch, goes to `save_state` and `Interrupted` is raised.
            In a distributed run the processes agree on the step to stop at.
        shard: under torchrun, shard parameters, gradients and optimizer states with FSDP2
            (`shard_model`) instead of replicating the model (DDP). Every process then calls
            `save_state` (with a sharded state, for `io.save_sharded_train_state`) and `on_epoch`.

    Raises:
        MPOCompressError: when the loss becomes NaN or Inf (the last saved state is kept).
        Interrupted: when `should_stop` asked for a stop (after the state was saved).
    """
    env = env or dist_env()
    device = torch.device(device)
    train_set, test_set = as_dataset(train_set), as_dataset(test_set)
    if not shard:  # sharding moves it, a block at a time
        model.to(device)
    if teacher is not None:
        freeze_teacher(teacher, device)
    local_batch = local_batch_size(config.batch_size, env)
    net = wrap_distributed(model, env, device, shard=shard)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / env.world_size) / local_batch)
    start_epoch, skip, partial, history = 0, 0, None, []
    if resume_state is not None:
        start_epoch, skip, partial, history = restore_state(model, optimizer, resume_state, device, config.epochs, steps_per_epoch)
    if start_epoch == 0 and skip == 0:  # a clear error now if the model does not fit the data, not a traceback later
        with torch.no_grad():
            forward_checked(model.eval(), train_set.batch(torch.arange(min(2, len(train_set))), device)[0], train_set)
    loop = Loop(model, net, optimizer, train_set, _cross_entropy(train_set, teacher, config, device, env.rank),
                lambda k: lr_at(config, k, steps_per_epoch), config.lr, config.epochs, config.seed, device, env, local_batch,
                history, save_state, on_batch, should_stop, step=start_epoch * steps_per_epoch + skip)  # fmt: skip
    return loop.run(start_epoch, skip, partial, lambda: evaluate(model, test_set, device, config.eval_batch_size), on_epoch)


def _cross_entropy(train_set: ImageSet, teacher: nn.Module | None, config: TrainConfig, device: torch.device, rank: int) -> Objective:
    """Eq. 7's data term: cross-entropy on the labels, blended with Hinton's soft targets when a
    teacher is given; the metric is the number of correct predictions."""

    def objective(net: nn.Module, epoch: int, i: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        gen = torch.Generator().manual_seed(_mix(config.seed, epoch, rank, i)) if train_set.augment else None
        x, y = train_set.batch(idx, device, gen)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            a = config.distill_alpha
            loss = (1 - a) * loss + a * distillation_loss(logits, t_logits, config.distill_temperature)
        return loss, (logits.detach().argmax(1) == y).sum(), len(y)

    return objective


def wrap_distributed(model: nn.Module, env: DistEnv, device: torch.device, find_unused: bool = False, shard: bool = False) -> nn.Module:
    """The model in DistributedDataParallel when several processes train it, else itself; with
    `shard`, the model itself sharded with FSDP2 (`shard_model`). `find_unused`: some parameters may
    get no gradient from the loss (a pooler whose output is not matched), which DDP must then be told
    to expect. Call it before building the optimizer."""
    if shard:
        return shard_model(model, env, device)
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    return model


def freeze_teacher(teacher: nn.Module, device: torch.device, move: bool = True) -> None:
    if move:
        teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def local_batch_size(batch_size: int, env: DistEnv) -> int:
    """Each process's share of the global batch."""
    if batch_size % env.world_size:
        raise MPOCompressError(
            f"batch size {batch_size} does not split evenly over {env.world_size} processes; "
            f"use a multiple of {env.world_size}"
        )
    return batch_size // env.world_size


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and L2 weight decay (Eq. 7) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MPOCompressError("the model has no trainable parameters")
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _mix(seed: int, epoch: int, rank: int, batch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + batch * 15_485_863) % (2**63)
