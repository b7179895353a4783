"""Benchmark mpocompress's MPO layers and TT-SVD against dense layers and peer packages, in one run.

    python benchmarks/bench.py                   # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick           # fewer repeats, smaller conversion set
    python benchmarks/bench.py --sections layers --out benchmarks/results

Sections:
  layers   forward (computed from the cores, and materialized in eval mode) and forward+backward (gradients
           for cores, bias and input) of an MPOLinear against: nn.Linear with the rebuilt weight,
           tensorly-torch's FactorizedLinear (blocktt, `factorized` and `reconstructed`) and
           torch-mpo's TT linear layer when installed. All hold the same cores; outputs are checked
           to agree.
  convert  TT-SVD time and relative error, mpocompress (method auto) against its exact SVD path
           and tensorly's `tensor_train_matrix` (pytorch backend).
  nets     forward+backward of LeNet-5 and the paper's VGG-16 (CIFAR-sized input), dense against
           the MPO-Net.
  plans    the cost model against the clock: every contraction plan of each layer is timed (forward
           from the cores, forward with kept merged cores, forward+backward) and ranked by its
           estimate; per case, the measured time of the model's pick over the fastest plan's
           ("regret") and the rank correlation of estimates and times. Also dense against low-rank
           layers of several ranks: the estimated and measured time ratios.

Times are medians of repeated runs after warm-up. Ratios are baseline time / mpocompress time, so
above 1 means mpocompress is faster. Peers are optional: `pip install -e '.[bench]'`.
Writes OUT.md and OUT.json (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpocompress.models import build_model, build_mpo_net
from mpocompress.nn import LowRankLinear, MPOLinear
from mpocompress.tensors import candidate_plans, choose_plan, dense_cost, lowrank_cost, mpo_to_matrix, plan_cost, tt_svd

LAYERS = [  # (in, out, in_modes, out_modes, D)
    *[(784, 256, (4, 7, 7, 4), (4, 4, 4, 4), d) for d in (2, 4, 8, 16)],
    *[(4096, 4096, (8, 8, 8, 8), (8, 8, 8, 8), d) for d in (4, 16)],
    *[(4096, 4096, (4, 4, 4, 4, 16), (4, 4, 4, 4, 16), d) for d in (4, 16)],
    (512, 4096, (4, 4, 8, 4), (8, 8, 8, 8), 4),
]
BATCHES = (1, 64, 512)
CONVERT = [  # (N_y, N_x, in_modes, out_modes)
    (256, 784, (4, 7, 7, 4), (4, 4, 4, 4)),
    (4096, 4096, (8, 8, 8, 8), (8, 8, 8, 8)),
    (4096, 25088, (8, 14, 16, 14), (8, 8, 8, 8)),
]


# --------------------------------------------------------------------------- timing


def median_time(fn: Callable[[], Any], budget_s: float, min_reps: int = 3, max_reps: int = 200) -> float:
    """Median wall time of fn() after two warm-up calls, repeating until `budget_s` is spent."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- peers


def optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


class Impl:
    """A layer under test, its trainable tensors, and its name in the tables."""

    def __init__(self, name: str, module: nn.Module, params: list[torch.Tensor]) -> None:
        self.name, self.module, self.params = name, module, params


def make_impls(mpo: MPOLinear, d: int) -> tuple[list[Impl], list[str]]:
    """mpocompress, the dense layer and every installed peer, all holding the same weights."""
    impls = [Impl("mpocompress", mpo, [*mpo.cores, mpo.bias])]
    dense = mpo.to_dense()
    impls.append(Impl("dense", dense, [dense.weight, dense.bias]))
    missing = []
    tltorch = optional("tltorch")
    if tltorch is None:
        missing.append("tensorly-torch")
    else:
        for impl in ("factorized", "reconstructed"):
            layer = tltorch.FactorizedLinear(
                mpo.in_modes, mpo.out_modes, factorization="blocktt", rank=d, implementation=impl
            )
            with torch.no_grad():
                factors = list(layer.weight.factors)
                if [tuple(f.shape) for f in factors] != [tuple(c.shape) for c in mpo.cores]:
                    raise RuntimeError(f"tltorch rank {d} gives other core shapes than mpocompress")
                for f, c in zip(factors, mpo.cores):
                    f.copy_(c)
                layer.bias.copy_(mpo.bias)
            impls.append(Impl(f"tltorch-{impl}", layer, [*layer.weight.factors, layer.bias]))
    torch_mpo = optional("torch_mpo")
    if torch_mpo is None:
        missing.append("torch-mpo")
    else:  # pragma: no cover - not installable on the reference machine
        layer = torch_mpo.TTLinear(mpo.in_features, mpo.out_features, rank=d)
        impls.append(Impl("torch-mpo", layer, list(layer.parameters())))
    return impls, missing


# --------------------------------------------------------------------------- sections


def bench_layers(budget: float, batches: tuple[int, ...], configs: list[tuple]) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    for nin, nout, im, om, d in configs:
        torch.manual_seed(0)
        mpo = MPOLinear(nin, nout, d, im, om)
        impls, missing = make_impls(mpo, d)
        for b in batches:
            x = torch.randn(b, nin)
            xg = x.clone().requires_grad_()
            gy = torch.randn(b, nout)
            ref = impls[1].module(x)
            for impl in impls:
                with torch.no_grad():
                    err = float((impl.module(x) - ref).norm() / ref.norm())
                if err > 1e-4:
                    raise RuntimeError(f"{impl.name} disagrees with the dense layer: relative difference {err:.2e}")
            for mode in ("forward", "forward (eval, cached)", "forward+backward"):
                times = {}
                for impl in impls:
                    m = impl.module
                    if mode == "forward+backward":
                        m.train()
                        inputs = [xg, *impl.params]

                        def fn(m=m, inputs=inputs):
                            torch.autograd.grad(m(xg), inputs, gy)
                    else:  # plain forward: training mode, no weight cache; eval: the layer is materialized
                        if mode == "forward":
                            mpo.release()
                        else:
                            mpo.materialize()
                        m.train(mode == "forward")

                        def fn(m=m):
                            with torch.no_grad():
                                m(x)

                    times[impl.name] = median_time(fn, budget)
                mpo.release()
                plan = mpo.plan_for(b, backward=mode == "forward+backward", cached=mode.startswith("forward (eval"))
                ours = times["mpocompress"]
                peers = {k: v for k, v in times.items() if k not in ("mpocompress", "dense")}
                best_peer = min(peers, key=peers.get) if peers else None
                rows.append({
                    "layer": f"{nin}->{nout}", "in_modes": list(im), "out_modes": list(om), "D": d, "batch": b,
                    "mode": mode, "plan": plan.describe(), "times_ms": {k: v * 1e3 for k, v in times.items()},
                    "dense_over_ours": times["dense"] / ours,
                    "best_peer": best_peer,
                    "best_peer_over_ours": peers[best_peer] / ours if best_peer else None,
                })  # fmt: skip
                r = rows[-1]
                print(
                    f"  {r['layer']:>10} {str(tuple(im)):>16} D={d:<3} B={b:<4} {mode:<24} ours {ours * 1e3:9.3f} ms"
                    f"  dense/ours {r['dense_over_ours']:5.2f}"
                    + (f"  {best_peer}/ours {r['best_peer_over_ours']:5.2f}" if best_peer else ""),
                    file=sys.stderr, flush=True,
                )  # fmt: skip
    return rows, missing


def _rel_err(w: torch.Tensor, approx: torch.Tensor) -> float:
    w64 = w.to(torch.float64)
    return float((w64 - approx.to(torch.float64)).norm() / w64.norm())


def bench_convert(budget: float, configs: list[tuple]) -> list[dict]:
    tl = optional("tensorly")
    rows = []
    for ny, nx, im, om in configs:
        torch.manual_seed(0)
        w = torch.randn(ny, nx) / math.sqrt(nx)
        for d in (4, 16):
            res: dict[str, dict[str, float]] = {}
            for name, method in (("mpocompress", "auto"), ("exact SVD", "svd")):
                dec = tt_svd(w, im, om, max_bond=d, method=method)
                t = median_time(lambda m=method: tt_svd(w, im, om, max_bond=d, method=m), budget, min_reps=1)
                res[name] = {"time_s": t, "rel_error": _rel_err(w, mpo_to_matrix(dec.cores))}
            if tl is not None:
                tl.set_backend("pytorch")
                from tensorly.decomposition import tensor_train_matrix

                tensor = w.reshape(*om, *im)
                rank = [1] + [d] * (len(im) - 1) + [1]
                t = median_time(lambda: tensor_train_matrix(tensor, rank), budget, min_reps=1)
                factors = tensor_train_matrix(tensor, rank)
                res["tensorly"] = {"time_s": t, "rel_error": _rel_err(w, mpo_to_matrix(list(factors)))}
            ours = res["mpocompress"]
            row = {
                "matrix": f"{ny}x{nx}", "in_modes": list(im), "out_modes": list(om), "D": d, "results": res,
                "error_over_exact": ours["rel_error"] / res["exact SVD"]["rel_error"],
                "exact_over_ours": res["exact SVD"]["time_s"] / ours["time_s"],
                "tensorly_over_ours": res["tensorly"]["time_s"] / ours["time_s"] if "tensorly" in res else None,
            }  # fmt: skip
            rows.append(row)
            print(
                f"  {row['matrix']:>11} D={d:<3} ours {ours['time_s']:7.3f} s  exact/ours {row['exact_over_ours']:5.2f}"
                + (f"  tensorly/ours {row['tensorly_over_ours']:5.2f}" if row["tensorly_over_ours"] else "")
                + f"  error/exact {row['error_over_exact']:.6f}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    return rows


def bench_nets(budget: float) -> list[dict]:
    rows = []
    for arch, shape in (("lenet5", (1, 28, 28)), ("vgg16(in_channels=3, image_size=32)", (3, 32, 32))):
        torch.manual_seed(0)
        x = torch.randn(64, *shape)
        y = torch.randint(0, 10, (64,))
        times = {}
        for kind in ("dense", "MPO-Net"):
            model = build_model(arch) if kind == "dense" else build_mpo_net(arch)[0]
            if kind == "dense" and arch.startswith("vgg"):
                model = build_model(arch.replace(")", ", conv5_as_fc=True)"))
            model.train()

            def step(model=model):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()

            times[kind] = median_time(step, budget, min_reps=3)
        row = {
            "net": arch.split("(")[0], "batch": 64, "times_ms": {k: v * 1e3 for k, v in times.items()},
            "dense_over_mpo": times["dense"] / times["MPO-Net"],
        }  # fmt: skip
        rows.append(row)
        print(f"  {row['net']:>8} dense {times['dense'] * 1e3:8.1f} ms  MPO-Net {times['MPO-Net'] * 1e3:8.1f} ms", file=sys.stderr)
    return rows


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else 1.0


def bench_plans(budget: float, configs: list[tuple], batches: tuple[int, ...]) -> tuple[list[dict], list[dict]]:
    """Every plan timed against its estimate; dense against low-rank, estimated and measured."""
    rows = []
    per_plan = budget / 10
    for nin, nout, im, om, d in configs:
        torch.manual_seed(0)
        layer = MPOLinear(nin, nout, d, im, om)
        shape = layer.shape
        for b in batches:
            x = torch.randn(b, nin)
            xg = x.clone().requires_grad_()
            for mode in ("forward", "forward (kept)", "forward+backward"):
                backward, kept = mode == "forward+backward", mode == "forward (kept)"
                est, meas, plans = [], [], candidate_plans(shape.n_cores)
                for plan in plans:
                    layer.release()
                    layer.eval()
                    layer.pin_plan(b, plan, keep=kept)
                    if kept:
                        layer.materialize()
                    if backward:
                        layer.train()
                        params = [xg, *layer.cores]
                        layer.set_forward_strategy("auto")
                        layer._plans[(b, True, False, "auto")] = plan  # the training plan, forced for the timing

                        def fn(params=params):
                            torch.autograd.grad(layer(xg).square().sum(), params)
                    else:

                        def fn():
                            with torch.no_grad():
                                layer(x)

                    est.append(plan_cost(shape, plan, b, kept, backward))
                    meas.append(median_time(fn, per_plan))
                layer.release()
                layer.set_forward_strategy("auto")
                pick = choose_plan(shape, b, kept, backward)
                best = min(range(len(plans)), key=meas.__getitem__)
                rows.append({
                    "layer": f"{nin}->{nout}", "in_modes": list(im), "D": d, "batch": b, "mode": mode, "plans": len(plans),
                    "pick": pick.describe(), "pick_ms": meas[plans.index(pick)] * 1e3, "best": plans[best].describe(),
                    "best_ms": meas[best] * 1e3, "regret": meas[plans.index(pick)] / meas[best], "spearman": _spearman(est, meas),
                })  # fmt: skip
                r = rows[-1]
                print(f"  {r['layer']:>10} D={d:<3} B={b:<4} {mode:<17} pick {r['pick']:<24} {r['pick_ms']:8.3f} ms  best "
                      f"{r['best']:<24} {r['best_ms']:8.3f} ms  regret {r['regret']:.2f}  rho {r['spearman']:.2f}",
                      file=sys.stderr, flush=True)  # fmt: skip
    structures = []
    for nin, nout in ((784, 256), (384, 1536), (4096, 4096)):
        for b in batches:
            x = torch.randn(b, nin)
            dense = nn.Linear(nin, nout)
            with torch.no_grad():
                t_dense = median_time(lambda: dense(x), budget / 3)
            for share in (0.25, 0.5):
                r = max(1, int(share * nin * nout / (nin + nout)))
                low = LowRankLinear(nin, nout, r)
                with torch.no_grad():
                    t_low = median_time(lambda low=low: low(x), budget / 3)
                structures.append({
                    "layer": f"{nin}->{nout}", "batch": b, "rank": r,
                    "estimated_lowrank_over_dense": lowrank_cost(b, nin, nout, r) / dense_cost(b, nin, nout),
                    "measured_lowrank_over_dense": t_low / t_dense, "dense_ms": t_dense * 1e3, "lowrank_ms": t_low * 1e3,
                })  # fmt: skip
    return rows, structures


# --------------------------------------------------------------------------- output


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    out = [
        f"Measured {env['date']} on {env['machine']}, {env['threads']} torch threads, torch {env['torch']}, "
        f"float32. Command: `{env['command']}`.",
        "",
    ]
    if env["missing_peers"]:
        out += [f"Not installed, so not compared: {', '.join(env['missing_peers'])}.", ""]
    if result.get("layers"):
        names = list(result["layers"][0]["times_ms"])
        out += [
            "### Layers (times in ms; ratio = other / mpocompress, above 1 means mpocompress is faster)",
            "",
            "| layer | modes in -> out | D | batch | pass | plan | " + " | ".join(names) + " | dense / ours | best peer / ours |",
            "|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|",
        ]
        for r in result["layers"]:
            t = r["times_ms"]
            peer = f"{r['best_peer_over_ours']:.2f} ({r['best_peer']})" if r["best_peer"] else "-"
            out.append(
                f"| {r['layer']} | {tuple(r['in_modes'])} -> {tuple(r['out_modes'])} | {r['D']} | {r['batch']} | "
                f"{r['mode']} | {r['plan']} | " + " | ".join(f"{t[n]:.3f}" for n in names)
                + f" | {r['dense_over_ours']:.2f} | {peer} |"
            )  # fmt: skip
        out.append("")
    if result.get("convert"):
        out += [
            "### Conversion (TT-SVD of a Gaussian matrix; times in s)",
            "",
            "| matrix (N_y x N_x) | D | mpocompress | exact SVD | tensorly | exact / ours | tensorly / ours | rel. error (ours) | error / exact error |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["convert"]:
            res = r["results"]
            tl = res.get("tensorly")
            out.append(
                f"| {r['matrix']} | {r['D']} | {res['mpocompress']['time_s']:.3f} | {res['exact SVD']['time_s']:.3f} | "
                + (f"{tl['time_s']:.3f}" if tl else "-")
                + f" | {r['exact_over_ours']:.2f} | "
                + (f"{r['tensorly_over_ours']:.2f}" if tl else "-")
                + f" | {res['mpocompress']['rel_error']:.6f} | {r['error_over_exact']:.7f} |"
            )
        out.append("")
    if result.get("nets"):
        out += [
            "### Networks (forward+backward, batch 64; times in ms)",
            "",
            "| network | dense | MPO-Net | dense / MPO-Net |",
            "|---|---|---|---|",
        ]
        for r in result["nets"]:
            t = r["times_ms"]
            out.append(f"| {r['net']} | {t['dense']:.1f} | {t['MPO-Net']:.1f} | {r['dense_over_mpo']:.2f} |")
        out.append("")
    if result.get("plans"):
        out += [
            "### The cost model against measured plan times (ms; regret = the pick's time / the fastest plan's)",
            "",
            "| layer | modes in | D | batch | pass | plans | cost model's pick | its time | fastest measured | its time | regret | rank correlation |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["plans"]:
            out.append(
                f"| {r['layer']} | {tuple(r['in_modes'])} | {r['D']} | {r['batch']} | {r['mode']} | {r['plans']} | {r['pick']} | "
                f"{r['pick_ms']:.3f} | {r['best']} | {r['best_ms']:.3f} | {r['regret']:.2f} | {r['spearman']:.2f} |"
            )  # fmt: skip
        regrets = [r["regret"] for r in result["plans"]]
        out += ["", f"Median regret {statistics.median(regrets):.2f}, largest {max(regrets):.2f}, "
                f"within 1.2x in {sum(g <= 1.2 for g in regrets)} of {len(regrets)} cases.", ""]  # fmt: skip
        out += [
            "| layer | batch | rank | low-rank / dense, estimated | low-rank / dense, measured | dense ms | low-rank ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["structures"]:
            out.append(
                f"| {r['layer']} | {r['batch']} | {r['rank']} | {r['estimated_lowrank_over_dense']:.2f} | "
                f"{r['measured_lowrank_over_dense']:.2f} | {r['dense_ms']:.3f} | {r['lowrank_ms']:.3f} |"
            )  # fmt: skip
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="layers,convert,nets,plans", help="comma-separated: layers, convert, nets, plans")
    ap.add_argument("--quick", action="store_true", help="fewer repeats; skip the 25088x4096 conversion")
    ap.add_argument("--out", default="benchmarks/results", help="write OUT.md and OUT.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"layers", "convert", "nets", "plans"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from layers, convert, nets, plans")
    budget = 0.3 if args.quick else 1.0
    result: dict[str, Any] = {
        "environment": {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{platform.system()}", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python " + " ".join(["benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "missing_peers": [],
        }
    }  # fmt: skip
    if "layers" in sections:
        print("layers", file=sys.stderr)
        result["layers"], result["environment"]["missing_peers"] = bench_layers(budget, BATCHES, LAYERS)
    if "convert" in sections:
        print("convert", file=sys.stderr)
        result["convert"] = bench_convert(budget, CONVERT[:2] if args.quick else CONVERT)
    if "nets" in sections:
        print("nets", file=sys.stderr)
        result["nets"] = bench_nets(budget)
    if "plans" in sections:
        print("plans", file=sys.stderr)
        configs = [c for c in LAYERS if len(c[2]) == 4] if args.quick else LAYERS
        result["plans"], result["structures"] = bench_plans(budget, configs, BATCHES)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
