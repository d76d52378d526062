"""Range calibration: the real range [lo, hi], and the scale and zero point that cover it."""

from __future__ import annotations

import numpy as np
import torch

from qerror._checks import check_finite, check_float_array
from qerror.quantizer import (
    QParams,
    QuantSpec,
    RangeMethod,
    _bounds,
    _normalise_axis,
    _param_shape,
    _shifted_codes,
)
from qerror.rounding import ArrayLike, Generator, stochastic_key


def _reduce_dims(x, axis):
    return tuple(d for d in range(x.ndim) if d != axis)


def _to_numpy64(x) -> np.ndarray:
    """float64 numpy copy, at least 1-D (a scalar is calibrated as a 1-element tensor)."""
    if isinstance(x, torch.Tensor):
        return np.atleast_1d(x.detach().cpu().to(torch.float64).numpy())
    return np.atleast_1d(np.asarray(x, dtype=np.float64))


def _min_scale(x) -> float:
    """Smallest normal number of the precision ``x`` is quantized in."""
    wide = x.dtype == torch.float64 if isinstance(x, torch.Tensor) else x.dtype == np.float64
    return float(np.finfo(np.float64 if wide else np.float32).tiny)


def observed_range(x: ArrayLike, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` of ``x`` by ``spec.range_method`` (MSE uses min-max as its start).

    Per tensor the results are 0-d arrays; per channel 1-D of length C.
    """
    check_float_array(x, "x")
    check_finite(x, "x")
    axis = _normalise_axis(x, spec)
    return _range(_to_numpy64(x), spec, axis)


def _range(data: np.ndarray, spec: QuantSpec, axis: int | None):
    """:func:`observed_range` on validated float64 data."""
    dims = _reduce_dims(data, axis) if axis is not None else None
    if spec.range_method is RangeMethod.PERCENTILE:
        p = float(spec.percentile)
        if spec.symmetric and spec.signed:
            hi = np.percentile(np.abs(data), p, axis=dims)
            return -hi, hi
        if spec.symmetric:  # unsigned, zero point 0: only the positive side is represented
            hi = np.percentile(np.maximum(data, 0.0), p, axis=dims)
            return np.zeros_like(hi), hi
        return (np.percentile(data, 100.0 - p, axis=dims),
                np.percentile(data, p, axis=dims))
    return np.min(data, axis=dims), np.max(data, axis=dims)


def qparams_from_range(lo, hi, spec: QuantSpec, *,
                       min_scale: float = float(np.finfo(np.float32).tiny)) -> QParams:
    """Scale and zero point that map ``[lo, hi]`` onto the spec's integer range.

    Symmetric: ``s = max(|lo|, |hi|) / qmax`` and ``z = 0`` (for an unsigned
    spec this covers ``[0, hi]``: negative values clamp to 0). Affine: the range
    is widened to contain 0 so that 0 is exactly representable, then
    ``s = (hi - lo) / (qmax - qmin)`` and ``z = qmin - round(lo / s)``.
    A zero-width range gets ``s = 1``: any scale represents it exactly. A scale
    below ``min_scale`` (the smallest normal float32 by default) is raised to it,
    so that it survives rounding to the working precision.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)):
        raise ValueError("range bounds must be finite")
    if np.any(lo > hi):
        raise ValueError(f"range has lo > hi: lo={lo}, hi={hi}")
    if spec.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if spec.signed else np.maximum(hi, 0.0)
        scale = np.where(amax > 0, np.maximum(amax / spec.qmax, min_scale), 1.0)
        zp = np.zeros(scale.shape, dtype=np.int64)
    else:
        lo0 = np.minimum(lo, 0.0)
        hi0 = np.maximum(hi, 0.0)
        width = hi0 - lo0
        scale = np.where(width > 0, np.maximum(width / (spec.qmax - spec.qmin), min_scale), 1.0)
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
    check_float_array(x, "x")
    check_finite(x, "x")
    axis = _normalise_axis(x, spec)
    data = _to_numpy64(x)
    lo, hi = _range(data, spec, axis)
    min_scale = _min_scale(x)
    if spec.range_method is not RangeMethod.MSE:
        return qparams_from_range(lo, hi, spec, min_scale=min_scale)
    dims = _reduce_dims(data, axis) if axis is not None else None
    best_err = np.full(np.shape(lo), np.inf)
    best_scale = np.ones(np.shape(lo))
    best_zp = np.zeros(np.shape(lo), dtype=np.int64)
    for c in np.linspace(1.0, 1.0 / spec.mse_grid, spec.mse_grid):
        params = qparams_from_range(lo * c, hi * c, spec, min_scale=min_scale)
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
