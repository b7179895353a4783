"""The files of `mpocompress sweep` in its output folder: sweep.json (the state, rewritten after every
setting, so an interrupted sweep resumes where it stopped), sweep.csv and sweep.png. Every file
is written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpocompress.errors import MPOCompressError
from mpocompress.io.paths import atomic_write, check_output_path
from mpocompress.utils import bounded_json

FILES = ("sweep.json", "sweep.csv", "sweep.png")
CSV_COLUMNS = (
    "setting", "bond_dim", "target_params", "rho", "params_model", "accuracy_converted", "accuracy_finetuned_mean",
    "accuracy_finetuned_std", "runs",
)  # fmt: skip


def prepare_folder(
    folder: Path, inputs: tuple[Path, ...], resume: bool, force: bool, settings: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """Check the output folder before any work (`write_state` creates it); the saved state when
    resuming (None otherwise)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MPOCompressError(f"output {folder} is a file, but sweep writes a folder; choose another -o")
    for src in inputs:
        if src.exists() and folder.exists() and folder.resolve() in src.resolve().parents:
            raise MPOCompressError(f"output {folder} holds the input {src}; choose another -o (inputs are never modified)")
    state_path = folder / FILES[0]
    if resume:
        if not state_path.is_file():
            raise MPOCompressError(f"no sweep to resume in {folder} (no {FILES[0]}); run without --resume to start one")
        return read_state(state_path, settings)
    if state_path.exists() and not force:
        raise MPOCompressError(f"{state_path} exists; add --resume to continue that sweep, or --force to start over")
    parent = folder.parent if str(folder.parent) else Path(".")
    if not parent.is_dir():
        raise MPOCompressError(f"cannot write {folder}: folder {parent} does not exist; create it or choose another -o")
    if folder.exists():
        for name in FILES:
            check_output_path(folder / name, force=True, inputs=inputs)
    return None


MAX_STATE_BYTES = 64 << 20
POINT_NUMBERS = ("rho", "params_model", "accuracy_converted", "loss_converted")


def read_state(path: Path, settings: Sequence[str] | None = None) -> dict[str, Any]:
    """A sweep's saved state, checked like any input: bounded size and nesting, and every point one
    of the settings the state records (else of `settings`), once, with finite numbers."""
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise ValueError("too large")
        state = bounded_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MPOCompressError(f"cannot read {path} ({type(e).__name__}); remove it and run without --resume") from None
    if not isinstance(state, dict) or not isinstance(state.get("points"), list) or not isinstance(state.get("identity"), dict):
        raise MPOCompressError(f"{path} is not a sweep state; remove it and run without --resume")
    asked = state["identity"].get("settings")  # the points must be of the sweep that wrote them (a different
    settings = asked if isinstance(asked, list) else settings  # sweep's settings are named by the caller's identity check)
    seen: set[str] = set()
    for p in state["points"]:
        label = p.get("setting") if isinstance(p, dict) else None
        ok = (isinstance(label, str) and (settings is None or label in settings) and label not in seen
              and all(_finite(p.get(k)) for k in POINT_NUMBERS) and isinstance(p.get("accuracy_finetuned"), list)
              and all(_finite(a) for a in p["accuracy_finetuned"]))  # fmt: skip
        if not ok:
            raise MPOCompressError(f"{path} holds a point this sweep did not measure (damaged, edited, or repeated: {str(label)[:40]!r}); "
                                   "remove the file and rerun without --resume, or with --force")  # fmt: skip
        seen.add(label)
    return state


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    text = json.dumps(state, indent=1, allow_nan=False) + "\n"
    Path(folder).mkdir(exist_ok=True)
    atomic_write(Path(folder) / FILES[0], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_csv(folder: Path, points: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in points:
        row = {**p, "runs": len(p["accuracy_finetuned"])}
        w.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    text = buf.getvalue()
    atomic_write(Path(folder) / FILES[1], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_plot(folder: Path, state: dict[str, Any]) -> bool:
    """sweep.png: accuracy right after conversion and after fine-tuning (mean +- sigma over the
    runs) against rho, with the dense model's accuracy as a line. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = sorted(state["points"], key=lambda p: p["rho"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    rho = [p["rho"] for p in points]
    ax.axhline(100 * state["dense"]["accuracy"], color="0.3", linestyle="--", linewidth=1,
               label=f"dense ({100 * state['dense']['accuracy']:.2f} %)")  # fmt: skip
    ax.plot(rho, [100 * p["accuracy_converted"] for p in points], "o:", color="tab:orange", label="right after conversion")
    tuned = [p for p in points if p["accuracy_finetuned"]]
    if tuned:
        runs = max(len(p["accuracy_finetuned"]) for p in tuned)
        ax.errorbar([p["rho"] for p in tuned], [100 * p["accuracy_finetuned_mean"] for p in tuned],
                    yerr=[100 * (p["accuracy_finetuned_std"] or 0.0) for p in tuned], fmt="s-", color="tab:blue", capsize=3,
                    label=f"after {state['finetune_epochs']} fine-tuning epoch(s)" + (f", mean +- sigma of {runs} runs" if runs > 1 else ""))  # fmt: skip
    for p in points:
        ax.annotate(p["setting"], (p["rho"], 100 * p["accuracy_converted"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if rho and all(r > 0 for r in rho) and max(rho) / min(rho) > 5:
        ax.set_xscale("log")
    ax.set_xlabel("rho = factorized weights / dense weights [Eq. 9]")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{Path(state['model']).name} on {state['data']}", fontsize=10)
    low = min([100 * p["accuracy_converted"] for p in points] + [100 * state["dense"]["accuracy"]])
    ax.set_ylim(max(0.0, math.floor(low / 10) * 10 - 5), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        atomic_write(Path(folder) / FILES[2], lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return True
