"""Calibration: what the selected layers see on real data, and what an error in each costs at the
model's output.

`collect_grams` runs the model over calibration batches once, with a hook on every selected layer
that adds the Gram matrix X^T X of the layer's input vectors (a conv: of its unfolded patches) into
float64 sums (the products in float32 on mean-shifted rows, `_gram_of`), so memory is O(sum N_x^2)
whatever the number of samples. Padding tokens (where a batch's attention_mask is 0) are left out.

A layer's sensitivity is the mean squared change of the model's main output per unit of error
energy in that layer's output: the factor that turns a layer's output error into an error at the
model's output (the allocator's currency). `gradient_sensitivity` estimates it for every layer at
once from one backward pass per micro-batch (the squared gradient of a random projection of the
output at every layer's output, Hutchinson's estimate of ||J||_F^2). `measure_sensitivity`, one
noisy forward pass per layer, is what it replaced; it stays for models whose output has no
gradient, and as the reference the estimate is checked against (benchmarks/sensitivity.py).

For a causal language model the output is measured in the currency of next-token KL divergence
(`HeadFisher`): the final hidden state times a square root of the LM head's Fisher information,
averaged over calibration tokens, so a squared change is (to second order) twice the KL between
the next-token distributions; the 49k-wide logits are never kept.

The passes' matrix products may run in bfloat16 (`pass_precision`, `--calib-dtype`): autocast
around the model's own call only, so every statistic the hooks gather, and every product of ours,
stays in float32/float64; the layers' inputs a bfloat16 product made are widened before they are
summed.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mpocompress.compress.config import CALIB_DTYPES
from mpocompress.compress.registry import Converter, converter_for
from mpocompress.errors import MPOCompressError, is_out_of_memory
from mpocompress.utils import call_with, main_output, set_module, status

Batch = Mapping[str, torch.Tensor]
NOISE = 0.05  # probe noise, as a share of the layer's output RMS


@dataclass
class Calibration:
    """Per selected layer (by name): the Gram matrix of its inputs (float64; for an embedding its
    diagonal, the token counts), how many input vectors it summed, and the output-error
    sensitivity (None until measured)."""

    grams: dict[str, torch.Tensor]
    rows: dict[str, int]
    samples: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of the input vectors (float64)
    sensitivity: dict[str, float] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)  # layers in call order, grouped when they share one input tensor


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once every needed input was seen."""


def _row_mask(batch: Batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, ...) without padded positions when the mask fits its leading dims."""
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x


_PASS_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("pass_dtype", default=None)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports it, or
    an x86 CPU with AVX512-BF16 or AMX (there oneDNN's bfloat16 GEMMs run about 4x float32's)."""
    if device.type == "cuda":  # not an older GPU that only emulates it (a T4: compute capability 7.5)
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = torch.cpu
        return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def resolve_pass_dtype(choice: str, model: nn.Module) -> torch.dtype | None:
    """The dtype of the calibration passes' matrix products for --calib-dtype `choice` (None: the
    model's own). A float32 model on a device with native bfloat16 runs them in bfloat16 under
    "auto"; a model in another dtype always runs in its own."""
    if choice not in CALIB_DTYPES:
        raise MPOCompressError(f"unknown calibration dtype {choice!r}; choose {', '.join(CALIB_DTYPES)}")
    p = next(model.parameters(), None)
    if choice == "float32" or p is None or p.dtype != torch.float32:
        return None
    return torch.bfloat16 if choice == "bfloat16" or native_bf16(p.device) else None


def precision_note(dtype: torch.dtype, asked: str) -> str:
    """What the report says when the calibration passes ran narrower than the model."""
    why = "this device multiplies it natively" if asked == "auto" else "--calib-dtype"
    return (f"the calibration passes multiplied in {str(dtype).removeprefix('torch.')} ({why}); the statistics and the "
            "factorizations are float32/float64 (--calib-dtype float32 for passes in float32)")


@contextlib.contextmanager
def pass_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, the model's calibration passes (`_run`) run under autocast to `dtype`
    (None: as the model is). Autocast covers the model's call only: hooks run without it."""
    token = _PASS_DTYPE.set(dtype)
    try:
        yield
    finally:
        _PASS_DTYPE.reset(token)


@contextlib.contextmanager
def calibration_passes(choice: str, model: nn.Module, notes: list[str], calibrated: bool = True) -> Iterator[None]:
    """Within the block, the calibration passes over `model` in the precision --calib-dtype `choice`
    resolves to (`resolve_pass_dtype`; none without calibration), and after it, the report's note on
    `notes` when that is narrower than the model."""
    narrow = resolve_pass_dtype(choice, model) if calibrated else None
    with pass_precision(narrow):
        yield
    if narrow is not None:
        notes.append(precision_note(narrow, choice))


def _widened(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 when the pass's narrow products made it narrow (what the hooks, the kept hidden
    states and the statistics see), else itself."""
    narrow = _PASS_DTYPE.get()
    return t.float() if narrow is not None and t.dtype == narrow else t


def _autocast(model: nn.Module) -> contextlib.AbstractContextManager:
    dtype = _PASS_DTYPE.get()
    if dtype is None:
        return contextlib.nullcontext()
    p = next(model.parameters(), None)
    return torch.autocast(p.device.type if p is not None else "cpu", dtype=dtype)


@contextlib.contextmanager
def _input_hooks(modules: Mapping[str, nn.Module], fn: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """fn(name, module, input) on every call of the named modules, for the block's duration. Under
    a bfloat16 pass, fn runs without autocast and gets the input widened to float32 (one tensor
    widened once, so layers reading one input still get one tensor)."""
    narrow = _PASS_DTYPE.get()
    widened: list = [None, None]

    def call(name: str, mod: nn.Module, x: torch.Tensor) -> None:
        if narrow is None:
            fn(name, mod, x)
            return
        if widened[0] is not x:
            widened[:] = [x, _widened(x)]
        with torch.autocast(x.device.type, enabled=False):
            fn(name, mod, widened[1])

    handles = [mod.register_forward_pre_hook(lambda m, args, n=name: call(n, m, args[0])) for name, mod in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, batch: Batch) -> object:
    try:
        with _autocast(model):
            return call_with(model, batch)
    except _Stop:
        return None
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        if is_out_of_memory(e):
            raise
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor))
        raise MPOCompressError(f"the model does not run on the calibration data ({shapes}: {str(e).splitlines()[0] if str(e) else type(e).__name__}); give --calib data this model takes") from None


GRAM_BLOCK = 1024  # rows of one float32 product in `_gram_of`
GRAM_STRIP = 256  # columns of one strip of the Gram's upper triangle
FAST_GRAMS = True  # float32 products of mean-shifted row blocks, summed in float64 (else float64 products)


SUM_BLOCK = 1 << 20  # numbers of one block of `_column_sums` (8 MB in float64)


def _column_sums(x: torch.Tensor) -> torch.Tensor:
    """x.sum(0) in float64, a block of rows (SUM_BLOCK numbers) at a time. torch's float64 sum over
    the rows of a whole float32 matrix is 5-10x slower than the same sum over blocks that stay in
    cache (140 ms against 16 ms for 32,768 x 1,536 here, 38 ms against 3 ms for 256 next-token
    distributions over a 49,152-token vocabulary); each block is summed in float64 as before."""
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    step = max(1, SUM_BLOCK // max(x.shape[1], 1))
    for s in range(0, x.shape[0], step):
        out += x[s : s + step].double().sum(0)
    return out


def _strips(width: int) -> list[int]:
    n = max(1, round(width / GRAM_STRIP))
    return [round(i * width / n) for i in range(n + 1)]


def _gram_of(
    vecs: torch.Tensor, into: tuple[torch.Tensor, torch.Tensor] | None = None, row_sum: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """X^T X and the row sum of one batch's input vectors in float64, added to `into` (a Gram and a
    sum being accumulated) when given, so no second matrix of the input's width is made.

    The rows are shifted by their mean m first, X^T X = D^T D + m s^T + s m^T - n m m^T with D = X - m
    and s the row sum (float64), and D^T D is made in float32, GRAM_BLOCK rows at a time, each
    block's product added into the float64 sum: the rounding is then relative to the spread of the
    inputs about their mean, not to their raw second moment (post-ReLU and pixel inputs sit far from
    zero, and whitening centres the Gram: unshifted float32 products lost the small eigenvalues
    there, and the allocator then lost to uniform ranks on the digits MLP). Each entry's error is at
    most GRAM_BLOCK * 2^-24 * sum_r |d_ri||d_rj| (Higham's bound for dot products of that length, 6e-5
    of that sum); tests bound every whitened squared error's change on such inputs. Only the upper
    triangle is multiplied, in strips of GRAM_STRIP columns, and mirrored: about half the work for a
    wide input (a convolution's 4,608-wide patches). Inputs in float64 keep float64 products.
    `row_sum`: `_column_sums(vecs)`, when the caller has it."""
    width = vecs.shape[1]
    if into is None:
        into = (torch.zeros(width, width, dtype=torch.float64, device=vecs.device), torch.zeros(width, dtype=torch.float64, device=vecs.device))
    g, total = into
    n = int(vecs.shape[0])
    if not FAST_GRAMS or vecs.dtype == torch.float64:
        step = max(1, (1 << 22) // max(width, 1))
        for s in range(0, n, step):
            v = vecs[s : s + step].to(torch.float64)
            g.addmm_(v.T, v)
            total += v.sum(0)
        return g, total, n
    row_sum = _column_sums(vecs) if row_sum is None else row_sum
    mean = (row_sum / max(n, 1)).float()
    edges = _strips(width)
    for s in range(0, n, GRAM_BLOCK):
        d = vecs[s : s + GRAM_BLOCK].float() - mean
        for a, b in itertools.pairwise(edges):
            g[a:b, a:] += d[:, a:b].T @ d[:, a:]
    m = mean.double()
    g.addr_(m, row_sum).addr_(row_sum, m).addr_(m, m, alpha=-n)
    for a, b in itertools.pairwise(edges):  # the lower triangle from the upper: symmetric to the bit
        g[b:, a:b] = g[a:b, b:].T
        if b - a > 1:
            block = g[a:b, a:b]
            block.copy_(block.triu() + block.triu(1).T)
    total += row_sum
    return g, total, n


def _product_of(a: torch.Tensor, b: torch.Tensor, a_sum: torch.Tensor, b_sum: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """`into` += A^T B (float64) for row-matched A and B, as `_gram_of` makes X^T X: with m_a, m_b
    the row means, A^T B = D_a^T D_b + m_a s_b^T + s_a m_b^T - n m_a m_b^T (D the rows less their
    mean, s the float64 row sums `a_sum`, `b_sum`), and D_a^T D_b made in float32, GRAM_BLOCK rows
    at a time, each block's product added into the float64 sum. Each entry's error is at most
    GRAM_BLOCK * 2^-24 * sum_r |d_ari||d_brj|. Float64 inputs keep float64 products."""
    n = int(a.shape[0])
    if not FAST_GRAMS or a.dtype == torch.float64 or b.dtype == torch.float64:
        step = max(1, (1 << 22) // max(a.shape[1], b.shape[1], 1))
        for s in range(0, n, step):
            into.addmm_(a[s : s + step].to(torch.float64).T, b[s : s + step].to(torch.float64))
        return into
    ma, mb = (a_sum / max(n, 1)).float(), (b_sum / max(n, 1)).float()
    for s in range(0, n, GRAM_BLOCK):
        into += (a[s : s + GRAM_BLOCK].float() - ma).T @ (b[s : s + GRAM_BLOCK].float() - mb)
    ma64, mb64 = ma.double(), mb.double()
    return into.addr_(ma64, b_sum).addr_(a_sum, mb64).addr_(ma64, mb64, alpha=-n)


PATCH_BLOCK = 1 << 24  # numbers of a convolution's unfolded patches made at once (64 MB in float32)


def _gram_of_input(
    conv: Converter, mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, into: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """`_gram_of` the layer's input vectors on `x`. A convolution's are its unfolded patches, made a
    few samples at a time: a whole batch's can be many times the input (3.3M rows x 576 for VGG-16's
    second convolution on 32 images of 320 x 320, 7.6 GB in float32), and the Gram is the same sum."""
    if conv.kind != "conv2d":
        return _gram_of(conv.rows(mod, _real_rows(x, mask) if conv.kind == "linear" else x).detach(), into)
    first = conv.rows(mod, x[:1]).detach()
    per = max(1, PATCH_BLOCK // max(first.numel(), 1))
    g, total, n = _gram_of(first, into)
    del first
    for s in range(1, x.shape[0], per):
        g, total, m = _gram_of(conv.rows(mod, x[s : s + per]).detach(), (g, total))
        n += m
    return g, total, n


class _Changed(Exception):
    """The layers sharing an input were not the same in every batch (see `collect_grams`)."""


@torch.no_grad()
def collect_grams(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Batch], stop_after: set[str] | None = None,
    run: Callable[[int, Batch], object] | None = None,
) -> Calibration:  # fmt: skip
    """X^T X of every named module's inputs over the batches (one pass; a module reachable under
    several names is hooked once, under its first). With `stop_after`, each pass ends as soon as
    those modules have been called. `run(k, batch)` replaces the model's own call on batch k (a
    streamed block runs on the hidden states kept for that batch; the batch still gives the mask
    of its real rows and its sample count).

    Layers called one after another on one input tensor (q/k/v, gate/up) share one Gram matrix
    (the same tensor under each name: not to be changed in place), and each batch's products are
    added straight into it. Should the layers sharing an input differ between batches (a model
    whose calls change with the data), the pass is made again keeping a Gram per layer."""
    try:
        return _collect_grams(model, modules, batches, stop_after, run, share=True)
    except _Changed:
        return _collect_grams(model, modules, batches, stop_after, run, share=False)


def _collect_grams(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Batch], stop_after: set[str] | None,
    run: Callable[[int, Batch], object] | None, share: bool,
) -> Calibration:  # fmt: skip
    unique = _unique(modules)
    grams: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    leader: dict[str, str] = {}  # with `share`: a layer -> the layer whose Gram it shares (itself when it leads)
    mask: torch.Tensor | None = None
    pending: set[str] = set()
    calls: list[tuple[str, int]] = []  # (name, serial of its input) at its first call, in call order
    seen = [None, 0]  # the last hooked input (held) and its serial: consecutive calls on one input share it
    last: list[tuple] = []  # the last Linear input seen (held), the layer that led on it, its Gram (without `share`)
    batch_no = [0]

    def hook(name: str, mod: nn.Module, x: torch.Tensor) -> None:
        if seen[0] is not x:  # identity against the one tensor held: never a freed tensor's reused address
            seen[0], seen[1] = x, seen[1] + 1
        if name not in rows:
            calls.append((name, seen[1]))
        conv = converter_for(mod)
        if conv.kind == "embedding":  # one-hot inputs: X^T X is diagonal, the token counts
            ids = conv.rows(mod, x[mask] if mask is not None and x.shape == mask.shape else x)
            counts = torch.bincount(ids, minlength=conv.dims(mod)[1]).to(torch.float64)
            grams[name] = sums[name] = grams[name] + counts if name in grams else counts
            rows[name] = rows.get(name, 0) + int(ids.numel())
        elif share:
            follows = conv.kind == "linear" and bool(last) and last[0][0] is x
            if follows:  # q/k/v, gate/up: one input, one Gram, added once by the leader
                lead, n = last[0][1], last[0][2]
                if name not in rows and batch_no[0] == 0 and leader.get(lead) == lead:
                    grams[name], sums[name], leader[name] = grams[lead], sums[lead], lead
                elif leader.get(name) != lead:
                    raise _Changed
            else:
                if leader.get(name, name) != name:
                    raise _Changed
                into = (grams[name], sums[name]) if name in grams else None
                grams[name], sums[name], n = _gram_of_input(conv, mod, x, mask, into)
                leader[name] = name
                if conv.kind == "linear":  # the very tensor is held, so no later input can be mistaken for it
                    last[:] = [(x, name, n)]
            rows[name] = rows.get(name, 0) + n
        else:
            if conv.kind == "linear" and last and last[0][0] is x:
                dg, ds, n = last[0][2:]
            else:
                dg, ds, n = _gram_of_input(conv, mod, x, mask)
                if conv.kind == "linear":
                    last[:] = [(x, name, dg, ds, n)]
            if name in grams:
                grams[name] += dg
                sums[name] += ds
            else:
                grams[name], sums[name] = dg.clone(), ds.clone()
            rows[name] = rows.get(name, 0) + n
        pending.discard(name)
        if stop_after is not None and not pending:
            raise _Stop

    was_training = model.training
    model.eval()
    samples = 0
    try:
        with _input_hooks(unique, hook):
            for k, batch in enumerate(batches):
                status(f"calibration pass {k + 1}/{len(batches)}")
                mask = _row_mask(batch)
                pending = set(stop_after) if stop_after is not None else set()
                batch_no[0] = k
                if run is None:
                    _run(model, batch)
                else:
                    try:
                        run(k, batch)
                    except _Stop:
                        pass
                seen[0] = None
                last.clear()
                samples += int(next(iter(batch.values())).shape[0])
                if any(rows.get(n) != rows.get(lead) for n, lead in leader.items()):  # a sharer not called with its leader
                    raise _Changed
    finally:
        model.train(was_training)
    _all_called(unique, grams)
    out = Calibration({}, {}, samples, groups=_grouped(calls))
    for name, mod in modules.items():  # every name, shared modules share their Gram
        first = next(n for n, m in unique.items() if m is mod)
        out.grams[name], out.rows[name], out.sums[name] = grams[first], rows[first], sums[first]
    return out


def _all_called(modules: Mapping[str, nn.Module], called: Collection[str]) -> None:
    """Raise the user's error naming the first module no calibration batch called."""
    missing = [n for n in modules if n not in called]
    if missing:
        raise MPOCompressError(f"layer {missing[0]} is never called on the calibration data; give data that runs through it or --exclude it")


def _grouped(calls: Sequence[tuple[str, int]]) -> list[list[str]]:
    """Layers in call order, (name, serial of its input) at each one's first call, grouped when
    consecutive calls read one input tensor (q/k/v, gate/up)."""
    groups: list[list[str]] = []
    key_of = dict(calls)
    for name, key in calls:
        if groups and key_of[groups[-1][-1]] == key:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _unique(modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The named modules, each hooked once, under its first name."""
    unique: dict[str, nn.Module] = {}
    seen_ids: set[int] = set()
    for name, mod in modules.items():
        if id(mod) not in seen_ids:
            seen_ids.add(id(mod))
            unique[name] = mod
    return unique


@torch.no_grad()
def call_groups(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Batch], run: Callable[[int, Batch], object] | None = None
) -> list[list[str]]:  # fmt: skip
    """`collect_grams(...).groups` without the statistics: the modules in call order, grouped when
    called one after another on one input tensor. Each pass ends once every module has been called,
    and the batches stop there too (one batch, when it calls them all). For a pass that needs only
    the order: a streamed block's refits gather their own statistics, and its Grams over every batch
    went unread (a pass of the block and the products: 81 s of the 287 s compressing sweep in the
    profile of a streamed SmolLM2 at 32,768 calibration tokens, docs/performance.md)."""
    unique = _unique(modules)
    calls: list[tuple[str, int]] = []
    called: set[str] = set()
    seen = [None, 0]

    def hook(name: str, mod: nn.Module, x: torch.Tensor) -> None:
        if seen[0] is not x:
            seen[0], seen[1] = x, seen[1] + 1
        if name not in called:
            called.add(name)
            calls.append((name, seen[1]))
        if len(called) == len(unique):
            raise _Stop

    was_training = model.training
    model.eval()
    try:
        with _input_hooks(unique, hook):
            for k, batch in enumerate(batches):
                try:
                    if run is None:
                        _run(model, batch)
                    else:
                        run(k, batch)
                except _Stop:
                    pass
                seen[0] = None
                if len(called) == len(unique):
                    break
    finally:
        model.train(was_training)
    _all_called(unique, called)
    return _grouped(calls)


@dataclass
class CrossStats:
    """One layer's inputs in the original model (X) and in the partly compressed one (X'), row for
    row, as its refit needs them (`bound_whitening`). Layers that read one input (q/k/v, gate/up)
    share the tensors of their group (`users` counts who still needs each), so a group holds one
    X'^T X' however many layers read it.

    A layer with N_y <= N_x (a down or output projection) keeps its statistics projected on its
    original weight W, never X^T X or X'^T X: `energy` = sum ||W x||^2 and `cross_w` = X'^T X W^T
    (N_x x N_y), which is all the refit of that one W uses (for a 5632-wide down projection, 88 MB in
    place of two matrices of 254 MB)."""

    gram_in: torch.Tensor  # X'^T X'
    sum_in: torch.Tensor  # sum of X''s rows
    total: torch.Tensor  # sum of X's rows
    rows: int
    gram: torch.Tensor | None = None  # X^T X (None when projected)
    cross: torch.Tensor | None = None  # X'^T X (None when projected)
    energy: torch.Tensor | None = None  # sum ||W x||^2, a float64 scalar (projected)
    cross_w: torch.Tensor | None = None  # X'^T X W^T (projected)
    users: dict[str, int] = field(default_factory=dict)  # shared with the group: layers still to take each shared tensor

    def take(self, key: str) -> torch.Tensor:
        """The statistic for this layer to spend (change in place): the group's tensor to its last user,
        a copy to the others."""
        t = getattr(self, key)
        setattr(self, key, None)
        if key not in self.users:
            return t
        self.users[key] -= 1
        return t if self.users[key] == 0 else t.clone()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gram_in, self.sum_in, self.total, self.gram, self.cross, self.energy, self.cross_w) if t is not None]


def projects(weight: torch.Tensor) -> bool:
    """Whether a layer's refit statistics are kept projected on its weight (N_y <= N_x: smaller than X^T X)."""
    return weight.shape[0] <= weight.shape[1]


def _rows_of(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, store: dict, raw: dict, name: str) -> None:
    """Store a hooked layer's input rows (float32, float64 as they come; `_accumulate` sums their
    products in float64); layers of one input tensor share one copy."""
    conv = converter_for(mod)
    if conv.kind == "linear":
        for other, seen in raw.items():
            if seen is x:
                store[name] = store[other]
                return
        raw[name] = x
    rows = conv.rows(mod, _real_rows(x, mask) if conv.kind == "linear" else x).detach()
    store[name] = rows if rows.dtype == torch.float64 else rows.float()


@torch.no_grad()
def collect_cross(
    reference: nn.Module, model: nn.Module, names: Sequence[str], batches: Sequence[Batch]
) -> dict[str, CrossStats]:
    """For the named layers (a group called on one input), the statistics `bound_whitening` needs:
    each batch runs through the original `reference` and through `model`, each pass ending once the
    group has been called."""
    ref_mods = {n: reference.get_submodule(n) for n in names}
    mods = {n: model.get_submodule(n) for n in names}
    weights = {n: _weight(m) for n, m in ref_mods.items()}
    seen: dict[str, torch.Tensor] = {}
    out: dict[str, CrossStats] = {}
    mask: torch.Tensor | None = None
    pending: set[str] = set()

    def grab(store: dict[str, torch.Tensor]):  # noqa: ANN202
        raw: dict[str, torch.Tensor] = {}

        def hook(name: str, mod: nn.Module, x: torch.Tensor) -> None:
            _rows_of(mod, x, mask, store, raw, name)
            pending.discard(name)
            if not pending:
                raise _Stop
        return hook

    states = reference.training, model.training
    reference.eval(), model.eval()
    try:
        for batch in batches:
            mask = _row_mask(batch)
            current: dict[str, torch.Tensor] = {}
            for net, table, store in ((reference, ref_mods, seen), (model, mods, current)):
                pending = set(names)
                with _input_hooks(table, grab(store)):
                    _run(net, batch)
            _accumulate(out, names, seen, current, weights)
            seen.clear()
    finally:
        reference.train(states[0]), model.train(states[1])
    return out


def _weight(mod: nn.Module) -> torch.Tensor:
    """A layer's weight matrix (N_y x N_x), detached."""
    conv = converter_for(mod)
    return conv.weight(mod).detach().reshape(conv.dims(mod))


OutputFn = Callable[[nn.Module, Batch], torch.Tensor]
FISHER_TOKENS = 2048  # calibration tokens the head's averaged Fisher is estimated on, and the tied table's swaps measured on
# (the leading samples: on SmolLM2 the measures on two halves of 4,096 tokens differed by 3-20 %, and the
# allocation from 2,048 was the one from 4,096, in 37 s of swaps against 52)
MICRO_TOKENS = 512  # tokens per backward pass of gradient_sensitivity (SmolLM2: 1.5 GiB of activations above the model, 3.2 at 1,024, the same time)
MICRO_NUMBERS = 1 << 18  # input numbers per backward pass for other inputs (images: 1 of 3 x 320 x 320, 85 of 3 x 32 x 32)


def _accumulate(
    out: dict[str, CrossStats], names: Sequence[str], xs: Mapping[str, torch.Tensor], xps: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
) -> None:  # fmt: skip
    """Add one batch's rows of a group's original inputs (xs) and current inputs (xps), by layer, to
    its statistics; layers whose rows are one tensor on both sides share theirs."""
    for name in names:
        x, xp = xs[name], xps[name]
        if x.shape != xp.shape:
            raise MPOCompressError(f"layer {name} sees inputs of shape {tuple(xp.shape)} after compression, {tuple(x.shape)} before")
    done: set[str] = set()
    for name in names:
        if name in done:
            continue
        group = [n for n in names if n not in done and xs[n] is xs[name] and xps[n] is xps[name]]
        done.update(group)
        x, xp = xs[name], xps[name]
        plain = [n for n in group if not projects(weights[n])]
        if name not in out:
            n, kw = x.shape[1], {"dtype": torch.float64, "device": x.device}
            users = {"gram_in": len(group), **({"gram": len(plain), "cross": len(plain)} if plain else {})}
            gram_in, gram, cross = torch.zeros(n, n, **kw), torch.zeros(n, n, **kw) if plain else None, torch.zeros(n, n, **kw) if plain else None
            sum_in, total = torch.zeros(n, **kw), torch.zeros(n, **kw)
            for m in group:  # one tensor of each kind for the group; the projections per layer
                proj = m not in plain
                out[m] = CrossStats(gram_in, sum_in, total, 0, None if proj else gram, None if proj else cross,
                                    torch.zeros((), **kw) if proj else None,
                                    torch.zeros(n, weights[m].shape[0], **kw) if proj else None, users)  # fmt: skip
        first = out[name]
        s_x, s_xp = _column_sums(x), _column_sums(xp)
        _gram_of(xp, (first.gram_in, first.sum_in), s_xp)
        if plain:
            _gram_of(x, (out[plain[0]].gram, first.total), s_x)
            _product_of(xp, x, s_xp, s_x, out[plain[0]].cross)
        else:
            first.total += s_x
        for m in group:
            out[m].rows += int(x.shape[0])
            if m not in plain:
                y = x @ weights[m].to(x.dtype).T  # the original outputs W x
                s_y = _column_sums(y)
                out[m].energy += sum(float(part.double().square().sum()) for part in y.split(GRAM_BLOCK))
                _product_of(xp, y, s_xp, s_y, out[m].cross_w)


def model_output(model: nn.Module, batch: Batch, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """The model's main output on a batch in float64 (with `dtype` None: as the model made it),
    padding positions left out (gradients kept)."""
    y = main_output(_run(model, batch))
    y = y.to(dtype) if dtype is not None else y
    return _real_rows(y, _row_mask(batch)) if y.dim() >= 3 else y


def _output(model: nn.Module, batch: Batch, fn: OutputFn | None = None) -> torch.Tensor:
    if fn is not None:
        return fn(model, batch).detach()
    return model_output(model, batch).detach()


FISHER_CHUNK = 256  # tokens whose next-token distributions are held at once


@torch.no_grad()
def head_fisher(head: nn.Linear, h: torch.Tensor, reduce: Callable[[list[torch.Tensor]], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A square root of the LM head's Fisher information averaged over the tokens whose final hidden
    states are the rows of `h`, F = mean_t E^T (diag p_t - p_t p_t^T) E (E the head's weight, p_t
    the next-token distribution), as `root` with F = root root^T, and the mean next-token
    distribution. The distributions are made FISHER_CHUNK tokens at a time (a vocabulary-wide row
    each), and F from two sums over tokens, which `reduce` (an all-reduce) may sum over processes
    before they are used."""
    weight = head.weight.detach().to(h.device).float()
    bias = head.bias.detach().to(h.device).float() if head.bias is not None else None
    sum_p = torch.zeros(weight.shape[0], dtype=torch.float64, device=h.device)
    mm = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=h.device)
    for chunk in h.split(FISHER_CHUNK):
        logits = chunk.float() @ weight.T
        if bias is not None:
            logits = logits + bias
        p = torch.softmax(logits, -1)
        del logits
        sum_p += _column_sums(p)
        m = (p @ weight).to(torch.float64)  # E^T p_t per token
        mm.addmm_(m.T, m)
    count = torch.tensor([float(h.shape[0])], dtype=torch.float64, device=h.device)
    if reduce is not None:
        reduce([sum_p, mm, count])
    n = float(count.clamp_min(1))
    mean_p = sum_p / n
    fisher = -mm / n
    for s in range(0, weight.shape[0], 8192):  # E^T diag(mean p) E, a block of vocabulary rows at a time
        e = weight[s : s + 8192].to(torch.float64)
        fisher.addmm_(e.T, e * mean_p[s : s + 8192, None])
    vals, vecs = torch.linalg.eigh((fisher + fisher.T) / 2)
    return vecs * vals.clamp_min(0).sqrt(), mean_p


def final_states(base: nn.Module, batch: Batch) -> torch.Tensor:
    """What a causal LM's base (its blocks and final norm: what the head reads) gives on a batch, in
    float64, padding left out, no key/value cache kept."""
    return model_output(base, {**batch, "use_cache": False})


class FinalHidden:
    """A causal LM's final hidden states (what its head reads: its base's output in float64, padding
    left out) on calibration batches, the original model's, each batch's computed once however often
    it is asked for (the table's weighting, the head's Fisher and the table's measured swaps read the
    same leading batches). A batch is known by identity and held while its states are. Ask while the
    model is the original: nothing swapped in."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._held: dict[int, tuple[Batch, torch.Tensor]] = {}

    def keep(self, batch: Batch) -> None:
        """Run the model's base on the batch and keep what it gives (a calibration pass's hooks see its
        layers' inputs on the way; the caller has the model in eval mode, without gradients)."""
        self._held[id(batch)] = (batch, final_states(self.model.base_model, batch))

    def __call__(self, batch: Batch) -> torch.Tensor:
        if id(batch) not in self._held:
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    self.keep(batch)
            finally:
                self.model.train(was_training)
        return self._held[id(batch)][1]

    def first_tokens(self, batches: Sequence[Batch], tokens: int) -> list[Batch]:
        """The leading samples holding at least `tokens` tokens (all of them when they hold fewer): whole
        batches, then the next batch's first samples that make up the rest, as a batch of their own. Their
        final states are the first rows of that batch's (padding left out), so when those are held they
        are taken from them, not recomputed."""
        out, n = [], 0
        for b in batches:
            if n >= tokens:
                break
            ids = b["input_ids"]
            per, count = (int(ids.shape[1]) if ids.dim() > 1 else 1), int(ids.shape[0])
            need = -(-(tokens - n) // per)  # samples, rounded up
            out.append(b if need >= count else self._part(b, need))
            n += per * min(need, count)
        return out

    def _part(self, batch: Batch, samples: int) -> Batch:
        part = {k: v[:samples] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
        held = self._held.get(id(batch))
        if held is not None and held[1].dim() == 2:
            mask = _row_mask(batch)
            n = int(next(iter(batch.values())).shape[0])
            rows = int(mask[:samples].sum()) if mask is not None else held[1].shape[0] // max(n, 1) * samples
            self._held[id(part)] = (part, held[1][:rows])
        return part


def base_runner(model: nn.Module, hidden: FinalHidden, keep: Sequence[Batch]) -> Callable[[int, Batch], object]:
    """A calibration pass's `run` (see `collect_grams`) for a causal LM whose head is not calibrated:
    each batch runs through the model's base (its blocks and final norm, never the vocabulary-wide
    head), and the final hidden states of the batches in `keep` stay in `hidden`, so the head's
    Fisher and the tied table's measurements need no pass of their own over them."""
    ids = {id(b) for b in keep}

    def run(k: int, batch: Batch) -> object:
        if id(batch) in ids:
            return hidden.keep(batch)
        return _run(model.base_model, {**batch, "use_cache": False})

    return run


def lm_head(model: nn.Module) -> nn.Linear:
    """A causal LM's output head, which next-token KL is measured through (a Linear)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise MPOCompressError(f"the LM head of this model is a {type(head).__name__}, not a Linear; leave it dense to calibrate on next-token KL")
    return head


class HeadFisher:
    """A causal LM's output as the allocator measures it: h L for the final hidden state h (what the
    LM head reads), where L L^T = F, the head's Fisher information averaged over calibration tokens,
    F = mean_t E^T (diag p_t - p_t p_t^T) E (E the head's weight, p_t the next-token distribution).
    Since KL(p || p') = 1/2 dz^T (diag p - p p^T) dz + O(dz^3) for a logit change dz = E dh, a
    squared change of h L is twice the next-token KL, with the per-token Fisher replaced by its
    mean. Calls run the model's base (its blocks) only, never the head; `reference` holds what they
    give on the batches it was made from (the pass that estimates F gives them too)."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], tokens: int = FISHER_TOKENS, hidden: FinalHidden | None = None) -> None:
        head = lm_head(model)
        self.base = model.base_model
        hidden = hidden if hidden is not None else FinalHidden(model)
        hs = [hidden(b) for b in batches]
        with torch.no_grad():
            h = torch.cat(hs)
            if h.shape[0] > tokens:  # evenly spread over the calibration tokens
                h = h[torch.linspace(0, h.shape[0] - 1, tokens).long()]
            self.root, self.mean_p = head_fisher(head, h)  # F = root root^T; the mean next-token distribution
            # the second moment of what the head reads
            self.head_gram = h.to(torch.float64).T @ h.to(torch.float64) / h.shape[0]
            self.reference = [x.to(torch.float64) @ self.root for x in hs]  # the model's outputs now, per batch
        self.tokens = int(h.shape[0])

    def _hidden(self, batch: Batch) -> torch.Tensor:
        return final_states(self.base, batch)

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._hidden(batch) @ self.root


class NotDifferentiable(MPOCompressError):
    """`gradient_sensitivity` cannot run: the output is not differentiable in the layers' outputs."""


class KeptOutputs:
    """Forward hooks keeping the named modules' outputs (those that need gradients) for
    `torch.autograd.grad`. An output that a later operation changes in place (a Linear followed by
    ReLU(inplace=True)) would give the gradient at the changed tensor, past the ReLU's mask: after
    each pass `changed` finds such outputs by their version counters, and from then on they are
    passed on as copies, the kept tensor untouched (the caller runs the pass again)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.kept: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.copied: set[str] = set()
        self.handles: list = []

    def _hook(self, name: str) -> Callable[[nn.Module, object, object], torch.Tensor | None]:
        def hook(m: nn.Module, args: object, y: object) -> torch.Tensor | None:
            if isinstance(y, torch.Tensor) and y.requires_grad:
                self.kept[name], self.versions[name] = y, y._version
                if name in self.copied:
                    return y.clone()
            return None
        return hook

    def __enter__(self) -> KeptOutputs:  # noqa: PYI034
        self.handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.kept.clear()

    def changed(self) -> bool:
        """Whether a kept output was changed in place during the pass (it is copied from now on)."""
        bad = {n for n, y in self.kept.items() if y._version != self.versions[n]}
        self.copied |= bad
        return bool(bad)

    def run(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """forward() with the outputs kept, run again if one was changed in place."""
        while True:
            self.kept.clear()
            y = forward()
            if not self.changed():
                return y


def numbers_per_sample(batch: Batch) -> int:
    """The numbers one sample of the batch's largest input holds (at least 1)."""
    n = max(int(next(iter(batch.values())).shape[0]), 1)
    return max(1, max(int(v.numel()) // n for v in batch.values()))


def _grid_rows(batch: Batch) -> tuple[int, int]:
    """(samples, positions) of a batch's output projection: token ids give a position per token,
    any other input (images, feature vectors) one per sample."""
    first = next(iter(batch.values()))
    tokens = first.dim() == 2 and not first.is_floating_point()
    return int(first.shape[0]), int(first.shape[1]) if tokens else 1


def gradient_sensitivity(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Batch], fn: OutputFn = model_output, seed: int = 0
) -> dict[str, float]:  # fmt: skip
    """For each named module: ||J||_F^2 / (its output entries), J the Jacobian of the output `fn`
    gives (by default the model's main output) with respect to that module's output (real positions
    only), estimated by Hutchinson's trick with one Gaussian projection u of the output per batch
    (`projection_grid`): E||J^T u||^2 = ||J||_F^2. That is what `measure_sensitivity`'s noise probes
    measure (E||J n||^2 / E||n||^2 for isotropic noise n), for every layer from one backward pass
    per micro-batch of MICRO_TOKENS tokens (of MICRO_NUMBERS input numbers for other inputs: the
    activations a backward pass keeps grow with the input). Raises
    `NotDifferentiable` when the output does not depend differentiably on the modules' outputs."""
    grad2 = {name: 0.0 for name in modules}
    entries = {name: 0 for name in modules}
    mask: torch.Tensor | None = None
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with KeptOutputs(modules) as keeper, torch.enable_grad():
            for k, batch in enumerate(batches):
                status(f"sensitivities: backward pass {k + 1}/{len(batches)}")
                n, length = _grid_rows(batch)
                step = max(1, MICRO_TOKENS // length) if length > 1 else max(1, MICRO_NUMBERS // numbers_per_sample(batch))
                grid = None
                for s in range(0, n, step):
                    micro = {k: v[s : s + step] for k, v in batch.items()}
                    mask = _row_mask(micro)
                    y = keeper.run(lambda micro=micro: fn(model, micro))
                    y = y.reshape(-1, y.shape[-1])
                    if grid is None:  # the batch's projection, drawn whole: micro-batches take their rows of it
                        grid = projection_grid(seed, k, (n, length, y.shape[-1]))
                    u = projection_rows(grid[s : s + step], mask, y.shape[0]).to(y)
                    names = list(keeper.kept)
                    if not y.requires_grad or not names:
                        raise NotDifferentiable("the model's output has no gradient with respect to the layers' outputs")
                    grads = torch.autograd.grad((y * u).sum(), [keeper.kept[k] for k in names], allow_unused=True)
                    for name, g in zip(names, grads):
                        if g is None:
                            continue
                        g = _real_rows(g, mask)
                        grad2[name] += float(g.double().square().sum())
                        entries[name] += g.numel()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return {name: grad2[name] / entries[name] if entries[name] else 0.0 for name in modules}


def projection_grid(seed: int, index: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The Gaussian projection of batch `index`'s output (samples x positions x output width, float64),
    drawn from its own seed, so a batch gets the same one however the batches are split into
    micro-batches or dealt to processes."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + index)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def projection_rows(grid: torch.Tensor, mask: torch.Tensor | None, rows: int) -> torch.Tensor:
    """The rows of a projection grid that meet an output of `rows` rows: one per real position (an
    output per token), or one per sample (an output per sequence)."""
    tokens = grid[mask] if mask is not None and tuple(mask.shape) == tuple(grid.shape[:2]) else grid.reshape(-1, grid.shape[-1])
    if tokens.shape[0] == rows:
        return tokens
    if grid.shape[0] == rows:
        return grid[:, 0]
    raise MPOCompressError(f"internal: an output of {rows} rows for a batch of shape {tuple(grid.shape[:2])}")


@torch.no_grad()
def noise_hook(gen: torch.Generator, state: dict[str, object]) -> Callable[[nn.Module, object, torch.Tensor], torch.Tensor]:
    """A forward hook adding Gaussian noise of NOISE times the output's RMS to a module's output (none
    on the padding positions of `state["mask"]`), its energy summed into `state["energy"]`."""

    def add_noise(m: nn.Module, args: object, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            return y
        noise = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y)
        keep = state["mask"]
        if isinstance(keep, torch.Tensor) and y.dim() == 3 and tuple(y.shape[:2]) == tuple(keep.shape):
            noise = noise * keep[..., None].to(noise.dtype)  # no noise on padding positions
        noise = noise * (NOISE * float(y.detach().float().square().mean().sqrt()))
        state["energy"] = float(state["energy"]) + float(noise.double().square().sum())
        return y + noise

    return add_noise


def measure_sensitivity(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Batch], seed: int = 0,
    reference: Sequence[torch.Tensor] | None = None, fn: OutputFn | None = None,
) -> dict[str, float]:  # fmt: skip
    """For each named module: E||change of the model's main output||^2 / E||noise||^2 when Gaussian
    noise (NOISE times the output's RMS) is added to that module's output alone, over the batches
    (padding positions excluded, in the noise and in the output). `reference`: the model's outputs on
    the batches (`outputs`), when the caller has them already."""
    if reference is None:
        reference = outputs(model, batches, fn)
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        state: dict[str, object] = {"energy": 0.0, "mask": None}
        add_noise = noise_hook(gen, state)
        out: dict[str, float] = {}
        for k, (name, mod) in enumerate(modules.items()):
            status(f"sensitivity of layer {k + 1}/{len(modules)} ({name})")
            state["energy"] = 0.0
            handle = mod.register_forward_hook(add_noise)
            change = 0.0
            try:
                for b, ref in zip(batches, reference):
                    state["mask"] = _row_mask(b)
                    change += float((_output(model, b, fn) - ref).square().sum())
            finally:
                handle.remove()
            energy = float(state["energy"])
            out[name] = change / energy if energy > 0 else 0.0
        return out
    finally:
        model.train(was_training)


def outputs(model: nn.Module, batches: Sequence[Batch], fn: OutputFn | None = None) -> list[torch.Tensor]:
    """The model's main output on each batch (float64, padding positions left out), or what `fn`
    makes of it, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [_output(model, b, fn) for b in batches]
    finally:
        model.train(was_training)


def measure_swap(
    model: nn.Module, names: Sequence[str], new: nn.Module, batches: Sequence[Batch], reference: Sequence[torch.Tensor],
    fn: OutputFn | None = None,
) -> float:  # fmt: skip
    """The mean squared change of the model's main output per sample (against `reference`, from
    `outputs`) while the module reachable under `names` is replaced by `new`; restored afterwards."""
    olds = [model.get_submodule(n) for n in names]  # a tied table's names hold different modules (embedding, head)
    samples = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    try:
        for n in names:
            set_module(model, n, new)
        return sum(float((y - ref).square().sum()) for y, ref in zip(outputs(model, batches, fn), reference)) / max(samples, 1)
    finally:
        for n, old in zip(names, olds):
            set_module(model, n, old)


def twice_kl(logits: torch.Tensor, other: torch.Tensor) -> float:
    """Twice the next-token KL divergence KL(p || q), summed over the rows, of the distributions p of
    `logits` and q of `other` (softmax in float32, the sum in float64). In place on the two log-softmaxes:
    the same products as p * (log p - log q), bit for bit, with two vocabulary-wide temporaries instead
    of five (237 -> 153 ms on SwapKL's 512 x 49,152 chunks); their float64 sum goes a block of rows at
    a time (`_column_sums`; 153 -> 118 ms)."""
    logp = torch.log_softmax(logits.float(), -1)
    diff = torch.log_softmax(other.float(), -1).neg_().add_(logp)  # log p - log q
    return 2.0 * float(_column_sums(logp.exp_().mul_(diff).reshape(-1, logp.shape[-1])).sum())


@torch.no_grad()
def measure_swap_kl(model: nn.Module, swaps: Sequence[tuple[Sequence[str], nn.Module]], batches: Sequence[Batch]) -> float:
    """Twice the next-token KL divergence of a causal LM's full output (its head included), summed over
    the real tokens and divided by the samples, while each module reachable under the names of a swap
    is replaced by that swap's module, all at once: the units of `measure_swap` with a `HeadFisher`
    (whose squared change is twice the KL), for modules that change the head too (a tied table) or for
    many layers together. One window at a time, against the original's distribution computed just
    before; every name gets its own module back afterwards."""
    names = [n for ns, _ in swaps for n in ns]
    olds = [model.get_submodule(n) for n in names]  # a tied table's names hold different modules (embedding, head)
    news = [new for ns, new in swaps for _ in ns]
    total, samples = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            n = int(next(iter(batch.values())).shape[0])
            samples += n
            for s in range(n):
                one = {k: v[s : s + 1] for k, v in batch.items()}
                mask = _row_mask(one)
                logits = []
                for modules in (olds, news):
                    for name, module in zip(names, modules):
                        set_module(model, name, module)
                    y = main_output(_run(model, {**one, "use_cache": False}))
                    logits.append(_real_rows(y, mask) if y.dim() >= 3 else y)
                total += twice_kl(*logits)
    finally:
        for name, old in zip(names, olds):
            set_module(model, name, old)
        model.train(was_training)
    return total / max(samples, 1)


KL_CHUNK = 256  # tokens whose vocabulary-wide logits `SwapKL` holds at once (per side; four such arrays at once in `twice_kl`: 192 MiB at 49,152 tokens)


class SwapKL:
    """`measure_swap_kl` for many swaps on the same batches, the original's side computed once. Each
    batch runs through the model's base (its blocks) whole, as calibration batches do, and the head
    reads the final hidden states KL_CHUNK tokens at a time, so the vocabulary-wide logits are never
    held whole: per swap, one pass of the base with the swap in, and the original's and the swapped
    head on the kept states (on SmolLM2 the original's full pass was 45 % of a measured swap). The
    split holds where the logits are the head applied to the base's output; a model that does more
    (a soft cap, a scale) is found on the first window, and then measured by `measure_swap_kl`.
    `tokens`: only the leading samples holding that many (`FinalHidden.first_tokens`)."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], hidden: FinalHidden | None = None, tokens: int | None = None) -> None:
        self.model = model
        self.hidden = hidden if hidden is not None else FinalHidden(model)
        self.batches = self.hidden.first_tokens(batches, tokens) if tokens is not None else list(batches)
        self.head = model.get_output_embeddings()
        self.split = self.head is not None and getattr(model, "base_model", model) is not model and self._splits()

    def _splits(self) -> bool:
        """Whether the model's logits on the first window are its head applied to its base's output."""
        one = {k: v[:1] for k, v in self.batches[0].items()}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                y = main_output(_run(self.model, {**one, "use_cache": False}))
                full = _real_rows(y, _row_mask(one)).float()
                h = final_states(self.model.base_model, one).float()
                with _autocast(self.model):  # the head as the full pass runs it (bfloat16 under a bfloat16 pass)
                    via = self.head(h).float()
        finally:
            self.model.train(was_training)
        return full.shape == via.shape and bool((full - via).abs().max() <= 1e-4 * max(1.0, float(full.abs().max())))

    @torch.no_grad()
    def __call__(self, swaps: Sequence[tuple[Sequence[str], nn.Module]]) -> float:
        if not self.split:
            return measure_swap_kl(self.model, swaps, self.batches)
        names = [n for ns, _ in swaps for n in ns]
        olds = [self.model.get_submodule(n) for n in names]
        news = [new for ns, new in swaps for _ in ns]
        dtype = next(self.head.parameters()).dtype
        originals = [self.hidden(b) for b in self.batches]  # before anything is swapped in
        total, samples = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        try:
            for name, module in zip(names, news):
                set_module(self.model, name, module)
            head = self.model.get_output_embeddings()
            for batch, h0 in zip(self.batches, originals):
                samples += int(next(iter(batch.values())).shape[0])
                h = final_states(self.model.base_model, batch)
                for a, b in zip(h0.split(KL_CHUNK), h.split(KL_CHUNK)):
                    total += twice_kl(self.head(a.to(dtype)), head(b.to(dtype)))
        finally:
            for name, old in zip(names, olds):
                set_module(self.model, name, old)
            self.model.train(was_training)
        return total / max(samples, 1)


class HiddenStore:
    """Where a block stream keeps the hidden states entering the current block, by (side, batch): in
    CPU memory here (page-locked when they come from a GPU, so they go back without a staging copy);
    on disk with `mpocompress.io.stream.DiskStore` (convert --offload disk). `get` returns a state on
    the device it was put from."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int], torch.Tensor] = {}
        self._device: dict[tuple[int, int], torch.device] = {}

    def put(self, key: tuple[int, int], hidden: torch.Tensor) -> None:
        self._device[key] = hidden.device
        self._held[key] = to_host(hidden)

    def get(self, key: tuple[int, int]) -> torch.Tensor:
        return self._held[key].to(self._device[key], non_blocking=True)

    def drop(self, key: tuple[int, int]) -> None:
        """Forget one kept state."""
        self._held.pop(key, None)
        self._device.pop(key, None)

    def held_bytes(self) -> int:
        """The memory the kept hidden states take."""
        return sum(t.numel() * t.element_size() for t in self._held.values())

    def close(self) -> None:
        self._held.clear()
        self._device.clear()


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in CPU memory: itself when it is there, else a page-locked copy (an accelerator's
    transfers from page-locked memory are direct and can overlap compute)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


def capture_block_inputs(net: nn.Module, first: nn.Module, batches: Sequence[Batch]) -> list[tuple[torch.Tensor, tuple, dict]]:
    """What `net` passes its first block for each batch (hidden states, then the other arguments:
    attention mask, positions, rotary embeddings); the pass stops there, so no block runs (they may
    still be on the meta device)."""
    got: list[tuple[torch.Tensor, tuple, dict]] = []

    def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((_widened(args[0].detach()), args[1:], kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            for b in batches:
                _run(net, {**b, "use_cache": False})
    finally:
        handle.remove()
        net.train(was)
    if len(got) != len(batches):
        raise MPOCompressError("the transformer's first block is not called once per calibration batch; calibrate without --sequential")
    return got


def block_hidden(out: object) -> torch.Tensor:
    """The hidden states a transformer block returns: alone, or first in a tuple (widened to float32
    when a narrow pass made them so: kept hidden states stay in the model's dtype)."""
    return _widened(out[0] if isinstance(out, (tuple, list)) else out)


def call_block(block: nn.Module, hidden: torch.Tensor, args: Sequence[object], kwargs: Mapping[str, object]) -> object:
    """One transformer block on hidden states, as a calibration pass runs the model (`_run`): under
    autocast to the pass's dtype, if any."""
    with _autocast(block):
        return block(hidden, *args, **kwargs)


class BlockStream:
    """`collect_cross` for the layers of a transformer's stack of blocks, one block at a time: the
    hidden states entering the current block are kept for every batch (in a `HiddenStore`), from the
    original model and from the partly compressed one (with the arguments the model passes every
    block: attention mask, positions, rotary embeddings), so a group's statistics cost one pass
    through its own block, not through the model up to it. Groups must be asked for in forward
    order; a block is left (its outputs become the next block's inputs) when a later block's group
    is asked for, by which time the caller has swapped all of its compressed layers. `cross` gives
    exactly what `collect_cross` gives (tests check it against that).

    `stacks` holds one sequence of blocks per side (the reference first); a streamed conversion
    passes one side only to gather statistics of the original, or fills the reference's block i
    just before it is needed."""

    def __init__(
        self, blocks: str, stacks: Sequence[Sequence[nn.Module | None]], inputs: Sequence[Sequence[tuple[torch.Tensor, tuple, dict]]],
        masks: Sequence[torch.Tensor | None], store: HiddenStore | None = None,
    ) -> None:  # fmt: skip
        self.prefix, self.stacks, self.masks = blocks + ".", stacks, list(masks)
        self.store = store if store is not None else HiddenStore()
        self.index = 0
        self.wrapped = False
        self.extra: list[list[tuple[tuple, dict]]] = []  # per side, per batch: the block's other arguments
        for k, side in enumerate(inputs):
            self.extra.append([(args, kwargs) for _, args, kwargs in side])
            for b, (hidden, _, _) in enumerate(side):
                self.store.put((k, b), hidden)

    @classmethod
    def of_models(cls, reference: nn.Module, model: nn.Module, blocks: str, batches: Sequence[Batch]) -> BlockStream:
        """The stream of two whole models in memory: the original and the one being compressed."""
        stacks = (reference.get_submodule(blocks), model.get_submodule(blocks))
        inputs = [capture_block_inputs(net, stack[0], batches) for net, stack in zip((reference, model), stacks)]
        return cls(blocks, stacks, inputs, [_row_mask(b) for b in batches])

    def block_of(self, name: str) -> int | None:
        if not name.startswith(self.prefix):
            return None
        head = name[len(self.prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.stacks[-1]) else None

    def can_serve(self, names: Sequence[str]) -> bool:
        blocks = {self.block_of(n) for n in names}
        return len(blocks) == 1 and None not in blocks and next(iter(blocks)) >= self.index

    def run(self, side: int, b: int) -> torch.Tensor:
        """The current block of one side on batch b's kept inputs: its output hidden states."""
        args, kwargs = self.extra[side][b]
        out = call_block(self.stacks[side][self.index], self.store.get((side, b)), args, kwargs)
        self.wrapped = isinstance(out, (tuple, list))  # what the blocks return: their hidden states alone, or first
        return block_hidden(out)

    def advance(self) -> None:
        """Leave the current block: its outputs become the next block's kept inputs."""
        with torch.no_grad():
            for k, stack in enumerate(self.stacks):
                block, was = stack[self.index], stack[self.index].training
                block.eval()
                try:
                    for b in range(len(self.masks)):
                        self.store.put((k, b), self.run(k, b))
                finally:
                    block.train(was)
        self.index += 1

    @torch.no_grad()
    def cross(self, names: Sequence[str]) -> dict[str, CrossStats]:
        """The statistics of a group of layers of one block (see `collect_cross`)."""
        i = self.block_of(names[0])
        if i is None or not self.can_serve(names):
            raise MPOCompressError(f"internal: block statistics asked out of order for {names[0]}")
        while self.index < i:
            self.advance()
        out: dict[str, CrossStats] = {}
        pending: set[str] = set()
        inner = {n: n[len(self.prefix) + len(str(i)) + 1 :] for n in names}
        weights = {n: _weight(self.stacks[0][i].get_submodule(inner[n])) for n in names}
        for b, mask in enumerate(self.masks):
            seen: list[dict[str, torch.Tensor]] = [{}, {}]
            for k, stack in enumerate(self.stacks):
                store, raw = seen[k], {}

                def hook(name: str, mod: nn.Module, x: torch.Tensor, store: dict = store, raw: dict = raw, mask: torch.Tensor | None = mask) -> None:
                    _rows_of(mod, x, mask, store, raw, name)
                    pending.discard(name)
                    if not pending:
                        raise _Stop

                pending = set(names)
                block = stack[i]
                was = block.training
                block.eval()
                try:
                    with _input_hooks({n: block.get_submodule(inner[n]) for n in names}, hook):
                        try:
                            self.run(k, b)
                        except _Stop:
                            pass
                finally:
                    block.train(was)
            _accumulate(out, names, seen[0], seen[1], weights)
        return out
