"""The tensorized (MPO) embedding: lookups against the dense table, gradients against autograd of
the multiplied-out table, the padded vocabulary, selection (named, or offered to a budget), token
counts from calibration, metadata checks and files.

References are independent of the lookup path: the table multiplied out by `mpo_to_matrix` (the
same map the TT-SVD's error is measured on) and nn.Embedding itself. Float64 where exactness is
claimed (tolerance 1e-10), float32 otherwise (1e-5).
"""

import math

import pytest
import torch
from torch import nn

from mpocompress import CompressionConfig, MPOCompressError, compress_
from mpocompress.compress.calibrate import collect_grams
from mpocompress.compress.choose import LayerPlan
from mpocompress.compress.targets import select_targets
from mpocompress.io.metadata import check_layer_spec
from mpocompress.nn import LAYER_KINDS, MPOEmbedding, layer_from_spec, padded_vocab, vocab_modes
from mpocompress.tensors import mpo_to_matrix, tt_svd


def _smooth(n):
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


@pytest.mark.parametrize("n", [1, 7, 997, 1000, 30522])
def test_the_padded_vocabulary_is_the_next_5_smooth_number(n):
    m = padded_vocab(n)
    assert m >= n and _smooth(m) and not any(_smooth(k) for k in range(n, m))
    assert math.prod(vocab_modes(n, 3)) == m


def _embedding(v=997, d=24, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(v, d, dtype=dtype)


def _mpo_of(emb, bond=None, n=3):
    v = emb.num_embeddings
    w = torch.nn.functional.pad(emb.weight.detach().T, (0, padded_vocab(v) - v))
    dec = tt_svd(w, vocab_modes(v, n), (2, 3, 4) if n == 3 else (2, 2, 3, 2), max_bond=bond)
    return MPOEmbedding.from_cores(dec.cores, v), dec


@pytest.mark.parametrize("n", [3, 4])
def test_an_untruncated_mpo_embedding_looks_up_the_dense_rows(n):
    emb = _embedding()
    mpo, dec = _mpo_of(emb, None, n)
    assert dec.rel_error < 1e-12
    ids = torch.randint(0, 997, (5, 9))
    torch.testing.assert_close(mpo(ids), emb(ids), atol=1e-10, rtol=0)
    torch.testing.assert_close(mpo.weight, emb.weight, atol=1e-10, rtol=0)
    assert mpo(torch.tensor([996, 0])).shape == (2, 24) and mpo(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 24)


def test_a_truncated_lookup_is_the_multiplied_out_table_and_its_error_is_the_tables():
    emb = _embedding()
    mpo, dec = _mpo_of(emb, 4)
    table = mpo_to_matrix(list(mpo.cores)).detach().T  # (padded V, d), the reference
    ids = torch.arange(997)
    torch.testing.assert_close(mpo(ids), table[:997], atol=1e-10, rtol=0)
    err = float(torch.linalg.norm(table[:997] - emb.weight.detach()) / torch.linalg.norm(emb.weight.detach()))
    assert dec.rel_error == pytest.approx(err, rel=1e-4)  # the padded columns are zeros: the same error
    assert mpo.num_mpo_params < emb.weight.numel() and mpo.weight_numel == emb.weight.numel()


def test_gradients_of_a_lookup_equal_autograd_through_the_multiplied_out_table():
    mpo, _ = _mpo_of(_embedding(), 5)
    ids = torch.randint(0, 997, (4, 11))
    target = torch.randn(4, 11, 24, dtype=torch.float64)
    ((mpo(ids) - target) ** 2).sum().backward()
    fast = [c.grad.clone() for c in mpo.cores]
    mpo.zero_grad()
    ((mpo.weight[ids] - target) ** 2).sum().backward()
    for a, b in zip(fast, (c.grad for c in mpo.cores)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_ids_outside_the_vocabulary_are_refused_as_by_nn_embedding():
    mpo, _ = _mpo_of(_embedding(), 4)
    for bad in (997, 999, -1):  # 997..999 are padded rows, not tokens
        with pytest.raises(IndexError, match="out of range"):
            mpo(torch.tensor([3, bad]))
    with pytest.raises(MPOCompressError, match="integer token ids"):
        mpo(torch.zeros(2, 3))


def test_a_random_mpo_embedding_has_the_scale_of_nn_embedding_and_rebuilds_from_its_spec():
    torch.manual_seed(0)
    m = MPOEmbedding(1000, 64, bond_dim=16, padding_idx=0)
    std = float(m.weight.detach().std())
    assert 0.8 < std < 1.25  # nn.Embedding draws N(0, 1)
    spec = m.spec()
    assert LAYER_KINDS[spec["kind"]] is MPOEmbedding
    twin = layer_from_spec(spec)
    assert twin.spec() == spec and twin.to_dense().padding_idx == 0
    torch.testing.assert_close(m.to_dense().weight, m.weight.detach())


@pytest.mark.parametrize("edit, fragment", [
    ({"in_modes": [10, 10, 9]}, "cover 900 tokens"),
    ({"in_modes": [10, "10", 10]}, "in_modes must be a list"),
    ({"padding_idx": 1000}, "padding_idx"),
    ({"bias": True}, "no bias"),
    ({"bond_dims": [10, 500]}, "bond_dims"),
    ({"num_embeddings": 0}, "num_embeddings"),
])  # fmt: skip
def test_embedding_metadata_is_checked_before_anything_is_built(edit, fragment, tmp_path):
    spec = {**MPOEmbedding(1000, 64, bond_dim=8).spec(), **edit}
    with pytest.raises(MPOCompressError, match=fragment):
        check_layer_spec(tmp_path / "m.safetensors", "emb", spec)


class _Text(nn.Module):
    """A tiny text model: an embedding, a projection, and (optionally) a head tied to the embedding."""

    def __init__(self, tied=False):
        super().__init__()
        self.emb = nn.Embedding(997, 24)
        self.proj = nn.Linear(24, 24)
        self.head = nn.Linear(24, 997, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.proj(self.emb(input_ids))))


def test_embeddings_are_converted_when_named_and_offered_to_a_budget_but_not_by_default():
    torch.manual_seed(0)
    model = _Text()
    chosen, skipped = select_targets(model, CompressionConfig(bond_dim=4))
    assert "emb" not in [t.cand.name for t in chosen] + [s.name for s in skipped]
    chosen, _ = select_targets(model, CompressionConfig(bond_dim=4, layers=["emb"]))
    assert [t.cand.name for t in chosen] == ["emb"] and chosen[0].cand.numel == 997 * 24
    chosen, _ = select_targets(model, CompressionConfig(target_params=0.5))
    assert {t.cand.name for t in chosen} == {"emb", "proj", "head"}
    report = compress_(model, CompressionConfig(bond_dim=4, layers=["emb"]))
    assert isinstance(model.emb, MPOEmbedding) and report.layers[0].structure == "mpo_embedding"
    assert report.layers[0].params_original == 997 * 24 and report.layers[0].params_mpo == model.emb.num_mpo_params
    assert report.params_model_after == sum(p.numel() for p in model.parameters())


def test_a_tied_embedding_becomes_one_table_for_both_ends_and_other_ties_are_refused():
    """An embedding tied to a bias-free Linear head is one low-rank table under both names (never an
    MPO, never untied; tests/test_tied_table.py); a tie the table cannot serve is refused by name."""
    with pytest.raises(MPOCompressError, match="cannot become mpo"):
        compress_(_Text(tied=True), CompressionConfig(bond_dim=4, layers=["emb"], structure="mpo"))
    model = _Text(tied=True)
    model.head.bias = nn.Parameter(torch.zeros(997))
    with pytest.raises(MPOCompressError, match="tied to head"):
        compress_(model, CompressionConfig(bond_dim=4, layers=["emb"]))


def test_an_embedding_cannot_take_the_lowrank_structure():
    with pytest.raises(MPOCompressError, match="cannot become lowrank"):
        compress_(_Text(), CompressionConfig(bond_dim=4, layers=["emb"], structure="lowrank"))


def test_calibration_counts_the_real_tokens_and_weighs_the_embedding_error_by_them():
    torch.manual_seed(0)
    model = _Text()
    ids = torch.randint(0, 997, (6, 10))
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[:, 7:] = 0
    cal = collect_grams(model, {"emb": model.emb}, [{"input_ids": ids, "attention_mask": mask}])
    counts = torch.bincount(ids[mask.bool()], minlength=padded_vocab(997)).double()
    torch.testing.assert_close(cal.grams["emb"], counts)
    assert cal.rows["emb"] == 42
    chosen, _ = select_targets(model, CompressionConfig(target_params=0.5))
    t = next(t for t in chosen if t.cand.name == "emb")
    w = t.cand.converter.weight(model.emb).detach()
    plan = LayerPlan([], CompressionConfig(target_params=0.5), cal, None)
    expect = float((model.emb.weight.detach().double().square().sum(1) * counts[:997]).sum()) / 6
    assert abs(plan.energy(t, w) - expect) <= 1e-9 * expect


def test_a_budget_can_shrink_the_embedding_and_is_met():
    torch.manual_seed(0)
    model = _Text()
    batches = [{"input_ids": torch.randint(0, 997, (16, 12)), "attention_mask": torch.ones(16, 12, dtype=torch.long)} for _ in range(4)]
    before = sum(p.numel() for p in model.parameters())
    report = compress_(model, CompressionConfig(target_params=0.3), calibration=batches)
    after = sum(p.numel() for p in model.parameters())
    assert report.params_model_after == after and abs(after - 0.3 * before) <= 0.01 * before
    assert isinstance(model.emb, MPOEmbedding)  # 0.3 of the model cannot be met without the embedding
    assert all(lr.params_mpo < lr.params_original for lr in report.layers)


def test_the_embedding_cost_is_measured_by_swapping_its_forms_in_and_the_model_is_left_as_it_was():
    """The allocator's cost of an embedding form is its measured output change (the prediction from
    noise probes is only interpolated between measured sizes): checked against a copy of the model
    with that form put in by hand."""
    import copy

    from mpocompress.compress.calibrate import outputs
    from mpocompress.compress.choose import _probed
    from mpocompress.compress.structures import layer_options, make_factors

    torch.manual_seed(0)
    model = _Text().double()
    emb = model.emb
    batches = [{"input_ids": torch.randint(0, 997, (8, 12))} for _ in range(2)]
    t = next(t for t in select_targets(model, CompressionConfig(target_params=0.5))[0] if t.cand.name == "emb")
    w = t.cand.converter.weight(emb).detach()
    opts = layer_options(w, None, "mpo", (3,))
    ratios = _probed(model, t, opts, 1.0, batches, outputs(model, batches))
    assert model.emb is emb
    k = min((k for k, o in enumerate(opts) if o.structure == "mpo"), key=lambda k: opts[k].params)  # a probed form
    f = make_factors(w, opts[k], None, 0)
    twin = copy.deepcopy(model)
    twin.emb = MPOEmbedding.from_cores(f.factors, 997)
    with torch.no_grad():
        real = sum(float((twin(**b) - model(**b)).square().sum()) for b in batches) / 16
    assert ratios[k] * f.rel_error**2 == pytest.approx(real, rel=1e-6)
    assert all(r > 0 for r in ratios)
