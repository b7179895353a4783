"""Tables fit the terminal: numbers never wrap or get cut, long layer names are shortened from the
left, and a narrow terminal gets the narrow layout (checked at 60, 80 and 140 columns, as a pipe
renders)."""

import io
import re

import pytest
import torch
from rich.console import Console
from torch import nn

from mpocompress import CompressionConfig, analyze
from mpocompress.cli.render import render_report, shortener


class _Deep(nn.Module):
    """A model whose layer names are long, like a transformer's."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([nn.ModuleDict({
            "attention_output_projection_dense": nn.Linear(256, 784), "intermediate_dense_projection": nn.Linear(784, 256),
        }) for _ in range(2)])})  # fmt: skip

    def forward(self, x):
        return x


def _render(report, width):
    buf = io.StringIO()
    render_report(Console(file=buf, width=width, force_terminal=False, color_system=None), report, "heading")
    return buf.getvalue()


@pytest.mark.parametrize("width", [60, 80, 140])
def test_numbers_never_wrap_and_lines_fit(width):
    torch.manual_seed(0)
    report = analyze(_Deep(), CompressionConfig(bond_dim=8))
    text = _render(report, width)
    assert max(len(line) for line in text.splitlines()) <= width
    numbers = {f"{n:,}" for lr in report.layers for n in (lr.params_original, lr.params_mpo)} | {f"{report.params_original:,}"}
    for n in numbers:
        assert re.search(rf"(?<![\d,]){re.escape(n)}(?![\d,])", text), (n, text)
    if width >= 80:  # each layer's row is there, its name whole or shortened from the left
        for lr in report.layers:
            assert lr.name[-12:] in text


def test_long_names_lose_their_beginning_not_their_end():
    short = shortener(20)("encoder.layer.11.attention.self.query")
    assert len(short) == 20 and short.startswith("...") and short.endswith("attention.self.query"[-17:])
    assert shortener(None)("x" * 100) == "x" * 100 and shortener(20)("short") == "short"


def test_a_long_step_shows_a_spinner_with_its_elapsed_time_on_a_terminal():
    import time

    from mpocompress.cli.render import working

    buf = io.StringIO()
    with working(Console(file=buf, force_terminal=True, width=80), "analyzing the layers"):
        time.sleep(0.3)
    assert "analyzing the layers" in buf.getvalue() and "0:00:00" in buf.getvalue()
    quiet = io.StringIO()
    with working(Console(file=quiet, force_terminal=False, width=80), "analyzing the layers"):
        pass
    assert quiet.getvalue() == ""  # nothing in a pipe or a log


def test_training_reports_its_first_step_at_once():
    from torch.utils.data import TensorDataset

    from mpocompress.train import TrainConfig, fit

    calls = []
    x, y = torch.randn(200, 8), torch.randint(0, 2, (200,))
    fit(nn.Linear(8, 2), TensorDataset(x, y), TensorDataset(x, y), TrainConfig(epochs=2, batch_size=4),
        on_batch=lambda *a: calls.append(a[:3]))  # fmt: skip
    assert calls[0] == (1, 1, 50) and (1, 20, 50) in calls and calls[-1] == (2, 50, 50)
