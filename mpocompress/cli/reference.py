"""docs/cli.md, generated from the typer app itself so that it cannot drift from `--help`:
`python -m mpocompress.cli.reference > docs/cli.md` (a test checks the file is current)."""

from __future__ import annotations

import inspect

import typer

from mpocompress.cli import app

HEADER = """# Command-line reference

Generated from the commands themselves by `python -m mpocompress.cli.reference > docs/cli.md`
(`tests/test_first_hour.py` checks that this file is current). `mpocompress COMMAND --help` prints the
same text. The README shows the common paths; this page lists every option.
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(p: object) -> str:
    default = getattr(p, "default", None)
    if not getattr(p, "show_default", False) or default in (None, (), [], False) or callable(default):
        return ""
    return f" [default: {default}]"


def _params(command: object) -> list[tuple[str, str]]:
    rows = []
    for p in command.params:  # type: ignore[attr-defined]
        if p.param_type_name == "argument":
            name = f"`{p.metavar or p.name.upper()}`"
        else:
            flags = ", ".join(p.opts) + (" / " + ", ".join(p.secondary_opts) if p.secondary_opts else "")
            meta = "" if getattr(p, "is_flag", False) or p.secondary_opts else f" {p.metavar or p.name.upper()}"
            name = f"`{flags}{meta}`"
        rows.append((name.replace("|", "\\|"), _cell((getattr(p, "help", None) or "") + _default(p))))
    return rows


def cli_reference() -> str:
    """The whole reference, one section per command: its help text (examples as code) and its options."""
    group = typer.main.get_command(app)
    out = [HEADER]
    for name in sorted(group.commands):  # type: ignore[attr-defined]
        command = group.commands[name]  # type: ignore[attr-defined]
        out.append(f"## `mpocompress {name}`\n")
        text = inspect.cleandoc(command.help or "")
        body, _, example = text.partition("\b\nExamples:")
        out.append(body.strip().replace("\b\n", "") + "\n")
        if example.strip():
            out.append("Examples:\n\n```bash\n" + "\n".join(ln.strip() for ln in example.strip().splitlines()) + "\n```\n")
        out.append("| option | meaning |\n| --- | --- |")
        out.extend(f"| {n} | {h} |" for n, h in _params(command))
        out.append("| `--help` | Show the command's help and exit. |\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(cli_reference(), end="")
