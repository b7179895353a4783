"""Training: settings (`config`), the loop (`loop`), its resumable state (`state`), evaluation,
freezing (`params`), torchrun (`distributed`) and clean stops on signals (`signals`)."""

from mpocompress.train.config import FINETUNE_DEFAULTS, SCHEDULES, TrainConfig, lr_at
from mpocompress.train.distributed import DistEnv, dist_env, finish_distributed, full_state_dict, init_distributed, is_sharded, load_state, resolve_device, shard_model
from mpocompress.train.evaluation import distillation_loss, evaluate, mean_std, optimize_on_first_batch
from mpocompress.train.loop import BatchCallback, EpochCallback, FitResult, StateCallback, fit
from mpocompress.train.params import FREEZE_PARTS, central_core_index, count_params, freeze_, prepare_finetune_
from mpocompress.train.signals import StopOnSignal
from mpocompress.train.state import STATE_FORMAT, STATE_VERSION, EpochStats

__all__ = [
    "FINETUNE_DEFAULTS", "FREEZE_PARTS", "SCHEDULES", "STATE_FORMAT", "STATE_VERSION", "BatchCallback", "DistEnv",
    "EpochCallback", "EpochStats", "FitResult", "StateCallback", "StopOnSignal", "TrainConfig", "central_core_index",
    "count_params", "dist_env", "distillation_loss", "evaluate", "finish_distributed", "fit", "full_state_dict", "is_sharded", "load_state", "optimize_on_first_batch", "freeze_", "init_distributed", "lr_at",
    "mean_std", "prepare_finetune_", "resolve_device", "shard_model",
]  # fmt: skip
