"""mpocompress: compress PyTorch models by writing their heaviest layers as matrix product operators.

Method: Gao et al., "Compressing deep neural networks by matrix product operators".
"""

__version__ = "0.1.0"

from mpocompress.errors import MPOCompressError  # noqa: E402
from mpocompress.layers import MPOConv2d, MPOLinear  # noqa: E402
from mpocompress.report import CompressionReport, LayerReport, SkippedLayer  # noqa: E402
from mpocompress.serialization import load, load_model, save  # noqa: E402
from mpocompress.surgery import CompressionConfig, analyze, compress_  # noqa: E402
from mpocompress.zoo import ARCHITECTURES, build_model, register_arch  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "CompressionConfig",
    "CompressionReport",
    "LayerReport",
    "MPOCompressError",
    "MPOConv2d",
    "MPOLinear",
    "SkippedLayer",
    "analyze",
    "build_model",
    "compress_",
    "load",
    "load_model",
    "register_arch",
    "save",
]
