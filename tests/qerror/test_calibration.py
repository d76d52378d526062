"""Calibration: ranges by policy (min-max, percentile, MSE, ACIQ), scales and zero points, bad input."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from qerror import (
    QuantSpec,
    RangeMethod,
    RangePolicy,
    calibrate,
    dequantize,
    fake_quantize,
    observed_range,
    qparams_from_range,
    quantize,
)


def test_minmax_qparams_symmetric_and_affine():
    x = np.array([-1.0, 0.5, 2.54])
    sym = calibrate(x, QuantSpec(bits=8))
    assert sym.scale == 2.54 / 127 and sym.zero_point == 0  # the same float64 division
    aff = calibrate(x, QuantSpec(bits=8, signed=False, symmetric=False))
    assert aff.scale == (2.54 - -1.0) / 255
    assert aff.zero_point == round(1.0 / aff.scale)
    # Zero is exactly representable in the affine grid.
    assert quantize(np.array([0.0]), QuantSpec(bits=8, signed=False, symmetric=False),
                    aff.scale, aff.zero_point)[0] == aff.zero_point


def test_all_zero_tensor_gets_unit_scale():
    p = calibrate(np.zeros(10), QuantSpec())
    assert p.scale == 1.0 and p.zero_point == 0


def test_percentile_range_is_tighter_than_minmax():
    x = np.random.default_rng(6).standard_normal(10_000)
    lo_p, hi_p = observed_range(x, QuantSpec(),
                              RangePolicy(RangeMethod.PERCENTILE, percentile=99))
    assert hi_p == np.percentile(np.abs(x), 99) and lo_p == -hi_p


def test_mse_calibration_beats_minmax_on_heavy_tails():
    x = np.random.default_rng(7).laplace(size=20_000)
    spec = QuantSpec(bits=4)
    mm = calibrate(x, spec)
    best = calibrate(x, spec, RangePolicy(RangeMethod.MSE))
    mse = lambda p: np.mean((fake_quantize(x, spec, p.scale, p.zero_point) - x) ** 2)  # noqa: E731
    assert best.scale < mm.scale
    assert mse(best) < mse(mm)


@pytest.mark.parametrize("k", [-540, -1000, 0, 900])
def test_mse_search_is_the_same_at_every_power_of_two(k):
    """Data scaled by 2^k quantize to the same codes at the scale scaled by 2^k, so the MSE
    search must choose the same shrink: below 1e-162 every squared error underflowed to 0,
    every shrink tied, and the min-max range won. Per channel alike, with channels 2^k
    apart."""
    x = np.random.default_rng(9).laplace(size=4000)
    spec = QuantSpec(bits=4)
    policy = RangePolicy(RangeMethod.MSE)
    ref = calibrate(x, spec, policy).scale / calibrate(x, spec).scale
    assert ref < 0.9
    got = calibrate(np.ldexp(x, k), spec, policy).scale / calibrate(np.ldexp(x, k), spec).scale
    assert got == ref
    two = np.stack([x, np.ldexp(x, k)], axis=1)
    per = calibrate(two, QuantSpec(bits=4, axis=1), policy)
    mm = calibrate(two, QuantSpec(bits=4, axis=1))
    assert (per.scale / mm.scale).tolist() == [ref, ref]


def test_per_channel_calibration_shapes():
    w = np.random.default_rng(8).standard_normal((4, 3, 2))
    p = calibrate(w, QuantSpec(axis=1, symmetric=False))
    assert p.scale.shape == (3,) and p.zero_point.shape == (3,)
    np.testing.assert_array_equal(p.scale, (np.maximum(w.max(axis=(0, 2)), 0)
                                            - np.minimum(w.min(axis=(0, 2)), 0)) / 255)


def test_qparams_from_range_unsigned_symmetric_covers_zero_to_hi():
    p = qparams_from_range(-1.0, 2.55, QuantSpec(bits=8, signed=False))
    assert p.scale == 2.55 / 255 and p.zero_point == 0


@pytest.mark.parametrize("lo, hi, message", [
    ([], [], "empty"),
    (np.zeros((0, 3)), 1.0, "empty"),
    ([-1.0, -2.0], [1.0, 2.0, 3.0], "different shapes"),
    ([-1.0, np.nan], [1.0, 2.0], "finite"),
    (-np.inf, 1.0, "finite"),
    ([0.5, -1.0], [0.0, 1.0], "lo > hi"),
])
def test_qparams_from_range_refuses_ranges_it_cannot_map(lo, hi, message):
    with pytest.raises(ValueError, match=message):
        qparams_from_range(lo, hi, QuantSpec(bits=8))


@pytest.mark.parametrize("min_scale", [np.nan, np.inf, 0.0, -1.0, "1e-38", True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_from_range_refuses_a_min_scale_that_is_no_scale(min_scale, symmetric):
    """NaN gave scale NaN and, affine, zero point -2**63; inf gave scale inf; 0 and -1 let a
    tiny range through unfloored; a string raised numpy's ufunc error."""
    with pytest.raises(ValueError, match="min_scale must be a positive finite number"):
        qparams_from_range(-1e-300, 1e-300, QuantSpec(bits=8, symmetric=symmetric),
                           min_scale=min_scale)


def test_qparams_from_range_takes_a_scalar_bound_for_every_channel():
    p = qparams_from_range(0.0, [1.0, 2.0], QuantSpec(bits=8, symmetric=False))
    q = qparams_from_range([0.0, 0.0], [1.0, 2.0], QuantSpec(bits=8, symmetric=False))
    np.testing.assert_array_equal(p.scale, q.scale)
    np.testing.assert_array_equal(p.zero_point, q.zero_point)


def test_calibration_never_makes_a_scale_the_quantizer_refuses():
    x = np.array([[1.0, -0.5, 0.0], [1e-44, -3e-45, 0.0]], np.float32)
    spec = QuantSpec(axis=0)
    p = calibrate(x, spec)
    q = quantize(x, spec, p.scale, p.zero_point)
    assert q[1].tolist() == [0, 0, 0]


def test_unsigned_percentile_range_ignores_negative_values():
    x = np.array([-100.0] * 50 + list(np.linspace(0, 1, 50)), np.float32)
    lo, hi = observed_range(x, QuantSpec(signed=False),
                            RangePolicy("percentile", percentile=100))
    assert (float(lo), float(hi)) == (0.0, 1.0)


def test_zero_dimensional_input_calibrates():
    assert calibrate(np.array(1.3, np.float32), QuantSpec(), RangePolicy("mse")).scale > 0


@pytest.mark.parametrize("policy", [RangePolicy(), RangePolicy("mse", mse_grid=4)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_big_endian_float64_data_calibrate_as_float64(policy, symmetric):
    """float64 data in the other byte order (a file written on another machine) were read as
    float32 by the working precision but as float64 by the format's largest number, and
    QuantSpec.max_scale's search stepped one float32 ulp at a time from inf: calibrate never
    returned."""
    from qerror.quantizer import working_precision

    assert working_precision(np.dtype(">f8")) == np.float64
    assert working_precision(np.dtype(">f4")) == np.float32
    x = np.array([-1.0e300, 0.25, 3.0e300])
    spec = QuantSpec(symmetric=symmetric)
    assert calibrate(x.astype(">f8"), spec, policy) == calibrate(x, spec, policy)


def test_mse_search_keeps_the_min_max_range_when_nothing_is_clipped():
    """Uniform data on a grid's own levels: every shrink clips, so c = 1 wins."""
    spec = QuantSpec(bits=4)
    x = np.arange(-7, 8, dtype=np.float64) * 0.25
    assert calibrate(x, spec, RangePolicy("mse")) == calibrate(x, spec)


def test_stochastic_mse_search_is_reproducible_from_the_generator():
    x = np.random.default_rng(9).laplace(size=5_000)
    spec = QuantSpec(bits=3, rounding="stochastic")
    runs = [calibrate(x, spec, RangePolicy("mse", mse_grid=20),
                      generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_policy_is_separate_from_the_grid():
    """A QuantSpec holds no calibration choice; a RangePolicy holds nothing of the grid."""
    assert not {"range_method", "percentile", "mse_grid", "aciq_law"} & set(
        QuantSpec.__dataclass_fields__)
    assert set(RangePolicy.__dataclass_fields__) == {"method", "percentile", "mse_grid",
                                                     "aciq_law"}
    assert RangePolicy("percentile").method is RangeMethod.PERCENTILE
    assert RangePolicy().replace(percentile=99).percentile == 99


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "magic"}, ValueError, "range method 'magic' is not one of"),
        ({"percentile": 0}, ValueError, "percentile must be in \\(0, 100\\]"),
        ({"percentile": 100.5}, ValueError, "percentile must be in"),
        ({"percentile": float("nan")}, ValueError, "percentile must be in"),
        ({"percentile": "99"}, ValueError, "percentile must be in"),
        ({"mse_grid": 1}, ValueError, "mse_grid must be an int >= 2, got 1"),
        ({"mse_grid": 10.0}, TypeError, "mse_grid must be an int >= 2, got 10.0"),
        ({"mse_grid": True}, TypeError, "mse_grid must be an int >= 2, got True"),
    ],
)
def test_bad_policy_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        RangePolicy(**kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: calibrate(x, QuantSpec(), RangeMethod.MSE),
         "policy must be a RangePolicy.*got RangeMethod"),
        (lambda x: calibrate(x, QuantSpec(), "percentile"),
         "policy must be a RangePolicy.*got str"),
        (lambda x: observed_range(x, QuantSpec(), None), "policy must be a RangePolicy"),
        (lambda x: calibrate(x, 8), "spec must be a QuantSpec, got int"),
        (lambda x: observed_range(x, "int8"), "spec must be a QuantSpec, got str"),
        (lambda x: qparams_from_range(-1.0, 1.0, "int8"), "spec must be a QuantSpec, got str"),
        (lambda x: RangePolicy().check(None), "spec must be a QuantSpec, got NoneType"),
    ],
)
def test_a_spec_or_policy_of_the_wrong_type_is_refused_by_name(call, match):
    """A method passed for the policy (calibrate(x, spec, RangeMethod.MSE)) or anything but
    a QuantSpec for the spec is refused with a TypeError naming the argument, as quantize
    and QuantConfig refuse them; it was an AttributeError ('RangeMethod' object has no
    attribute 'check')."""
    with pytest.raises(TypeError, match=match):
        call(np.array([-1.0, 0.5, 2.0]))


def test_numpy_percentiles_are_numbers():
    # np.float32(99.9) was refused as "not in (0, 100]"
    assert RangePolicy(percentile=np.float32(99.9)).percentile == np.float32(99.9)
    assert RangePolicy(percentile=np.int64(99)).percentile == 99
    with pytest.raises(ValueError, match="percentile must be in"):
        RangePolicy(percentile=np.bool_(True))


def test_percentile_at_or_below_50_is_refused_on_an_affine_grid():
    policy = RangePolicy("percentile", percentile=30)
    observed_range(np.ones(3), QuantSpec(), policy)  # symmetric: |x|'s 30th percentile is fine
    with pytest.raises(ValueError, match="above 50"):
        calibrate(np.ones(3), QuantSpec(symmetric=False), policy)


def test_a_range_spanning_float64_gets_a_finite_affine_scale():
    """[-1.5e308, 1.5e308] is finite but its width is not: the scale is still the width
    over the steps (computed apart: exact here, both halves divide alike), and the data
    quantize onto the grid; every method (the percentile range is its own, and MSE keeps
    the min-max range, which clips nothing)."""
    x = np.array([-1.5e308, 0.0, 1.5e308])
    spec = QuantSpec(bits=8, signed=True, symmetric=False)
    for method in (RangeMethod.MINMAX, RangeMethod.PERCENTILE, RangeMethod.MSE):
        policy = RangePolicy(method=method)
        qp = calibrate(x, spec, policy)
        lo, hi = (-1.5e308, 1.5e308) if method is not RangeMethod.PERCENTILE else (
            np.percentile(x, 100 - policy.percentile), np.percentile(x, policy.percentile))
        assert qp.scale == hi / 255 - lo / 255, method
        codes = quantize(x, spec, qp.scale, qp.zero_point)
        assert codes.min() >= spec.qmin and codes.max() <= spec.qmax


def test_an_affine_range_overhangs_its_grid_by_less_than_half_a_step():
    """Rounding the zero point shifts the grid against [min, max] (PyTorch's observers do the
    same): one end lies at most half a step beyond it, where round-to-nearest still maps it
    to the last code and floor or ceiling can clamp (saturation), as the docstring says."""
    from qerror import RoundingMode

    rng = np.random.default_rng(0)
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    clamped = {RoundingMode.FLOOR: 0, RoundingMode.CEIL: 0}
    for _ in range(300):
        x = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 2), 50)
        qp = calibrate(x, spec)
        u = np.array([min(x.min(), 0.0), max(x.max(), 0.0)]) / qp.scale + qp.zero_point
        assert u[0] > spec.qmin - 0.5 and u[1] < spec.qmax + 0.5
        assert np.array_equal(quantize(x, spec, qp.scale, qp.zero_point).astype(float),
                              np.clip(np.rint(x / qp.scale + qp.zero_point), 0, 15))
        for mode in clamped:
            _, sat = quantize(x, spec.replace(rounding=mode), qp.scale, qp.zero_point,
                              return_saturation=True)
            clamped[mode] += int(sat.total) > 0
    assert all(n > 0 for n in clamped.values())


@pytest.mark.parametrize("law, dist, published", [
    ("laplace", "laplace", {2: 2.83, 3: 3.89, 4: 5.03, 8: 9.89}),
    ("normal", "standard_normal", {2: 1.71, 3: 2.15, 4: 2.55, 8: 3.92}),
])
def test_aciq_policy_gives_banners_step_for_the_fitted_scale(law, dist, published):
    """Signed symmetric: the scale is ACIQ's step 2 alpha / 2^b, alpha / b Banner et al.'s
    published value for the width (to its two decimals) and b the law's estimate from the
    data (mean |x| or sqrt(mean x^2)); per channel the same as per tensor on each channel
    (the same float64 sums in another order: 1e-12)."""
    x = getattr(np.random.default_rng(3), dist)(size=(20_000, 3)) * np.array([1.0, 0.1, 7.0])
    b = np.mean(np.abs(x), axis=0) if law == "laplace" else np.sqrt(np.mean(x * x, axis=0))
    policy = RangePolicy(RangeMethod.ACIQ, aciq_law=law)
    for bits, alpha in published.items():
        p = calibrate(x[:, 0], QuantSpec(bits=bits), policy)
        assert abs(p.scale * 2 ** (bits - 1) / b[0] - alpha) <= 0.01 and p.zero_point == 0
        per = calibrate(x, QuantSpec(bits=bits, axis=1), policy).scale
        for c in range(3):
            assert per[c] == pytest.approx(
                calibrate(x[:, c], QuantSpec(bits=bits), policy).scale, rel=1e-12)
        np.testing.assert_allclose(per / b, p.scale / b[0], rtol=1e-12)


def test_aciq_policy_at_two_bits_has_the_mse_of_aciq_on_the_integer_grid():
    """At 2 bits the step decides everything (range alpha with step alpha/qmax was twice
    ACIQ's): the policy's MSE on normal data is the exact MSE of ACIQ's step on the integer
    grid (qerror.analytic), within 4 standard errors of the sample mean of the squared
    error (a two-sided level of about 6e-5), and far below min-max's."""
    from scipy import stats as sps

    from qerror.analytic import error_moments, optimal_clip

    x = np.random.default_rng(6).standard_normal(400_000)
    spec = QuantSpec(bits=2)
    p = calibrate(x, spec, RangePolicy("aciq", aciq_law="normal"))
    sq = (fake_quantize(x, spec, p.scale, p.zero_point) - x) ** 2
    sigma = np.sqrt(np.mean(x * x))
    aciq = optimal_clip(sps.norm(0, sigma), 2, "aciq")
    # the same optimum found twice (for the unit law, scaled, and for this sigma): equal to
    # the optimiser's tolerance on a flat minimum (test_analytic allows 1e-7)
    assert p.scale == pytest.approx(aciq.scale, rel=1e-7)
    exact = error_moments(sps.norm(0, sigma), aciq.spec, aciq.scale).mse
    assert abs(sq.mean() - exact) <= 4 * sq.std(ddof=1) / np.sqrt(sq.size)
    mm = calibrate(x, spec)
    assert sq.mean() < 0.5 * np.mean((fake_quantize(x, spec, mm.scale, 0) - x) ** 2)


def test_aciq_policy_one_sided_affine_and_within_the_data():
    rng = np.random.default_rng(4)
    relu = np.maximum(rng.laplace(size=50_000), 0.0)  # half zeros, half exponential
    pos = relu[relu > 0]
    p = calibrate(relu, QuantSpec(bits=4, signed=False), RangePolicy("aciq"))
    # the exponential law's one-sided alpha (= the Laplace's two-sided at one bit more,
    # 6.2048 at 5 bits) times the mean of the values above 0, the zeros left out; the step
    # alpha / 2^b
    assert p.zero_point == 0 and 6.19 <= p.scale * 2**4 / pos.mean() <= 6.21
    # affine: about the mean, with the spread about it, the step 2 alpha / 2^b
    shifted = rng.laplace(size=50_000) + 3.0
    spec = QuantSpec(bits=4, symmetric=False)
    lo, hi = observed_range(shifted, spec, RangePolicy("aciq"))
    b = np.mean(np.abs(shifted - shifted.mean()))
    assert hi - shifted.mean() == pytest.approx(shifted.mean() - lo, rel=1e-12)
    assert (hi - lo) / (spec.qmax - spec.qmin) * 2**4 / 2 / b == pytest.approx(5.0286,
                                                                               abs=1e-3)
    # never beyond the data: few samples of a narrow law at 8 bits
    small = rng.uniform(-1, 1, 50)
    lo, hi = observed_range(small, QuantSpec(bits=8), RangePolicy("aciq"))
    assert hi == np.abs(small).max()
    with pytest.raises(ValueError, match="aciq_law must be one of laplace, normal"):
        RangePolicy("aciq", aciq_law="cauchy")


def test_range_policy_label_names_each_method_and_its_setting():
    assert RangePolicy().label == "min-max"
    assert RangePolicy("percentile", percentile=99.9).label == "99.9th percentile"
    assert RangePolicy("mse", mse_grid=40).label == "MSE-optimal shrink of min-max (40 factors)"
    assert RangePolicy("aciq", aciq_law="normal").label == "ACIQ (normal)"


def test_calibration_and_quantizer_share_one_axis_check():
    """calibration._axis was a copy of quantizer._normalise_axis: both now QuantSpec.channel_axis,
    one message for calibrate, observed_range and quantize."""
    spec = QuantSpec(axis=-3)
    x = np.zeros((2, 3), np.float32)
    assert QuantSpec(axis=-1).channel_axis(x) == 1 and QuantSpec().channel_axis(x) is None
    messages = set()
    for call in (lambda: spec.channel_axis(x), lambda: calibrate(x, spec),
                 lambda: observed_range(x, spec), lambda: quantize(x, spec, 0.1)):
        with pytest.raises(ValueError, match="out of range for an input of shape") as err:
            call()
        messages.add(str(err.value))
    assert messages == {"spec.axis=-3 is out of range for an input of shape (2, 3)"}


def _exact_bound(work) -> Fraction:
    """The least real product that rounds to inf in ``work`` (float32 or float64): the
    largest finite number plus half its ulp, a tie that goes to inf (its significand is
    odd)."""
    info = np.finfo(work)
    return Fraction(float(info.max)) + Fraction(2) ** int(info.maxexp - info.nmant - 1) / 2


@pytest.mark.parametrize("work", [np.float32, np.float64])
@pytest.mark.parametrize("spec, zero_points", [
    (QuantSpec(bits=8), [0]),
    (QuantSpec(bits=8, narrow=True), [0]),
    (QuantSpec(bits=4, signed=False), [0]),
    (QuantSpec(bits=16, symmetric=False), [-32768, -5, 0, 1, 32767]),
    (QuantSpec(bits=8, signed=False, symmetric=False), [0, 1, 127, 128, 200, 255]),
])
def test_max_scale_is_the_largest_whose_grid_ends_are_finite(work, spec, zero_points):
    """Exact reference: s (q - z) rounds to a finite number of the working precision iff
    |s (q - z)| is below the largest finite number plus half its ulp; the returned scale is
    a number of that precision that meets it at both ends, and the next one up does not."""
    bound = _exact_bound(work)
    scales = spec.max_scale(np.array(zero_points), work)
    assert scales.shape == (len(zero_points),)
    for z, s in zip(zero_points, scales):
        assert float(work(s)) == s  # a number of the working precision: no rounding later
        k = max(spec.qmax - z, z - spec.qmin)
        up = float(np.nextafter(work(s), work(np.inf)))
        assert Fraction(float(s)) * k < bound <= Fraction(up) * k
        assert spec.max_scale(z, work) == s  # a scalar zero point gives a float
    # the same working precision for torch's dtypes; float16's own largest number bounds it
    assert QuantSpec().max_scale(0, torch.float64) == QuantSpec().max_scale(0, np.float64)
    assert QuantSpec().max_scale(0, np.float16) == QuantSpec().max_scale(0, torch.float16) \
        == 65504 / 128


@pytest.mark.parametrize("dtype", [np.float32, np.float64, torch.float32, torch.float64,
                                   np.float16])
@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8), QuantSpec(bits=8, narrow=True), QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8, signed=False, symmetric=False),
    QuantSpec(bits=4, symmetric=False), QuantSpec(bits=8, axis=0),
])
@pytest.mark.parametrize("method", [RangeMethod.MINMAX, RangeMethod.MSE, RangeMethod.PERCENTILE])
def test_data_at_the_formats_largest_number_fake_quantize_to_finite_values(dtype, spec,
                                                                           method):
    """Data spanning ±float32 max (or ±float64 max) got the scale max/127, whose 127 s rounds
    above max: fake-quantize gave ±inf for them (with an overflow warning), per tensor and per
    channel alike (/work/runs/s42/overflow/probe_siblings.py). Now every level of the grid is
    finite, the levels of the range's ends lie within one step of them (exactly), a narrow
    grid keeps the codes ±127 and an ordinary channel its scale and codes."""
    torch_in = isinstance(dtype, torch.dtype)
    npdt = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype, dtype)
    top = float(np.finfo(npdt).max)
    rows = [[-top, -1.0, 0.0, 1.0, top], [-2.0, -1.0, 0.0, 1.0, 2.0]]
    data = np.array(rows if spec.axis is not None else rows[0])
    x = torch.tensor(data, dtype=dtype) if torch_in else data.astype(dtype)
    qp = calibrate(x, spec, RangePolicy(method, percentile=100.0))
    with np.errstate(all="raise"):  # an overflow warning is an error here
        out = fake_quantize(x, spec, qp.scale, qp.zero_point)
        codes = quantize(x, spec, qp.scale, qp.zero_point)
        channels = np.size(qp.scale)
        grid_ends = dequantize(np.tile([spec.qmin, spec.qmax], (channels, 1)), qp.scale,
                               qp.zero_point, axis=spec.axis, dtype=npdt)
    out = np.asarray(out.numpy() if torch_in else out, dtype=np.float64).reshape(-1, 5)
    codes = np.asarray(codes.numpy() if torch_in else codes).reshape(-1, 5)
    assert np.all(np.isfinite(grid_ends)) and np.all(np.isfinite(out))
    # the level of each end's code, s (q - z) exactly (fake-quantize rounds it once more)
    step = Fraction(float(np.atleast_1d(qp.scale)[0]))
    z = int(np.atleast_1d(qp.zero_point)[0])
    kept_low = 0.0 if spec.symmetric and not spec.signed else -top  # else clamped to 0
    assert abs(step * (int(codes[0, -1]) - z) - Fraction(top)) <= step
    assert abs(step * (int(codes[0, 0]) - z) - Fraction(kept_low)) <= step
    assert np.all(out[0, 1:4] == 0.0)  # ±1 lie far within half a step of 0
    if spec.narrow:
        assert codes[0].tolist() == [-127, 0, 0, 0, 127]
    if spec.axis is not None:  # the ordinary channel is as it was
        assert qp.scale[1] == 2.0 / 127 and codes[1].tolist() == [-127, -64, 0, 64, 127]


def test_a_range_beyond_the_datas_format_is_refused():
    spec = QuantSpec(bits=8)
    with pytest.raises(ValueError, match="beyond 3.40282e\\+38, the largest number of the "
                                         "data's dtype"):
        qparams_from_range(-1e300, 1e300, spec)
    assert qparams_from_range(-1e300, 1e300, spec, dtype=np.float64).scale == 1e300 / 127


@pytest.mark.parametrize("work", [np.float32, np.float64])
@pytest.mark.parametrize("bits, signed", [(2, True), (4, False), (8, True), (8, False)])
def test_affine_ranges_near_the_formats_ends_keep_their_ends_within_a_step(work, bits, signed):
    """Random affine ranges with one or both ends within a few steps of the format's largest
    number: where the scale is lowered the zero point is found again, the grid's ends are
    finite, the lower end of the range lies within half a step of the grid and the upper
    within one step, up to the lowered scale's rounding (exact arithmetic)."""
    rng = np.random.default_rng(3)
    spec = QuantSpec(bits=bits, signed=signed, symmetric=False)
    top = float(np.finfo(work).max)
    slack = Fraction(float(np.finfo(work).eps)) * Fraction(top)
    lowered = 0
    for _ in range(400):
        u = rng.uniform(0.0, 1.0, 2)
        near = 1.0 - rng.uniform(0.0, 4.0 / spec.levels, 2) * (rng.uniform(size=2) < 0.7)
        lo, hi = -top * near[0] * (u[0] < 0.8), top * near[1] * (u[1] < 0.9)
        qp = qparams_from_range(lo, hi, spec, dtype=work)
        s, z = Fraction(qp.scale), qp.zero_point
        assert float(work(qp.scale)) == qp.scale or qp.scale < spec.max_scale(z, work)
        lowered += qp.scale == spec.max_scale(z, work)
        assert s * (spec.qmax - z) < _exact_bound(work)
        assert s * (z - spec.qmin) < _exact_bound(work)
        assert abs(s * (spec.qmin - z) - Fraction(min(lo, 0.0))) <= s / 2
        # one step of the real top / k, which the lowered scale is within an ulp of: at most
        # k <= steps of them, eps · top apart, and the step itself eps · top / k
        assert Fraction(max(hi, 0.0)) - s * (spec.qmax - z) <= s + 2 * slack
    assert lowered > 50


@pytest.mark.parametrize("k", [-1000, -540, 540, 1015])
@pytest.mark.parametrize("law", ["laplace", "normal"])
@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, signed=False),
                                  QuantSpec(bits=4, symmetric=False)])
def test_aciq_range_is_the_same_at_every_power_of_two(k, law, spec):
    """ACIQ's spread (sum of |x|, of x², the mean) was computed on float64 data as given: the
    normal law's squares overflowed above 1e154 (range min-max's), underflowed to 0 below
    1e-162 (a zero range, scale 1, every code 0), and near float64's end the sums overflowed
    (the affine mean inf, 'range bounds must be finite') (probe_siblings.py). Data scaled by
    2^k now get the range scaled by 2^k, exactly, per tensor and per channel."""
    x = np.random.default_rng(11).laplace(size=4000) + (0.5 if not spec.symmetric else 0.0)
    policy = RangePolicy(RangeMethod.ACIQ, aciq_law=law)
    ref = observed_range(x, spec, policy)
    assert ref[1] - ref[0] < np.ptp(x)  # ACIQ clips these data: not the min-max range
    got = observed_range(np.ldexp(x, k), spec, policy)
    assert [float(v) for v in got] == [float(np.ldexp(v, k)) for v in ref]
    # per channel (sums along a strided axis, in another order than the whole tensor's)
    per = observed_range(np.stack([x, np.ldexp(x, k)], axis=1), spec.replace(axis=1), policy)
    for end in per:
        assert end[1] == np.ldexp(end[0], k)


def test_an_affine_percentile_range_between_float64s_ends_is_finite():
    """np.percentile interpolates a + (b - a) t: between -1.5e308 and 1.5e308, b - a
    overflowed, and calibrate refused finite data with 'range bounds must be finite'
    (/work/runs/s42/overflow/percentile_probe.txt). The range is now interpolated in units
    of a power of two: -1.5e308 + 3e308 · 0.9999 is 1.4997e308, and the same scaled by 2^k
    at every k (per channel too)."""
    spec = QuantSpec(symmetric=False)
    policy = RangePolicy("percentile", percentile=99.99)
    lo, hi = observed_range(np.array([-1.5e308, 1.5e308]), spec, policy)
    assert np.isfinite(lo) and np.isfinite(hi)
    # numpy's lerp (a + (b - a) t, or b - (b - a)(1 - t) for t >= 0.5) rounds the width, the
    # product and the sum once each: within 1.5 ulp of the exact value at ±1.4997e308
    width = 2 * Fraction(1.5e308)
    for got, t in ((lo, Fraction(1) - Fraction(0.9999)), (hi, Fraction(0.9999))):
        exact = -Fraction(1.5e308) + width * t
        assert abs(Fraction(float(got)) - exact) <= Fraction(3, 2) * Fraction(
            float(np.spacing(abs(got))))
    assert calibrate(np.array([-1.5e308, 1.5e308]), spec, policy).zero_point == 0
    x = np.random.default_rng(12).standard_normal(999)
    ref = observed_range(x, spec, policy)
    two = np.stack([x, np.ldexp(x, 1020), np.ldexp(x, -1020)], axis=1)
    for end, r in zip(observed_range(two, spec.replace(axis=1), policy), ref):
        assert end.tolist() == [float(np.ldexp(r, k)) for k in (0, 1020, -1020)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_two_level_narrow_grid_calibrates_without_an_overflow_warning(dtype):
    """A 2-bit narrow signed grid (codes -1..1) ends one step from its zero point, so the
    largest scale whose grid is finite is the format's largest number itself; stepping one ulp
    above it to check for a larger one overflowed to inf with 'RuntimeWarning: overflow
    encountered in nextafter' on every calibrate and qparams_from_range for float32 and
    float64 data (an error under the project's warning filter;
    /work/runs/s48/calib/p6_narrow2.py). The scale is min-max's, with no warning, and the
    largest scale the format's largest number."""
    spec = QuantSpec(bits=2, narrow=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = calibrate(np.array([1.0, -2.0], dtype=dtype), spec)
        top = spec.max_scale(0, dtype)
    assert (p.scale, p.zero_point) == (2.0, 0)
    assert top == float(np.finfo(dtype).max)


@pytest.mark.parametrize("policy", [RangePolicy(), RangePolicy("percentile", percentile=99.0),
                                    RangePolicy("mse", mse_grid=4), RangePolicy("aciq"),
                                    RangePolicy("aciq", aciq_law="normal")],
                         ids=lambda p: p.label)
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(signed=False),
                                  QuantSpec(symmetric=False)], ids=["signed", "unsigned", "affine"])
def test_observed_range_gives_numpy_scalars_per_tensor_and_arrays_per_channel(policy, spec):
    """As its docstring says: per tensor numpy float64 scalars (a float each), per channel
    1-D arrays of length C. The unsigned percentile range's lower end was a 0-d array, which
    is no float: json.dumps refused it (/work/runs/s48/calib/p8_scalar.py)."""
    x = np.random.default_rng(13).standard_normal((40, 3))
    for end in observed_range(x[:, 0], spec, policy):
        assert type(end) is np.float64
    for end in observed_range(x, spec.replace(axis=1), policy):
        assert isinstance(end, np.ndarray) and end.shape == (3,) and end.dtype == np.float64
