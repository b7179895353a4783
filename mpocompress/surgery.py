"""Model surgery: choose layers, factorize them by TT-SVD, swap in MPO layers, report.

`compress_(model, config, filter_fn)` changes the model in place and returns a CompressionReport;
`analyze(model, config, filter_fn)` computes the same report without touching the model.
Layer patterns are exact full names, shell globs (`features.*`) or regexes prefixed with `re:`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpocompress.errors import MPOCompressError
from mpocompress.layers import MPO_LAYERS, MPOConv2d, MPOLinear, mpo_notation
from mpocompress.mpo import (
    TTDecomposition,
    all_finite,
    bond_caps,
    bond_dims_for,
    bond_spectra,
    choose_plan,
    compression_ratio,
    entanglement_entropy,
    grouped_macs,
    mpo_param_count,
    tt_round,
    tt_svd,
    unfolding_spectra,
)
from mpocompress.report import CompressionReport, LayerReport, SkippedLayer
from mpocompress.shapes import Modes, check_modes, factorize

FilterFn = Callable[[nn.Module, str], bool]
SWEEP_BOND_DIMS = (2, 4, 8, 16, 32)


# --------------------------------------------------------------------------- config


def match(pattern: str, name: str) -> bool:
    """Whether a layer name matches a pattern: exact name, shell glob, or 're:' + regex."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _first_match(table: Mapping[str, Any], name: str) -> Any:
    for pattern, value in table.items():
        if match(pattern, name):
            return value
    return None


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how.

    With neither `bond_dim` nor `eps`, `analyze` reports the exact MPO and a sweep over D;
    `compress_` needs one of them (or a per-layer bond dim for every selected layer).
    """

    bond_dim: int | None = None  # D for every selected layer; each bond is capped at its useful max
    eps: float | None = None  # target relative Frobenius error of each layer's weight
    n_cores: int = 4  # number of cores n for layers whose modes are not given
    layers: tuple[str, ...] = ()  # patterns picking the layers; empty: the default selection
    exclude: tuple[str, ...] = ()  # patterns of layers to leave dense
    bond_dims: Mapping[str, int] = field(default_factory=dict)  # per-layer D, by pattern
    shapes: Mapping[str, tuple[Modes, Modes]] = field(default_factory=dict)  # per-layer (I modes, J modes)
    coverage: float = 0.9  # default selection: heaviest layers until they hold this share of weights

    def __post_init__(self) -> None:
        for what, d in [("bond dimension", self.bond_dim), *((f"bond dimension of {k}", v) for k, v in self.bond_dims.items())]:
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
                raise MPOCompressError(f"{what} must be a whole number >= 1, got {d!r}")
        if self.eps is not None and not (0.0 < float(self.eps) < 1.0):
            raise MPOCompressError(f"eps must lie strictly between 0 and 1, got {self.eps!r}")
        if not isinstance(self.n_cores, int) or self.n_cores < 1:
            raise MPOCompressError(f"number of cores must be a whole number >= 1, got {self.n_cores!r}")
        if not 0.0 < self.coverage <= 1.0:
            raise MPOCompressError(f"coverage must lie in (0, 1], got {self.coverage!r}")
        for pattern in (*self.layers, *self.exclude, *self.bond_dims, *self.shapes):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise MPOCompressError(f"bad regular expression in layer pattern {pattern!r}: {e}") from None
        for name, (i_modes, o_modes) in self.shapes.items():
            if len(i_modes) != len(o_modes):
                raise MPOCompressError(
                    f"shape of {name}: {len(i_modes)} input modes but {len(o_modes)} output modes; use the same count"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "bond_dim": self.bond_dim,
            "eps": self.eps,
            "n_cores": self.n_cores,
            "layers": list(self.layers),
            "exclude": list(self.exclude),
            "bond_dims": dict(self.bond_dims),
            "shapes": {k: [list(i), list(o)] for k, (i, o) in self.shapes.items()},
            "coverage": self.coverage,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionConfig:
        return cls(
            bond_dim=d.get("bond_dim"),
            eps=d.get("eps"),
            n_cores=d.get("n_cores", 4),
            layers=tuple(d.get("layers", ())),
            exclude=tuple(d.get("exclude", ())),
            bond_dims=dict(d.get("bond_dims", {})),
            shapes={k: (tuple(v[0]), tuple(v[1])) for k, v in d.get("shapes", {}).items()},
            coverage=d.get("coverage", 0.9),
        )


# --------------------------------------------------------------------------- candidates


@dataclass
class _Candidate:
    names: list[str]  # every full name the module is reachable under (first is the canonical one)
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    ny: int
    nx: int
    problem: str | None = None  # why it cannot become an MPO, if it cannot

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def numel(self) -> int:
        return self.ny * self.nx


def _candidates(model: nn.Module, filter_fn: FilterFn | None) -> list[_Candidate]:
    by_id: dict[int, _Candidate] = {}
    parents = dict(model.named_modules(remove_duplicate=False))
    for name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in by_id:
            by_id[id(mod)].names.append(name)
            continue
        if isinstance(mod, (nn.Linear, MPOLinear)):
            c = _Candidate([name], mod, "linear", mod.out_features, mod.in_features)
        elif isinstance(mod, MPOConv2d):
            c = _Candidate([name], mod, "conv2d", mod.out_channels, math.prod(mod.in_modes))
        elif isinstance(mod, nn.Conv2d):
            c = _Candidate([name], mod, "conv2d", mod.out_channels, mod.weight[0].numel() * mod.groups)
            if mod.groups != 1:
                c.nx = mod.weight[0].numel()
                c.problem = f"grouped convolution (groups={mod.groups}); only groups=1 can become an MPO"
        else:
            continue
        parent = parents.get(name.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            c.problem = "used by nn.MultiheadAttention, which reads its weight directly"
        if name == "":
            c.problem = "the model is this single layer; wrap it in a module to convert it"
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        by_id[id(mod)] = c
    return list(by_id.values())


def _module_kinds(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if name}


def _check_patterns(patterns: Any, what: str, cands: list[_Candidate], model: nn.Module) -> None:
    """Every pattern the user gave must pick at least one convertible layer."""
    names = [n for c in cands for n in c.names]
    for pattern in patterns:
        if any(match(pattern, n) for n in names):
            continue
        others = [f"{n} ({k})" for n, k in _module_kinds(model).items() if match(pattern, n)]
        if others:
            raise MPOCompressError(
                f"{what} {pattern!r} matches only {', '.join(others[:3])}: only Linear and Conv2d layers can become MPOs"
            )
        hint = ", ".join(c.name for c in sorted(cands, key=lambda c: -c.numel)[:5])
        raise MPOCompressError(
            f"{what} {pattern!r} matches no layer; layers that can be converted include: {hint or '(none)'}"
        )


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    cand: _Candidate
    in_modes: Modes
    out_modes: Modes
    bond_dim: int | None
    eps: float | None


def _modes_for(c: _Candidate, config: CompressionConfig) -> tuple[Modes, Modes]:
    given = None
    for name in c.names:
        given = _first_match(config.shapes, name)
        if given is not None:
            break
    if given is not None:
        i_modes = check_modes(given[0], c.nx, f"input modes of {c.name} ({c.nx} inputs)")
        o_modes = check_modes(given[1], c.ny, f"output modes of {c.name} ({c.ny} outputs)")
        return i_modes, o_modes
    if isinstance(c.module, MPO_LAYERS):
        return tuple(c.module.in_modes), tuple(c.module.out_modes)
    return factorize(c.nx, config.n_cores), factorize(c.ny, config.n_cores)


def _bond_for(c: _Candidate, config: CompressionConfig) -> int | None:
    for name in c.names:
        d = _first_match(config.bond_dims, name)
        if d is not None:
            return d
    return config.bond_dim


def plan(
    model: nn.Module, config: CompressionConfig, filter_fn: FilterFn | None = None
) -> tuple[list[_Plan], list[SkippedLayer]]:
    """Choose the layers to convert and their modes and bond dims; report the ones left dense."""
    cands = _candidates(model, filter_fn)
    _check_patterns(config.layers, "--layers pattern", cands, model)
    _check_patterns(config.exclude, "--exclude pattern", cands, model)
    _check_patterns(config.bond_dims, "per-layer bond dim", cands, model)
    _check_patterns(config.shapes, "per-layer shape", cands, model)

    def hit(patterns: Any, c: _Candidate) -> bool:
        return any(match(p, n) for p in patterns for n in c.names)

    explicit = [c for c in cands if hit(config.layers, c) or hit(config.bond_dims, c) or hit(config.shapes, c)]
    excluded = {id(c.module) for c in cands if hit(config.exclude, c)}
    skipped: list[SkippedLayer] = []
    chosen: list[_Plan] = []

    def make(c: _Candidate) -> _Plan:
        i_modes, o_modes = _modes_for(c, config)
        return _Plan(c, i_modes, o_modes, _bond_for(c, config), config.eps)

    for c in explicit:
        if id(c.module) in excluded:
            continue
        if c.problem:
            raise MPOCompressError(f"cannot convert {c.name}: {c.problem}; exclude it with --exclude {c.name}")
        chosen.append(make(c))

    taken = {id(p.cand.module) for p in chosen} | excluded
    # Only per-layer settings and no global D or eps: exactly the named layers are meant.
    only_named = bool(explicit) and config.bond_dim is None and config.eps is None
    if not config.layers and not only_named:
        total = sum(c.numel for c in cands)
        covered = sum(p.cand.numel for p in chosen)
        for c in sorted(cands, key=lambda c: -c.numel):
            if id(c.module) in taken:
                if id(c.module) in excluded:
                    skipped.append(SkippedLayer(c.name, c.kind, c.numel, "excluded"))
                continue
            if covered >= config.coverage * total:
                share = f"{config.coverage:.0%}"
                skipped.append(SkippedLayer(c.name, c.kind, c.numel, f"light: heavier layers already hold {share} of weights"))
                continue
            if c.problem:
                skipped.append(SkippedLayer(c.name, c.kind, c.numel, c.problem))
                continue
            p = make(c)
            if p.bond_dim is not None and p.eps is None:
                n_mpo = mpo_param_count(p.in_modes, p.out_modes, bond_dims_for(p.in_modes, p.out_modes, p.bond_dim))
                if n_mpo >= c.numel:
                    skipped.append(
                        SkippedLayer(c.name, c.kind, c.numel, f"its MPO at D={p.bond_dim} would not be smaller ({n_mpo} parameters)")
                    )
                    continue
            chosen.append(p)
            covered += c.numel
    else:
        for c in cands:
            if id(c.module) not in taken or id(c.module) in excluded:
                skipped.append(
                    SkippedLayer(c.name, c.kind, c.numel, "excluded" if id(c.module) in excluded else "not named")
                )
    if not chosen:
        raise MPOCompressError(
            "no layer selected for conversion: "
            + ("; ".join(f"{s.name}: {s.reason}" for s in skipped[:4]) or "the model has no Linear or Conv2d layer")
        )
    return chosen, skipped


# --------------------------------------------------------------------------- decomposition


def _weight_matrix(c: _Candidate) -> torch.Tensor:
    if isinstance(c.module, MPO_LAYERS):
        return c.module.weight_matrix().detach()
    return c.module.weight.detach().reshape(c.ny, c.nx)


def _current_mpo(p: _Plan) -> MPOLinear | MPOConv2d | None:
    """The candidate itself when it is already an MPO with the planned modes (it can be rounded)."""
    mod = p.cand.module
    if isinstance(mod, MPO_LAYERS) and (tuple(mod.in_modes), tuple(mod.out_modes)) == (p.in_modes, p.out_modes):
        return mod
    return None


def _check_finite(p: _Plan, tensors: list[torch.Tensor]) -> None:
    if not all(all_finite(t) for t in tensors):
        raise MPOCompressError(
            f"layer {p.cand.name} has NaN or Inf weights (a damaged checkpoint or a diverged training run); "
            f"use a good checkpoint or leave the layer dense with --exclude {p.cand.name}"
        )


def _decompose(p: _Plan, bond_dim: int | None, eps: float | None) -> TTDecomposition:
    mpo = _current_mpo(p)
    if mpo is not None:
        _check_finite(p, list(mpo.cores))
        return tt_round(list(mpo.cores), max_bond=bond_dim, eps=eps)  # round the MPO, never forming W
    w = _weight_matrix(p.cand)
    _check_finite(p, [w])
    return tt_svd(w, p.in_modes, p.out_modes, max_bond=bond_dim, eps=eps)


def _report(p: _Plan, bond_dims: list[int], spectra: list[torch.Tensor], rel_error: float) -> LayerReport:
    n_mpo = mpo_param_count(p.in_modes, p.out_modes, bond_dims)
    return LayerReport(
        name=p.cand.name,
        kind=p.cand.kind,
        weight_shape=[p.cand.ny, p.cand.nx],
        in_modes=list(p.in_modes),
        out_modes=list(p.out_modes),
        bond_dims=list(bond_dims),
        params_original=p.cand.numel,
        params_mpo=n_mpo,
        rho=compression_ratio(n_mpo, p.cand.numel),
        rel_error=rel_error,
        entropy=[entanglement_entropy(s) for s in spectra],
        notation=mpo_notation(p.in_modes, p.out_modes, bond_dims),
    )


def _layer_report(p: _Plan, dec: TTDecomposition) -> LayerReport:
    return _report(p, dec.bond_dims, bond_spectra(dec.cores), dec.rel_error)


def _exact_report(p: _Plan) -> LayerReport:
    """The untruncated MPO: for a dense layer every bond at its cap, with the spectra of W's
    unfoldings; for an MPO layer its own bonds and spectra."""
    mpo = _current_mpo(p)
    if mpo is not None:
        _check_finite(p, list(mpo.cores))
        return _report(p, mpo.bond_dims, bond_spectra(list(mpo.cores)), 0.0)
    w = _weight_matrix(p.cand)
    _check_finite(p, [w])
    spectra = unfolding_spectra(w, p.in_modes, p.out_modes)
    return _report(p, bond_caps(p.in_modes, p.out_modes), spectra, 0.0)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _totals(
    layers: list[LayerReport], skipped: list[SkippedLayer], model_before: int, config: CompressionConfig,
    applied: bool, model_after: int | None = None,
) -> CompressionReport:  # fmt: skip
    orig = sum(lr.params_original for lr in layers)
    mpo = sum(lr.params_mpo for lr in layers)
    after = model_after if model_after is not None else model_before - orig + mpo
    return CompressionReport(
        layers=layers,
        skipped=skipped,
        params_original=orig,
        params_mpo=mpo,
        rho=compression_ratio(mpo, orig),
        params_model_before=model_before,
        params_model_after=after,
        bond_dim=config.bond_dim,
        eps=config.eps,
        applied=applied,
    )


# --------------------------------------------------------------------------- public API


def _build(p: _Plan, dec: TTDecomposition) -> nn.Module:
    old = p.cand.module
    bias = old.bias
    if p.cand.kind == "linear":
        new: nn.Module = MPOLinear.from_cores(dec.cores, bias)
    else:
        geometry = dict(
            in_channels=old.in_channels, kernel_size=old.kernel_size, stride=old.stride,
            padding=old.padding, dilation=old.dilation, padding_mode=old.padding_mode,
        )  # fmt: skip
        new = MPOConv2d.from_cores(dec.cores, bias=bias, **geometry)
    if isinstance(old, MPO_LAYERS):
        new.forward_strategy = old.forward_strategy
    return new.train(old.training)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` of `model` (e.g. 'features.conv5_1.linear')."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _swap(model: nn.Module, names: list[str], new: nn.Module) -> None:
    for name in names:
        set_module(model, name, new)


def compress_(
    model: nn.Module, config: CompressionConfig, filter_fn: FilterFn | None = None
) -> CompressionReport:
    """Replace the chosen Linear/Conv2d layers of `model` by MPO layers, in place.

    Args:
        model: the model to change.
        config: which layers, which modes, which bond dims.
        filter_fn: optional `filter_fn(module, full_name) -> bool` restricting the candidates.

    Returns:
        The report of what was replaced and what was left dense.
    """
    chosen, skipped = plan(model, config, filter_fn)
    missing = [p.cand.name for p in chosen if p.bond_dim is None and p.eps is None]
    if missing:
        raise MPOCompressError(
            f"no bond dimension for {', '.join(missing)}: give --bond-dim D (or NAME=D for each) or --eps E"
        )
    before = _n_params(model)
    layers = []
    for p in chosen:
        dec = _decompose(p, p.bond_dim, p.eps)
        layers.append(_layer_report(p, dec))
        _swap(model, p.cand.names, _build(p, dec))
    return _totals(layers, skipped, before, config, applied=True, model_after=_n_params(model))


def analyze(
    model: nn.Module,
    config: CompressionConfig = CompressionConfig(),
    filter_fn: FilterFn | None = None,
    sweep_bond_dims: tuple[int, ...] = SWEEP_BOND_DIMS,
) -> CompressionReport:
    """What `compress_` would do, without changing the model.

    With a bond dimension or eps in `config`: the report at that truncation. Without either: the
    exact MPO of each selected layer (bonds at their caps, with their entanglement entropies),
    and in `sweep` one report for each D in `sweep_bond_dims`.
    """
    before = _n_params(model)
    has_truncation = config.bond_dim is not None or config.eps is not None
    chosen, skipped = plan(model, config, filter_fn)
    if has_truncation or all(p.bond_dim is not None for p in chosen):
        layers = [_layer_report(p, _decompose(p, p.bond_dim, p.eps)) for p in chosen]
        return _totals(layers, skipped, before, config, applied=False)
    report = _totals([_exact_report(p) for p in chosen], skipped, before, config, applied=False)
    for d in sweep_bond_dims:
        cfg = CompressionConfig(**{**_fields(config), "bond_dim": d})
        sub_chosen, sub_skipped = plan(model, cfg, filter_fn)
        sub_layers = [_layer_report(p, _decompose(p, p.bond_dim, None)) for p in sub_chosen]
        report.sweep.append(_totals(sub_layers, sub_skipped, before, cfg, applied=False))
    report.notes.append("no --bond-dim given: layers show the exact MPO (bonds at their caps); pick D from the sweep")
    return report


def rows_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """How many input vectors each Linear/Conv2d (or MPO) layer sees per sample: one forward pass
    of a zero batch of one sample of `input_shape` (e.g. (1, 28, 28)) with hooks."""
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, MPOLinear)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: counts.__setitem__(n, o.numel() // o.shape[-1])))
        elif isinstance(mod, (nn.Conv2d, MPOConv2d)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: counts.__setitem__(n, o.numel() // o.shape[-3])))
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, dtype=param.dtype if param is not None else torch.float32)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        raise MPOCompressError(f"the model does not run on an input of shape {tuple(input_shape)} ({e}); check --input-shape") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return counts


def _mpo_macs(
    in_modes: Sequence[int], out_modes: Sequence[int], bond_dims: Sequence[int], rows: int, batch: int
) -> tuple[int, str]:
    """Multiply-adds per sample of an MPO seeing `rows` vectors per sample, with the plan a
    training step of `batch` samples takes, and that plan."""
    plan = choose_plan(in_modes, out_modes, bond_dims, batch * rows, backward=True)
    return grouped_macs(in_modes, out_modes, bond_dims, plan.sizes, batch * rows) // batch, plan.describe()


def add_macs(
    report: CompressionReport, model: nn.Module, rows: Mapping[str, int] | None, batch: int = 64
) -> CompressionReport:
    """Fill in multiply-adds per sample: each reported layer dense and as an MPO with the plan a
    training step of `batch` samples would take, and the totals over every Linear/Conv2d of the
    model. Without `rows` (no input shape) a Linear counts one vector per sample and convolutions
    stay unknown."""
    modules = dict(model.named_modules())

    def n_rows(name: str) -> int | None:
        if rows is not None:
            return rows.get(name)
        return 1 if isinstance(modules.get(name), (nn.Linear, MPOLinear)) else None

    report.macs_batch = batch
    by_name = {lr.name: lr for lr in report.layers}
    total_dense = total_mpo = 0
    known = True
    for name, mod in modules.items():
        if not isinstance(mod, (nn.Linear, nn.Conv2d, *MPO_LAYERS)):
            continue
        r = n_rows(name)
        if r is None:
            known = False
            continue
        lr = by_name.get(name)
        if lr is not None:  # a layer the report writes as an MPO
            lr.rows_per_sample = r
            lr.macs_dense = r * lr.params_original
            lr.macs_mpo, lr.plan = _mpo_macs(lr.in_modes, lr.out_modes, lr.bond_dims, r, batch)
            dense, current = lr.macs_dense, lr.macs_mpo
        elif isinstance(mod, MPO_LAYERS):  # already an MPO, left as it is
            dense = r * mod.weight_numel
            current = _mpo_macs(mod.in_modes, mod.out_modes, mod.bond_dims, r, batch)[0]
        else:
            dense = current = r * mod.weight.numel()
        total_dense, total_mpo = total_dense + dense, total_mpo + current
    if known:
        report.macs_model_dense, report.macs_model_mpo = total_dense, total_mpo
    for sub in report.sweep:
        add_macs(sub, model, rows, batch)
    return report


def _fields(config: CompressionConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


# --------------------------------------------------------------------------- summary of a model


def summarize(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of a model and rho (Eq. 9) of its MPO layers.

    Keys: params_model (all parameters), params_mpo (in MPO cores), params_original (the weights
    of the dense layers the MPOs stand for), params_model_dense (the model with dense layers in
    their place), rho (params_mpo / params_original; 1.0 for a model without MPO layers) and
    mpo_layers (each MPO layer's name and notation).
    """
    mpo = {id(m): (name, m) for name, m in model.named_modules() if isinstance(m, MPO_LAYERS)}
    params_mpo = sum(m.num_mpo_params for _, m in mpo.values())
    params_original = sum(m.weight_numel for _, m in mpo.values())
    params_model = sum(p.numel() for p in model.parameters())
    return {
        "params_model": params_model,
        "params_mpo": params_mpo,
        "params_original": params_original,
        "params_model_dense": params_model - params_mpo + params_original,
        "rho": compression_ratio(params_mpo, params_original) if mpo else 1.0,
        "mpo_layers": [{"name": name, "notation": m.notation()} for name, m in mpo.values()],
    }
