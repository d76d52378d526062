"""Exact error moments: independent quadrature, Monte Carlo, the uniform-noise model, clipping.

Every tolerance is either derived in the test (from standard errors, from a
series remainder, from the rounding of published values) or is a stated
multiple of what both sides of a float64 comparison can reach.
"""

import itertools
import math
import warnings

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, special, stats

from qerror.analytic import (
    ClipMethod,
    Grid,
    InfiniteMomentWarning,
    error_moments,
    optimal_clip,
    uniform_bias_lsb,
)
from qerror.quantizer import QuantSpec, fake_quantize
from qerror.rounding import RoundingMode

MODES = list(RoundingMode)
NEAREST = (RoundingMode.NEAREST_EVEN, RoundingMode.NEAREST_AWAY)


# --------------------------------------------------------------------------- reference laws


class Law:
    """A law given twice: as a frozen scipy distribution in real units (what the
    engine sees) and as a plain-math density of ``u = x/s + z`` (what the
    reference integrates), with the points where that density is not smooth."""

    def __init__(self, name: str, sd: float, loc: float, s: float, z: int):
        c = loc / s + z
        w = sd / s
        if name == "norm":
            self.dist = stats.norm(loc, sd)
            self.pdf = lambda u: math.exp(-0.5 * ((u - c) / w) ** 2) / (w * math.sqrt(2 * math.pi))
            self.points = (c,)
        elif name == "laplace":
            b = w / math.sqrt(2.0)
            self.dist = stats.laplace(loc, sd / math.sqrt(2.0))
            self.pdf = lambda u: math.exp(-abs(u - c) / b) / (2.0 * b)
            self.points = (c,)
        elif name == "uniform":
            h = math.sqrt(3.0) * w
            self.dist = stats.uniform(loc - math.sqrt(3.0) * sd, 2.0 * math.sqrt(3.0) * sd)
            self.pdf = lambda u: 1.0 / (2.0 * h) if c - h <= u <= c + h else 0.0
            self.points = (c - h, c + h)
        elif name == "t5":
            nu = 5.0
            t_scale = w * math.sqrt((nu - 2.0) / nu)
            k = math.gamma((nu + 1) / 2) / (math.sqrt(nu * math.pi) * math.gamma(nu / 2))
            self.dist = stats.t(nu, loc, sd * math.sqrt((nu - 2.0) / nu))
            self.pdf = lambda u: k * (1 + ((u - c) / t_scale) ** 2 / nu) ** (-(nu + 1) / 2) / t_scale
            self.points = (c,)
        else:
            raise ValueError(name)


def round_ref(u, mode: RoundingMode) -> int:
    """The deterministic modes at a point that is not a tie, written from their definitions."""
    if mode in NEAREST:
        return math.floor(u + 0.5)
    if mode is RoundingMode.FLOOR:
        return math.floor(u)
    if mode is RoundingMode.CEIL:
        return math.ceil(u)
    return math.floor(u) if u >= 0 else math.ceil(u)


def stochastic_terms(k, qmin, qmax):
    """Integrands (times the density) of each statistic for u in [k, k+1]:
    down to ``c0`` with probability 1 - v, up to ``c1`` with probability v."""
    c0, c1 = min(max(k, qmin), qmax), min(max(k + 1, qmin), qmax)
    out0, out1 = not qmin <= k <= qmax, not qmin <= k + 1 <= qmax

    def mix(f0, f1):
        return lambda u: (1 - (u - k)) * f0(u) + (u - k) * f1(u)

    return {
        "bias": mix(lambda u: c0 - u, lambda u: c1 - u),
        "mse": mix(lambda u: (c0 - u) ** 2, lambda u: (c1 - u) ** 2),
        "mae": mix(lambda u: abs(c0 - u), lambda u: abs(c1 - u)),
        "p_low": mix(lambda u: float(k < qmin), lambda u: float(k + 1 < qmin)),
        "p_high": mix(lambda u: float(k > qmax), lambda u: float(k + 1 > qmax)),
        "mse_clip": mix(lambda u: out0 * (c0 - u) ** 2, lambda u: out1 * (c1 - u) ** 2),
    }


def deterministic_terms(r, qmin, qmax):
    """Integrands for a piece whose unclamped code is ``r``."""
    c = min(max(r, qmin), qmax)
    terms = {"bias": lambda u: c - u, "mse": lambda u: (c - u) ** 2, "mae": lambda u: abs(c - u)}
    if r < qmin:
        terms["p_low"] = lambda u: 1.0
    if r > qmax:
        terms["p_high"] = lambda u: 1.0
    if not qmin <= r <= qmax:
        terms["mse_clip"] = terms["mse"]
    return terms


def reference(pdf, mode, qmin, qmax, points, integral):
    """Error moments (LSB) integrated piece by piece from the definition.

    Breakpoints are all integers and half-integers around the range plus the
    density's own special points, so that on every piece the clamped code is
    constant (deterministic modes), the error does not change sign, and the
    density is smooth. STOCHASTIC integrates ``(1-v) g(c0 - u) + v g(c1 - u)``
    with ``c0, c1`` the clamped floor and floor + 1 (beyond the grid both clamp
    to the same code, so a piece spanning several integers is still exact).
    """
    grid = {k / 2 for k in range(2 * (qmin - 2), 2 * (qmax + 2) + 1)}
    b = sorted(grid | set(points))
    pieces = [(-math.inf, b[0]), *itertools.pairwise(b), (b[-1], math.inf)]
    acc = dict.fromkeys(["bias", "mse", "mae", "p_low", "p_high", "mse_clip"], 0.0)
    for lo, hi in pieces:
        if math.isinf(lo):
            mid = hi - 1
        elif math.isinf(hi):
            mid = lo + 1
        else:
            mid = (lo + hi) / 2
        if mode is RoundingMode.STOCHASTIC:
            terms = stochastic_terms(math.floor(mid), qmin, qmax)
        else:
            terms = deterministic_terms(round_ref(mid, mode), qmin, qmax)
        for key, g in terms.items():
            acc[key] += integral(lambda u, g=g: g(u) * pdf(u), lo, hi)
    return acc


def scipy_integral(f, lo, hi):
    with warnings.catch_warnings():
        # quad's "roundoff detected" on integrands that are ~0 everywhere.
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return integrate.quad(f, lo, hi, epsabs=0.0, epsrel=1e-13, limit=400)[0]


def engine_lsb(em):
    return {"bias": em.bias_lsb, "mse": em.mse_lsb, "mae": em.mae_lsb, "p_low": em.p_low,
            "p_high": em.p_high, "mse_clip": em.mse_clip_lsb}


def assert_matches(got, ref, rtol):
    for key, value in ref.items():
        # The bias is a signed sum whose cancellation is judged against the RMS error.
        scale = math.sqrt(ref["mse"]) if key == "bias" else abs(value)
        assert abs(got[key] - value) <= rtol * scale + 1e-300, (key, got[key], value)


# --------------------------------------------------------------------------- exact vs quadrature

# 3-bit affine unsigned spec with zero point 3; the law's centre sits at
# u = z + 1.37, off the grid, so no symmetry hides an error.
AFFINE = QuantSpec(bits=3, signed=False, symmetric=False)
S, Z = 0.1, 3


@pytest.mark.parametrize("law_name", ["norm", "laplace", "uniform", "t5"])
@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0, 10.0])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_matches_quadrature(law_name, ratio, mode):
    """σ/step in {0.05, 0.3, 1, 10}: a law inside one bin, a few bins, many bins,
    and mostly clipped. scipy.quad is asked for 1e-13 relative per piece (about
    40 pieces); the engine is documented at ~3e-13 relative per piece; 1e-10
    leaves a 100x margin over both."""
    law = Law(law_name, ratio * S, 0.137 * S, S, Z)
    spec = AFFINE.replace(rounding=mode)
    em = error_moments(law.dist, spec, S, Z)
    ref = reference(law.pdf, mode, spec.qmin, spec.qmax, law.points, scipy_integral)
    assert_matches(engine_lsb(em), ref, 1e-10)
    assert em.mse_granular_lsb == pytest.approx(ref["mse"] - ref["mse_clip"], rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("mode", [RoundingMode.NEAREST_EVEN, RoundingMode.FLOOR,
                                  RoundingMode.TOWARD_ZERO, RoundingMode.STOCHASTIC],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("ratio", [0.3, 3.0])
def test_matches_30_digit_quadrature(mode, ratio):
    """A signed symmetric 2-bit spec with the normal law integrated by mpmath at
    30 digits: an anchor independent of float64. Tolerance 1e-12: the engine's
    per-piece accuracy (~3e-13) summed over a dozen pieces."""
    spec = QuantSpec(bits=2, rounding=mode)
    s, mu, sd = 0.5, 0.21, 0.5 * ratio
    c, w = mu / s, sd / s

    def pdf(u):
        return mpmath.npdf(u, c, w)

    def integral(f, lo, hi):
        return float(mpmath.quad(f, [lo, c, hi] if lo < c < hi else [lo, hi]))

    em = error_moments(stats.norm(mu, sd), spec, s)
    with mpmath.workdps(30):
        ref = reference(pdf, mode, spec.qmin, spec.qmax, (), integral)
    assert_matches(engine_lsb(em), ref, 1e-12)


# --------------------------------------------------------------------------- Monte Carlo

MC_CASES = [(law, sd, mode) for law, sd in (("norm", 0.3), ("norm", 3.0), ("laplace", 1.0))
            for mode in MODES]
MC_N = 200_000
# Family-wise α = 1e-3 over 5 statistics in every case, Bonferroni.
MC_ALPHA = 1e-3 / (5 * len(MC_CASES))
MC_Z = stats.norm.isf(MC_ALPHA / 2)


@pytest.mark.parametrize("law_name,sd_lsb,mode", MC_CASES,
                         ids=[f"{a}-{b}-{c.value}" for a, b, c in MC_CASES])
def test_matches_monte_carlo(law_name, sd_lsb, mode):
    """qerror.fake_quantize on 2e5 float64 draws (fixed seed). Moments: z-test
    with the sample standard error, |mean - exact| <= z_{1-α/2} SE. Clamping
    counts: exact binomial test (two-sided p-value >= α), valid however small
    the probability is. α per comparison is MC_ALPHA (family-wise 1e-3)."""
    law = Law(law_name, sd_lsb * S, 0.037 * S, S, Z)
    spec = AFFINE.replace(rounding=mode)
    em = error_moments(law.dist, spec, S, Z)
    rng = np.random.default_rng(20240611)
    x = law.dist.rvs(size=MC_N, random_state=rng)
    xq, sat = fake_quantize(x, spec, S, Z, generator=7, return_saturation=True)
    eps = (xq - x) / S
    for sample, exact in ((eps, em.bias_lsb), (eps**2, em.mse_lsb), (np.abs(eps), em.mae_lsb)):
        se = sample.std(ddof=1) / math.sqrt(MC_N)
        assert abs(sample.mean() - exact) <= MC_Z * se, (sample.mean(), exact, se)
    for count, p in ((int(sat.low), em.p_low), (int(sat.high), em.p_high)):
        assert stats.binomtest(count, MC_N, min(p, 1.0)).pvalue >= MC_ALPHA, (count, p)


# --------------------------------------------------------------------------- uniform-noise model


WIDE = QuantSpec(bits=16)


@pytest.mark.parametrize("mode", [m for m in MODES if m is not RoundingMode.TOWARD_ZERO],
                         ids=lambda m: m.value)
def test_uniform_model_recovered_for_wide_input(mode):
    """σ = 50 steps, 16 bits. By Poisson summation the exact moments differ from
    the table by terms of order exp(-2π²σ²) = exp(-49348) (and clamping has
    probability Q(655) = 0), i.e. by nothing float64 can see: what is left is
    the rounding of a pairwise sum over 2^17 pieces, bounded by 1e-14 (~45 ulp)."""
    em = error_moments(stats.norm(0.3, 50.0), WIDE.replace(rounding=mode), 1.0)
    assert abs(em.bias_gap_lsb) <= 1e-14
    assert abs(em.mse_gap_lsb) <= 1e-14
    assert abs(em.mae_gap_lsb) <= 1e-14
    assert em.p_low == em.p_high == 0.0


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_toward_zero_wide_input_has_the_kink_correction(mu):
    """Truncation is floor on u >= 0 and ceil below: its |error| grows away from
    0 on both sides while the density falls, so even a wide law misses the
    table's 1/3 and 1/2. Euler-Maclaurin on each half-line (Bernoulli
    polynomials; the odd-derivative terms cancel between the halves) gives
    MSE - 1/3 = MAE - 1/2 = -f(0)/6 + f''(0)/360 - f''''(0)/15120 + ...,
    with f the density of u, while the table's bias -(P(u>0) - P(u<0))/2 is
    exact to all orders. Tolerance: twice the first omitted term, plus 1e-14."""
    sd = 50.0
    em = error_moments(stats.norm(mu, sd), WIDE.replace(rounding=RoundingMode.TOWARD_ZERO), 1.0)
    t = -mu / sd
    f0 = stats.norm.pdf(t) / sd
    f2 = f0 * (t * t - 1) / sd**2
    f4 = f0 * (t**4 - 6 * t * t + 3) / sd**4
    predicted = -f0 / 6 + f2 / 360
    tol = 2 * abs(f4) / 15120 + 1e-14
    assert abs(em.mse_gap_lsb - predicted) <= tol
    assert abs(em.mae_gap_lsb - predicted) <= tol
    assert abs(em.bias_gap_lsb) <= 1e-14


def test_uniform_model_fails_for_narrow_input_nearest():
    """σ = 0.1 step centred on a code: almost all mass stays in the bin of 0,
    where the error is -u, so MSE ≈ σ² = 0.01 instead of 1/12. Independent
    bracket: |R(u) - u| <= 1/2 <= |u| outside the bin, hence
    σ² - 2 E[u²; u > 1/2] <= MSE <= σ² and E|u| - 2 E[u; u > 1/2] <= MAE <= E|u|,
    with the truncated moments in closed form (t = 1/(2σ) = 5)."""
    sd = 0.1
    em = error_moments(stats.norm(0.0, sd), QuantSpec(bits=8), 1.0)
    t = 0.5 / sd
    tail2 = 2 * sd**2 * (t * stats.norm.pdf(t) + stats.norm.sf(t))
    tail1 = 2 * sd * stats.norm.pdf(t)
    assert sd**2 - tail2 - 1e-15 <= em.mse_lsb <= sd**2 + 1e-15
    mean_abs = sd * math.sqrt(2 / math.pi)
    assert mean_abs - tail1 - 1e-15 <= em.mae_lsb <= mean_abs + 1e-15
    assert sd**2 - 1 / 12 - tail2 - 1e-15 <= em.mse_gap_lsb <= sd**2 - 1 / 12 + 1e-15
    assert em.mse_gap_lsb < -0.07
    assert em.mae_gap_lsb < -0.16


def test_uniform_model_fails_for_narrow_input_floor():
    """σ = 0.1 step centred at u = 0.3: floor's error is -u on [0, 1), so the
    bias is about -0.3, not -1/2: a gap of +0.2. Independent bracket: the error
    is -u on [0, 1) and within [-1, 0] elsewhere, so
    |bias + E[u; 0 <= u < 1]| <= P(u outside [0, 1)), with E[u; a < u < b] =
    μ (Φ(β) - Φ(α)) + σ (φ(α) - φ(β)) in closed form."""
    mu, sd = 0.3, 0.1
    em = error_moments(stats.norm(mu, sd), QuantSpec(bits=8, rounding=RoundingMode.FLOOR), 1.0)
    a, b = (0.0 - mu) / sd, (1.0 - mu) / sd
    inside_mean = (mu * (stats.norm.cdf(b) - stats.norm.cdf(a))
                   + sd * (stats.norm.pdf(a) - stats.norm.pdf(b)))
    outside = stats.norm.cdf(a) + stats.norm.sf(b)
    assert abs(em.bias_lsb + inside_mean) <= outside
    assert abs(em.bias_gap_lsb - (0.5 - inside_mean)) <= outside
    assert 0.19 < em.bias_gap_lsb < 0.21


def test_toward_zero_pulls_toward_minus_z_s_not_zero():
    """Truncation acts on u = x/s + z, so it pulls toward the real value -z s.
    z = 100, x ≈ -0.5: u ≈ 50 > 0, truncation floors and x̂ moves down, away
    from 0, toward -z s = -1. z = -100, x ≈ +0.5: u ≈ -50 < 0, it ceils and x̂
    moves up, away from 0, toward +1. The symmetric spec (z = 0) on x ≈ -0.5
    (u ≈ -50) pulls toward 0. σ = 5 steps: the bias is the uniform-model
    ±1/2 LSB up to terms exp(-2π²·25) and Q(10), far below 1e-12."""
    s = 0.01
    affine = QuantSpec(bits=8, symmetric=False, rounding=RoundingMode.TOWARD_ZERO)
    for z, mu, sign in ((100, -0.5, -1.0), (-100, 0.5, 1.0)):
        em = error_moments(stats.norm(mu, 5 * s), affine, s, z)
        assert em.bias_lsb == pytest.approx(sign * 0.5, abs=1e-12)
        assert em.bias_lsb == pytest.approx(em.uniform.bias_lsb, abs=1e-12)
        anchor = -z * s
        assert abs(mu + em.bias - anchor) < abs(mu - anchor)
        assert abs(mu + em.bias) > abs(mu)
    sym = QuantSpec(bits=8, rounding=RoundingMode.TOWARD_ZERO)
    em = error_moments(stats.norm(-0.5, 5 * s), sym, s)
    assert em.bias_lsb == pytest.approx(0.5, abs=1e-12)
    assert abs(-0.5 + em.bias) < 0.5


# --------------------------------------------------------------------------- clamping


# u below which (low) and above which (high) R(u) leaves [qmin, qmax].
CLAMP_AT = {
    RoundingMode.NEAREST_EVEN: (-0.5, 0.5),
    RoundingMode.NEAREST_AWAY: (-0.5, 0.5),
    RoundingMode.FLOOR: (0.0, 1.0),
    RoundingMode.CEIL: (-1.0, 0.0),
    RoundingMode.TOWARD_ZERO: (-1.0, 1.0),
}


@pytest.mark.parametrize("mode", list(CLAMP_AT), ids=lambda m: m.value)
@pytest.mark.parametrize("law_name", ["norm", "laplace", "t5"])
def test_clamp_probabilities_are_the_cdf_at_the_boundaries(mode, law_name):
    """P(R(u) < qmin) = F(s (qmin + lo - z)) and P(R(u) > qmax) = 1 - F(s (qmax + hi - z)).
    The generic path (t5) evaluates scipy's cdf/sf at exactly these points: equal
    to the last bit. The closed forms standardise in LSB units instead; the
    argument then differs by a few ulp, amplified by the cdf's condition
    number |t f(t)/F(t)| <= t² + 1 < 10 here: rtol 1e-13."""
    law = Law(law_name, 1.5 * S, 0.05 * S, S, Z)
    spec = AFFINE.replace(rounding=mode)
    em = error_moments(law.dist, spec, S, Z)
    lo, hi = CLAMP_AT[mode]
    p_low = law.dist.cdf(S * (spec.qmin + lo - Z))
    p_high = law.dist.sf(S * (spec.qmax + hi - Z))
    if law_name == "t5":
        assert (em.p_low, em.p_high) == (p_low, p_high)
    else:
        assert em.p_low == pytest.approx(p_low, rel=1e-13)
        assert em.p_high == pytest.approx(p_high, rel=1e-13)
    assert em.p_clip == pytest.approx(p_low + p_high, rel=1e-13)


# --------------------------------------------------------------------------- invariants


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    law_name=st.sampled_from(["norm", "laplace", "uniform"]),
    log_sd=st.floats(-2.0, 2.0),
    offset=st.floats(-3.0, 3.0),
    mode=st.sampled_from(MODES),
    bits=st.integers(2, 6),
    signed=st.booleans(),
    narrow=st.booleans(),
    zp_frac=st.floats(0.0, 1.0),
)
def test_invariants(law_name, log_sd, offset, mode, bits, signed, narrow, zp_frac):
    """Bounds that hold for any law: the split adds up, Jensen (bias², MAE² <=
    MSE), |bias| <= MAE, probabilities in [0, 1], the granular error within the
    mode's interval in range (|ε| <= 1/2 nearest, <= 1 otherwise, E[ε²|u] <= 1/4
    stochastic), units scale by s, and the table's own identities."""
    spec = QuantSpec(bits=bits, signed=signed, symmetric=False, narrow=narrow and signed,
                     rounding=mode)
    z = spec.qmin + round(zp_frac * (spec.qmax - spec.qmin))
    s = 0.25
    law = Law(law_name, s * 10**log_sd, s * (offset + 0.5 * (spec.qmin + spec.qmax) - z), s, z)
    em = error_moments(law.dist, spec, s, z)
    tol = 1e-12 * em.mse_lsb
    assert em.mse_lsb == pytest.approx(em.mse_granular_lsb + em.mse_clip_lsb, rel=1e-14)
    assert em.bias_lsb**2 <= em.mse_lsb + tol
    assert em.mae_lsb**2 <= em.mse_lsb + tol
    assert abs(em.bias_lsb) <= em.mae_lsb + tol
    assert em.variance_lsb == pytest.approx(max(em.mse_lsb - em.bias_lsb**2, 0.0), abs=tol)
    assert 0 <= em.p_low and 0 <= em.p_high and em.p_clip <= 1 + 1e-14
    directed = (RoundingMode.FLOOR, RoundingMode.CEIL, RoundingMode.TOWARD_ZERO)
    bound = 1.0 if mode in directed else 0.25
    assert em.mse_granular_lsb <= bound * (1 + 1e-12)
    assert em.mse == pytest.approx(em.mse_lsb * s * s, rel=1e-15)
    assert em.bias == pytest.approx(em.bias_lsb * s, rel=1e-15, abs=1e-300)
    u = em.uniform
    assert u.mse_lsb == pytest.approx(u.variance_lsb + u.bias_lsb**2, rel=1e-15)
    assert em.mse_gap == pytest.approx(em.mse - u.mse, rel=1e-15, abs=1e-300)


# --------------------------------------------------------------------------- optimal clipping

# Banner, Nahshan & Soudry (2019), optimal α for 2..8 bits, nearest rounding.
PUBLISHED = {
    "laplace": (stats.laplace(0.0, 1.0), [2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89]),
    "norm": (stats.norm(0.0, 1.0), [1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92]),
}


@pytest.mark.parametrize("law_name", list(PUBLISHED))
def test_aciq_reproduces_published_values(law_name):
    """Level count: our ACIQ step is 2α/spec.levels and spec.levels = 2**bits,
    the paper's 2^M, so with granular_mass=False the objective is the paper's
    (tail + α²/(3·4^M)). The table rounds inconsistently (3.8972 -> 3.89 but
    2.9362 -> 2.94), so each entry is within one unit of its last published
    digit of the exact optimum: tolerance 0.01, and 0.1 for "6.2"."""
    dist, values = PUBLISHED[law_name]
    for bits, value in zip(range(2, 9), values):
        res = optimal_clip(dist, bits, ClipMethod.ACIQ, granular_mass=False)
        assert res.spec.levels == 2**bits
        digits = len(str(value).split(".")[1])
        assert abs(res.alpha - value) <= 10.0**-digits, (bits, res.alpha, value)
        # One unit of the table admits an objective a few per cent off (a granular term 2 %
        # larger moves alpha 0.1 to 0.4 %), so alpha is also held to the root of the
        # objective's derivative, written here: Laplace(0, 1), 2 e^-a + a^2/(3 L) with
        # L = 4^M, at a = W(3 L) (Lambert W); N(0, 1) at the root of a erfc(a/sqrt 2) -
        # sqrt(2/pi) e^(-a^2/2) + a/(3 L), found to 1e-15 by brentq. The library minimises
        # the objective, whose float64 values are flat to eps about the optimum, so it
        # resolves alpha to about sqrt(eps) (measured: within 6.5e-9 at 2 to 8 bits).
        levels = 4.0**bits
        if law_name == "laplace":
            ref = float(special.lambertw(3 * levels).real)
        else:
            ref = optimize.brentq(lambda a: a * special.erfc(a / np.sqrt(2))
                                  - np.sqrt(2 / np.pi) * np.exp(-a * a / 2) + a / (3 * levels),
                                  0.1, 10.0, xtol=1e-15)
        assert abs(res.alpha / ref - 1) <= 1e-6, (bits, res.alpha, ref)
        # Banner's objective is the default; weighting the granular term by
        # P(|x| <= α) lowers α, by less than the clipped mass 1 - P(|x| <= α)
        # that it takes out (relative)
        assert optimal_clip(dist, bits, "aciq").alpha == res.alpha
        variant = optimal_clip(dist, bits, "aciq", granular_mass=True)
        clipped = dist.cdf(-res.alpha) + dist.sf(res.alpha)
        assert 0 <= (res.alpha - variant.alpha) / res.alpha <= clipped


@pytest.mark.parametrize("rounding", [RoundingMode.NEAREST_EVEN, RoundingMode.FLOOR],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("law_name", list(PUBLISHED))
def test_exact_clip_never_worse_than_aciq(law_name, rounding):
    """EXACT minimises the exact MSE, so at its α the exact MSE is at most that
    of ACIQ's α (1e-12 relative for the search's float noise)."""
    dist = PUBLISHED[law_name][0]
    for bits in (2, 4, 8):
        exact = optimal_clip(dist, bits, "exact", rounding)
        assert exact.mse == exact.mse_exact
        for mass in (True, False):
            aciq = optimal_clip(dist, bits, "aciq", rounding, granular_mass=mass)
            assert exact.mse_exact <= aciq.mse_exact * (1 + 1e-12)
            check = error_moments(dist, aciq.spec, aciq.scale).mse
            assert check == aciq.mse_exact


def test_one_sided_clip():
    """Post-ReLU (half-normal) input, unsigned range [0, α]. ACIQ one-sided at M
    bits has step α/2^M and the half-normal's tail equals the normal's two
    tails, so its objective is the symmetric normal one at M+1 bits: same α
    (to the optimiser's 1e-10 relative tolerance; 1e-7 allows for the flat
    minimum). EXACT beats ACIQ in exact MSE, and nothing clamps at 0."""
    half = stats.halfnorm(0.0, 1.0)
    for bits in (3, 6):
        one = optimal_clip(half, bits, "aciq", one_sided=True)
        two = optimal_clip(stats.norm(0.0, 1.0), bits + 1, "aciq")
        assert one.alpha == pytest.approx(two.alpha, rel=1e-7)
        # ACIQ's recommended step is its own, alpha / 2^M (one-sided)
        assert not one.spec.signed and one.scale == one.alpha / one.spec.levels
        exact = optimal_clip(half, bits, "exact", one_sided=True)
        assert exact.one_sided and exact.alpha > 0
        assert exact.mse_exact <= one.mse_exact * (1 + 1e-12)
        em = error_moments(half, exact.spec, exact.scale)
        assert em.p_low == 0.0 and em.mse == exact.mse_exact


def test_clip_method_parsing_and_bad_input():
    assert ClipMethod.parse("EXACT") is ClipMethod.EXACT
    assert ClipMethod.parse(" aciq ") is ClipMethod.ACIQ
    with pytest.raises(ValueError, match="not one of: aciq, exact"):
        optimal_clip(stats.norm(), 4, "percentile")
    with pytest.raises(ValueError, match="infinite variance"):
        optimal_clip(stats.t(2), 4, "aciq")
    with pytest.raises(ValueError, match="no mass above 0"):
        optimal_clip(stats.uniform(-2.0, 1.0), 4, "exact", one_sided=True)
    with pytest.raises(ValueError, match="bits must be an int >= 2, got 1"):
        optimal_clip(stats.norm(), 1, "aciq")


# --------------------------------------------------------------------------- bad input


def test_no_variance_gives_inf_with_warning():
    spec = QuantSpec(bits=8)
    with pytest.warns(InfiniteMomentWarning, match="infinite variance"):
        em = error_moments(stats.t(2), spec, 0.05)
    assert em.mse == em.variance == em.mse_clip == math.inf
    assert math.isfinite(em.bias) and math.isfinite(em.mae) and math.isfinite(em.mse_granular)
    with pytest.warns(InfiniteMomentWarning, match="no mean"):
        em = error_moments(stats.cauchy(), spec, 0.05)
    assert math.isnan(em.bias)
    assert em.mse == em.variance == em.mae == math.inf
    assert 0 < em.p_low < 1 and 0 < em.p_high < 1
    # One heavy tail: the mean error is -inf (clamped at qmax far below x), not nan.
    with pytest.warns(InfiniteMomentWarning, match="one tail"):
        em = error_moments(stats.pareto(0.5), QuantSpec(bits=8, signed=False), 0.05)
    assert em.bias == -math.inf and em.mse == math.inf


@pytest.mark.parametrize("dist,exc,match", [
    (stats.poisson(3), TypeError, "discrete"),
    (stats.norm, TypeError, "freeze it"),
    # told to use scipy.stats.Distribution(loc=0.0, scale=1.0), which does not exist
    (stats.rv_histogram(np.histogram([0.0, 1.0, 1.0, 2.0], bins=2)), TypeError,
     r"unfrozen rv_histogram instance.*dist\(\)"),
    (np.zeros(3), TypeError, "frozen scipy.stats continuous"),
    (stats.norm([0.0, 1.0], 1.0), ValueError, "array-valued"),
    (stats.norm(0.0, -1.0), ValueError, "scale > 0"),
    # narrower than float64 resolves at loc: 0 (generic) came back silently
    (stats.logistic(0.3, 1e-20), ValueError, "narrower than float64"),
])
def test_bad_distribution(dist, exc, match):
    with pytest.raises(exc, match=match):
        error_moments(dist, QuantSpec(), 0.1)


def test_a_point_like_normal_law_keeps_its_closed_form():
    # the normal law's closed forms hold where float64 cannot split loc from loc + scale
    em = error_moments(stats.norm(0.3, 1e-20), QuantSpec(), 1.0)
    assert em.bias == pytest.approx(-0.3) and em.mse == pytest.approx(0.09)


# --------------------------------------------------------------------------- narrow laws

# The accuracy error_moments' docstring claims for the closed-form laws (normal, Laplace,
# uniform): the bias within this fraction of the MAE, the MAE within it relative.
# Measured at worst (60-digit sweep): 4.5e-16 for the bias, 8.5e-16 for the MAE.
CLAIMED = 1e-15


def two_code_reference(law: str, loc: float, scale: float, s: float, z: int,
                       boundary: int | float, lower_code: int, floor: bool = False):
    """Bias and MAE (LSB) of a law whose mass lies on two codes, ``lower_code`` below the
    rounding boundary ``boundary`` of u = x/s + z and ``lower_code + 1`` above it (the code
    above is below u for floor, above it for nearest), from the law's partial means in
    closed form at 30 digits. The law is given as scipy's: normal (loc, σ), Laplace
    (loc, b), uniform on [loc, loc + scale]."""
    with mpmath.workdps(30):
        # the law of u, from the exact values of the float parameters
        c = mpmath.mpf(loc) / mpmath.mpf(s) + z
        w = mpmath.mpf(scale) / mpmath.mpf(s)
        b = mpmath.mpf(boundary)
        if law == "norm":
            beta = (b - c) / w
            p_low = mpmath.ncdf(beta)
            mean_low = c * p_low - w * mpmath.npdf(beta)  # E[u; u < b]
            mean = c
        elif law == "laplace":
            mean = c
            if c > b:
                p_low = mpmath.exp((b - c) / w) / 2
                mean_low = p_low * (b - w)
            else:  # the tail above b: E[u; u > b] = P(u > b) (b + w)
                p_high = mpmath.exp((c - b) / w) / 2
                p_low, mean_low = 1 - p_high, mean - p_high * (b + w)
        else:
            lo, hi = c, (mpmath.mpf(loc) + mpmath.mpf(scale)) / mpmath.mpf(s) + z
            p_low = (b - lo) / (hi - lo)
            mean_low = p_low * (lo + b) / 2
            mean = (lo + hi) / 2
        c0, c1 = mpmath.mpf(lower_code), mpmath.mpf(lower_code + 1)
        p_high, mean_high = 1 - p_low, mean - mean_low
        bias = c0 * p_low + c1 * p_high - mean
        mae = (mean_low - c0 * p_low) + (c1 * p_high - mean_high) * (-1 if floor else 1)
        return bias, mae


def assert_two_code(em, bias, mae):
    assert abs(em.bias_lsb - bias) <= CLAIMED * mae, (em.bias_lsb, bias)
    assert abs(em.mae_lsb - mae) <= CLAIMED * mae, (em.mae_lsb, mae)


@pytest.mark.parametrize("law", ["norm", "laplace"])
@pytest.mark.parametrize("mode", [RoundingMode.NEAREST_EVEN, RoundingMode.FLOOR],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("sd", [1e-4, 1e-6, 1e-10])
def test_a_narrow_law_beside_a_boundary_holds_the_claimed_accuracy(law, mode, sd):
    """A law 1e-4 to 1e-10 of a step wide, its centre 0.7 of its scale above a rounding
    boundary (s = 1, z = 0: μ/s is exact): a piece anchored at its far end had its near end
    formed as α + w, two numbers near 1/(2σ), and lost an ulp of them (the bias was 1e-11 of
    the MAE off at 1e-6, 2e-7 at 1e-10). Against the closed form, within the claim."""
    boundary = 0.5 if mode is RoundingMode.NEAREST_EVEN else 1.0
    loc = boundary + 0.7 * sd
    em = error_moments(getattr(stats, law)(loc, sd), QuantSpec(bits=8, rounding=mode), 1.0)
    assert_two_code(em, *two_code_reference(law, loc, sd, 1.0, 0, boundary, 0,
                                            floor=mode is RoundingMode.FLOOR))


@pytest.mark.parametrize("law", ["norm", "laplace"])
@pytest.mark.parametrize("loc,sd,s,z,boundary,lower_code", [
    # μ = 1/2 + 2**-40 with z = 30000: fl(μ/s + z) = 30000.5, on the boundary (bias 0 came back)
    (0.5 + 2.0**-40, 1e-12, 1.0, 30000, 30000.5, 30000),
    (0.5 + 2.0**-40, 1e-9, 1.0, 30000, 30000.5, 30000),
    # μ/s = 1.4999999999999998612..., rounded to 1.4999999999999998 (-0.49996833 for -0.49724464)
    (0.3, 1e-17, 0.2, 0, 1.5, 1),
    (0.3, 1e-6, 0.2, 0, 1.5, 1),
])
def test_a_narrow_law_is_placed_against_the_grid_exactly(law, loc, sd, s, z, boundary,
                                                          lower_code):
    """The law's centre μ/s + z in steps is not a float64 number (z large, or s not a power
    of two): formed in floating point, its rounding moved a narrow law across or along a
    rounding boundary. Its offset from the grid is exact now: within the claim of the
    closed form taken from the exact values of μ, σ and s."""
    spec = QuantSpec(bits=16, symmetric=z == 0)
    em = error_moments(getattr(stats, law)(loc, sd), spec, s, z)
    assert_two_code(em, *two_code_reference(law, loc, sd, s, z, boundary, lower_code))


@pytest.mark.parametrize("loc,scale,z", [
    (30000.41, 0.2, 0), (0.41, 0.2, 30000),  # 2.8e-12 and 1.5e-12 of the MAE off
    (30000.4999999995, 1e-9, 0),  # 14 % off: the ends were an ulp of 30000 out
    (0.4999999995, 1e-9, 30000),  # bias 0 came back for 1.4e-8
])
def test_a_uniform_law_far_from_zero_keeps_its_ends(loc, scale, z):
    """scipy's uniform law is [loc, loc + scale] exactly; loc + scale and loc/s + z were
    rounded, moving the ends by an ulp of |u|. Against the closed form, within the claim."""
    spec = QuantSpec(bits=16, symmetric=z == 0)
    em = error_moments(stats.uniform(loc, scale), spec, 1.0, z)
    assert_two_code(em, *two_code_reference("uniform", loc, scale, 1.0, z, 30000.5, 30000))


def test_a_uniform_law_narrower_than_an_ulp_of_its_ends_is_exact():
    """uniform(0.3, 1e-20): no float64 lies between its ends (NaN came back, then it was
    refused). At s = 0.1 the whole law is below u = 3 by 2.8e-16 (0.3/0.1 is
    2.99999999999999972...), so nearest gives code 3 and floor code 2."""
    law = stats.uniform(0.3, 1e-20)
    for mode, code in ((RoundingMode.NEAREST_EVEN, 3), (RoundingMode.FLOOR, 2)):
        em = error_moments(law, QuantSpec(rounding=mode), 0.1)
        with mpmath.workdps(30):
            bias = code - (mpmath.mpf(0.3) + mpmath.mpf(1e-20) / 2) / mpmath.mpf(0.1)
        assert abs(em.bias_lsb - bias) <= CLAIMED * abs(bias), mode
        assert abs(em.mae_lsb - abs(bias)) <= CLAIMED * abs(bias), mode


@pytest.mark.parametrize("dist,scale,match", [
    # σ/s underflowed to 0: ZeroDivisionError
    (stats.norm(0.0, 1e-300), 1e300, "below 1e-100"),
    # (w/σ)**3 overflowed: RuntimeWarning, NaN or inf
    (stats.norm(0.3, 1e-110), 1.0, "below 1e-100"),
    (stats.laplace(0.3, 1e-110), 1.0, "below 1e-100"),
    (stats.uniform(0.3, 1e-110), 1.0, "below 1e-100"),
    # the squared error in LSB overflows
    (stats.norm(1e160, 1.0), 1.0, "beyond 1e\\+150"),
    (stats.laplace(-1e160, 1.0), 1.0, "beyond 1e\\+150"),
])
def test_a_closed_form_law_outside_float64s_range_is_refused(dist, scale, match):
    with pytest.raises(ValueError, match=match):
        error_moments(dist, QuantSpec(), scale)


@pytest.mark.parametrize("law", ["norm", "laplace"])
def test_a_narrow_law_far_beyond_the_range_is_clamped_exactly(law):
    """σ = 1e-60 steps, 1e150 steps above the range: everything clamps to qmax, and the
    clamped tail's moments are formed in steps (in standard units t**2 overflowed)."""
    em = error_moments(getattr(stats, law)(1e149, 1e-61), QuantSpec(), 0.1)
    with mpmath.workdps(30):
        bias = 127 - mpmath.mpf(1e149) / mpmath.mpf(0.1)
    assert em.p_high == 1.0 and em.p_low == 0.0
    assert abs(em.bias_lsb - bias) <= CLAIMED * abs(bias)
    assert abs(em.mae_lsb + bias) <= CLAIMED * abs(bias)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"spec": QuantSpec(axis=0)}, ValueError, "per-tensor"),
    # NaN came back
    ({"scale": 1e-320}, ValueError, "subnormal"),
    ({"spec": "int8"}, TypeError, "QuantSpec"),
    ({"scale": 0.0}, ValueError, "positive and finite"),
    ({"scale": -1.0}, ValueError, "positive and finite"),
    ({"scale": math.inf}, ValueError, "positive and finite"),
    ({"scale": math.nan}, ValueError, "positive and finite"),
    ({"scale": [0.1, 0.2]}, ValueError, "one scalar"),
    ({"spec": QuantSpec(symmetric=False), "zero_point": 128}, ValueError, "outside"),
    ({"spec": QuantSpec(symmetric=False), "zero_point": 1.5}, ValueError, "integer"),
    ({"spec": QuantSpec(symmetric=False), "zero_point": True}, TypeError, "integer"),
    ({"zero_point": 3}, ValueError, "symmetric"),
])
def test_bad_spec_scale_zero_point(kwargs, exc, match):
    args = {"spec": QuantSpec(), "scale": 0.1, "zero_point": 0} | kwargs
    with pytest.raises(exc, match=match):
        error_moments(stats.norm(), **args)


# --------------------------------------------------------------------------- mid-rise grid


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_midrise_moments_equal_monte_carlo_of_the_midrise_quantizer(bits):
    """Levels (q + 1/2)s: the exact moments against 2M draws. Two two-sided z-tests per
    width, six in all, each at z = 5 (alpha 5.7e-7 each, 3.4e-6 for the family)."""
    law, s = stats.norm(0.1, 1.0), 4.0 / 2 ** bits
    m = error_moments(law, QuantSpec(bits=bits), s, grid="midrise")
    x = law.rvs(size=2_000_000, random_state=bits)
    half = 2 ** (bits - 1)
    e = (np.clip(np.floor(x / s), -half, half - 1) + 0.5) * s - x
    z = 5.0
    assert abs(m.bias - e.mean()) <= z * e.std(ddof=1) / math.sqrt(e.size)
    assert abs(m.mse - np.mean(e * e)) <= z * np.std(e * e, ddof=1) / math.sqrt(e.size)
    assert m.grid is Grid.MIDRISE


def test_midrise_uniform_law_is_exactly_uniform_noise():
    """A uniform law on the cells' union: every cell holds U(-s/2, s/2) noise, nothing clips."""
    m = error_moments(stats.uniform(-1.0, 2.0), QuantSpec(bits=2), 0.5, grid="midrise")
    assert m.mse == pytest.approx(0.5 ** 2 / 12, rel=1e-14)
    assert m.bias == pytest.approx(0.0, abs=1e-16) and m.p_clip == 0.0


def test_midrise_refuses_a_zero_point():
    with pytest.raises(ValueError, match="mid-rise grid has no zero point"):
        error_moments(stats.norm(), QuantSpec(bits=4, symmetric=False), 0.1, 3, grid="midrise")


@pytest.mark.parametrize("bits, step, mse", [(2, "0.9957", "0.1188"), (3, "0.5860", "0.03744"),
                                             (4, "0.3352", "0.01154")])
def test_exact_midrise_optimum_matches_max_s_uniform_table(bits, step, mse):
    """Max (1960), optimum uniform quantizer of the standard normal law, to his digits:
    within half a unit of each printed value's last digit."""
    def half_unit(text: str) -> float:
        return 0.5 * 10.0 ** -len(text.split(".")[1])

    r = optimal_clip(stats.norm(), bits, "exact", grid="midrise")
    assert abs(r.scale - float(step)) <= half_unit(step)
    assert abs(r.mse_exact - float(mse)) <= half_unit(mse)
    assert r.alpha == pytest.approx(r.scale * 2 ** (bits - 1), rel=1e-15)


@pytest.mark.parametrize("law_name", ["normal", "laplace"])
def test_aciq_on_its_own_grid_never_beats_the_exact_optimum_there(law_name):
    """Like for like: both on the mid-rise grid, by alpha and by exact MSE."""
    dist = stats.norm() if law_name == "normal" else stats.laplace()
    for bits in (2, 3, 4, 8):
        aciq = optimal_clip(dist, bits, "aciq", grid="midrise")
        exact = optimal_clip(dist, bits, "exact", grid="midrise")
        assert aciq.mse_exact == error_moments(dist, aciq.spec, aciq.scale, grid="midrise").mse
        assert exact.mse_exact <= aciq.mse_exact * (1 + 1e-12)


def test_a_density_infinite_at_a_support_end_away_from_zero_gives_finite_moments():
    """The arcsine law (beta ½, ½) on [-1.4, 1.4]: scipy standardises a node one ulp inside
    an end onto the end, where the density is infinite (NaN and inf came back). Its moments
    are finite, and by symmetry floor's bias is exactly -1/2 (E[frac u] = 1/2 for a law
    symmetric about a grid point, nothing clipped); the end is resolved to about 1e-8
    (the docstring's accuracy there)."""
    law = stats.beta(0.5, 0.5, loc=-1.4, scale=2.8)
    for mode in RoundingMode:
        m = error_moments(law, QuantSpec(bits=4, rounding=mode), 0.25)
        assert all(math.isfinite(v) for v in (m.bias, m.mse, m.mae)), mode
    floor = error_moments(law, QuantSpec(bits=4, rounding=RoundingMode.FLOOR), 0.25)
    assert abs(floor.bias_lsb + 0.5) < 1e-7


def _t3_cdf(t):
    """Student t(3)'s CDF in closed form (mpmath)."""
    return mpmath.mpf(1) / 2 + (t / (mpmath.sqrt(3) * (1 + t * t / 3))
                                + mpmath.atan(t / mpmath.sqrt(3))) / mpmath.pi


def _exact_bias(cdf, loc, width, mode, qmin=-128, qmax=127):
    """E[q(u)] - loc at step 1 for the law ``cdf((u - loc) / width)``, clamping included:
    the sum over codes of the code times its cell's mass (50 digits)."""
    with mpmath.workdps(50):
        loc, width = mpmath.mpf(loc), mpmath.mpf(width)
        low = {"floor": 0, "ceil": -1, "nearest_even": mpmath.mpf(-0.5)}[mode]
        total = mpmath.mpf(0)
        for k in range(qmin, qmax + 1):
            below = 0 if k == qmin else cdf((k + low - loc) / width)
            above = 1 if k == qmax else cdf((k + low + 1 - loc) / width)
            total += k * (above - below)
        return total - loc


def test_a_generic_law_too_narrow_for_its_quadrature_is_refused():
    """Far narrower than a step, the generic quadrature's panels (measured from grid points)
    lost the law: floor's bias on Student t(3) at 1e-13 of a step was 3e-7 off, at 1e-20 of
    it -1020 instead of -1/2. A law centred on a grid point hid how soon it starts: off the
    grid points, floor's bias at 1e-8 of a step was 1.5e-10 off (t(3)), 1.4e-12 at 1e-6,
    against a stated 1e-13. Below 1e-4 of a step it is refused; from 1e-4 on it holds, here
    against the exact bias from t(3)'s and the logistic's closed-form CDFs."""
    logistic = (lambda t: 1 / (1 + mpmath.exp(-t)))
    centres = (0.137, 0.382, 0.618, 0.863)  # not 0.5: nearest's bias there is 0
    for cdf, law in ((_t3_cdf, lambda c, w: stats.t(3, c, w)),
                     (logistic, lambda c, w: stats.logistic(c, w))):
        for width in (1e-4, 1e-3):
            for centre in centres:
                for mode in ("floor", "ceil", "nearest_even"):
                    got = error_moments(law(centre, width), QuantSpec(bits=8, rounding=mode),
                                        1.0).bias_lsb
                    exact = _exact_bias(cdf, centre, width, mode)
                    assert abs(float((got - exact) / exact)) < 1e-13, (width, centre, mode)
    spec = QuantSpec(bits=8, rounding=RoundingMode.FLOOR)
    for sd in (9.9e-5, 1e-8, 1e-20):
        with pytest.raises(ValueError, match="below 0.0001 of the step"):
            error_moments(stats.t(3, 0.0, sd), spec, 1.0)
    assert error_moments(stats.norm(0.0, 1e-20), spec, 1.0).bias_lsb == -0.5  # closed form


@pytest.mark.parametrize("flag", ["one_sided", "granular_mass"])
@pytest.mark.parametrize("value", ["False", "yes", 1, 0, None])
def test_optimal_clip_refuses_a_flag_that_is_not_a_bool(flag, value):
    """one_sided="False" was read as true: the one-sided (unsigned) clip of the whole law
    came back without a word; granular_mass=1 was taken for True."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        optimal_clip(stats.norm(), 4, "aciq", **{flag: value})
    assert optimal_clip(stats.norm(), 4, "aciq", **{flag: np.bool_(False)}) == optimal_clip(
        stats.norm(), 4, "aciq")


def test_optimal_clip_takes_numpy_integer_bits():
    """np.int8(8) bits overflowed 2**bits in int8: ACIQ returned scale and MSE inf."""
    want = optimal_clip(stats.norm(), 8, "aciq")
    for bits in (np.int8(8), np.int64(8)):
        got = optimal_clip(stats.norm(), bits, "aciq")
        assert (got.alpha, got.scale, got.mse) == (want.alpha, want.scale, want.mse)


def test_truncation_on_the_midrise_grid_truncates_the_shifted_code():
    """On a mid-rise grid the mode acts on x/s - 1/2: truncation toward zero sends the whole
    cell (-s/2, 3s/2) to the level s/2, so N(0, 1)'s error has a positive bias (Grid's
    docstring: about +0.105 at its 2-bit optimum), which a simulation of that quantizer
    reproduces within 4 standard errors (a two-sided level of about 6e-5)."""
    dist = stats.norm(0.0, 1.0)
    r = optimal_clip(dist, 2, "exact", "toward_zero", grid="midrise")
    bias = error_moments(dist, r.spec, r.scale, grid="midrise").bias
    assert 0.1 < bias < 0.11
    x = np.random.default_rng(5).standard_normal(400_000)
    code = np.clip(np.trunc(x / r.scale - 0.5), r.spec.qmin, r.spec.qmax)
    err = (code + 0.5) * r.scale - x
    assert abs(err.mean() - bias) <= 4 * err.std(ddof=1) / math.sqrt(err.size)


def test_a_law_whose_variance_barely_exists_keeps_its_tail():
    """scipy's Student t logpdf forms x*x and is -inf beyond |x| ~ 1e154, where the far-tail
    quadrature stopped: t(2.001) lost 70% of its MSE (590.6 for 1996.7 at 4 bits, step 0.5,
    against 30-digit mpmath), t(2.01) 3%. On a step of 1e-6 and 2 bits every level lies
    within 2e-6 of 0, so MSE = E[x²] - 2E[x x̂] + E[x̂²] is within
    4e-6 sqrt(E[x²]) + 4e-12 (Cauchy-Schwarz) of E[x²] = df/(df - 2)."""
    s = 1e-6
    for df in (2.01, 2.001):
        var = df / (df - 2.0)
        m = error_moments(stats.t(df), QuantSpec(bits=2), s)
        bound = 2 * (2 * s) * math.sqrt(var) + (2 * s) ** 2 + 1e-13 * var
        assert abs(m.mse - var) <= bound, (df, m.mse, var)


@pytest.mark.parametrize("tiny", [1e-30, 1e-100, 1e-250])
def test_a_generic_law_on_a_tiny_step_is_the_same_law_in_lsb(tiny):
    """The far tail formed v = v_last e^y, which overflows on a tiny step (leaking numpy
    RuntimeWarnings at 1e-30) and raised 'Maximum allowed size exceeded' at 1e-100. Scaling
    law and step together leaves every LSB moment unchanged (bias: within 1e-16 of the MAE,
    the engine's stated accuracy; the rest: 1e-13 relative)."""
    spec = QuantSpec(bits=8)
    want = error_moments(stats.t(5), spec, 1.0)
    got = error_moments(stats.t(5, scale=tiny), spec, tiny)
    assert abs(got.bias_lsb - want.bias_lsb) <= 1e-16 * want.mae_lsb
    for k in ("mse_lsb", "mae_lsb", "p_low", "p_high"):
        assert getattr(got, k) == pytest.approx(getattr(want, k), rel=1e-13, abs=0), k


def _histogram_law():
    counts, edges = np.histogram(np.random.default_rng(0).normal(size=2000), bins=12)
    dens = counts / counts.sum() / np.diff(edges)

    def pdf(x):
        i = np.searchsorted(edges, x, side="right") - 1
        return float(dens[i]) if 0 <= i < dens.size else 0.0

    return stats.rv_histogram((counts, edges), density=False)(), pdf, tuple(edges)


def _triang_law():
    c, loc = 0.3, -0.21

    def pdf(x):
        t = x - loc
        return 0.0 if not 0.0 <= t <= 1.0 else (2 * t / c if t < c else 2 * (1 - t) / (1 - c))

    return stats.triang(c, loc), pdf, (loc, loc + c, loc + 1.0)


@pytest.mark.parametrize("make", [_histogram_law, _triang_law], ids=["rv_histogram", "triang"])
@pytest.mark.parametrize("s", [0.05, 0.3, 2.0])
@pytest.mark.parametrize("mode", [RoundingMode.NEAREST_EVEN, RoundingMode.FLOOR,
                                  RoundingMode.STOCHASTIC], ids=lambda m: m.value)
def test_a_density_kink_inside_the_support_is_a_panel_end(make, s, mode):
    """A histogram's jumps and triang's mode fell inside Gauss-Legendre panels: a 12-bin
    rv_histogram of N(0, 1) came back with MSE 3e-4 and bias 0.48 relative off (step 0.05),
    triang(0.3) with bias 1e-6 off (/work/runs/s40/analytic/probe_kinks.py, 30-digit mpmath).
    Against scipy.quad with those points as breakpoints (1e-13 per piece), as
    test_matches_quadrature: 1e-10."""
    dist, pdf, points = make()
    spec = QuantSpec(bits=4, rounding=mode)
    em = error_moments(dist, spec, s)
    ref = reference(lambda u: s * pdf(s * u), mode, spec.qmin, spec.qmax,
                    tuple(p / s for p in points), scipy_integral)
    assert_matches(engine_lsb(em), ref, 1e-10)


def test_a_generic_law_of_huge_scale_has_a_finite_variance():
    """scipy's variance of t(5) at scale 1e160 overflows (5/3 1e320): the engine took it for
    an infinite variance, warned and returned mse_lsb inf. In LSB the law on a step of its
    own scale is t(5) on a step of 1 (1e-13 relative, the engine's generic accuracy)."""
    want = error_moments(stats.t(5), QuantSpec(bits=8), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InfiniteMomentWarning)
        got = error_moments(stats.t(5, scale=1e160), QuantSpec(bits=8), 1e160)
    assert got.mse_lsb == pytest.approx(want.mse_lsb, rel=1e-13, abs=0)


@pytest.mark.parametrize("method", ["exact", "aciq"])
@pytest.mark.parametrize("k", [-560, 600])
def test_optimal_clip_of_a_law_scaled_by_a_power_of_two(method, k):
    """Scaling a law by 2**k scales its optimal clip by 2**k, exactly (every step of the
    search is exact under it). Beyond 1e±154 the MSEs over- or underflowed: at 1e160 every
    candidate's MSE was inf and the first grid point came back (α = 9e-5 σ for 2.37 σ),
    at 1e-160 subnormal MSEs moved α by 2.4% (probe_clip_scale.py)."""
    for law, scaled in ((stats.norm(0.3, 1.0), stats.norm(0.3 * 2.0**k, 2.0**k)),
                        (stats.t(5, 0.0, 0.7), stats.t(5, 0.0, 0.7 * 2.0**k))):
        want, got = optimal_clip(law, 4, method), optimal_clip(scaled, 4, method)
        assert (got.alpha, got.scale) == (want.alpha * 2.0**k, want.scale * 2.0**k)


# The exact optimum at 2 bits of Student t laws of finite variance whose 1e-15 quantile lies
# 1e5 to 1e6 scales out: 30-digit mpmath, the tails integrated in x = a e^y
# (/work/runs/s52/clip/ref_t_optima.py).
HEAVY_OPTIMA = {(2.5, "integer"): (2.7634385227652, 2.467759287080498),
                (2.5, "midrise"): (4.4431352333025, 2.477332570363225),
                (3.0, "integer"): (2.0608749696384, 1.050129993116759),
                (3.0, "midrise"): (3.7482204527924, 1.014778443981583)}


@pytest.mark.parametrize("df, grid", list(HEAVY_OPTIMA))
def test_exact_clip_of_a_heavy_tailed_law_is_found_not_refused(df, grid):
    """EXACT's search ran up to the law's 1e-15 quantile, where a step is more than 1e4
    scales and the quadrature refuses the law: t(3) and t(2.5) at 2 bits were refused
    ("dist's scale 0.5 is below 0.0001 of the step", a scale the caller never passed).
    With the quadrature's floor at 1e-8 of a step they were not, but the search's five
    decades began above the optimum: t(2.5) gave α 8.765 at MSE 3.084 for 2.763 at 2.468.
    The MSE to 1e-13, α to 1e-7 (the minimum is flat: the MSE moves by ~1e-16 there)."""
    alpha, mse = HEAVY_OPTIMA[df, grid]
    r = optimal_clip(stats.t(df), 2, "exact", grid=grid)
    assert r.alpha == pytest.approx(alpha, rel=1e-7)
    assert r.mse_exact == pytest.approx(mse, rel=1e-13)


def test_exact_clip_refuses_an_optimum_beyond_the_quadrature():
    """Centred 1e6 scales from zero, the law needs steps the quadrature cannot resolve it
    against: EXACT says so, rather than returning the coarsest step it could evaluate."""
    with pytest.raises(ValueError, match="optimum lies beyond what EXACT can evaluate"):
        optimal_clip(stats.t(5, 1e6, 1.0), 4, "exact")


@pytest.mark.parametrize("above, below, match", [
    (1.2, 0.0, "p_above holds 1 value"), (-0.1, 0.5, "p_above holds 1 value"),
    (0.5, math.nan, "p_below holds 1 value"), ([0.2, 0.9], [0.1, 0.5], "above 1")])
def test_uniform_bias_lsb_refuses_what_is_no_pair_of_probabilities(above, below, match):
    """P(u > 0) = 0.9 and P(u < 0) = 0.5 gave floor's bias -0.7, beyond the mode's -1/2;
    1.2, -0.1 and NaN came back as numbers (or NaN) too."""
    with pytest.raises(ValueError, match=match):
        uniform_bias_lsb("floor", above, below)
    assert uniform_bias_lsb("floor", 0.7, 0.3) == -0.5
    assert uniform_bias_lsb("toward_zero", 0.7, 0.2 + 0.1) == pytest.approx(-0.2, abs=1e-15)
