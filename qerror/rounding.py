"""Rounding modes for quantization, identical on numpy arrays and torch tensors.

The single entry point is :func:`apply_rounding`. Every mode returns an array of
the input's dtype holding integer values; numpy and torch give the same bits on
the same input, STOCHASTIC included (its random draws come from a counter-based
hash of a 64-bit key and the element index, computed the same way on both).
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from qerror._checks import check_finite, check_float_array
from qerror._enums import parse_enum

ArrayLike = Union[np.ndarray, torch.Tensor]

# splitmix64 constants (Steele, Lea & Flood 2014), as unsigned 64-bit integers.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


class RoundingMode(enum.Enum):
    """How a real value ``u`` (in LSB units) becomes an integer.

    ``torch.round`` and ``numpy.rint`` are NEAREST_EVEN: ties go to the even
    neighbour (2.5 -> 2, -1.5 -> -2, -2.5 -> -2). NEAREST_AWAY is the
    schoolbook rule (2.5 -> 3, -2.5 -> -3). TOWARD_ZERO is ``torch.trunc``
    and what a cast to an integer type does.
    """

    NEAREST_EVEN = "nearest_even"
    NEAREST_AWAY = "nearest_away"
    TOWARD_ZERO = "toward_zero"
    FLOOR = "floor"
    CEIL = "ceil"
    STOCHASTIC = "stochastic"

    @property
    def interval(self) -> "ErrorInterval":
        """Closed hull of the rounding error ``R(u) - u`` in LSB, for any ``u``."""
        return _INTERVALS[self]

    @property
    def is_random(self) -> bool:
        return self is RoundingMode.STOCHASTIC

    @classmethod
    def parse(cls, value: "RoundingMode | str") -> "RoundingMode":
        """Accept a mode or its name (``"nearest_even"``, ``"NEAREST_EVEN"``)."""
        return parse_enum(cls, value, "rounding mode")


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


_INTERVALS = {
    RoundingMode.NEAREST_EVEN: ErrorInterval(-0.5, 0.5, (-0.5, 0.5), (-0.5, 0.5)),
    RoundingMode.NEAREST_AWAY: ErrorInterval(-0.5, 0.5, (-0.5, 0.5), (-0.5, 0.5)),
    RoundingMode.TOWARD_ZERO: ErrorInterval(-1.0, 1.0, (-1.0, 0.0), (0.0, 1.0)),
    RoundingMode.FLOOR: ErrorInterval(-1.0, 0.0, (-1.0, 0.0), (-1.0, 0.0)),
    RoundingMode.CEIL: ErrorInterval(0.0, 1.0, (0.0, 1.0), (0.0, 1.0)),
    RoundingMode.STOCHASTIC: ErrorInterval(-1.0, 1.0, (-1.0, 1.0), (-1.0, 1.0)),
}

Generator = Union[int, np.integer, np.random.Generator, torch.Generator]


def stochastic_key(generator: Generator | None) -> int:
    """Turn a seed or generator into the 64-bit key of the stochastic hash.

    An integer seed always gives the same key; a numpy or torch generator is
    advanced by one draw, so successive calls with it give fresh decisions.
    """
    if generator is None:
        raise ValueError(
            "STOCHASTIC rounding needs generator=: pass an integer seed, a "
            "numpy.random.Generator or a torch.Generator"
        )
    if isinstance(generator, (bool, np.bool_)):
        raise TypeError(f"generator must be a seed or a generator, got {generator!r}")
    if isinstance(generator, numbers.Integral):
        return _splitmix64_scalar(int(generator) & _MASK64)
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(0, 1 << 64, dtype=np.uint64, endpoint=False))
    if isinstance(generator, torch.Generator):
        draw = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=generator,
                             dtype=torch.int64, device=generator.device)
        return int(draw.item()) & _MASK64
    raise TypeError(
        f"generator must be an int seed, numpy.random.Generator or torch.Generator, "
        f"got {type(generator).__name__}"
    )


def _splitmix64_scalar(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def _uniform_numpy(n: int, key: int, offset: int = 0) -> np.ndarray:
    """Draws on the grid ``k / 2**53`` in [0, 1) for indices ``offset .. offset+n-1``."""
    with np.errstate(over="ignore"):
        z = np.arange(offset, offset + n, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(key)
        z += np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as unsigned."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _uniform_torch(n: int, key: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """Same bits as :func:`_uniform_numpy`, in two's-complement int64 arithmetic."""
    z = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    z.mul_(_signed64(_GOLDEN)).add_(_signed64((key + _GOLDEN) & _MASK64))
    z = (z ^ _srl(z, 30)).mul_(_signed64(_MIX1))
    z = (z ^ _srl(z, 27)).mul_(_signed64(_MIX2))
    z ^= _srl(z, 31)
    return _srl(z, 11).to(torch.float64).mul_(2.0**-53)


def _round_numpy(x: np.ndarray, mode: RoundingMode, key: int | None,
                 offset: int = 0) -> np.ndarray:
    if mode is RoundingMode.NEAREST_EVEN:
        return np.rint(x)
    if mode is RoundingMode.TOWARD_ZERO:
        return np.trunc(x)
    if mode is RoundingMode.FLOOR:
        return np.floor(x)
    if mode is RoundingMode.CEIL:
        return np.ceil(x)
    # The quantizer passes values that overflowed x/s as +-inf (they clamp later):
    # inf - inf is nan there, harmlessly, and not worth a warning.
    if mode is RoundingMode.NEAREST_AWAY:
        # x - trunc(x) is exact in binary floating point, so the tie test is exact.
        t = np.trunc(x)
        with np.errstate(invalid="ignore"):
            away = np.abs(x - t) >= 0.5
        return np.where(away, t + np.sign(x), t).astype(x.dtype, copy=False)
    lo = np.floor(x)
    with np.errstate(invalid="ignore"):
        frac = x.astype(np.float64) - lo.astype(np.float64)
    up = _uniform_numpy(x.size, key, offset).reshape(x.shape) < frac
    return (lo + up.astype(x.dtype)).astype(x.dtype, copy=False)


def _round_torch(x: torch.Tensor, mode: RoundingMode, key: int | None,
                 offset: int = 0) -> torch.Tensor:
    if mode is RoundingMode.NEAREST_EVEN:
        return torch.round(x)
    if mode is RoundingMode.TOWARD_ZERO:
        return torch.trunc(x)
    if mode is RoundingMode.FLOOR:
        return torch.floor(x)
    if mode is RoundingMode.CEIL:
        return torch.ceil(x)
    if mode is RoundingMode.NEAREST_AWAY:
        t = torch.trunc(x)
        return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)
    lo = torch.floor(x)
    frac = x.to(torch.float64) - lo.to(torch.float64)
    up = _uniform_torch(x.numel(), key, x.device, offset).reshape(x.shape) < frac
    return lo + up.to(x.dtype)


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
    return np.asarray(_round_numpy(x, mode, key, offset))


def apply_rounding(
    x: ArrayLike,
    mode: RoundingMode | str,
    *,
    generator: Generator | None = None,
) -> ArrayLike:
    """Round every element of ``x`` to an integer value with ``mode``.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor, any shape
        Floating-point values (float16, float32 or float64; bfloat16 for torch).
    mode : RoundingMode or str
        The rounding rule.
    generator : int, numpy.random.Generator or torch.Generator, optional
        Required for STOCHASTIC and ignored otherwise. An integer seed always
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
