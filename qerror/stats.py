"""Hypothesis tests and confidence intervals for quantization-error studies.

Every function returns a frozen result (a :class:`StatResult` or a subclass)
with the test statistic, p-value, point estimate, confidence interval, sample
size, significance level and a one-line verdict in plain words. Inputs may be
numpy arrays, torch tensors or sequences (flattened); the mean-based tests also
take an :class:`~qerror.empirical.ErrorStats` accumulator, so a bias can be
tested on billions of values without keeping them. Every random procedure takes
an explicit seed or generator and gives the same answer for the same one.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize as sopt
from scipy import stats as sps

from qerror._checks import (
    SeedOrGenerator,
    check_count,
    check_flag,
    check_seed,
    check_seed_or_generator,
)
from qerror._enums import Choice
from qerror.empirical import ErrorStats
from qerror.rounding import RoundingMode

SampleLike = np.ndarray | torch.Tensor | Sequence[float]

# Below this many discordant pairs McNemar's chi-square approximation is poor
# and the exact binomial test is used (the usual rule of thumb, b + c < 25).
_MCNEMAR_EXACT_BELOW = 25

# Bootstrap resamples are drawn in batches of at most this many values so memory
# stays bounded whatever the sample size.
_BOOTSTRAP_BATCH_VALUES = 1 << 22


class IntervalMethod(Choice):
    """How :func:`mse_ratio_ci` builds its interval."""

    DELTA = "delta"
    BOOTSTRAP = "bootstrap"



@dataclass(frozen=True)
class StatResult:
    """Outcome of a test or interval.

    Attributes
    ----------
    test : str
        What was tested.
    method : str
        The exact procedure used (e.g. which approximation).
    statistic : float
        Test statistic (NaN for an interval with no null hypothesis).
    p_value : float
        Two-sided p-value unless the test says otherwise (NaN without a null).
    estimate : float
        Point estimate of the quantity the interval is for.
    ci : tuple of float
        ``(low, high)`` confidence interval for ``estimate``'s target.
    n : int
        Number of observations used.
    alpha : float
        Significance level; the interval has confidence ``1 - alpha`` unless
        the test says otherwise.
    verdict : str
        The conclusion in words.
    """

    test: str
    method: str
    statistic: float
    p_value: float
    estimate: float
    ci: tuple[float, float]
    n: int
    alpha: float
    verdict: str

    @property
    def significant(self) -> bool:
        """``p_value < alpha`` (False when there is no p-value)."""
        return bool(self.p_value < self.alpha)

    def __str__(self) -> str:
        return self.verdict


@dataclass(frozen=True)
class BiasResult(StatResult):
    """:func:`bias_test` and :func:`equivalence_test` moments: degrees of freedom and spread
    (``df`` is None where the reference distribution is the normal, as in
    :func:`paired_accuracy_equivalence`'s z statistics)."""

    df: int | None
    std: float
    se: float


@dataclass(frozen=True)
class EquivalenceResult(BiasResult):
    """:func:`equivalence_test`: the margin and both one-sided p-values."""

    low: float
    high: float
    p_low: float
    p_high: float


@dataclass(frozen=True)
class UniformityResult(StatResult):
    """:func:`uniformity_test`: the law tested against, in words."""

    law: str


@dataclass(frozen=True)
class RatioResult(StatResult):
    """:func:`mse_ratio_ci`: both MSEs, their sample sizes and the SE of the log ratio."""

    mse_a: float
    mse_b: float
    n_a: int
    n_b: int
    se_log: float


@dataclass(frozen=True)
class McNemarResult(StatResult):
    """:func:`mcnemar_test`: the discordant counts and whether the exact test was used."""

    only_a: int
    only_b: int
    exact: bool


@dataclass(frozen=True)
class MedianResult(StatResult):
    """:func:`median_ci`: the exact coverage of its interval and the ranks of its ends
    (``coverage`` NaN and ``ranks`` ``(0, 0)`` where the sample is too small for one)."""

    coverage: float
    ranks: tuple[int, int]


@dataclass(frozen=True)
class BootstrapResult(StatResult):
    """:func:`bootstrap_ci`: resample count, bootstrap standard error and null value."""

    n_resamples: int
    se: float
    null: float | None


# --------------------------------------------------------------------------- mean tests


def bias_test(
    data: SampleLike | ErrorStats,
    mu0: float = 0.0,
    alpha: float = 0.05,
    *,
    channel: int | None = None,
    unit: str = "",
) -> BiasResult:
    """One-sample t-test that the mean error equals ``mu0``, with its CI.

    Parameters
    ----------
    data : array-like or ErrorStats
        Error samples (flattened), or an accumulator (its count, mean and sample
        variance are used).
    mu0 : float
        Hypothesised mean (0 for an unbiased quantizer, -1/2 LSB for floor, ...).
    alpha : float
        Significance level; the CI has confidence ``1 - alpha``.
    channel : int, optional
        Which channel of a per-channel accumulator to test.
    unit : str
        Appended to numbers in the verdict (e.g. ``"LSB"``).

    Returns
    -------
    BiasResult
        ``statistic`` is t, ``estimate`` the mean, ``ci`` the t interval.

    Notes
    -----
    .. math:: t = \\frac{\\bar e - \\mu_0}{s/\\sqrt n},\\qquad
              p = 2\\,P(T_{n-1} > |t|),\\qquad
              \\bar e \\pm t_{1-\\alpha/2,\\,n-1}\\, s/\\sqrt n .

    The t law is exact for normal errors and, by the central limit theorem,
    accurate for the bounded errors of rounding once ``n`` is a few dozen; for
    large ``n`` it coincides with the z-test. With zero sample variance the
    statistic is 0 (p = 1) if the mean equals ``mu0`` and ±inf (p = 0) otherwise.
    """
    alpha = _check_alpha(alpha)
    mu0 = _check_real(mu0, "mu0")
    n, mean, std, se = _moments(data, channel)
    df = n - 1
    stat, p, ci, verdict = _t_verdict(mean, se, df, mu0, alpha, unit, ("bias", "mean error"))
    return BiasResult(
        test=f"mean error = {mu0:g}", method=f"one-sample t-test (df={df})",
        statistic=stat, p_value=p, estimate=mean, ci=ci, n=n, alpha=alpha,
        verdict=verdict, df=df, std=std, se=se,
    )


def equivalence_test(
    samples: SampleLike | ErrorStats,
    low: float,
    high: float,
    alpha: float = 0.05,
    *,
    channel: int | None = None,
    unit: str = "",
) -> EquivalenceResult:
    """Two one-sided t-tests (TOST) that the mean lies inside ``(low, high)``.

    Parameters
    ----------
    samples : array-like or ErrorStats
        Samples (flattened) or an accumulator.
    low, high : float
        Equivalence margin, ``low < high``.
    alpha : float
        Level of each one-sided test; the reported CI has confidence
        ``1 - 2 alpha`` (equivalence holds at level alpha exactly when that CI
        lies inside the margin).
    channel, unit
        As for :func:`bias_test`.

    Returns
    -------
    EquivalenceResult
        ``p_value = max(p_low, p_high)``; ``statistic`` is the t of the larger one.

    Notes
    -----
    .. math:: t_L = \\frac{\\bar x - L}{s/\\sqrt n},\\ p_L = P(T_{n-1} > t_L);\\qquad
              t_H = \\frac{\\bar x - H}{s/\\sqrt n},\\ p_H = P(T_{n-1} < t_H).

    References
    ----------
    .. [1] D. J. Schuirmann, "A comparison of the two one-sided tests procedure
       and the power approach for assessing the equivalence of average
       bioavailability", J. Pharmacokinet. Biopharm. 15(6), 1987.
    """
    alpha = _check_alpha(alpha)
    if alpha >= 0.5:
        raise ValueError(f"TOST needs alpha < 0.5 (its CI has confidence 1 - 2 alpha), "
                         f"got {alpha}")
    low = _check_real(low, "low")
    high = _check_real(high, "high")
    if not low < high:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    n, mean, std, se = _moments(samples, channel)
    df = n - 1
    if se > 0:
        t_low, t_high = (mean - low) / se, (mean - high) / se
        p_low, p_high = float(sps.t.sf(t_low, df)), float(sps.t.cdf(t_high, df))
    else:
        t_low = math.inf if mean > low else -math.inf
        t_high = -math.inf if mean < high else math.inf
        p_low, p_high = (0.0 if mean > low else 1.0), (0.0 if mean < high else 1.0)
    p = max(p_low, p_high)
    stat = t_low if p_low >= p_high else t_high
    tq = _t_upper(alpha, df)
    ci = (mean - tq * se, mean + tq * se)
    u = f" {unit}" if unit else ""
    what = (f"mean {_num(mean)}{u}, {_pct(2 * alpha)} CI [{_num(ci[0])}, {_num(ci[1])}]{u}"
            f" vs margin ({_num(low)}, {_num(high)}){u}")
    if p < alpha:
        verdict = f"mean is within the margin (TOST {_p(p, alpha)} < α={alpha:g}): {what}"
    else:
        verdict = f"equivalence not shown (TOST {_p(p, alpha)} ≥ α={alpha:g}): {what}"
    return EquivalenceResult(
        test=f"{low:g} < mean < {high:g}", method=f"TOST, two one-sided t-tests (df={df})",
        statistic=stat, p_value=p, estimate=mean, ci=ci, n=n, alpha=alpha, verdict=verdict,
        df=df, std=std, se=se, low=low, high=high, p_low=p_low, p_high=p_high,
    )


def crossed_mean_test(
    table: SampleLike,
    mu0: float = 0.0,
    alpha: float = 0.05,
    *,
    unit: str = "",
) -> BiasResult:
    """t-test that the mean of a table equals ``mu0`` when its rows and its columns are
    both samples (seeds × test images, say), with its CI.

    Parameters
    ----------
    table : array-like, shape (R, C)
        One value per (row, column) pair: for instance, per trained seed and test image,
        1, 0 or −1 as one rounding mode's prediction is right and the other's wrong. At
        least two rows and two columns, all finite.
    mu0 : float
        Hypothesised mean.
    alpha : float
        Significance level; the CI has confidence ``1 - alpha``.
    unit : str
        Appended to numbers in the verdict.

    Returns
    -------
    BiasResult
        ``statistic`` is t, ``estimate`` the table's mean, ``se`` its standard error below,
        ``df`` Satterthwaite's degrees of freedom (rounded down), ``std`` the standard
        deviation of all values, ``n`` the number of values ``R·C``.

    Notes
    -----
    A t-interval over the rows' means (seeds) treats the columns (the test images) as
    fixed: it says what other seeds would give on these images. With both random, as in
    the additive model ``x_rc = μ + a_r + b_c + e_rc`` (independent, variances ``σ_a²``,
    ``σ_b²``, ``σ_e²``), the mean's variance is ``σ_a²/R + σ_b²/C + σ_e²/(RC)``, and

    .. math:: \\widehat{V} = s_{\\text{rows}}^2 / R + s_{\\text{cols}}^2 / C,

    with ``s²`` the sample variances of the row means and of the column means, has
    expectation ``σ_a²/R + σ_b²/C + 2σ_e²/(RC)``: it is conservative by ``σ_e²/(RC)``,
    which matters where the residual dominates (on the N4 table of tests/test_claims.py at
    eight bits it makes the variance about 1.4 times an unbiased estimate's). Resampling
    rows and columns independently, Owen's pigeonhole bootstrap [1]_, is conservative in
    the same way, by more. Where the rows' and the columns' means all agree while the values
    differ, both terms are 0; the estimate is then never below the residual's own share,
    ``MS_e/(RC)`` (``MS_e`` the interaction's mean square, ``(R−1)(C−1)`` degrees of
    freedom). The t law's degrees of freedom are Satterthwaite's [2]_ for the sum of the two
    terms, ``V̂² / ((s_rows²/R)²/(R−1) + (s_cols²/C)²/(C−1))``, rounded down; with the rows'
    term dominant they approach ``R − 1``, the seeds' own t-interval's. In simulation (2000
    tables of unit seed, image and residual variances) the test rejected a true mean 4.75 %
    of the time at α = 0.05 with 20 rows and 50 columns, but 6.65 % with 3 rows: give it
    enough rows. A table whose values are all equal has zero variance: the statistic is 0
    (p = 1) at that value and ±inf (p = 0) elsewhere, as in :func:`bias_test`.

    References
    ----------
    .. [1] A. B. Owen, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2), 386–411, 2007.
    .. [2] F. E. Satterthwaite, "An approximate distribution of estimates of variance
       components", Biometrics Bulletin 2(6), 110–114, 1946.
    """
    alpha = _check_alpha(alpha)
    mu0 = _check_real(mu0, "mu0")
    if isinstance(table, ErrorStats):
        raise TypeError("table must hold the values themselves (rows × columns), not an "
                        "ErrorStats")
    shape = _flat_shape(table)
    if len(shape) != 2 or shape[0] < 2 or shape[1] < 2:
        raise ValueError(f"table must be 2-D with at least two rows and two columns (rows "
                         f"and columns the two samples, e.g. seeds × images), got shape "
                         f"{tuple(shape)}")
    rows, cols = int(shape[0]), int(shape[1])
    # In units of a power of two near the largest magnitude (an exact rescaling, as in
    # _moments): the squared variances in the degrees of freedom underflowed below ~1e-77
    # (df fell to R - 1), the variances themselves below 1e-154 (se 0, 'differs, p < 1e-300'),
    # and above 1e154 they overflowed (OverflowError).
    x, k = _in_units(_sample(table, "table").reshape(rows, cols))
    mean = float(x.mean())
    constant = x.min() == x.max()
    if constant:  # exactly, as in _moments
        mean, v_rows, v_cols = float(x[0, 0]), 0.0, 0.0
    else:
        v_rows = float(x.mean(axis=1).var(ddof=1)) / rows
        v_cols = float(x.mean(axis=0).var(ddof=1)) / cols
    var = v_rows + v_cols
    denom = v_rows ** 2 / (rows - 1) + v_cols ** 2 / (cols - 1)
    # rounded down, but not below a whole number the quotient misses by its rounding
    # (identical columns give R - 1 exactly, as the rows' own t-test)
    df = max(math.floor(var * var / denom * (1 + 1e-12)), 1) if denom > 0 else rows - 1
    # the residual's share, σ_e²/(RC), which the two terms' estimate holds too: where the
    # rows' and columns' means all agree while the values differ (an interaction alone)
    # the terms are 0 and it is the estimate, with the residual's degrees of freedom
    if not constant:
        resid = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + mean
        floor = float((resid * resid).sum()) / ((rows - 1) * (cols - 1)) / (rows * cols)
        if floor > var:
            var, df = floor, (rows - 1) * (cols - 1)
    mean, se = math.ldexp(mean, k), math.ldexp(math.sqrt(var), k)
    stat, p, ci, verdict = _t_verdict(
        mean, se, df, mu0, alpha, unit,
        ("mean", f"mean over {rows} rows × {cols} columns, both random,"))
    return BiasResult(
        test=f"mean = {mu0:g}, rows and columns random",
        method=f"crossed two-way t-test, Satterthwaite df={df}",
        statistic=stat, p_value=p, estimate=mean, ci=ci, n=rows * cols, alpha=alpha,
        verdict=verdict, df=df, std=math.ldexp(float(x.std(ddof=1)), k), se=se,
    )


# --------------------------------------------------------------------------- uniformity


def uniformity_test(
    errors_lsb: SampleLike,
    mode: RoundingMode | str,
    *,
    alpha: float = 0.05,
    signs: SampleLike | None = None,
    positive_fraction: float | None = None,
) -> UniformityResult:
    """Kolmogorov–Smirnov test of the error (in LSB) against its uniform-noise law.

    Parameters
    ----------
    errors_lsb : array-like
        Rounding errors ``ε = R(u) - u`` in LSB (flattened).
    mode : RoundingMode or str
        The rounding mode whose law is tested:

        ========================  ==========================================
        NEAREST_EVEN/AWAY         U(-1/2, 1/2)
        FLOOR                     U(-1, 0)
        CEIL                      U(0, 1)
        TOWARD_ZERO               U(-1, 0) where u > 0, U(0, 1) where u < 0
        STOCHASTIC                triangular on (-1, 1), peak at 0
        ========================  ==========================================
    alpha : float
        Significance level and ``1 - alpha`` confidence for the distance CI.
    signs : array-like, optional
        TOWARD_ZERO only: the scaled values ``u`` (or anything with their
        signs), same shape as ``errors_lsb``. The error is negated where
        ``u < 0`` and the result tested against U(-1, 0) — an exact test given
        the signs.
    positive_fraction : float, optional
        TOWARD_ZERO only, instead of ``signs``: the known ``P(u > 0)``; the
        errors are tested against the mixture ``p U(-1, 0) + (1 - p) U(0, 1)``.

    Returns
    -------
    UniformityResult
        ``statistic`` and ``estimate`` are the KS distance ``D``; ``ci`` bounds
        the true distance ``Δ = sup |F - F_0|`` between the error law and the model.

    Notes
    -----
    ``D = sup_x |F_n(x) - F_0(x)|``; the p-value comes from the null law of
    ``D`` for continuous ``F_0`` (``scipy.stats.kstwo``, exact for moderate
    ``n`` and accurately approximated beyond). Since
    ``sup |F_n - F| <= d`` with probability ``1 - alpha`` for
    ``d = kstwo.isf(alpha, n)`` whatever the continuous ``F``, the triangle
    inequality gives ``Δ ∈ [max(0, D - d), min(1, D + d)]`` with at least that
    confidence. The stochastic law: ``ε = 1 - f`` with probability ``f`` and
    ``-f`` otherwise, ``f = u - floor(u) ~ U(0, 1)``, whose density is ``1 - |ε|``.

    References
    ----------
    .. [1] B. Widrow, I. Kollár, *Quantization Noise*, Cambridge University Press, 2008.
    """
    alpha = _check_alpha(alpha)
    mode = RoundingMode.parse(mode)
    data = _sample(errors_lsb, "errors_lsb")
    if mode.facts.sign_split is None and (signs is not None
                                                 or positive_fraction is not None):
        raise ValueError(f"signs/positive_fraction apply to a mode whose error depends on the "
                         f"sign (toward_zero), not {mode.value}")
    # The law comes from the mode's table entry: a random mode's error is triangular, a
    # sign-split mode's is a mixture of its two halves, any other spans its unit interval.
    if mode.is_random:
        cdf, law = _triangular_cdf, "triangular on (-1, 1)"
    elif mode.facts.sign_split is not None:
        data, cdf, law = _toward_zero_law(data, errors_lsb, signs, positive_fraction)
    else:
        low = mode.interval.low
        cdf, law = _uniform_cdf(low), f"U({_fraction(low)}, {_fraction(low + 1.0)})"
    res = sps.kstest(data, cdf, method="exact")
    d_stat, p = float(res.statistic), float(res.pvalue)
    n = data.size
    band = _ks_band(alpha, n)
    ci = (max(0.0, d_stat - band), min(1.0, d_stat + band))
    conf = _pct(alpha)
    if p < alpha:
        verdict = (f"error is not {law} (KS D={d_stat:.3g}, {_p(p, alpha)} < α={alpha:g}); "
                   f"distance to the model in [{ci[0]:.3g}, {ci[1]:.3g}] at {conf}")
    else:
        verdict = (f"no evidence against {law} (KS D={d_stat:.3g}, {_p(p, alpha)} ≥ α={alpha:g}); "
                   f"distance to the model ≤ {ci[1]:.3g} at {conf}")
    return UniformityResult(
        test=f"{mode.value} error ~ {law}", method="one-sample Kolmogorov-Smirnov, two-sided",
        statistic=d_stat, p_value=p, estimate=d_stat, ci=ci, n=n, alpha=alpha,
        verdict=verdict, law=law,
    )


def _uniform_cdf(low: float):
    def cdf(x):
        return np.clip(x - low, 0.0, 1.0)

    return cdf


def _fraction(v: float) -> str:
    """An interval end in the law's name: ``-1/2``, ``0``, ``1``."""
    return {-0.5: "-1/2", 0.5: "1/2"}.get(v, f"{v:g}")


def _triangular_cdf(x):
    x = np.clip(x, -1.0, 1.0)
    return np.where(x < 0.0, 0.5 * (1.0 + x) ** 2, 1.0 - 0.5 * (1.0 - x) ** 2)


@functools.lru_cache(maxsize=256)
def _ks_band(alpha: float, n: int) -> float:
    """``d`` with ``P(D_n > d) = alpha``, refused where scipy's answer misses that tail.

    kstwo's inverse is a root search (cached: repeated calls at one (alpha, n) are common)
    that fails in the far tail: at n = 50 and alpha = 1e-17 isf gives 0.98, whose tail is
    2e-85 (ppf(1 - alpha) gives 1). Its answer is taken where its own tail is within 1 % of
    alpha: measured for n from 2 to 10**6, every alpha from 0.5 down to 1e-12 is (0.28 % off
    at most, n = 1000 and alpha = 1e-12); at 1e-14 some n are not (3.8 % at n = 10**4), at
    1e-16 most are off by factors of 0.6 to 4.6, below that by orders of magnitude."""
    d = float(sps.kstwo.isf(alpha, n))
    tail = float(sps.kstwo.sf(d, n)) if 0.0 < d < 1.0 else 0.0
    if not math.isclose(tail, alpha, rel_tol=1e-2):
        raise ValueError(f"alpha={alpha:g} is beyond the Kolmogorov-Smirnov quantiles scipy "
                         f"computes at n={n} (its band d={d:g} has tail {tail:.3g}, not "
                         f"{alpha:g}); use alpha >= 1e-12")
    return d


def _z_upper(tail: float) -> float:
    """``z`` with ``P(Z > z) = tail`` for a standard normal ``Z``, from the tail itself:
    ``norm.ppf(1 - tail)`` loses the digits that ``1 - tail`` rounds away (8 of them at
    tail = 5e-11) and is infinite below tail = 2**-54."""
    return float(sps.norm.isf(tail))


def _t_upper(tail: float, df: float) -> float:
    """``t`` with ``P(T > t) = tail`` for Student's ``T`` with ``df`` degrees of freedom and
    ``tail < 1/2``, from the tail itself (see :func:`_z_upper`); scipy's inverse returns -inf
    in the far tail (1e-300 at 10 degrees of freedom), refused here."""
    q = float(sps.t.isf(tail, df))
    if not 0.0 < q < math.inf:
        raise ValueError(f"the t quantile of upper tail {tail:g} at {df:g} degrees of freedom "
                         f"is beyond what scipy computes (it gave {q}); use a larger alpha")
    return q


def _toward_zero_law(data, errors_lsb, signs, positive_fraction):
    if (signs is None) == (positive_fraction is None):
        raise ValueError("TOWARD_ZERO needs exactly one of signs= (the scaled values or "
                         "their signs) or positive_fraction= (P(u > 0))")
    if signs is not None:
        s = _sample(signs, "signs")
        if _flat_shape(signs) != _flat_shape(errors_lsb):
            raise ValueError(f"signs has shape {_flat_shape(signs)} but errors_lsb has "
                             f"{_flat_shape(errors_lsb)}")
        # Truncation error is -frac(|u|)·sign(u): flipping it where u < 0 leaves
        # i.i.d. U(-1, 0) under the model, given the signs.
        flipped = np.where(s < 0, -data, data)
        return flipped, _uniform_cdf(-1.0), "U(-1, 0) (sign-flipped where u < 0)"
    p = _check_real(positive_fraction, "positive_fraction")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {p}")

    def cdf(x):
        return p * np.clip(x + 1.0, 0.0, 1.0) + (1.0 - p) * np.clip(x, 0.0, 1.0)

    return data, cdf, f"{p:.3g}·U(-1, 0) + {1 - p:.3g}·U(0, 1)"


# --------------------------------------------------------------------------- MSE ratio


def mse_ratio_ci(
    errors_a: SampleLike,
    errors_b: SampleLike,
    *,
    paired: bool,
    alpha: float = 0.05,
    method: IntervalMethod | str = IntervalMethod.DELTA,
    n_resamples: int = 2000,
    generator: SeedOrGenerator | None = None,
) -> RatioResult:
    """Ratio ``MSE_a / MSE_b`` of two errors with a CI and the p-value for ratio = 1.

    Parameters
    ----------
    errors_a, errors_b : array-like
        Errors (flattened). With ``paired=True`` they must have the same shape:
        element ``i`` of both comes from the same input.
    paired : bool
        Whether the errors are paired (same inputs, e.g. two rounding modes on
        one tensor) or independent samples. Required: pairing changes the answer.
    alpha : float
        Significance level; the CI has confidence ``1 - alpha``.
    method : IntervalMethod or str
        DELTA (default): normal interval on the log ratio. BOOTSTRAP: percentile
        interval of the log ratio over resamples (pairs resampled jointly).
    n_resamples : int
        Bootstrap resamples, at least ``2/alpha - 1`` (39 at α = 0.05), so that both ends
        of the interval are resamples.
    generator : int, numpy.random.Generator or torch.Generator
        Required for BOOTSTRAP; an int is a seed from 0 to 2**64 - 1.

    Returns
    -------
    RatioResult
        ``estimate`` is the ratio, ``statistic`` the log ratio over its standard
        error, ``ci`` the interval for the ratio.

    Notes
    -----
    With ``m_a = mean(a²)``, ``m_b = mean(b²)`` and ``L = log(m_a / m_b)``, the
    delta method gives

    .. math:: \\widehat{\\mathrm{Var}}(L) = \\frac{s^2(a^2)}{n_a m_a^2} +
              \\frac{s^2(b^2)}{n_b m_b^2}\\ \\text{(independent)},\\qquad
              \\widehat{\\mathrm{Var}}(L) = \\frac{1}{n}\\,
              s^2\\!\\left(\\frac{a_i^2}{m_a} - \\frac{b_i^2}{m_b}\\right)\\ \\text{(paired)},

    the CI ``exp(L ± z_{1-α/2} se)`` and the p-value ``2 Φ(-|L|/se)``. The log
    scale makes the interval respect ``ratio > 0`` and converges faster. The
    bootstrap p-value inverts the percentile interval:
    ``min(1, 2 min((1 + #{L* ≤ 0}), (1 + #{L* ≥ 0})) / (B + 1))``.
    """
    alpha = _check_alpha(alpha)
    method = IntervalMethod.parse(method)
    paired = check_flag(paired, "paired")
    a = _sample(errors_a, "errors_a", min_n=2)
    b = _sample(errors_b, "errors_b", min_n=2)
    if paired and _flat_shape(errors_a) != _flat_shape(errors_b):
        raise ValueError(f"paired errors need the same shape, got {_flat_shape(errors_a)} "
                         f"and {_flat_shape(errors_b)}")
    for name, v in (("errors_a", a), ("errors_b", b)):
        if not np.any(v):
            raise ValueError(f"the MSE of {name} is 0, so the ratio is undefined")
    # Each sample in units of a power of two near its largest magnitude (exact), its MSE
    # and the log ratio carried in those units: squares of errors beyond 1e154 overflowed
    # (a NaN ratio read as 'no evidence that the MSEs differ') and below 1e-162 underflowed
    # to an MSE of 0.
    (a, ka), (b, kb) = _in_units(a), _in_units(b)
    a2, b2 = a * a, b * b
    ma, mb = float(a2.mean()), float(b2.mean())
    shift = 2 * (ka - kb) * math.log(2.0)  # the log of the two units' ratio
    log_ratio = math.log(ma) - math.log(mb) + shift
    n = a.size if paired else a.size + b.size
    if method is IntervalMethod.DELTA:
        if paired:
            var = float(np.var(a2 / ma - b2 / mb, ddof=1)) / a.size
        else:
            var = (float(np.var(a2, ddof=1)) / (a.size * ma * ma)
                   + float(np.var(b2, ddof=1)) / (b.size * mb * mb))
        se = math.sqrt(var)
        zq = _z_upper(alpha / 2.0)
        lo_log, hi_log = log_ratio - zq * se, log_ratio + zq * se
        stat, p = _z_two_sided(log_ratio, se)
        how = f"delta method on log ratio ({'paired' if paired else 'independent'})"
    else:
        rng = _rng(generator)
        b_count = _check_resamples(n_resamples, alpha)
        boot = _bootstrap_log_ratio(a2, b2, paired, b_count, rng) + shift
        if not np.all(np.isfinite(boot)):
            raise ValueError("some bootstrap resamples have zero MSE; use method='delta' "
                             "or more data")
        lo_log, hi_log = _percentile_interval(boot, alpha)
        se = float(np.std(boot, ddof=1))
        stat = log_ratio / se if se > 0 else _signed_inf(log_ratio)
        p = _bootstrap_p(boot, 0.0)
        how = (f"percentile bootstrap of log ratio, B={b_count} "
               f"({'paired' if paired else 'independent'})")
    with np.errstate(over="ignore", under="ignore"):  # beyond float64: inf or 0, as it is
        ratio, lo, hi = (float(v) for v in np.exp([log_ratio, lo_log, hi_log]))
        ma, mb = float(np.ldexp(ma, 2 * ka)), float(np.ldexp(mb, 2 * kb))
    ci = (lo, hi)
    what = (f"MSE ratio a/b {ratio:.4g}, {_pct(alpha)} CI [{ci[0]:.4g}, {ci[1]:.4g}] "
            f"(MSE_a {ma:.4g}, MSE_b {mb:.4g})")
    if p < alpha:
        verdict = f"MSEs differ ({_p(p, alpha)} < α={alpha:g}): {what}"
    else:
        verdict = f"no evidence that the MSEs differ ({_p(p, alpha)} ≥ α={alpha:g}): {what}"
    return RatioResult(
        test="MSE_a / MSE_b = 1", method=how, statistic=stat, p_value=p, estimate=ratio,
        ci=ci, n=n, alpha=alpha, verdict=verdict, mse_a=ma, mse_b=mb, n_a=a.size,
        n_b=b.size, se_log=se,
    )


def _bootstrap_log_ratio(a2, b2, paired, count, rng):
    out = np.empty(count)
    batch = max(1, _BOOTSTRAP_BATCH_VALUES // max(a2.size, b2.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, count, batch):
            k = min(batch, count - start)
            ia = rng.integers(0, a2.size, size=(k, a2.size))
            ib = ia if paired else rng.integers(0, b2.size, size=(k, b2.size))
            out[start:start + k] = (np.log(a2[ia].mean(axis=1))
                                    - np.log(b2[ib].mean(axis=1)))
    return out


# --------------------------------------------------------------------------- proportions


def wilson_ci(
    successes: int,
    n: int,
    alpha: float = 0.05,
    *,
    p0: float | None = None,
) -> StatResult:
    """Wilson score interval for a proportion, with the score test of ``p = p0``.

    Parameters
    ----------
    successes, n : int
        Successes out of ``n >= 1`` trials.
    alpha : float
        The interval has confidence ``1 - alpha``.
    p0 : float in (0, 1), optional
        Null proportion for the score test; without it ``statistic`` and
        ``p_value`` are NaN.

    Returns
    -------
    StatResult
        ``estimate`` is ``successes / n``.

    Notes
    -----
    .. math:: \\frac{\\hat p + \\frac{z^2}{2n} \\pm z\\sqrt{\\frac{\\hat p(1-\\hat p)}{n}
              + \\frac{z^2}{4n^2}}}{1 + z^2/n},\\qquad z = z_{1-\\alpha/2},

    is the set of ``p0`` the score test ``|\\hat p - p_0| / \\sqrt{p_0(1-p_0)/n} <= z``
    accepts, so ``p0`` lies in the interval exactly when ``p_value >= alpha``.

    References
    ----------
    .. [1] E. B. Wilson, "Probable inference, the law of succession, and
       statistical inference", JASA 22(158), 1927.
    """
    alpha = _check_alpha(alpha)
    successes = check_count(successes, "successes")
    n = check_count(n, "n")
    if n < 1:
        raise ValueError("n must be at least 1")
    if successes > n:
        raise ValueError(f"successes ({successes}) cannot exceed n ({n})")
    z = _z_upper(alpha / 2.0)
    phat = successes / n
    ci = _wilson(phat, n, z)
    if p0 is None:
        stat = p = math.nan
    else:
        p0 = _check_real(p0, "p0")
        if not 0.0 < p0 < 1.0:
            raise ValueError(f"p0 must be in (0, 1), got {p0}")
        stat, p = _z_two_sided(phat - p0, math.sqrt(p0 * (1.0 - p0) / n))
    what = (f"proportion {phat:.4g} ({successes}/{n}), {_pct(alpha)} CI "
            f"[{ci[0]:.4g}, {ci[1]:.4g}]")
    if p0 is None:
        verdict = what
    elif p < alpha:
        verdict = f"proportion differs from {p0:g} ({_p(p, alpha)} < α={alpha:g}): {what}"
    else:
        verdict = (f"no evidence that the proportion differs from {p0:g} "
                   f"({_p(p, alpha)} ≥ α={alpha:g}): {what}")
    return StatResult(
        test="proportion" if p0 is None else f"proportion = {p0:g}",
        method="Wilson score interval" + ("" if p0 is None else " and score test"),
        statistic=stat, p_value=p, estimate=phat, ci=ci, n=n, alpha=alpha, verdict=verdict,
    )


def _wilson(phat: float, n: int, z: float) -> tuple[float, float]:
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (phat + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(phat * (1.0 - phat) / n + z2 / (4.0 * n * n)) / denom
    # The interval always holds phat (the score statistic is 0 there). At phat = 1 the upper
    # bound is exactly 1 (centre and half are then both z²/2n / denom away from it); in
    # floating point they miss by an ulp, on either side, so that end is set exactly and
    # every bound is kept inside [0, 1].
    hi = 1.0 if phat == 1.0 else min(1.0, centre + half)
    # The lower bound is the other root of denom p² - (2 phat + z²/n) p + phat² = 0, whose
    # roots multiply to phat² / denom: centre - half cancels where few successes leave it
    # far below both (about z⁴ times below at one success: 1/100 at alpha = 1e-300 kept
    # 11 digits). Exactly 0 at phat = 0.
    lo = min(phat, phat / (denom * hi) * phat)
    return (lo, hi)


def mcnemar_test(
    correct_a: SampleLike,
    correct_b: SampleLike,
    alpha: float = 0.05,
    *,
    exact: bool | None = None,
) -> McNemarResult:
    """McNemar's test that two classifiers scored on the same items are equally accurate.

    Parameters
    ----------
    correct_a, correct_b : bool (or 0/1) arrays of the same shape
        Whether each classifier got each item right.
    alpha : float
        Significance level; the CI for the accuracy difference has confidence ``1 - alpha``.
    exact : bool, optional
        Force the exact binomial test (True) or the chi-square test (False).
        By default the exact test is used below 25 discordant pairs.

    Returns
    -------
    McNemarResult
        ``estimate`` is accuracy(a) - accuracy(b) = ``(only_a - only_b) / n``;
        ``method`` and ``exact`` say which test was used.

    Notes
    -----
    Only the discordant items matter: ``b`` = right by a only, ``c`` = right by
    b only. Under the null ``b ~ Binomial(b + c, 1/2)``. The exact p-value is
    ``min(1, 2 P(Bin(b+c, 1/2) <= min(b, c)))`` with statistic ``min(b, c)``; the
    approximation uses Edwards' continuity correction,
    ``χ² = max(|b - c| - 1, 0)² / (b + c)`` on 1 degree of freedom. The CI is
    Bonett and Price's adjusted Wald interval: with
    ``p̃_b = (b + 1)/(n + 2)``, ``p̃_c = (c + 1)/(n + 2)``,
    ``p̃_b - p̃_c ± z sqrt((p̃_b + p̃_c - (p̃_b - p̃_c)²)/(n + 2))``.

    References
    ----------
    .. [1] Q. McNemar, "Note on the sampling error of the difference between
       correlated proportions or percentages", Psychometrika 12(2), 1947.
    .. [2] D. G. Bonett, R. M. Price, "Adjusted Wald confidence interval for a
       difference of binomial proportions based on paired data", J. Educ.
       Behav. Stat. 37(4), 2012.
    """
    alpha = _check_alpha(alpha)
    a = _binary(correct_a, "correct_a")
    b = _binary(correct_b, "correct_b")
    if _flat_shape(correct_a) != _flat_shape(correct_b):
        raise ValueError(f"correct_a has shape {_flat_shape(correct_a)} but correct_b has "
                         f"{_flat_shape(correct_b)}; they must score the same items")
    return mcnemar_from_counts(int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b)),
                               a.size, alpha, exact=exact)


def _mcnemar_p(only_a: np.ndarray, disc: int, exact: bool) -> np.ndarray:
    """McNemar's p-value for each count ``only_a`` of ``disc`` discordant items: exact
    binomial, or chi-square with Edwards' continuity correction (see :func:`mcnemar_test`)."""
    if disc == 0:
        return np.ones(np.shape(only_a))
    if exact:
        return np.minimum(1.0, 2.0 * sps.binom.cdf(np.minimum(only_a, disc - only_a), disc, 0.5))
    return sps.chi2.sf(np.maximum(np.abs(2 * only_a - disc) - 1, 0) ** 2 / disc, 1)


def mcnemar_from_counts(only_a: int, only_b: int, n: int, alpha: float = 0.05, *,
                        exact: bool | None = None) -> McNemarResult:
    """:func:`mcnemar_test` from its sufficient statistics, for streamed evaluations.

    ``only_a`` items were right by a only, ``only_b`` by b only, out of ``n`` items.
    """
    alpha = _check_alpha(alpha)
    only_a, only_b, n = (check_count(v, name) for v, name in
                         ((only_a, "only_a"), (only_b, "only_b"), (n, "n")))
    if n < 1 or only_a + only_b > n:
        raise ValueError(f"need n >= 1 and only_a + only_b <= n; got {only_a}, {only_b}, {n}")
    disc = only_a + only_b
    use_exact = disc < _MCNEMAR_EXACT_BELOW if exact is None else check_flag(exact, "exact")
    p = float(_mcnemar_p(np.asarray(only_a), disc, use_exact))
    if use_exact:
        stat = float(min(only_a, only_b))
        how = "exact binomial"
    else:
        stat = max(abs(only_a - only_b) - 1, 0) ** 2 / disc if disc else 0.0
        how = "chi-square with continuity correction"
    z = _z_upper(alpha / 2.0)
    pa, pb = (only_a + 1) / (n + 2), (only_b + 1) / (n + 2)
    half = z * math.sqrt(max(pa + pb - (pa - pb) ** 2, 0.0) / (n + 2))
    ci = (max(-1.0, pa - pb - half), min(1.0, pa - pb + half))
    diff = (only_a - only_b) / n
    what = (f"accuracy a - b = {diff:.4g} ({only_a} right by a only, {only_b} by b only, "
            f"n={n}), {_pct(alpha)} CI [{ci[0]:.4g}, {ci[1]:.4g}]")
    if p < alpha:
        verdict = f"accuracies differ (McNemar {how}, {_p(p, alpha)} < α={alpha:g}): {what}"
    else:
        verdict = (f"no evidence that accuracies differ (McNemar {how}, {_p(p, alpha)} "
                   f"≥ α={alpha:g}): {what}")
    return McNemarResult(
        test="accuracy(a) = accuracy(b)", method=f"McNemar, {how}", statistic=stat,
        p_value=p, estimate=diff, ci=ci, n=n, alpha=alpha, verdict=verdict,
        only_a=only_a, only_b=only_b, exact=use_exact,
    )


@dataclass(frozen=True)
class McNemarResolution:
    """:func:`mcnemar_resolution`: what a paired accuracy comparison of ``n`` items resolves.

    ``detectable`` is the smallest accuracy difference (absolute) that McNemar's test at
    ``alpha`` detects with probability ``power`` on ``n`` items, at the observed discordance;
    ``images_needed`` the items it needs to detect the observed difference so
    (``inf`` when the observed difference is 0); ``resolved`` whether the observed
    difference is significant at ``alpha`` on these ``n`` items.
    """

    only_a: int
    only_b: int
    n: int
    alpha: float
    power: float
    difference: float
    detectable: float
    images_needed: float
    resolved: bool


def _mcnemar_items(difference: float, discordance: float, alpha: float, power: float) -> float:
    """Connor's normal-approximation sample size for McNemar's test (see mcnemar_resolution)."""
    za = _z_upper(alpha / 2.0)
    zb = float(sps.norm.ppf(power))
    psi = max(discordance, abs(difference))  # the discordance holds the difference at least
    # below a power of α/2 the sum can be negative: the condition it squares,
    # sum <= |δ| sqrt(n), then holds at every size (as in units_to_resolve), not squared
    bracket = za * math.sqrt(psi) + zb * math.sqrt(max(psi - difference ** 2, 0.0))
    return max(bracket, 0.0) ** 2 / difference ** 2


def mcnemar_resolution(only_a: int, only_b: int, n: int, alpha: float = 0.05,
                       power: float = 0.8) -> McNemarResolution:
    """What a paired comparison of two classifiers on ``n`` items can resolve.

    Parameters
    ----------
    only_a, only_b, n : int
        Items right by a only, by b only, and in all (as :func:`mcnemar_from_counts`).
    alpha : float
        Level of McNemar's (two-sided) test.
    power : float
        Probability of detection asked for, in (0, 1).

    Returns
    -------
    McNemarResolution

    Notes
    -----
    With discordance ``ψ = P(the two disagree on correctness)`` and difference
    ``δ = P(a only) - P(b only)``, McNemar's test needs about
    ``n(δ, ψ) = (z_{1-α/2} √ψ + z_power √(ψ - δ²))² / δ²`` items [1]_. The observed
    ``ψ̂ = (only_a + only_b) / n`` is the plug-in (a difference needs at least ``|δ|`` of
    discordance, so ``ψ = max(ψ̂, |δ|)``); ``detectable`` solves ``n(δ, ψ) = n`` for ``δ``,
    ``images_needed`` is ``n(δ̂, ψ̂)``; for a power below ``α/2`` the bracket is negative
    for small ``δ``, where the condition ``z_{1-α/2} √ψ + z_power √(ψ - δ²) <= |δ| √n`` holds
    at every ``n`` and ``n(δ, ψ)`` is 0. Both are plans, not tests: the plug-in carries the
    sampling error of ``ψ̂``. With fewer than ``floor(log2(2/α)) + 1`` items (6 at
    α = 0.05) the exact test can reject nothing: ``detectable`` is NaN and ``images_needed``
    at least that. :func:`mcnemar_power` gives the exact power of the test this module
    runs: at ``images_needed`` it is slightly below the power asked (0.761 to 0.786 for 0.8
    at α = 0.05 over a grid of 8 values of ψ from 0.02 to 0.3 and 7 of |δ|/ψ from 0.2 to
    0.8, computed exactly, the lowest near |δ|/ψ = 0.5; the continuity correction costs a
    little; the tests check 0.76 to 0.8 on a grid of counts). The plan is a normal
    approximation: below about 50 items take the exact power (e.g. 0.61 at 8 items for the
    ``detectable`` difference) from :func:`mcnemar_power`.

    References
    ----------
    .. [1] R. J. Connor, "Sample size for testing differences in proportions for the
       paired-sample design", Biometrics 43(1), 207-211, 1987.
    """
    alpha = _check_alpha(alpha)
    power = _check_real(power, "power")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    mc = mcnemar_from_counts(only_a, only_b, n, alpha)
    diff = mc.estimate
    disc = (mc.only_a + mc.only_b) / n
    # The exact test rejects nothing with fewer discordant items than this (2 · 2^-d < alpha).
    fewest = math.floor(math.log2(2.0 / alpha)) + 1
    needed = math.inf if diff == 0 else max(_mcnemar_items(diff, disc, alpha, power), fewest)
    # n(δ) falls as δ grows; the largest difference is 1 (every item right by a only)
    if n < fewest or _mcnemar_items(1.0, disc, alpha, power) > n:
        detectable = math.nan  # too few items to detect any difference
    else:
        lo, hi = 1e-12, 1.0
        if _mcnemar_items(lo, disc, alpha, power) <= n:
            detectable = lo
        else:
            detectable = float(sopt.brentq(
                lambda d: _mcnemar_items(d, disc, alpha, power) - n, lo, hi, xtol=1e-12))
    return McNemarResolution(mc.only_a, mc.only_b, n, alpha, power, diff, detectable, needed,
                             bool(mc.p_value < alpha))


def units_to_resolve(rel_se: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Units with which a mean is resolved from zero, planned from a pilot's relative error.

    Parameters
    ----------
    rel_se : float
        ``se / |mean|`` measured on ``n`` independent units (images, seeds); ``inf`` where the
        mean was exactly 0.
    n : int
        The units ``rel_se`` was measured on.
    alpha : float
        Level of the two-sided z-test ``|mean| >= z_{1-α/2} · se``.
    power : float
        Probability of resolving asked for, in (0, 1).

    Returns
    -------
    float
        The smallest whole number of units ``m`` with
        ``|mean| / (se · sqrt(n / m)) >= z_{1-α/2} + z_power``, that is
        ``ceil(n · ((z_{1-α/2} + z_power) · rel_se)²)`` (at least 1); 1 for a power below
        ``α/2``, where the sum is negative and every size has it; ``inf`` where ``rel_se`` is
        infinite or the size is beyond float64.

    Notes
    -----
    The standard error falls as ``1/sqrt(units)``; the plan takes the pilot's mean and
    standard error as the truth, so it carries the pilot's own sampling error (a pilot on
    ``n`` units estimates ``rel_se`` within about ``rel_se · sqrt(1/(2n) + rel_se²)``). At
    the size returned, a z-test on a mean whose true value and spread are the pilot's
    resolves it with probability at least ``power`` (the far tail adds
    ``Φ(-z_{1-α/2} - δ/se)``, below 1e-3 at the defaults). This is the usual
    normal-approximation sample size for a one-sample test [1]_.

    References
    ----------
    .. [1] S.-C. Chow, J. Shao and H. Wang, "Sample Size Calculations in Clinical
       Research", 2nd ed., Chapman & Hall/CRC, 2008, Sec. 3.1.
    """
    alpha = _check_alpha(alpha)
    power = _check_real(power, "power")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    n = check_count(n, "n")
    if n < 1:
        raise ValueError("n must be at least 1 unit")
    if isinstance(rel_se, bool) or not isinstance(rel_se, numbers.Real):
        raise TypeError(f"rel_se must be a real number, got {type(rel_se).__name__}")
    rel = float(rel_se)
    if math.isnan(rel) or rel < 0:
        raise ValueError(f"rel_se must be >= 0 (se / |mean|), got {rel_se!r}")
    if math.isinf(rel):
        return math.inf
    za = _z_upper(alpha / 2.0)
    zb = float(sps.norm.ppf(power))
    # below a power of α/2 the sum is negative: the condition holds at every size (the test
    # rejects with probability at least Φ(-z_{1-α/2}) = α/2 whatever the mean), not squared
    factor = max(za + zb, 0.0) * rel
    # a plan beyond float64 (rel_se above ~1e153) is inf, where ** raised OverflowError
    need = n * (factor * factor)
    return math.inf if math.isinf(need) else float(max(1, math.ceil(need)))


def tail_share(x: SampleLike, k: int = 5) -> float:
    """Share of a sample's squared deviations from its mean carried by its ``k`` most extreme
    values: how much a handful of units decide its variance (and its mean's standard error).

    Parameters
    ----------
    x : array-like, at least ``k + 1`` values
        The sample (flattened).
    k : int
        How many of the most extreme values (largest ``|x - mean|``).

    Returns
    -------
    float
        ``sum of the k largest (x - mean)² / sum of all (x - mean)²``, in [k/n, 1]; NaN for a
        constant sample.

    Notes
    -----
    A standard error computed from a sample whose variance a few values carry is itself
    decided by them: plans and normal intervals built on it hold only as far as those few
    values are typical. For reference, in normal samples of 500 the five most extreme values
    carry 8.3 % on average (simulated, 2,000 samples: 95 % of them between 6.6 and 10.5 %; a
    test repeats the simulation); a share near 1 means the sample's spread is those values.
    """
    v = _sample(x, "x", min_n=2)
    k = check_count(k, "k")
    if not 1 <= k < len(v):
        raise ValueError(f"k must be from 1 to {len(v) - 1} (fewer than the {len(v)} values), "
                         f"got {k}")
    if v.min() == v.max():  # no spread (a float mean of equal values can miss them)
        return math.nan
    # the share is the same in any unit; in units of a power of two near the largest
    # magnitude the squares of deviations beyond 1e±154 neither overflow nor underflow (a
    # sample times 2**1000 or 2**-700 gave NaN)
    v, _ = _in_units(v)
    d2 = (v - v.mean()) ** 2
    total = d2.sum()
    return float(np.sort(d2)[-k:].sum() / total)


@functools.lru_cache(maxsize=None)
def tail_share_normal(n: int, k: int = 5, draws: int = 2000, seed: int = 0) -> float:
    """The reference for :func:`tail_share`: the mean share of the variance that the ``k``
    most extreme of ``n`` standard normal values carry, over ``draws`` seeded samples (a
    simulation; at ``n`` = 500 its standard error, about 2e-4, is below 1 % of the value)."""
    n, k, draws = check_count(n, "n"), check_count(k, "k"), check_count(draws, "draws", 1)
    rng = np.random.default_rng(check_seed(seed, "seed"))
    return float(np.mean([tail_share(rng.standard_normal(n), k) for _ in range(draws)]))


def mcnemar_power(p_a_only: float, p_b_only: float, n: int, alpha: float = 0.05) -> float:
    """Exact probability that :func:`mcnemar_from_counts` (default test choice) rejects at
    ``alpha`` on ``n`` items, when each item is right by a only with probability
    ``p_a_only`` and by b only with probability ``p_b_only``.

    Notes
    -----
    Sums over the number ``D ~ Binomial(n, ψ)`` of discordant items and, given ``D``, over
    ``only_a ~ Binomial(D, p_a_only / ψ)``, with ``ψ = p_a_only + p_b_only``; the rejection
    region of each ``D`` is that of the test as run (exact binomial below 25 discordant
    items, continuity-corrected chi-square above). ``O(n²)`` work.
    """
    alpha = _check_alpha(alpha)
    n = check_count(n, "n")
    pa, pb = _check_real(p_a_only, "p_a_only"), _check_real(p_b_only, "p_b_only")
    if pa < 0 or pb < 0 or pa + pb > 1:
        raise ValueError(f"need probabilities p_a_only, p_b_only >= 0 with sum <= 1; got "
                         f"{pa!r}, {pb!r}")
    psi = pa + pb
    if psi == 0 or n == 0:
        return 0.0
    r = pa / psi
    total = 0.0
    weights = sps.binom.pmf(np.arange(n + 1), n, psi)
    for d in range(1, n + 1):
        if weights[d] < 1e-300:
            continue
        b = np.arange(d + 1)
        p = _mcnemar_p(b, d, d < _MCNEMAR_EXACT_BELOW)  # the test as mcnemar_from_counts runs it
        total += weights[d] * float(sps.binom.pmf(b, d, r)[p < alpha].sum())
    return min(total, 1.0)


def paired_accuracy_equivalence(only_a: int, only_b: int, n: int, margin: float,
                                alpha: float = 0.05) -> EquivalenceResult:
    """Equivalence of two classifiers' accuracies on the same items, within ``±margin``.

    Parameters
    ----------
    only_a, only_b : int
        Items right by classifier a only, and by b only (the discordant pairs).
    n : int
        Items scored by both.
    margin : float
        Equivalence margin in accuracy (a fraction: 0.005 is half a point), > 0.
    alpha : float
        Level of each one-sided test, < 0.5; the reported CI has confidence
        ``1 - 2 alpha``.

    Returns
    -------
    EquivalenceResult
        ``estimate`` is accuracy(a) - accuracy(b) = ``(only_a - only_b) / n``; ``ci`` the
        ``1 - 2 alpha`` interval; ``p_value = max(p_low, p_high)``; equivalence is shown
        when ``p_value < alpha``, which happens exactly when ``ci`` lies inside
        ``(-margin, margin)``.

    Notes
    -----
    Two one-sided tests [1]_ of ``H_low: Δ <= -m`` and ``H_high: Δ >= m`` for the paired
    difference of proportions ``Δ``, each with Bonett and Price's adjusted Wald
    statistic [2]_ (the interval :func:`mcnemar_from_counts` reports):
    ``p̃_a = (b + 1)/(n + 2)``, ``p̃_b = (c + 1)/(n + 2)``, ``Δ̃ = p̃_a - p̃_b``,
    ``se = sqrt((p̃_a + p̃_b - Δ̃²)/(n + 2))``,

    .. math:: p_L = 1 - \\Phi\\left(\\frac{\\tilde\\Delta + m}{se}\\right),\\qquad
              p_H = 1 - \\Phi\\left(\\frac{m - \\tilde\\Delta}{se}\\right).

    Why this and not a t-based TOST on the per-item differences (values -1, 0, 1): when
    two classifiers disagree on few items the t-statistic's standard error is near zero,
    or zero with no disagreement, and the t-TOST then declares equivalence from almost no
    evidence; the adjusted Wald interval adds one pseudo-count to each discordant cell,
    which keeps its coverage near nominal for small discordant counts [2]_.

    Near, not at: like every Wald-type test its size exceeds ``alpha`` a little when the
    classifiers disagree on few items. Computed exactly (a sum over the trinomial counts)
    at a true difference of ``-margin``, ``n = 10000``, ``margin = 0.005``,
    ``alpha = 0.05``: the test declares equivalence with probability 0.0588 when the
    classifiers disagree on 0.6 % of the items, 0.0543 at 1 %, 0.0512 at 2 %, 0.0498 at
    4 % (``tests/qerror/test_stats.py::test_paired_equivalence_exact_size`` recomputes
    these).

    References
    ----------
    .. [1] D. J. Schuirmann, "A comparison of the two one-sided tests procedure and the
       power approach for assessing the equivalence of average bioavailability",
       J. Pharmacokinet. Biopharm. 15(6), 1987.
    .. [2] D. G. Bonett, R. M. Price, "Adjusted Wald confidence interval for a difference
       of binomial proportions based on paired data", J. Educ. Behav. Stat. 37(4), 2012.
    """
    alpha = _check_alpha(alpha)
    if alpha >= 0.5:
        raise ValueError(f"TOST needs alpha < 0.5 (its CI has confidence 1 - 2 alpha), "
                         f"got {alpha}")
    margin = _check_real(margin, "margin")
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1] (a difference of accuracies), got {margin}")
    only_a, only_b, n = (check_count(v, name) for v, name in
                         ((only_a, "only_a"), (only_b, "only_b"), (n, "n")))
    if n < 1 or only_a + only_b > n:
        raise ValueError(f"need n >= 1 and only_a + only_b <= n; got {only_a}, {only_b}, {n}")
    pa, pb = (only_a + 1) / (n + 2), (only_b + 1) / (n + 2)
    shrunk = pa - pb
    se = math.sqrt(max(pa + pb - shrunk ** 2, 0.0) / (n + 2))
    z_low, z_high = (shrunk + margin) / se, (margin - shrunk) / se
    p_low, p_high = float(sps.norm.sf(z_low)), float(sps.norm.sf(z_high))
    p = max(p_low, p_high)
    stat = z_low if p_low >= p_high else -z_high
    zq = _z_upper(alpha)
    ci = (max(-1.0, shrunk - zq * se), min(1.0, shrunk + zq * se))
    diff = (only_a - only_b) / n
    what = (f"accuracy a - b = {diff:.4g} ({only_a} right by a only, {only_b} by b only, "
            f"n={n}), {_pct(2 * alpha)} CI [{ci[0]:.4g}, {ci[1]:.4g}] vs margin "
            f"±{margin:g}")
    if p < alpha:
        verdict = f"accuracies equivalent within the margin (TOST {_p(p, alpha)} < α={alpha:g}): {what}"
    else:
        verdict = f"equivalence not shown (TOST {_p(p, alpha)} ≥ α={alpha:g}): {what}"
    return EquivalenceResult(
        test=f"|accuracy(a) - accuracy(b)| < {margin:g}",
        method="paired TOST, Bonett-Price adjusted Wald", statistic=stat, p_value=p,
        estimate=diff, ci=ci, n=n, alpha=alpha, verdict=verdict, df=None,
        std=se * math.sqrt(n + 2), se=se, low=-margin, high=margin, p_low=p_low,
        p_high=p_high)


# --------------------------------------------------------------------------- median


def median_ranks(n: int, alpha: float = 0.05) -> tuple[int, float]:
    """The ranks of :func:`median_ci`'s interval for ``n`` values, and its exact coverage.

    Parameters
    ----------
    n : int
        Number of values, at least 1.
    alpha : float
        The interval's coverage is at least ``1 - alpha``.

    Returns
    -------
    k : int
        The interval is ``[x_(k), x_(n-k+1)]`` of the sorted values (ranks from 1); 0 where
        no pair of order statistics reaches ``1 - alpha`` (fewer than ``1 + log2(1/alpha)``
        values).
    coverage : float
        ``1 - 2 P(B <= k - 1)``, ``B ~ Binomial(n, 1/2)``: the probability that the interval
        holds the median of any continuous law; NaN where ``k`` is 0.

    Notes
    -----
    The median lies below ``x_(k)`` exactly when at most ``k - 1`` values fall below it, and
    each falls below it with probability 1/2 whatever the law, so ``[x_(k), x_(n-k+1)]``
    misses it with probability ``2 P(B <= k - 1)``. The rank chosen is the largest ``k``
    whose coverage reaches ``1 - alpha``; the order statistics are discrete, so the coverage
    is usually above ``1 - alpha`` (0.9375 for 5 values, 0.9346 for 11, 0.9648 for 15 at
    ``alpha = 0.10``). The rank is judged by its miss probability ``2 P(B <= k - 1)``
    against ``alpha`` itself, never its coverage against ``1 - alpha``, which rounds to 1
    for an ``alpha`` below about 1e-16 (every rank then "reached" it). The binomial law is
    evaluated in double precision (scipy), so a miss probability within about 1e-15
    relative of ``alpha`` could be judged on the wrong side.

    References
    ----------
    .. [1] W. J. Conover, *Practical Nonparametric Statistics*, 3rd ed., Wiley, 1999,
       section 3.2 (confidence interval for a quantile).
    """
    n = check_count(n, "n", 1)
    alpha = _check_alpha(alpha)

    # The miss probability grows with k, and is at most alpha while P(B <= k - 1) <= alpha/2:
    # from just above the binomial's alpha/2 quantile, step down to the last k within it (a
    # scan of every rank took O(n) memory and time, 30 GB for a billion values). Judged
    # against alpha, not 1 - alpha: at alpha = 1e-20, 1 - alpha and every coverage near it
    # round to 1, and 60 values got the interval [min, max], which misses with 1.7e-18.
    k = min(int(sps.binom.ppf(alpha / 2.0, n, 0.5)) + 2, (n + 1) // 2)
    while k >= 1 and _median_miss(k, n) > alpha:
        k -= 1
    if k == 0:
        return 0, math.nan
    return k, 1.0 - _median_miss(k, n)


def _median_miss(k: int, n: int) -> float:
    """``2 P(B <= k - 1)``, ``B ~ Bin(n, 1/2)``: how often the order statistics ``k`` and
    ``n - k + 1`` of ``n`` values miss their median (1 - coverage, with the digits that
    ``1 - coverage`` rounds away at a tiny miss)."""
    return float(2.0 * sps.binom.cdf(k - 1, n, 0.5))


def median_ci(sample: SampleLike, alpha: float = 0.05) -> MedianResult:
    """Distribution-free confidence interval of a median (the sign test's interval).

    Parameters
    ----------
    sample : array-like
        The values, one-dimensional (ValueError otherwise) and finite; numpy array, torch
        tensor or sequence.
    alpha : float
        The interval's coverage is at least ``1 - alpha`` for any continuous law.

    Returns
    -------
    MedianResult
        ``estimate`` is the sample median; ``ci`` two order statistics
        (:func:`median_ranks`), ``(nan, nan)`` for a sample too small for any;
        ``coverage`` the interval's exact coverage; ``statistic`` and ``p_value`` NaN.

    Notes
    -----
    No assumption on the law but independence and continuity: the pairs of a timing on a
    machine whose load drifts are not independent, and the interval is then optimistic.
    Ties (a discrete law) make it conservative. The interval agrees with
    ``scipy.stats.quantile_test(x, q=median, p=0.5).confidence_interval(1 - alpha)``
    (tested), whose coverage scipy does not report, except where a pair's coverage equals
    ``1 - alpha`` exactly (a level such as 0.5 or 0.875: 2 values at 0.5, 7 at 0.875),
    where this takes that pair and scipy gives a NaN or a wider lower end.

    References
    ----------
    .. [1] W. J. Conover, *Practical Nonparametric Statistics*, 3rd ed., Wiley, 1999,
       section 3.2.
    """
    alpha = _check_alpha(alpha)
    shape = _flat_shape(sample)
    if len(shape) != 1:
        hint = " (a single value: pass [x], a sample of one)" if shape == () else ""
        raise ValueError(f"sample must be one-dimensional, got shape {shape}{hint}")
    x = np.sort(_sample(sample, "sample"))
    n = x.size
    k, coverage = median_ranks(n, alpha)
    median = float(np.median(x))
    if k == 0:
        least = math.ceil(1.0 + math.log2(1.0 / alpha) - 1e-12)
        ci = (math.nan, math.nan)
        verdict = (f"median {_num(median)} of {n} value(s); too few for an interval of "
                   f"coverage {_pct(alpha)} (it needs at least {least})")
    else:
        ci = (float(x[k - 1]), float(x[n - k]))
        verdict = (f"median {_num(median)}, {_pct(_median_miss(k, n))} interval [{_num(ci[0])}, "
                   f"{_num(ci[1])}] (order statistics {k} and {n - k + 1} of {n})")
    return MedianResult(
        test="median interval", method="sign test order statistics", statistic=math.nan,
        p_value=math.nan, estimate=median, ci=ci, n=n, alpha=alpha, verdict=verdict,
        coverage=coverage, ranks=(k, n - k + 1) if k else (0, 0))


# --------------------------------------------------------------------------- multiple tests


def holm(p_values: SampleLike) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values.

    Rejecting every hypothesis whose adjusted p-value is below α controls the
    family-wise error rate at α under any dependence between the tests.

    Parameters
    ----------
    p_values : array-like, shape (m,)
        The family's unadjusted p-values, each in [0, 1]; numpy array, torch tensor or
        sequence. An empty family gives an empty result.

    Returns
    -------
    numpy.ndarray, shape (m,), float64
        Adjusted p-values, in the order given.

    Raises
    ------
    ValueError
        If the input is not one-dimensional, or holds a NaN or a value outside [0, 1].

    Notes
    -----
    With the p-values sorted, p₍₁₎ ≤ … ≤ p₍ₘ₎, the adjusted value of the k-th is

    .. math:: \\tilde p_{(k)} = \\max_{j \\le k} \\min\\bigl(1, (m - j + 1)\\, p_{(j)}\\bigr),

    so the order of the adjusted values follows that of the raw ones and tied p-values
    get the same adjusted value.

    References
    ----------
    .. [1] S. Holm, "A simple sequentially rejective multiple test procedure",
       *Scandinavian Journal of Statistics* 6(2), 65-70, 1979.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03]).tolist()
    [0.03, 0.06, 0.06]
    """
    shape = _flat_shape(p_values)
    if len(shape) != 1:
        hint = " (a single p-value: pass [p], a family of one)" if shape == () else ""
        raise ValueError(f"p_values must be one-dimensional, got shape {shape}{hint}")
    p = _sample(p_values, "p_values", min_n=0)
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("p_values must lie in [0, 1]")
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    return adjusted


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    samples: SampleLike | tuple[SampleLike, ...],
    statistic: Callable[..., float],
    *,
    generator: SeedOrGenerator,
    n_resamples: int = 9999,
    alpha: float = 0.05,
    null: float | None = None,
    vectorized: bool = False,
) -> BootstrapResult:
    """Percentile bootstrap confidence interval for any statistic.

    Parameters
    ----------
    samples : array-like, or tuple of array-likes of one shape
        The data (flattened). The arrays of a tuple are resampled jointly, row
        by row, as pairs/tuples; ``statistic`` gets them as separate arguments.
    statistic : callable
        ``statistic(*arrays) -> float``. With ``vectorized=True`` it is called
        as ``statistic(*arrays, axis=-1)`` on arrays of shape ``(batch, n)``
        and must return shape ``(batch,)`` (``numpy.mean`` works as is).
    generator : int, numpy.random.Generator or torch.Generator
        Source of the resampling; same seed, same interval. An int is a seed from 0 to
        2**64 - 1.
    n_resamples : int
        Number of bootstrap resamples ``B``, at least ``2/alpha - 1`` (39 at α = 0.05):
        with fewer, the interval's ends would be the smallest and largest resample, of
        confidence ``(B - 1)/(B + 1)``, below ``1 - alpha``.
    alpha : float
        The interval has confidence ``1 - alpha``.
    null : float, optional
        Value to test; without it ``p_value`` and ``statistic`` are NaN.

    Returns
    -------
    BootstrapResult
        ``estimate`` is the statistic on the data; ``se`` the bootstrap
        standard deviation.

    Notes
    -----
    The interval is ``[θ*_(α/2), θ*_(1-α/2)]``, quantiles of the resampled
    statistics taken at ranks ``p (B + 1)`` (exact order statistics when
    ``α (B + 1) / 2`` is an integer, e.g. ``B = 999`` or ``9999`` at α = 0.05).
    Its coverage error is O(1/n) for smooth statistics (Hall 1992); prefer a
    pivot (e.g. a log) for skewed ones. The p-value inverts the
    interval, ``min(1, 2 min(1 + #{θ* ≤ θ0}, 1 + #{θ* ≥ θ0}) / (B + 1))``, so
    ``θ0`` lies outside the interval about when ``p < alpha``; ``statistic``
    is then ``(θ̂ - θ0) / se``.

    References
    ----------
    .. [1] B. Efron, R. J. Tibshirani, *An Introduction to the Bootstrap*,
       Chapman & Hall, 1993, ch. 13.
    .. [2] P. Hall, *The Bootstrap and Edgeworth Expansion*, Springer, 1992.
    """
    alpha = _check_alpha(alpha)
    if not callable(statistic):
        raise TypeError(f"statistic must be callable, got {type(statistic).__name__}")
    vectorized = check_flag(vectorized, "vectorized")
    rng = _rng(generator)
    count = _check_resamples(n_resamples, alpha)
    arrays = _bootstrap_inputs(samples)
    n = arrays[0].size
    if vectorized:
        first = np.asarray(statistic(*(x[None, :] for x in arrays), axis=-1), dtype=np.float64)
        if first.size != 1:
            raise ValueError(f"a vectorized statistic must return shape (batch,), got "
                             f"{first.shape} for a batch of 1")
        estimate = float(first.reshape(-1)[0])
    else:
        estimate = float(statistic(*arrays))
    boot = np.empty(count)
    batch = max(1, _BOOTSTRAP_BATCH_VALUES // (n * len(arrays)))
    for start in range(0, count, batch):
        k = min(batch, count - start)
        idx = rng.integers(0, n, size=(k, n))
        if vectorized:
            vals = np.asarray(statistic(*(x[idx] for x in arrays), axis=-1), dtype=np.float64)
            if vals.shape != (k,):
                raise ValueError(f"a vectorized statistic must return shape ({k},), got "
                                 f"{vals.shape}")
            boot[start:start + k] = vals
        else:
            for j in range(k):
                boot[start + j] = float(statistic(*(x[idx[j]] for x in arrays)))
    if not np.all(np.isfinite(boot)):
        raise ValueError("the statistic returned NaN/Inf on some resamples")
    lo, hi = _percentile_interval(boot, alpha)
    se = float(np.std(boot, ddof=1))
    ci = (lo, hi)
    what = f"estimate {_num(estimate)}, {_pct(alpha)} percentile CI [{_num(lo)}, {_num(hi)}]"
    if null is None:
        stat = p = math.nan
        verdict = what
    else:
        null = _check_real(null, "null")
        p = _bootstrap_p(boot, null)
        stat = (estimate - null) / se if se > 0 else _signed_inf(estimate - null)
        if p < alpha:
            verdict = f"statistic differs from {_num(null)} ({_p(p, alpha)} < α={alpha:g}): {what}"
        else:
            verdict = (f"no evidence that the statistic differs from {_num(null)} "
                       f"({_p(p, alpha)} ≥ α={alpha:g}): {what}")
    return BootstrapResult(
        test="bootstrap interval" if null is None else f"statistic = {null:g}",
        method=f"percentile bootstrap, B={count}", statistic=stat, p_value=p,
        estimate=estimate, ci=ci, n=n, alpha=alpha, verdict=verdict,
        n_resamples=count, se=se, null=null,
    )


def _bootstrap_inputs(samples) -> list[np.ndarray]:
    if isinstance(samples, tuple):
        if not samples:
            raise ValueError("samples is an empty tuple")
        arrays = [_sample(s, f"samples[{i}]") for i, s in enumerate(samples)]
        shapes = {_flat_shape(s) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"samples in a tuple are resampled jointly and need one shape, "
                             f"got {sorted(shapes)}")
        return arrays
    return [_sample(samples, "samples")]


def _percentile_interval(boot: np.ndarray, alpha: float) -> tuple[float, float]:
    # Order statistics at rank p (B + 1) (numpy's "weibull" positions) have
    # expected coverage p exactly; the default linear rule narrows the interval
    # and inflates the error rate noticeably for B of a few hundred.
    rank = alpha / 2.0 * (boot.size + 1)
    whole = round(rank)
    if abs(rank - whole) <= 1e-12 * whole:
        # A whole rank r (and B + 1 - r above) is taken as that resample itself: its product
        # in floating point misses r by a rounding (0.05 * 200 > 10, 0.95 * 200 < 190), and
        # numpy then interpolates toward the next resample, some ulps off either end.
        ordered = np.partition(boot, (whole - 1, boot.size - whole))
        return float(ordered[whole - 1]), float(ordered[boot.size - whole])
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0], method="weibull")
    return float(lo), float(hi)


def _bootstrap_p(boot: np.ndarray, null: float) -> float:
    count = boot.size
    below = (1 + int(np.count_nonzero(boot <= null))) / (count + 1)
    above = (1 + int(np.count_nonzero(boot >= null))) / (count + 1)
    return min(1.0, 2.0 * min(below, above))


# --------------------------------------------------------------------------- helpers


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return alpha


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_resamples(n_resamples, alpha: float) -> int:
    count = check_count(n_resamples, "n_resamples", 2)
    # The percentile ends are the resamples at ranks α/2 (B + 1) and (1 - α/2)(B + 1); below
    # rank 1 they would be the smallest and largest resample, an interval of confidence
    # (B - 1)/(B + 1) < 1 - α, and the p-value could not go below 2/(B + 1) > α.
    if alpha * (count + 1) < 2.0 * (1.0 - 1e-12):
        raise ValueError(f"n_resamples={count} is too few for a {_pct(alpha)} percentile "
                         f"interval: it needs at least 2/alpha - 1 = "
                         f"{math.ceil(2.0 / alpha - 1.0 - 1e-9)} resamples")
    return count


def _rng(generator) -> np.random.Generator:
    if generator is None:
        raise ValueError("this procedure is random: pass generator= (an int seed, a "
                         "numpy.random.Generator or a torch.Generator)")
    generator = check_seed_or_generator(generator)
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device).item()
        return np.random.default_rng(int(seed))
    return np.random.default_rng(generator)


def _flat_shape(x) -> tuple[int, ...]:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return tuple(x.shape)
    return np.shape(x)


def _sample(x, name: str, min_n: int = 1) -> np.ndarray:
    """``x`` as a flat float64 array, non-empty and finite."""
    if isinstance(x, ErrorStats):
        raise TypeError(f"{name} must hold the samples themselves, not an ErrorStats")
    if isinstance(x, np.ma.MaskedArray):  # np.asarray would drop the mask, keeping the values
        raise TypeError(f"{name} is a masked array, whose mask would be ignored; pass "
                        f"{name}.compressed() or {name}.filled(value)")
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real, got a tensor of dtype {x.dtype}")
        arr = x.detach().cpu().to(torch.float64).numpy().reshape(-1)
    else:
        try:
            raw = np.asarray(x)
            is_complex = raw.dtype.kind == "c"  # float64 would drop the imaginary part
            arr = None if is_complex else raw.astype(np.float64, copy=False).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be numeric array-like, got {type(x).__name__}") from exc
        if is_complex:
            raise TypeError(f"{name} must be real, got dtype {raw.dtype}")
    if arr.size < min_n:
        what = "is empty" if arr.size == 0 else f"has {arr.size} value(s)"
        raise ValueError(f"{name} {what}; need at least {min_n}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} holds {bad} NaN/Inf value(s); remove them first")
    return arr


def _binary(x, name: str) -> np.ndarray:
    arr = _sample(x, name)
    if not np.all((arr == 0.0) | (arr == 1.0)):
        raise ValueError(f"{name} must hold booleans or 0/1 values")
    return arr.astype(bool)


def _moments(data, channel) -> tuple[int, float, float, float]:
    """``(n, mean, sample standard deviation, standard error of the mean)`` of samples or of
    an accumulator."""
    if isinstance(data, ErrorStats):
        if data.count < 2:
            raise ValueError(f"need at least 2 observations, the ErrorStats has {data.count}")
        mean, var, lo, hi = data.mean, data.sample_variance, data.min, data.max
        if data.axis is not None:
            if channel is None:
                raise ValueError(f"the ErrorStats is per channel ({data.channels} channels); "
                                 "pass channel= to pick one")
            if isinstance(channel, bool) or not isinstance(channel, numbers.Integral):
                raise TypeError(f"channel must be an integer, got {channel!r}")
            if not -data.channels <= channel < data.channels:
                raise ValueError(f"channel {channel} out of range for {data.channels} channels")
            mean, var, lo, hi = mean[channel], var[channel], lo[channel], hi[channel]
        elif channel is not None:
            raise ValueError("channel= applies to a per-channel ErrorStats only")
        var = float(var)
        if lo < hi and var < np.finfo(np.float64).tiny:
            # unequal errors all below ~1e-154: their squares, and so the accumulator's
            # variance, underflowed to 0 or a subnormal (an unbiased sample of N(0, 1e-181²)
            # was 'biased, p < 1e-300')
            raise ValueError(
                f"the ErrorStats' variance ({var:.3g}) underflowed float64: its errors, "
                f"between {lo:.3g} and {hi:.3g}, square to 0 or to a subnormal number; "
                "accumulate them times a power of two (e.g. numpy.ldexp(e, 600)), or pass "
                "the errors themselves")
        return data.count, float(mean), math.sqrt(var), math.sqrt(var / data.count)
    if channel is not None:
        raise ValueError("channel= applies to an ErrorStats only")
    arr = _sample(data, "data", min_n=2)
    if arr.min() == arr.max():  # exactly: a float mean of copies of 0.7 is not 0.7
        return arr.size, float(arr[0]), 0.0, 0.0
    # In units of a power of two near the largest magnitude (an exact rescaling, which
    # leaves every digit as it was): the variance of values below 1e-154 underflowed to 0
    # (an unbiased sample of N(0, 1e-170²) was 'biased, p < 1e-300') and above 1e154
    # overflowed (an interval of ±inf, p = 1).
    unit, k = _in_units(arr)
    var = float(unit.var(ddof=1))
    return (arr.size, float(np.ldexp(unit.mean(), k)), math.ldexp(math.sqrt(var), k),
            math.ldexp(math.sqrt(var / arr.size), k))


def _in_units(x: np.ndarray) -> tuple[np.ndarray, int]:
    """``(x / 2**k, k)`` with ``2**k`` just above the largest ``|x|`` (``x`` not all 0): an
    exact rescaling into [-1, 1), where the squares of values beyond 1e±154, which over- or
    underflow in float64, do not."""
    k = int(np.frexp(np.max(np.abs(x)))[1])
    return np.ldexp(x, -k), k


def _t_verdict(mean: float, se: float, df: int, mu0: float, alpha: float, unit: str,
               words: tuple[str, str]) -> tuple[float, float, tuple[float, float], str]:
    """The two-sided t-test of ``mean = mu0`` with its ``1 - alpha`` CI, and its verdict:
    ``words`` name what differs (``"bias"``) and what is reported (``"mean error"``)."""
    tq = _t_upper(alpha / 2.0, df)
    stat, p = _t_two_sided(mean - mu0, se, df)
    ci = (mean - tq * se, mean + tq * se)
    u = f" {unit}" if unit else ""
    what = (f"{words[1]} {_num(mean)}{u}, {_pct(alpha)} CI "
            f"[{_num(ci[0])}, {_num(ci[1])}]{u}")
    if p < alpha:
        verdict = f"{words[0]} differs from {_num(mu0)}{u} ({_p(p, alpha)} < α={alpha:g}): {what}"
    else:
        verdict = (f"no evidence that the {words[0]} differs from {_num(mu0)}{u} "
                   f"({_p(p, alpha)} ≥ α={alpha:g}): {what}")
    return stat, p, ci, verdict


def _t_two_sided(diff: float, se: float, df: int) -> tuple[float, float]:
    if se == 0.0:
        return (0.0, 1.0) if diff == 0.0 else (_signed_inf(diff), 0.0)
    stat = diff / se
    return stat, float(2.0 * sps.t.sf(abs(stat), df))


def _z_two_sided(diff: float, se: float) -> tuple[float, float]:
    if se == 0.0:
        return (0.0, 1.0) if diff == 0.0 else (_signed_inf(diff), 0.0)
    stat = diff / se
    return stat, float(2.0 * sps.norm.sf(abs(stat)))


def _signed_inf(x: float) -> float:
    return math.copysign(math.inf, x) if x != 0 else 0.0


def _num(x: float) -> str:
    return f"{x:.4g}"


def places_for(value: float, verdict: Callable[[float], bool], show: Callable[[int], str],
               places: int) -> int:
    """The fewest places, ``places`` or more, at which ``show`` prints ``value`` as a
    figure the ``verdict`` beside it judges as it judges ``value``.

    A p-value of 0.0496 at two significant digits is 0.050, which reads as not below
    α = 0.05 although the test passed (``verdict`` ``lambda p: p < 0.05``); at three it is
    0.0496. ``show`` maps a number of places (digits or decimals) to plain text that
    ``float`` reads; enough places print any float exactly, so the search ends.
    """
    judged = verdict(value)
    while verdict(float(show(places))) != judged:
        places += 1
    return places


def _p(p: float, alpha: float) -> str:
    """``p`` to two significant digits, or as many more as keep it on its side of
    ``alpha`` in a verdict (0.0496 at α = 0.05 is p=0.0496, not p=0.05 beside "< α")."""
    # Tail probabilities below the double range underflow to 0; say so.
    if p < 1e-300:
        return "p<1e-300"
    digits = places_for(p, lambda v: v < alpha, lambda n: f"{p:.{n}g}", 2)
    return f"p={p:.{digits}g}"


def _pct(miss: float) -> str:
    """The confidence ``1 - miss`` in percent, with the digits that show ``miss``: 95%,
    68.27%, 99.999% (four significant digits made 1 - 1e-5 "100%"); below 1e-12, where
    ``1 - miss`` keeps too few of its digits, "1 − 1e-17"."""
    if miss < 1e-12:
        return f"1 − {miss:.2g}"
    digits = max(4, 3 + math.ceil(-math.log10(100.0 * miss)))
    return f"{100.0 * (1.0 - miss):.{digits}g}%"
