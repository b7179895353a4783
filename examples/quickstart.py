"""Quick start on scikit-learn's bundled digits (no download): train a dense FC2, then check a
compressed copy. Used by examples/quickstart.sh:

    python examples/quickstart.py train runs/fc2_digits.pt
    mpocompress analyze runs/fc2_digits.pt --arch fc2
    mpocompress convert runs/fc2_digits.pt --arch fc2 --bond-dim 16 -o runs/fc2_digits_d16.safetensors
    python examples/quickstart.py evaluate runs/fc2_digits_d16.safetensors
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import mpocompress
from mpocompress.data import digits


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset) -> float:
    model.eval()
    x, y = dataset.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def train(out: Path, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = mpocompress.build_model("fc2")
    train_set, test_set = digits("train"), digits("test")
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    # Eq. 7 of the paper: cross-entropy + L2 (weight decay), SGD with momentum
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(f"dense FC2 trained on digits for {epochs} epochs: test accuracy {accuracy(model, test_set):.4f}; saved {out}")


def evaluate(path: Path, arch: str | None) -> None:
    model = mpocompress.load(path, arch=arch)
    n = sum(p.numel() for p in model.parameters())
    print(f"{path}: {n:,} parameters, test accuracy on digits {accuracy(model, digits('test')):.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a dense FC2 on digits and save its state_dict")
    t.add_argument("out", type=Path)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="test accuracy of a model file on digits")
    e.add_argument("model", type=Path)
    e.add_argument("--arch", default="fc2")
    args = parser.parse_args()
    if args.cmd == "train":
        train(args.out, args.epochs, args.seed)
    else:
        evaluate(args.model, args.arch)
