"""A Hugging Face user's first commands, as a user runs them (exit code, the one stderr line, the
files left): a text model's data defaults, what a budget counts, the warning on a conversion that
keeps little of the model, wrong teachers, hints about text:, markup-free messages, progress lines
in logs, a sentence-transformers export, and the data folder recorded for the next command.

Tiny models from configs (no download): the 2-layer BERT of test_hf with its tokenizer, and FC2.
"""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_train import invoke, run_json
from test_hf import folders, sentences  # noqa: F401 - module fixtures shared with test_hf

import mpocompress.cli.render as rendering
from mpocompress import build_model, load
from mpocompress.train.distill import MIN_WARMUP_STEPS, DistillConfig, lr_at

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


# ----------------------------------------------------------------------------- 1. data that fits the model


def test_a_text_model_without_data_is_asked_for_text_not_served_digits(folders, tmp_path):  # noqa: F811
    """As a user types it (a subprocess): exit 2, one line naming --data text:FILE, nothing written."""
    r = subprocess.run([sys.executable, "-m", "mpocompress", "evaluate", str(folders / "bert")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--data text:FILE" in r.stderr, r.stderr
    run_json("convert", folders / "bert", "-D", "2", "-o", tmp_path / "c.safetensors")
    for args in (["evaluate", tmp_path / "c.safetensors"],
                 ["finetune", tmp_path / "c.safetensors", "--distill-from", folders / "bert", "-o", tmp_path / "ft.safetensors"]):  # fmt: skip
        assert "--data text:FILE" in _one_error_line(invoke(*args))
    line = _one_error_line(invoke("sweep", folders / "bert", "-D", "2,4", "-o", tmp_path / "sw"))
    assert "text model" in line and "analyze" in line  # sweep needs labels: it says what measures a text model instead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_convert_records_its_calibration_text_and_the_next_commands_default_to_it(folders, sentences, tmp_path):  # noqa: F811
    out = tmp_path / "c.safetensors"
    run_json("convert", folders / "bert", "--calib", f"text:{sentences}", "--target-params", "0.9", "-o", out)
    ev = run_json("evaluate", out, "--reference", folders / "bert")  # no --data: the recorded calibration text
    assert ev["data_options"]["from"] == "file" and 0 < ev["agreement_cosine"] <= 1
    same = run_json("evaluate", out, "--data", f"text:{sentences}", "--reference", folders / "bert")
    assert same["agreement_cosine"] == ev["agreement_cosine"] and same["data_options"]["from"] == "option"


def test_a_named_sets_folder_is_recorded_so_the_next_command_needs_no_data_dir(shared_data, tmp_path, monkeypatch):
    torch.save(build_model("fc2").state_dict(), tmp_path / "fc2.pt")
    out = tmp_path / "c.safetensors"
    run_json("convert", tmp_path / "fc2.pt", "--arch", "fc2", "--calib", "mnist", "--calib-samples", "64",
             "--data-dir", shared_data, "--target-params", "0.5", "-o", out)  # fmt: skip
    monkeypatch.delenv("MPOCOMPRESS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data here
    ev = run_json("evaluate", out)
    assert ev["data"] == "mnist" and ev["data_options"]["from"] == "file"
    r = invoke("evaluate", out, "--data-dir", tmp_path)  # an explicit folder still wins, and is named when wrong
    assert r.exit_code == 2 and str(tmp_path) in r.stderr


# ----------------------------------------------------------------------------- 2. the warning, 3. the budget


@pytest.fixture(scope="module")
def loud_bert(folders, tmp_path_factory):  # noqa: F811
    """The tiny BERT with its blocks' weights scaled up, so that the blocks (not the embeddings passed
    through the residual stream) make its output, as in a trained model."""
    import shutil

    import transformers

    d = tmp_path_factory.mktemp("loud") / "bert"
    shutil.copytree(folders / "bert", d)
    model = transformers.BertModel.from_pretrained(d, local_files_only=True)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.startswith("encoder.layer.") and isinstance(m, torch.nn.Linear):
                m.weight.mul_(25.0)
    model.save_pretrained(d)
    return d


def test_convert_measures_the_output_on_a_probe_and_warns_when_little_is_kept(loud_bert, sentences, tmp_path):  # noqa: F811
    r = invoke("convert", loud_bert, "-D", "1", "-o", tmp_path / "a.safetensors", "--json")
    assert r.exit_code == 0, r.output
    probe = json.loads(r.stdout)["probe"]
    assert probe["inputs"] == "4 random token sequences" and probe["cosine_mean"] < 0.8
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warning) == 1 and "--calib" in warning[0] and f"{probe['cosine_mean']:.2f}" in warning[0]
    # the probe against the dense product: the same inputs through the original and the file written
    original, converted = load(loud_bert), load(tmp_path / "a.safetensors")
    from mpocompress.models.hf import probe_inputs

    x = probe_inputs(original, batch=4, length=32)
    with torch.no_grad():
        a, b = converted(**x)[0], original(**x)[0]
    keep = x["attention_mask"].reshape(-1).bool()
    a, b = a.reshape(-1, a.shape[-1])[keep].double(), b.reshape(-1, b.shape[-1])[keep].double()
    assert probe["output_rel_error"] == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-4)
    assert probe["cosine_mean"] == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b).mean()), abs=1e-5)
    # calibrated at a mild budget: held-out sentences are the probe, and no warning
    r = invoke("convert", loud_bert, "--calib", f"text:{sentences}", "--target-params", "0.95", "-o", tmp_path / "b.safetensors", "--json")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    probe = json.loads(r.stdout)["probe"]
    assert probe["inputs"].startswith("32 held-out samples of text:") and probe["cosine_mean"] > 0.8


def test_the_probe_change_is_compared_a_few_rows_at_a_time_as_whole(monkeypatch):
    """The probe's relative error and mean cosine, made PROBE_ROWS rows at a time in float64 (3 here:
    10 rows, a last piece of 1), equal the whole tensors' (seed 0, within 1e-12); the outputs are kept
    in the model's own dtype, not float64."""
    from mpocompress.cli import convert

    monkeypatch.setattr(convert, "PROBE_ROWS", 3)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(5, 7)
    probe = {"input": torch.randn(10, 5, generator=g)}
    before = torch.randn(10, 7, generator=g)
    assert convert._probe_outputs(model, probe).dtype == torch.float32
    got = convert._probe_change(model, probe, before, "x")
    with torch.no_grad():
        a, b = model(probe["input"]).double(), before.double()
    assert got["output_rel_error"] == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-12)
    assert got["cosine_mean"] == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b).mean()), rel=1e-12)


def test_a_budget_says_what_it_counts(folders, sentences, tmp_path):  # noqa: F811
    model = load(folders / "bert")
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("encoder.layer.") and isinstance(m, torch.nn.Linear))
    common = ["--calib", f"text:{sentences}", "--calib-samples", "64"]
    whole = run_json("convert", folders / "bert", *common, "--target-params", "0.8", "-o", tmp_path / "w.safetensors")
    assert 0.8 * total - 0.03 * total <= whole["params_model_after"] <= 0.8 * total  # met from below, tiny layers are coarse
    assert any(n.startswith(f"budget: {round(0.8 * total):,} parameters for the whole model") for n in whole["notes"])
    sel = run_json("convert", folders / "bert", *common, "--target-params", "0.5", "--of", "selected", "-o", tmp_path / "s.safetensors")
    rem = run_json("convert", folders / "bert", *common, "--remove", "0.5", "-o", tmp_path / "r.safetensors")
    # half of the blocks' projections either way; the embeddings offered to the allocator are not counted
    for rep in (sel, rem):
        assert 0.5 * blocks <= total - rep["params_model_after"] <= 0.5 * blocks + 0.03 * total
        assert any(f"{blocks:,} weights" in n and "embeddings offered besides are not counted" in n for n in rep["notes"])
    assert "--target-params" in _one_error_line(invoke("convert", folders / "bert", "--of", "selected", "-D", "2", "-o", tmp_path / "x.safetensors"))
    assert "choose model" in _one_error_line(invoke("convert", folders / "bert", "--of", "all", "--target-params", "0.5", "-o", tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- 5. text:, 7. teachers


def test_plain_text_given_as_a_dataset_suggests_text_and_a_model_file_as_data_is_named_briefly(folders, tmp_path):  # noqa: F811
    (tmp_path / "calib.txt").write_text("the model is a model .\n" * 8)
    line = _one_error_line(invoke("convert", folders / "bert", "--calib", tmp_path / "calib.txt", "--target-params", "0.5", "-o", tmp_path / "o.safetensors"))
    assert f"text:{tmp_path / 'calib.txt'}" in line
    run_json("convert", folders / "bert", "-D", "2", "-o", tmp_path / "c.safetensors")
    line = _one_error_line(invoke("evaluate", tmp_path / "c.safetensors", "--data", tmp_path / "c.safetensors"))
    assert "a model's weights" in line and "text:FILE" in line and len(line.replace(str(tmp_path), "TMP")) < 400  # brief, whatever the path
    for cmd in ("finetune", "evaluate", "sweep"):
        assert "text:FILE" in " ".join(invoke(cmd, "--help").stdout.split())


def test_a_wrong_teacher_is_named_as_such(folders, sentences, tmp_path):  # noqa: F811
    run_json("convert", folders / "bert", "-D", "2", "-o", tmp_path / "c.safetensors")
    assert invoke("train", "--arch", "fc2", "--epochs", "1", "-o", tmp_path / "fc2.safetensors").exit_code == 0
    for student, teacher, data in ((tmp_path / "c.safetensors", tmp_path / "fc2.safetensors", ["--data", f"text:{sentences}"]),
                                   (tmp_path / "fc2.safetensors", folders / "bert", [])):  # fmt: skip
        line = _one_error_line(invoke("finetune", student, "--distill-from", teacher, *data, "-o", tmp_path / "ft.safetensors"))
        assert "does not match the student" in line and "text model" in line and "damaged" not in line
    assert not (tmp_path / "ft.safetensors").exists()


# ----------------------------------------------------------------------------- 6. tame first steps


def test_a_short_distillation_warms_up_over_its_first_steps():
    c = DistillConfig(lr=1e-3, warmup=0.06)
    assert lr_at(c, 0, 21) == pytest.approx(1e-3 / 10.5)  # 21 steps: half of them warm up, not 1.26
    assert lr_at(c, 0, 1000) == pytest.approx(1e-3 / 60) and lr_at(c, 59, 1000) == pytest.approx(1e-3)
    assert lr_at(c, 0, 200) == pytest.approx(1e-3 / MIN_WARMUP_STEPS)
    assert lr_at(DistillConfig(lr=1e-3, warmup=0.0, schedule="constant"), 0, 21) == 1e-3


# ----------------------------------------------------------------------------- 8. export


def test_a_sentence_transformers_export_loads_in_sentence_transformers_normalized(folders, tmp_path):  # noqa: F811
    import sentence_transformers as st  # in the test extra
    src = tmp_path / "st"
    import shutil

    shutil.copytree(folders / "bert", src)
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))  # fmt: skip
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (src / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    run_json("convert", src, "-D", "4", "-o", tmp_path / "c.safetensors")
    rep = run_json("export", tmp_path / "c.safetensors", "--format", "hf", "-o", tmp_path / "out")
    assert rep["factorized"] is False and run_json("export", tmp_path / "c.safetensors", "--format", "pt2", "-o", tmp_path / "o.pt2")["factorized"]
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_bytes() == (src / "1_Pooling" / "config.json").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    for p in (tmp_path / "out").rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~umask, p
    sentences_ = ["the model is a model .", "w1 w2 w3 the"]
    got = st.SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(sentences_, convert_to_tensor=True)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)  # the Normalize module came along
    model = load(tmp_path / "c.safetensors")
    from mpocompress.io.hf import decode_tokenizer_files, load_tokenizer

    tok = load_tokenizer(decode_tokenizer_files(model.mpocompress_tokenizer, "m"), "m")
    x = tok(sentences_, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**x)[0]
    m = x["attention_mask"].unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1)
    assert torch.allclose(got, torch.nn.functional.normalize(mean, dim=-1), atol=1e-4)  # pooled as the model computes


# ----------------------------------------------------------------------------- 9. markup, 10. logs


def test_messages_are_printed_as_they_are_never_read_as_markup(folders, tmp_path):  # noqa: F811
    sources = [p for p in (ROOT / "mpocompress").rglob("*.py") if "Console(" in p.read_text()]
    for p in sources:
        for call in re.findall(r"Console\((.*)\)", p.read_text()):
            assert "markup=False" in call or "file=" in call, f"{p.name}: a console that reads markup: Console({call})"
    import io

    from rich.console import Console

    from mpocompress.cli.render import make_console

    buf = io.StringIO()
    console = make_console()
    console.file = buf
    console.print("note: pip install -e '.[plot]' and [bold]x[/bold]")
    assert "pip install -e '.[plot]' and [bold]x[/bold]" in buf.getvalue()
    assert isinstance(console, Console)


def test_a_log_gets_plain_progress_lines(folders, sentences, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(rendering, "PLAIN_AFTER_S", 0.0)
    monkeypatch.setattr(rendering, "PLAIN_EVERY_S", 0.0)
    r = invoke("convert", folders / "bert", "--calib", f"text:{sentences}", "--target-params", "0.8", "-o", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.output
    assert "factorizing (calibrating, sizing the layers): calibration pass 1/" in r.stderr
    assert re.search(r"factorizing \(calibrating, sizing the layers\): done in \d+ s", r.stderr)
    r = invoke("finetune", tmp_path / "c.safetensors", "--distill-from", folders / "bert", "--data", f"text:{sentences}",
               "--epochs", "1", "-o", tmp_path / "ft.safetensors")  # fmt: skip
    assert r.exit_code == 0, r.output
    steps = [ln for ln in r.stderr.splitlines() if re.match(r"seed 0 epoch 1/1 step \d+/\d+: loss ", ln)]
    assert steps and not any("acc" in ln for ln in steps)  # a label-free run shows what it optimizes


# ----------------------------------------------------------------------------- 11. docs/cli.md


def test_the_cli_reference_is_current_and_every_command_shows_an_example():
    from mpocompress.cli.reference import cli_reference

    text = (ROOT / "docs" / "cli.md").read_text()
    assert text == cli_reference(), "docs/cli.md is stale: run python -m mpocompress.cli.reference > docs/cli.md"
    for cmd in ("analyze", "convert", "evaluate", "export", "finetune", "sweep", "train"):
        section = text.split(f"## `mpocompress {cmd}`")[1].split("\n## ")[0]
        assert "Examples:" in section and f"mpocompress {cmd} " in section.split("```bash")[1]
        assert "Examples:" in invoke(cmd, "--help").stdout


def test_the_readme_python_example_for_a_hugging_face_model_runs(folders, sentences, tmp_path):  # noqa: F811
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_api.py"), str(folders / "bert"), str(sentences),
                        str(tmp_path / "small.safetensors")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "budget: remove 50% of the selected layers'" in r.stdout
    small = load(tmp_path / "small.safetensors")
    assert f"{sum(p.numel() for p in small.parameters()):,} parameters" in r.stdout
    assert (ROOT / "examples" / "hf_api.py").read_text().split('"""', 2)[2].strip() in (ROOT / "README.md").read_text()


def test_every_command_holds_out_the_same_lines_whatever_max_samples(tmp_path):
    """The held-out lines of a short run are held out of the full one too (and the other way round):
    a heal on --max-samples N is never measured on lines it trained on."""
    from mpocompress.io.data.unlabelled import load_unlabelled

    class LineNumbers:  # a tokenizer that reads each line as its own number: rows name their lines
        pad_token = "0"

        def __call__(self, texts, **kw):
            ids = torch.tensor([[int(t)] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    text = tmp_path / "lines.txt"
    text.write_text("".join(f"{i}\n" for i in range(1, 401)))

    def rows(split, limit=None):
        return set(load_unlabelled(f"text:{text}", split, LineNumbers(), 8, limit=limit).inputs["input_ids"][:, 0].tolist())

    full_train, full_test = rows("train"), rows("test")
    assert len(full_test) == 80 and not (full_train & full_test)
    for limit in (10, 100, 250):
        train, test = rows("train", limit), rows("test", limit)
        assert train <= full_train and test <= full_test
        assert (len(train), len(test)) == (round(0.8 * limit), limit - round(0.8 * limit))


# ----------------------------------------------------------------------------- 4. analyze on a transformer


def test_analyze_of_a_transformer_groups_its_blocks_and_reads_at_80_columns():
    import io

    import transformers
    from rich.console import Console

    from mpocompress import CompressionConfig, analyze
    from mpocompress.cli.render import render_report

    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64)  # fmt: skip
    report = analyze(transformers.BertModel(cfg).eval(), CompressionConfig())  # no options: the exact MPOs and the D sweep
    assert len(report.layers) == 36 and report.sweep
    buf = io.StringIO()
    render_report(Console(file=buf, width=80, force_terminal=False, color_system=None), report, "heading")
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "encoder.layer.{0-5}.intermediate.dense" in text and "D=32" in text  # (longer names lose their start)
    rows = [ln for ln in text.splitlines() if "intermediate.dense" in ln]
    assert len(rows) == 2  # one row in the candidates' table, one in the errors' table, for all six blocks
    worst = max(lr.rel_error for s in report.sweep if s.bond_dim == 4 for lr in s.layers if "intermediate.dense" in lr.name)
    assert f"{worst:.3g}" in rows[1].split()  # the group's largest error at D=4
