"""Which layers to convert: the candidates a model offers (every module with a converter), layer
patterns, and the default selection by weight coverage. Nothing here decides how a layer is
factorized; `reject` lets the caller veto a layer of the default selection (e.g. an MPO that
would not be smaller).

Layer patterns are exact full names, shell globs (`features.*`) or regexes prefixed with `re:`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from mpocompress.compress.config import LayerSelection
from mpocompress.compress.registry import TIED_TABLE, Converter, converter_for
from mpocompress.compress.report import SkippedLayer
from mpocompress.errors import MPOCompressError
from mpocompress.utils import is_hf_model

FilterFn = Callable[[nn.Module, str], bool]


def match(pattern: str, name: str) -> bool:
    """Whether a layer name matches a pattern: exact name, shell glob, or 're:' + regex."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def first_match(table: Mapping[str, Any], names: Iterable[str]) -> Any:
    """The value of the first pattern in `table` matching the first name (in order) that any matches."""
    for name in names:
        for pattern, value in table.items():
            if match(pattern, name):
                return value
    return None


@dataclass
class Candidate:
    """A module that could become an MPO."""

    names: list[str]  # every full name the module is reachable under (first is the canonical one)
    module: nn.Module
    converter: Converter
    ny: int
    nx: int
    problem: str | None = None  # why it cannot become an MPO, if it cannot

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def kind(self) -> str:
        return self.converter.kind

    @property
    def numel(self) -> int:
        """Weights of the dense module."""
        return self.converter.numel(self.module) if self.converter.numel is not None else self.ny * self.nx


def candidates(model: nn.Module, filter_fn: FilterFn | None = None) -> list[Candidate]:
    """Every module of `model` that a registered converter handles, once each."""
    by_id: dict[int, Candidate] = {}
    parents = dict(model.named_modules(remove_duplicate=False))
    owners: dict[int, list[str]] = {}  # who holds each parameter (tied weights have several owners)
    for name, mod in model.named_modules():
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    heads = _tied_heads(parents, owners)
    for name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in by_id:
            by_id[id(mod)].names.append(name)
            continue
        if any(head is mod for head, _ in heads.values()):
            continue  # an LM head tied to an embedding: a name of the embedding's candidate
        conv = TIED_TABLE if id(mod) in heads else converter_for(mod)
        if conv is None:
            continue
        ny, nx = conv.dims(mod)
        if id(mod) in heads:
            c = Candidate([name, heads[id(mod)][1]], mod, conv, ny, nx, conv.problem(mod))
            if filter_fn is None or filter_fn(mod, name):
                by_id[id(mod)] = c
            continue
        c = Candidate([name], mod, conv, ny, nx, conv.problem(mod))
        if isinstance(parents.get(name.rpartition(".")[0]), nn.MultiheadAttention):
            c.problem = "used by nn.MultiheadAttention, which reads its weight directly"
        if name == "":
            c.problem = "the model is this single layer; wrap it in a module to convert it"
        tied = [o for o in owners.get(id(getattr(mod, "weight", None)), []) if o != name]
        if tied and c.problem is None:
            c.problem = f"its weight is tied to {tied[0]} (one shared matrix); convert neither or untie them first"
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        by_id[id(mod)] = c
    return list(by_id.values())


def _tied_heads(parents: Mapping[str, nn.Module], owners: Mapping[int, list[str]]) -> dict[int, tuple[nn.Module, str]]:
    """{id of an embedding: (the LM head, its name)} for a model whose output head is a bias-free
    Linear holding the very weight of a plain nn.Embedding (tied input and output embeddings): the
    pair is one candidate, a table serving both ends."""
    out: dict[int, tuple[nn.Module, str]] = {}
    for name, mod in parents.items():
        if type(mod) is not nn.Embedding or mod.max_norm is not None:
            continue
        others = [o for o in owners.get(id(mod.weight), []) if o != name]
        if len(others) != 1:
            continue
        head = parents.get(others[0])
        if type(head) is nn.Linear and head.bias is None and head.weight is mod.weight:
            out[id(mod)] = (head, others[0])
    return out


def check_patterns(patterns: Iterable[str], what: str, cands: list[Candidate], model: nn.Module) -> None:
    """Every pattern the user gave must pick at least one convertible layer."""
    names = [n for c in cands for n in c.names]
    for pattern in patterns:
        if any(match(pattern, n) for n in names):
            continue
        others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and match(pattern, n)]
        if others:
            raise MPOCompressError(
                f"{what} {pattern!r} matches only {', '.join(others[:3])}: only Linear, Conv2d and Embedding layers can become MPOs"
            )
        hint = ", ".join(c.name for c in sorted(cands, key=lambda c: -c.numel)[:5])
        raise MPOCompressError(
            f"{what} {pattern!r} matches no layer; layers that can be converted include: {hint or '(none)'}"
        )


def select_layers(
    model: nn.Module,
    selection: LayerSelection,
    named: Mapping[str, Iterable[str]],
    only_named: bool,
    filter_fn: FilterFn | None = None,
    reject: Callable[[Candidate], str | None] | None = None,
    embeddings: bool = False,
) -> tuple[list[Candidate], list[SkippedLayer]]:
    """The layers to convert, in order, and the ones left dense with the reason.

    Args:
        selection: --layers / --exclude patterns and the coverage of the default selection.
        named: further patterns that name layers (by what they set, for error messages); a layer
            they name is selected.
        only_named: no global setting was given: exactly the named layers are meant.
        reject: for a layer of the default selection, a reason to leave it dense (or None).
        embeddings: the default selection includes embeddings (a budget is to be spread: the
            allocator decides whether they shrink); else they are converted only when named.
    """
    cands = candidates(model, filter_fn)
    check_patterns(selection.layers, "--layers pattern", cands, model)
    check_patterns(selection.exclude, "--exclude pattern", cands, model)
    for what, patterns in named.items():
        check_patterns(patterns, what, cands, model)
    naming = [p for patterns in named.values() for p in patterns]

    def hit(patterns: Iterable[str], c: Candidate) -> bool:
        return any(match(p, n) for p in patterns for n in c.names)

    explicit = [c for c in cands if hit(selection.layers, c) or hit(naming, c)]
    excluded = {id(c.module) for c in cands if hit(selection.exclude, c)}
    chosen: list[Candidate] = []
    for c in explicit:
        if id(c.module) in excluded:
            continue
        if c.problem:
            raise MPOCompressError(f"cannot convert {c.name}: {c.problem}; exclude it with --exclude {c.name}")
        chosen.append(c)
    taken = {id(c.module) for c in chosen} | excluded
    only_named = bool(explicit) and only_named
    blocks = transformer_blocks(model)
    if not selection.layers and not only_named and blocks:
        skipped = _in_blocks(cands, chosen, taken, excluded, blocks, reject, embeddings)
    elif not selection.layers and not only_named:
        skipped = _by_coverage(cands, chosen, taken, excluded, selection.coverage, reject, embeddings)
    else:
        skipped = [
            SkippedLayer(c.name, c.kind, c.numel, "excluded" if id(c.module) in excluded else "not named")
            for c in cands
            if (id(c.module) not in taken and c.kind != "embedding") or id(c.module) in excluded
        ]
    if not chosen:
        embeds = [c.name for c in cands if c.kind == "embedding"]
        none = (f"its only convertible layers are embeddings ({', '.join(embeds[:3])}): name them with --layers, or give "
                "--target-params P" if embeds else "the model has no Linear, Conv2d or Embedding layer")  # fmt: skip
        raise MPOCompressError("no layer selected for conversion: " + ("; ".join(f"{s.name}: {s.reason}" for s in skipped[:4]) or none))
    return chosen, skipped


def transformer_blocks(model: nn.Module) -> list[str]:
    """For a transformers model (one with a config naming its model_type), the names of its stacks of
    blocks: the ModuleLists of two or more modules of one class (BERT's encoder.layer, GPT-2's h).
    Empty for any other model, whose default selection goes by weight coverage."""
    if not is_hf_model(model):
        return []
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1
    ]  # fmt: skip


def _in_blocks(
    cands: list[Candidate], chosen: list[Candidate], taken: set[int], excluded: set[int], blocks: list[str],
    reject: Callable[[Candidate], str | None] | None, embeddings: bool,
) -> list[SkippedLayer]:  # fmt: skip
    """The default selection of a transformer, appended to `chosen`: every projection inside its
    stacks of blocks, all of them alike (and, with `embeddings`, its embeddings); pooler and head
    stay dense unless named."""
    skipped: list[SkippedLayer] = []
    for c in cands:
        if id(c.module) in taken:
            if id(c.module) in excluded:
                skipped.append(SkippedLayer(c.name, c.kind, c.numel, "excluded"))
            continue
        if c.kind == "embedding" and not embeddings:  # not a default candidate, not listed (as before embeddings converted)
            if c.converter.serves_head:  # but a tied head is a layer users look for
                skipped.append(SkippedLayer(c.name, c.kind, c.numel, f"the input embedding tied to the LM head ({c.names[1]}): "
                                            f"name it with --layers {c.name} or give a budget to offer it as one table"))  # fmt: skip
            continue
        if c.kind != "embedding" and not any(n.startswith(b + ".") for n in c.names for b in blocks):
            skipped.append(SkippedLayer(c.name, c.kind, c.numel, "outside the transformer blocks; name it with --layers to convert it"))
            continue
        reason = c.problem or (reject(c) if reject is not None else None)
        if reason:
            skipped.append(SkippedLayer(c.name, c.kind, c.numel, reason))
            continue
        chosen.append(c)
    return skipped


def _by_coverage(
    cands: list[Candidate], chosen: list[Candidate], taken: set[int], excluded: set[int], coverage: float,
    reject: Callable[[Candidate], str | None] | None, embeddings: bool,
) -> list[SkippedLayer]:  # fmt: skip
    """The default selection, appended to `chosen`: heaviest layers first until they hold
    `coverage` of the weights of all candidates (embeddings only with `embeddings`). Returns the
    layers left dense."""
    skipped: list[SkippedLayer] = []
    pool = [c for c in cands if embeddings or c.kind != "embedding"]
    total = sum(c.numel for c in pool)
    covered = sum(c.numel for c in chosen)
    for c in sorted(cands, key=lambda c: -c.numel):
        if id(c.module) in taken:
            if id(c.module) in excluded:
                skipped.append(SkippedLayer(c.name, c.kind, c.numel, "excluded"))
            continue
        if c.kind == "embedding" and not embeddings:  # not a default candidate, not listed (as before embeddings converted)
            continue
        if covered >= coverage * total:
            skipped.append(SkippedLayer(c.name, c.kind, c.numel, f"light: heavier layers already hold {coverage:.0%} of weights"))
            continue
        if c.problem:
            skipped.append(SkippedLayer(c.name, c.kind, c.numel, c.problem))
            continue
        reason = reject(c) if reject is not None else None
        if reason:
            skipped.append(SkippedLayer(c.name, c.kind, c.numel, reason))
            continue
        chosen.append(c)
        covered += c.numel
    return skipped
