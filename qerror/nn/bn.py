"""BatchNorm under quantization: how inconsistent its statistics become.

A BatchNorm layer in evaluation mode normalises with running statistics estimated on float
activations. When the layers before it are quantized, the statistics of its input move; the
layer keeps normalising with the old ones. The README's Conventions measure this per channel ``c``:

* normalised mean shift ``(μ_c − μ_run,c) / σ_run,c``,
* variance ratio ``σ²_c / σ²_run,c``,

once for the batch statistics of the float input and once for the quantized input, so that
plain data shift (the float figures: test images are not the training images) is separated
from the part due to quantization (``(μ_q − μ_f)/σ_run`` and ``σ²_q/σ²_f``). The remedy,
re-estimating the statistics on the quantized network, is
:func:`qerror.nn.correction.reestimate_bn`.

Whether quantization makes some BatchNorm inconsistent by more than a threshold is decided with
the images random by :func:`inconsistency_bounds`, from each image's moments of every
BatchNorm's input (:class:`BNImageMoments`, taken by :func:`qerror.nn.seeds.bn_image_moments`).

References
----------
.. [1] B. Efron and R. J. Tibshirani, *An Introduction to the Bootstrap*, Chapman & Hall,
   1993 (ch. 6, the bootstrap standard error; ch. 12, the standard interval).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats as sps
from torch import nn

from qerror._checks import check_count
from qerror.nn._anatomy import (
    UnsupportedModelError,
    bn_batches,
    model_device,
    untracked_batchnorms,
)
from qerror.nn._moments import resolved_variance, variance_rounding
from qerror.nn.growth import check_resamples, resample_counts

__all__ = ["BNBounds", "BNImageMoments", "BNInconsistency", "estimate_running_stats",
           "inconsistency_bounds", "running_stats"]


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
    """A copy of the model's own ``BatchNorm2d`` running statistics (mean, variance), by
    name (copies: a later re-estimation, which writes the buffers in place, leaves them as
    they were). A model with no ``BatchNorm2d`` gives an empty mapping.

    Raises
    ------
    UnsupportedModelError
        (a ValueError) A ``BatchNorm2d`` that keeps no running statistics
        (``track_running_stats=False``); the message names it.
    """
    _refuse_untracked(model, "there are none to copy")
    return {n: (m.running_mean.detach().clone(), m.running_var.detach().clone())
            for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _refuse_untracked(model: nn.Module, why: str) -> None:
    """UnsupportedModelError naming every ``BatchNorm2d`` of ``model`` without running
    statistics (built with ``track_running_stats=False``, or its buffers removed)."""
    untracked = [repr(n) if n else "(the model itself)" for n in untracked_batchnorms(model)]
    if untracked:
        raise UnsupportedModelError(
            f"the BatchNorm2d layers {', '.join(untracked)} keep no running statistics "
            f"(track_running_stats=False): {why}. Build them with track_running_stats=True")


def estimate_running_stats(model: nn.Module, inputs: Iterable) -> None:
    """Replace every BatchNorm's running statistics, in place, by estimates from its input
    (PyTorch's ``update_bn`` procedure).

    Each ``BatchNorm2d`` is reset and set to a cumulative average (``momentum=None``, which
    it keeps), and the model runs on each input batch (images ``(N, C, H, W)``, ``N >= 2``,
    finite floats, or ``(images, labels)`` pairs whose labels are not used; moved to the
    model's device) without gradients with those BatchNorms alone in training mode (dropout and any other
    layer as in evaluation), and is left in evaluation mode. The running mean is then the
    average of the batches' means and the running variance the average of their unbiased
    variances: every batch weighs the same whatever its size, the spread of the batch means
    is left out, and each BatchNorm's input is taken with the earlier ones normalising by
    their batch's statistics. That is close to the statistics of the whole input for large
    batches of one size, and not equal to them. An untrained network (a smoke test's, what
    this serves) then normalises with statistics that fit its activations instead of the
    initial 0 and 1, which would let them grow through the depth; for measurements,
    :func:`qerror.nn.correction.reestimate_bn` gives the statistics of the whole input,
    merged exactly across batches. A BatchNorm the forward pass never calls (an unused
    head's) has no input to estimate from and keeps its statistics and momentum.

    Raises
    ------
    UnsupportedModelError
        The model has no ``BatchNorm2d``, or one that keeps no running statistics.
    ValueError
        ``inputs`` holds no batch, or a batch that is not a floating-point
        ``(N, C, H, W)`` tensor of at least 2 images, or holds NaN or infinite values
        (a single tensor of images passed for ``inputs`` too). Then, or when a batch fails,
        the model is left as it was (statistics, momenta and modes).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise UnsupportedModelError("estimate_running_stats replaces BatchNorm2d statistics "
                                    "and the model has no BatchNorm2d: there is nothing to "
                                    "estimate")
    _refuse_untracked(model, "there are none to estimate")
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
            for x in bn_batches(inputs, model_device(model), "estimate_running_stats"):
                model(x)
                seen += 1
        if not seen:
            raise ValueError("estimate_running_stats needs at least one input batch; the "
                             "model's statistics are left as they were")
    except BaseException:
        _restore(saved)
        for m, mode in modes:
            m.training = mode
        raise
    # reset and never called, it would normalise with 0 and 1, estimated from nothing
    _restore([s for s in saved if int(s[0].num_batches_tracked) == 0])
    model.eval()


def _restore(saved: list[tuple[nn.BatchNorm2d, float | None, dict]]) -> None:
    """Each BatchNorm's state and momentum as saved by :func:`estimate_running_stats`."""
    for m, momentum, state in saved:
        m.load_state_dict(state)
        m.momentum = momentum


@dataclass(frozen=True)
class BNImageMoments:
    """Each image's moments of one BatchNorm's input on the float and the quantized path.

    Attributes
    ----------
    mean_f, sq_f, mean_q, sq_q : ndarray (N, C)
        Per image and channel, the mean and the mean square over the map's positions of the
        float input and of the quantized input (row ``i`` the same image in all four).
    running_mean, running_var : ndarray (C,)
        The running statistics the layer normalises with. All six are given as real
        arrays (or lists) and kept as float64.
    length : int
        Positions per (image, channel), >= 1.
    u : float
        Unit roundoff of the sums the moments come from, in [0, 1)
        (:func:`qerror.nn._moments.unit_roundoff`), for their resolved variances.
    """

    mean_f: np.ndarray = field(repr=False)
    sq_f: np.ndarray = field(repr=False)
    mean_q: np.ndarray = field(repr=False)
    sq_q: np.ndarray = field(repr=False)
    running_mean: np.ndarray = field(repr=False)
    running_var: np.ndarray = field(repr=False)
    length: int
    u: float

    def __post_init__(self):
        """Take the six arrays as float64 (lists too) and refuse moments that cannot be one
        layer's (a nan moment read as a collapsed variance: the layer's figure infinite,
        "exceeds" at any threshold, as a mean square below the squared mean was), and a
        ``length`` or ``u`` that bounds no rounding."""
        for name in ("mean_f", "sq_f", "mean_q", "sq_q", "running_mean", "running_var"):
            a = np.asarray(getattr(self, name))
            if a.dtype.kind not in "iuf":
                raise TypeError(f"{name} must hold real numbers (floats or integers), got "
                                f"dtype {a.dtype}")
            object.__setattr__(self, name, a.astype(np.float64, copy=False))
        object.__setattr__(self, "length", check_count(self.length, "length (positions per "
                                                       "image and channel)", 1))
        if not 0.0 <= self.u < 1.0:
            raise ValueError(f"u, the unit roundoff of the sums, must be in [0, 1), got "
                             f"{self.u!r} (qerror.nn._moments.unit_roundoff of their dtype)")
        moments = {n: getattr(self, n) for n in ("mean_f", "sq_f", "mean_q", "sq_q")}
        shapes = {a.shape for a in moments.values()}
        run = [self.running_mean, self.running_var]
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 \
                or any(r.shape != next(iter(shapes))[1:] for r in run):
            raise ValueError("the four moments must be (N, C) and the running statistics (C,), "
                             f"got {[a.shape for a in moments.values()]} and "
                             f"{[r.shape for r in run]}")
        for name, a in moments.items():
            if not np.isfinite(a).all():
                raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(a)))} values that "
                                 "are not finite (nan or inf): a broken measurement")
        if not (np.isfinite(run[0]).all() and np.isfinite(run[1]).all()
                and (run[1] >= 0).all()):
            raise ValueError("the running statistics must be finite, the variance >= 0")
        for mean, sq in (("mean_f", "sq_f"), ("mean_q", "sq_q")):
            m, e = moments[mean], moments[sq]
            below = e - m * m < -variance_rounding(e, self.length, 1, self.u)
            if below.any():
                image, channel = np.argwhere(below)[0]
                raise ValueError(
                    f"{sq} lies below the square of {mean} beyond rounding ({int(below.sum())} "
                    f"values, first image {image}, channel {channel}: {e[image, channel]!r} "
                    f"against {m[image, channel]!r}), which no data gives: pass each image's "
                    "mean square E[x²], not its variance")

    @property
    def images(self) -> int:
        return int(self.mean_f.shape[0])

    def shift_noise(self) -> float:
        """The sampling noise in the square of the mean shift's RMS: the mean over channels
        of ``Var(m̂_c)/σ²_run,c``, ``m̂_c`` the channel's mean quantized-minus-float input
        over the images and ``Var(m̂_c)`` its unbiased estimate (the images' variance of
        their own channel means over N). ``E[m̂_c²] = m_c² + Var(m̂_c)``: the plain RMS is
        biased upward by it (as the drift is: :func:`qerror.nn.growth.channel_rms_debiased`)."""
        d = self.mean_q - self.mean_f
        with np.errstate(divide="ignore", invalid="ignore"):
            v = d.var(axis=0, ddof=1) / d.shape[0] / np.asarray(self.running_var, np.float64)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else 0.0

    def figures(self, weights: np.ndarray, noise: float = 0.0) -> np.ndarray:
        """The layer's inconsistency figure for each row of ``weights`` (B, N): how often a
        resample draws each image (a row of ones: the sample itself).

        The figure is the larger of the RMS over channels of ``(μ_q − μ_f)/σ_run`` and
        ``|mean_c log(σ²_q/σ²_f)|`` (the channels' log geometric-mean variance ratio), the
        two :meth:`parts`: ``inf`` where some channel's quantized variance collapsed to 0 or
        came from a constant float input, ``nan`` where no channel gives a figure. Equal,
        for a row of ones, to the layer's figure in
        :func:`qerror.nn.seeds.statement_values`' ``bn_worst`` (tested). With ``noise``
        (:meth:`shift_noise`), the RMS's square less it, 0 below 0: the debiased figure.

        Raises
        ------
        ValueError
            As :meth:`parts`.
        """
        parts = self.parts(weights, noise)
        return np.fmax(parts[:, 0], np.abs(parts[:, 1]))

    def parts(self, weights: np.ndarray, noise: float = 0.0) -> np.ndarray:
        """The figure's two parts for each row of ``weights`` (B, N), as a (B, 2) array: the
        mean shift's RMS over channels (its square less ``noise``, 0 below 0) and the
        *signed* mean over channels of ``log(σ²_q/σ²_f)``, with the moments over every drawn
        image and position and the variances resolved from their rounding as the instrument
        resolves them. A part is ``nan`` where no channel gives it; the second is ``inf``
        where some channel's quantized variance collapsed to 0 or came from a constant
        float input (the figure infinite). :func:`inconsistency_bounds` bounds each part
        apart, the second by its signed spread.

        Raises
        ------
        ValueError
            ``weights`` is not (B, N) (or (N,)), holds a value that is negative or not
            finite, or a row that draws no image (sums to 0); ``noise`` is negative or not
            finite.
        """
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        n = self.images
        if w.ndim != 2 or w.shape[1] != n:
            raise ValueError(f"weights must be (B, {n}), a weight per image of the layer's {n} "
                             f"in each resample, got shape {np.shape(weights)}")
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError("weights, how often each image is drawn, must be finite and >= 0")
        total = w.sum(axis=1, keepdims=True)
        if not (total > 0).all():
            raise ValueError(f"{int(np.sum(total <= 0))} rows of weights draw no image (they "
                             "sum to 0): each resample needs an image")
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be finite and >= 0 (shift_noise()), got {noise!r}")
        mf, ef, mq, eq = ((w @ a) / total for a in (self.mean_f, self.sq_f, self.mean_q,
                                                     self.sq_q))
        var_f = resolved_variance(mf, ef, self.length, n, self.u)
        var_q = resolved_variance(mq, eq, self.length, n, self.u)
        sd = np.sqrt(np.asarray(self.running_var, dtype=np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = (mq - mf) / sd
            ratio = var_q / var_f
            log_ratio = np.log(ratio)
        finite = np.isfinite(shift)
        count = finite.sum(axis=1)
        rms = np.sqrt(np.maximum(np.where(finite, shift * shift, 0.0).sum(axis=1)
                                 / np.maximum(count, 1) - noise, 0.0))
        rms = np.where(count > 0, rms, np.nan)
        defined = ~np.isnan(ratio)
        broken = (defined & ((ratio <= 0) | np.isinf(ratio))).any(axis=1)
        count = defined.sum(axis=1)
        with np.errstate(invalid="ignore"):  # a broken row's -inf + inf: inf below
            logs = np.where(defined, log_ratio, 0.0).sum(axis=1) / np.maximum(count, 1)
        logs = np.where(broken, np.inf, np.where(count > 0, logs, np.nan))
        return np.stack([rms, logs], axis=1)


@dataclass(frozen=True)
class BNBounds:
    """Whether quantization moves some BatchNorm's input statistics by more than a threshold,
    decided with the images random (:func:`inconsistency_bounds`).

    Attributes
    ----------
    worst : float
        The largest layer figure on the sample (``bn_worst``: its mean shift's RMS not
        debiased).
    some_lo : float
        The largest simultaneous lower bound: each layer's figure is the larger of two parts
        (:meth:`BNImageMoments.parts`), and each part is bounded apart — the debiased mean
        shift's RMS less ``t(1 − α/(3K))`` bootstrap standard errors, the absolute mean log
        variance ratio less as many of its signed standard errors (Student's t with N − 1
        degrees of freedom; Bonferroni over the 3K one-sided statements: each layer's shift
        above, its log ratio above, its log ratio below). Above a threshold, some layer's
        figure exceeds it at familywise level α.
    all_hi : float
        The largest upper bound at level ``1 − α`` each: every layer's parts plus
        ``t(1 − α)`` standard errors. Below a threshold, every layer's figure is under it
        (an intersection–union test: each part tested at α, no adjustment needed).
    layers : int
        The K layers (3K one-sided statements) the Bonferroni adjustment counts.
    alpha : float
    resamples : int
    bounded : int
        The layers with a figure (a live channel): a layer without one is in neither claim
        (NaN bounds, nothing decided, where none has one).
    """

    worst: float
    some_lo: float
    all_hi: float
    layers: int
    alpha: float
    resamples: int
    bounded: int = -1

    def exceeds(self, threshold: float) -> bool | None:
        """True where some layer's figure exceeds ``threshold`` (``some_lo`` above it), False
        where every layer's is under it (``all_hi`` below), None where the images do not
        decide."""
        if self.some_lo > threshold:
            return True
        if self.all_hi < threshold:
            return False
        return None


def inconsistency_bounds(moments: Mapping[str, BNImageMoments], *, alpha: float = 0.05,
                         resamples: int = 1000, seed: int = 0) -> BNBounds:
    """Bounds on the BatchNorm inconsistency figures of many layers, the images random.

    Parameters
    ----------
    moments : mapping of layer name to BNImageMoments
        Every BatchNorm's per-image moments, on the same N images.
    alpha : float
        Level of both decisions of :class:`BNBounds`.
    resamples : int
        Bootstrap resamples ``B`` (at least 100) for each layer's standard error.
    seed : int
        Of the resamples, from 0 to 2**64 - 1 (None or a Generator refused: the bounds would
        differ from call to call).

    Returns
    -------
    BNBounds

    Notes
    -----
    One set of resamples draws N images with replacement and serves every layer. A layer's
    figure is the larger of two parts (:meth:`BNImageMoments.parts`), and each part is
    bounded apart by the standard interval ``part ∓ t·se`` ([1]_, ch. 12; Student's quantile
    with N − 1 degrees of freedom where the normal's is usual), its standard error the
    standard deviation of the part over the resamples — the log ratio's signed, so that near
    0 its spread is not folded. Percentile ends at ``α/(3K)`` would need far more resamples
    than the standard error does. The larger of the two parts bounded instead with the
    standard error of that maximum inherits the maximum's upward bias where the parts are
    close: on one layer (N = 30 images, 16 channels, the shift's RMS 0.1 and
    the log ratio log 1.09 ≈ 0.086; 2,000 simulated sets, standard error 0.5 %) that lower
    bound lay above the true figure on 8.5 % of them, and on 19 % with no shift and a log
    ratio of 0.0025; bounded apart, on 2.4 % and 4.2 %
    (``test_inconsistency_bounds_hold_their_level_where_the_parts_are_close``). On 1200
    simulated sets of four layers (N = 100 images, 16 channels, every layer's mean shift
    exactly at the threshold 0.1, image noise 0.3 of the float std; the simulation of
    ``test_inconsistency_bounds_hold_their_level_at_the_threshold``), ``some_lo`` exceeded
    the threshold on 1.2 % of them (14), on 2.1 % in another draw (1.2 % with the normal's
    quantile, 7.3 % without the debiasing below): conservative there, the Bonferroni counting
    12 statements of which only the four shifts are at the threshold. The worst case of
    ``all_hi`` is one layer at the threshold and the others far under it: there it fell
    under the threshold on 1.7 % of 1200 such sets (20; the second simulation of that
    test). A layer whose figure is infinite on the sample (a variance collapsed by
    quantization) is infinite on every resample and bounds at infinity; a part that is
    finite on the sample but not on some resample gets an infinite standard error, which
    decides nothing about it. The mean shift's RMS carries the sampling noise of the channel
    means (``E[m̂²] = m² + Var m̂``), which alone would make a network without any shift look
    inconsistent on few images: the bounds are set on the debiased part (the sample's noise
    term :meth:`BNImageMoments.shift_noise` taken off the RMS's square). The resampled parts
    have the same term taken off, which moves them (they centre near the plain part, each
    resample carrying its own noise) and barely their spread, which alone the standard error
    reads: on the four layers of the first simulation, a mean standard error of 0.0076–0.0077
    against the debiased part's own standard deviation 0.0073–0.0078 over the 1200 sets. The
    log variance ratio's own bias is of order ``1/N``
    and left.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    check_resamples(resamples)
    layers = list(moments.values())
    if not layers:
        raise ValueError("no BatchNorm moments to bound; measure a network with BatchNorm")
    n = {m.images for m in layers}
    if len(n) != 1 or n == {0}:
        raise ValueError(f"every layer needs moments on the same images, got counts {sorted(n)}")
    n = n.pop()
    if n < 2:
        raise ValueError("the bounds resample images: give at least 2")
    counts = resample_counts(n, resamples, seed)
    ones = np.ones((1, n))
    k = len(layers)
    # from the upper tails themselves: t.ppf(1 - tail) loses the digits 1 - tail rounds away
    z_some = float(sps.t.isf(alpha / (3 * k), n - 1))
    z_all = float(sps.t.isf(alpha, n - 1))
    if not (0.0 < z_some < math.inf and 0.0 < z_all < math.inf):
        # scipy's t quantile gives -inf in the far tail (1e-300 at 9 degrees of freedom),
        # which would bound every figure at -inf and call every layer inconsistent
        raise ValueError(f"alpha={alpha:g} over {k} BatchNorms is beyond the t quantiles "
                         f"scipy computes at {n - 1} degrees of freedom; use a larger alpha")
    points, lows, highs = [], [], []
    for m in layers:
        plain = float(m.figures(ones)[0])
        if math.isnan(plain):
            continue
        points.append(plain)
        noise = m.shift_noise()
        for point, boot in zip(m.parts(ones, noise)[0], m.parts(counts, noise).T):
            if math.isnan(point):
                continue
            if math.isinf(point):
                se = 0.0
            elif np.isfinite(boot).all():
                se = float(np.std(boot, ddof=1))
            else:
                se = math.inf
            lows.append(abs(point) - z_some * se if se < math.inf else -math.inf)
            highs.append(abs(point) + z_all * se)
    if not points:  # no layer with a live channel: nothing decided
        return BNBounds(math.nan, math.nan, math.nan, k, alpha, resamples, 0)
    return BNBounds(max(points), max(lows), max(highs), k, alpha, resamples, len(points))
