"""Recovering accuracy without labels: the student learns to reproduce a teacher's outputs.

For an encoder (a model whose main output is a sequence of hidden states, such as a sentence
encoder) the loss matches the last hidden states (mean squared error relative to the teacher's
mean square, over real tokens) and the pooled embedding (1 - cosine of the mean over real tokens,
what sentence encoders such as all-MiniLM-L6-v2 use), optionally also every block's output. For a
classifier (2-D logits) it is Hinton's soft-target term (`kd`) or the mean squared error of the
logits (`match`). For a causal language model it is the next-token KL divergence at a temperature
(T^2 KL(teacher || student), averaged over real token positions), whatever `loss` says, optionally
plus every block's output (`layer_weight`). AdamW with linear warm-up and decay; bf16 autocast on CUDA.

The student trains with dropout off and batch-norm statistics frozen (eval mode), so that it
matches the teacher's deterministic outputs. The same `Loop` as `fit` runs the steps, so stops on signals, resumable states (bit-identical on
CPU), --runs and torchrun behave as they do there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError, check_all
from mpocompress.train.distributed import DistEnv, dist_env, is_sharded, shard_model
from mpocompress.train.evaluation import distillation_loss
from mpocompress.train.lm import lm_scores, next_token_kl
from mpocompress.train.loop import (
    BatchCallback,
    EpochCallback,
    FitResult,
    Loop,
    Objective,
    StateCallback,
    freeze_teacher,
    local_batch_size,
    wrap_distributed,
)  # fmt: skip
from mpocompress.train.state import restore_state
from mpocompress.utils import call_with, is_causal_lm, main_output

LOSSES = ("match", "kd")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DistillConfig:
    """Settings of a distillation run."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4  # peak learning rate of AdamW
    weight_decay: float = 0.01  # AdamW's decoupled decay, on matrices and cores (not on biases and norms)
    warmup: float = 0.06  # linear warm-up, as a fraction of all steps
    schedule: str = "linear"  # after warm-up: linear to 0, cosine to 0, or constant
    seed: int = 0
    loss: str = "match"  # match (hidden states and pooled embedding, or logits by MSE) or kd (soft targets)
    hidden_weight: float = 1.0  # weight of the last hidden states' relative MSE
    pooled_weight: float = 1.0  # weight of 1 - cosine of the pooled embeddings
    layer_weight: float = 0.0  # weight of every block's output (relative MSE, averaged over blocks)
    temperature: float = 2.0  # of the kd term
    precision: str = "auto"  # bf16 autocast on CUDA with auto; fp32 on the CPU
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be a whole number >= 1, got {self.epochs!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch size must be a whole number >= 1, got {self.batch_size!r}"),
            (math.isfinite(self.lr) and 0 < self.lr <= 1, f"learning rate must lie in (0, 1] for AdamW, got {self.lr!r}"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**62, f"seed must be a whole number in [0, 2^62), got {self.seed!r}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay!r}"),
            (0 <= self.warmup < 1, f"warm-up must be a fraction of the steps in [0, 1), got {self.warmup!r}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
            (self.loss in LOSSES, f"unknown distillation loss {self.loss!r}; choose one of {', '.join(LOSSES)}"),
            (all(math.isfinite(w) and w >= 0 for w in (self.hidden_weight, self.pooled_weight, self.layer_weight))
             and self.hidden_weight + self.pooled_weight + self.layer_weight > 0, "loss weights must be >= 0, not all 0"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"),
        ]  # fmt: skip
        check_all(checks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MIN_WARMUP_STEPS = 20  # a short run still warms up over this many steps (at most half of it): its first steps are tame


def lr_at(config: DistillConfig, step: int, total: int) -> float:
    """The learning rate of step `step` of `total`: a linear warm-up over the share `config.warmup` of
    the run (at least MIN_WARMUP_STEPS, at most half the run, when there is a warm-up at all), then
    the schedule."""
    warm = max(config.warmup * total, min(MIN_WARMUP_STEPS, total / 2)) if config.warmup > 0 else 0.0
    if warm > 0 and step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - warm) / max(1.0, total - warm))
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (1.0 - progress)


# --------------------------------------------------------------------------- outputs and losses


def pooled(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the hidden states over real tokens: (B, L, d) -> (B, d)."""
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _relative_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum((s - t)^2) / sum(t^2) over real tokens."""
    d2, t2 = (s.float() - t.float()).square().sum(-1), t.float().square().sum(-1)
    if mask is not None:
        m = mask.to(d2.dtype)
        d2, t2 = d2 * m, t2 * m
    return d2.sum() / t2.sum().clamp_min(1e-12)


def _block_loss(s_out: Any, t_out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """Every block's output matched: relative MSE over real tokens, averaged over the blocks."""
    sh, th = getattr(s_out, "hidden_states", None), getattr(t_out, "hidden_states", None)
    if not sh or not th or len(sh) != len(th):
        raise MPOCompressError("matching block outputs needs a model that returns hidden_states for every block")
    return torch.stack([_relative_mse(a, b, mask) for a, b in zip(sh[1:], th[1:])]).mean()


def lm_distill_loss(
    s_out: Any, t_out: Any, mask: torch.Tensor | None, config: DistillConfig
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A causal LM's distillation: T^2 KL(teacher || student) of the next-token distributions at
    temperature T, averaged over real positions (plus `layer_weight` x the blocks' outputs); the
    agreement is the number of positions where both predict the same next token."""
    s, t = main_output(s_out), main_output(t_out)
    keep = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if mask is None else mask.bool()
    kl = next_token_kl(s[keep], t[keep], config.temperature)
    loss = kl.mean() * config.temperature**2
    if config.layer_weight > 0:
        loss = loss + config.layer_weight * _block_loss(s_out, t_out, mask)
    agree = (s.detach()[keep].argmax(-1) == t[keep].argmax(-1)).sum()
    return loss, agree, int(keep.sum())


def distill_loss(
    s_out: Any, t_out: Any, mask: torch.Tensor | None, config: DistillConfig
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss, the batch's summed agreement, examples): agreement is the cosine of the pooled
    embeddings for an encoder, the number of equal top-1 predictions for a classifier."""
    s, t = main_output(s_out), main_output(t_out)
    if s.ndim == 2:  # logits
        agree = (s.detach().argmax(1) == t.argmax(1)).sum()
        if config.loss == "kd":
            return distillation_loss(s.float(), t.float(), config.temperature), agree, s.shape[0]
        return _relative_mse(s, t, None), agree, s.shape[0]
    ps, pt = pooled(s.float(), mask), pooled(t.float(), mask)
    cos = F.cosine_similarity(ps, pt, dim=-1)
    loss = config.hidden_weight * _relative_mse(s, t, mask) + config.pooled_weight * (1 - cos).mean()
    if config.layer_weight > 0:
        loss = loss + config.layer_weight * _block_loss(s_out, t_out, mask)
    return loss, cos.detach().sum(), s.shape[0]


@contextlib.contextmanager
def autocast(config: DistillConfig, device: torch.device) -> Iterator[None]:
    if device.type == "cuda" and config.precision in ("auto", "bf16"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    elif config.precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def _matching(train_set: Any, teacher: nn.Module, config: DistillConfig, device: torch.device) -> Objective:
    hidden = config.layer_weight > 0
    loss_fn = lm_distill_loss if is_causal_lm(teacher) else distill_loss

    def objective(net: nn.Module, epoch: int, i: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        inputs = train_set.batch(idx, device)
        with autocast(config, device):
            with torch.no_grad():
                t_out = call_with(teacher, inputs, hidden)
            s_out = call_with(net, inputs, hidden)
        return loss_fn(s_out, t_out, inputs.get("attention_mask"), config)

    return objective


# --------------------------------------------------------------------------- agreement


@torch.no_grad()
def agreement(
    model: nn.Module, reference: nn.Module, dataset: Any, device: torch.device | str = "cpu", batch_size: int = 128
) -> dict[str, float | None]:
    """How closely `model` reproduces `reference` on `dataset`: mean and minimum cosine of the pooled
    outputs (per sample), relative error of the main outputs (||model - reference|| / ||reference||
    over the whole set, real tokens only), and top-1 agreement for classifiers (else None). For a
    causal LM: `lm_scores` (perplexities, next-token KL, top-1 next-token agreement), with the
    cosines None and the relative error the mean KL."""
    if is_causal_lm(reference):
        rep = lm_scores(model, dataset, device, max(1, min(batch_size, 4)), reference=reference)
        return {"agreement_cosine": None, "agreement_cosine_min": None, "output_rel_error": rep["kl_mean"], **rep}
    was = model.training, reference.training
    model.eval(), reference.eval()
    cosines, diff2, ref2, same, n, classifier = [], 0.0, 0.0, 0, 0, False
    try:
        for idx in torch.arange(len(dataset)).split(batch_size):
            inputs = dataset.batch(idx, device)
            a, b = main_output(call_with(model, inputs)).float(), main_output(call_with(reference, inputs)).float()
            mask = inputs.get("attention_mask")
            classifier = a.ndim == 2
            if classifier:
                same += int((a.argmax(1) == b.argmax(1)).sum())
                pa, pb = a, b
            else:
                pa, pb = pooled(a, mask), pooled(b, mask)
            cosines.append(F.cosine_similarity(pa, pb, dim=-1))
            m = mask.unsqueeze(-1).float() if (mask is not None and a.ndim == 3) else 1.0
            diff2 += float(((a - b).square() * m).sum())
            ref2 += float((b.square() * m).sum())
            n += a.shape[0]
    finally:
        model.train(was[0]), reference.train(was[1])
    cos = torch.cat(cosines)
    return {
        "agreement_cosine": float(cos.mean()),
        "agreement_cosine_min": float(cos.min()),
        "output_rel_error": math.sqrt(diff2 / ref2) if ref2 > 0 else 0.0,
        "top1_agreement": same / n if classifier else None,
    }


def metric_of(rep: Mapping[str, float | None]) -> tuple[str, float]:
    """The agreement a run reports: top-1 agreement for a classifier or a causal LM (next tokens),
    else the mean cosine."""
    if rep["top1_agreement"] is not None:
        return "top1_agreement", float(rep["top1_agreement"])
    return "agreement_cosine", float(rep["agreement_cosine"])


# --------------------------------------------------------------------------- the run


def distill(
    model: nn.Module,
    train_set: Any,
    test_set: Any,
    config: DistillConfig,
    *,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    resume_state: Mapping[str, Any] | None = None,
    save_state: StateCallback | None = None,
    on_batch: BatchCallback | None = None,
    on_epoch: EpochCallback | None = None,
    env: DistEnv | None = None,
    should_stop: Callable[[], int] | None = None,
    eval_every: int = 0,
    on_eval: Callable[..., None] | None = None,
    shard: bool = False,
    on_start: Callable[[dict[str, float | None]], None] | None = None,
) -> FitResult:
    """Train `model` in place to reproduce `teacher` on unlabelled data, for `config.epochs` epochs.

    The result's `accuracy` is the agreement on `test_set` after the last epoch (mean cosine of
    pooled outputs for an encoder, top-1 agreement for a classifier) and `loss` the relative error
    of the outputs there (`agreement`'s output_rel_error); the keyword arguments (`shard` included)
    behave as in `fit`.
    With `eval_every` = k, the agreement is also measured every k steps and passed to
    `on_eval(step, metric, rel_error, more)` (a learning curve; `more` holds a causal LM's
    perplexity and mean KL, else nothing).
    With `on_start`, the agreement of the model as given (before training, before a resumed state is
    restored) is measured after sharding, as every later evaluation is, and passed to it: under
    `shard` no process needs a whole copy of the model on its device to measure the start.
    """
    if teacher is None:
        raise MPOCompressError("distillation needs a teacher: pass --distill-from ORIGINAL")
    env = env or dist_env()
    device = torch.device(device)
    if not shard:  # sharding moves them, a block at a time
        model.to(device)
    freeze_teacher(teacher, device, move=not shard)
    if shard and not is_sharded(teacher):  # a teacher too large to replicate: sharded too, gathered block by block for its forward
        shard_model(teacher, env, device)
    local_batch = local_batch_size(config.batch_size, env)
    net = wrap_distributed(model, env, device, find_unused=True, shard=shard)
    optimizer = _adamw(model, config)  # first: a sharded root keeps its gathered parameters after a forward pass
    if on_start is not None:
        on_start(agreement(model, teacher, test_set, device, config.eval_batch_size))
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / env.world_size) / local_batch)
    total = config.epochs * steps_per_epoch
    start_epoch, skip, partial, history = 0, 0, None, []
    if resume_state is not None:
        start_epoch, skip, partial, history = restore_state(model, optimizer, resume_state, device, config.epochs, steps_per_epoch)
    last: dict[str, float] = {}  # a causal LM's perplexity and KL at the last evaluation, for the curve
    if on_eval is not None and eval_every:
        curve_fn = on_eval
        on_eval = lambda step, metric, loss: curve_fn(step, metric, loss, dict(last))  # noqa: E731
    loop = Loop(model, net, optimizer, train_set, _matching(train_set, teacher, config, device),
                lambda k: lr_at(config, k, total), config.lr, config.epochs, config.seed, device, env, local_batch, history,
                save_state, on_batch, should_stop, step=start_epoch * steps_per_epoch + skip,
                metric_dtype=torch.float64, train_mode=False, eval_every=eval_every, on_eval=on_eval)  # fmt: skip

    def evaluate_fn() -> tuple[float, float]:
        rep = agreement(model, teacher, test_set, device, config.eval_batch_size)
        last.clear()
        last.update({k: rep[k] for k in ("perplexity", "kl_mean") if rep.get(k) is not None})
        return metric_of(rep)[1], rep["output_rel_error"]

    return loop.run(start_epoch, skip, partial, evaluate_fn, on_epoch)


def _adamw(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MPOCompressError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
