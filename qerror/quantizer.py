"""Uniform (affine) quantization: specs, quantize/dequantize/fake-quantize, calibration.

Conventions (DESIGN §2): ``u = x/s + z``, ``q = clamp(R(u), qmin, qmax)``,
``x̂ = s (q - z)`` and the error is ``e = x̂ - x``. Rounding and clipping are
separate parts: the rounding mode acts on the shifted value ``u`` exactly (the
integer ``z`` is never added in floating point before rounding), and the clamp
follows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from qerror._checks import check_finite, check_float_array, check_positive_finite
from qerror.rounding import ArrayLike, Generator, RoundingMode, round_values, stochastic_key


class ScaleArithmetic(enum.Enum):
    """How ``x / s`` is computed.

    DIVIDE divides, so ``u`` is the correctly rounded quotient: qerror's default,
    because the error model is stated for ``x/s``. RECIPROCAL multiplies by
    ``1/s`` rounded to the working precision, as PyTorch's fake-quantize and
    FBGEMM/oneDNN kernels do; use it to reproduce those engines bit for bit.
    """

    DIVIDE = "divide"
    RECIPROCAL = "reciprocal"


class RangeMethod(enum.Enum):
    """How the real range ``[lo, hi]`` (and so scale and zero point) is chosen."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


@dataclass(frozen=True)
class QuantSpec:
    """Everything that defines a uniform quantizer except its scale and zero point.

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
    range_method : RangeMethod
        Calibration rule used by :func:`calibrate`.
    percentile : float
        Percentile of ``|x|`` (symmetric) or of each tail (affine) for PERCENTILE.
    mse_grid : int
        Number of clipping candidates tried by the MSE search.
    arithmetic : ScaleArithmetic
        Divide by the scale or multiply by its reciprocal.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    rounding: RoundingMode = RoundingMode.NEAREST_EVEN
    narrow: bool = False
    range_method: RangeMethod = RangeMethod.MINMAX
    percentile: float = 99.99
    mse_grid: int = 100
    arithmetic: ScaleArithmetic = ScaleArithmetic.DIVIDE

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not 2 <= int(self.bits) <= 16:
            raise ValueError(f"bits must be between 2 and 16, got {self.bits}")
        for name in ("signed", "symmetric", "narrow"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.axis is not None and (
            isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer))
        ):
            raise TypeError(f"axis must be an int or None, got {self.axis!r}")
        object.__setattr__(self, "rounding", RoundingMode.parse(self.rounding))
        for name, enum_type in (("range_method", RangeMethod), ("arithmetic", ScaleArithmetic)):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                try:
                    object.__setattr__(self, name, enum_type(str(value).lower()))
                except ValueError:
                    options = ", ".join(m.value for m in enum_type)
                    raise ValueError(f"{name} {value!r} is not one of: {options}") from None
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if int(self.mse_grid) < 2:
            raise ValueError(f"mse_grid must be at least 2, got {self.mse_grid}")
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

    def replace(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)


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


def _normalise_axis(x, spec: QuantSpec) -> int | None:
    if spec.axis is None:
        return None
    ndim = x.ndim
    if not -ndim <= spec.axis < ndim:
        raise ValueError(
            f"spec.axis={spec.axis} is out of range for an input of shape {tuple(x.shape)}"
        )
    return spec.axis % ndim


def _check_params(x, spec: QuantSpec, scale, zero_point, axis):
    """Validate scale and zero point; return them as float64/int64 numpy arrays shaped
    to broadcast against ``x``."""
    s = check_positive_finite(scale, "scale")
    zp_src = zero_point.detach().cpu() if isinstance(zero_point, torch.Tensor) else zero_point
    z = np.asarray(zp_src)
    if z.dtype.kind == "f":
        if not np.all(np.isfinite(z)) or np.any(z != np.round(z)):
            raise ValueError(f"zero_point must hold integers, got {zero_point!r}")
    elif z.dtype.kind not in "iu":
        raise TypeError(f"zero_point must be an integer or integer array, got {zero_point!r}")
    z = z.astype(np.int64)
    if np.any(z < spec.qmin) or np.any(z > spec.qmax):
        bad = z[(z < spec.qmin) | (z > spec.qmax)].reshape(-1)[0]
        raise ValueError(
            f"zero_point {int(bad)} is outside the integer range [{spec.qmin}, {spec.qmax}] "
            f"of a {spec.bits}-bit {'signed' if spec.signed else 'unsigned'} spec"
        )
    if spec.symmetric and np.any(z != 0):
        raise ValueError(
            f"zero_point must be 0 for a symmetric spec, got {zero_point!r}; "
            "use QuantSpec(symmetric=False) for an affine quantizer"
        )
    shape = _param_shape(x, axis)
    if axis is None:
        for name, arr in (("scale", s), ("zero_point", z)):
            if arr.size != 1:
                raise ValueError(
                    f"{name} has {arr.size} values but the spec is per-tensor (axis=None); "
                    "pass a scalar or set QuantSpec(axis=...)"
                )
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
        return torch.as_tensor(arr, dtype=dtype, device=like.device)
    if arr.ndim == 0:
        return dtype(arr.item()) if dtype in (np.float32, np.float64) else arr.item()
    return arr.astype(dtype)


def _shifted_codes(x, spec: QuantSpec, s: np.ndarray, z: np.ndarray, key):
    """``R(x/s + z) - z`` before clamping, in the compute dtype.

    For every mode but TOWARD_ZERO ``R(v + z) = R(v) + z`` exactly for integer
    ``z``; truncation depends on the sign of ``v + z``, decided exactly as
    ``v >= -z`` without forming ``v + z`` in floating point.
    """
    torch_in = isinstance(x, torch.Tensor)
    cdt = _compute_dtype(x)
    grad = torch_in and x.requires_grad and torch.is_grad_enabled()
    scale = _as_param(s, x, cdt)
    if spec.arithmetic is ScaleArithmetic.RECIPROCAL:
        # The reciprocal is rounded to the working precision first, as the kernels do.
        if torch_in:
            inv = 1.0 / torch.as_tensor(s, dtype=cdt)
            v = x.to(cdt) * (inv.item() if inv.ndim == 0 else inv.to(x.device))
        else:
            v = x.astype(cdt) * (cdt(1.0) / s.astype(cdt))
    else:
        v = x.to(cdt) / scale if torch_in else x.astype(cdt) / scale
    mode = spec.rounding
    if mode is RoundingMode.TOWARD_ZERO and np.any(z != 0):
        zc = _as_param(z.astype(np.float64), x, cdt)
        neg_z = -zc
        if torch_in:
            lo = round_values(v, RoundingMode.FLOOR, None)
            hi = round_values(v, RoundingMode.CEIL, None)
            return torch.where(v >= neg_z, lo, hi), scale
        return np.where(v >= neg_z, np.floor(v), np.ceil(v)), scale
    if torch_in and not grad and v.data_ptr() != x.data_ptr():
        in_place = {
            RoundingMode.NEAREST_EVEN: v.round_,
            RoundingMode.FLOOR: v.floor_,
            RoundingMode.CEIL: v.ceil_,
            RoundingMode.TOWARD_ZERO: v.trunc_,
        }.get(mode)
        if in_place is not None:
            return in_place(), scale
    return round_values(v, mode, key), scale


def _bounds(spec: QuantSpec, z: np.ndarray, like, cdt):
    lo = (spec.qmin - z).astype(np.float64)
    hi = (spec.qmax - z).astype(np.float64)
    return _as_param(lo, like, cdt), _as_param(hi, like, cdt)


def _saturation(r, lo, hi, axis) -> Saturation:
    if isinstance(r, torch.Tensor):
        dims = [d for d in range(r.ndim) if d != axis] if axis is not None else None
        below = r < lo
        above = r > hi
        if dims is None:
            low = np.asarray(int(below.sum()))
            high = np.asarray(int(above.sum()))
            total = np.asarray(r.numel())
        else:
            low = below.sum(dim=dims).cpu().numpy().reshape(-1)
            high = above.sum(dim=dims).cpu().numpy().reshape(-1)
            total = np.full(low.shape, r.numel() // r.shape[axis])
        return Saturation(low, high, total)
    dims = tuple(d for d in range(r.ndim) if d != axis) if axis is not None else None
    low = np.asarray(np.sum(r < lo, axis=dims))
    high = np.asarray(np.sum(r > hi, axis=dims))
    total = np.full(low.shape, r.size // (r.shape[axis] if axis is not None else 1))
    return Saturation(low.reshape(low.shape), high.reshape(high.shape), total)


def _clamp(r, lo, hi):
    if isinstance(r, torch.Tensor):
        if r.requires_grad:
            return torch.clamp(r, lo, hi)
        return r.clamp_(lo, hi)
    return np.clip(r, lo, hi, out=r)


def _prepare(x, spec, scale, zero_point, generator):
    check_float_array(x, "x")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    axis = _normalise_axis(x, spec)
    s, z = _check_params(x, spec, scale, zero_point, axis)
    check_finite(x, "x")
    key = stochastic_key(generator) if spec.rounding.is_random else None
    return axis, s, z, key


def quantize(
    x: ArrayLike,
    spec: QuantSpec,
    scale,
    zero_point=0,
    *,
    generator: Generator | None = None,
    return_saturation: bool = False,
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
        Required for STOCHASTIC rounding.
    return_saturation : bool
        Also return a :class:`Saturation` with the counts clamped at each end.

    Returns
    -------
    q : int32 array or tensor, same shape as ``x``
    saturation : Saturation, only if ``return_saturation``
    """
    axis, s, z, key = _prepare(x, spec, scale, zero_point, generator)
    r, _ = _shifted_codes(x, spec, s, z, key)
    cdt = _compute_dtype(x)
    lo, hi = _bounds(spec, z, x, cdt)
    sat = _saturation(r, lo, hi, axis) if return_saturation else None
    r = _clamp(r.detach() if isinstance(r, torch.Tensor) else r, lo, hi)
    zc = _as_param(z, x, torch.int32 if isinstance(x, torch.Tensor) else np.int32)
    q = (r.to(torch.int32) + zc) if isinstance(r, torch.Tensor) else (r.astype(np.int32) + zc)
    return (q, sat) if return_saturation else q


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
        Output float dtype (default float32).
    """
    if isinstance(q, torch.Tensor):
        if q.dtype.is_floating_point or q.dtype == torch.bool:
            raise TypeError(f"q must hold integer codes, got dtype {q.dtype}")
        dtype = dtype or torch.float32
    elif isinstance(q, np.ndarray):
        if q.dtype.kind not in "iu":
            raise TypeError(f"q must hold integer codes, got dtype {q.dtype}")
        dtype = dtype or np.float32
    else:
        raise TypeError(f"q must be a numpy.ndarray or torch.Tensor, got {type(q).__name__}")
    if axis is not None and not -q.ndim <= axis < q.ndim:
        raise ValueError(f"axis={axis} is out of range for codes of shape {tuple(q.shape)}")
    ax = None if axis is None else axis % q.ndim
    s = check_positive_finite(scale, "scale")
    z = np.asarray(zero_point.detach().cpu() if isinstance(zero_point, torch.Tensor)
                   else zero_point)
    if z.dtype.kind not in "iu" and not (z.dtype.kind == "f" and np.all(z == np.round(z))):
        raise TypeError(f"zero_point must hold integers, got {zero_point!r}")
    shape = _param_shape(q, ax)
    if ax is not None:
        for name, arr in (("scale", s), ("zero_point", z)):
            if arr.size not in (1, q.shape[ax]):
                raise ValueError(f"{name} has {arr.size} values for {q.shape[ax]} channels")
    sv = _as_param(np.broadcast_to(s, shape if ax is not None else ()).copy(), q, dtype)
    zv = _as_param(np.broadcast_to(z.astype(np.float64), shape if ax is not None else ()).copy(),
                   q, dtype)
    if isinstance(q, torch.Tensor):
        return (q.to(dtype) - zv) * sv
    return ((q.astype(dtype) - zv) * sv).astype(dtype, copy=False)


def fake_quantize(
    x: ArrayLike,
    spec: QuantSpec,
    scale,
    zero_point=0,
    *,
    generator: Generator | None = None,
    return_saturation: bool = False,
):
    """Quantize then dequantize in one pass: ``x̂ = s · clamp(R(x/s + z) - z, qmin - z, qmax - z)``.

    Same arguments as :func:`quantize`. Returns an array of the input's dtype
    (and the :class:`Saturation` if asked). For a torch tensor that requires
    grad, the gradient is straight-through inside the range and zero where the
    value was clamped.

    Notes
    -----
    Arithmetic is in float32 for float16/bfloat16/float32 inputs and float64 for
    float64 inputs; the scale is rounded to that precision. With
    ``ScaleArithmetic.RECIPROCAL`` and NEAREST_EVEN the result equals PyTorch's
    ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` bit for bit.
    """
    axis, s, z, key = _prepare(x, spec, scale, zero_point, generator)
    r, scale_c = _shifted_codes(x, spec, s, z, key)
    cdt = _compute_dtype(x)
    lo, hi = _bounds(spec, z, x, cdt)
    sat = _saturation(r, lo, hi, axis) if return_saturation else None
    r = _clamp(r, lo, hi)
    if isinstance(r, torch.Tensor):
        out = r * scale_c if r.requires_grad else r.mul_(scale_c)
        out = out.to(x.dtype)
    else:
        out = np.multiply(r, scale_c, out=r).astype(x.dtype, copy=False)
    return (out, sat) if return_saturation else out


# --------------------------------------------------------------------------- calibration


def _reduce_dims(x, axis):
    return tuple(d for d in range(x.ndim) if d != axis)


def _to_numpy64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def observed_range(x: ArrayLike, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` of ``x`` by ``spec.range_method`` (MSE uses min-max as its start).

    Per tensor the results are 0-d arrays; per channel 1-D of length C.
    """
    check_float_array(x, "x")
    check_finite(x, "x")
    axis = _normalise_axis(x, spec)
    data = _to_numpy64(x)
    dims = _reduce_dims(data, axis) if axis is not None else None
    if spec.range_method is RangeMethod.PERCENTILE:
        p = float(spec.percentile)
        if spec.symmetric:
            hi = np.percentile(np.abs(data), p, axis=dims)
            return -hi, hi
        return (np.percentile(data, 100.0 - p, axis=dims),
                np.percentile(data, p, axis=dims))
    return np.min(data, axis=dims), np.max(data, axis=dims)


def qparams_from_range(lo, hi, spec: QuantSpec) -> QParams:
    """Scale and zero point that map ``[lo, hi]`` onto the spec's integer range.

    Symmetric: ``s = max(|lo|, |hi|) / qmax`` and ``z = 0`` (for an unsigned
    spec this covers ``[0, hi]``: negative values clamp to 0). Affine: the range
    is widened to contain 0 so that 0 is exactly representable, then
    ``s = (hi - lo) / (qmax - qmin)`` and ``z = qmin - round(lo / s)``.
    A zero-width range gets ``s = 1``: any scale represents it exactly.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)):
        raise ValueError("range bounds must be finite")
    if np.any(lo > hi):
        raise ValueError(f"range has lo > hi: lo={lo}, hi={hi}")
    if spec.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if spec.signed else np.maximum(hi, 0.0)
        scale = np.where(amax > 0, amax / spec.qmax, 1.0)
        zp = np.zeros(scale.shape, dtype=np.int64)
    else:
        lo0 = np.minimum(lo, 0.0)
        hi0 = np.maximum(hi, 0.0)
        width = hi0 - lo0
        scale = np.where(width > 0, width / (spec.qmax - spec.qmin), 1.0)
        zp = np.clip(spec.qmin - np.rint(lo0 / scale), spec.qmin, spec.qmax).astype(np.int64)
    if scale.ndim == 0:
        return QParams(float(scale), int(zp))
    return QParams(scale, zp)


def calibrate(x: ArrayLike, spec: QuantSpec, *, generator: Generator | None = None) -> QParams:
    """Choose scale and zero point for ``x`` by ``spec.range_method``.

    MSE searches ``spec.mse_grid`` shrink factors ``c`` in ``(0, 1]`` of the
    min-max range and keeps, per tensor or per channel, the one whose
    fake-quantization MSE on ``x`` is smallest (ties go to the widest range).
    """
    lo, hi = observed_range(x, spec)
    if spec.range_method is not RangeMethod.MSE:
        return qparams_from_range(lo, hi, spec)
    axis = _normalise_axis(x, spec)
    data = _to_numpy64(x)
    dims = _reduce_dims(data, axis) if axis is not None else None
    best_err = np.full(np.shape(lo), np.inf)
    best_scale = np.ones(np.shape(lo))
    best_zp = np.zeros(np.shape(lo), dtype=np.int64)
    for c in np.linspace(1.0, 1.0 / spec.mse_grid, spec.mse_grid):
        params = qparams_from_range(lo * c, hi * c, spec)
        key = stochastic_key(generator) if spec.rounding.is_random else None
        sc = np.asarray(params.scale).reshape(_param_shape(data, axis) if axis is not None else ())
        zp = np.asarray(params.zero_point).reshape(sc.shape)
        r, _ = _shifted_codes(data, spec, sc, zp, key)
        lo_b, hi_b = _bounds(spec, zp, data, np.float64)
        xq = np.clip(r, lo_b, hi_b) * sc
        err = np.mean((xq - data) ** 2, axis=dims)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, params.scale, best_scale)
        best_zp = np.where(better, params.zero_point, best_zp)
    if np.ndim(best_scale) == 0:
        return QParams(float(best_scale), int(best_zp))
    return QParams(best_scale, best_zp.astype(np.int64))
