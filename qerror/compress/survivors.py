"""Rounding a pruned network's weights: what a rounding mode does to the weights that survive.

Pruning leaves fewer and larger weights; quantizing them afterwards puts each surviving
weight on a grid whose step is set by the largest magnitude in its channel. A pruned weight
(an exact zero) stays zero under every mode with zero point 0, so the rounding error lives
in the survivors alone, and truncation can zero more of them (those below one step): the
network becomes sparser than the pruning made it. :func:`quantize_survivors` quantizes every
convolution and linear weight with one :class:`~qerror.quantizer.QuantSpec` and reports the
error over the survivors only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from qerror._checks import check_seed
from qerror.calibration import calibrate
from qerror.quantizer import QuantSpec, check_spec, fake_quantize


@dataclass(frozen=True)
class SurvivorQuantization:
    """A copy of a model with fake-quantized weights, and the error over its survivors.

    Attributes
    ----------
    model : torch.nn.Module
        Deep copy of the input model, every ``Conv2d``/``Linear`` weight fake-quantized.
    layers : pandas.DataFrame
        One row per layer: ``layer``, ``n`` (weights), ``survivors`` (nonzero before
        quantization), ``zeroed`` (survivors that quantized to 0), ``bias_lsb``,
        ``mse_lsb``, ``mae_lsb`` (error ``ŵ − w`` of the survivors, in units of their
        channel's step), ``shrink_lsb`` (mean of ``−sign(w)·(ŵ − w)``: how far the
        survivors move toward zero, +1/2 for truncation under the uniform model, 0 for
        nearest) and ``mean_abs_lsb`` (mean ``|w|`` of the survivors in steps).
    """

    model: nn.Module
    layers: pd.DataFrame

    @property
    def survivors(self) -> int:
        return int(self.layers.survivors.sum())

    @property
    def zeroed(self) -> int:
        return int(self.layers.zeroed.sum())

    def pooled(self, column: str) -> float:
        """A per-layer mean column pooled over all survivors (weighted by their count); a
        layer without survivors (its mean NaN) adds nothing, NaN when no layer has any."""
        w = self.layers.survivors.to_numpy(np.float64)
        alive = w > 0
        return float(np.sum(self.layers[column].to_numpy()[alive] * w[alive]) / w.sum()) \
            if w.sum() else float("nan")


def quantize_survivors(model: nn.Module, spec: QuantSpec, *, seed: int = 0
                       ) -> SurvivorQuantization:
    """Fake-quantize every conv/linear weight of a (pruned) model with ``spec``.

    Parameters
    ----------
    model : torch.nn.Module
        Left unchanged.
    spec : QuantSpec
        Must be symmetric (zero point 0), so that a pruned zero stays zero under any mode;
        per-channel along axis 0 is the usual choice. The scale of each weight is
        calibrated on that weight with the default (min-max) range policy, zeros included
        (they do not move a min-max range).
    seed : int
        Seeds stochastic rounding (layer ``i`` gets ``SeedSequence([seed, i])``); an int
        from 0 to 2**64 - 1.

    Returns
    -------
    SurvivorQuantization

    Raises
    ------
    TypeError
        ``model`` is not a torch module, ``spec`` not a QuantSpec, or ``seed`` not an int.
    ValueError
        An affine or unsigned spec, a model without conv/linear layers, or ``seed`` outside 0
        to 2**64 - 1.

    Notes
    -----
    Errors are in LSB, ``ε = (ŵ − w)/s`` with ``s`` the weight's channel step, averaged over
    the survivors (``w ≠ 0``); the zeros contribute exactly 0 under a symmetric grid and
    would only dilute the averages by the sparsity.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}: pass "
                        "the (pruned) network whose weights are quantized")
    check_spec(spec, hint="pass e.g. QuantSpec(bits=8, axis=0, "
               "rounding=RoundingMode.TOWARD_ZERO)")
    seed = check_seed(seed, "seed")
    if not spec.symmetric:
        raise ValueError("quantize_survivors needs a symmetric spec: with a zero point a "
                         "pruned zero is no longer on the grid")
    if not spec.signed:
        raise ValueError("quantize_survivors needs a signed spec: weights take both signs, "
                         "and an unsigned grid [0, qmax] clamps every negative survivor to "
                         "0; pass signed=True")
    out = copy.deepcopy(model)
    rows = []
    layers = [(n, m) for n, m in out.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer")
    for i, (name, m) in enumerate(layers):
        w = m.weight.detach()
        qp = calibrate(w, spec)
        key = int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) \
            if spec.rounding.is_random else None
        wq = fake_quantize(w, spec, qp.scale, qp.zero_point, generator=key)
        scale = torch.as_tensor(np.asarray(qp.scale), dtype=torch.float64)
        if spec.axis is not None:
            axis = spec.axis % w.ndim  # QuantSpec takes a negative axis too
            scale = scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        scale = scale.expand_as(w)
        alive = w != 0
        e = ((wq.double() - w.double()) / scale)[alive]
        mag = (w.double().abs() / scale)[alive]
        toward_zero = -torch.sign(w.double()[alive]) * e
        n_alive = int(alive.sum())
        rows.append({"layer": name, "n": w.numel(), "survivors": n_alive,
                     "zeroed": int((alive & (wq == 0)).sum()),
                     "bias_lsb": float(e.mean()) if n_alive else float("nan"),
                     "mse_lsb": float((e * e).mean()) if n_alive else float("nan"),
                     "mae_lsb": float(e.abs().mean()) if n_alive else float("nan"),
                     "shrink_lsb": float(toward_zero.mean()) if n_alive else float("nan"),
                     "mean_abs_lsb": float(mag.mean()) if n_alive else float("nan")})
        with torch.no_grad():
            m.weight.copy_(wq)
    return SurvivorQuantization(out, pd.DataFrame(rows))


__all__ = ["SurvivorQuantization", "quantize_survivors"]
