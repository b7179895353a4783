"""Decoder language models end to end, on tiny models built from configs (tests/lm_models.py): a
Llama with grouped-query attention and tied embeddings, a Qwen2 and a GPT-2 LM head, all with a
byte-level tokenizer, and the Llama as a GGUF file.

Perplexity against a hand-computed cross-entropy, KL against torch's, packed windows against the
tokenizer, tied parameters through save/load, the head-Fisher currency against the exact KL,
gradient sensitivities against the noise probes, and every command on the models.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from lm_models import CLASSES, byte_tokenizer, make_lm, write_folder, write_gguf
from test_cli_train import invoke, run_json

import mpocompress
from mpocompress import CompressionConfig, MPOCompressError, compress_, load, load_model, save
from mpocompress.compress.calibrate import HeadFisher, gradient_sensitivity, measure_sensitivity
from mpocompress.io.data.unlabelled import TokenSet, load_unlabelled, pack_windows
from mpocompress.train.lm import lm_scores, next_token_kl
from mpocompress.utils import is_causal_lm

WORDS = "the model reads a window of text and predicts every next token from those before it".split()


def _lines(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(6, 14, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
        out.append(" ".join(words).capitalize() + ".")
    return out


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    folders = {kind: write_folder(kind, d / kind) for kind in CLASSES}
    text = d / "text.txt"
    text.write_text("\n".join(_lines(600)) + "\n")
    gguf = write_gguf(make_lm("llama"), d / "tiny.gguf")
    return {"dir": d, "text": text, "gguf": gguf, **folders}


def test_decoder_classes_are_causal_lms_and_encoders_are_not(lms):
    for kind in CLASSES:
        assert is_causal_lm(load(lms[kind]))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    assert not is_causal_lm(bert) and not is_causal_lm(torch.nn.Linear(2, 2))


def test_gguf_file_loads_as_the_model_it_was_written_from(lms):
    """The GGUF reader undoes llama.cpp's q/k row order: the logits equal the original's exactly
    (F32 tensors), and the tokenizer the file carries is recorded."""
    ref = make_lm("llama")
    loaded = load_model(lms["gguf"])
    assert loaded.arch == "hf:LlamaForCausalLM" and loaded.source == "gguf"
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # tied, as the file says
    assert "tokenizer.json" in loaded.model.mpocompress_tokenizer


def test_a_gguf_file_is_parsed_once_per_load_and_gguf_is_left_as_it_was(lms, monkeypatch):
    """transformers reads the file three times (tokenizer, config, weights) and builds a tensor-name map per
    module; a load shares one reader and one map per architecture (counted), then restores gguf's names."""
    import gguf

    made = []
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: made.append("reader") or reader(*a, **k))
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *a: made.append("map") or name_map(*a))
    counting_reader, counting_map = gguf.GGUFReader, gguf.get_tensor_name_map
    loaded = load_model(lms["gguf"])
    assert made.count("reader") == 1 and made.count("map") == 1
    assert gguf.GGUFReader is counting_reader and gguf.get_tensor_name_map is counting_map
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, make_lm("llama")(ids).logits, rtol=0, atol=1e-6)


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(MPOCompressError, match="not a GGUF file"):
        load_model(bad)


def test_default_selection_takes_every_block_projection_with_narrow_kv(lms):
    model = load(lms["llama"])
    rep = compress_(model, CompressionConfig(bond_dim=4, structure="lowrank"))
    names = {lr.name for lr in rep.layers}
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in parts}
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert k.out_features == 32 < model.get_submodule("model.layers.0.self_attn.q_proj").out_features  # GQA: 2 of 4 heads
    assert model.lm_head.weight is model.model.embed_tokens.weight  # never untied
    skipped = {s.name: s.reason for s in rep.skipped}
    assert "tied to the LM head (lm_head)" in skipped["model.embed_tokens"]  # listed, with how to offer it


def test_tied_pair_is_stored_once_and_stays_tied_after_load(lms, tmp_path):
    from safetensors import safe_open

    model = load(lms["llama"])
    compress_(model, CompressionConfig(bond_dim=3, structure="lowrank"))
    path = save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    back = load(path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_packed_windows_are_the_token_stream_cut_in_full_windows():
    tok = byte_tokenizer()
    lines = ["First line here.", "Second one.", "And a third, longer line of text."]
    ids = pack_windows(lines, tok, 8)
    stream = tok("\n".join(lines) + "\n", add_special_tokens=False)["input_ids"]
    assert ids.shape == (len(stream) // 8, 8)
    assert ids.flatten().tolist() == stream[: ids.numel()]
    short = pack_windows(lines[:1], tok, 1000)  # shorter than a window: one sample of all of it
    assert short.shape == (1, len(tok(lines[0] + "\n")["input_ids"]))


def test_asking_for_a_few_windows_tokenizes_only_the_pieces_that_hold_them(monkeypatch):
    """Calibration wants the first N windows (64 by default) of a file whose stream holds thousands:
    the stream is tokenized piece by piece only until it holds them, and they are the whole
    stream's first N."""
    from mpocompress.io.data import unlabelled

    monkeypatch.setattr(unlabelled, "PACK_LINES", 4)
    lines = [f"Line number {i} of a longer text, with some words." for i in range(200)]
    calls = []

    class Counting:
        def __call__(self, text, **kw):
            calls.append(text)
            return byte_tokenizer()(text, **kw)

    whole = pack_windows(lines, Counting(), 16)
    pieces = len(calls)
    calls.clear()
    few = pack_windows(lines, Counting(), 16, windows=5)
    assert torch.equal(few, whole[:5])
    assert 1 <= len(calls) < pieces / 5  # 5 windows of 16 bytes: the first two pieces of 4 lines (~200 bytes each)
    assert torch.equal(pack_windows(lines, byte_tokenizer(), 16, windows=10**6), whole)  # more than there are: all


def test_the_first_lines_of_a_split_are_the_whole_splits_first_padded_to_their_own_longest(tmp_path):
    """An encoder's calibration wants its split's first N lines: only those are tokenized, padded to
    the longest of them, and their real tokens are the whole split's."""
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"line {i} " + "word " * (i % 7) for i in range(60)) + "\n")
    whole = load_unlabelled(f"text:{path}", "train", byte_tokenizer(), 64)
    few = load_unlabelled(f"text:{path}", "train", byte_tokenizer(), 64, first=5)
    ids, mask = few.inputs["input_ids"], few.inputs["attention_mask"]
    assert ids.shape[0] == 5 and ids.shape[1] == int(mask.sum(1).max())
    for k in range(5):
        real = whole.inputs["input_ids"][k][whole.inputs["attention_mask"][k].bool()]
        assert torch.equal(ids[k][mask[k].bool()], real)


def test_causal_text_split_is_packed_and_held_out_by_line(lms):
    tok = byte_tokenizer()
    train = load_unlabelled(f"text:{lms['text']}", "train", tok, 64, pack=True)
    test = load_unlabelled(f"text:{lms['text']}", "test", tok, 64, pack=True)
    assert train.packed and train.inputs["input_ids"].shape[1] == 64 and bool(train.inputs["attention_mask"].all())
    assert 3 * len(test) < len(train) < 5 * len(test)  # 80/20 by line


def test_perplexity_is_the_token_weighted_cross_entropy_and_kl_is_torchs(lms):
    model, other = load(lms["llama"]), make_lm("llama", seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (5, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a padded row: its padding is never scored
    ds = TokenSet("t", "test", {"input_ids": ids, "attention_mask": mask})
    rep = lm_scores(model, ds, batch_size=2, reference=other)
    with torch.no_grad():
        a, b = model(ids).logits.double(), other(ids).logits.double()
    nll, kl, same, n = 0.0, 0.0, 0, 0
    for r in range(5):
        for t in range(11):
            if mask[r, t] and mask[r, t + 1]:
                nll -= float(F.log_softmax(a[r, t], -1)[ids[r, t + 1]])
                kl += float(F.kl_div(F.log_softmax(a[r, t], -1), F.log_softmax(b[r, t], -1), log_target=True, reduction="sum"))
                same += int(a[r, t].argmax() == b[r, t].argmax())
                n += 1
    assert rep["tokens_scored"] == n == 5 * 11 - 5
    assert rep["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert rep["kl_mean"] == pytest.approx(kl / n, rel=1e-4)
    assert rep["top1_agreement"] == same / n
    assert torch.allclose(next_token_kl(a, a), torch.zeros(a.shape[:2], dtype=torch.float32), atol=1e-6)


def test_scores_read_a_few_scored_positions_at_a_time_as_all_at_once(lms, monkeypatch):
    """lm_scores reads the logits in place, POSITIONS_PER_CHUNK scored positions at a time: at 7 (chunks
    that straddle windows and a padded row) every figure equals one chunk's, within 1e-6 (a chunk's
    cross-entropy is summed in float32: 6e-8 apart measured)."""
    from mpocompress.train import lm

    model, other = load(lms["llama"]), make_lm("llama", seed=3)
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    ds = TokenSet("t", "test", {"input_ids": ids, "attention_mask": mask})
    whole = lm_scores(model, ds, batch_size=3, reference=other)
    monkeypatch.setattr(lm, "POSITIONS_PER_CHUNK", 7)
    parts = lm_scores(model, ds, batch_size=3, reference=other)
    assert parts["tokens_scored"] == whole["tokens_scored"] == 5 * 11 - 7 and parts["top1_agreement"] == whole["top1_agreement"]
    for key in ("perplexity", "reference_perplexity", "kl_mean"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-6), key


def test_head_fisher_squared_change_is_twice_the_next_token_kl(lms):
    """For a small change of the final hidden state, |dh L|^2 (the allocator's currency) matches
    2 KL of the next-token distributions to within the spread of the per-token Fisher (the
    averaged Fisher is exact on average over the tokens it was estimated on)."""
    model = load(lms["llama"]).double()
    tok = byte_tokenizer()
    ds = load_unlabelled(f"text:{lms['text']}", "train", tok, 64, pack=True)
    batches = [ds.batch(torch.arange(i, i + 4)) for i in range(0, 16, 4)]
    fisher = HeadFisher(model, batches)
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    h = torch.cat([fisher._hidden(b) for b in batches]).double()
    dh = 1e-3 * torch.randn(h.shape, generator=g, dtype=torch.float64) * h.std()
    with torch.no_grad():
        kl = next_token_kl(head(h + dh).double(), head(h).double()).double().sum()  # float32 softmax inside
        quad = ((dh @ fisher.root) ** 2).sum()
    assert float(quad) == pytest.approx(2 * float(kl), rel=0.15)


def test_head_fisher_in_chunks_and_shares_is_the_dense_formula(monkeypatch):
    """`head_fisher` (next-token distributions a few tokens at a time, two sums over tokens) against
    the dense formula F = mean_t E^T (diag p_t - p_t p_t^T) E on a 40-token vocabulary (seed 0):
    root root^T = F within 1e-6 relative (the distributions are made in float32) in chunks of 3
    tokens; with the tokens split between two "processes" whose sums `reduce` adds (as the
    all-reduce does), the same root root^T within 1e-10."""
    from mpocompress.compress import calibrate

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 40, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(40, 8, generator=g, dtype=torch.float64))
        head.bias.copy_(0.3 * torch.randn(40, generator=g, dtype=torch.float64))
    h = torch.randn(11, 8, generator=g, dtype=torch.float64)
    e = head.weight.detach().float().double()
    p = torch.softmax((h.float() @ head.weight.detach().float().T + head.bias.detach().float()).double(), -1)
    dense = sum(e.T @ (torch.diag(pt) - torch.outer(pt, pt)) @ e for pt in p) / len(p)
    monkeypatch.setattr(calibrate, "FISHER_CHUNK", 3)
    root, mean_p = calibrate.head_fisher(head, h)
    assert float((root @ root.T - dense).abs().max() / dense.abs().max()) < 1e-6  # the distributions are float32
    assert torch.allclose(mean_p, p.mean(0), rtol=1e-6, atol=1e-9)
    other = {}
    calibrate.head_fisher(head, h[6:], reduce=lambda ts: other.update(sums=[t.clone() for t in ts]))
    root2, _ = calibrate.head_fisher(head, h[:6], reduce=lambda ts: [a.add_(b) for a, b in zip(ts, other["sums"])])
    assert float((root2 @ root2.T - root @ root.T).abs().max() / dense.abs().max()) < 1e-10


def test_gradient_sensitivities_match_the_noise_probes(lms):
    """Hutchinson's estimate of ||J||_F^2 / entries per layer from backward passes against the
    noise probes' E|J n|^2 / E|n|^2, both in the head-Fisher currency: same order for every layer."""
    model = load(lms["llama"])
    tok = byte_tokenizer()
    ds = load_unlabelled(f"text:{lms['text']}", "train", tok, 64, pack=True)
    batches = [ds.batch(torch.arange(i, i + 8)) for i in range(0, 32, 8)]
    fisher = HeadFisher(model, batches)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    grad = gradient_sensitivity(model, mods, batches, fisher)
    noise = measure_sensitivity(model, mods, batches, fn=fisher)
    ratios = torch.tensor([grad[n] / noise[n] for n in mods])
    assert ratios.min() > 0.6 and ratios.max() < 1.6, ratios
    order_g = sorted(mods, key=grad.get)
    order_n = sorted(mods, key=noise.get)
    assert order_g[-3:] == order_n[-3:] or set(order_g[-4:]) & set(order_n[-4:])


def test_remove_budgets_a_share_of_the_selected_weights(lms):
    model = load(lms["llama"])
    tok = byte_tokenizer()
    ds = load_unlabelled(f"text:{lms['text']}", "train", tok, 64, pack=True)
    batches = [ds.batch(torch.arange(i, i + 8)) for i in range(0, 32, 8)]
    before = sum(p.numel() for p in model.parameters())
    rep = compress_(model, CompressionConfig(remove=0.3, structure="lowrank"), calibration=batches)
    selected = sum(m.weight.numel() for n, m in load(lms["llama"]).named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    after = sum(p.numel() for p in model.parameters())
    assert after <= before - 0.3 * selected + 1
    assert after >= before - 0.3 * selected - max(m.in_features + m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert any("next-token KL" in n for n in rep.notes) and any("remove 30%" in n for n in rep.notes)
    with pytest.raises(MPOCompressError, match="both set the budget"):
        CompressionConfig(remove=0.3, target_params=0.5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_every_command_on_a_decoder(lms, tmp_path, kind):
    """convert (calibrated, --remove) -> evaluate (perplexity, KL, top-1, prompts) -> finetune
    (next-token distillation) -> export hf (loads with AutoModelForCausalLM, same greedy tokens)
    and onnx (logits for ids and mask); analyze and sweep run on the folder."""
    folder, text = lms[kind], f"text:{lms['text']}"
    out = tmp_path / "c.safetensors"
    conv = run_json("convert", str(folder), "-o", str(out), "--calib", text, "--calib-samples", "16", "--remove", "0.3")
    assert conv["params_model_after"] < conv["params_model_before"]
    rep = run_json("evaluate", str(out), "--data", text, "--reference", str(folder), "--prompt", "The model", "--new-tokens", "5")
    assert rep["window"] == 128 and rep["stride"] == 128 and rep["tokens_scored"] == rep["windows"] * 127
    assert 0 <= rep["kl_mean"] and 0 <= rep["top1_agreement"] <= 1 and rep["perplexity"] > 1
    assert rep["continuations"][0]["prompt"] == "The model" and isinstance(rep["continuations"][0]["reference"], str)
    tuned = tmp_path / "t.safetensors"
    ft = run_json("finetune", str(out), "--distill-from", str(folder), "--data", text, "-o", str(tuned), "--epochs", "1",
                  "--batch-size", "4", "--max-samples", "200", "--max-length", "32")  # fmt: skip
    assert ft["runs"][0]["accuracy"] is not None
    back = load(tuned)
    assert is_causal_lm(back)
    hf = tmp_path / "hf"
    run_json("export", str(tuned), "--format", "hf", "-o", str(hf))
    dense = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    ids = torch.tensor([[40, 72, 68, 0, 76, 78, 67]])
    with torch.no_grad():
        a = dense.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256)
        b = back.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert torch.equal(a, b)
    onnx = tmp_path / "m.onnx"
    run_json("export", str(tuned), "--format", "onnx", "-o", str(onnx))
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = torch.randint(0, 256, (3, 13))
    got = session.run(None, {"input_ids": x.numpy(), "attention_mask": torch.ones_like(x).numpy()})[0]
    with torch.no_grad():
        want = back(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_evaluate_asks_for_text_for_a_causal_lm(lms):
    res = invoke("evaluate", str(lms["llama"]))
    assert res.exit_code == 2 and "add --data text:FILE" in res.output
    res = invoke("evaluate", str(lms["llama"]), "--data", "digits")
    assert res.exit_code == 2 and "measured on text" in res.output
    res = invoke("evaluate", str(lms["llama"]), "--data", f"text:{lms['text']}", "--max-length", "4096")
    assert res.exit_code == 2 and "longer than the 128 positions" in res.output


def test_gguf_through_convert_and_evaluate(lms, tmp_path):
    out = tmp_path / "g.safetensors"
    text = f"text:{lms['text']}"
    run_json("convert", str(lms["gguf"]), "-o", str(out), "--calib", text, "--calib-samples", "8", "--remove", "0.2")
    model = mpocompress.load(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight and "tokenizer.json" in model.mpocompress_tokenizer
    rep = run_json("evaluate", str(out), "--data", text, "--reference", str(lms["gguf"]))
    assert rep["reference_perplexity"] > 1 and rep["kl_mean"] >= 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sequential_statistics_streamed_by_block_equal_the_whole_model_passes(lms, kind, monkeypatch):
    """--sequential on a transformer keeps each block's inputs and runs one block per group: the
    factors equal those of the whole-model passes (`collect_cross`) to float64 rounding."""
    import mpocompress.compress.choose as choose

    tok = byte_tokenizer()
    ds = load_unlabelled(f"text:{lms['text']}", "train", tok, 32, pack=True)
    batches = [ds.batch(torch.arange(i, i + 4)) for i in range(0, 12, 4)]
    config = CompressionConfig(bond_dim=6, structure="lowrank", sequential=True)
    streamed = load(lms[kind]).double()
    served = []
    cross = choose.BlockStream.cross
    monkeypatch.setattr(choose.BlockStream, "cross", lambda self, names: served.append(names) or cross(self, names))
    compress_(streamed, config, calibration=batches)
    assert len(served) == 2 * 4  # every group of both blocks: qkv, o, gate/up, down (GPT-2: c_attn, c_proj, c_fc, c_proj)
    monkeypatch.setattr(choose, "BlockStream", None)  # the stream is never made: every group runs the whole model
    monkeypatch.setattr(choose, "transformer_blocks", lambda m: [])
    whole = load(lms[kind]).double()
    compress_(whole, config, calibration=batches)
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-9)
    plain = load(lms[kind]).double()
    compress_(plain, CompressionConfig(bond_dim=6, structure="lowrank"), calibration=batches)
    assert any(not torch.allclose(a[k], plain.state_dict()[k]) for k in a)  # sequential did change the fit


def test_grams_shared_by_one_input_equal_each_layers_own(lms):
    """q/k/v (and gate/up) read one tensor and share one Gram per batch; every layer's Gram over
    several batches equals X^T X of the inputs its own hook saw (a freed input's memory reused by a
    later one must never be taken for it)."""
    from mpocompress.compress.calibrate import collect_grams

    model = load(lms["llama"]).double()
    tok = byte_tokenizer()
    ds = load_unlabelled(f"text:{lms['text']}", "train", tok, 32, pack=True)
    batches = [ds.batch(torch.arange(i, i + 4)) for i in range(0, 20, 4)]
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    seen = {n: [] for n in mods}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())) for n, m in mods.items()]
    cal = collect_grams(model, mods, batches)
    for h in handles:
        h.remove()
    for n in mods:
        x = torch.cat(seen[n])
        torch.testing.assert_close(cal.grams[n], x.T @ x, rtol=1e-10, atol=1e-9)
        assert cal.rows[n] == x.shape[0]
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"] in cal.groups
