"""convert --stream (issue 25): a Hugging Face folder's blocks read, calibrated, factorized and written
one at a time.

The reference is the in-memory conversion with --sequential, which the stream must equal (the same
factors, to float tolerance) on tiny Llama (GQA, tied embeddings), Qwen2, GPT-2 (Conv1D) and BERT
configs; sharded inputs, hidden states on disk and budgets; what is held while it runs (at most one
block's weights besides the parts outside the blocks); the written file against `save`'s; and the
inputs it refuses, each with one line and exit 2, leaving nothing behind.
"""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from lm_models import byte_tokenizer, make_lm, write_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli_train import fails, invoke, run_json
from transformers.pytorch_utils import Conv1D

from mpocompress import load
from mpocompress.cli.common import build_config
from mpocompress.compress import compress_
from mpocompress.compress.select import transformer_blocks
from mpocompress.compress.stream import _outside_to, stream_compress_
from mpocompress.io import read_metadata, save
from mpocompress.io.stream import DiskStore, block_loader, open_streamed, stream_output

TESTS = Path(__file__).parent


def _config(bond=("8",), structure="lowrank", remove=None, eps=None):
    # float32 passes: the identities below are the algorithm's (bfloat16 passes: tests/test_calib_dtype.py)
    return build_config(list(bond), [], [], [], eps, None, structure, None, None, True, remove, "model", calib_dtype="float32")


def _batches(vocab=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (4, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0  # padded rows are left out of the statistics in both paths
    return [{"input_ids": ids[:2], "attention_mask": mask}, {"input_ids": ids[2:], "attention_mask": mask}]


def _bert_model() -> transformers.BertModel:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    return model


def _bert_folder(folder: Path) -> Path:
    _bert_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    out = {kind: write_folder(kind, d / kind) for kind in ("llama", "qwen2", "gpt2")}
    out["bert"] = _bert_folder(d / "bert")
    out["wide"] = _wide_table_folder(d / "wide")
    byte_tokenizer().save_pretrained(out["wide"])
    make_lm("llama").save_pretrained(d / "sharded", max_shard_size="60KB")  # several shards and an index
    byte_tokenizer().save_pretrained(d / "sharded")
    out["sharded"] = d / "sharded"
    text = d / "text.txt"
    g = torch.Generator().manual_seed(1)
    words = ["the", "stream", "reads", "one", "block", "at", "a", "time", "and", "writes", "what", "it", "made", "before", "the", "next"]
    text.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(300)) + "\n")
    return {"dir": d, "text": text, **out}


def _streamed(folder: Path, config, batches, out: Path, disk: bool = False):
    loaded, source, blocks = open_streamed(folder, None)
    with stream_output(out) as writer:
        store = DiskStore(writer.staging / "hidden") if disk else None
        report = stream_compress_(loaded.model, config, batches, block_loader(source, loaded.model), writer.write_block, store=store)
        writer.finish(loaded.model, blocks, loaded.arch, {}, source)
    return report


def _in_memory(folder: Path, config, batches):
    model = load(folder)
    report = compress_(model, config, calibration=batches)
    return model, report


def _max_rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)) for k in b)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
def test_streamed_factors_equal_the_in_memory_sequential_ones(folders, tmp_path, kind):
    """Rank 8 everywhere (low-rank; an MPO of D 4 for the Llama): every tensor of the streamed file
    equals the in-memory --sequential model's within 1e-5 relative, and so do the outputs."""
    structure, bond = ("mpo", ("4",)) if kind == "llama" else ("lowrank", ("8",))
    batches = _batches()
    report = _streamed(folders[kind], _config(bond, structure), batches, tmp_path / "s.safetensors")
    streamed = load(tmp_path / "s.safetensors")
    model, ref_report = _in_memory(folders[kind], _config(bond, structure), batches)
    assert len(report.layers) == len(ref_report.layers) > 0
    assert _max_rel(streamed.state_dict(), model.state_dict()) < 1e-5
    with torch.no_grad():
        a = streamed(**batches[0])
        b = model(**batches[0])
    key = "logits" if "logits" in a else "last_hidden_state"
    torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    assert any("streamed block by block" in n for n in report.notes)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_call_groups_are_the_grams_groups_from_the_first_batch_alone(kind):
    """`call_groups` gives `collect_grams`'s groups (q/k/v and gate/up on one input each; GPT-2's
    fused c_attn alone) without any statistic, from one pass of the first batch, which calls every
    layer; a layer no batch calls is named."""
    from mpocompress.compress import calibrate

    model = _bert_model() if kind == "bert" else make_lm(kind)
    stack = transformer_blocks(model)[0]
    mods = {n: m for n, m in model.named_modules() if n.startswith(stack + ".") and isinstance(m, (torch.nn.Linear, Conv1D))}
    batches = _batches()
    passes = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: passes.append(1), with_kwargs=True)
    try:
        expected = calibrate.collect_grams(model, mods, batches).groups
        assert len(passes) == len(batches)
        passes.clear()
        assert calibrate.call_groups(model, mods, batches) == expected
        assert len(passes) == 1
    finally:
        handle.remove()
    assert any(len(g) > 1 for g in expected) or kind == "gpt2"  # shared inputs were grouped
    with pytest.raises(calibrate.MPOCompressError, match="never called"):
        calibrate.call_groups(model, {**mods, "stray": torch.nn.Linear(2, 2)}, batches)


@pytest.mark.parametrize("eps", [None, 0.5])
def test_the_compressing_sweep_makes_no_gram_it_does_not_read(folders, tmp_path, monkeypatch, eps):
    """A streamed conversion at a fixed D never multiplies a Gram: its refits gather their own
    statistics, and the compressing sweep needs only each block's groups. A layer sized by an eps
    reads its block's Grams there, so they are made then (and its file still equals the in-memory
    --sequential one's, above)."""
    from mpocompress.compress import calibrate

    calls = []
    real = calibrate._gram_of_input  # collect_grams' products (the refits' own go through _accumulate)
    monkeypatch.setattr(calibrate, "_gram_of_input", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = _config(("8",) if eps is None else (), eps=eps)
    _streamed(folders["llama"], config, _batches(), tmp_path / "s.safetensors")
    if eps is None:
        assert calls == []
    else:  # one product per batch and per input the block's selected layers read (q/k/v, o, gate/up, down), per block
        assert len(calls) == 2 * 4 * 2


def test_the_streamed_file_is_what_save_writes(folders, tmp_path):
    """Tensor for tensor and key for key (digests included): the file assembled from staged blocks
    equals `save` of the same model, and the tie of the embedding and the head is recorded once."""
    batches = _batches()
    _streamed(folders["llama"], _config(), batches, tmp_path / "s.safetensors")
    model, _ = _in_memory(folders["llama"], _config(), batches)
    save(model, tmp_path / "m.safetensors")
    ms, mm = read_metadata(tmp_path / "s.safetensors"), read_metadata(tmp_path / "m.safetensors")
    different = {k for k in mm if ms.get(k) != mm[k]}
    assert not different, different  # equal factors and metadata: equal digests too
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as a, safe_open(str(tmp_path / "m.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert "lm_head.weight" not in a.keys()  # stored once, under the embedding  # noqa: SIM118 (a safe_open handle, not a dict)
    assert json.loads(ms["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}


def test_sharded_input_and_hidden_states_on_disk_give_the_same_file(folders, tmp_path):
    """A folder of several shards with an index streams to the same tensors as the one-file folder,
    and --offload disk to the same as memory; nothing is left beside the output."""
    batches = _batches()
    assert len(list(folders["sharded"].glob("model-*.safetensors"))) > 2
    _streamed(folders["llama"], _config(), batches, tmp_path / "one.safetensors")
    _streamed(folders["sharded"], _config(), batches, tmp_path / "shards.safetensors", disk=True)
    a, b = load(tmp_path / "one.safetensors").state_dict(), load(tmp_path / "shards.safetensors").state_dict()
    assert _max_rel(a, b) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "shards.safetensors"]


def test_the_stream_holds_one_block_at_a_time(folders, tmp_path):
    """Whenever a block is written, the model holds real weights only outside the blocks and in
    that block: every other block is on the meta device (read before, freed after), and so is the
    untied LM head."""
    loaded, source, blocks = open_streamed(folders["qwen2"], None)
    seen = []

    def write(name, block):
        real = {n.split(".")[2] for n, p in loaded.model.named_parameters() if n.startswith(blocks + ".") and not p.is_meta}
        seen.append((name, real))
        assert loaded.model.lm_head.weight.is_meta  # an untied head is never run: read only when the file is written

    stream_compress_(loaded.model, _config(), _batches(), block_loader(source, loaded.model), write)
    assert [n for n, _ in seen] == [f"{blocks}.{i}" for i in range(2)]
    for i, (_, real) in enumerate(seen):
        assert real == {str(i)}
    assert all(p.is_meta for n, p in loaded.model.named_parameters() if n.startswith(blocks + "."))


def test_a_budget_is_spent_from_a_first_streamed_pass(folders, tmp_path):
    """--remove 0.3 on the Llama through the CLI: the model meets the budget, the report says how it
    was allocated, the file evaluates against the original."""
    out = tmp_path / "b.safetensors"
    rep = run_json("convert", folders["llama"], "--stream", "--calib", f"text:{folders['text']}", "--remove", "0.3",
                   "--max-length", "32", "-o", out)  # fmt: skip
    selected = sum(p.numel() for n, p in load(folders["llama"]).named_parameters() if ".layers." in n and n.endswith("proj.weight"))
    assert rep["params_model_after"] <= rep["params_model_before"] - round(0.3 * selected)
    assert any("first streamed pass" in n for n in rep["notes"])
    ev = run_json("evaluate", out, "--data", f"text:{folders['text']}", "--reference", folders["llama"], "--max-length", "32")
    assert ev["perplexity"] > 0 and 0.0 <= ev["top1_agreement"] <= 1.0


def _wide_table_folder(folder: Path) -> Path:
    """A tiny tied Llama whose table outweighs its blocks, as an LLM's does (vocabulary 2,048 x 64
    against 61,440 projection weights), with a decaying spectrum, as trained tables have: the budget
    shrinks it."""
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None,
                                   eos_token_id=2047, pad_token_id=2047)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
        w = model.model.embed_tokens.weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w.copy_(u @ torch.diag(s * torch.logspace(0, -2, s.numel())) @ vh * 3)
    model.save_pretrained(folder)
    return folder


def test_a_streamed_budget_prices_the_tied_table_as_in_memory(tmp_path, monkeypatch):
    """--remove 0.3 on a tied Llama whose table outweighs its blocks. The stream offers the table
    (outside the blocks) as the in-memory allocator does, and prices it the same way: each probed
    form's real next-token KL, measured by running it through the blocks one at a time, gives the
    in-memory costs within 1e-6; the projections' joint KL (their allocated forms made from the
    Grams of a streamed pass) equals the in-memory one within 1e-6. Both take the table at the same
    rank, and the streamed file equals the in-memory --sequential model's within 1e-5, and gives its
    logits."""
    from mpocompress.compress import choose
    from mpocompress.compress import stream as stream_mod

    folder = _wide_table_folder(tmp_path / "wide")
    seen: dict[str, dict] = {}

    def spy(module, key):
        real = module.spend

        def spend(config, free, forms, costs, sens, scale, plan, total, fixed, joint=None):
            k = next(i for i, t in enumerate(free) if t.cand.converter.serves_head)
            # what a form costs, sensitivity x energy x measured ratio (x error^2): the stream prices the table with
            # no sensitivity of its own (it cancels, the costs are measured), in memory it has one
            seen[key] = {"costs": [sens[k] * costs[k] * r for o, r in zip(forms[k], scale[k]) if o.structure != "dense"],
                         "forms": [o.params for o in forms[k]]}  # fmt: skip

            def measured(chosen):
                seen[key]["joint"] = joint(chosen)
                return seen[key]["joint"]

            return real(config, free, forms, costs, sens, scale, plan, total, fixed, measured)

        monkeypatch.setattr(module, "spend", spend)

    spy(stream_mod, "stream")
    spy(choose, "memory")
    config = build_config([], [], [], [], None, None, "lowrank", None, None, True, 0.3, "model", calib_dtype="float32")
    report = _streamed(folder, config, _batches(2048), tmp_path / "s.safetensors")
    model, mem = _in_memory(folder, dataclasses.replace(config, sequential=True), _batches(2048))
    a, b = seen["stream"], seen["memory"]
    assert a["forms"] == b["forms"] and len(a["forms"]) >= 5
    assert len(set(a["costs"])) >= 5  # the probed forms and those between them
    assert a["costs"] == pytest.approx(b["costs"], rel=1e-6)
    assert b["joint"] > 0 and a["joint"] == pytest.approx(b["joint"], rel=1e-6)
    table = [lr for lr in report.layers if lr.name == "model.embed_tokens"]
    assert table and [lr.bond_dims for lr in table] == [lr.bond_dims for lr in mem.layers if lr.name == "model.embed_tokens"]
    assert any("5 of its forms were swapped in" in n for n in report.notes)
    assert report.params_model_after == mem.params_model_after
    save(model, tmp_path / "m.safetensors")
    assert _max_rel(load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "m.safetensors")) < 1e-5
    streamed, ids = load(tmp_path / "s.safetensors"), _batches(2048)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert "LowRankTable" in type(streamed.get_output_embeddings()).__name__


def test_the_chosen_table_is_held_once_when_the_blocks_are_compressed(tmp_path, monkeypatch):
    """Once the tied table's low-rank form is swapped in, its module holds the only copy of its
    factors: the factorization's own (80 MiB of A on SmolLM2) was kept to block 0's first refit, and
    was the streamed conversion's peak there. Counted, as storages of A's shape, when block 1 starts."""
    import gc

    from mpocompress.compress import stream as stream_mod

    folder = _wide_table_folder(tmp_path / "wide")
    held = {}

    def status(message):
        if message.startswith("compressing block 1/"):
            gc.collect()
            shapes = [tuple(o.shape) for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and not o.is_meta]  # type(): no attribute lookups
            table = [s for s in shapes if len(s) == 2 and s[1] == 2048]
            held["copies"] = {s: table.count(s) for s in table}

    monkeypatch.setattr(stream_mod, "status", status)
    config = build_config([], [], [], [], None, None, "lowrank", None, None, True, 0.3, "model", calib_dtype="float32")
    report = _streamed(folder, config, _batches(2048), tmp_path / "s.safetensors")
    rank = next(lr.bond_dims for lr in report.layers if lr.name == "model.embed_tokens")[0]
    assert held["copies"] == {(rank, 2048): 1}


def test_streamed_analyze_shows_what_the_streamed_convert_does(folders, tmp_path):
    """analyze --stream --remove 0.3 (low-rank) reports the allocation convert --stream makes (the same
    layers at the same ranks, the same size), curves equal to the in-memory analyze's (the first pass
    runs the original blocks on the original inputs, as the in-memory pass does) within 1e-6, and
    writes nothing; without a budget it shows the curves and no allocation."""
    common = ["--calib", f"text:{folders['text']}", "--max-length", "32", "--structure", "lowrank", "--calib-dtype", "float32"]
    before = sorted(p.name for p in folders["llama"].iterdir())
    rep = run_json("analyze", folders["llama"], "--stream", "--remove", "0.3", *common)
    conv = run_json("convert", folders["llama"], "--stream", "--remove", "0.3", *common, "-o", tmp_path / "c.safetensors")
    ranks = {lr["name"]: lr["bond_dims"] for lr in rep["layers"]}
    assert ranks and ranks == {lr["name"]: lr["bond_dims"] for lr in conv["layers"]}
    assert rep["params_model_after"] == conv["params_model_after"] < rep["params_model_before"]
    assert rep["applied"] is False and sorted(p.name for p in folders["llama"].iterdir()) == before
    mem = run_json("analyze", folders["llama"], "--remove", "0.3", *common)
    # 2 blocks x 7 projections and the tied table, which a budget offers in both paths
    assert sorted(rep["curves"]) == sorted(mem["curves"]) and len(rep["curves"]) == 15 and "model.embed_tokens" in rep["curves"]
    for name, forms in mem["curves"].items():
        assert [f["params"] for f in rep["curves"][name]] == [f["params"] for f in forms]
        for a, b in zip(rep["curves"][name], forms, strict=True):
            assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-6, abs=1e-9), name
    curves = run_json("analyze", folders["llama"], "--stream", *common[:4], "--offload", "disk")
    assert curves["layers"] == [] and len(curves["curves"]) == 14 and any("no size asked for" in n for n in curves["notes"])
    assert all("no size asked for" in k["reason"] for k in curves["skipped"] if ".layers." in k["name"])
    shown = invoke("analyze", folders["llama"], "--stream", *common[:4])  # the table a user reads: no ratio of nothing
    assert shown.exit_code == 0 and "Model parameters:" in shown.stdout and "nan" not in shown.stdout and "rho" not in shown.stdout


def test_bad_inputs_get_one_line_and_exit_2_and_leave_nothing(folders, tmp_path):
    calib = f"text:{folders['text']}"
    out = tmp_path / "o.safetensors"
    assert "needs --calib" in fails("convert", folders["llama"], "--stream", "-D", "4", "-o", out)
    assert "needs --calib" in fails("analyze", folders["llama"], "--stream", "--remove", "0.3")
    assert "add --stream" in fails("analyze", folders["llama"], "--offload", "disk", "--calib", calib)
    assert "add --stream" in fails("convert", folders["llama"], "--offload", "disk", "--calib", calib, "-D", "4", "-o", out)
    assert "cpu or disk" in fails("convert", folders["llama"], "--stream", "--offload", "tape", "--calib", calib, "-D", "4", "-o", out)
    assert "by the budget only" in fails("convert", folders["llama"], "--stream", "--calib", calib, "-D", "model.embed_tokens=8",
                                          "-D", "model.layers.*=8", "--remove", "0.3", "-o", out)  # fmt: skip
    pt = tmp_path / "plain.safetensors"
    save(torch.nn.Sequential(torch.nn.Linear(4, 4)), pt, arch=None)
    assert "Hugging Face model folder" in fails("convert", pt, "--stream", "--calib", calib, "-D", "4", "-o", out)
    assert "Hugging Face model folder" in fails("analyze", pt, "--stream", "--calib", calib, "--remove", "0.3")
    bins = tmp_path / "bins"
    bins.mkdir()
    model = make_lm("llama")
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(bins)
    torch.save(model.state_dict(), bins / "pytorch_model.bin")
    assert "no safetensors weights" in fails("convert", bins, "--stream", "--calib", calib, "-D", "4", "-o", out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_device_option(folders, tmp_path, monkeypatch):
    """--device on analyze and convert (both paths): cpu gives what the default gives here; a GPU
    that is not there, an unknown name, and cuda under torchrun's gloo are one-line errors."""
    calib = f"text:{folders['text']}"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    base = ["convert", folders["llama"], "--stream", "--calib", calib, "-D", "4"]
    assert invoke(*base, "-o", a).exit_code == 0 and invoke(*base, "--device", "cpu", "-o", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    out = tmp_path / "o.safetensors"
    if not torch.cuda.is_available():
        for args in (base, ["convert", folders["llama"], "--calib", calib, "-D", "4"], ["analyze", folders["llama"], "--stream", "--calib", calib]):
            assert "no CUDA GPU is available" in fails(*args, "--device", "cuda", *(["-o", out] if args[0] == "convert" else []))
    assert "unknown device" in fails("analyze", folders["llama"], "--device", "tpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    assert "run it as one process for --device cuda" in fails(*base, "--device", "cuda", "-o", out)
    assert not out.exists()


def test_the_parts_outside_the_blocks_move_to_the_device_and_the_blocks_stay(folders):
    """`_outside_to` (a streamed pass on a GPU) moves embeddings, norms and rotary tables, never a
    block nor a tensor still on the meta device; checked by moving to the meta device itself."""
    loaded, source, blocks = open_streamed(folders["llama"], None)
    block_loader(source, loaded.model)(loaded.model.get_submodule(blocks)[0], f"{blocks}.0")
    _outside_to(loaded.model, blocks, "meta")
    for name, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]:
        inside = name.startswith(blocks + ".")
        assert t.is_meta == (not inside or not name.startswith(f"{blocks}.0.")), name
    assert not any(t.is_meta for t in loaded.model.get_submodule(blocks)[0].parameters())
    assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight  # still tied


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_damaged_folders_are_named(folders, tmp_path):
    """A missing shard, an index naming a file outside the folder, a block tensor missing from the
    files: one line each, exit 2, and neither the output nor a staging folder is left."""
    calib = f"text:{folders['text']}"
    missing = _copy(folders["sharded"], tmp_path / "missing")
    shards = sorted(missing.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert "missing" in fails("convert", missing, "--stream", "--calib", calib, "-D", "4", "-o", tmp_path / "a.safetensors")
    outside = _copy(folders["sharded"], tmp_path / "outside")
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if ".layers.1." in k)
    index["weight_map"][key] = "../elsewhere.safetensors"
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "outside" in fails("convert", outside, "--stream", "--calib", calib, "-D", "4", "-o", tmp_path / "b.safetensors")
    lacking = _copy(folders["sharded"], tmp_path / "lacking")
    index = json.loads((lacking / "model.safetensors.index.json").read_text())
    gone = next(k for k in index["weight_map"] if k.startswith("model.layers.1.mlp.down_proj"))
    shard = lacking / index["weight_map"].pop(gone)
    (lacking / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_file(str(shard))
    del tensors[gone]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    line = fails("convert", lacking, "--stream", "--calib", calib, "-D", "4", "-o", tmp_path / "c.safetensors")
    assert "model.layers.1.mlp.down_proj.weight" in line and "not found" in line
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".safetensors" or p.name.startswith(".")]


CAPPED = r"""
import re, resource, sys
import torch, transformers, transformers.models.llama.modeling_llama, scipy.linalg, sklearn, tensorly, tokenizers
import mpocompress.cli, mpocompress.cli.convert
from transformers import AutoTokenizer

def vm(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

# threads and their stacks and arenas are address space, not memory: start them before the cap is set
AutoTokenizer.from_pretrained(sys.argv[2])("warm up")
a = torch.randn(512, 512, dtype=torch.float64); torch.linalg.eigh(a @ a.T); torch.linalg.svd(a); del a
resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + (int(sys.argv[1]) << 20), resource.RLIM_INFINITY))
sys.exit(mpocompress.cli.main(["convert", *sys.argv[2:]]))
"""


def _deep_folder(folder: Path, blocks: int) -> int:
    """A Llama of `blocks` blocks of width 256 (MLP 1024), random bf16 weights written shard by shard
    (the model is never built whole); returns its parameter count."""
    vocab = 257
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=blocks, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
                                   eos_token_id=vocab - 1, pad_token_id=vocab - 1, dtype="bfloat16", architectures=["LlamaForCausalLM"])  # fmt: skip
    folder.mkdir()
    cfg.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, 256), "model.norm.weight": (256,)}
    for i in range(blocks):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (256, 256), p + "self_attn.k_proj.weight": (128, 256),
                       p + "self_attn.v_proj.weight": (128, 256), p + "self_attn.o_proj.weight": (256, 256),
                       p + "mlp.gate_proj.weight": (1024, 256), p + "mlp.up_proj.weight": (1024, 256),
                       p + "mlp.down_proj.weight": (256, 1024), p + "input_layernorm.weight": (256,),
                       p + "post_attention_layernorm.weight": (256,)})  # fmt: skip
    names = list(shapes)
    per = max(1, len(names) // 4)
    parts = [names[k : k + per] for k in range(0, len(names), per)]
    weight_map = {}
    for k, part in enumerate(parts):
        file = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: (torch.ones(shapes[n]) if len(shapes[n]) == 1 else torch.randn(shapes[n], generator=g) * 0.05).to(torch.bfloat16)
                   for n in part}, str(folder / file), metadata={"format": "pt"})  # fmt: skip
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(torch.Size(s).numel() for s in shapes.values())


@pytest.mark.slow
def test_a_model_larger_than_the_memory_cap_streams_and_in_memory_does_not(tmp_path):
    """A 100-block Llama (98M parameters: 394 MB in float32, 197 MB as stored in bf16) under an
    address-space cap of 360 MB beyond the warmed-up process: --stream completes and its file loads;
    the in-memory conversion of the same model under the same cap runs out (exit 2, one line)."""
    n = _deep_folder(tmp_path / "deep", 100)
    assert n * 4 > 360 << 20
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of the text the stream calibrates on, with some words" for i in range(300)) + "\n")
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--calib", f"text:{text}", "--calib-samples", "8", "--max-length", "128", "--structure", "lowrank", "--bond-dim", "16"]
    r = subprocess.run([sys.executable, "-c", CAPPED, "360", str(tmp_path / "deep"), "--stream", *common, "-o", str(tmp_path / "s.safetensors")],
                       capture_output=True, text=True, env=env, timeout=900, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    model = load(tmp_path / "s.safetensors")
    assert sum(p.numel() for p in model.parameters()) < n
    r = subprocess.run([sys.executable, "-c", CAPPED, "360", str(tmp_path / "deep"), "--sequential", *common, "-o", str(tmp_path / "m.safetensors")],
                       capture_output=True, text=True, env=env, timeout=900, check=False)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert not (tmp_path / "m.safetensors").exists()


def test_running_out_of_memory_in_a_block_names_the_block(folders, tmp_path, monkeypatch):
    """The allocator failing inside a block (as under a cap) is one line naming the block and what
    it needs, exit 2, with nothing written."""
    from mpocompress.compress import stream

    real = stream._make_trying  # what the stream's second pass calls to make a layer's factors

    def starved(t, *a, **k):
        if ".layers.1." in t.cand.name:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8388608 bytes")
        return real(t, *a, **k)

    monkeypatch.setattr(stream, "_make_trying", starved)
    out = tmp_path / "o.safetensors"
    line = fails("convert", folders["llama"], "--stream", "--calib", f"text:{folders['text']}", "-D", "4", "--max-length", "32", "-o", out)
    assert re.search(r"out of memory while streaming block model\.layers\.1: the block itself needs about [0-9.]+ GiB", line), line
    assert not list(tmp_path.iterdir())


def test_streamed_output_loads_and_generates_like_the_in_memory_one(folders, tmp_path):
    """The whole path as a user runs it: convert --stream with no size options beyond -D, then
    evaluate with a prompt; the in-memory --sequential conversion of the same data agrees."""
    calib = f"text:{folders['text']}"
    a, b = tmp_path / "s.safetensors", tmp_path / "m.safetensors"
    run_json("convert", folders["gpt2"], "--stream", "--calib", calib, "-D", "8", "--structure", "lowrank", "--max-length", "32", "-o", a)
    run_json("convert", folders["gpt2"], "--sequential", "--calib", calib, "-D", "8", "--structure", "lowrank", "--max-length", "32", "-o", b)
    sa, sb = load(a).state_dict(), load(b).state_dict()
    assert _max_rel(sa, sb) < 1e-5
    ea = run_json("evaluate", a, "--data", calib, "--max-length", "32")
    eb = run_json("evaluate", b, "--data", calib, "--max-length", "32")
    assert ea["perplexity"] == pytest.approx(eb["perplexity"], rel=1e-4)


def test_copy_of_a_streamed_model_is_independent(folders, tmp_path):
    """A streamed file's model is an ordinary model: deep copies, no meta tensors, trainable."""
    _streamed(folders["qwen2"], _config(), _batches(), tmp_path / "s.safetensors")
    model = load(tmp_path / "s.safetensors")
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    twin = copy.deepcopy(model)
    loss = twin(**_batches()[0], labels=_batches()[0]["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for n, p in twin.named_parameters() if ".layers." in n and p.requires_grad and "proj" in n)


def _torchrun(*args, procs=2, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def _products(state: dict) -> dict:
    """Each layer's weight as its factors make it (B A for a low-rank layer): what a factorization
    determines, whatever the signs of its singular vectors."""
    out = {}
    for k, v in state.items():
        if k.endswith(".second"):
            out[k[: -len(".second")]] = v.double() @ state[k[: -len(".second")] + ".first"].double()
        elif not k.endswith(".first"):
            out[k] = v.double()
    return out


@pytest.mark.parametrize("kind,size", [("llama", ("-D", "8")), ("llama", ("--remove", "0.3")), ("wide", ("--remove", "0.3"))],
                         ids=["rank8", "remove0.3", "remove0.3-table"])  # fmt: skip
def test_two_gloo_processes_give_the_model_of_one(folders, tmp_path, kind, size):
    """torchrun with 2 processes (gloo): each runs half the calibration batches, the statistics are
    all-reduced and the layers dealt between them. The file rank 0 writes makes the same choices as
    the one-process run (same layers, same ranks), every layer's output error on the calibration
    data within 1e-6 relative of it, the first layers' factors (identical inputs) within 1e-6 and the
    logits within 1e-4; rank 1 writes nothing. On the Llama whose tied table outweighs its blocks the
    budget takes the table, at the same rank in both runs.

    Deeper factors are not compared entry by entry: the tiny model's input Gram matrices have
    condition numbers near 1e9, where a 1e-15 relative change of a Gram alone (the summation order
    of two processes) moves a single process's factors by 1e-8 and, compounded through refitted
    blocks, by up to 1e-3 along directions the data barely excites (docs/performance.md, "Streaming")."""
    calib = f"text:{folders['text']}"
    common = ["--stream", "--calib", calib, "--structure", "lowrank", *size, "--max-length", "32", "--calib-samples", "32"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    r = invoke("convert", folders[kind], *common, "-o", one, "--json")
    assert r.exit_code == 0, r.output
    rep_one = json.loads(r.stdout)
    r = _torchrun("-m", "mpocompress", "convert", folders[kind], *common, "-o", two, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rep_two = json.loads(r.stdout)  # rank 0 alone prints
    layers_one = {x["name"]: x for x in rep_one["layers"]}
    layers_two = {x["name"]: x for x in rep_two["layers"]}
    assert sorted(layers_one) == sorted(layers_two)
    assert ("model.embed_tokens" in layers_one) == (kind == "wide")
    for name, x in layers_one.items():
        assert layers_two[name]["ranks"] == x["ranks"]
        assert layers_two[name]["output_rel_error"] == pytest.approx(x["output_rel_error"], rel=1e-6, abs=1e-9)
    a, b = _products(load(one).state_dict()), _products(load(two).state_dict())
    first = [k for k in a if k.startswith("model.layers.0.self_attn.") and k[len("model.layers.0.self_attn.") :] in ("q_proj", "k_proj", "v_proj")]
    assert first and _max_rel({k: b[k] for k in first}, {k: a[k] for k in first}) < 1e-6
    words = folders["text"].read_text().splitlines()[-2:]  # text like the calibration's (random ids excite what it never did)
    ids = byte_tokenizer()(words, return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        la, lb = load(one)(input_ids=ids).logits, load(two)(input_ids=ids).logits
    assert float((la - lb).abs().max() / la.abs().max()) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


SUMMED = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_stream import _batches
from mpocompress.compress.calibrate import BlockStream, _row_mask, capture_block_inputs
from mpocompress.compress.stream import Ranks, _block_grams, _summed_cross, _summed_grams
from mpocompress.compress.targets import select_targets
from mpocompress.cli.common import build_config
from mpocompress import load
dist.init_process_group("gloo")
ranks = Ranks()
model = load(sys.argv[2])
batches = (_batches(seed=0) + _batches(seed=1))[ranks.rank :: ranks.world]
stack = model.model.layers
ts = [t for t in select_targets(model, build_config(["8"], [], [], [], None, None, "lowrank", None, None, True, None, "model"))[0]
      if t.cand.name.startswith("model.layers.1.")]
inputs = capture_block_inputs(model, stack[0], batches)
stream = BlockStream("model.layers", (stack, stack), [inputs, inputs], [_row_mask(b) for b in batches])
stream.advance()
cal = _summed_grams(_block_grams(stream, 0, stack[1], ts, batches, "model.layers."), ranks)
cross = _summed_cross(stream.cross([ts[0].cand.name]), ranks)
if ranks.rank == 0:
    st = cross[ts[0].cand.name]
    torch.save({"grams": cal.grams, "rows": cal.rows, "samples": cal.samples, "cross": [t.clone() for t in st.tensors()], "rows_x": st.rows}, sys.argv[3])
from mpocompress.train import DistEnv, finish_distributed
finish_distributed(DistEnv(rank=ranks.rank, world_size=ranks.world))  # as every torchrun command leaves the group
"""


def test_two_gloo_processes_sum_the_statistics_of_one(folders, tmp_path):
    """The all-reduced Gram matrices and cross statistics of 2 processes (each with half the batches)
    equal one process's over all of them within 1e-10 relative, and count the same rows."""
    from mpocompress.compress.calibrate import BlockStream, _row_mask, capture_block_inputs
    from mpocompress.compress.stream import Ranks, _block_grams, _summed_cross, _summed_grams
    from mpocompress.compress.targets import select_targets

    script = tmp_path / "summed.py"
    script.write_text(SUMMED)
    r = _torchrun(script, TESTS, folders["llama"], tmp_path / "two.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    model = load(folders["llama"])
    batches = _batches(seed=0) + _batches(seed=1)
    stack = model.model.layers
    ts = [t for t in select_targets(model, _config())[0] if t.cand.name.startswith("model.layers.1.")]
    inputs = capture_block_inputs(model, stack[0], batches)
    stream = BlockStream("model.layers", (stack, stack), [inputs, inputs], [_row_mask(b) for b in batches])
    stream.advance()
    cal = _summed_grams(_block_grams(stream, 0, stack[1], ts, batches, "model.layers."), Ranks())
    st = _summed_cross(stream.cross([ts[0].cand.name]), Ranks())[ts[0].cand.name]
    assert two["samples"] == cal.samples == 8 and two["rows"] == cal.rows and two["rows_x"] == st.rows
    for name, g in cal.grams.items():
        assert float((two["grams"][name] - g).abs().max() / g.abs().max()) < 1e-10
    assert len(two["cross"]) == len(st.tensors()) == 5  # X'^T X', both sums, and X^T X and X'^T X (or the energy and X'^T X W^T)
    for a, b in zip(two["cross"], st.tensors()):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-10


@pytest.mark.parametrize("kind,tokens,disk", [("llama", None, False), ("gpt2", None, False), ("bert", None, False), ("llama", 20, True)],
                         ids=["llama", "gpt2", "bert", "llama-cut-disk"])  # fmt: skip
def test_streamed_sensitivities_are_the_in_memory_ones(folders, tmp_path, kind, tokens, disk, monkeypatch):
    """The sensitivities a streamed budget is spent on, from gradients carried back through the
    blocks one at a time, equal the in-memory allocator's from one backward pass through the whole
    model (`gradient_sensitivity` with the same batches and projections: next-token KL through the
    head's Fisher for the decoders, the last hidden state for BERT) within 1e-6 relative; the layers
    of the last block, nearest the output, are not all alike (the estimate is not a constant). With
    fewer tokens asked for than a batch holds, the reverse pass runs on that batch's leading sample
    alone (its rotary tables and masks cut alike), and equals the in-memory pass on that sample; so
    with the kept states on disk (--offload disk), which are deleted once used."""
    from mpocompress.compress import stream as stream_mod
    from mpocompress.compress.calibrate import HeadFisher, gradient_sensitivity, model_output
    from mpocompress.compress.stream import stream_blocks
    from mpocompress.compress.targets import select_targets

    seen = {}
    real_spend = stream_mod.spend

    def spend(config, free, forms, costs, sens, *rest, **kw):
        seen.update({t.cand.name: s for t, s in zip(free, sens) if not t.cand.converter.serves_head})  # the table's cost is measured
        return real_spend(config, free, forms, costs, sens, *rest, **kw)

    monkeypatch.setattr(stream_mod, "spend", spend)
    probe = _batches()
    if tokens is not None:
        monkeypatch.setattr(stream_mod, "SENSITIVITY_TOKENS", tokens)
        probe = [{k: v[:1] for k, v in probe[0].items()}]
    config = _config(bond=(), remove=0.3)
    if disk:
        dropped = []
        real_drop = DiskStore.drop
        def drop(self, key):
            file = self.folder / f"{key[0]}-{key[1]}.pt"
            before = file.exists()
            real_drop(self, key)
            if stream_mod.KEPT <= key[0] < stream_mod.JOINT_SIDE:  # the reverse pass's (the table's passes drop theirs too)
                dropped.append((before, file.exists()))

        monkeypatch.setattr(DiskStore, "drop", drop)
    report = _streamed(folders[kind], config, _batches(), tmp_path / "s.safetensors", disk=disk)
    if disk:
        blocks_in = load(folders[kind]).config.num_hidden_layers  # each block's kept input, then the last one's output
        assert sum(before for before, _ in dropped) == blocks_in + 1 and not any(after for _, after in dropped)
    real = 24 if tokens else sum(int(b["attention_mask"].sum()) for b in _batches())  # padding left out
    assert any(f"gradients carried back through the blocks in reverse order over {real} calibration tokens" in n
               for n in report.notes)  # fmt: skip
    model = load(folders[kind])
    blocks = stream_blocks(model) + "."
    mods = {t.cand.name: t.cand.module for t in select_targets(model, config)[0] if t.cand.name.startswith(blocks)}
    if kind == "bert":
        ref = gradient_sensitivity(model, mods, probe, lambda m, b: model_output(m, b))
    else:
        ref = gradient_sensitivity(model, mods, probe, HeadFisher(model, probe))
    assert sorted(seen) == sorted(ref) and len(ref) >= 8
    for name, r in ref.items():
        assert r > 0 and seen[name] == pytest.approx(r, rel=1e-6), name
    index = {k: int(k[len(blocks) :].split(".")[0]) for k in ref}
    last = [v for k, v in ref.items() if index[k] == max(index.values())]
    assert len(last) >= 4 and max(last) > 1.5 * min(last)


HEAP = r"""
import re, sys, torch
from mpocompress.utils import map_large_blocks, return_free_memory
def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024
if sys.argv[1] == "mapped":
    map_large_blocks()
big = torch.ones(30 << 17, dtype=torch.float64)  # a 30 MB block, freed: glibc's threshold rises to it
del big
held = [torch.ones(6 << 17, dtype=torch.float64) for _ in range(40)]  # 40 blocks of 6 MB
before = rss()
del held[::2]  # every other one freed: holes in the heap, unless each was mapped on its own
after = rss()
return_free_memory()
print(before - after, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_blocks_of_a_few_mb_are_handed_back_when_freed():
    """A streamed conversion's freed tensors of a few MB go back to the system: with glibc's default
    (the mmap threshold raised to 32 MB by the first large block freed) 20 freed blocks of 6 MB stay
    resident until `return_free_memory` trims the heap; after `map_large_blocks` they are returned
    as they are freed (120 MB within 20 %)."""
    got = {}
    for mode in ("default", "mapped"):
        r = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True, check=True)
        got[mode] = [int(v) for v in r.stdout.split()]
    freed, trimmed = got["default"]
    assert freed < 30 and trimmed > 96, got  # stranded in the heap, then handed back by the trim
    freed, _ = got["mapped"]
    assert 96 < freed < 144, got


def test_the_model_runs_past_its_blocks_to_what_follows_them():
    """`_past_the_blocks`: with every block replaced by a stand-in, the model's output is what follows
    its blocks (here a norm and a scale) applied to the given hidden states, for blocks that return
    their hidden states alone or first in a tuple; the stand-ins carry the blocks' plain attributes
    (a loop may read them); the blocks are back afterwards, also after an error."""
    from mpocompress.compress.stream import _past_the_blocks

    class Block(torch.nn.Module):
        def __init__(self, wrapped):
            super().__init__()
            self.lin, self.wrapped, self.kind = torch.nn.Linear(4, 4), wrapped, "full"

        def forward(self, h, scale=1.0):
            out = h + self.lin(h) * scale
            return (out, None) if self.wrapped else out

    class Net(torch.nn.Module):
        def __init__(self, wrapped):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block(wrapped) for _ in range(3))
            self.norm = torch.nn.LayerNorm(4)
            self.wrapped = wrapped

        def forward(self, x):
            h = x * 2
            for blk in self.layers:
                assert blk.kind == "full"
                out = blk(h, scale=0.5)
                h = out[0] if self.wrapped else out
            return self.norm(h) * 3

    for wrapped in (False, True):
        net = Net(wrapped)
        blocks = list(net.layers)
        given = torch.randn(2, 5, 4)
        with _past_the_blocks(net.layers, [given], wrapped):
            got = net(torch.randn(2, 5, 4))
        assert torch.allclose(got, net.norm(given) * 3, atol=1e-6)
        assert list(net.layers) == blocks
        with pytest.raises(RuntimeError), _past_the_blocks(net.layers, [given], wrapped):
            raise RuntimeError
        assert list(net.layers) == blocks
