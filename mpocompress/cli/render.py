"""Rich rendering of the library's reports. No computation happens here."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mpocompress.compress import CompressionReport
from mpocompress.utils import watching


def make_console() -> Console:
    """stdout console: the terminal's width, or 140 columns when writing to a file or pipe. Markup
    is off: what is printed (paths, layer names, hints like `pip install -e '.[plot]'`) is shown
    as it is, never read as rich's [style] tags; styles are given as Text objects instead."""
    return Console(width=None if sys.stdout.isatty() else 140, markup=False)


def make_err_console() -> Console:
    """stderr console for progress and per-epoch lines, so that --json output on stdout stays clean
    (markup off, as on stdout). Quiet in every torchrun process but rank 0, which speaks for all
    (error lines still come from each)."""
    quiet = os.environ.get("RANK", "0") not in ("", "0")
    return Console(stderr=True, width=None if sys.stderr.isatty() else 140, markup=False, quiet=quiet)


PLAIN_AFTER_S = 2.0  # not a terminal: a step still running after this long gets a plain line...
PLAIN_EVERY_S = 15.0  # ...and then at most one line this often with what it is doing


@contextlib.contextmanager
def working(console: Console, description: str | None) -> Iterator[None]:
    """While a step runs: on a terminal, a spinner (ASCII) with what the step reports doing
    (`mpocompress.utils.status`) and the elapsed time, gone when it ends; on a file or pipe (CI logs,
    nohup), plain lines for a step that takes more than PLAIN_AFTER_S: when it started, what it does
    every PLAIN_EVERY_S, when it ended. Quick steps (and errors found at once) print nothing."""
    if description is None:
        yield
        return
    if console.is_terminal:
        with Progress(SpinnerColumn("line"), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as p:
            task = p.add_task(escape(description), total=None)
            with watching(lambda m: p.update(task, description=escape(f"{description}: {m}"))):
                yield
        return
    t0 = time.monotonic()
    said = {"at": None}

    def line(text: str) -> None:
        said["at"] = time.monotonic()
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    timer = threading.Timer(PLAIN_AFTER_S, lambda: line(f"{description} ..."))
    timer.daemon = True
    if math.isfinite(PLAIN_AFTER_S):  # (infinite: plain lines off)
        timer.start()

    def report(message: str) -> None:
        now = time.monotonic()
        if now - t0 >= PLAIN_AFTER_S and (said["at"] is None or now - said["at"] >= PLAIN_EVERY_S):
            line(f"{description}: {message} [{now - t0:.0f} s]")

    try:
        with watching(report):
            yield
    finally:
        timer.cancel()
    if said["at"] is not None:  # it started a line: say it ended (not on an error, which speaks for itself)
        line(f"{description}: done in {time.monotonic() - t0:.0f} s")


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_err(e: float) -> str:
    return "0" if e == 0 else f"{e:.3g}"


def _modes(in_modes: list[int], out_modes: list[int]) -> str:
    return f"{'x'.join(map(str, in_modes))} -> {'x'.join(map(str, out_modes))}"


RHO_NOTE = "rho = factorized weights / dense weights of a layer [Eq. 9]"


def layers_table(report: CompressionReport, title: str, short: Callable[[str], str] = str, group: bool = False) -> Table:
    """One row per layer; with `group`, alike layers of a transformer's blocks (same shape, modes and
    bonds) share one row: per-layer sizes, the largest error, the mean entropy."""
    t = _table(title)
    larger = any(lr.rho > 1 for lr in report.layers)
    t.caption = RHO_NOTE + ("; above 1 the factorized form is larger than the dense layer" if larger else "")
    t.caption_justify = "left"
    t.add_column("layer")
    t.add_column("kind")
    t.add_column("N_y x N_x", justify="right")
    lowrank = any(lr.structure != "mpo" for lr in report.layers)
    if lowrank:
        t.add_column("structure")
    t.add_column("modes I -> J")
    t.add_column("bond dims" if not lowrank else "ranks")
    t.add_column("params", justify="right")
    t.add_column("MPO params" if not lowrank else "factor params", justify="right")
    t.add_column("rho", justify="right")
    t.add_column("rel. error", justify="right")
    calibrated = any(lr.output_rel_error is not None for lr in report.layers)
    if calibrated:
        t.add_column("output error", justify="right")
    t.add_column("entropy per bond")
    macs = any(lr.macs_dense is not None for lr in report.layers)
    if macs:
        t.add_column("MACs/sample dense", justify="right")
        t.add_column(f"MACs/sample MPO (plan, batch {report.macs_batch})", justify="right")
    rows = [(lr.name, lr, [lr]) for lr in report.layers]
    if group:
        rows = []
        by_name = {lr.name: lr for lr in report.layers}
        for label, names in _groups(list(by_name)).items():
            members = [by_name[n] for n in names]
            alike = all((m.weight_shape, m.in_modes, m.out_modes, m.bond_dims, m.structure) ==
                        (members[0].weight_shape, members[0].in_modes, members[0].out_modes, members[0].bond_dims, members[0].structure)
                        for m in members)  # fmt: skip
            rows += [(label, members[0], members)] if alike else [(m.name, m, [m]) for m in members]
        if any(len(m) > 1 for _, _, m in rows):
            t.caption += "; alike layers of the blocks share a row: sizes per layer, the largest error, the mean entropy"
    for name, lr, members in rows:
        extra = []
        if macs:
            known = lr.macs_dense is not None
            extra = [_fmt_int(lr.macs_dense), f"{_fmt_int(lr.macs_mpo)} ({lr.plan})"] if known else ["-", "-"]
        entropy = [sum(v) / len(v) for v in zip(*(m.entropy for m in members))] if members[0].entropy else []
        t.add_row(
            short(name),
            lr.kind,
            f"{lr.weight_shape[0]} x {lr.weight_shape[1]}",
            *([lr.structure] if lowrank else []),
            _modes(lr.in_modes, lr.out_modes),
            ",".join(map(str, lr.bond_dims)),
            _fmt_int(lr.params_original),
            _fmt_int(lr.params_mpo),
            f"{lr.rho:.4g}",
            _fmt_err(max(m.rel_error for m in members)),
            *([_fmt_err(lr.output_rel_error) if lr.output_rel_error is not None else "-"] if calibrated else []),
            ",".join(f"{s:.2f}" for s in entropy),
            *extra,
        )
    t.add_section()
    totals = ["total", "", "", *([""] if lowrank else []), "", "", _fmt_int(report.params_original),
              _fmt_int(report.params_mpo), f"{report.rho:.4g}", "", *([""] if calibrated else []), ""]  # fmt: skip
    if macs:
        known = report.macs_model_dense is not None
        totals += [_fmt_int(report.macs_model_dense) if known else "?", _fmt_int(report.macs_model_mpo) if known else "?"]
    t.add_row(*totals)
    if macs:
        t.caption += "; MAC totals are over every Linear/Conv2d of the model" + (
            "" if report.macs_model_dense is not None else "; convolutions need --input-shape C,H,W"
        )
    return t


def sweep_table(report: CompressionReport, short: Callable[[str], str] = str) -> Table:
    """Per D: the MPO parameters of the selected layers, rho and the model's size."""
    t = _table("Bond dimension sweep: cost at each D")
    t.add_column("D", justify="right")
    t.add_column("MPO params", justify="right")
    t.add_column("rho", justify="right")
    t.add_column("model params", justify="right")
    for sub in report.sweep:
        t.add_row(str(sub.bond_dim), _fmt_int(sub.params_mpo), f"{sub.rho:.4g}", _fmt_int(sub.params_model_after))
    return t


def sweep_errors_table(report: CompressionReport, short: Callable[[str], str] = str) -> Table:
    """The truncation error of each layer (a group of alike layers: their largest) at each D of the
    sweep, a row per layer and a column per D, so that it reads at 80 columns whatever the depth."""
    t = _table("Truncation error at each D" + (" (alike layers of the blocks grouped: their largest error)" if _grouped(report) else ""))
    t.add_column("layer")
    for sub in report.sweep:
        t.add_column(f"D={sub.bond_dim}", justify="right")
    errs = [{lr.name: lr.rel_error for lr in sub.layers} for sub in report.sweep]
    for label, names in _groups([lr.name for lr in report.layers]).items():
        row = [max((e[n] for n in names if n in e), default=None) for e in errs]
        t.add_row(short(label), *[_fmt_err(x) if x is not None else "dense" for x in row])
    return t


GROUP_FROM = 12  # layers: from this many on, alike layers of a transformer's blocks share one row


def _groups(names: list[str]) -> dict[str, list[str]]:
    """Layers by the name they have with their block index replaced by a range:
    'encoder.layer.{0-5}.attention.self.query' for the query projections of six blocks; a layer
    alone keeps its name. Below GROUP_FROM layers every layer is its own row."""
    if len(names) < GROUP_FROM:
        return {n: [n] for n in names}
    by: dict[str, list[tuple[int, str]]] = {}
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        key = n[: m.start()] + ".*." + n[m.end() :] if m else n
        by.setdefault(key, []).append((int(m.group(1)) if m else -1, n))
    out = {}
    for key, members in by.items():
        if len(members) == 1:
            out[members[0][1]] = [members[0][1]]
            continue
        idx = sorted(i for i, _ in members)
        span = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))
        out[key.replace(".*.", "." + "{" + span + "}" + ".")] = [n for _, n in members]
    return out


def _grouped(report: CompressionReport) -> bool:
    return any(len(v) > 1 for v in _groups([lr.name for lr in report.layers]).values())


CURVE_SHARES = (0.05, 0.1, 0.25, 0.5)


def curves_table(report: CompressionReport, short: Callable[[str], str] = str) -> Table:
    """Per layer and structure, the least error of a form holding at most each share of the dense weights."""
    t = _table("Error against size: least relative error of each structure within a share of the layer's weights")
    t.add_column("layer")
    t.add_column("structure")
    for share in CURVE_SHARES:
        t.add_column(f"<= {share:.0%}", justify="right")
    for name, points in report.curves.items():
        dense = max(p["params"] for p in points)
        for structure in sorted({p["structure"] for p in points} - {"dense"}):
            row = []
            for share in CURVE_SHARES:
                errs = [p["rel_error"] for p in points if p["structure"] == structure and p["params"] <= share * dense]
                row.append(_fmt_err(min(errs)) if errs else "-")
            t.add_row(short(name), structure, *row)
    return t


def skipped_table(report: CompressionReport, short: Callable[[str], str] = str) -> Table:
    t = _table("Left dense")
    t.add_column("layer")
    t.add_column("kind")
    t.add_column("weights", justify="right")
    t.add_column("why")
    for s in report.skipped:
        t.add_row(short(s.name), s.kind, _fmt_int(s.params), s.reason)
    return t


def shortener(limit: int | None) -> Callable[[str], str]:
    """Names longer than `limit` lose their beginning: 'encoder.layer.11.attention.self.query' -> '...attention.self.query'."""
    return lambda s: s if limit is None or len(s) <= limit else "..." + s[len(s) - limit + 3 :]


NARROW_DROPS = ("kind", "N_y x N_x", "modes I -> J", "entropy per bond", "MACs/sample")  # what a narrow table leaves out


def fitted(console: Console, build: Callable[[Callable[[str], str]], Table], names: list[str]) -> None:
    """Print the table `build(shorten)` makes so that it fits the console: numbers never wrap;
    when it is too wide the layer names (the longest of `names`) are shortened from the left (to no
    fewer than 16 characters), and if it is still too wide the narrow layout leaves out the columns
    of NARROW_DROPS (the JSON keeps everything)."""
    longest = max((len(n) for n in names), default=0)

    def attempt(limit: int | None, narrow: bool) -> tuple[Table, int]:
        table = build(shortener(limit))
        if narrow:
            table.columns[:] = [c for c in table.columns if not str(c.header).startswith(NARROW_DROPS)]
            for i, c in enumerate(table.columns):  # rich looks columns' widths up by their position
                c._index = i
        for col in table.columns:
            if col.justify == "right":
                col.no_wrap = True
        return table, console.measure(table, options=console.options.update_width(10_000)).maximum - console.width

    for narrow in (False, True):
        table, excess = attempt(None, narrow)
        if excess > 0 and longest > 16:
            table, excess = attempt(max(16, longest - excess), narrow)
        if excess <= 0:
            break
    console.print(table)


def render_report(console: Console, report: CompressionReport, heading: str) -> None:
    console.print(Text(heading, style="bold"))
    names = [lr.name for lr in report.layers] + [s.name for s in report.skipped] + list(report.curves or {})
    if report.sweep:
        fitted(console, lambda f: layers_table(report, "Candidate layers: exact MPO (every bond at its cap) and its entanglement entropy", f, group=True),
               list(_groups([lr.name for lr in report.layers])) + [s.name for s in report.skipped])  # fmt: skip
        fitted(console, lambda f: sweep_table(report, f), names)
        fitted(console, lambda f: sweep_errors_table(report, f), list(_groups([lr.name for lr in report.layers])))
    elif report.layers:
        verb = "Converted" if report.applied else "Would convert"
        words = {"mpo": "MPO", "lowrank": "low-rank", "mpo_embedding": "MPO embedding"}
        what = " and ".join(words.get(f, f) for f in sorted({lr.structure for lr in report.layers}))
        fitted(console, lambda f: layers_table(report, f"{verb} to {what}", f), names)
    if report.curves:
        fitted(console, lambda f: curves_table(report, f), names)
    if report.skipped:
        fitted(console, lambda f: skipped_table(report, f), names)
    if not report.sweep:
        before, after = report.params_model_before, report.params_model_after
        rho = f"; rho over the factorized layers (Eq. 9): {report.rho:.4g}" if report.layers else ""  # none factorized: no ratio
        console.print(f"Model parameters: {_fmt_int(before)} -> {_fmt_int(after)} ({after / before:.3g} of the original){rho}")
    for note in report.notes:
        console.print(f"note: {note}")
