"""Command-line interface: `mpocompress analyze`, `convert`, `train`, `finetune`, `evaluate`, `sweep` and `export`.

Only this package imports typer and rich. Each command parses its options, calls one library
function and renders the returned report.
"""

from __future__ import annotations

import signal
import sys
import threading

import typer

try:  # typer >= 0.20 vendors click as typer._click; older releases use click itself
    import click

    _CLICK_ERRORS: tuple[type[BaseException], ...] = (click.exceptions.ClickException,)
    _ABORTS: tuple[type[BaseException], ...] = (click.exceptions.Abort,)
except ImportError:  # pragma: no cover
    _CLICK_ERRORS, _ABORTS = (), ()
_CLICK_ERRORS += tuple(t for t in (getattr(typer, "TyperException", None),) if t is not None)
_ABORTS += (typer.Abort,)

app = typer.Typer(
    name="mpocompress",
    help="Compress PyTorch models by writing their heaviest layers as matrix product operators (MPOs).",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

from mpocompress.cli import analyze as _analyze  # noqa: E402,F401  (registers the command)
from mpocompress.cli import convert as _convert  # noqa: E402,F401
from mpocompress.cli import evaluate as _evaluate  # noqa: E402,F401
from mpocompress.cli import export as _export  # noqa: E402,F401
from mpocompress.cli import finetune as _finetune  # noqa: E402,F401
from mpocompress.cli import sweep as _sweep  # noqa: E402,F401
from mpocompress.cli import train as _train  # noqa: E402,F401


def _print_version(value: bool) -> None:
    if value:
        from mpocompress._version import __version__

        sys.stdout.write(f"mpocompress {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
) -> None:
    """Compress PyTorch models by writing their heaviest layers as matrix product operators (MPOs)."""


class _Terminated(BaseException):
    """SIGTERM outside training (which stops at a step boundary itself): unwinds like Ctrl-C, so that
    a file being written is removed rather than left half-written."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _say_removed_stale() -> None:
    from mpocompress.io.paths import REMOVED_STALE

    if REMOVED_STALE:
        names = ", ".join(str(p) for p in REMOVED_STALE[:3])
        sys.stderr.write(f"note: removed {len(REMOVED_STALE)} temporary file(s) a killed earlier run left: {names}\n")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error, click's usage errors included, ends as one line on stderr."""
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot encode a name gets escapes, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from mpocompress.io.paths import REMOVED_STALE

    REMOVED_STALE.clear()  # what this command removes, said once at its end
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        _main(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)  # an in-process caller gets its handler back
        _say_removed_stale()


def _main(argv: list[str] | None) -> None:
    command = typer.main.get_command(app)
    if not (sys.argv[1:] if argv is None else argv):
        argv = ["--help"]  # bare `mpocompress` shows the help, successfully
    try:
        code = command.main(args=argv, prog_name="mpocompress", standalone_mode=False)
    except _ABORTS:
        sys.stderr.write("error: aborted\n")
        sys.exit(130)
    except _CLICK_ERRORS as e:
        ctx = getattr(e, "ctx", None)
        sub = f" {ctx.command.name}" if ctx is not None and ctx.command.name not in (None, "mpocompress") else ""
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        sys.stderr.write(f"error: {message} (see 'mpocompress{sub} --help')\n")
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        sys.stderr.write("error: aborted\n")
        sys.exit(130)
    except _Terminated:
        sys.stderr.write("error: terminated (SIGTERM); no output was left half-written\n")
        sys.exit(143)
    sys.exit(code if isinstance(code, int) else 0)
