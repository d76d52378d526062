"""Everything that acts on a network: propagation, BatchNorm, remedies, INT8, models.

The wing's modules share one private anatomy module (model checks, layer sites, hooks,
BatchNorm folding, the activation-range observer) and import the flat primitives
(:mod:`qerror.rounding`, :mod:`qerror.quantizer`, :mod:`qerror.calibration`,
:mod:`qerror.analytic`, ...), never the other way round.

* :mod:`qerror.nn.propagate`: the paired batch, drift, SQNR, saturation along depth; its
  per (image, channel) sums in one compiled pass (:func:`channel_sums`,
  :func:`difference_sums`, from the private :mod:`qerror.nn._moments`; whether that pass
  may run here: :func:`compiled_sums_enabled`);
* :mod:`qerror.nn.bn`: BatchNorm inconsistency;
* :mod:`qerror.nn.correction`: predicted drift, bias correction, BN re-estimation;
* :mod:`qerror.nn.int8`: the simulation held against PyTorch's real INT8 kernels;
* :mod:`qerror.nn.growth`: growth of the error with path depth, with bootstrap intervals;
* :mod:`qerror.nn.early_exit`: exit heads, exit policies, calibration and MACs;
* :mod:`qerror.nn.pt2e`: real INT8 on oneDNN through torchao's PT2E flow, stage by stage;
* :mod:`qerror.nn.models`: the Fashion-MNIST ResNets, ImageNet weights, checkpoints;
* :mod:`qerror.nn.training`: the one training loop (resumable, hooks, parameter selection,
  ``--device`` and torchrun data parallelism);
* :mod:`qerror.nn.parallel`: the collectives that measurement and training share under
  torchrun (contiguous shares, exact merging of sums, broadcast, gather);
* :mod:`qerror.nn.adaround`: learned rounding (AdaRound), layer by layer, on the weight grid;
* :mod:`qerror.nn.geometry`: map sizes and the kernel taps that see data, per layer;
* :mod:`qerror.nn.updown`: random up/down roundings of one layer against nearest (task loss,
  its Taylor estimate, local MSE).
"""

from qerror.nn._anatomy import (
    LAYERS,
    UnsupportedModelError,
    bn_fed_layers,
    check_model,
    eval_mode,
    fold_bn,
    layer_names,
    model_device,
    path_depths,
)
from qerror.nn._moments import channel_sums, compiled_sums_enabled, difference_sums
from qerror.nn.adaround import (
    AdaRoundLayer,
    AdaRoundResult,
    AdaRoundSettings,
    adaround,
    adaround_weights,
    apply_rounding,
    rectified_sigmoid,
)
from qerror.nn.bn import BNInconsistency, estimate_running_stats, running_stats
from qerror.nn.correction import (
    MeanSource,
    analytic_bias_correction,
    bias_correction,
    empirical_bias_correction,
    predicted_local_drift,
    reestimate_bn,
)
from qerror.nn.early_exit import (
    CrossValidated,
    EarlyExitResNet,
    ExitCalibration,
    ExitCosts,
    ExitPolicy,
    ExitResult,
    ExitRule,
    RefinedRule,
    SelectionProcedure,
    calibrate_exits,
    choose_operating_point,
    compare_exits,
    count_macs,
    cross_validate_selection,
    exit_costs,
    exit_result_from_logits,
    exits_per_class,
    expected_calibration_error,
    fit_temperature,
    qualifies,
    refine_thresholds,
    run_early_exit,
    select_rule,
    selection_order,
    threshold_sweep,
)
from qerror.nn.geometry import LayerGeometry, layer_geometry, live_taps
from qerror.nn.propagate import (
    LogitResult,
    MadeFor,
    PropagationResult,
    QuantConfig,
    QuantizedWeights,
    SiteResult,
    Target,
    calibrate_activations,
    check_layer_params,
    check_made_for,
    default_pair_batch,
    local_error_means,
    measure,
    measure_many,
    output_key,
    paired_forward,
    paired_forward_many,
    quantize_weights,
    quantized_forward,
    sqnr_db,
)
from qerror.nn.pt2e import Int8ExitStages, quantize_exit_stages, quantize_pt2e, untie_relus
from qerror.nn.training import (
    Batch,
    Device,
    Evaluation,
    FitResult,
    Placement,
    Schedule,
    TrainConfig,
    distributed,
    fit,
    tensor_batches,
)
from qerror.nn.updown import UpDownResult, middle_layer, updown_experiment

__all__ = [
    "LAYERS",
    "BNInconsistency",
    "Batch",
    "Device",
    "Evaluation",
    "FitResult",
    "Placement",
    "Schedule",
    "TrainConfig",
    "distributed",
    "fit",
    "tensor_batches",
    "EarlyExitResNet",
    "ExitCalibration",
    "ExitCosts",
    "ExitPolicy",
    "ExitResult",
    "ExitRule",
    "Int8ExitStages",
    "LogitResult",
    "MadeFor",
    "MeanSource",
    "PropagationResult",
    "QuantConfig",
    "QuantizedWeights",
    "RefinedRule",
    "SiteResult",
    "Target",
    "UnsupportedModelError",
    "analytic_bias_correction",
    "bias_correction",
    "bn_fed_layers",
    "calibrate_activations",
    "calibrate_exits",
    "channel_sums",
    "check_layer_params",
    "check_made_for",
    "check_model",
    "compiled_sums_enabled",
    "count_macs",
    "difference_sums",
    "empirical_bias_correction",
    "eval_mode",
    "exit_costs",
    "expected_calibration_error",
    "fit_temperature",
    "fold_bn",
    "LayerGeometry",
    "layer_geometry",
    "layer_names",
    "live_taps",
    "model_device",
    "default_pair_batch",
    "local_error_means",
    "measure",
    "measure_many",
    "output_key",
    "paired_forward",
    "paired_forward_many",
    "path_depths",
    "predicted_local_drift",
    "quantize_exit_stages",
    "quantize_pt2e",
    "quantize_weights",
    "quantized_forward",
    "qualifies",
    "reestimate_bn",
    "refine_thresholds",
    "run_early_exit",
    "running_stats",
    "selection_order",
    "sqnr_db",
    "choose_operating_point",
    "compare_exits",
    "exit_result_from_logits",
    "exits_per_class",
    "threshold_sweep",
    "CrossValidated",
    "SelectionProcedure",
    "cross_validate_selection",
    "select_rule",
    "estimate_running_stats",
    "untie_relus",
    "AdaRoundLayer",
    "AdaRoundResult",
    "AdaRoundSettings",
    "adaround",
    "adaround_weights",
    "apply_rounding",
    "rectified_sigmoid",
    "UpDownResult",
    "middle_layer",
    "updown_experiment",
]
