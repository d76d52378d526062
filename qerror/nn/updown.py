"""Up or down: random roundings of one layer's weights against rounding to nearest.

Nagel et al. [1]_ (Table 1) quantized the first layer of ResNet18 alone with many seeded
stochastic roundings and found that about half of them give a *lower* task loss than
rounding every weight to nearest, although nearest has the smallest error on every single
weight. :func:`updown_experiment` repeats that experiment for any conv/linear layer of a
network: the weights of that one layer go on the per-channel grid, each of ``roundings``
seeded stochastic roundings and nearest are compared by

* the task loss (cross-entropy over the given images, the rest of the network float);
* its second-order Taylor estimate ``L(w) + gᵀΔw + ½ ΔwᵀHΔw`` (gradient and exact
  Hessian-vector products by double back-propagation on the same images);
* the layer's local output MSE ``E[(W̃x − Wx)²]`` on its float input ``x`` (the error the
  layer adds itself; over every call when the forward pass calls the layer more than
  once) and the weights' own MSE in LSB²;

and reports the fraction of roundings that beat nearest with its Wilson interval and
Spearman's rank correlation between the local MSE and the loss (with its p-value): a weak
correlation says the MSE ranking of roundings is not the loss ranking.

Notes
-----
Why a rounding that is worse value by value can be better for the network: with
``Δw = w̃ − w``, the Taylor expansion of the loss about the trained weights gives
``ΔL ≈ gᵀΔw + ½ ΔwᵀHΔw`` and, at a minimum (``g ≈ 0``), ``ΔL ≈ ½ Σᵢ Hᵢᵢ Δwᵢ² + Σᵢ<ⱼ Hᵢⱼ
ΔwᵢΔwⱼ``. Round-to-nearest minimises every ``Δwᵢ²`` and so the first (diagonal) sum, which
is the whole loss exactly when ``H`` is diagonal; the cross terms reward pairs of weights
whose errors cancel through the layer, which nearest ignores [1]_.

The weight grid is that of :func:`qerror.nn.propagate.quantize_weights`: signed symmetric
per output channel, scale ``max|w|/qmax`` (:func:`qerror.calibrate`). Stochastic rounding
``k`` draws from ``numpy.random.SeedSequence([seed, k])``, so each rounding is reproducible
on its own.

References
----------
.. [1] M. Nagel, R. A. Amjad, M. van Baalen, C. Louizos and T. Blankevoort, "Up or Down?
   Adaptive Rounding for Post-Training Quantization", ICML 2020, arXiv:2004.10568.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats as sps
from torch import nn

from qerror._checks import check_count, check_flag, check_labels, check_seed
from qerror._progress import progress_bar
from qerror.calibration import calibrate
from qerror.nn._anatomy import (
    LAYERS,
    check_model,
    check_own_weight,
    eval_mode,
    iter_batches,
    model_device,
)
from qerror.quantizer import QuantSpec, fake_quantize
from qerror.rounding import RoundingMode
from qerror.stats import StatResult, wilson_ci

__all__ = ["UpDownResult", "middle_layer", "updown_experiment"]


def middle_layer(model: nn.Module) -> str:
    """The name of the conv/linear layer in the middle of the model's layers.

    ``layers[len(layers) // 2]`` among the model's conv/linear layers in registration
    order (that of :func:`qerror.nn.layer_names`), which is the execution order in a
    torchvision-style network that registers its layers in the order it runs them; a model
    that runs them in another order gets the middle of its registration, not of its run.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    if not names:
        raise ValueError("the model has no Conv2d or Linear layer")
    return names[len(names) // 2]


@dataclass(frozen=True)
class UpDownResult:
    """Nearest and ``n`` stochastic roundings of one layer, side by side.

    Arrays have shape ``(n,)``, one entry per stochastic rounding in seed order; the
    ``nearest_*`` floats are the same quantities for round-to-nearest (half to even).

    Attributes
    ----------
    layer : str
    bits : int
    images : int
        Images the losses were averaged over.
    float_loss : float
        Task loss of the float network.
    loss, taylor, local_mse, weight_mse_lsb : numpy.ndarray
        Task loss, its second-order Taylor estimate (NaN when not computed), local output
        MSE and weight MSE (LSB²) of each stochastic rounding.
    beat : StatResult
        Fraction of stochastic roundings whose loss is below nearest's, with its Wilson
        interval of confidence ``1 − alpha``.
    spearman_rho, spearman_p : float
        Spearman's rank correlation of ``local_mse`` with ``loss`` across the stochastic
        roundings, and its two-sided p-value (NaN for fewer than 3 roundings).
    taylor_rho : float
        Pearson's correlation of the Taylor estimate with the loss (NaN without it).
    """

    layer: str
    bits: int
    images: int
    float_loss: float
    nearest_loss: float
    nearest_taylor: float
    nearest_local_mse: float
    nearest_weight_mse_lsb: float
    loss: np.ndarray = field(repr=False)
    taylor: np.ndarray = field(repr=False)
    local_mse: np.ndarray = field(repr=False)
    weight_mse_lsb: np.ndarray = field(repr=False)
    beat: StatResult
    spearman_rho: float
    spearman_p: float
    taylor_rho: float

    @property
    def n(self) -> int:
        return int(self.loss.size)

    def to_frame(self) -> pd.DataFrame:
        """One row per rounding: nearest first (``index`` -1), then the stochastic ones."""
        rows = [{"rounding": "nearest", "index": -1, "loss": self.nearest_loss,
                 "taylor": self.nearest_taylor, "local_mse": self.nearest_local_mse,
                 "weight_mse_lsb": self.nearest_weight_mse_lsb}]
        rows += [{"rounding": "stochastic", "index": k, "loss": float(self.loss[k]),
                  "taylor": float(self.taylor[k]), "local_mse": float(self.local_mse[k]),
                  "weight_mse_lsb": float(self.weight_mse_lsb[k])} for k in range(self.n)]
        frame = pd.DataFrame(rows).assign(layer=self.layer, bits=self.bits,
                                          float_loss=self.float_loss)
        frame["beats_nearest"] = frame.loss < self.nearest_loss
        return frame

    def summary(self) -> dict:
        """The scalar figures as plain values (for a JSON record or a table row)."""
        return {"layer": self.layer, "bits": self.bits, "images": self.images,
                "roundings": self.n, "float_loss": self.float_loss,
                "nearest_loss": self.nearest_loss, "nearest_taylor": self.nearest_taylor,
                "best_loss": float(self.loss.min()), "median_loss": float(np.median(self.loss)),
                "beat": int(round(self.beat.estimate * self.beat.n)),
                "beat_fraction": self.beat.estimate, "beat_lo": self.beat.ci[0],
                "beat_hi": self.beat.ci[1], "alpha": self.beat.alpha,
                "spearman_rho": self.spearman_rho, "spearman_p": self.spearman_p,
                "taylor_rho": self.taylor_rho}


def _labelled(batches: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in iter_batches(batches, device):
        if y is None:
            raise ValueError("updown_experiment needs labelled batches (images, labels): the "
                             "task loss is the cross-entropy")
        # cross_entropy would leave out the images labelled -100 (its ignore_index) and
        # average over the others, while the result counts them all; the upper end is
        # checked against the logits (their classes)
        xs.append(x)
        ys.append(check_labels(y, n=x.shape[0]))
    if not xs:
        raise ValueError("updown_experiment needs at least one batch")
    return torch.cat(xs), torch.cat(ys)


def updown_experiment(model: nn.Module, layer: str, batches: Iterable, bits: int = 4, *,
                      roundings: int = 100, seed: int = 0, taylor: bool = True,
                      alpha: float = 0.05, progress: bool = False) -> UpDownResult:
    """Task loss of ``roundings`` stochastic roundings of one layer against nearest.

    Parameters
    ----------
    model : nn.Module
        A CNN that :func:`qerror.nn.check_model` accepts, with logits as output; put in
        evaluation mode for the run and restored, its parameters untouched.
    layer : str
        Name of a ``Conv2d`` or ``Linear`` of ``model`` (e.g. ``"conv1"``,
        :func:`middle_layer`). Only this layer is quantized; the rest stays float.
    batches : iterable
        ``(images, labels)`` pairs, labels integer class indices; all of them are used for
        every loss at once, so keep them to a few hundred images (never the test split).
    bits : int
        Weight bits, 2 to 16.
    roundings : int
        Number of seeded stochastic roundings (Nagel et al. use 100).
    seed : int
        Rounding ``k`` uses ``SeedSequence([seed, k])``; from 0 to 2**64 - 1.
    taylor : bool
        Also compute the second-order Taylor estimate (one extra backward pass per
        rounding; the graph of the gradient is kept, so memory is that of a training step
        on all the images).
    alpha : float
        One minus the Wilson interval's confidence (0.05: a 95 % interval); in (0, 1).
    progress : bool
        A progress bar over the roundings.

    Returns
    -------
    UpDownResult

    Raises
    ------
    ValueError
        ``layer`` is not a conv/linear of the model, its weight is not a parameter of the
        model (``torch.nn.utils.prune``, ``weight_norm``) or is tied to another layer's, bad
        ``bits``, ``roundings``, ``seed`` or ``alpha``, a non-finite weight of ``layer``,
        unlabelled or no batches, labels not one per image or below 0; each refused before
        any forward pass. Labels from the
        logits' class count up, or a float loss that is not finite (refused after the float
        forward pass, before any rounding).
    FloatingPointError
        A rounding's loss that is NaN.
    TypeError
        ``bits``, ``roundings`` or ``seed`` is not an integer (a bool, or a float even when
        integral), ``taylor`` or ``progress`` is not a bool (``"False"`` would read as
        true), or labels are not of an integer dtype; refused before any forward pass.
    qerror.nn.UnsupportedModelError
        A model :func:`qerror.nn.check_model` refuses.
    """
    check_model(model)
    bits, roundings = check_count(bits, "bits", 2), check_count(roundings, "roundings", 1)
    if bits > 16:
        raise ValueError(f"bits must be an integer from 2 to 16, got {bits!r}")
    seed = check_seed(seed, "seed (rounding k draws from numpy.random.SeedSequence([seed, k]))")
    taylor, progress = check_flag(taylor, "taylor"), check_flag(progress, "progress")
    wilson_ci(0, 1, alpha)  # refuses a bad alpha now, not after every rounding has run
    module = dict(model.named_modules()).get(layer)
    if not isinstance(module, LAYERS):
        raise ValueError(f"{layer!r} is not a Conv2d or Linear layer of the model")
    # the losses substitute the parameter; a weight recomputed from others by a forward
    # pre-hook would overwrite the substitute, and every rounding's loss be the float one
    check_own_weight(model, layer, module, computed="the rounded weights would not reach it",
                     tied="rounding it changes every layer that uses it, while the local MSE "
                          f"counts only the calls of {layer!r}; give each layer its own copy, "
                          "or pick a layer with its own weight")
    key = f"{layer}.weight" if layer else "weight"  # "" names the model itself
    bad = int((~torch.isfinite(module.weight.detach())).sum())
    if bad:  # calibrate's own check would name it "x", as if the images held it
        raise ValueError(f"layer {layer!r} holds {bad} non-finite weight(s): there is no "
                         "rounding of them to compare; fix or reload the model")
    x, y = _labelled(batches, model_device(model))
    spec = QuantSpec(bits=int(bits), signed=True, symmetric=True, axis=0,
                     rounding=RoundingMode.NEAREST_EVEN)
    w = module.weight.detach()
    qp = calibrate(w, spec)
    scale = torch.as_tensor(np.asarray(qp.scale, dtype=np.float64), device=w.device).reshape(
        (-1,) + (1,) * (w.ndim - 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    conv = isinstance(module, nn.Conv2d)

    def task_loss(weight: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, {**params, key: weight}, (x,))
        check_labels(y, logits.shape[-1])  # a min and a max of the labels, beside a forward pass
        # float64 mean: the differences between roundings can be far below the loss itself
        return F.cross_entropy(logits.double(), y)

    def local_mse(dw: torch.Tensor) -> float:
        # the bias cancels in the difference, so the layer's error is the layer of Δw; a
        # layer the forward pass calls more than once adds it at every call, all counted
        total, count = 0.0, 0
        for x_in in got:
            e = module._conv_forward(x_in, dw, None) if conv else F.linear(x_in, dw)
            total += float(e.double().pow(2).sum())
            count += e.numel()
        return total / count

    def weight_mse(wq: torch.Tensor) -> float:
        return float((((wq.double() - w.double()) / scale) ** 2).mean())

    with eval_mode(model):
        got = []
        handle = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
        try:
            with torch.no_grad():
                float_loss = float(task_loss(w))
        finally:
            handle.remove()
        if not math.isfinite(float_loss):
            # NaN compares as not below nearest's: every rounding read as losing to it
            raise ValueError(f"the float network's loss on these images is {float_loss}: a "
                             "non-finite parameter or buffer, or an overflow; fix or reload the "
                             "model (nothing can beat nearest on a loss that is not a number)")
        if not got:
            raise ValueError(f"layer {layer!r} is never called in the model's forward pass: "
                             "there is no input to measure its local error on; pick a layer "
                             "the forward pass runs")
        if taylor:
            w_req = w.clone().requires_grad_(True)
            grad, = torch.autograd.grad(task_loss(w_req), w_req, create_graph=True)

        def measure(wq: torch.Tensor) -> tuple[float, float, float, float]:
            dw = (wq - w).detach()
            with torch.no_grad():
                loss = float(task_loss(wq))
                local = local_mse(dw)
            if math.isnan(loss):
                raise FloatingPointError(f"the loss with {layer!r} rounded is NaN (the float "
                                         f"loss is {float_loss}): an overflow in {w.dtype}? "
                                         "run the experiment on the model in float32")
            est = math.nan
            if taylor:
                first = (grad * dw).sum()
                hv, = torch.autograd.grad(first, w_req, retain_graph=True)
                est = float_loss + float(first.detach().double()) \
                    + 0.5 * float((hv.detach().double() * dw.double()).sum())
            return loss, est, local, weight_mse(wq)

        nearest = measure(fake_quantize(w, spec, qp.scale))
        stoch = spec.replace(rounding=RoundingMode.STOCHASTIC)
        rows = []
        for k in progress_bar(range(roundings), progress, f"roundings {layer}"):
            gen = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
            rows.append(measure(fake_quantize(w, stoch, qp.scale, generator=gen)))
    loss, est, local, wmse = (np.array(c, dtype=np.float64) for c in zip(*rows))
    beat = wilson_ci(int((loss < nearest[0]).sum()), int(roundings), alpha)
    if roundings >= 3 and np.ptp(local) > 0 and np.ptp(loss) > 0:
        sp = sps.spearmanr(local, loss)
        rho, p = float(sp.statistic), float(sp.pvalue)
    else:
        rho = p = math.nan
    t_rho = float(np.corrcoef(est, loss)[0, 1]) if taylor and roundings >= 3 \
        and np.ptp(est) > 0 and np.ptp(loss) > 0 else math.nan
    return UpDownResult(layer, int(bits), int(x.shape[0]), float_loss, *nearest,
                        loss=loss, taylor=est, local_mse=local, weight_mse_lsb=wmse,
                        beat=beat, spearman_rho=rho, spearman_p=p, taylor_rho=t_rho)
