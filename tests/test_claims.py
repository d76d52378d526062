"""The claims ledger: one test per claim of the research notes, asserting its verdict."""

import ast
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from qerror import (
    QParams,
    QuantSpec,
    RoundingMode,
    apply_rounding,
    bias_test,
    calibrate,
    dequantize,
    fake_quantize,
    mse_ratio_ci,
    qparams_from_range,
    quantize,
)
from qerror.analytic import error_moments
from studies.ledger import CLAIMS, Verdict, claim


def test_every_claim_has_its_deciding_test_here():
    tree = ast.parse(Path(__file__).read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    deciding = {c.test for c in CLAIMS}
    assert deciding <= defined, deciding - defined
    claim_tests = {name for name in defined if name.startswith("test_claim_")}
    assert claim_tests == deciding, claim_tests ^ deciding
    assert len({c.id for c in CLAIMS}) == len(CLAIMS)


def test_claim_R1_torch_round_is_half_to_even():
    assert claim("R1").verdict is Verdict.FALSE
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5])
    assert torch.round(ties).tolist() == [0, 2, 2, 4, -0.0, -2, -2]
    away = apply_rounding(ties, RoundingMode.NEAREST_AWAY)
    assert not torch.equal(torch.round(ties), away)
    # The notes' example cannot tell the two rules apart.
    assert torch.round(torch.tensor(-1.5)) == away[5] == -2


def test_claim_R2_round_to_nearest():
    assert claim("R2").verdict is Verdict.TRUE
    assert torch.round(torch.tensor([2.3, 2.7, -2.3, -2.7])).tolist() == [2, 3, -2, -3]
    # "for every value that is not a tie": on a million float32 values of both signs and
    # every fraction, torch.round gives an integer less than half away, the nearest one
    # (r - x is exact: both lie within one of each other, on x's grid)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.empty(500_000).uniform_(-4, 4, generator=g),
                   torch.empty(500_000).uniform_(-2.0 ** 22, 2.0 ** 22, generator=g)])
    x = x[x - torch.floor(x) != 0.5]
    r = torch.round(x)
    assert torch.equal(r, torch.trunc(r)) and bool(((r - x).abs() < 0.5).all())


def _notes_quantizer(tensor, scale, zero_point, dtype=torch.int8):
    """The notes' linear_q_with_scale_and_zero_point, verbatim in behaviour."""
    scaled_and_shifted = tensor / scale + zero_point
    rounded = torch.round(scaled_and_shifted)
    info = torch.iinfo(dtype)
    return rounded.clamp(info.min, info.max).to(dtype)


def test_claim_R3_rounding_error_bound_needs_no_clipping():
    assert claim("R3").verdict is Verdict.CONDITIONAL
    scale = 0.05
    x = torch.linspace(-8, 8, 20001)
    q = _notes_quantizer(x, scale, 0)
    e = (q.double() - x.double() / scale)  # the notes' e = q - x, in LSB
    inside = (x / scale).abs() <= 127
    # float32 x/s, the bound holds to its rounding: the divisor fl32(s) (relative error
    # |fl32(s) - s|/s) and the quotient (half a float32 ulp), for |x/s| below 128
    tol = (128 * abs(float(np.float32(scale)) - scale) / scale
           + float(np.spacing(np.float32(127))) / 2)
    assert e[inside].abs().max() <= 0.5 + tol
    assert e[~inside].abs().max() > 30  # clamped values: far outside [-0.5, 0.5]
    # qerror's quantizer agrees with the notes' inside the range (scale is a power of two
    # times an odd number here, so the tie handling is the only possible difference).
    ours = quantize(x, QuantSpec(bits=8), scale)
    assert torch.equal(ours.to(torch.int8), q)  # and on these values it does not differ


def test_claim_T1_trunc_drops_the_fraction():
    assert claim("T1").verdict is Verdict.TRUE
    assert torch.trunc(torch.tensor([2.9, -2.9])).tolist() == [2, -2]
    assert apply_rounding(np.array([2.9, -2.9]), RoundingMode.TOWARD_ZERO).tolist() == [2, -2]
    # "torch.trunc and numpy.trunc round toward zero", on values of both signs and every
    # fraction: each is sign(x) floor(|x|), the integer part with the fraction dropped
    x = np.random.default_rng(2).uniform(-1000, 1000, 1_000_000)
    toward_zero = np.sign(x) * np.floor(np.abs(x))
    np.testing.assert_array_equal(np.trunc(x), toward_zero)
    np.testing.assert_array_equal(torch.trunc(torch.from_numpy(x)).numpy(), toward_zero)
    np.testing.assert_array_equal(apply_rounding(x, RoundingMode.TOWARD_ZERO), toward_zero)


def test_claim_T2_int_cast_truncates_in_range():
    assert claim("T2").verdict is Verdict.CONDITIONAL
    x = torch.linspace(-1000.5, 1000.5, 40001)
    assert torch.equal(x.to(torch.int32).float(), torch.trunc(x))
    # ... and across the whole int32 range, to its ends (float64 holds their fractions)
    lo, hi = -(2.0 ** 31), 2.0 ** 31
    wide = torch.cat([torch.tensor([lo + 0.5, hi - 1.5, hi - 0.25, -1e9 - 0.7, 1e9 + 0.7],
                                   dtype=torch.float64),
                      torch.empty(100_000, dtype=torch.float64).uniform_(
                          lo, hi, generator=torch.Generator().manual_seed(3))])
    assert torch.equal(wide.to(torch.int32).double(), torch.trunc(wide))
    # Out of int32 range the cast has no defined value; truncation then clamping does.
    big = torch.tensor([3e9, -3e9])
    spec = QuantSpec(bits=16, rounding=RoundingMode.TOWARD_ZERO)
    assert quantize(big, spec, 1.0).tolist() == [spec.qmax, spec.qmin]


def test_claim_T3_truncation_error_sign_follows_u():
    assert claim("T3").verdict is Verdict.CONDITIONAL
    spec = QuantSpec(bits=8, symmetric=False, rounding=RoundingMode.TOWARD_ZERO)
    scale = 0.1
    x = np.linspace(-3, 3, 6001)
    for z in (0, -20, 20):
        q = quantize(x, spec, scale, z)
        u = x / scale + z
        e = (q - z) - (x / scale)  # error in LSB: R(u) - u
        granular = (q > spec.qmin) & (q < spec.qmax)
        pos, neg = granular & (u > 0.5), granular & (u < -0.5)
        # the quantizer's codes are R of the exact u (ScaleArithmetic.EXACT; a value equal
        # to a stored level fl(k s) gets code k, half an ulp of k from its x/s), while x/s
        # here is float64's, half an ulp off: one ulp of |x/s| <= 30 in all
        tol = np.spacing(np.abs(x / scale).max())
        assert np.all((e[pos] > -1 - tol) & (e[pos] <= tol))
        assert np.all((e[neg] >= -tol) & (e[neg] < 1 + tol))
        assert e[pos].mean() < -0.4 and e[neg].mean() > 0.4
    # With z = -20, x = 1.0 is positive but u = -10 + ... < 0: it is rounded *up*.
    q = quantize(np.array([1.05]), spec, scale, -20)
    assert dequantize(q, scale, -20, dtype=np.float64)[0] > 1.05


def test_claim_T4_truncation_pulls_toward_minus_z_s():
    assert claim("T4").verdict is Verdict.CONDITIONAL
    rng = np.random.default_rng(0)
    w = rng.standard_normal(100_000) * 0.5
    sym = QuantSpec(bits=8, rounding=RoundingMode.TOWARD_ZERO)
    w_sym = dequantize(quantize(w, sym, 0.01), 0.01, dtype=np.float64)
    assert np.all(np.abs(w_sym) <= np.abs(w))  # symmetric: always toward zero
    aff = sym.replace(symmetric=False)
    z, scale = -50, 0.01  # u = 0 at the real value -z*s = 0.5
    w_aff = dequantize(quantize(w, aff, scale, z), scale, z, dtype=np.float64)
    granular = np.abs(w / scale + z) < 127
    toward_attractor = np.abs(w_aff - 0.5) <= np.abs(w - 0.5) + 1e-12
    assert np.all(toward_attractor[granular])
    between = granular & (w > 0.02) & (w < 0.48)
    assert np.all(np.abs(w_aff[between]) >= np.abs(w[between]))  # away from zero
    assert np.mean(np.abs(w_aff[between]) > np.abs(w[between])) > 0.99


# ------------------------------------------------------------------ statistics of the error
# Each claim is decided by the exact engine (no sampling) and confirmed by a Monte-Carlo
# test at a stated level; both must agree with the verdict. ALPHA is the family-wise level of
# each test that uses it, Bonferroni over its sampled comparisons (each at ALPHA / m); a
# sample mean is held to the exact value within z_{1-α/2} standard errors, the standard
# error exact (from the engine's variance) where the engine gives it.

ALPHA = 1e-3


def _within_se(sample, exact, var, alpha):
    """Two-sided z-test of a sample mean against its exact value at level ``alpha``: the
    tolerance is z_{1-alpha/2} sqrt(var / n), for ``var`` one draw's exact variance."""
    tol = sps.norm.isf(alpha / 2) * math.sqrt(var / sample.size)
    assert abs(sample.mean() - exact) <= tol, (sample.mean(), exact, tol)


def test_claim_R4_rounding_bias_needs_a_wide_input():
    assert claim("R4").verdict is Verdict.CONDITIONAL
    s = 0.1
    spec = QuantSpec(bits=8)
    narrow = sps.norm(0.3 * s, 0.1 * s)
    wide = sps.norm(0.3 * s, 3.0 * s)
    exact_narrow = error_moments(narrow, spec, s)
    exact_wide = error_moments(wide, spec, s)
    assert exact_narrow.bias_lsb < -0.25  # rounds to 0: about -0.3 LSB
    # |bias| <= e^(-2π²σ²)/π with σ = 3 LSB: about 1e-77; what is left is the rounding of
    # the sum over the grid's 256 cells, each term under one LSB
    assert abs(exact_wide.bias_lsb) < 256 * np.finfo(float).eps
    # Two sampled comparisons, each at ALPHA / 2: the narrow law's bias is not 0 (t-test),
    # the wide law's sample mean is its exact bias (about 0) within z standard errors (the
    # exact one: 0.00065 LSB at 200,000 draws), not within a margin picked beforehand
    rng = np.random.default_rng(0)
    for law, exact in ((narrow, exact_narrow), (wide, exact_wide)):
        x = law.rvs(size=200_000, random_state=rng)
        e = (fake_quantize(x, spec, s) - x) / s
        if exact is exact_narrow:
            assert bias_test(e, alpha=ALPHA / 2).p_value < ALPHA / 2
        else:
            _within_se(e, exact.bias_lsb, exact.mse_lsb - exact.bias_lsb ** 2, ALPHA / 2)
    # The condition, made exact: over the law's mean μ (in steps) the exact bias of a normal
    # law stays within the Fourier bound (1/π) Σ_k e^(−2π²k²σ²)/k, reaches 99% of its
    # leading term, and is 0 with μ on a grid point or a half-integer.
    spec = QuantSpec(bits=16)
    for sigma in (0.5, 0.75, 1.0):
        bound = sum(math.exp(-2 * math.pi ** 2 * k * k * sigma ** 2) / (math.pi * k)
                    for k in range(1, 20))
        lead = math.exp(-2 * math.pi ** 2 * sigma ** 2) / math.pi
        # the engine's bias is accurate to about 1e-15 of the MAE in absolute terms
        moments = [error_moments(sps.norm(mu, sigma), spec, 1.0)
                   for mu in np.linspace(0, 1, 41)]
        tol = 1e-15 * max(m.mae_lsb for m in moments)
        assert max(abs(m.bias_lsb) for m in moments) <= bound + tol, sigma
        assert max(abs(m.bias_lsb) for m in moments) >= 0.99 * lead, sigma
        for mu in (0.0, 0.5, 3.0, 3.5):
            assert abs(error_moments(sps.norm(mu, sigma), spec, 1.0).bias_lsb) <= tol
        # "whose first term is all but 2e-7 of it from σ = 1/2 on"
        assert (bound - lead) / bound < 2e-7
        # and the row's figures of it: "0.0023 LSB at σ = 1/2, 8.5e-10 at σ = 1"
        quoted = {0.5: "0.0023 LSB at σ = 1/2", 1.0: "8.5e-10 at σ = 1"}
        if sigma in quoted:
            assert f"{bound:.2g}" == quoted[sigma].split()[0], (sigma, bound)
            assert quoted[sigma] in claim("R4").condition
    # Granular error only: clipping breaks symmetry (the signed range [-128, 127] is not
    # symmetric about 0), so a wide law centred on a grid point that reaches it is biased,
    # by far more than the engine's accuracy.
    clipped = error_moments(sps.norm(0.0, 100.0), QuantSpec(bits=8), 1.0)
    assert clipped.p_low + clipped.p_high > 0.1 and clipped.bias_lsb < -0.05


def test_claim_R5_nearest_is_pointwise_closest():
    assert claim("R5").verdict is Verdict.TRUE
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(50_000) * 3, rng.uniform(-200, 200, 50_000)])
    spec = QuantSpec(bits=8, symmetric=False)
    s, z = 0.37, 11
    nearest = np.abs(fake_quantize(x, spec, s, z) - x)
    for mode in RoundingMode:
        other = np.abs(fake_quantize(x, spec.replace(rounding=mode), s, z, generator=2) - x)
        assert np.all(nearest <= other + 1e-12 * np.abs(x))


def _updown_losses(cov: np.ndarray, w: np.ndarray, bits: int, grad=None):
    """Loss gᵀΔw + Δwᵀ Σ Δw of every up/down choice of the weights w on the symmetric grid
    of ``bits`` (scale max|w|/qmax), and the choice of nearest; with g = 0 a linear layer's
    output error E[(Δw·x)²] for inputs of second moment Σ, exactly quadratic (H = 2Σ)."""
    import itertools

    spec = QuantSpec(bits=bits)
    s = np.abs(w).max() / spec.qmax
    floor = np.floor(w / s)
    choices = np.array(list(itertools.product([0.0, 1.0], repeat=w.size)))
    dw = s * np.clip(floor + choices, spec.qmin, spec.qmax) - w
    losses = np.einsum("ki,ij,kj->k", dw, cov, dw)
    if grad is not None:
        losses = losses + dw @ grad
    nearest = quantize(w, spec, s) - floor  # 0 = down, 1 = up
    return losses, int(np.flatnonzero((choices == nearest).all(1))[0])


def test_claim_R5N_nearest_minimises_the_loss_only_when_it_is_separable():
    """Exact: exhaustive search over the 2^8 up/down choices of 8 weights for a quadratic
    loss; seeded: stochastic roundings of a small network's first layer against nearest."""
    assert claim("R5N").verdict is Verdict.FALSE
    rng = np.random.default_rng(16)
    w = rng.standard_normal(8)
    # Separable (diagonal Σ, any variances): Σᵢ Σᵢᵢ Δwᵢ² is minimised term by term, so
    # nearest is the optimum (exactly: the same codes give the same float64 sum).
    diag = np.diag(rng.uniform(0.1, 10.0, 8))
    losses, near = _updown_losses(diag, w, 3)
    assert losses[near] == losses.min()
    # Separable but with a gradient (weights away from the minimum): weight i's term
    # Σᵢᵢ Δ² + gᵢ Δ (H = 2Σ) prefers up to down exactly when its fractional part r (in steps s)
    # exceeds ½ + gᵢ/(Hᵢᵢ s), so the gradient moves the threshold off the midpoint and the
    # weights whose r lies between the two are best rounded the other way: g = 0 is part of
    # the condition.
    grad = rng.standard_normal(8) * 2.0
    losses, near = _updown_losses(diag, w, 3, grad=grad)
    assert losses.min() < losses[near] - 1e-6 * np.abs(losses).max()
    spec = QuantSpec(bits=3)
    s = np.abs(w).max() / spec.qmax
    r = w / s - np.floor(w / s)
    h = 2 * np.diag(diag)
    # the helper's order of choices (itertools.product): the last weight varies fastest
    choices = np.array(list(np.ndindex(*(2,) * 8)))
    best = choices[np.argmin(losses)]
    # the largest weight sits on qmax: its up is clamped back onto its down, one code
    one_code = np.floor(w / s) + 1 > spec.qmax
    assert one_code.sum() == 1
    threshold = 0.5 + grad / (h * s)
    assert np.array_equal(best[~one_code], (r > threshold)[~one_code])
    moved = (best != (r > 0.5)) & ~one_code
    assert moved.any()
    assert np.array_equal(moved, ~one_code & (np.minimum(threshold, 0.5) < r)
                          & (r < np.maximum(threshold, 0.5)))
    # ... and the threshold is exactly there: each weight whose threshold lies inside its
    # step, moved to a millionth of a step below it and then above it (the grid unchanged),
    # is rounded down and then up.
    inside = ~one_code & (threshold > 1e-3) & (threshold < 1 - 1e-3)
    assert inside.sum() >= 4
    for side in (-1e-6, 1e-6):
        w_side = np.where(inside, s * (np.floor(w / s) + threshold + side), w)
        losses, _ = _updown_losses(diag, w_side, 3, grad=grad)
        assert np.all(choices[np.argmin(losses)][inside] == (side > 0)), side
    # Correlated inputs: the same weights have a choice with a lower loss than nearest, by
    # far more than float64 rounding of these sums (relative 1e-12).
    a = rng.standard_normal((8, 8))
    losses, near = _updown_losses(a @ a.T + 0.1 * np.eye(8), w, 3)
    assert losses.min() < losses[near] * (1 - 1e-6)
    # A network (cross-entropy, every layer float but the first): seeded stochastic
    # roundings of the first conv at 4 bits, some of which have a lower loss than nearest.
    from qerror.nn import updown_experiment
    from tests.qerror.nn.nets import images, tiny_resnet

    model = tiny_resnet()
    x = images(64, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = updown_experiment(model, "0", [(x, y)], 4, roundings=20, seed=0, taylor=False)
    # "often": the share that beats nearest, its Wilson interval above a quarter
    assert res.beat.ci[0] > 0.25, res.beat
    assert res.nearest_weight_mse_lsb <= res.weight_mse_lsb.min()  # yet nearest is closest
    # Its gradient is not 0, and matters: for nearest's rounding of the layer, the loss's
    # first-order term gᵀΔw is larger than its second-order one ½ΔwᵀHΔw (exact
    # Hessian-vector product): in that expansion nearest's loss is mostly the gradient's.
    import torch.nn.functional as F

    params = {k: v.detach() for k, v in model.named_parameters()}
    w0 = params["0.weight"].clone().requires_grad_(True)
    logits = torch.func.functional_call(model, {**params, "0.weight": w0}, (x,))
    g, = torch.autograd.grad(F.cross_entropy(logits, y), w0, create_graph=True)
    spec = QuantSpec(bits=4, axis=0)  # updown_experiment's grid: per channel, max|w|/qmax
    dw = fake_quantize(w0.detach(), spec, calibrate(w0.detach(), spec).scale) - w0.detach()
    first = (g * dw).sum()
    hv, = torch.autograd.grad(first, w0)
    first, second = float(first.detach()), float((hv * dw).sum()) / 2
    assert first > abs(second) > 0, (first, second)


def test_claim_T5_truncation_bias_needs_one_signed_data():
    assert claim("T5").verdict is Verdict.CONDITIONAL
    s = 0.1
    trunc = QuantSpec(bits=8, rounding=RoundingMode.TOWARD_ZERO)
    symmetric = error_moments(sps.norm(0, 1), trunc, s)
    one_signed = error_moments(sps.halfnorm(0, 1), trunc.replace(signed=False), s)
    assert abs(symmetric.bias_lsb) < 256 * np.finfo(float).eps  # as R4's: rounding alone
    assert -0.5 <= one_signed.bias_lsb < -0.45
    # ... on a grid with zero point 0 only: the same one-signed law on a signed affine grid
    # calibrated min-max (zero point -128) is truncated on u = x/s - 128, negative for most
    # values, which move up (T3): the bias changes sign, exactly, so the text names the
    # zero point
    aff = trunc.replace(symmetric=False)
    qp = qparams_from_range(0.0, float(sps.halfnorm.ppf(1 - 1e-4)), aff)
    assert int(qp.zero_point) == aff.qmin
    assert error_moments(sps.halfnorm(0, 1), aff, float(qp.scale), int(qp.zero_point)
                         ).bias_lsb > 0
    assert "zero point 0 (unsigned), the bias is about -1/2" in claim("T5").condition
    assert "the bias is positive" in claim("T5").condition
    # "wide against the step": the same law 0.05 steps wide is truncated to 0 almost whole,
    # an error of -x, whose mean is far from -1/2
    assert error_moments(sps.halfnorm(0, 1), trunc.replace(signed=False), 20.0).bias_lsb > -0.1
    # about -1/2: floor's -1/2 plus the kink at 0, Euler-Maclaurin's f(0)/12 - f''(0)/720
    # for the density f of u = x/s (half-normal, sd 10 steps), the next term's twice bound
    f0, f2, f4 = (2 * sps.norm.pdf(0) / 10 * c / 10 ** k for c, k in ((1, 0), (-1, 2), (3, 4)))
    assert abs(one_signed.bias_lsb - (-1 / 2 + f0 / 12 - f2 / 720)) <= 2 * abs(f4) / 30240
    # The samples: seven comparisons, each at ALPHA / 7 (Bonferroni); each sample mean is
    # held to its exact bias within z standard errors (exact: the engine's variance).
    a = ALPHA / 7
    var_sym = symmetric.mse_lsb - symmetric.bias_lsb ** 2
    var_one = one_signed.mse_lsb - one_signed.bias_lsb ** 2
    rng = np.random.default_rng(3)
    x = rng.standard_normal(200_000)
    e = (fake_quantize(x, trunc, s) - x) / s
    _within_se(e, symmetric.bias_lsb, var_sym, a)  # about 0: within 0.005 LSB
    # ... and yet each sign is biased by about half a step toward zero: either half of the
    # normal is the half-normal (mirrored for x < 0), whose exact bias is one_signed's
    assert bias_test(e[x > 0], mu0=0.0, alpha=a).p_value < a
    _within_se(e[x > 0], one_signed.bias_lsb, var_one, a)
    _within_se(e[x < 0], -one_signed.bias_lsb, var_one, a)
    xr = np.abs(x)
    er = (fake_quantize(xr, trunc.replace(signed=False), s) - xr) / s
    assert bias_test(er, alpha=a).p_value < a
    _within_se(er, one_signed.bias_lsb, var_one, a)
    # A post-ReLU activation: a share p0 = 1/2 of exact zeros, which have no error, and the
    # half-normal beside them: bias (1 - p0) times the half-normal's exact one, about -1/4,
    # and second moment (1 - p0) times its MSE
    relu = np.maximum(x, 0.0)
    e_relu = (fake_quantize(relu, trunc.replace(signed=False), s) - relu) / s
    expected = 0.5 * one_signed.bias_lsb
    _within_se(e_relu, expected, 0.5 * one_signed.mse_lsb - expected ** 2, a)
    # The truncation integer hardware does when it requantizes an accumulator, a right
    # shift by k bits, is floor: over every a in a symmetric range [-2^m, 2^m) its mean
    # error is exactly -(2^k - 1)/2^(k+1) output LSB.
    a = torch.arange(-(1 << 14), 1 << 14, dtype=torch.int32)
    for k in (1, 4, 8):
        shifted = a >> k
        assert torch.equal(shifted, torch.div(a, 1 << k, rounding_mode="floor"))
        assert not torch.equal(shifted, torch.div(a, 1 << k, rounding_mode="trunc"))
        err = Fraction(int((shifted.long() * (1 << k) - a.long()).sum()), a.numel() << k)
        assert err == Fraction(-((1 << k) - 1), 1 << (k + 1))


def test_claim_T6_truncation_mse_and_mae_are_larger():
    assert claim("T6").verdict is Verdict.TRUE
    near = QuantSpec(bits=8)
    trunc = near.replace(rounding=RoundingMode.TOWARD_ZERO)
    ratios = []
    for sigma_over_step in np.geomspace(0.05, 20, 15):
        s = 1.0 / sigma_over_step
        a, b = error_moments(sps.norm(), trunc, s), error_moments(sps.norm(), near, s)
        assert a.mse >= b.mse and a.mae >= b.mae
        ratios.append(a.mse / b.mse)
    # wide (sigma = 20 steps): 1/3 against 1/12, less truncation's kink at 0 (the
    # Euler-Maclaurin terms of tests/qerror/test_analytic.py), each plus its clamped tails;
    # bound: the first omitted term and the granular mass the tails take, times 12
    sd = 20.0
    f0, f2, f4 = sps.norm.pdf(0) / sd, -sps.norm.pdf(0) / sd**3, 3 * sps.norm.pdf(0) / sd**5
    a, b = error_moments(sps.norm(), trunc, 1 / sd), error_moments(sps.norm(), near, 1 / sd)
    predicted = (1 / 3 - f0 / 6 + f2 / 360 + a.mse_clip_lsb) / (1 / 12 + b.mse_clip_lsb)
    assert abs(ratios[-1] - predicted) <= 12 * (2 * abs(f4) / 15120 + a.p_low + a.p_high)
    assert ratios[-1] < 4  # the kink costs truncation a little of the 4x
    # the MAE: 1/2 less the kink's f(0)/6 against 1/4, about 2x; the first omitted term is
    # f''(0) times a Bernoulli coefficient below 1, and the tails' share is as above
    mae_ratio = a.mae / b.mae
    assert abs(mae_ratio - (1 / 2 - f0 / 6) / (1 / 4)) <= abs(f2) + 4 * (a.p_low + a.p_high)
    assert 1.95 < mae_ratio < 2
    # narrow (sigma = 0.05 steps): both send everything within half a step to 0, and the
    # same values are nonzero under neither, so the ratio is 1 (the mass the two treat
    # apart, beyond half a step, is 2 Φ(-10) ≈ 1.5e-23 of it), to the engine's float64
    # sums: each MSE within 256 eps relative (the grid's 256 cells, as R4's bias), the
    # ratio within twice that (measured: exactly 1)
    engine_rel = 256 * np.finfo(float).eps
    assert abs(ratios[0] - 1.0) <= 2 * engine_rel, ratios[0]
    # ... with zero point 0: on an affine grid (z = -20) the same law's positive half has
    # u in (-20, -19.5), truncated to -19, a whole step up; in steps (σ = 0.05, nothing
    # within 10 σ of a half step) truncation's MSE is P(x > 0) - 2 E[x; x > 0] + σ² and
    # nearest's σ², a ratio of about 185
    aff_near = near.replace(symmetric=False)
    aff_trunc = aff_near.replace(rounding=RoundingMode.TOWARD_ZERO)
    sg = 0.05
    aff = (error_moments(sps.norm(), aff_trunc, 1 / sg, -20).mse
           / error_moments(sps.norm(), aff_near, 1 / sg, -20).mse)
    # (what it leaves out, the mass more than half a step from 0 (nearest's cell;
    # truncation's reaches a step), is 2 Φ(-10) ≈ 1.5e-23 of each MSE: the ratio is the
    # formula to the engine's float64 sums, 2 engine_rel as above; measured 1.1e-16)
    assert aff == pytest.approx((0.5 - 2 * sg / math.sqrt(2 * math.pi) + sg**2) / sg**2,
                                rel=2 * engine_rel, abs=0) and aff > 4
    assert "with zero point 0: with a zero point z" in claim("T6").condition
    # ... but only within half a step of 0: centred at 0.7 steps, nearest sends it to 1
    # (error 0.3) and truncation to 0 (error 0.7), a ratio near (0.7/0.3)² ≈ 5.4
    off = sps.norm(0.7 * 0.05, 0.05 * 0.05)
    far = error_moments(off, trunc, 0.05).mse / error_moments(off, near, 0.05).mse
    # in steps: truncation sends the values (all within (0, 1), 14 σ from both ends) to 0,
    # nearest those above half a step to 1 and the 4-σ tail below it to 0; by quadrature,
    # near (0.7² + σ²)/(0.3² + σ²), the ledger's "about 5.3"
    from scipy import integrate

    law = sps.norm(0.7, 0.05)
    mse_t = integrate.quad(lambda u: u * u * law.pdf(u), 0.0, 1.0, epsabs=0, epsrel=1e-13)[0]
    mse_n = (integrate.quad(lambda u: u * u * law.pdf(u), 0.0, 0.5, epsabs=0, epsrel=1e-13)[0]
             + integrate.quad(lambda u: (u - 1) ** 2 * law.pdf(u), 0.5, 1.5, epsabs=0,
                              epsrel=1e-13)[0])
    assert far > 4 and far == pytest.approx(mse_t / mse_n, rel=1e-9)
    assert abs(far - (0.7**2 + 0.05**2) / (0.3**2 + 0.05**2)) < 1e-4 and round(far, 1) == 5.3
    rng = np.random.default_rng(4)
    x = rng.standard_normal(100_000)
    ea, eb = fake_quantize(x, trunc, 0.05) - x, fake_quantize(x, near, 0.05) - x
    r = mse_ratio_ci(ea, eb, paired=True, alpha=ALPHA)
    # the sample's interval holds the exact ratio (20 steps wide: close to 4, short of it
    # by truncation's f(0)/6 at zero) and lies above 1
    unit = sps.norm(0.0, 1.0)
    exact = error_moments(unit, trunc, 0.05).mse / error_moments(unit, near, 0.05).mse
    assert 3.9 < exact < 4 and r.ci[0] <= exact <= r.ci[1], (exact, r.ci)
    assert r.ci[0] > 1 and r.p_value < ALPHA


def test_claim_T7_small_values_suffer_in_relative_error_only():
    assert claim("T7").verdict is Verdict.CONDITIONAL
    trunc = QuantSpec(bits=8, rounding=RoundingMode.TOWARD_ZERO)
    # Absolute error: a value uniform in [k, k+1) steps has the same MSE for every k.
    # (exactly 1/3, to the engine's float64 sums: 256 eps relative, as T6's; measured 0)
    mses = [error_moments(sps.uniform(k, 1), trunc, 1.0).mse for k in range(0, 20)]
    np.testing.assert_allclose(mses, 1 / 3, rtol=256 * np.finfo(float).eps, atol=0)
    # ... and the same law, not only the same MSE (an error of -f on some cells and 1 - f
    # on others has MSE 1/3 on each): the value k + f has error exactly -f on every cell,
    # and -(k + f) error f, for f on a grid of 2⁻¹⁰ steps (exact in float64)
    f = np.arange(1024) / 1024
    for k in range(0, 20):
        np.testing.assert_array_equal(fake_quantize(k + f, trunc, 1.0) - (k + f), -f)
        np.testing.assert_array_equal(fake_quantize(-(k + f), trunc, 1.0) + (k + f), f)
    # Relative error: E[(e/x)^2] falls with the magnitude. Exactly, for x uniform on
    # [k, k+1) (k >= 1) truncation's e/x is k/x - 1, so E[(e/x)^2] = k/(k+1) - 2k ln(1 + 1/k)
    # + 1 and E[(e/x)^4] = ∫ (k/x - 1)^4 dx; each sample mean is that value within z
    # standard errors, three comparisons each at ALPHA / 3 (Bonferroni).
    from scipy import integrate

    rng = np.random.default_rng(5)
    exact = []
    for k in (1, 4, 16):
        exact.append(k / (k + 1) - 2 * k * math.log1p(1 / k) + 1)
        fourth = integrate.quad(lambda v: (k / v - 1) ** 4, k, k + 1, epsabs=0,
                                epsrel=1e-13)[0]
        x = rng.uniform(k, k + 1, 50_000)
        _within_se(((fake_quantize(x, trunc, 1.0) - x) / x) ** 2, exact[-1],
                   fourth - exact[-1] ** 2, ALPHA / 3)
    assert exact[0] > exact[1] > exact[2]
    # Zeroed range: |u| < 1 for truncation, |u| < 1/2 for nearest.
    x = np.linspace(-2, 2, 40_001)
    zero_t = int(np.sum(quantize(x, trunc, 1.0) == 0))
    zero_n = int(np.sum(quantize(x, trunc.replace(rounding=RoundingMode.NEAREST_EVEN), 1.0) == 0))
    # grid step 1e-4: |x| < 1 holds 19,999 points, |x| <= 1/2 (ties to even: ±1/2 go to 0)
    # 10,001, so the zeroed range is twice as wide to the grid point
    assert (zero_t, zero_n) == (19_999, 10_001)


# --------------------------------------------------------------------------- network claims
# Decided on a small plain CNN (ten conv-BN-ReLU layers, float64) whose BatchNorm statistics
# fit its own activations; studies.drift measures the same quantities on ResNet50.

NET_ALPHA = 1e-3  # level of every test below; z = 3.29 two-sided


def _chain(depth: int = 10, width: int = 16, seed: int = 0):
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for i in range(depth):
        layers += [nn.Conv2d(1 if i == 0 else width, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        model(_net_images(512, 100))
    return model.eval()


def _net_images(n: int, seed: int):
    return torch.randn(n, 1, 8, 8, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def chain_runs():
    """The untrained chain under three modes at 6 bits (A1), and beyond its range (N3)."""
    from qerror.nn import QuantConfig, calibrate_activations, measure

    model = _chain()
    calib = [_net_images(256, 1)]
    x = _net_images(1024, 2)
    with torch.no_grad():
        labels = model(x).argmax(1)  # the float network's answers: its accuracy is 1
    test = [(x[i:i + 256], labels[i:i + 256]) for i in range(0, len(x), 256)]
    runs = {}
    for bits in (6,):
        act = calibrate_activations(model, calib, QuantConfig.make(bits).activation)
        for mode in (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR):
            runs[(mode, bits)] = measure(model, test, QuantConfig.make(bits, mode), act)
    wide = [(3 * t, y) for t, y in test]  # beyond the calibration range: some values clamp
    act = calibrate_activations(model, calib, QuantConfig.make(8).activation)
    for mode in (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO):
        runs[(mode, "wide")] = measure(model, wide, QuantConfig.make(8, mode), act)
    return runs


SEEDS_DIR = Path(__file__).parent / "data" / "seeds"


@pytest.fixture(scope="module")
def seed_networks():
    """Every trained seed of the plain chain, and the images the study measured them on."""
    return _seed_networks(SEEDS_DIR)


def _seed_networks(directory):
    """:func:`seed_networks` from ``directory``. The weights are the committed output of ``python -m studies.seeds`` (tests/data/seeds,
    checked against its manifest); the images are Fashion-MNIST's (calibration images, and
    test images with their true labels), as the study took them; ``stored`` is the run's
    statements.csv, checked against the manifest too (N4 decides on it).
    """
    import json

    import pandas as pd

    from qerror.data import DataNotFoundError, fashion_mnist_splits, to_small_tensor
    from qerror.files import sha256_file
    from qerror.nn.models import plain_chain
    from studies.seeds import BATCH, CALIB_IMAGES, EPOCHS, LR, TEST_IMAGES, TRAIN_IMAGES

    manifest = json.loads((directory / "manifest.json").read_text())
    cfg = manifest["config"]
    # the default run (the ledger's texts say twenty seeds): a smoke run's weights, or any
    # other run's, match their own manifest's checksum as well
    default = {"seeds": 20, "epochs": EPOCHS, "train_images": TRAIN_IMAGES,
               "test_images": TEST_IMAGES, "calib_images": CALIB_IMAGES, "lr": LR,
               "batch_size": BATCH, "smoke": False}
    got = {k: cfg.get(k) for k in default}
    assert manifest.get("study") == "seeds" and got == default, (
        f"{directory}: {manifest.get('study')} run with {got}, not the default run of "
        f"python -m studies.seeds ({default}) on which the ledger decides N1-N4")
    for name in ("chains.pt", "statements.csv"):
        assert sha256_file(directory / name) == manifest["outputs"][name], (
            f"{directory / name} is not the file its manifest lists: commit the run's "
            "chains.pt, statements.csv and manifest.json together")
    try:
        splits = fashion_mnist_splits(seed=cfg["seed"])
    except DataNotFoundError as err:
        pytest.fail(f"the network claims are decided on Fashion-MNIST: {err} (make data)")
    # the weights were trained on the training split, and the calibration images are drawn
    # from the same file by the same seeded permutation: its hash pins both
    assert splits.train.sha256 == manifest["data"]["train_sha256"], (
        f"{directory}: trained on other training images ({manifest['data']['train_sha256']}) "
        f"than {splits.train.source} holds ({splits.train.sha256})")
    assert splits.test.sha256 == manifest["data"]["test_sha256"]
    models = {}
    for seed, state in torch.load(directory / "chains.pt", weights_only=True).items():
        models[seed] = plain_chain()
        models[seed].load_state_dict(state)
        models[seed].eval()
    assert sorted(models) == list(range(cfg["seed"], cfg["seed"] + cfg["seeds"])), (
        f"{directory}: seeds {sorted(models)}, not the default run's")
    return {"models": models, "calib": to_small_tensor(splits.calib.images[:CALIB_IMAGES]),
            "x": to_small_tensor(splits.test.images[:cfg["test_images"]]),
            "y": torch.from_numpy(splits.test.labels[:cfg["test_images"]]),
            "stored": pd.read_csv(directory / "statements.csv")}


@pytest.mark.parametrize("change", [{"smoke": True, "epochs": 2, "train_images": 1024},
                                    {"epochs": 1}, {"study": "drift"}, {"seeds": 21}])
def test_seed_weights_other_than_the_studys_default_run_are_refused(tmp_path, change):
    """The claims are decided on the weights of ``python -m studies.seeds`` as run by default
    (twenty seeds, the ledger's texts say): a smoke run's weights, whose float accuracy is
    chance (8 to 10 % for twenty smoke seeds), matched their manifest's checksum and were
    used; here a copy of the committed weights under an edited manifest."""
    import json
    import shutil

    manifest = json.loads((SEEDS_DIR / "manifest.json").read_text())
    for key, value in change.items():
        (manifest if key == "study" else manifest["config"])[key] = value
    for name in ("chains.pt", "statements.csv"):
        shutil.copy(SEEDS_DIR / name, tmp_path / name)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AssertionError, match="not the default run"):
        _seed_networks(tmp_path)


def test_seed_weights_trained_on_other_images_are_refused(tmp_path):
    """The seeds' manifest recorded the training split's hash and nothing checked it: weights
    trained on another training file (whose calibration images, drawn from that file, are
    others too) were decided on with this file's calibration images."""
    import json
    import shutil

    manifest = json.loads((SEEDS_DIR / "manifest.json").read_text())
    manifest["data"]["train_sha256"] = "0" * 64
    for name in ("chains.pt", "statements.csv"):
        shutil.copy(SEEDS_DIR / name, tmp_path / name)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AssertionError, match="trained on other training images"):
        _seed_networks(tmp_path)


def test_seed_statements_other_than_the_runs_are_refused(tmp_path):
    """N4 decides "most seeds lose at eight bits" on the committed statements.csv, and
    nothing checked it against its manifest (only chains.pt): where the CPU is not the one
    the run was made on, the test that compares it with a fresh measurement compares its
    keys alone, so a stale or edited file decided N4. Here truncation's 8-bit accuracy raised
    by 0.05 on eight seeds, which turns the committed 'most' (15 of 20) into 'undecided'."""
    import shutil

    import pandas as pd

    for name in ("chains.pt", "manifest.json"):
        shutil.copy(SEEDS_DIR / name, tmp_path / name)
    st = pd.read_csv(SEEDS_DIR / "statements.csv")
    edit = ((st.quantity == "accuracy") & (st["mode"] == TRUNC.value) & (st.bits == 8)
            & (st.seed < 8))
    st.loc[edit, "value"] += 0.05
    st.to_csv(tmp_path / "statements.csv", index=False)
    with pytest.raises(AssertionError, match="statements.csv is not the file its manifest"):
        _seed_networks(tmp_path)
    # the committed folder passes, and its copy is the one checked
    assert _seed_networks(SEEDS_DIR)["stored"].equals(pd.read_csv(SEEDS_DIR / "statements.csv"))


@pytest.fixture(scope="module")
def seed_statements(seed_networks):
    """The network claims' quantities on every trained seed, measured here as the study
    measured them."""
    import pandas as pd

    from qerror.nn.seeds import network_statements

    n = seed_networks
    return pd.concat([network_statements(model, n["calib"], n["x"], n["y"], seed=seed)
                      .assign(seed=seed) for seed, model in n["models"].items()],
                     ignore_index=True)


@pytest.fixture(scope="module")
def seed_outcomes(seed_networks):
    """Which test images each seed classifies correctly under round-to-nearest and
    truncation (qerror.nn.seeds.image_outcomes), per width."""
    import pandas as pd

    from qerror.nn.seeds import image_outcomes

    n = seed_networks
    return pd.concat([image_outcomes(model, n["calib"], n["x"], n["y"], seed=seed,
                                     modes=(NEAR, TRUNC)).assign(seed=seed)
                      for seed, model in n["models"].items()], ignore_index=True)


@pytest.mark.xdist_group("seeds")
def test_the_committed_seed_statements_are_what_the_code_measures(seed_networks,
                                                                  seed_statements):
    """tests/data/seeds/statements.csv is the study's output for the committed weights: the
    same statements (a quantity the code measures and the file lacks means a stale copy:
    growth_ac1 once was) and the same values, to a millionth (measured: within 1e-9 between
    two commits' float32 sums in different orders) where ATen runs the vector ISA the study
    ran on. On another (the committed run's AVX512 against an AVX2-only CPU, measured: 565 of
    1,620 values differ by more, the largest by one image in 512 of a seed's accuracy and by
    a third of a near-zero autocorrelation) ATen's convolutions sum in another order and a
    value near a rounding boundary moves a code: the file is then the study's output on that
    CPU, not this one's, and what must hold here is what the ledger decides, which N1-N4's
    tests decide from the values measured here."""
    import json

    keys = ["bits", "mode", "quantity", "seed"]
    stored = seed_networks["stored"].sort_values(keys, ignore_index=True)
    now = seed_statements.sort_values(keys, ignore_index=True)
    assert set(stored.quantity) == set(now.quantity)
    assert stored[keys].equals(now[keys].astype(stored[keys].dtypes.to_dict()))
    made_on = json.loads((SEEDS_DIR / "manifest.json").read_text())["cpu"]["cpu_capability"]
    if made_on == torch.backends.cpu.get_cpu_capability():
        assert np.allclose(stored.value, now.value, rtol=1e-6, atol=0, equal_nan=True)


def _convs(res):
    return [s for s in res.layers() if s.kind == "conv"]


# Decided on the trained seeds: each statement is checked on every seed, and a claim holds
# at a width where the fraction of seeds it holds on has its 95% Wilson interval above one
# half ("most seeds"), fails where the interval lies below one half, and is undecided
# otherwise. The verdict texts in studies/ledger.py say which, per width. A text that says
# "at every width" claims a conjunction: it holds only if each width's decision does (an
# intersection-union test), which needs no adjustment of the level for the widths.
SEED_ALPHA = 0.05


def _on_seeds(st, quantity, mode, bits):
    """One statement's value per seed. A NaN is refused: compared with > it would read as
    'does not hold', which leans a 'few' or 'undecided' decision (N3, nearest's growth in
    N1) toward what the text says; a seed's NaN must be decided explicitly."""
    d = st[(st.quantity == quantity) & (st["mode"] == mode.value) & (st.bits == bits)]
    v = d.set_index("seed").value.sort_index()
    assert len(v) and not v.isna().any(), (quantity, mode, bits, v[v.isna()].index.tolist())
    return v


def _decide(holds):
    from qerror.nn.seeds import fraction_holding

    r = fraction_holding(np.asarray(holds), SEED_ALPHA)
    return "most" if r.ci[0] > 0.5 else "few" if r.ci[1] < 0.5 else "undecided"


NEAR, TRUNC, FLOOR = RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR
MOST, FEW, UNDECIDED = "most", "few", "undecided"
# What the ledger's texts say, per width. N1: (drift above nearest's, grows with depth).
N1_EXPECTED = {8: {TRUNC: (MOST, MOST), FLOOR: (MOST, MOST)},
               6: {TRUNC: (MOST, MOST), FLOOR: (MOST, MOST)},
               4: {TRUNC: (MOST, MOST), FLOOR: (MOST, UNDECIDED)}}
N1_NEAREST_GROWS = {8: UNDECIDED, 6: UNDECIDED, 4: UNDECIDED}
# N2: worst inconsistency above a tenth, for (nearest, truncation, floor).
N2_EXPECTED = {8: (FEW, MOST, MOST), 6: (FEW, MOST, MOST), 4: (MOST, MOST, MOST)}
N3_EXPECTED = {8: FEW, 6: FEW, 4: FEW}
N4_MOST_SEEDS = (6, 4)


BASELINE_DIR = Path(__file__).parent / "data" / "baseline"


@pytest.fixture(scope="module")
def baseline():
    """The network claims' quantities on the Fashion-MNIST ResNet50 baseline, and its
    whole-test-split headline: committed outputs of ``python -m studies.drift`` (checked
    against their manifest), since the baseline is trained, not shipped."""
    import json

    import pandas as pd

    from qerror.files import sha256_file

    manifest = json.loads((BASELINE_DIR / "manifest.json").read_text())
    assert manifest["study"] == "drift" and manifest["model"]["model"] == "fashion-resnet50"
    tables = {}
    for name in ("statements.csv", "headline.csv"):
        assert sha256_file(BASELINE_DIR / name) == manifest["outputs"][name], name
        tables[name] = pd.read_csv(BASELINE_DIR / name)
    st = tables["statements.csv"]
    value = lambda q, mode, bits: float(st[(st.quantity == q) & (st["mode"] == mode.value)
                                           & (st.bits == bits)].value.iloc[0])
    return value, tables["headline.csv"].set_index("mode"), manifest


# What the ledger's texts say of the baseline, one network with the images random: each
# statement decided by an interval over the run's test images (studies.drift's
# image_statements), so that it holds for the baseline and not for one draw of images.
# N1: (deepest drift above nearest's: the paired image bootstrap's 95 % interval of the gap
# above 0; grows with depth: the layer and the image bootstrap's intervals of the exponent
# both above 0) for truncation and floor. At four bits truncation's gap interval lies below
# 0 (round-to-nearest leaves the larger deepest drift there) and floor's holds 0.
R50_N1 = {8: {TRUNC: (True, True), FLOOR: (True, True)},
          6: {TRUNC: (True, True), FLOOR: (True, True)},
          4: {TRUNC: (False, False), FLOOR: (False, False)}}
# the gap's interval below 0 instead
R50_N1_GAP_BELOW = {8: {TRUNC: False, FLOOR: False}, 6: {TRUNC: False, FLOOR: False},
                    4: {TRUNC: True, FLOOR: False}}
# N2, per width for (nearest, truncation, floor): some BatchNorm's figure above 0.1 (True),
# every one's under it (False), or not decided by the images (None) — BNBounds.exceeds.
R50_N2 = {8: (None, True, True), 6: (True, True, True), 4: (True, True, True)}
R50_N3 = {8: False, 6: False, 4: False}


def _r50_bn(value, mode, bits):
    """BNBounds.exceeds(0.1) from the run's two bounds."""
    from qerror.nn.bn import BNBounds

    return BNBounds(value("bn_worst", mode, bits), value("bn_some_lo", mode, bits),
                    value("bn_all_hi", mode, bits), 0, SEED_ALPHA, 0).exceeds(0.1)


def test_claims_N1_to_N4_on_the_resnet50_baseline(baseline):
    value, head, manifest = baseline
    assert manifest["data"]["test_images"] == 200 and manifest["data"]["headline_images"] \
        == 10_000
    for bits, expected in R50_N1.items():
        for mode in (TRUNC, FLOOR):
            got = (value("drift_deep_gap_lo", mode, bits) > 0,
                   value("growth_lo", mode, bits) > 0 and value("growth_image_lo", mode, bits) > 0)
            assert got == expected[mode], (bits, mode)
            assert (value("drift_deep_gap_hi", mode, bits) < 0) \
                == R50_N1_GAP_BELOW[bits][mode], (bits, mode)
            # where growth is claimed, the residuals' autocorrelation is what the text says
            # (below 0.4: the layer interval somewhat too narrow, qerror.nn.growth)
            if expected[mode][1]:
                assert value("growth_ac1", mode, bits) < 0.4, (bits, mode)
            else:  # not shown: the layer bootstrap's interval reaches below 0
                assert value("growth_lo", mode, bits) < 0 < value("growth_image_lo", mode, bits)
        # nearest's image interval lies above 0, its layer interval too but at eight bits;
        # its residuals follow each other too much for the layer interval to show growth
        # (the text says so)
        assert (value("growth_lo", NEAR, bits) > 0) == (bits != 8), bits
        assert value("growth_image_lo", NEAR, bits) > 0
        assert value("growth_ac1", NEAR, bits) > 0.5, bits
    for bits, expected in R50_N2.items():
        assert tuple(_r50_bn(value, m, bits) for m in (NEAR, TRUNC, FLOOR)) == expected, bits
    # undecided at eight bits for nearest, though the sample's largest figure exceeds 0.1
    assert value("bn_worst", NEAR, 8) > 0.1
    for bits, expected in R50_N3.items():
        assert (value("sat_last", TRUNC, bits) > value("sat_last", NEAR, bits)) == expected
    # N4 at eight bits on the whole test split: truncation below nearest, McNemar at
    # SEED_ALPHA; at six and four bits (the 200 measured images) by tens of points.
    t = head.loc[TRUNC.value]
    assert t.images == 10_000 and t.delta_vs_nearest < 0 and t.p_vs_nearest < SEED_ALPHA
    # "about one point": the loss's 95 % interval (McNemar's paired difference) lies
    # between half a point and two points, not its estimate alone
    assert 0.005 < -t.delta_vs_nearest_hi and -t.delta_vs_nearest_lo < 0.02
    for bits in (6, 4):
        assert value("accuracy", NEAR, bits) - value("accuracy", TRUNC, bits) > 0.3


def test_the_network_claims_name_both_networks_they_are_decided_on():
    """Each of N1-N4's texts is read alone (a row of the ledger's table): each names the
    seeds' network as well as the ResNet50 baseline (N2-N4 named the study only)."""
    for cid in ("N1", "N2", "N3", "N4"):
        text = claim(cid).condition
        assert "twenty trained seeds of a ten-layer plain CNN" in text, cid
        assert "ResNet50" in text, cid


def test_the_network_claims_state_the_levels_their_tests_use():
    """A row says "most seeds", "few seeds" or "significantly" (N1-N4) or "beyond its standard
    error" (A1): each names the level its test decides at (the rows said none)."""
    wilson = f"{100 * (1 - SEED_ALPHA):g} % Wilson interval"
    for cid in ("N1", "N2", "N3", "N4"):
        assert wilson in claim(cid).condition, cid
    assert "95 % bootstrap interval" in claim("N1").condition  # qerror.nn.seeds' level 0.95
    assert claim("A1").condition.count(f"α = {NET_ALPHA:g}") == 2


@pytest.mark.xdist_group("seeds")
def test_claim_N1_drift_grows_with_depth_for_biased_modes(seed_statements):
    assert claim("N1").verdict is Verdict.CONDITIONAL
    st = seed_statements
    # The block bootstrap's interval holds its level only where the layers' deviations from
    # the power law are nearly independent (qerror.nn.growth.layer_block_bootstrap: 94-96 %
    # coverage at a true lag-1 autocorrelation of 0, 86-87 % at 0.5). This check is a screen,
    # not a proof of that level: the sample autocorrelation of ten residuals runs low (in the
    # growth module's own AR(1) model, true 0.5 gives a median of about 0.07 and passes this
    # check in about 97 % of twenty-seed batches, where coverage is about 0.89). It refuses
    # seeds whose residuals follow each other plainly; a verdict that hangs on an interval's
    # last few percent of level is not claimed (nearest's growth is left undecided).
    for bits in N1_EXPECTED:
        for mode in (NEAR, TRUNC, FLOOR):
            ac = _on_seeds(st, "growth_ac1", mode, bits)
            assert ac.median() < 0.3 and ac.quantile(0.9) < 0.5, (bits, mode, ac.describe())
    for bits, expected in N1_EXPECTED.items():
        for mode in (TRUNC, FLOOR):
            # the deepest conv's per-channel drift (noise removed) exceeds nearest's ...
            more = _on_seeds(st, "drift_deep", mode, bits) > _on_seeds(st, "drift_deep", NEAR,
                                                                         bits)
            # ... and grows with path depth (block-bootstrap interval above 0)
            grows = _on_seeds(st, "growth_lo", mode, bits) > 0
            assert (_decide(more), _decide(grows)) == expected[mode], (bits, mode)
        assert _decide(_on_seeds(st, "growth_lo", NEAR, bits) > 0) == N1_NEAREST_GROWS[bits]


@pytest.mark.xdist_group("seeds")
def test_claim_N2_batchnorm_becomes_inconsistent_under_biased_rounding(seed_statements):
    assert claim("N2").verdict is Verdict.TRUE
    st = seed_statements
    for bits, expected in N2_EXPECTED.items():
        # a tenth of a running std (or a tenth in log-variance): not a rounding artefact
        got = tuple(_decide(_on_seeds(st, "bn_worst", m, bits) > 0.1) for m in (NEAR, TRUNC,
                                                                               FLOOR))
        assert got == expected, bits


def test_claim_N2L_layernorm_has_nothing_to_be_inconsistent_with():
    """No stored statistics; after a truncated linear layer, LayerNorm removes the error
    common to a sample's features and a scale common to them (exactly without ε, as its ε
    says with it), to float64 rounding, and passes the rest on over the sample's std."""
    from torch import nn

    assert claim("N2L").verdict is Verdict.FALSE
    ln = nn.LayerNorm(64, elementwise_affine=False).double()
    assert list(ln.buffers()) == []
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 32, dtype=torch.float64, generator=g) / 6
    x = torch.relu(torch.randn(512, 32, dtype=torch.float64, generator=g))
    trunc = QuantSpec(bits=6, rounding=RoundingMode.TOWARD_ZERO)
    wq = fake_quantize(w, trunc.replace(axis=0), w.abs().amax(1) / trunc.qmax)
    xq = fake_quantize(x, trunc.replace(signed=False), float(x.max()) / 63)
    yf, yq = x @ w.T, xq @ wq.T
    common = (yq - yf).mean(dim=1, keepdim=True)  # per sample, across features
    # truncation's error has a common part well away from 0 ...
    assert abs(float(common.mean())) > 10 * float(common.std()) / 512 ** 0.5
    # ... which LayerNorm removes: normalising yq and yq minus that part agree to rounding
    torch.testing.assert_close(ln(yq), ln(yq - common), rtol=1e-12, atol=1e-12)
    # A scale c > 0 common to a sample's features gives (y − μ)/√(σ² + ε/c²): without ε it
    # is removed exactly, with ε it leaves what ε's share of the variance says, and no more.
    c = 0.5 + 1.5 * torch.rand(512, 1, dtype=torch.float64, generator=g)
    mu, var = yq.mean(dim=1, keepdim=True), yq.var(dim=1, unbiased=False, keepdim=True)
    no_eps = nn.LayerNorm(64, eps=0.0, elementwise_affine=False).double()
    torch.testing.assert_close(no_eps(c * yq), no_eps(yq), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ln(c * yq), (yq - mu) / (var + ln.eps / c ** 2).sqrt(),
                               rtol=1e-12, atol=1e-12)
    assert float((ln(c * yq) - ln(yq)).abs().max()) > 1e-6  # ε's share: not rounding
    # Error that differs across features (here most of truncation's) passes through, over
    # the sample's std: yq's deviation from its mean is the float one plus that error.
    dev = (yq - yf) - common
    torch.testing.assert_close(ln(yq), (yf - yf.mean(dim=1, keepdim=True) + dev)
                               / (var + ln.eps).sqrt(), rtol=1e-12, atol=1e-12)
    assert float(dev.square().mean()) > 0.5 * float((yq - yf).square().mean())


@pytest.mark.xdist_group("seeds")
def test_claim_N3_saturation_follows_the_drift(chain_runs, seed_statements):
    assert claim("N3").verdict is Verdict.FALSE
    near = chain_runs[(RoundingMode.NEAREST_EVEN, "wide")]
    trunc = chain_runs[(RoundingMode.TOWARD_ZERO, "wide")]
    # At the first quantizer both see the same input: truncation clamps |u| beyond the range
    # by a whole step or more, nearest by half a step, so truncation's clamped elements are
    # a subset of nearest's; here their counts (fewer at the top, no more at the bottom).
    f_n, f_t = near.layers()[0], trunc.layers()[0]
    assert f_n.saturation_high + f_n.saturation_low > 0
    assert f_t.saturation_high < f_n.saturation_high
    assert f_t.saturation_low <= f_n.saturation_low
    # the subset itself, element by element, on scaled values u around both ends of an
    # unsigned affine and a signed symmetric grid: every u truncation rounds outside the
    # codes, nearest rounds outside too (and nearest some more)
    for spec in (QuantSpec(bits=8, signed=False, symmetric=False), QuantSpec(bits=8)):
        u = torch.linspace(spec.qmin - 3, spec.qmax + 3, 200_001, dtype=torch.float64)
        out = {m: (r < spec.qmin) | (r > spec.qmax)
               for m, r in ((m, apply_rounding(u, m)) for m in (NEAR, TRUNC))}
        assert not (out[TRUNC] & ~out[NEAR]).any() and out[TRUNC].sum() < out[NEAR].sum()
    # Downstream, on the trained seeds: does truncation clamp more of the classifier's input
    # at the top of its range than round-to-nearest? On the seeds (ties, mostly nothing
    # clamped under either mode, count as "not more") and, for the direction alone, on the
    # seeds where the two counts differ.
    # On the seeds where they differ, truncation clamps more on fewer than half at every
    # width, and significantly fewer at four bits; at eight and six bits whether the share
    # is significantly below one half depends on the seeds (20 seeds trained on another
    # machine decide the other of the two widths), so it is not claimed there.
    st = seed_statements
    for bits, expected in N3_EXPECTED.items():
        trunc, near = _on_seeds(st, "sat_last", TRUNC, bits), _on_seeds(st, "sat_last", NEAR,
                                                                         bits)
        assert _decide((trunc > near).to_numpy()) == expected, bits
        differ = (trunc > near)[trunc != near].to_numpy()
        assert differ.mean() < 0.5 and _decide(differ) != MOST, bits
        assert bits != 4 or _decide(differ) == FEW


@pytest.mark.xdist_group("seeds")
def test_claim_N4_truncation_costs_accuracy(seed_networks, seed_statements, seed_outcomes):
    from qerror.stats import crossed_mean_test

    assert claim("N4").verdict is Verdict.TRUE
    st, out = seed_statements, seed_outcomes
    for bits in (8, 6, 4):
        # Per seed and test image, 1, 0 or -1 as round-to-nearest's prediction is right and
        # truncation's wrong, both or neither, or the reverse (true labels): the table's mean
        # is the mean accuracy loss. Accuracy is a count, so a seed whose two counts differ by
        # an image or two can change sides with the float rounding of another CPU; the mean
        # over seeds cannot. It is decided with both the seeds and the test images random
        # (crossed_mean_test; a t-interval over the seeds alone would say what other seeds
        # do on these 512 images): its one-sided interval at SEED_ALPHA (the lower end of
        # the two-sided one at 2 SEED_ALPHA) above 0.
        correct = {m: out[(out.bits == bits) & (out["mode"] == m.value)]
                   .pivot(index="seed", columns="image", values="correct").sort_index()
                   for m in (NEAR, TRUNC)}
        for m in (NEAR, TRUNC):  # the tables are the images behind the measured accuracies
            assert np.array_equal(correct[m].mean(axis=1).to_numpy(),
                                  _on_seeds(st, "accuracy", m, bits).to_numpy()), (bits, m)
        table = correct[NEAR].to_numpy(int) - correct[TRUNC].to_numpy(int)
        r = crossed_mean_test(table, alpha=2 * SEED_ALPHA)
        assert r.ci[0] > 0, (bits, r.verdict)
        # and it is on most seeds where the loss is large (six and four bits); at eight bits
        # the loss is small, the same interval's upper end under two points, and some seeds
        # gain (the count of losing seeds is left undecided in the text: it sits where a
        # seed's image or two decide it)
        diff = table.mean(axis=1)
        if bits in N4_MOST_SEEDS:
            assert _decide(diff > 0) == MOST, bits
        else:
            assert r.ci[1] < 0.02 and (diff < 0).any(), (bits, diff, r.verdict)
            # "(on these seeds most do)": on the committed seeds as the study measured them
            # (tests/data/seeds/statements.csv), not as recomputed here, where another CPU's
            # rounding can move a seed's image or two (15 of 20 lose: one seed less is 14,
            # undecided)
            stored = seed_networks["stored"]  # checked against its manifest
            assert _decide(_on_seeds(stored, "accuracy", NEAR, bits)
                           > _on_seeds(stored, "accuracy", TRUNC, bits)) == MOST, bits


def test_claim_W1_truncation_keeps_the_grid_and_zeroes_twice_as_many_weights():
    """Same codes reachable; zeros: P(|w| < s) against P(|w| <= s/2), exactly, for a normal
    law of weights with σ = 4 steps, and on a sample (five sampled comparisons, each at
    NET_ALPHA: a false failure has probability at most 5 NET_ALPHA, by Bonferroni)."""
    assert claim("W1").verdict is Verdict.CONDITIONAL
    s, sigma = 0.01, 0.04
    near = QuantSpec(bits=6)
    trunc = near.replace(rounding=RoundingMode.TOWARD_ZERO)
    grid = torch.arange(near.qmin, near.qmax + 1, dtype=torch.float64) * s
    for spec in (near, trunc):  # every code is reachable, by the code's own value
        assert torch.equal(quantize(grid, spec, s), torch.arange(near.qmin, near.qmax + 1))
    law = sps.norm(0.0, sigma)
    p_near, p_trunc = law.cdf(s / 2) - law.cdf(-s / 2), law.cdf(s) - law.cdf(-s)
    assert 1.9 < p_trunc / p_near < 2.0  # twice the width, a little less than twice the mass
    w = torch.as_tensor(law.rvs(size=400_000, random_state=12))
    zeros = {m: float((quantize(w, spec, s) == 0).double().mean())
             for m, spec in (("near", near), ("trunc", trunc))}
    for m, p in (("near", p_near), ("trunc", p_trunc)):  # binomial, z at NET_ALPHA
        assert abs(zeros[m] - p) <= 3.29 * math.sqrt(p * (1 - p) / w.numel())
    # every other weight (|w| >= s) loses a little under half a step of magnitude on
    # average: inside W2's band of 0.45 to 0.5 steps, by more than 3.29 standard errors
    kept = w.abs() >= s
    shrink = ((w.abs() - fake_quantize(w, trunc, s).abs()) / s)[kept]
    se = float(shrink.std()) / math.sqrt(int(kept.sum()))
    assert 0.45 + 3.29 * se < float(shrink.mean()) < 0.5 - 3.29 * se
    # ... with zero point 0 only: on an affine grid (z = -20) truncation's codes land on the
    # real 0 for w in (-s, 0], one step as nearest's [-s/2, s/2], so no more weights become
    # 0 (exactly, and on the sample: binomial, z at NET_ALPHA), and the magnitudes of the
    # weights between 0 and -z·s grow (T4)
    z = -20
    aff = near.replace(symmetric=False)
    p_aff = {"near": law.cdf(s / 2) - law.cdf(-s / 2), "trunc": law.cdf(0) - law.cdf(-s)}
    assert p_aff["trunc"] <= p_aff["near"]
    for m, spec in (("near", aff), ("trunc", aff.replace(rounding=RoundingMode.TOWARD_ZERO))):
        p = p_aff[m]
        got = float((quantize(w, spec, s, z) == z).double().mean())
        assert abs(got - p) <= 3.29 * math.sqrt(p * (1 - p) / w.numel()), (m, got, p)
    for c in ("W1", "W2"):
        assert "with a zero point z truncation pulls toward -z·s" in claim(c).condition.lower()


def test_claim_W2_truncation_shrinks_by_half_a_step_whatever_the_size():
    """Mean shrink of |w| in each band [k s, (k+1) s), k = 1..8, for weights N(0, 4 steps):
    exactly E[frac | band] (by quadrature), which stays between 0.45 and 0.5 steps while
    the band's weights grow eightfold (weight decay's shrink would grow with them); the
    sample agrees within its standard error (two-sided at NET_ALPHA, Bonferroni over the
    eight bands); each shrink lies in [0, s)."""
    from scipy import integrate

    assert claim("W2").verdict is Verdict.CONDITIONAL  # zero point 0: W1's test
    s, law = 0.01, sps.norm(0.0, 0.04)
    trunc = QuantSpec(bits=8, rounding=RoundingMode.TOWARD_ZERO)
    w = torch.as_tensor(law.rvs(size=1_000_000, random_state=13))
    shrink = (w.abs() - fake_quantize(w, trunc, s).abs()) / s  # in steps
    assert float(shrink.min()) >= 0.0 and float(shrink.max()) < 1.0
    band = torch.floor(w.abs() / s)
    for k in range(1, 9):
        lo, hi = k * s, (k + 1) * s
        exact = integrate.quad(lambda x: (x / s - k) * law.pdf(x), lo, hi, epsrel=1e-12)[0] \
            / (law.cdf(hi) - law.cdf(lo))
        assert 0.45 < exact < 0.5, k
        d = shrink[band == k].numpy()
        assert abs(d.mean() - exact) <= sps.norm.isf(NET_ALPHA / 2 / 8) * d.std(
            ddof=1) / math.sqrt(d.size), k


def test_claim_A1_biased_modes_shift_the_layer_means(chain_runs):
    """The largest |mean shift| / float std over the convolutions, at 6 bits: truncation's
    and floor's at least 3× round-to-nearest's, and each significant (two-sided at NET_ALPHA,
    Bonferroni over the ten convolutions it is the largest of: chosen by looking, it is tested
    as one of ten, z 3.89, not as one chosen beforehand, 3.29). Their direction: some
    convolutions' means move up and others down, and the first one's moves
    as its rounded weights and inputs predict."""
    assert claim("A1").verdict is Verdict.CONDITIONAL

    def worst(res):
        convs = _convs(res)
        i = max(range(len(convs)), key=lambda j: abs(convs[j].drift) / convs[j].float_std)
        return convs[i]

    near = worst(chain_runs[(RoundingMode.NEAREST_EVEN, 6)])
    n_convs = len(_convs(chain_runs[(RoundingMode.NEAREST_EVEN, 6)]))
    assert n_convs == 10
    z_c = sps.norm.isf(NET_ALPHA / 2 / n_convs)  # two-sided, Bonferroni over the ten
    for mode in (RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR):
        site = worst(chain_runs[(mode, 6)])
        assert abs(site.drift) / site.float_std > 3 * abs(near.drift) / near.float_std, mode
        assert abs(site.drift) > z_c * site.drift_se, mode
    # Not always down: under both modes some convolutions' means move up and others down,
    # each beyond its standard error (at the same level).
    for mode in (RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR):
        z = [c.drift / c.drift_se for c in _convs(chain_runs[(mode, 6)])]
        assert max(z) > z_c and min(z) < -z_c, (mode, z)
    # Which way is what the rounded weights Ŵ and inputs do together: E[ŷ − y] =
    # E[ΔW]·E[x] + Ŵ·E[e_x]. The first convolution's input, the images, is on an unsigned
    # affine grid that holds all but 3e-5 of them, where truncation is floor: every input
    # loses half a step s on average in both modes (σ is 7 steps, where the uniform model is
    # exact far below the standard error). The images' mean is about 0, so the mean moves by
    # −s/2 times Ŵ's sum over the taps inside the image (the zero padding is exact): up here,
    # since that sum is negative, and by as much as predicted (z at NET_ALPHA).
    # With the images random, what the prediction leaves to chance is the images' mean of
    # Ŵ·(e_x + s/2): ΔW·x enters through the images' own mean, exactly. Its standard error is
    # the one the comparison has; the drift's own also counts ΔW·x's spread over the images
    # (1.3 and 8 times larger here, under which a prediction of inputs losing 0.475 of a step
    # under floor passed, at 2.6 of it; /work/runs/s50/tests/probe_A1.log).
    import torch.nn.functional as F

    from qerror.nn import QuantConfig, calibrate_activations
    from qerror.nn.propagate import quantize_weights

    model = _chain()  # chain_runs' network, calibration and test images
    qp = calibrate_activations(model, [_net_images(256, 1)],
                               QuantConfig.make(6).activation)["0"]
    s = qp.scale
    x = _net_images(1024, 2)
    mean_x = x.mean(dim=0, keepdim=True)
    w = model[0].weight.detach()
    for mode in (RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR):
        config = QuantConfig.make(6, mode)
        wq = quantize_weights(model, config.weight)["0"].weight
        taps = F.conv2d(torch.ones_like(mean_x), wq, padding=1)
        predicted = float((F.conv2d(mean_x, wq - w, padding=1) - s / 2 * taps).mean())
        first = _convs(chain_runs[(mode, 6)])[0]
        assert float(taps.mean()) < 0 and predicted > 0, mode
        e_x = fake_quantize(x, config.activation, qp.scale, qp.zero_point) - x
        left = F.conv2d(e_x + s / 2, wq, padding=1).mean(dim=(1, 2, 3))
        se = float(left.std()) / math.sqrt(left.numel())
        assert abs(first.drift - predicted) <= 3.29 * se, (mode, first.drift, predicted, se)


# --------------------------------------------------------------------------- the dataset


def _input_model():
    from torch import nn

    torch.manual_seed(21)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).double()


def test_claim_D1_input_quantizer_equals_offline_codes():
    """Bit-identical outputs from float input quantized in the model and from its offline
    codes, on values that include exact ties between codes (a power-of-two scale makes
    (k + ½)·s exact; half-even and half-away give other codes there, so the tie rule is
    exercised) and values beyond the range, for a float32 and a float64 model."""
    from qerror import QParams
    from qerror.nn.input_quant import on_codes, quantize_offline, with_input_quantizer

    assert claim("D1").verdict is Verdict.TRUE
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    qp = QParams(scale=2.0 ** -8, zero_point=3)
    g = torch.Generator().manual_seed(4)
    u = torch.round(torch.rand(32, 1, 8, 8, generator=g) * 300 * 16) / 16 - 20  # 1/16ths
    u[:, :, 0, :] = torch.floor(u[:, :, 0, :]) + 0.5  # a row of exact ties per image
    for dtype in (torch.float32, torch.float64):
        x = ((u - qp.zero_point) * qp.scale).to(dtype)  # exact: u has few bits
        assert torch.equal(x / qp.scale + qp.zero_point, u.to(dtype))
        away = spec.replace(rounding=RoundingMode.NEAREST_AWAY)
        assert not torch.equal(quantize_offline(x, spec, qp), quantize_offline(x, away, qp))
        net = _input_model().to(dtype)
        net(x)  # materialise the lazy layer
        codes = quantize_offline(x, spec, qp)  # the dataset as stored: one byte per value
        assert codes.dtype == torch.uint8
        with torch.no_grad():
            assert torch.equal(with_input_quantizer(net, spec, qp)(x),
                               on_codes(net, spec, qp, dtype=dtype)(codes))


def test_claim_D2_a_quantized_kernel_refuses_float_input():
    """Eager mode: a quantized convolution refuses a float tensor, and a converted model
    quantizes its float input only where the user put a QuantStub. PT2E: the converted
    graph takes the float tensor and quantizes it, the first op on its input."""
    import warnings

    import torch.ao.quantization as tq
    from torch import nn
    from torch.ao.nn.quantized import Conv2d

    from qerror.nn.pt2e import quantize_pt2e

    assert claim("D2").verdict is Verdict.CONDITIONAL
    x = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        # quantized tensors and the eager flow are deprecated in favour of PT2E (below)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        conv = Conv2d(1, 2, 3)
        with pytest.raises(NotImplementedError):
            conv(x)  # no input quantizer: the float tensor is refused, not converted
        q = torch.quantize_per_tensor(x, 0.05, 64, torch.quint8)  # what a QuantStub does
        assert conv(q).dtype == torch.quint8
        for stub in (tq.QuantStub(), nn.Identity()):
            torch.manual_seed(5)
            model = nn.Sequential(stub, nn.Conv2d(1, 2, 3), tq.DeQuantStub()).eval()
            model.qconfig = tq.get_default_qconfig(torch.backends.quantized.engine)
            prepared = tq.prepare(model)
            prepared(x)  # calibration
            converted = tq.convert(prepared)
            if isinstance(stub, tq.QuantStub):
                assert converted(x).dtype == torch.float32
            else:
                with pytest.raises(NotImplementedError):
                    converted(x)
    # Three input channels, as images have: qerror's flow gives a single-channel
    # convolution a zero channel (pad_single_channel_convs), an op before the quantizer.
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    g = torch.Generator().manual_seed(5)
    graph = quantize_pt2e(net, [torch.randn(4, 3, 5, 5, generator=g) for _ in range(2)],
                          compile=False).converted
    image = next(n for n in graph.graph.nodes if n.op == "placeholder")
    ops = {str(n.target) for n in image.users if n.op == "call_function"}
    assert ops == {"quantized_decomposed.quantize_per_tensor.default"}, ops
    assert graph(torch.randn(2, 3, 5, 5, generator=g)).dtype == torch.float32


def test_claim_D3_qat_trains_on_float_data():
    assert claim("D3").verdict is Verdict.TRUE
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(64, 8, dtype=torch.float64, generator=g)  # float data, never quantized
    spec = QuantSpec(bits=4, axis=0)
    # channel 0's range is half its weights' largest magnitude: some of them are clamped
    scale = (w.detach().abs().amax(1) / spec.qmax) * torch.tensor([0.5, 1.0, 1.0, 1.0],
                                                                   dtype=torch.float64)
    xq = fake_quantize(x, QuantSpec(bits=8), float(x.abs().max()) / 127)
    wq = fake_quantize(w, spec, scale)
    loss = (xq @ wq.T).square().mean()
    loss.backward()
    # the straight-through gradient: the float weights get the loss's gradient with respect
    # to their quantized values inside the range (the other channels' largest weights on
    # their rails), zero where a weight was clamped, computed here in closed form:
    # 2/(64·4) (xq wq^T)^T xq, masked
    u = w.detach() / scale[:, None]
    inside = (torch.round(u) >= spec.qmin) & (torch.round(u) <= spec.qmax)
    assert 0 < int((~inside).sum()) and bool(inside[1:].all())
    y = (xq @ wq.T).detach()
    expected = 2 / y.numel() * y.T @ xq * inside
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=0)


def test_claim_D4_ptq_calibrates_on_float_data():
    from qerror.nn import QuantConfig, calibrate_activations

    assert claim("D4").verdict is Verdict.TRUE
    net = _input_model()
    batches = [torch.rand(16, 1, 8, 8, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    net(batches[0])
    copies = [b.clone() for b in batches]
    spec = QuantConfig.make(8).activation
    qp = calibrate_activations(net, batches, spec)
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    assert qp["0"] == qparams_from_range(lo, hi, spec)  # the first layer: the float input
    assert all(torch.equal(a, b) for a, b in zip(batches, copies))


def test_claim_D5_int8_storage_saves_against_float_only():
    """Counted, and held: the bytes of Fashion-MNIST's pixels as read from its files, of the
    float32 model input made from them, and of its INT8 codes, at 28×28 and padded to 32×32."""
    from qerror.compress.size import held_bytes, storage_bytes
    from qerror.data import DataNotFoundError, load_fashion_mnist, to_tensor
    from qerror.nn.input_quant import quantize_offline

    assert claim("D5").verdict is Verdict.CONDITIONAL
    n = 10_000 * 28 * 28  # Fashion-MNIST's test split
    assert storage_bytes("float32", n) == 4 * storage_bytes("int8", n)
    assert storage_bytes("uint8", n) == storage_bytes("int8", n)  # the pixels as shipped
    try:
        pixels = load_fashion_mnist("test").images[:256]
    except DataNotFoundError as err:
        pytest.fail(f"the dataset claims are decided on Fashion-MNIST: {err} (make data)")
    # uint8 on disk: read_idx returns the element type the IDX header declares, and refuses
    # a file that does not hold exactly one such element per pixel
    assert pixels.dtype == np.uint8
    spec = QuantSpec(bits=8, signed=True, symmetric=False)  # studies.dataset's INT8 codes
    for size in (28, 32):  # the images' own size, and the zero-padded model input
        x = to_tensor(pixels, size)
        codes = quantize_offline(x, spec, calibrate(x, spec))
        assert x.dtype == torch.float32 and held_bytes(x) == 4 * held_bytes(codes)
        if size == 28:
            assert held_bytes(codes) == held_bytes(pixels)
        else:  # 32² bytes an image against 28²
            assert held_bytes(codes) * 28 ** 2 == held_bytes(pixels) * 32 ** 2


def test_claim_D6_other_offline_scales_change_what_the_model_sees():
    from qerror.nn.input_quant import quantize_offline

    assert claim("D6").verdict is Verdict.CONDITIONAL
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    own = calibrate(x, spec)
    other = calibrate(x[:8], spec)  # another subset's min-max
    for qp in (other, QParams(own.scale * 1.02, own.zero_point)):
        seen = dequantize(quantize_offline(x, spec, qp), qp.scale, qp.zero_point)
        mine = dequantize(quantize_offline(x, spec, own), own.scale, own.zero_point)
        assert not torch.equal(seen, mine)
    # ... and that can change predictions: an affine classifier of these inputs, fed the
    # codes of a scale 2 % off, decides some of 4096 of them otherwise, each by a margin far
    # above float64's rounding (so on every CPU)
    many = torch.rand(4096, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    own = calibrate(many, spec)
    off = QParams(own.scale * 1.02, own.zero_point)
    w = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    b = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    logits = [dequantize(quantize_offline(many, spec, qp), qp.scale, qp.zero_point).double()
              @ w + b for qp in (own, off)]
    flipped = logits[0].argmax(1) != logits[1].argmax(1)
    assert flipped.any()
    for z in logits:
        top = z[flipped].sort(dim=1).values
        assert float((top[:, -1] - top[:, -2]).min()) > 1e-6
    # On Fashion-MNIST another subset does not arise: every image holds a 0 and more than
    # nine in ten a 255 (91.6 to 91.9 % a split), so the validation split's first thousand
    # images calibrate as the calibration split does.
    from qerror.data import DataNotFoundError, fashion_mnist_splits, to_tensor

    try:
        splits = fashion_mnist_splits()
    except DataNotFoundError as err:
        pytest.fail(f"the dataset claims are decided on Fashion-MNIST: {err} (make data)")
    for part in (splits.train, splits.val, splits.calib, splits.test):
        flat = part.images.reshape(len(part.images), -1)
        assert (flat.min(axis=1) == 0).all() and (flat.max(axis=1) == 255).mean() > 0.9
    assert calibrate(to_tensor(splits.val.images[:1000]), spec) == \
        calibrate(to_tensor(splits.calib.images), spec)
    # Nor does every percentile range: 0.6 % of the padded model input's values are 255's
    # level (0.78 % of the calibration split's pixels), so studies.dataset's 99.9th percentile
    # range is the min-max range and its codes are the model's (the record's other_p99.9:
    # 0.00 % changed), while the 99th percentile clips. The condition must not say that any
    # percentile range feeds the model other input.
    from qerror import RangeMethod, RangePolicy

    other = to_tensor(splits.val.images[:1000])
    own = calibrate(to_tensor(splits.calib.images), spec)
    top = (other == other.max()).double().mean()
    assert 0.001 < float(top) < 0.01
    pct = {p: calibrate(other, spec, RangePolicy(RangeMethod.PERCENTILE, percentile=p))
           for p in (99.9, 99.0)}
    assert pct[99.9] == own and pct[99.0] != own
    text = claim("D6").condition
    assert "a percentile range that clips" in text
    assert "its 99.9th percentile range is the min-max range" in text

