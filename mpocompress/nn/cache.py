"""The one weight cache of the factorized layers, and the switch that turns it on.

A factorized layer computes from its cores on every call unless it is *materialized*: then the
merged cores a contraction plan needs (W itself for the dense plan) are kept and reused by calls
that need no gradient for the cores. Turning the cache on is explicit, because no cheap rule sees
every way a core can change: an entry is valid while every core is the same Parameter object, with
the same version counter and the same storage (`stamp`). That sees optimizer steps, in-place ops,
`load_state_dict` (with or without `assign`), `.to()`/`.half()`, new Parameters and
`torch.nn.utils.vector_to_parameters`; it cannot see a write through `.data`, which bypasses version
counters. So a layer is never materialized behind the user's back: `materialize()` (or the
`materialized(model)` context) is a promise not to write the cores through `.data` meanwhile, and
`release()` frees the memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

Stamp = tuple[int, ...]


def stamp(tensors: Sequence[torch.Tensor]) -> Stamp:
    """Identity, version counter and storage address of each tensor: equal stamps mean unchanged
    tensors, except for writes through `.data`."""
    return tuple([v for t in tensors for v in (id(t), t._version, t.data_ptr())])


class WeightCache:
    """Values derived from a layer's cores (merged groups, keyed by group sizes), kept while enabled
    and while the cores' stamp is unchanged."""

    def __init__(self) -> None:
        self.enabled = False
        self._entries: dict[Any, tuple[Stamp, Any]] = {}

    def get(self, key: Any, current: Stamp) -> Any:
        """The value stored under `key` if it was derived from cores with stamp `current`."""
        hit = self._entries.get(key)
        return hit[1] if hit is not None and hit[0] == current else None

    def put(self, key: Any, current: Stamp, value: Any) -> None:
        self._entries[key] = (current, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightCache:  # copies never carry cached values
        new = WeightCache()
        new.enabled = self.enabled
        return new

    def __getstate__(self) -> dict[str, Any]:  # nor do pickles
        return {"enabled": self.enabled, "_entries": {}}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Bytes of each distinct storage behind `tensors`, by address."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage counted once)."""
    return sum(_storages([*model.parameters(), *model.buffers()]).values())


def cached_bytes(model: nn.Module) -> int:
    """Bytes every weight cache of `model` holds now beyond its parameters (each storage counted
    once; a group of one core is the core itself)."""
    own = _storages([*model.parameters(), *model.buffers()])
    kept = _storages(t for m in cached_layers(model) for _, value in m.weight_cache._entries.values() for t in _tensors(value))
    return sum(n for ptr, n in kept.items() if ptr not in own)


def cached_layers(model: nn.Module) -> list[nn.Module]:
    """Every module of `model` that has a weight cache (the factorized layers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "weight_cache", None), WeightCache)]


@contextlib.contextmanager
def materialized(model: nn.Module) -> Iterator[nn.Module]:
    """Materialize every factorized layer of `model` for the block (e.g. an evaluation loop), then
    restore each layer's previous state and free what the block cached.

        with materialized(model):
            for x in batches:
                model(x)
    """
    layers = cached_layers(model)
    before = [m.weight_cache.enabled for m in layers]
    for m in layers:
        m.weight_cache.enabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.weight_cache.enabled = was
            if not was:
                m.weight_cache.clear()
