"""qerror: quantization error in neural networks, analytically, empirically and statistically."""

from qerror.analytic import (
    ClipMethod,
    ClipResult,
    ErrorMoments,
    InfiniteMomentWarning,
    UniformNoise,
    error_moments,
    optimal_clip,
    uniform_bias_lsb,
)
from qerror.bn import BNInconsistency
from qerror.bn import reestimate as reestimate_bn
from qerror.calibration import calibrate, observed_range, qparams_from_range
from qerror.correction import (
    MeanSource,
    analytic_bias_correction,
    bias_correction,
    empirical_bias_correction,
    predicted_local_drift,
)
from qerror.empirical import ErrorStats, ErrorSummary, HistogramBins, measure_error
from qerror.propagate import (
    PropagationResult,
    QuantConfig,
    Target,
    UnsupportedModelError,
    calibrate_activations,
    measure,
    quantize_weights,
    quantized_forward,
)
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
    holm,
    mcnemar_from_counts,
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
    "uniform_bias_lsb",
    "BNInconsistency",
    "reestimate_bn",
    "MeanSource",
    "analytic_bias_correction",
    "bias_correction",
    "empirical_bias_correction",
    "predicted_local_drift",
    "PropagationResult",
    "QuantConfig",
    "Target",
    "UnsupportedModelError",
    "calibrate_activations",
    "measure",
    "quantize_weights",
    "quantized_forward",
    "mcnemar_from_counts",
    "ErrorInterval",
    "ErrorStats",
    "ErrorSummary",
    "HistogramBins",
    "IntervalMethod",
    "StatResult",
    "bias_test",
    "bootstrap_ci",
    "equivalence_test",
    "holm",
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
