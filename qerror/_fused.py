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

STOCHASTIC rounding takes the same quotient ``v`` and goes up from ``floor(v)`` where the
element's draw ``k / 2**53`` (the splitmix64 hash of its flat index,
:func:`qerror.rounding.hash_draws`, computed in the loop from the stream's first word and step,
:func:`qerror.rounding.hash_stream`) is below ``v - floor(v)``, compared in float64 as the
block engine compares them; a stored level ``fl(n s)`` gets code ``n``. Its codes and fake
values are the block engine's bit for bit, zeros' signs included (the same draws, the same
fractions), which the tests check with offsets, per channel and past the range's ends. The
RECIPROCAL arithmetic, float64 and half-precision data, tensors off the CPU, small arrays and
forked children stay on the block engine. ``QERROR_FUSED=0`` in the environment turns this path
off, with every other compiled kernel of qerror's (``studies.bench`` times the two against each
other); a compiler that fails turns it off with one warning, and the block engine gives the
same codes. Compiled code is cached per instruction set and per thread count
(:mod:`qerror._compiled`).
"""

from __future__ import annotations

import os

import torch

from qerror._compiled import Kernels, named, own
from qerror.rounding import RoundingMode, hash_draws

#: Fewer elements than this go to the block engine: a compiled call's fixed cost (guards,
#: dispatch) is larger than the whole work of a small array.
MIN_ELEMENTS = 1 << 14

#: The compiled quantizers. A warning of theirs is attributed to the caller of quantize,
#: fake_quantize or a PreparedQuantizer's methods: past every frame of qerror's modules at
#: this level (a layout's route passes through more of them than C order's).
KERNELS = Kernels("the fused quantizer", "quantizing with the block engine instead (same "
                  "codes, slower)", stacklevel=os.path.dirname(os.path.abspath(__file__)))


def codes(x, s, z, lo, hi, stream=None, *, mode: RoundingMode, fake: bool, count: bool = True):
    """The fused quantizer in eager torch (what :func:`run` compiles).

    ``x`` is float32 of shape ``(outer, channels, inner)``; ``s``, ``z``, ``lo`` and ``hi``
    float32 of shape ``(1, channels, 1)``: the scale, the zero point and the code range
    ``qmin - z .. qmax - z``; ``stream`` (STOCHASTIC only) the draws' stream from ``x``'s
    first element (:func:`qerror.rounding.hash_stream`: its first word and step). Returns the
    fake-quantized values (float32) or the integer codes with the zero point added (int32),
    and, if ``count``, the per-channel counts of codes below and above the range before the
    clamp (int64; else None), and the per-channel counts of non-finite values in ``x``
    (int64): the caller's finiteness check, made in the same loop (where it is not 0 the
    other outputs are meaningless).
    """
    rule = mode.boundary
    v = torch.clamp(x / s, lo - 2.0, hi + 2.0)
    if mode.is_random:
        # up with probability frac(v), compared as k < frac * 2**53 in float64 (both exact),
        # as the block engine does on the same quotient; the clamp leaves in-range v alone
        down = torch.floor(v)
        frac = (v.double() - down.double()) * 2.0**53
        code = down + (hash_draws(x, stream).double() < frac).to(v.dtype)
        n = torch.round(v)
        # as the engine: a zero is no level of its own (its code +0, not round(-0.) = -0.)
        n = torch.where(x == 0, code, n)
    else:
        n = torch.floor(v) + rule.offset if rule.offset else torch.round(v)
        # the residual itself serves as the sign: the rules only compare it with 0
        residual = x.double() - n.double() * s.double()
        code = rule.resolve(n + z, residual) - z
    if rule.on_levels:
        code = torch.where(n * s == x, n, code)
    low = high = None
    if count:
        low, high = (code < lo).sum(dim=(0, 2)), (code > hi).sum(dim=(0, 2))
    bad = torch.isfinite(x).logical_not().sum(dim=(0, 2))
    code = torch.clamp(code, lo, hi)
    out = code * s if fake else (code + z).to(torch.int32)
    return out, low, high, bad


def enabled() -> bool:
    """Whether the fused path may run: compiled kernels allowed
    (:func:`qerror._compiled.allowed`: not turned off by ``QERROR_FUSED=0``, not a forked
    child, inductor not told to use unsafe floating-point optimisations, which could rewrite
    ``x - n s``) and no earlier compiler failure."""
    return KERNELS.enabled()


def eligible(x, mode: RoundingMode, exact: bool) -> bool:
    """Whether ``x`` (numpy array or tensor) goes through the fused path."""
    if not exact:
        return False
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < MIN_ELEMENTS:
            return False
    elif str(x.dtype) != "float32" or x.size < MIN_ELEMENTS:
        return False
    return enabled()


def _specialised(mode: RoundingMode, fake: bool, count: bool, units: tuple[bool, ...]):
    """:func:`codes` for one mode, output, counting and pattern of unit dimensions, with a
    code object of its own (:func:`qerror._compiled.named`)."""
    def kernel(x, s, z, lo, hi, stream):
        return codes(x, s, z, lo, hi, stream, mode=mode, fake=fake, count=count)

    shape = "x".join("1" if u else "n" for u in units)
    return named(kernel, f"quantize_{mode.value}_{'fake' if fake else 'codes'}"
                         f"{'_counted' if count else ''}_{shape}")


def run(x, s, z, lo, hi, stream=None, *, mode: RoundingMode, fake: bool, count: bool = True):
    """:func:`codes` compiled for this mode and output (once, then cached); None where it
    cannot be compiled or run, after one warning (the caller then takes the block engine,
    which gives the same codes; the compiled function writes only its own outputs).

    A call that fails turns off its kernel (the compiler's limit of variants, or a kernel
    that ran before: a later recompilation failed) or, where a deterministic kernel fails the
    first time for any other reason, the whole fused path (a STOCHASTIC kernel's failure
    turns off that kernel alone: its integer hash is the newest code the compiler meets).
    Memory errors are the caller's. The guards of :class:`qerror._compiled.Kernels` apply.
    """
    # The unit dimensions name the compiled function (what else its guards read,
    # Kernels.call adds to the key: one compiled variant per key)
    key = (mode, fake, count, tuple(d == 1 for d in x.shape))
    args = tuple(None if a is None else own(a) for a in (x, s, z, lo, hi, stream))
    return KERNELS.call(key, lambda: _specialised(*key), args,
                        breaks_all=not mode.is_random)
