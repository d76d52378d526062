"""qerror.nn.propagate on small networks: the paired batch against separate runs.

The reference computations run the float model and the quantized model (built by hand with
qerror.fake_quantize) separately and reduce their difference with numpy; the instrumented
paired-batch pass must give the same figures. In float64 the only differences are in the
order of float64 additions, hence the relative tolerance of 1e-9.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qerror import QuantSpec, RangePolicy, RoundingMode, fake_quantize
from qerror.nn import (
    MadeFor,
    QuantConfig,
    Target,
    calibrate_activations,
    measure,
    measure_many,
    paired_forward,
    quantize_weights,
    quantized_forward,
    sqnr_db,
)
from qerror.nn.models import memory_format
from tests.qerror.nn.nets import RTOL64, images, tiny_resnet
from tests.qerror.nn.ranks import as_rank, record_calls, two_ranks


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
        assert site.drift_rel == pytest.approx(e.mean() / yf.std(), rel=RTOL64)
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


def test_config_carries_its_activation_range_policy_to_calibration():
    """A percentile policy on the config narrows every activation range below min-max,
    and an affine percentile of 50 or less is refused when the config is made."""
    model = tiny_resnet(dtype=torch.float32)
    x = images(8, 6, torch.float32)
    cfg = QuantConfig.make(8, activation_range=RangePolicy("percentile", percentile=99.0))
    assert QuantConfig.make(8).activation_range == RangePolicy()
    pct = calibrate_activations(model, [x], cfg.activation, cfg.activation_range)
    mm = calibrate_activations(model, [x], cfg.activation)
    assert pct.keys() == mm.keys()
    assert all(pct[n].scale < mm[n].scale for n in mm)
    with pytest.raises(ValueError, match="above 50"):
        QuantConfig.make(8, activation_range=RangePolicy("percentile", percentile=40.0))


def _check_halves(model, x, cfg, act_qp):
    """measure()'s paired logits against model(x) and the quantized model run alone."""
    got = {}
    h = model[-1].register_forward_hook(lambda m, a, o: got.__setitem__("out", o.clone()))
    try:
        res = measure(model, [x], cfg, act_qp, pair_batch=x.shape[0])  # one paired pass
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


def test_a_channels_last_model_runs_quantized_in_its_layout(setup):
    """Under qerror.nn.models.memory_format, weights quantized beforehand (contiguous) are
    handed to the convolutions in the model's channels_last layout, and the quantized
    network computes what it computes contiguous: same predictions, logits equal to the
    float64 rounding of other summation orders (a code moved across a rounding boundary
    would differ by a whole step, about 1e-2 of these logits)."""
    model, calib, test = setup
    x = test[0][0]
    for mode in (RoundingMode.TOWARD_ZERO, RoundingMode.STOCHASTIC):
        cfg = QuantConfig.make(6, mode, seed=4)
        act_qp = calibrate_activations(model, calib, cfg.activation)
        w = quantize_weights(model, cfg.weight, seed=4)
        with torch.inference_mode():
            with quantized_forward(model, cfg, act_qp, weights=w):
                ref = model(x)
            with memory_format(model), quantized_forward(model, cfg, act_qp, weights=w) as inst:
                got = model(x)
                for name, m in model.named_modules():
                    if isinstance(m, nn.Conv2d) and m.in_channels > 1:
                        qw = inst.arms[0].weights[name].weight
                        assert qw.is_contiguous(memory_format=torch.channels_last), name
                        assert torch.equal(qw, w[name].weight), name
        assert torch.equal(got.argmax(1), ref.argmax(1))
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), mode
        assert all(p.is_contiguous() for p in model.parameters())
    # a weights mapping with a key that names no weighted layer is passed over, as before
    extra = dict(w)
    extra["2"] = next(iter(w.values()))  # model[2] is a ReLU
    with memory_format(model), quantized_forward(model, cfg, act_qp, weights=extra):
        pass


def test_paired_forward_is_the_pass_measure_makes(setup):
    """paired_forward: measure's paired pass without its statistics, half for half."""
    model, calib, test = setup
    x = test[0][0]
    n = x.shape[0]
    for cfg in (QuantConfig.make(6, RoundingMode.TOWARD_ZERO),
                QuantConfig.make(4, RoundingMode.FLOOR, Target.WEIGHTS)):
        act_qp = calibrate_activations(model, calib, cfg.activation) \
            if cfg.activation is not None else None
        _res, q = _check_halves(model, x, cfg, act_qp)
        with torch.inference_mode(), paired_forward(model, cfg, act_qp):
            out = model(torch.cat([x, x]))
        with torch.inference_mode():
            assert torch.equal(out[:n], model(x))
        assert torch.equal(out[n:], q)
        assert _clean(model)


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


@pytest.mark.parametrize("mode, outputs", [(RoundingMode.TOWARD_ZERO, False),
                                           (RoundingMode.STOCHASTIC, False),
                                           (RoundingMode.STOCHASTIC, True)])
def test_a_batch_measured_in_passes_measures_what_one_pass_does(setup, mode, outputs):
    """A batch measured in passes (two of half its images, or passes of 3): every figure is
    that of one pass over the whole batch (float64 sums in another order), the local error
    included, which uses the first ``local_samples`` images of each batch whichever pass holds
    them; stochastic rounding too, whose every element draws the number of its place in the
    whole batch."""
    model, calib, test = setup
    cfg = QuantConfig.make(6, mode, seed=4, bn_outputs=outputs, block_outputs=outputs)
    act_qp = calibrate_activations(model, calib, cfg.activation, outputs=outputs)
    n = test[0][0].shape[0]
    for local in (0, 3, n // 2 + 2, n):
        one = measure(model, test, cfg, act_qp, local_samples=local, pair_batch=n)
        two = measure(model, test, cfg, act_qp, local_samples=local, pair_batch=n // 2)
        three = measure(model, test, cfg, act_qp, local_samples=local, pair_batch=3)
        for sa, sb, sc in zip(one.sites, two.sites, three.sites):
            assert sa.name == sb.name == sc.name
            for attr in ("drift", "mse", "local_drift", "local_mse", "input_error_mean_lsb",
                         "input_error_mse_lsb", "saturation_high", "saturation_low"):
                va = getattr(sa, attr)
                for other in (sb, sc):
                    vo = getattr(other, attr)
                    if va is None or (isinstance(va, float) and math.isnan(va)):
                        assert vo is None or math.isnan(vo), (sa.name, attr, local)
                    else:
                        assert vo == pytest.approx(va, rel=RTOL64, abs=1e-15), (sa.name, attr)
        for attr in ("n", "float_correct", "quant_correct", "agree", "float_only", "quant_only"):
            assert getattr(one.logits, attr) == getattr(two.logits, attr) == \
                getattr(three.logits, attr)


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
    assert set(frame.columns) == {"site", "kind", "order", "depth", "path_depth", "metric",
                                  "value", "se"}
    # execution order counts the downsample conv after its block's convs; path depth does not
    assert [s.path_depth for s in res.layers()] == [1, 2, 3, 4, 5, 4, 6]
    assert {"bn_mean_shift_qf_rms", "bn_var_ratio_qf_gmean"} <= set(frame.metric)


def test_configs_that_cannot_run_are_refused(setup):
    model, _calib, test = setup
    with pytest.raises(ValueError, match="quantizes nothing"):
        QuantConfig(None, None)
    with pytest.raises(ValueError, match="per tensor"):
        QuantConfig(None, QuantSpec(axis=0))
    with pytest.raises(ValueError, match="bits must be an int >= 2, got 1"):
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


@pytest.mark.parametrize("flag", ["bn_outputs", "block_outputs"])
def test_config_flags_that_are_not_bools_are_refused(flag):
    """QuantConfig read bn_outputs and block_outputs by truth value: bn_outputs='False'
    quantized every BatchNorm's output and was labelled '+bn' (a tiny CNN at 4 bits: logit
    SQNR 16.32 dB, that of bn_outputs=True, against 18.48 dB with False:
    /work/runs/s49/propagate/p7_flags.py). Now a TypeError naming the flag; numpy's bools
    are kept as Python's."""
    spec = QuantSpec(bits=4, signed=False)
    for value in ("False", 0, None, 1.0):
        with pytest.raises(TypeError, match=rf"QuantConfig.{flag} must be True or False"):
            QuantConfig(None, spec, **{flag: value})
        with pytest.raises(TypeError, match=rf"QuantConfig.{flag} must be True or False"):
            QuantConfig.make(4, **{flag: value})
    config = QuantConfig(None, spec, **{flag: np.bool_(True)})
    assert getattr(config, flag) is True and config == QuantConfig(None, spec, **{flag: True})


def _refused_and_clean(setup, kwargs, match, kind=ValueError):
    """measure with ``kwargs`` raises a ``kind`` matching ``match`` and leaves the model
    unpatched."""
    model, calib, test = setup
    cfg = QuantConfig.make(8)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    with pytest.raises(kind, match=match):
        measure(model, test, cfg, act_qp, **kwargs)
    assert _clean(model)


_LOCAL = r"local_samples \(a number of images\) must be an int >= 0"
_PAIR = r"pair_batch \(a number of images\) must be an int >= 1"


@pytest.mark.parametrize("kwargs, kind, match", [
    ({"local_samples": -5}, ValueError, _LOCAL),
    ({"local_samples": 2.5}, TypeError, _LOCAL),
    ({"local_samples": True}, TypeError, _LOCAL),
    ({"local_samples": None}, TypeError, _LOCAL),
    ({"pair_batch": 2.5}, TypeError, _PAIR),
    ({"pair_batch": "4"}, TypeError, _PAIR),
    ({"image_means": np.int64(-1)}, ValueError,
     r"image_means \(a number of images\) must be an int >= 0"),
    ({"first_batch": 1.0}, TypeError, r"first_batch \(a batch index\) must be an int >= 0"),
])
def test_counts_of_images_are_refused_unless_they_are_counts(setup, kwargs, kind, match):
    """A negative local_samples measured no local error and said nothing; 2.5 failed in a
    slice, "4" in range(). A value that is no integer is a TypeError (a ValueError before),
    as every count of the package."""
    _refused_and_clean(setup, kwargs, match, kind)


_NAN8 = torch.full((8,), float("nan"), dtype=torch.float64)
_ZERO8 = torch.zeros(8, dtype=torch.float64)


@pytest.mark.parametrize("kwargs, match", [
    ({"bn_stats": {"1": (_ZERO8, -torch.ones(8, dtype=torch.float64))}},
     r"bn_stats\['1'\] var holds negative"),
    ({"bn_stats": {"1": (_NAN8, torch.ones(8, dtype=torch.float64))}},
     r"bn_stats\['1'\] mean holds non-finite"),
    ({"bn_stats": {"1": (torch.zeros(3), torch.ones(3))}}, r"bn_stats\['1'\] mean has shape"),
    ({"corrections": {"0": _NAN8}}, r"corrections\['0'\] holds non-finite"),
])
def test_remedies_that_are_not_finite_statistics_are_refused_by_name(setup, kwargs, match):
    """A NaN or negative variance in re-estimated statistics, or a NaN bias correction, was
    met as non-finite data by the next layer's quantizer, whose message blamed the images
    ('x holds ... non-finite value(s)'); a wrong shape failed inside F.batch_norm."""
    _refused_and_clean(setup, kwargs, match)


def test_weights_for_a_configuration_that_quantizes_none_are_refused(setup):
    """An activations-only configuration runs with the float weights: weights given for it
    were not used, yet their error (mean, MSE, saturation) was reported beside the run."""
    model, calib, test = setup
    acts = QuantConfig.make(8, target=Target.ACTIVATIONS)
    act_qp = calibrate_activations(model, calib, acts.activation)
    w3 = quantize_weights(model, QuantConfig.make(3, RoundingMode.FLOOR).weight)
    with pytest.raises(ValueError, match=r"configuration 0 \(.*\), which quantizes no weights"):
        measure(model, test, acts, act_qp, weights=w3)
    both = QuantConfig.make(3, RoundingMode.FLOOR)
    with pytest.raises(ValueError, match="configuration 1"):
        measure_many(model, test, [both, acts], act_qp, weights=[w3, w3])
    with pytest.raises(ValueError, match="quantizes no weights"), \
            paired_forward(model, acts, act_qp, weights=w3):
        pass
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
    # The BatchNorm's own output quantizer: its error is that of round-to-nearest in LSB,
    # about uniform on [-1/2, 1/2] for values spread over many steps: mean 0 and MSE 1/12,
    # with standard errors sqrt(1/12 / n) and sqrt(1/180 / n) over n elements (the MSE's
    # from Var(e²) = 1/80 - 1/144 = 1/180). z = 3.89 (α = 1e-4, two-sided). A grid twice as
    # fine or coarse (MSE 1/48 or 1/3) and stochastic rounding (1/6) fail.
    bn = res.site("1")
    assert bn.saturation_low == 0 and bn.saturation_high == 0  # calibrated on these images
    n, z = bn.elements, 3.89
    assert n > 1000
    assert abs(bn.input_error_mean_lsb) <= z * math.sqrt(1 / 12 / n)
    assert abs(bn.input_error_mse_lsb - 1 / 12) <= z * math.sqrt(1 / 180 / n)
    assert _clean(model)
    with pytest.raises(ValueError, match="outputs=True"):
        measure(model, [x], cfg, calibrate_activations(model, [x], cfg.activation))
    with pytest.raises(ValueError, match="activation spec"):
        QuantConfig(QuantSpec(axis=0), None, bn_outputs=True)


def test_a_share_of_the_batches_rounds_as_it_does_within_the_whole(setup):
    """``first_batch``: the second batch measured alone, told its index, draws the stochastic
    stream it draws within the whole pass, so the two shares add up to the whole."""
    model, calib, test = setup
    cfg = QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=3)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    whole = measure(model, test, cfg, act_qp)
    first = measure(model, test[:1], cfg, act_qp)
    second = measure(model, test[1:], cfg, act_qp, first_batch=1)
    misplaced = measure(model, test[1:], cfg, act_qp)
    for s, a, b, m in zip(whole.sites, first.sites, second.sites, misplaced.sites):
        if s.drift is None:
            continue
        parts = (a.drift * a.elements + b.drift * b.elements) / (a.elements + b.elements)
        assert s.drift == pytest.approx(parts, rel=RTOL64, abs=1e-15), s.name
        if s.kind == "conv":
            # Without its index the share rounds with the first batch's stream.
            assert m.drift != b.drift, s.name
    for attr in ("quant_correct", "agree", "quant_only"):
        assert getattr(whole.logits, attr) == \
            getattr(first.logits, attr) + getattr(second.logits, attr)
    with pytest.raises(ValueError, match="first_batch"):
        measure(model, test, cfg, act_qp, first_batch=-1)


def test_quantized_forward_told_its_first_batch_draws_the_wholes_stream(setup):
    """``quantized_forward(first_batch=1)``: the second batch run alone, told its index,
    gives the logits it gives as the second call of a block started at 0 (the drift study's
    share of the headline's batches), and other logits without it."""
    model, calib, test = setup
    xs = [x for x, _ in test]
    cfg = QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=3)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    with torch.inference_mode():
        with quantized_forward(model, cfg, act_qp):
            whole = [model(x) for x in xs]
        with quantized_forward(model, cfg, act_qp, first_batch=1):
            second = model(xs[1])
        with quantized_forward(model, cfg, act_qp):
            misplaced = model(xs[1])
    assert torch.equal(second, whole[1])
    assert not torch.equal(misplaced, whole[1])
    with pytest.raises(TypeError, match="first_batch"):
        with quantized_forward(model, cfg, act_qp, first_batch=1.0):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device here (torch.cuda.is_available() is False)")
def test_cuda_measures_what_the_cpu_measures(setup):
    """The float64 network on a GPU: every figure as on the CPU. Convolutions sum in another
    order there (float64 round-off, RTOL64); a rounding decision could flip only for a value
    within that round-off of a step boundary, which Gaussian inputs hit with probability
    ~1e-13 per element, so the counts are compared exactly."""
    import copy

    from qerror.nn import correction

    model, calib, test = setup
    cfg = QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=3)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    cuda = copy.deepcopy(model).cuda()
    act_qp_cuda = calibrate_activations(cuda, calib, cfg.activation)
    for name, qp in act_qp.items():
        assert float(act_qp_cuda[name].scale) == pytest.approx(float(qp.scale), rel=RTOL64)
    on_cpu = measure(model, test, cfg, act_qp, input_maps=True, image_means=8)
    on_gpu = measure(cuda, test, cfg, act_qp, input_maps=True, image_means=8)
    for a, b in zip(on_cpu.sites, on_gpu.sites):
        for attr in ("drift", "mse", "sqnr_db", "float_std", "local_drift", "saturation_high",
                     "saturation_low"):
            va, vb = getattr(a, attr), getattr(b, attr)
            if va is not None:
                assert vb == pytest.approx(va, rel=RTOL64, abs=1e-15), (a.name, attr)
    for attr in ("n", "float_correct", "quant_correct", "agree", "float_only", "quant_only"):
        assert getattr(on_gpu.logits, attr) == getattr(on_cpu.logits, attr)
    bn_cpu = correction.reestimate_bn(model, calib, cfg, act_qp)
    bn_gpu = correction.reestimate_bn(cuda, calib, cfg, act_qp)
    for name, (mean, var) in bn_cpu.items():
        torch.testing.assert_close(bn_gpu[name][0].cpu(), mean, rtol=RTOL64, atol=1e-15)
        torch.testing.assert_close(bn_gpu[name][1].cpu(), var, rtol=RTOL64, atol=1e-15)
    pred_cpu = correction.predicted_local_drift(model, cfg, on_cpu, act_qp)
    pred_gpu = correction.predicted_local_drift(cuda, cfg, on_gpu, act_qp)
    for name, p in pred_cpu.items():
        np.testing.assert_allclose(pred_gpu[name], p, rtol=RTOL64, atol=1e-15)


def _assert_same_result(a, b, where: str) -> None:
    """Every field of two PropagationResults equal: counts exactly, floats and arrays to the
    order of float64 additions."""
    import dataclasses

    def same(va, vb, what):
        if dataclasses.is_dataclass(va):
            for f in dataclasses.fields(va):
                same(getattr(va, f.name), getattr(vb, f.name), f"{what}.{f.name}")
        elif isinstance(va, np.ndarray) and va.dtype == bool:
            np.testing.assert_array_equal(vb, va, err_msg=what)
        elif isinstance(va, np.ndarray):
            np.testing.assert_allclose(vb, va, rtol=RTOL64, atol=1e-15, err_msg=what)
        elif isinstance(va, float):
            if math.isnan(va):
                assert math.isnan(vb), what
            else:
                assert vb == pytest.approx(va, rel=RTOL64, abs=1e-15), what
        else:
            assert va == vb, what

    assert a.config == b.config and a.images == b.images
    assert [s.name for s in a.sites] == [s.name for s in b.sites], where
    for sa, sb in zip(a.sites, b.sites):
        same(sa, sb, f"{where} {sa.name}")
    same(a.logits, b.logits, f"{where} logits")


def test_measure_many_measures_each_config_as_measure_does(setup):
    """One float chunk for every configuration: each result is measure's for that
    configuration alone (same passes), whatever the others are, for deterministic and
    stochastic rounding, with remedies, output quantizers, image means and input maps."""
    from qerror.nn import measure_many
    from qerror.nn.correction import reestimate_bn

    model, calib, test = setup
    near = QuantConfig.make(4, RoundingMode.NEAREST_EVEN)
    trunc = QuantConfig.make(4, RoundingMode.TOWARD_ZERO)
    stoch = QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=5)
    outs = QuantConfig.make(4, RoundingMode.FLOOR, bn_outputs=True, block_outputs=True)
    weights_only = QuantConfig.make(4, RoundingMode.FLOOR, Target.WEIGHTS)
    act_qp = calibrate_activations(model, calib, near.activation, outputs=True)
    bn = reestimate_bn(model, calib, trunc, act_qp)
    corr = {"0": torch.linspace(-0.01, 0.01, 8, dtype=torch.float64)}
    configs = [near, trunc, stoch, outs, weights_only]
    kw = {"local_samples": 5, "image_means": 7, "input_maps": True, "pair_batch": 6}
    many = measure_many(model, test, configs, act_qp, corrections=[None, None, corr, None, None],
                        bn_stats=[None, bn, None, None, None], **kw)
    alone = [measure(model, test, near, act_qp, **kw),
             measure(model, test, trunc, act_qp, bn_stats=bn, **kw),
             measure(model, test, stoch, act_qp, corrections=corr, **kw),
             measure(model, test, outs, act_qp, **kw),
             measure(model, test, weights_only, act_qp, **kw)]
    assert len(many) == len(configs)
    for cfg, a, b in zip(configs, alone, many):
        _assert_same_result(a, b, cfg.label)
    # the default passes: about the batch's images in k + 1 chunks, but chunks of at least
    # 32 images (or the whole batch), evened out (no small last pass)
    from qerror.nn import default_pair_batch
    assert [default_pair_batch(256, k) for k in (1, 5, 7, 15)] == [128, 43, 32, 32]
    assert default_pair_batch(200, 15) == 29 and default_pair_batch(100, 5) == 25
    assert default_pair_batch(16, 5) == 16 and default_pair_batch(10) == 10
    assert [default_pair_batch(n) for n in (31, 32, 33, 40, 63, 100)] == [31, 32, 17, 20, 32, 50]
    # another floor (studies.drift's 64): 256 images in 16 chunks of 64, 500 in passes of 63
    assert [default_pair_batch(256, k, min_chunk=64) for k in (1, 5, 15)] == [128, 64, 64]
    assert default_pair_batch(500, 15, min_chunk=64) == 63
    assert default_pair_batch(40, 15, min_chunk=64) == 40
    default = measure_many(model, test, [near, trunc], act_qp)
    for cfg, b in zip((near, trunc), default):
        _assert_same_result(measure(model, test, cfg, act_qp, pair_batch=16), b, cfg.label)
    assert _clean(model)


def test_measure_many_refuses_what_it_cannot_pair(setup):
    from qerror.nn import default_pair_batch, measure_many

    model, calib, test = setup
    cfg = QuantConfig.make(8)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    with pytest.raises(ValueError, match="at least one configuration"):
        measure_many(model, test, [], act_qp)
    with pytest.raises(TypeError, match="sequence of QuantConfig"):
        measure_many(model, test, cfg, act_qp)
    with pytest.raises(ValueError, match="2 given for 3 configurations"):
        measure_many(model, test, [cfg] * 3, act_qp, weights=[None, None])
    with pytest.raises(TypeError, match="one per configuration"):
        measure_many(model, test, [cfg] * 2, act_qp, bn_stats={})
    with pytest.raises(ValueError, match="no activation qparams"):
        measure_many(model, test, [cfg, cfg], [act_qp, {}])
    with pytest.raises(ValueError, match=r"arms \(a number of configurations\) must be an int"):
        default_pair_batch(16, 0)
    for bad, kind in ((0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(kind, match=r"min_chunk \(a number of images\) must be an int >= 1"):
            default_pair_batch(16, 2, min_chunk=bad)
    assert _clean(model)


def test_a_refused_set_up_leaves_the_model_as_it_was(setup):
    """Every arm is checked before anything is patched: output quantizers without output
    ranges are refused, naming the configuration, and the model runs as before."""
    from qerror.nn import measure_many

    model, calib, test = setup
    x = images(4, 7)
    with torch.no_grad():
        before = model(x)
    plain = QuantConfig.make(4)
    outs = QuantConfig.make(4, RoundingMode.FLOOR, bn_outputs=True)
    act = calibrate_activations(model, calib, plain.activation)  # no outputs=True
    with pytest.raises(ValueError, match=r"no output qparams for '1' \(configuration 1"):
        measure_many(model, test, [plain, outs], act)
    assert _clean(model)
    for run in (lambda: measure(model, test, outs, act),
                lambda: quantized_forward(model, outs, act).__enter__()):
        with pytest.raises(ValueError, match="no output qparams for '1'; calibrate"):
            run()
        assert _clean(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_re_estimated_statistics_follow_the_activations_device():
    # The meta device stands in for a GPU: statistics kept on the CPU are moved to the
    # activations' device, alone and paired.
    from qerror.nn.propagate import QuantizedWeights

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3)).eval().to("meta")
    cfg = QuantConfig.make(8, target=Target.WEIGHTS)
    w = {n: QuantizedWeights(mod.weight, None, 0.0, 0.0, 0.0) for n, mod in m.named_modules()
         if isinstance(mod, (nn.Conv2d, nn.Linear))}
    stats = {"1": (torch.zeros(4), torch.ones(4))}
    x = torch.zeros(2, 1, 6, 6, device="meta")
    with torch.no_grad(), quantized_forward(m, cfg, weights=w, bn_stats=stats):
        assert m(x).shape == (2, 3)
    with torch.no_grad(), paired_forward(m, cfg, weights=w, bn_stats=stats):
        assert m(torch.cat([x, x])).shape == (4, 3)


def test_measure_many_in_float32_with_a_batchnorm_after_a_relu():
    """float32 (the dtype networks run in) and a BatchNorm that no layer feeds directly, so
    its input statistics are reduced per arm from the pass's tensor: each configuration as
    measure gives it alone, one of them with re-estimated statistics."""
    from qerror.nn import measure_many
    from qerror.nn.correction import reestimate_bn

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 10)).eval()
    calib = [images(16, 1, torch.float32)]
    test = [(images(12, 2, torch.float32), torch.arange(12) % 10),
            (images(7, 3, torch.float32), torch.arange(7) % 10)]
    configs = [QuantConfig.make(4, RoundingMode.NEAREST_EVEN),
               QuantConfig.make(4, RoundingMode.TOWARD_ZERO),
               QuantConfig.make(4, RoundingMode.STOCHASTIC, seed=2)]
    act = calibrate_activations(model, calib, configs[0].activation)
    bn = reestimate_bn(model, calib, configs[1], act)
    kw = {"local_samples": 3, "pair_batch": 5}
    many = measure_many(model, test, configs, act, bn_stats=[None, bn, None], **kw)
    alone = [measure(model, test, configs[0], act, **kw),
             measure(model, test, configs[1], act, bn_stats=bn, **kw),
             measure(model, test, configs[2], act, **kw)]
    for cfg, a, b in zip(configs, alone, many):
        assert a.site("2").bn is not None
        _assert_same_result(a, b, cfg.label)


def test_a_batchnorm_after_an_in_place_relu_sees_the_relus_output():
    """The BatchNorm's input statistics come from the layer's output only when nothing ran
    between them: after an in-place ReLU (same tensor, changed) they are the ReLU's."""
    def net(inplace):
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(inplace=inplace), nn.BatchNorm2d(6),
            nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(8, 10)).double().eval()

    calib, test = [images(16, 1)], [(images(12, 2), torch.arange(12) % 10)]
    cfg = QuantConfig.make(4, RoundingMode.TOWARD_ZERO)
    res = {}
    for inplace in (False, True):
        model = net(inplace)
        act = calibrate_activations(model, calib, cfg.activation)
        res[inplace] = measure(model, test, cfg, act, local_samples=4)
        assert _clean(model)
    _assert_same_result(res[False], res[True], "in-place ReLU")


class _PreActBlock(nn.Module):
    """A pre-activation residual block: BatchNorm first, shortcut added in place to the last
    convolution's output, which the next block's first BatchNorm then receives."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        out += x
        return out


def test_a_batchnorm_after_a_block_that_adds_in_place_sees_the_sum():
    """The BatchNorm after a pre-activation block receives its last convolution's output
    with the shortcut added in place: its input statistics are those of the sum (the
    paired pass's own BatchNorm inputs, caught by hooks), not the convolution's sums,
    which they were (0.3 σ off in the mean shift on this network)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _PreActBlock(8), _PreActBlock(8),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).double()
    with torch.no_grad():
        model.train()
        model(images(64, 5))
    model.eval()
    x = images(16, 2)
    cfg = QuantConfig.make(4)
    act = calibrate_activations(model, [x], cfg.activation)
    res = measure(model, [x], cfg, act, local_samples=0)
    assert _clean(model)
    seen, bns = {}, {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0]))
             for n, m in bns.items()]
    try:
        with paired_forward(model, cfg, act), torch.no_grad():
            model(torch.cat([x, x]))
    finally:
        for h in hooks:
            h.remove()
    for name in ("2.bn1", "3"):
        sd = bns[name].running_var.sqrt()
        bn = res.site(name).bn
        for got, half in ((bn.mean_shift_float, seen[name][:16]),
                          (bn.mean_shift_quant, seen[name][16:])):
            want = (half.mean((0, 2, 3)) - bns[name].running_mean) / sd
            np.testing.assert_allclose(got, want.numpy(), rtol=RTOL64, atol=1e-12)
        var = seen[name][16:].var((0, 2, 3), unbiased=False)
        np.testing.assert_allclose(bn.var_ratio_quant, (var / bns[name].running_var).numpy(),
                                   rtol=1e-8)


def test_a_measurement_inside_another_is_refused_and_leaves_the_outer_one(setup):
    """Closing restores each module's own forward by deleting the patch: a module that
    already has one (an open paired_forward, a user's wrapper) is refused, not stripped."""
    model, calib, test = setup
    cfg = QuantConfig.make(6, RoundingMode.TOWARD_ZERO)
    act_qp = calibrate_activations(model, calib, cfg.activation)
    x = test[0][0]
    n = x.shape[0]
    with torch.inference_mode(), paired_forward(model, cfg, act_qp):
        before = model(torch.cat([x, x]))
        with pytest.raises(ValueError, match="already replace.*forward on the module itself"):
            measure(model, test, cfg, act_qp)
        after = model(torch.cat([x, x]))
    assert torch.equal(before, after) and not torch.equal(after[:n], after[n:])
    assert _clean(model)
    wrapped = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    own = wrapped[0].forward
    wrapped[0].forward = lambda t: own(t)
    with pytest.raises(ValueError, match="'0' already replace"):
        measure(wrapped, [torch.randn(2, 1, 6, 6)], QuantConfig.make(8, target=Target.WEIGHTS))
    assert "forward" in vars(wrapped[0])


def test_paired_forward_many_is_the_k_way_pass_chunk_for_chunk(setup):
    """paired_forward_many: measure_many's pass without statistics; each chunk is what
    paired_forward gives for its configuration alone, bit for bit (deterministic modes)."""
    from qerror.nn import paired_forward_many

    model, calib, test = setup
    x = test[0][0]
    n = x.shape[0]
    configs = [QuantConfig.make(6, RoundingMode.TOWARD_ZERO),
               QuantConfig.make(6, RoundingMode.FLOOR, Target.WEIGHTS),
               QuantConfig.make(6, RoundingMode.NEAREST_EVEN)]
    act_qp = calibrate_activations(model, calib, configs[0].activation)
    with torch.inference_mode(), paired_forward_many(model, configs, act_qp):
        out = model(torch.cat([x] * (len(configs) + 1)))
    assert _clean(model)
    with torch.inference_mode():
        assert torch.equal(out[:n], model(x))
    for k, cfg in enumerate(configs):
        with torch.inference_mode(), paired_forward(model, cfg, act_qp):
            alone = model(torch.cat([x, x]))
        assert torch.equal(out[n * (k + 1):n * (k + 2)], alone[n:]), cfg.label
    with pytest.raises(ValueError, match="2 given for 3 configurations"):
        paired_forward_many(model, configs, act_qp, weights=[None, None]).__enter__()
    assert _clean(model)


class _Untraceable(nn.Module):
    """A layer called twice behind a data-dependent branch, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.b(self.a(x))
        if float(y.sum()) > -1e9:  # data-dependent control flow
            y = self.c(self.c(y))
        return y.mean(dim=(2, 3))


class _SharedBN(nn.Module):
    """One BatchNorm normalising two convolutions' outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.b(torch.relu(self.bn(self.a(x))))).mean(dim=(2, 3))


@pytest.mark.parametrize("net", [_Untraceable, _SharedBN])
def test_a_site_called_twice_is_refused_where_it_is_met(net):
    """Path depth refuses a layer called twice from the traced graph; an untraceable model
    (here) had its two calls pooled under one site, and a BatchNorm called twice compared
    the pooled quantized input with the float input of its last call."""
    from qerror.nn import UnsupportedModelError

    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(8, 1, 6, 6)
    config = QuantConfig.make(8)
    aq = calibrate_activations(model, [x], config.activation)
    with pytest.raises(UnsupportedModelError, match="called more than once in one forward"):
        measure(model, [x], config, aq)
    with pytest.raises(UnsupportedModelError, match="called more than once in one forward"):
        measure_many(model, [x], [config, QuantConfig.make(8, RoundingMode.TOWARD_ZERO)], aq)
    assert not any("forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks
                   for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_channel_is_not_live(dtype):
    """A channel whose float output is constant has variance 0; the sums' E[y²] − E[y]²
    left rounding (std 1e-4 in float32, 2e-8 in float64), and its drift over that "std"
    swamped the per-channel RMS (91 and 286,600 against about 0.1); its BatchNorm ratios
    were ratios of rounding."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = self.bn(self.c2(torch.relu(self.c1(x))))
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net().to(dtype)
    with torch.no_grad():
        net.c1.weight[0], net.c1.bias[0] = 0.0, 0.7137  # a constant input channel
        net.c2.weight[2] = 0.0
        net.c2.weight[2, 0], net.c2.bias[2] = 0.4321, 0.1  # output 2 reads it alone
    net.eval()
    x = images(64, 2, dtype)
    config = QuantConfig.make(4)
    r = measure(net, [x], config, calibrate_activations(net, [images(64, 1, dtype)],
                                                        config.activation), local_samples=0)
    site = r.site("c2")
    assert site.float_std_channel[2] == 0.0 and (np.delete(site.float_std_channel, 2) > 0).all()
    assert site.drift_channel[2] != 0.0  # quantization does shift it
    others = np.delete(site.drift_channel, 2) / np.delete(site.float_std_channel, 2)
    assert site.drift_rel_rms_channel == pytest.approx(np.sqrt(np.mean(others ** 2)), rel=1e-12)
    bn = r.site("bn").bn
    assert bn.var_ratio_float[2] == 0.0 and np.isnan(bn.var_ratio_quant_vs_float[2])


def test_the_paired_pass_refuses_a_batchnorm_in_training_mode():
    """In training mode a BatchNorm would normalise the float and the quantized halves of
    the paired batch together."""
    model = tiny_resnet(0, torch.float32).train()
    config = QuantConfig.make(8, target=Target.WEIGHTS)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        with paired_forward(model, config):
            pass
    assert not any("forward" in vars(m) for m in model.modules())
    with quantized_forward(model, config):
        pass  # the quantized network alone (BatchNorm re-estimation) may train them
    with paired_forward(model.eval(), config):
        pass


def test_ranges_and_weights_made_for_another_grid_are_refused(setup):
    """8-bit activation ranges given to a 4-bit pass were taken as they were: after a ReLU
    the zero point (0) is valid on both grids, so the 4-bit quantizer clamped everything above
    15 of the 8-bit steps (a ResNet18's layer with 93.8 % of its inputs at qmax against 0.05 %
    with its own ranges: /work/runs/s39/est/madefor.py); weights quantized with one rounding
    measured under another's name. What calibrate_activations and quantize_weights return
    says the spec it was made for, and a pass refuses ranges of another grid and weights of
    another quantizer before patching anything; a plain mapping says nothing and passes."""
    import io

    from qerror.nn import MadeFor

    model, calib, test = setup
    four = QuantConfig.make(4)
    a8 = calibrate_activations(model, calib, QuantConfig.make(8).activation)
    w8 = quantize_weights(model, QuantConfig.make(8).weight)
    assert isinstance(a8, MadeFor) and a8.spec == QuantConfig.make(8).activation
    a4 = calibrate_activations(model, calib, four.activation)
    floor4 = QuantConfig.make(4, RoundingMode.FLOOR)
    for kwargs, what in (({"act_qparams": a8}, r"activation ranges were made for another "
                          r"quantizer than the configuration \(nearest_even-4b-both\) quantizes "
                          r"with \(bits 8, not 4\): their scales would be wrong"),
                         ({"act_qparams": a4, "weights": w8}, r"quantized weights .*\(bits 8, "
                          r"not 4\): the pass would measure them under its name"),
                         ({"act_qparams": a4, "weights": quantize_weights(model, floor4.weight)},
                          r"quantized weights .*\(rounding floor, not nearest_even\)")):
        for run in (lambda: measure(model, test, four, **kwargs),
                    lambda: measure_many(model, test, [four], **kwargs),
                    lambda: paired_forward(model, four, **kwargs).__enter__(),
                    lambda: quantized_forward(model, four, **kwargs).__enter__()):
            with pytest.raises(ValueError, match=what):
                run()
            assert _clean(model)
    # ranges serve every rounding of their grid (the drift study calibrates each width once
    # for all its modes); a plain dict (learned weights, say) is taken as it is
    w_floor = quantize_weights(model, floor4.weight)
    res = measure(model, test, floor4, a4, weights=w_floor)
    plain = measure(model, test, floor4, dict(a4), weights=dict(w_floor))
    assert res.layers()[-1].sqnr_db == plain.layers()[-1].sqnr_db
    measure(model, test, four, a4, weights=dict(w_floor))
    # the spec travels with the ranges to other ranks (broadcast_object pickles them)
    buf = io.BytesIO()
    torch.save(a8, buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert isinstance(back, MadeFor) and back.spec == a8.spec and back.keys() == a8.keys()


def test_a_weight_that_is_not_finite_is_refused_naming_its_layer(setup):
    """A NaN weight was refused as "x holds 1 non-finite value(s)", the quantizer's name for
    its input, which reads as if the images held it; now the layer is named, by
    quantize_weights and by a pass that quantizes the weights itself."""
    model, calib, test = setup
    cfg = QuantConfig.make(8)
    broken = copy.deepcopy(model)
    first = next(n for n, m in broken.named_modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        broken.get_submodule(first).weight[0, 0, 0, 0] = float("nan")
    what = rf"the weight of layer '{first}' holds 1 non-finite value"
    with pytest.raises(ValueError, match=what):
        quantize_weights(broken, cfg.weight)
    with pytest.raises(ValueError, match=what):
        measure(broken, test, QuantConfig(cfg.weight, None))
    assert _clean(broken)


def test_pass_flags_that_are_not_bools_are_refused(setup):
    """measure's input_maps, progress and across_ranks and calibrate_activations' outputs
    and progress were read by truth value ('False' kept every input map, showed a bar,
    calibrated every BatchNorm and block output): a TypeError naming the flag, the model
    left as it was."""
    model, calib, test = setup
    cfg = QuantConfig.make(8)
    act = calibrate_activations(model, calib, cfg.activation)
    for flag in ("input_maps", "progress", "across_ranks"):
        for run in (lambda: measure(model, test, cfg, act, **{flag: "False"}),
                    lambda: measure_many(model, test, [cfg], act, **{flag: "False"})):
            with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'False'"):
                run()
            assert _clean(model)
    for flag in ("outputs", "progress"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'False'"):
            calibrate_activations(model, calib, cfg.activation, **{flag: "False"})
        assert _clean(model)


def test_weights_quantized_from_another_model_are_refused(setup):
    """Quantized weights of another model were taken as this one's: with the same shapes the
    pass measured the other model's weights against this model's float network (a tiny CNN:
    agreement 2.5 % against 100 %, the first layer's SQNR -3.25 dB against 37.7 dB, and the
    weight error figures those of the other model's own rounding:
    /work/runs/s49/propagate/p4b.py), and with other shapes the quantized network alone ran
    another network without a word (a 5x5 kernel in a 3x3 convolution's place) while the
    paired pass failed in torch.cat. What quantize_weights returns says which float weights
    it quantized, and a pass refuses, before patching anything, weights of another shape
    than the layer's and weights made from other float weights; a plain dict (learned weights,
    another model's on purpose) passes if its shapes fit."""
    import dataclasses

    model, calib, test = setup
    cfg = QuantConfig.make(8)
    act = calibrate_activations(model, calib, cfg.activation)
    other = tiny_resnet(seed=5)
    foreign = quantize_weights(other, cfg.weight)
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    w = quantize_weights(model, cfg.weight)
    wide = dict(w)
    wide[first] = dataclasses.replace(w[first], weight=torch.zeros(8, 1, 5, 5,
                                                                   dtype=torch.float64))
    for weights, what in ((foreign, rf"quantized weights of layer '{first}'.* were made "
                                    r"from other float weights than the layer holds"),
                          (wide, rf"quantized weight of layer '{first}'.* has shape "
                                 r"\(8, 1, 5, 5\); the layer's weight has \(8, 1, 3, 3\)")):
        for run in (lambda: measure(model, test, cfg, act, weights=weights),
                    lambda: measure_many(model, test, [cfg], act, weights=[weights]),
                    lambda: paired_forward(model, cfg, act, weights=weights).__enter__(),
                    lambda: quantized_forward(model, cfg, act, weights=weights).__enter__()):
            with pytest.raises(ValueError, match=what):
                run()
            assert _clean(model)
    # this model's own weights pass, as a MadeFor or a plain dict; so does another model's
    # on purpose, as a plain dict
    assert measure(model, test, cfg, act, weights=w).logits.agreement == \
        measure(model, test, cfg, act, weights=dict(w)).logits.agreement
    measure(model, test, cfg, act, weights=dict(foreign))
    # the float weights it was made from travel with it to other ranks (pickled)
    import io
    buf = io.BytesIO()
    torch.save(foreign, buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with pytest.raises(ValueError, match="made from other float weights"):
        measure(model, test, cfg, act, weights=back)


def test_labels_that_are_not_class_indices_of_the_logits_are_refused(setup):
    """Labels were compared with the logits' argmax as they came: labels of another label
    space (shifted past the model's classes), negative ones, fractional floats or bools
    matched no prediction, and the accuracies and McNemar counts came out 0 without a word
    (a tiny CNN of 5 classes: float_correct 4 of 20 with its labels, 0 with each of those:
    /work/runs/s49/propagate/p5_labels.py). Now a TypeError for labels that are not
    integers and a ValueError for labels outside 0 to C - 1, before any figure is made;
    float labels are refused even where whole (the library's one rule for labels: a float
    target means class probabilities to cross_entropy); labels not one per image are
    refused with the batch."""
    model, calib, test = setup
    cfg = QuantConfig.make(8)
    act = calibrate_activations(model, calib, cfg.activation)
    x, y = test[0]
    for labels, error, what in ((y + 10, ValueError, r"labels from -?\d+ to \d+.*10 classes"),
                                (y - 3, ValueError, r"labels from -3 to \d+.*10 classes"),
                                (y.double() + 0.5, TypeError, r"labels must be integer"),
                                (y > 2, TypeError, r"labels must be integer"),
                                (y.double(), TypeError, r"labels must be integer.*\.long\(\)"),
                                (y[:, None], ValueError,
                                 r"labels of shape \(\d+, 1\) do not match")):
        for run in (lambda: measure(model, [(x, labels)], cfg, act),
                    lambda: measure_many(model, [(x, y), (x, labels)], [cfg], act)):
            with pytest.raises(error, match=what):
                run()
            assert _clean(model)
    res = measure(model, [(x, y)], cfg, act)
    assert res.logits.float_correct > 0


def test_a_linear_fed_more_than_n_features_is_refused_where_it_is_measured():
    """A Linear fed (N, T, features) made outputs (N, T, out_features), whose "channels"
    (dimension 1) the sums took to be T: drift_channel and local_error_means were T means
    under the outputs' name, and with T equal to out_features empirical_bias_correction
    took them as per-feature corrections (layer 0 here: T means [0.072, -0.011, -0.077],
    the per-feature means [-0.021, 0.019, -0.013]). Each measuring pass now refuses it;
    the passes that measure nothing run it as before (their halves are the float and the
    quantized networks')."""
    from qerror.nn import UnsupportedModelError, local_error_means
    from qerror.nn.correction import empirical_bias_correction

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 4)).double().eval()
    x = torch.randn(6, 3, 12, dtype=torch.float64)
    config = QuantConfig.make(3)
    aq = calibrate_activations(model, [x], config.activation)
    match = r"Linear '0' is fed inputs of shape \(3, 12\) per image"
    for run in (lambda: measure(model, [x], config, aq),
                lambda: measure_many(model, [x], [config, QuantConfig.make(
                    3, RoundingMode.FLOOR)], aq),
                lambda: local_error_means(model, [x], config, aq),
                lambda: empirical_bias_correction(model, [x], config, aq)):
        with pytest.raises(UnsupportedModelError, match=match):
            run()
        assert _clean(model)
    with torch.inference_mode():
        with quantized_forward(model, config, aq):
            q = model(x)
        with paired_forward(model, config, aq):
            out = model(torch.cat([x, x]))
        assert torch.equal(out[:6], model(x)) and torch.equal(out[6:], q)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(36, 3), nn.ReLU(), nn.Linear(3, 4))
    flat = flat.double().eval()  # fed (N, 36): measured as before
    aq = calibrate_activations(flat, [x], config.activation)
    r = measure(flat, [x], config, aq)
    assert [s.drift_channel.shape for s in r.layers()] == [(3,), (4,)]


def test_batches_of_another_image_size_are_refused(setup):
    """drift is the mean over every element (an image weighs its size) and drift_se the
    standard error of the mean of per-image means (images equal): with 16×16 and 3×3
    images in one measurement, drift 0.00046 came with the standard error of a mean of
    -0.037, so drift ± se described no estimator. Such batches are now refused, as the
    pass leaves the model clean; batches of one size measure as before."""
    model = tiny_resnet(dtype=torch.float32)
    config = QuantConfig.make(4)
    aq = calibrate_activations(model, [images(8, 1, torch.float32)], config.activation)
    small = torch.randn(3, 1, 9, 9, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"batch 1 holds images of shape \(1, 9, 9\), the "
                                         r"first \(1, 12, 12\)"):
        measure(model, [images(4, 3, torch.float32), small], config, aq)
    assert _clean(model)
    with pytest.raises(ValueError, match="holds images of shape"):
        measure_many(model, [images(4, 3, torch.float32), small],
                     [config, QuantConfig.make(4, RoundingMode.FLOOR)], aq)
    assert _clean(model)
    measure(model, [small, small], config, aq)



def _rank_measures(rank, world, port, folder):
    """One torchrun-like gloo rank: ``measure`` with ``across_ranks`` on 4 images, of side 12
    on both ranks, then of side 12 on rank 0 and 10 on rank 1; what each returned or raised
    goes to ``folder / rank<r>.txt``, a line each."""
    from qerror.nn import training

    as_rank(rank, world, port)
    model = tiny_resnet(dtype=torch.float32)
    config = QuantConfig.make(4)
    aq = calibrate_activations(model, [images(8, 1, torch.float32)], config.activation)
    def call(side):
        x = torch.randn(4, 1, side, side, generator=torch.Generator().manual_seed(rank))
        return f"measured {measure(model, [x], config, aq, across_ranks=True).logits.n}"

    with training.distributed("cpu"):
        record_calls(folder / f"rank{rank}.txt",
                     [lambda s=side: call(s) for side in (12, 12 if rank == 0 else 10)])


def test_ranks_whose_images_differ_in_size_are_refused_on_every_rank(tmp_path):
    """One process refuses batches of two image sizes (above); two ranks each saw one size
    and merged them silently. Now every rank raises the same ValueError naming each rank's
    shape; ranks of one size measure all 8 images."""
    two_ranks(_rank_measures, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert said[0] == said[1] and said[0][0] == "measured 8"
    assert said[0][1].startswith("ValueError: the ranks' images differ in shape (rank 0: "
                                 "(1, 12, 12), rank 1: (1, 10, 10)): drift and mse weight")


class _AsFloat64(nn.Module):
    """``net`` fed its input as float64, whatever the images' dtype."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.double())


def _offset_logits():
    """A float64 network (casting its input) whose logits sit 1e4 above a spread of about
    one: their variance is within float32's rounding bound of ``E[x²]`` (``u = 2⁻²⁴``
    resolves a mean of up to about 1200 standard deviations, :func:`resolved_variance`)
    and resolved in float64's. Returns it, a configuration and its activations' qparams."""
    net = tiny_resnet(seed=1)
    with torch.no_grad():
        net[-1].bias.add_(1e4)
    model = _AsFloat64(net)
    config = QuantConfig.make(8)
    return model, config, calibrate_activations(model, [images(8, 1)], config.activation)


def _dtype_batches(rank):
    return [images(4, 2 + rank, torch.float32 if rank == 0 else torch.float64)]


def _rank_dtypes(rank, world, port, folder):
    """One gloo rank of :func:`test_ranks_fed_other_dtypes_resolve_as_one_process`: rank 0
    fed float32 images, rank 1 float64; its logits' ``drift_rel`` to ``folder``."""
    from qerror.nn import training

    as_rank(rank, world, port)
    model, config, aq = _offset_logits()
    with training.distributed("cpu"):
        r = measure(model, _dtype_batches(rank), config, aq, local_samples=0,
                    across_ranks=True)
    (folder / f"rank{rank}.txt").write_text(f"{r.logits.n} {r.logits.drift_rel!r}")


def test_ranks_fed_other_dtypes_resolve_as_one_process(tmp_path):
    """Each rank resolved variances against its own images' rounding (u), so a rank fed
    float32 images returned drift_rel nan (logit variance not resolved) and one fed float64
    a number, from the same merged sums. Every rank now takes the coarsest rank's u, as one
    process takes its coarsest batch's: both return what one process given both batches
    does."""
    model, config, aq = _offset_logits()
    alone = measure(model, _dtype_batches(1), config, aq, local_samples=0)
    assert math.isfinite(alone.logits.drift_rel)  # float64 images alone resolve it
    both = measure(model, _dtype_batches(0) + _dtype_batches(1), config, aq, local_samples=0)
    assert math.isnan(both.logits.drift_rel)
    two_ranks(_rank_dtypes, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said == ["8 nan", "8 nan"]


def _rank_fails(rank, world, port, folder):
    """One gloo rank of :func:`test_a_rank_that_fails_stops_every_rank`: six ``measure``
    calls with ``across_ranks`` on a float32 network, 4 images a rank: float64 images on
    rank 1, integer images on rank 0, labels on rank 0 only, images both can take, a
    configuration's label instead of the configuration on rank 1, then images both can
    take again; what each returned or raised goes to ``folder / rank<r>.txt``, a line each
    (written after every call, so a hang shows how far a rank got)."""
    from qerror.nn import training

    as_rank(rank, world, port)
    model = tiny_resnet(dtype=torch.float32)
    config = QuantConfig.make(4)
    aq = calibrate_activations(model, [images(8, 1, torch.float32)], config.activation)
    x = images(4, 2 + rank, torch.float32)
    calls = [(x.double() if rank == 1 else x, config),
             ((x * 8).round().to(torch.int64) if rank == 0 else x, config),
             ((x, torch.arange(4) % 2) if rank == 0 else x, config),
             (x, config),
             (x, config.label if rank == 1 else config),
             (x, config)]
    def call(batch, given):
        r = measure(model, [batch], given, aq, across_ranks=True)
        return f"measured {r.logits.n}, logit sqnr {r.logits.sqnr_db!r}"

    with training.distributed("cpu"):
        record_calls(folder / f"rank{rank}.txt", [lambda c=c: call(*c) for c in calls])


def test_a_rank_that_fails_stops_every_rank(tmp_path):
    """A rank whose batch its network cannot take (float64 images to a float32 network) or
    that measure refuses (integer images) raised alone, and the other waited for it in the
    merge's collective: for ever while the failed rank lived on, or paired with that rank's
    next call. Now the failed rank raises its own error and the other a RuntimeError naming
    it, and the next call of both ranks measures together; a rank whose batches alone have
    labels makes both raise the same ValueError (checked in the same collective). A rank
    given something other than a configuration raised measure's TypeError before the part
    whose errors reach the other ranks, and the other waited in the merge
    (/work/runs/s44/ranks/probe.py config, probe_config.before.log); now it raises its
    TypeError and the other the RuntimeError naming it, and both measure their next call."""
    two_ranks(_rank_fails, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert len(said[0]) == len(said[1]) == 6

    def relayed(rank, error):
        return (f"RuntimeError: rank {rank} of 2 failed before the ranks' sums were merged "
                f"(rank {rank}: {error}), so every rank stops here instead of waiting for "
                "them: see each failed rank's own error, fix what it names, and call again "
                "on every rank")

    assert said[1][0].startswith("RuntimeError: ")  # torch's, from the float32 forward
    assert said[0][0] == relayed(1, said[1][0])
    assert said[0][1] == "TypeError: x must be a floating-point torch.Tensor, got torch.int64"
    assert said[1][1] == relayed(0, said[0][1])
    assert said[0][2] == said[1][2] == "ValueError: some ranks' batches have labels and some do not"
    assert said[0][3] == said[1][3] and said[0][3].startswith("measured 8, ")
    assert said[0][4] == relayed(1, said[1][4])
    assert said[1][4] == ("TypeError: a configuration (measure's config, each of "
                          "measure_many's configs) must be a QuantConfig (qerror.nn.QuantConfig.make), "
                          "got str")
    assert said[0][5] == said[1][5] == said[0][3]


def _many_calls(rank):
    """The ``measure_many`` calls of :func:`_rank_arguments` on ``rank``: (configs,
    act_qparams, keywords), each differing between the ranks in one argument but the sixth
    and seventh, where only ``pair_batch`` differs, then only the weights' error summaries:
    rank 1's a float64 step above rank 0's, as ``quantize_weights`` sums them with another
    thread count (/work/runs/s43/review2/probe_threads.log), the quantized weights the
    same; then ``first_batch`` 0 on both ranks (each rank's batch index 0, the same draws
    of the stochastic configuration for different images), then 1 on rank 0 and 0 on rank
    1 (the batches numbered against the ranks' order), then rank 1's model another
    checkpoint (one weight a float32 step away). Every other call numbers rank ``r``'s
    batch ``r``."""
    model = tiny_resnet()
    configs = [QuantConfig.make(8), QuantConfig.make(8, RoundingMode.STOCHASTIC, seed=3)]
    act = calibrate_activations(model, [images(8, 1)], configs[0].activation)
    own = calibrate_activations(model, [images(8, 1 + 10 * rank)], configs[0].activation)
    other_seed = [configs[0], QuantConfig.make(8, RoundingMode.STOCHASTIC, seed=3 + rank)]
    six = [QuantConfig.make(6 if rank else 8), configs[1]]
    weights = quantize_weights(model, configs[0].weight)
    nudged = copy.deepcopy(model)  # another checkpoint: one weight a float32 step away
    with torch.no_grad():
        w0 = next(nudged.parameters()).view(-1)
        w0[0] = torch.nextafter(w0[0], torch.tensor(math.inf))
    if rank:
        weights = MadeFor({n: dataclasses.replace(
            q, error_mean_lsb=math.nextafter(q.error_mean_lsb, math.inf),
            error_mse_lsb=math.nextafter(q.error_mse_lsb, math.inf))
            for n, q in weights.items()}, weights.spec)
    return model, [(configs, act, {"image_means": 4 * rank}),
                   (configs, act, {"local_samples": 2 + 2 * rank}),
                   (other_seed, act, {}),
                   (configs, own, {}),
                   (six, act, {}),
                   (configs, act, {"pair_batch": 2 if rank else None}),
                   (configs, act, {"weights": [weights, None]}),
                   (configs, act, {"first_batch": 0}),
                   (configs, act, {"first_batch": 1 - rank}),
                   (configs, act, {"net": nudged} if rank else {})]


def _rank_arguments(rank, world, port, folder):
    """One gloo rank of :func:`test_ranks_that_pass_different_arguments_all_refuse`: the
    calls of :func:`_many_calls` with ``across_ranks``, 4 images a rank; what each returned
    or raised goes to ``folder / rank<r>.txt``, a line each (written after every call, so a
    hang shows how far a rank got)."""
    from qerror.nn import training

    as_rank(rank, world, port)
    model, calls = _many_calls(rank)
    def call(configs, act, kw):
        kw = dict(kw)
        rs = measure_many(kw.pop("net", model), [images(4, 2 + rank)], configs, act,
                          across_ranks=True, **{"first_batch": rank, **kw})
        return f"measured {rs[0].logits.n}: " + " ".join(repr(r.logits.sqnr_db) for r in rs)

    with training.distributed("cpu"):
        record_calls(folder / f"rank{rank}.txt", [lambda c=c: call(*c) for c in calls])


def test_ranks_that_pass_different_arguments_all_refuse(tmp_path):
    """Ranks were not told apart by their arguments: a rank with ``image_means`` gathered its
    kept images while the other had returned (it waited, or paired with the other's next
    call); configurations of another seed or activation ranges each rank calibrated on its
    own images merged the sums of different quantized networks without a word; other
    ``local_samples`` read as 'different sites or shapes ... same model and configuration';
    a rank that refused its arguments (6-bit configuration, 8-bit ranges) raised alone
    (/work/runs/s43/ranks3/probe_many_args.py, .before.log). Now the arguments that must
    agree ride in the merge's first gather and every rank raises the same ValueError naming
    the first that differs; a refused argument reaches the other rank; ``pair_batch`` may
    differ, and the ranks then measure what one process does on both batches. So may the
    error summaries of the same quantized weights (float sums, which another thread count
    or GPU changes in their last bits): before, 'the ranks passed different weights (in
    value)' on both ranks. Ranks that both passed ``first_batch`` 0 keyed their stochastic
    draws alike and merged them silently (/work/runs/s44/ranks/probe.py first,
    probe_first.before.log: logit SQNR 14.48 dB where one process on the same batches gives
    14.93); now every rank refuses overlapping batch indices, and indices in the other
    order than the ranks' give what one process does on the batches in that order."""
    two_ranks(_rank_arguments, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert len(said[0]) == len(said[1]) == 10

    def differ(name, told):
        return (f"ValueError: the ranks passed different {name} ({told}); every rank must "
                "pass the same local_samples, input_maps, image_means, model, configs, "
                "act_qparams, "
                "weights, corrections, bn_stats (only the batches, first_batch, pair_batch and "
                "progress are each rank's own), for their sums to be one measurement")

    assert said[0][:4] == said[1][:4] == [
        differ("image_means", "rank 0: 0, rank 1: 4"),
        differ("local_samples", "rank 0: 2, rank 1: 4"),
        differ("configs", "in value"), differ("act_qparams", "in value")]
    assert said[1][4].startswith("ValueError: activation ranges were made for another")
    assert said[0][4] == (
        f"RuntimeError: rank 1 of 2 failed before the ranks' sums were merged (rank 1: "
        f"{said[1][4]}), so every rank stops here instead of waiting for them: see each "
        "failed rank's own error, fix what it names, and call again on every rank")
    model, calls = _many_calls(0)
    configs, act, _ = calls[-1]
    alone = measure_many(model, [images(4, 2), images(4, 3)], configs, act)
    turned = measure_many(model, [images(4, 3), images(4, 2)], configs, act)
    for line, one in ((said[0][5], alone), (said[1][5], alone), (said[0][6], alone),
                      (said[1][6], alone), (said[0][8], turned), (said[1][8], turned)):
        n, sqnr = line.split(": ")
        assert n == "measured 8"
        assert [float(v) for v in sqnr.split()] == pytest.approx(
            [r.logits.sqnr_db for r in one], rel=RTOL64)
    assert said[0][7] == said[1][7] == (
        "ValueError: the ranks' batch indices overlap (rank 0: 0 to 0, rank 1: 0 to 0): "
        "stochastic rounding draws each batch's stream from its index, first_batch plus its "
        "position in the rank's batches, so ranks whose indices overlap draw the same numbers "
        "for different images, which one process never does; give each rank first_batch = the "
        "index of its first batch among all the ranks' (with qerror.nn.parallel.shard over n "
        "batches: shard(n).start)")
    assert said[0][9] == said[1][9] == differ("model", "in value")


def test_drawn_batches_are_checked_apart_and_only_where_drawn():
    """The one check of the ranks' batch indices that measure_many and bn_image_moments
    make: a range only where some configuration rounds activations stochastically; ranges
    that overlap refused, any order of disjoint ones accepted, and a rank without batches
    keys nothing (its empty range inside another's is no overlap)."""
    from qerror.nn.propagate import check_drawn_batches, drawn_batches

    near, stoch = QuantConfig.make(4), QuantConfig.make(4, RoundingMode.STOCHASTIC)
    weights_only = QuantConfig.make(4, RoundingMode.STOCHASTIC, Target.WEIGHTS)
    assert drawn_batches([near], 3, 2) is None
    assert drawn_batches([weights_only], 3, 2) is None
    assert drawn_batches([near, stoch], 3, 2) == range(3, 5)
    for fine in ([None, None], [range(2, 4), range(0, 2)], [range(0, 3), range(1, 1)],
                 [range(0, 1), range(5, 7), range(1, 5)]):
        check_drawn_batches(fine)
    with pytest.raises(ValueError) as refused:
        check_drawn_batches([range(0, 2), range(1, 1), range(5, 6), range(1, 3)])
    assert str(refused.value).startswith(
        "the ranks' batch indices overlap (rank 0: 0 to 1, rank 1: none, rank 2: 5 to 5, "
        "rank 3: 1 to 2): ")



def test_a_weight_tied_between_layers_is_quantized_once():
    """One parameter held by two layers is one weight of the quantized network: stochastic
    rounding drew it once per layer (probe5: 5 of the 16 elements of a tied 4×4 weight
    rounded differently in its two layers). Quantized once now, at its first layer; the
    other layers' draws are those of the untied model."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    untied = Tied().double().eval()
    model = copy.deepcopy(untied)
    model.b.weight = model.a.weight
    spec = QuantConfig.make(4, RoundingMode.STOCHASTIC).weight
    w, ref = quantize_weights(model, spec, seed=3), quantize_weights(untied, spec, seed=3)
    assert w["b"] is w["a"] and w.made_from["b"] == w.made_from["a"]
    assert torch.equal(w["a"].weight, ref["a"].weight)
    assert torch.equal(w["fc"].weight, ref["fc"].weight)
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig.make(4, RoundingMode.STOCHASTIC, Target.WEIGHTS)
    with torch.no_grad(), quantized_forward(model, cfg, weights=w):
        q = model(x)
    with torch.no_grad():
        h = F.linear(torch.relu(F.linear(x, w["a"].weight, model.a.bias)), w["a"].weight,
                     model.b.bias)
        assert torch.equal(q, F.linear(h, w["fc"].weight, model.fc.bias))


def test_an_sqnr_from_a_mean_square_that_is_not_finite_is_nan():
    """SQNR is a figure of two finite mean squares. A mean square that overflowed (float32
    sums of the error's squares past 3.4e38) or holds NaN made a definite figure or no
    result at all: a NaN power gave -inf dB (the figure of a zero signal) or +inf, and an
    infinite noise power made measure fail after the whole pass ("math domain error",
    probe_sqnr: a 1e25 bias correction on the float32 tiny ResNet's classifier). Now NaN,
    as a variance from such sums is (resolved_variance)."""
    assert sqnr_db(1.0, 0.0) == math.inf and sqnr_db(0.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf and sqnr_db(1e-300, 1e300) == -math.inf
    assert sqnr_db(10.0, 1.0) == pytest.approx(10.0, rel=1e-15)
    for power, noise in ((math.nan, 1.0), (math.nan, 0.0), (1.0, math.nan), (1.0, math.inf),
                         (math.inf, 1.0), (math.inf, math.inf), (0.0, math.nan)):
        assert math.isnan(sqnr_db(power, noise)), (power, noise)
    model = tiny_resnet(dtype=torch.float32)
    res = measure(model, [images(4, 2, torch.float32)], QuantConfig.make(8, target="weights"),
                  corrections={"7": torch.full((10,), 1e25)})
    site = res.site("7")
    assert site.mse == math.inf and math.isfinite(site.float_std)
    assert math.isnan(site.sqnr_db) and math.isnan(res.logits.sqnr_db)
    assert math.isfinite(res.site("0").sqnr_db)  # the layers before it keep their figures


def test_nan_or_inf_made_inside_the_network_is_named_at_its_quantizer():
    """Finite images, and a layer whose float32 output overflows: the next layer's input
    quantizer met Inf and the error said "x holds 19 non-finite value(s) ...: remove or
    replace NaN/Inf first" (probe_inf), as if the images held them. It names the layer and
    the configuration now, and what makes such values inside a network."""
    model = tiny_resnet(dtype=torch.float32)
    config = QuantConfig.make(8)
    act_qp = calibrate_activations(model, [images(8, 1, torch.float32)], config.activation)
    with torch.no_grad():
        model[3].conv1.weight.mul_(1e38)
    with pytest.raises(ValueError, match=r"the input of layer '3\.conv2' holds NaN or Inf "
                       r"values \(nearest_even-8b-both\).*overflowed"):
        measure(model, [images(4, 2, torch.float32)], config, act_qp)
    with pytest.raises(ValueError, match=r"the input of layer '3\.conv2'"), torch.no_grad(), \
            quantized_forward(model, config, act_qp):
        model(images(4, 2, torch.float32))
    assert _clean(model)


def test_calibration_of_a_module_the_forward_pass_never_runs_says_what_to_do():
    """A layer the forward pass never runs (an unused head) has no range, and measure needs
    one for it where it quantizes activations: calibrate_activations refused with "layer
    'head' was never called in the forward pass" alone, and named an unused BatchNorm's
    output key as a layer ("layer 'extra.output'"). It says what to do now."""
    from qerror.nn import UnsupportedModelError

    class Net(nn.Module):
        def __init__(self, unused: nn.Module):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(400, 3))
            self.unused = unused  # registered, never called

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    spec = QuantConfig.make(8).activation
    x = [images(2, 1)]
    model = Net(nn.Linear(3, 2)).double().eval()
    with pytest.raises(UnsupportedModelError, match=r"layer 'unused' was never called .*"
                       r"remove the module .* or quantize weights only \(Target\.WEIGHTS\)"):
        calibrate_activations(model, x, spec)
    assert measure(model, x, QuantConfig.make(8, target=Target.WEIGHTS)).logits.n == 2
    model = Net(nn.BatchNorm2d(4)).double().eval()
    calibrate_activations(model, x, spec)
    with pytest.raises(UnsupportedModelError, match=r"the output of 'unused' was never called"):
        calibrate_activations(model, x, spec, outputs=True)
