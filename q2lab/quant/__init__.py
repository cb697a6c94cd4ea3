"""Quantization methods, registered by name (see :mod:`q2lab.quant.base`)."""

from q2lab.quant.base import (
    MethodConfig,
    QuantizedTensor,
    Quantizer,
    get_quantizer,
    make_config,
    method_names,
    register,
)

__all__ = [
    "MethodConfig",
    "QuantizedTensor",
    "Quantizer",
    "get_quantizer",
    "make_config",
    "method_names",
    "register",
]
