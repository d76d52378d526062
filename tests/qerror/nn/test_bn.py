"""qerror.nn.bn: BatchNorm inconsistency, its float (data-shift) part and its input statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qerror import RoundingMode
from qerror.nn import QuantConfig, calibrate_activations, measure
from qerror.nn.bn import estimate_running_stats
from tests.qerror.nn.nets import RTOL64


def test_bn_inconsistency_float_part_is_the_data_shift(setup):
    """With 16-bit nearest rounding the quantized BN input is the float one within 1e-3 σ,
    and with 8 bits it is not: the statistic sees rounding.

    The ranges are calibrated on the test images too, so that no value is clipped: calibrated
    on the 32 calibration images alone, 0.04 % of the test activations fall outside, and the
    clipping, not the rounding, moves the 16-bit means by up to 7.8e-4 σ on these images and
    by 3.7e-3 σ on others. Without it the worst 16-bit shift is 3.3e-5 σ and the 8-bit one
    6.3e-3 σ (rounding error falls about 4x per bit pair: 256x predicted, 190x seen): the
    bound 1e-3 σ lies between them, a factor of 30 from the first and 6 from the second.
    """
    model, calib, test = setup
    images = calib + [x for x, _ in test]

    def worst(bits):
        cfg = QuantConfig.make(bits, RoundingMode.NEAREST_EVEN)
        res = measure(model, test, cfg, calibrate_activations(model, images, cfg.activation))
        bns = [s for s in res.sites if s.kind == "bn"]
        assert bns and all(s.saturation_low == s.saturation_high == 0 for s in res.layers())
        for s in bns:
            np.testing.assert_allclose(s.bn.mean_shift_quant - s.bn.mean_shift_float,
                                       s.bn.mean_shift_quant_vs_float, atol=1e-12)
        return max(float(np.abs(s.bn.mean_shift_quant_vs_float).max()) for s in bns)

    assert worst(16) < 1e-3 < worst(8)


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


def test_estimate_running_stats_gives_the_inputs_own_mean_and_variance():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(bn)
    batches = [torch.randn(4, 3, 5, 5) * 2 + 1, torch.randn(6, 3, 5, 5) - 3]
    estimate_running_stats(model, batches)
    assert not model.training and bn.momentum is None
    # momentum=None keeps the plain average over batches of each batch's statistics (the
    # variance unbiased within its batch), float32 sums of at most 150 terms: rtol 1e-5
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True)
                             for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, variances, rtol=1e-5, atol=1e-6)


def test_estimate_running_stats_trains_batchnorm_alone_and_fails_without_a_trace():
    """Only the BatchNorm2d layers run in training mode (dropout stays off, a BatchNorm1d
    keeps its statistics); no batch, or a batch that fails, leaves the model as it was;
    running_stats returns copies that a re-estimation does not overwrite."""
    import pytest

    from qerror.nn.bn import running_stats

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4 * 9, 6), nn.BatchNorm1d(6))
    with torch.no_grad():
        model[2].running_mean.fill_(0.7)
        model[5].running_mean.fill_(0.3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = running_stats(model)
    for bad in ([], [torch.randn(4, 5, 3, 3)]):  # nothing; the wrong channel count
        with pytest.raises((ValueError, RuntimeError)):
            estimate_running_stats(model, bad)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(m.training for m in model.modules()) and model[2].momentum == 0.1
    x = torch.randn(8, 3, 3, 3)
    estimate_running_stats(model, [x])
    assert not model.training and torch.equal(model[5].running_mean, before["5.running_mean"])
    with torch.no_grad():  # the dropout was off: the statistics of the plain convolution
        y = model[0](x)
    torch.testing.assert_close(model[2].running_mean, y.mean(dim=(0, 2, 3)))
    assert torch.equal(snapshot["2"][0], before["2.running_mean"])


def test_estimate_running_stats_keeps_a_batchnorm_the_forward_never_calls():
    """A BatchNorm2d off the forward path (an unused head's) has no input to estimate from:
    it keeps its statistics, count and momentum (it was reset to mean 0, variance 1, as
    if estimated); the called one gets its input's."""

    class Headed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
            self.head = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Headed()
    with torch.no_grad():
        model.head.running_mean.fill_(0.7)
        model.head.running_var.fill_(2.5)
        model.head.num_batches_tracked.fill_(40)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    x = torch.randn(4, 1, 5, 5)
    estimate_running_stats(model, [x])
    assert all(torch.equal(before[k], v) for k, v in model.head.state_dict().items())
    assert model.head.momentum == 0.1 and model.body[1].momentum is None
    assert not model.training and int(model.body[1].num_batches_tracked) == 1
    with torch.no_grad():
        y = model.body[0](x)
    torch.testing.assert_close(model.body[1].running_mean, y.mean(dim=(0, 2, 3)))


def test_running_stats_refuses_a_batchnorm_without_running_statistics():
    """It was an AttributeError ('NoneType' object has no attribute 'detach')."""
    from qerror.nn import UnsupportedModelError
    from qerror.nn.bn import running_stats

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2),
                          nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(UnsupportedModelError,
                       match=r"BatchNorm2d layers '2' keep no running statistics .* there are "
                             r"none to copy\. Build them with track_running_stats=True"):
        running_stats(model)
    assert issubclass(UnsupportedModelError, ValueError)
    assert running_stats(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))) == {}


def test_bn_summary_counts_a_collapsed_channel_and_leaves_out_dead_ones():
    from qerror.nn.bn import BNInconsistency

    ones = np.ones(3)
    # channel 0 collapsed under quantization (variance 0), channel 2 dead (running variance 0)
    res = BNInconsistency.from_stats(mean_f=np.zeros(3), var_f=np.array([4.0, 1.0, 0.0]),
                                     mean_q=np.zeros(3), var_q=np.array([0.0, 2.0, 0.0]),
                                     mean_run=np.zeros(3), var_run=np.array([4.0, 1.0, 0.0]))
    summary = res.summary()
    assert summary["bn_var_collapsed_qf_count"] == 1.0
    assert summary["bn_var_ratio_qf_gmean"] == 2.0  # the other live channel's ratio
    assert summary["bn_var_ratio_float_gmean"] == 1.0  # the dead channel left out
    healthy = BNInconsistency.from_stats(np.zeros(3), 2 * ones, np.zeros(3), 8 * ones,
                                         np.zeros(3), ones)
    assert healthy.summary()["bn_var_ratio_qf_gmean"] == 4.0
    assert healthy.summary()["bn_var_collapsed_qf_count"] == 0.0
    dead = BNInconsistency.from_stats(np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1),
                                      np.zeros(1), np.zeros(1))
    assert np.isnan(dead.summary()["bn_var_ratio_quant_gmean"])
    assert dead.summary()["bn_var_collapsed_qf_count"] == 0.0  # 0/0: not a collapse
    assert dead.summary()["bn_var_created_qf_count"] == 0.0  # nor a creation


def test_bn_summary_counts_a_channel_whose_variance_quantization_created():
    # channel 1's float input is constant (σ²_f = 0), its quantized input varies: the ratio
    # is infinite, left out of the geometric mean and counted; channel 2 is dead in the
    # running statistics (σ²_run = 0) yet its σ²_q/σ²_f = 3 stays in the qf figure
    from qerror.nn.bn import BNInconsistency

    res = BNInconsistency.from_stats(mean_f=np.zeros(3), var_f=np.array([1.0, 0.0, 1.0]),
                                     mean_q=np.zeros(3), var_q=np.array([1.0, 4.0, 3.0]),
                                     mean_run=np.zeros(3), var_run=np.array([1.0, 1.0, 0.0]))
    summary = res.summary()
    assert summary["bn_var_created_qf_count"] == 1.0
    assert summary["bn_var_collapsed_qf_count"] == 0.0
    assert summary["bn_var_ratio_qf_gmean"] == pytest.approx(3.0 ** 0.5, rel=1e-15)
    assert summary["bn_var_ratio_quant_gmean"] == pytest.approx(2.0, rel=1e-15)  # 1 and 4


def _moments_layer(rng, n: int, c: int, shift: np.ndarray, noise: float):
    """One BatchNorm's per-image moments on 1×1 maps: float inputs N(2, 1) per channel,
    quantized ones shifted by ``shift`` plus independent noise of std ``noise``; running
    statistics those of the float input's law (mean 2, variance 1)."""
    from qerror.nn.bn import BNImageMoments

    f = 2.0 + rng.standard_normal((n, c))
    q = f + shift + noise * rng.standard_normal((n, c))
    return BNImageMoments(f, f * f, q, q * q, np.full(c, 2.0), np.ones(c), 1, 2.0**-53)


def _false_claims(sets: int, at_threshold: int, seed: int):
    """Over ``sets`` simulated sets of four layers (100 images, 16 channels, 1×1 maps), of
    which ``at_threshold`` have a true mean shift's RMS exactly 0.1 (image noise 0.3 of the
    float std: log variance ratio log(1.09) ≈ 0.086, under it) and the rest none (noise
    0.05): how often ``some_lo`` and ``all_hi`` make a false claim about 0.1, and per set
    one threshold layer's plain figure and its mean shift's squared RMS, less the noise
    term (:meth:`qerror.nn.bn.BNImageMoments.shift_noise`)."""
    from qerror.nn.bn import inconsistency_bounds

    rng = np.random.default_rng(seed)
    some = under = 0
    plain, debiased = [], []
    for r in range(sets):
        layers = {}
        for j in range(4):
            sign = rng.choice([-1.0, 1.0], 16)
            if j < at_threshold:
                layers[f"bn{j}"] = _moments_layer(rng, 100, 16, 0.1 * sign, 0.3)
            else:
                layers[f"bn{j}"] = _moments_layer(rng, 100, 16, 0.0 * sign, 0.05)
        b = inconsistency_bounds(layers, alpha=0.05, resamples=200, seed=r)
        some += b.some_lo > 0.1
        under += b.all_hi < 0.1
        first = layers["bn0"]
        plain.append(float(first.figures(np.ones((1, 100)))[0]))
        shift = (first.mean_q - first.mean_f).mean(axis=0)  # σ_run = 1
        debiased.append(float(np.mean(shift * shift)) - first.shift_noise())
    return some, under, np.array(plain), np.array(debiased)


def test_inconsistency_bounds_hold_their_level_at_the_threshold():
    """False claims about the threshold 0.1 at α = 0.05, each count asserted inside the
    binomial acceptance region of level α at META = 1e-3 (z = 3.09): ``some_lo`` above 0.1
    with all four layers' mean shifts exactly at it (measured 1.2 % and 2.1 % of 1200 sets
    in two draws, qerror.nn.bn.inconsistency_bounds' Notes) and ``all_hi`` under 0.1 with
    one layer at it and three far under (its worst case). The debiasing is what holds the
    first: a threshold layer's plain figure lies above 0.1 on average by more than z
    standard errors, while its mean shift's squared RMS less the noise term is 0.01 within
    them (without the debiasing 88 of these 1200 sets claimed, beyond the region's 83). Four sampled comparisons, three
    one-sided at META and one two-sided at 2 META: a false failure has probability at most
    5 META (Bonferroni)."""
    sets, alpha, z = 1200, 0.05, 3.09
    top = sets * alpha + z * np.sqrt(sets * alpha * (1 - alpha))
    some, under, plain, debiased = _false_claims(sets, 4, seed=7)
    assert some <= top and under == 0
    assert plain.mean() > 0.1 + z * np.std(plain, ddof=1) / np.sqrt(sets)
    assert abs(debiased.mean() - 0.01) <= z * np.std(debiased, ddof=1) / np.sqrt(sets)
    _, under, _, _ = _false_claims(sets, 1, seed=8)
    assert under <= top


def test_inconsistency_bounds_hold_their_level_where_the_parts_are_close():
    """One layer of 30 images whose figure's two parts are close (the shift's RMS 0.1, the
    log variance ratio log 1.09 ≈ 0.086), and one with no shift and a log ratio of
    log 1.0025: ``some_lo`` above the true figure at most as often as α = 0.05 allows, each
    count inside the binomial acceptance region of level META = 1e-3 (z = 3.09; two
    one-sided comparisons, a false failure at most 2 META). Bounding the larger part with
    the maximum's own standard error lay above the truth on 8.5 % and 19 % of such sets
    (2,000 each; qerror.nn.bn.inconsistency_bounds' Notes): 104 and 235 of these 1200, beyond
    the region's 83 (30 and 43 now)."""
    from qerror.nn.bn import inconsistency_bounds

    sets, alpha, z = 1200, 0.05, 3.09
    top = sets * alpha + z * np.sqrt(sets * alpha * (1 - alpha))
    for shift, noise, seed in ((0.1, 0.3, 21), (0.0, 0.05, 22)):
        truth = max(shift, np.log1p(noise * noise))
        rng = np.random.default_rng(seed)
        above = 0
        for r in range(sets):
            layer = _moments_layer(rng, 30, 16, shift * rng.choice([-1.0, 1.0], 16), noise)
            above += inconsistency_bounds({"a": layer}, alpha=alpha, resamples=200,
                                          seed=r).some_lo > truth
        assert above <= top, (shift, noise, above)


def test_inconsistency_bounds_find_a_shift_and_its_absence():
    """A shift of 0.5 float std in every channel of one layer of four is found (some_lo far
    above 0.1), and four layers without any shift are all under 0.1: each decided on the
    images (seeded), with the figure's sample value between the bounds."""
    from qerror.nn.bn import inconsistency_bounds

    rng = np.random.default_rng(11)
    none = np.zeros(32)
    layers = {f"bn{j}": _moments_layer(rng, 400, 32, none, 0.05) for j in range(3)}
    layers["bn3"] = _moments_layer(rng, 400, 32, np.full(32, 0.5), 0.05)
    b = inconsistency_bounds(layers, resamples=300)
    assert b.exceeds(0.1) is True and b.some_lo > 0.4
    quiet = {f"bn{j}": _moments_layer(rng, 400, 32, none, 0.05) for j in range(4)}
    assert inconsistency_bounds(quiet, resamples=300).exceeds(0.1) is False


def test_inconsistency_bounds_refuse_what_they_cannot_resample():
    from qerror.nn.bn import inconsistency_bounds

    rng = np.random.default_rng(0)
    a, b = _moments_layer(rng, 10, 4, 0.0, 0.1), _moments_layer(rng, 12, 4, 0.0, 0.1)
    with pytest.raises(ValueError, match="same images"):
        inconsistency_bounds({"a": a, "b": b})
    with pytest.raises(ValueError, match="no BatchNorm moments"):
        inconsistency_bounds({})
    with pytest.raises(ValueError, match="resamples"):
        inconsistency_bounds({"a": a}, resamples=10)
    with pytest.raises(ValueError, match="alpha"):
        inconsistency_bounds({"a": a}, alpha=1.5)
    # scipy's t quantile is -inf this far out (9 degrees of freedom): every bound was -inf or
    # inf and the network "inconsistent" whatever its figures
    with pytest.raises(ValueError, match=r"alpha=1e-300 over 1 BatchNorms is beyond the t "
                                         r"quantiles scipy computes at 9 degrees of freedom"):
        inconsistency_bounds({"a": a}, alpha=1e-300, resamples=100)
    # None drew fresh entropy and a Generator moved on: other bounds on every call
    for seed in (None, np.random.default_rng(1), -1, 1.5, True):
        with pytest.raises(ValueError if seed == -1 else TypeError,
                           match=r"seed \(fixed, so that the bootstrap's resamples are the same "
                                 r"on every call\) must be an int from 0 to 2\*\*64 - 1"):
            inconsistency_bounds({"a": a}, resamples=100, seed=seed)
    assert inconsistency_bounds({"a": a}, resamples=100, seed=np.int64(3)) \
        == inconsistency_bounds({"a": a}, resamples=100, seed=3)


def test_inconsistency_bounds_of_layers_without_a_figure_decide_nothing():
    """A layer whose every channel is dead (running variance 0) and constant has no figure:
    it is left out of both claims, and bounds over such layers alone are NaN (exceeds says
    None); beside a layer with a figure, that layer alone is bounded."""
    from qerror.nn.bn import BNImageMoments, inconsistency_bounds

    x = np.full((30, 3), 0.7)
    dead = BNImageMoments(x, x * x, x, x * x, np.zeros(3), np.zeros(3), 4, 2.0**-53)
    b = inconsistency_bounds({"a": dead, "b": dead}, resamples=100)
    assert np.isnan([b.worst, b.some_lo, b.all_hi]).all() and b.bounded == 0
    assert b.exceeds(0.1) is None
    live = _moments_layer(np.random.default_rng(1), 30, 3, np.full(3, 0.5), 0.05)
    b = inconsistency_bounds({"a": dead, "b": live}, resamples=100)
    assert b.bounded == 1 and b.layers == 2 and b.exceeds(0.1) is True


def test_image_moments_refuse_a_broken_measurement_and_wrong_shapes():
    """One nan image moment was resolved as a variance of 0, a collapsed channel: the layer's
    figure infinite and inconsistency_bounds claiming at any threshold that it exceeds; running
    statistics of another channel count failed in a broadcast deep inside."""
    from qerror.nn.bn import BNImageMoments, inconsistency_bounds

    rng = np.random.default_rng(0)
    f = 2.0 + rng.standard_normal((50, 4))
    q = f + 0.05 * rng.standard_normal((50, 4))
    ok = BNImageMoments(f, f * f, q, q * q, np.full(4, 2.0), np.ones(4), 1, 2.0**-53)
    assert inconsistency_bounds({"a": ok}, resamples=200).exceeds(0.5) is False
    broken = q.copy()
    broken[7, 3] = np.nan
    with pytest.raises(ValueError, match="mean_q holds 1 values that are not finite"):
        BNImageMoments(f, f * f, broken, broken * broken, np.full(4, 2.0), np.ones(4), 1,
                       2.0**-53)
    with pytest.raises(ValueError, match=r"running statistics \(C,\)"):
        BNImageMoments(f, f * f, q, q * q, np.full(3, 2.0), np.ones(3), 1, 2.0**-53)
    with pytest.raises(ValueError, match=r"must be \(N, C\)"):
        BNImageMoments(f, f * f, q[:, :3], q[:, :3] ** 2, np.full(4, 2.0), np.ones(4), 1,
                       2.0**-53)
    with pytest.raises(ValueError, match="variance >= 0"):
        BNImageMoments(f, f * f, q, q * q, np.full(4, 2.0), -np.ones(4), 1, 2.0**-53)


def test_estimate_running_stats_refuses_bad_input_and_takes_labelled_batches():
    """A batch with a NaN (which made every running statistic NaN), a batch of one image
    (the documented N >= 2), a model without BatchNorm2d or with one that keeps no
    statistics are refused and leave the model as it was; (images, labels) pairs, which
    the model was fed whole, give the statistics of their images."""
    from qerror.nn import UnsupportedModelError

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                             nn.Flatten(), nn.Linear(75, 2)).train()

    x = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    for bad, match in (([x, nan], "NaN"), ([x[:1]], "at least 2 images")):
        model = net()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            estimate_running_stats(model, bad)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(m.training for m in model.modules()) and model[1].momentum == 0.1
    plain = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()).train()
    with pytest.raises(UnsupportedModelError, match="no BatchNorm2d"):
        estimate_running_stats(plain, [x])
    assert plain.training
    untracked = net()
    untracked[1].track_running_stats = False
    with pytest.raises(UnsupportedModelError, match="keep no running statistics"):
        estimate_running_stats(untracked, [x])
    assert untracked[1].momentum == 0.1 and untracked.training
    model, labelled = net(), net()
    estimate_running_stats(model, [x])
    estimate_running_stats(labelled, [(x, torch.zeros(4, dtype=torch.long))])
    assert torch.equal(model[1].running_mean, labelled[1].running_mean)
    assert torch.equal(model[1].running_var, labelled[1].running_var)


def test_image_moments_take_real_arrays_and_refuse_other_values():
    """Lists passed the checks and broke later (``images``: 'list' object has no attribute
    'shape'); complex moments gave a complex figure; a NaN unit roundoff left a constant
    channel's rounding residue unresolved, its variance ratio an arbitrary number where both
    variances are 0 (no figure); a length below 1 bounded the rounding with a negative count."""
    from qerror.nn.bn import BNImageMoments, inconsistency_bounds

    rng = np.random.default_rng(0)
    f = 2.0 + rng.standard_normal((30, 4))
    q = f + 0.05 * rng.standard_normal((30, 4))
    run = (np.full(4, 2.0), np.ones(4))
    arrays = BNImageMoments(f, f * f, q, q * q, *run, 1, 2.0**-53)
    listed = BNImageMoments(f.tolist(), (f * f).tolist(), q.tolist(), (q * q).tolist(),
                            run[0].tolist(), run[1].tolist(), 1, 2.0**-53)
    assert listed.images == 30 and listed.mean_f.dtype == np.float64
    assert inconsistency_bounds({"a": listed}, resamples=100) \
        == inconsistency_bounds({"a": arrays}, resamples=100)
    for name, bad in (("mean_q", q.astype(complex)), ("mean_q", q.astype(str)),
                      ("mean_q", q > 2)):
        with pytest.raises(TypeError, match=f"{name} must hold real numbers"):
            BNImageMoments(f, f * f, bad, q * q, *run, 1, 2.0**-53)
    for length in (0, -3):
        with pytest.raises(ValueError, match="length"):
            BNImageMoments(f, f * f, q, q * q, *run, length, 2.0**-53)
    with pytest.raises(TypeError, match="length"):
        BNImageMoments(f, f * f, q, q * q, *run, 2.5, 2.0**-53)
    for u in (float("nan"), -1.0, 1.0):
        with pytest.raises(ValueError, match="unit roundoff"):
            BNImageMoments(f, f * f, q, q * q, *run, 1, u)


def test_image_moments_refuse_mean_squares_below_the_squared_means():
    """An image's mean square lies at or above its squared mean, up to the rounding the
    variances are resolved against: a negative mean square, or a variance given for it,
    was read as a variance collapsed by quantization (the layer's figure infinite, the
    bounds claiming it exceeds 1e9). The moments of a channel constant up to rounding pass."""
    from qerror.nn.bn import BNImageMoments

    rng = np.random.default_rng(0)
    f = 2.0 + rng.standard_normal((30, 4))
    q = f + 0.05 * rng.standard_normal((30, 4))
    run = (np.full(4, 2.0), np.ones(4))
    per_image_var = np.full_like(q, 0.01)  # a variance where the mean square belongs
    for sq_q in (-(q * q), per_image_var):
        with pytest.raises(ValueError, match=r"sq_q lies below the square of mean_q .* "
                                             r"image 0"):
            BNImageMoments(f, f * f, q, sq_q, *run, 1, 2.0**-53)
    # a float32 channel constant at 0.7 over 14×14 positions: its mean square computed
    # below the squared mean by rounding alone (7e-7 of it)
    x = torch.full((3, 2, 14, 14), 0.7)
    s, sq = x.sum(dim=(2, 3)).double() / 196, torch.linalg.vector_norm(
        x, dim=(2, 3)).square().double() / 196
    assert (sq - s * s < 0).all()
    BNImageMoments(s.numpy(), sq.numpy(), s.numpy(), sq.numpy(), np.zeros(2), np.ones(2), 196,
                   2.0**-24)


def test_image_moment_figures_refuse_weights_that_draw_no_images():
    """Weights are how often a resample draws each image: a row of zeros gave NaN, a
    negative weight a finite figure of no resample (0.047 for -1 and 3), a row of another
    length numpy's matmul message; a negative or NaN noise term moved the figure (1.0 for
    noise -1, the shift left out for NaN). Weights of any positive total give the figure
    of their proportions."""
    from qerror.nn.bn import BNImageMoments

    rng = np.random.default_rng(0)
    f = 2.0 + rng.standard_normal((20, 3))
    q = f + 0.1 * rng.standard_normal((20, 3))
    m = BNImageMoments(f, f * f, q, q * q, np.full(3, 2.0), np.ones(3), 1, 2.0**-53)
    assert m.figures(2.0 * np.ones(20))[0] == pytest.approx(m.figures(np.ones(20))[0],
                                                            rel=1e-14)
    for w, match in ((np.zeros(20), "draw no image"), (np.r_[-np.ones(10), 3 * np.ones(10)],
                                                         "finite and >= 0"),
                     (np.full(20, np.nan), "finite and >= 0"), (np.ones(19), r"\(B, 20\)"),
                     (np.ones((2, 2, 20)), r"\(B, 20\)")):
        with pytest.raises(ValueError, match=match):
            m.figures(w)
    for noise in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise"):
            m.figures(np.ones(20), noise)
