"""Where a long mpocompress command spends its time and memory, phase by phase.

Runs the command in this process and times each phase from the status messages it reports
(`mpocompress.utils.status`: "calibration pass 3/8", "weighing the forms of layer 12/211 (...)"):
consecutive messages that differ only in their numbers are one phase. A thread samples the resident
memory (VmRSS, Linux) every 50 ms, and each phase gets the largest sample taken while it ran. The
table goes to stderr after the command's own output, phases in the order they first ran, with their
summed seconds; what ran before the first status message (the imports, reading the model) is
"(before)", and what ran between one step's last message and the next step's first (saving, the
report) is "(between steps)".

    python benchmarks/phases.py convert SmolLM2.gguf --calib text:../shared/data/text/docstrings-en.txt --remove 0.2 -o out.safetensors
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator

from mpocompress.utils import watching as _watching

SAMPLE_S = 0.05


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def phase_of(message: str) -> str:
    """A status message without its numbers: "calibration pass 3/8" -> "calibration pass #"."""
    return re.sub(r"\d+(/\d+)?", "#", message)


class Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.now, self.since, self.high = "(before)", time.perf_counter(), _rss_mib()
        self.lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            r = _rss_mib()
            with self.lock:
                self.high = max(self.high, r)
            time.sleep(SAMPLE_S)

    def enter(self, phase: str) -> None:
        with self.lock:
            if phase == self.now:
                return
            t = time.perf_counter()
            self.seconds[self.now] = self.seconds.get(self.now, 0.0) + t - self.since
            self.peak[self.now] = max(self.peak.get(self.now, 0), self.high)
            self.now, self.since, self.high = phase, t, _rss_mib()

    def table(self) -> str:
        self.enter("(end)")
        total = sum(self.seconds.values())
        rows = [f"{'seconds':>9}  {'peak MiB':>8}  phase"]
        rows += [f"{s:9.1f}  {self.peak[p]:8d}  {p}" for p, s in self.seconds.items()]
        rows.append(f"{total:9.1f}  {max(self.peak.values()):8d}  total")
        return "\n".join(rows)


def main(argv: list[str]) -> int:
    phases = Phases()
    shown = _watching

    @contextlib.contextmanager
    def watching(fn: Callable[[str], None]) -> Iterator[None]:
        def both(message: str) -> None:
            phases.enter(phase_of(message))
            fn(message)

        with shown(both):
            yield
        phases.enter("(between steps)")

    from mpocompress.cli import render  # shows the progress: the one reader of `watching`

    render.watching = watching
    from mpocompress.cli import main as cli

    code = 0
    try:
        cli(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        render.watching = shown
        print(phases.table(), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
