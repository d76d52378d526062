"""The spatial geometry of a CNN's layers: map sizes and how much of each kernel sees data.

A convolution's error budget depends on how many of its weights touch real input. At a
small input size a deep stage can run on maps so small that most of a 3×3 kernel's taps
land in the zero padding: on the 32×32 Fashion-MNIST ResNet50 with the ImageNet stem,
layer4's last two blocks run on 1×1 maps, where only the centre tap of each 3×3 kernel
ever multiplies data (eight of nine weights cannot contribute quantization error), and
its first block's strided 3×3 convolution reads a 2×2 map with four of nine taps live.
:func:`layer_geometry` reports, for every convolution and linear layer, its input and
output map sizes and the exact fraction of kernel taps that multiply input rather than
padding.

Notes
-----
For one spatial axis with input size ``H``, kernel ``K``, stride ``s``, padding ``p`` and
dilation ``d``, output position ``o`` reads input index ``i = o·s − p + k·d`` for tap ``k``.
The tap multiplies data when ``0 ≤ i < H``. Padding is the same along every row, so the
count over a 2-D output map and kernel factorises into the product of the two 1-D counts,
and the live fraction is

.. math:: f = \\frac{\\sum_{o,k} [0 \\le o s_h - p_h + k d_h < H]}{H_o K_h}
              \\cdot \\frac{\\sum_{o,k} [0 \\le o s_w - p_w + k d_w < W]}{W_o K_w},

computed exactly with integers (the fraction is the ratio of two integers, rounded once).
A linear layer has every tap live.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from qerror._checks import check_count
from qerror.nn._anatomy import LAYERS, eval_mode

__all__ = ["LayerGeometry", "layer_geometry", "live_taps"]


@dataclass(frozen=True)
class LayerGeometry:
    """Where one quantized layer runs.

    Attributes
    ----------
    layer : str
        The module's qualified name.
    kind : str
        ``"conv"`` or ``"linear"``.
    in_h, in_w, out_h, out_w : int
        Input and output map sizes (1 for a linear layer).
    kernel_h, kernel_w : int
        Kernel size (1 for a linear layer).
    live_taps : int
        Number of (output position, kernel tap) pairs that multiply input rather than
        padding, over one output channel and one input channel.
    taps : int
        All such pairs, ``out_h·out_w·kernel_h·kernel_w``.
    """

    layer: str
    kind: str
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    kernel_h: int
    kernel_w: int
    live_taps: int
    taps: int

    @property
    def live_fraction(self) -> float:
        """``live_taps / taps``: the share of the kernel's products that see data."""
        return self.live_taps / self.taps

    def record(self) -> dict:
        """A flat dict for a table row, with ``live_fraction``."""
        return {**asdict(self), "live_fraction": self.live_fraction}


def live_taps(size: int, kernel: int, stride: int, padding: int | tuple[int, int],
              dilation: int = 1) -> int:
    """Count the (output position, tap) pairs of one axis that read inside the input.

    Parameters
    ----------
    size : int
        Input length along the axis (≥ 1).
    kernel, stride, dilation : int
        ≥ 1.
    padding : int or (int, int)
        Zero padding on each side (≥ 0), or ``(before, after)`` when the two sides differ
        (PyTorch's ``padding="same"`` with an even kernel span pads one more after).

    Returns
    -------
    int
        ``Σ_o Σ_k [0 ≤ o·stride − before + k·dilation < size]`` over the output positions
        ``o`` PyTorch's convolution produces.

    Raises
    ------
    ValueError
        A non-positive size, kernel, stride or dilation, a negative padding, a padding that
        is neither an integer nor a pair, or a kernel that does not fit the padded input.
    TypeError
        A size, kernel, stride, dilation or padding that is not an integer: Python's and
        numpy's are taken, booleans and floats (even integral ones) are refused.
    """
    before, after = (padding, padding) if not isinstance(padding, tuple | list) \
        else tuple(padding) if len(padding) == 2 else (None, None)
    if before is None:
        raise ValueError(f"padding must be an integer or a (before, after) pair, got {padding!r}")
    size, kernel, stride, dilation, before, after = (
        check_count(v, name, low) for name, v, low in (
            ("size", size, 1), ("kernel", kernel, 1), ("stride", stride, 1),
            ("dilation", dilation, 1), ("padding", before, 0), ("padding", after, 0)))
    span = dilation * (kernel - 1) + 1
    out = (size + before + after - span) // stride + 1
    if out < 1:
        pad = before if before == after else (before, after)
        raise ValueError(f"a kernel spanning {span} does not fit an input of {size} padded "
                         f"by {pad} on each side")
    return sum(1 for o in range(out) for k in range(kernel)
               if 0 <= o * stride - before + k * dilation < size)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _axis_padding(module: nn.Conv2d, name: str) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding of each spatial axis, as PyTorch pads."""
    kernel, dilation = _pair(module.kernel_size), _pair(module.dilation)
    if module.padding == "valid":
        return [(0, 0), (0, 0)]
    if module.padding == "same":
        # PyTorch pads d·(k − 1) in all, half before and the odd one after
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in _pair(module.padding)]
    if any(sum(p) for p in pads) and module.padding_mode != "zeros":
        raise ValueError(f"{name}: padding {module.padding!r} with mode "
                         f"{module.padding_mode!r} fills the border with input values, not "
                         "zeros; live taps are defined for zero padding only (every tap of "
                         "such a layer reads data)")
    return pads


def layer_geometry(model: nn.Module, example: torch.Tensor) -> list[LayerGeometry]:
    """Map sizes and live kernel taps of every convolution and linear layer.

    Parameters
    ----------
    model : torch.nn.Module
        Run once in evaluation mode (its mode is restored).
    example : torch.Tensor, shape (N, C, H, W)
        An input of the size the network is used at; one image is enough.

    Returns
    -------
    list of LayerGeometry
        In execution order; a layer called twice is listed at its first call.

    Raises
    ------
    ValueError
        A convolution that pads with input values (``padding_mode`` other than ``"zeros"``
        and a non-zero padding), whose taps all read data, is reported as such rather than
        counted. ``padding="valid"`` and ``"same"`` are counted as PyTorch pads them.
    """
    seen: dict[str, LayerGeometry] = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, LAYERS)}

    def hook(module, inputs, output):
        name = names[module]
        if name in seen:
            return
        x = inputs[0]
        if isinstance(module, nn.Linear):
            seen[name] = LayerGeometry(name, "linear", 1, 1, 1, 1, 1, 1, 1, 1)
            return
        (kh, kw), (sh, sw) = _pair(module.kernel_size), _pair(module.stride)
        ph, pw = _axis_padding(module, name)
        dh, dw = _pair(module.dilation)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = int(output.shape[-2]), int(output.shape[-1])
        live = live_taps(h, kh, sh, ph, dh) * live_taps(w, kw, sw, pw, dw)
        seen[name] = LayerGeometry(name, "conv", h, w, oh, ow, kh, kw, live, oh * ow * kh * kw)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())
