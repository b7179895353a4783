"""A tied input embedding and LM head (SmolLM2's 28M-parameter table, a fifth of the model) as one
candidate: a `LowRankTable` reachable under both names, compressed once, serving both ends, never
untied. Checked against the dense products it stands for, the two-sided weighted truncation against
an independent SVD of the weighted matrix, the KL probe against torch's KL, and the whole path
(convert, save, load, evaluate, export) on the tiny tied Llama of tests/lm_models.py."""

import json
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
import transformers
from lm_models import make_lm, write_folder
from safetensors import safe_open
from test_cli_train import invoke, run_json
from test_lm import _lines

from mpocompress import CompressionConfig, compress_, load
from mpocompress.compress import calibrate
from mpocompress.compress.calibrate import measure_swap, measure_swap_kl, outputs
from mpocompress.compress.select import candidates
from mpocompress.io.data.unlabelled import pack_windows
from mpocompress.nn import LowRankTable, layer_from_spec
from mpocompress.tensors import lowrank, output_error, table_weighting


def _table(v=50, d=12, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LowRankTable.from_factors(torch.randn(d, r, generator=g), torch.randn(r, v, generator=g))


def test_a_table_looks_up_tokens_and_gives_logits_as_its_dense_matrix_does():
    t = _table()
    e = (t.second @ t.first).T  # E (V x d)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    h = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(t(ids), F.embedding(ids, e), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t(h), h @ e.T, rtol=1e-5, atol=1e-5)  # the head: logits over the vocabulary
    torch.testing.assert_close(t.weight, e)
    dense = t.to_dense()
    assert isinstance(dense, torch.nn.Embedding) and torch.equal(dense(ids), F.embedding(ids, e.detach()))
    assert t.num_mpo_params == 5 * (50 + 12) and t.weight_numel == 50 * 12


def test_a_table_is_rebuilt_from_its_metadata_with_its_shapes():
    t = _table()
    spec = t.spec()
    assert spec["kind"] == "lowrank_table" and LowRankTable.spec_dims(spec) == (50, 12)
    back = layer_from_spec(json.loads(json.dumps(spec)))
    assert isinstance(back, LowRankTable) and back.first.shape == t.first.shape and back.second.shape == t.second.shape
    with pytest.raises(ValueError, match="rank"):
        LowRankTable.spec_dims({**spec, "rank": 13})


def test_the_two_sided_weighting_gives_the_closed_form_optimum():
    """min ||R (W - W~) C|| over rank r: the truncated SVD of R W C mapped back, checked against
    torch.linalg.svd of the weighted matrix (an independent route) and against the plain SVD's
    rank-r W~, which it must beat on this objective (float64, seed 0)."""
    g = torch.Generator().manual_seed(0)
    d, v, r = 12, 60, 4
    w = torch.randn(d, v, generator=g, dtype=torch.float64)
    h = torch.randn(500, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    p = torch.softmax(3 * torch.randn(v, generator=g, dtype=torch.float64), 0)
    white = table_weighting(h.T @ h, p)
    lr = lowrank(w, r, white, dtype=torch.float64)
    approx = lr.second @ lr.first
    m = white.whiten(w)
    s = torch.linalg.svdvals(m)
    best = float((s[r:].square().sum() / s.square().sum()).sqrt())
    assert output_error(w, approx, white) == pytest.approx(best, rel=1e-9)
    u, sv, vh = torch.linalg.svd(w)
    plain = (u[:, :r] * sv[:r]) @ vh[:r]
    assert output_error(w, plain, white) > best * 1.05
    # the weights are what they say: R^T R is the Gram matrix (damped by 1e-6 of its mean diagonal), C the floored p
    gram = h.T @ h
    torch.testing.assert_close(white.left.T @ white.left, gram + 1e-6 * gram.diagonal().mean() * torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(white.columns.square(), p + 0.1 / v)


def test_a_table_weighed_a_block_of_tokens_at_a_time_is_the_whole_formula(monkeypatch):
    """R W C, ||R W C||^2 and a low-rank table's two errors, made 7 tokens at a time (60 tokens: a last
    block of 4), against the whole products in float64 (seed 1, within 1e-12), and `make_factors`
    reports those errors for a table as `output_error` does for the product B A."""
    from mpocompress.compress.structures import Option, make_factors
    from mpocompress.tensors import calibrated

    monkeypatch.setattr(calibrated, "TABLE_CHUNK", 7)
    g = torch.Generator().manual_seed(1)
    d, v = 12, 60
    w = torch.randn(d, v, generator=g, dtype=torch.float64)
    h = torch.randn(300, d, generator=g, dtype=torch.float64)
    white = table_weighting(h.T @ h, torch.softmax(2 * torch.randn(v, generator=g, dtype=torch.float64), 0))
    whole = (white.left @ w) * white.columns
    torch.testing.assert_close(white.whiten(w), whole, rtol=1e-12, atol=0)
    assert white.energy(w) == pytest.approx(float(whole.square().sum()), rel=1e-12)
    f = make_factors(w, Option("lowrank", 5 * (d + v), float("nan"), rank=5), white, dtype=torch.float64)
    approx = f.factors[0] @ f.factors[1]
    assert f.rel_error == pytest.approx(float((w - approx).norm() / w.norm()), rel=1e-12)
    assert f.output_rel_error == pytest.approx(output_error(w, approx, white), rel=1e-10)
    assert f.spectra[0].tolist() == pytest.approx(torch.linalg.svdvals(approx)[:5].tolist(), rel=1e-10)


def test_every_form_of_a_table_truncates_one_decomposition_made_once(monkeypatch):
    """The forms of one table (its weighing, its measured swaps, the final one) share one
    decomposition of R W C, made once from the d x d Gram and made again when the table changes in
    place; each form is still the closed-form optimum (torch.linalg.svd of R W C, within 1e-9,
    float64, seed 2). Its factors are the same whether or not its errors are measured, and a nearly
    exact truncation (where the Gram's rounding is not trusted) takes the SVD of R W C itself."""
    from mpocompress.compress.structures import Option, make_factors
    from mpocompress.tensors import calibrated

    g = torch.Generator().manual_seed(2)
    d, v = 10, 80
    w = torch.randn(d, v, generator=g, dtype=torch.float64)
    h = torch.randn(400, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
    white = table_weighting(h.T @ h, torch.softmax(2 * torch.randn(v, generator=g, dtype=torch.float64), 0))
    made = []
    eig = calibrated._eig_desc
    monkeypatch.setattr(calibrated, "_eig_desc", lambda a: made.append(a.shape) or eig(a))
    s = torch.linalg.svdvals((white.left @ w) * white.columns)
    for r in (1, 3, 6):
        f = make_factors(w, Option("lowrank", r * (d + v), float("nan"), rank=r), white, dtype=torch.float64)
        best = float((s[r:].square().sum() / s.square().sum()).sqrt())
        assert f.output_rel_error == pytest.approx(best, rel=1e-9)
        assert output_error(w, f.factors[0] @ f.factors[1], white) == pytest.approx(best, rel=1e-9)
        quick = make_factors(w, Option("lowrank", r * (d + v), float("nan"), rank=r), white, dtype=torch.float64, errors=False)
        assert all(torch.equal(a, b) for a, b in zip(quick.factors, f.factors)) and math.isnan(quick.rel_error)
    assert made == [(d, d)]  # one decomposition for the three forms and both kinds of call
    assert white.energy(w) == pytest.approx(float(s.square().sum()), rel=1e-12)
    w.mul_(2)  # the table changed in place: decomposed again
    assert white.energy(w) == pytest.approx(4 * float(s.square().sum()), rel=1e-12) and len(made) == 2
    other = w.clone()
    other[0, 1] += 1.0  # another table of the same shape: its own decomposition
    assert white.energy(other) != white.energy(w) and len(made) == 4
    gone = weakref.ref(w)
    del w, other
    assert gone() is None  # the weighting does not hold the table

    low = (torch.randn(d, 3, generator=g, dtype=torch.float64) @ torch.randn(3, v, generator=g, dtype=torch.float64)).add_(
        1e-7 * torch.randn(d, v, generator=g, dtype=torch.float64))  # fmt: skip
    assert white.lowrank(low, 3, torch.float64) is None  # nearly exact: not from the Gram
    lr = lowrank(low, 3, white, dtype=torch.float64)
    sl = torch.linalg.svdvals((white.left @ low) * white.columns)
    assert output_error(low, lr.second @ lr.first, white) == pytest.approx(float((sl[3:].square().sum() / sl.square().sum()).sqrt()), rel=1e-6)


def test_the_bond_spectrum_of_b_a_comes_a_block_of_columns_at_a_time(monkeypatch):
    """`product_spectrum(B, A)`, R_A made 16 columns at a time (100 columns: a last block of 4),
    against torch.linalg.svdvals of the whole product B A in float64 (seed 3, within 1e-10 of the
    largest value), for float64 factors and for a float32 A (upcast a block at a time); and a float32
    table's measured form has the very factors of its unmeasured one, made in float32 from the start."""
    from mpocompress.compress.structures import Option, make_factors
    from mpocompress.tensors import calibrated, product_spectrum

    monkeypatch.setattr(calibrated, "TABLE_CHUNK", 16)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(12, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 100, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 6, dtype=torch.float64)[:, None]
    for first in (a, a.float()):
        want = torch.linalg.svdvals(b @ first.double())[:6]  # B A has rank 6
        got = product_spectrum(b, first)
        assert got.dtype == torch.float64 and got.shape == (6,)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want[0]))
    w = torch.randn(12, 100, generator=g)
    h = torch.randn(300, 12, generator=g, dtype=torch.float64)
    white = table_weighting(h.T @ h, torch.softmax(2 * torch.randn(100, generator=g, dtype=torch.float64), 0))
    opt = Option("lowrank", 5 * 112, float("nan"), rank=5)
    f, quick = make_factors(w, opt, white), make_factors(w, opt, white, errors=False)
    assert all(x.dtype == torch.float32 and torch.equal(x, y) for x, y in zip(f.factors, quick.factors))
    want = torch.linalg.svdvals(f.factors[0].double() @ f.factors[1].double())[:5]
    torch.testing.assert_close(f.spectra[0], want, rtol=1e-10, atol=0)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    d = tmp_path_factory.mktemp("tied")
    text = d / "text.txt"
    text.write_text("\n".join(_lines(600)) + "\n")
    return {"llama": write_folder("llama", d / "llama"), "qwen2": write_folder("qwen2", d / "qwen2"), "text": text}


def test_the_tied_pair_is_one_candidate_under_both_names_and_an_untied_head_is_not(tied):
    by_name = {c.name: c for c in candidates(load(tied["llama"]))}
    table = by_name["model.embed_tokens"]
    assert table.names == ["model.embed_tokens", "lm_head"] and table.problem is None and table.converter.serves_head
    assert "lm_head" not in by_name and (table.ny, table.nx) == (64, 257)
    untied = {c.name: c for c in candidates(load(tied["qwen2"]))}
    assert untied["model.embed_tokens"].names == ["model.embed_tokens"] and not untied["model.embed_tokens"].converter.serves_head
    assert untied["lm_head"].kind == "linear"


def _batches(model, text, n=4, length=32):
    from mpocompress.io.hf import load_tokenizer

    ids = pack_windows(text.read_text().splitlines(), load_tokenizer(_tokenizer_files(model), "test"), length)[:n]
    return [{"input_ids": ids[k : k + 2], "attention_mask": torch.ones_like(ids[k : k + 2])} for k in range(0, n, 2)]


def _tokenizer_files(model):
    from mpocompress.io.hf import decode_tokenizer_files

    return decode_tokenizer_files(model.mpocompress_tokenizer, "test")


def test_the_kl_probe_is_twice_torch_kl_per_sample_and_every_name_gets_its_module_back(tied):
    model = load(tied["llama"])
    batches = _batches(model, tied["text"])
    new = _table(257, 64, 8, seed=3)
    emb, head = model.model.embed_tokens, model.lm_head
    got = measure_swap_kl(model, [(["model.embed_tokens", "lm_head"], new)], batches)
    assert model.model.embed_tokens is emb and model.lm_head is head  # each name its own module again
    want, samples = 0.0, 0
    with torch.no_grad():
        for b in batches:
            ref = F.log_softmax(model(**b).logits.double(), -1)
            model.model.embed_tokens, model.lm_head = new, new
            out = F.log_softmax(model(**b).logits.double(), -1)
            model.model.embed_tokens, model.lm_head = emb, head
            want += 2 * float(F.kl_div(out, ref, log_target=True, reduction="sum"))
            samples += b["input_ids"].shape[0]
    assert got == pytest.approx(want / samples, rel=1e-4)
    reference = outputs(model, batches)
    measure_swap(model, ["model.embed_tokens", "lm_head"], new, batches, reference)
    assert model.model.embed_tokens is emb and model.lm_head is head


def test_twice_kl_is_torch_kl_in_float64_and_leaves_its_inputs_as_they_were():
    """`twice_kl` works in place on its own log-softmaxes: never on the caller's logits (float32
    logits are their own `.float()`), and the same value as the float64 reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4099, generator=g) * 3
    y = x + 0.2 * torch.randn(64, 4099, generator=g)
    x0, y0 = x.clone(), y.clone()
    got = calibrate.twice_kl(x, y)
    want = 2 * float(F.kl_div(F.log_softmax(y.double(), -1), F.log_softmax(x.double(), -1), log_target=True, reduction="sum"))
    assert got == pytest.approx(want, rel=1e-5)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert calibrate.twice_kl(x, x) == 0.0


def test_the_kl_of_many_swaps_runs_the_original_once_and_measures_what_full_passes_measure(tied):
    """`SwapKL` (the allocator's measured swaps of a tied table, and its joint measure) runs the
    original's blocks once for all swaps and the head on kept final hidden states, in chunks of
    KL_CHUNK tokens (3 here, so every window is cut): each swap's KL equals `measure_swap_kl`'s full
    passes window by window (within 1e-6: the head's float32 products on 3 rows and on 32 round
    differently, 1.6e-8 measured), every name gets its module back, and the
    base runs once per batch for the original, once per batch per swap, and twice for the check."""
    from mpocompress.compress import calibrate

    model = load(tied["llama"])
    batches = _batches(model, tied["text"])
    names = ["model.embed_tokens", "lm_head"]
    emb, head = model.model.embed_tokens, model.lm_head
    calls = []
    model.model.register_forward_hook(lambda m, a, y: calls.append(1))
    kl = calibrate.SwapKL(model, batches)
    assert kl.split and len(calls) == 2  # the check: one window through the full model, then its base
    old_chunk, calibrate.KL_CHUNK = calibrate.KL_CHUNK, 3
    try:
        got = [kl([(names, _table(257, 64, 8, seed=s))]) for s in (3, 4)]
    finally:
        calibrate.KL_CHUNK = old_chunk
    assert len(calls) == 2 + len(batches) + 2 * len(batches)
    assert model.model.embed_tokens is emb and model.lm_head is head
    want = [measure_swap_kl(model, [(names, _table(257, 64, 8, seed=s))], batches) for s in (3, 4)]
    assert got == pytest.approx(want, rel=1e-6) and got[0] != pytest.approx(got[1], rel=1e-3)


def test_the_kl_of_a_model_whose_logits_are_more_than_its_head_takes_full_passes(tied):
    """A model that does more to its logits than its head (here they are halved, as a soft cap or a
    scale would change them) is found on the first window, and measured by full passes."""
    from mpocompress.compress.calibrate import SwapKL

    model = load(tied["llama"])
    model.register_forward_hook(lambda m, a, y: y.__setitem__("logits", y["logits"] * 0.5) or y)
    batches = _batches(model, tied["text"])
    names, new = ["model.embed_tokens", "lm_head"], _table(257, 64, 8, seed=3)
    kl = SwapKL(model, batches)
    assert not kl.split
    assert kl([(names, new)]) == measure_swap_kl(model, [(names, new)], batches)


def test_a_budgeted_causal_lm_is_calibrated_through_its_base_and_its_final_states_are_not_made_again(tied, monkeypatch):
    """With a budget, a causal LM's calibration pass runs its base (blocks and final norm; never the
    head) and keeps the leading batches' final hidden states: the table's weighting, the head's
    Fisher and the table's measured swaps then run no pass of their own for them. The Grams are those
    of the pass that stops at the last layer, and the table's weighting that of a fresh `HeadFisher`,
    bit for bit."""
    from mpocompress.compress import calibrate
    from mpocompress.compress.choose import _leading_batches, plan_layers
    from mpocompress.compress.targets import select_targets

    model = load(tied["llama"])
    batches = _batches(model, tied["text"])
    config = CompressionConfig(remove=0.3)
    targets, _ = select_targets(model, config)
    made = []
    call = calibrate.FinalHidden.__call__
    monkeypatch.setattr(calibrate.FinalHidden, "__call__", lambda self, b: made.append(id(b) not in self._held) or call(self, b))
    heads, during = [], []
    handle = model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    inner = calibrate._collect_grams

    def counted(*args, **kwargs):  # the head's calls during the calibration pass, and its Grams (the allocator drops them)
        before = len(heads)
        out = inner(*args, **kwargs)
        during.append((len(heads) - before, dict(out.grams)))
        return out

    monkeypatch.setattr(calibrate, "_collect_grams", counted)
    plan = plan_layers(model, config, targets, batches)
    handle.remove()
    assert made and not any(made)  # every final hidden state asked for came from the calibration pass
    assert [n for n, _ in during] == [0]  # one pass, the head never run
    mods = {t.cand.name: t.cand.module for t in targets}
    old = calibrate.collect_grams(model, mods, batches, stop_after=set(mods))
    assert all(torch.equal(during[0][1][n], old.grams[n]) for n in mods)
    fresh = calibrate.HeadFisher(model, _leading_batches(batches, calibrate.FISHER_TOKENS))
    want = table_weighting(fresh.head_gram, fresh.mean_p)
    got = plan.tables["model.embed_tokens"]
    assert torch.equal(got.left, want.left) and torch.equal(got.columns, want.columns)


def test_the_swaps_leading_samples_take_their_final_states_from_the_kept_batch(tied):
    """The table's swaps are measured on the leading samples holding FISHER_TOKENS tokens: whole
    batches, then the first samples of the next (`FinalHidden.first_tokens`, which `SwapKL` cuts by). A
    part's final states are the kept batch's first rows (its padding left out), equal to a fresh pass
    over the part, not recomputed."""
    from mpocompress.compress.calibrate import FinalHidden, SwapKL, final_states

    model = load(tied["llama"]).eval()
    batches = _batches(model, tied["text"], n=6)  # 3 batches of 2 windows of 32 tokens
    batches[1]["attention_mask"][0, -5:] = 0  # the second batch's first window padded: 27 real tokens
    hidden = FinalHidden(model)
    for b in batches:
        hidden(b)
    parts = hidden.first_tokens(batches, 80)  # 64 tokens, then one window of the next batch
    assert len(parts) == 2 and parts[0] is batches[0] and id(parts[1]) in hidden._held
    assert torch.equal(parts[1]["input_ids"], batches[1]["input_ids"][:1])
    with torch.no_grad():
        fresh = final_states(model.base_model, parts[1])
    assert hidden(parts[1]).shape == (27, 64) == fresh.shape
    torch.testing.assert_close(hidden(parts[1]), fresh, rtol=1e-5, atol=1e-6)
    assert hidden.first_tokens(batches, 128) == batches[:2]  # whole batches when they hold just enough
    assert hidden.first_tokens(batches, 10**6) == batches  # all when they hold fewer
    kl = SwapKL(model, batches, hidden, tokens=80)
    assert kl.batches[0] is batches[0] and torch.equal(kl.batches[1]["input_ids"], parts[1]["input_ids"])
    assert SwapKL(model, batches, hidden).batches == batches  # no cut without `tokens`


def test_layers_on_one_input_share_one_whitening_and_the_grams_go_once_weighed(tied):
    """In memory, q/k/v (and gate/up), which read one input, get one whitening, equal to each one's
    own from a fresh calibration pass (bit for bit); once every layer reading a Gram has its
    whitening the Gram is dropped (the embedding's token counts stay: its energy reads them)."""
    from mpocompress.compress import calibrate
    from mpocompress.compress.choose import plan_layers, white_for
    from mpocompress.compress.targets import select_targets

    model = load(tied["llama"])
    batches = _batches(model, tied["text"])
    config = CompressionConfig(remove=0.3)
    targets, _ = select_targets(model, config)
    plan = plan_layers(model, config, targets, batches)
    whites = plan._whites
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert whites[attn + "q_proj"] is whites[attn + "k_proj"] is whites[attn + "v_proj"]
    assert whites[mlp + "gate_proj"] is whites[mlp + "up_proj"] and whites[mlp + "down_proj"] is not whites[mlp + "up_proj"]
    assert [n for n, g in plan.calibration.grams.items() if g.dim() == 2] == [] and "model.embed_tokens" in plan.calibration.grams
    fresh = calibrate.collect_grams(model, {t.cand.name: t.cand.module for t in targets}, batches)
    for t in targets:
        if t.cand.kind == "linear":
            assert torch.equal(white_for(t, fresh).factor, whites[t.cand.name].factor), t.cand.name


def test_a_tied_table_converts_saves_once_loads_as_one_module_and_exports(tied, tmp_path):
    out = tmp_path / "t.safetensors"
    rep = run_json("convert", str(tied["llama"]), "--layers", "model.embed_tokens", "-D", "16", "--calib", f"text:{tied['text']}",
                   "--calib-samples", "8", "-o", str(out))  # fmt: skip
    (layer,) = rep["layers"]
    assert layer["name"] == "model.embed_tokens" and layer["structure"] == "lowrank" and layer["ranks"] == [16]
    assert any("tied input embedding and LM head" in n for n in rep["notes"])
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"model.embed_tokens.first", "model.embed_tokens.second"} <= keys and not any(k.startswith("lm_head") for k in keys)
    assert json.loads(meta["tied"]) == {"lm_head.first": "model.embed_tokens.first", "lm_head.second": "model.embed_tokens.second"}
    back = load(out)
    assert isinstance(back.lm_head, LowRankTable) and back.lm_head is back.model.embed_tokens
    assert rep["params_model_after"] == sum(p.numel() for p in back.parameters())
    assert rep["params_model_before"] - rep["params_model_after"] == 257 * 64 - 16 * (257 + 64)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back.model.embed_tokens(ids), F.embedding(ids, back.model.embed_tokens.weight))
    rep = run_json("evaluate", str(out), "--data", f"text:{tied['text']}", "--reference", str(tied["llama"]))
    assert rep["params_model_dense"] == sum(p.numel() for p in load(tied["llama"]).parameters())  # the table counted once
    hf = tmp_path / "hf"
    run_json("export", str(out), "--format", "hf", "-o", str(hf))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # tied again, dense
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, back(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_calibrated_table_loses_less_next_token_kl_than_the_plain_svd(tied):
    """The two-sided weighting targets the head's next-token KL; at the same rank its table must
    lose less of it than the plain SVD's on the calibration windows (the objective it was made for)."""
    base = load(tied["llama"])
    batches = _batches(base, tied["text"], n=8)
    losses = {}
    for calibrated in (False, True):
        model = load(tied["llama"])
        compress_(model, CompressionConfig(bond_dims={"model.embed_tokens": 12}), calibration=batches if calibrated else None)
        assert isinstance(model.lm_head, LowRankTable) and model.lm_head is model.model.embed_tokens
        with torch.no_grad():
            losses[calibrated] = sum(
                float(F.kl_div(F.log_softmax(model(**b).logits, -1), F.log_softmax(base(**b).logits, -1), log_target=True, reduction="sum"))
                for b in batches
            )
    assert losses[True] < losses[False]


def test_a_budget_offers_the_tied_table_and_says_so(tied, tmp_path):
    out = tmp_path / "b.safetensors"
    rep = run_json("convert", str(tied["llama"]), "--calib", f"text:{tied['text']}", "--calib-samples", "8", "--remove", "0.3",
                   "-o", str(out))  # fmt: skip
    assert any("tied input embedding and LM head" in n for n in rep["notes"])
    assert any("next-token KL" in n for n in rep["notes"])  # the currency stays the KL with the head offered
    offered = {lr["name"] for lr in rep["layers"]} | {s["name"] for s in rep["skipped"]}
    assert "model.embed_tokens" in offered
    back = load(out)
    assert back.lm_head.weight is back.model.embed_tokens.weight or back.lm_head is back.model.embed_tokens


def test_a_plain_tied_text_model_converts_its_pair_with_a_bond_dimension():
    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(97, 24)
            self.head = torch.nn.Linear(24, 97, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, input_ids):
            return self.head(torch.tanh(self.emb(input_ids)))

    torch.manual_seed(0)
    model = Text()
    rep = compress_(model, CompressionConfig(bond_dim=6, layers=["emb"]))
    assert isinstance(model.emb, LowRankTable) and model.head is model.emb and rep.layers[0].ranks == [6]
    assert rep.params_model_after == 6 * (97 + 24) == sum(p.numel() for p in model.parameters())


def test_the_tied_llama_still_loads_as_a_dense_model_when_the_pair_is_excluded(tied, tmp_path):
    out = tmp_path / "x.safetensors"
    r = invoke("convert", str(tied["llama"]), "--structure", "lowrank", "-D", "4", "--exclude", "model.embed_tokens", "-o", str(out))
    assert r.exit_code == 0, r.output
    back = load(out)
    assert back.lm_head.weight is back.model.embed_tokens.weight and isinstance(back.lm_head, torch.nn.Linear)
    assert make_lm("llama").config.tie_word_embeddings


def test_the_allocator_prices_a_probed_table_form_at_its_measured_kl(tied):
    """A table's cost in the allocator is energy x (its option's weighted error)^2 x the probe's
    ratio; at a probed form that product must be the measured next-token KL itself (a ratio taken
    against another error, the unweighted one, priced a rank-144 SmolLM2 table at a fraction of its
    real KL and made the allocator spend the whole budget on it)."""
    from mpocompress.compress.choose import _probed, plan_layers, weigh
    from mpocompress.compress.structures import make_factors
    from mpocompress.compress.targets import select_targets, weight_of

    model = load(tied["llama"])
    batches = _batches(model, tied["text"])
    config = CompressionConfig(layers=["model.embed_tokens"], remove=0.3)
    (t,), _ = select_targets(model, config)
    plan = plan_layers(model, CompressionConfig(layers=["model.embed_tokens"]), [t], batches, curves_only=True)
    opts, _ = weigh(t, config, plan)
    white = plan._white(t)
    assert white is not None  # the two-sided weighting of a tied table
    ratios = _probed(model, t, opts, 1.0, batches, [], None, white)
    k = min((k for k, o in enumerate(opts) if o.structure != "dense"), key=lambda k: opts[k].params)  # always probed
    f = make_factors(weight_of(t), opts[k], white, 0)
    real = measure_swap_kl(model, [(t.cand.names, t.cand.converter.build(t.cand.module, f.factors, f.structure))], batches)
    assert opts[k].rel_error**2 * ratios[k] == pytest.approx(real, rel=1e-6)
    assert f.output_rel_error == pytest.approx(opts[k].rel_error, rel=1e-6) and f.rel_error > 1.01 * opts[k].rel_error
