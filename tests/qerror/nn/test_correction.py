"""qerror.nn.correction: predicted drift, bias correction, BN re-estimation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from qerror import RoundingMode
from qerror.nn import (
    MeanSource,
    QuantConfig,
    Target,
    analytic_bias_correction,
    calibrate_activations,
    empirical_bias_correction,
    measure,
    predicted_local_drift,
    quantize_weights,
    quantized_forward,
    reestimate_bn,
)
from tests.qerror.nn.nets import images


def test_bn_reestimation_matches_float_statistics_at_high_precision_and_spares_the_model(setup):
    model, calib, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QuantConfig.make(16, RoundingMode.NEAREST_EVEN)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    stats = reestimate_bn(model, calib, cfg, act_qp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # float reference: the same procedure without quantization
    import copy

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for x in calib:
            ref(x)
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            mean, var = stats[name]
            # 16-bit steps are ~1e-4 of each range: means agree to that order
            np.testing.assert_allclose(mean, m.running_mean, atol=1e-3)
            np.testing.assert_allclose(var, m.running_var, rtol=1e-3, atol=1e-4)


def test_bn_reestimation_makes_the_first_batchnorm_consistent(setup):
    """On the data it was estimated from, the first BN (no BN before it) has zero mean shift."""
    model, calib, _ = setup
    cfg = QuantConfig.make(4, RoundingMode.TOWARD_ZERO)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    w = quantize_weights(model, cfg.weight)
    stats = reestimate_bn(model, calib, cfg, act_qp, weights=w)
    before = measure(model, calib, cfg, act_qp, weights=w).site("1").bn
    after = measure(model, calib, cfg, act_qp, weights=w, bn_stats=stats).site("1").bn
    assert np.max(np.abs(before.mean_shift_quant)) > 0.05
    np.testing.assert_allclose(after.mean_shift_quant, 0.0, atol=1e-12)
    n = calib[0].shape[0] * 12 * 12  # running_var is unbiased, the batch variance is not
    np.testing.assert_allclose(after.var_ratio_quant, (n - 1) / n, rtol=1e-12)


def test_the_plain_quantized_forward_applies_both_remedies_as_measure_does(setup):
    """quantized_forward(bn_stats=, corrections=) is bit for bit the quantized half of
    measure() with the same remedies: accuracy with a remedy needs no paired pass."""
    model, calib, test = setup
    cfg = QuantConfig.make(4, RoundingMode.TOWARD_ZERO)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    w = quantize_weights(model, cfg.weight)
    stats = reestimate_bn(model, calib, cfg, act_qp, weights=w)
    corr = empirical_bias_correction(model, calib, cfg, act_qp, weights=w)
    x = test[0][0]
    got = {}
    h = model[-1].register_forward_hook(lambda m, a, o: got.__setitem__("out", o.clone()))
    try:
        measure(model, [x], cfg, act_qp, weights=w, bn_stats=stats, corrections=corr,
                pair_batch=x.shape[0])  # one paired pass
    finally:
        h.remove()
    with torch.inference_mode():
        with quantized_forward(model, cfg, act_qp, weights=w, bn_stats=stats,
                               corrections=corr):
            q = model(x)
        plain = model(x)
        with quantized_forward(model, cfg, act_qp, weights=w):
            unremedied = model(x)
    assert torch.equal(got["out"][x.shape[0]:], q)
    assert not torch.equal(q, unremedied) and not torch.equal(q, plain)


def test_bn_stats_for_a_layer_that_is_not_a_batchnorm_is_refused(setup):
    model, calib, _ = setup
    cfg = QuantConfig.make(8, RoundingMode.NEAREST_EVEN, Target.WEIGHTS)
    bad = {"7": (torch.zeros(10), torch.ones(10))}
    with pytest.raises(ValueError, match="bn_stats names '7', which is not a BatchNorm2d"):
        with quantized_forward(model, cfg, bn_stats=bad):
            pass


def test_predicted_drift_is_exact_for_weight_errors(setup):
    """E[conv(x, ΔW)] = conv(E[x], ΔW): with float inputs the prediction is the measurement."""
    model, calib, _test = setup
    cfg = QuantConfig.make(4, RoundingMode.TOWARD_ZERO, Target.WEIGHTS)
    w = quantize_weights(model, cfg.weight)
    res = measure(model, calib, cfg, weights=w, local_samples=1 << 20, input_maps=True)
    pred = predicted_local_drift(model, cfg, res, weights=w, source=MeanSource.MEASURED)
    corr = analytic_bias_correction(model, cfg, res, weights=w, source=MeanSource.MEASURED)
    for s in res.layers():
        np.testing.assert_allclose(pred[s.name], s.local_drift_channel, rtol=1e-8, atol=1e-14)
        np.testing.assert_array_equal(corr[s.name].numpy(), -pred[s.name])


def test_predicted_activation_drift_of_truncation_within_its_sampling_error(setup):
    """Truncating post-ReLU inputs: the uniform model's −½·P(x>0) LSB per input, through Ŵ.

    Each prediction is compared with the measured local mean error; α = 0.001 per layer
    with a z-bound on the measured mean's standard error over images, plus the model's own
    first-order error: the uniform model's input bias −½(P(x>0) − P(x<0)) LSB differs from
    the input quantizer's measured bias by δ LSB, which moves a layer's mean output by at
    most s·|δ|·mean_c Σ|W_c| (a uniform shift of every input through the weights).
    """
    model, calib, _ = setup
    cfg = QuantConfig.make(8, RoundingMode.TOWARD_ZERO, Target.ACTIVATIONS)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    data = [images(256, 11)]
    res = measure(model, data, cfg, act_qp, local_samples=1 << 20, input_maps=True)
    pred = predicted_local_drift(model, cfg, res, act_qp, source=MeanSource.MEASURED)
    modules = dict(model.named_modules())
    z = stats.norm.ppf(1 - 0.001 / 2)
    for s in res.layers():
        assert s.input_error_mean_lsb < -0.2  # truncation is biased low on these inputs
        p = float(np.mean(pred[s.name]))
        model_bias_lsb = float(np.mean(-0.5 * (s.input_pos_map - s.input_neg_map)))
        w = modules[s.name].weight.detach()
        weight_l1 = float(w.abs().reshape(w.shape[0], -1).sum(1).mean())
        model_error = act_qp[s.name].scale * abs(s.input_error_mean_lsb - model_bias_lsb) \
            * weight_l1
        assert abs(p - s.local_drift) <= z * s.local_drift_se + model_error, s.name


def test_empirical_bias_correction_zeroes_the_local_mean_error_on_its_data(setup):
    model, calib, _ = setup
    cfg = QuantConfig.make(4, RoundingMode.FLOOR)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    w = quantize_weights(model, cfg.weight)
    corr = empirical_bias_correction(model, calib, cfg, act_qp, weights=w)
    res = measure(model, calib, cfg, act_qp, weights=w, corrections=corr, local_samples=1 << 20)
    for s in res.layers():
        np.testing.assert_allclose(s.local_drift_channel, 0.0, atol=1e-12)
