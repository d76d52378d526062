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
from qerror.compress.size import SparseFormat, StorageFormat, model_bytes


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
        infinity), or not even width 1 fits.

    Notes
    -----
    The size grows strictly with the width, so the widest fit is found by doubling then
    bisection on the exact byte count.
    """
    max_bytes = check_byte_budget(max_bytes, "max_bytes")
    keep = keep_dense if keep_dense is None or isinstance(keep_dense, str) else tuple(keep_dense)

    def size(w: int) -> int:
        m = TinyCNN(w, in_channels, num_classes, seed=seed)
        return model_bytes(m, SparseFormat.DENSE, values, keep_dense=keep).total

    if size(1) > max_bytes:
        raise ValueError(f"even a TinyCNN of width 1 takes {size(1)} bytes, over "
                         f"max_bytes={max_bytes}")
    lo, hi = 1, 2
    while size(hi) <= max_bytes:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # size(lo) <= budget < size(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= max_bytes else (lo, mid)
    return TinyCNN(lo, in_channels, num_classes, seed=seed)


__all__ = ["TinyCNN", "tiny_cnn_within"]
