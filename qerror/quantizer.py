"""Uniform (affine) quantization: the grid (``QuantSpec``), quantize/dequantize/fake-quantize.

Conventions (the README's): ``u = x/s + z``, ``q = clamp(R(u), qmin, qmax)``,
``x̂ = s (q - z)`` and the error is ``e = x̂ - x``. Rounding and clipping are
separate parts: the rounding mode acts on the shifted value ``u`` exactly (the
integer ``z`` is never added in floating point before rounding), and the clamp
follows. How a grid's scale and zero point are found from data is
:mod:`qerror.calibration`'s (a separate :class:`~qerror.calibration.RangePolicy`).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from qerror import _fused
from qerror._checks import (
    SeedOrGenerator,
    check_count,
    check_finite,
    check_flag,
    check_float_array,
    check_positive_finite,
    is_integer_dtype,
)
from qerror._enums import Choice
from qerror._exact import exact_codes
from qerror.cpu import flushing_denormals, set_flush_denormal
from qerror.rounding import (
    ArrayLike,
    RoundingMode,
    hash_stream,
    round_values,
    stochastic_key,
)


class ScaleArithmetic(Choice):
    """How the integer code of ``x / s`` is obtained.

    EXACT (the default) returns ``R`` applied to the exact real quotient
    ``x / s``: the quotient is computed in floating point, and where it lands
    exactly on a rounding boundary (a half-integer for the nearest modes, an
    integer for the others) the sign of the exact residual ``x - v s``
    (Dekker's error-free product) decides, so no code is ever off by one
    because of the division's own rounding. One convention overrides it: where
    the boundaries are integers (FLOOR, CEIL, TOWARD_ZERO, STOCHASTIC) a value
    equal to a stored level ``fl(k s)`` gets code ``k`` although ``x/s`` is
    not exactly ``k`` (CEIL of ``fl(3 s)``, ``s = fl32(0.1)``, is 3, not 4), so
    that quantize∘dequantize is the identity on codes. The README's error
    model is stated for this quantizer. For float32 data on the CPU (16,384 elements or
    more) the same codes come from one compiled loop (:mod:`qerror._fused`;
    ``QERROR_FUSED=0`` turns it off).

    STOCHASTIC rounding is the exception: it rounds ``fl(x/s)`` up with
    probability equal to its fractional part, so its probabilities are those
    of the exact quotient only to within a few ulps.

    RECIPROCAL multiplies by ``1/s`` rounded to the working precision and rounds
    that product, as PyTorch's fake-quantize and the FBGEMM/oneDNN kernels do;
    use it to reproduce those engines bit for bit (for float32 and half-precision
    data: see :func:`fake_quantize`).
    """

    EXACT = "exact"
    RECIPROCAL = "reciprocal"


@dataclass(frozen=True)
class QuantSpec:
    """A uniform quantizer's grid and rounding: everything but its scale and zero point.

    Parameters
    ----------
    bits : int
        Integer width, 2..16.
    signed : bool
        Integer range ``[-2**(bits-1), 2**(bits-1)-1]`` if True, else ``[0, 2**bits-1]``.
    symmetric : bool
        True: zero point fixed at 0 (scale only). False: affine, any zero point.
    axis : int or None
        Per-channel axis of the tensor, or None for one scale per tensor.
    rounding : RoundingMode
        How the scaled value becomes an integer.
    narrow : bool
        Drop the most negative code of a signed range (``-127..127`` for 8 bits),
        so that a symmetric range is symmetric in codes too.
    arithmetic : ScaleArithmetic
        Exact codes of ``x/s`` (default) or PyTorch's reciprocal arithmetic.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    rounding: RoundingMode = RoundingMode.NEAREST_EVEN
    narrow: bool = False
    arithmetic: ScaleArithmetic = ScaleArithmetic.EXACT

    def __post_init__(self):
        # numpy integers kept as Python ints: 2 ** (bits - 1) in int8 overflowed (levels 0)
        bits = check_count(self.bits, "bits", 2)
        if bits > 16:
            raise ValueError(f"bits must be between 2 and 16, got {bits}")
        object.__setattr__(self, "bits", bits)
        for name in ("signed", "symmetric", "narrow"):
            object.__setattr__(self, name, check_flag(getattr(self, name), name))
        if self.axis is not None and (
            isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer))
        ):
            raise TypeError(f"axis must be an int or None, got {self.axis!r}")
        if self.axis is not None:
            object.__setattr__(self, "axis", int(self.axis))
        object.__setattr__(self, "rounding", RoundingMode.parse(self.rounding))
        object.__setattr__(self, "arithmetic",
                           ScaleArithmetic.parse(self.arithmetic))
        if self.narrow and not self.signed:
            raise ValueError("narrow=True applies to signed ranges only; set signed=True")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def check_zero_point(self, zero_point) -> np.ndarray:
        """``zero_point`` (a scalar or array, integers or integral floats) as an int64 array,
        or ValueError/TypeError if this grid cannot have it: outside ``[qmin, qmax]``, or
        not 0 on a symmetric grid."""
        src = zero_point.detach().cpu() if isinstance(zero_point, torch.Tensor) else zero_point
        z = np.asarray(src)
        if z.dtype.kind == "f":
            if not np.all(np.isfinite(z)) or np.any(z != np.round(z)):
                raise ValueError(f"zero_point must hold integers, got {zero_point!r}")
        elif z.dtype.kind not in "iu":
            raise TypeError(f"zero_point must be an integer or integer array, got "
                            f"{zero_point!r}")
        if np.any(z < self.qmin) or np.any(z > self.qmax):
            bad = z[(z < self.qmin) | (z > self.qmax)].reshape(-1)[0]
            raise ValueError(
                f"zero_point {bad} is outside the integer range [{self.qmin}, {self.qmax}] "
                f"of a {self.bits}-bit {'signed' if self.signed else 'unsigned'} spec"
            )
        z = z.astype(np.int64)
        if self.symmetric and np.any(z != 0):
            raise ValueError(
                f"zero_point must be 0 for a symmetric spec, got {zero_point!r}; "
                "use QuantSpec(symmetric=False) for an affine quantizer"
            )
        return z

    def max_scale(self, zero_point=0, dtype=np.float32):
        """The largest scale whose grid is finite for data of ``dtype``.

        Parameters
        ----------
        zero_point : int or integer array
            As for :func:`quantize` (0 on a symmetric grid).
        dtype : numpy or torch floating dtype
            The data's: float16, bfloat16 (torch), float32 or float64.

        Returns
        -------
        float, or a float64 array of the zero point's shape
            The largest scale ``s`` of the working precision
            (:func:`working_precision`) for which every level ``s (q - z)``, ``q`` in
            ``[qmin, qmax]``, as :func:`fake_quantize` and :func:`dequantize` compute it
            (the product rounded to the working precision), is at most ``dtype``'s largest
            finite number in magnitude. A larger scale gives ``±inf`` (or, for float16 and
            bfloat16, a level beyond the format) for finite data. The ends of the grid,
            ``|q - z| = max(qmax - z, z - qmin)``, bound every level, so it is found there.
        """
        z = self.check_zero_point(zero_point)
        return _largest_scale(np.maximum(self.qmax - z, z - self.qmin), dtype)

    def channel_axis(self, x) -> int | None:
        """The per-channel axis as a dimension of ``x`` (``axis % x.ndim``), or None per
        tensor; ValueError where ``x`` has no such dimension."""
        if self.axis is None:
            return None
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(
                f"spec.axis={self.axis} is out of range for an input of shape {tuple(x.shape)}"
            )
        return self.axis % x.ndim

    def replace(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)


def working_precision(dtype) -> np.dtype:
    """The precision :func:`quantize`, :func:`fake_quantize` and :func:`dequantize` compute in
    for data of ``dtype`` (a numpy or torch floating dtype): float64 for float64, float32 for
    float32, float16 and bfloat16. The scale is rounded to it."""
    largest_finite(dtype)  # refuses a dtype that is no data's
    # the type, not the dtype: float64 in the other byte order ('>f8') is not == float64
    wide = dtype == torch.float64 if isinstance(dtype, torch.dtype) else \
        np.dtype(dtype).type is np.float64
    return np.dtype(np.float64 if wide else np.float32)


def largest_finite(dtype) -> float:
    """The largest finite number of ``dtype``, a data's floating dtype (numpy's float16,
    float32, float64 or torch's float16, bfloat16, float32, float64); TypeError for any
    other."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch's float16, bfloat16, float32 or float64, got "
                            f"{dtype}")
        return float(torch.finfo(dtype).max)
    try:
        kind = np.dtype(dtype)
    except TypeError:
        kind = None
    if kind is None or kind.type not in (np.float16, np.float32, np.float64):
        raise TypeError(f"dtype must be float16, float32 or float64 (numpy) or a torch float "
                        f"dtype, got {dtype!r}")
    return float(np.finfo(kind).max)


def _levels_overflow(scale, steps, dtype) -> np.ndarray:
    """Whether the level ``scale · steps``, as :func:`fake_quantize` and :func:`dequantize`
    compute it for data of ``dtype`` (both rounded to the working precision, the product
    rounded to it), lies beyond ``dtype``'s largest finite number: a bool per element."""
    work = working_precision(dtype).type
    with np.errstate(over="ignore"):
        return np.abs(np.asarray(scale).astype(work) * np.asarray(steps).astype(work)) > \
            work(largest_finite(dtype))


def _largest_scale(steps, dtype):
    """The largest scale of the working precision whose level ``scale · steps`` does not
    overflow (:func:`_levels_overflow`), for each positive ``steps`` (numbers of that
    precision: the grid's ends, at most 2**16, or codes as dequantize rounds them); a float,
    or a float64 array of ``steps``' shape."""
    work = working_precision(dtype).type
    steps = np.asarray(steps).astype(work)
    # within a few ulps of the answer (one division, one rounding), then stepped to it
    s = (largest_finite(dtype) / steps.astype(np.float64)).astype(work)
    zero, inf = work(0), work(np.inf)
    while np.any(over := _levels_overflow(s, steps, dtype)):
        s = np.where(over, np.nextafter(s, zero), s)
    # at the format's largest number (a grid end one step from its zero point: 2-bit
    # narrow) the next scale up is inf, which overflows, as it should, and does not fit
    with np.errstate(over="ignore"):
        while np.any(fits := ~_levels_overflow(np.nextafter(s, inf), steps, dtype)):
            s = np.where(fits, np.nextafter(s, inf), s)
    s = s.astype(np.float64)
    return float(s) if s.ndim == 0 else s


def _ends_overflow(spec: QuantSpec, s: np.ndarray, z: np.ndarray, dtype
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(over, steps)``: whether each channel's grid end level ``s (qmax - z)`` or
    ``s (qmin - z)``, as :func:`fake_quantize` computes it for data of ``dtype``, lies
    beyond the dtype's largest number, and the steps from its zero point to its farther
    end; ``s`` and ``z`` as :func:`_check_params` gives them."""
    steps = np.maximum(spec.qmax - z, z - spec.qmin)
    return _levels_overflow(s, steps, dtype), steps


def _check_levels(spec: QuantSpec, s: np.ndarray, z: np.ndarray, dtype) -> None:
    """Refuse a scale whose grid's end level lies beyond the largest number of ``dtype``
    (:func:`_ends_overflow`: its fake-quantized ends would be ``±inf`` for finite data)."""
    over, steps = _ends_overflow(spec, s, z, dtype)
    if np.any(over):
        at = int(np.flatnonzero(over)[0])
        bad, zb = float(s.reshape(-1)[at]), int(z.reshape(-1)[at])
        where = "" if s.size == 1 else f" of channel {at}"
        raise ValueError(
            f"scale {bad!r}{where} puts the grid's end level, {int(steps.reshape(-1)[at])} "
            f"steps from the zero point {zb}, beyond {largest_finite(dtype):.6g}, the largest "
            f"number of the data's dtype {dtype}: its fake-quantized values would be ±inf; "
            f"use a scale of at most {spec.max_scale(zb, dtype)!r} (QuantSpec.max_scale, "
            "which calibrate and qparams_from_range keep to), or quantize() for the codes "
            "alone, which are right for it")


@dataclass(frozen=True)
class QParams:
    """Scale and zero point: scalars per tensor, 1-D arrays per channel."""

    scale: Union[float, np.ndarray]
    zero_point: Union[int, np.ndarray]


@dataclass(frozen=True)
class Saturation:
    """Elements clamped at qmin (``low``) and at qmax (``high``) out of ``total``.

    Per tensor the counts are 0-d arrays; per channel they have one entry per channel.
    """

    low: np.ndarray
    high: np.ndarray
    total: np.ndarray = field(repr=False)

    @property
    def frac_low(self) -> np.ndarray:
        return self.low / self.total

    @property
    def frac_high(self) -> np.ndarray:
        return self.high / self.total


def _compute_dtype(x):
    if isinstance(x, torch.Tensor):
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    return np.float64 if x.dtype == np.float64 else np.float32


def _param_shape(x, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _check_scale(scale, working: np.dtype, done: str, wider: str) -> np.ndarray:
    """``scale`` as float64 numpy, refused unless positive, finite and a normal number of the
    ``working`` precision (below it the scale rounds to a subnormal or 0, above it to inf);
    ``done`` and ``wider`` word the message."""
    s = check_positive_finite(scale, "scale")
    info = np.finfo(working)
    if np.any(s < info.tiny) or np.any(s > info.max):
        bad = s[(s < info.tiny) | (s > info.max)].reshape(-1)[0]
        raise ValueError(
            f"scale {bad!r} is not a normal {working.name} number, the precision this {done} "
            f"in; use a scale in [{info.tiny:.3g}, {info.max:.3g}] (or {wider})"
        )
    return s


def check_spec(spec, what: str = "spec", hint: str = "") -> QuantSpec:
    """``spec``, refused with a TypeError naming ``what`` (and ``hint``, advice appended
    after a colon) unless it is a :class:`QuantSpec`: a name or a bit count passed in its
    place would fail later on a missing attribute."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{what} must be a QuantSpec, got {type(spec).__name__}"
                        + (f": {hint}" if hint else ""))
    return spec


def check_qparams(spec: QuantSpec, qparams: QParams, *, dequantize_to=None) -> None:
    """Refuse, before any data, a scale or zero point that every call would refuse: the
    checks :func:`quantize`, :func:`fake_quantize` and :func:`dequantize` make of them, for
    a module that holds them (:class:`qerror.nn.input_quant.InputQuantizer`,
    :class:`~qerror.nn.input_quant.Dequantizer`).

    Parameters
    ----------
    spec : QuantSpec
        The grid: the zero point must be on it (:meth:`QuantSpec.check_zero_point`).
    qparams : QParams
        The scale must be positive and finite.
    dequantize_to : torch.dtype, optional
        The float dtype :func:`dequantize` will write (a float dtype of torch's): the scale
        must then also be a normal number of the precision it computes in (float64 for
        float64, float32 otherwise). Without it that precision is the data's, known only
        at call time, where the call checks it.

    Raises
    ------
    TypeError
        ``spec`` that is not a :class:`QuantSpec`; ``qparams`` that is not a
        :class:`QParams`; a scale or zero point that is not real numbers or integers;
        ``dequantize_to`` not a float dtype of torch's.
    ValueError
        A scale that is not positive and finite (or not a normal number of the precision
        ``dequantize_to`` computes in); a zero point outside the grid, or not 0 on a
        symmetric grid; more than one scale or zero point for a per-tensor spec
        (``axis=None``).
    """
    check_spec(spec)
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a qerror.QParams (calibrate's result, or "
                        f"QParams(scale=..., zero_point=...)), got {type(qparams).__name__}")
    if dequantize_to is None:
        s = check_positive_finite(qparams.scale, "scale")
    else:
        _dequantize_work(dequantize_to)  # refuses a dtype that is no float dtype of torch's
        s = _check_scale(qparams.scale, working_precision(dequantize_to),
                         "dequantization computes", "dtype=float64")
    z = spec.check_zero_point(qparams.zero_point)
    if spec.axis is None:
        _check_one_each(s, z)


def _dequantize_work(dtype: torch.dtype) -> torch.dtype:
    """The precision :func:`dequantize` computes tensor codes in for output ``dtype``, or
    TypeError where ``dtype`` is not one of torch's float dtypes."""
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if dtype not in floats:
        raise TypeError(f"dtype must be one of torch's {', '.join(map(str, floats))} for "
                        f"codes in a tensor, got {dtype!r}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_one_each(s: np.ndarray, z: np.ndarray) -> None:
    """Refuse more than one scale or zero point for a per-tensor spec (``axis=None``)."""
    for name, arr in (("scale", s), ("zero_point", z)):
        if arr.size != 1:
            raise ValueError(f"{name} has {arr.size} values but the spec is per-tensor "
                             "(axis=None); pass a scalar or set QuantSpec(axis=...)")


def _check_params(x, spec: QuantSpec, scale, zero_point, axis):
    """Validate scale and zero point; return them as float64/int64 numpy arrays shaped
    to broadcast against ``x``."""
    wide = x.dtype == torch.float64 if isinstance(x, torch.Tensor) else x.dtype == np.float64
    s = _check_scale(scale, np.dtype(np.float64 if wide else np.float32), "input is quantized",
                     "float64 data")
    z = spec.check_zero_point(zero_point)
    shape = _param_shape(x, axis)
    if axis is None:
        _check_one_each(s, z)
        return s.reshape(()), z.reshape(())
    channels = x.shape[axis]
    out = []
    for name, arr in (("scale", s), ("zero_point", z)):
        if arr.size == 1:
            arr = np.full(channels, arr.reshape(()))
        if arr.ndim != 1 or arr.shape[0] != channels:
            raise ValueError(
                f"{name} has shape {arr.shape} but axis {axis} of the input has "
                f"{channels} channels; pass one value per channel"
            )
        out.append(arr.reshape(shape))
    return out[0], out[1]


def _as_param(arr: np.ndarray, like, dtype):
    if isinstance(like, torch.Tensor):
        if arr.ndim == 0:
            return arr.item()
        # a read-only array (a frozen QParams') would make torch warn: copy it
        return torch.as_tensor(arr if arr.flags.writeable else arr.copy(), dtype=dtype,
                               device=like.device)
    if arr.ndim == 0:
        return dtype(arr.item()) if dtype in (np.float32, np.float64) else arr.item()
    return arr.astype(dtype)


def _scaled(x, spec: QuantSpec, s: np.ndarray, out=None):
    """``v ≈ x / s`` in the compute dtype (written into ``out`` if given), and the scale
    in that dtype."""
    torch_in = isinstance(x, torch.Tensor)
    cdt = _compute_dtype(x)
    scale = _as_param(s, x, cdt)
    if spec.arithmetic is ScaleArithmetic.RECIPROCAL:
        # The reciprocal is rounded to the working precision first, as the kernels do.
        if torch_in:
            inv = 1.0 / torch.as_tensor(s, dtype=cdt)
            return x.to(cdt) * (inv.item() if inv.ndim == 0 else inv.to(x.device)), scale
        with np.errstate(over="ignore"):
            return np.multiply(x, cdt(1.0) / s.astype(cdt), out=out, dtype=cdt), scale
    if torch_in:
        return x.to(cdt) / scale, scale
    with np.errstate(over="ignore"):  # a finite value far out of range: inf, then clamped
        return np.divide(x, scale, out=out, dtype=cdt), scale


def _shifted_codes(x, spec: QuantSpec, s: np.ndarray, z: np.ndarray, key, offset: int = 0,
                   scratch=None):
    """``R(x/s + z) - z`` before clamping, in the compute dtype, and the scale.

    ``scratch``, a numpy array of ``x``'s shape in the compute dtype, receives ``x/s``
    (and may end up holding the codes) instead of a new array.

    Away from ties ``R(v + z) = R(v) + z`` exactly for integer ``z`` and every
    mode but those whose choice depends on the sign of ``v + z`` (TOWARD_ZERO),
    decided as ``v >= -z`` without forming ``v + z`` in floating point. With EXACT
    arithmetic every value on a boundary (ties included) is settled on ``u``
    itself (see ScaleArithmetic). RECIPROCAL settles ties on ``v`` and adds
    ``z`` after, as PyTorch's kernels do.
    """
    torch_in = isinstance(x, torch.Tensor)
    v, scale = _scaled(x, spec, s, scratch)
    mode = spec.rounding
    split = mode.facts.sign_split
    exact = spec.arithmetic is ScaleArithmetic.EXACT
    grad = torch_in and v.requires_grad and torch.is_grad_enabled()

    if split is not None and bool(np.any(z != 0)):
        neg_z = _as_param(-z.astype(np.float64), x, _compute_dtype(x))
        above = round_values(v, split[0], None)
        below = round_values(v, split[1], None)
        r = torch.where(v >= neg_z, above, below) if torch_in else np.where(v >= neg_z, above,
                                                                            below)
    elif grad or exact:
        r = round_values(v, mode, key, offset)
    else:
        # Rounding in place saves a pass, but only where v itself is not needed later.
        kernel = mode.facts.kernel
        r = (kernel.torch if torch_in else kernel.numpy)(v, key, offset, out=v)
    if exact:
        r = exact_codes(x, v, r, scale, z, spec.qmin, spec.qmax, mode)
    return r, scale


def _bounds(spec: QuantSpec, z: np.ndarray, like, cdt):
    lo = (spec.qmin - z).astype(np.float64)
    hi = (spec.qmax - z).astype(np.float64)
    return _as_param(lo, like, cdt), _as_param(hi, like, cdt)


def _prepare(x, spec, scale, zero_point, generator, *, finite_checked: bool = False,
             draw_key: bool = True, fake: bool = False):
    """Check the arguments; return the normalised axis, the scales and zero points as
    arrays, and the STOCHASTIC key (drawn from ``generator``, which a generator object
    advances: ``draw_key=False`` checks without drawing, for a call that draws later).
    ``fake``: also refuse a scale whose grid's ends overflow ``x``'s dtype."""
    check_float_array(x, "x")
    check_spec(spec)
    axis = spec.channel_axis(x)
    s, z = _check_params(x, spec, scale, zero_point, axis)
    if fake:
        _check_levels(spec, s, z, x.dtype)
    if not finite_checked:
        check_finite(x, "x")
    key = stochastic_key(generator) if spec.rounding.is_random and draw_key else None
    return axis, s, z, key


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)

# Elements per block: small enough to stay in L2 cache through the whole chain of
# element-wise steps, large enough that per-block Python overhead is negligible.
_BLOCK = 1 << 18


def _blocks(outer: int, channels: int, inner: int):
    """Contiguous blocks of a C-ordered ``(outer, channels, inner)`` array.

    Yields ``(o-slice, c-slice, i-slice, flat offset)``; every block is contiguous
    in flat order, so STOCHASTIC draws (hashed from the flat index) are the same
    however the array is split.
    """
    row = channels * inner
    if row <= _BLOCK:
        step = max(1, _BLOCK // row)
        for o in range(0, outer, step):
            yield slice(o, min(o + step, outer)), slice(None), slice(None), o * row
    elif inner <= _BLOCK:
        step = max(1, _BLOCK // inner)
        for o in range(outer):
            for c in range(0, channels, step):
                yield (slice(o, o + 1), slice(c, min(c + step, channels)), slice(None),
                       o * row + c * inner)
    else:
        for o in range(outer):
            for c in range(channels):
                for i in range(0, inner, _BLOCK):
                    yield (slice(o, o + 1), slice(c, c + 1), slice(i, min(i + _BLOCK, inner)),
                           o * row + c * inner + i)


#: The largest flat element index of a stochastic draw (torch's counters are int64).
_MAX_INDEX = 2**63 - 1


def _check_offset(offset) -> int:
    return check_count(offset, "offset (a flat element index)")


def _run(x, spec, scale, zero_point, generator, *, fake: bool, count: bool, offset: int = 0,
         finite_checked: bool = False, unchecked=None):
    """Shared engine of :func:`quantize` and :func:`fake_quantize`.

    Returns the codes (int32) or the fake-quantized values (input dtype) and, if
    ``count``, the :class:`Saturation`. ``finite_checked``: ``x`` is a view of data already
    found finite (a layout's call on its C-ordered view), not scanned again. Data that
    takes the fused path is not scanned first: the fused loop counts its non-finite values,
    and where there are any, :func:`check_finite` raises on ``unchecked``, the input as the
    caller gave it (a layout's call passes it on), so the error names the caller's indices.
    """
    check_float_array(x, "x")  # before x.ndim: a list must get a TypeError, not AttributeError
    if isinstance(x, np.ndarray) and not x.dtype.isnative:
        # another byte order ('>f8', read from a file written elsewhere): quantized as the
        # native data of its values (float64 in float64, where every dtype test below would
        # take it for float32), a fake-quantized result given back in the input's dtype
        res = _run(x.astype(x.dtype.newbyteorder("=")), spec, scale, zero_point, generator,
                   fake=fake, count=count, offset=offset, finite_checked=finite_checked)
        if not fake:
            return res
        return (res[0].astype(x.dtype), res[1]) if count else res.astype(x.dtype)
    offset = _check_offset(offset)
    size = x.numel() if isinstance(x, torch.Tensor) else x.size
    if offset + size > _MAX_INDEX:
        raise ValueError(f"offset {offset} and the part's {size} elements pass the largest "
                         f"flat index the draws are hashed from ({_MAX_INDEX}); give the "
                         "part's index within a smaller array")
    if x.ndim == 0 and spec.axis is None:
        # One code path for every shape: a scalar is quantized as a 1-element array.
        res = _run(x.reshape(1), spec, scale, zero_point, generator, fake=fake, count=count,
                   offset=offset)
        return (res[0].reshape(()), res[1]) if count else res.reshape(())
    if isinstance(x, torch.Tensor) and isinstance(spec, QuantSpec) and not (
            x.requires_grad and torch.is_grad_enabled()):
        c_strides = _c_strides(x.shape)
        if x.stride() != c_strides:
            # another layout: every argument checked here, on the input as given (errors
            # name its axes and indices), then quantized through its C-ordered view; the
            # fused path checks finiteness in its loop, and names x's indices if it fails
            defer = _fused.eligible(x, spec.rounding, spec.arithmetic is ScaleArithmetic.EXACT) \
                and _draws_nothing_first(spec, generator)
            _prepare(x, spec, scale, zero_point, generator, draw_key=False,
                     finite_checked=defer, fake=fake)
            finite_checked, unchecked = True, (x if defer else None)
            if x.is_contiguous():
                # other strides on unit dimensions only (a one-channel image batch in
                # channels_last): the result gets the input's strides, which tell a
                # convolution that follows which layout the batch is in
                res = _run(x.as_strided(x.shape, c_strides), spec, scale, zero_point,
                           generator, fake=fake, count=count, offset=offset,
                           finite_checked=True, unchecked=unchecked)
                out = (res[0] if count else res).as_strided(x.shape, x.stride())
                return (out, res[1]) if count else out
            order = _dense_order(x)
            if order is not None:
                return _run_in_layout(x, order, spec, scale, zero_point, generator, fake=fake,
                                      count=count, offset=offset, unchecked=unchecked)
            # strided with gaps: quantized below as a C-ordered copy, x named if it fails
    fused = isinstance(spec, QuantSpec) and not (
        isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()) and \
        _fused.eligible(x, spec.rounding, spec.arithmetic is ScaleArithmetic.EXACT)
    if fused and not finite_checked and _draws_nothing_first(spec, generator):
        finite_checked, unchecked = True, x
    axis, s, z, key = _prepare(x, spec, scale, zero_point, generator,
                               finite_checked=finite_checked, fake=fake)
    torch_in = isinstance(x, torch.Tensor)
    if torch_in and x.requires_grad and torch.is_grad_enabled():
        return _run_autograd(x, spec, s, z, key, axis, fake=fake, count=count, offset=offset)
    shape = tuple(x.shape)
    channels = shape[axis] if axis is not None else 1
    outer = int(np.prod(shape[:axis], dtype=np.int64)) if axis is not None else 1
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) if axis is not None else int(
        np.prod(shape, dtype=np.int64))
    s3 = s.reshape(1, channels, 1)
    z3 = z.reshape(1, channels, 1)
    if fused:
        res = _run_fused(x, spec, s3, z3, (outer, channels, inner), fake, count, key, offset)
        if res is not None:
            out, low, high, bad = res
            if bad and unchecked is not None:
                check_finite(unchecked, "x")  # raises, naming the first non-finite value
            out = out.reshape(shape)
            if not count:
                return out
            return out, _saturation_result(low, high, outer * inner, axis)
    if unchecked is not None:  # the block engine: scanned before it runs
        check_finite(unchecked, "x")
    on_cpu = not torch_in or x.device.type == "cpu"
    if torch_in:
        x3 = x.detach().contiguous().view(outer, channels, inner)
        out_dtype = x.dtype if fake else torch.int32
        out3 = torch.empty((outer, channels, inner), dtype=out_dtype, device=x.device)
    else:
        x3 = np.ascontiguousarray(x).reshape(outer, channels, inner)
        out3 = np.empty((outer, channels, inner), dtype=x.dtype if fake else np.int32)
    # A CPU tensor of a dtype numpy knows is worked on through numpy views of its memory:
    # numpy's element-wise kernels, comparisons and index search cost a fraction of torch's
    # on cache-sized blocks, and give the same bits.
    xw, outw = x3, out3
    if torch_in and on_cpu and x.dtype in _NUMPY_DTYPES:
        xw, outw = x3.numpy(), out3.numpy()
    cdt = _compute_dtype(xw)
    low = np.zeros(channels, dtype=np.int64)
    high = np.zeros(channels, dtype=np.int64)
    dims = None if axis is None else (0, 2)
    # RECIPROCAL reproduces PyTorch's fake-quantize, whose (q - z) s has no negative zero
    plus_zero = fake and spec.arithmetic is ScaleArithmetic.RECIPROCAL

    def one_block(block):
        so, sc, si, at = block
        xb, ob = xw[so, sc, si], outw[so, sc, si]
        if axis is None:
            # One scale: flat blocks and scalar parameters take the fastest kernels.
            sb, zb = s, z
            xb = xb.reshape(-1)
        else:
            sb, zb = s3[:, sc], z3[:, sc]
        on_torch = isinstance(xb, torch.Tensor)
        # The quotient goes straight into the output block where it has the working dtype;
        # the codes, scaled, overwrite it at the end.
        scratch = ob.reshape(xb.shape) if not on_torch and fake and ob.dtype == cdt else None
        r, scale_b = _shifted_codes(xb, spec, sb, zb, key, offset + at, scratch)
        lo, hi = _bounds(spec, zb, r, cdt)
        counts = None
        if count and on_torch:
            counts = ((r < lo).sum(dim=dims).cpu().numpy().reshape(-1),
                      (r > hi).sum(dim=dims).cpu().numpy().reshape(-1))
        elif count:
            counts = np.sum(r < lo, axis=dims), np.sum(r > hi, axis=dims)
        if on_torch:
            r.clamp_(lo, hi)
            res = r.mul_(scale_b) if fake else r.to(torch.int32).add_(
                _as_param(zb, r, torch.int32))
            if plus_zero:
                res.add_(0.0)
        elif scratch is not None:
            np.clip(r, lo, hi, out=r)
            np.multiply(r, scale_b, out=scratch)
            if plus_zero:
                np.add(scratch, 0.0, out=scratch)
            return sc, counts
        else:
            np.clip(r, lo, hi, out=r)
            res = np.multiply(r, scale_b, out=r) if fake else (
                r.astype(np.int32) + zb.astype(np.int32))
            if plus_zero:
                np.add(res, 0.0, out=res)
        ob[...] = res.reshape(ob.shape)
        return sc, counts

    blocks = list(_blocks(outer, channels, inner))
    for sc, counts in _map_blocks(one_block, blocks, on_cpu,
                                  torch_kernels=isinstance(xw, torch.Tensor)):
        if counts is not None:
            low[sc] += counts[0]
            high[sc] += counts[1]
    out = out3.reshape(shape)
    if not count:
        return out
    return out, _saturation_result(low, high, outer * inner, axis)


def _draws_nothing_first(spec: QuantSpec, generator) -> bool:
    """Whether a call on the fused path may leave the scan for non-finite values to the
    fused loop's count: it draws nothing that a call refused for bad data must leave as it
    was (deterministic modes, or STOCHASTIC from an integer seed; a generator object is
    drawn from only after the scan, and a missing one is named after it)."""
    return not spec.rounding.is_random or (
        isinstance(generator, numbers.Integral) and not isinstance(generator, (bool, np.bool_)))


def fused_path_enabled() -> bool:
    """Whether :func:`quantize` and :func:`fake_quantize` may take the fused exact path here
    (float32 CPU data of 16,384 elements or more, EXACT arithmetic;
    :mod:`qerror._fused`): False under ``QERROR_FUSED=0``, without inductor or with its unsafe
    floating-point optimisations on, after a compiler failure, or in a forked child. One
    kernel may still be off (the compiler's limit of variants) while this says True.

    Raises
    ------
    ValueError
        ``QERROR_FUSED`` is set to anything but ``0`` or ``1``: a run would not know which
        path it took (a study calls this before any work to refuse it).
    """
    return _fused.enabled()


def _c_strides(shape) -> tuple[int, ...]:
    """The strides of a C-contiguous tensor of ``shape``, as torch gives them."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(int(d), 1)
    return tuple(reversed(strides))


def _run_in_layout(x, order, spec, scale, zero_point, generator, *, fake, count, offset,
                   unchecked=None):
    """:func:`_run` on a tensor stored densely in another order than C's (channels_last, a
    transpose): the result in the input's layout, so that a convolution that follows runs on
    the layout it was given. A deterministic code depends on its element and its channel
    alone: the memory is quantized in the order it lies, without a copy to C order or back.
    Random draws are hashed from the element's C-order index (as if the tensor were
    contiguous): STOCHASTIC quantizes a C-ordered copy, whose result is copied back."""
    if not spec.rounding.is_random:
        res = _run(x.permute(order), spec.replace(axis=None if spec.axis is None else
                                                  order.index(spec.axis % x.ndim)),
                   scale, zero_point, None, fake=fake, count=count, finite_checked=True,
                   unchecked=unchecked)
        back = tuple(int(d) for d in np.argsort(order))
        out = (res[0] if count else res).permute(back)
    else:
        res = _run(x.contiguous(), spec, scale, zero_point, generator, fake=fake, count=count,
                   offset=offset, finite_checked=True, unchecked=unchecked)
        c = res[0] if count else res
        out = torch.empty_like(x, dtype=c.dtype).copy_(c)
    return (out, res[1]) if count else out


def _dense_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The order of ``x``'s dimensions in which a non-contiguous ``x`` is C-contiguous
    (``(0, 2, 3, 1)`` for a channels_last NCHW tensor), or None where ``x`` is not dense (a
    slice with gaps, overlapping or zero strides)."""
    order = tuple(sorted(range(x.ndim), key=lambda d: (-x.stride(d), d)))
    return order if x.permute(order).is_contiguous() else None


def _run_fused(x, spec: QuantSpec, s3: np.ndarray, z3: np.ndarray, dims, fake: bool,
               count: bool, key: int | None = None, offset: int = 0):
    """:func:`qerror._fused.run` on ``x`` viewed as ``dims`` (outer, channels, inner):
    the output in ``x``'s kind (numpy or tensor) and, if ``count``, the per-channel
    saturation counts, and the number of non-finite values in ``x``; None where the fused
    path is unavailable. ``key`` and ``offset``: STOCHASTIC's hash key and the flat index of
    ``x``'s first element."""
    torch_in = isinstance(x, torch.Tensor)
    if torch_in:
        x3 = x.detach().reshape(dims)
    else:
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:  # torch warns of read-only memory: the kernel only reads
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                x3 = torch.from_numpy(x).reshape(dims)
        else:
            x3 = torch.from_numpy(x).reshape(dims)
    # the scale rounded to float32 as the engine rounds it, the range in v units as it has it
    params = (_as_param(s3, x3, torch.float32), _as_param(z3, x3, torch.float32),
              *_bounds(spec, z3, x3, torch.float32))
    with torch.no_grad():
        stream = None if key is None else hash_stream(key, offset)
        res = _fused.run(x3.contiguous(), *params, stream, mode=spec.rounding, fake=fake,
                         count=count)
    if res is None:
        return None
    out, low, high, bad = res
    if count:
        low, high = low.numpy().astype(np.int64), high.numpy().astype(np.int64)
    return (out if torch_in else out.numpy()), low, high, int(bad.sum())


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    # A forked child inherits the executor object but none of its threads.
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _map_blocks(func, blocks, on_cpu: bool, *, torch_kernels: bool = False):
    """Run ``func`` over blocks, on a small thread pool when there are several.

    Each block is a short chain of element-wise kernels on cache-resident data.
    Run serially with torch's intra-op threads, every kernel is its own parallel
    region, and on a loaded machine each region waits for a descheduled partner
    thread (ten times slower here). Blocks on separate Python threads (torch and
    numpy release the GIL) keep the cores busy without those barriers. Work on
    an accelerator stays on the caller's thread and stream. The workers run
    under the caller's inference mode, so they may write into its tensors, and
    with the caller's flushing of subnormals (a per-thread flag, :mod:`qerror.cpu`):
    a worker created inside a flushing block would otherwise keep flushing after
    it, and give some blocks of an array the code of 0 for a subnormal input.
    Where the blocks run torch's kernels (``torch_kernels``: bfloat16), which
    open parallel regions on a team of the worker's own, the team is set too.
    """
    global _POOL
    if len(blocks) == 1 or not on_cpu:
        return [func(b) for b in blocks]
    workers = max(1, min(torch.get_num_threads(), len(blocks)))
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qerror")
        pool = _POOL
    inference, flushing = torch.is_inference_mode_enabled(), flushing_denormals()

    def in_caller_mode(block):
        if torch_kernels:
            set_flush_denormal(flushing)
        else:
            torch.set_flush_denormal(flushing)
        with torch.inference_mode(inference), torch.no_grad():
            return func(block)

    return list(pool.map(in_caller_mode, blocks))


def _saturation_result(low, high, per_channel_total, axis) -> Saturation:
    if axis is None:
        return Saturation(np.asarray(low[0]), np.asarray(high[0]), np.asarray(per_channel_total))
    return Saturation(low, high, np.full(low.shape, per_channel_total))


def _run_autograd(x, spec, s, z, key, axis, *, fake: bool, count: bool, offset: int = 0):
    """Whole-tensor path for tensors that require grad (quantization-aware training)."""
    r, scale_c = _shifted_codes(x, spec, s, z, key, offset)
    cdt = _compute_dtype(x)
    lo, hi = _bounds(spec, z, x, cdt)
    sat = None
    if count:
        dims = [d for d in range(r.ndim) if d != axis] if axis is not None else list(range(r.ndim))
        low = (r < lo).sum(dim=dims).reshape(-1).cpu().numpy()
        high = (r > hi).sum(dim=dims).reshape(-1).cpu().numpy()
        channels = x.shape[axis] if axis is not None else 1
        sat = _saturation_result(low, high, x.numel() // channels, axis)
    # straight through wherever the code was not clamped, the rails qmin and qmax included
    # (torch.clamp's own backward is 0 at its bounds too); 0 where it was
    r = torch.where((r >= lo) & (r <= hi), r, torch.clamp(r, lo, hi).detach())
    if fake:
        out = (r * scale_c).to(x.dtype)
        if spec.arithmetic is ScaleArithmetic.RECIPROCAL:
            out = out + 0.0  # no negative zero, as PyTorch's fake-quantize (see _run)
    else:
        out = r.detach().to(torch.int32) + _as_param(z, x, torch.int32)
    return (out, sat) if count else out


def quantize(
    x: ArrayLike,
    spec: QuantSpec,
    scale,
    zero_point=0,
    *,
    generator: SeedOrGenerator | None = None,
    return_saturation: bool = False,
    offset: int = 0,
):
    """Quantize ``x`` to integer codes ``q = clamp(R(x/s + z), qmin, qmax)``.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        Finite floating-point data, any shape.
    spec : QuantSpec
    scale : float or array of shape (C,)
        Positive step; one per channel when ``spec.axis`` is set.
    zero_point : int or integer array of shape (C,)
        Integer in ``[qmin, qmax]``; 0 for a symmetric spec.
    generator : int, numpy.random.Generator or torch.Generator, optional
        Required for STOCHASTIC rounding; an int is a seed from 0 to 2**64 - 1.
    return_saturation : bool
        Also return a :class:`Saturation`: the elements with ``R(u) < qmin`` and
        with ``R(u) > qmax``, per tensor or per channel.
    offset : int
        STOCHASTIC rounding: the flat index, in C order whatever the memory layout, of
        ``x``'s first element in a larger array quantized with the same integer seed (or a
        generator in the same state: a generator object advances on every call), when
        ``x`` is a run of consecutive elements of it (a slice along the first dimension,
        say, with ``scale`` and ``zero_point`` sliced too where that is the channel axis):
        each element then draws what it draws in the whole array, so quantizing an array
        in non-empty parts gives its codes however it is split. At most ``2**63 - 1`` with
        the part's elements. No effect on the other modes.

    Returns
    -------
    q : int32 array or tensor, same shape as ``x``
        A tensor stored densely in another layout (channels_last, a transpose) gets its
        result in that layout, with the codes of its C-contiguous copy; a tensor with gaps
        (a strided slice) gets a C-contiguous result.
    saturation : Saturation, only if ``return_saturation``

    Notes
    -----
    Arithmetic is in float32 for float16/bfloat16/float32 inputs and float64 for
    float64 inputs (numpy data in the other byte order, ``'>f8'``, as native data of the
    same values); the scale is first rounded to that precision, and it is that
    rounded scale the codes are exact for. Work proceeds in cache-sized blocks.
    A scale above ``spec.max_scale(zero_point, x.dtype)``, which :func:`fake_quantize`
    refuses (its grid's ends lie beyond the format), is taken: the codes are right for it.
    """
    return _run(x, spec, scale, zero_point, generator, fake=False, count=return_saturation,
                offset=offset)


def dequantize(q: ArrayLike, scale, zero_point=0, *, axis: int | None = None,
               dtype=None) -> ArrayLike:
    """Real values ``s (q - z)`` of integer codes ``q``.

    Parameters
    ----------
    q : integer numpy array or torch tensor
    scale, zero_point : scalars, or 1-D arrays of length ``q.shape[axis]``
    axis : int or None
        Channel axis of per-channel parameters.
    dtype : optional
        Output float dtype (default float32). The arithmetic is that of
        :func:`fake_quantize` for data of this dtype: float64 for float64,
        float32 otherwise, then rounded to ``dtype``; so both give the same values.
        As there, the scale must be a normal number of that precision (a float32 scale
        above 3.4e38 or below 1.2e-38 is refused, not turned into inf or 0), and a zero
        point a finite integer. A scale that takes one of the given codes' levels beyond
        ``dtype``'s largest number (``±inf``; for a whole grid, a scale above
        :meth:`QuantSpec.max_scale`) is refused, naming the largest scale that code takes.
        The codes are only looked at where their integer type reaches such a level (a
        float32 scale above about 1.6e29 for int32 codes): an ordinary call checks only
        the scale.
    """
    if isinstance(q, torch.Tensor):
        if not is_integer_dtype(q.dtype):
            raise TypeError(f"q must hold integer codes, got dtype {q.dtype}")
        dtype = dtype or torch.float32
        work = _dequantize_work(dtype)
    elif isinstance(q, np.ndarray):
        if q.dtype.kind not in "iu":
            raise TypeError(f"q must hold integer codes, got dtype {q.dtype}")
        dtype = np.dtype(dtype or np.float32).type
        if dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
        work = np.float64 if dtype == np.float64 else np.float32
    else:
        raise TypeError(f"q must be a numpy.ndarray or torch.Tensor, got {type(q).__name__}")
    if axis is not None and not -q.ndim <= axis < q.ndim:
        raise ValueError(f"axis={axis} is out of range for codes of shape {tuple(q.shape)}")
    ax = None if axis is None else axis % q.ndim
    s = _check_scale(scale, working_precision(dtype), "dequantization computes",
                     "dtype=float64")
    z = np.asarray(zero_point.detach().cpu() if isinstance(zero_point, torch.Tensor)
                   else zero_point)
    if z.dtype.kind not in "iu" and not (z.dtype.kind == "f" and np.all(np.isfinite(z))
                                         and np.all(z == np.round(z))):
        raise TypeError(f"zero_point must hold integers, got {zero_point!r}")
    shape = _param_shape(q, ax)
    params, wide = [], []
    for name, arr in (("scale", s), ("zero_point", z.astype(np.float64))):
        if ax is None and arr.size != 1:
            raise ValueError(f"{name} has {arr.size} values; pass axis= for per-channel codes")
        if ax is not None and arr.size not in (1, q.shape[ax]):
            raise ValueError(f"{name} has {arr.size} values for {q.shape[ax]} channels")
        arr = arr.reshape(()) if ax is None else np.broadcast_to(
            arr.reshape(-1), (q.shape[ax],)).reshape(shape)
        wide.append(arr)
        params.append(_as_param(arr, q, work))
    sv, zv = params
    torch_in = isinstance(q, torch.Tensor)
    steps = q.to(work) - zv if torch_in else q.astype(work) - zv
    _check_dequantized_levels(q, steps, *wide, dtype)
    out = steps * sv
    return out.to(dtype) if torch_in else out.astype(dtype, copy=False)


def _check_dequantized_levels(q, steps, s: np.ndarray, z: np.ndarray, dtype) -> None:
    """Refuse a scale that takes a code's level ``s (q - z)`` beyond ``dtype``'s largest
    number (``±inf``); ``steps`` are ``q - z`` as :func:`dequantize` rounds them, ``s`` and
    ``z`` its float64 parameters, shaped to broadcast against ``q``. Codes of ``q``'s integer
    type are only looked at where their widest level could overflow: no ordinary scale does."""
    cast = working_precision(dtype).type
    codes = torch.iinfo(q.dtype) if isinstance(q, torch.Tensor) else np.iinfo(q.dtype)
    # |q - z| as rounded is at most the rounded sum of the rounded bounds of |q| and |z|
    # (rounding is monotone): no level of these codes overflows below it
    widest = cast(max(-int(codes.min), int(codes.max))) + cast(np.max(np.abs(z)))
    if not np.any(_levels_overflow(np.max(s), widest, dtype)):
        return
    k = steps.cpu().numpy() if isinstance(steps, torch.Tensor) else np.asarray(steps)
    over = _levels_overflow(s, k, dtype)
    if np.any(over):
        over = np.broadcast_to(over, k.shape)
        at = np.unravel_index(int(np.flatnonzero(over)[0]), k.shape)
        step = abs(float(k[at]))
        bad = float(np.broadcast_to(s, k.shape)[at])
        name = dtype if isinstance(dtype, torch.dtype) else np.dtype(dtype).name
        raise ValueError(
            f"scale {bad!r} puts the code at index {tuple(int(i) for i in at)}, {step:.0f} "
            f"steps from its zero point, beyond {largest_finite(dtype):.6g}, the largest "
            f"number of dtype {name}: it would dequantize to ±inf; the largest scale that "
            f"keeps it finite is {_largest_scale(step, dtype)!r} (a whole grid's: "
            "QuantSpec.max_scale), or pass dtype=float64")


def fake_quantize(
    x: ArrayLike,
    spec: QuantSpec,
    scale,
    zero_point=0,
    *,
    generator: SeedOrGenerator | None = None,
    return_saturation: bool = False,
    offset: int = 0,
):
    """Quantize then dequantize: ``x̂ = s · clamp(R(x/s + z) - z, qmin - z, qmax - z)``.

    Same arguments and arithmetic as :func:`quantize`, but a scale above
    ``spec.max_scale(zero_point, x.dtype)`` (:meth:`QuantSpec.max_scale`), whose grid's end
    levels ``s (qmax - z)`` or ``s (qmin - z)`` lie beyond the format's largest number
    (``±inf`` for finite data), is refused with ValueError naming the largest scale (a check
    of the parameters, not of the data). Returns an array of the
    input's dtype, and a dense tensor's layout (channels_last in, channels_last out:
    a convolution that follows runs on the layout it was given), and the
    :class:`Saturation` if asked. For a torch tensor that requires grad, the gradient is
    straight-through inside the range and zero where the value was clamped.

    Notes
    -----
    With ``ScaleArithmetic.RECIPROCAL`` and NEAREST_EVEN the result equals
    PyTorch's ``torch.fake_quantize_per_tensor_affine`` and
    ``torch.fake_quantize_per_channel_affine`` bit for bit (zeros are +0, as PyTorch's
    ``(q - z) s`` gives them) for float32, float16 and bfloat16 data. Not for float64 data,
    whose scale PyTorch rounds to float32 and qerror keeps in float64; nor, per channel,
    where ``|x/s|`` passes 2**63: PyTorch casts the quotient to int64 before clamping, an
    overflow that gives some code (seen: qmin for 3e38), where qerror clamps to qmax.
    """
    return _run(x, spec, scale, zero_point, generator, fake=True, count=return_saturation,
                offset=offset)


def _snapshot(value):
    """A copy of a scale or zero point of the kind given (a tensor stays a tensor on its
    device, an array an array, a number a number), so that the module functions see, and
    name in their errors, what the caller passed."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return copy.deepcopy(value)


class PreparedQuantizer:
    """:func:`quantize` and :func:`fake_quantize` for one spec, scale and zero point, with
    the checks and conversions of the parameters made once instead of on every call.

    Parameters
    ----------
    spec : QuantSpec
        Grid and rounding.
    scale, zero_point
        As for :func:`quantize`. They are copied when the quantizer is made: later changes
        to the tensors or arrays passed do not reach it (the attributes are read-only and
        give copies). They are checked on each call until they fit its input (once per
        channel count), with the errors :func:`quantize` gives; for :meth:`fake_quantize`
        also whether the grid's ends fit the input's dtype (:func:`fake_quantize`'s refusal
        of a scale above :meth:`QuantSpec.max_scale`), once per channel count on the fused
        loop, and refused on every call.

    Notes
    -----
    A call gives what the module function gives with the same arguments: the same codes or
    fake-quantized values (zeros' signs included), the same layout, :class:`Saturation` and
    errors. Float32 CPU tensors that :mod:`qerror._fused` takes (16,384 elements or more,
    EXACT arithmetic, dense in any order, a deterministic mode or STOCHASTIC from an integer
    seed) go to the same compiled loop with the scale, zero point and range already as its
    float32 tensors (made once per channel count); every other input goes through the module
    function. What this saves is the module function's checking and conversion of its
    arguments on every call (``studies.bench``, drift group: a call against the module
    function's on one layer's input), which an instrumented pass pays at every layer and
    configuration.
    """

    def __init__(self, spec: QuantSpec, scale, zero_point=0):
        check_spec(spec)
        self._spec = spec
        self._scale = _snapshot(scale)
        self._zero_point = _snapshot(zero_point)
        # channel count (None: per tensor) -> the fused loop's scale, zero point and range,
        # and whether the grid's ends fit float32 (fake-quantize refuses them otherwise)
        self._params: dict = {}

    @property
    def spec(self) -> QuantSpec:
        return self._spec

    @property
    def scale(self):
        """A copy of the scale the quantizer was made with."""
        return _snapshot(self._scale)

    @property
    def zero_point(self):
        """A copy of the zero point the quantizer was made with."""
        return _snapshot(self._zero_point)

    def __repr__(self) -> str:
        return (f"PreparedQuantizer({self._spec!r}, scale={self._scale!r}, "
                f"zero_point={self._zero_point!r})")

    def quantize(self, x: ArrayLike, *, generator: SeedOrGenerator | None = None,
                 return_saturation: bool = False, offset: int = 0):
        """:func:`quantize` of ``x`` with this spec, scale and zero point."""
        return self._call(x, generator, fake=False, count=return_saturation, offset=offset)

    def fake_quantize(self, x: ArrayLike, *, generator: SeedOrGenerator | None = None,
                      return_saturation: bool = False, offset: int = 0):
        """:func:`fake_quantize` of ``x`` with this spec, scale and zero point."""
        return self._call(x, generator, fake=True, count=return_saturation, offset=offset)

    def _call(self, x, generator, *, fake: bool, count: bool, offset: int):
        res = self._fused(x, generator, fake, count, offset)
        if res is None:
            return _run(x, self._spec, self._scale, self._zero_point, generator, fake=fake,
                        count=count, offset=offset)
        return res

    def _loop_params(self, x, axis, fake: bool):
        """The fused loop's float32 scale, zero point and code range for ``x`` (checked the
        first time for its channel count, and whether its grid's ends fit ``x``'s dtype);
        None where the parameters do not fit ``x``, or for ``fake`` not its dtype."""
        channels = None if axis is None else int(x.shape[axis])
        cached = self._params.get(channels)
        if cached is None:
            try:
                s, z = _check_params(x, self._spec, self._scale, self._zero_point, axis)
            except (TypeError, ValueError):
                return None  # the module function raises it, with its own message
            # the fused loop's dtype is float32 only; where the ends overflow its codes are
            # still right, and fake-quantize refuses in _run
            ends_fit = not np.any(_ends_overflow(self._spec, s, z, x.dtype)[0])
            c = 1 if channels is None else channels
            s3, z3 = s.reshape(1, c, 1), z.reshape(1, c, 1)
            like = torch.empty(0)
            cached = self._params[channels] = ((
                _as_param(s3, like, torch.float32), _as_param(z3, like, torch.float32),
                *_bounds(self._spec, z3, like, torch.float32)), ends_fit)
        params, ends_fit = cached
        return params if ends_fit or not fake else None

    def _fused(self, x, generator, fake: bool, count: bool, offset: int):
        """The fused loop's result for ``x``, as :func:`_run` gives it; None where ``x`` or
        the arguments are not the fused loop's (or it is off): :func:`_run` then decides."""
        spec = self._spec
        if not (isinstance(x, torch.Tensor) and x.ndim > 0 and type(offset) is int
                and 0 <= offset <= _MAX_INDEX - x.numel()
                and not (x.requires_grad and torch.is_grad_enabled())
                and _draws_nothing_first(spec, generator)
                and _fused.eligible(x, spec.rounding,
                                    spec.arithmetic is ScaleArithmetic.EXACT)):
            return None
        if spec.axis is not None and not -x.ndim <= spec.axis < x.ndim:
            return None
        random = spec.rounding.is_random
        order = None
        if x.stride() != _c_strides(x.shape):
            if x.is_contiguous():  # other strides on unit dimensions only: _run's case
                return None
            order = _dense_order(x)
            if order is None:  # gaps: quantized as a C-ordered copy by _run
                return None
        # As _run_in_layout: a deterministic mode quantizes the memory in the order it
        # lies; random draws follow the C-order index, so STOCHASTIC takes a C-ordered copy.
        view = x if order is None else (x.contiguous() if random else x.permute(order))
        if order is not None and not random and view.stride() != _c_strides(view.shape):
            return None  # other strides on its unit dimensions: _run keeps them, as given
        axis = None if spec.axis is None else spec.axis % x.ndim
        if axis is not None and order is not None and not random:
            axis = order.index(axis)
        params = self._loop_params(view, axis, fake)
        if params is None:
            return None
        shape = tuple(view.shape)
        if axis is None:
            dims = (1, 1, view.numel())
        else:
            dims = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))
        stream = hash_stream(stochastic_key(generator), offset) if random else None
        with torch.no_grad():
            res = _fused.run(view.detach().reshape(dims), *params, stream,
                             mode=spec.rounding, fake=fake, count=count)
        if res is None:
            return None
        out, low, high, bad = res
        if bool(bad.any()):
            check_finite(x, "x")  # raises, naming the first non-finite value
        out = out.reshape(shape)
        if order is not None:
            out = torch.empty_like(x, dtype=out.dtype).copy_(out) if random else \
                out.permute(tuple(int(d) for d in np.argsort(order)))
        if not count:
            return out
        return out, _saturation_result(low.numpy().astype(np.int64),
                                       high.numpy().astype(np.int64), dims[0] * dims[2], axis)
