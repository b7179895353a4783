"""Stopping a run cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM do not kill the process: they are recorded, and
    `fit(..., should_stop=stop)` stops after the current step with a resumable state. A second
    signal interrupts at once (KeyboardInterrupt). Handlers are installed only in the main thread
    and restored on exit.

        with StopOnSignal() as stop:
            fit(model, train, test, config, save_state=..., should_stop=stop)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __call__(self) -> int:
        """The signal received (0 while none was)."""
        return self.signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
