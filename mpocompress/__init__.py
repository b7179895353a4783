"""mpocompress: compress PyTorch models by writing their heaviest layers as matrix product operators.

Method: Gao et al., "Compressing deep neural networks by matrix product operators".
The package map is docs/architecture.md.
"""

from mpocompress._version import __version__
from mpocompress.compress import (  # noqa: E402
    CompressionConfig,
    CompressionReport,
    LayerReport,
    SkippedLayer,
    analyze,
    compress_,
)
from mpocompress.errors import MPOCompressError  # noqa: E402
from mpocompress.io import load, load_model, save  # noqa: E402
from mpocompress.models import ARCHITECTURES, build_model, register_arch  # noqa: E402
from mpocompress.nn import (  # noqa: E402
    InferenceReport,
    MPOConv2d,
    MPOLayer,
    MPOLinear,
    materialized,
    optimize_for_inference,
    resident_bytes,
)

__all__ = [
    "__version__",
    "ARCHITECTURES",
    "CompressionConfig",
    "CompressionReport",
    "InferenceReport",
    "LayerReport",
    "MPOCompressError",
    "MPOConv2d",
    "MPOLayer",
    "MPOLinear",
    "SkippedLayer",
    "analyze",
    "build_model",
    "compress_",
    "load",
    "load_model",
    "materialized",
    "optimize_for_inference",
    "register_arch",
    "resident_bytes",
    "save",
]
