"""Rounding modes for quantization, identical on numpy arrays and torch tensors.

The single entry point is :func:`apply_rounding`. Every mode returns an array of
the input's dtype holding integer values; numpy and torch give the same bits on
the same input, STOCHASTIC included (its random draws come from a counter-based
hash of a 64-bit key and the element index, computed the same way on both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from qerror._checks import (
    SeedOrGenerator,
    check_finite,
    check_float_array,
    check_seed_or_generator,
)
from qerror._enums import Choice

ArrayLike = Union[np.ndarray, torch.Tensor]

# splitmix64 constants (Steele, Lea & Flood 2014), as unsigned 64-bit integers.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


class RoundingMode(Choice):
    """How a real value ``u`` (in LSB units) becomes an integer.

    ``torch.round`` and ``numpy.rint`` are NEAREST_EVEN: ties go to the even
    neighbour (2.5 -> 2, -1.5 -> -2, -2.5 -> -2). NEAREST_AWAY is the
    schoolbook rule (2.5 -> 3, -2.5 -> -3). TOWARD_ZERO is ``torch.trunc``
    and what a cast to an integer type does.

    Everything a mode is (its kernels, error interval, uniform-noise model and
    exact-boundary rule) is one :class:`ModeFacts` entry, reached through the
    properties below.
    """

    NEAREST_EVEN = "nearest_even"
    NEAREST_AWAY = "nearest_away"
    TOWARD_ZERO = "toward_zero"
    FLOOR = "floor"
    CEIL = "ceil"
    STOCHASTIC = "stochastic"

    @property
    def facts(self) -> ModeFacts:
        """This mode's entry in the table of rounding modes."""
        return _FACTS[self]

    @property
    def interval(self) -> "ErrorInterval":
        """Closed hull of the rounding error ``R(u) - u`` in LSB, for any ``u``."""
        return _FACTS[self].interval

    @property
    def uniform(self) -> UniformModel:
        """Bias, MSE and MAE per LSB under the uniform-noise model (Widrow's)."""
        return _FACTS[self].uniform

    @property
    def boundary(self) -> BoundaryRule:
        """Where the mode's code changes and how a value on or beside such a point resolves."""
        return _FACTS[self].boundary

    @property
    def is_random(self) -> bool:
        """True where the code beside a boundary is a random draw: the mode's boundary
        rule decides only values exactly on a level."""
        return _FACTS[self].boundary.resolve is None



@dataclass(frozen=True)
class ErrorInterval:
    """Bounds of the rounding error ``R(u) - u`` in LSB.

    ``positive`` and ``negative`` give the bounds for ``u > 0`` and ``u < 0``
    separately, which differ for TOWARD_ZERO.
    """

    low: float
    high: float
    positive: tuple[float, float]
    negative: tuple[float, float]


@dataclass(frozen=True)
class UniformModel:
    """A mode's error per LSB when ``u`` is uniform within each step (Widrow's model).

    Parameters
    ----------
    bias_above, bias_below : float
        Mean error of the values with ``u > 0`` and with ``u < 0``.
    mse, mae : float
        Mean squared and mean absolute error.
    """

    bias_above: float
    bias_below: float
    mse: float
    mae: float

    @property
    def bias(self) -> float:
        """Mean error of a continuous law; nan where it depends on ``P(u > 0)`` (TOWARD_ZERO)."""
        return self.bias_above if self.bias_above == self.bias_below else math.nan

    def mixture_bias(self, p_above, p_below):
        """Mean error when ``P(u > 0) = p_above``, ``P(u < 0) = p_below`` and the rest is at
        ``u = 0``, which every mode represents without error."""
        return self.bias_above * p_above + self.bias_below * p_below


@dataclass(frozen=True)
class BoundaryRule:
    """Where ``R`` changes value, and the code of a value on or just beside such a point.

    Parameters
    ----------
    offset : float
        0.5 where the boundaries are the half-integers ``n + 1/2`` (nearest modes), 0.0
        where they are the integers themselves; in the latter case a stored level
        ``fl(k s)`` is a boundary too, and gets its code ``k``.
    resolve : callable or None
        ``resolve(n, sign)``: ``R(n + sign * tiny)`` for arrays of boundaries ``n`` and signs
        in {-1, 0, +1} (0: the value is ``n`` exactly; only the sign is read, so any value of
        that sign will do), numpy arrays or torch tensors. None where only a value
        exactly on a level is decided (STOCHASTIC: one beside it stays random).
    """

    offset: float
    resolve: Callable[[np.ndarray, np.ndarray], np.ndarray] | None

    @property
    def on_levels(self) -> bool:
        return self.offset == 0.0


@dataclass(frozen=True)
class Kernel:
    """``R`` on numpy arrays and on torch tensors, with the same bits.

    Each is called ``f(x, key, offset, out=None)``: ``key`` and ``offset`` are the
    stochastic hash key and the flat index of ``x``'s first element (ignored by the
    deterministic modes); ``out``, when given, receives the result (it may be ``x``).
    """

    numpy: Callable[..., np.ndarray]
    torch: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ModeFacts:
    """Everything one rounding mode is; the rest of the package reads it from here."""

    kernel: Kernel
    interval: ErrorInterval
    uniform: UniformModel
    boundary: BoundaryRule
    #: ``(mode where u >= 0, mode where u < 0)`` for a mode that depends on the sign of ``u``,
    #: so that ``R(v + z) != R(v) + z`` for an integer ``z``; None for the others.
    sign_split: tuple[RoundingMode, RoundingMode] | None = None


def stochastic_key(generator: SeedOrGenerator | None) -> int:
    """Turn a seed or generator into the 64-bit key of the stochastic hash.

    An integer seed (0 to 2**64 - 1, each its own key) always gives the same key; a numpy
    or torch generator is advanced by one draw, so successive calls with it give fresh
    decisions.

    Raises
    ------
    ValueError
        ``generator`` is None, or an integer outside 0 to 2**64 - 1 (masked to 64 bits,
        -1 would share the key of 2**64 - 1 and 2**64 that of 0).
    TypeError
        ``generator`` is neither an integer nor a generator (a bool or a float included).
    """
    if generator is None:
        raise ValueError(
            "STOCHASTIC rounding needs generator=: pass an integer seed, a "
            "numpy.random.Generator or a torch.Generator"
        )
    generator = check_seed_or_generator(generator)
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(0, 1 << 64, dtype=np.uint64, endpoint=False))
    if isinstance(generator, torch.Generator):
        draw = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=generator,
                             dtype=torch.int64, device=generator.device)
        return int(draw.item()) & _MASK64
    return _splitmix64_scalar(generator)


def _splitmix64_scalar(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


# Elements per pass of the stochastic kernel: its hash works on two 8-byte words per
# element, and at this size those (512 KiB) and the rest of the chain stay in a core's L2
# cache; at 2**18 elements they spill and the kernel runs 2.3x slower (measured on an
# Intel Xeon of this kind, one thread).
_STOCHASTIC_CHUNK = 1 << 15
# i * golden (mod 2**64) for the indices of one pass: the hash's first word less a constant
_HASH_TABLE = np.arange(_STOCHASTIC_CHUNK, dtype=np.uint64) * np.uint64(_GOLDEN)


def _hash_numpy(n: int, key: int, offset: int = 0) -> np.ndarray:
    """The 53-bit integers ``k`` of the draws ``k / 2**53`` for indices ``offset .. offset+n-1``."""
    # In place on two buffers: the hash is a dozen passes over 8-byte words, and fresh
    # temporaries for each would double the memory traffic. The first word of index i is
    # i*golden + key + golden (mod 2**64) = (i - offset)*golden + (offset*golden + key +
    # golden): one add to a product table made once, instead of arange, multiply and add.
    start = stream_start(key, offset) & _MASK64
    if n <= _HASH_TABLE.size:
        z = np.add(_HASH_TABLE[:n], np.uint64(start))
    else:
        z = np.arange(n, dtype=np.uint64)
        z *= np.uint64(_GOLDEN)
        z += np.uint64(start)
    t = np.empty_like(z)
    for shift, mix in ((30, _MIX1), (27, _MIX2)):
        np.right_shift(z, np.uint64(shift), out=t)
        z ^= t
        z *= np.uint64(mix)
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    z >>= np.uint64(11)
    return z


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as unsigned."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def stream_start(key: int, offset: int = 0) -> int:
    """The first word of the stochastic hash at flat index ``offset`` for ``key``, as a
    signed 64-bit integer: index ``offset + i`` hashes ``start + i * golden`` (mod 2**64).

    :func:`hash_stream` gives it, with the step, as the tensor that :func:`hash_draws` takes."""
    return _signed64((offset * _GOLDEN + key + _GOLDEN) & _MASK64)


def hash_stream(key: int, offset: int = 0,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The stochastic hash's stream for ``key`` from flat index ``offset``, as
    :func:`hash_draws` takes it: an int64 tensor of two elements, the first word
    (:func:`stream_start`) and the step between consecutive indices' words (the golden-ratio
    constant, as a signed 64-bit integer).

    Both are data, not constants of the traced code: a new key needs no new compilation,
    and the step is multiplied into the indices as a tensor. Written as a constant, inductor
    (torch 2.14) folds ``arange * step`` into its index arithmetic, where a product that
    overflows int64 is undefined in C++; the code compiled on an AVX-512 CPU gave wrong
    words from the 25th element on (seen on an AMD EPYC with AVX512-VNNI, one thread and
    two; AVX2 code happened to give the right ones)."""
    return torch.tensor([stream_start(key, offset), _signed64(_GOLDEN)], dtype=torch.int64,
                        device=device)


def hash_draws(like: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """The 53-bit integers ``k`` (int64, of ``like``'s shape) of the uniforms ``k / 2**53``
    drawn for the elements of ``like`` in C order from ``stream`` (:func:`hash_stream`: the
    first word and the step, an int64 tensor of two elements): the bits of the numpy
    kernel, in two's-complement int64 arithmetic (which wraps in torch's integer kernels and
    in the vector instructions inductor emits for them)."""
    z = torch.arange(like.numel(), dtype=torch.int64, device=like.device).view(like.shape)
    z = z * stream[1] + stream[0]
    z = (z ^ _srl(z, 30)) * _signed64(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed64(_MIX2)
    z = z ^ _srl(z, 31)
    return _srl(z, 11)


def _uniform_torch(n: int, key: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """The draws of :func:`_hash_numpy` as floats."""
    shape_of = torch.empty((), device=device).expand(n)  # n elements, no memory of its own
    return hash_draws(shape_of, hash_stream(key, offset, device)).to(torch.float64).mul_(2.0**-53)


def _into(result, out):
    """``result``, written into ``out`` when the caller gave one."""
    if out is None:
        return result
    out[...] = result
    return out


def _ufunc(numpy_func, torch_func) -> Kernel:
    """A kernel from a numpy ufunc and its torch twin (both honour ``out=``)."""
    return Kernel(numpy=lambda x, key, offset, out=None: numpy_func(x, out=out),
                  torch=lambda x, key, offset, out=None: torch_func(x, out=out))


def _away_numpy(x, key, offset, out=None):
    # The quantizer passes values that overflowed x/s as +-inf (they clamp later):
    # inf - inf is nan there, harmlessly, and not worth a warning.
    # x - trunc(x) is exact in binary floating point, so the tie test is exact.
    t = np.trunc(x)
    with np.errstate(invalid="ignore"):
        away = np.abs(x - t) >= 0.5
    return _into(np.where(away, t + np.sign(x), t).astype(x.dtype, copy=False), out)


def _away_torch(x, key, offset, out=None):
    t = torch.trunc(x)
    return _into(torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t), out)


def _stochastic_numpy(x, key, offset, out=None):
    if x.size > _STOCHASTIC_CHUNK and x.flags.c_contiguous and (
            out is None or out.flags.c_contiguous):
        # The draws hash the flat index, so chunks of the flat order give the same bits.
        res = np.empty_like(x) if out is None else out
        flat, res_flat = x.reshape(-1), res.reshape(-1)
        for i in range(0, x.size, _STOCHASTIC_CHUNK):
            j = min(i + _STOCHASTIC_CHUNK, x.size)
            _stochastic_numpy(flat[i:j], key, offset + i, out=res_flat[i:j])
        return res
    lo = np.floor(x, out=np.empty_like(x))  # an array even for 0-d x
    # x - floor(x) is exact in float64 (not always in x's own dtype, e.g. -1e-9 + 1).
    with np.errstate(invalid="ignore"):
        frac = np.subtract(x, lo, dtype=np.float64)
    # Up with probability frac: k / 2**53 < frac, compared as k < frac * 2**53 (both sides
    # scaled exactly), so the integers need no separate conversion pass.
    frac *= 2.0**53
    up = np.less(_hash_numpy(x.size, key, offset).reshape(x.shape), frac)
    return np.add(lo, up, out=lo if out is None else out, dtype=x.dtype)


def _stochastic_torch(x, key, offset, out=None):
    lo = torch.floor(x)
    frac = x.to(torch.float64) - lo.to(torch.float64)
    up = _uniform_torch(x.numel(), key, x.device, offset).reshape(x.shape) < frac
    return _into(lo + up.to(x.dtype), out)


# The boundary rules take numpy arrays (the exact-code engine) and torch tensors (the fused
# quantizer, traced by torch.compile) alike.
def _where(cond, a, b):
    return torch.where(cond, a, b) if isinstance(cond, torch.Tensor) else np.where(cond, a, b)


def _rint(n):
    return torch.round(n) if isinstance(n, torch.Tensor) else np.rint(n)


def _resolve_nearest(tie):
    """The half-integer boundary rule of a nearest mode whose true ties go to ``tie(n, down)``."""
    def resolve(n, sign):
        down = n - 0.5
        return _where(sign > 0, down + 1, _where(sign < 0, down, tie(n, down)))

    return resolve


def _resolve_floor(n, sign):
    return _where(sign < 0, n - 1, n)


def _resolve_ceil(n, sign):
    return _where(sign > 0, n + 1, n)


def _resolve_toward_zero(n, sign):
    # Floor above zero, ceil below, and 0 for a true value just off 0.
    return _where(n > 0, _resolve_floor(n, sign), _where(n < 0, _resolve_ceil(n, sign), 0.0))


_NEAREST = ErrorInterval(-0.5, 0.5, (-0.5, 0.5), (-0.5, 0.5))
_NEAREST_MODEL = UniformModel(0.0, 0.0, 1.0 / 12.0, 0.25)

# The one table of rounding modes (the uniform-noise column is Widrow's model).
_FACTS = {
    RoundingMode.NEAREST_EVEN: ModeFacts(
        _ufunc(np.rint, torch.round), _NEAREST, _NEAREST_MODEL,
        BoundaryRule(0.5, _resolve_nearest(lambda n, down: _rint(n)))),
    RoundingMode.NEAREST_AWAY: ModeFacts(
        Kernel(_away_numpy, _away_torch), _NEAREST, _NEAREST_MODEL,
        BoundaryRule(0.5, _resolve_nearest(lambda n, down: down + (n > 0)))),
    RoundingMode.TOWARD_ZERO: ModeFacts(
        _ufunc(np.trunc, torch.trunc), ErrorInterval(-1.0, 1.0, (-1.0, 0.0), (0.0, 1.0)),
        UniformModel(-0.5, 0.5, 1.0 / 3.0, 0.5), BoundaryRule(0.0, _resolve_toward_zero),
        (RoundingMode.FLOOR, RoundingMode.CEIL)),
    RoundingMode.FLOOR: ModeFacts(
        _ufunc(np.floor, torch.floor), ErrorInterval(-1.0, 0.0, (-1.0, 0.0), (-1.0, 0.0)),
        UniformModel(-0.5, -0.5, 1.0 / 3.0, 0.5), BoundaryRule(0.0, _resolve_floor)),
    RoundingMode.CEIL: ModeFacts(
        _ufunc(np.ceil, torch.ceil), ErrorInterval(0.0, 1.0, (0.0, 1.0), (0.0, 1.0)),
        UniformModel(0.5, 0.5, 1.0 / 3.0, 0.5), BoundaryRule(0.0, _resolve_ceil)),
    RoundingMode.STOCHASTIC: ModeFacts(
        Kernel(_stochastic_numpy, _stochastic_torch),
        ErrorInterval(-1.0, 1.0, (-1.0, 1.0), (-1.0, 1.0)),
        UniformModel(0.0, 0.0, 1.0 / 6.0, 1.0 / 3.0), BoundaryRule(0.0, None)),
}


def _round_torch(x: torch.Tensor, mode: RoundingMode, key: int | None,
                 offset: int = 0) -> torch.Tensor:
    return _FACTS[mode].kernel.torch(x, key, offset)


class _StraightThrough(torch.autograd.Function):
    """Rounds in the forward pass, passes the gradient unchanged backward."""

    @staticmethod
    def forward(ctx, x, mode, key, offset):  # noqa: D401 - autograd signature
        return _round_torch(x, mode, key, offset)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def round_values(x: ArrayLike, mode: RoundingMode, key: int | None,
                 offset: int = 0) -> ArrayLike:
    """Round without input validation (for callers that validated already).

    ``offset`` is the flat index of ``x``'s first element in a larger array, so
    that STOCHASTIC decisions do not depend on how that array is split into blocks.
    For torch tensors that require grad the gradient is straight-through.
    """
    if isinstance(x, torch.Tensor):
        if x.requires_grad and torch.is_grad_enabled():
            return _StraightThrough.apply(x, mode, key, offset)
        return _round_torch(x, mode, key, offset)
    # ufuncs turn a 0-d array into a numpy scalar; keep the caller's type.
    return np.asarray(_FACTS[mode].kernel.numpy(x, key, offset))


def apply_rounding(
    x: ArrayLike,
    mode: RoundingMode | str,
    *,
    generator: SeedOrGenerator | None = None,
) -> ArrayLike:
    """Round every element of ``x`` to an integer value with ``mode``.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor, any shape
        Floating-point values (float16, float32 or float64; bfloat16 for torch).
    mode : RoundingMode or str
        The rounding rule.
    generator : int, numpy.random.Generator or torch.Generator, optional
        Required for STOCHASTIC and ignored otherwise. An integer seed (0 to 2**64 - 1) always
        yields the same decisions for the same shape; a generator advances.
        The draws depend only on the key and the element's flat index, so two
        tensors rounded with the same integer seed get the same uniforms at
        the same positions: pass a generator (or distinct seeds) to round
        several tensors, e.g. weights and activations, independently.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Same type, shape and dtype as ``x``, holding integer values. For a
        torch tensor that requires grad the gradient is straight-through
        (identity), so the same call serves quantization-aware training.

    Notes
    -----
    STOCHASTIC rounds ``x`` up with probability ``x - floor(x)``, using
    uniforms ``k / 2**53`` from splitmix64 of ``key + index * golden``; the
    probability is exact to within ``2**-53``. numpy and torch compute the
    same hash, so both return identical bits for the same seed.

    Raises
    ------
    TypeError
        If ``x`` is not a floating-point numpy array or torch tensor.
    ValueError
        If ``x`` is empty or holds NaN/Inf, or STOCHASTIC lacks a generator.
    """
    mode = RoundingMode.parse(mode)
    check_float_array(x, "x")
    check_finite(x, "x")
    key = stochastic_key(generator) if mode.is_random else None
    return round_values(x, mode, key)
