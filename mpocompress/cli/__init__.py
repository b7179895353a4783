"""Command-line interface: `mpocompress analyze` and `mpocompress convert`.

Only this package imports typer and rich. Each command parses its options, calls one library
function and renders the returned report.
"""

from __future__ import annotations

import sys

import click
import typer

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


@app.callback()
def _root() -> None:
    """Compress PyTorch models by writing their heaviest layers as matrix product operators (MPOs)."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error, click's usage errors included, ends as one line on stderr."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="mpocompress", standalone_mode=False)
    except click.exceptions.ClickException as e:
        sub = f" {e.ctx.command.name}" if getattr(e, "ctx", None) and e.ctx.command.name != "mpocompress" else ""
        sys.stderr.write(f"error: {e.format_message()} (see 'mpocompress{sub} --help')\n")
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
