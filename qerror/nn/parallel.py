"""The collectives that measurement and training share under torchrun.

A process joins torchrun's group through :func:`qerror.nn.training.distributed`; these
functions then act on that default group, and outside one (a single process) they are the
identity, so the same code runs on one process or many.

* :func:`shard`: the contiguous share of ``n`` items (batches, images) of one rank, each
  item on exactly one rank, no padding;
* :func:`all_reduce_sum`: exact merging of streaming sums;
* :func:`broadcast_object`: rank 0's value (a calibration, a loaded state) on every rank;
* :func:`gather_objects`: every rank's value, in rank order;
* :func:`gather_first_rows`: the first rows of every rank's pieces in rank order, each rank
  sending only its share of them; :func:`first_rows` joins them, holding no others;
* :func:`gather_outcomes`: the same, carrying the error a rank met on its way, so that
  every rank raises instead of waiting for it;
* :func:`check_agreement`: the same error on every rank when the ranks passed different
  values of an argument that must be every rank's;
* :func:`digest`: a short fingerprint of a value's content, for checking that every rank
  passed the same tensors without sending them;
* :func:`global_batchnorm`: BatchNorm that trains on the statistics of the whole global
  batch, on any device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import io
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qerror._checks import check_count
from qerror.nn._anatomy import own_forwards

__all__ = ["all_reduce_sum", "broadcast_object", "check_agreement", "digest", "first_rows",
           "gather_first_rows", "gather_objects", "gather_outcomes", "global_batchnorm",
           "shard", "world"]


def world() -> tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int | None = None, size: int | None = None) -> range:
    """The contiguous indices of ``range(n)`` that ``rank`` of ``size`` takes.

    The first ``n % size`` ranks take one item more than the others; concatenated in rank
    order the shares are ``range(n)``, so each item is taken exactly once and results
    gathered in rank order are in the items' order. ``rank`` and ``size`` default to this
    process's (:func:`world`).

    Raises
    ------
    TypeError
        ``n``, ``rank`` or ``size`` is not an int (a bool or a float included).
    ValueError
        ``n < 0``, ``size < 1`` or ``rank`` outside ``0..size-1``.
    """
    n = check_count(n, "n")
    if rank is None or size is None:
        here = world()
        rank = here[0] if rank is None else rank
        size = here[1] if size is None else size
    rank, size = check_count(rank, "rank"), check_count(size, "size", 1)
    if rank >= size:
        raise ValueError(f"need 0 <= rank < size, got rank={rank}, size={size}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over every rank (a new CPU tensor; ``tensor`` as
    it is outside a group).

    Integer tensors sum exactly; float64 sums differ from a single process's only by the
    order of the additions.
    """
    if world()[1] == 1:
        return tensor
    # a copy: .to() and .contiguous() hand back the caller's own tensor when they can
    t = tensor.detach().to(_collective_device()).clone(memory_format=torch.contiguous_format)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def broadcast_object(value: Any, map_location: torch.device | str | None = None) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object; ``value`` outside a group).

    With ``map_location``, the other ranks receive the tensors inside ``value`` on that
    device (their own GPU, say) instead of the device they had on rank 0.
    """
    if world()[1] == 1:
        return value
    if map_location is None:
        box = [value]
    else:
        buffer = io.BytesIO()
        if world()[0] == 0:
            torch.save(value, buffer)
        box = [buffer.getvalue()]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    if map_location is None or world()[0] == 0:
        return value if world()[0] == 0 else box[0]
    return torch.load(io.BytesIO(box[0]), map_location=map_location, weights_only=False)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` outside a group)."""
    size = world()[1]
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def _head(pieces: Sequence, n: int) -> list:
    """The first ``n`` rows of ``pieces`` (arrays or tensors, in order), as pieces: a piece
    within them as it is, the one they end in cut and copied (a slice would keep, and
    pickle, for a tensor, its whole piece's memory)."""
    cut, left = [], n
    for p in pieces:
        if left <= 0:
            break
        if len(p) > left:
            p = p[:left].clone() if isinstance(p, torch.Tensor) else p[:left].copy()
        cut.append(p)
        left -= len(p)
    return cut


def first_rows(pieces: Sequence, n: int | None):
    """The first ``n`` rows of ``pieces`` (numpy arrays, or torch tensors, in order: the
    ranks' pieces from :func:`gather_first_rows`, say) joined into a new array or tensor
    that holds those rows alone (every row where ``n`` is None). A slice of the whole joined
    would be a view that keeps every row's memory. ``pieces`` must not be empty."""
    if n is not None:
        pieces = _head(pieces, n) or [pieces[0][:0]]  # no rows: the first piece's shape
    return torch.cat(list(pieces)) if isinstance(pieces[0], torch.Tensor) \
        else np.concatenate(pieces)


def gather_first_rows(pieces: Sequence, n: int | None) -> list:
    """Every rank's ``pieces`` (arrays or tensors whose rows follow one another), in rank
    order, on every rank, as one list of pieces: the first ``n`` rows of them all in rank
    order (every row where ``n`` is None), ``pieces`` themselves outside a group.

    Each rank sends only its share of those ``n`` rows, a piece cut short as a copy (the
    ranks first gather their row counts). Each rank sending its own first ``n`` made every
    rank receive the world size times ``n`` rows for a moment: at 8 ranks keeping 5,000
    images' BatchNorm moments of a 2,048-channel layer, 2.6 GB where 330 MB are kept.
    """
    rank, size = world()
    if size == 1:
        return list(pieces) if n is None else _head(pieces, n)
    # the counts are gathered whatever n is: every rank makes the same collectives, so
    # ranks given different n's get figures that differ, not a wait for ever
    before = sum(gather_objects(sum(len(p) for p in pieces))[:rank])
    if n is not None:
        pieces = _head(pieces, max(n - before, 0))
    return [t for got in gather_objects(list(pieces)) for t in got]


def gather_outcomes(value: Any, failure: BaseException | None, before: str) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank, or on every rank an error when
    some rank failed on its way here.

    A rank that raises alone between collectives leaves the others waiting in the next one:
    for ever while its process lives on (a caller that catches the error and goes on), or
    until its next call's collective, which they then pair with, merging two calls' values.
    Each rank catches its error instead and passes it here, where every rank comes whether
    or not it failed; this gather carries it to the others, so every rank raises.

    Parameters
    ----------
    value : any picklable object
        This rank's part (not sent when ``failure`` is given).
    failure : Exception or None
        The error this rank met since the ranks last met, or None.
    before : str
        What the ranks meet here to do, for the message ("failed before {before}").

    Returns
    -------
    list
        Every rank's ``value`` (``[value]`` outside a group), when no rank failed.

    Raises
    ------
    Exception
        ``failure``, on the rank that met it (checked after the gather: the others learn of
        it first).
    RuntimeError
        On every rank that did not fail while some did: the message names each failed rank
        and its error (type and words).
    """
    size = world()[1]
    error = None if failure is None else f"{type(failure).__name__}: {failure}"
    gathered = [(error, value)] if size == 1 else gather_objects(
        (error, None if failure is not None else value))
    if failure is not None:
        raise failure
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if failed:
        raise RuntimeError(
            f"{'rank' if len(failed) == 1 else 'ranks'} "
            f"{', '.join(str(r) for r, _ in failed)} of {size} failed before {before} ("
            + "; ".join(f"rank {r}: {e}" for r, e in failed) + "), so every rank stops here "
            "instead of waiting for them: see each failed rank's own error, fix what it "
            "names, and call again on every rank")
    return [v for _, v in gathered]


def check_agreement(given: Sequence[Sequence[tuple[str, Any, Any]]], own: str,
                    merged: str) -> None:
    """Refuse, with the same ValueError on every rank, ranks that passed different values
    of an argument that must be every rank's.

    Each rank sends its terms in a gather it makes anyway (:func:`gather_outcomes`), and
    every rank calls this with what that gather returned, so every rank raises alike.

    Parameters
    ----------
    given : sequence of sequences of (name, compared, shown)
        Per rank, in rank order, the same names in the same order: ``compared`` equal on
        every rank where the rank's argument is (a :func:`digest` for tensors), ``shown``
        in the message where it tells the ranks apart (None where nothing short does).
    own : str
        What each rank passes of its own, for the message ("the batches").
    merged : str
        What the ranks merge into one measurement, for the message ("sums").

    Raises
    ------
    ValueError
        Naming the first argument whose ``compared`` differs between ranks, with each
        rank's ``shown`` where those differ (else "in value").
    """
    names = [t[0] for t in given[0]]
    for i, name in enumerate(names):
        terms = [g[i] for g in given]
        if any(t[1] != terms[0][1] for t in terms):
            told = ", ".join(f"rank {r}: {t[2]}" for r, t in enumerate(terms)) \
                if len({repr(t[2]) for t in terms}) > 1 else "in value"
            raise ValueError(
                f"the ranks passed different {name} ({told}); every rank must pass the same "
                f"{', '.join(names)} (only {own} are each rank's own), for their {merged} to "
                "be one measurement")


def digest(value: Any) -> str:
    """A fingerprint of ``value``'s content (32 hexadecimal digits, BLAKE2b): equal for
    equal content on any rank and device, so that ranks can check they hold the same
    tensors by gathering this instead of the tensors.

    Tensors and arrays count by dtype, shape and bytes (not device, layout, strides, a
    lazy conjugate or negative view, or whether they require grad; a sparse tensor by its
    dense values, made whole in memory; a nested tensor by its components in order; an
    array of Python objects by its elements in C order; a quantized tensor by its
    quantization scheme, scales and zero points too), mappings by their items and
    sets by their elements whatever their order, dataclasses by their type and fields,
    sequences by their items in order, numbers, strings, enums and None by type and value;
    anything else by its pickle, in which each tensor or array it holds counts by its own
    digest (so by content, as above, not by the device, strides or storage that pickle
    would record). Two contents that differ give different fingerprints except with
    probability about ``2**-128``.

    Raises
    ------
    ValueError
        For a tensor on the meta device, which has no values to compare: load or
        materialise the weights before the ranks compare them.
    """
    h = hashlib.blake2b(digest_size=16)
    _feed(h, value)
    return h.hexdigest()


class _ContentPickler(pickle.Pickler):
    """A pickler that writes each tensor and array as its :func:`digest`, by content."""

    def reducer_override(self, obj):
        # an object array's bytes are addresses: pickle records its elements instead
        if isinstance(obj, torch.Tensor) or (isinstance(obj, np.ndarray)
                                             and not obj.dtype.hasobject):
            return str, (f"digest {digest(obj)}",)
        return NotImplemented


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise ValueError(
            f"digest: a tensor on the meta device (shape {tuple(value.shape)}) has no values "
            "to compare; load or materialise the weights before the ranks compare them")
    if isinstance(value, torch.Tensor) and value.is_nested:
        parts = value.unbind()
        h.update(f"nested {value.dtype} {len(parts)};".encode())
        for part in parts:
            _feed(h, part)
    elif isinstance(value, torch.Tensor):
        if value.layout != torch.strided:  # sparse: by its values, as a dense tensor
            value = value.to_dense()
        t = value.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {tuple(value.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())  # its buffer, not a copy of it
        if t.is_quantized:  # those bytes are its integers alone: the grid is content too
            h.update(f"{t.qscheme()};".encode())
            _feed(h, (t.q_scale(), t.q_zero_point()) if t.qscheme() in (
                torch.per_tensor_affine, torch.per_tensor_symmetric) else
                (t.q_per_channel_scales(), t.q_per_channel_zero_points(),
                 t.q_per_channel_axis()))
    elif isinstance(value, np.ndarray) and value.dtype.hasobject:
        # its bytes are the addresses of its elements: by the elements, in C order
        h.update(f"object array {value.shape};".encode())
        for item in value.ravel(order="C"):
            _feed(h, item)
    elif isinstance(value, np.ndarray):
        h.update(f"array {value.dtype.str} {value.shape};".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum,
                                             np.generic)):
        h.update(f"{type(value).__qualname__} {value!r};".encode())
    elif isinstance(value, (set, frozenset)):  # its pickle follows its iteration order
        items = sorted(digest(v) for v in value)
        h.update(f"set {len(items)};{''.join(items)}".encode())
    elif isinstance(value, Mapping):
        items = sorted((digest(k), v) for k, v in value.items())
        h.update(f"mapping {len(items)};".encode())
        for k, v in items:
            h.update(k.encode())
            _feed(h, v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"{type(value).__qualname__};".encode())
        for f in dataclasses.fields(value):
            _feed(h, getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        h.update(f"sequence {len(value)};".encode())
        for v in value:
            _feed(h, v)
    else:
        buffer = io.BytesIO()
        _ContentPickler(buffer).dump(value)
        h.update(b"pickle;" + buffer.getvalue())


# words torch uses for the same refusal, which callers (qerror.nn.training.fit) recognise
_ONE_VALUE = "Expected more than 1 value per channel when training"


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients
    (each rank's loss depends on every rank's tensor through the sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn``'s forward in training mode with the mean and variance of the global batch.

    Each channel's sum over this rank's positions (with the count of positions), then the
    sum of squared deviations from the global mean, are summed over the ranks by an
    all-reduce that autograd differentiates, so outputs, gradients and the running
    statistics are those of one process holding the whole batch, up to the order of the
    float additions.
    """
    if not bn.training:  # running statistics, or a per-rank batch in eval (as torch does)
        return type(bn).forward(bn, x)
    dtype = x.dtype
    bn._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    dev = _collective_device()
    # half and bfloat16 in float32, as torch's own BatchNorm computes them: a channel's sum
    # of float16 values passes 65504 from about 22,000 positions of mean 3
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    # in float64, where a count of positions stays exact
    local = torch.full((1,), float(x.numel() // x.shape[1]), dtype=torch.float64, device=dev)
    sums = _SumOverRanks.apply(torch.cat([x.sum(dims).to(dev, torch.float64), local]))
    n = int(sums[-1].item())
    if n < 2:
        raise ValueError(f"{_ONE_VALUE} (the global batch holds {n} value per channel)")
    mean = (sums[:-1] / n).to(x.device, x.dtype)
    centred = x - mean.view(shape)
    var = (_SumOverRanks.apply((centred * centred).sum(dims).to(dev)) / n).to(x.device)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                      else bn.momentum)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_((var.detach() * (n / (n - 1))).to(bn.running_var.dtype),
                                 factor)
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(dtype)


@contextlib.contextmanager
def global_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every BatchNorm of ``model`` in training mode normalises by the
    statistics of the global batch (all ranks' samples), on CPU (gloo) and GPU (NCCL) alike.

    Plain DistributedDataParallel normalises each rank's share by its own statistics, so
    W ranks do not train the network one process would on the same global batches; torch's
    ``SyncBatchNorm`` fixes that on GPUs only. Here each BatchNorm module keeps its
    parameters and buffers (the model's state dict is unchanged); only its forward is
    replaced while the block runs, and in eval mode it is the module's own. Outside a
    process group this does nothing. Float16 and bfloat16 inputs are normalised in float32
    and returned in their own dtype, as torch's BatchNorm does.

    Every rank must run the same forward passes inside the block (each BatchNorm in training
    mode meets the others in a collective): hold it around the training step's forward only
    (:func:`qerror.nn.training.fit` does), never around work that one rank does alone.
    The backward pass may run after the block: its collectives are in the autograd graph.
    """
    if world()[1] == 1:
        yield model
        return
    patched = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    own = own_forwards(patched)
    if own:  # restoring the class's forward afterwards would delete theirs
        raise ValueError(f"BatchNorm {own[0]!r} replaces forward on the module itself; "
                         "global statistics would bypass it: train a copy without it")
    for _, m in patched:
        m.forward = functools.partial(_global_batch_norm, m)
    try:
        yield model
    finally:
        for _, m in patched:
            del m.forward
