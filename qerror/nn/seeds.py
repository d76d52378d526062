"""The network claims measured on one trained network, so they can be decided over many.

One seed of one network decides a network claim only for itself. :func:`network_statements`
measures, on one network, every quantity the ledger's network claims N1–N4 speak of, for
each width and rounding mode, as one tidy table; a caller measures many seeds (trained,
true labels) and decides each claim on the distribution across them
(:func:`fraction_holding`).

The quantities, per width ``b`` and mode ``m`` (weights and activations quantized):

``drift_deep``
    the per-channel mean error relative to the float activation's std, sampling noise
    removed (``drift_rel_rms_channel_debiased``), at the deepest convolution's output (N1);
``growth_lo``, ``growth``, ``growth_ac1``
    the exponent ``p`` of ``drift ∝ depth^p`` over the convolutions, the lower end of its
    moving-block bootstrap interval, and the lag-1 autocorrelation of the fit's residuals
    (the interval holds its level when that is near 0; N1);
``bn_worst``
    the largest BatchNorm inconsistency caused by quantization, over layers: the RMS over
    channels of ``(μ_q − μ_f)/σ_run`` or ``|log|`` of the geometric mean of ``σ²_q/σ²_f``,
    whichever is larger (N2);
``sat_first``, ``sat_last``
    the share of elements clamped at the top of the range (their rounded value beyond the
    top code) at the first and at the last quantized layer's input (N3);
``accuracy``
    top-1 accuracy against the true labels, and ``float_accuracy`` (N4).

:func:`image_outcomes` gives, for the same widths and modes, which test images the quantized
network classifies correctly, so that an accuracy difference can be decided with the test
images random as well as the seeds (:func:`qerror.stats.crossed_mean_test`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from qerror.nn._anatomy import eval_mode
from qerror.nn.growth import layer_block_bootstrap
from qerror.nn.propagate import QuantConfig, calibrate_activations, measure, paired_forward
from qerror.rounding import RoundingMode
from qerror.stats import wilson_ci

__all__ = ["STATEMENT_MODES", "fraction_holding", "image_outcomes", "network_statements",
           "statement_values"]

#: The modes the network claims compare: round-to-nearest and the two biased ones.
STATEMENT_MODES = (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR)


def _bn_worst(res) -> float:
    """The largest BatchNorm inconsistency over the result's BatchNorm sites (module
    docstring); a channel whose quantized variance collapsed to 0 or blew up counts as
    inconsistent without bound (inf); NaN where no BatchNorm figure could be measured."""
    worst, seen = 0.0, False
    for s in res.sites:
        if s.kind != "bn" or s.bn is None:
            continue
        shift = s.bn.mean_shift_quant_vs_float
        ratio = s.bn.var_ratio_quant_vs_float
        shift = shift[np.isfinite(shift)]
        ratio = ratio[~np.isnan(ratio)]
        if shift.size:
            seen = True
            worst = max(worst, float(np.sqrt(np.mean(shift * shift))))
        if ratio.size:
            seen = True
            if ((ratio <= 0) | np.isinf(ratio)).any():
                return math.inf
            worst = max(worst, abs(float(np.mean(np.log(ratio)))))
    return worst if seen else math.nan


def statement_values(res, *, seed: int = 0) -> dict[str, float]:
    """The quantities of the module docstring from one :func:`qerror.nn.propagate.measure`
    result (weights and activations quantized, labelled batches).

    The growth fit is the moving-block bootstrap over the convolutions
    (:func:`qerror.nn.growth.layer_block_bootstrap`, 95 %, 1000 resamples, ``seed``).
    """
    convs = [s for s in res.layers() if s.kind == "conv" and s.path_depth is not None]
    if not convs:
        raise ValueError("the claims' drift and growth quantities are those of the "
                         "convolutions, and the result has none with a path depth; measure "
                         "a convolutional network that torch.fx can trace")
    layers = res.layers()
    fit = layer_block_bootstrap([s.path_depth for s in convs],
                                [s.drift_rel_rms_channel_debiased for s in convs],
                                level=0.95, resamples=1000, seed=seed)
    logits = res.logits
    if logits.float_correct is None:
        raise ValueError("the result has no labels; measure labelled batches for the "
                         "accuracy quantities")
    values = {
        "drift_deep": convs[-1].drift_rel_rms_channel_debiased,
        "growth": fit.exponent, "growth_lo": fit.lo, "growth_ac1": fit.residual_ac1,
        "bn_worst": _bn_worst(res),
        "sat_first": layers[0].saturation_high, "sat_last": layers[-1].saturation_high,
        "accuracy": logits.quant_correct / logits.n,
        "float_accuracy": logits.float_correct / logits.n,
    }
    return {k: float(v) for k, v in values.items()}


def network_statements(model: nn.Module, calib: torch.Tensor, test: torch.Tensor,
                       labels: torch.Tensor, *, bits=(8, 6, 4), modes=STATEMENT_MODES,
                       batch: int = 256, seed: int = 0) -> pd.DataFrame:
    """Every quantity of the network claims N1–N4, measured on one network.

    Parameters
    ----------
    model : torch.nn.Module
        A trained network with BatchNorm (evaluation mode is used; the model is unchanged).
    calib : torch.Tensor
        Calibration images for the activation ranges (not test images).
    test, labels : torch.Tensor
        Test images and their true labels.
    bits : sequence of int
        Widths of weights and activations.
    modes : sequence of RoundingMode
    batch : int
        Images per paired batch.
    seed : int
        Seed of the bootstrap (and of stochastic rounding, if asked for).

    Returns
    -------
    pandas.DataFrame
        One row per (bits, mode, quantity): columns ``bits``, ``mode``, ``quantity``,
        ``value``; quantities as in the module docstring.
    """
    batches = _batches(test, labels, batch)
    rows = []
    with eval_mode(model):
        for b in bits:
            act = _ranges(model, calib, b)
            for mode in modes:
                mode = RoundingMode.parse(mode)
                res = measure(model, batches, QuantConfig.make(b, mode, seed=seed), act)
                rows += [{"bits": int(b), "mode": mode.value, "quantity": k, "value": v}
                         for k, v in statement_values(res, seed=seed).items()]
    return pd.DataFrame(rows)


def image_outcomes(model: nn.Module, calib: torch.Tensor, test: torch.Tensor,
                   labels: torch.Tensor, *, bits=(8, 6, 4), modes=STATEMENT_MODES,
                   batch: int = 256, seed: int = 0) -> pd.DataFrame:
    """Which test images the quantized network classifies correctly, per width and mode.

    The quantized networks are those :func:`network_statements` measures with the same
    arguments (activation ranges calibrated on ``calib`` per width, weights and activations
    quantized, ``seed`` for stochastic rounding), run by
    :func:`qerror.nn.propagate.paired_forward`, the paired pass of
    :func:`qerror.nn.propagate.measure` without its statistics: each width and mode's count
    of correct images is its ``accuracy`` times the number of images (tested).

    Returns
    -------
    pandas.DataFrame
        One row per (bits, mode, image): columns ``bits``, ``mode``, ``image`` (the index in
        ``test``) and ``correct`` (bool); the float network's own row per image under
        ``mode`` ``"float"`` (once, with ``bits`` 0).
    """
    batches = _batches(test, labels, batch)
    frames, float_correct = [], []
    with eval_mode(model), torch.no_grad():
        for b in bits:
            act = _ranges(model, calib, b)
            for mode in modes:
                mode = RoundingMode.parse(mode)
                correct, first = [], not frames  # the float half: once is enough
                with paired_forward(model, QuantConfig.make(b, mode, seed=seed), act):
                    for x, y in batches:
                        out = model(torch.cat([x, x]))
                        correct.append(out[len(x):].argmax(1) == y)
                        if first:
                            float_correct.append(out[:len(x)].argmax(1) == y)
                frames.append(_outcome_frame(int(b), mode.value, correct))
    return pd.concat([_outcome_frame(0, "float", float_correct), *frames], ignore_index=True)


def _outcome_frame(bits: int, mode: str, correct: list[torch.Tensor]) -> pd.DataFrame:
    c = torch.cat(correct).cpu().numpy().astype(bool)
    return pd.DataFrame({"bits": bits, "mode": mode, "image": np.arange(c.size), "correct": c})


def _batches(test: torch.Tensor, labels: torch.Tensor, batch: int) -> list:
    if len(test) != len(labels):
        raise ValueError(f"{len(test)} test images but {len(labels)} labels")
    return [(test[i:i + batch], labels[i:i + batch]) for i in range(0, len(test), batch)]


def _ranges(model: nn.Module, calib: torch.Tensor, bits: int):
    """The activation ranges of ``bits``-wide activations, calibrated on ``calib``."""
    return calibrate_activations(model, [calib], QuantConfig.make(bits).activation)


def fraction_holding(holds, alpha: float = 0.05):
    """How many of the seeds a statement holds on, with its Wilson interval.

    Parameters
    ----------
    holds : array of bool, one per seed
    alpha : float
        1 − the interval's confidence level.

    Returns
    -------
    qerror.stats.StatResult
        :func:`qerror.stats.wilson_ci` of ``sum(holds)`` of ``len(holds)``.
    """
    h = np.asarray(holds)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"holds must be a non-empty 1-D array of booleans, got shape {h.shape}")
    if h.dtype != bool:  # a NaN would read as True
        raise TypeError(f"holds must be booleans (one per seed), got dtype {h.dtype}; compare "
                        "the seeds' values first, deciding what a NaN means")
    return wilson_ci(int(h.sum()), int(h.size), alpha)
