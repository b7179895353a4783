"""The GPU check: every contraction plan of the factorized layers on a CUDA device, forward and
backward, against the dense product in float64 on the CPU; the batched step's own backward against
autograd's; `optimize_for_inference` on the device; the commands a user runs on the device (a tiny
Llama converted, healed by distillation with `finetune --device`, evaluated with `evaluate --device`;
`convert --calib` and `convert --stream` with `--device` against the same on the CPU (float32
passes), `convert --calib-dtype bfloat16 --device`, and streamed into shards against the one file;
`analyze --stream --device`; `export --format onnx|pt2 --device`, the pt2 program then run on the
CPU against the model);
and a short timing of plans at batch 1 and 512.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU (about a minute)
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU (what CI runs)

The commands run in this process, as the console script runs them (`run_cli`).

Exits 1 with the failing check's name when an output or gradient differs from the reference by more
than the tolerance (float32: 1e-4 relative to the reference's norm; TF32 matmuls are turned off).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mpocompress import optimize_for_inference
from mpocompress.nn import LowRankConv2d, LowRankLinear, MPOConv2d, MPOEmbedding, MPOLinear
from mpocompress.nn.inference import median_ms
from mpocompress.tensors import candidate_plans
from mpocompress.tensors.contract import _SharedBmm

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name: str, err: float, failures: list[str]) -> None:
    ok = err <= TOL
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58} relative difference {err:.2e}")
    if not ok:
        failures.append(name)


def plans_agree(device: torch.device, failures: list[str]) -> None:
    torch.manual_seed(0)
    cases = [
        ("MPOLinear 784->256 D=8", MPOLinear(784, 256, 8, (4, 7, 7, 4), (4, 4, 4, 4)), (512, 784)),
        ("MPOConv2d 16->32 k3 D=4", MPOConv2d(16, 32, 3, bond_dim=4, padding=1), (8, 16, 12, 12)),
    ]
    for name, layer, shape in cases:
        ref_layer = layer.to_dense().double()
        layer.to(device)
        x = torch.randn(*shape)
        ref = ref_layer(x.double())
        rows = x.numel() // layer.in_features if isinstance(layer, MPOLinear) else shape[0] * shape[2] * shape[3]
        for plan in candidate_plans(len(layer.cores)):
            for keep in (False, True):
                layer.release()
                layer.pin_plan(rows, plan, keep=keep)
                if keep:
                    layer.materialize()
                with torch.no_grad():
                    y = layer(x.to(device))
                check(f"{name} {plan.describe()}{' kept' if keep else ''}", rel(y, ref), failures)
            layer.release()
            layer.pin_plan(rows, None)
        # training plans (cost model's choice) and their gradients against the dense product's
        layer.train()
        xg = x.to(device).requires_grad_()
        y = layer(xg)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [xg, *layer.cores], g)
        w = layer.weight_matrix()
        dense_out = torch.nn.functional.linear(layer.patches(xg) if isinstance(layer, MPOConv2d) else xg, w)
        if isinstance(layer, MPOConv2d):
            b, _, h, wd = shape
            dense_out = dense_out.reshape(b, h * wd, -1).transpose(1, 2).reshape(y.shape) + layer.bias[:, None, None]
        else:
            dense_out = dense_out + layer.bias
        ref_grads = torch.autograd.grad(dense_out, [xg, *layer.cores], g)
        for k, (a, r) in enumerate(zip(grads, ref_grads)):
            check(f"{name} gradient {'input' if k == 0 else f'core {k - 1}'}", rel(a, r), failures)


def shared_bmm_backward(device: torch.device, failures: list[str]) -> None:
    torch.manual_seed(1)
    a = torch.randn(24, 40, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.randn(300, 40, 17, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(300, 24, 17, device=device, dtype=torch.float64)
    ours = torch.autograd.grad(_SharedBmm.apply(a, t), [a, t], g)
    ref = torch.autograd.grad(torch.bmm(a.expand(300, 24, 40), t), [a, t], g)
    check("batched step backward: grad A", rel(ours[0], ref[0]), failures)
    check("batched step backward: grad T", rel(ours[1], ref[1]), failures)


def optimized_model(device: torch.device, failures: list[str]) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        MPOConv2d(3, 16, 3, bond_dim=4, padding=1), nn.ReLU(), LowRankConv2d(16, 16, 3, rank=4, padding=1), nn.ReLU(),
        nn.Flatten(), MPOLinear(16 * 8 * 8, 128, bond_dim=8), nn.ReLU(), LowRankLinear(128, 10, rank=4),
    ).to(device)  # fmt: skip
    emb = MPOEmbedding(1000, 64, bond_dim=4).to(device)
    x = torch.randn(32, 3, 8, 8, device=device)
    with torch.no_grad():
        ref = model(x)
        for prefer in ("memory", "speed"):
            optimize_for_inference(model, x, prefer=prefer, batch=(1, 32), budget_s=0.01)
            check(f"optimize_for_inference({prefer}) model output", rel(model(x), ref), failures)
        ids = torch.randint(0, 1000, (4, 9), device=device)
        check("MPOEmbedding lookup", rel(emb(ids), emb.to_dense().weight[ids]), failures)


def timings(device: torch.device) -> None:
    torch.manual_seed(3)
    layer = MPOLinear(4096, 4096, 16, (8, 8, 8, 8), (8, 8, 8, 8)).to(device)
    dense = layer.to_dense().to(device)
    print(f"\n{'batch':>5} {'plan (from cores)':<26} {'ms':>8} {'dense nn.Linear ms':>19}")
    for b in (1, 512):
        x = torch.randn(b, 4096, device=device)
        with torch.no_grad():
            for plan in candidate_plans(4)[::9]:
                layer.pin_plan(b, plan)
                print(f"{b:>5} {plan.describe():<26} {median_ms(lambda x=x: layer(x), device, 0.2):8.3f} {median_ms(lambda x=x: dense(x), device, 0.2):19.3f}")


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """One command as the console script runs it (`mpocompress.cli.main`), in this process: its exit
    status, stdout and stderr. In process, not a subprocess each: the imports (torch, transformers'
    Llama) took about 4 s of each command's 5-7 s on the CPU, and the commands are the same code."""
    from mpocompress.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def commands(device: torch.device, failures: list[str]) -> None:
    """convert, then finetune --distill-from and evaluate --device on a tiny Llama (GQA, tied
    embeddings; the test suite's model): each must exit 0, and the heal must take its steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from lm_models import write_folder

    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        folder = write_folder("llama", d / "llama")
        steps = [
            ("convert", ["convert", str(folder), "--structure", "lowrank", "-D", "4", "-o", str(d / "s.safetensors")]),
            ("finetune --device", ["finetune", str(d / "s.safetensors"), "--distill-from", str(folder), "--data", f"text:{text}",
                                   "--max-samples", "300", "--max-length", "32", "--epochs", "1", "--device", str(device.type),
                                   "--json", "-o", str(d / "h.safetensors")]),
            ("evaluate --device", ["evaluate", str(d / "h.safetensors"), "--data", f"text:{text}", "--max-samples", "300",
                                   "--max-length", "32", "--reference", str(folder), "--device", str(device.type), "--json"]),
        ]  # fmt: skip
        # float32 passes: the device's and the CPU's bfloat16 products differ by more than the tolerance
        calib = ["--calib", f"text:{text}", "--calib-samples", "64", "--max-length", "32", "--structure", "lowrank", "-D", "4", "--calib-dtype", "float32"]
        for tag, extra in (("", []), (" --stream", ["--stream"])):  # calibrated on the device, against the same on the CPU
            for dev in dict.fromkeys((device.type, "cpu")):  # once on a CPU-only run
                steps.append((f"convert --calib{tag} --device {dev}", ["convert", str(folder), *calib, *extra, "--device", dev,
                                                                        "-o", str(d / f"c{tag.strip()}-{dev}.safetensors")]))  # fmt: skip
        steps.append((f"convert --calib --calib-dtype bfloat16 --device {device.type}",  # the passes under autocast on the device
                      ["convert", str(folder), *calib[:-2], "--calib-dtype", "bfloat16", "--device", device.type, "-o", str(d / "c-bf16.safetensors")]))
        steps.append((f"convert --calib --stream --shard-size --device {device.type}",
                      ["convert", str(folder), *calib, "--stream", "--device", device.type, "--shard-size", "40KB", "-o", str(d / "c-shards")]))
        steps.append(("analyze --stream --device", ["analyze", str(folder), "--stream", "--calib", f"text:{text}", "--calib-samples", "64",
                                                    "--max-length", "32", "--remove", "0.3", "--device", device.type, "--json"]))  # fmt: skip
        for fmt in ("onnx", "pt2"):  # traced on the device, written device-neutral, checked on the CPU by export itself
            steps.append((f"export --format {fmt} --device", ["export", str(d / "s.safetensors"), "--format", fmt, "--device", device.type,
                                                              "-o", str(d / f"s.{fmt}")]))  # fmt: skip
        for name, args in steps:
            code, out, err = run_cli(args)
            ok = code == 0
            if ok and name.startswith("finetune"):
                rep = json.loads(out)
                ok = rep["runs"][0]["steps"] > 0
            print(f"{'ok  ' if ok else 'FAIL'} command: {name:<49} exit {code}")
            if not ok:
                print(err[-2000:])
                failures.append(f"command {name}")
        if (d / "s.pt2").exists():  # the program traced on the device loads and runs on the CPU
            from mpocompress.io import load_model
            from mpocompress.models.hf import probe_inputs

            model = load_model(d / "s.safetensors", None, False).model.eval()
            x = probe_inputs(model, batch=3, length=11, seed=1)
            with torch.no_grad():
                want = model(**x).logits
                got = torch.export.load(str(d / "s.pt2")).module()(*x.values())
            check(f"export --format pt2 --device {device.type}, run on cpu = the model", rel(got, want), failures)
        if (d / "c-shards").is_dir() and (d / f"c--stream-{device.type}.safetensors").exists():  # the same model, sharded
            from mpocompress import load

            sa, sb = load(d / "c-shards").state_dict(), load(d / f"c--stream-{device.type}.safetensors").state_dict()
            check("convert --stream --shard-size = one file (all tensors)", max(rel(sa[k], sb[k]) for k in sb), failures)
        for tag in ("", "--stream"):
            a, b = (d / f"c{tag}-{dev}.safetensors" for dev in (device.type, "cpu"))
            if a.exists() and b.exists():
                ta, tb = load_file(a), load_file(b)
                num = sum(float((ta[k].double() - tb[k].double()).square().sum()) for k in tb)
                den = sum(float(tb[k].double().square().sum()) for k in tb)
                check(f"convert --calib {tag} on {device.type} = on cpu (all tensors)", (num / max(den, 1e-30)) ** 0.5, failures)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu for the same checks on the CPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    failures: list[str] = []
    plans_agree(device, failures)
    shared_bmm_backward(device, failures)
    optimized_model(device, failures)
    commands(device, failures)
    if not args.no_timing:
        timings(device)
    print(f"\n{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
