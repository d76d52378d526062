"""Weightless neural networks on the CPU: WiSARD and a differentiable LUT network (DWN style).

Both read binary inputs made by a :class:`Thermometer` whose thresholds are quantiles of the
training data. :class:`WiSARD` keeps one RAM discriminator per class behind one shared
(seeded) random mapping, and bleaches with a threshold chosen on a validation split.
:class:`DWN` stacks :class:`LUTLayer` lookup tables trained with the extended finite
difference (EFD) of Bacellar et al. (2024), and sums groups of LUT outputs into class scores
(:class:`GroupSum`). :func:`wnn_size` counts a model's honest bytes
(:class:`qerror.compress.size.ModelSize`); :func:`save_wnn` writes a file of exactly that
size and :func:`load_wnn` reads it back into a model that predicts the same classes.
"""

from __future__ import annotations

import functools
import math
import numbers
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from qerror._checks import (
    check_byte_budget,
    check_count,
    check_finite,
    check_flag,
    check_labels,
    check_seed,
    is_integer_dtype,
)
from qerror._enums import Choice
from qerror._progress import progress_bar
from qerror.compress.size import (
    ModelSize,
    SizePart,
    elias_fano_bits,
    elias_fano_decode,
    elias_fano_encode,
    index_bits,
    pack_bits,
    packed_bytes,
    unpack_bits,
)
from qerror.files import atomic_write

__all__ = [
    "BleachChoice",
    "BudgetError",
    "DWN",
    "DWNFit",
    "GroupSum",
    "LUTLayer",
    "MAX_FAN_IN",
    "Mapping",
    "RamFormat",
    "Thermometer",
    "WiSARD",
    "WisardClassifier",
    "efd_matrix",
    "fit_dwn",
    "fit_wisard",
    "load_wnn",
    "save_wnn",
    "seeded_mapping",
    "wnn_size",
]

class BudgetError(ValueError):
    """No model of the asked shape fits the byte budget (:func:`fit_wisard`'s ``max_bytes``)."""


_U64 = np.uint64
_MASK64 = (1 << 64) - 1
# Thermometer threshold dtypes a file can hold, by code; each is stored little-endian.
_DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64,
           6: torch.float16, 7: torch.float32, 8: torch.float64}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
_MAGIC = b"QWNN"
_VERSION = 1
_KIND_WISARD, _KIND_DWN = 1, 2
_PREFIX = struct.Struct("<4sBB")
_THERMO = struct.Struct("<IHBB")        # features, bits per feature, pooled, dtype code
_WISARD = struct.Struct("<BBBBHQIQBB")  # n, shuffle, counts, format, classes, seed, bleach,
#                                          entries, length bits, count bits
_DWN = struct.Struct("<HBBdQ")          # classes, fan-in, layers, tau, seed
_DWN_LAYER = struct.Struct("<IB")       # LUTs, mapping code
MAX_FAN_IN = 10  # the largest LUT fan-in: the EFD matrix has 4**n * n entries


# --------------------------------------------------------------------------- seeded wiring

def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, a bijection of uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _tie_keys(words: np.ndarray, classes: int) -> torch.Tensor:
    """Keys that break ties between classes, int64 ``(N, classes)`` in ``[0, 2^63)``: a hash
    of each sample's own content ``words`` (``(N, W)`` integers; their positions are mixed
    in here) with each class's number. A pseudo-random order of the classes for each input,
    the same whatever the batch or the sample's place in it: over inputs, each tied class
    wins equally often, where the lowest class number won every tie."""
    w = np.ascontiguousarray(words).astype(_U64, copy=False)
    pos = np.arange(w.shape[1], dtype=_U64) * _U64(0xD1B54A32D192ED03)
    h = _splitmix64(w + pos).sum(axis=1, dtype=_U64)  # wraps mod 2^64
    numbers = np.arange(1, classes + 1, dtype=_U64) * _U64(0x9E3779B97F4A7C15)
    return torch.from_numpy((_splitmix64(h[:, None] + numbers[None, :]) >> _U64(1))
                            .astype(np.int64))


def _bit_words(bits: torch.Tensor) -> np.ndarray:
    """The 0/1 rows ``(N, B)`` packed into uint64 words ``(N, ceil(B/64))``."""
    packed = np.packbits(bits.detach().cpu().numpy().astype(bool), axis=1)
    pad = -packed.shape[1] % 8
    packed = np.pad(packed, ((0, 0), (0, pad)))
    return packed.view(">u8").astype(_U64)


def _fair_argmax(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The class (dim 1) with the largest score, a tie going to the tied class with the
    largest key (:func:`_tie_keys`); trailing dimensions of ``scores`` (one per bleaching
    threshold) share the keys."""
    top = scores == scores.amax(1, keepdim=True)
    k = keys.reshape(keys.shape + (1,) * (scores.dim() - 2)).to(scores.device)
    return torch.where(top, k, torch.tensor(-1, device=scores.device)).argmax(1)


def seeded_mapping(inputs: int, slots: int, seed: int, stream: int = 0) -> torch.Tensor:
    """A wiring regenerated from ``(seed, stream)``: ``slots`` input indices, each input used
    ``floor(slots/inputs)`` or one more times.

    Parameters
    ----------
    inputs : int
        Number of inputs to choose from, ≥ 1.
    slots : int
        Number of indices wanted, ≥ 0 (RAMs × address bits, LUTs × fan-in).
    seed, stream : int
        from 0 to 2**64 - 1; layers of one model share ``seed`` and differ in ``stream``.

    Returns
    -------
    torch.Tensor
        int64 of shape ``(slots,)``, values in ``[0, inputs)``.

    Notes
    -----
    Index block ``p`` (of ``inputs`` indices) is the permutation that sorts the keys
    ``h(i) = splitmix64(seed·φ + (stream·2^20 + p + 1)·γ + i·φ')`` (mod 2^64) over ``i``,
    with odd constants, so the keys of one block are distinct (``i·φ'`` is distinct mod
    2^64 and splitmix64 is a bijection) and the sort has no ties. Indices are distinct within
    a block, not across blocks: a RAM or LUT whose slots straddle two blocks can read one
    input twice, and then has fewer distinct inputs than address bits (a WiSARD whose input
    bits are not a multiple of its address bits fills its last RAM from the next block).
    The permutation depends
    only on this integer arithmetic, never on a library's random generator, so a file that
    stores the seed instead of the wiring reads back to the same wiring on any platform and
    any numpy or torch version.
    """
    inputs, slots = check_count(inputs, "inputs", 1), check_count(slots, "slots")
    seed, stream = check_seed(seed, "seed"), check_seed(stream, "stream")
    blocks = -(-slots // inputs)
    steps = np.arange(inputs, dtype=_U64) * _U64(0xBF58476D1CE4E5B9 | 1)
    out = []
    for p in range(blocks):
        start = seed * 0x9E3779B97F4A7C15 + ((stream << 20) + p + 1) * 0xD1B54A32D192ED03
        keys = _splitmix64(steps + _U64(start & _MASK64))
        out.append(np.argsort(keys, kind="stable"))
    flat = np.concatenate(out)[:slots] if out else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(flat.astype(np.int64))


# --------------------------------------------------------------------------- thermometer

def _as_tensor(x, name: str) -> torch.Tensor:
    kinds = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES.values())
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold integers or floats, got dtype {x.dtype}")
        if x.dtype.itemsize > 8:  # long double: torch.from_numpy's error names no argument
            raise TypeError(f"{name} must hold integers or floats ({kinds}), got dtype "
                            f"{x.dtype}")
        # in the machine's byte order: torch takes no other
        x = torch.from_numpy(np.ascontiguousarray(x.astype(x.dtype.newbyteorder("="),
                                                           copy=False)))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got "
                        f"{type(x).__name__}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} must hold integers or floats ({kinds}), got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, features...), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}): a thermometer "
                         "encodes at least one value per sample")
    if x.is_floating_point():
        check_finite(x, name)
    # data, not a graph: thresholds fitted on features that require grad would carry the
    # graph, and save_wnn could not read them out (torch refuses numpy() on such a tensor)
    return x.detach().reshape(x.shape[0], -1)


@dataclass(frozen=True, eq=False)
class Thermometer:
    """Thermometer encoding with thresholds at quantiles of the training data.

    Attributes
    ----------
    thresholds : torch.Tensor
        Shape ``(F, T)`` (one row per feature) or ``(1, T)`` (one row for all features,
        *pooled*), ascending along the last axis. Integer when fitted on integer data.
    features : int
        Number of input features ``F``.

    Notes
    -----
    Feature ``f`` with value ``x`` becomes ``T`` bits, bit ``t`` being ``x > θ_{f,t}``
    (``t = 0..T-1``); the code is a thermometer because the thresholds ascend. An encoded
    sample is feature-major: bit ``f·T + t``. The thresholds are the *distributive*
    thermometer of Bacellar et al. (2024): ``θ_t`` is the order statistic ``x_(k_t)`` of the
    ``N`` training values (sorted ascending, 0-based) with ``k_t = floor((t+1)·N/(T+1))``, so
    about ``1 − (t+1)/(T+1)`` of the training data lies above it and every bit is set for a
    comparable share of the data. Thresholds are training values themselves, so integer
    data (pixels) gives integer thresholds, stored at the data's own width.

    References
    ----------
    A. T. L. Bacellar et al., "Differentiable Weightless Neural Networks", ICML 2024.
    """

    thresholds: torch.Tensor
    features: int

    @classmethod
    def fit(cls, x, bits: int, *, pooled: bool = False) -> "Thermometer":
        """Thresholds at the training quantiles.

        Parameters
        ----------
        x : numpy.ndarray or torch.Tensor
            Training data, shape ``(N, F)`` or ``(N, *feature_shape)``; integer or float,
            finite.
        bits : int
            Bits per feature ``T``, ≥ 1.
        pooled : bool
            One set of thresholds from all features' values together (``T`` stored values)
            instead of one per feature (``F·T``).
        """
        bits = check_count(bits, "bits", 1)
        pooled = check_flag(pooled, "pooled")
        x = _as_tensor(x, "x")
        features = x.shape[1]
        values = x.reshape(-1, 1) if pooled else x
        ranks = torch.arange(1, bits + 1, dtype=torch.int64) * values.shape[0] // (bits + 1)
        ordered = torch.sort(values, dim=0).values
        return cls(ordered[ranks].T.contiguous(), features)

    def __post_init__(self):
        check_count(self.features, "features", 1)
        t = self.thresholds
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] not in (1, self.features):
            raise ValueError("thresholds must be a tensor of shape (features, T) or (1, T)")
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"thresholds dtype {t.dtype} cannot be stored")
        if not _ascending_thresholds(t):
            raise ValueError("thresholds must be finite and ascending along each row (a "
                             "thermometer code sets bit t when the value exceeds threshold t)")

    @property
    def bits(self) -> int:
        """Bits per feature ``T``."""
        return self.thresholds.shape[1]

    @property
    def pooled(self) -> bool:
        """Whether all features share one row of thresholds."""
        return self.thresholds.shape[0] == 1 and self.features > 1

    @property
    def out_bits(self) -> int:
        """Bits of one encoded sample, ``F·T``."""
        return self.features * self.bits

    def encode(self, x) -> torch.Tensor:
        """Encode ``x`` (shape ``(N, F)`` or ``(N, *feature_shape)``, finite) into bool
        ``(N, F·T)``.

        Raises
        ------
        TypeError
            ``x`` is not a numeric array or tensor.
        ValueError
            Wrong shape, wrong number of features, or NaN/Inf (which no threshold orders).
        """
        x = _as_tensor(x, "x")
        if x.shape[1] != self.features:
            raise ValueError(f"x has {x.shape[1]} features per sample, the thermometer was "
                             f"fitted on {self.features}")
        x, t = _comparable(x, self.thresholds)
        return (x.unsqueeze(-1) > t).reshape(x.shape[0], -1)

    def size_parts(self) -> list[SizePart]:
        """The thresholds as one stored part (the input encoder's cost)."""
        t = self.thresholds
        return [SizePart("thermometer thresholds", t.numel(), 8 * t.element_size(),
                         f"{'pooled' if self.pooled else 'per-feature'}, {t.dtype}")]


# Significand bits of the dtypes a thermometer compares (an integer's magnitude bits).
_DIGITS = {torch.uint8: 8, torch.int8: 7, torch.int16: 15, torch.int32: 31, torch.int64: 63,
           torch.float16: 11, torch.float32: 24, torch.float64: 53}


def _comparable(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and the thresholds ``t`` in dtypes whose comparison is exact.

    torch compares in the promoted dtype, which can round one side: a float16 threshold
    2048 against the int64 value 2049 compares 2048 > 2048. Where the promoted dtype holds
    both exactly (integers with integers, uint8 pixels with any float, a float with a wider
    one) they are compared as they are; otherwise in float64, which holds every value of
    these dtypes but integers beyond 2⁵³ (refused).
    """
    p = torch.promote_types(x.dtype, t.dtype)
    if not p.is_floating_point or all(_DIGITS[v.dtype] <= _DIGITS[p] for v in (x, t)):
        return x, t
    for v, name in ((x, "x"), (t, "the thresholds")):
        if not v.is_floating_point() and max(-int(v.min()), int(v.max())) > 2 ** 53:
            raise ValueError(f"{name} hold integers beyond 2**53, which a comparison with "
                             f"{'x' if name != 'x' else 'the thresholds'} (floats) would "
                             "round; give both as integers")
    return x.double(), t.double()


# --------------------------------------------------------------------------- WiSARD

_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _integers(x, name: str):
    """``x`` as a tensor (numpy arrays converted, anything else as it is), unsigned integers
    wider than a byte as int64 (torch's reductions and comparisons do not take them); a
    numpy array of strings or objects is refused (torch.from_numpy's error names no
    argument)."""
    if isinstance(x, torch.Tensor) and x.dtype in _WIDE_UNSIGNED:
        x = x.cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc":
            raise TypeError(f"{name} must hold integers, got numpy dtype {x.dtype}")
        if x.dtype.kind == "u" and x.dtype.itemsize > 1:
            if x.size and int(x.max()) > np.iinfo(np.int64).max:
                raise ValueError(f"{name} holds values beyond int64 ({int(x.max())})")
            x = x.astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x


def _as_bits(x, width: int, name: str) -> torch.Tensor:
    """A bool or integer 0/1 array of shape (N, width), as a bool tensor."""
    x = _integers(x, name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got "
                        f"{type(x).__name__}")
    if x.dtype != torch.bool:
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be bool or integer 0/1 bits, got dtype {x.dtype}; "
                            "encode real inputs with a Thermometer first")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 1):
            raise ValueError(f"{name} must hold only 0 and 1")
        x = x.to(torch.bool)
    if x.ndim != 2 or x.shape[1] != width or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N >= 1, {width}), got {tuple(x.shape)}")
    return x


def _as_labels(y, n: int, classes: int) -> torch.Tensor:
    """Labels as int64 class indices: a tensor, a numpy array, or a list or tuple of them
    (as fit_dwn takes them; a list reached check_labels, which refused it as "no tensor")."""
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    return check_labels(_integers(y, "labels"), classes, n)


def _inferred_classes(y) -> int:
    """One more than the largest training label (the labels are checked where they are
    used)."""
    y = _integers(np.asarray(y), "labels")
    if y.numel() == 0 or not is_integer_dtype(y.dtype):
        raise TypeError("labels must be a non-empty integer numpy array or tensor")
    return int(y.max()) + 1


def _ascending_thresholds(t: torch.Tensor) -> bool:
    """Whether every row of thresholds is finite and non-decreasing (compared, not
    differenced: a difference of unsigned thresholds wraps around)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return False
    return not bool((t[:, 1:] < t[:, :-1]).any())


def _check_tau(tau) -> float:
    """A GroupSum temperature: a positive finite real number (numpy's too, not a bool)."""
    if isinstance(tau, bool | np.bool_) or not isinstance(tau, numbers.Real) \
            or not 0 < tau < math.inf:
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    return float(tau)


@dataclass(frozen=True)
class BleachChoice:
    """The bleaching threshold chosen on a validation split.

    Attributes
    ----------
    bleach : int
        The smallest threshold with the highest validation accuracy.
    accuracy : float
        Validation accuracy at ``bleach``.
    accuracies : numpy.ndarray
        Validation accuracy at every candidate ``b = 1..len(accuracies)``.
    n : int
        Validation samples.
    """

    bleach: int
    accuracy: float
    accuracies: np.ndarray = field(repr=False)
    n: int

    @classmethod
    def best(cls, accuracies: np.ndarray, n: int, low: int = 1) -> "BleachChoice":
        """The smallest ``b ≥ low`` with the highest accuracy (``accuracies[b-1]``)."""
        if not 1 <= low <= len(accuracies):
            raise ValueError(f"no candidate threshold at or above {low}")
        b = low + int(np.argmax(accuracies[low - 1:]))
        return cls(b, float(accuracies[b - 1]), accuracies, n)


class WiSARD:
    """A WiSARD classifier: one discriminator of RAMs per class, one shared input mapping.

    Parameters
    ----------
    input_bits : int
        Bits of one input sample ``B``.
    address_bits : int
        Bits addressing each RAM ``n``, ``1 ≤ n ≤ B``.
    classes : int
        Number of classes ``C``, ≥ 1.
    seed : int
        Seeds the mapping (see :func:`seeded_mapping`); a stored model keeps the seed, not
        the wiring.
    shuffle : bool
        ``False`` maps bits in order (RAM ``r`` reads bits ``r·n .. r·n+n-1``, wrapping).

    Notes
    -----
    The input bits, permuted by the mapping, are cut into ``R = ceil(B/n)`` tuples of ``n``
    (the last tuple completed with bits of a second permutation). Tuple ``r`` of a sample is
    the address ``a_r = Σ_j bit_{r,j} 2^j`` of RAM ``r``. Training adds one to
    ``count_c[r, a_r]`` for each RAM of the sample's class ``c``. With bleaching threshold
    ``b ≥ 1`` the response of class ``c`` is ``Σ_r [count_c[r, a_r] ≥ b]``, and the predicted
    class the one with the largest response. ``b = 1`` is the classic WiSARD (a RAM fires
    for any address seen in training); a larger ``b`` ignores addresses seen fewer than
    ``b`` times, which is what saturated discriminators need. A tie between classes goes to
    the tied class a hash of the sample ranks first (:meth:`predict`). The counts are held
    sparse: sorted keys ``r·2^n + a`` with a count per class, looked up by binary search, so the
    memory grows with the addresses seen, not with ``2^n``.

    References
    ----------
    I. Aleksander, W. V. Thomas and P. A. Bowden, "WISARD: a radical step forward in image
    recognition", Sensor Review 4(3), 1984.
    D. S. Carvalho et al., "Bleaching: an alternative to saturation on WiSARD", ESANN 2013.
    """

    def __init__(self, input_bits: int, address_bits: int, classes: int, *, seed: int = 0,
                 shuffle: bool = True):
        self.input_bits = check_count(input_bits, "input_bits", 1)
        self.address_bits = check_count(address_bits, "address_bits", 1)
        self.classes = check_count(classes, "classes", 1)
        if self.address_bits > self.input_bits:
            raise ValueError(f"address size {self.address_bits} bits is larger than the "
                             f"{self.input_bits} input bits")
        self.seed = check_seed(seed, "seed")
        self.shuffle = check_flag(shuffle, "shuffle")
        self.rams = -(-self.input_bits // self.address_bits)
        if (self.rams * self.classes) << self.address_bits >= 1 << 62:
            raise ValueError(f"{self.rams} RAMs x {self.classes} classes x 2**"
                             f"{self.address_bits} addresses do not fit 62-bit keys; use "
                             "fewer address bits")
        self.mapping = self.regenerated_mapping()
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.counts = torch.zeros(0, self.classes, dtype=torch.int32)
        self.bleach = 1

    def regenerated_mapping(self) -> torch.Tensor:
        """The mapping that :attr:`seed` and :attr:`shuffle` give, int64 ``(R, n)``: what a
        file, which stores the seed and not the wiring, reads back."""
        slots = self.rams * self.address_bits
        if self.shuffle:
            flat = seeded_mapping(self.input_bits, slots, self.seed)
        else:
            flat = torch.arange(slots) % self.input_bits
        return flat.reshape(self.rams, self.address_bits)

    # Chunks keep the (rows, RAMs) int64 addresses near 64 MiB.
    def _chunk(self) -> int:
        return max(1, (1 << 23) // self.rams)

    def keys_of(self, bits) -> torch.Tensor:
        """RAM keys ``r·2^n + a_r`` of each sample, int64 ``(N, R)``."""
        bits = _as_bits(bits, self.input_bits, "bits")
        out = torch.empty(bits.shape[0], self.rams, dtype=torch.int64)
        base = torch.arange(self.rams, dtype=torch.int64) << self.address_bits
        for s in range(0, bits.shape[0], self._chunk()):
            part = bits[s:s + self._chunk()]
            addr = base.expand(part.shape[0], -1).clone()
            for j in range(self.address_bits):
                addr |= part[:, self.mapping[:, j]].to(torch.int64) << j
            out[s:s + part.shape[0]] = addr
        return out

    def fit(self, bits, labels) -> "WiSARD":
        """Write ``bits`` (``(N, B)`` bool or 0/1) of classes ``labels`` (``(N,)``) into the
        RAMs, adding to earlier training; returns ``self``."""
        bits = _as_bits(bits, self.input_bits, "bits")
        labels = _as_labels(labels, bits.shape[0], self.classes)
        # One key per (RAM, address, class); new counts merged with the stored ones.
        nz = torch.nonzero(self.counts)
        parts = [self.keys[nz[:, 0]] * self.classes + nz[:, 1]]
        weights = [self.counts[nz[:, 0], nz[:, 1]].to(torch.int64)]
        for s in range(0, bits.shape[0], self._chunk()):
            k = self.keys_of(bits[s:s + self._chunk()]) * self.classes
            k += labels[s:s + self._chunk(), None]
            u, c = torch.unique(k, return_counts=True)
            parts.append(u)
            weights.append(c)
        u, inverse = torch.unique(torch.cat(parts), return_inverse=True)
        total = torch.zeros(u.numel(), dtype=torch.int64).index_add_(0, inverse,
                                                                     torch.cat(weights))
        if int(total.max()) >= 1 << 31:
            raise OverflowError("a RAM count exceeds int32")
        self.keys, slot = torch.unique_consecutive(u // self.classes, return_inverse=True)
        self.counts = torch.zeros(self.keys.numel(), self.classes, dtype=torch.int32)
        self.counts[slot, u % self.classes] = total.to(torch.int32)
        return self

    def _lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Counts ``(N, R, C)`` int32 at the given keys (0 where never written)."""
        if self.keys.numel() == 0:
            return torch.zeros(*keys.shape, self.classes, dtype=torch.int32)
        pos = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        found = self.keys[pos] == keys
        return self.counts[pos] * found.unsqueeze(-1)

    def responses(self, bits, bleach: int | None = None) -> torch.Tensor:
        """Number of firing RAMs per class, int64 ``(N, C)``, at threshold ``bleach``
        (default: the model's :attr:`bleach`)."""
        return self._responses(self.keys_of(bits), bleach)

    def _responses(self, keys: torch.Tensor, bleach: int | None) -> torch.Tensor:
        b = self.bleach if bleach is None else check_count(bleach, "bleach", 1)
        step = max(1, (1 << 24) // (self.rams * self.classes))
        return torch.cat([(self._lookup(keys[s:s + step]) >= b).sum(1)
                          for s in range(0, keys.shape[0], step)]
                         + [torch.empty(0, self.classes, dtype=torch.int64)])

    def tie_keys(self, bits) -> torch.Tensor:
        """Each sample's order of the classes for ties, int64 ``(N, C)``: a hash of its RAM
        addresses (:meth:`keys_of`) with each class's number, so the same input breaks a
        tie the same way anywhere (a file read back included: the addresses are the
        input's) and no class is favoured by its number."""
        return _tie_keys(self.keys_of(bits).numpy(), self.classes)

    def predict(self, bits, bleach: int | None = None) -> torch.Tensor:
        """Predicted classes, int64 ``(N,)``: the class with the largest response; a tie goes
        to the tied class the sample's own hash ranks first (:meth:`tie_keys`), not to the
        lowest class number, which would favour class 0 (responses are small integers and
        tie on a few percent of Fashion-MNIST's images)."""
        keys = self.keys_of(bits)
        return _fair_argmax(self._responses(keys, bleach),
                            _tie_keys(keys.numpy(), self.classes))

    def choose_bleach(self, bits, labels, max_bleach: int | None = None) -> BleachChoice:
        """Set :attr:`bleach` to the threshold most accurate on a validation split.

        Parameters
        ----------
        bits, labels
            Validation samples ``(N, B)`` and classes ``(N,)``, disjoint from training.
        max_bleach : int, optional
            Largest candidate (default: the largest count, at most 4096). Every
            ``b = 1..max_bleach`` is evaluated exactly.

        Notes
        -----
        For each sample and class, a histogram of ``min(count, max_bleach+1)`` over the RAMs,
        summed from the top, gives the response at every ``b`` at once, so the search
        costs one lookup of the validation set. Ties between classes are broken as
        :meth:`predict` breaks them; ties between thresholds go to the smallest ``b``.
        """
        bits = _as_bits(bits, self.input_bits, "bits")
        labels = _as_labels(labels, bits.shape[0], self.classes)
        top = int(self.counts.max()) if self.counts.numel() else 1
        cap = min(max(top, 1), 4096) if max_bleach is None else check_count(max_bleach,
                                                                             "max_bleach", 1)
        keys = self.keys_of(bits)
        ties = _tie_keys(keys.numpy(), self.classes)
        bins = cap + 2
        step = max(1, (1 << 22) // (self.classes * bins + self.rams * self.classes))
        correct = torch.zeros(cap, dtype=torch.int64)
        offsets = torch.arange(self.classes, dtype=torch.int64) * bins
        for s in range(0, keys.shape[0], step):
            counts = self._lookup(keys[s:s + step]).clamp_(max=cap + 1).to(torch.int64)
            m = counts.shape[0]
            flat = (counts + offsets + (torch.arange(m) * self.classes * bins)[:, None, None])
            hist = torch.bincount(flat.reshape(-1), minlength=m * self.classes * bins)
            at_least = hist.reshape(m, self.classes, bins).flip(-1).cumsum(-1).flip(-1)
            pred = _fair_argmax(at_least[:, :, 1:cap + 1], ties[s:s + step])
            correct += (pred == labels[s:s + step, None]).sum(0)
        return self.set_bleach(BleachChoice.best((correct.to(torch.float64)
                                                  / bits.shape[0]).numpy(), bits.shape[0]))

    def set_bleach(self, choice: BleachChoice) -> BleachChoice:
        """Use ``choice.bleach`` from now on; returns ``choice``."""
        self.bleach = check_count(choice.bleach, "bleach", 1)
        return choice

    def stored_entries(self, counts: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
        """The entries a file stores, class-major then key order.

        Returns ``(class, key, count)`` int64 tensors: entries with count ≥ :attr:`bleach`
        (``counts=False``, a binary RAM is all inference needs) or every written entry
        (``counts=True``, enough to bleach again).
        """
        low = 1 if check_flag(counts, "counts") else self.bleach
        cls, row = torch.nonzero(self.counts.T >= low, as_tuple=True)
        return cls, self.keys[row], self.counts[row, cls].to(torch.int64)


@dataclass(eq=False)
class WisardClassifier:
    """A thermometer and a WiSARD behind it: real inputs in, classes out."""

    thermometer: Thermometer
    wisard: WiSARD

    def __post_init__(self):
        self.check_parts()

    def check_parts(self) -> None:
        """ValueError unless the thermometer gives the bits the WiSARD reads (checked when
        the classifier is built, and again when it is counted or saved: the attributes can
        be replaced)."""
        if self.thermometer.out_bits != self.wisard.input_bits:
            raise ValueError(f"the thermometer gives {self.thermometer.out_bits} bits per "
                             f"sample and the WiSARD reads {self.wisard.input_bits}: build "
                             "the WiSARD with input_bits=thermometer.out_bits")

    def predict(self, x) -> torch.Tensor:
        """Classes, int64 ``(N,)``, of real inputs ``x`` (shape ``(N, F)`` or
        ``(N, *feature_shape)``)."""
        return self.wisard.predict(self.thermometer.encode(x))


def fit_wisard(x_train, y_train, x_val, y_val, *, thermometer_bits: int, address_bits: int,
               classes: int | None = None, pooled: bool = False, seed: int = 0,
               shuffle: bool = True, max_bleach: int | None = None,
               max_bytes: int | None = None) -> tuple[WisardClassifier, BleachChoice]:
    """Fit a thermometer on ``x_train``, train a WiSARD, choose its bleaching on the
    validation split.

    Parameters
    ----------
    x_train, y_train : array or tensor
        Training inputs ``(N, F)`` or ``(N, *shape)`` and classes ``(N,)``.
    x_val, y_val : array or tensor
        Validation split, only used to choose the bleaching threshold.
    thermometer_bits, address_bits : int
        Bits per feature ``T`` and RAM address bits ``n``.
    classes : int, optional
        Default ``max(y_train) + 1``.
    pooled, seed, shuffle, max_bleach
        See :meth:`Thermometer.fit`, :class:`WiSARD` and :meth:`WiSARD.choose_bleach`.
    max_bytes : int, optional
        A storage budget: the threshold is the most accurate on the validation split among
        those whose model (binary RAMs, :func:`wnn_size`) fits in ``max_bytes``.

    Returns
    -------
    (WisardClassifier, BleachChoice)

    Raises
    ------
    TypeError
        A count (``thermometer_bits``, ``address_bits``, ``max_bleach``) that is not an
        integer, or a flag (``pooled``, ``shuffle``) that is not a bool.
    ValueError
        Other bad input. :class:`BudgetError` (a ValueError): no threshold up to
        ``max_bleach`` fits ``max_bytes``.

    Notes
    -----
    A larger threshold stores fewer addresses, so the size never grows with ``b``: the
    smallest threshold within budget is found by bisection, and the choice is made among
    the thresholds above it.
    """
    if max_bytes is not None:
        max_bytes = check_byte_budget(max_bytes, "max_bytes")
    thermo = Thermometer.fit(x_train, thermometer_bits, pooled=pooled)
    if classes is None:
        classes = _inferred_classes(y_train)
    wisard = WiSARD(thermo.out_bits, address_bits, classes, seed=seed, shuffle=shuffle)
    wisard.fit(thermo.encode(x_train), y_train)
    choice = wisard.choose_bleach(thermo.encode(x_val), y_val, max_bleach)
    model = WisardClassifier(thermo, wisard)
    if max_bytes is not None and wnn_size(model).total_bytes > max_bytes:
        lo, hi = choice.bleach, len(choice.accuracies)
        wisard.bleach = hi
        if wnn_size(model).total_bytes > max_bytes:
            raise BudgetError(f"even bleaching threshold {hi} leaves "
                              f"{wnn_size(model).total_bytes} bytes, over max_bytes={max_bytes}")
        while hi - lo > 1:                      # size(lo) > budget >= size(hi)
            wisard.bleach = (lo + hi) // 2
            if wnn_size(model).total_bytes <= max_bytes:
                hi = wisard.bleach
            else:
                lo = wisard.bleach
        choice = wisard.set_bleach(BleachChoice.best(choice.accuracies, choice.n, hi))
    return model, choice


# --------------------------------------------------------------------------- DWN

class Mapping(Choice):
    """How a LUT layer wires its inputs.

    RANDOM: regenerated from the model's seed (stored: nothing but the seed).
    LEARNABLE: trained (DWN's learnable mapping); stored as explicit indices.
    FIXED: explicit indices given at construction (e.g. read from a file), not trained.
    """

    RANDOM = "random"
    LEARNABLE = "learnable"
    FIXED = "fixed"



_MAPPING_CODES = {Mapping.RANDOM: 0, Mapping.LEARNABLE: 1, Mapping.FIXED: 2}


class EFDDecay(Choice):
    """How the extended finite difference weighs a LUT entry by its distance ``H`` from the
    address read (:func:`efd_matrix`).

    HARMONIC: ``1/(H + 1)``, the paper's weighting (Bacellar et al., 2024, Sec. 3),
    applied, as both decays are here, to the LUT's real entries rather than to its 0/1
    outputs (:class:`LUTLayer`'s Notes): an entry's distance from the sign threshold counts.
    EXPONENTIAL: ``α·β^H`` with ``α = 0.5·0.75^(n−1)`` and ``β = 1/3``, the decay the
    authors' released code uses instead (its README says so); far more local: at ``n = 6``
    an entry at distance 5 weighs ``β^5 ≈ 0.004`` of one at distance 0, against ``1/6``.
    """

    HARMONIC = "harmonic"
    EXPONENTIAL = "exponential"


@functools.lru_cache(maxsize=None)
def _efd_matrix64(n: int, decay: EFDDecay) -> torch.Tensor:
    k = torch.arange(1 << n)
    j = torch.arange(n)
    bit_kj = (k[None, :] >> j[:, None]) & 1                              # (n, K)
    diff = k[:, None] ^ k[None, :]                                       # (a, k)
    masked = diff[:, None, :] & ~(1 << j)[None, :, None]                 # (a, j, k)
    popcount = sum((masked >> i) & 1 for i in range(n)).to(torch.float64)
    sign = (2 * bit_kj - 1)[None, :, :].to(torch.float64)
    if decay is EFDDecay.HARMONIC:
        return sign / (popcount + 1)
    if decay is EFDDecay.EXPONENTIAL:
        return sign * (0.5 * 0.75 ** (n - 1)) * (1 / 3) ** popcount
    raise ValueError(f"no EFD weights for decay {decay!r}")


def efd_matrix(n: int, dtype: torch.dtype = torch.float32,
               decay: EFDDecay | str = EFDDecay.HARMONIC) -> torch.Tensor:
    """The extended-finite-difference weights of an ``n``-input LUT, shape
    ``(2^n, n, 2^n)``.

    Returns
    -------
    torch.Tensor
        ``M[a, j, k] = (2·k_j − 1)·w(H_j(a, k))``, ``k_j`` bit ``j`` of ``k``, ``H_j`` the
        Hamming distance of ``a`` and ``k`` ignoring bit ``j``, and ``w`` the ``decay``
        (:class:`EFDDecay`): ``1/(H + 1)`` by default.

    Notes
    -----
    For a LUT with entries ``A[k]`` read at address ``a``, EFD takes the derivative of the
    output with respect to input bit ``j`` as ``∂y/∂x_j = Σ_k M[a, j, k] A[k]``
    (Bacellar et al., 2024, Sec. 3): every entry votes, with sign ``+`` where its bit ``j``
    is 1 and ``−`` where it is 0, weighted down by its distance to the address read. The
    two entries at distance 0 give the plain finite difference ``A[a|2^j] − A[a&~2^j]``
    (times ``α`` with the exponential decay).
    """
    n = check_count(n, "n", 1)
    if n > MAX_FAN_IN:
        raise ValueError(f"fan-in {n} exceeds {MAX_FAN_IN}: the EFD matrix has 4**n * n "
                         "entries")
    # a copy, also in float64: the cached tensor must not be changed by a caller
    return _efd_matrix64(n, EFDDecay.parse(decay)).to(dtype, copy=True)


def _scatter_sum(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """``out[i] = Σ values[index == i]``, run to run the same on every device: ``index_add_``
    on the CPU (the fastest form there), the sorted ``index_put_(accumulate=True)`` on a GPU,
    where ``index_add_`` adds with atomics in an order that changes between runs."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    if values.device.type == "cpu":
        return out.index_add_(0, index, values)
    return out.index_put_((index,), values, accumulate=True)


def _read_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]``: by ``index_select`` on the CPU, by advanced indexing elsewhere, whose
    backward accumulates in a fixed order on a GPU (``index_select``'s uses atomics)."""
    if x.device.type == "cpu":
        return x.index_select(1, index.reshape(-1)).view(x.shape[0], *index.shape)
    return x[:, index]


class _EFDLookup(torch.autograd.Function):
    """Binary LUT read; backward by EFD for the inputs and straight-through for the table."""

    @staticmethod
    def forward(ctx, bits: torch.Tensor, table: torch.Tensor, decay: EFDDecay) -> torch.Tensor:
        ctx.decay = decay
        lut_count, size = table.shape
        # The address as a float dot product with (1, 2, 4, ...), a third of the time of
        # integer shifts: exact for 0/1 bits, every partial sum being an integer below
        # 2^fan_in ≤ 2^10 (bfloat16, integers, bools are summed in float32).
        if not bits.is_floating_point() or torch.finfo(bits.dtype).eps > 2.0 ** -MAX_FAN_IN:
            bits = bits.to(torch.float32)
        pow2 = (1 << torch.arange(bits.shape[-1], device=bits.device)).to(bits.dtype)
        addr = (bits @ pow2).to(torch.int64)                                   # (B, L)
        # Entry (l, a) of the table is entry l·2^n + a of its flat view: one flat gather
        # (take) instead of a two-index read.
        flat = addr + torch.arange(lut_count, device=addr.device) * size
        ctx.save_for_backward(flat, table)
        return (table.reshape(-1).take(flat) > 0).to(table.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, table = ctx.saved_tensors
        n = table.shape[1].bit_length() - 1
        grad_bits = grad_table = None
        if ctx.needs_input_grad[0]:
            # D[l, a, j] = Σ_k M[a, j, k] A[l, k]: the EFD of every LUT at every address,
            # read at each sample's address as row l·2^n + a of D's (L·2^n, n) view.
            m = efd_matrix(n, table.dtype, ctx.decay).to(table.device)
            d = torch.einsum("ajk,lk->laj", m, table)
            grad_bits = d.reshape(-1, n).index_select(0, flat.reshape(-1)).view(
                *flat.shape, n) * grad.unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            grad_table = _scatter_sum(flat.reshape(-1), grad.reshape(-1),
                                      table.numel()).view_as(table)
        return grad_bits, grad_table, None


class _LearnableSelect(torch.autograd.Function):
    """DWN's learnable mapping: forward reads ``x[:, argmax_i W[s, i]]`` for every slot ``s``.

    Backward (Bacellar et al., 2024, Sec. 4.1): the weights get ``gᵀ (2x − 1)``, the gradient
    of a selection that adds ``+W[s, i]`` for a 1 bit and ``−W[s, i]`` for a 0 bit, so every
    weight of a slot learns whether its input would have helped, whichever input is read; the
    inputs get ``g softmax(W/τ)``, a soft version of the hard read. ``W`` is stored slot by
    slot so that the argmax runs along contiguous rows (along columns it took most of a
    training step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tau = tau
        return _read_columns(x, weight.argmax(1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ torch.softmax(weight / ctx.tau, dim=1)
        if ctx.needs_input_grad[1]:
            grad_w = grad.T @ (2 * x - 1)
        return grad_x, grad_w, None


class LUTLayer(nn.Module):
    """A layer of ``luts`` lookup tables of ``fan_in`` binary inputs each (DWN style).

    Parameters
    ----------
    in_features : int
        Width of the binary input.
    luts : int
        Number of LUTs (outputs).
    fan_in : int
        Inputs per LUT ``n``, ``1 ≤ n ≤ min(in_features, 10)``; each LUT holds ``2^n``
        entries.
    mapping : Mapping or str
        How inputs are wired to LUTs.
    seed, stream : int
        Seed the random wiring (:func:`seeded_mapping`) and the table's initial values.
    index : torch.Tensor, optional
        Explicit wiring ``(luts, n)`` for ``Mapping.FIXED``.
    tau : float
        Softmax temperature of the learnable mapping's backward pass to the inputs.
    efd : EFDDecay or str
        The decay of the inputs' EFD gradient (:func:`efd_matrix`); training only: the
        forward and the stored model do not depend on it.

    Notes
    -----
    Forward: the address ``a = Σ_j x_{w(l,j)} 2^j`` of LUT ``l`` reads the real entry
    ``A[l, a]`` and outputs ``1[A[l, a] > 0]``. Backward: the entries get the
    straight-through gradient (the output is treated as ``A[l, a]``; entries are kept in
    ``[-1, 1]`` by the training loop), the inputs the EFD of :func:`efd_matrix` on the
    real entries. A learnable mapping holds weights ``W`` (luts·n × in_features): the
    forward reads the input ``argmax_i W[s, i]`` for slot ``s``; the backward gives ``W``
    the gradient ``gᵀ (2x − 1)`` of the slots' gradient ``g`` and the inputs that of the soft
    selection ``x · softmax(W/τ)ᵀ`` (the paper's Sec. 4.1). A softmax at the small default
    ``τ`` is nearly one-hot, so differentiating it for ``W`` too would give the weights
    almost no gradient: the wiring would not learn.

    References
    ----------
    A. T. L. Bacellar et al., "Differentiable Weightless Neural Networks", ICML 2024.
    """

    def __init__(self, in_features: int, luts: int, fan_in: int = 6, *,
                 mapping: Mapping | str = Mapping.RANDOM, seed: int = 0, stream: int = 0,
                 index: torch.Tensor | None = None, tau: float = 1e-3,
                 efd: EFDDecay | str = EFDDecay.HARMONIC):
        super().__init__()
        self.efd = EFDDecay.parse(efd)
        self.in_features = check_count(in_features, "in_features", 1)
        self.luts = check_count(luts, "luts", 1)
        self.fan_in = check_count(fan_in, "fan_in", 1)
        if self.fan_in > self.in_features:
            raise ValueError(f"fan-in (address size) {self.fan_in} bits is larger than the "
                             f"{self.in_features} input bits")
        if self.fan_in > MAX_FAN_IN:
            raise ValueError(f"fan_in {self.fan_in} exceeds {MAX_FAN_IN}")
        self.mapping = Mapping.parse(mapping)
        self.seed, self.stream = check_seed(seed, "seed"), check_seed(stream, "stream")
        self.tau = _check_tau(tau)
        gen = torch.Generator().manual_seed(
            (self.seed ^ (self.stream * 0x9E3779B97F4A7C15)) & _MASK64)
        self.table = nn.Parameter(torch.rand(self.luts, 1 << self.fan_in, generator=gen)
                                  * 2 - 1)
        slots = self.luts * self.fan_in
        if (index is not None) != (self.mapping is Mapping.FIXED):
            raise ValueError("pass index exactly when mapping is FIXED")
        if self.mapping is Mapping.FIXED:
            index = torch.as_tensor(index)
            if not is_integer_dtype(index.dtype):
                raise TypeError(f"index must hold integers (input positions), got {index.dtype}")
            index = index.to(torch.int64)
            if index.shape != (self.luts, self.fan_in):
                raise ValueError(f"index must have shape ({self.luts}, {self.fan_in}), got "
                                 f"{tuple(index.shape)}")
            if int(index.min()) < 0 or int(index.max()) >= self.in_features:
                raise ValueError(f"index values must lie in [0, {self.in_features})")
            self.register_buffer("_index", index.clone())
        elif self.mapping is Mapping.RANDOM:
            flat = seeded_mapping(self.in_features, slots, self.seed, self.stream)
            self.register_buffer("_index", flat.reshape(self.luts, self.fan_in))
        else:
            self.weight = nn.Parameter(
                torch.randn(self.in_features, slots, generator=gen).T.contiguous())

    @property
    def index(self) -> torch.Tensor:
        """The wiring in use, int64 ``(luts, fan_in)``."""
        if self.mapping is Mapping.LEARNABLE:
            return self.weight.detach().argmax(1).reshape(self.luts, self.fan_in)
        return self._index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Binary ``(B, in_features)`` in (every entry exactly 0 or 1, any dtype), binary
        ``(B, luts)`` float out."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}; convert "
                            "it with torch.from_numpy")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"input must have shape (B, {self.in_features}), got "
                             f"{tuple(x.shape)}")
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("a LUT layer reads bits: every input must be exactly 0 or 1 "
                             "(encode real inputs with a Thermometer first)")
        if self.mapping is Mapping.LEARNABLE:
            # in the wiring's float dtype: bits of bool or integer dtype would carry no
            # gradient to the wiring, which would then never learn
            bits = _LearnableSelect.apply(x.to(self.weight.dtype), self.weight,
                                          self.tau).reshape(
                -1, self.luts, self.fan_in)
        else:
            bits = _read_columns(x, self._index)
        return _EFDLookup.apply(bits, self.table, self.efd)

    def size_parts(self, name: str) -> list[SizePart]:
        """The stored parts: the binarised table, and the wiring unless it is seeded."""
        table = SizePart(f"{name} LUT bits", self.luts << self.fan_in, 1,
                         f"{self.luts} LUTs x 2^{self.fan_in}")
        if self.mapping is Mapping.RANDOM:
            wiring = SizePart(f"{name} wiring", 0, 1, "regenerated from the stored seed")
        else:
            wiring = SizePart(f"{name} wiring", self.luts * self.fan_in,
                              index_bits(self.in_features),
                              f"{self.mapping.value}: one index of {self.in_features} inputs")
        return [table, wiring]


class GroupSum(nn.Module):
    """Class scores: the sum of each class's group of binary outputs, divided by ``tau``.

    Output ``j`` of ``L`` belongs to class ``j // (L / classes)``.
    """

    def __init__(self, classes: int, tau: float = 1.0):
        super().__init__()
        self.classes = check_count(classes, "classes", 1)
        self.tau = _check_tau(tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` → ``(B, classes)``."""
        if x.ndim != 2 or x.shape[1] % self.classes:
            raise ValueError(f"input must have shape (B, L) with L divisible by "
                             f"{self.classes}, got {tuple(x.shape)}")
        # the group size stated, not inferred (-1): an empty batch has none to infer
        groups = x.reshape(x.shape[0], self.classes, x.shape[1] // self.classes)
        return groups.sum(-1) / self.tau


class DWN(nn.Module):
    """A thermometer, LUT layers and a GroupSum: a differentiable weightless network.

    Parameters
    ----------
    thermometer : Thermometer
        The input encoder (DWN's distributive thermometer: :meth:`Thermometer.fit`).
    luts : sequence of int
        LUTs per layer; the last must be a multiple of ``classes`` (a bare int, not a
        sequence, is a TypeError).
    classes : int
        Number of classes.
    fan_in : int
        Inputs per LUT, every layer.
    mapping : Mapping or str
        The first layer's wiring; later layers are RANDOM (learnable mapping in the first
        layer only is what Bacellar et al. recommend for speed).
    tau : float
        GroupSum temperature: class score = popcount / tau.
    seed : int
        Seeds every layer's wiring (layer ``i`` is stream ``i``) and initial tables.
    efd : EFDDecay or str
        Every layer's EFD decay (training only, :class:`LUTLayer`).
    """

    def __init__(self, thermometer: Thermometer, luts: Sequence[int], classes: int, *,
                 fan_in: int = 6, mapping: Mapping | str = Mapping.RANDOM, tau: float = 1.0,
                 seed: int = 0, mapping_tau: float = 1e-3,
                 efd: EFDDecay | str = EFDDecay.HARMONIC):
        super().__init__()
        if not isinstance(thermometer, Thermometer):
            raise TypeError("thermometer must be a Thermometer")
        if isinstance(luts, str) or not isinstance(luts, Iterable):
            raise TypeError(f"luts must be a sequence of LUT counts, one per layer (e.g. "
                            f"(2000, 1000), or (1000,) for one layer), got {luts!r}")
        luts = [check_count(v, "luts", 1) for v in luts]
        if not luts:
            raise ValueError("need at least one LUT layer")
        self.thermometer = thermometer
        self.seed = check_seed(seed, "seed")
        mapping = Mapping.parse(mapping)
        if mapping is Mapping.FIXED:
            raise ValueError("a FIXED first layer is built by load_wnn; use RANDOM or LEARNABLE")
        widths = [thermometer.out_bits] + luts
        self.layers = nn.ModuleList(
            LUTLayer(widths[i], widths[i + 1], fan_in, seed=self.seed, stream=i,
                     mapping=mapping if i == 0 else Mapping.RANDOM, tau=mapping_tau, efd=efd)
            for i in range(len(luts)))
        self.group_sum = GroupSum(classes, tau)
        if luts[-1] % classes:
            raise ValueError(f"the last layer's {luts[-1]} LUTs do not split into {classes} "
                             "equal class groups")

    @property
    def classes(self) -> int:
        return self.group_sum.classes

    def forward_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Class scores ``(B, classes)`` of encoded inputs ``(B, F·T)`` (float 0/1)."""
        for layer in self.layers:
            bits = layer(bits)
        return self.group_sum(bits)

    def forward(self, x) -> torch.Tensor:
        """Class scores ``(B, classes)`` of real inputs ``(B, F)`` or ``(B, *shape)``."""
        return self.forward_bits(self.thermometer.encode(x).to(self.layers[0].table.dtype))

    @torch.no_grad()
    def predict(self, x, batch_size: int = 4096) -> torch.Tensor:
        """Classes, int64 ``(N,)``: the class with the largest score; a tie (the scores are
        popcounts) goes to the tied class a hash of the sample's encoded bits ranks first,
        not to the lowest class number (:meth:`WiSARD.predict`)."""
        batch_size = check_count(batch_size, "batch_size", 1)
        bits = self.thermometer.encode(x).to(self.layers[0].table.dtype)
        return self.predict_bits(bits, batch_size)

    @torch.no_grad()
    def predict_bits(self, bits: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """:meth:`predict` of encoded inputs ``(N, F·T)`` (0/1), on their device."""
        ties = _tie_keys(_bit_words(bits), self.classes)
        return torch.cat([_fair_argmax(self.forward_bits(bits[s:s + batch_size]),
                                       ties[s:s + batch_size])
                          for s in range(0, bits.shape[0], batch_size)]
                         + [torch.empty(0, dtype=torch.int64, device=bits.device)])


@dataclass(frozen=True)
class DWNFit:
    """A trained DWN and its training record.

    Attributes
    ----------
    model : DWN
    val_accuracy : tuple of float
        Validation accuracy after each epoch.
    train_loss : tuple of float
        Mean cross-entropy of each epoch.
    seconds : float
        Wall time of the training loop.
    epoch : int
        The epoch (counted from 1) after which ``model`` was taken: the last, or with
        ``keep_best`` the first with the highest validation accuracy.
    """

    model: DWN
    val_accuracy: tuple[float, ...]
    train_loss: tuple[float, ...]
    seconds: float
    epoch: int


def fit_dwn(x_train, y_train, x_val, y_val, *, thermometer_bits: int = 7,
            luts: Sequence[int] = (2000, 1000), fan_in: int = 6,
            mapping: Mapping | str = Mapping.RANDOM, classes: int | None = None,
            tau: float = 1 / 0.3, epochs: int = 30, batch_size: int = 32, lr: float = 1e-2,
            step_size: int = 14, gamma: float = 0.1, seed: int = 0, pooled: bool = False,
            keep_best: bool = False, efd: EFDDecay | str = EFDDecay.HARMONIC,
            progress: bool = False, device: torch.device | str = "cpu") -> DWNFit:
    """Train a DWN with Adam and a step learning-rate schedule.

    Parameters
    ----------
    x_train, y_train, x_val, y_val : array or tensor
        Inputs ``(N, F)`` or ``(N, *shape)`` and classes ``(N,)``; the validation split is
        only evaluated, never trained on.
    thermometer_bits, pooled
        The distributive thermometer (:meth:`Thermometer.fit`).
    luts, fan_in, mapping, tau, seed, efd
        The model (:class:`DWN`).
    epochs, batch_size, lr, step_size, gamma
        Adam at ``lr``, multiplied by ``gamma`` every ``step_size`` epochs. These defaults,
        the layer sizes, fan-in 6 and ``tau = 1/0.3`` are those of the authors' published
        MNIST example (which uses a 3-bit thermometer; 7 bits is the default here).
    keep_best : bool
        Return the model as it was after the first epoch with the highest validation
        accuracy (early stopping on the validation split) instead of after the last.
    progress : bool
        Show a progress bar per epoch.
    device : torch.device or str
        Where the model is trained and validated (``"cuda"`` for a GPU); the batches are
        drawn on the CPU as everywhere, so the same seed draws the same batches, and the
        model comes back on the CPU.

    Notes
    -----
    After every step the LUT entries are clamped to ``[-1, 1]``, so a straight-through
    gradient cannot push an entry arbitrarily far from the sign threshold. Batches are
    drawn from a generator seeded with ``seed``.
    """
    seed = check_seed(seed, "seed")
    keep_best, progress = check_flag(keep_best, "keep_best"), check_flag(progress, "progress")
    batch_size = check_count(batch_size, "batch_size", 1)
    epochs, step_size = check_count(epochs, "epochs", 1), check_count(step_size, "step_size", 1)
    for name, v in (("lr", lr), ("gamma", gamma)):  # checked before an epoch is spent
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not 0 < v < math.inf:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    thermo = Thermometer.fit(x_train, thermometer_bits, pooled=pooled)
    # Bits stay bool (1 byte each) until a batch needs them as floats.
    xb, xv = thermo.encode(x_train), thermo.encode(x_val)
    # a count before the labels are held against it: their check would call a bad count
    # (0, True, 2.0) a bad label
    classes = (_inferred_classes(y_train) if classes is None
               else check_count(classes, "classes", 1))
    yb = _as_labels(np.asarray(y_train), xb.shape[0], classes)  # (it takes wide unsigned)
    yv = _as_labels(np.asarray(y_val), xv.shape[0], classes)
    dev = torch.device(device)
    model = DWN(thermo, luts, classes, fan_in=fan_in, mapping=mapping, tau=tau, efd=efd,
                seed=seed).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    gen = torch.Generator().manual_seed(seed & (_MASK64 >> 1))
    accs, losses = [], []
    best_state, best_epoch = None, 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(xb.shape[0], generator=gen)
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        total = 0.0
        for idx in progress_bar(batches, progress, "dwn epoch"):
            scores = model.forward_bits(xb[idx].to(dev, torch.float32))
            loss = nn.functional.cross_entropy(scores, yb[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for layer in model.layers:
                    layer.table.clamp_(-1, 1)
            total += loss.item() * len(idx)
        sched.step()
        model.eval()
        with torch.no_grad():
            pred = model.predict_bits(xv.to(dev, torch.float32)).cpu()
        accs.append(float((pred == yv).double().mean()))
        losses.append(total / xb.shape[0])
        if keep_best and (best_state is None or accs[-1] > accs[best_epoch - 1]):
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch = epoch
    if keep_best:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(accs)
    return DWNFit(model.cpu(), tuple(accs), tuple(losses), time.perf_counter() - start,
                  best_epoch)


# --------------------------------------------------------------------------- bytes and files

def _header_prefix(kind: int) -> bytes:
    return _PREFIX.pack(_MAGIC, _VERSION, kind)


def _thermo_header(t: Thermometer) -> bytes:
    return _THERMO.pack(t.features, t.bits, int(t.pooled), _DTYPE_CODES[t.thresholds.dtype])


class RamFormat(Choice):
    """How a stored WiSARD holds its RAMs (:func:`wnn_size` picks the smallest).

    DENSE: a bitmap (or a count) for every address of every RAM, ``C·R·2^n`` entries.
    LIST: per (class, RAM) an entry count, then its addresses ascending, ``n`` bits each.
    ELIAS_FANO: the same entry counts, each RAM's addresses in Elias–Fano form
    (:func:`qerror.compress.size.elias_fano_bits`).
    """

    DENSE = "dense"
    LIST = "list"
    ELIAS_FANO = "elias_fano"


_RAM_CODES = {RamFormat.LIST: 0, RamFormat.DENSE: 1, RamFormat.ELIAS_FANO: 2}


def _ram_layout(w: WiSARD, counts: bool) -> dict:
    """How a WiSARD's RAMs are stored: the :class:`RamFormat` layout of fewest bytes in the
    file (ties in the order DENSE, LIST, ELIAS_FANO)."""
    cls, keys, cnt = w.stored_entries(counts)
    group = cls * w.rams + (keys >> w.address_bits)
    lengths = torch.bincount(group, minlength=w.classes * w.rams)
    count_bits = index_bits(int(cnt.max()) + 1) if counts and cnt.numel() else 1
    length_bits = index_bits(int(lengths.max()) + 1)
    dense_bits = (w.classes * w.rams) << w.address_bits
    lengths_cost = w.classes * w.rams * length_bits
    counts_cost = cnt.numel() * count_bits if counts else 0
    ef_bits = elias_fano_bits(lengths.numpy(), w.address_bits)
    # in bytes, as the file pays them: each part is padded to a whole byte (_wisard_parts)
    lengths_bytes = packed_bytes(lengths_cost, 1)
    counts_bytes = packed_bytes(counts_cost, 1)
    costs = {RamFormat.DENSE: packed_bytes(dense_bits, count_bits if counts else 1),
             RamFormat.LIST: lengths_bytes + packed_bytes(cnt.numel(), w.address_bits)
             + counts_bytes,
             RamFormat.ELIAS_FANO: lengths_bytes + packed_bytes(ef_bits, 1) + counts_bytes}
    return {"cls": cls, "keys": keys, "cnt": cnt, "lengths": lengths, "count_bits": count_bits,
            "length_bits": length_bits, "format": min(costs, key=costs.get),
            "dense_bits": dense_bits, "ef_bits": ef_bits}


def _wisard_parts(m: WisardClassifier, counts: bool) -> tuple[list[SizePart], dict]:
    m.check_parts()
    w = m.wisard
    if not torch.equal(w.mapping.cpu(), w.regenerated_mapping()):
        raise ValueError("the WiSARD's mapping is not the one its seed and shuffle regenerate "
                         "(the mapping or the seed was changed after it was built): its file "
                         "stores the seed, not the wiring, and would read back as another "
                         "model; build the WiSARD with the seed it is to have")
    lay = _ram_layout(w, counts)
    header = _PREFIX.size + _THERMO.size + _WISARD.size
    parts = [SizePart("header", header, 8, "format, shapes, seed, bleaching threshold")]
    parts += m.thermometer.size_parts()
    parts.append(SizePart("wiring", 0, 1, "regenerated from the stored seed" if w.shuffle
                          else "identity"))
    entries = lay["cnt"].numel()
    what = "counts (bleaching state)" if counts else f"binary, count >= {w.bleach}"
    if lay["format"] is RamFormat.DENSE:
        parts.append(SizePart("RAM bitmaps" if not counts else "RAM counts", lay["dense_bits"],
                              lay["count_bits"] if counts else 1,
                              f"dense: {w.classes} x {w.rams} RAMs x 2^{w.address_bits}, "
                              f"{what}"))
    else:
        parts.append(SizePart("RAM lengths", w.classes * w.rams, lay["length_bits"],
                              "entries per (class, RAM)"))
        if lay["format"] is RamFormat.LIST:
            parts.append(SizePart("RAM addresses", entries, w.address_bits,
                                  f"sorted {w.address_bits}-bit addresses, {what}"))
        else:
            parts.append(SizePart("RAM addresses", lay["ef_bits"], 1,
                                  f"Elias-Fano sorted addresses ({entries}), {what}"))
        if counts:
            parts.append(SizePart("RAM counts", entries, lay["count_bits"],
                                  "bleaching state: a count per stored address"))
    return parts, lay


def _check_dwn_layers(m: DWN) -> None:
    """ValueError unless every layer is one a file describes: reading the previous layer's
    outputs (the thermometer's bits for the first), with the first layer's fan-in, a table
    of ``luts × 2^fan_in`` entries, and a random wiring the one the DWN's seed regenerates
    for it (stream ``i`` for layer ``i``)."""
    width, fan_in = m.thermometer.out_bits, m.layers[0].fan_in
    for i, layer in enumerate(m.layers):
        if not isinstance(layer, LUTLayer) or layer.in_features != width \
                or layer.fan_in != fan_in:
            what = (f"a {type(layer).__name__}" if not isinstance(layer, LUTLayer) else
                    f"reads {layer.in_features} inputs with fan-in {layer.fan_in}")
            raise ValueError(f"DWN layer {i} {what}: a file holds LUT layers that read the "
                             f"previous layer's {width} outputs with the first layer's fan-in "
                             f"{fan_in}")
        if tuple(layer.table.shape) != (layer.luts, 1 << layer.fan_in):
            raise ValueError(f"DWN layer {i}'s table has shape {tuple(layer.table.shape)}; "
                             f"its {layer.luts} LUTs of fan-in {layer.fan_in} are counted and "
                             f"stored as ({layer.luts}, {1 << layer.fan_in}): give the layer "
                             "a table of that shape (or build a LUTLayer of the shape wanted)")
        if layer.mapping is Mapping.RANDOM and not torch.equal(
                layer.index.cpu(), seeded_mapping(width, layer.luts * fan_in, m.seed, i)
                .reshape(layer.luts, fan_in)):
            raise ValueError(f"DWN layer {i}'s random wiring is not the one the DWN's seed "
                             f"{m.seed} regenerates for it (stream {i}): its file stores the "
                             "seed, not the wiring, and would read back as another model; "
                             f"build the layer with the DWN's seed and stream {i}, or give it "
                             "a FIXED mapping (stored index by index)")
        width = layer.luts


def _dwn_parts(m: DWN) -> list[SizePart]:
    _check_dwn_layers(m)
    header = _PREFIX.size + _THERMO.size + _DWN.size + _DWN_LAYER.size * len(m.layers)
    parts = [SizePart("header", header, 8, "format, shapes, seed, GroupSum tau")]
    parts += m.thermometer.size_parts()
    for i, layer in enumerate(m.layers):
        parts += layer.size_parts(f"layer {i}")
    return parts


def wnn_size(model: WisardClassifier | DWN, *, counts: bool = False) -> ModelSize:
    """Honest storage bytes of a weightless model, part by part.

    Parameters
    ----------
    model : WisardClassifier or DWN
    counts : bool
        WiSARD only: keep the RAM counts (the bleaching state, so the threshold can be
        chosen again) instead of the binary RAMs that inference at the chosen threshold
        needs.

    Returns
    -------
    ModelSize
        Parts: a header (format, shapes, seed, bleaching threshold or GroupSum tau), the
        thermometer thresholds at their dtype's width, the wiring (0 bytes when the
        mapping is regenerated from the stored seed, else one ``ceil(log2(inputs))``-bit
        index per LUT input), and the RAM or LUT contents. WiSARD RAMs are stored as dense
        bitmaps (``C·R·2^n`` bits), as sorted address lists (``n`` bits per stored address
        plus an entry count per RAM) or as those lists in Elias–Fano form, whichever is
        smallest (:class:`RamFormat`); DWN LUTs as one bit per entry (the sign of the
        trained entry).
    """
    counts = check_flag(counts, "counts")
    if isinstance(model, WisardClassifier):
        return ModelSize(tuple(_wisard_parts(model, counts)[0]))
    if isinstance(model, DWN):
        if counts:
            raise ValueError("counts applies to WiSARD only")
        return ModelSize(tuple(_dwn_parts(model)))
    raise TypeError(f"need a WisardClassifier or a DWN, got {type(model).__name__}")


def _threshold_bytes(t: Thermometer) -> bytes:
    arr = t.thresholds.contiguous().numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def save_wnn(model: WisardClassifier | DWN, path: Path | str, *, counts: bool = False) -> Path:
    """Write ``model`` to ``path`` in exactly ``wnn_size(model, counts=counts).total_bytes``
    bytes (atomically).

    Notes
    -----
    Layout: the header (``struct``, little-endian), then each part of :func:`wnn_size` in
    order, packed by :func:`qerror.compress.size.pack_bits`. A WiSARD's sparse RAMs are
    stored class by class, RAM by RAM, addresses ascending; a DWN's tables as the bits
    ``A > 0``, layer by layer, LUT-major.
    """
    counts = check_flag(counts, "counts")
    try:
        data, parts = _serialise(model, counts)
    except struct.error as exc:
        raise ValueError(f"cannot write this model in the WNN file format: a header field is "
                         f"beyond its width ({exc}); the format holds up to 2**32 - 1 "
                         "features, 65535 thermometer bits per feature, 65535 classes, a "
                         "WiSARD bleaching threshold up to 2**32 - 1, and up to 255 DWN "
                         "layers of up to 2**32 - 1 LUTs each") from exc
    expected = ModelSize(tuple(parts)).total_bytes
    if len(data) != expected:
        raise AssertionError(f"serialised {len(data)} bytes, counted {expected}")

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return atomic_write(path, write)


def _serialise(model: WisardClassifier | DWN, counts: bool) -> tuple[bytes, list[SizePart]]:
    """The bytes :func:`save_wnn` writes and the parts they were counted as."""
    chunks = []
    if isinstance(model, WisardClassifier):
        w, t = model.wisard, model.thermometer
        parts, lay = _wisard_parts(model, counts)
        chunks.append(_header_prefix(_KIND_WISARD) + _thermo_header(t) + _WISARD.pack(
            w.address_bits, int(w.shuffle), int(counts), _RAM_CODES[lay["format"]], w.classes,
            w.seed,
            w.bleach, lay["cnt"].numel(), lay["length_bits"], lay["count_bits"]))
        chunks.append(_threshold_bytes(t))
        addr = (lay["keys"] & ((1 << w.address_bits) - 1)).numpy()
        if lay["format"] is RamFormat.DENSE:
            flat = np.zeros(lay["dense_bits"], dtype=np.int64)
            pos = ((lay["cls"] * w.rams + (lay["keys"] >> w.address_bits)) << w.address_bits)
            flat[(pos + torch.as_tensor(addr)).numpy()] = lay["cnt"].numpy() if counts else 1
            chunks.append(pack_bits(flat, lay["count_bits"] if counts else 1))
        else:
            chunks.append(pack_bits(lay["lengths"].numpy(), lay["length_bits"]))
            if lay["format"] is RamFormat.LIST:
                chunks.append(pack_bits(addr, w.address_bits))
            else:
                chunks.append(pack_bits(elias_fano_encode(addr, lay["lengths"].numpy(),
                                                          w.address_bits), 1))
            if counts:
                chunks.append(pack_bits(lay["cnt"].numpy(), lay["count_bits"]))
    elif isinstance(model, DWN):
        if counts:
            raise ValueError("counts applies to WiSARD only")
        parts = _dwn_parts(model)
        header = _header_prefix(_KIND_DWN) + _thermo_header(model.thermometer) + _DWN.pack(
            model.classes, model.layers[0].fan_in, len(model.layers), model.group_sum.tau,
            model.seed)
        header += b"".join(_DWN_LAYER.pack(layer.luts, _MAPPING_CODES[layer.mapping])
                           for layer in model.layers)
        chunks += [header, _threshold_bytes(model.thermometer)]
        for layer in model.layers:
            chunks.append(pack_bits((layer.table.detach() > 0).numpy().astype(np.uint8), 1))
            if layer.mapping is not Mapping.RANDOM:
                chunks.append(pack_bits(layer.index.numpy(), index_bits(layer.in_features)))
    else:
        raise TypeError(f"need a WisardClassifier or a DWN, got {type(model).__name__}")
    return b"".join(chunks), parts


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ValueError("file is truncated")
        out = self.data[self.pos:self.pos + size]
        self.pos += size
        return out

    def unpack(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.take(fmt.size))

    def bits(self, count: int, bits: int) -> np.ndarray:
        return unpack_bits(self.take(packed_bytes(count, bits)), count, bits).astype(np.int64)

    def expect(self, size: int, what: str, path) -> None:
        """ValueError unless ``size`` more bytes follow: checked before a model of the
        header's shape is built, so that a header altered to describe a far larger model
        than the file holds is refused, not allocated (gigabytes, or a MemoryError)."""
        if self.pos + size > len(self.data):
            raise ValueError(f"{path} is truncated or its header was altered: the header "
                             f"describes {size} bytes of {what} after byte {self.pos}, the "
                             f"file holds {len(self.data) - self.pos}")


def _read_thermometer(r: _Reader, header: tuple) -> Thermometer:
    features, bits, pooled, code = header
    if code not in _DTYPES:
        raise ValueError(f"unknown threshold dtype code {code}")
    dtype = _DTYPES[code]
    rows = 1 if pooled else features
    itemsize = torch.empty(0, dtype=dtype).element_size()
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
    arr = np.frombuffer(r.take(rows * bits * itemsize), dtype=np_dtype).reshape(rows, bits)
    t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("=")))
    if not _ascending_thresholds(t):
        raise ValueError("its thermometer thresholds are not finite and ascending: not a file "
                         "save_wnn wrote, or a damaged one")
    return Thermometer(t, features)


def load_wnn(path: Path | str) -> WisardClassifier | DWN:
    """Read a file written by :func:`save_wnn`.

    Returns a model that predicts the same classes: a WiSARD with binary RAMs (counts 1,
    bleaching 1) or with its counts and threshold; a DWN with tables ``±1`` and a FIXED
    first layer when its mapping was learned. The file holds what inference needs, not how
    the model was trained: a DWN comes back with the harmonic EFD decay whatever it was
    trained with (set each layer's ``efd`` before training it further).

    Raises
    ------
    ValueError
        Not such a file, a version this code does not read, truncated or trailing data, or
        contents the format rules out (RAM entries other than the header's count, a RAM
        listing more addresses than it has, thresholds that are not finite and ascending,
        wiring beyond a layer's inputs, an unknown RAM format or threshold dtype, a header
        describing more RAM or LUT bytes than follow it: refused before a model of its
        shape is built, which such a header could make gigabytes large). The file
        has no checksum: a damaged byte elsewhere (a table bit, the seed) still loads, as
        another model.
    """
    r = _Reader(Path(path).read_bytes())
    magic, version, kind = r.unpack(_PREFIX)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"{path} is not a qerror WNN file of version {_VERSION}")
    thermo_header = r.unpack(_THERMO)
    if kind == _KIND_WISARD:
        (n, shuffle, counts, code, classes, seed, bleach, entries, length_bits,
         count_bits) = r.unpack(_WISARD)
        formats = {v: k for k, v in _RAM_CODES.items()}
        if code not in formats:
            raise ValueError(f"{path}: unknown RAM format code {code}")
        thermo = _read_thermometer(r, thermo_header)
        if n >= 1:  # (0 is refused by WiSARD)
            groups = classes * -(-thermo.out_bits // n)
            if formats[code] is RamFormat.DENSE:
                need = packed_bytes(groups << n, max(1, count_bits) if counts else 1)
            else:  # the entry counts; the addresses, checked as they are read, follow
                need = packed_bytes(groups, max(1, length_bits))
            r.expect(need, "RAMs", path)
        w = WiSARD(thermo.out_bits, n, classes, seed=seed, shuffle=bool(shuffle))
        groups = classes * w.rams
        if formats[code] is RamFormat.DENSE:
            flat = torch.from_numpy(r.bits(groups << n, count_bits if counts else 1))
            where = torch.nonzero(flat).squeeze(1)
            if where.numel() != entries:
                raise ValueError(f"{path}: its RAMs hold {where.numel()} entries, the header "
                                 f"says {entries}")
            cnt = flat[where]
            group, addr = where >> n, where & ((1 << n) - 1)
        else:
            lengths = torch.from_numpy(r.bits(groups, length_bits))
            if int(lengths.sum()) != entries:
                raise ValueError(f"{path}: RAM lengths sum to {int(lengths.sum())}, the header "
                                 f"says {entries} entries")
            if int(lengths.max()) > 1 << n:
                raise ValueError(f"{path}: a RAM lists {int(lengths.max())} addresses, more "
                                 f"than the 2**{n} = {1 << n} it has")
            if formats[code] is RamFormat.LIST:
                addr = torch.from_numpy(r.bits(entries, n))
            else:
                ef = elias_fano_bits(lengths.numpy(), n)
                addr = torch.from_numpy(elias_fano_decode(
                    np.unpackbits(np.frombuffer(r.take(packed_bytes(ef, 1)), np.uint8),
                                  count=ef, bitorder="little"), lengths.numpy(), n))
            cnt = (torch.from_numpy(r.bits(entries, count_bits)) if counts
                   else torch.ones(entries, dtype=torch.int64))
            group = torch.repeat_interleave(torch.arange(groups), lengths)
        cls, ram = group // w.rams, group % w.rams
        key = (ram << n) | addr
        w.keys, slot = torch.unique(key, return_inverse=True)
        w.counts = torch.zeros(w.keys.numel(), classes, dtype=torch.int32)
        w.counts[slot, cls] = cnt.to(torch.int32)
        w.bleach = bleach if counts else 1
        model = WisardClassifier(thermo, w)
    elif kind == _KIND_DWN:
        classes, fan_in, layers, tau, seed = r.unpack(_DWN)
        specs = [r.unpack(_DWN_LAYER) for _ in range(layers)]
        thermo = _read_thermometer(r, thermo_header)
        widths = [thermo.out_bits] + [s[0] for s in specs]
        r.expect(sum(packed_bytes(luts << fan_in, 1) + (
            packed_bytes(luts * fan_in, index_bits(max(1, width)))
            if code != _MAPPING_CODES[Mapping.RANDOM] else 0)
            for width, (luts, code) in zip(widths, specs)), "LUT tables and wiring", path)
        model = DWN(thermo, [s[0] for s in specs], classes, fan_in=fan_in, tau=tau, seed=seed,
                    mapping=Mapping.RANDOM)
        for i, layer in enumerate(model.layers):
            table = torch.from_numpy(r.bits(layer.luts << fan_in, 1)).reshape(layer.luts, -1)
            if specs[i][1] != _MAPPING_CODES[Mapping.RANDOM]:
                index = torch.from_numpy(r.bits(layer.luts * fan_in,
                                                index_bits(layer.in_features)))
                if int(index.max()) >= layer.in_features:
                    raise ValueError(f"{path}: layer {i} wires an input beyond its "
                                     f"{layer.in_features}")
                layer = LUTLayer(layer.in_features, layer.luts, fan_in, mapping=Mapping.FIXED,
                                 index=index.reshape(layer.luts, fan_in), seed=seed, stream=i)
                model.layers[i] = layer
            with torch.no_grad():
                layer.table.copy_(table.to(torch.float32) * 2 - 1)
    else:
        raise ValueError(f"unknown model kind {kind} in {path}")
    if r.pos != len(r.data):
        raise ValueError(f"{path} has {len(r.data) - r.pos} trailing bytes")
    return model
