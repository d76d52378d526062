"""The exact quantizer of float32 data as one fused loop: every code decided on the exact
quotient ``x/s`` without a candidate scan, compiled by ``torch.compile`` into one pass.

The rule. Let ``v = fl(x/s)`` in float32, clamped to two codes beyond the integer range
(values there are clamped whatever they round to), and let ``n`` be the rounding boundary
nearest ``v``: ``floor(v) + 1/2`` for the nearest modes, ``rint(v)`` for the others. Then

* ``n`` is the boundary next to the true quotient ``q = x/s``: ``|v - q| <= |q| 2**-24``,
  far below 1/2 for the at most ``2**16 + 4`` codes left after the clamp;
* ``sign(x - n s)``, computed in float64, is the exact sign of ``q - n``: ``n s`` is exact
  there (``n`` has at most 19 significant bits, ``s`` 24), and a correctly rounded
  difference has the sign of the exact one (float64 holds every difference of float32
  values without underflow). A fused multiply-add would round once instead of twice and
  keep the sign too, and a quotient formed as ``x (1/s)`` moves ``v`` only, so neither
  contraction nor a reciprocal can change a code.

So the mode's :class:`~qerror.rounding.BoundaryRule` gives ``R(x/s + z) - z`` from
``(n + z, sign)``, for every element, in a handful of element-wise operations that inductor
fuses with the clamp, the saturation counts and the rescaling into one loop. Where the
boundaries are integers a value equal to a stored level ``fl(n s)`` gets code ``n``, as in
:func:`qerror._exact.exact_codes`. The codes equal the block engine's (:mod:`qerror.quantizer`)
and the rational reference's element for element, which the tests check on values on and
beside every boundary; so do the fake-quantized values as numbers, whose zeros may differ in
sign (the engine's own zeros take theirs from numpy's rounding and clipping loops).

STOCHASTIC rounding, the RECIPROCAL arithmetic, float64 and half-precision data, tensors off
the CPU, small arrays and forked children stay on the block engine. ``QERROR_FUSED=0`` in the environment turns this path
off (``studies.bench`` times the two against each other); a compiler that fails turns it off
with one warning, and the block engine gives the same codes.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from qerror.rounding import RoundingMode

#: Fewer elements than this go to the block engine: a compiled call's fixed cost (guards,
#: dispatch) is larger than the whole work of a small array.
MIN_ELEMENTS = 1 << 14

_LOCK = threading.Lock()
_COMPILED: dict = {}
_BROKEN: list[str] = []
_FORKED: list[bool] = []


def _in_forked_child() -> None:
    # Compiled kernels run OpenMP regions, and a forked child of a process whose OpenMP
    # threads exist hangs in its first one: a child quantizes on the block engine.
    _FORKED.append(True)


os.register_at_fork(after_in_child=_in_forked_child)


def codes(x, s, z, lo, hi, *, mode: RoundingMode, fake: bool, count: bool = True):
    """The fused quantizer in eager torch (what :func:`run` compiles).

    ``x`` is float32 of shape ``(outer, channels, inner)``; ``s``, ``z``, ``lo`` and ``hi``
    float32 of shape ``(1, channels, 1)``: the scale, the zero point and the code range
    ``qmin - z .. qmax - z``. Returns the fake-quantized values (float32) or the integer
    codes with the zero point added (int32), and, if ``count``, the per-channel counts of
    codes below and above the range before the clamp (int64; else None).
    """
    rule = mode.boundary
    v = torch.clamp(x / s, lo - 2.0, hi + 2.0)
    n = torch.floor(v) + rule.offset if rule.offset else torch.round(v)
    # the residual itself serves as the sign: the rules only compare it with 0
    residual = x.double() - n.double() * s.double()
    code = rule.resolve(n + z, residual) - z
    if rule.on_levels:
        code = torch.where(n * s == x, n, code)
    low = high = None
    if count:
        low, high = (code < lo).sum(dim=(0, 2)), (code > hi).sum(dim=(0, 2))
    code = torch.clamp(code, lo, hi)
    out = code * s if fake else (code + z).to(torch.int32)
    return out, low, high


def enabled() -> bool:
    """Whether the fused path may run: not turned off by ``QERROR_FUSED=0``, no earlier
    compiler failure, not a forked child, and inductor not told to use unsafe
    floating-point optimisations (which could rewrite ``x - n s``)."""
    if os.environ.get("QERROR_FUSED", "1") == "0" or _BROKEN or _FORKED:
        return False
    try:
        from torch._inductor import config
    except ImportError:  # a torch without inductor
        return False
    return not config.cpp.enable_unsafe_math_opt_flag


def eligible(x, mode: RoundingMode, exact: bool) -> bool:
    """Whether ``x`` (numpy array or tensor) goes through the fused path."""
    if not exact or mode.is_random:
        return False
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < MIN_ELEMENTS:
            return False
    elif str(x.dtype) != "float32" or x.size < MIN_ELEMENTS:
        return False
    return enabled()


def _specialised(mode: RoundingMode, fake: bool, count: bool, units: tuple[bool, ...]):
    """:func:`codes` for one mode, output, counting and pattern of unit dimensions, with a
    code object of its own: compiled code is cached per code object, with a limit on its
    variants."""
    def kernel(x, s, z, lo, hi):
        return codes(x, s, z, lo, hi, mode=mode, fake=fake, count=count)

    shape = "x".join("1" if u else "n" for u in units)
    kernel.__code__ = kernel.__code__.replace(
        co_name=f"quantize_{mode.value}_{'fake' if fake else 'codes'}"
                f"{'_counted' if count else ''}_{shape}")
    return kernel


def run(x, s, z, lo, hi, *, mode: RoundingMode, fake: bool, count: bool = True):
    """:func:`codes` compiled for this mode and output (once, then cached); None where the
    compiler fails, after one warning (the caller then takes the block engine)."""
    # Sizes are symbolic except 0 and 1, which the compiler specialises: one compiled
    # function per pattern of unit dimensions keeps each within its limit of variants.
    key = (mode, fake, count, tuple(d == 1 for d in x.shape))
    with _LOCK:
        fn = _COMPILED.get(key)
        if fn is None:
            fn = torch.compile(_specialised(*key), dynamic=True, fullgraph=True)
            _COMPILED[key] = fn
    try:
        return fn(x, s, z, lo, hi)
    except Exception as err:  # noqa: BLE001 - any compiler failure: same codes without it
        if _BROKEN:
            return None
        _BROKEN.append(f"{type(err).__name__}: {err}")
        warnings.warn(
            "qerror: the fused quantizer could not be compiled "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "quantizing with the block engine instead (same codes, slower). Set "
            "QERROR_FUSED=0 to skip the attempt.", RuntimeWarning, stacklevel=3)
        return None
