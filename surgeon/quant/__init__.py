"""Quantized bases as one part: the ops, the layer, the loader and the ONNX translation.

Other stages see a quantized linear only through ``QUANT_SITE_OPS`` (matching's site-op table),
``quantized_linear_shape`` (capture's module table) and the loaders.
"""

from surgeon.errors import QuantizationError
from surgeon.quant.layer import (
    QuantLinear,
    QuantSpec,
    check_quant_config,
    dequantize,
    from_bitsandbytes,
    has_bitsandbytes_layers,
    is_quantized,
    quant_bits,
    quantized_linear_shape,
    quantized_linears,
)
from surgeon.quant.loader import load_base, load_quantized, read_tensors
from surgeon.quant.requantize import requantize_checkpoint
from surgeon.quant.ops import QUANT_SITE_OPS

__all__ = ["QUANT_SITE_OPS", "QuantLinear", "QuantSpec", "QuantizationError", "check_quant_config", "dequantize",
           "from_bitsandbytes", "has_bitsandbytes_layers", "is_quantized", "load_base", "load_quantized",
           "quant_bits", "quantized_linear_shape", "quantized_linears", "read_tensors", "requantize_checkpoint"]
