"""ErrorStats: exactness against numpy on the concatenated data, merging, channels,
histogram and saturation counts, numerical stability, bad input.

Tolerances for float64 sums: a sum of n terms computed in any order has relative
error at most gamma_n = n u / (1 - n u), u = 2**-53, with respect to the sum of
the absolute values (Higham, Accuracy and Stability of Numerical Algorithms,
§4.2). Ours and numpy's are both within that of the exact value, so they may
differ by 2 gamma_n times the natural scale; we compare at 4 gamma_n of it.
"""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from qerror import QuantSpec, empirical, fake_quantize, quantize
from qerror.empirical import ErrorStats, HistogramBins, measure_error

U = 2.0**-53


def gamma(n):
    return n * U / (1 - n * U)


def assert_matches_numpy(stats, data):
    """Compare every moment with numpy on the concatenated float64 data."""
    x = np.asarray(data, dtype=np.float64).reshape(-1)
    n = x.size
    tol = 4 * gamma(n)
    scale1 = np.mean(np.abs(x))
    scale2 = np.mean(x * x)
    assert stats.count == n
    assert abs(stats.mean - x.mean()) <= tol * scale1
    assert abs(stats.mae - np.mean(np.abs(x))) <= tol * scale1
    assert abs(stats.mse - np.mean(x * x)) <= tol * scale2
    assert abs(stats.variance - x.var()) <= tol * scale2
    assert abs(stats.sample_variance - x.var(ddof=1)) <= tol * scale2 * n / (n - 1)
    assert abs(stats.sem - x.std(ddof=1) / np.sqrt(n)) <= tol * np.sqrt(scale2 / n)
    assert stats.min == x.min() and stats.max == x.max()


def state(stats):
    """Everything observable, for exact comparisons."""
    s = stats.summary()
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}


def assert_same_state(a, b, exact=True, rtol=0.0):
    sa, sb = state(a), state(b)
    for key in sa:
        va, vb = sa[key], sb[key]
        if key in ("n", "histogram", "underflow", "overflow", "saturation_low",
                   "saturation_high", "saturation_observed", "min", "max", "bins") or exact:
            np.testing.assert_array_equal(va, vb, err_msg=key)
        else:
            np.testing.assert_allclose(va, vb, rtol=rtol, atol=0, err_msg=key)


# --------------------------------------------------------------------------- exactness


def test_streamed_batches_match_numpy_on_the_concatenation():
    rng = np.random.default_rng(0)
    batches = [rng.normal(0.3, 1.7, size) for size in (1, 2, 999, 70_000, 5)]
    stats = ErrorStats()
    for b in batches:
        stats.update(b, scale=0.25)
    assert_matches_numpy(stats, np.concatenate(batches))


def test_float32_batches_are_widened_exactly():
    rng = np.random.default_rng(1)
    batches = [torch.from_numpy(rng.uniform(-0.5, 0.5, size).astype(np.float32))
               for size in (300_000, 1234)]
    stats = ErrorStats()
    for b in batches:
        stats.update(b)
    # The reference sees the same float32 values, widened: no float32 rounding anywhere.
    assert_matches_numpy(stats, np.concatenate([b.numpy().astype(np.float64) for b in batches]))


def test_numpy_and_torch_inputs_give_identical_state():
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        x = rng.normal(size=(7, 33, 129)).astype(dtype)
        codes = rng.integers(-8, 8, size=x.shape).astype(np.int32)
        kw = {"scale": np.linspace(0.1, 0.2, 33), "codes": codes, "qmin": -8, "qmax": 7}
        a = ErrorStats(axis=1).update(x, **kw)
        b = ErrorStats(axis=1).update(torch.from_numpy(x), **{**kw,
                                                            "codes": torch.from_numpy(codes)})
        assert_same_state(a, b, exact=True)


def test_half_precision_inputs_are_widened_exactly():
    x = torch.randn(10_000).to(torch.bfloat16)
    stats = ErrorStats().update(x)
    assert_matches_numpy(stats, x.to(torch.float64).numpy())
    h = np.random.default_rng(3).normal(size=5000).astype(np.float16)
    assert_matches_numpy(ErrorStats().update(h), h.astype(np.float64))


def test_non_contiguous_inputs_match_contiguous_copies():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 48))
    ref = ErrorStats(axis=1).update(np.ascontiguousarray(x[::-1, ::2]))
    assert_same_state(ErrorStats(axis=1).update(x[::-1, ::2]), ref)
    t = torch.from_numpy(x).t()  # transposed view: channel axis 0 of the view
    ref_t = ErrorStats(axis=0).update(t.contiguous())
    assert_same_state(ErrorStats(axis=0).update(t), ref_t)


def test_huge_offset_variance_is_stable_where_the_naive_formula_fails():
    # Values near 1e8 carry absolute rounding ~1.5e-8 in their means, so the
    # Chan merge term delta² n_a n_b / n is perturbed by about 1e-7 of the
    # variance (delta ~ 1e-5 here); the bound is ten times that estimate (seen: 4e-8).
    rng = np.random.default_rng(5)
    batches = [1e8 + rng.normal(0, 1e-3, 20_000) for _ in range(10)]
    stats = ErrorStats()
    for b in batches:
        stats.update(b)
    x = np.concatenate(batches)
    ref = x.var()  # numpy's two-pass variance, accurate to ~1e-8 relative here
    assert abs(stats.variance / ref - 1) < 1e-6
    assert abs(stats.mean - x.mean()) <= 4 * gamma(x.size) * 1e8
    naive = np.mean(x * x) - np.mean(x) ** 2
    assert abs(naive / ref - 1) > 1e-2  # the formula the accumulator avoids


def test_mse_is_the_mean_square_not_variance_plus_mean_squared():
    x = np.full(1000, 3.0) + np.linspace(-1e-9, 1e-9, 1000)
    stats = ErrorStats().update(x)
    assert stats.mse == pytest.approx(np.mean(x * x), rel=4 * gamma(1000))
    # two two-pass variances of the same floats: their means differ by at most
    # d = 2 γ_n · 3, which moves a variance by d² (relative d² / var = 3.2e-7), and their
    # sums of squared deviations by 2 γ_n
    d = 2 * gamma(1000) * 3.0
    assert stats.variance == pytest.approx(x.var(), rel=d * d / x.var() + 2 * gamma(1000))


def test_single_value_has_nan_sample_variance():
    stats = ErrorStats().update(np.array([0.25]))
    assert stats.mean == 0.25 and stats.variance == 0.0
    assert np.isnan(stats.sample_variance) and np.isnan(stats.sem)


def test_constant_data_has_zero_variance():
    stats = ErrorStats().update(np.full(100_000, 0.1))
    assert stats.variance == 0.0 and stats.mean == pytest.approx(0.1, rel=4 * gamma(100_000))


# --------------------------------------------------------------------------- merging


def _split_stats(parts, **kw):
    out = []
    for p in parts:
        s = ErrorStats(**kw)
        for batch in p:
            s.update(batch, scale=0.5)
        out.append(s)
    return out


def test_merge_equals_one_accumulator_over_all_data():
    rng = np.random.default_rng(6)
    batches = [rng.normal(0.1, 0.3, n) for n in (10, 5000, 333, 1, 20_000)]
    whole = ErrorStats()
    for b in batches:
        whole.update(b, scale=0.5)
    a, b = _split_stats([batches[:2], batches[2:]])
    merged = a.copy().merge(b)
    # Counts, extrema and histogram are exact; moments agree to float64 round-off.
    assert_same_state(merged, whole, exact=False, rtol=4 * gamma(25_344))
    assert_matches_numpy(merged, np.concatenate(batches))
    assert a.count == 5010  # merge leaves the source and copies untouched


def test_merge_is_associative():
    rng = np.random.default_rng(7)
    parts = [[rng.normal(5.0, 0.01, n)] for n in (1000, 17, 40_000)]
    a, b, c = _split_stats(parts, axis=None)
    left = a.copy().merge(b).merge(c)
    right = a.copy().merge(b.copy().merge(c))
    assert_same_state(left, right, exact=False, rtol=8 * gamma(41_017))


def test_merge_with_empty_is_identity():
    stats = ErrorStats().update(np.arange(10.0))
    before = state(stats)
    stats.merge(ErrorStats())
    assert_same_state(stats, ErrorStats().merge(stats))
    after = state(stats)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1), offset=st.floats(-1e6, 1e6))
def test_any_split_merges_to_the_whole(sizes, seed, offset):
    rng = np.random.default_rng(seed)
    batches = [offset + rng.uniform(-0.5, 0.5, n) for n in sizes]
    merged = ErrorStats()
    for b in batches:
        merged.merge(ErrorStats().update(b))
    x = np.concatenate(batches)
    whole = ErrorStats().update(x)
    assert merged.count == whole.count == x.size
    assert merged.min == x.min() and merged.max == x.max()
    np.testing.assert_array_equal(merged.histogram, whole.histogram)
    tol = 8 * gamma(x.size)
    assert abs(merged.mean - whole.mean) <= tol * np.mean(np.abs(x))
    # The variance of ~1/12 sits under an offset of up to 1e6: judge it on the
    # scale of the second moment, which bounds every rounding involved.
    assert abs(merged.variance - whole.variance) <= tol * np.mean(x * x)


# --------------------------------------------------------------------------- channels


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("block", [1 << 18, 64, 5])
def test_per_channel_matches_numpy_channel_by_channel(axis, block, monkeypatch):
    # Small blocks force the row-blocked and the column-blocked paths.
    monkeypatch.setattr(empirical, "_BLOCK", block)
    rng = np.random.default_rng(8)
    x = rng.normal(0.2, 1.0, size=(6, 5, 4, 3)) * np.array([1, 2, 3])
    first, second = np.array_split(x, [4], axis=1 if axis == 0 else 0)
    stats = ErrorStats(axis=axis)
    stats.update(first).update(torch.from_numpy(second))
    per_channel = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    assert stats.channels == x.shape[axis]
    for ch, values in enumerate(per_channel):
        n = values.size
        tol = 4 * gamma(n)
        assert abs(stats.mean[ch] - values.mean()) <= tol * np.mean(np.abs(values))
        assert abs(stats.variance[ch] - values.var()) <= tol * np.mean(values**2)
        assert abs(stats.mse[ch] - np.mean(values**2)) <= tol * np.mean(values**2)
        assert abs(stats.mae[ch] - np.mean(np.abs(values))) <= tol * np.mean(np.abs(values))
        assert stats.min[ch] == values.min() and stats.max[ch] == values.max()
    assert stats.count == per_channel.shape[1]


def test_per_channel_scale_histogram_is_in_lsb_units():
    rng = np.random.default_rng(9)
    scale = np.array([0.5, 0.25, 0.125])  # powers of two: exact LSB conversion
    x = rng.uniform(-1.6, 1.6, size=(500, 3)) * scale
    edges = HistogramBins().edges
    ref = np.histogram((x / scale).ravel(), bins=edges)[0]
    per_ch = ErrorStats(axis=1).update(x, scale=scale)
    pooled = ErrorStats().update(x, scale=scale, scale_axis=1)
    np.testing.assert_array_equal(per_ch.histogram, ref)
    np.testing.assert_array_equal(pooled.histogram, ref)
    assert pooled.count == x.size and per_ch.count == 500
    lsb = x / scale
    assert per_ch.underflow == pooled.underflow == np.sum(lsb < -1.5)
    assert per_ch.overflow == pooled.overflow == np.sum(lsb >= 1.5)


def test_a_per_channel_scale_of_one_channel_takes_its_axis():
    # a layer with one output channel: its per-channel scale has one entry, and scale_axis
    # says where it lies; it was refused as "a scalar scale"
    x = np.random.default_rng(10).uniform(-1.6, 1.6, size=(1, 200)) * 0.25
    edges = HistogramBins().edges
    pooled = ErrorStats().update(x, scale=np.array([0.25]), scale_axis=0)
    np.testing.assert_array_equal(pooled.histogram, np.histogram(x.ravel() / 0.25, edges)[0])
    assert pooled.count == x.size
    with pytest.raises(ValueError, match="1 values but axis 1 of the error has 200"):
        ErrorStats().update(x, scale=np.array([0.25]), scale_axis=1)
    with pytest.raises(ValueError, match="scalar scale"):
        ErrorStats().update(x, scale=np.float64(0.25), scale_axis=0)


# --------------------------------------------------------------------------- histogram


def test_histogram_bins_are_half_open_and_exact_on_the_grid():
    # Every multiple of 1/128 LSB in [-2, 2]: edges, bin midpoints and out-of-range values.
    eps = np.arange(-256, 257) / 128.0
    stats = ErrorStats().update(eps * 0.5, scale=0.5)
    k = np.floor((eps + 1.5) * 64).astype(int)  # exact: powers of two throughout
    inside = (k >= 0) & (k < 192)
    np.testing.assert_array_equal(stats.histogram, np.bincount(k[inside], minlength=192))
    assert stats.underflow == np.sum(eps < -1.5)
    assert stats.overflow == np.sum(eps >= 1.5)  # high edge is open: 1.5 overflows
    assert stats.histogram.sum() + stats.underflow + stats.overflow == eps.size


def test_histogram_bins_are_exact_next_to_an_edge():
    """A value just below an edge, or a tiny negative error (a tiny positive value rounded
    to 0), belongs to the bin below; floor(ε/w) then the integer offset keeps it there,
    where a float sum of the offset first rounded it up onto the edge."""
    from fractions import Fraction

    eps = np.array([-1e-20, -3e-15, -1e-300, 1 / 64 - 2.0**-58, 0.5 - 2.0**-52,
                    -0.5 - 2.0**-50, 0.0, -0.0, 2.0**-60])
    for s in (1.0, 2.0**-7):
        stats = ErrorStats().update(eps * s, scale=s)
        k = [int((Fraction(float(v)) + Fraction(3, 2)) * 64 // 1) for v in eps]
        np.testing.assert_array_equal(stats.histogram, np.bincount(k, minlength=192))
    tiny = ErrorStats().update(np.array([-1e-30], np.float32), scale=1.0)
    assert tiny.histogram[95] == 1  # [-1/64, 0)


def test_histogram_counts_match_an_independent_reference():
    rng = np.random.default_rng(10)
    s = 0.0371
    e = rng.uniform(-1.7, 1.7, 200_000) * s
    bins = HistogramBins(-1.25, 1.0, 90)
    stats = ErrorStats(bins=bins).update(e, scale=s)
    lsb = e / s
    edges = bins.edges
    # The comparison is exact only away from float64 round-off of an edge; the
    # data are checked to keep clear of every edge.
    assert np.min(np.abs(lsb[:, None] - edges[None, :])) > 1e-9
    idx = np.searchsorted(edges, lsb, side="right") - 1
    inside = (idx >= 0) & (idx < bins.count)
    np.testing.assert_array_equal(stats.histogram, np.bincount(idx[inside], minlength=90))
    assert stats.underflow == np.sum(lsb < bins.low)
    assert stats.overflow == np.sum(lsb >= bins.high)


def test_histogram_handles_values_whose_lsb_value_overflows():
    e = np.array([-1e100, -1.6e-300, 0.0, 1e100, 1e150])
    stats = ErrorStats().update(e, scale=1e-300)
    assert stats.underflow == 2 and stats.overflow == 2 and stats.histogram.sum() == 1


def test_overflowing_sums_raise_instead_of_poisoning_the_state():
    stats = ErrorStats().update(np.zeros(3))
    with pytest.raises(ValueError, match="overflow"):
        stats.update(np.array([1.0, np.finfo(np.float64).max]))
    assert stats.count == 3 and stats.mse == 0.0


# --------------------------------------------------------------------------- saturation


def test_saturation_counts_from_codes_are_exact():
    rng = np.random.default_rng(11)
    spec = QuantSpec(bits=4)
    x = rng.normal(size=(40, 8, 16)).astype(np.float32)
    scale = 0.2
    q = quantize(x, spec, scale)
    xh = fake_quantize(x, spec, scale)
    stats = measure_error(x, xh, scale=scale, codes=q, qmin=spec.qmin, qmax=spec.qmax)
    assert stats.saturation_low == np.sum(q == spec.qmin) > 0
    assert stats.saturation_high == np.sum(q == spec.qmax) > 0
    assert stats.saturation_observed == x.size
    per_ch = ErrorStats(axis=1).update(torch.from_numpy(xh - x), codes=torch.from_numpy(q),
                                       qmin=spec.qmin, qmax=spec.qmax)
    np.testing.assert_array_equal(per_ch.saturation_low, np.sum(q == spec.qmin, axis=(0, 2)))
    np.testing.assert_array_equal(per_ch.saturation_high, np.sum(q == spec.qmax, axis=(0, 2)))
    summary = per_ch.summary()
    np.testing.assert_array_equal(summary.frac_low, summary.saturation_low / (40 * 16))


def test_saturation_from_masks_and_from_quantizer_counts():
    rng = np.random.default_rng(12)
    spec = QuantSpec(bits=3, axis=0)
    x = rng.normal(size=(4, 1000))
    scale = np.array([0.3, 0.4, 0.5, 0.6])
    xh, sat = fake_quantize(x, spec, scale, return_saturation=True)
    from_sat = ErrorStats(axis=0).update(xh - x, scale=scale, saturation=sat)
    np.testing.assert_array_equal(from_sat.saturation_low, sat.low)
    np.testing.assert_array_equal(from_sat.saturation_high, sat.high)
    u = x / scale[:, None]
    low_mask, high_mask = np.rint(u) < spec.qmin, np.rint(u) > spec.qmax
    from_mask = ErrorStats(axis=0).update(xh - x, low_mask=low_mask, high_mask=high_mask)
    np.testing.assert_array_equal(from_mask.saturation_low, low_mask.sum(axis=1))
    np.testing.assert_array_equal(from_mask.saturation_high, high_mask.sum(axis=1))
    pooled = ErrorStats().update(xh - x, saturation=sat)
    assert pooled.saturation_low == sat.low.sum()


def test_saturation_is_zero_and_fractions_nan_when_never_reported():
    stats = ErrorStats().update(np.zeros(10))
    assert stats.saturation_low == 0 and stats.saturation_observed == 0
    assert np.isnan(stats.summary().frac_low)


# --------------------------------------------------------------------------- convenience


def test_measure_error_matches_update_and_uniform_noise_mse():
    # Nearest rounding of a wide input: MSE/s² = 1/12 under the uniform-noise
    # model; the standard error of the mean of ε² for ε ~ U(-1/2, 1/2) is
    # sqrt(1/180/n). Two-sided alpha = 1e-3.
    rng = np.random.default_rng(13)
    spec = QuantSpec(bits=8)
    x = torch.from_numpy(rng.normal(size=200_000).astype(np.float32))
    scale = float(x.abs().max()) / 127  # no clipping: the error is all granular
    xh = fake_quantize(x, spec, scale)
    stats = measure_error(x, xh, scale=scale)
    again = ErrorStats().update(xh - x, scale=scale)
    assert_same_state(stats, again)
    n = x.numel()
    z = sps.norm.isf(1e-3 / 2)
    assert abs(stats.mse / scale**2 - 1 / 12) <= z * np.sqrt(1 / 180 / n)
    # granular error of nearest lies in [-1/2, 1/2] LSB, to float32's rounding: the scale,
    # x/s (or x times 1/s) and s·q each rounded once, relative 2⁻²⁴ of at most 128 LSB.
    # (The histogram alone, [-3/2, 3/2), would also hold errors of a whole LSB.)
    assert max(-stats.min, stats.max) / scale <= 1 / 2 + 4 * 128 * 2.0**-24
    assert stats.histogram.sum() == n


def test_summary_is_frozen_and_read_only():
    summary = ErrorStats().update(np.arange(5.0)).summary()
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.mean = 0.0
    with pytest.raises(ValueError):
        summary.histogram[0] = 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_gives_the_cpu_state():
    x = torch.randn(3, 50_000, dtype=torch.float64)
    cpu = ErrorStats(axis=0).update(x, scale=0.5)
    gpu = ErrorStats(axis=0).update(x.cuda(), scale=0.5)
    assert_same_state(gpu, cpu, exact=False, rtol=4 * gamma(50_000))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("axis", [None, 1])
def test_non_finite_values_raise_and_leave_the_state_alone(bad, lib, axis):
    stats = ErrorStats(axis=axis).update(np.ones((3, 4)))
    before = state(stats)
    x = np.ones((3, 4))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(x if lib == "numpy" else torch.from_numpy(x))
    after = state(stats)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_invalid_saturation_input_leaves_the_state_alone():
    stats = ErrorStats().update(np.zeros(4))
    before = state(stats)
    with pytest.raises(ValueError, match="outside"):
        stats.update(np.zeros(4), codes=np.array([0, 1, 2, 9]), qmin=0, qmax=7)
    assert state(stats)["n"] == before["n"] and stats.saturation_observed == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"codes": np.zeros(3, dtype=np.int32), "qmin": 0, "qmax": 7}, ValueError, "shape"),
        ({"codes": np.zeros(4), "qmin": 0, "qmax": 7}, TypeError, "integers"),
        ({"codes": np.zeros(4, dtype=np.int32)}, ValueError, "qmin and qmax"),
        ({"qmin": 0, "qmax": 3}, ValueError, "without codes"),
        ({"codes": np.zeros(4, dtype=np.int32), "qmin": 3, "qmax": 3}, ValueError, "qmin < qmax"),
        # int() truncated these: codes at 1 were counted as saturated below a qmin of 1.5,
        # not refused as outside [qmin, qmax]
        ({"codes": np.ones(4, dtype=np.int32), "qmin": 1.5, "qmax": 7}, TypeError,
         "qmin must be an integer"),
        ({"codes": np.ones(4, dtype=np.int32), "qmin": 0, "qmax": 6.9}, TypeError,
         "qmax must be an integer"),
        ({"codes": np.ones(4, dtype=np.int32), "qmin": "0", "qmax": 7}, TypeError,
         "qmin must be an integer"),
        ({"codes": np.ones(4, dtype=np.int32), "qmin": True, "qmax": 7}, TypeError,
         "qmin must be an integer"),
        ({"low_mask": np.zeros(4, dtype=bool)}, ValueError, "together"),
        ({"low_mask": np.zeros(4), "high_mask": np.zeros(4)}, TypeError, "boolean"),
        # counted in both, the saturation fractions summed to 1.5 on [T, T, T, F] twice
        ({"low_mask": np.array([True, True, True, False]),
          "high_mask": np.array([True, True, True, False])}, ValueError, "both mark 3"),
        ({"codes": np.zeros(4, dtype=np.int32), "qmin": 0, "qmax": 7,
              "low_mask": np.zeros(4, dtype=bool), "high_mask": np.zeros(4, dtype=bool)},
         ValueError, "one way"),
        ({"scale": 0.0}, ValueError, "positive"),
        ({"scale": np.array([1.0, 2.0])}, ValueError, "scale_axis"),
        ({"scale": np.array([1.0, 2.0]), "scale_axis": 0}, ValueError, "channels"),
        ({"scale_axis": 0}, ValueError, "without a scale"),
        ({"scale": 1.0, "scale_axis": 0}, ValueError, "scalar scale"),
        ({"scale": np.ones(4), "scale_axis": 3}, ValueError, "out of range"),
    ],
)
def test_bad_update_arguments_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ErrorStats().update(np.zeros(4), **kwargs)


def test_bad_error_arrays_raise():
    with pytest.raises(TypeError, match="floating-point"):
        ErrorStats().update(np.zeros(4, dtype=np.int32))
    with pytest.raises(ValueError, match="empty"):
        ErrorStats().update(np.zeros((0, 3)))
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        ErrorStats().update([0.1, 0.2])
    with pytest.raises(ValueError, match="out of range"):
        ErrorStats(axis=2).update(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="x_hat has"):
        measure_error(np.zeros(3), np.zeros(4))


def test_channel_count_must_not_change():
    stats = ErrorStats(axis=1).update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="per-channel accumulator needs one per channel"):
        sat = quantize(np.zeros((2, 3)), QuantSpec(bits=4), 1.0, return_saturation=True)[1]
        stats.update(np.zeros((2, 3)), saturation=sat)


def test_merging_incompatible_accumulators_raises():
    a = ErrorStats().update(np.zeros(3))
    with pytest.raises(ValueError, match="bins"):
        a.merge(ErrorStats(bins=HistogramBins(count=10)).update(np.zeros(3)))
    with pytest.raises(ValueError, match="axis"):
        a.merge(ErrorStats(axis=0).update(np.zeros(3)))
    c2 = ErrorStats(axis=1).update(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="channels"):
        c2.merge(ErrorStats(axis=1).update(np.zeros((2, 5))))
    with pytest.raises(TypeError):
        a.merge(np.zeros(3))


def test_empty_accumulator_has_no_statistics():
    stats = ErrorStats()
    assert stats.count == 0 and stats.histogram.sum() == 0
    for name in ("mean", "variance", "mse", "mae", "min", "summary"):
        with pytest.raises(ValueError, match="no data"):
            attr = getattr(stats, name)
            attr() if callable(attr) else None


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="low < high"):
        HistogramBins(1.0, -1.0)
    with pytest.raises(ValueError, match="count must be an int >= 1, got 0"):
        HistogramBins(count=0)
    with pytest.raises(TypeError, match="count must be an int >= 1, got 64.0"):
        HistogramBins(count=64.0)
    with pytest.raises(TypeError, match="axis"):
        ErrorStats(axis=1.5)
    with pytest.raises(TypeError, match="HistogramBins"):
        ErrorStats(bins=64)


def test_a_histogram_step_that_is_not_a_normal_float64_is_refused():
    # s·w subnormal has lost bits: with s = 1e-320 (s·w = 1.6e-322), 0.25 LSB went to bin 111
    # ([-1/64, 0)) and -1.4 LSB to bin 7, not 112 and 6; s·w = 0 (s = 5e-324) failed inside
    # bincount with a RuntimeError. Bins over [-1e308, 1e308) (width inf) put -1e100, -1, 1
    # and 1e100 all in the first bin.
    e = np.array([0.25, -1.4])
    for s in (1e-320, 3e-315, 5e-324):
        stats = ErrorStats().update(np.zeros(2))
        with pytest.raises(ValueError, match="not a normal float64"):
            stats.update(e * s, scale=s)
        assert stats.count == 2
    with pytest.raises(ValueError, match="not a normal float64"):
        ErrorStats(axis=0).update(np.zeros((2, 3)), scale=np.array([0.5, 1e-320]))
    with pytest.raises(ValueError, match="not a normal float64"):
        HistogramBins(-1e308, 1e308, 4)
    with pytest.raises(ValueError, match="not a normal float64"):
        HistogramBins(0.0, 1e-310, 1)
    # the smallest normal step is accepted and exact: s·w = 2**-1022 with w = 1/64
    s = 2.0**-1016
    stats = ErrorStats().update(np.array([0.25, -1.4]) * s, scale=s)
    assert np.flatnonzero(stats.histogram).tolist() == [6, 112]


@pytest.mark.parametrize("dtype, tiny", [(torch.float16, 2.0**-14 + 2.0**-24),
                                         (torch.bfloat16, 2.0**-9 + 2.0**-16),
                                         (torch.float32, 2.0**-27 + 2.0**-50)])
def test_measure_error_forms_the_exact_difference_of_low_precision_data(dtype, tiny):
    # x_hat = 1 (a value below one LSB rounded up, as CEIL or stochastic rounding give it)
    # and x = tiny: 1 - tiny needs more significand bits than the dtype has, so formed in
    # the dtype it was rounded (float16 and float32 gave 1.0, bfloat16 1 - 2**-8, where the
    # error is 1 - tiny), and mean, mse and histogram with it.
    from fractions import Fraction

    x = torch.tensor([tiny, 0.5], dtype=dtype)
    x_hat = torch.tensor([1.0, 0.5], dtype=dtype)
    assert float(x[0]) == tiny  # representable
    exact = Fraction(1) - Fraction(tiny)
    assert float(exact) == 1 - tiny  # exact in float64
    stats = measure_error(x, x_hat)
    assert stats.max == float(exact) and stats.min == 0.0
    assert stats.mean == float(exact / 2)
    assert stats.mse == float(exact * exact / 2)
    # bin k holds [-1.5 + k/64, -1.5 + (k+1)/64): 1 - tiny is in bin 159, 1.0 in bin 160
    assert stats.histogram[159] == 1 and stats.histogram[160] == 0
    # numpy float16 goes the same way
    if dtype == torch.float16:
        again = measure_error(x.numpy(), x_hat.numpy())
        assert again.mean == stats.mean and again.mse == stats.mse
