"""Error-free arithmetic that lets the quantizer decide codes on the exact quotient x/s."""

from __future__ import annotations

import numpy as np

from qerror.rounding import RoundingMode


def _veltkamp(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``a`` into ``hi + lo`` with half-width significands (exact)."""
    factor = a.dtype.type(4097.0 if a.dtype == np.float32 else 134217729.0)
    c = factor * a
    hi = c - (c - a)
    return hi, a - hi


def residual_sign(x: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Exact sign of ``x - v*s`` for floats of one dtype (Dekker's two-product).

    Callers pass ``v`` within a few ulps of ``x / s``, so ``p = fl(v s)`` is
    within a factor two of ``x``, ``x - p`` is exact (Sterbenz) and
    ``(x - p) - err`` has the exact sign. ``x`` and ``s`` are first scaled by
    one power of two that brings ``s`` into [0.5, 1): exact, and it keeps the
    split and the products clear of underflow (subnormal scales) and overflow
    (huge scales). Where ``v`` is 0 the residual is ``x`` itself.
    """
    _, e = np.frexp(s)
    xs = np.ldexp(x, -e)
    ss = np.ldexp(s, -e)
    p = v * ss
    vh, vl = _veltkamp(v)
    sh, sl = _veltkamp(ss)
    err = ((vh * sh - p) + vh * sl + vl * sh) + vl * sl
    return np.where(v == 0, np.sign(x), np.sign((xs - p) - err))


def decide_boundary(n_sub, sign, mode: RoundingMode) -> np.ndarray:
    """``R(u)`` for ``u = n + sign * tiny``, ``n`` a rounding boundary of ``mode``.

    ``n`` is a half-integer for the nearest modes and an integer otherwise;
    ``sign == 0`` means ``u`` is exactly ``n``.
    """
    if mode in (RoundingMode.NEAREST_EVEN, RoundingMode.NEAREST_AWAY):
        down = n_sub - 0.5
        # A true tie: to the even neighbour, or away from zero, of u itself.
        tie = np.rint(n_sub) if mode is RoundingMode.NEAREST_EVEN else down + (n_sub > 0)
        return np.where(sign > 0, down + 1, np.where(sign < 0, down, tie))
    floor = np.where(sign < 0, n_sub - 1, n_sub)
    ceil = np.where(sign > 0, n_sub + 1, n_sub)
    if mode is RoundingMode.FLOOR:
        return floor
    if mode is RoundingMode.CEIL:
        return ceil
    # TOWARD_ZERO: floor above zero, ceil below, and 0 for a true value just off 0.
    return np.where(n_sub > 0, floor, np.where(n_sub < 0, ceil, 0.0))
