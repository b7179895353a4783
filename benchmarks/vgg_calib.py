"""The VGG row of the speed issue: `convert` of a VGG16-BN-based CNN (20.9M parameters: the 13
convolutions of VGG-16 with batch normalization, global average pooling, FC 512 -> 4096 -> 1000) with
`--target-params 0.5 --calib` on 32 images of 320 x 320 (target: <= 3 min on 2 cores).

No pretrained VGG is offline. The weights are random (He initialisation, the batch-norm statistics
gathered on the calibration images so activations keep their scale); the time of a calibrated
conversion depends on the shapes (the patch rows of every convolution, the widths of the Grams), not on
the values. The images are MNIST digits scaled to 320 x 320 in 3 channels, written as an x-only file
(with a fifth more, which convert holds out as its probe).

    python benchmarks/vgg_calib.py                    # the row: 32 images (minutes)
    python benchmarks/vgg_calib.py --images 4         # a quick look
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_bn(num_classes: int = 1000) -> nn.Module:
    """VGG-16's convolutions with batch normalization, global average pooling, FC 512 -> 4096 -> classes."""
    layers: list[nn.Module] = []
    c = 3
    for item in CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            c = item
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 4096), nn.ReLU(inplace=True),
                         nn.Linear(4096, num_classes))  # fmt: skip


def images(n: int, size: int) -> torch.Tensor:
    """n MNIST training digits (the shared copy), scaled to size x size, 3 channels, in [0, 1]."""
    from mpocompress.io.data import load_dataset

    ds = load_dataset("mnist", "train", ROOT.parent / "shared" / "data", augment=False, image_size=size, channels=3, normalize=None)
    x, _ = ds.batch(torch.arange(n))
    return x.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--target", default="0.5")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    from safetensors.torch import save_file

    from mpocompress import save

    work = args.work or Path(tempfile.mkdtemp(prefix="mpo-vgg-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = vgg16_bn()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    x = images(round(args.images / 0.8), args.size)  # an x-only file keeps a fifth for testing: `args.images` calibrate
    model.train()
    with torch.no_grad():  # batch-norm statistics of these images (momentum None: their plain average)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        for k in range(0, len(x), 8):
            model(x[k : k + 8])
    model.eval()
    arch = "benchmarks.vgg_calib:vgg16_bn"
    save(model, work / "vgg.safetensors", arch=arch, force=True)
    save_file({"x": x.contiguous()}, str(work / "images.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    cmd = [sys.executable, "-m", "mpocompress", "convert", str(work / "vgg.safetensors"), "--arch", arch, "--target-params", args.target,
           "--calib", str(work / "images.safetensors"), "-o", str(work / "out.safetensors"), "--force"]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "TIME %e s %M KB", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    peak = next((ln for ln in r.stderr.splitlines() if ln.startswith("TIME ")), "")
    if r.returncode != 0:
        sys.exit(f"convert failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    print(r.stdout[-1500:])
    print(f"| model | parameters | images | target | wall time | peak RSS |\n|---|---|---|---|---|---|\n"
          f"| VGG16-BN, GAP, FC 512-4096-1000 | {params:,} | {args.images} of {args.size}x{args.size} | {args.target} | {seconds:.0f} s | "
          f"{int(peak.split()[3]) / 2**20:.2f} GiB |")  # fmt: skip


if __name__ == "__main__":
    main()
