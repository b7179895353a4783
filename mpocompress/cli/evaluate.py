"""`mpocompress evaluate`: test accuracy, loss, parameters and rho of a model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mpocompress.cli import app
from mpocompress.cli.common import ARCH_OPT, JSON_OPT, MAX_LENGTH_OPT, MODEL_ARG, TRUST_OPT, handle_errors, print_json
from mpocompress.cli.render import make_console
from mpocompress.cli.training import (
    CHANNELS_OPT,
    DATA_DIR_OPT,
    DATA_OPT,
    EVAL_DEVICE_OPT,
    IMAGE_SIZE_OPT,
    NORMALIZE_OPT,
    choose_data,
    load_unlabelled_data,
)  # fmt: skip
from mpocompress.compress import summarize
from mpocompress.errors import MPOCompressError
from mpocompress.io import arch_for_second, load_model
from mpocompress.io.data.calibration import model_tokenizer
from mpocompress.io.data.unlabelled import TEXT_PREFIX, FeatureSet, is_unlabelled
from mpocompress.nn.inference import PREFERENCES
from mpocompress.train import evaluate as evaluate_model
from mpocompress.train import optimize_on_first_batch, resolve_device
from mpocompress.train.distill import agreement
from mpocompress.train.lm import greedy_continuation, lm_scores
from mpocompress.utils import is_causal_lm

TEXT_BATCH = 64  # text samples per forward pass by default

PREFER_HELP = (
    "Run the model as it would be served and report its resident weights and time: each MPO layer's "
    "contraction plan is timed on the first batch and the fastest kept. memory: nothing is kept besides "
    "the stored factors; speed: merged cores (up to W) are kept where that is faster. Without it, every "
    "factorized layer keeps W for the loop and frees it after (the fastest one-off evaluation)."
)


@app.command()
@handle_errors
def evaluate(
    model: Path = MODEL_ARG,
    arch: str | None = ARCH_OPT,
    data: str | None = DATA_OPT,
    data_dir: Path | None = DATA_DIR_OPT,
    image_size: int | None = IMAGE_SIZE_OPT,
    channels: int | None = CHANNELS_OPT,
    normalize: str | None = NORMALIZE_OPT,
    batch_size: int | None = typer.Option(None, "--batch-size", metavar="B", help="Samples per forward pass. [default: 1000 images; 64 text samples; 4 windows for a causal LM]", show_default=False),
    device: str = EVAL_DEVICE_OPT,
    reference: Path | None = typer.Option(None, "--reference", metavar="ORIGINAL", help="Also measure agreement with this model (usually the uncompressed original): cosine of pooled outputs, relative output error, top-1 agreement for classifiers.", show_default=False),
    reference_arch: str | None = typer.Option(None, "--reference-arch", metavar="SPEC", help="Architecture of ORIGINAL when it is a state_dict (default: that of MODEL).", show_default=False),
    max_length: int | None = MAX_LENGTH_OPT,
    max_samples: int | None = typer.Option(None, "--max-samples", metavar="N", help="Use at most N samples: of text:FILE, the first 20 % of N of its held-out lines (the file is split 80/20 whole, so every command holds out the same lines); of x-only data, the first N before its split.", show_default=False),
    prefer: str | None = typer.Option(None, "--prefer", metavar="memory|speed", help=PREFER_HELP, show_default=False),
    prompt: list[str] = typer.Option([], "--prompt", metavar="TEXT", help="A causal LM's greedy continuation of TEXT (and the reference's, with --reference), side by side (repeatable).", show_default=False),
    new_tokens: int = typer.Option(32, "--new-tokens", metavar="N", help="Tokens each --prompt continuation adds."),
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Top-1 accuracy and loss on the test split, with the model's parameters and rho (factorized
    weights / dense weights of its factorized layers, Eq. 9); with
    --reference, agreement with the original (also on data without labels: text:FILE, x-only files).

    A causal language model is measured on text:FILE as the field does: perplexity over the held-out
    20 % of the lines, packed into windows of --max-length tokens (stride = window); with --reference
    also the mean next-token KL divergence and top-1 next-token agreement; --prompt TEXT shows its
    greedy continuation (and the reference's).

    \b
    Examples:
      mpocompress evaluate small.safetensors --data text:heldout.txt --reference MODEL_DIR
      mpocompress evaluate runs/fc2_d8.safetensors --data digits
    """
    if batch_size is not None and batch_size < 1:
        raise MPOCompressError(f"--batch-size must be at least 1, got {batch_size}")
    if max_samples is not None and max_samples < 2:
        raise MPOCompressError(f"--max-samples must be at least 2, got {max_samples}")
    if prefer is not None and prefer not in PREFERENCES:
        raise MPOCompressError(f"--prefer takes {' or '.join(PREFERENCES)}, got {prefer!r}")
    if new_tokens < 1:
        raise MPOCompressError(f"--new-tokens must be at least 1, got {new_tokens}")
    dev = resolve_device(device)
    loaded = load_model(model, arch, trust_pickle)
    ref_model = load_model(reference, arch_for_second(reference, reference_arch, loaded.arch), trust_pickle).model if reference else None
    if is_causal_lm(loaded.model):
        _evaluate_lm(model, loaded, ref_model, reference, data, dev, batch_size or 4, max_length, max_samples, prefer,
                     prompt, new_tokens, json_out)  # fmt: skip
        return
    if prompt:
        raise MPOCompressError(f"--prompt continues text with a causal language model; {model} is not one")
    choice = choose_data(data, image_size, channels, normalize, (loaded.metadata or {}).get("data"), str(model), data_dir, loaded.model)
    data = choice.name
    # text: a transformer's activations grow with samples x tokens (1,000 sentences at once held 5 GB for MiniLM)
    batch_size = batch_size or (TEXT_BATCH if is_unlabelled(data) else 1000)
    rep: dict = {"model": str(model), "arch": loaded.arch}
    if is_unlabelled(data):
        if ref_model is None:
            raise MPOCompressError(f"{data} has no labels to measure accuracy on; add --reference ORIGINAL to measure agreement")
        test_set = load_unlabelled_data(data, loaded.model, ref_model, max_length, max_samples)[1]
        rep.update(data=test_set.name, examples=len(test_set), accuracy=None, loss=None)
        probe_set = test_set
        served = test_set
    else:
        images = served = choice.split("test", data_dir)
    inference = None
    if prefer is not None:
        loaded.model.to(dev)
        inference = optimize_on_first_batch(loaded.model, served, prefer, dev, batch_size)
    t0 = time.perf_counter()
    if not is_unlabelled(data):
        accuracy, loss = evaluate_model(loaded.model, images, dev, batch_size, materialize=prefer is None)
        rep.update(data=images.name, examples=len(images), accuracy=accuracy, loss=loss)
        probe_set = FeatureSet(images.name, "test", images.tensors()[0]) if ref_model is not None else None
    if ref_model is not None:
        rep.update(reference=str(reference), **agreement(loaded.model, ref_model, probe_set, dev, batch_size))
    rep["seconds"] = time.perf_counter() - t0
    rep["data_options"] = choice.options()
    s = _finish(rep, loaded.model, inference)
    if json_out:
        print_json(rep)
        return
    whence = ", the data the file records" if choice.origin == "file" else ""
    t = Table(title=f"{model} on {rep['data']} (test split{whence}, {rep['examples']:,} {'images' if rep['accuracy'] is not None else 'samples'})", title_justify="left",
              show_header=False, box=None, pad_edge=False)  # fmt: skip
    t.add_column(style="bold")
    t.add_column()
    if rep["accuracy"] is not None:
        t.add_row("test accuracy", f"{rep['accuracy']:.2%}")
        t.add_row("test loss", f"{rep['loss']:.4f}")
    if ref_model is not None:
        t.add_row("agreement: mean cosine", f"{rep['agreement_cosine']:.4f} (min {rep['agreement_cosine_min']:.4f})")
        t.add_row("relative output error", f"{rep['output_rel_error']:.4f}")
        if rep["top1_agreement"] is not None:
            t.add_row("top-1 agreement", f"{rep['top1_agreement']:.2%}")
    t.add_row("parameters", f"{s['params_model']:,} (dense equivalent {s['params_model_dense']:,})")
    if inference is not None:
        kept = sum(1 for lr in inference.layers if lr.kept)
        t.add_row(f"resident weights (--prefer {prefer})",
                  f"{inference.resident_bytes / 2**20:.2f} MiB (parameters {inference.parameter_bytes / 2**20:.2f} MiB, "
                  f"kept merged cores {inference.cache_bytes / 2**20:.2f} MiB in {kept} layer/batch choices)")  # fmt: skip
        t.add_row("time", f"{rep['seconds']:.2f} s for {rep['examples']:,} samples (batch {batch_size})")
    if s["mpo_layers"]:  # a dense model has no rho to show
        t.add_row("rho (factorized / dense weights, Eq. 9)", f"{s['rho']:.4g}")
        t.add_row("factorized layers", ", ".join(f"{m['name']} {m['notation']}" for m in s["mpo_layers"]))
    make_console().print(t)


def _finish(rep: dict[str, Any], model: Any, inference: Any) -> dict[str, Any]:
    """Add the served-model report and the model's sizes (rho, parameters) to `rep`; the summary."""
    if inference is not None:
        rep["inference"] = inference.to_dict()
    s = summarize(model)
    rep.update(rho=s["rho"], params_model_after=s["params_model"], params_model_dense=s["params_model_dense"],
               params_mpo=s["params_mpo"], mpo_layers=s["mpo_layers"])  # fmt: skip
    return s


def _evaluate_lm(
    model: Path, loaded: Any, ref_model: Any, reference: Path | None, data: str | None, dev: Any, batch_size: int,
    max_length: int | None, max_samples: int | None, prefer: str | None, prompts: list[str], new_tokens: int,
    json_out: bool,
) -> None:  # fmt: skip
    """evaluate for a causal LM: perplexity (and KL, top-1 agreement against the reference) on the
    held-out windows of text:FILE, greedy continuations of the prompts."""
    recorded = (loaded.metadata or {}).get("data") or {}
    if data is None:
        data = recorded.get("name") if str(recorded.get("name", "")).startswith(TEXT_PREFIX) else None
    if data is None and not prompts:
        raise MPOCompressError(f"{model} is a causal language model, measured on text: add --data text:FILE (one sentence or paragraph per line)")
    rep: dict[str, Any] = {"model": str(model), "arch": loaded.arch, "accuracy": None, "loss": None}
    inference = None
    t0 = time.perf_counter()
    if data is not None:
        if not data.startswith(TEXT_PREFIX):
            raise MPOCompressError(f"a causal language model is measured on text; give --data text:FILE instead of {data}")
        test_set = load_unlabelled_data(data, loaded.model, ref_model, max_length, max_samples)[1]
        if prefer is not None:
            loaded.model.to(dev)
            inference = optimize_on_first_batch(loaded.model, test_set, prefer, dev, batch_size)
            t0 = time.perf_counter()
        rep.update(data=test_set.name, examples=len(test_set), **lm_scores(loaded.model, test_set, dev, batch_size, ref_model))
        if reference is not None:
            rep["reference"] = str(reference)
    rep["seconds"] = time.perf_counter() - t0
    if prompts:
        tokenizer = model_tokenizer(loaded.model, ref_model)
        loaded.model.to(dev)
        if ref_model is not None:
            ref_model.to(dev)
        rep["continuations"] = [
            {"prompt": p, "model": greedy_continuation(loaded.model, tokenizer, p, new_tokens, dev),
             "reference": greedy_continuation(ref_model, tokenizer, p, new_tokens, dev) if ref_model is not None else None}
            for p in prompts
        ]  # fmt: skip
    s = _finish(rep, loaded.model, inference)
    if json_out:
        print_json(rep)
        return
    console = make_console()
    t = Table(title=f"{model}" + (f" on {rep['data']} (held-out 20 %: {rep['windows']:,} windows of {rep['window']} tokens, stride {rep['stride']})" if data else ""),
              title_justify="left", show_header=False, box=None, pad_edge=False)  # fmt: skip
    t.add_column(style="bold")
    t.add_column()
    if data is not None:
        t.add_row("perplexity", f"{rep['perplexity']:.3f} over {rep['tokens_scored']:,} tokens")
        if ref_model is not None:
            t.add_row("reference perplexity", f"{rep['reference_perplexity']:.3f} (ratio {rep['perplexity'] / rep['reference_perplexity']:.3f})")
            t.add_row("next-token KL (mean)", f"{rep['kl_mean']:.4f} nats")
            t.add_row("top-1 next-token agreement", f"{rep['top1_agreement']:.2%}")
    t.add_row("parameters", f"{s['params_model']:,} (dense equivalent {s['params_model_dense']:,})")
    if s["mpo_layers"]:
        t.add_row("rho (factorized / dense weights, Eq. 9)", f"{s['rho']:.4g}")
        t.add_row("factorized layers", f"{len(s['mpo_layers'])}")
    console.print(t)
    for c in rep.get("continuations", []):
        g = Table(title=f"greedy continuation of {c['prompt']!r}", title_justify="left", show_header=False, box=None, pad_edge=False)
        g.add_column(style="bold")
        g.add_column()
        g.add_row("model", c["model"])
        if c["reference"] is not None:
            g.add_row("reference", c["reference"])
        console.print(g)
