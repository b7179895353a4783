"""Print the Markdown tables of docs/results.md from the JSON reports of examples/paper_results.sh
(or, with --calib, of examples/calib_results.sh).

    python examples/results_table.py runs/results
    python examples/results_table.py --calib runs/calib
"""

import json
import sys
from pathlib import Path


def pct(rep: dict) -> str:
    s = f"{100 * rep['accuracy']:.2f}"
    if rep.get("accuracy_std") is not None:
        s += f" ± {100 * rep['accuracy_std']:.2f}"
    return s


def _reader(folder: Path):  # noqa: ANN202
    """get(name): the JSON report NAME.json in folder, or None when it is missing or empty."""

    def get(name: str) -> dict | None:
        p = folder / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else None

    return get


def main(folder: Path) -> None:
    get = _reader(folder)
    print("| network | D | test accuracy (%) | rho | parameters | epochs | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, d in [("fc2_dense", "-"), *[(f"fc2_mpo_D{D}", str(D)) for D in (2, 4, 8, 16)], ("lenet5_dense", "-"), ("lenet5_mpo", "paper")]:
        rep = get(name)
        if rep:
            kind = f"{rep['arch']}{' MPO-Net' if rep.get('mpo') else ' dense'} ({rep['n_runs']} runs)"
            print(f"| {kind} | {d} | {pct(rep)} | {rep['rho']:.4f} | {rep['params_model_after']:,} | {rep['epochs']} | {rep['wall_time_s']:.0f} |")
    print()
    print("| model | D | rel. error (first MPO) | accuracy before conversion | right after | after fine-tuning (per epoch) | rho |")
    print("|---|---|---|---|---|---|---|")
    for net in ("fc2", "lenet5"):
        dense = get(f"{net}_dense")
        for D in (4, 16):
            conv = get(f"{net}_convert_D{D}")
            for kind in ("finetune", "distill"):
                ft = get(f"{net}_{kind}_D{D}")
                if not (dense and conv and ft):
                    continue
                per_epoch = ", ".join(f"{100 * h['test_accuracy']:.2f}" for h in ft["runs"][0]["history"])
                label = f"{net}, {'plain' if kind == 'finetune' else 'distilled'}"
                first = dense["runs"][0]["accuracy"]
                print(f"| {label} | {D} | {conv['layers'][0]['rel_error']:.3f} | {100 * first:.2f} | "
                      f"{100 * ft['accuracy_before']:.2f} | {per_epoch} | {ft['rho']:.4f} |")


def calib_table(folder: Path) -> None:
    """Convert-then-finetune with and without --calib (examples/calib_results.sh)."""

    get = _reader(folder)
    print("| model | D | start | weight error (first MPO) | output error (first MPO) | right after | after fine-tuning (per epoch) | rho |")
    print("|---|---|---|---|---|---|---|---|")
    for net in ("fc2", "lenet5"):
        for D in (4, 16):
            for mode in ("weight", "calib"):
                conv, ft = get(f"{net}_{mode}_D{D}"), get(f"{net}_{mode}_D{D}_ft")
                if not (conv and ft):
                    continue
                first = conv["layers"][0]
                out_err = f"{first['output_rel_error']:.3f}" if first.get("output_rel_error") is not None else "-"
                per_epoch = ", ".join(f"{100 * h['test_accuracy']:.2f}" for h in ft["runs"][0]["history"])
                label = "TT-SVD of the weights" if mode == "weight" else "calibrated (--calib mnist)"
                print(f"| {net} | {D} | {label} | {first['rel_error']:.3f} | {out_err} | {100 * ft['accuracy_before']:.2f} | "
                      f"{per_epoch} | {ft['rho']:.4f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--calib"]:
        calib_table(Path(args[1] if len(args) > 1 else "runs/calib"))
    else:
        main(Path(args[0] if args else "runs/results"))
