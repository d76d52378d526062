"""The exact-code engine: settle every quotient ``fl(x/s)`` that lies within a few ulps of a
rounding boundary on the exact value ``x/s`` instead.

Candidates are found in floating point with a margin wider than the division's error; each
is then decided by the sign of the exact residual ``x - b s`` (Dekker's error-free product),
``b`` the boundary, under the mode's :class:`~qerror.rounding.BoundaryRule`, and written
back. Only the few candidates ever leave the vectorised pass. The error-free
transformations it rests on (:func:`veltkamp_split`, :func:`two_sum`) also place a law's
points against the grid in :mod:`qerror.analytic`.
"""

from __future__ import annotations

import numpy as np
import torch

from qerror.rounding import RoundingMode

_HALF_DTYPES = (np.float16, torch.float16, torch.bfloat16)


def veltkamp_split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``a`` into ``hi + lo`` with half-width significands (exact; Veltkamp)."""
    factor = a.dtype.type(4097.0 if a.dtype == np.float32 else 134217729.0)
    c = factor * a
    hi = c - (c - a)
    return hi, a - hi


def two_sum(a, b):
    """``a + b = s + e`` exactly, elementwise (Knuth's two-sum)."""
    s = a + b
    bv = s - a
    return s, (a - (s - bv)) + (b - bv)


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
    vh, vl = veltkamp_split(v)
    sh, sl = veltkamp_split(ss)
    err = ((vh * sh - p) + vh * sl + vl * sh) + vl * sl
    return np.where(v == 0, np.sign(x), np.sign((xs - p) - err))


def _level(b: np.ndarray, s: np.ndarray, out_dtype) -> np.ndarray:
    """The dequantized level ``fl(b s)`` as the output holds it: computed in the working
    precision, then rounded to the input's own dtype (float16 or bfloat16 data)."""
    level = b * s
    if out_dtype in _HALF_DTYPES:
        half = torch.float16 if out_dtype in (np.float16, torch.float16) else torch.bfloat16
        level = torch.from_numpy(level).to(half).to(torch.float32).numpy()
    return level


def _write_back(r, idx, fixed, torch_in):
    """``r`` with the codes at ``idx`` replaced by ``fixed`` (a copy if ``r`` needs grad)."""
    if torch_in:
        r = r.clone() if r.requires_grad else r
        r.detach()[idx] = torch.as_tensor(fixed, dtype=r.dtype, device=r.device)
        return r
    r[idx] = fixed
    return r


def _true_indices(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the True entries of a C-contiguous boolean array.

    Candidates are a few in ten thousand: scanning the mask eight bytes at a time and
    expanding only the nonzero words is several times faster than ``np.flatnonzero``.
    """
    flat = mask.reshape(-1)
    whole = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    idx = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    idx = idx[flat[idx]]
    if whole == flat.size:
        return idx
    return np.concatenate([idx, np.flatnonzero(flat[whole:]) + whole])


def _numpy_candidates(x, v, r, offset: float, margin, reach: float, half_eps: float):
    """Index tuple of the candidates of numpy arrays, and the nearest integer of each."""
    with np.errstate(invalid="ignore"):  # inf - inf for values far out of range
        ref = r if offset else np.rint(v)
        dist = np.subtract(v, ref)
        np.abs(dist, out=dist)
        if offset:
            mask = dist >= 0.5 - margin
        else:
            if half_eps:
                margin = np.abs(ref) * half_eps + margin
            mask = dist <= margin
            # 0/s is exact: zeros (half of a ReLU's output) need no exact check.
            mask &= x != 0
    flat = _true_indices(mask)
    ref_sub = ref.reshape(-1)[flat]
    # Values whose code lies beyond the integer range by more than one are clamped
    # whatever they round to; the margin is sized for the codes inside.
    near = np.abs(ref_sub) <= reach
    return np.unravel_index(flat[near], v.shape), ref_sub[near]


def _torch_candidates(x, v, r, offset: float, margin, reach: float, half_eps: float):
    """As :func:`_numpy_candidates`, for tensors on any device."""
    ref = r if offset else torch.round(v)
    dist = (v - ref).abs_()
    if half_eps:
        margin = ref.abs().mul_(half_eps).add_(margin)
    candidate = dist >= 0.5 - margin if offset else dist <= margin
    candidate &= ref.abs() <= reach
    if not offset:
        candidate &= x.detach() != 0
    if not bool(candidate.any()):
        return None, None
    idx = candidate.nonzero(as_tuple=True)
    return idx, ref.detach()[idx].cpu().numpy()


def exact_codes(x, v, r, scale, z, qmin: int, qmax: int, mode: RoundingMode):
    """``r = R(v)`` with every code whose quotient lies near a boundary decided exactly.

    Parameters
    ----------
    x : numpy array or torch tensor
        The data.
    v : same type, shape of ``x``, working dtype
        ``fl(x / s)``.
    r : same type and shape as ``v``
        The mode's kernel applied to ``v`` (codes in ``v`` units, before clamping); it is
        corrected in place (or copied first if it needs grad) and returned.
    scale : float, numpy array or tensor broadcasting against ``v``
        The scale in the working dtype.
    z : numpy integer array broadcasting against ``v``
        The zero point. The boundary rule acts on ``u = v + z`` (exact: boundaries are
        integers or half-integers), so tie rules and truncation depend on ``u``.
    qmin, qmax : int
        The integer range; values clamped whatever they round to are left alone.
    mode : RoundingMode

    Notes
    -----
    Where the mode's boundaries are integers a value equal to a dequantized level
    ``fl(b s)`` gets code ``b``, so that quantize∘dequantize is the identity on codes
    although ``fl(b s)`` differs from ``b s``; ``b`` is the integer nearest the exact
    ``x/s`` (ties to even), which decides where several levels are one value (half
    precision holds ``fl(b s)`` and ``fl((b+1) s)`` alike). For STOCHASTIC the level rule
    is the only decision, and a value beside a level keeps its random code.
    """
    torch_in = isinstance(v, torch.Tensor)
    rule = mode.boundary
    reach = float(np.max(np.maximum(np.abs(qmin - z), np.abs(qmax - z)))) + 2.0
    unit = np.finfo(np.float32 if v.dtype in (np.float32, torch.float32) else np.float64).eps
    margin = 4.0 * float(unit) * reach
    # A dequantized level stored in half precision sits up to half a half-precision ulp
    # from k s: every mode that keeps levels (stochastic rounding too) must find it to give
    # it code k.
    half_eps = 0.0
    if x.dtype in _HALF_DTYPES and rule.on_levels:
        half_eps = float(torch.finfo(torch.bfloat16 if x.dtype == torch.bfloat16
                                     else torch.float16).eps)
    find = _torch_candidates if torch_in else _numpy_candidates
    idx, ref_sub = find(x, v, r, rule.offset, margin, reach, half_eps)
    if idx is None or ref_sub.size == 0:
        return r
    if torch_in:
        x_sub = x.detach()[idx].to(v.dtype).cpu().numpy()
        v_sub = v.detach()[idx].cpu().numpy()
        s_sub = (np.full(ref_sub.shape, scale, dtype=ref_sub.dtype) if isinstance(scale, float)
                 else scale.expand_as(v)[idx].cpu().numpy())
        z_sub = torch.as_tensor(z, dtype=v.dtype, device=v.device).expand_as(v)[idx].cpu().numpy()
    else:
        x_sub = x[idx].astype(v.dtype)
        v_sub = v[idx]
        s_sub = np.broadcast_to(np.asarray(scale, dtype=v.dtype), v.shape)[idx]
        z_sub = np.broadcast_to(z, v.shape)[idx].astype(v.dtype)
    if rule.offset:
        b = ref_sub + np.where(v_sub >= ref_sub, rule.offset, -rule.offset).astype(v_sub.dtype)
        sign = residual_sign(x_sub, b, s_sub)
    else:
        b = ref_sub
        n = _exact_nearest(x_sub, v_sub, b, s_sub, margin)
        on_level = _level(n, s_sub, x.dtype) == x_sub
        if half_eps:
            n, on_level = _neighbour_levels(n, on_level, x_sub, s_sub, x.dtype)
        if rule.resolve is None:
            if not on_level.any():
                return r
            r_sub = r.detach()[idx].cpu().numpy() if torch_in else r[idx]
            return _write_back(r, idx, np.where(on_level, n, r_sub), torch_in)
        sign = residual_sign(x_sub, b, s_sub)
        fixed = np.where(on_level, n, rule.resolve(b + z_sub, sign) - z_sub).astype(b.dtype)
        return _write_back(r, idx, fixed, torch_in)
    fixed = (rule.resolve(b + z_sub, sign) - z_sub).astype(ref_sub.dtype)
    return _write_back(r, idx, fixed, torch_in)


def _neighbour_levels(n: np.ndarray, on_level: np.ndarray, x: np.ndarray, s: np.ndarray,
                      out_dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(n, on_level)`` with each value that is not the half-precision level of ``n`` but is
    that of ``n + 1`` or ``n - 1`` given that code. A level ``fl(k s)`` rounded onto a power of
    two from above, where the ulp is twice the one below, can lie more than half a step from
    ``k s``, so the integer nearest its quotient is ``k - 1`` (bfloat16, ``s = fl32(0.11)``:
    ``146 s = 16.06`` is stored as 16.0, ``16.0/s = 145.45``, and 145's level is 15.9375).
    Such a level lies within half its ulp above, less than two steps, of ``k s``, and levels
    grow with the code: only the neighbours of ``n`` can hold it, one at most."""
    for step in (1.0, -1.0):
        k = n + step
        hit = ~on_level & (_level(k, s, out_dtype) == x)
        n = np.where(hit, k, n)
        on_level = on_level | hit
    return n, on_level


def _exact_nearest(x: np.ndarray, v: np.ndarray, b: np.ndarray, s: np.ndarray,
                   margin: float) -> np.ndarray:
    """The integer nearest the exact ``x/s`` (ties to even), given ``b = rint(v)``: ``b``
    itself unless ``v`` lies within ``margin`` of ``b ± ½``, where the exact residual at
    that half-integer decides (``fl(x/s)`` can round onto or across it: 84.5/fl32(1/3) is
    253.49999..., its float32 quotient 253.5)."""
    d = v - b
    near = np.abs(d) >= 0.5 - margin
    if not near.any():
        return b
    step = np.where(d >= 0, 1.0, -1.0).astype(b.dtype)
    half = b[near] + 0.5 * step[near]
    side = residual_sign(x[near], half, s[near]) * step[near]  # > 0: beyond the half
    other = b[near] + step[near]
    tie_even = np.where(np.fmod(other, 2) == 0, other, b[near])
    n = b.copy()
    n[near] = np.where(side > 0, other, np.where(side == 0, tie_even, b[near]))
    return n
