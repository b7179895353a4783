"""Factorized layers: drop-in modules whose weights are MPOs, one module per structure, and the
registry from a layer kind in file metadata to its class.

Adding a structure: write its module here (a subclass of `FactorizedLayer`, with
`spec`/`spec_dims`/`from_spec`), add it to `LAYER_KINDS`, and register its converter in
`mpocompress.compress.registry`.
"""

from __future__ import annotations

from typing import Any

from mpocompress.errors import MPOCompressError
from mpocompress.nn.cache import WeightCache, cached_bytes, cached_layers, materialized, parameter_bytes
from mpocompress.nn.conv_geometry import conv_geometry, dense_patches
from mpocompress.nn.factorized import FactorizedLayer
from mpocompress.nn.inference import (  # noqa: E402  (after the layers it times)
    InferenceReport,
    LayerInference,
    optimize_for_inference,
    resident_bytes,
)
from mpocompress.nn.lowrank import LowRankConv2d, LowRankLinear, LowRankTable
from mpocompress.nn.mpo_base import STRATEGIES, MPOLayer, Strategy
from mpocompress.nn.mpo_conv import MPOConv2d
from mpocompress.nn.mpo_embedding import MPOEmbedding, padded_vocab, vocab_modes
from mpocompress.nn.mpo_linear import MPOLinear

LAYER_KINDS: dict[str, type[FactorizedLayer]] = {
    cls.kind: cls for cls in (MPOLinear, MPOConv2d, LowRankLinear, LowRankConv2d, MPOEmbedding, LowRankTable)
}


def layer_from_spec(spec: dict[str, Any]) -> FactorizedLayer:
    """A factorized layer skeleton (random values) with the shapes a checkpoint's metadata describes."""
    cls = LAYER_KINDS.get(spec.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise MPOCompressError(f"unknown MPO layer kind {spec.get('kind')!r} in checkpoint metadata")
    return cls.from_spec(spec)


__all__ = [
    "LAYER_KINDS", "STRATEGIES", "FactorizedLayer", "InferenceReport", "LayerInference", "LowRankConv2d", "LowRankLinear", "LowRankTable", "MPOConv2d", "MPOEmbedding", "MPOLayer",
    "MPOLinear", "Strategy", "WeightCache", "cached_bytes", "cached_layers", "conv_geometry", "dense_patches", "layer_from_spec", "materialized",
    "optimize_for_inference", "padded_vocab", "parameter_bytes", "resident_bytes", "vocab_modes",
]  # fmt: skip
