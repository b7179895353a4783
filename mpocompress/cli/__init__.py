"""Command-line interface: `mpocompress analyze`, `convert`, `train`, `finetune`, `evaluate`, `sweep` and `export`.

Only this package imports typer and rich. Each command parses its options, calls one library
function and renders the returned report.
"""

from __future__ import annotations

import sys

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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error, click's usage errors included, ends as one line on stderr."""
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
    sys.exit(code if isinstance(code, int) else 0)
