"""Rounding modes: numpy/torch agreement bit for bit, intervals, stochastic statistics."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from qerror import RoundingMode, apply_rounding

MODES = list(RoundingMode)
DTYPES = [np.float16, np.float32, np.float64]


def _awkward_values(dtype) -> np.ndarray:
    """Ties, their neighbours, signed zeros, huge and tiny values, and random data."""
    info = np.finfo(dtype)
    ties = np.arange(-6, 6) + 0.5
    base = np.concatenate([ties, np.arange(-6, 7), [0.0, -0.0, 0.49999999999999994, 1e-30]])
    base = base.astype(dtype)
    near = np.concatenate([np.nextafter(base, dtype(np.inf)), np.nextafter(base, dtype(-np.inf))])
    big = np.array([2.0 ** (info.nmant - 1) + 0.5, 2.0**info.nmant, -(2.0**info.nmant) - 1,
                    float(info.max), -float(info.max), float(info.tiny)], dtype=np.float64)
    rng = np.random.default_rng(1234)
    rand = (rng.standard_normal(4000) * rng.choice([0.1, 1, 30, 1000], 4000)).astype(dtype)
    with np.errstate(over="ignore"):
        big = big.astype(dtype)
    return np.concatenate([base, near, big[np.isfinite(big)], rand])


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_numpy_and_torch_agree_bit_for_bit(mode, dtype):
    x = _awkward_values(dtype)
    a = apply_rounding(x, mode, generator=7)
    b = apply_rounding(torch.from_numpy(x.copy()), mode, generator=7).numpy()
    assert a.dtype == x.dtype and b.dtype == x.dtype
    np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_draws_do_not_depend_on_how_numpy_splits_the_work(dtype):
    """numpy's kernel works on long arrays in passes; each pass must hash its own flat
    indices: the same bits as torch's one-pass kernel, for a contiguous array and for a
    strided view (which numpy rounds in one pass), over several passes and a remainder."""
    x = (np.random.default_rng(3).standard_normal(2 * 100_003) * 3).astype(dtype)
    for arr in (x[:100_003], x[::2]):
        a = apply_rounding(arr, RoundingMode.STOCHASTIC, generator=5)
        b = apply_rounding(torch.from_numpy(arr.copy()), RoundingMode.STOCHASTIC,
                           generator=5).numpy()
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("mode", MODES)
def test_shape_is_kept_and_values_are_integers(mode):
    x = np.linspace(-3.3, 3.3, 24, dtype=np.float32).reshape(2, 3, 4)
    out = apply_rounding(x, mode, generator=0)
    assert out.shape == x.shape
    assert np.all(out == np.floor(out))


def test_torch_round_is_half_to_even_and_nearest_away_differs():
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert torch.round(ties).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]
    assert apply_rounding(ties, RoundingMode.NEAREST_EVEN).tolist() == torch.round(ties).tolist()
    assert apply_rounding(ties, RoundingMode.NEAREST_AWAY).tolist() == [1, 2, 3, -1, -2, -3]


def test_nearest_away_is_exact_just_below_a_half():
    # floor(x + 0.5) would give 1 here, because 0.49999999999999994 + 0.5 rounds to 1.0.
    x = np.array([0.49999999999999994, -0.49999999999999994])
    assert apply_rounding(x, "nearest_away").tolist() == [0.0, 0.0]


finite_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(max_dims=3, max_side=6),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=200, deadline=None)
@given(x=finite_arrays, mode=st.sampled_from(MODES), seed=st.integers(0, 2**64 - 1))
def test_error_lies_in_the_mode_interval(x, mode, seed):
    r = apply_rounding(x, mode, generator=seed).astype(np.float64)
    e = r - x.astype(np.float64)
    iv = mode.interval
    pos, neg = x > 0, x < 0
    assert np.all((iv.low <= e) & (e <= iv.high))
    assert np.all((iv.positive[0] <= e[pos]) & (e[pos] <= iv.positive[1]))
    assert np.all((iv.negative[0] <= e[neg]) & (e[neg] <= iv.negative[1]))


@settings(max_examples=200, deadline=None)
@given(x=finite_arrays, mode=st.sampled_from([RoundingMode.NEAREST_EVEN,
                                               RoundingMode.NEAREST_AWAY,
                                               RoundingMode.TOWARD_ZERO]))
def test_symmetric_modes_are_odd(x, mode):
    np.testing.assert_array_equal(apply_rounding(-x, mode), -apply_rounding(x, mode))


@settings(max_examples=100, deadline=None)
@given(x=finite_arrays, mode=st.sampled_from(MODES))
def test_rounding_is_idempotent(x, mode):
    once = apply_rounding(x, mode, generator=3)
    np.testing.assert_array_equal(apply_rounding(once, mode, generator=4), once)


def test_stochastic_is_reproducible_and_seed_dependent():
    x = np.full(10_000, 0.3)
    a = apply_rounding(x, RoundingMode.STOCHASTIC, generator=11)
    b = apply_rounding(x, RoundingMode.STOCHASTIC, generator=11)
    c = apply_rounding(x, RoundingMode.STOCHASTIC, generator=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(apply_rounding(x, "stochastic", generator=g1),
                                  apply_rounding(x, "stochastic", generator=g2))
    # A generator advances: its second call gives fresh decisions.
    assert not np.array_equal(apply_rounding(x, "stochastic", generator=g1),
                              apply_rounding(x, "stochastic", generator=g2.spawn(1)[0]))


@pytest.mark.parametrize("frac", [0.3, 0.5, 0.97])
def test_stochastic_rounds_up_with_probability_frac(frac):
    """Two-sided binomial test at alpha = 1e-3 that P(up) = frac, per fraction."""
    n = 200_000
    x = np.full(n, 4.0 + frac)
    up = int(np.sum(apply_rounding(x, RoundingMode.STOCHASTIC, generator=2024) == 5.0))
    result = stats.binomtest(up, n, frac)
    assert result.pvalue > 1e-3, (up / n, frac, result.pvalue)


def test_stochastic_error_is_unbiased_with_variance_f_one_minus_f():
    """Uniform x on [0, 1): E[e] = 0 and E[e^2] = E[f(1-f)] = 1/6; two z-tests, each at
    alpha = 1e-3, so a false failure of the test has probability at most 2e-3 (Bonferroni)."""
    n = 400_000
    x = np.random.default_rng(8).random(n)
    e = apply_rounding(x, RoundingMode.STOCHASTIC, generator=99) - x
    z = stats.norm.ppf(1 - 1e-3 / 2)
    assert abs(e.mean()) <= z * e.std(ddof=1) / math.sqrt(n)
    sq = e**2
    assert abs(sq.mean() - 1 / 6) <= z * sq.std(ddof=1) / math.sqrt(n)


def test_straight_through_gradient():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    for mode in MODES:
        x.grad = None
        y = apply_rounding(x, mode, generator=1)
        assert y.requires_grad
        (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_bfloat16_tensor_supported():
    x = torch.tensor([0.5, 1.5, -2.75], dtype=torch.bfloat16)
    assert apply_rounding(x, "floor").tolist() == [0.0, 1.0, -3.0]


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.array([1, 2, 3]), {}, TypeError, "floating-point"),
        (torch.tensor([1, 2]), {}, TypeError, "floating-point"),
        ([0.5, 1.5], {}, TypeError, "numpy.ndarray or torch.Tensor"),
        (np.array([]), {}, ValueError, "empty"),
        (np.array([0.5, np.nan]), {}, ValueError, "non-finite"),
        (torch.tensor([np.inf, 0.0]), {}, ValueError, "non-finite"),
    ],
)
def test_bad_input_is_refused(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_rounding(x, RoundingMode.NEAREST_EVEN, **kwargs)


def test_bad_mode_or_generator_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        apply_rounding(np.ones(2), "banker")
    with pytest.raises(ValueError, match="needs generator"):
        apply_rounding(np.ones(2), RoundingMode.STOCHASTIC)
    with pytest.raises(TypeError, match="generator"):
        apply_rounding(np.ones(2), RoundingMode.STOCHASTIC, generator=1.5)
