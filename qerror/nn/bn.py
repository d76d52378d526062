"""BatchNorm under quantization: how inconsistent its statistics become.

A BatchNorm layer in evaluation mode normalises with running statistics estimated on float
activations. When the layers before it are quantized, the statistics of its input move; the
layer keeps normalising with the old ones. DESIGN §2 measures this per channel ``c``:

* normalised mean shift ``(μ_c − μ_run,c) / σ_run,c``,
* variance ratio ``σ²_c / σ²_run,c``,

once for the batch statistics of the float input and once for the quantized input, so that
plain data shift (the float figures: test images are not the training images) is separated
from the part due to quantization (``(μ_q − μ_f)/σ_run`` and ``σ²_q/σ²_f``). The remedy,
re-estimating the statistics on the quantized network, is
:func:`qerror.nn.correction.reestimate_bn`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["BNInconsistency", "estimate_running_stats", "running_stats"]


def _gmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.exp(np.mean(np.log(x)))) if x.size else math.nan


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.mean(x)) if x.size else math.nan


def _rms(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x * x))) if x.size else math.nan


@dataclass(frozen=True)
class BNInconsistency:
    """Per-channel inconsistency of one BatchNorm layer; arrays have shape (C,).

    Attributes
    ----------
    mean_shift_float, mean_shift_quant : ndarray
        ``(μ − μ_run)/σ_run`` of the float and of the quantized input, each against the
        running statistics its own path normalises with (the float path always the model's;
        the quantized path re-estimated ones where they were given).
    var_ratio_float, var_ratio_quant : ndarray
        ``σ² / σ²_run`` of the float and of the quantized input, likewise.
    mean_shift_quant_vs_float : ndarray
        ``(μ_q − μ_f)/σ_run``: the shift due to quantization alone, in the quantized path's
        ``σ_run``.
    var_ratio_quant_vs_float : ndarray
        ``σ²_q / σ²_f``.
    """

    mean_shift_float: np.ndarray = field(repr=False)
    mean_shift_quant: np.ndarray = field(repr=False)
    var_ratio_float: np.ndarray = field(repr=False)
    var_ratio_quant: np.ndarray = field(repr=False)
    mean_shift_quant_vs_float: np.ndarray = field(repr=False)
    var_ratio_quant_vs_float: np.ndarray = field(repr=False)

    @classmethod
    def from_stats(cls, mean_f, var_f, mean_q, var_q, mean_run, var_run, mean_run_f=None,
                   var_run_f=None) -> BNInconsistency:
        """From per-channel batch means and (population) variances of both inputs, against
        the running statistics the quantized path normalises with (``mean_run``,
        ``var_run``) and those of the float path (``mean_run_f``, ``var_run_f``; the same
        unless given, e.g. after BatchNorm re-estimation of the quantized path only)."""
        if mean_run_f is None:
            mean_run_f, var_run_f = mean_run, var_run
        arrs = [np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
                for a in (mean_f, var_f, mean_q, var_q, mean_run, var_run, mean_run_f,
                          var_run_f)]
        mean_f, var_f, mean_q, var_q, mean_run, var_run, mean_run_f, var_run_f = arrs
        sd, sd_f = np.sqrt(var_run), np.sqrt(var_run_f)
        with np.errstate(divide="ignore", invalid="ignore"):
            return cls((mean_f - mean_run_f) / sd_f, (mean_q - mean_run) / sd,
                       var_f / var_run_f, var_q / var_run, (mean_q - mean_f) / sd,
                       var_q / var_f)

    def summary(self) -> dict[str, float]:
        """Channel summaries: RMS and mean of the shifts, geometric means of the ratios.

        Channels whose running variance is 0 (dead channels) give no finite figure against
        the running statistics and are left out of those summaries (the shifts, and the
        float and quantized variance ratios); the quantized-vs-float variance ratio
        ``σ²_q/σ²_f`` does not use the running statistics and keeps them. Ratios of 0 or
        infinity are left out of the geometric means, which they would make 0 or infinite
        whatever the other channels do, and counted instead, so that they show in the
        summary: the channels whose variance quantization collapsed (``σ²_q = 0 < σ²_f``,
        ``bn_var_collapsed_qf_count``) and those whose variance it created from a constant
        float input (``σ²_f = 0 < σ²_q``, ``bn_var_created_qf_count``).
        """
        return {
            "bn_mean_shift_float_rms": _rms(self.mean_shift_float),
            "bn_mean_shift_quant_rms": _rms(self.mean_shift_quant),
            "bn_mean_shift_qf_rms": _rms(self.mean_shift_quant_vs_float),
            "bn_mean_shift_qf_mean": _mean(self.mean_shift_quant_vs_float),
            "bn_var_ratio_float_gmean": _gmean(self.var_ratio_float),
            "bn_var_ratio_quant_gmean": _gmean(self.var_ratio_quant),
            "bn_var_ratio_qf_gmean": _gmean(self.var_ratio_quant_vs_float),
            "bn_var_collapsed_qf_count": float(np.sum(self.var_ratio_quant_vs_float == 0)),
            "bn_var_created_qf_count": float(np.sum(np.isposinf(self.var_ratio_quant_vs_float))),
        }


def running_stats(model: nn.Module) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of the model's own BatchNorm running statistics, by name (copies: a later
    re-estimation, which writes the buffers in place, leaves them as they were)."""
    return {n: (m.running_mean.detach().clone(), m.running_var.detach().clone())
            for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def estimate_running_stats(model: nn.Module, inputs: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics, in place, by estimates from its input
    (PyTorch's ``update_bn`` procedure).

    Each ``BatchNorm2d`` is reset and set to a cumulative average (``momentum=None``, which
    it keeps), and the model runs on each input batch (shape ``(N, C, H, W)``, ``N >= 2``)
    without gradients with those BatchNorms alone in training mode (dropout and any other
    layer as in evaluation), and is left in evaluation mode. The running mean is then the
    average of the batches' means and the running variance the average of their unbiased
    variances: every batch weighs the same whatever its size, the spread of the batch means
    is left out, and each BatchNorm's input is taken with the earlier ones normalising by
    their batch's statistics. That is close to the statistics of the whole input for large
    batches of one size, and not equal to them. An untrained network (a smoke test's, what
    this serves) then normalises with statistics that fit its activations instead of the
    initial 0 and 1, which would let them grow through the depth; for measurements,
    :func:`qerror.nn.correction.reestimate_bn` gives the statistics of the whole input,
    merged exactly across batches.

    Raises
    ------
    ValueError
        ``inputs`` holds no batch. Then, or when a batch fails, the model is left as it
        was (statistics, momenta and modes).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m, m.momentum, {k: v.detach().clone() for k, v in m.state_dict().items()})
             for m in bns]
    modes = [(m, m.training) for m in model.modules()]
    seen = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.eval()
        for m in bns:
            m.train()
        with torch.no_grad():
            for x in inputs:
                model(x)
                seen += 1
        if not seen:
            raise ValueError("estimate_running_stats needs at least one input batch; the "
                             "model's statistics are left as they were")
    except BaseException:
        for m, momentum, state in saved:
            m.load_state_dict(state)
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
        raise
    model.eval()
