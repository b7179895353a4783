"""The resumable state of a training run: what `fit` hands to `save_state` and takes back as
`resume_state`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.io import load_sharded_tensors
from mpocompress.train.distributed import is_sharded

STATE_FORMAT = "mpocompress-train-state"
STATE_VERSION = 2  # 2: mid-epoch states ("batch", "partial"); version 1 states (epoch ends) are still read


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    lr: float  # learning rate at the epoch's last step
    time_s: float


def snapshot_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list[EpochStats],
    batch: int = 0, partial: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A resumable state: `epoch` epochs done, plus `batch` batches of the next one (with the
    running sums `partial` of its loss and accuracy). For a model sharded with FSDP2 the tensors stay
    sharded (every process holds its own part): "sharded": True, and "tensors" holds the model's and
    optimizer's sharded state dicts for torch.distributed.checkpoint."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        partial, rank = partial or {}, dist.get_rank()  # each process's own running sums and generator, under its rank
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "batch": batch, "sharded": True,
            "partial": {"seen": partial["seen"]} if partial else {}, "history": [asdict(h) for h in history],
            "tensors": {"model": msd, "optimizer": osd, f"rank{rank}": {"rng": torch.get_rng_state(), **(
                {"loss_sum": partial["loss_sum"].float(), "correct": partial["correct"].double()} if partial else {})}},
        }  # fmt: skip
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


def restore_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any], device: torch.device,
    epochs: int | None = None, steps_per_epoch: int | None = None,
) -> tuple[int, int, dict[str, Any] | None, list[EpochStats]]:
    """Put a saved state into the model and optimizer; (epoch, batch, partial sums, history). With
    `epochs` and `steps_per_epoch` (the run's), the state's position is checked against them and
    against its own history: an edited checkpoint must not make a resume skip training."""
    try:
        where = int(state["epoch"]), int(state.get("batch", 0)), len(state["history"])
    except (KeyError, TypeError, ValueError) as e:
        raise MPOCompressError(f"the checkpoint to resume from does not fit this run ({str(e).splitlines()[0]})") from None
    if epochs is not None and steps_per_epoch is not None:
        epoch, batch, done = where
        if not (0 <= epoch <= epochs and done == epoch and 0 <= batch < max(steps_per_epoch, 1) and not (epoch == epochs and batch)):
            raise MPOCompressError(
                f"the checkpoint claims epoch {epoch}, batch {batch} with {done} finished epochs in its history, which this "
                f"run of {epochs} epochs x {steps_per_epoch} steps cannot have written (edited or damaged); start afresh without --resume"
            )
    if state.get("sharded"):
        state = _read_sharded(model, optimizer, state)
    try:
        if not state.get("sharded"):
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


def _read_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
    """A sharded checkpoint's tensors read into this (sharded) model and optimizer; the state with
    its rng and running sums filled in."""
    if not is_sharded(model):
        raise MPOCompressError(f"{state['sharded']} was written by a sharded run (finetune --shard under torchrun); resume it with --shard")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    batch, mine = int(state.get("batch", 0)), f"rank{dist.get_rank()}"
    sums = {"loss_sum": torch.zeros(()), "correct": torch.zeros((), dtype=torch.float64)} if batch else {}  # as saved
    template = {"model": msd, "optimizer": osd, mine: {"rng": torch.get_rng_state(), **sums}}
    load_sharded_tensors(state["sharded"], template)
    set_state_dict(model, optimizer, model_state_dict=template["model"], optim_state_dict=template["optimizer"])
    own = template[mine]
    partial = {"loss_sum": own["loss_sum"], "correct": own["correct"], "seen": state["partial"]["seen"]} if batch else {}
    return {**state, "rng": own["rng"], "partial": partial}
