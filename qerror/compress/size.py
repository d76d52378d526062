"""Honest byte counting: what an array costs to store, from its element count and format.

Sizes come from element counts and bits per element, never from a file on disk (which
adds headers and compression): the comparisons of storage formats are then exact and
independent of any container.
"""

from __future__ import annotations

import numpy as np
import torch

from qerror._enums import Choice


class StorageFormat(Choice):
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
