"""Quantizing a network's input: inside the model, or offline as stored integer codes.

A model can take float images and quantize them itself (:class:`InputQuantizer` as its
first op), or take integer codes quantized beforehand and stored one per byte
(:func:`quantize_offline`), which it dequantizes on load (:class:`Dequantizer`). With the
same spec, scale and zero point (and the dequantizer's output in the float input's dtype)
the two give the model the same input values, ties between codes included (a zero may
differ in sign where the quantizer's block engine runs).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qerror._checks import check_seed, is_integer_dtype
from qerror.quantizer import (
    QParams,
    QuantSpec,
    check_qparams,
    dequantize,
    fake_quantize,
    quantize,
)

# Offline codes are stored one per byte (int8 or uint8).
MAX_CODE_BITS = 8


def _value_repr(value) -> str:
    """A scale or zero point for a module's repr: a scalar in full (the shortest text that
    reads back as the same number), per-channel values as their shape and range."""
    if isinstance(value, torch.Tensor):  # on any device, in any dtype (float64 holds all)
        value = value.detach().cpu()
        value = value.double() if value.is_floating_point() else value
    arr = np.asarray(value)
    if arr.ndim == 0:
        return repr(arr.item())
    if arr.size == 0:
        return f"{arr.shape} empty"
    lo, hi = arr.min().item(), arr.max().item()
    return f"{arr.shape} all {lo!r}" if lo == hi else f"{arr.shape} in [{lo:.6g}, {hi:.6g}]"


def _quantizer_repr(spec: QuantSpec, qparams: QParams) -> str:
    """The :meth:`~torch.nn.Module.extra_repr` of a module holding ``spec`` and ``qparams``:
    bits, signedness and rounding always, the spec's other fields where not their default,
    then the scale and zero point (:func:`_value_repr`)."""
    parts = [f"bits={spec.bits}", f"signed={spec.signed}", f"rounding={spec.rounding.value}"]
    default = QuantSpec()
    parts += [f"{name}={getattr(spec, name)}" for name in ("symmetric", "axis", "narrow")
              if getattr(spec, name) != getattr(default, name)]
    if spec.arithmetic != default.arithmetic:
        parts.append(f"arithmetic={spec.arithmetic.value}")
    parts += [f"scale={_value_repr(qparams.scale)}",
              f"zero_point={_value_repr(qparams.zero_point)}"]
    return ", ".join(parts)


def _require_tensor(value, what: str, var: str, other_hint: str, why: str) -> None:
    """TypeError unless ``value`` is a torch tensor, saying ``why`` and how to convert it
    (``torch.from_numpy(<var>)`` for a numpy array, ``other_hint`` otherwise)."""
    if isinstance(value, torch.Tensor):
        return
    given, hint = (("numpy.ndarray", f"torch.from_numpy({var})") if isinstance(value, np.ndarray)
                   else (type(value).__name__, other_hint))
    raise TypeError(f"{what} must be a torch.Tensor, got {given}: {why}; convert with {hint}")


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

    ``spec`` and ``qparams`` are held as given (Python or numpy numbers and arrays),
    as arguments of the module like a convolution's stride, not as tensors: no buffer or
    parameter holds them. So ``.to(device)``, ``.to(torch.float64)`` and ``.half()`` leave
    them exact (a float16 buffer would hold the scale 0.1 as 0.0999755859375 and move
    codes), ``copy.deepcopy`` and ``torch.save`` of the module keep them, and a
    ``state_dict`` holds none of them: a wrapped model's (:func:`with_input_quantizer`) is
    the network's alone, and loading one into a wrapper built with other ``qparams``
    matches every key and keeps that wrapper's. Save the spec and qparams beside the
    weights and build the wrapper from them.

    Raises
    ------
    TypeError
        A ``spec`` that is not a :class:`~qerror.QuantSpec`, or ``qparams`` that are not
        :class:`~qerror.QParams`.
    ValueError
        A random rounding (STOCHASTIC): the quantizer holds no seed, so it would draw other
        codes on every call; quantize stochastically offline (:func:`quantize_offline` with
        a seed) instead. A scale that is not positive and finite, a zero point off the
        spec's grid, or more than one of either for a per-tensor spec
        (:func:`qerror.quantizer.check_qparams`): every call would refuse them.
        Whether the scale is a normal number of the data's precision is the call's to
        check.
    """

    def __init__(self, spec: QuantSpec, qparams: QParams):
        super().__init__()
        # what every call would refuse is refused here (the precision the scale must be a
        # normal number of is the input's: the call checks that)
        check_qparams(spec, qparams)
        if spec.rounding.is_random:
            raise ValueError(f"an input quantizer rounds deterministically; {spec.rounding.value} "
                             "rounding needs a seed per call. Make stochastic codes offline "
                             "with quantize_offline(x, spec, qparams, seed=...) and feed them "
                             "through on_codes")
        self.spec, self.qparams = spec, qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.spec, self.qparams.scale, self.qparams.zero_point)

    def extra_repr(self) -> str:
        """The spec and qparams, as ``print(model)`` shows them (per-channel values as
        their shape and range)."""
        return _quantizer_repr(self.spec, self.qparams)


class Dequantizer(nn.Module):
    """What remains of the input quantizer when the data arrive as integer codes.

    Parameters
    ----------
    spec : QuantSpec
        The spec the codes were made with (:func:`quantize_offline`): its grid bounds the
        codes, its ``axis`` is the channel axis of per-channel ``qparams``.
    qparams : QParams
        Scale and zero point the codes were made with.
    dtype : torch.dtype
        Output dtype (default float32): that of the float input the codes stand for, to
        equal :class:`InputQuantizer` on it.

    Notes
    -----
    Input: integer codes of any shape, within the spec's ``[qmin, qmax]``; codes stored one
    per byte must be int8 for a signed spec and uint8 otherwise (the same bytes read with
    the other sign are other values). Output: ``s·(q − z)`` in ``dtype``. ``spec``,
    ``qparams`` and ``dtype`` are held as arguments, in no buffer: as for
    :class:`InputQuantizer`, ``.to(...)`` leaves them as given and a ``state_dict`` holds
    none of them.

    Raises
    ------
    TypeError
        A ``spec`` that is not a :class:`~qerror.QuantSpec`, ``qparams`` that are not
        :class:`~qerror.QParams`, or a ``dtype`` that is not a float dtype of torch's. On a
        call: codes that are not a torch tensor (a stored data set's numpy array:
        ``torch.from_numpy(q)`` first), or not of the byte dtype of the spec's sign.
    ValueError
        A scale that is not positive and finite, or not a normal number of the precision
        the dequantization computes in (float64 for ``dtype=torch.float64``, float32
        otherwise); a zero point off the spec's grid, or more than one scale or zero point
        for a per-tensor spec (:func:`qerror.quantizer.check_qparams`). Every call would
        refuse them.
    """

    def __init__(self, spec: QuantSpec, qparams: QParams, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        # parameters no quantizer of this spec could have made the codes with are refused
        # here, as quantize refuses them (dequantize alone would turn them into floats), and
        # so is what every call's dequantize would refuse
        check_qparams(spec, qparams, dequantize_to=dtype)
        self.spec, self.qparams, self.dtype = spec, qparams, dtype

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        _require_tensor(q, "codes", "q", "torch.as_tensor(q)",
                        "the Dequantizer is a model's first module")
        if q.dtype in (torch.int8, torch.uint8) and (q.dtype == torch.int8) != spec.signed:
            kind, stored = ("signed", "int8") if spec.signed else ("unsigned", "uint8")
            raise TypeError(f"codes of dtype {q.dtype} for a {kind} spec: its codes are "
                            f"stored as {stored}; read them as such")
        if q.numel() and is_integer_dtype(q.dtype):  # others: dequantize's TypeError
            # torch has no min or max of unsigned dtypes wider than a byte; float64 holds
            # their values exactly up to 2**53, far beyond any grid
            held = q.double() if q.dtype in (torch.uint16, torch.uint32, torch.uint64) else q
            lo, hi = int(held.min()), int(held.max())
            if lo < spec.qmin or hi > spec.qmax:
                raise ValueError(f"codes span [{lo}, {hi}], beyond the spec's grid [{spec.qmin}, "
                                 f"{spec.qmax}]: not codes this spec made")
        return dequantize(q, self.qparams.scale, self.qparams.zero_point, axis=spec.axis,
                          dtype=self.dtype)

    def extra_repr(self) -> str:
        """The spec, qparams and output dtype, as ``print(model)`` shows them (per-channel
        values as their shape and range)."""
        return f"{_quantizer_repr(self.spec, self.qparams)}, dtype={self.dtype}"


def with_input_quantizer(net: nn.Module, spec: QuantSpec, qparams: QParams) -> nn.Module:
    """``net`` preceded by an :class:`InputQuantizer`, in evaluation mode: fed float input.

    ``net`` itself is the result's second module, not a copy: it is put in evaluation mode
    too, and a later change to it (training, ``.train()``) is the result's."""
    return nn.Sequential(InputQuantizer(spec, qparams), net).eval()


def on_codes(net: nn.Module, spec: QuantSpec, qparams: QParams, *,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """``net`` preceded by a :class:`Dequantizer`, in evaluation mode: fed offline codes made
    with ``spec`` and ``qparams``, dequantized to ``dtype`` (that of the float input).

    ``net`` itself is the result's second module, not a copy: it is put in evaluation mode
    too (as by :func:`with_input_quantizer`, so that both can share one network)."""
    return nn.Sequential(Dequantizer(spec, qparams, dtype=dtype), net).eval()


def quantize_offline(x: torch.Tensor, spec: QuantSpec, qparams: QParams, *,
                     seed: int | None = None) -> torch.Tensor:
    """Integer codes of ``x`` as a stored dataset holds them, one per byte.

    Parameters
    ----------
    x : torch.Tensor
        Float input, any shape (a numpy array is refused: convert it with
        ``torch.from_numpy``).
    spec : QuantSpec
        At most :data:`MAX_CODE_BITS` bits.
    qparams : QParams
        Scale and zero point.
    seed : int, optional
        Drives STOCHASTIC rounding (required for it, ignored otherwise); an int from 0 to
        2**64 - 1.

    Returns
    -------
    torch.Tensor
        Codes of ``x``'s shape: int8 for a signed spec, uint8 otherwise.

    Raises
    ------
    TypeError
        If ``x`` is not a torch tensor (a numpy array: ``torch.from_numpy(x)`` first),
        ``spec`` is not a :class:`~qerror.QuantSpec`, ``qparams`` is not a
        :class:`~qerror.QParams`, or ``seed`` is neither None nor an int.
    ValueError
        If ``spec.bits`` exceeds :data:`MAX_CODE_BITS`, or ``seed`` is outside 0 to 2**64 - 1.
    """
    # quantize takes numpy arrays too, but the codes are returned as a tensor of bytes, the
    # input of Dequantizer and on_codes
    _require_tensor(x, "x", "x", "torch.as_tensor(x, dtype=torch.float32)",
                    "offline codes are returned as an int8 or uint8 tensor")
    if seed is not None:
        seed = check_seed(seed, "seed")
    check_qparams(spec, qparams)
    if spec.bits > MAX_CODE_BITS:
        raise ValueError(f"offline codes are stored one per byte (int8 or uint8); "
                         f"spec.bits={spec.bits} is too wide")
    codes = quantize(x, spec, qparams.scale, qparams.zero_point,
                     generator=seed if spec.rounding.is_random else None)
    return codes.to(torch.int8 if spec.signed else torch.uint8)
