"""Honest byte counting: what an array costs to store, from its element count and format.

Sizes come from element counts and bits per element, never from a file on disk (which
adds headers and compression): the comparisons of storage formats are then exact and
independent of any container. A model is counted as a :class:`ModelSize`, a sum of
:class:`SizePart` (RAM and LUT bits, wiring indices, thermometer thresholds, a header of
metadata); :func:`pack_bits` writes a part in exactly the bytes it is counted at, so a
serialised file can be checked against the count byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qerror._checks import MAKE_WEIGHT_PLAIN, check_count
from qerror._enums import Choice
from qerror.files import atomic_write


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
    max_value = check_count(max_value, "max_value")
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
        (``shape[0]``), 1 for per-tensor. None (the default) or 0 for float formats.

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
      width from the shape alone; that costs ``(R + 1)`` times the difference of the two
      widths in bytes where ``nnz`` would fit a narrower one (a (2048, 512, 1, 1) weight at
      95 % sparsity: uint32 pointers where uint16 would do, 4,098 bytes, 1.3 % of its float32
      CSR bytes);
    * bitmask: ``⌈n / 8⌉ + bytes(nnz)``;
    * 2:4: ``bytes(n / 2) + ⌈(n / 2)·2 / 8⌉`` (the metadata is 4 bits per group of 4, as
      NVIDIA's sparse tensor cores store it);
    * integer values add ``scales`` float32 scales and ``scales`` zero points in the values'
      format (the zero point has the type of the codes, as in ONNX's QuantizeLinear).
    """
    shape = tuple(shape)
    if not shape:
        raise ValueError("need a shape of one or more non-negative sizes, got ()")
    shape = tuple(check_count(d, "each size of the shape") for d in shape)
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    n = int(np.prod(shape, dtype=object))
    nnz = n if nnz is None else check_count(nnz, "nnz")
    if nnz > n:  # (check_count refused a negative one)
        raise ValueError(f"nnz must be in [0, {n}] for shape {shape}, got {nnz}")
    if values in _INTEGER_FORMATS:
        scales = shape[0] if scales is None else check_count(scales, "scales", 1)
    elif scales is not None and check_count(scales, "scales"):
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
    if len(shape) not in (2, 4) or shape[1] % 4:
        raise ValueError(f"2:4 needs a 2-D or 4-D weight whose input dimension (shape[1]) is a "
                         f"multiple of 4, got shape {shape}")
    if nnz > n // 2:
        raise ValueError(f"2:4 keeps at most half the elements ({n // 2}), got nnz={nnz}")
    return TensorBytes(storage_bytes(values, n // 2), mask=packed_bytes(n // 2, 2), **quant)


_ENCODABLE = (StorageFormat.FLOAT32, StorageFormat.FLOAT16, StorageFormat.INT8)


def _int8_codes(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INT8 codes of a (rows, columns) float32 matrix, symmetric per row, and the scales."""
    scale = (np.abs(mat).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    return np.clip(np.round(mat / safe[:, None]), -127, 127).astype(np.int8), scale


def _storable(t: torch.Tensor | np.ndarray, sparse: SparseFormat, values: StorageFormat,
              name: str = "the tensor") -> np.ndarray:
    """``t`` as the float32 array the formats store, after the checks that a format can hold
    it: one or more dimensions, some elements, finite values within float32's range
    (float16's for float16 values), integers that float32 holds exactly (a state dict's
    integer buffers are stored as float32), and at most 2 nonzeros in each group of 4 for
    2:4. ValueError naming ``name`` otherwise."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        w = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    else:
        w = np.asarray(t)
    if w.ndim == 0:
        raise ValueError(f"{name} is 0-dimensional (a scalar): the formats store arrays of one "
                         "or more dimensions; pass it as shape (1,), t.reshape(1), as "
                         "model_bytes and write_model store a scalar entry")
    if w.size == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(w.shape)}): nothing to store; "
                         "remove the empty layer")
    if w.dtype.kind in "iub":
        as32 = w.astype(np.float32)
        if not np.array_equal(as32.astype(w.dtype), w):
            raise ValueError(f"{name} holds integers that float32 cannot hold exactly (largest "
                             f"|value| {np.abs(w).max()}); the format stores every entry "
                             "that is not a weight as float32")
        w = as32
    elif w.dtype.kind != "f":
        raise ValueError(f"{name} has dtype {w.dtype}: only real numbers can be stored")
    if not np.isfinite(w).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(w)).sum())} NaN or infinite values: "
                         "a broken model cannot be stored (its INT8 scale, for one, would be "
                         "undefined)")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range: refused below
        w32 = w.astype(np.float32).reshape(w.shape)
    if not np.isfinite(w32).all():
        raise ValueError(f"{name} holds values beyond float32's range (largest |value| "
                         f"{np.abs(w).max():.6g} > {float(np.finfo(np.float32).max):.6g}): "
                         "the formats store a tensor from its float32 values (INT8's scales "
                         "are float32 too)")
    w = w32
    if values is StorageFormat.FLOAT16 and np.abs(w).max() > np.finfo(np.float16).max:
        raise ValueError(f"{name} holds values beyond float16's range (largest |value| "
                         f"{np.abs(w).max():.6g} > {float(np.finfo(np.float16).max):g}); "
                         "store it as float32")
    if sparse is SparseFormat.TWO_FOUR and w.ndim in (2, 4) and w.shape[1] % 4 == 0:
        if ((_groups(_as_stored(w, values)) != 0).sum(axis=1) > 2).any():
            raise ValueError(f"{name}: a group of 4 has more than 2 nonzeros: the tensor is "
                             "not 2:4 sparse")
    return w


def _as_stored(w: np.ndarray, values: StorageFormat) -> np.ndarray:
    """A float32 array ``w`` as ``values`` stores it, where that decides which elements are
    zero: INT8 codes (symmetric per row), float16 values; ``w`` itself for the other formats,
    whose codes the count does not model (a weight below one step is not taken for 0)."""
    if values is StorageFormat.INT8 and w.ndim:
        return _int8_codes(w.reshape(w.shape[0], -1))[0].reshape(w.shape)
    return w.astype(np.float16) if values is StorageFormat.FLOAT16 else w


def _stored_nonzeros(w: np.ndarray, values: StorageFormat) -> int:
    """Nonzeros a sparse format stores of a :func:`_storable` array: of the values as
    stored (INT8 codes, float16 values: a weight that rounds to 0 there is not stored)."""
    return int(np.count_nonzero(_as_stored(w, values)))


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
        ``values`` is not float32, float16 or int8; ``t`` is 0-dimensional (store a scalar
        as shape (1,)), has no elements, a NaN or an infinity, values beyond float32's range
        (a float64 tensor) or float16's (float16 values), integers float32 cannot hold; or a
        2:4 group has more than 2 nonzeros.
    """
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    if values not in _ENCODABLE:
        raise ValueError(f"encoding supports {[f.value for f in _ENCODABLE]} values, got "
                         f"{values.value} (tensor_bytes counts every format)")
    w = _storable(t, sparse, values)
    shape, rows = w.shape, w.shape[0]
    mat = w.reshape(rows, -1)
    quant: list[np.ndarray] = []
    if values is StorageFormat.INT8:
        codes, scale = _int8_codes(mat)
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
    nonzero = g != 0  # at most 2 per group: checked by _storable
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

    Raises
    ------
    ValueError
        ``values`` is not one that :func:`encode_tensor` writes (float32, float16, int8),
        ``shape`` is ``()`` (a scalar is stored as shape (1,)) or one 2:4 cannot take (as
        :func:`encode_tensor` refuses it), or the buffer does not hold this layout.
    """
    shape = tuple(check_count(d, "each size of the shape") for d in shape)
    if not shape:
        raise ValueError("need a shape of one or more non-negative sizes, got (); a scalar is "
                         "stored as shape (1,)")
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    if values not in _ENCODABLE:
        raise ValueError(f"decoding supports {[f.value for f in _ENCODABLE]} values, got "
                         f"{values.value} (encode_tensor writes no other)")
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
        per_row = np.diff(ptr)
        if ptr[0] != 0 or (per_row < 0).any() or (per_row > cols).any():
            raise ValueError("its CSR row pointers do not start at 0 and grow by at most a "
                             "row's length: not a file of this layout")
        nnz = int(ptr[-1])
        idx = take(index_dtype(max(cols - 1, 0)), nnz).astype(np.int64)
        inside = np.ones(nnz, bool)
        inside[ptr[:-1][per_row > 0]] = False  # each row's first index has no predecessor
        if nnz and ((idx >= cols).any() or (np.diff(idx, prepend=-1)[inside] <= 0).any()):
            raise ValueError("its CSR column indices are out of range or not increasing "
                             "within a row: not a file of this layout")
        mat = np.zeros((rows, cols), vdt)
        mat[np.repeat(np.arange(rows), per_row), idx] = take(vdt, nnz)
    else:
        tensor_bytes(shape, 0, sparse, values)  # checks the shape admits 2:4, as encoding
        half = n // 2
        packed = take(np.uint8, packed_bytes(half, 2))
        pos = ((packed[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1, 2)[
            :n // 4]
        if (pos[:, 0] >= pos[:, 1]).any():
            raise ValueError("its 2:4 metadata repeats a position within a group: not a file "
                             "of this layout")
        g = np.zeros((n // 4, 4), vdt)
        np.put_along_axis(g, pos.astype(np.int64), take(vdt, half).reshape(-1, 2), axis=1)
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


def first_conv(model: nn.Module) -> str | None:
    """Name of the first ``Conv2d`` in module order (``"conv1"`` for a ResNet), or None: the
    layer kept dense by default, in the byte counts here and in
    :func:`qerror.compress.sparse.prune_global`."""
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def dense_layers(model: nn.Module, keep_dense: Iterable[str] | str | None,
                 error: type[ValueError] = ValueError) -> set[str]:
    """The names of the ``Conv2d`` and ``Linear`` layers of ``model`` that ``keep_dense``
    keeps dense: ``None`` the first convolution (:func:`first_conv`), a string that one
    layer, an iterable those layers. ``error`` (ValueError or a subclass) when a name is not
    such a layer of the model."""
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    if keep_dense is None:
        return {first_conv(model)} - {None}
    dense = {keep_dense} if isinstance(keep_dense, str) else set(keep_dense)
    unknown = sorted(dense - layers)
    if unknown:
        raise error(f"keep_dense names {unknown}, which are not Conv2d or Linear layers of the "
                    f"model; its layers are {sorted(layers)[:8]}" + ("…" if len(layers) > 8
                                                                    else ""))
    return dense


def _layout(model: nn.Module, sparse: SparseFormat, values: StorageFormat,
            keep_dense: Iterable[str] | None):
    """``(name, tensor, sparse, values, compressed)`` of every state-dict entry stored; a
    tensor held under several names (a module or parameter used twice) once, at its first."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    dense = dense_layers(model, keep_dense)
    # the model itself may be the layer: its weight is "weight", not ".weight"
    compressed = {f"{n}.weight" if n else "weight" for n in layers if n not in dense}
    state = model.state_dict()
    reparametrized = [n for n in state if n.endswith("_orig") and f"{n[:-5]}_mask" in state
                      or ".parametrizations." in f".{n}"]
    if reparametrized:
        raise ValueError(f"{reparametrized[0]} is a reparametrization's tensor "
                         "(torch.nn.utils.prune or parametrize), not the weight the model "
                         f"uses: make it permanent first ({MAKE_WEIGHT_PLAIN})")
    out, stored = [], {}
    for name, t in state.items():
        if name.endswith("num_batches_tracked"):
            continue  # a training counter, not needed for inference
        if t.numel():
            where = (t.untyped_storage().data_ptr(), t.dtype)
            view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if where in stored:
                first, first_view = stored[where]
                if view == first_view:
                    continue  # the same tensor again: stored once, at its first name
                raise ValueError(f"{name} and {first} share memory as different views; "
                                 "store a model whose state-dict entries are separate tensors")
            stored[where] = (name, view)
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
        Every state-dict entry counted: the weights as asked (with INT8 values a sparse
        format stores the nonzero codes, so a weight that quantizes to 0 costs nothing);
        biases, dense weights and
        BatchNorm's weight, bias, running mean and variance as float32. BatchNorm's
        ``num_batches_tracked`` (a training counter) is not stored. A tensor the state
        dict holds under several names (a module or parameter used twice) is counted, and
        written, once: under its first name, in that name's format. :func:`write_model`
        writes exactly :attr:`ModelBytes.total` bytes.

    Raises
    ------
    ValueError
        A reparametrized weight (``torch.nn.utils.prune``'s ``weight_orig`` and
        ``weight_mask``, or a parametrization), or entries that are different views of one
        memory.
    """
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    rows, compressed = [], set()
    for name, t, sp, v, chosen in _layout(model, sparse, values, keep_dense):
        w = _storable(t.reshape(t.shape or (1,)), sp, v, name)
        try:
            rows.append((name, tensor_bytes(w.shape, _stored_nonzeros(w, v), sp, v)))
        except ValueError as exc:  # a shape the format cannot take: say which tensor
            raise ValueError(f"cannot store {name} in {sp.value} {v.value}: {exc}") from exc
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

    Raises
    ------
    ValueError
        An entry the format cannot hold (see :func:`encode_tensor`; the message names it).
        Every entry is encoded before the file is written, and the file replaces ``path`` in
        one rename (:func:`qerror.files.atomic_write`): a refused model leaves ``path`` as it
        was.
    """
    sparse, values = SparseFormat.parse(sparse), StorageFormat.parse(values)
    chunks = []
    for name, t, sp, v, _ in _layout(model, sparse, values, keep_dense):
        try:
            chunks += [np.ascontiguousarray(a).tobytes()
                       for a in encode_tensor(t.reshape(t.shape or (1,)), sp, v)]
        except ValueError as exc:
            raise ValueError(f"cannot store {name} in {sp.value} {v.value}: {exc}") from exc
    atomic_write(path, lambda tmp: tmp.write_bytes(b"".join(chunks)))
    return sum(len(c) for c in chunks)


def read_model(model: nn.Module, path: str | Path,
               sparse: SparseFormat | str = SparseFormat.DENSE,
               values: StorageFormat | str = StorageFormat.FLOAT32, *,
               keep_dense: Iterable[str] | None = None) -> nn.Module:
    """Load a :func:`write_model` file into ``model`` (same architecture, same arguments),
    in place; INT8 weights come back dequantized.

    Raises
    ------
    ValueError
        The file is shorter or longer than the layout it should hold, or its sparse
        structure is impossible (CSR row pointers or column indices, 2:4 positions). The
        file has no header: a file of the right size whose structure is possible decodes,
        so which model and format a file holds is the caller's to know (the compression
        study writes and reads each file in one run).
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
        raise ValueError(f"{path} does not decode as this model in {sparse.value} "
                         f"{values.value} (shorter than its layout, or not such a file): "
                         f"{exc}") from exc
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
    elements, bits = check_count(elements, "elements"), check_count(bits, "bits", 1)
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
    choices = check_count(choices, "choices", 1)
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
    bits = check_count(bits, "bits", 1)
    if bits > 64:
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
    bits, count = check_count(bits, "bits", 1), check_count(count, "count")
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


def _elias_fano_layout(lengths, universe_bits: int):
    universe_bits = check_count(universe_bits, "universe_bits")
    m = np.asarray(lengths)
    if m.size and m.dtype.kind not in "iu":
        raise TypeError(f"lengths must be an int array (counts), got dtype {m.dtype}; "
                        f"pass integers (numpy.rint(lengths).astype(numpy.int64) for whole "
                        f"counts computed in floating point)")
    if universe_bits > 63:
        raise ValueError(f"universe_bits must be at most 63 (the values are int64), got "
                         f"{universe_bits}")
    m = m.astype(np.int64)
    if m.ndim != 1 or (m.size and m.min() < 0) or (m > 1 << universe_bits).any():
        raise ValueError(f"lengths must be counts in [0, 2**{universe_bits}]")
    # L = floor(log2(2^u / m)) = u - ceil(log2 m) and 2^u >> L = 2^ceil(log2 m) (at most 2m),
    # formed without 2^u itself, which int64 does not hold at u = 63 (OverflowError)
    up = np.where(m > 1, _floor_log2(np.maximum(m - 1, 1)) + 1, 0)
    low = np.where(m > 0, universe_bits - up, 0)
    size = np.where(m > 0, m * low + m + (np.int64(1) << up), 0)
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
    _, _, size, _, _ = _elias_fano_layout(lengths, universe_bits)
    return int(size.sum())


def elias_fano_encode(values, lengths, universe_bits: int) -> np.ndarray:
    """Encode consecutive sorted sets (``values`` grouped by ``lengths``) as a 0/1 uint8
    array of :func:`elias_fano_bits` bits: set by set, low bits (value by value, least
    significant first) then the unary high array.

    Raises
    ------
    TypeError
        ``values`` are not integers.
    ValueError
        A value outside ``[0, 2^u)``, or a set whose values are not strictly increasing:
        the high array of such a set would overrun its bits (into the next set's, or past
        the end), and :func:`elias_fano_decode` could not read the stream back.
    """
    m, low, size, start, first = _elias_fano_layout(lengths, universe_bits)
    raw = np.asarray(values)
    if raw.size and raw.dtype.kind not in "iu":
        raise TypeError(f"values must be integers, got dtype {raw.dtype}")
    v = raw.astype(np.int64)
    if v.shape != (int(m.sum()),):
        raise ValueError(f"need {int(m.sum())} values, got shape {v.shape}")
    group = np.repeat(np.arange(m.size), m)
    rank = np.arange(v.size) - first[group]
    if v.size and (int(v.min()) < 0 or int(raw.max()) >= 1 << universe_bits):
        raise ValueError(f"values must lie in [0, 2**{universe_bits}), got [{int(raw.min())}, "
                         f"{int(raw.max())}]")
    if (np.diff(v, prepend=0)[rank > 0] <= 0).any():
        raise ValueError("each set's values must be strictly increasing (sorted, distinct): "
                         "sort each set and drop repeats")
    lw = low[group]
    out = np.zeros(int(size.sum()), dtype=np.uint8)
    for j in range(int(low.max(initial=0))):
        sel = (j < lw) & (((v >> j) & 1) == 1)
        out[(start[group] + rank * lw + j)[sel]] = 1
    out[start[group] + m[group] * lw + (v >> lw) + rank] = 1
    return out


def elias_fano_decode(bits: np.ndarray, lengths, universe_bits: int) -> np.ndarray:
    """Inverse of :func:`elias_fano_encode`: the values, int64, set after set."""
    m, low, size, start, first = _elias_fano_layout(lengths, universe_bits)
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
