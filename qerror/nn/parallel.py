"""The collectives that measurement and training share under torchrun.

A process joins torchrun's group through :func:`qerror.nn.training.distributed`; these
functions then act on that default group, and outside one (a single process) they are the
identity, so the same code runs on one process or many.

* :func:`shard`: the contiguous share of ``n`` items (batches, images) of one rank, each
  item on exactly one rank, no padding;
* :func:`all_reduce_sum`: exact merging of streaming sums;
* :func:`broadcast_object`: rank 0's value (a calibration, a loaded state) on every rank;
* :func:`gather_objects`: every rank's value, in rank order.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "broadcast_object", "gather_objects", "shard", "world"]


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
    ValueError
        ``n < 0`` or ``rank`` outside ``0..size-1``.
    """
    if rank is None or size is None:
        here = world()
        rank = here[0] if rank is None else rank
        size = here[1] if size is None else size
    if n < 0 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"need n >= 0 and 0 <= rank < size, got n={n}, rank={rank}, "
                         f"size={size}")
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
    t = tensor.detach().to(_collective_device()).contiguous()
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
