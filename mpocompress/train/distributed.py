"""Where a process stands in a torchrun launch, and which device it trains on."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mpocompress.errors import MPOCompressError


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
        env = DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise MPOCompressError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (set by torchrun)") from None
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise MPOCompressError(
            f"the environment says RANK={env.rank}, WORLD_SIZE={env.world_size}, LOCAL_RANK={env.local_rank}, which no torchrun "
            "launch gives (WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE); unset them, or launch with torchrun"
        )
    if env.world_size > 1 and not os.environ.get("MASTER_ADDR"):
        raise MPOCompressError(f"WORLD_SIZE={env.world_size} but MASTER_ADDR is not set; launch with torchrun (which sets both) or unset WORLD_SIZE")
    return env


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


def finish_distributed(env: DistEnv) -> None:
    """Leave the process group together: a barrier first, so no process tears the group down (and
    exits) while another still talks through it; and garbage collected around it, so no tensor a
    collective touched is left to the interpreter's shutdown, where gloo's threads abort the process
    (SIGABRT, "terminate called without an active exception") after a run that succeeded."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def shard_model(model: nn.Module, env: DistEnv, device: torch.device | str = "cpu") -> nn.Module:
    """Shard `model`'s parameters, gradients and optimizer states over the torchrun processes with
    FSDP2 (`torch.distributed.fsdp.fully_shard`), in place: each block of a stack (every member of an
    `nn.ModuleList` that holds parameters, e.g. a transformer's decoder layers) is one unit, gathered
    for its own forward and backward only; the rest (embeddings, a tied head, norms) is the root's.
    Gradients are averaged over the processes, as DistributedDataParallel does. Build the optimizer
    after this call: the parameters become DTensors. Each unit is moved to `device` as it is sharded,
    so a model left on the CPU reaches the device one block at a time, never whole."""
    if not env.distributed:
        raise MPOCompressError("--shard splits the model over torchrun processes; launch with torchrun --nproc_per_node N, or drop --shard")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (env.world_size,))
    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst if any(True for _ in m.parameters())]
    for block in blocks:  # the outermost stack's blocks: a block inside another block stays its parent's
        if not _inside_other(block, blocks):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _inside_other(block: nn.Module, blocks: list[nn.Module]) -> bool:
    return any(other is not block and any(sub is block for sub in other.modules()) for other in blocks)


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_model` (FSDP2) sharded this model."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state)`, for a sharded model too: its own sharded state dicts load as
    they are, a whole one (plain tensors: the state taken before sharding, which every process holds)
    is cut by each process to its shards."""
    from torch.distributed.tensor import DTensor

    if is_sharded(model) and not any(isinstance(v, DTensor) for v in state.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded model, on the CPU of rank 0 (other processes get
    an empty dict); every process calls it together."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
