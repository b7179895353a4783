"""Model surgery: which layers (`select`), how each becomes a factorized layer (`registry`,
`convert`), and what that did (`report`, `analyze`)."""

from mpocompress.compress.analyze import SWEEP_BOND_DIMS, add_macs, analyze, rows_per_sample
from mpocompress.compress.config import CompressionConfig, LayerSelection, MPOSettings
from mpocompress.compress.convert import compress_
from mpocompress.compress.registry import CONVERTERS, Converter, converter_for, register_converter
from mpocompress.compress.report import CompressionReport, LayerReport, SkippedLayer, count_params, summarize
from mpocompress.compress.select import Candidate, FilterFn, candidates, match
from mpocompress.compress.targets import LayerTarget, select_targets

__all__ = [
    "CONVERTERS", "SWEEP_BOND_DIMS", "Candidate", "CompressionConfig", "CompressionReport", "Converter", "FilterFn",
    "LayerReport", "LayerSelection", "LayerTarget", "MPOSettings", "SkippedLayer", "add_macs", "analyze",
    "candidates", "compress_", "converter_for", "count_params", "match", "register_converter", "rows_per_sample",
    "select_targets", "summarize",
]  # fmt: skip
