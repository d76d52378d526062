"""A small CNN sized to a byte budget: the baseline a reviewer asks a weightless network for.

:func:`tiny_cnn_within` returns the widest :class:`TinyCNN` whose honest bytes
(:func:`qerror.compress.size.model_bytes`, INT8 weights by default) fit a budget, so a
convolutional network and a weightless one can be compared at the same storage.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qerror._checks import check_byte_budget, check_count, check_seed
from qerror.compress.size import SparseFormat, StorageFormat, dense_layers, tensor_bytes


class TinyCNN(nn.Module):
    """Three 3×3 convolutions (widths ``w``, ``2w``, ``4w``) with BatchNorm and ReLU, two
    2×2 max-pools, global average pooling and one linear classifier.

    Parameters
    ----------
    width : int
        ``w ≥ 1``, the first convolution's output channels.
    in_channels, num_classes : int
    seed : int
        Seed of the initialisation (PyTorch's defaults), from 0 to 2**64 - 1; the global
        generator is left untouched.

    Notes
    -----
    Input ``(N, in_channels, H, W)`` with ``H, W ≥ 4``, output ``(N, num_classes)`` logits.
    Convolutions carry no bias (BatchNorm follows each). The parameter count is
    ``9·c·w + 18w² + 72w² + 4w·k + k`` weights and biases plus ``4·7w`` BatchNorm values
    (``c`` input channels, ``k`` classes): about ``90 w²``, so the width grows with the
    square root of the budget.
    """

    def __init__(self, width: int, in_channels: int = 1, num_classes: int = 10, *,
                 seed: int = 0):
        super().__init__()
        width, in_channels, num_classes = (
            check_count(v, name, 1) for v, name in ((width, "width"),
                                                    (in_channels, "in_channels"),
                                                    (num_classes, "num_classes")))
        seed = check_seed(seed, "seed")
        self.width = width
        widths = [in_channels, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in range(3):
                layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, bias=False),
                           nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
                if i < 2:
                    layers.append(nn.MaxPool2d(2))
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


#: The widest :class:`TinyCNN` :func:`tiny_cnn_within` returns: 94.4 million parameters,
#: 378 MB of float32 weights to build, 94.6 MB stored in INT8. A wider one is no tiny
#: baseline; a budget of 1e9 bytes would buy width 3,332 (a billion parameters, 4 GB).
MAX_TINY_WIDTH = 1024


def _entries(width: int, in_channels: int, num_classes: int):
    """``(layer, shape)`` of every entry of ``TinyCNN(width, in_channels, num_classes)``'s
    state dict that :func:`~qerror.compress.size.model_bytes` stores, in order; ``layer``
    names the Conv2d or Linear whose weight the entry is, else None (BatchNorm, biases)."""
    widths = [in_channels, width, 2 * width, 4 * width]
    for i in range(3):  # Conv2d at features.{4i}, its BatchNorm at features.{4i + 1}
        yield f"features.{4 * i}", (widths[i + 1], widths[i], 3, 3)
        yield from ((None, (widths[i + 1],)) for _ in range(4))  # weight, bias, mean, var
    yield "fc", (num_classes, 4 * width)
    yield None, (num_classes,)


def tiny_cnn_bytes(width: int, in_channels: int = 1, num_classes: int = 10, *,
                   values: StorageFormat | str = StorageFormat.INT8,
                   keep_dense: Iterable[str] | str | None = ()) -> int:
    """Bytes of ``TinyCNN(width, in_channels, num_classes)`` as
    :func:`~qerror.compress.size.model_bytes` counts it stored dense, from the shapes alone:
    no network of that width is built.

    Parameters
    ----------
    width, in_channels, num_classes : int
        As :class:`TinyCNN`.
    values : StorageFormat or str
        Format of the convolution and linear weights (default INT8).
    keep_dense : iterable of str, str or None
        Layers stored float32, as in :func:`~qerror.compress.size.model_bytes` (default
        none; ``None`` the first convolution).

    Returns
    -------
    int
        ``model_bytes(TinyCNN(width, in_channels, num_classes), "dense", values,
        keep_dense=keep_dense).total``: each weight's
        :func:`~qerror.compress.size.tensor_bytes` in ``values`` (with per-channel scales and
        zero points for integer formats), float32 for the layers kept dense, BatchNorm's
        four vectors and the classifier's bias; BatchNorm's batch counter is not stored.

    Raises
    ------
    TypeError, ValueError
        A count that is not an int ``>= 1``; ``keep_dense`` naming a layer TinyCNN lacks
        (its layers: ``features.0``, ``features.4``, ``features.8``, ``fc``).
    """
    width, in_channels, num_classes = (
        check_count(v, name, 1) for v, name in ((width, "width"),
                                                (in_channels, "in_channels"),
                                                (num_classes, "num_classes")))
    values = StorageFormat.parse(values)
    # the layers kept dense, read as model_bytes reads them (on a network of width 1)
    dense = dense_layers(TinyCNN(1, in_channels, num_classes), keep_dense)
    return sum(tensor_bytes(shape, None, SparseFormat.DENSE,
                            StorageFormat.FLOAT32 if layer is None or layer in dense
                            else values).total
               for layer, shape in _entries(width, in_channels, num_classes))


def tiny_cnn_within(max_bytes: int, *, values: StorageFormat | str = StorageFormat.INT8,
                    keep_dense: Iterable[str] | str | None = (), in_channels: int = 1,
                    num_classes: int = 10, seed: int = 0) -> TinyCNN:
    """The widest :class:`TinyCNN` whose honest bytes fit ``max_bytes``.

    Parameters
    ----------
    max_bytes : int
        The budget, in bytes of :func:`~qerror.compress.size.model_bytes` (dense weights in
        ``values``, per-channel scales and zero points, biases and BatchNorm in float32): a
        finite real number ``>= 0``.
    values : StorageFormat or str
        Format of the convolution and linear weights (default INT8).
    keep_dense : iterable of str, str or None
        Layers stored float32 (default none: every weight in ``values``); ``None`` the
        first convolution, as in :func:`~qerror.compress.size.model_bytes`.
    in_channels, num_classes, seed
        As :class:`TinyCNN`.

    Raises
    ------
    ValueError
        ``max_bytes`` is not a finite real number ``>= 0`` (a bool, a string, NaN, an
        infinity), not even width 1 fits, or the widest fit is wider than
        :data:`MAX_TINY_WIDTH` (1024).

    Notes
    -----
    The size grows strictly with the width, so the widest fit is found by bisection on
    :func:`tiny_cnn_bytes`, the exact byte count from the shapes; only the network
    returned is built.
    """
    max_bytes = check_byte_budget(max_bytes, "max_bytes")
    keep = keep_dense if keep_dense is None or isinstance(keep_dense, str) else tuple(keep_dense)

    def size(w: int) -> int:
        return tiny_cnn_bytes(w, in_channels, num_classes, values=values, keep_dense=keep)

    smallest, over = size(1), size(MAX_TINY_WIDTH + 1)
    if smallest > max_bytes:
        raise ValueError(f"even a TinyCNN of width 1 takes {smallest} bytes, over "
                         f"max_bytes={max_bytes}")
    if over <= max_bytes:
        raise ValueError(f"max_bytes={max_bytes} buys a TinyCNN wider than MAX_TINY_WIDTH = "
                         f"{MAX_TINY_WIDTH} (width {MAX_TINY_WIDTH + 1} takes {over:,} bytes): "
                         f"no tiny baseline; give a budget under {over:,} bytes, or build "
                         f"TinyCNN(width) for a wider network")
    lo, hi = 1, MAX_TINY_WIDTH + 1
    while hi - lo > 1:  # size(lo) <= budget < size(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= max_bytes else (lo, mid)
    return TinyCNN(lo, in_channels, num_classes, seed=seed)


__all__ = ["MAX_TINY_WIDTH", "TinyCNN", "tiny_cnn_bytes", "tiny_cnn_within"]
