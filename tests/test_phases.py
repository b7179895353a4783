"""benchmarks/phases.py, which the performance notes' phase tables come from: it runs a command in
its own process, and splits the command's time and peak memory by the status messages it reports."""

from benchmark_scripts import benchmark_script
from lm_models import write_folder
from test_lm import _lines

from mpocompress.cli import render


def _phases():
    return benchmark_script("phases")


def test_a_status_message_without_its_numbers_names_its_phase():
    p = _phases()
    assert p.phase_of("calibration pass 3/8") == "calibration pass #"
    assert p.phase_of("weighing the forms of layer 12/211 (model.layers.3.mlp.up_proj)") == (
        "weighing the forms of layer # (model.layers.#.mlp.up_proj)"
    )


def test_a_calibrated_conversion_is_split_into_its_phases(tmp_path, capsys):
    p = _phases()
    folder = write_folder("llama", tmp_path / "llama")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_lines(140)) + "\n")
    before = render.watching
    code = p.main(["convert", str(folder), "--calib", f"text:{text}", "--remove", "0.2", "-o", str(tmp_path / "out.safetensors")])
    assert code == 0 and (tmp_path / "out.safetensors").exists()
    assert render.watching is before  # the CLI's own again
    lines = capsys.readouterr().err.strip().splitlines()
    head = lines.index(next(line for line in lines if line.split() == ["seconds", "peak", "MiB", "phase"]))
    rows = [line.split(None, 2) for line in lines[head + 1 :]]
    phases = {r[2]: (float(r[0]), int(r[1])) for r in rows}
    assert "calibration pass #" in phases and any(k.startswith("weighing the forms of layer #") for k in phases)
    assert rows[-1][2] == "total"
    summed = sum(s for k, (s, _) in phases.items() if k != "total")
    assert abs(phases["total"][0] - summed) <= 0.05 * len(rows)  # every row rounded to 0.1 s
    assert phases["total"][1] == max(m for _, m in phases.values()) > 100  # MiB: the interpreter and torch alone
