"""The package layout of docs/architecture.md holds: imports only point down the layers, pure math
stays pure, and the library neither prints nor renders.

Layers, lowest first: errors/utils/_version, tensors, nn, {compress, models} (siblings that do not
import each other), io, train, cli, __main__. A module may import its own package and anything lower.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mpocompress"
RANK = {
    "errors": 0, "utils": 0, "_version": 0,
    "tensors": 1,
    "nn": 2,
    "compress": 3, "models": 3,
    "io": 4,
    "train": 5,
    "cli": 6,
    "__main__": 7,
}  # fmt: skip
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _part(path: Path, package: Path = PACKAGE) -> str:
    """The top-level part of mpocompress a file belongs to (its sub-package or module name)."""
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, package: Path = PACKAGE) -> list[str]:
    """Every module name the file imports, relative imports resolved."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(package.parent).with_suffix("").parts[: -node.level]
                names.append(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.append(node.module)
    return names


def _violations(path: Path, package: Path = PACKAGE) -> list[str]:
    """The imports of `path` that point up or sideways in the layers (or at the top-level package)."""
    here = _part(path, package)
    bad = []
    for name in _imports(path, package):
        parts = name.split(".")
        if parts[0] != "mpocompress":
            continue
        there = parts[1] if len(parts) > 1 else None
        if there == here:
            continue
        if there is None or there not in RANK or RANK[there] >= RANK[here]:
            bad.append(name)
    return bad


def test_every_part_has_a_rank():
    assert {_part(p) for p in MODULES} <= set(RANK), "a new package needs a place in RANK and docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    assert _violations(path) == [], f"{path.relative_to(PACKAGE)} imports upward or sideways"


def test_the_checker_flags_upward_and_sideways_imports(tmp_path):
    """The rule is not vacuous: a tensors module importing compress (absolutely) or nn (relatively),
    and a models module importing compress, are flagged; a downward import is not."""
    root = tmp_path / "mpocompress"
    (root / "tensors").mkdir(parents=True)
    (root / "models").mkdir()
    up = root / "tensors" / "x.py"
    up.write_text("import torch\nfrom mpocompress.compress import compress_\nfrom ..nn import MPOLinear\nfrom .shape import MPOShape\n")
    side = root / "models" / "y.py"
    side.write_text("from mpocompress.compress.select import match\nfrom mpocompress.nn import MPOLinear\n")
    assert _violations(up, root) == ["mpocompress.compress", "mpocompress.nn"]
    assert _violations(side, root) == ["mpocompress.compress.select"]


def test_tensors_are_pure_math():
    for path in (PACKAGE / "tensors").glob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("torch.nn", "safetensors", "typer", "rich", "os", "pathlib")), f"{path.name} imports {name}"
            if name.startswith("mpocompress."):
                assert name.split(".")[1] in ("tensors", "errors"), f"{path.name} imports {name}"


def test_only_the_cli_renders_or_prints():
    for path in MODULES:
        if _part(path) in ("cli", "__main__"):
            continue
        tree = ast.parse(path.read_text())
        for name in _imports(path):
            assert not name.startswith(("typer", "rich")), f"{path.relative_to(PACKAGE)} imports {name}"
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{path.relative_to(PACKAGE)} prints (line {calls[0].lineno}); return a report instead"
