"""Honest byte counting: what an array costs to store, from its element count and format.

Sizes come from element counts and bits per element, never from a file on disk (which
adds headers and compression): the comparisons of storage formats are then exact and
independent of any container.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

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



class SparseFormat(Choice):
    """How the zeros of a weight tensor are (not) stored; see :func:`tensor_bytes`.

    ``DENSE``
        Every element.
    ``CSR``
        Compressed sparse rows over the (rows, columns) matrix of the tensor (rows: the
        first dimension, output channels; columns: the rest flattened): row pointers,
        column indices, the nonzero values.
    ``BITMASK``
        One bit per element saying whether it is stored, then the nonzero values.
    ``TWO_FOUR``
        NVIDIA's 2:4 semi-structured format: in every group of 4 along the input dimension
        2 values are stored, each with a 2-bit position (4 bits of metadata per group).
    """

    DENSE = "dense"
    CSR = "csr"
    BITMASK = "bitmask"
    TWO_FOUR = "2:4"


_UINTS = tuple(np.dtype(t) for t in ("uint8", "uint16", "uint32", "uint64"))


def index_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``max_value`` (≥ 0): what a CSR row
    pointer (max: the nonzero count) or column index (max: columns − 1) is stored as."""
    max_value = int(max_value)
    if max_value < 0:
        raise ValueError(f"an index is >= 0, got a maximum of {max_value}")
    for dt in _UINTS:
        if max_value <= np.iinfo(dt).max:
            return dt
    raise ValueError(f"{max_value} exceeds uint64")


_INTEGER_FORMATS = (StorageFormat.INT8, StorageFormat.UINT8, StorageFormat.INT4_PACKED)


@dataclass(frozen=True)
class TensorBytes:
    """The stored bytes of one tensor, by component; :attr:`total` is their sum.

    Attributes
    ----------
    values : int
        The stored elements (all, the nonzeros, or half for 2:4).
    row_pointers, indices : int
        CSR's row pointers and column indices.
    mask : int
        The bitmask, or the 2:4 metadata.
    scales, zero_points : int
        Quantization parameters of integer values: float32 scales, zero points in the
        codes' own format.
    """

    values: int
    row_pointers: int = 0
    indices: int = 0
    mask: int = 0
    scales: int = 0
    zero_points: int = 0

    @property
    def total(self) -> int:
        return (self.values + self.row_pointers + self.indices + self.mask + self.scales
                + self.zero_points)


def tensor_bytes(shape: Iterable[int], nnz: int | None = None,
                 sparse: SparseFormat | str = SparseFormat.DENSE,
                 values: StorageFormat | str = StorageFormat.FLOAT32, *,
                 scales: int | None = None) -> TensorBytes:
    """Honest bytes of a tensor of ``shape`` with ``nnz`` nonzeros in a sparse format.

    Parameters
    ----------
    shape : iterable of int
        The tensor's shape, (out, in) or (out, in, kh, kw) for weights.
    nnz : int, optional
        Nonzero count (default: every element). 2:4 stores half the elements whatever
        ``nnz`` is, so it needs ``nnz ≤ numel / 2``.
    sparse : SparseFormat or str
    values : StorageFormat or str
        Format of the stored values.
    scales : int, optional
        Quantization scales of an integer ``values`` format: default one per output channel
        (``shape[0]``), 1 for per-tensor. Must be 0 (the default) for float formats.

    Returns
    -------
    TensorBytes

    Notes
    -----
    With ``R`` rows, ``C = numel / R`` columns and ``n = numel``:

    * dense: ``bytes(n)``;
    * CSR: ``(R + 1)·w(n) + nnz·w(C − 1) + bytes(nnz)``, ``w(m)`` the byte width of
      :func:`index_dtype` (m): real index widths, not a fixed int64. Row pointers are sized
      for any nonzero count up to ``n`` (not for this ``nnz``) so that a reader knows their
      width from the shape alone; it costs at most ``R + 1`` extra bytes per doubling;
    * bitmask: ``⌈n / 8⌉ + bytes(nnz)``;
    * 2:4: ``bytes(n / 2) + ⌈(n / 2)·2 / 8⌉`` (the metadata is 4 bits per group of 4, as
      NVIDIA's sparse tensor cores store it);
    * integer values add ``scales`` float32 scales and ``scales`` zero points in the values'
      format (the zero point has the type of the codes, as in ONNX's QuantizeLinear).
    """
    shape = tuple(int(d) for d in shape)
    if not shape or min(shape) < 0:
        raise ValueError(f"need a shape of one or more non-negative sizes, got {shape}")
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    n = int(np.prod(shape, dtype=object))
    nnz = n if nnz is None else int(nnz)
    if not 0 <= nnz <= n:
        raise ValueError(f"nnz must be in [0, {n}] for shape {shape}, got {nnz}")
    if values in _INTEGER_FORMATS:
        scales = shape[0] if scales is None else int(scales)
        if scales < 1:
            raise ValueError(f"integer values need >= 1 scale, got {scales}")
    elif scales:
        raise ValueError(f"{values.value} values carry no quantization scales, got {scales}")
    else:
        scales = 0
    quant = {"scales": storage_bytes(StorageFormat.FLOAT32, scales),
             "zero_points": storage_bytes(values, scales)}
    if sparse is SparseFormat.DENSE:
        return TensorBytes(storage_bytes(values, n), **quant)
    if sparse is SparseFormat.BITMASK:
        return TensorBytes(storage_bytes(values, nnz), mask=packed_bytes(n, 1), **quant)
    if sparse is SparseFormat.CSR:
        rows = shape[0]
        cols = n // rows if rows else 0
        return TensorBytes(storage_bytes(values, nnz),
                           row_pointers=(rows + 1) * index_dtype(n).itemsize,
                           indices=nnz * index_dtype(max(cols - 1, 0)).itemsize, **quant)
    if len(shape) < 2 or shape[1] % 4:
        raise ValueError(f"2:4 needs an input dimension (shape[1]) that is a multiple of 4, "
                         f"got shape {shape}")
    if nnz > n // 2:
        raise ValueError(f"2:4 keeps at most half the elements ({n // 2}), got nnz={nnz}")
    return TensorBytes(storage_bytes(values, n // 2), mask=packed_bytes(n // 2, 2), **quant)


_ENCODABLE = (StorageFormat.FLOAT32, StorageFormat.FLOAT16, StorageFormat.INT8)


def _groups(w: np.ndarray) -> np.ndarray:
    # Groups of 4 along the input dimension: a convolution's input channels at a fixed
    # (output, kernel row, kernel column), as NVIDIA's layout and qerror.compress.sparse.
    return (w.transpose(0, 2, 3, 1) if w.ndim == 4 else w).reshape(-1, 4)


def _ungroup(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 4:
        o, i, kh, kw = shape
        return g.reshape(o, kh, kw, i).transpose(0, 3, 1, 2)
    return g.reshape(shape)


def encode_tensor(t: torch.Tensor | np.ndarray, sparse: SparseFormat | str = SparseFormat.DENSE,
                  values: StorageFormat | str = StorageFormat.FLOAT32) -> list[np.ndarray]:
    """The arrays that store ``t`` in a format, in file order; their bytes are exactly
    ``tensor_bytes(t.shape, nnz, sparse, values).total``.

    Order: CSR row pointers and column indices, or the bitmask, or the 2:4 metadata; then
    the values; then (INT8) the float32 scales and the int8 zero points. INT8 is symmetric
    per output channel (scale ``max|w| / 127``, zero point 0, round half to even), so a
    zero weight stays an exact zero. The bitmask and the 2:4 metadata (positions 0–3 of
    the two stored values of a group, 2 bits each) are packed least significant bit first.

    Raises
    ------
    ValueError
        ``values`` is not float32, float16 or int8; or a 2:4 group has more than 2 nonzeros.
    """
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    if values not in _ENCODABLE:
        raise ValueError(f"encoding supports {[f.value for f in _ENCODABLE]} values, got "
                         f"{values.value} (tensor_bytes counts every format)")
    w = (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
    w = w.astype(np.float32).reshape(w.shape)
    shape, rows = w.shape, w.shape[0]
    mat = w.reshape(rows, -1)
    quant: list[np.ndarray] = []
    if values is StorageFormat.INT8:
        scale = (np.abs(mat).max(axis=1) / np.float32(127)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        codes = np.clip(np.round(mat / safe[:, None]), -127, 127).astype(np.int8)
        mat, quant = codes, [scale, np.zeros(rows, np.int8)]
    else:
        mat = mat.astype(values.value)
    if sparse is SparseFormat.DENSE:
        return [mat.reshape(-1), *quant]
    if sparse is SparseFormat.BITMASK:
        keep = mat != 0
        return [np.packbits(keep.reshape(-1), bitorder="little"), mat[keep], *quant]
    if sparse is SparseFormat.CSR:
        keep = mat != 0
        ptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
        cols = np.nonzero(keep)[1]
        return [ptr.astype(index_dtype(w.size)),
                cols.astype(index_dtype(max(mat.shape[1] - 1, 0))), mat[keep], *quant]
    tensor_bytes(shape, 0, sparse, values)  # checks the shape admits 2:4
    g = _groups(mat.reshape(shape))
    nonzero = g != 0
    if (nonzero.sum(axis=1) > 2).any():
        raise ValueError("a group of 4 has more than 2 nonzeros: the tensor is not 2:4 sparse")
    # Kept positions: the nonzeros, completed with the first zero positions, in order.
    pos = np.sort(np.argsort(~nonzero, axis=1, kind="stable")[:, :2], axis=1)
    meta = np.zeros(-(-pos.size // 4) * 4, np.uint8)
    meta[:pos.size] = pos.reshape(-1)
    meta = meta.reshape(-1, 4)
    packed = meta[:, 0] | meta[:, 1] << 2 | meta[:, 2] << 4 | meta[:, 3] << 6
    return [packed.astype(np.uint8), np.take_along_axis(g, pos, axis=1).reshape(-1), *quant]


def decode_tensor(buffer: bytes | memoryview, shape: Iterable[int],
                  sparse: SparseFormat | str = SparseFormat.DENSE,
                  values: StorageFormat | str = StorageFormat.FLOAT32) -> tuple[np.ndarray, int]:
    """Inverse of :func:`encode_tensor` from the front of ``buffer``.

    Returns
    -------
    (numpy.ndarray, int)
        The float32 tensor of ``shape`` (dequantized for INT8) and the bytes consumed.
    """
    shape = tuple(int(d) for d in shape)
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    vdt = np.dtype(values.value)
    n, rows = int(np.prod(shape)), shape[0]
    cols = n // rows if rows else 0
    at = 0

    def take(dtype, count):
        nonlocal at
        arr = np.frombuffer(buffer, dtype=dtype, count=count, offset=at)
        at += arr.nbytes
        return arr

    if sparse is SparseFormat.DENSE:
        mat = take(vdt, n).reshape(rows, cols)
    elif sparse is SparseFormat.BITMASK:
        keep = np.unpackbits(take(np.uint8, packed_bytes(n, 1)), count=n,
                             bitorder="little").astype(bool).reshape(rows, cols)
        mat = np.zeros((rows, cols), vdt)
        mat[keep] = take(vdt, int(keep.sum()))
    elif sparse is SparseFormat.CSR:
        ptr = take(index_dtype(n), rows + 1).astype(np.int64)
        nnz = int(ptr[-1])
        idx = take(index_dtype(max(cols - 1, 0)), nnz).astype(np.int64)
        mat = np.zeros((rows, cols), vdt)
        mat[np.repeat(np.arange(rows), np.diff(ptr)), idx] = take(vdt, nnz)
    else:
        half = n // 2
        packed = take(np.uint8, packed_bytes(half, 2))
        pos = ((packed[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)[:half]
        g = np.zeros((n // 4, 4), vdt)
        np.put_along_axis(g, pos.reshape(-1, 2).astype(np.int64), take(vdt, half).reshape(-1, 2),
                          axis=1)
        grouped = _ungroup(g, shape)
        mat = np.ascontiguousarray(grouped).reshape(rows, cols)
    out = mat.astype(np.float32)
    if values is StorageFormat.INT8:
        scale = take(np.float32, rows)
        zero = take(np.int8, rows).astype(np.float32)
        out = (out - zero[:, None]) * scale[:, None]
    return out.reshape(shape), at


@dataclass(frozen=True)
class ModelBytes:
    """A model's stored bytes, one :class:`TensorBytes` per state-dict entry, in order;
    ``compressed`` names the entries stored in the requested format (the others are dense
    float32)."""

    tensors: tuple[tuple[str, TensorBytes], ...]
    compressed: frozenset[str] = frozenset()

    @property
    def total(self) -> int:
        return sum(b.total for _, b in self.tensors)

    @property
    def compressed_bytes(self) -> int:
        """Bytes of the entries in the requested format; the rest (biases, BatchNorm, layers
        kept dense) is ``total - compressed_bytes``."""
        return sum(b.total for name, b in self.tensors if name in self.compressed)


def _layout(model: nn.Module, sparse: SparseFormat, values: StorageFormat,
            keep_dense: Iterable[str] | None):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    if keep_dense is None:
        first = next((n for n, m in layers.items() if isinstance(m, nn.Conv2d)), None)
        dense = {first} - {None}
    else:
        dense = set(keep_dense)
    unknown = sorted(dense - set(layers))
    if unknown:
        raise ValueError(f"keep_dense names {unknown}, which are not Conv2d or Linear layers")
    compressed = {f"{n}.weight" for n in layers if n not in dense}
    out = []
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue  # a training counter, not needed for inference
        if name in compressed:
            out.append((name, t, sparse, values, True))
        else:
            out.append((name, t, SparseFormat.DENSE, StorageFormat.FLOAT32, False))
    return out


def model_bytes(model: nn.Module, sparse: SparseFormat | str = SparseFormat.DENSE,
                values: StorageFormat | str = StorageFormat.FLOAT32, *,
                keep_dense: Iterable[str] | None = None) -> ModelBytes:
    """Honest bytes of a model whose Conv2d and Linear weights are stored in a format.

    Parameters
    ----------
    model : torch.nn.Module
    sparse : SparseFormat or str
        Format of the weights of every ``Conv2d`` and ``Linear`` not in ``keep_dense``.
    values : StorageFormat or str
        Format of those weights' values (INT8: per output channel, with scales and zero
        points).
    keep_dense : iterable of str, optional
        Layers stored dense float32; default the first convolution, as
        :func:`qerror.compress.sparse.prune_global` leaves it dense.

    Returns
    -------
    ModelBytes
        Every state-dict entry counted: the weights as asked; biases, dense weights and
        BatchNorm's weight, bias, running mean and variance as float32. BatchNorm's
        ``num_batches_tracked`` (a training counter) is not stored. :func:`write_model`
        writes exactly :attr:`ModelBytes.total` bytes.
    """
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    rows, compressed = [], set()
    for name, t, sp, v, chosen in _layout(model, sparse, values, keep_dense):
        rows.append((name, tensor_bytes(t.shape or (1,), int((t != 0).sum()), sp, v)))
        if chosen:
            compressed.add(name)
    return ModelBytes(tuple(rows), frozenset(compressed))


def write_model(model: nn.Module, path: str | Path,
                sparse: SparseFormat | str = SparseFormat.DENSE,
                values: StorageFormat | str = StorageFormat.FLOAT32, *,
                keep_dense: Iterable[str] | None = None) -> int:
    """Serialise ``model`` as :func:`model_bytes` counts it: the :func:`encode_tensor`
    arrays of each state-dict entry in order, raw, with no header.

    The architecture (the module's code and shapes) is not in the file, as it is not in a
    state dict: :func:`read_model` decodes the file into a model of the same architecture.

    Returns
    -------
    int
        Bytes written; equal to ``model_bytes(...).total`` and to the file's size.
    """
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    written = 0
    with open(path, "wb") as f:
        for _, t, sp, v, _ in _layout(model, sparse, values, keep_dense):
            for arr in encode_tensor(t.reshape(t.shape or (1,)), sp, v):
                written += f.write(np.ascontiguousarray(arr).tobytes())
    return written


def read_model(model: nn.Module, path: str | Path,
               sparse: SparseFormat | str = SparseFormat.DENSE,
               values: StorageFormat | str = StorageFormat.FLOAT32, *,
               keep_dense: Iterable[str] | None = None) -> nn.Module:
    """Load a :func:`write_model` file into ``model`` (same architecture, same arguments),
    in place; INT8 weights come back dequantized.

    Raises
    ------
    ValueError
        The file is shorter or longer than the layout it should hold.
    """
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    data = memoryview(Path(path).read_bytes())
    at, state = 0, {}
    try:
        for name, t, sp, v, _ in _layout(model, sparse, values, keep_dense):
            arr, used = decode_tensor(data[at:], t.shape or (1,), sp, v)
            state[name] = torch.from_numpy(arr.copy()).reshape(t.shape).to(t.dtype)
            at += used
    except ValueError as exc:
        raise ValueError(f"{path} is shorter than the layout of this model in {sparse.value} "
                         f"{values.value}: {exc}") from exc
    if at != len(data):
        raise ValueError(f"{path} holds {len(data) - at} bytes past the layout of this model "
                         f"in {sparse.value} {values.value}: another model or format")
    model.load_state_dict(state, strict=False)
    return model



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
