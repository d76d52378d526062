"""Uniform (affine) quantization: specs, quantize/dequantize/fake-quantize, calibration.

Conventions (DESIGN §2): ``u = x/s + z``, ``q = clamp(R(u), qmin, qmax)``,
``x̂ = s (q - z)`` and the error is ``e = x̂ - x``. Rounding and clipping are
separate parts: the rounding mode acts on the shifted value ``u`` exactly (the
integer ``z`` is never added in floating point before rounding), and the clamp
follows.
"""

from __future__ import annotations

import enum
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from qerror._checks import check_finite, check_float_array, check_positive_finite
from qerror._enums import parse_enum
from qerror._exact import decide_boundary, residual_sign
from qerror.rounding import ArrayLike, Generator, RoundingMode, round_values, stochastic_key


class ScaleArithmetic(enum.Enum):
    """How the integer code of ``x / s`` is obtained.

    EXACT (the default) returns ``R`` applied to the exact real quotient
    ``x / s``: the quotient is computed in floating point, and where it lands
    exactly on a rounding boundary (a half-integer for the nearest modes, an
    integer for the others) the sign of the exact residual ``x - v s``
    (Dekker's error-free product) decides, so no code is ever off by one
    because of the division's own rounding. The error model of DESIGN §2 is
    stated for this quantizer.

    STOCHASTIC rounding is the exception: it rounds ``fl(x/s)`` up with
    probability equal to its fractional part, so its probabilities are those
    of the exact quotient only to within a few ulps.

    RECIPROCAL multiplies by ``1/s`` rounded to the working precision and rounds
    that product, as PyTorch's fake-quantize and the FBGEMM/oneDNN kernels do;
    use it to reproduce those engines bit for bit.
    """

    EXACT = "exact"
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
        Exact codes of ``x/s`` (default) or PyTorch's reciprocal arithmetic.
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
    arithmetic: ScaleArithmetic = ScaleArithmetic.EXACT

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
            object.__setattr__(self, name, parse_enum(enum_type, getattr(self, name), name))
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not self.symmetric and float(self.percentile) <= 50.0:
            raise ValueError(
                f"percentile {self.percentile} gives an empty affine range: the lower end is "
                "the (100 - p)th percentile, so p must be above 50 (e.g. 99.99)")
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
    wide = x.dtype == torch.float64 if isinstance(x, torch.Tensor) else x.dtype == np.float64
    working = np.dtype(np.float64 if wide else np.float32)
    info = np.finfo(working)
    if np.any(s < info.tiny) or np.any(s > info.max):
        bad = s[(s < info.tiny) | (s > info.max)].reshape(-1)[0]
        raise ValueError(
            f"scale {bad!r} is not a normal {working.name} number, the precision this input "
            f"is quantized in; use a scale in [{info.tiny:.3g}, {info.max:.3g}] (or float64 data)"
        )
    zp_src = zero_point.detach().cpu() if isinstance(zero_point, torch.Tensor) else zero_point
    z = np.asarray(zp_src)
    if z.dtype.kind == "f":
        if not np.all(np.isfinite(z)) or np.any(z != np.round(z)):
            raise ValueError(f"zero_point must hold integers, got {zero_point!r}")
    elif z.dtype.kind not in "iu":
        raise TypeError(f"zero_point must be an integer or integer array, got {zero_point!r}")
    if np.any(z < spec.qmin) or np.any(z > spec.qmax):
        bad = z[(z < spec.qmin) | (z > spec.qmax)].reshape(-1)[0]
        raise ValueError(
            f"zero_point {bad} is outside the integer range [{spec.qmin}, {spec.qmax}] "
            f"of a {spec.bits}-bit {'signed' if spec.signed else 'unsigned'} spec"
        )
    z = z.astype(np.int64)
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


def _scaled(x, spec: QuantSpec, s: np.ndarray):
    """``v ≈ x / s`` in the compute dtype, and the scale in that dtype."""
    torch_in = isinstance(x, torch.Tensor)
    cdt = _compute_dtype(x)
    scale = _as_param(s, x, cdt)
    if spec.arithmetic is ScaleArithmetic.RECIPROCAL:
        # The reciprocal is rounded to the working precision first, as the kernels do.
        if torch_in:
            inv = 1.0 / torch.as_tensor(s, dtype=cdt)
            return x.to(cdt) * (inv.item() if inv.ndim == 0 else inv.to(x.device)), scale
        with np.errstate(over="ignore"):
            return x.astype(cdt) * (cdt(1.0) / s.astype(cdt)), scale
    if torch_in:
        return x.to(cdt) / scale, scale
    with np.errstate(over="ignore"):  # a finite value far out of range: inf, then clamped
        return x.astype(cdt) / scale, scale


def _round_in_place(v, mode):
    if isinstance(v, torch.Tensor):
        method = {
            RoundingMode.NEAREST_EVEN: v.round_,
            RoundingMode.FLOOR: v.floor_,
            RoundingMode.CEIL: v.ceil_,
            RoundingMode.TOWARD_ZERO: v.trunc_,
        }.get(mode)
    else:
        func = {
            RoundingMode.NEAREST_EVEN: np.rint,
            RoundingMode.FLOOR: np.floor,
            RoundingMode.CEIL: np.ceil,
            RoundingMode.TOWARD_ZERO: np.trunc,
        }.get(mode)
        method = None if func is None else (lambda: func(v, out=v))
    return None if method is None else method()


def _shifted_codes(x, spec: QuantSpec, s: np.ndarray, z: np.ndarray, key, offset: int = 0):
    """``R(x/s + z) - z`` before clamping, in the compute dtype, and the scale.

    Away from ties ``R(v + z) = R(v) + z`` exactly for integer ``z`` and every
    mode but TOWARD_ZERO, whose choice depends on the sign of ``v + z``, decided
    as ``v >= -z`` without forming ``v + z`` in floating point. With EXACT
    arithmetic every value on a boundary (ties included) is settled on ``u``
    itself (see ScaleArithmetic). RECIPROCAL settles ties on ``v`` and adds
    ``z`` after, as PyTorch's kernels do.
    """
    torch_in = isinstance(x, torch.Tensor)
    v, scale = _scaled(x, spec, s)
    mode = spec.rounding
    shifted_trunc = mode is RoundingMode.TOWARD_ZERO and bool(np.any(z != 0))
    exact = spec.arithmetic is ScaleArithmetic.EXACT and not mode.is_random
    keep_v = exact or shifted_trunc
    grad = torch_in and v.requires_grad and torch.is_grad_enabled()

    if shifted_trunc:
        neg_z = _as_param(-z.astype(np.float64), x, _compute_dtype(x))
        lo = round_values(v, RoundingMode.FLOOR, None)
        hi = round_values(v, RoundingMode.CEIL, None)
        r = torch.where(v >= neg_z, lo, hi) if torch_in else np.where(v >= neg_z, lo, hi)
    else:
        # Rounding in place saves a pass, but only where v itself is not needed later.
        r = _round_in_place(v, mode) if not grad and not keep_v else None
        if r is None:
            r = round_values(v, mode, key, offset)
    if exact:
        r = _exact_correction(x, v, r, scale, z, spec, torch_in)
    elif mode.is_random and spec.arithmetic is ScaleArithmetic.EXACT:
        r = _snap_levels(x, v, r, scale, spec, z, torch_in)
    return r, scale


def _write_back(r, idx, fixed, torch_in):
    """``r`` with the codes at ``idx`` replaced by ``fixed`` (a copy if ``r`` needs grad)."""
    if torch_in:
        r = r.clone() if r.requires_grad else r
        r.detach()[idx] = torch.as_tensor(fixed, dtype=r.dtype, device=r.device)
        return r
    r[idx] = fixed
    return r


def _snap_levels(x, v, r, scale, spec, z, torch_in):
    """Give a stored level ``fl(b s)`` its code ``b`` under stochastic rounding.

    Stochastic rounding draws on ``fl(x/s)``; for a level, that quotient can be ``b`` plus or
    minus an ulp, which would round away from ``b`` with a tiny probability and break
    ``quantize ∘ dequantize = identity`` on codes. The exact value ``u`` of a level is the
    integer ``b``, which rounds to ``b`` with certainty; the directed modes get the same rule
    in :func:`_exact_correction`.
    """
    reach = float(np.max(np.maximum(np.abs(spec.qmin - z), np.abs(spec.qmax - z)))) + 2.0
    unit = np.finfo(np.float32 if v.dtype in (np.float32, torch.float32) else np.float64).eps
    margin = 4.0 * float(unit) * reach
    if torch_in:
        ref = torch.round(v)
        candidate = ((v - ref).abs() <= margin) & (v != ref) & (x.detach() != 0)
        if not bool(candidate.any()):
            return r
        idx = candidate.nonzero(as_tuple=True)
        x_sub = x.detach()[idx].to(v.dtype).cpu().numpy()
        b = ref.detach()[idx].cpu().numpy()
        s_sub = (np.full(b.shape, scale, dtype=b.dtype) if isinstance(scale, float)
                 else scale.expand_as(v)[idx].cpu().numpy())
    else:
        ref = np.rint(v)
        with np.errstate(invalid="ignore"):
            candidate = (np.abs(v - ref) <= margin) & (v != ref) & (x != 0)
        if not bool(candidate.any()):
            return r
        idx = np.nonzero(candidate)
        x_sub = x[idx].astype(v.dtype)
        b = ref[idx]
        s_sub = np.broadcast_to(np.asarray(scale, dtype=v.dtype), v.shape)[idx]
    on_level = _level(b, s_sub, x.dtype) == x_sub
    if not on_level.any():
        return r
    fixed = np.where(on_level, b, (r.detach()[idx].cpu().numpy() if torch_in else r[idx]))
    return _write_back(r, idx, fixed, torch_in)


def _exact_correction(x, v, r, scale, z, spec, torch_in):
    """Settle every value whose quotient lies within a few ulps of a boundary.

    Candidates are found in floating point with a margin wider than the
    division's error; each is then decided exactly by the sign of ``x - b s``
    (``b`` the boundary in v units). For the directed modes a value equal to a
    dequantized level ``fl(b s)`` gets code ``b``, so that quantize∘dequantize
    is the identity on codes although ``fl(b s)`` differs from ``b s``.
    """
    mode = spec.rounding
    nearest = mode in (RoundingMode.NEAREST_EVEN, RoundingMode.NEAREST_AWAY)
    # Values whose code lies beyond the integer range by more than one are clamped
    # whatever they round to, so one margin, sized for the largest in-range code,
    # covers every value whose code matters.
    reach = float(np.max(np.maximum(np.abs(spec.qmin - z), np.abs(spec.qmax - z)))) + 2.0
    unit = np.finfo(np.float32 if v.dtype in (np.float32, torch.float32) else np.float64).eps
    margin = 4.0 * float(unit) * reach
    # A dequantized level stored in half precision sits up to half a half-precision ulp
    # from k s: the directed modes must find it to give it code k.
    half = x.dtype in (np.float16, torch.float16, torch.bfloat16) and not nearest
    half_eps = float(torch.finfo(torch.bfloat16 if x.dtype == torch.bfloat16
                                 else torch.float16).eps) if half else 0.0
    if torch_in:
        ref = r if nearest else torch.round(v)
        dist = (v - ref).abs_()
        if half:
            margin = ref.abs().mul_(half_eps).add_(margin)
        candidate = dist >= 0.5 - margin if nearest else dist <= margin
        candidate &= ref.abs() <= reach
        if not nearest:
            # 0/s is exact: zeros (half of a ReLU's output) need no exact check.
            candidate &= x.detach() != 0
    else:
        ref = r if nearest else np.rint(v)
        with np.errstate(invalid="ignore"):  # inf - inf for values far out of range
            dist = np.abs(v - ref)
            if half:
                margin = np.abs(ref) * half_eps + margin
            candidate = dist >= 0.5 - margin if nearest else dist <= margin
            candidate &= np.abs(ref) <= reach
            if not nearest:
                candidate &= x != 0
    if not bool(candidate.any()):
        return r
    if torch_in:
        idx = candidate.nonzero(as_tuple=True)
        x_sub = x.detach()[idx].to(v.dtype).cpu().numpy()
        v_sub = v.detach()[idx].cpu().numpy()
        ref_sub = ref.detach()[idx].cpu().numpy()
        s_sub = (np.full(v_sub.shape, scale, dtype=v_sub.dtype) if isinstance(scale, float)
                 else scale.expand_as(v)[idx].cpu().numpy())
        z_sub = torch.as_tensor(z, dtype=v.dtype, device=v.device).expand_as(v)[idx].cpu().numpy()
    else:
        idx = np.nonzero(candidate)
        x_sub = x[idx].astype(v.dtype)
        v_sub = v[idx]
        ref_sub = ref[idx]
        s_sub = np.broadcast_to(np.asarray(scale, dtype=v.dtype), v.shape)[idx]
        z_sub = np.broadcast_to(z, v.shape)[idx].astype(v.dtype)
    if nearest:
        b = ref_sub + np.where(v_sub >= ref_sub, 0.5, -0.5).astype(v_sub.dtype)
        sign = residual_sign(x_sub, b, s_sub)
    else:
        b = ref_sub
        sign = np.where(_level(b, s_sub, x.dtype) == x_sub, 0.0, residual_sign(x_sub, b, s_sub))
    # The rule acts on u = b + z (exact: b is an integer or half-integer), and the
    # result is shifted back; tie rules and truncation depend on u, not on v.
    fixed = (decide_boundary(b + z_sub, sign, mode) - z_sub).astype(v_sub.dtype)
    return _write_back(r, idx, fixed, torch_in)


def _level(b: np.ndarray, s: np.ndarray, out_dtype) -> np.ndarray:
    """The dequantized level ``fl(b s)`` as the output holds it: computed in the working
    precision, then rounded to the input's own dtype (float16 or bfloat16 data)."""
    level = b * s
    if out_dtype in (np.float16, torch.float16, torch.bfloat16):
        half = torch.float16 if out_dtype in (np.float16, torch.float16) else torch.bfloat16
        level = torch.from_numpy(level).to(half).to(torch.float32).numpy()
    return level


def _bounds(spec: QuantSpec, z: np.ndarray, like, cdt):
    lo = (spec.qmin - z).astype(np.float64)
    hi = (spec.qmax - z).astype(np.float64)
    return _as_param(lo, like, cdt), _as_param(hi, like, cdt)


def _prepare(x, spec, scale, zero_point, generator):
    check_float_array(x, "x")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    axis = _normalise_axis(x, spec)
    s, z = _check_params(x, spec, scale, zero_point, axis)
    check_finite(x, "x")
    key = stochastic_key(generator) if spec.rounding.is_random else None
    return axis, s, z, key


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


def _run(x, spec, scale, zero_point, generator, *, fake: bool, count: bool):
    """Shared engine of :func:`quantize` and :func:`fake_quantize`.

    Returns the codes (int32) or the fake-quantized values (input dtype) and, if
    ``count``, the :class:`Saturation`.
    """
    check_float_array(x, "x")  # before x.ndim: a list must get a TypeError, not AttributeError
    if x.ndim == 0 and spec.axis is None:
        # One code path for every shape: a scalar is quantized as a 1-element array.
        res = _run(x.reshape(1), spec, scale, zero_point, generator, fake=fake, count=count)
        return (res[0].reshape(()), res[1]) if count else res.reshape(())
    axis, s, z, key = _prepare(x, spec, scale, zero_point, generator)
    torch_in = isinstance(x, torch.Tensor)
    cdt = _compute_dtype(x)
    if torch_in and x.requires_grad and torch.is_grad_enabled():
        return _run_autograd(x, spec, s, z, key, axis, fake=fake, count=count)
    shape = tuple(x.shape)
    channels = shape[axis] if axis is not None else 1
    outer = int(np.prod(shape[:axis], dtype=np.int64)) if axis is not None else 1
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) if axis is not None else int(
        np.prod(shape, dtype=np.int64))
    s3 = s.reshape(1, channels, 1)
    z3 = z.reshape(1, channels, 1)
    if torch_in:
        x3 = x.detach().contiguous().view(outer, channels, inner)
        out_dtype = x.dtype if fake else torch.int32
        out3 = torch.empty((outer, channels, inner), dtype=out_dtype, device=x.device)
    else:
        x3 = np.ascontiguousarray(x).reshape(outer, channels, inner)
        out3 = np.empty((outer, channels, inner), dtype=x.dtype if fake else np.int32)
    low = np.zeros(channels, dtype=np.int64)
    high = np.zeros(channels, dtype=np.int64)
    dims = None if axis is None else (0, 2)

    def one_block(block):
        so, sc, si, offset = block
        xb = x3[so, sc, si]
        if axis is None:
            # One scale: flat blocks and scalar parameters take torch's fastest kernels.
            sb, zb = s, z
            xb = xb.reshape(-1)
        else:
            sb, zb = s3[:, sc], z3[:, sc]
        r, scale_b = _shifted_codes(xb, spec, sb, zb, key, offset)
        lo, hi = _bounds(spec, zb, r, cdt)
        counts = None
        if count and torch_in:
            counts = ((r < lo).sum(dim=dims).cpu().numpy().reshape(-1),
                      (r > hi).sum(dim=dims).cpu().numpy().reshape(-1))
        elif count:
            counts = np.sum(r < lo, axis=dims), np.sum(r > hi, axis=dims)
        ob = out3[so, sc, si]
        if torch_in:
            r.clamp_(lo, hi)
            res = r.mul_(scale_b) if fake else r.to(torch.int32).add_(
                _as_param(zb, r, torch.int32))
        else:
            np.clip(r, lo, hi, out=r)
            res = np.multiply(r, scale_b, out=r) if fake else (
                r.astype(np.int32) + zb.astype(np.int32))
        ob[...] = res.reshape(ob.shape)
        return sc, counts

    on_cpu = not torch_in or x.device.type == "cpu"
    for sc, counts in _map_blocks(one_block, list(_blocks(outer, channels, inner)), on_cpu):
        if counts is not None:
            low[sc] += counts[0]
            high[sc] += counts[1]
    out = out3.reshape(shape)
    if not count:
        return out
    return out, _saturation_result(low, high, outer * inner, axis)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    # A forked child inherits the executor object but none of its threads.
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _map_blocks(func, blocks, on_cpu: bool):
    """Run ``func`` over blocks, on a small thread pool when there are several.

    Each block is a short chain of element-wise kernels on cache-resident data.
    Run serially with torch's intra-op threads, every kernel is its own parallel
    region, and on a loaded machine each region waits for a descheduled partner
    thread (ten times slower here). Blocks on separate Python threads (torch and
    numpy release the GIL) keep the cores busy without those barriers. Work on
    an accelerator stays on the caller's thread and stream. The workers run
    under the caller's inference mode, so they may write into its tensors.
    """
    global _POOL
    if len(blocks) == 1 or not on_cpu:
        return [func(b) for b in blocks]
    workers = max(1, min(torch.get_num_threads(), len(blocks)))
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qerror")
        pool = _POOL
    inference = torch.is_inference_mode_enabled()

    def in_caller_mode(block):
        with torch.inference_mode(inference), torch.no_grad():
            return func(block)

    return list(pool.map(in_caller_mode, blocks))


def _saturation_result(low, high, per_channel_total, axis) -> Saturation:
    if axis is None:
        return Saturation(np.asarray(low[0]), np.asarray(high[0]), np.asarray(per_channel_total))
    return Saturation(low, high, np.full(low.shape, per_channel_total))


def _run_autograd(x, spec, s, z, key, axis, *, fake: bool, count: bool):
    """Whole-tensor path for tensors that require grad (quantization-aware training)."""
    r, scale_c = _shifted_codes(x, spec, s, z, key)
    cdt = _compute_dtype(x)
    lo, hi = _bounds(spec, z, x, cdt)
    sat = None
    if count:
        dims = [d for d in range(r.ndim) if d != axis] if axis is not None else list(range(r.ndim))
        low = (r < lo).sum(dim=dims).reshape(-1).cpu().numpy()
        high = (r > hi).sum(dim=dims).reshape(-1).cpu().numpy()
        channels = x.shape[axis] if axis is not None else 1
        sat = _saturation_result(low, high, x.numel() // channels, axis)
    r = torch.clamp(r, lo, hi)
    if fake:
        out = (r * scale_c).to(x.dtype)
    else:
        out = r.detach().to(torch.int32) + _as_param(z, x, torch.int32)
    return (out, sat) if count else out


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
        Also return a :class:`Saturation`: the elements with ``R(u) < qmin`` and
        with ``R(u) > qmax``, per tensor or per channel.

    Returns
    -------
    q : int32 array or tensor, same shape as ``x``
    saturation : Saturation, only if ``return_saturation``

    Notes
    -----
    Arithmetic is in float32 for float16/bfloat16/float32 inputs and float64 for
    float64 inputs; the scale is first rounded to that precision, and it is that
    rounded scale the codes are exact for. Work proceeds in cache-sized blocks.
    """
    return _run(x, spec, scale, zero_point, generator, fake=False, count=return_saturation)


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
    """
    if isinstance(q, torch.Tensor):
        if q.dtype.is_floating_point or q.dtype == torch.bool:
            raise TypeError(f"q must hold integer codes, got dtype {q.dtype}")
        dtype = dtype or torch.float32
        work = torch.float64 if dtype == torch.float64 else torch.float32
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
    s = check_positive_finite(scale, "scale")
    z = np.asarray(zero_point.detach().cpu() if isinstance(zero_point, torch.Tensor)
                   else zero_point)
    if z.dtype.kind not in "iu" and not (z.dtype.kind == "f" and np.all(z == np.round(z))):
        raise TypeError(f"zero_point must hold integers, got {zero_point!r}")
    shape = _param_shape(q, ax)
    params = []
    for name, arr in (("scale", s), ("zero_point", z.astype(np.float64))):
        if ax is None and arr.size != 1:
            raise ValueError(f"{name} has {arr.size} values; pass axis= for per-channel codes")
        if ax is not None and arr.size not in (1, q.shape[ax]):
            raise ValueError(f"{name} has {arr.size} values for {q.shape[ax]} channels")
        arr = arr.reshape(()) if ax is None else np.broadcast_to(
            arr.reshape(-1), (q.shape[ax],)).reshape(shape)
        params.append(_as_param(arr, q, work))
    sv, zv = params
    if isinstance(q, torch.Tensor):
        return ((q.to(work) - zv) * sv).to(dtype)
    return ((q.astype(work) - zv) * sv).astype(dtype, copy=False)


def fake_quantize(
    x: ArrayLike,
    spec: QuantSpec,
    scale,
    zero_point=0,
    *,
    generator: Generator | None = None,
    return_saturation: bool = False,
):
    """Quantize then dequantize: ``x̂ = s · clamp(R(x/s + z) - z, qmin - z, qmax - z)``.

    Same arguments and arithmetic as :func:`quantize`. Returns an array of the
    input's dtype (and the :class:`Saturation` if asked). For a torch tensor
    that requires grad, the gradient is straight-through inside the range and
    zero where the value was clamped.

    Notes
    -----
    With ``ScaleArithmetic.RECIPROCAL`` and NEAREST_EVEN the result equals
    PyTorch's ``torch.fake_quantize_per_tensor_affine`` and
    ``torch.fake_quantize_per_channel_affine`` bit for bit.
    """
    return _run(x, spec, scale, zero_point, generator, fake=True, count=return_saturation)
