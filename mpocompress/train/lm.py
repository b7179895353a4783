"""Measuring a causal language model as the field does: perplexity over fixed windows of packed
text, and against a reference model the next-token KL divergence and top-1 agreement; greedy
continuations of a prompt; the distillation loss on next-token distributions.

Windows are the rows of a packed `TokenSet` (`max_length` tokens each, stride = window: they do not
overlap). In each window every position but the first is scored: -log p(x_t | x_<t) with the
context that window gives, so a model's perplexity is exp(total NLL / scored tokens) and two models
measured on the same file, tokenizer and --max-length are scored on the very same tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.io.hf import quiet_transformers
from mpocompress.utils import call_with, main_output

POSITIONS_PER_CHUNK = 1024  # positions whose vocabulary-wide softmaxes are held at once


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = call_with(model, {**inputs, "use_cache": False}) if "x" not in inputs else call_with(model, inputs)
    return main_output(out)


def _scored(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, L-1) and which of them count (a real token predicted from a real one)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else (mask[:, 1:].bool() & mask[:, :-1].bool())
    return ids[:, 1:], keep


def next_token_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per position, KL(softmax(teacher/T) || softmax(student/T)) over the vocabulary: (..., V) -> (...)."""
    t = teacher.float() / temperature
    s = student.float() / temperature
    log_pt, log_ps = F.log_softmax(t, -1), F.log_softmax(s, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


@torch.no_grad()
def lm_scores(
    model: nn.Module, dataset: Any, device: torch.device | str = "cpu", batch_size: int = 4,
    reference: nn.Module | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Perplexity of `model` on the windows of `dataset` (token-weighted); with `reference`, also its
    perplexity, the mean next-token KL(reference || model) per scored position and the share of
    positions where both predict the same next token (top-1 agreement)."""
    models = [model] + ([reference] if reference is not None else [])
    was = [m.training for m in models]
    for m in models:
        m.eval()
    nll, ref_nll, kl, same, count, windows = 0.0, 0.0, 0.0, 0, 0, 0
    try:
        for idx in torch.arange(len(dataset)).split(batch_size):
            inputs = dataset.batch(idx, device)
            targets, keep = _scored(inputs)
            # the logits (B, L, V) are read in place, a chunk of scored rows at a time: slicing off the last
            # position and flattening copied them whole (SmolLM2, 4 windows of 512: 0.4 GB per model)
            logits = _logits(model, inputs)
            flat = logits.reshape(-1, logits.shape[-1])
            ref_flat = _logits(reference, inputs).reshape(-1, logits.shape[-1]) if reference is not None else None
            pos = keep.nonzero()  # (window, position) of each scored target, in order
            rows, tgt = pos[:, 0] * logits.shape[1] + pos[:, 1], targets[pos[:, 0], pos[:, 1]]
            for part, t in zip(rows.split(POSITIONS_PER_CHUNK), tgt.split(POSITIONS_PER_CHUNK)):
                a = flat[part].float()
                nll += float(F.cross_entropy(a, t, reduction="sum").double())
                if ref_flat is not None:
                    b = ref_flat[part].float()
                    ref_nll += float(F.cross_entropy(b, t, reduction="sum").double())
                    kl += float(next_token_kl(a, b).double().sum())
                    same += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += int(rows.numel())
            windows += len(idx)
    finally:
        for m, w in zip(models, was):
            m.train(w)
    if count == 0:
        raise MPOCompressError("the text gives no token to score (every window is one token long); give more text or a longer --max-length")
    length = int(dataset.inputs["input_ids"].shape[1]) if hasattr(dataset, "inputs") else None
    rep: dict[str, Any] = {
        "perplexity": _exp(nll / count),
        "nll": nll / count,
        "tokens_scored": count,
        "windows": windows,
        "window": length,
        "stride": length,
    }
    if reference is not None:
        rep.update(reference_perplexity=_exp(ref_nll / count), kl_mean=kl / count, top1_agreement=same / count)
    return rep


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


@torch.no_grad()
def greedy_continuation(model: nn.Module, tokenizer: Any, prompt: str, tokens: int, device: torch.device | str = "cpu") -> str:
    """The `tokens` most likely next tokens after `prompt`, one at a time (greedy decoding by the
    model's own `generate`, with its key/value cache), decoded to text (the prompt not included)."""
    if tokens < 1:
        raise MPOCompressError(f"--new-tokens must be at least 1, got {tokens}")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise MPOCompressError("--prompt is empty after tokenization; give some text")
    was = model.training
    model.eval()
    eos = getattr(tokenizer, "eos_token_id", None)
    try:
        with quiet_transformers():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                num_beams=1, pad_token_id=eos, eos_token_id=eos, temperature=None, top_p=None, top_k=None,
            )  # fmt: skip
    finally:
        model.train(was)
    new = out[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True)
