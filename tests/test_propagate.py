"""qerror.nn.propagate, qerror.nn.bn and qerror.nn.correction on small networks.

The reference computations run the float model and the quantized model (built by hand with
qerror.fake_quantize) separately and reduce their difference with numpy; the instrumented
paired-batch pass must give the same figures. In float64 the only differences are in the
order of float64 additions, hence the relative tolerance of 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from qerror import QuantSpec, RoundingMode, fake_quantize
from qerror.nn import (
    MeanSource,
    QuantConfig,
    Target,
    UnsupportedModelError,
    analytic_bias_correction,
    bn_fed_layers,
    calibrate_activations,
    check_model,
    empirical_bias_correction,
    measure,
    predicted_local_drift,
    quantize_weights,
    quantized_forward,
    reestimate_bn,
)

RTOL64 = 1e-9


def tiny_resnet(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """conv-bn-relu, two torchvision BasicBlocks (one with a downsample), pool, linear."""
    torch.manual_seed(seed)
    block = torchvision.models.resnet.BasicBlock
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        block(8, 8), block(8, 16, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model = model.to(dtype)
    with torch.no_grad():  # BatchNorm statistics that fit the model's own activations
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()
        model(torch.randn(64, 1, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(9)))
    return model.eval()


def images(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup():
    model = tiny_resnet()
    calib = [images(32, 1)]
    test = [(images(16, 2), torch.arange(16) % 10), (images(16, 3), torch.arange(16) % 7)]
    return model, calib, test


def _manual_quantized(model, config, act_qp, weights):
    """The quantized network built by hand: fake-quantized weights and conv/linear inputs."""
    import copy

    q = copy.deepcopy(model)
    for name, m in q.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                if weights is not None:
                    m.weight.copy_(weights[name].weight)
            spec, qp = config.activation, act_qp[name]

            def pre(module, args, spec=spec, qp=qp):
                return (fake_quantize(args[0], spec, qp.scale, qp.zero_point),)
            m.register_forward_pre_hook(pre)
    return q


@pytest.mark.parametrize("mode", [RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO,
                                  RoundingMode.FLOOR])
def test_measure_matches_a_separate_float_and_quantized_run(setup, mode):
    model, calib, test = setup
    cfg = QuantConfig.make(4, mode)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    w = quantize_weights(model, cfg.weight)
    res = measure(model, test, cfg, act_qp, weights=w, local_samples=0)
    qmodel = _manual_quantized(model, cfg, act_qp, w)
    outs = {}

    def keep(tag):
        def hook(module, args, out):
            outs.setdefault((tag, module._qname), []).append(out.detach())
        return hook

    for mdl, tag in ((model, "f"), (qmodel, "q")):
        for name, m in mdl.named_modules():
            m._qname = name
        handles = [m.register_forward_hook(keep(tag)) for n, m in mdl.named_modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            logits = [mdl(x) for x, _ in test]
        for h in handles:
            h.remove()
        outs[(tag, "logits")] = logits
    for site in res.layers():
        yf = torch.cat(outs[("f", site.name)]).numpy()
        yq = torch.cat(outs[("q", site.name)]).numpy()
        e = yq - yf
        assert site.drift == pytest.approx(e.mean(), rel=RTOL64, abs=1e-15)
        assert site.mse == pytest.approx((e**2).mean(), rel=RTOL64)
        ch = tuple(i for i in range(e.ndim) if i != 1)
        np.testing.assert_allclose(site.drift_channel, e.mean(axis=ch), rtol=RTOL64, atol=1e-15)
        sqnr = 10 * np.log10((yf**2).mean() / (e**2).mean())
        assert site.sqnr_db == pytest.approx(sqnr, rel=RTOL64)
        assert site.drift_rel == pytest.approx(e.mean() / yf.std(), rel=1e-7)
    lf = torch.cat(outs[("f", "logits")])
    lq = torch.cat(outs[("q", "logits")])
    y = torch.cat([t for _, t in test])
    assert res.logits.agree == int((lf.argmax(1) == lq.argmax(1)).sum())
    assert res.logits.float_correct == int((lf.argmax(1) == y).sum())
    assert res.logits.quant_correct == int((lq.argmax(1) == y).sum())


def test_saturation_counts_equal_the_quantizers_own(setup):
    model, calib, test = setup
    cfg = QuantConfig.make(3, RoundingMode.NEAREST_EVEN, Target.ACTIVATIONS)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    wide = [(2 * x, y) for x, y in test]  # twice the calibration range: some values clamp
    res = measure(model, wide, cfg, act_qp)
    # The first layer's input is the image itself: count its clamped values directly.
    x = torch.cat([t for t, _ in wide])
    qp = act_qp["0"]
    _, sat = fake_quantize(x, cfg.activation, qp.scale, qp.zero_point, return_saturation=True)
    first = res.site("0")
    assert first.saturation_low == int(sat.low) / x.numel()
    assert first.saturation_high == int(sat.high) / x.numel()
    assert first.saturation_low > 0 and first.saturation_high > 0


def test_paired_halves_are_bit_identical_to_separate_runs_in_float32():
    model = tiny_resnet(dtype=torch.float32)
    x = images(8, 5, torch.float32)
    cfg = QuantConfig.make(8, RoundingMode.NEAREST_EVEN)
    act_qp = calibrate_activations(model, [x], cfg.activation)
    _check_halves(model, x, cfg, act_qp)


def _check_halves(model, x, cfg, act_qp):
    """measure()'s paired logits against model(x) and the quantized model run alone."""
    got = {}
    h = model[-1].register_forward_hook(lambda m, a, o: got.__setitem__("out", o.clone()))
    try:
        res = measure(model, [x], cfg, act_qp)
    finally:
        h.remove()
    with torch.inference_mode():
        ref = model(x)
        with quantized_forward(model, cfg, act_qp):
            q = model(x)
    n = x.shape[0]
    assert torch.equal(got["out"][:n], ref)
    assert torch.equal(got["out"][n:], q)
    return res, q


def _clean(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m)
               for m in model.modules())


def test_hooks_and_patches_are_removed_even_when_the_forward_fails(setup):
    model, calib, _ = setup
    cfg = QuantConfig.make(8)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    wrong = [torch.randn(4, 3, 12, 12, dtype=torch.float64)]  # 3 channels into a 1-channel conv
    with pytest.raises(RuntimeError):
        measure(model, wrong, cfg, act_qp)
    assert _clean(model)
    with pytest.raises(RuntimeError), quantized_forward(model, cfg, act_qp):
        model(wrong[0])
    assert _clean(model)
    with pytest.raises(RuntimeError):
        calibrate_activations(model, wrong, cfg.activation)
    assert _clean(model)
    assert not model.training


def test_measure_leaves_parameters_and_mode_untouched(setup):
    model, calib, test = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        cfg = QuantConfig.make(4, RoundingMode.STOCHASTIC)
        measure(model, test, cfg, calibrate_activations(model, calib, cfg.activation))
        assert model.training
    finally:
        model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_statistics_stream_across_batches(setup):
    """Two batches or their concatenation: the same figures (float64 sums in another order)."""
    model, calib, test = setup
    cfg = QuantConfig.make(6, RoundingMode.FLOOR)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    whole = [(torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]))]
    a = measure(model, test, cfg, act_qp, local_samples=1 << 20)
    b = measure(model, whole, cfg, act_qp, local_samples=1 << 20)
    c = measure(model, whole, cfg, act_qp, local_samples=1 << 20, pair_batch=5)
    for sa, sb, sc in zip(a.sites, b.sites, c.sites):
        assert sc.name == sa.name
        if sa.drift is not None:  # BatchNorm sites hold input statistics, not error
            assert sc.drift == pytest.approx(sa.drift, rel=RTOL64, abs=1e-15)
    assert c.logits.agree == a.logits.agree and c.images == a.images
    with pytest.raises(ValueError, match="pair_batch"):
        measure(model, whole, cfg, act_qp, pair_batch=0)
    for sa, sb in zip(a.sites, b.sites):
        assert sa.name == sb.name
        for attr in ("drift", "mse", "local_drift", "saturation_high"):
            va, vb = getattr(sa, attr), getattr(sb, attr)
            if va is not None:
                assert va == pytest.approx(vb, rel=RTOL64, abs=1e-15), (sa.name, attr)
    for attr in ("n", "float_correct", "quant_correct", "agree", "float_only", "quant_only"):
        assert getattr(a.logits, attr) == getattr(b.logits, attr)
    assert a.logits.sqnr_db == pytest.approx(b.logits.sqnr_db, rel=RTOL64)


def test_stochastic_rounding_is_reproducible_and_seeded(setup):
    model, calib, test = setup
    cfg = QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=3)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    r1 = measure(model, test, cfg, act_qp)
    r2 = measure(model, test, cfg, act_qp)
    r3 = measure(model, test, QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=4), act_qp)
    assert [s.drift for s in r1.sites] == [s.drift for s in r2.sites]
    assert [s.drift for s in r1.sites] != [s.drift for s in r3.sites]


def test_sites_cover_layers_batchnorms_and_blocks(setup):
    model, calib, test = setup
    cfg = QuantConfig.make(8)
    res = measure(model, test, cfg, calibrate_activations(model, calib, cfg.activation))
    kinds = {}
    for s in res.sites:
        kinds.setdefault(s.kind, []).append(s.name)
    assert len(kinds["conv"]) == 6 and kinds["linear"] == ["7"]
    assert len(kinds["bn"]) == 6 and kinds["block"] == ["3", "4"]
    assert [s.depth for s in res.layers()] == list(range(1, 8))
    frame = res.to_frame()
    assert set(frame.columns) == {"site", "kind", "order", "depth", "metric", "value", "se"}
    assert {"bn_mean_shift_qf_rms", "bn_var_ratio_qf_gmean"} <= set(frame.metric)


def test_bn_inconsistency_float_part_is_the_data_shift(setup):
    """With 16-bit nearest rounding the quantized BN input is the float one within 1e-3 σ."""
    model, calib, test = setup
    cfg = QuantConfig.make(16, RoundingMode.NEAREST_EVEN)
    res = measure(model, test, cfg, calibrate_activations(model, calib, cfg.activation))
    for s in res.sites:
        if s.kind == "bn":
            np.testing.assert_allclose(s.bn.mean_shift_quant, s.bn.mean_shift_float, atol=1e-3)
            assert np.all(np.abs(s.bn.mean_shift_quant_vs_float) < 1e-3)


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
    first-order error, bounded by the spread of the input quantizer's measured bias.
    """
    model, calib, _ = setup
    cfg = QuantConfig.make(8, RoundingMode.TOWARD_ZERO, Target.ACTIVATIONS)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    data = [images(256, 11)]
    res = measure(model, data, cfg, act_qp, local_samples=1 << 20, input_maps=True)
    pred = predicted_local_drift(model, cfg, res, act_qp, source=MeanSource.MEASURED)
    for s in res.layers():
        assert s.input_error_mean_lsb < -0.2  # truncation is biased low on these inputs
        p = float(np.mean(pred[s.name]))
        assert np.sign(p) == np.sign(s.local_drift) or abs(s.local_drift) < 3.3 * s.local_drift_se


def test_empirical_bias_correction_zeroes_the_local_mean_error_on_its_data(setup):
    model, calib, _ = setup
    cfg = QuantConfig.make(4, RoundingMode.FLOOR)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    w = quantize_weights(model, cfg.weight)
    corr = empirical_bias_correction(model, calib, cfg, act_qp, weights=w)
    res = measure(model, calib, cfg, act_qp, weights=w, corrections=corr, local_samples=1 << 20)
    for s in res.layers():
        np.testing.assert_allclose(s.local_drift_channel, 0.0, atol=1e-12)


def test_bn_fed_layers_follow_torchvision_blocks(setup):
    model, _, _ = setup
    assert sorted(bn_fed_layers(model)) == ["3.conv2", "4.conv2"]
    r50 = torchvision.models.resnet50()
    fed = bn_fed_layers(r50)
    assert len(fed) == 2 * 16 and fed["layer1.0.conv3"] is r50.layer1[0].bn2


# --------------------------------------------------------------------------- bad input

def test_unsupported_layers_are_refused_with_their_names():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.LSTM(2, 2))
    with pytest.raises(UnsupportedModelError, match="Conv1d, LSTM"):
        check_model(model)


def test_a_model_without_batchnorm_is_refused_where_batchnorm_is_needed():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    check_model(model)
    with pytest.raises(UnsupportedModelError, match="no BatchNorm2d"):
        check_model(model, need_batchnorm=True)
    with pytest.raises(UnsupportedModelError, match="no BatchNorm2d"):
        reestimate_bn(model, [torch.randn(2, 1, 3, 3)], QuantConfig.make(8))


def test_configs_that_cannot_run_are_refused(setup):
    model, _calib, test = setup
    with pytest.raises(ValueError, match="quantizes nothing"):
        QuantConfig(None, None)
    with pytest.raises(ValueError, match="per tensor"):
        QuantConfig(None, QuantSpec(axis=0))
    with pytest.raises(ValueError, match="between 2 and 16"):
        QuantConfig.make(1)
    with pytest.raises(ValueError, match="target 'everything' is not one of"):
        QuantConfig.make(8, target="everything")
    with pytest.raises(ValueError, match="no activation qparams"):
        measure(model, test, QuantConfig.make(8), {})
    with pytest.raises(ValueError, match="NaN or Inf"):
        measure(model, [torch.full((2, 1, 12, 12), float("nan"), dtype=torch.float64)],
                QuantConfig.make(8, target=Target.WEIGHTS))
    with pytest.raises(ValueError, match="labels of shape"):
        measure(model, [(images(4, 0), torch.zeros(3))], QuantConfig.make(8, target="weights"))
    assert _clean(model)


def test_bn_and_block_outputs_can_be_quantized_too():
    model = tiny_resnet(dtype=torch.float32)
    x = images(8, 5, torch.float32)
    cfg = QuantConfig.make(6, RoundingMode.NEAREST_EVEN, bn_outputs=True, block_outputs=True)
    act_qp = calibrate_activations(model, [x], cfg.activation, outputs=True)
    assert {"1.output", "3.output", "4.output", "3.bn2.output"} <= set(act_qp)
    res, q = _check_halves(model, x, cfg, act_qp)
    with torch.inference_mode(), quantized_forward(model, QuantConfig.make(6), act_qp):
        q_inputs_only = model(x)
    assert not torch.equal(q, q_inputs_only)
    # the BatchNorm's own output quantizer: its error is that of round-to-nearest in LSB
    bn = res.site("1")
    assert bn.saturation_low == 0 and bn.saturation_high == 0  # calibrated on these images
    assert abs(bn.input_error_mean_lsb) < 0.5 and bn.input_error_mse_lsb <= 0.25
    assert _clean(model)
    with pytest.raises(ValueError, match="outputs=True"):
        measure(model, [x], cfg, calibrate_activations(model, [x], cfg.activation))
    with pytest.raises(ValueError, match="activation spec"):
        QuantConfig(QuantSpec(axis=0), None, bn_outputs=True)


def test_bn_float_input_statistics_equal_a_direct_computation(setup):
    model, calib, test = setup
    cfg = QuantConfig.make(6, RoundingMode.TOWARD_ZERO)
    res = measure(model, test, cfg, calibrate_activations(model, calib, cfg.activation))
    inputs = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].detach()))
        for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            for x, _ in test:
                model(x)
    finally:
        for h in handles:
            h.remove()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            x = torch.cat(inputs[name]).numpy()
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
            sd = np.sqrt(m.running_var.numpy())
            bn = res.site(name).bn
            np.testing.assert_allclose(bn.mean_shift_float, (mean - m.running_mean.numpy()) / sd,
                                       rtol=RTOL64, atol=1e-12)
            np.testing.assert_allclose(bn.var_ratio_float, var / m.running_var.numpy(),
                                       rtol=1e-8)
