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
:func:`qerror.rounding.hash_draws`, computed in the loop from the stream's start) is below
``v - floor(v)``, compared in float64 as the block engine compares them; a stored level
``fl(n s)`` gets code ``n``. Its codes and fake values are the block engine's bit for bit,
zeros' signs included (the same draws, the same fractions), which the tests check with
offsets, per channel and past the range's ends. The RECIPROCAL arithmetic, float64
and half-precision data, tensors off the CPU, small arrays and forked children stay on the
block engine. ``QERROR_FUSED=0`` in the environment turns this path off (``studies.bench``
times the two against each other); a compiler that fails turns it off with one warning, and
the block engine gives the same codes.
Compiled code is cached per instruction set (``_compile_options``) and per thread count.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from qerror.cpu import flushing_denormals, in_forked_child
from qerror.rounding import RoundingMode, hash_draws

#: Fewer elements than this go to the block engine: a compiled call's fixed cost (guards,
#: dispatch) is larger than the whole work of a small array.
MIN_ELEMENTS = 1 << 14

_LOCK = threading.Lock()
_COMPILED: dict = {}
_READY: set = set()  # keys whose compiled code has run
_FAILED: set = set()  # keys turned off by a failed call
_BROKEN: list[str] = []  # why the whole fused path is off, if it is
_WARNED: list[str] = []


def codes(x, s, z, lo, hi, start=None, *, mode: RoundingMode, fake: bool, count: bool = True):
    """The fused quantizer in eager torch (what :func:`run` compiles).

    ``x`` is float32 of shape ``(outer, channels, inner)``; ``s``, ``z``, ``lo`` and ``hi``
    float32 of shape ``(1, channels, 1)``: the scale, the zero point and the code range
    ``qmin - z .. qmax - z``; ``start`` (STOCHASTIC only) the int64 first word of the draws'
    stream at ``x``'s first element (:func:`qerror.rounding.stream_start`). Returns the
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
        code = down + (hash_draws(x, start).double() < frac).to(v.dtype)
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
    """Whether the fused path may run: not turned off by ``QERROR_FUSED=0``, no earlier
    compiler failure, not a forked child, and inductor not told to use unsafe
    floating-point optimisations (which could rewrite ``x - n s``)."""
    # compiled kernels run OpenMP regions, which can hang in a forked child
    if os.environ.get("QERROR_FUSED", "1") == "0" or _BROKEN or in_forked_child():
        return False
    try:
        from torch._inductor import config
    except ImportError:  # a torch without inductor
        return False
    return not config.cpp.enable_unsafe_math_opt_flag


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
    code object of its own: compiled code is cached per code object, with a limit on its
    variants."""
    def kernel(x, s, z, lo, hi, start):
        return codes(x, s, z, lo, hi, start, mode=mode, fake=fake, count=count)

    shape = "x".join("1" if u else "n" for u in units)
    kernel.__code__ = kernel.__code__.replace(
        co_name=f"quantize_{mode.value}_{'fake' if fake else 'codes'}"
                f"{'_counted' if count else ''}_{shape}")
    return kernel


def _compile_options() -> dict:
    """The vector width of the instruction set inductor picked here, stated: the compiled-code
    cache keys on the options but (torch 2.14) not on the picked instruction set, so code
    compiled under ``ATEN_CPU_CAPABILITY=avx2`` came back, wrong, to an AVX-512 process."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return {"cpp.simdlen": isa.bit_width()} if isa else {}


def run(x, s, z, lo, hi, start=None, *, mode: RoundingMode, fake: bool, count: bool = True):
    """:func:`codes` compiled for this mode and output (once, then cached); None where it
    cannot be compiled or run, after one warning (the caller then takes the block engine,
    which gives the same codes; the compiled function writes only its own outputs).

    A call that fails turns off its kernel (the compiler's limit of variants, or a kernel
    that ran before: a later recompilation failed) or, where a deterministic kernel fails the
    first time for any other reason, the whole fused path (a STOCHASTIC kernel's failure
    turns off that kernel alone). Memory errors are the caller's. Loading
    compiled code must not switch the thread to flushing subnormals (some compilers'
    fast-math start-up code does): if it did, the flushing is undone and the path turned off.
    """
    # Sizes are symbolic except 0 and 1, which the compiler specialises; the thread count
    # is fixed in the compiled code. One compiled function per pattern of unit dimensions
    # and thread count keeps each within its limit of variants and its threads right.
    key = (mode, fake, count, tuple(d == 1 for d in x.shape), torch.get_num_threads())
    # compiled code is loaded on a key's first call: only then can it switch on flushing
    flushing = None if key in _READY else flushing_denormals()
    try:
        with _LOCK:
            if key in _FAILED or _BROKEN:
                return None
            fn = _COMPILED.get(key)
        if fn is None:
            options = _compile_options()  # may build a probe on first use: outside the lock
            with _LOCK:
                fn = _COMPILED.setdefault(key, torch.compile(
                    _specialised(*key[:4]), dynamic=True, fullgraph=True, options=options))
        res = fn(x, s, z, lo, hi, start)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - the engine gives the same codes
        from torch._dynamo.exc import FailOnRecompileLimitHit

        with _LOCK:
            _FAILED.add(key)
            # a first failure turns off the whole path, unless it is the stochastic kernel's
            # (its integer hash is the newest code the compiler meets): that kernel alone
            if key not in _READY and not isinstance(err, FailOnRecompileLimitHit) and \
                    not mode.is_random:
                _BROKEN.append(f"{type(err).__name__}: {err}")
        _warn_once(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return None
    if flushing is False and flushing_denormals():
        torch.set_flush_denormal(False)
        with _LOCK:
            _BROKEN.append("compiled code switched on flushing of subnormals")
        _warn_once("loading compiled code switched the CPU to flushing subnormal numbers; "
                   "that was undone")
        return None
    with _LOCK:
        _READY.add(key)
    return res


def _warn_once(why: str) -> None:
    with _LOCK:
        if _WARNED:
            return
        _WARNED.append(why)
    # attributed to the caller of quantize/fake_quantize: _warn_once, run, _run_fused,
    # _run, quantize or fake_quantize, then the caller
    warnings.warn(
        f"qerror: the fused quantizer is not used ({why}); quantizing with the block engine "
        "instead (same codes, slower). Set QERROR_FUSED=0 to skip the attempt.",
        RuntimeWarning, stacklevel=6)
