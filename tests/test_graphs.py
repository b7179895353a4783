"""Every factorized layer traces (torch.jit.trace), exports (torch.export) and compiles
(torch.compile(fullgraph=True): no graph break) with outputs equal to eager within 1e-5, also on a
second input of another batch size where the captured graph allows it.
Tracing runs in both grad modes: under torch.no_grad an MPO layer once failed the tracer's own sanity
check (a plan remembered after the first run made the second run's graph differ)."""

import pytest
import torch

from mpocompress import MPOConv2d, MPOLinear
from mpocompress.nn import LowRankConv2d, LowRankLinear, MPOEmbedding


def _cases():
    torch.manual_seed(0)
    return [
        ("MPOLinear", MPOLinear(64, 32, bond_dim=4), torch.randn(5, 64), torch.randn(9, 64)),
        ("MPOConv2d", MPOConv2d(4, 8, 3, bond_dim=3, padding=1), torch.randn(2, 4, 6, 6), torch.randn(3, 4, 6, 6)),
        ("LowRankLinear", LowRankLinear(64, 32, rank=5), torch.randn(5, 64), torch.randn(9, 64)),
        ("LowRankConv2d", LowRankConv2d(4, 8, 3, rank=3, padding=1), torch.randn(2, 4, 6, 6), torch.randn(3, 4, 6, 6)),
        ("MPOEmbedding", MPOEmbedding(1000, 48, bond_dim=4), torch.randint(0, 1000, (3, 7)), torch.randint(0, 1000, (4, 7))),
    ]


CASES = _cases()


@pytest.mark.parametrize("how", ["trace", "trace without grad", "export", "compile"])
@pytest.mark.parametrize("name, layer, x, other", CASES, ids=[c[0] for c in CASES])
def test_a_factorized_layer_traces_exports_and_compiles(name, layer, x, other, how, graph_of):
    layer.eval()
    grad = torch.no_grad() if how == "trace without grad" else torch.enable_grad()
    with grad:
        graph = graph_of(layer, x, how.split()[0])
        torch.testing.assert_close(graph(x), layer(x), rtol=1e-5, atol=1e-5)
        if how != "export":  # an export is specialised to its example's shapes unless given dynamic dims
            torch.testing.assert_close(graph(other), layer(other), rtol=1e-5, atol=1e-5)
