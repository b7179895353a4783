"""How far each factorized layer's weights moved from the original's scale.

A compressed layer that reproduces its outputs on the calibration data can still hold weights far
larger than the original's, in directions the calibration inputs barely excite (the sequential and
streamed refits did, before their damping was raised: docs/performance.md, 2026-12-07 tenth
session). This prints, per factorized layer, the Frobenius and spectral norms of its dense
equivalent over the original's, largest first, and how many layers exceed 1.2x and 2x.

    python benchmarks/weight_scale.py OUT.safetensors ORIGINAL [--top 10]

ORIGINAL is anything `mpocompress evaluate --reference` reads (a Hugging Face folder, a GGUF file).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from mpocompress.io.model_files import load_model
from mpocompress.nn import FactorizedLayer


def dense_matrix(module: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as a matrix (outputs x inputs; an embedding's table as it is stored)."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1).double()


def scales(compressed: torch.nn.Module, original: torch.nn.Module) -> list[tuple[str, float, float]]:
    """(name, Frobenius ratio, spectral ratio) of every factorized layer, largest Frobenius ratio first."""
    rows, seen = [], set()
    for name, module in compressed.named_modules():
        if not isinstance(module, FactorizedLayer) or id(module) in seen:
            continue
        seen.add(id(module))
        a, w = dense_matrix(module.to_dense()), dense_matrix(original.get_submodule(name))
        spectral = float(torch.linalg.matrix_norm(a, 2) / torch.linalg.matrix_norm(w, 2))
        rows.append((name, float(a.norm() / w.norm()), spectral))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compressed")
    parser.add_argument("original")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    rows = scales(load_model(args.compressed).model, load_model(args.original).model)
    if not rows:
        print(f"error: {args.compressed} has no factorized layers; give the file convert wrote", file=sys.stderr)
        raise SystemExit(2)
    print(f"{len(rows)} factorized layers; Frobenius norm over the original's: median {statistics.median(r[1] for r in rows):.2f}, "
          f"over 1.2x: {sum(r[1] > 1.2 for r in rows)}, over 2x: {sum(r[1] > 2 for r in rows)}")  # fmt: skip
    print(f"{'layer':45s} {'Frobenius x':>12s} {'spectral x':>11s}")
    for name, frob, spectral in rows[: args.top]:
        print(f"{name:45s} {frob:12.2f} {spectral:11.2f}")


if __name__ == "__main__":
    main()
