"""Quantizing a network's input: inside the model, or offline as stored integer codes.

A model can take float images and quantize them itself (:class:`InputQuantizer` as its
first op), or take integer codes quantized beforehand and stored one per byte
(:func:`quantize_offline`), which it dequantizes on load (:class:`Dequantizer`). With the
same spec, scale and zero point the two give the model the same input values, ties between
codes included (a zero may differ in sign where the quantizer's block engine runs).
"""

from __future__ import annotations

import torch
from torch import nn

from qerror.quantizer import QParams, QuantSpec, dequantize, fake_quantize, quantize

# Offline codes are stored one per byte (int8 or uint8).
MAX_CODE_BITS = 8


class InputQuantizer(nn.Module):
    """Quantize-then-dequantize of the input with a fixed scale and zero point: the first
    op of a model that takes float images and quantizes them itself.

    Parameters
    ----------
    spec : QuantSpec
        Bits, signedness and rounding of the quantizer.
    qparams : QParams
        Scale and zero point, fixed (calibrated beforehand).

    Notes
    -----
    Input and output: float tensors of any shape; the output holds ``s·(q − z)``.
    """

    def __init__(self, spec: QuantSpec, qparams: QParams):
        super().__init__()
        self.spec, self.qparams = spec, qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.spec, self.qparams.scale, self.qparams.zero_point)


class Dequantizer(nn.Module):
    """What remains of the input quantizer when the data arrive as integer codes.

    Parameters
    ----------
    qparams : QParams
        Scale and zero point the codes were made with.
    axis : int, optional
        The channel axis of per-channel ``qparams`` (the spec's ``axis``); None for one
        scale and zero point.

    Notes
    -----
    Input: integer codes of any shape; output: float32 ``s·(q − z)``.
    """

    def __init__(self, qparams: QParams, axis: int | None = None):
        super().__init__()
        self.qparams, self.axis = qparams, axis

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize(q, self.qparams.scale, self.qparams.zero_point, axis=self.axis)


def with_input_quantizer(net: nn.Module, spec: QuantSpec, qparams: QParams) -> nn.Module:
    """``net`` preceded by an :class:`InputQuantizer`, in evaluation mode: fed float input."""
    return nn.Sequential(InputQuantizer(spec, qparams), net).eval()


def on_codes(net: nn.Module, qparams: QParams, axis: int | None = None) -> nn.Module:
    """``net`` preceded by a :class:`Dequantizer`, in evaluation mode: fed offline codes
    (``axis``: the channel axis of per-channel ``qparams``, as the spec that made them)."""
    return nn.Sequential(Dequantizer(qparams, axis), net).eval()


def quantize_offline(x: torch.Tensor, spec: QuantSpec, qparams: QParams, *,
                     seed: int | None = None) -> torch.Tensor:
    """Integer codes of ``x`` as a stored dataset holds them, one per byte.

    Parameters
    ----------
    x : torch.Tensor
        Float input, any shape.
    spec : QuantSpec
        At most :data:`MAX_CODE_BITS` bits.
    qparams : QParams
        Scale and zero point.
    seed : int, optional
        Drives STOCHASTIC rounding (required for it, ignored otherwise).

    Returns
    -------
    torch.Tensor
        Codes of ``x``'s shape: int8 for a signed spec, uint8 otherwise.

    Raises
    ------
    ValueError
        If ``spec.bits`` exceeds :data:`MAX_CODE_BITS`.
    """
    if spec.bits > MAX_CODE_BITS:
        raise ValueError(f"offline codes are stored one per byte (int8 or uint8); "
                         f"spec.bits={spec.bits} is too wide")
    codes = quantize(x, spec, qparams.scale, qparams.zero_point,
                     generator=seed if spec.rounding.is_random else None)
    return codes.to(torch.int8 if spec.signed else torch.uint8)
