"""Exporting a (compressed) model for use without mpocompress: a Hugging Face folder with dense
weights, an ONNX file, or a `torch.export` program. Each export is checked after writing: its
outputs must agree with the model's on a probe batch (relative error <= 1e-4), or nothing is left
at the output path.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpocompress.compress import converter_for
from mpocompress.errors import MPOCompressError
from mpocompress.io.hf import decode_tokenizer_files, quiet_transformers, save_pretrained_quietly, write_files
from mpocompress.io.paths import staged_output
from mpocompress.models.hf import build_hf, hf_config_json, probe_inputs, transformers_module
from mpocompress.nn import FactorizedLayer
from mpocompress.utils import batch_to, call_with, is_causal_lm, is_hf_model, main_output, short_error

CPU = torch.device("cpu")

FORMATS = ("hf", "onnx", "pt2")
TOLERANCE = 1e-4
ONNX_HINT = "install the ONNX extra: pip install -e '.[onnx]' (onnx, onnxscript, onnxruntime)"


@dataclass
class ExportReport:
    """What an export wrote and how closely it agrees with the model."""

    output: str
    format: str
    rel_error: float  # ||export(probe) - model(probe)|| / ||model(probe)|| on the probe batch
    probe_shapes: dict[str, list[int]]
    params: int  # parameters of the exported model (dense for hf)
    dynamic: bool  # batch (and sequence) sizes free; False: fixed to the probe's shapes

    @property
    def factorized(self) -> bool:
        """Whether the factorized layers stay factorized (onnx, pt2: the size and speed gain kept);
        hf multiplies them out into dense weights (the original's size)."""
        return self.format != "hf"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "factorized": self.factorized}


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        return math.inf
    denom = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(a - ref)) / (denom if denom > 0 else 1.0)


def probe_for(model: nn.Module, input_shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """The probe batch: token inputs for a transformers model, else two random samples of
    `input_shape` (one sample's shape, e.g. (1, 28, 28))."""
    if is_hf_model(model):
        return probe_inputs(model)
    if input_shape is None:
        raise MPOCompressError("cannot tell the shape of one input for the probe batch; pass --input-shape C,H,W (or F)")
    g = torch.Generator().manual_seed(0)
    param = next(model.parameters(), None)
    return {"x": torch.randn(2, *input_shape, generator=g, dtype=param.dtype if param is not None else torch.float32)}


def _call(model: Callable[..., Any], probe: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return main_output(call_with(model, probe))


PROBE_ACTIVATION_CAP = 4 << 30  # bytes of module outputs a probe batch may produce (a bound on its peak memory)


def probe_activation_bytes(model: nn.Module, probe: Mapping[str, torch.Tensor]) -> int:
    """Bytes of every module's output on the probe batch, found on the meta device (nothing is
    allocated): an upper bound on what the probe's forward pass holds at once. Where the meta run
    stops early (an op without a meta kernel, a shape the model does not take), the bytes up to
    there: what a real run would allocate before it stops as well."""
    from torch.func import functional_call

    total = 0

    def count(_m: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    meta = {n: torch.empty_like(t, device="meta") for n, t in [*model.named_parameters(), *model.named_buffers()]}
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    # an op without a meta kernel, or a shape the model does not take, stops the meta run: the real run names it
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            functional_call(model, meta, kwargs={k: v.to("meta") for k, v in probe.items()})
    finally:
        for h in hooks:
            h.remove()
    return total


def _reference_output(model: nn.Module, probe: Mapping[str, torch.Tensor], input_shape: tuple[int, ...] | None) -> torch.Tensor:
    """The model's output on the probe batch, with a probe it cannot take, or one too large to run, named."""
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in probe.items())
    if input_shape is not None and not is_hf_model(model):
        need = probe_activation_bytes(model, probe)
        if need > PROBE_ACTIVATION_CAP:
            raise MPOCompressError(
                f"the probe batch ({shapes}) would need about {need / 2**30:.1f} GiB of activations, over the "
                f"{PROBE_ACTIVATION_CAP / 2**30:.0f} GiB allowed; give the --input-shape the model was trained on"
            )
    try:
        return _call(model, probe)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        hint = "give the --input-shape of one sample the model takes" if not is_hf_model(model) else "the model cannot run"
        raise MPOCompressError(f"the model does not run on the probe batch ({shapes}: {short_error(e)}); {hint}") from None


def _check(rel: float, fmt: str) -> None:
    if not rel <= TOLERANCE:
        raise MPOCompressError(
            f"the {fmt} export does not reproduce the model: relative output error {rel:.3g} on the probe batch "
            f"(allowed {TOLERANCE:g}); nothing was written"
        )


# --------------------------------------------------------------------------- formats


def dense_hf_model(model: nn.Module, arch: str) -> nn.Module:
    """A plain transformers model computing what `model` computes: the same config, every factorized
    layer multiplied out into the dense module it replaced (in that module's own weight layout)."""
    dense = build_hf(hf_config_json(model), arch)
    state = model.state_dict()
    mpo_prefixes = []
    seen: set[int] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, FactorizedLayer):
            mpo_prefixes.append(name + ".")  # a table serving a tied head too is multiplied out once
            if id(m) in seen:
                continue
            seen.add(id(m))
            target = dense.get_submodule(name)
            conv = converter_for(target)
            if conv is None:
                raise MPOCompressError(f"cannot multiply out {name}: the dense model has a {type(target).__name__} there")
            conv.set_dense(target, m.weight_matrix().detach())
            if m.bias is not None:
                with torch.no_grad():
                    target.bias.copy_(m.bias)
    rest = {k: v for k, v in state.items() if not any(k.startswith(p) for p in mpo_prefixes)}
    missing, unexpected = dense.load_state_dict(rest, strict=False)
    expected_missing = {k for k in dense.state_dict() if any(k.startswith(p) for p in mpo_prefixes)}
    if set(unexpected) or set(missing) - expected_missing:
        raise MPOCompressError(f"the model's weights do not fit its Hugging Face class: missing {sorted(set(missing) - expected_missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if hasattr(dense, "tie_weights"):
        dense.tie_weights()
    return dense.eval()


def _export_hf(model: nn.Module, arch: str, out: Path, probe: Mapping[str, torch.Tensor], ref: torch.Tensor) -> tuple[float, int, bool]:
    if not arch.startswith("hf:"):
        raise MPOCompressError(
            f"--format hf writes a Hugging Face folder, but this model is {arch}; use --format onnx or pt2"
        )
    dense = dense_hf_model(model, arch)
    tokenizer = getattr(model, "mpocompress_tokenizer", None)
    with staged_output(out, is_dir=True) as tmp:
        save_pretrained_quietly(dense, tmp)
        if tokenizer:
            write_files(tmp, decode_tokenizer_files(tokenizer, "the model"))
        transformers = transformers_module()
        cls = getattr(transformers, arch[3:])
        with quiet_transformers():
            back = cls.from_pretrained(str(tmp), local_files_only=True).eval()
        rel = relative_error(_call(back, probe), ref)
        _check(rel, "hf")
    return rel, sum(p.numel() for p in dense.parameters()), True


def _export_traced(
    model: nn.Module, out: Path, probe: Mapping[str, torch.Tensor], ref: torch.Tensor, fmt: str, what: str,
    write: Callable[[nn.Module, tuple[torch.Tensor, ...], list[str], Path, Any], None],
    run: Callable[[Path], torch.Tensor], device: torch.device = CPU,
) -> tuple[float, int, bool]:  # fmt: skip
    """The ONNX and torch.export paths: the model called positionally in the probe's order (traced
    on `device`), written with batch (and sequence) sizes free where its code allows (`write(wrapper,
    args, names, path, shapes)`), then run from the file on the probe in CPU memory (`run(path)`) and
    checked."""
    names = list(probe)
    wrapper = _Positional(model, names).eval()  # a fresh module is in training mode: dropout on
    dims = _dynamic_dims(model)
    args = tuple(v.to(device) for v in probe.values())
    with staged_output(out, is_dir=False) as tmp:
        try:
            dynamic = _dynamic_or_static(lambda shapes: write(wrapper, args, names, tmp, shapes), (tuple(dims for _ in names),))
        except MPOCompressError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters raise many kinds
            raise MPOCompressError(f"{what} failed on this model ({short_error(e)})") from None
        try:
            got = run(tmp)
        except Exception as e:  # noqa: BLE001 - runtimes raise their own kinds (onnxruntime's NotImplemented, ...)
            dtype = next((p.dtype for p in model.parameters()), torch.float32)
            low = fmt == "onnx" and dtype in (torch.bfloat16, torch.float16)
            hint = f"its CPU kernels do not cover {str(dtype).removeprefix('torch.')}: export with --dtype float32" if low else "report this with the model"
            runner = "onnxruntime" if fmt == "onnx" else "torch.export"
            raise MPOCompressError(f"{runner} cannot run the export to check it ({short_error(e)}); {hint}; nothing was written") from None
        rel = relative_error(got, ref)
        _check(rel, fmt)
    return rel, sum(p.numel() for p in model.parameters()), dynamic


def _export_onnx(model: nn.Module, out: Path, probe: Mapping[str, torch.Tensor], ref: torch.Tensor, device: torch.device = CPU) -> tuple[float, int, bool]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise MPOCompressError(f"--format onnx needs onnxruntime to check the export; {ONNX_HINT}") from None

    def write(wrapper: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], path: Path, shapes: Any) -> None:
        output = "logits" if is_causal_lm(model) else "output"  # a causal LM's next-token logits, as ONNX runtimes for LLMs name them
        torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=[output], dynamic_shapes=shapes,
                          dynamo=True, external_data=False)  # fmt: skip

    def run(path: Path) -> torch.Tensor:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {n: v.numpy() for n, v in probe.items()})[0])

    return _export_traced(model, out, probe, ref, "onnx", "the ONNX exporter", write, run, device)


def _export_pt2(model: nn.Module, out: Path, probe: Mapping[str, torch.Tensor], ref: torch.Tensor, device: torch.device = CPU) -> tuple[float, int, bool]:
    def write(wrapper: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], path: Path, shapes: Any) -> None:
        program = torch.export.export(wrapper, args, dynamic_shapes=shapes)
        if device.type != "cpu":  # a program holds its tensors where it was traced: saved from the CPU, it loads anywhere
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cpu")
        torch.export.save(program, str(path))

    def run(path: Path) -> torch.Tensor:
        with torch.no_grad():
            return torch.export.load(str(path)).module()(*probe.values())

    return _export_traced(model, out, probe, ref, "pt2", "torch.export", write, run, device)


def _dynamic_or_static(export: Callable[[Any], None], shapes: Any) -> bool:
    """export(shapes), with batch (and sequence) sizes left free; a model whose code pins them is
    exported for the probe's shapes instead (export(None)). Returns whether the export is dynamic."""
    with _quiet_exporters():
        try:
            export(shapes)
            return True
        except Exception:  # noqa: BLE001 - the exporters raise many kinds for a shape they cannot keep free
            export(None)
            return False


def _dynamic_dims(model: nn.Module) -> dict[int, Any]:
    """torch.export dimensions: the batch, and for a text model the sequence up to its positions."""
    dims = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
    if is_hf_model(model):
        cfg = model.config
        longest = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 512)
        dims[1] = torch.export.Dim("sequence", min=2, max=longest)
    return dims


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' warnings, log lines and prints stay off the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _Positional(nn.Module):
    """The model called with positional tensors in the probe's order, returning its main output."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return main_output(call_with(self.model, dict(zip(self.names, args))))


def export_model(
    model: nn.Module, out: Path, fmt: str, arch: str | None, input_shape: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
) -> ExportReport:  # fmt: skip
    """Write `model` to `out` in format `fmt` (hf, onnx or pt2) and check the result against it.

    `device`: where the model runs the probe batch and is traced (the model is moved there and back
    to where it was). What is written never depends on it: a Hugging Face folder's weights and an
    ONNX file's initializers are plain data, and a pt2 program traced on a GPU is moved to the CPU
    before it is saved; every check runs the written file on the CPU against the model's output."""
    if fmt not in FORMATS:
        raise MPOCompressError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    was_training = model.training
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    model.eval()
    try:
        if device != home:
            model.to(device)
        return _export(model, out, fmt, arch, input_shape, device)
    finally:
        if device != home:
            model.to(home)
        model.train(was_training)


def _export(model: nn.Module, out: Path, fmt: str, arch: str | None, input_shape: tuple[int, ...] | None, device: torch.device) -> ExportReport:
    probe = probe_for(model, input_shape)  # in CPU memory: what the written file is checked on
    ref = _reference_output(model, batch_to(probe, device), input_shape).cpu()
    if fmt == "hf":  # its weights saved from CPU memory
        rel, params, dynamic = _export_hf(model.to(CPU), arch or "", out, probe, ref)
    elif fmt == "onnx":
        rel, params, dynamic = _export_onnx(model, out, probe, ref, device)
    else:
        rel, params, dynamic = _export_pt2(model, out, probe, ref, device)
    return ExportReport(str(out), fmt, rel, {k: list(v.shape) for k, v in probe.items()}, params, dynamic)
