"""Honest byte counting: what an array costs to store, from its element count and format.

Sizes come from element counts and bits per element, never from a file on disk (which
adds headers and compression): the comparisons of storage formats are then exact and
independent of any container. A model is counted as a :class:`ModelSize`, a sum of
:class:`SizePart` (RAM and LUT bits, wiring indices, thermometer thresholds, a header of
metadata); :func:`pack_bits` writes a part in exactly the bytes it is counted at, so a
serialised file can be checked against the count byte for byte.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from qerror._enums import parse_enum


class StorageFormat(enum.Enum):
    """How the elements of an array are stored.

    The float and byte formats hold one element per numpy dtype item; INT4_PACKED holds
    two 4-bit codes per byte.
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    UINT8 = "uint8"
    INT8 = "int8"
    INT4_PACKED = "int4_packed"

    @property
    def bits(self) -> int:
        """Bits per element (element sizes from numpy's dtypes)."""
        if self is StorageFormat.INT4_PACKED:
            return 4
        return 8 * np.dtype(self.value).itemsize

    @property
    def label(self) -> str:
        """The name in words, for tables: ``"int4 packed"``, ``"float32"``."""
        return self.value.replace("_", " ")

    @classmethod
    def parse(cls, value: StorageFormat | str) -> StorageFormat:
        """Accept a format or its name (``"int8"``, ``"INT4_PACKED"``)."""
        return parse_enum(cls, value, "storage format")


def packed_bytes(elements: int, bits: int) -> int:
    """Bytes of ``elements`` values of ``bits`` bits each, packed with no padding but the
    last byte's.

    Parameters
    ----------
    elements : int
        Number of values, ≥ 0.
    bits : int
        Bits per value, ≥ 1 (e.g. ``QuantSpec.bits``).

    Returns
    -------
    int
        ``ceil(elements · bits / 8)``, in exact integer arithmetic.
    """
    elements, bits = int(elements), int(bits)
    if elements < 0 or bits < 1:
        raise ValueError(f"need elements >= 0 and bits >= 1, got {elements} and {bits}")
    return -(-elements * bits // 8)


def storage_bytes(fmt: StorageFormat | str, elements: int) -> int:
    """Bytes of ``elements`` values stored in format ``fmt``.

    Parameters
    ----------
    fmt : StorageFormat or str
        The format (or its name).
    elements : int
        Number of values, ≥ 0: for N arrays of shape S, ``N · prod(S)``.

    Returns
    -------
    int
        ``ceil(elements · fmt.bits / 8)``.

    Examples
    --------
    >>> storage_bytes("int4_packed", 28 * 28)
    392
    """
    return packed_bytes(elements, StorageFormat.parse(fmt).bits)


def held_bytes(x: np.ndarray | torch.Tensor) -> int:
    """Bytes the elements of an array or tensor occupy in memory now.

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        Any shape and dtype.

    Returns
    -------
    int
        Number of elements times the element size (a view counts its own elements,
        not its base's).
    """
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, np.ndarray):
        return x.nbytes
    raise TypeError(f"need a numpy array or a torch tensor, got {type(x).__name__}")


def index_bits(choices: int) -> int:
    """Bits of one stored index that names one of ``choices`` items (at least 1).

    Parameters
    ----------
    choices : int
        Number of distinct values the index can take, ≥ 1 (e.g. a layer's input width for
        a wiring index, ``max + 1`` for a count).

    Returns
    -------
    int
        ``max(1, ceil(log2(choices)))``, in exact integer arithmetic.
    """
    choices = int(choices)
    if choices < 1:
        raise ValueError(f"need at least one choice, got {choices}")
    return max(1, (choices - 1).bit_length())


@dataclass(frozen=True)
class SizePart:
    """One stored component of a model: ``elements`` values of ``bits`` bits each, packed.

    Attributes
    ----------
    name : str
        What it is (``"ram addresses"``, ``"thresholds"``, ``"wiring layer 0"``).
    elements : int
        Number of values stored (0 for a part that costs nothing, e.g. a wiring that is
        regenerated from a stored seed).
    bits : int
        Bits per value, ≥ 1.
    note : str
        Why it costs what it costs, for tables.
    """

    name: str
    elements: int
    bits: int
    note: str = ""

    def __post_init__(self):
        packed_bytes(self.elements, self.bits)  # validates both

    @property
    def bytes(self) -> int:
        """``packed_bytes(elements, bits)``: each part starts on a byte boundary."""
        return packed_bytes(self.elements, self.bits)


@dataclass(frozen=True)
class ModelSize:
    """A model's honest storage size as the sum of its parts.

    The count comes from shapes and bit widths alone; a serialiser that writes each part
    packed (:func:`pack_bits`) after a header that is itself a part writes a file of
    exactly :attr:`total_bytes` bytes.
    """

    parts: tuple[SizePart, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of the parts' bytes."""
        return sum(p.bytes for p in self.parts)

    def part(self, name: str) -> SizePart:
        """The part called ``name``."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no part {name!r}; parts: {[p.name for p in self.parts]}")

    def rows(self) -> list[dict]:
        """One dict per part (name, elements, bits, bytes, note), for a tidy table."""
        return [{"name": p.name, "elements": p.elements, "bits": p.bits, "bytes": p.bytes,
                 "note": p.note} for p in self.parts]


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers into ``bits`` bits each, least significant bit first.

    Parameters
    ----------
    values : numpy.ndarray
        Integers in ``[0, 2**bits)``, any shape (flattened in C order).
    bits : int
        Bits per value, 1 to 64.

    Returns
    -------
    bytes
        ``packed_bytes(values.size, bits)`` bytes; value ``i`` occupies bits
        ``[i·bits, (i+1)·bits)`` of the little-endian bit stream, the last byte zero-padded.
    """
    bits = int(bits)
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    v = np.asarray(values)
    if v.dtype.kind not in "iub":
        raise TypeError(f"values must be integers, got dtype {v.dtype}")
    v = v.reshape(-1)
    if v.size and (int(v.min()) < 0 or (bits < 64 and int(v.max()) >> bits)):
        raise ValueError(f"values must lie in [0, 2**{bits}), got [{int(v.min())}, "
                         f"{int(v.max())}]")
    v = v.astype(np.uint64)
    shifts = np.arange(bits, dtype=np.uint64)
    matrix = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(matrix.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buffer: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values of ``bits`` bits as ``uint64``."""
    bits, count = int(bits), int(count)
    if len(buffer) != packed_bytes(count, bits):
        raise ValueError(f"{count} values of {bits} bits need {packed_bytes(count, bits)} "
                         f"bytes, got {len(buffer)}")
    flat = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), count=count * bits,
                         bitorder="little")
    weights = np.left_shift(np.uint64(1), np.arange(bits, dtype=np.uint64))
    return (flat.reshape(count, bits).astype(np.uint64) * weights).sum(axis=1,
                                                                        dtype=np.uint64)


def _floor_log2(q: np.ndarray) -> np.ndarray:
    """``floor(log2(q))`` of positive int64 values, exactly (no float rounding)."""
    out = np.zeros(q.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        big = (q >> shift) > 0
        out += np.where(big, shift, 0)
        q = np.where(big, q >> shift, q)
    return out


def _elias_fano_layout(lengths: np.ndarray, universe_bits: int):
    m = np.asarray(lengths, dtype=np.int64)
    if m.ndim != 1 or (m.size and m.min() < 0) or (m > 1 << universe_bits).any():
        raise ValueError(f"lengths must be counts in [0, 2**{universe_bits}]")
    low = np.where(m > 0, _floor_log2((1 << universe_bits) // np.maximum(m, 1)), 0)
    size = np.where(m > 0, m * low + m + ((1 << universe_bits) >> low), 0)
    start = np.cumsum(size) - size
    first = np.cumsum(m) - m
    return m, low, size, start, first


def elias_fano_bits(lengths, universe_bits: int) -> int:
    """Bits of sorted sets of distinct ``universe_bits``-bit values in Elias–Fano form.

    Parameters
    ----------
    lengths : array of int
        Number of values ``m`` in each set (the lengths themselves are stored elsewhere).
    universe_bits : int
        Every value lies in ``[0, 2^u)``, ``u = universe_bits``.

    Returns
    -------
    int
        ``Σ (m·L + m + 2^u >> L)`` over the non-empty sets, ``L = floor(log2(2^u / m))``.

    Notes
    -----
    Each value is split into its ``L`` low bits, stored as they are, and its high part
    ``h = v >> L``, stored in unary: the ``i``-th value (0-based, ascending) sets bit
    ``h + i`` of an array of ``m + 2^u >> L`` bits. That spends about ``2 + log2(2^u/m)``
    bits per value instead of ``u``, which pays when a set holds many of its possible values.

    References
    ----------
    P. Elias, "Efficient storage and retrieval by content and address of static files",
    J. ACM 21(2), 1974. R. M. Fano, "On the number of bits required to implement an
    associative memory", MIT Project MAC memo 61, 1971.
    """
    _, _, size, _, _ = _elias_fano_layout(np.asarray(lengths), int(universe_bits))
    return int(size.sum())


def elias_fano_encode(values, lengths, universe_bits: int) -> np.ndarray:
    """Encode consecutive sorted sets (``values`` grouped by ``lengths``) as a 0/1 uint8
    array of :func:`elias_fano_bits` bits: set by set, low bits (value by value, least
    significant first) then the unary high array."""
    m, low, size, start, first = _elias_fano_layout(np.asarray(lengths), int(universe_bits))
    v = np.asarray(values, dtype=np.int64)
    if v.shape != (int(m.sum()),):
        raise ValueError(f"need {int(m.sum())} values, got shape {v.shape}")
    group = np.repeat(np.arange(m.size), m)
    rank = np.arange(v.size) - first[group]
    lw = low[group]
    out = np.zeros(int(size.sum()), dtype=np.uint8)
    for j in range(int(low.max(initial=0))):
        sel = (j < lw) & (((v >> j) & 1) == 1)
        out[(start[group] + rank * lw + j)[sel]] = 1
    out[start[group] + m[group] * lw + (v >> lw) + rank] = 1
    return out


def elias_fano_decode(bits: np.ndarray, lengths, universe_bits: int) -> np.ndarray:
    """Inverse of :func:`elias_fano_encode`: the values, int64, set after set."""
    m, low, size, start, first = _elias_fano_layout(np.asarray(lengths), int(universe_bits))
    bits = np.asarray(bits)
    if bits.shape != (int(size.sum()),):
        raise ValueError(f"need {int(size.sum())} bits, got shape {bits.shape}")
    group = np.repeat(np.arange(m.size), m)
    rank = np.arange(group.size) - first[group]
    lw = low[group]
    v = np.zeros(group.size, dtype=np.int64)
    for j in range(int(low.max(initial=0))):
        sel = j < lw
        v[sel] |= bits[(start[group] + rank * lw + j)[sel]].astype(np.int64) << j
    upper_start = start + m * low
    ones = np.flatnonzero(bits)
    owner = np.searchsorted(start, ones, side="right") - 1
    upper = ones[ones >= upper_start[owner]]
    if upper.size != group.size:
        raise ValueError("corrupt Elias-Fano stream: wrong number of high bits")
    return v | ((upper - upper_start[group] - rank) << lw)
