"""Range calibration: the real range [lo, hi], and the scale and zero point that cover it.

A :class:`~qerror.quantizer.QuantSpec` is the grid (width, sign, symmetry, axis, rounding);
a :class:`RangePolicy` is the separate choice of how the range is found from data (min-max,
a percentile, the MSE-optimal shrink of the min-max range, or ACIQ's clipping value for a
Laplace or normal law fitted to the data), as quantization toolkits keep a quantizer's
configuration apart from its observers.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import stats

from qerror._checks import SeedOrGenerator, check_count, check_finite, check_float_array
from qerror._enums import Choice
from qerror.analytic import ClipMethod, optimal_clip
from qerror.quantizer import (
    QParams,
    QuantSpec,
    check_spec,
    fake_quantize,
    largest_finite,
    working_precision,
)
from qerror.rounding import ArrayLike


class RangeMethod(Choice):
    """How the real range ``[lo, hi]`` (and so scale and zero point) is chosen."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ACIQ = "aciq"


#: The laws ACIQ's range can be fitted with: each one's scale estimate and its law (and the
#: law of its values above 0, for an unsigned grid), in standard form.
ACIQ_LAWS = ("laplace", "normal")


@dataclass(frozen=True)
class RangePolicy:
    """How :func:`calibrate` finds a range from data.

    Parameters
    ----------
    method : RangeMethod or str
        MINMAX: the extremes. PERCENTILE: the ``percentile`` of ``|x|`` (signed symmetric
        grids), of ``max(x, 0)`` over all elements (unsigned symmetric grids: a negative
        value counts as 0, so it moves the percentile down without setting the range), or
        of each tail (affine grids). MSE: the shrink of the min-max range whose
        fake-quantization MSE on the data is smallest. ACIQ: Banner et al.'s clipping
        value for ``aciq_law`` fitted to the data (see Notes), never beyond the min-max
        range.
    percentile : float
        In (0, 100]; above 50 for affine grids (the lower end is the (100 − p)th).
    mse_grid : int
        Number of shrink factors the MSE search tries (at least 2).
    aciq_law : {"laplace", "normal"}
        The law ACIQ assumes (Banner et al. recommend the Laplace law for activations).

    Notes
    -----
    ACIQ's clipping value ``α`` is the law's optimal one for the spec's width and rounding
    mode (:func:`qerror.analytic.optimal_clip`, ``ClipMethod.ACIQ``: Banner et al.'s
    objective; computed once per law, width and mode for the standard law, since the
    optimum scales with the law's scale) times the data's scale estimate, per channel where
    the spec is: on a signed symmetric grid about 0 with the Laplace scale ``mean |x|`` or
    the normal ``sqrt(mean x²)``; on an unsigned grid from the values above 0 alone (a
    ReLU's zeros are exact), one-sided, with the exponential law's ``mean x`` or the
    half-normal's ``sqrt(mean x²)`` of those values; on an affine grid about the mean ``μ``,
    with the spread about it. The quantizer gets ACIQ's step, ``2α/2^b`` (one-sided
    ``α/2^b``), the ``2^b`` cells of its mid-rise grid over ``[-α, α]``: the range is that
    step times the integer grid's codes (signed: ``[-α, α - step]`` as levels, the range
    ``±step·qmax``), as :func:`~qerror.analytic.optimal_clip` evaluates ACIQ on the integer
    grid; a range ``α`` with step ``α/qmax`` would be twice ACIQ's step at 2 bits. The
    range is then cut to the data's own extremes: levels beyond them would never be used.

    References
    ----------
    .. [1] R. Banner, Y. Nahshan, D. Soudry, "Post training 4-bit quantization of
       convolutional networks for rapid-deployment", NeurIPS 2019.
    """

    method: RangeMethod = RangeMethod.MINMAX
    percentile: float = 99.99
    mse_grid: int = 100
    aciq_law: str = "laplace"

    def __post_init__(self):
        object.__setattr__(self, "method", RangeMethod.parse(self.method))
        if isinstance(self.percentile, (bool, np.bool_)) \
                or not isinstance(self.percentile, numbers.Real) \
                or not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        object.__setattr__(self, "mse_grid", check_count(self.mse_grid, "mse_grid", 2))
        if self.aciq_law not in ACIQ_LAWS:
            raise ValueError(f"aciq_law must be one of {', '.join(ACIQ_LAWS)}, got "
                             f"{self.aciq_law!r}")

    def check(self, spec: QuantSpec) -> None:
        """Refuse a policy that cannot give a range on ``spec``'s grid (TypeError where
        ``spec`` is no :class:`~qerror.quantizer.QuantSpec`)."""
        check_spec(spec)
        if self.method is RangeMethod.PERCENTILE and not spec.symmetric \
                and float(self.percentile) <= 50.0:
            raise ValueError(
                f"percentile {self.percentile} gives an empty affine range: the lower end is "
                "the (100 - p)th percentile, so p must be above 50 (e.g. 99.99)")

    @property
    def label(self) -> str:
        """The policy in words, for a run's configuration: ``"min-max"``, ``"99.99th
        percentile"``, ``"MSE-optimal shrink of min-max (100 factors)"``, ``"ACIQ
        (laplace)"``."""
        if self.method is RangeMethod.PERCENTILE:
            return f"{float(self.percentile):g}th percentile"
        if self.method is RangeMethod.MSE:
            return f"MSE-optimal shrink of min-max ({int(self.mse_grid)} factors)"
        if self.method is RangeMethod.ACIQ:
            return f"ACIQ ({self.aciq_law})"
        return "min-max"

    def replace(self, **changes) -> "RangePolicy":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _check_policy(spec: QuantSpec, policy: RangePolicy) -> None:
    """Refuse a ``policy`` that is no :class:`RangePolicy` (a method passed in its place)
    and one that cannot give a range on ``spec``'s grid."""
    if not isinstance(policy, RangePolicy):
        raise TypeError(f"policy must be a RangePolicy, got {type(policy).__name__}: pass "
                        "RangePolicy(method, ...) (e.g. RangePolicy(RangeMethod.MSE)), not "
                        "the method itself")
    policy.check(spec)


def _reduce_dims(x, axis):
    return tuple(d for d in range(x.ndim) if d != axis)


def _to_numpy64(x) -> np.ndarray:
    """float64 numpy copy, at least 1-D (a scalar is calibrated as a 1-element tensor)."""
    if isinstance(x, torch.Tensor):
        return np.atleast_1d(x.detach().cpu().to(torch.float64).numpy())
    return np.atleast_1d(np.asarray(x, dtype=np.float64))


def observed_range(x: ArrayLike, spec: QuantSpec, policy: RangePolicy = RangePolicy()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` of ``x`` by ``policy`` (MSE uses min-max as its start).

    Per tensor the results are numpy float64 scalars; per channel 1-D arrays of length C.
    """
    check_float_array(x, "x")
    check_finite(x, "x")
    _check_policy(spec, policy)
    axis = spec.channel_axis(x)
    return _range(_to_numpy64(x), spec, policy, axis)


def _range(data: np.ndarray, spec: QuantSpec, policy: RangePolicy, axis: int | None):
    """:func:`observed_range` on validated float64 data."""
    dims = _reduce_dims(data, axis) if axis is not None else None
    if policy.method is RangeMethod.PERCENTILE:
        p = float(policy.percentile)
        if spec.symmetric and spec.signed:
            hi = np.percentile(np.abs(data), p, axis=dims)
            return -hi, hi
        if spec.symmetric:  # unsigned, zero point 0: only the positive side is represented
            hi = np.percentile(np.maximum(data, 0.0), p, axis=dims)
            return np.zeros_like(hi)[()], hi  # [()]: a numpy scalar per tensor, as hi is
        # interpolated in units of a power of two near each channel's largest magnitude
        # (exact): between values of opposite signs beyond 9e307 b - a overflowed to inf
        shift = _unit_shift(np.min(data, axis=dims), np.max(data, axis=dims))
        units = np.ldexp(data, _broadcastable(shift, dims))
        return (np.ldexp(np.percentile(units, 100.0 - p, axis=dims), -shift),
                np.ldexp(np.percentile(units, p, axis=dims), -shift))
    lo, hi = np.min(data, axis=dims), np.max(data, axis=dims)
    if policy.method is RangeMethod.ACIQ:
        # In units of a power of two near each channel's largest magnitude (an exact
        # rescaling): the spread's sums and squares of float64 data overflowed above 1e154
        # (the normal law's range became min-max's; an affine mean gave a NaN range) and
        # underflowed to 0 below 1e-162 (a zero range).
        shift = _unit_shift(lo, hi)
        lo_u, hi_u = _aciq_range(np.ldexp(data, _broadcastable(shift, dims)), spec,
                                 policy.aciq_law, dims, np.ldexp(lo, shift), np.ldexp(hi, shift))
        return np.ldexp(lo_u, -shift), np.ldexp(hi_u, -shift)
    return lo, hi


def _broadcastable(value, dims):
    """A reduction of the data over ``dims`` (None: over all of it) given back the reduced
    axes as length-1 axes, so that it broadcasts against the data channel by channel."""
    return value if dims is None else np.expand_dims(value, dims)


def _unit_shift(lo, hi) -> np.ndarray:
    """The power of two that takes each channel's largest magnitude ``max(|lo|, |hi|)`` into
    [0.5, 1) (0 for a channel of zeros): data multiplied by it are computed on without
    overflow or underflow, and results divided by it again exactly."""
    return -np.frexp(np.maximum(np.abs(lo), np.abs(hi)))[1]


@functools.lru_cache(maxsize=None)
def _aciq_unit(law: str, bits: int, rounding, one_sided: bool) -> float:
    """ACIQ's clipping value for the standard law (scale 1) of ``law``: two-sided for the
    Laplace or normal law, one-sided for its values above 0 (exponential, half-normal)."""
    if one_sided:
        dist = stats.expon() if law == "laplace" else stats.halfnorm()
    else:
        dist = stats.laplace() if law == "laplace" else stats.norm()
    return optimal_clip(dist, bits, ClipMethod.ACIQ, rounding, one_sided).alpha


def _aciq_range(data: np.ndarray, spec: QuantSpec, law: str, dims, lo, hi):
    """ACIQ's range (:class:`RangePolicy`'s Notes), cut to the data's extremes ``lo``,
    ``hi``."""
    def spread(d, weight=None):  # the law's scale estimate about 0
        if weight is None:
            weight = np.ones_like(d)
        n = np.maximum(np.sum(weight, axis=dims), 1.0)
        if law == "laplace":
            return np.sum(np.abs(d) * weight, axis=dims) / n
        return np.sqrt(np.sum(d * d * weight, axis=dims) / n)

    cells = 2 ** spec.bits  # ACIQ's step: 2α / 2^b, one-sided α / 2^b
    if spec.symmetric and spec.signed:
        step = 2 * _aciq_unit(law, spec.bits, spec.rounding, False) * spread(data) / cells
        a = np.minimum(step * spec.qmax, np.maximum(np.abs(lo), np.abs(hi)))
        return -a, a
    if spec.symmetric:  # unsigned, zero point 0: the values above 0, one-sided
        step = _aciq_unit(law, spec.bits, spec.rounding, True) * spread(
            data, (data > 0).astype(np.float64)) / cells
        return np.zeros_like(hi), np.minimum(step * spec.qmax, np.maximum(hi, 0.0))
    mu = np.mean(data, axis=dims)
    centred = data - _broadcastable(mu, dims)
    step = 2 * _aciq_unit(law, spec.bits, spec.rounding, False) * spread(centred) / cells
    half = step * (spec.qmax - spec.qmin) / 2
    return np.maximum(mu - half, lo), np.minimum(mu + half, hi)


def qparams_from_range(lo, hi, spec: QuantSpec, *, min_scale: float | None = None,
                       dtype=np.float32) -> QParams:
    """Scale and zero point that map ``[lo, hi]`` onto the spec's integer range.

    Symmetric: ``s = max(|lo|, |hi|) / qmax`` and ``z = 0`` (for an unsigned
    spec this covers ``[0, hi]``: negative values clamp to 0). Affine: the range
    is widened to contain 0 so that 0 is exactly representable, then
    ``s = (hi - lo) / (qmax - qmin)`` and ``z = qmin - round(lo / s)``, as PyTorch's
    observers compute them: rounding ``z`` shifts the grid
    ``[s (qmin - z), s (qmax - z)]`` against ``[lo, hi]`` by less than half a step, so one
    end of the range can lie up to half a step beyond the grid. Round-to-nearest maps it
    onto the grid's last code; a directed mode (floor at the lower end, ceiling at the
    upper, stochastic rounding at either) can step past it and clamp, counted as
    saturation.
    A zero-width range gets ``s = 1``: any scale represents it exactly. A scale
    below ``min_scale`` (a positive finite number; by default the smallest normal number of
    the precision data of ``dtype`` are quantized in,
    :func:`~qerror.quantizer.working_precision`) is raised to it, so that it survives
    rounding to that precision.

    ``dtype`` (numpy or torch; float32 by default) is the data's: a scale above
    ``spec.max_scale(z, dtype)`` (:meth:`~qerror.quantizer.QuantSpec.max_scale`), whose
    grid's ends ``s (qmin - z)`` or ``s (qmax - z)`` fake-quantize to ``±inf`` (a range
    reaching within about a step of the format's largest number, as ``±float32 max``
    does: ``127 s`` rounds above it), is lowered to it, and an affine zero point found
    again for the lowered scale. No level then leaves the format, and each end of the
    range lies within one step of the grid (up to the lowered scale's rounding, an ulp):
    on a signed symmetric grid of ``-128..127``, ``s (qmin - z)`` bounds the scale, so
    the range's upper end clamps to ``127 s``, counted as saturation; on an affine grid the
    zero point found again keeps the lower end within half a step, and the upper can be a
    step beyond. A range beyond ``dtype``'s largest number, which no data of that dtype
    have, is refused.
    """
    check_spec(spec)
    if min_scale is None:
        min_scale = float(np.finfo(working_precision(dtype)).tiny)
    elif isinstance(min_scale, (bool, np.bool_)) or not isinstance(min_scale, numbers.Real) \
            or not (math.isfinite(float(min_scale)) and float(min_scale) > 0.0):
        raise ValueError(f"min_scale must be a positive finite number (the smallest scale "
                         f"to give), got {min_scale!r}")

    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.size == 0 or hi.size == 0:
        raise ValueError(f"range bounds are empty (lo has shape {lo.shape}, hi {hi.shape}): "
                         "give one bound per tensor or one per channel")
    if lo.shape != hi.shape and lo.ndim and hi.ndim:
        raise ValueError(f"range bounds of different shapes: lo {lo.shape}, hi {hi.shape}; give "
                         "one (lo, hi) pair per channel, or a scalar for every channel")
    if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)):
        raise ValueError("range bounds must be finite")
    if np.any(lo > hi):
        raise ValueError(f"range has lo > hi: lo={lo}, hi={hi}")
    top = largest_finite(dtype)
    if np.any(np.maximum(np.abs(lo), np.abs(hi)) > top):
        raise ValueError(
            f"range [{np.min(lo):.6g}, {np.max(hi):.6g}] reaches beyond {top:.6g}, the largest "
            f"number of the data's dtype {dtype}: no grid for such data covers it; pass the "
            "dtype of the data it was found on (dtype=numpy.float64 for float64 data)")
    if spec.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if spec.signed else np.maximum(hi, 0.0)
        scale = np.where(amax > 0, np.maximum(amax / spec.qmax, min_scale), 1.0)
        scale = np.minimum(scale, spec.max_scale(0, dtype))
        zp = np.zeros(scale.shape, dtype=np.int64)
    else:
        lo0 = np.minimum(lo, 0.0)
        hi0 = np.maximum(hi, 0.0)
        steps = spec.qmax - spec.qmin
        with np.errstate(over="ignore"):
            width = hi0 - lo0
        # a width beyond float64 (a range near ±1.8e308) divided before subtracting
        per_step = np.where(np.isfinite(width), width / steps, hi0 / steps - lo0 / steps)
        scale = np.where(width > 0, np.maximum(per_step, min_scale), 1.0)
        zp = np.clip(spec.qmin - np.rint(lo0 / scale), spec.qmin, spec.qmax).astype(np.int64)
        # Lowered to the largest scale whose grid about that zero point is finite, the zero
        # point is found again: its side of the grid can only gain steps, and no more than
        # the lowered scale allows (|lo0| / max_scale(k) rounds to at most k).
        cap = spec.max_scale(zp, dtype)
        lowered = scale > cap
        if np.any(lowered):
            scale = np.where(lowered, cap, scale)
            zp = np.where(lowered, np.clip(spec.qmin - np.rint(lo0 / scale), spec.qmin,
                                           spec.qmax), zp).astype(np.int64)
    if scale.ndim == 0:
        return QParams(float(scale), int(zp))
    return QParams(scale, zp)


def calibrate(x: ArrayLike, spec: QuantSpec, policy: RangePolicy = RangePolicy(), *,
              generator: SeedOrGenerator | None = None) -> QParams:
    """Choose scale and zero point of ``spec``'s grid for ``x`` by ``policy``.

    MSE searches ``policy.mse_grid`` shrink factors ``c`` in ``(0, 1]`` of the
    min-max range and keeps, per tensor or per channel, the one whose
    fake-quantization MSE on ``x`` (computed in float64) is smallest (ties go to the
    widest range). ``generator`` drives stochastic rounding in that search.
    """
    check_float_array(x, "x")
    check_finite(x, "x")
    _check_policy(spec, policy)
    axis = spec.channel_axis(x)
    data = _to_numpy64(x)
    lo, hi = _range(data, spec, policy, axis)
    if policy.method is not RangeMethod.MSE:
        return qparams_from_range(lo, hi, spec, dtype=x.dtype)
    dims = _reduce_dims(data, axis) if axis is not None else None
    # Squared errors of data near float64's ends overflow (above 1e154) or underflow to 0
    # (below 1e-162, where every shrink tied and the min-max range won): each channel's are
    # compared in units of a power of two near its largest magnitude (an exact rescaling,
    # which leaves every comparison as it was). The min-max range MSE starts from gives it.
    shift = _broadcastable(_unit_shift(lo, hi), dims)
    best_err = np.full(np.shape(lo), np.inf)
    best_scale = np.ones(np.shape(lo))
    best_zp = np.zeros(np.shape(lo), dtype=np.int64)
    for c in np.linspace(1.0, 1.0 / policy.mse_grid, policy.mse_grid):
        params = qparams_from_range(lo * c, hi * c, spec, dtype=x.dtype)
        xq = fake_quantize(data, spec, params.scale, params.zero_point, generator=generator)
        err = np.mean(np.ldexp(xq - data, shift) ** 2, axis=dims)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, params.scale, best_scale)
        best_zp = np.where(better, params.zero_point, best_zp)
    if np.ndim(best_scale) == 0:
        return QParams(float(best_scale), int(best_zp))
    return QParams(best_scale, best_zp.astype(np.int64))
