"""Learned rounding (AdaRound): each weight rounded up or down to fit the layer's output.

Rounding to nearest minimises each weight's own error, not the error of the layer's output.
AdaRound [1]_ keeps the grid (every weight ends on ``floor(w/s)`` or ``floor(w/s) + 1``)
and learns, layer by layer, which of the two each weight takes:

* the choice is relaxed to ``h(V) = clip(sigmoid(V)·(ζ − γ) + γ, 0, 1)`` (the rectified
  sigmoid, ``ζ = 1.1``, ``γ = −0.1``), and the soft weight is
  ``w̃ = s · clamp(floor(w/s) + h(V), qmin, qmax)``; ``V`` starts where ``h(V) = frac(w/s)``,
  so the soft weight starts at ``w`` itself;
* ``V`` minimises, with Adam, the reconstruction loss ``‖W x + b − (W̃ x̃ + b)‖²`` on
  calibration images (the layer's output before its activation: the paper's asymmetric
  loss, its eq. 25, applies the activation function to both sides, which this one does not)
  plus ``λ Σ (1 − |2h(V) − 1|^β)``, a regulariser that pushes every
  ``h`` to 0 or 1 as ``β`` anneals from 20 to 2 after a warm-up without it;
* ``x`` is the layer's input in the float network, ``x̃`` its input in the network whose
  earlier layers already carry their learned rounding (*asymmetric* reconstruction, so a
  layer corrects part of the error it inherits); ``asymmetric=False`` uses ``x̃ = x``;
* the hard choice is ``V ≥ 0`` (``h(V) ≥ 1/2`` in exact arithmetic; ``h`` rounded to float32
  reads 1/2 for ``V`` within a few 1e-8 below 0); layers are processed in registration order
  (the order of :func:`qerror.nn.layer_names`).

The result's :attr:`AdaRoundResult.weights` has the type of
:func:`qerror.nn.propagate.quantize_weights`'s output, so ``measure(..., weights=...)`` and
``quantized_forward(..., weights=...)`` run the learned rounding like any rounding mode;
:func:`apply_rounding` turns up/down choices into weights for any other use.

Notes
-----
Weights are quantized with ``QuantSpec(bits, signed=True, symmetric=True, axis=0)`` (per
output channel) and the scale of :func:`qerror.calibrate` (min-max), as
:meth:`qerror.nn.propagate.QuantConfig.make` does. Activations stay float in the
reconstruction (weights-only AdaRound); the bias stays float.

A half-precision layer (float16, bfloat16) is reconstructed in float32: ``V``, the soft
weights, the layer's outputs on its inputs (the network's, in its dtype) and the loss; its
learned weights are in its dtype. Adam's steps on ``V`` held in bfloat16 are rounded away
(at ``lr = 1e-3``, every step for ``|V| ≥ 1/2``, whose half ulp is ``2^-9 > lr``; for
``|V| ≥ 1/4`` those below ``2^-10``), and its ``eps`` is 0 in float16.

The reconstruction loss is summed over output channels (features) and averaged over images
and spatial positions, the convention of BRECQ's released code [2]_ (other authors', after
the paper); ``λ`` is read against that scale. ``β`` decays linearly from ``beta[0]`` to
``beta[1]`` over the iterations after the warm-up (``round(warmup · iterations)`` steps, at
most all but the last; a single step after it takes ``beta[1]``); during the warm-up the
regulariser is off.

With zero iterations the hard choice is ``frac(w/s) ≥ 1/2``: round half *up*, which equals
:attr:`qerror.RoundingMode.NEAREST_EVEN` everywhere except at exact ties ``frac = 1/2``
(for float64 weights ``frac`` is that of the float64 quotient ``w/s``, which can put a
weight a few ulps from a tie on it, or across it).
The weights' final dequantization goes through :func:`qerror.fake_quantize`, so equal codes
give equal bits.

References
----------
.. [1] M. Nagel, R. A. Amjad, M. van Baalen, C. Louizos and T. Blankevoort, "Up or Down?
   Adaptive Rounding for Post-Training Quantization", ICML 2020, arXiv:2004.10568.
.. [2] Y. Li, R. Gong, X. Tan et al., "BRECQ: Pushing the Limit of Post-Training Quantization
   by Block Reconstruction", ICLR 2021, arXiv:2102.05426.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qerror._checks import check_count, check_seed, is_real
from qerror._progress import progress_bar
from qerror.calibration import calibrate
from qerror.nn._anatomy import (
    LAYERS,
    UnsupportedModelError,
    check_model,
    check_own_weight,
    eval_mode,
    forward_calls,
    iter_batches,
    model_device,
)
from qerror.nn.propagate import QuantizedWeights
from qerror.quantizer import QParams, QuantSpec, fake_quantize, quantize
from qerror.rounding import RoundingMode

__all__ = [
    "AdaRoundLayer",
    "AdaRoundResult",
    "AdaRoundSettings",
    "adaround",
    "adaround_weights",
    "apply_rounding",
    "rectified_sigmoid",
]

ZETA, GAMMA = 1.1, -0.1
MIN_BITS, MAX_BITS = 2, 8


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V)·(ζ − γ) + γ, 0, 1)`` with ``ζ = 1.1``, ``γ = −0.1``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_h(frac: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = frac`` for ``frac`` in ``[0, 1]``.

    Finite: ``sigmoid(V)`` lies in ``[1/12, 11/12]``. As ``ζ + γ = 1``,
    ``logit((frac − γ)/(ζ − γ)) = 2 atanh(2 (frac − 1/2)/(ζ − γ))``, which has the sign of
    ``frac − 1/2`` (0 at ``frac = 1/2``, so a tie starts up): the logit of the rounded
    quotient gave ``V < 0`` at ``frac = 1/2`` (``0.6 / 1.2000000000000002``).
    """
    return 2.0 * torch.atanh((frac - 0.5) * (2.0 / (ZETA - GAMMA)))


@dataclass(frozen=True)
class AdaRoundSettings:
    """What AdaRound ran with (the paper's defaults [1]_ except where noted).

    Parameters
    ----------
    bits : int
        Weight bits, 2 to 8.
    iterations : int
        Adam steps per layer (paper: 10 000); 0 keeps the initial choice (round half up).
    batch : int
        Images per step.
    images : int
        Calibration images used at most (paper: 1024); the first ones of ``batches``.
    lam : float
        Weight ``λ`` of the rounding regulariser (paper: 0.01).
    beta : tuple of float
        ``β`` at the end of the warm-up and at the last step (paper: 20 → 2).
    warmup : float
        Fraction of the iterations without the regulariser (paper: 0.2).
    lr : float
        Adam's learning rate for ``V`` (PyTorch's default 1e-3).
    asymmetric : bool
        Reconstruct from the input of the network with the earlier layers' learned rounding
        (``True``, the paper's choice) or from the float input.
    seed : int
        Seed of the minibatch draws, from 0 to 2**64 - 1.
    """

    bits: int
    iterations: int = 10_000
    batch: int = 32
    images: int = 1024
    lam: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr: float = 1e-3
    asymmetric: bool = True
    seed: int = 0

    def __post_init__(self):
        for name, low in (("bits", MIN_BITS), ("iterations", 0), ("batch", 1), ("images", 1)):
            check_count(getattr(self, name), name, low)
        check_seed(self.seed, "seed")
        if self.bits > MAX_BITS:
            raise ValueError(f"AdaRound supports {MIN_BITS} to {MAX_BITS} weight bits, got "
                             f"{self.bits!r}")
        if not is_real(self.lam) or not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        # |2h − 1|^β has an infinite slope at h = 1/2 for β < 1: a weight there would give
        # V a NaN gradient, and its output channel NaN choices (read as down)
        if not isinstance(self.beta, tuple) or len(self.beta) != 2 \
                or not all(is_real(b) and math.isfinite(b) and b >= 1 for b in self.beta):
            raise ValueError(f"beta must be two numbers >= 1 (start, end; the paper's 20 and "
                             f"2), got {self.beta!r}")
        if not isinstance(self.asymmetric, bool | np.bool_):
            raise ValueError(f"asymmetric must be True or False, got {self.asymmetric!r}")
        if not is_real(self.warmup) or not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not is_real(self.lr) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        # numpy's scalars are taken and kept as Python's: torch.Generator.manual_seed refuses
        # a numpy integer, and json the numpy values record() is to give as plain ones
        for name, kind in (("bits", int), ("iterations", int), ("batch", int), ("images", int),
                           ("seed", int), ("lam", float), ("warmup", float), ("lr", float),
                           ("asymmetric", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "beta", tuple(float(b) for b in self.beta))

    @property
    def spec(self) -> QuantSpec:
        """The weight grid: symmetric, signed, per output channel."""
        return QuantSpec(bits=int(self.bits), signed=True, symmetric=True, axis=0,
                         rounding=RoundingMode.NEAREST_EVEN)

    def beta_at(self, step: int) -> float | None:
        """``β`` of step ``step`` (0-based), or ``None`` during the warm-up: the first
        ``round(warmup · iterations)`` steps, at most all but the last. Then linear from ``beta[0]`` to ``beta[1]`` at
        the last step; a single step after the warm-up is the last and takes ``beta[1]``."""
        # rounded, but leaving at least one regularised step (0.95 of 10 rounds to all 10)
        start = min(round(self.warmup * self.iterations), max(self.iterations - 1, 0))
        if step < start:
            return None
        span = self.iterations - 1 - start
        rel = 1.0 if span <= 0 else min((step - start) / span, 1.0)
        return self.beta[0] + (self.beta[1] - self.beta[0]) * rel


@dataclass(frozen=True)
class AdaRoundLayer:
    """One layer's learned rounding.

    Attributes
    ----------
    up : torch.Tensor
        Boolean, the weight's shape: ``True`` where the weight is ``floor(w/s) + 1``
        (``V ≥ 0``).
    soft : torch.Tensor
        ``h(V)`` after the last step (in ``[0, 1]``), in the weight's dtype: ``soft ≥ 1/2``
        wherever ``up``, and also where ``V`` is negative by so little that ``h`` rounds
        to 1/2.
    loss_nearest, loss_learned : float
        Reconstruction loss on all calibration images with the initial choice (round half
        up) and with the learned one (both hard, both on ``x̃``).
    flipped : float
        Fraction of weights whose choice differs from round half up.
    seconds : float
        Wall time of the layer's optimisation.
    """

    name: str
    up: torch.Tensor
    soft: torch.Tensor
    loss_nearest: float
    loss_learned: float
    flipped: float
    seconds: float


@dataclass(frozen=True)
class AdaRoundResult:
    """Learned weights (``weights``, for :mod:`qerror.nn.propagate`), per-layer details and
    the settings, with ``images_used`` the number of calibration images actually used."""

    weights: dict[str, QuantizedWeights]
    layers: dict[str, AdaRoundLayer]
    settings: AdaRoundSettings
    images_used: int

    def record(self) -> dict:
        """The settings and per-layer numbers as plain values (for a JSON record)."""
        out = asdict(self.settings)
        out["beta"] = list(self.settings.beta)
        out["images_used"] = self.images_used
        out["reconstruction"] = "asymmetric" if self.settings.asymmetric else "symmetric"
        out["layers"] = {n: {"loss_nearest": r.loss_nearest, "loss_learned": r.loss_learned,
                             "flipped": r.flipped, "seconds": r.seconds}
                         for n, r in self.layers.items()}
        return out


def _scale_tensor(qp: QParams, w: torch.Tensor) -> torch.Tensor:
    """The per-channel scale the quantizer applies to ``w`` (rounded to float32 unless
    ``w`` is float64: :func:`qerror.fake_quantize`'s working precision), held in float64 and
    shaped to broadcast over ``w``. With it, ``floor(w / s)`` decides on the grid the weights
    end up on: the float64 quotient of two float32 numbers never rounds across an integer
    (their exact quotient is either an integer or at least 2^-48 of it away from one)."""
    s = np.asarray(qp.scale, dtype=np.float64)
    if w.dtype != torch.float64:
        s = s.astype(np.float32).astype(np.float64)
    return torch.as_tensor(s, dtype=torch.float64, device=w.device).reshape(
        (-1,) + (1,) * (w.ndim - 1))


def _floor_codes(w: torch.Tensor, qp: QParams, spec: QuantSpec) -> torch.Tensor:
    """``floor(w / s)`` as float64 codes, decided as :func:`qerror.quantize` decides FLOOR
    on the grid the weights are dequantized to: exactly, and a weight that equals a
    dequantized level ``fl(k·s)`` gets ``k`` (so the weight the calibration puts at ``qmax``
    stays there instead of going a step down). A weight below the level of ``qmin`` (scales
    that clip: never a symmetric min-max one) gets ``qmin − 1``, whatever it is below, so
    that ``clamp(floor + up, qmin, qmax)`` is ``qmin`` for either choice, as with its exact
    floor; one above ``qmax``'s level gets ``qmax``, which the clamp treats alike."""
    w = w.detach()
    codes = quantize(w, spec.replace(rounding=RoundingMode.FLOOR), qp.scale,
                     qp.zero_point).to(torch.float64)
    lowest = _on_grid(w, qp, spec, torch.full_like(codes, float(spec.qmin)),
                      torch.zeros_like(codes))
    return torch.where(w < lowest, codes - 1, codes)


def apply_rounding(weight: torch.Tensor, qparams: QParams, up: torch.Tensor,
                   spec: QuantSpec) -> torch.Tensor:
    """Weights ``s · clamp(floor(w/s) + up, qmin, qmax)`` in ``weight``'s dtype.

    ``w/s`` is computed in float64 and the codes are dequantized by
    :func:`qerror.fake_quantize`, so each weight equals, bit for bit, what ``fake_quantize``
    gives for the same code.

    Raises
    ------
    ValueError
        ``up`` does not have the weight's shape or holds other values than 0 and 1,
        ``spec`` is not symmetric per channel, or the weight holds NaN or Inf.
    TypeError
        ``weight`` is not a torch tensor.
    """
    if not spec.symmetric or spec.axis != 0:
        raise ValueError("apply_rounding expects a symmetric per-output-channel spec (axis=0)")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}; convert "
                        "a numpy array with torch.from_numpy")
    bad = int((~torch.isfinite(weight.detach())).sum())
    if bad:  # quantize's own check would name it "x"
        raise ValueError(f"weight holds {bad} non-finite value(s): a NaN or Inf has no "
                         "floor/ceil pair to round to; fix or reload the weight")
    up = torch.as_tensor(up)
    if up.shape != weight.shape:
        raise ValueError(f"up has shape {tuple(up.shape)}, the weight {tuple(weight.shape)}")
    if up.dtype != torch.bool and not bool(((up == 0) | (up == 1)).all()):
        # 2 or -1 put a weight off its floor/ceil pair, which is no rounding of it
        raise ValueError("up must hold up/down choices: booleans, or 0 and 1")
    w = weight.detach()
    return _on_grid(w, qparams, spec, _floor_codes(w, qparams, spec), up)


def _on_grid(w: torch.Tensor, qp: QParams, spec: QuantSpec, floor: torch.Tensor,
             up: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rounding` given ``w``'s floor codes (:func:`_floor_codes`), which
    :func:`adaround` computes once per layer."""
    s = _scale_tensor(qp, w)
    codes = torch.clamp(floor + up.to(torch.float64), spec.qmin, spec.qmax)
    on_grid = (codes * s).to(w.dtype)  # code·s: exactly `codes` again after rounding w/s
    return fake_quantize(on_grid, spec, qp.scale, qp.zero_point)


class _Stop(Exception):
    pass


def _calls_per_forward(model: nn.Module, layers: list[tuple[str, nn.Module]],
                       x: torch.Tensor) -> None:
    """Refuse, before any layer is optimised, a layer the forward pass of ``x`` does not call
    exactly once: its input would be that of its first call alone."""
    calls = forward_calls(model, layers, x)
    wrong = [f"{name!r} ({n} calls)" for name, n in calls.items() if n != 1]
    if wrong:
        raise UnsupportedModelError(
            f"adaround learns each layer's rounding on its input, and needs every conv/linear "
            f"layer called exactly once per forward pass: {', '.join(wrong[:5])}"
            f"{' ...' if len(wrong) > 5 else ''}; give each call its own module (or remove "
            "the unused ones)")


def _layer_inputs(model: nn.Module, name: str, layer: nn.Module, x: torch.Tensor,
                  chunk: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The input of ``layer`` for images ``x``, with ``weights`` replacing some layers'."""
    got = []

    def hook(module, args):
        got.append(args[0].detach())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    params = {k + ".weight": w for k, w in weights.items()}
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                try:
                    torch.func.functional_call(model, params, (x[i:i + chunk],))
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(got) != math.ceil(x.shape[0] / chunk):
        raise ValueError(f"layer {name!r} was not called once per forward pass")
    return torch.cat(got)


def _reconstruction(out: torch.Tensor, target: torch.Tensor, conv: bool) -> torch.Tensor:
    """Squared error summed over the output channels (dim 1 of a convolution's output, the
    last dim of a linear layer's, whatever its leading dims), averaged over the rest."""
    return (out - target).pow(2).sum(1 if conv else -1).mean()


def _optimise(layer: nn.Module, s: torch.Tensor, floor: torch.Tensor, v0: torch.Tensor,
              x: torch.Tensor, xq: torch.Tensor, spec: QuantSpec,
              cfg: AdaRoundSettings, gen: torch.Generator) -> torch.Tensor:
    """``V`` after ``cfg.iterations`` Adam steps, in ``v0``'s dtype, which the layer's
    outputs and the loss are computed in too (``x`` and ``xq`` are given in it)."""
    conv = isinstance(layer, nn.Conv2d)
    work = v0.dtype
    w = layer.weight.detach().to(work)
    b = None if layer.bias is None else layer.bias.detach().to(work)

    def op(inp, weight):
        return layer._conv_forward(inp, weight, b) if conv else F.linear(inp, weight, b)

    v = v0.clone().requires_grad_(True)
    if cfg.iterations == 0:
        return v.detach()
    s_w, floor_w = s.to(work), floor.to(work)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    n = x.shape[0]
    for step in range(cfg.iterations):
        idx = torch.randint(n, (min(cfg.batch, n),), generator=gen) if cfg.batch < n \
            else torch.arange(n)
        with torch.no_grad():
            target = op(x[idx], w)
        h = rectified_sigmoid(v)
        soft = s_w * torch.clamp(floor_w + h, spec.qmin, spec.qmax)
        loss = _reconstruction(op(xq[idx], soft), target, conv)
        beta = cfg.beta_at(step)
        if beta is not None and cfg.lam > 0:
            loss = loss + cfg.lam * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return v.detach()


def _quantized(w: torch.Tensor, qp: QParams, floor: torch.Tensor, up: torch.Tensor,
               spec: QuantSpec) -> QuantizedWeights:
    wq = _on_grid(w, qp, spec, floor, up)
    s = _scale_tensor(qp, w)
    raw = floor + up.double()
    e = (wq.double() - w.double()) / s
    sat = float(((raw < spec.qmin) | (raw > spec.qmax)).double().mean())
    return QuantizedWeights(wq, qp, float(e.mean()), float((e * e).mean()), sat)


def adaround(model: nn.Module, batches: Iterable, bits: int = 4, *, iterations: int = 10_000,
             batch: int = 32, images: int = 1024, lam: float = 0.01,
             beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, lr: float = 1e-3,
             asymmetric: bool = True, seed: int = 0, progress: bool = False) -> AdaRoundResult:
    """Learn the up/down rounding of every conv/linear weight, layer by layer.

    Parameters
    ----------
    model : nn.Module
        A torchvision-style CNN that :func:`qerror.nn.check_model` accepts; evaluation mode
        for the run (restored afterwards), its parameters untouched.
    batches : iterable
        Calibration images ``(N, ...)`` or ``(images, labels)`` pairs (never the test split).
    bits : int
        Weight bits, 2 to 8.
    iterations, batch, images, lam, beta, warmup, lr, asymmetric, seed
        See :class:`AdaRoundSettings`.
    progress : bool
        A progress bar over the layers.

    Returns
    -------
    AdaRoundResult
        ``weights`` (layer name → :class:`qerror.nn.QuantizedWeights`, for
        ``measure``/``quantized_forward``), ``layers`` (choices, soft values, losses, time),
        the settings and the number of images used.

    Raises
    ------
    ValueError
        Bits outside 2..8, a bad setting, no calibration images, or a layer whose weight is
        not its own parameter of the model (``torch.nn.utils.prune``, ``weight_norm``) or is
        tied to another's (refused before any forward pass), or a non-finite parameter or
        buffer of the model (refused before any layer is learned).
    FloatingPointError
        A layer's input not finite on the calibration images (an overflow), or rounding
        variables that became non-finite.
    TypeError
        ``bits``, ``iterations``, ``batch``, ``images`` or ``seed`` is not an integer (a
        bool, or a float even when integral).
    qerror.nn.UnsupportedModelError
        A model :func:`qerror.nn.check_model` refuses, or a conv/linear layer not called
        exactly once per forward pass (checked on one image before any layer is learned).
    """
    cfg = AdaRoundSettings(bits=bits, iterations=iterations, batch=batch, images=images,
                           lam=lam, beta=tuple(beta) if isinstance(beta, Iterable) else beta,
                           warmup=warmup, lr=lr, asymmetric=asymmetric, seed=seed)
    check_model(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]
    for name, layer in layers:  # before any forward pass
        check_own_weight(model, name, layer,
                         computed="the later layers would be reconstructed from its float weight "
                                  "instead of its learned rounding",
                         tied="AdaRound learns one rounding per layer, which would give that one "
                              "parameter two; give each layer its own copy")
    spec = cfg.spec
    xs, have = [], 0
    for x, _ in iter_batches(batches, model_device(model)):
        xs.append(x[:cfg.images - have])
        have += xs[-1].shape[0]
        if have >= cfg.images:
            break
    if have == 0:
        raise ValueError("adaround needs at least one calibration image")
    x_all = torch.cat(xs)
    gen = torch.Generator().manual_seed(cfg.seed)
    chunk = max(cfg.batch, 256)
    done: dict[str, torch.Tensor] = {}
    weights: dict[str, QuantizedWeights] = {}
    details: dict[str, AdaRoundLayer] = {}
    # gradients are needed for V whatever the caller's mode (no_grad, inference_mode)
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x_all = x_all.clone()  # a tensor made under inference mode cannot be saved for backward
        _calls_per_forward(model, layers, x_all[:1])
        for name, layer in layers:  # before hours of earlier layers' optimisation
            bad = int((~torch.isfinite(layer.weight.detach())).sum())
            if bad:
                raise ValueError(f"layer {name!r} holds {bad} non-finite weight(s); AdaRound "
                                 "rounds finite weights only: fix or reload the model")
        # a NaN bias or BatchNorm statistic makes the later layers' inputs NaN, whose NaN
        # rounding variables were blamed on lr and lam (or, with no steps, gave NaN losses)
        bad = [n for n, t in (*model.named_parameters(), *model.named_buffers())
               if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
        if bad:
            raise ValueError(f"the model's {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                             "hold(s) non-finite values, which reach the layers' inputs; fix or "
                             "reload the model")
        for name, layer in progress_bar(layers, progress, "adaround"):
            t0 = time.perf_counter()
            w = layer.weight.detach()
            # V, the soft weights and the loss in float32 at least: in a half-precision
            # dtype Adam's steps vanish (bfloat16: below half an ulp, 2^-9 for |V| >= 1/2) or its
            # eps underflows to 0 (float16: 0/0 on the first step)
            work = torch.promote_types(w.dtype, torch.float32)
            qp = calibrate(w, spec)
            s = _scale_tensor(qp, w)
            u = w.double() / s
            floor = _floor_codes(w, qp, spec)
            # a weight on a level (fl(k·s) = w) gets k with w/s an ulp below k: fraction 0
            v0 = _inverse_h(torch.clamp(u - floor, 0.0, 1.0)).to(work)
            x = _layer_inputs(model, name, layer, x_all, chunk, {}).to(work)
            xq = _layer_inputs(model, name, layer, x_all, chunk, done).to(work) \
                if cfg.asymmetric and done else x
            for what, inp in (("float", x), ("learned-rounding", xq)):
                if not bool(torch.isfinite(inp).all()):
                    raise FloatingPointError(
                        f"layer {name!r}: its input in the {what} network is not finite on the "
                        f"calibration images (an overflow in {w.dtype}?); AdaRound needs "
                        "finite inputs: check the model in float32 on these images")
            v = _optimise(layer, s, floor, v0, x, xq, spec, cfg, gen)
            if not bool(torch.isfinite(v).all()):
                raise FloatingPointError(f"layer {name!r}: the rounding variables became "
                                         "non-finite during the optimisation (a NaN reads as "
                                         "'down'); lower lr or lam")
            up, up0 = v >= 0, v0 >= 0
            qw = _quantized(w, qp, floor, up, spec)
            with torch.no_grad():
                b = None if layer.bias is None else layer.bias.to(work)
                conv = isinstance(layer, nn.Conv2d)

                def op(inp, weight, b=b, conv=conv, layer=layer):
                    return layer._conv_forward(inp, weight, b) if conv else F.linear(inp, weight, b)

                target = op(x, w.to(work))
                l0 = float(_reconstruction(
                    op(xq, _on_grid(w, qp, spec, floor, up0).to(work)), target, conv))
                l1 = float(_reconstruction(op(xq, qw.weight.to(work)), target, conv))
            weights[name] = qw
            done[name] = qw.weight
            details[name] = AdaRoundLayer(name, up, rectified_sigmoid(v).to(w.dtype), l0, l1,
                                          float((up != up0).double().mean()),
                                          time.perf_counter() - t0)
    return AdaRoundResult(weights, details, cfg, int(x_all.shape[0]))


def adaround_weights(model: nn.Module, batches: Iterable, bits: int = 4,
                     **kwargs) -> dict[str, QuantizedWeights]:
    """:func:`adaround`'s learned weights alone: the ``weights=`` argument of
    :func:`qerror.nn.propagate.measure` and :func:`~qerror.nn.propagate.quantized_forward`
    (with a ``QuantConfig`` whose weight spec has the same ``bits``)."""
    return adaround(model, batches, bits, **kwargs).weights
