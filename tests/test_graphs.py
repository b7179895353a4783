"""Every factorized layer traces (torch.jit.trace), exports (torch.export) and compiles
(torch.compile(fullgraph=True): no graph break) with outputs equal to eager within 1e-5, also on a
second input of another batch size where the captured graph allows it.
Tracing runs in both grad modes: under torch.no_grad an MPO layer once failed the tracer's own sanity
check (a plan remembered after the first run made the second run's graph differ)."""

import pytest
import torch

from mpocompress import MPOConv2d, MPOLinear
from mpocompress.nn import LowRankConv2d, LowRankLinear, MPOEmbedding
from mpocompress.tensors.cost import candidate_plans


def _cases():
    torch.manual_seed(0)
    return [
        ("MPOLinear", MPOLinear(64, 32, bond_dim=4), torch.randn(5, 64), torch.randn(9, 64)),
        ("MPOConv2d", MPOConv2d(4, 8, 3, bond_dim=3, padding=1), torch.randn(2, 4, 6, 6), torch.randn(3, 4, 6, 6)),
        ("LowRankLinear", LowRankLinear(64, 32, rank=5), torch.randn(5, 64), torch.randn(9, 64)),
        ("LowRankConv2d", LowRankConv2d(4, 8, 3, rank=3, padding=1), torch.randn(2, 4, 6, 6), torch.randn(3, 4, 6, 6)),
        (
            "MPOEmbedding",
            MPOEmbedding(1000, 48, bond_dim=4),
            torch.randint(0, 1000, (3, 7)),
            torch.randint(0, 1000, (4, 7)),
        ),
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


# ---------------------------------------------------------------- every plan, at real sizes
# Tiny layers (64 -> 32) run one plan only; at 784 x 256 the cost model picks other plans for other
# row counts and grad modes, and torch.jit.trace once failed for every plan but "dense" there (an
# in-place size product under the tracer, and a plan that changed with the grad mode between the
# tracer's two runs), and torch.compile(fullgraph=True) broke the graph inside the plan choice.


def _forced(monkeypatch, plan):
    """Every plan choice of an MPO layer returns `plan` (also inside a captured graph)."""
    from mpocompress.nn import mpo_base

    monkeypatch.setattr(mpo_base, "choose_plan", lambda *args, **kwargs: plan)


PLANS = candidate_plans(4)


@pytest.mark.parametrize(
    "plan", PLANS, ids=[f"{'+'.join(map(str, p.sizes))}-{'/'.join(p.forms) or 'dense'}" for p in PLANS]
)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_every_plan_traces_and_exports_at_784x256(plan, grad, graph_of, monkeypatch):
    _forced(monkeypatch, plan)
    torch.manual_seed(0)
    layer = MPOLinear(784, 256, bond_dim=8).eval()
    x, other = torch.randn(16, 784), torch.randn(3, 784)
    with torch.enable_grad() if grad else torch.no_grad():
        want, want_other = layer(x), layer(other)
        traced = graph_of(layer, x, "trace")
        torch.testing.assert_close(traced(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(traced(other), want_other, rtol=1e-4, atol=1e-5)
        exported = graph_of(layer, x, "export")
        torch.testing.assert_close(exported(x), want, rtol=1e-4, atol=1e-5)


def test_the_plan_a_graph_captures_does_not_depend_on_the_grad_mode():
    """torch.jit.trace traces once in the caller's mode and checks by tracing again without grad:
    both must choose the same plan (with grad the cost model alone picks dense here, without it a
    merged plan)."""
    from mpocompress.tensors.cost import choose_plan

    layer = MPOLinear(784, 256, bond_dim=8)
    assert choose_plan(layer.shape, 64, backward=True) != choose_plan(layer.shape, 16)  # the trap exists
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(layer.eval(), torch.randn(16, 784))  # raised in the tracer's check before


@pytest.mark.parametrize("kind", ["contract", "merged", "dense"])
@pytest.mark.parametrize(
    "name, layer, x",
    [
        ("MPOLinear 784x256 D=16", lambda: MPOLinear(784, 256, bond_dim=16), torch.randn(16, 784)),
        ("MPOConv2d 64->128 D=8", lambda: MPOConv2d(64, 128, 3, bond_dim=8, padding=1), torch.randn(2, 64, 8, 8)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_each_kind_of_plan_compiles_without_an_eager_run_first(name, layer, x, kind, graph_of):
    """fullgraph compilation of a fresh layer (no plan remembered from an eager call) for a forced kind
    of plan; the output equals the eager one."""
    torch.manual_seed(0)
    layer = layer().eval()
    layer.set_forward_strategy(kind)
    compiled = graph_of(layer, x, "compile")
    got = compiled(x)
    torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-5)
