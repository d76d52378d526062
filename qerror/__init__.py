"""qerror: quantization error in neural networks, analytically, empirically and statistically."""

from qerror.calibration import calibrate, observed_range, qparams_from_range
from qerror.quantizer import (
    QParams,
    QuantSpec,
    RangeMethod,
    Saturation,
    ScaleArithmetic,
    dequantize,
    fake_quantize,
    quantize,
)
from qerror.rounding import ErrorInterval, RoundingMode, apply_rounding

__version__ = "0.1.0"

__all__ = [
    "ErrorInterval",
    "QParams",
    "QuantSpec",
    "RangeMethod",
    "RoundingMode",
    "Saturation",
    "ScaleArithmetic",
    "apply_rounding",
    "calibrate",
    "dequantize",
    "fake_quantize",
    "observed_range",
    "qparams_from_range",
    "quantize",
]
