"""Exact error moments of uniform quantization for a continuous input law.

For an input ``X`` with a continuous law and a per-tensor quantizer
``x̂ = s (clamp(R(x/s + z), qmin, qmax) - z)`` (the README's Conventions) this module computes,
without sampling, the bias, variance, mean squared and mean absolute error of
``e = x̂ - x``, the probabilities of clamping at each end, the split of the MSE
into its granular and clipping parts, and beside them the uniform-noise
(Widrow) predictions. It also chooses MSE-optimal clipping values, by the ACIQ
approximation of Banner et al. or by minimising the exact MSE.

The integrals are taken bin by bin over the shifted variable ``u = x/s + z`` in
LSB units, all bins at once: closed forms for the normal, Laplace and uniform
laws, Gauss-Legendre quadrature on quantile-graded panels for any other law.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from qerror._checks import check_flag, check_positive_finite
from qerror._enums import Choice
from qerror._exact import two_sum, veltkamp_split
from qerror.quantizer import QuantSpec, check_spec
from qerror.rounding import RoundingMode

__all__ = [
    "ClipMethod",
    "ClipResult",
    "ErrorMoments",
    "Grid",
    "InfiniteMomentWarning",
    "UniformNoise",
    "error_moments",
    "optimal_clip",
]

# Gauss-Legendre rule on [0, 1]. A normal piece goes to it while its
# log-density changes by at most _GL_SPREAD across the piece; there 12 nodes
# match 400-digit closed forms to ~1e-15 relative, and beyond it the closed
# forms no longer cancel badly.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(12)
_GL_X = (_GL_X + 1.0) / 2.0
_GL_W = _GL_W / 2.0
_GL_SPREAD = 4.0

# Gauss-Laguerre rule for the normal's upper partial moments beyond 2 standard
# deviations, where the closed form T1 = phi - g Q cancels (relative error grows
# like g**(2j)); 40 nodes give <= 7e-15 relative for every g >= 2.
_LAG_X, _LAG_W = special.roots_laguerre(40)
_LAG_FROM = 2.0

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Quantile grid of the generic law: logit-spaced in the body (step 0.25, down
# to p = 4e-18) and one decade per breakpoint in the far tails down to 1e-300.
_BODY_P = special.expit(np.arange(-40.0, 0.0 + 1e-9, 0.25))
_FAR_P = 10.0 ** -np.arange(18.0, 301.0)

class InfiniteMomentWarning(UserWarning):
    """The input law lacks a moment the error needs: some results are inf or nan.

    A UserWarning, not a RuntimeWarning: the test suite turns RuntimeWarnings
    raised in qerror into errors to catch numerical accidents, and this one is
    a documented answer, not an accident.
    """


class ClipMethod(Choice):
    """How :func:`optimal_clip` chooses the clipping value."""

    ACIQ = "aciq"
    EXACT = "exact"


class Grid(Choice):
    """Where a uniform quantizer's levels lie, in steps ``s``.

    INTEGER (mid-tread): the integer codes' levels ``(q - z) s``; zero is a level. This is
    the grid of :func:`qerror.quantize` and of every INT8 engine. MIDRISE: the levels
    ``(q + 1/2) s`` for codes ``q`` in ``[qmin, qmax]``, so that ``2**bits`` cells of width
    ``s`` tile ``[qmin s, (qmax + 1) s]`` exactly (``[-α, α]`` with ``α = s 2**(bits-1)``
    for a signed grid); zero is a cell boundary, not a level. ACIQ's error model assumes
    this grid (Banner et al. 2019). A rounding mode acts on the code ``x/s - 1/2``: nearest
    rounding picks the nearest level, but truncation toward zero truncates that shifted
    code, so the level ``s/2`` takes the whole cell ``(-s/2, 3s/2)`` and the error is not
    symmetric about zero (a mid-rise grid has no level at 0 to truncate toward): N(0, 1)
    at its 2-bit optimum has a truncation bias of about +0.105, not 0.
    """

    INTEGER = "integer"
    MIDRISE = "midrise"



@dataclass(frozen=True)
class UniformNoise:
    """Uniform-noise (Widrow) prediction of the error moments.

    The model treats the rounding error as independent of the input and
    uniform on the mode's error interval, and it ignores clipping entirely: it
    describes the granular error only, as if the integer range were unbounded.

    Attributes
    ----------
    bias, variance, mse, mae : float
        In real units (``bias`` and ``mae`` scale with ``s``, the others with ``s**2``).
    bias_lsb, variance_lsb, mse_lsb, mae_lsb : float
        The same in LSB units.
    """

    bias: float
    variance: float
    mse: float
    mae: float
    bias_lsb: float
    variance_lsb: float
    mse_lsb: float
    mae_lsb: float


@dataclass(frozen=True)
class ErrorMoments:
    """Exact moments of the quantization error ``e = x̂ - x`` for one law and quantizer.

    Attributes
    ----------
    spec : QuantSpec
    scale : float
        The step ``s``.
    zero_point : int
    bias, variance, mse, mae : float
        ``E[e]``, ``Var[e]``, ``E[e^2]`` and ``E|e|`` in real units.
    bias_lsb, variance_lsb, mse_lsb, mae_lsb : float
        The same in LSB units (divided by ``s``, or ``s**2`` for the squares).
    mse_granular, mse_clip : float
        ``E[e^2; qmin <= R(u) <= qmax]`` and ``E[e^2; R(u) outside]``: the MSE
        split by whether the rounded code had to be clamped. They sum to ``mse``.
    mse_granular_lsb, mse_clip_lsb : float
        The same in LSB units.
    p_low, p_high : float
        ``P(R(u) < qmin)`` and ``P(R(u) > qmax)``: clamping at each end.
    uniform : UniformNoise
        The uniform-noise prediction, which ignores clipping.
    grid : Grid
        The levels' grid (INTEGER unless asked otherwise).

    Notes
    -----
    With an input law of infinite variance the clamped error is unbounded:
    ``mse``, ``variance`` and ``mse_clip`` are ``inf``. Without a mean, ``mae``
    is ``inf`` and ``bias`` is ``-inf``/``+inf`` when only the upper/lower tail
    is heavy, and ``nan`` when both are (``inf - inf``: the mean error does not
    exist). :func:`error_moments` warns with :class:`InfiniteMomentWarning`.
    """

    spec: QuantSpec
    scale: float
    zero_point: int
    bias: float
    variance: float
    mse: float
    mae: float
    bias_lsb: float
    variance_lsb: float
    mse_lsb: float
    mae_lsb: float
    mse_granular: float
    mse_clip: float
    mse_granular_lsb: float
    mse_clip_lsb: float
    p_low: float
    p_high: float
    uniform: UniformNoise
    grid: Grid = Grid.INTEGER

    @property
    def p_clip(self) -> float:
        """Probability of clamping at either end."""
        return self.p_low + self.p_high

    @property
    def bias_gap(self) -> float:
        """Exact minus uniform-model bias, real units."""
        return self.bias - self.uniform.bias

    @property
    def variance_gap(self) -> float:
        """Exact minus uniform-model variance, real units."""
        return self.variance - self.uniform.variance

    @property
    def mse_gap(self) -> float:
        """Exact minus uniform-model MSE, real units."""
        return self.mse - self.uniform.mse

    @property
    def mae_gap(self) -> float:
        """Exact minus uniform-model MAE, real units."""
        return self.mae - self.uniform.mae

    @property
    def bias_gap_lsb(self) -> float:
        """Exact minus uniform-model bias, LSB."""
        return self.bias_lsb - self.uniform.bias_lsb

    @property
    def variance_gap_lsb(self) -> float:
        """Exact minus uniform-model variance, LSB²."""
        return self.variance_lsb - self.uniform.variance_lsb

    @property
    def mse_gap_lsb(self) -> float:
        """Exact minus uniform-model MSE, LSB²."""
        return self.mse_lsb - self.uniform.mse_lsb

    @property
    def mae_gap_lsb(self) -> float:
        """Exact minus uniform-model MAE, LSB."""
        return self.mae_lsb - self.uniform.mae_lsb


@dataclass(frozen=True)
class ClipResult:
    """Outcome of :func:`optimal_clip`.

    Attributes
    ----------
    alpha : float
        The clipping value: on the integer grid EXACT's largest representable magnitude
        ``s * qmax``; ACIQ's, and on the mid-rise grid both methods', the end of the cells
        ``s 2**bits / 2`` (one-sided ``s 2**bits``).
    scale : float
        The step of the quantizer to use (zero point 0): ``alpha / qmax`` for
        EXACT on the integer grid; else ``2 alpha / 2**bits`` (one-sided ``alpha / 2**bits``).
    spec : QuantSpec
        Signed (symmetric) or unsigned (one-sided), per tensor, zero point 0.
    method : ClipMethod
    one_sided : bool
    mse : float
        The minimised objective at ``alpha``: the ACIQ approximation or the exact MSE.
    mse_exact : float
        The exact MSE of the quantizer ``(spec, scale, 0)`` on ``grid``, from
        :func:`error_moments`.
    grid : Grid
        The grid of ``mse_exact`` (and of EXACT's search).
    """

    alpha: float
    scale: float
    spec: QuantSpec
    method: ClipMethod
    one_sided: bool
    mse: float
    mse_exact: float
    grid: Grid = Grid.INTEGER


# --------------------------------------------------------------------------- the grid frame

# The narrowest closed-form law, in steps: its pieces' partial moments reach (w/σ)**3 in
# standardised units, which overflows float64 near 1e-103 of a step.
_CLOSED_NARROWEST = 1e-100
# The farthest law centre, in steps: its squared error in LSB² overflows beyond 1e154.
_CLOSED_FARTHEST = 1e150


class _Frame:
    """The quantizer's grid, for placing a law's real-unit points against it exactly.

    The grid point ``u`` (in steps; a half-integer of the engine, or any float) stands at
    the real value ``(u - z) s``; :meth:`residual` forms ``x - (u - z) s`` exactly
    (Dekker's product, Knuth's sum, ``u - z`` exact) and rounds it once, to within two
    ulps, so the law's position is never carried as ``fl(x/s + z)``, whose rounding (an ulp
    of ``|x/s + z|``) a narrow law would see. Everything is first scaled by the power of two
    ``2**-e`` that brings ``s`` to ``m`` in [0.5, 1): exact, and it keeps Dekker's split
    clear of overflow. ``z`` may be a half-integer (the mid-rise grid's shift).
    """

    def __init__(self, s: float, z: float):
        self.s, self.z = s, z
        _, self.e = math.frexp(s)
        self.m = math.ldexp(s, -self.e)
        self._mh, self._ml = veltkamp_split(np.float64(self.m))

    def scaled(self, x: float) -> float:
        """``x 2**-e``: real units in which the step is ``m``."""
        return math.ldexp(x, -self.e)

    def residual(self, u, x: float, extra: float = 0.0):
        """``fl((x + extra - (u - z) s) 2**-e)`` for grid points ``u`` (array or float)."""
        k = np.asarray(u, dtype=np.float64) - self.z
        p = k * self.m
        kh, kl = veltkamp_split(k)
        err = ((kh * self._mh - p) + kh * self._ml + kl * self._mh) + kl * self._ml
        d, f = two_sum(self.scaled(x), -p)
        if extra:
            d, g = two_sum(d, self.scaled(extra))
            f = f + g
        return d + (f - err)

    def steps(self, u, x: float, extra: float = 0.0):
        """``(x + extra)/s + z - u`` in steps, rounded about once."""
        return self.residual(u, x, extra) / self.m


_UNIT_FRAME = _Frame(1.0, 0.0)


def _check_frame(loc: float, width: float, s: float, what: str) -> None:
    """Refuse a closed-form law outside the range its formulas hold in float64."""
    ratio = width / s
    if not ratio >= _CLOSED_NARROWEST:
        raise ValueError(
            f"dist's {what} is {width:g}/{s:g} = {ratio:.3g} steps, below "
            f"{_CLOSED_NARROWEST:g}: its closed forms overflow float64 there. A law that "
            "narrow is a point mass to the quantizer: quantize loc itself for its error")
    if not abs(loc) / s <= _CLOSED_FARTHEST:
        raise ValueError(
            f"dist's loc {loc:g} is {abs(loc) / s:.3g} steps of {s:g} from zero, beyond "
            f"{_CLOSED_FARTHEST:g}: its squared error in LSB overflows float64; "
            "choose a step that covers the law")


# --------------------------------------------------------------------------- normal law


def _phi(t):
    # φ is 0 in float64 beyond |t| = 38.6; the clip keeps t² from overflowing
    return np.exp(-0.5 * np.square(np.minimum(np.abs(t), 40.0))) * _INV_SQRT_2PI


def _normal_upper(g, jmax: int) -> np.ndarray:
    """``T_j(g) = ∫_g^∞ (t - g)^j φ(t) dt`` for j = 0..jmax; g 1-D, shape (jmax+1, g.size)."""
    out = np.empty((jmax + 1,) + g.shape)
    out[0] = special.ndtr(-g)
    if jmax == 0:
        return out
    # Integration by parts gives T_{j+1} = j T_{j-1} - g T_j, which cancels
    # mildly below _LAG_FROM (<= 5e-14 relative for j <= 3) and badly above.
    ph = _phi(g)
    out[1] = ph - g * out[0]
    for j in range(1, jmax):
        out[j + 1] = j * out[j - 1] - g * out[j]
    # Beyond 40, φ and the tail are 0 and the recurrence gives 0 (g**(j+1) would overflow).
    far = (g >= _LAG_FROM) & (g < 40.0)
    if far.any():
        gf = g[far]
        # T_j = φ(g)/g^(j+1) ∫_0^∞ s^j e^{-s} e^{-s²/(2g²)} ds (s = g t'): smooth for g >= 2.
        kernel = np.exp(-np.square(_LAG_X)[None, :] / (2.0 * np.square(gf)[:, None])) * _LAG_W
        for j in range(1, jmax + 1):
            out[j][far] = ph[far] / gf ** (j + 1) * (kernel @ _LAG_X**j)
    return out


def _normal_pieces(alpha, beta, w: float, pmax: int) -> np.ndarray:
    """``G_p(α, w) = ∫_α^β (t - α)^p φ(t) dt`` for p = 0..pmax, vectorised over α.

    ``β = α + w``, but each end is passed as computed from the exact grid (:class:`_Frame`):
    formed as ``α + w``, an end near the law's centre would carry the rounding of the
    other, an ulp of ``w`` (``1/(2σ)`` steps).
    """
    out = np.zeros((pmax + 1,) + alpha.shape)
    # φ underflows to 0 beyond |t| = 38.6: pieces entirely past 40 have no mass.
    live = (alpha < 40.0) & (beta > -40.0)
    # spread = max(|α|, |β|) w <= _GL_SPREAD, without forming a product that can overflow
    quad = live & (np.maximum(np.abs(alpha), np.abs(beta)) <= _GL_SPREAD / w)
    if quad.any():
        f = _phi(alpha[quad][:, None] + w * _GL_X) * _GL_W
        for p in range(pmax + 1):
            out[p][quad] = w ** (p + 1) * (f @ _GL_X**p)
    right = live & ~quad & (alpha >= 0)
    if right.any():
        # Density falls across the piece: a difference of upper tails. With
        # spread > 4 the tail beyond β is below e^-4 of the tail beyond α, so
        # the difference barely cancels.
        ta = _normal_upper(alpha[right], pmax)
        tb = _normal_upper(beta[right], pmax)
        for p in range(pmax + 1):
            out[p][right] = ta[p] - sum(math.comb(p, j) * w ** (p - j) * tb[j]
                                        for j in range(p + 1))
    left = live & ~quad & (beta <= 0)
    if left.any():
        # Density rises across the piece: mirror it onto the upper tail.
        ta = _normal_upper(-alpha[left], pmax)
        tb = _normal_upper(-beta[left], pmax)
        for p in range(pmax + 1):
            out[p][left] = (sum(math.comb(p, j) * w ** (p - j) * (-1) ** j * tb[j]
                                for j in range(p + 1)) - (-1) ** p * ta[p])
    mid = live & ~quad & (alpha < 0) & (beta > 0)
    if mid.any():
        a, b = alpha[mid], beta[mid]
        pa, pb = _phi(a), _phi(b)
        g = [special.ndtr(b) - special.ndtr(a)]
        g.append(pa - pb - a * g[0])
        for p in range(1, pmax):
            g.append(p * g[p - 1] - a * g[p] - w**p * pb)
        for p in range(pmax + 1):
            out[p][mid] = g[p]
    return out


class _LocationScale:
    """A law of location ``mu`` and width ``width`` (real units) placed against the grid.

    ``w`` is the width in steps; :meth:`_t` the standardised position ``(u - c)/w`` of grid
    points ``u``, ``c = μ/s + z``, formed from the exact frame (:class:`_Frame`), never from
    ``fl(μ/s + z)``.
    """

    mean_finite = var_finite = True
    lower_unbounded = upper_unbounded = True
    _WIDTH = "scale"  # the width's name in messages

    def __init__(self, mu: float, width: float, frame: _Frame = _UNIT_FRAME):
        self.mu, self.width, self.frame = mu, width, frame
        # the width in steps, and in the frame's scaled real units (exact: a power of two)
        self.w = width / frame.s
        self._width_scaled = frame.scaled(width)

    def lsb(self, s: float, z: float):
        _check_frame(self.mu, self.width, s, self._WIDTH)
        return type(self)(self.mu, self.width, _Frame(s, z))

    def _t(self, u):
        return -self.frame.residual(u, self.mu) / self._width_scaled


class _Normal(_LocationScale):
    """Normal law with mean ``mu`` and standard deviation ``width`` (σ)."""

    _WIDTH = "scale (σ)"

    def cdf(self, u: float) -> float:
        return float(special.ndtr(self._t(u)))

    def sf(self, u: float) -> float:
        return float(special.ndtr(-self._t(u)))

    def pieces(self, left, anchor_left, pmax: int) -> np.ndarray:
        # Mirror right-anchored pieces (t -> -t) so that every piece is anchored on its left.
        # Both ends of every piece are placed from the exact grid.
        t = self._t(np.append(left, left[-1] + 0.5))
        t_left, t_right = t[:-1], t[1:]
        alpha = np.where(anchor_left, t_left, -t_right)
        beta = np.where(anchor_left, t_right, -t_left)
        g = _normal_pieces(alpha, beta, 0.5 / self.w, pmax)
        return g * (self.w ** np.arange(pmax + 1))[:, None]

    def tail(self, a: float, upper: bool, jmax: int) -> np.ndarray:
        # d = c - a in steps; g = (a - c)/w for the upper tail, (c - a)/w for the lower.
        d = float(self.frame.steps(a, self.mu))
        big_g = -d if upper else d
        g = float(self._t(a)) * (1.0 if upper else -1.0)
        if g >= 0:
            t = _normal_upper(np.array([g]), jmax)[:, 0]
            return t * self.w ** np.arange(jmax + 1)
        # Most of the mass beyond a: U_j = w^j T_j(g) by U_{j+1} = j w² U_{j-1} - G U_j
        # (G = g w, in steps), all terms >= 0, with no power of g to overflow.
        out = np.empty(jmax + 1)
        out[0] = special.ndtr(-g)
        if jmax >= 1:
            out[1] = self.w * math.exp(-0.5 * g * g) * _INV_SQRT_2PI - big_g * out[0]
        for j in range(1, jmax):
            out[j + 1] = j * self.w * self.w * out[j - 1] - big_g * out[j]
        return out


# --------------------------------------------------------------------------- Laplace law


def _rising_exp(w, pmax: int) -> np.ndarray:
    """``E_p(w) = ∫_0^w (w - y)^p e^{-y} dy`` for p = 0..pmax; w 1-D, shape (pmax+1, w.size)."""
    out = np.empty((pmax + 1,) + w.shape)
    small = w <= 1.0
    if small.any():
        ws = w[small]
        # The closed form below cancels like 1/w^(p+1) as w -> 0; the integrand is smooth here.
        e = np.exp(-ws[:, None] * _GL_X) * _GL_W
        for p in range(pmax + 1):
            out[p][small] = ws ** (p + 1) * (e @ (1.0 - _GL_X) ** p)
    big = ~small
    if big.any():
        wb = w[big]
        ew = np.exp(-wb)
        for p in range(pmax + 1):
            poly = sum((-wb) ** j / math.factorial(j) for j in range(p + 1))
            out[p][big] = math.factorial(p) * (-1) ** (p + 1) * (ew - poly)
    return out


def _laplace_falling(a, w, pmax: int) -> np.ndarray:
    """``∫_a^{a+w} (t - a)^p ½e^{-t} dt`` for a >= 0: ``½ e^{-a} p! P(p+1, w)``."""
    return np.stack([0.5 * np.exp(-a) * math.factorial(p) * special.gammainc(p + 1, w)
                     for p in range(pmax + 1)])


def _laplace_pieces(alpha, beta, w: float, pmax: int) -> np.ndarray:
    """``∫_α^β (t - α)^p ½e^{-|t|} dt`` for p = 0..pmax, vectorised over α.

    ``β = α + w``, each end passed as placed from the exact grid (see :func:`_normal_pieces`).
    """
    out = np.empty((pmax + 1,) + alpha.shape)
    right = alpha >= 0
    if right.any():
        out[:, right] = _laplace_falling(alpha[right], w, pmax)
    left = beta <= 0
    if left.any():
        out[:, left] = 0.5 * np.exp(beta[left]) * _rising_exp(np.array([w]), pmax)
    mid = ~right & ~left
    if mid.any():
        # Split at the kink t = 0; the right part is re-anchored from 0 to α
        # with the binomial theorem, all terms positive.
        a = -alpha[mid]
        rise = 0.5 * _rising_exp(a, pmax)
        fall = _laplace_falling(np.zeros_like(a), beta[mid], pmax)
        for p in range(pmax + 1):
            out[p][mid] = rise[p] + sum(math.comb(p, j) * a ** (p - j) * fall[j]
                                        for j in range(p + 1))
    return out


class _Laplace(_LocationScale):
    """Laplace law with location ``mu`` and scale ``width`` (b; ``w`` in steps)."""

    _WIDTH = "scale (b)"

    def cdf(self, u: float) -> float:
        t = float(self._t(u))
        return 0.5 * math.exp(t) if t <= 0 else 1.0 - 0.5 * math.exp(-t)

    def sf(self, u: float) -> float:
        t = -float(self._t(u))
        return 0.5 * math.exp(t) if t <= 0 else 1.0 - 0.5 * math.exp(-t)

    def pieces(self, left, anchor_left, pmax: int) -> np.ndarray:
        t = self._t(np.append(left, left[-1] + 0.5))
        t_left, t_right = t[:-1], t[1:]
        alpha = np.where(anchor_left, t_left, -t_right)
        beta = np.where(anchor_left, t_right, -t_left)
        g = _laplace_pieces(alpha, beta, 0.5 / self.w, pmax)
        return g * (self.w ** np.arange(pmax + 1))[:, None]

    def tail(self, a: float, upper: bool, jmax: int) -> np.ndarray:
        d = float(self.frame.steps(a, self.mu))  # c - a, in steps
        g = float(self._t(a)) * (1.0 if upper else -1.0)
        b = self.w
        if g >= 0:
            return np.array([0.5 * math.exp(-g) * math.factorial(j) * b**j
                             for j in range(jmax + 1)])
        # Most of the mass beyond a, at distance big = |c - a| steps: the rising side
        # b^j E_j(-g) and the falling side, with powers of big (steps), not of g.
        big = d if upper else -d
        if -g <= 1.0:
            rise = 0.5 * _rising_exp(np.array([-g]), jmax)[:, 0] * b ** np.arange(jmax + 1)
        else:
            ew = math.exp(g)
            rise = np.array([0.5 * math.factorial(j) * (-1) ** (j + 1)
                             * (ew * b**j - sum((-big) ** i * b ** (j - i) / math.factorial(i)
                                                for i in range(j + 1)))
                             for j in range(jmax + 1)])
        return np.array([rise[j] + 0.5 * sum(math.comb(j, i) * big ** (j - i) * b**i
                                             * math.factorial(i) for i in range(j + 1))
                         for j in range(jmax + 1)])


# --------------------------------------------------------------------------- uniform law


def _power_diff(d1, d2, p: int, length):
    """``(d2^(p+1) - d1^(p+1)) / (p+1)`` without cancellation for 0 <= d1 <= d2, given
    ``length = d2 - d1`` computed on its own (it may be far smaller than either)."""
    return length * sum(d2**i * d1 ** (p - i) for i in range(p + 1)) / (p + 1)


class _Uniform:
    """Uniform law on ``[loc, loc + scale]`` (scipy's, both ends exact real numbers).

    The ends are never formed in floating point (``loc + scale`` rounds, and so do
    ``loc/s + z``): every distance from a grid point to an end is placed by
    :class:`_Frame`, and every length of mass inside a piece is one of those distances,
    the law's width ``scale/s`` or half a step, so that a law narrower than an ulp of its
    ends keeps its mass and position.
    """

    mean_finite = var_finite = True
    lower_unbounded = upper_unbounded = False

    def __init__(self, loc: float, scale: float, frame: _Frame = _UNIT_FRAME):
        self.loc = loc
        self.scale = scale
        self.frame = frame
        self.width = scale / frame.s  # in steps

    def lsb(self, s: float, z: float) -> _Uniform:
        _check_frame(self.loc, self.scale, s, "scale")
        return _Uniform(self.loc, self.scale, _Frame(s, z))

    def _ends(self, u):
        """``(lo - u, hi - u)`` in steps for grid points ``u``."""
        return (self.frame.steps(u, self.loc),
                self.frame.steps(u, self.loc, self.scale))

    def cdf(self, u: float) -> float:
        lo, _ = self._ends(u)
        return min(max(-float(lo) / self.width, 0.0), 1.0)

    def sf(self, u: float) -> float:
        _, hi = self._ends(u)
        return min(max(float(hi) / self.width, 0.0), 1.0)

    def pieces(self, left, anchor_left, pmax: int) -> np.ndarray:
        lo, hi = self._ends(np.append(left, left[-1] + 0.5))
        lo_l, lo_r, hi_l, hi_r = lo[:-1], lo[1:], hi[:-1], hi[1:]
        # The mass of [left, left + 1/2] lies between max(lo, left) and min(hi, left + 1/2).
        lo_in, hi_in = lo_l > 0, hi_r < 0
        length = np.where(lo_in, np.where(hi_in, self.width, -lo_r),
                          np.where(hi_in, hi_l, 0.5))
        length = np.where((hi_l <= 0) | (lo_r >= 0), 0.0, length)
        d1 = np.where(anchor_left, np.where(lo_in, lo_l, 0.0), np.where(hi_in, -hi_r, 0.0))
        d2 = np.where(anchor_left, np.where(hi_in, hi_l, 0.5), np.where(lo_in, -lo_r, 0.5))
        d1, d2 = np.clip(d1, 0.0, 0.5), np.clip(d2, 0.0, 0.5)
        return np.stack([_power_diff(d1, d2, p, length) for p in range(pmax + 1)]) / self.width

    def tail(self, a: float, upper: bool, jmax: int) -> np.ndarray:
        lo, hi = (float(v) for v in self._ends(a))
        if upper:
            d1, d2 = max(lo, 0.0), max(hi, 0.0)
            length = 0.0 if hi <= 0 else (self.width if lo >= 0 else hi)
        else:
            d1, d2 = max(-hi, 0.0), max(-lo, 0.0)
            length = 0.0 if lo >= 0 else (self.width if hi <= 0 else -lo)
        return np.array([_power_diff(d1, d2, j, length) for j in range(jmax + 1)]) / self.width


# --------------------------------------------------------------------------- any other law


# The narrowest law, in steps, that _Generic integrates to its stated accuracy. Measured
# against the exact bias of floor, ceil and round-to-nearest (closed-form CDFs at 50 digits,
# 8 bits, twelve centres inside a cell, off the grid points): Student t(3) within 2.1e-14
# relative at 1e-4 of a step, 2.2e-13 at 1e-5, 1.4e-12 at 1e-6 and 1.5e-10 at 1e-8; the
# logistic law within 1.7e-15, 6.3e-15, 1.1e-13 and 3.1e-11. The error grows as about
# 1e-18/σ (σ in steps): the panels are measured from grid points, in float64.
_GENERIC_NARROWEST = 1e-4


def _kinks(dist) -> np.ndarray:
    """The standardised points inside the support where a known law's density has a kink
    or jump: triang's mode, trapezoid's corners, loglaplace's 1, irwinhall's integers and
    rv_histogram's bin edges. Off a panel end, Gauss-Legendre integrates across such a
    point only to about 1e-7 (triang) or 1e-4 (a histogram's jump) relative."""
    family = dist.dist
    shapes = family._parse_args(*dist.args, **dist.kwds)[0]
    name = getattr(family, "name", "")
    if isinstance(family, stats.rv_histogram):
        return np.asarray(family._hbins, dtype=float)
    if name == "triang":
        return np.array([float(shapes[0])])
    if name in ("trapezoid", "trapz"):
        return np.array([float(shapes[0]), float(shapes[1])])
    if name == "loglaplace":
        return np.array([1.0])
    if name == "irwinhall":
        return np.arange(float(shapes[0]) + 1.0)
    return np.array([])


class _Generic:
    """Any frozen continuous law, integrated by Gauss-Legendre on graded panels.

    Panels are cut at the half-LSB grid and at ~900 quantiles of the law
    (logit-spaced in the body, a decade apart in the far tails down to 1e-300,
    where scipy's quantile function is finite), at the support's ends, at
    ``loc`` and at the kinks and jumps of the laws :func:`_kinks` knows: a density that is
    smooth between those points is integrated to ~1e-13 relative; any other law with a
    kink or jump inside its support is held only to about 1e-7 to 1e-4 there. A density
    that is infinite at a finite support end (beta with a < 1) is resolved there only to
    float64's spacing of the end: its moments hold to about 1e-8.
    Beyond the last finite quantile a tail's moments are integrated in
    ``y = log(v / v_last)`` on doubling panels, with the integrand formed from
    ``logpdf`` so that ``v**j * f`` neither overflows nor underflows: power-law
    tails decay exponentially in ``y``. It runs to ``|x| = 1e300`` or, where scipy's
    ``logpdf`` stops being finite before that (Student t and Pareto form ``x*x``, which
    overflows at 1e154), to the last ``x`` where it is finite (:meth:`build` finds it);
    beyond that end the density is taken as the power law ``v**-k`` with ``k`` its
    log-slope over the last factor ``e`` of ``v``, whose moments are closed forms. Without
    that remainder a law whose variance barely exists lost most of its MSE: Student t
    with df 2.001 gave 590.6 for 1996.7 (4 bits, step 0.5; 30-digit mpmath).
    """

    def __init__(self, dist, breaks_x, finite, support, scale_x: float,
                 s: float = 1.0, z: int = 0, reach=(-math.inf, math.inf)):
        self.dist = dist
        self.reach = reach
        self.breaks_x = breaks_x
        self.finite = finite
        self.mean_finite, self.var_finite = finite
        self.support = support
        self.lower_unbounded = not math.isfinite(support[0])
        self.upper_unbounded = not math.isfinite(support[1])
        self.scale_x = scale_x
        self.s = s
        self.z = z
        with np.errstate(over="ignore"):
            breaks = breaks_x / s + z
        self.breaks = np.unique(breaks[np.isfinite(breaks)])

    @classmethod
    def build(cls, dist, loc: float, scale: float) -> _Generic:
        lo_sup, hi_sup = (float(v) for v in dist.support())
        p = np.concatenate([_BODY_P, _FAR_P])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            # Quantile functions of some laws overflow or fail in the far tails;
            # those breakpoints are simply dropped.
            warnings.simplefilter("ignore", RuntimeWarning)
            points = np.concatenate([dist.ppf(p), dist.isf(p), [lo_sup, hi_sup, loc],
                                     loc + scale * _kinks(dist)])
            # of the standard law (loc 0, scale 1): the real-unit variance of a law of
            # scale beyond 1e154 overflows, which is no infinite variance
            shapes = dist.dist._parse_args(*dist.args, **dist.kwds)[0]
            mean, var = (float(v) for v in dist.dist.stats(*shapes, moments="mv"))
        breaks = np.unique(points[np.isfinite(points)])
        reach = tuple(cls._reach(dist, loc, scale, breaks, side) for side in (-1.0, 1.0))
        return cls(dist, breaks, (math.isfinite(mean), math.isfinite(var)),
                   (lo_sup, hi_sup), scale, reach=reach)

    @staticmethod
    def _reach(dist, loc: float, scale: float, breaks, side: float) -> float:
        """About the farthest ``x`` on one side (``loc ± d``, ``d <= 1e300``) where scipy's
        ``logpdf`` is finite: the last finite point of 129 log-spaced ``d`` beyond the farthest
        break (the power-law remainder of :meth:`_far_tail` may start anywhere the density
        is a power law); ``±inf`` for a bounded side."""
        if math.isfinite(float(dist.support()[side > 0])):
            return side * math.inf
        near = np.abs(breaks - loc)[(breaks - loc) * side > 0]
        d = np.exp(np.linspace(math.log(max(near.max() if near.size else 0.0, scale)),
                               math.log(1e300), 129))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            finite = np.isfinite(dist.logpdf(loc + side * d))
        # the last finite point before the first non-finite one (the first point if none is)
        last = d.size - 1 if finite.all() else max(int(np.argmin(finite)) - 1, 0)
        return loc + side * float(d[last])

    def lsb(self, s: float, z: int) -> _Generic:
        if self.scale_x < _GENERIC_NARROWEST * s:
            # The panels are measured from grid points up to a step away, so a law this
            # much narrower than a step is held in coordinates float64 resolves to about
            # 1e-16 of a step: its moments came back off by about 1e-18/σ steps (σ = 1e-8
            # of a step, off a grid point: 1.5e-10 of the bias, floor on a Student t(3);
            # σ = 1e-12: 4e-8), silently.
            raise ValueError(
                f"dist's scale {self.scale_x:g} is below {_GENERIC_NARROWEST:g} of the step "
                f"{s:g}: the quadrature for this law cannot resolve it against the grid. "
                "Quantize loc itself for a law that narrow (it is a point mass to the "
                "quantizer), or use scipy.stats.norm, whose closed forms hold down to "
                f"{_CLOSED_NARROWEST:g} of a step")
        return _Generic(self.dist, self.breaks_x, self.finite, self.support, self.scale_x, s, z,
                        self.reach)

    def cdf(self, u: float) -> float:
        return float(self.dist.cdf(self.s * (u - self.z)))

    def sf(self, u: float) -> float:
        return float(self.dist.sf(self.s * (u - self.z)))

    def _panel_moments(self, x_anchor, direction, va, vb, pmax: int) -> np.ndarray:
        """``∫ v^p f_u`` over panels ``v in [va, vb]`` of the local coordinate
        ``v = |u - anchor|``; shape (pmax+1, n_panels)."""
        v = va[:, None] + (vb - va)[:, None] * _GL_X
        x = x_anchor[:, None] + direction[:, None] * self.s * v
        # Nodes of the quantile-graded panels next to a finite support end can
        # round onto it or into subnormals, where a singular density (beta with
        # a < 1) is infinite or makes scipy raise; the mass within 1e-300 of the
        # end is negligible for any integrable density.
        # scipy standardises x before it evaluates the density, so a node one ulp inside an
        # end away from 0 can land on it there: a density that is not finite at a node is
        # taken as 0 (its panel's mass within float64's spacing of the end, below 1e-8).
        inside = (x > self.support[0] + 1e-300) & (x < self.support[1] - 1e-300)
        f = np.zeros_like(x)
        with np.errstate(all="ignore"):
            f[inside] = self.dist.pdf(x[inside])
        f[~np.isfinite(f)] = 0.0
        f *= self.s * _GL_W * np.abs(vb - va)[:, None]
        return np.stack([np.sum(f * v**p, axis=1) for p in range(pmax + 1)])

    def pieces(self, left, anchor_left, pmax: int) -> np.ndarray:
        m = left.size
        lo, hi = left[0], left[-1] + 0.5
        inner = self.breaks[(self.breaks > lo) & (self.breaks < hi)]
        half = lo + 0.5 * np.arange(m + 1)
        edges = np.union1d(half, inner)
        # Each panel's piece by comparison with the half-grid itself: a panel that starts just
        # below a half-grid point must not be given to the piece above it (edge − lo can round
        # onto the point when the law is far narrower than a step).
        owner = np.clip(np.searchsorted(half, edges[:-1], side="right") - 1, 0, m - 1)
        anchor = left[owner] + np.where(anchor_left[owner], 0.0, 0.5)
        direction = np.where(anchor_left[owner], 1.0, -1.0)
        va = np.abs(edges[:-1] - anchor)
        vb = np.abs(edges[1:] - anchor)
        mom = self._panel_moments(self.s * (anchor - self.z), direction, va, vb, pmax)
        return np.stack([np.bincount(owner, weights=mom[p], minlength=m)
                         for p in range(pmax + 1)])

    def _far_tail(self, x_a: float, direction: float, v_last: float, jmax: int) -> np.ndarray:
        """``∫_{v_last}^∞ v^j f_u`` for j = 1..jmax, in ``y = log(v / v_last)``.

        Up to the law's reach (the last ``x`` with a finite ``logpdf``, at most 1e300 from
        ``loc``) by quadrature, beyond it by the power law fitted to the last unit of ``y``.
        ``v`` is carried as its logarithm: on a tiny step it overflows long before ``x``."""
        log_s, log_v0 = math.log(self.s), math.log(v_last)
        reach = self.reach[direction > 0]
        gap = (reach - x_a) * direction
        if not gap > 0:
            return np.zeros(jmax)
        y_max = math.log(gap) - log_s - log_v0
        if y_max <= 0:
            return np.zeros(jmax)

        def log_f(y):  # log f_u at v = v_last e^y
            with np.errstate(all="ignore"):
                return self.dist.logpdf(x_a + direction * np.exp(log_s + log_v0 + y)) + log_s

        edges = np.concatenate([[0.0], 2.0 ** np.arange(-1.0, math.log2(y_max))])
        edges = np.append(edges[edges < y_max], y_max)
        width = np.diff(edges)
        y = edges[:-1, None] + width[:, None] * _GL_X
        lf = log_f(y)
        with np.errstate(all="ignore"):
            out = np.array([np.sum(np.nan_to_num(np.exp((j + 1) * (log_v0 + y) + lf), nan=0.0)
                                   * _GL_W * width[:, None]) for j in range(1, jmax + 1)])
        # Beyond the reach: f_u ~ v^-k, so ∫_V^∞ v^j f_u = V^(j+1) f_u(V) / (k - j - 1).
        h = min(1.0, 0.5 * y_max)
        lf_end, lf_before = (float(v) for v in log_f(np.array([y_max, y_max - h])))
        if math.isfinite(lf_end):
            k = (lf_before - lf_end) / h
            with np.errstate(over="ignore"):  # inf where the moment overflows in LSB
                for j in range(1, jmax + 1):
                    if k > j + 1:
                        out[j - 1] += np.exp((j + 1) * (log_v0 + y_max) + lf_end) / (k - j - 1)
        return out

    def tail(self, a: float, upper: bool, jmax: int) -> np.ndarray:
        x_a = self.s * (a - self.z)
        out = np.empty(jmax + 1)
        out[0] = self.dist.sf(x_a) if upper else self.dist.cdf(x_a)
        if jmax == 0:
            return out
        if upper:
            beyond = self.breaks[self.breaks > a] - a
            unbounded = self.upper_unbounded
        else:
            beyond = a - self.breaks[self.breaks < a][::-1]
            unbounded = self.lower_unbounded
        if beyond.size == 0 and unbounded:
            # The clamp lies beyond every finite quantile: start the far-tail
            # integration one scale unit out.
            beyond = np.array([self.scale_x / self.s])
        edges = np.concatenate([[0.0], beyond])
        direction = 1.0 if upper else -1.0
        n = edges.size - 1
        mom = self._panel_moments(np.full(n, x_a), np.full(n, direction),
                                  edges[:-1], edges[1:], jmax).sum(axis=1)
        out[1:] = mom[1:]
        if unbounded:
            out[1:] += self._far_tail(x_a, direction, edges[-1], jmax)
        return out


# --------------------------------------------------------------------------- law dispatch


def _law_of(dist):
    """Validate ``dist`` and return its law object in real units."""
    if isinstance(dist, (stats.rv_continuous, stats.rv_discrete)):
        name = getattr(dist, "name", type(dist).__name__)
        if getattr(stats, str(name), None) is not dist:
            # not one of scipy.stats' named families (rv_histogram, a user's subclass): its
            # name is no attribute of scipy.stats to freeze
            raise TypeError(
                f"dist is an unfrozen {type(dist).__name__} instance, not a frozen "
                "distribution: freeze it by calling it, e.g. dist() or dist(loc=0.0, scale=1.0)")
        raise TypeError(
            f"dist is the distribution family scipy.stats.{name}, not a distribution: "
            f"freeze it with its parameters, e.g. scipy.stats.{name}(loc=0.0, scale=1.0)"
        )
    family = getattr(dist, "dist", None)
    if isinstance(family, stats.rv_discrete):
        raise TypeError(
            f"dist is a discrete distribution (scipy.stats.{family.name}); the error "
            "moments need a density: pass a frozen continuous distribution such as "
            "scipy.stats.norm(loc, scale)"
        )
    if not isinstance(family, stats.rv_continuous):
        raise TypeError(
            f"dist must be a frozen scipy.stats continuous distribution such as "
            f"scipy.stats.norm(loc, scale), got {type(dist).__name__}"
        )
    shapes, loc, scale = family._parse_args(*dist.args, **dist.kwds)
    if any(np.ndim(v) != 0 for v in (*shapes, loc, scale)):
        raise ValueError(
            "dist has array-valued parameters; error_moments takes one law: "
            "freeze it with scalar parameters"
        )
    loc, scale = float(loc), float(scale)
    if not (math.isfinite(loc) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"dist has loc={loc}, scale={scale}: need finite loc and scale > 0")
    if isinstance(family, type(stats.norm)):
        return _Normal(loc, scale)
    if isinstance(family, type(stats.laplace)):
        return _Laplace(loc, scale)
    if isinstance(family, type(stats.uniform)):
        # placed against the grid exactly, however narrow (see _Uniform)
        return _Uniform(loc, scale)
    if loc + scale == loc:
        # no float64 number between loc and loc + scale: the generic integration's panels
        # cannot hold the mass (0 came back); the closed-form laws above place their ends
        # exactly and hold there
        raise ValueError(f"dist has scale {scale} at loc {loc}: narrower than float64 resolves "
                         "there (a point mass at loc); quantize loc itself for its error")
    return _Generic.build(dist, loc, scale)


def _check_spec(spec) -> QuantSpec:
    check_spec(spec)
    if spec.axis is not None:
        raise ValueError(
            f"spec.axis={spec.axis}: error_moments describes one per-tensor quantizer; "
            "for per-channel quantization call it once per channel with "
            "spec.replace(axis=None) and that channel's scale and zero point"
        )
    return spec


def _check_scale(scale) -> float:
    s = check_positive_finite(scale, "scale")
    if s.size != 1:
        raise ValueError(
            f"scale has {s.size} values; error_moments is per tensor: pass one scalar"
        )
    s = float(s.reshape(()))
    if s < np.finfo(np.float64).tiny:
        # the step's significand lost bits, and σ/s or μ/s can overflow: NaN came back
        raise ValueError(
            f"scale {s!r} is subnormal (below {np.finfo(np.float64).tiny:.3g}): float64 does "
            "not hold it to full precision. The moments in LSB depend only on the law "
            "measured in steps: rescale the law and the step together (e.g. both by 2**600)")
    return s


def _check_zero_point(zero_point, spec: QuantSpec) -> int:
    if isinstance(zero_point, (bool, np.bool_)):
        raise TypeError(f"zero_point must be an integer, got {zero_point!r}")
    z = np.asarray(zero_point)
    if z.size != 1:
        raise ValueError(f"zero_point has {z.size} values; pass one integer")
    if z.dtype.kind == "f":
        if not (np.isfinite(z) and z == np.round(z)):
            raise ValueError(f"zero_point must be an integer, got {zero_point!r}")
    elif z.dtype.kind not in "iu":
        raise TypeError(f"zero_point must be an integer, got {zero_point!r}")
    z = int(z.reshape(()))
    if not spec.qmin <= z <= spec.qmax:
        raise ValueError(
            f"zero_point {z} is outside the integer range [{spec.qmin}, {spec.qmax}] "
            f"of a {spec.bits}-bit {'signed' if spec.signed else 'unsigned'} spec"
        )
    if spec.symmetric and z != 0:
        raise ValueError(
            f"zero_point must be 0 for a symmetric spec, got {z}; "
            "use QuantSpec(symmetric=False) for an affine quantizer"
        )
    return z


# --------------------------------------------------------------------------- the engine

_GRANULAR, _STOCHASTIC, _EDGE = 0, 1, 2


@functools.lru_cache(maxsize=64)
def _plan(mode: RoundingMode, qmin: int, qmax: int):
    """Half-LSB pieces of ``u`` and the two clamped tails, for one mode and range.

    Every piece ``[left, left + 1/2]`` maps to one code ``c`` (the stochastic
    interior excepted) and is anchored at the end nearer to ``c``, at distance
    ``delta`` (0 or 1/2) from it, so that ``|ε| = delta + |u - anchor|`` with
    the sign ``sign`` of ``ε = c - u`` fixed on the piece. Returns
    ``(left, anchor_left, delta, sign, kind, tails)`` with
    ``tails = ((a_low, delta_low), (a_high, delta_high))``.
    """
    # The pieces cover the u whose code can fall in [qmin, qmax]: e = R(u) - u lies in the
    # mode's error interval, so u in [qmin - high, qmax - low]; beyond, each tail is clamped
    # to its end code, at distance high (low end) or -low (high end) from the piece edge.
    interval = mode.interval
    start, stop = qmin - interval.high, qmax - interval.low
    tails = ((start, interval.high), (stop, -interval.low))
    n = round(2 * (stop - start))
    left = start + 0.5 * np.arange(n)
    on_integer = left == np.floor(left)
    kind = np.full(n, _GRANULAR)
    if mode.is_random:
        # Stochastic: inside [qmin, qmax] anchor at the nearer integer (the
        # conditional moments v(1-v) are then computed without cancellation);
        # in the unit below qmin and above qmax the clamped error is exactly
        # qmin - u or qmax - u, and the clamping probability equals |ε|.
        anchor_left = on_integer.copy()
        delta = np.zeros(n)
        kind[:] = _STOCHASTIC
        kind[:2] = _EDGE
        kind[-2:] = _EDGE
        anchor_left[:2] = False
        anchor_left[-2:] = True
        delta[[0, -1]] = 0.5
    else:
        # A piece lies within one step, so it has one code: the mode's own kernel on its
        # midpoint. It is anchored at its end nearer that code.
        code = mode.facts.kernel.numpy(left + 0.25, None, 0)
        anchor_left = np.abs(code - left) <= np.abs(code - (left + 0.5))
        delta = np.minimum(np.abs(code - left), np.abs(code - (left + 0.5)))
    sign = np.where(anchor_left, -1.0, 1.0)
    if mode.is_random:
        sign[:2], sign[-2:] = 1.0, -1.0
    for arr in (left, anchor_left, delta, sign, kind):
        arr.setflags(write=False)
    return left, anchor_left, delta, sign, kind, tails


def _abs_moments(j_mom, delta, pmax: int) -> list:
    """``A_p = ∫ (delta + v)^p f`` from ``J_j = ∫ v^j f`` (binomial, all terms >= 0)."""
    if isinstance(delta, float) and delta == 0:
        # Keeps an infinite J_j (heavy tail) from meeting a zero weight: 0 * inf = nan.
        return list(j_mom[: pmax + 1])
    return [sum(math.comb(p, j) * delta ** (p - j) * j_mom[j] for j in range(p + 1))
            for p in range(pmax + 1)]


@dataclass(frozen=True)
class _LsbMoments:
    bias: float
    mse_granular: float
    mse_clip: float
    mae: float
    p_low: float
    p_high: float


def _tail_moments(law, a: float, upper: bool) -> np.ndarray:
    """``J_0..J_2`` of a clamped tail, ``inf`` where the law's moment diverges."""
    unbounded = law.upper_unbounded if upper else law.lower_unbounded
    jmax = 2
    if unbounded and not law.mean_finite:
        jmax = 0
    elif unbounded and not law.var_finite:
        jmax = 1
    out = np.full(3, np.inf)
    out[: jmax + 1] = law.tail(a, upper, jmax)
    return out


def _moments_lsb(law, mode: RoundingMode, qmin: int, qmax: int) -> _LsbMoments:
    left, anchor_left, delta, sign, kind, tails = _plan(mode, qmin, qmax)
    stochastic = mode.is_random
    pmax = 3 if stochastic else 2
    jm = law.pieces(left, anchor_left, pmax)
    a = _abs_moments(jm, delta, pmax)
    if stochastic:
        inner = kind == _STOCHASTIC
        edge = ~inner
        # Inside the range E[ε|u] = 0 and E[ε²|u] = E|ε|/2 = v(1 - v), v = |u - anchor|.
        v1mv = (jm[1] - jm[2])[inner].sum()
        bias = (sign * a[1])[edge].sum()
        mse_granular = v1mv + (a[2] - a[3])[edge].sum()
        mse_clip = a[3][edge].sum()
        mae = 2.0 * v1mv + a[1][edge].sum()
        p_low = a[1][edge & (sign > 0)].sum()
        p_high = a[1][edge & (sign < 0)].sum()
    else:
        bias = (sign * a[1]).sum()
        mse_granular = a[2].sum()
        mse_clip = 0.0
        mae = a[1].sum()
        p_low = p_high = 0.0
    (a_low, d_low), (a_high, d_high) = tails
    with np.errstate(invalid="ignore"):
        for a_tail, d_tail, upper, sgn in ((a_low, d_low, False, 1.0),
                                           (a_high, d_high, True, -1.0)):
            t = _abs_moments(_tail_moments(law, a_tail, upper), d_tail, 2)
            bias = bias + sgn * t[1]
            mse_clip = mse_clip + t[2]
            mae = mae + t[1]
            if upper:
                p_high = p_high + t[0]
            else:
                p_low = p_low + t[0]
    return _LsbMoments(float(bias), float(mse_granular), float(mse_clip), float(mae),
                       float(p_low), float(p_high))


def uniform_bias_lsb(mode: RoundingMode | str, p_above, p_below):
    """Uniform-noise (Widrow) bias in LSB of data with a point mass on the grid point ``u = 0``.

    Parameters
    ----------
    mode : RoundingMode
    p_above, p_below : float or array
        ``P(u > 0)`` and ``P(u < 0)`` for ``u = x/s + z``; the rest, ``u = 0`` exactly (the
        zeros after a ReLU), is represented without error by every mode.

    Returns
    -------
    float or array
        ``E[e]/s``: 0 for the nearest modes and stochastic rounding, ``∓(p_above + p_below)/2``
        for floor/ceil, ``-(p_above - p_below)/2`` for truncation toward zero.

    Raises
    ------
    ValueError
        A probability outside ``[0, 1]`` or NaN, or ``p_above + p_below`` above 1 (by more
        than 1e-12, room for the rounding of probabilities computed apart).
    """
    p_above, p_below = np.asarray(p_above, dtype=float), np.asarray(p_below, dtype=float)
    for name, p in (("p_above", p_above), ("p_below", p_below)):
        bad = ~((p >= 0.0) & (p <= 1.0))
        if bad.any():
            raise ValueError(f"{name} holds {int(bad.sum())} value(s) outside [0, 1] or NaN "
                             f"(first: {p[bad].flat[0]!r}): pass the probabilities P(u > 0) "
                             "and P(u < 0)")
    total = p_above + p_below
    if (total > 1.0 + 1e-12).any():
        raise ValueError(f"p_above + p_below is {float(total.max())!r}, above 1: they are "
                         "P(u > 0) and P(u < 0) of one law, disjoint events")
    return RoundingMode.parse(mode).uniform.mixture_bias(p_above, p_below)


def _uniform_noise(law, mode: RoundingMode, s: float) -> UniformNoise:
    model = mode.uniform
    bias, mse, mae = model.bias, model.mse, model.mae
    if math.isnan(bias):
        bias = model.mixture_bias(law.sf(0.0), law.cdf(0.0))
    var = mse - bias * bias
    return UniformNoise(bias * s, var * s * s, mse * s * s, mae * s, bias, var, mse, mae)


def _warn_infinite(law, result: _LsbMoments) -> None:
    if law.var_finite:
        return
    if not law.mean_finite:
        what = ("the input law has no mean: the clamped error is unbounded, so mae, mse "
                "and variance are inf and the bias is "
                + ("nan (both tails are heavy: inf - inf)" if math.isnan(result.bias)
                   else f"{result.bias} (one tail is heavy)"))
    else:
        what = ("the input law has infinite variance: the clamped error is unbounded, "
                "so mse, variance and mse_clip are inf (bias and mae are finite)")
    warnings.warn(what, InfiniteMomentWarning, stacklevel=4)


def error_moments(dist, spec: QuantSpec, scale, zero_point=0, *,
                  grid: Grid | str = Grid.INTEGER) -> ErrorMoments:
    """Exact moments of the quantization error for a continuous input law.

    Parameters
    ----------
    dist : frozen scipy.stats continuous distribution
        The law of the input ``x`` in real units, e.g. ``scipy.stats.norm(0, 0.02)``.
        Scalar parameters only.
    spec : QuantSpec
        A per-tensor spec (``spec.axis is None``); its rounding mode, bit width,
        signedness and ``narrow`` flag define ``R``, ``qmin`` and ``qmax``.
    scale : float
        The step ``s > 0``.
    zero_point : int
        In ``[qmin, qmax]``; 0 for a symmetric spec.
    grid : Grid or str, keyword-only
        INTEGER (the quantizer's own grid) or MIDRISE (levels ``(q + 1/2) s``; zero point
        0 only): see :class:`Grid`.

    Returns
    -------
    ErrorMoments
        Exact bias, variance, MSE and MAE of ``e = x̂ - x`` in real and LSB
        units, clamping probabilities at each end, the MSE's granular and
        clipping parts, and the uniform-noise predictions (which ignore clipping).

    Raises
    ------
    TypeError
        ``dist`` is a distribution family (not frozen), a discrete law or not a
        scipy distribution; ``spec`` is not a QuantSpec; ``zero_point`` is not an integer.
    ValueError
        Per-channel spec, non-positive or non-finite scale, zero point out of
        range (or non-zero for a symmetric spec), array-valued law parameters; a law
        other than the normal, Laplace and uniform narrower than 1e-4 of a step (its
        quadrature cannot resolve it against the grid); a normal, Laplace or uniform
        law narrower than 1e-100 of a step or centred beyond 1e150 steps (its closed
        forms overflow float64); a subnormal scale.

    Warns
    -----
    InfiniteMomentWarning
        The law has infinite variance (``mse = variance = inf``) or no mean
        (``mae = inf``, ``bias`` is ``nan`` or ``±inf``); see :class:`ErrorMoments`.

    Notes
    -----
    With ``u = x/s + z`` and ``ε = q - u`` (LSB), ``e = s ε``. For the
    deterministic modes the set of ``u`` mapped to code ``k`` is an interval:
    ``[k - 1/2, k + 1/2]`` for the nearest modes (ties have probability zero,
    so NEAREST_EVEN and NEAREST_AWAY agree), ``[k, k+1)`` for FLOOR,
    ``(k-1, k]`` for CEIL, and for TOWARD_ZERO ``[k, k+1)`` when ``k >= 1``,
    ``(k-1, k]`` when ``k <= -1`` and ``(-1, 1)`` for ``k = 0`` (truncation acts
    on ``u``, so with ``z != 0`` it pulls toward the real value ``-z s``, not 0).
    The end codes absorb the tails. Each interval is cut into half-LSB pieces
    anchored at the end nearer to the code, on which ``|ε| = δ + |u - a|`` with
    ``δ in {0, 1/2}``, so that every moment is a sum of partial moments
    ``J_p = ∫ |u - a|^p f_u(u) du`` (p <= 3) with non-negative weights, and the
    MAE needs no further split. STOCHASTIC rounds ``u`` up with probability
    ``v = u - floor(u)``: ``E[ε|u] = 0``, ``E[ε²|u] = v(1 - v)`` and
    ``E[|ε| | u] = 2 v (1 - v)``; below ``qmin`` (above ``qmax``) the error is
    exactly ``qmin - u`` (``qmax - u``) whatever the draw, and in the unit next
    to the range the code was clamped with probability ``|ε|``, which splits
    the MSE between granular and clipping and adds to ``p_low``/``p_high``.

    Partial moments: for the normal law, Gauss-Legendre (12 nodes) on pieces
    where the log-density changes by at most 4, otherwise differences of upper
    partial moments ``T_j(g) = ∫_g^∞ (t-g)^j φ``, themselves by Gauss-Laguerre
    for ``g >= 2`` where the closed form cancels; for the Laplace law the
    regularised incomplete gamma function (and Gauss-Legendre for the rising
    side's short pieces); for the uniform law exact polynomials. Measured
    against 400-digit references the normal pieces are accurate to ~3e-13
    relative (the worst case deep in the tail, where φ itself is only that
    accurate); each moment is a sum of non-negative terms, except the bias,
    whose absolute error is ~1e-15 of the MAE. Any other law goes through
    Gauss-Legendre on quantile-graded panels (see ``_Generic``) and
    log-substituted panels for the far tails. Against piecewise
    ``scipy.integrate.quad`` at 1e-13 (normal, Laplace, uniform, Student t;
    every mode; σ from 0.05 to 10 steps) every moment agrees to better than
    1e-13 relative, but a bias that nearly cancels (absolute, about 1e-16 of the MAE,
    as above) and the variance of a law much narrower than a step (a difference of
    nearly equal terms). A density infinite at a finite end of its support (beta with
    a < 1) holds to about 1e-8 (``_Generic``). Cost: every bin at once, so O(2^bits)
    array work; about 0.2-0.5 ms per call at 8 bits for the closed-form laws, 7-25 ms
    at 16 bits, and ~5 ms at 8 bits for a generic law. ``variance = mse - bias**2``
    (clamped at 0), which loses relative accuracy when the error is nearly
    constant (a law much narrower than a step): its absolute error is about 1e-16 of
    the MSE.

    Placement. For the normal, Laplace and uniform laws the engine never forms the
    law's centre ``μ/s + z`` in steps (nor the uniform law's ends ``loc + scale`` or
    ``loc/s + z``) in floating point, where its rounding (an ulp of ``|μ/s + z|``) would
    move a narrow law along the grid or across a rounding boundary. Every piece end
    ``u`` is placed by the residual ``μ - (u - z) s`` formed exactly (Dekker's product,
    Knuth's sum; ``u - z`` is exact, so ``z`` acts only through the integer clipping
    bounds) and rounded once, then divided by ``σ``: each end of each piece is known in
    standard units to a few ulps of itself, however narrow the law, far from 0 or large
    the zero point, and the law's centre falls on the side of a boundary that
    :func:`qerror.quantize` decides exactly. Measured against 60-digit mpmath closed
    forms (normal, Laplace, uniform; every mode; widths 1e-10 to 10 steps; centres 0.7
    of the scale beside a rounding boundary and at random; steps 1, 0.2 and 0.037; zero
    points 0, 3 and ±30000 on 3 and 16 bits) the bias is within 1e-15 of the MAE and the
    MSE and MAE within 1e-15 relative (at worst 4.5e-16, 9.1e-16 and 8.5e-16), and the
    clamping probabilities within 2e-13 relative (1.4e-13 at worst: tail values of Φ). These closed forms hold for a width ``σ/s`` (``b/s``,
    ``scale/s``) of at least 1e-100 and a centre within 1e150 steps of 0, on a normal
    (not subnormal) float64 step; outside that range they would overflow float64, and
    the law is refused (a law that narrow is a point mass to the quantizer: quantize
    ``loc``).

    The uniform-noise model (Widrow & Kollár 2008) gives, per LSB: nearest
    bias 0, MSE 1/12, MAE 1/4; FLOOR -1/2, 1/3, 1/2; CEIL +1/2, 1/3, 1/2;
    TOWARD_ZERO ``-(P(u>0) - P(u<0))/2``, 1/3, 1/2; STOCHASTIC 0, 1/6, 1/3. It
    is scaled by ``s`` (and ``s²``) and ignores clipping. It holds when the
    density is smooth on the scale of a step (Widrow's quantizing theorems)
    and fails for narrow inputs, a normal law with σ below about half a step.

    References
    ----------
    .. [1] B. Widrow and I. Kollár, *Quantization Noise: Roundoff Error in
       Digital Computation, Signal Processing, Control, and Communications*.
       Cambridge University Press, 2008.
    """
    law = _law_of(dist)
    spec = _check_spec(spec)
    s = _check_scale(scale)
    z = _check_zero_point(zero_point, spec)
    grid = Grid.parse(grid)
    if grid is Grid.MIDRISE and z != 0:
        raise ValueError(f"a mid-rise grid has no zero point (its levels are (q + 1/2)·s); "
                         f"got zero_point={z}: pass 0")
    return _error_moments(law, spec, s, z, warn=True, grid=grid)


def _error_moments(law, spec: QuantSpec, s: float, z: int, *, warn: bool,
                   grid: Grid = Grid.INTEGER) -> ErrorMoments:
    # The mid-rise quantizer rounds u' = x/s - 1/2 onto the integer codes and returns
    # (q + 1/2) s, so its error is s (q - u'): the integer grid's, on the shifted law.
    u_law = law.lsb(s, z - 0.5 if grid is Grid.MIDRISE else z)
    m = _moments_lsb(u_law, spec.rounding, spec.qmin, spec.qmax)
    if warn:
        _warn_infinite(law, m)
    mse = m.mse_granular + m.mse_clip
    if math.isfinite(mse):
        var = max(mse - m.bias * m.bias, 0.0)
    else:
        var = math.inf
    return ErrorMoments(
        spec=spec, scale=s, zero_point=z,
        bias=m.bias * s, variance=var * s * s, mse=mse * s * s, mae=m.mae * s,
        bias_lsb=m.bias, variance_lsb=var, mse_lsb=mse, mae_lsb=m.mae,
        mse_granular=m.mse_granular * s * s, mse_clip=m.mse_clip * s * s,
        mse_granular_lsb=m.mse_granular, mse_clip_lsb=m.mse_clip,
        p_low=m.p_low, p_high=m.p_high,
        uniform=_uniform_noise(u_law, spec.rounding, s), grid=grid,
    )


# --------------------------------------------------------------------------- optimal clipping

# Coarse log-spaced grid before the bounded Brent refinement: the exact MSE is
# not unimodal in alpha (lattice effects when a step is comparable to the
# density's features), so Brent alone could stop in a poor local minimum.
_CLIP_GRID = 96
_CLIP_DECADES = 5.0
_CLIP_TAIL_P = 1e-15


def _aciq_objective(law, mode: RoundingMode, levels: int, one_sided: bool, granular_mass: bool):
    mse_lsb = mode.uniform.mse

    def objective(alpha: float) -> float:
        if one_sided:
            step = alpha / levels
            clipped = law.tail(alpha, True, 2)[2] + law.tail(0.0, False, 2)[2]
            mass = law.cdf(alpha) - law.cdf(0.0)
        else:
            step = 2.0 * alpha / levels
            clipped = law.tail(alpha, True, 2)[2] + law.tail(-alpha, False, 2)[2]
            mass = law.cdf(alpha) - law.cdf(-alpha)
        return clipped + mse_lsb * step * step * (mass if granular_mass else 1.0)

    return objective


def optimal_clip(dist, bits: int, method: ClipMethod | str,
                 rounding: RoundingMode | str = RoundingMode.NEAREST_EVEN,
                 one_sided: bool = False, *, grid: Grid | str = Grid.INTEGER,
                 granular_mass: bool = False) -> ClipResult:
    """MSE-optimal clipping value for a law, by ACIQ or by the exact MSE.

    Parameters
    ----------
    dist : frozen scipy.stats continuous distribution
        Law of the input in real units, with finite variance.
    bits : int
        2..16.
    method : ClipMethod or {"aciq", "exact"}
    rounding : RoundingMode or str
    one_sided : bool
        False: signed symmetric quantizer, zero point 0, scale ``alpha/qmax``
        (codes ``-2**(bits-1) .. 2**(bits-1)-1``). True: post-ReLU, unsigned,
        zero point 0, range ``[0, alpha]``, scale ``alpha/(2**bits - 1)``;
        ``dist`` is quantized as given, so values below 0 clamp to 0 and count
        as clipping error (pass the law of the non-negative values, e.g.
        ``scipy.stats.halfnorm``, to model a ReLU output without its zeros).
    grid : Grid or str, keyword-only
        The grid on which every exact MSE is taken and EXACT searches: INTEGER (the
        quantizer's own, default) or MIDRISE (ACIQ's). On MIDRISE the clipping value is
        where the cells end, ``α = s 2**(bits-1)`` (one-sided ``s 2**bits``), for both
        methods, so ACIQ and EXACT are then compared on one grid by ``alpha`` as well.
    granular_mass : bool, keyword-only
        ACIQ only: Banner et al.'s objective (False, the default), or a variant that
        weights its granular term by the probability of the unclipped range (True);
        the variant's ``α`` is further from the exact optimum (see Notes).

    Returns
    -------
    ClipResult

    Raises
    ------
    ValueError
        The law has infinite variance (every clipping value gives infinite
        MSE), or, one-sided, no mass above 0; bad ``bits``, ``method`` or ``rounding``;
        EXACT, for a law without closed forms: the MSE still falls at a step of 1e4 times
        the law's scale, beyond which its quadrature cannot evaluate it.
    TypeError
        ``one_sided`` or ``granular_mass`` not a bool (a string such as ``"False"`` would
        read as true).

    Notes
    -----
    ACIQ approximates the MSE as
    ``E[(|x| - α)²; |x| > α] + m Δ² P(|x| <= α)`` (symmetric; one-sided:
    ``E[(x - α)²; x > α] + E[x²; x < 0] + m Δ² P(0 <= x <= α)``), the first
    term exact, the second the uniform-noise MSE per LSB ``m`` of the rounding
    mode (1/12 nearest, 1/3 floor/ceil/toward-zero, 1/6 stochastic) at the
    step ``Δ = 2α/L`` (one-sided ``α/L``), ``L = spec.levels = 2**bits``. For
    nearest rounding and ``granular_mass=False`` the granular term is
    ``Δ²/12 = α²/(3·4^M)``, exactly Banner et al.'s, so their published
    optima are reproduced (the default). ``granular_mass=True`` also
    multiplies it by ``P(|x| <= α)``, the mass that is rounded rather than
    clipped, which lowers ``α`` by up to ~1.3% at 2 bits and by < 0.02% at 8
    bits for the normal and Laplace laws; in exact MSE on ACIQ's own grid that
    is worse nearly everywhere (normal law, nearest rounding: 1.089 against
    1.075 times the exact optimum at 2 bits, 1.047 against 1.040 at 3), so it
    is not Banner's ACIQ and not a refinement of it. ``L`` cells of width ``Δ`` tile ``[-α, α]`` exactly (a
    mid-rise grid). The returned ``scale`` for ACIQ is that step ``Δ``, and
    ``mse_exact`` is the exact MSE at step ``Δ`` on ``grid``: on MIDRISE, ACIQ's own
    grid, which its objective approximates; on INTEGER, the zero-point-0 integer grid
    (range ``[-α, α - Δ]``), which it does not quite describe at few bits. On INTEGER,
    EXACT's ``alpha`` is the largest code's value, ``scale · qmax``: compare the two
    methods there by ``scale`` and ``mse_exact``, not by ``alpha``.

    EXACT minimises :func:`error_moments`'s MSE over ``α``: first on a
    96-point log grid over five decades below ``max(|F⁻¹(1e-15)|, F⁻¹(1 - 1e-15))``
    (the exact MSE is not unimodal in ``α``), then by bounded Brent between the
    grid neighbours of the best point. A local minimum narrower than a grid
    cell (14% of ``α``) can be missed. For a law without closed forms the grid ends
    instead where a step reaches 1e4 times the law's scale, the coarsest step its
    quadrature resolves (heavy tails put that quantile further out: Student t(3)'s is
    1e5 scales); an optimum still falling there is refused.

    References
    ----------
    .. [1] R. Banner, Y. Nahshan and D. Soudry, "Post training 4-bit
       quantization of convolutional networks for rapid-deployment",
       NeurIPS 2019.
    .. [2] B. Widrow and I. Kollár, *Quantization Noise*, Cambridge
       University Press, 2008.
    """
    _law_of(dist)  # validates dist
    one_sided = check_flag(one_sided, "one_sided")
    granular_mass = check_flag(granular_mass, "granular_mass")
    # The clip of a law scaled by 2**e is 2**e times the law's, exactly: work on the law
    # brought to a scale in [0.5, 1), where no MSE over- or underflows (at scale 1e160 every
    # candidate's MSE was inf and the first was returned; at 1e-160 subnormal MSEs moved α
    # by 2%).
    shapes, loc, scale0 = dist.dist._parse_args(*dist.args, **dist.kwds)
    e = math.frexp(float(scale0))[1]
    dist = dist.dist(*shapes, loc=math.ldexp(float(loc), -e),
                     scale=math.ldexp(float(scale0), -e))
    law = _law_of(dist)
    method = ClipMethod.parse(method)
    grid = Grid.parse(grid)
    spec = QuantSpec(bits=bits, signed=not one_sided, symmetric=True, rounding=rounding)
    if not law.var_finite:
        raise ValueError(
            "dist has infinite variance: the clipping error's MSE is infinite for every "
            "clipping value, so no MSE-optimal clip exists; use a percentile range instead"
        )
    hi = float(dist.isf(_CLIP_TAIL_P))
    if one_sided:
        if not hi > 0:
            raise ValueError("dist has no mass above 0: nothing to quantize one-sided")
    else:
        hi = max(hi, -float(dist.ppf(_CLIP_TAIL_P)))
    # alpha -> step: the cells' end on a mid-rise grid (and in ACIQ's model), the largest
    # level on the integer grid.
    per_alpha = (spec.levels if one_sided else spec.levels // 2) \
        if grid is Grid.MIDRISE or method is ClipMethod.ACIQ else spec.qmax
    if method is ClipMethod.ACIQ:
        objective = _aciq_objective(law, spec.rounding, spec.levels, one_sided, granular_mass)
    else:
        def objective(alpha: float) -> float:
            return _error_moments(law, spec, alpha / per_alpha, 0, warn=False, grid=grid).mse
    # The quadrature of a law without closed forms resolves it only down to
    # _GENERIC_NARROWEST of a step, and a heavy tail puts F⁻¹(1e-15) far beyond that
    # (Student t(3): 1e5 scales): the search stops at the coarsest step it can evaluate.
    coarsest = hi
    if method is ClipMethod.EXACT and isinstance(law, _Generic):
        coarsest = per_alpha * law.scale_x / _GENERIC_NARROWEST * (1.0 - 1e-9)
    candidates = min(hi, coarsest) * np.logspace(-_CLIP_DECADES, 0.0, _CLIP_GRID)
    values = np.array([objective(a) for a in candidates])
    best = int(np.argmin(values))
    if coarsest < hi and best == _CLIP_GRID - 1:
        raise ValueError(
            f"the exact MSE still falls at a step of {1.0 / _GENERIC_NARROWEST:g} times "
            "dist's scale, the coarsest step at which this law's quadrature resolves it: "
            "its optimum lies beyond what EXACT can evaluate; use ClipMethod.ACIQ, or "
            "pass the law with a scale nearer its spread")
    lo_b, hi_b = candidates[max(best - 1, 0)], candidates[min(best + 1, _CLIP_GRID - 1)]
    res = optimize.minimize_scalar(objective, bounds=(lo_b, hi_b), method="bounded",
                                   options={"xatol": 1e-10 * candidates[best]})
    alpha, value = (float(res.x), float(res.fun)) if res.fun <= values[best] else (
        float(candidates[best]), float(values[best]))
    # ACIQ optimises the step of its own grid, 2α/L (one-sided α/L): that step, not
    # α/qmax, is the quantizer it recommends, and the one its exact MSE is taken at.
    scale = alpha / per_alpha
    exact = _error_moments(law, spec, scale, 0, warn=False, grid=grid).mse
    with np.errstate(over="ignore", under="ignore"):  # back to the law's own units

        def back(v: float, k: int) -> float:
            return float(np.ldexp(v, k * e))

        return ClipResult(alpha=back(alpha, 1), scale=back(scale, 1), spec=spec,
                          method=method, one_sided=one_sided, mse=back(value, 2),
                          mse_exact=back(exact, 2), grid=grid)
