"""`mpocompress convert`: factorize the chosen layers (MPO or low-rank, sized by D, eps or a budget), swap them in, save."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

from mpocompress.cli import app
from mpocompress.cli.common import (
    ARCH_OPT,
    BOND_OPT,
    CALIB_DATA_DIR_OPT,
    CALIB_DTYPE_OPT,
    CALIB_OPT,
    CALIB_SAMPLES_OPT,
    COMPUTE_DEVICE_OPT,
    CORES_OPT,
    EPS_OPT,
    EXCLUDE_OPT,
    JSON_OPT,
    LAYERS_OPT,
    MAX_ERROR_OPT,
    MAX_LENGTH_OPT,
    MODEL_ARG,
    OF_OPT,
    OFFLOAD_OPT,
    REMOVE_OPT,
    SEQUENTIAL_OPT,
    SHAPE_OPT,
    SHARD_SIZE_OPT,
    STREAM_OPT,
    STRUCTURE_OPT,
    TARGET_OPT,
    TRUST_OPT,
    TRY_MPO_OPT,
    build_config,
    check_stream_options,
    fail,
    handle_errors,
    parse_shard_size,
    print_json,
    read_calibration,
)  # fmt: skip
from mpocompress.cli.render import make_console, make_err_console, render_report, working
from mpocompress.cli.training import choose_data, takes_text
from mpocompress.compress import compress_
from mpocompress.compress.calibrate import model_output, outputs
from mpocompress.compress.stream import stream_compress_
from mpocompress.errors import MPOCompressError
from mpocompress.io import check_output_path, load_model, save
from mpocompress.io.data.calibration import calibration_batches
from mpocompress.io.stream import DiskStore, block_loader, open_streamed, stream_output
from mpocompress.models.hf import probe_inputs
from mpocompress.train.distributed import dist_env, finish_distributed, init_distributed, resolve_device
from mpocompress.utils import batch_to, is_causal_lm


@app.command()
@handle_errors
def convert(
    model: Path = MODEL_ARG,
    output: Path | None = typer.Option(None, "--output", "-o", metavar="OUT", help="Where to write the compressed model (safetensors). [required]", show_default=False),
    arch: str | None = ARCH_OPT,
    bond_dim: list[str] = BOND_OPT,
    shape: list[str] = SHAPE_OPT,
    layers: list[str] = LAYERS_OPT,
    exclude: list[str] = EXCLUDE_OPT,
    eps: str | None = EPS_OPT,
    cores: str | None = CORES_OPT,
    structure: str = STRUCTURE_OPT,
    target_params: str | None = TARGET_OPT,
    remove: str | None = REMOVE_OPT,
    budget_of: str = OF_OPT,
    max_error: str | None = MAX_ERROR_OPT,
    calib: str | None = CALIB_OPT,
    calib_samples: int | None = CALIB_SAMPLES_OPT,
    sequential: bool = SEQUENTIAL_OPT,
    try_mpo: bool = TRY_MPO_OPT,
    calib_dtype: str = CALIB_DTYPE_OPT,
    max_length: int | None = MAX_LENGTH_OPT,
    data_dir: Path | None = CALIB_DATA_DIR_OPT,
    stream: bool = STREAM_OPT,
    offload: str | None = OFFLOAD_OPT,
    device: str = COMPUTE_DEVICE_OPT,
    shard_size: str | None = SHARD_SIZE_OPT,
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    trust_pickle: bool = TRUST_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Write the chosen layers in factorized form (MPOs or low-rank) and save the model.

    Sizes: --bond-dim D or --eps E for every layer, or --target-params P (and/or --max-error E) for
    the allocator, which picks each layer's structure and size. With --calib the factorizations
    minimize each layer's error on its real inputs. The report's rho is factorized weights / dense
    weights of the converted layers (Eq. 9). The output is safetensors with metadata to
    rebuild the model (one file, or with --shard-size a folder of shards): `mpocompress.load(OUT)`
    returns it. The input file is never modified.

    \b
    Examples:
      mpocompress convert MODEL_DIR --calib text:sentences.txt --remove 0.3 -o small.safetensors
      mpocompress convert runs/fc2.safetensors --bond-dim 8 -o runs/fc2_d8.safetensors
    """
    config = build_config(bond_dim, shape, layers, exclude, eps, cores, structure, target_params, max_error, sequential, remove, budget_of, try_mpo,
                          calib_dtype)  # fmt: skip
    if output is None:
        fail("convert needs an output file: add -o OUT.safetensors")
    if config.bond_dim is None and config.eps is None and not config.bond_dims and not config.allocating:
        fail("convert needs a truncation or a budget: add --bond-dim D (e.g. --bond-dim 4), --eps E, --target-params P (e.g. 0.5) or --remove R (e.g. 0.2); `mpocompress analyze` helps choose")
    if sequential and calib is None:
        fail("--sequential calibrates layer by layer and needs --calib DATA")
    if try_mpo and calib is None:
        fail("--try-mpo compares each MPO with the low-rank form on the layers' real inputs and needs --calib DATA")
    check_stream_options(stream, offload, calib)
    shard_bytes = parse_shard_size(shard_size)
    out = check_output_path(output, force, inputs=(model,), folder=shard_bytes is not None)
    err = make_err_console()
    if not stream and dist_env().distributed:
        fail("convert runs in one process unless it streams: add --stream (a Hugging Face folder), or launch it without torchrun")
    if stream:
        _convert_streamed(err, model, out, arch, config, calib, calib_samples, data_dir, max_length, offload or "cpu", device, json_out,
                          shard_bytes)
        return
    dev = resolve_device(device)
    with working(err, f"loading {model}"):
        loaded = load_model(model, arch, trust_pickle, check_values=False)  # checked per layer and by save
    batches = read_calibration(err, calib, loaded, calib_samples, data_dir, max_length, dev)
    probe, whence = _probe_batch(loaded, calib, data_dir, max_length)
    loaded.model.to(dev)
    probe = batch_to(probe, dev) if probe is not None else None
    try:
        before = _probe_outputs(loaded.model, probe).float() if probe is not None else None
    except MPOCompressError:  # --calib data the model does not run on is named as such; recorded data: no probe
        if calib is not None:
            raise
        probe = before = None
    with working(err, "factorizing" + (" (calibrating, sizing the layers)" if calib or config.allocating else "")):
        report = compress_(loaded.model, config, calibration=batches)
    measured = _probe_change(loaded.model, probe, before, whence) if probe is not None else None
    loaded.model.cpu()  # written from CPU memory
    if measured is not None:
        report.notes.append(f"on its probe ({whence}) the output changed by {measured['output_rel_error']:.3g} (relative), "
                            f"cosine {measured['cosine_mean']:.3f}")  # fmt: skip
    if calib:
        report.notes.append(f"calibrated on {sum(len(next(iter(b.values()))) for b in batches)} samples of {calib}")
    if loaded.arch is None:
        report.notes.append(f"{out} records no architecture (the input was a pickled model): pass --arch when loading it")
    extra = {"source_format": loaded.source, "compression": config.to_dict()}
    if loaded.metadata and loaded.metadata.get("data"):  # the data the original was trained on goes with it
        extra["data"] = loaded.metadata["data"]
    elif calib:  # else the calibration data: what evaluate and finetune default to (its held-out split)
        extra["data"] = choose_data(calib, None, None, None, data_dir=data_dir).record()
    with working(err, f"writing {out}"):
        save(loaded.model, out, loaded.arch, force=force, extra_metadata=extra, shard_size=shard_bytes)
    if measured is not None and measured["cosine_mean"] < PROBE_WARN:
        hint = ("calibrate and budget instead: --calib DATA (text:FILE for a text model) with --target-params P or --remove R"
                if calib is None else "give a larger budget, or heal it: mpocompress finetune OUT --distill-from MODEL")  # fmt: skip
        err.print(f"warning: the converted model keeps little of the original's output: on its probe ({whence}) the mean cosine "
                  f"to the original's is {measured['cosine_mean']:.2f} (this warns below {PROBE_WARN}; relative error "
                  f"{measured['output_rel_error']:.0%}); {hint}", markup=False, highlight=False, soft_wrap=True)  # fmt: skip
    if json_out:
        print_json({"model": str(model), "output": str(out), "arch": loaded.arch, **report.to_dict(), "probe": measured})
    else:
        render_report(make_console(), report, f"{model} -> {out}")


def _convert_streamed(
    err: Any, model: Path, out: Path, arch: str | None, config: Any, calib: str, calib_samples: int | None,
    data_dir: Path | None, max_length: int | None, offload: str, device: str, json_out: bool, shard_size: int | None = None,
) -> None:  # fmt: skip
    """convert --stream: the model's blocks read, compressed and written one at a time. Under torchrun
    each process takes its share of the calibration batches (gloo, on CPU); rank 0 writes and reports."""
    env = dist_env()
    if env.distributed and device == "cuda":
        fail("convert --stream under torchrun shares its statistics through gloo on CPU; give --device cpu (or auto), "
             "or run it as one process for --device cuda")  # fmt: skip
    dev = torch.device("cpu") if env.distributed else resolve_device(device)
    init_distributed(torch.device("cpu"), env)
    with working(err, f"opening {model} (its blocks stay on disk)"):
        loaded, source, blocks = open_streamed(model, arch)
    batches = read_calibration(err, calib, loaded, calib_samples, data_dir, max_length, dev)
    samples = sum(len(next(iter(b.values()))) for b in batches)
    if len(batches) < env.world_size:
        fail(f"{len(batches)} calibration batches cannot be shared by {env.world_size} processes: give more --calib-samples "
             f"(8 per batch for a language model) or fewer processes")  # fmt: skip
    batches = batches[env.rank :: env.world_size]
    extra = {"source_format": loaded.source, "compression": config.to_dict(),
             "data": choose_data(calib, None, None, None, data_dir=data_dir).record()}  # fmt: skip
    with working(err, "streaming the blocks (calibrating, factorizing, writing)"), stream_output(out, env.is_main) as writer:
        store = DiskStore(writer.staging / f"hidden-{env.rank}") if offload == "disk" else None
        report = stream_compress_(loaded.model, config, batches, block_loader(source, loaded.model), writer.write_block, store=store, device=dev)
        report.notes.append(f"calibrated on {samples} samples of {calib}; hidden states between blocks kept "
                            f"{'on disk' if offload == 'disk' else 'in memory'}"
                            + (f"; {env.world_size} processes, each running its share of the batches" if env.distributed else ""))  # fmt: skip
        if env.is_main:
            writer.finish(loaded.model, blocks, loaded.arch, extra, source, shard_size)
    finish_distributed(env)
    if not env.is_main:
        return
    if json_out:
        print_json({"model": str(model), "output": str(out), "arch": loaded.arch, **report.to_dict(), "probe": None})
    else:
        render_report(make_console(), report, f"{model} -> {out}")


PROBE_WARN = 0.8  # convert warns when the mean cosine of its output to the original's on the probe is below this
PROBE_SAMPLES = 32  # held-out samples in the probe (a causal LM: 2 windows)


def _probe_batch(loaded: Any, calib: str | None, data_dir: Path | None, max_length: int | None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Held-out inputs to compare the model before and after: the held-out split of --calib (or of
    the data the file records), else random tokens for a text model; None when there is nothing."""
    spec, served = calib, None
    if spec is None and loaded.metadata and (loaded.metadata.get("data") or {}).get("name"):
        served = loaded.metadata["data"]
        spec = served["name"]
    if spec is not None:
        n = 2 if is_causal_lm(loaded.model) else PROBE_SAMPLES
        try:
            batches = calibration_batches(spec, loaded.model, n, data_dir, max_length, batch_size=n, served=served, split="test")
        except MPOCompressError:
            if calib is not None:
                raise
            batches = []  # the recorded data is gone: no probe from it
        if batches:
            return batches[0], f"{len(next(iter(batches[0].values())))} held-out samples of {spec}"
    if takes_text(loaded.model):
        return probe_inputs(loaded.model, batch=4, length=32), "4 random token sequences"
    return None, ""


PROBE_ROWS = 256  # output rows compared at once in float64 (a causal LM's are vocabulary-wide: 1,024 x 49,152 for SmolLM2)


def _probe_outputs(model: nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output on the probe as it computes it (padding left out), not widened to float64."""
    return outputs(model, [probe], fn=lambda m, b: model_output(m, b, dtype=None))[0]


def _probe_change(model: nn.Module, probe: dict[str, torch.Tensor], before: torch.Tensor, whence: str) -> dict[str, Any]:
    """How much the model's main output moved on the probe: relative error and mean cosine over its
    rows (a sample's output, or a real token's: `outputs` leaves padding out), in float64 PROBE_ROWS
    rows at a time (whole float64 copies of SmolLM2's probe logits were the conversion's peak: 1.4 GB)."""
    after = _probe_outputs(model, probe)
    a, b = after.reshape(-1, after.shape[-1]), before.reshape(-1, before.shape[-1])
    if a.shape != b.shape:
        return {"inputs": whence, "output_rel_error": math.inf, "cosine_mean": 0.0}
    diff = ref = cos = 0.0
    for x, y in zip(a.split(PROBE_ROWS), b.split(PROBE_ROWS)):
        x, y = x.double(), y.double()
        diff += float((x - y).square().sum())
        ref += float(y.square().sum())
        cos += float(torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-30).sum())
    return {"inputs": whence, "output_rel_error": math.sqrt(diff) / (math.sqrt(ref) if ref > 0 else 1.0),
            "cosine_mean": cos / max(a.shape[0], 1)}  # fmt: skip
