"""Streaming, mergeable accumulators for quantization-error statistics.

:class:`ErrorStats` sees the error ``e = x̂ - x`` (the README's Conventions) batch by batch and
keeps, in O(bins + channels) memory: the count, mean and centred second moment
(Welford/Chan), the sums of ``|e|`` and ``e²``, min and max, a fixed-bin
histogram of ``e/s`` in LSB units with under- and overflow, and the counts
saturated at ``qmin`` and at ``qmax``. Two accumulators merge as if one had seen
all the data, so statistics can be gathered per worker, per layer or per batch and
combined afterwards: the count, min, max, histogram and saturation counts exactly,
the moments to float64 round-off (they add in another order, so a merge, one pass
over all the data and another order of merging may differ in the last bits).

numpy arrays and torch tensors go through the same torch code, so on the CPU, with the
same number of threads, both give bit-identical statistics for the same values. Another
number of threads or a GPU tensor adds the sums in another order: the same counts,
extrema and histogram, moments equal to float64 round-off.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from qerror._checks import (
    check_count,
    check_finite,
    check_float_array,
    check_positive_finite,
    is_integer_dtype,
)
from qerror.quantizer import Saturation
from qerror.rounding import ArrayLike

# Elements per working block. Each block is widened to float64 in a reused 512 KiB
# buffer that stays in cache (with its scratch and index buffers 1.25 MiB, within one
# core's L2), so the float64 reductions cost cache bandwidth, not extra passes over main
# memory, and no tensor-sized temporary is ever allocated. With 2 MiB blocks, which
# overflow the 2 MiB L2 of the Intel Xeon machines of this kind, an update took about
# 1.5 times one bare pass there, against 1.3 with these.
_BLOCK = 1 << 16

# Smallest normal float64. A histogram step s·w below it (subnormal or 0) has lost bits or is 0,
# so e / (s·w) would put values in the wrong bins or divide by zero.
_NORMAL_MIN = float(np.finfo(np.float64).tiny)


@dataclass(frozen=True)
class HistogramBins:
    """Equal-width histogram bins over ``[low, high)`` in LSB units.

    Parameters
    ----------
    low, high : float
        Range covered by the bins, ``low < high``.
    count : int
        Number of bins; the default gives 1/64-LSB bins over ``[-1.5, 1.5)``,
        which holds the granular error of every rounding mode.

    Raises
    ------
    ValueError
        If ``low >= high``, either is not finite, or the width is not a normal float64.

    Notes
    -----
    Bin ``k`` (``0 <= k < count``) holds ``low + k w <= ε < low + (k+1) w`` with
    ``w = (high - low) / count``; values below ``low`` count as underflow and
    values at or above ``high`` as overflow. The bin of ``ε = e/s`` is
    ``floor(e / (s w) - low / w)`` evaluated in float64, so a value within
    float64 round-off of an edge may fall on either side of it; with ``s w`` a
    power of two and ``low / w`` an integer (the default with ``s`` a power of
    two) the assignment is exact.
    """

    low: float = -1.5
    high: float = 1.5
    count: int = 192

    def __post_init__(self):
        count = check_count(self.count, "count", 1)
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ValueError(f"need finite low < high, got low={self.low}, high={self.high}")
        width = (high - low) / count
        if not _NORMAL_MIN <= width < math.inf:
            raise ValueError(
                f"bins of width (high - low) / count = {width!r} (low={low}, high={high}, "
                f"count={count}) are not a normal float64, so values cannot be placed in them; "
                "choose a range and count whose width lies within [2.2e-308, 1.8e308]"
            )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "count", count)

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.count

    @property
    def edges(self) -> np.ndarray:
        """The ``count + 1`` bin edges, float64."""
        return np.linspace(self.low, self.high, self.count + 1)


@dataclass(frozen=True)
class ErrorSummary:
    """A snapshot of an :class:`ErrorStats` (units of the error unless stated).

    Per-tensor accumulators give Python scalars; per-channel ones give arrays of
    shape ``(C,)`` for every moment and saturation field. ``variance`` is the
    population variance (divisor ``n``), ``sample_variance`` divides by ``n - 1``
    and ``sem`` is ``sqrt(sample_variance / n)``. The saturation fractions are
    relative to ``saturation_observed``, the elements per channel for which
    saturation was reported (NaN when none was).
    """

    n: int
    mean: float | np.ndarray
    variance: float | np.ndarray
    sample_variance: float | np.ndarray
    std: float | np.ndarray
    sem: float | np.ndarray
    mse: float | np.ndarray
    rmse: float | np.ndarray
    mae: float | np.ndarray
    min: float | np.ndarray
    max: float | np.ndarray
    saturation_low: int | np.ndarray
    saturation_high: int | np.ndarray
    saturation_observed: int
    frac_low: float | np.ndarray
    frac_high: float | np.ndarray
    histogram: np.ndarray
    underflow: int
    overflow: int
    bins: HistogramBins


class ErrorStats:
    """Mergeable streaming statistics of a quantization error.

    Parameters
    ----------
    axis : int or None
        Channel axis of the errors passed to :meth:`update` for per-channel
        moments, extrema and saturation counts; None pools everything. The
        histogram is always pooled (it is in LSB units, comparable across
        channels with different scales).
    bins : HistogramBins
        Histogram of ``e/s`` in LSB.

    Notes
    -----
    A batch of ``k`` values is reduced in float64 around a shift ``c`` (the
    mean of its first block): ``S1 = Σ(e - c)``, ``S2 = Σ(e - c)²``, giving the
    batch mean ``c + S1/k`` and centred moment ``M2 = S2 - S1²/k``, which is
    free of the cancellation of ``Σe² - (Σe)²/k`` whenever ``c`` is near the
    mean. Batches and accumulators combine by Chan et al.'s rule

    .. math:: n = n_a + n_b,\\quad \\delta = \\bar e_b - \\bar e_a,\\quad
              \\bar e = \\bar e_a + \\delta\\, n_b/n,\\quad
              M_2 = M_{2,a} + M_{2,b} + \\delta^2 n_a n_b / n .

    ``Σe²`` and ``Σ|e|`` are accumulated directly, so ``mse`` is the mean of
    ``e²`` itself rather than ``variance + mean²``. float32 values and their
    squares are exact in float64, so these two carry only the rounding of the
    float64 sums.

    Merges are exact in the count, extrema, histogram and saturation counts and
    exact up to float64 rounding in the moments, not bit for bit equal to one pass
    over all the data. Each merge uses means rounded to float64, so where the mean
    is large against the standard deviation ``σ`` the merged ``M2`` can carry a
    relative error up to the order of ``u |ē| / σ`` (``u = 2**-53``; the bound of [1]_ for
    pairwise updating), against ``u (ē / σ)²`` for ``Σe² - (Σe)²/k``.

    References
    ----------
    .. [1] T. F. Chan, G. H. Golub, R. J. LeVeque, "Algorithms for computing the
       sample variance: analysis and recommendations", The American
       Statistician 37(3), 1983.
    .. [2] B. P. Welford, "Note on a method for calculating corrected sums of
       squares and products", Technometrics 4(3), 1962.
    """

    def __init__(self, *, axis: int | None = None, bins: HistogramBins = HistogramBins()):
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        if not isinstance(bins, HistogramBins):
            raise TypeError(f"bins must be a HistogramBins, got {type(bins).__name__}")
        self._axis = None if axis is None else int(axis)
        self._bins = bins
        self._count = 0
        self._channels: int | None = None
        self._moments: _Moments | None = None
        self._hist = np.zeros(bins.count + 2, dtype=np.int64)
        self._sat_low: np.ndarray | None = None
        self._sat_high: np.ndarray | None = None
        self._sat_observed = 0

    # ------------------------------------------------------------------ feeding

    def update(
        self,
        error: ArrayLike,
        *,
        scale=None,
        scale_axis: int | None = None,
        codes: ArrayLike | None = None,
        qmin: int | None = None,
        qmax: int | None = None,
        low_mask: ArrayLike | None = None,
        high_mask: ArrayLike | None = None,
        saturation: Saturation | None = None,
    ) -> ErrorStats:
        """Add a batch of errors; the state changes only if the whole batch is valid.

        Parameters
        ----------
        error : numpy.ndarray or torch.Tensor, any shape
            Finite floating-point errors ``e = x̂ - x``.
        scale : float or array of shape (C,), optional
            Quantization step, to express the histogram in LSB (``e/s``). None
            means ``error`` is in LSB already. A per-channel scale lies along
            the accumulator's ``axis``, or along ``scale_axis`` when the
            accumulator pools channels.
        scale_axis : int, optional
            Axis of a per-channel ``scale`` for a pooled (``axis=None``) accumulator.
        codes : integer array or tensor, same shape as ``error``, optional
            Integer codes; those equal to ``qmin`` / ``qmax`` count as saturated
            low / high (codes on a rail include values that rounded onto it).
        qmin, qmax : int
            The integer range, required with ``codes``.
        low_mask, high_mask : bool arrays or tensors, same shape as ``error``, optional
            Elements clamped at the low / high end, both required together.
        saturation : Saturation, optional
            Counts from ``quantize(..., return_saturation=True)`` for this batch.

        Returns
        -------
        ErrorStats
            ``self``, so updates chain.

        Raises
        ------
        TypeError
            A non-float error, non-integer codes, qmin or qmax, or non-boolean masks.
        ValueError
            NaN/Inf in ``error``, an empty batch, mismatched shapes or channel
            counts, a non-positive scale or one whose product with the bin width is
            not a normal float64, codes outside ``[qmin, qmax]``, an element in both
            masks, or more than one saturation source.
        """
        e = _as_tensor(error, "error")
        stat_axis = _normalise_axis(self._axis, e.ndim, "axis")
        sw, view_axis = self._scale_divisor(scale, scale_axis, e, stat_axis)
        a, c, b = _split_shape(e.shape, view_axis)
        per_channel = stat_axis is not None
        if per_channel and self._channels is not None and c != self._channels:
            raise ValueError(
                f"this accumulator has {self._channels} channels along axis {self._axis}, "
                f"but the error has {c} (shape {tuple(e.shape)})"
            )
        with torch.no_grad():
            e3 = e.reshape(a, c, b)
            sat = _saturation_counts(e, e3.shape, per_channel, codes, qmin, qmax,
                                     low_mask, high_mask, saturation)
            batch, hist = _reduce_batch(e3, error, per_channel, sw, self._bins)
        self._commit(batch, hist, sat, c if per_channel else None)
        return self

    def merge(self, other: ErrorStats) -> ErrorStats:
        """Fold ``other`` into this accumulator (``other`` is unchanged); returns ``self``.

        The count, extrema, histogram and saturation counts become exactly those of
        one accumulator fed both streams; the moments equal them to float64 round-off
        (see the class Notes).

        Raises
        ------
        ValueError
            If the axes, histogram bins or channel counts differ.
        """
        if not isinstance(other, ErrorStats):
            raise TypeError(f"can only merge an ErrorStats, got {type(other).__name__}")
        if other._axis != self._axis:
            raise ValueError(f"cannot merge axis={other._axis} into axis={self._axis}")
        if other._bins != self._bins:
            raise ValueError(f"cannot merge histograms with different bins: "
                             f"{other._bins} vs {self._bins}")
        if (self._channels is not None and other._channels is not None
                and self._channels != other._channels):
            raise ValueError(f"cannot merge {other._channels} channels into {self._channels}")
        if other._count == 0:
            return self
        sat = None
        if other._sat_observed:
            sat = (other._sat_low, other._sat_high, other._sat_observed)
        self._commit(other._moments, other._hist, sat, other._channels)
        return self

    def copy(self) -> ErrorStats:
        """An independent accumulator with the same state."""
        new = ErrorStats(axis=self._axis, bins=self._bins)
        return new.merge(self)

    def _scale_divisor(self, scale, scale_axis, e, stat_axis):
        """``(s·w, channel axis of the view)`` with ``s·w`` a float or a (1, C, 1) tensor."""
        width = self._bins.width
        if scale is None:
            if scale_axis is not None:
                raise ValueError("scale_axis given without a scale")
            return width, stat_axis
        given = check_positive_finite(scale, "scale")
        s = given.reshape(-1)
        step = s * width
        normal = (step >= _NORMAL_MIN) & (step < np.inf)
        if not normal.all():
            bad = float(s[~normal][0])
            raise ValueError(
                f"scale {bad!r} times the bin width {width!r} is {bad * width!r}, not a normal "
                "float64, so e/s cannot be binned; multiply the error and the scale by the same "
                "power of two to bring the scale nearer 1"
            )
        # an array of one value with scale_axis is one channel's scale (a layer with one
        # output channel), checked against that axis below like any per-channel scale
        if given.ndim == 0 or (s.size == 1 and scale_axis is None):
            if scale_axis is not None:
                raise ValueError("scale_axis given with a scalar scale")
            return float(step[0]), stat_axis
        if scale_axis is None:
            if stat_axis is None:
                raise ValueError(
                    f"scale has {s.size} values but this accumulator pools channels "
                    "(axis=None); pass scale_axis= to say which axis they belong to"
                )
            s_axis = stat_axis
        else:
            s_axis = _normalise_axis(scale_axis, e.ndim, "scale_axis")
            if stat_axis is not None and s_axis != stat_axis:
                raise ValueError(f"scale_axis={scale_axis} differs from the accumulator's "
                                 f"axis={self._axis}; per-channel scale must lie along it")
        if s.size != e.shape[s_axis]:
            raise ValueError(f"scale has {s.size} values but axis {s_axis} of the error "
                             f"has {e.shape[s_axis]} channels")
        sw = torch.as_tensor(step, dtype=torch.float64, device=e.device)
        return sw.reshape(1, -1, 1), s_axis

    def _commit(self, batch: _Moments, hist: np.ndarray, sat, channels: int | None):
        """Merge reduced batch (or accumulator) state; nothing here can fail."""
        if channels is not None:
            self._channels = channels
        self._moments = batch.copy() if self._moments is None else self._moments.merged(batch)
        self._count = self._moments.count
        self._hist = self._hist + hist
        if sat is not None:
            low, high, observed = sat
            if self._sat_low is None:
                self._sat_low, self._sat_high = low.copy(), high.copy()
            else:
                self._sat_low = self._sat_low + low
                self._sat_high = self._sat_high + high
            self._sat_observed += observed

    # ------------------------------------------------------------------ results

    @property
    def axis(self) -> int | None:
        return self._axis

    @property
    def bins(self) -> HistogramBins:
        return self._bins

    @property
    def channels(self) -> int | None:
        """Number of channels (None for a pooled accumulator or before any data)."""
        return self._channels

    @property
    def count(self) -> int:
        """Number of values seen (per channel for a per-channel accumulator)."""
        return self._count

    def _need_data(self) -> _Moments:
        if self._moments is None:
            raise ValueError("ErrorStats holds no data yet; call update() first")
        return self._moments

    def _out(self, values: np.ndarray):
        if self._axis is None:
            return values.item()
        return values.copy()

    @property
    def mean(self):
        return self._out(self._need_data().mean)

    @property
    def variance(self):
        """Population variance ``M2 / n``."""
        m = self._need_data()
        return self._out(m.m2 / m.count)

    @property
    def sample_variance(self):
        """Unbiased variance ``M2 / (n - 1)``; NaN when ``n < 2``."""
        m = self._need_data()
        return self._out(m.m2 / (m.count - 1) if m.count > 1 else np.full_like(m.m2, np.nan))

    @property
    def std(self):
        """Population standard deviation."""
        m = self._need_data()
        return self._out(np.sqrt(m.m2 / m.count))

    @property
    def sem(self):
        """Standard error of the mean ``sqrt(sample_variance / n)``; NaN when ``n < 2``."""
        m = self._need_data()
        if m.count < 2:
            return self._out(np.full_like(m.m2, np.nan))
        return self._out(np.sqrt(m.m2 / (m.count - 1) / m.count))

    @property
    def mse(self):
        """Mean of ``e²``."""
        m = self._need_data()
        return self._out(m.sq_sum / m.count)

    @property
    def rmse(self):
        m = self._need_data()
        return self._out(np.sqrt(m.sq_sum / m.count))

    @property
    def mae(self):
        """Mean of ``|e|``."""
        m = self._need_data()
        return self._out(m.abs_sum / m.count)

    @property
    def min(self):
        return self._out(self._need_data().lo)

    @property
    def max(self):
        return self._out(self._need_data().hi)

    @property
    def histogram(self) -> np.ndarray:
        """Counts per bin of ``bins``, shape ``(bins.count,)``, int64."""
        return self._hist[1:-1].copy()

    @property
    def underflow(self) -> int:
        """Values below ``bins.low`` LSB."""
        return int(self._hist[0])

    @property
    def overflow(self) -> int:
        """Values at or above ``bins.high`` LSB."""
        return int(self._hist[-1])

    @property
    def saturation_observed(self) -> int:
        """Values per channel for which saturation was reported."""
        return self._sat_observed

    @property
    def saturation_low(self):
        """Values saturated at ``qmin`` (0 when saturation was never reported)."""
        return self._sat_out(self._sat_low)

    @property
    def saturation_high(self):
        """Values saturated at ``qmax`` (0 when saturation was never reported)."""
        return self._sat_out(self._sat_high)

    def _sat_out(self, counts):
        if counts is None:
            zeros = np.zeros(self._moment_shape(), dtype=np.int64)
            return self._out(zeros)
        return self._out(counts)

    def _moment_shape(self):
        return (self._channels,) if self._axis is not None and self._channels else ()

    def summary(self) -> ErrorSummary:
        """All statistics at once, as a frozen :class:`ErrorSummary`."""
        m = self._need_data()
        low = np.asarray(self.saturation_low)
        high = np.asarray(self.saturation_high)
        obs = self._sat_observed
        with np.errstate(invalid="ignore", divide="ignore"):
            frac_low = self._out(low / obs if obs else np.full(low.shape, np.nan))
            frac_high = self._out(high / obs if obs else np.full(high.shape, np.nan))
        hist = self.histogram
        hist.flags.writeable = False
        return ErrorSummary(
            n=m.count, mean=self.mean, variance=self.variance,
            sample_variance=self.sample_variance, std=self.std, sem=self.sem,
            mse=self.mse, rmse=self.rmse, mae=self.mae, min=self.min, max=self.max,
            saturation_low=self.saturation_low, saturation_high=self.saturation_high,
            saturation_observed=obs, frac_low=frac_low, frac_high=frac_high,
            histogram=hist, underflow=self.underflow, overflow=self.overflow,
            bins=self._bins,
        )

    def __repr__(self) -> str:
        head = f"ErrorStats(axis={self._axis}, n={self._count}"
        if self._moments is None or self._axis is not None:
            return head + (f", channels={self._channels})" if self._channels else ")")
        return head + f", mean={self.mean:.6g}, std={self.std:.6g}, mse={self.mse:.6g})"


def measure_error(
    x: ArrayLike,
    x_hat: ArrayLike,
    *,
    scale=None,
    axis: int | None = None,
    scale_axis: int | None = None,
    codes: ArrayLike | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    bins: HistogramBins = HistogramBins(),
) -> ErrorStats:
    """Statistics of ``e = x_hat - x`` in one call.

    Parameters
    ----------
    x, x_hat : numpy.ndarray or torch.Tensor, same shape
        Reference and quantized (or fake-quantized) values.
    scale, axis, scale_axis, codes, qmin, qmax, bins
        As for :class:`ErrorStats` and :meth:`ErrorStats.update`.

    Returns
    -------
    ErrorStats

    Notes
    -----
    The difference is formed in float64, in one float64 tensor of the inputs' shape (the
    memory of 4 float16 or 2 float32 copies of the data; :meth:`ErrorStats.update` itself
    widens in blocks). It is exact for float16 data; for
    bfloat16 and float32 data unless one of ``|x_hat|``, ``|x|`` exceeds the other by a
    factor of more than 2**44 and 2**28 respectively; for float64 data whenever they lie
    within a factor two of each other (Sterbenz). Otherwise it carries one float64 rounding.
    Formed in a half-precision dtype it would be rounded wherever ``x_hat`` and ``x`` are
    not within a factor two: values below one LSB rounded up or stochastically, clipped
    values.
    """
    x_t = _as_tensor(x, "x")
    xh_t = _as_tensor(x_hat, "x_hat")
    if x_t.shape != xh_t.shape:
        raise ValueError(f"x has shape {tuple(x_t.shape)} but x_hat has {tuple(xh_t.shape)}")
    if x_t.device != xh_t.device:
        raise ValueError(f"x is on {x_t.device} but x_hat is on {xh_t.device}")
    with torch.no_grad():
        # a copy even where x_hat is float64 already: the subtraction is in place
        error = xh_t.to(torch.float64, copy=True).sub_(x_t)
    stats = ErrorStats(axis=axis, bins=bins)
    return stats.update(error, scale=scale, scale_axis=scale_axis, codes=codes,
                        qmin=qmin, qmax=qmax)


# --------------------------------------------------------------------------- internals


@dataclass
class _Moments:
    """Per-channel (or 0-d) float64 moments; ``count`` is shared by all channels."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    sq_sum: np.ndarray
    abs_sum: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def copy(self) -> _Moments:
        return _Moments(self.count, *(v.copy() for v in (
            self.mean, self.m2, self.sq_sum, self.abs_sum, self.lo, self.hi)))

    def merged(self, other: _Moments) -> _Moments:
        n = self.count + other.count
        delta = other.mean - self.mean
        # Python ints keep n_a n_b exact; the float products stay well inside range.
        return _Moments(
            count=n,
            mean=self.mean + delta * (other.count / n),
            m2=self.m2 + other.m2 + delta * delta * (self.count * other.count / n),
            sq_sum=self.sq_sum + other.sq_sum,
            abs_sum=self.abs_sum + other.abs_sum,
            lo=np.minimum(self.lo, other.lo),
            hi=np.maximum(self.hi, other.hi),
        )


def _as_tensor(x, name: str) -> torch.Tensor:
    """A float tensor sharing memory with ``x`` where possible (never written to)."""
    check_float_array(x, name)
    if isinstance(x, torch.Tensor):
        return x.detach()
    return _numpy_to_torch(x)


def _numpy_to_torch(x: np.ndarray) -> torch.Tensor:
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if any(st < 0 for st in x.strides):
        x = np.ascontiguousarray(x)
    with warnings.catch_warnings():
        # Read-only arrays are fine: the tensor is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


def _normalise_axis(axis, ndim: int, name: str) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an error with {ndim} dimension(s)")
    return axis % ndim


def _split_shape(shape, axis: int | None) -> tuple[int, int, int]:
    """``(A, C, B)`` such that the error viewed as (A, C, B) has channels in the middle."""
    if axis is None:
        return 1, 1, math.prod(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _blocks(a: int, c: int, b: int):
    """Index pairs (rows, cols) covering an (A, C, B) view in blocks of about ``_BLOCK``."""
    if c * b <= _BLOCK:
        rows = max(1, _BLOCK // (c * b))
        for i in range(0, a, rows):
            yield slice(i, min(i + rows, a)), slice(0, b)
    else:
        cols = max(1, _BLOCK // c)
        for i in range(a):
            for j in range(0, b, cols):
                yield slice(i, i + 1), slice(j, min(j + cols, b))


def _sum_squares(x: torch.Tensor, scratch: torch.Tensor, dims):
    if dims is None:
        flat = x.view(-1)
        return torch.dot(flat, flat)
    return torch.mul(x, x, out=scratch).sum(dims)


def _sum(x: torch.Tensor, dims):
    return x.sum() if dims is None else x.sum(dims)


def _extrema(e3: torch.Tensor, per_channel: bool):
    if not per_channel:
        return torch.aminmax(e3)
    if e3.shape[0] == 1:
        # amin and amax along a dimension: torch.aminmax(dim=1) takes about 20x as long on a
        # CPU (one thread, 32 rows of 2,048 to 16,384), for the same exact values
        return e3[0].amin(dim=1), e3[0].amax(dim=1)
    return e3.amin(dim=(0, 2)), e3.amax(dim=(0, 2))


def _reduce_batch(e3: torch.Tensor, original, per_channel: bool, sw, bins: HistogramBins):
    """Moments and LSB histogram of one batch viewed as (A, C, B)."""
    lo, hi = _extrema(e3, per_channel)
    lo = lo.to(torch.float64).cpu().numpy()
    hi = hi.to(torch.float64).cpu().numpy()
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        check_finite(original, "error")
        raise ValueError("error holds non-finite values")
    a, c, b = e3.shape
    dims = (0, 2) if per_channel else None
    dev = e3.device
    cap = max(_BLOCK, c) if c * b > _BLOCK else max(1, _BLOCK // (c * b)) * c * b
    cap = min(cap, a * c * b)
    buf = torch.empty(cap, dtype=torch.float64, device=dev)
    scratch = torch.empty(cap, dtype=torch.float64, device=dev)
    index = torch.empty(cap, dtype=torch.int32, device=dev)
    shape_out = (c,) if per_channel else ()
    acc = {k: torch.zeros(shape_out, dtype=torch.float64, device=dev)
           for k in ("s1", "s2", "sq", "abs")}
    hist = torch.zeros(bins.count + 2, dtype=torch.int64, device=dev)
    # Shifting by -low/w + 1 makes underflow index 0; float->int truncation is
    # floor here because the clamp has made every value non-negative.
    offset = 1.0 - bins.low / bins.width
    whole_offset = offset == math.floor(offset)
    offset_t = torch.tensor(offset, dtype=torch.float64, device=dev)
    sw_t = sw if isinstance(sw, torch.Tensor) else torch.tensor(sw, dtype=torch.float64,
                                                                  device=dev)
    shift = None
    for rows, cols in _blocks(a, c, b):
        block = e3[rows, :, cols]
        m = block.numel()
        x = buf[:m].view(block.shape)
        x.copy_(block)
        tmp = scratch[:m].view(block.shape)
        if shift is None:
            shift = x.mean(dim=(0, 2), keepdim=True) if per_channel else x.mean()
        acc["sq"] += _sum_squares(x, tmp, dims)
        # abs into the scratch, then a plain sum: 10 % faster than vector_norm(x, 1)
        acc["abs"] += _sum(torch.abs(x, out=tmp), dims)
        if whole_offset:
            # floor(x / sw) + offset: exact where s·w is a power of two (the division then
            # only moves the exponent, and the floor comes before the integer is added)
            torch.div(x, sw_t, out=tmp).floor_().add_(offset_t).clamp_(0, bins.count + 1)
        else:  # offset + x / sw in one pass: addcdiv divides, then adds
            torch.addcdiv(offset_t, x, sw_t, out=tmp).clamp_(0, bins.count + 1)
        idx = index[:m]
        idx.copy_(tmp.view(-1))
        hist += torch.bincount(idx, minlength=bins.count + 2)
        x.sub_(shift)
        acc["s1"] += _sum(x, dims)
        acc["s2"] += _sum_squares(x, tmp, dims)
    k = a * b if per_channel else a * c * b
    host = {key: val.cpu().numpy() for key, val in acc.items()}
    if not all(np.isfinite(v).all() for v in host.values()):
        # Committing inf would turn every later merge into NaN.
        raise ValueError("sums of the error overflow float64 (|e| beyond ~1e154 squares to "
                         "inf); rescale the error before accumulating it")
    shift_np = shift.reshape(shape_out).cpu().numpy()
    s1 = host["s1"]
    # Cauchy-Schwarz makes S2 >= S1²/k exactly; round-off can cross it when all
    # values are equal.
    m2 = np.maximum(host["s2"] - s1 * s1 / k, 0.0)
    moments = _Moments(count=k, mean=shift_np + s1 / k, m2=m2, sq_sum=host["sq"],
                       abs_sum=host["abs"], lo=lo, hi=hi)
    return moments, hist.cpu().numpy()


def _int_tensor(x, name: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
        x = _numpy_to_torch(x)
    elif isinstance(x, torch.Tensor):
        if not is_integer_dtype(x.dtype):
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but the error has "
                         f"{tuple(like.shape)}")
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # Wide unsigned tensors lack most kernels; codes always fit in int64.
        x = x.to(torch.int64)
    return x.detach().to(like.device)


def _bool_tensor(x, name: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype != np.bool_:
            raise TypeError(f"{name} must be a boolean mask, got dtype {x.dtype}")
        x = _numpy_to_torch(x)
    elif isinstance(x, torch.Tensor):
        if x.dtype != torch.bool:
            raise TypeError(f"{name} must be a boolean mask, got dtype {x.dtype}")
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but the error has "
                         f"{tuple(like.shape)}")
    return x.detach().to(like.device)


def _count(mask3: torch.Tensor, per_channel: bool) -> np.ndarray:
    if per_channel:
        return mask3.sum(dim=(0, 2)).cpu().numpy().astype(np.int64)
    return np.asarray(int(mask3.sum()), dtype=np.int64)


def _saturation_counts(e, shape3, per_channel, codes, qmin, qmax, low_mask, high_mask,
                       saturation):
    """``(low, high, observed)`` for this batch, or None when nothing was reported."""
    given = [name for name, present in (
        ("codes", codes is not None),
        ("low_mask/high_mask", low_mask is not None or high_mask is not None),
        ("saturation", saturation is not None),
    ) if present]
    if len(given) > 1:
        raise ValueError(f"give saturation one way only, got {' and '.join(given)}")
    if codes is None and (qmin is not None or qmax is not None):
        raise ValueError("qmin/qmax given without codes")
    a, c, b = shape3
    observed = a * b if per_channel else a * c * b
    if codes is not None:
        if qmin is None or qmax is None:
            raise ValueError("codes need both qmin and qmax")
        for name, v in (("qmin", qmin), ("qmax", qmax)):
            # int() would truncate 1.5 to 1 and count the codes below 1.5 as saturated
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {v!r}")
        qmin, qmax = int(qmin), int(qmax)
        if qmin >= qmax:
            raise ValueError(f"need qmin < qmax, got qmin={qmin}, qmax={qmax}")
        q = _int_tensor(codes, "codes", e)
        cmin, cmax = (int(v) for v in torch.aminmax(q))
        if cmin < qmin or cmax > qmax:
            raise ValueError(f"codes span [{cmin}, {cmax}], outside [qmin, qmax] = "
                             f"[{qmin}, {qmax}]; are qmin/qmax right?")
        q3 = q.reshape(shape3)
        zeros = np.zeros(c if per_channel else (), dtype=np.int64)
        # A rail that no code reaches needs no counting pass.
        low = _count(q3 == qmin, per_channel) if cmin == qmin else zeros
        high = _count(q3 == qmax, per_channel) if cmax == qmax else zeros.copy()
        return low, high, observed
    if low_mask is not None or high_mask is not None:
        if low_mask is None or high_mask is None:
            raise ValueError("low_mask and high_mask must be given together")
        lm = _bool_tensor(low_mask, "low_mask", e).reshape(shape3)
        hm = _bool_tensor(high_mask, "high_mask", e).reshape(shape3)
        both = int(torch.count_nonzero(lm & hm))
        if both:  # a value is clamped at one end at most
            raise ValueError(f"low_mask and high_mask both mark {both} element(s); a value is "
                             "clamped at qmin or at qmax, not both")
        return _count(lm, per_channel), _count(hm, per_channel), observed
    if saturation is not None:
        if not isinstance(saturation, Saturation):
            raise TypeError(f"saturation must be a Saturation, got {type(saturation).__name__}")
        low = np.asarray(saturation.low, dtype=np.int64)
        high = np.asarray(saturation.high, dtype=np.int64)
        total = np.asarray(saturation.total, dtype=np.int64)
        if per_channel:
            if low.shape != (c,):
                raise ValueError(f"saturation has counts of shape {low.shape}; this "
                                 f"per-channel accumulator needs one per channel ({c})")
            if np.any(total != observed):
                raise ValueError(f"saturation totals {total} do not match the {observed} "
                                 "values per channel of this batch")
            return low, high, observed
        if int(total.sum()) != observed:
            raise ValueError(f"saturation covers {int(total.sum())} values but the "
                             f"error has {observed}")
        return np.asarray(low.sum()), np.asarray(high.sum()), observed
    return None
