"""qerror: quantization error in neural networks, analytically, empirically and statistically."""

from qerror.analytic import (
    ClipMethod,
    ClipResult,
    ErrorMoments,
    InfiniteMomentWarning,
    UniformNoise,
    error_moments,
    optimal_clip,
)
from qerror.calibration import calibrate, observed_range, qparams_from_range
from qerror.empirical import ErrorStats, ErrorSummary, HistogramBins, measure_error
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
from qerror.stats import (
    IntervalMethod,
    StatResult,
    bias_test,
    bootstrap_ci,
    equivalence_test,
    mcnemar_test,
    mse_ratio_ci,
    uniformity_test,
    wilson_ci,
)

__version__ = "0.1.0"

__all__ = [
    "ClipMethod",
    "ClipResult",
    "ErrorMoments",
    "InfiniteMomentWarning",
    "UniformNoise",
    "error_moments",
    "optimal_clip",
    "ErrorInterval",
    "ErrorStats",
    "ErrorSummary",
    "HistogramBins",
    "IntervalMethod",
    "StatResult",
    "bias_test",
    "bootstrap_ci",
    "equivalence_test",
    "mcnemar_test",
    "measure_error",
    "mse_ratio_ci",
    "uniformity_test",
    "wilson_ci",
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
