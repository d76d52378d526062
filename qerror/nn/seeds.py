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

On one network alone (the ResNet50 baseline, too slow to train twenty times) only the images
are random: :func:`bn_image_moments` keeps each image's moments of every BatchNorm's input, from
which :func:`qerror.nn.bn.inconsistency_bounds` decides ``bn_worst`` against a threshold over
images, as :func:`qerror.nn.growth.debiased_gap` decides ``drift_deep`` between two modes.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from qerror._checks import check_count, check_labels, check_seed
from qerror.nn import parallel
from qerror.nn._anatomy import check_model, eval_mode
from qerror.nn._moments import channel_sums, network_roundoff, unit_roundoff
from qerror.nn.bn import BNImageMoments
from qerror.nn.growth import (
    GapInterval,
    GrowthFit,
    debiased_gap,
    image_bootstrap,
    layer_block_bootstrap,
)
from qerror.nn.propagate import (
    QuantConfig,
    agreement_terms,
    calibrate_activations,
    check_drawn_batches,
    drawn_batches,
    measure,
    paired_forward,
)
from qerror.rounding import RoundingMode
from qerror.stats import wilson_ci

__all__ = ["STATEMENT_MODES", "bn_image_moments", "bn_moments_bytes", "deepest_drift_gap",
           "fraction_holding", "growth_over_images", "image_outcomes", "network_statements",
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


def _convs(res):
    convs = [s for s in res.layers() if s.kind == "conv" and s.path_depth is not None]
    if not convs:
        raise ValueError("the claims' drift and growth quantities are those of the "
                         "convolutions, and the result has none with a path depth; measure "
                         "a convolutional network that torch.fx can trace")
    return convs


def _deepest(convs):
    """The convolution of largest path depth (the last to run among equals): execution
    order is not depth, a residual stage's shortcut runs after its block's convolutions."""
    return max(reversed(convs), key=lambda s: s.path_depth)


def deepest_drift_gap(res, reference, *, level: float = 0.95, resamples: int = 1000,
                      seed: int = 0, kept_images: int | None = None) -> GapInterval:
    """``drift_deep`` of ``res`` less that of ``reference``, with an interval over images.

    Both are :func:`qerror.nn.propagate.measure` results of one network on the same images
    (two rounding modes, say), measured with ``image_means`` covering every image, or with
    ``image_means=kept_images`` where ``kept_images`` is given (then gap and interval are
    those of the first ``kept_images`` images, a sample of the measured ones): the deepest
    convolution's per-image channel drifts are resampled together
    (:func:`qerror.nn.growth.debiased_gap`). ``lo > 0`` decides that ``res`` leaves the
    larger deepest drift with the images random.
    """
    a, b = _deepest(_convs(res)), _deepest(_convs(reference))
    if a.name != b.name:
        raise ValueError(f"the two results' deepest convolutions differ ({a.name!r} and "
                         f"{b.name!r}): measure one network for both")
    if kept_images is not None:
        kept_images = check_count(kept_images, "kept_images (a number of images)", 2)
    for r, site in ((res, a), (reference, b)):
        kept = 0 if site.drift_image_channel is None else len(site.drift_image_channel)
        if kept_images is not None:
            if kept != min(kept_images, r.logits.n):
                raise ValueError(f"a result keeps the drift of {kept} of its {r.logits.n} "
                                 f"images, not the first {kept_images}: measure with "
                                 f"image_means={kept_images}")
        elif kept != r.logits.n:
            raise ValueError(f"a result keeps the drift of {kept} of its {r.logits.n} images: "
                             "measure with image_means set to the number of images, so that "
                             "none is left out of the resampling")
    return debiased_gap(a.drift_image_channel, a.float_std_channel, b.drift_image_channel,
                        b.float_std_channel, level=level, resamples=resamples, seed=seed)


def growth_over_images(res, *, level: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> GrowthFit | None:
    """The growth exponent of the convolutions' debiased drift, the one
    :func:`statement_values` fits over layers (``growth``), with an interval from a bootstrap
    over the images (:func:`qerror.nn.growth.image_bootstrap`); None where ``res`` kept no
    per-image drift (measured without ``image_means``)."""
    convs = _convs(res)
    per_image = [s.drift_image_channel for s in convs]
    if any(v is None for v in per_image):
        return None
    return image_bootstrap([s.path_depth for s in convs], per_image,
                           [s.float_std_channel for s in convs], level=level,
                           resamples=resamples, seed=seed)


def statement_values(res, *, seed: int = 0) -> dict[str, float]:
    """The quantities of the module docstring from one :func:`qerror.nn.propagate.measure`
    result (weights and activations quantized, labelled batches).

    The growth fit is the moving-block bootstrap over the convolutions
    (:func:`qerror.nn.growth.layer_block_bootstrap`, 95 %, 1000 resamples, ``seed``).
    """
    convs = _convs(res)
    if res.config.activation is None:
        raise ValueError("the result's activations are not quantized (config.activation is "
                         "None), so it has no saturation quantities (sat_first, sat_last: "
                         "the share clamped by a layer's input quantizer); measure with a "
                         "configuration that quantizes activations too, e.g. "
                         "QuantConfig.make(bits, mode)")
    layers = res.layers()
    fit = layer_block_bootstrap([s.path_depth for s in convs],
                                [s.drift_rel_rms_channel_debiased for s in convs],
                                level=0.95, resamples=1000, seed=seed)
    logits = res.logits
    if logits.float_correct is None:
        raise ValueError("the result has no labels; measure labelled batches for the "
                         "accuracy quantities")
    values = {
        "drift_deep": _deepest(convs).drift_rel_rms_channel_debiased,
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
        Images per paired batch, >= 1.
    seed : int
        Seed of the bootstrap (and of stochastic rounding, if asked for), from 0 to 2**64 - 1.

    Returns
    -------
    pandas.DataFrame
        One row per (bits, mode, quantity): columns ``bits``, ``mode``, ``quantity``,
        ``value``; quantities as in the module docstring.
    """
    seed = check_seed(seed, "seed")
    batches = _batches(test, labels, batch)
    bits, modes = _grid(bits, modes)
    rows = []
    with eval_mode(model):
        for b in bits:
            act = _ranges(model, calib, b)
            for mode in modes:
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
    seed = check_seed(seed, "seed")
    batches = _batches(test, labels, batch)
    bits, modes = _grid(bits, modes)
    frames, float_correct = [], []
    with eval_mode(model), torch.no_grad():
        for b in bits:
            act = _ranges(model, calib, b)
            for mode in modes:
                correct, first = [], not frames  # the float half: once is enough
                with paired_forward(model, QuantConfig.make(b, mode, seed=seed), act):
                    for x, y in batches:
                        out = model(torch.cat([x, x]))
                        if first:  # the labels are the same for every configuration
                            # measure's check: a label outside the classes reads as a wrong
                            # answer (_batches made them int64 class indices >= 0)
                            check_labels(y, out.shape[1], len(x))
                            float_correct.append(out[:len(x)].argmax(1) == y)
                        correct.append(out[len(x):].argmax(1) == y)
                frames.append(_outcome_frame(int(b), mode.value, correct))
    return pd.concat([_outcome_frame(0, "float", float_correct), *frames], ignore_index=True)


def bn_image_moments(model: nn.Module, batches, config: QuantConfig, act_qparams, *,
                     weights=None, first_batch: int = 0, across_ranks: bool = False,
                     images: int | None = None) -> dict[str, BNImageMoments]:
    """Each image's moments of every BatchNorm's input, float and quantized
    (:class:`qerror.nn.bn.BNImageMoments`), for :func:`qerror.nn.bn.inconsistency_bounds`.

    Parameters
    ----------
    model : torch.nn.Module
        A network with ``BatchNorm2d`` layers (evaluation mode is used).
    batches : iterable of (images, labels)
        The test batches (labels unused).
    config, act_qparams, weights
        The quantized network, as for :func:`qerror.nn.propagate.paired_forward` (the drift
        study passes those it measured with).
    first_batch : int
        The index of the first of ``batches`` among all the batches measured, as for
        :func:`qerror.nn.propagate.measure`: stochastic rounding draws the stream of each
        batch from its index, so a share of the batches
        (:func:`qerror.nn.parallel.shard`) rounds as it does within the whole.
    across_ranks : bool
        Under ``torchrun``, gather every rank's images in rank order (every rank calls).
        Every rank passes the same model (its parameters and persistent buffers),
        ``config``, ``act_qparams`` and ``weights`` (checked as
        :func:`qerror.nn.propagate.measure` checks its ranks',
        :func:`qerror.nn.propagate.agreement_terms`: every rank raises the same ValueError
        naming the first that differs); only the batches and ``first_batch`` are each
        rank's own. Where the configuration rounds activations stochastically, the ranks'
        batch indices must not overlap, as :func:`qerror.nn.propagate.measure`'s
        (:func:`qerror.nn.propagate.check_drawn_batches`: every rank raises the same
        ValueError); contiguous shares in rank order, each rank's ``first_batch`` its
        share's start, give one process's moments. A rank that fails before the gather (an
        argument its checks refuse, a model among them, a batch its network cannot take, an
        error of its forward or loader) does not leave the others waiting: it raises its
        own error and every other rank a RuntimeError naming it (see Raises).
    images : int, optional
        Keep the moments of the first ``images`` images only (at least 1; all where None):
        the pass stops at the batch that holds the last of them, and with ``across_ranks``
        each rank keeps at most ``images`` of its own before the gather, which keeps the
        first ``images`` in rank order. The moments take memory in proportion to the
        images kept (see Notes), and a bound over images needs no more than a random
        sample of them.

    Returns
    -------
    dict
        By BatchNorm name, in the order the layers run.

    Raises
    ------
    ValueError
        The model has no ``BatchNorm2d`` layer, or one of them did not run on the batches
        (of any rank), or ``first_batch`` is negative; an UnsupportedModelError (a
        ValueError) where the paired pass cannot run the model exactly
        (:func:`qerror.nn.check_model`); with ``across_ranks``, also the ranks' models
        have different BatchNorm2d layers, or they passed different models (parameters or
        persistent buffers), configurations, activation ranges or weights, or their batch
        indices overlap under stochastic rounding (on every rank).
    TypeError
        ``model`` is not a ``torch.nn.Module``, or ``first_batch`` is not an integer (a bool
        or a float included).
    RuntimeError
        With ``across_ranks``, on every rank but those that failed before the gather, which
        raise their own error: the message names each failed rank and its error
        (:func:`qerror.nn.parallel.gather_outcomes`).

    Notes
    -----
    The quantized network is run by :func:`qerror.nn.propagate.paired_forward`, the paired
    pass of :func:`qerror.nn.propagate.measure` without its statistics, and each
    BatchNorm's input is summed per (image, channel) by the instrument's own sums
    (:func:`qerror.nn._moments.channel_sums`), so the moments give the figures of
    ``measure``'s BatchNorm sites (tested against ``bn_worst``): each layer's unit roundoff
    (``BNImageMoments.u``, against which its variances are resolved) is the coarsest of its
    input's dtypes and of ``measure``'s (the network's floating parameters' and the images',
    :func:`qerror.nn._moments.network_roundoff`) over every batch and, with
    ``across_ranks``, every rank: the ranks and one process on the same batches store the
    same. Stochastic rounding draws the streams ``measure`` draws on the same batches and
    ``first_batch`` (whatever its ``pair_batch``), so its figures too are ``measure``'s.
    Memory: four float64 values per image and BatchNorm channel (the Fashion-MNIST
    ResNet50's 26,560 channels: 0.85 MB an image; :func:`bn_moments_bytes`). With
    ``images``, the unit roundoff is that of the batches run.
    """
    norms: list[tuple[str, nn.BatchNorm2d]] = []
    parts: dict[str, list] = {}
    # each layer's sums are bounded with the coarsest rounding of its inputs and of
    # measure's u (the network's parameters and the images), over every batch and rank
    roundoff: dict[str, float] = {}
    u = 0.0

    def hook_of(name):
        def hook(module, args):
            x = args[0]
            h = x.shape[0] // 2
            s, q, length = channel_sums(x)
            parts[name].append((s[:h] / length, q[:h] / length, s[h:] / length,
                                q[h:] / length, length))
            roundoff[name] = max(roundoff[name], unit_roundoff(x.dtype))
        return hook

    shared = across_ranks and parallel.world()[1] > 1
    failure = None
    local = {}
    handles = []
    agreed = []
    keyed = None
    seen = 0
    try:
        # the arguments are checked here, where a rank's refusal reaches the other ranks
        check_model(model)
        first_batch = check_count(first_batch, "first_batch (a batch index)")
        if images is not None:
            images = check_count(images, "images (the images whose moments are kept)", 1)
        norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        parts = {n: [] for n, _ in norms}
        roundoff = {n: 0.0 for n, _ in norms}
        u = network_roundoff(model)
        if not norms:
            raise ValueError("the model has no BatchNorm2d layer, so no BatchNorm "
                             "inconsistency to measure")
        if shared:  # what every rank must pass alike, as measure's ranks
            agreed = agreement_terms(model=model, config=config, act_qparams=act_qparams,
                                     weights=weights)
        handles = [m.register_forward_pre_hook(hook_of(n)) for n, m in norms]
        with eval_mode(model), torch.no_grad(), \
                paired_forward(model, config, act_qparams, weights=weights,
                               first_batch=first_batch):
            run = 0
            for x, *_ in batches:
                model(torch.cat([x, x]))
                seen += 1
                run += x.shape[0]
                if x.is_floating_point():
                    u = max(u, unit_roundoff(x.dtype))
                if images is not None and run >= images:
                    break  # before the next batch is read
        for name, m in norms:
            got = parts.pop(name)
            c = m.num_features
            local[name] = ([parallel.first_rows([g[j] for g in got], images).numpy() if got
                            else np.zeros((0, c)) for j in range(4)],
                           max((g[4] for g in got), default=0))
        if shared:
            keyed = drawn_batches([config], first_batch, seen)
    except Exception as exc:
        if not shared:
            raise
        # the other ranks are on their way to the gathers below: this rank's error goes to
        # them first, and every rank raises (none waits for this one)
        failure = exc
    finally:
        for h in handles:
            h.remove()
    roundoff = {n: max(r, u) for n, r in roundoff.items()}
    if shared:
        gathered = parallel.gather_outcomes(
            ([(n, m.num_features) for n, m in norms], roundoff, agreed, keyed), failure,
            "the ranks' BatchNorm moments were gathered")
        layers = [g[0] for g in gathered]
        if any(other != layers[0] for other in layers):
            raise ValueError(
                "the ranks' models have different BatchNorm2d layers (" + ", ".join(
                    f"rank {r}: {len(lay)} with {sum(c for _, c in lay)} channels"
                    for r, lay in enumerate(layers)) + "); every rank must pass the same "
                "model, for its images' moments to be gathered layer by layer")
        # after the layers: another model has other activation ranges, the lesser cause
        parallel.check_agreement([g[2] for g in gathered], "the batches and first_batch",
                                 "moments")
        # the configurations agree, so either every rank drew stochastically or none did
        check_drawn_batches([g[3] for g in gathered])
        roundoff = {n: max(g[1][n] for g in gathered) for n in roundoff}
    out = {}
    for name, m in norms:
        arrays, length = local.pop(name)
        if shared:  # a rank's share may be empty
            arrays = [parallel.first_rows(parallel.gather_first_rows([a], images) or [a[:0]],
                                          None) for a in arrays]
            length = max(parallel.gather_objects(length))
        if not length:
            raise ValueError(f"BatchNorm {name!r} did not run on the batches; give some "
                             "images, and a model whose every BatchNorm2d is in its forward")
        out[name] = BNImageMoments(*arrays, m.running_mean.detach().double().cpu().numpy(),
                                   m.running_var.detach().double().cpu().numpy(), length,
                                   roundoff[name])
    return out


def bn_moments_bytes(model: nn.Module, images: int) -> int:
    """Bytes of :func:`bn_image_moments`' result for ``images`` images (an int >= 0): four
    float64 values per image and BatchNorm2d channel."""
    images = check_count(images, "images (a number of images)")
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return 4 * 8 * channels * images


def _outcome_frame(bits: int, mode: str, correct: list[torch.Tensor]) -> pd.DataFrame:
    c = torch.cat(correct).cpu().numpy().astype(bool)
    return pd.DataFrame({"bits": bits, "mode": mode, "image": np.arange(c.size), "correct": c})


def _batches(test: torch.Tensor, labels: torch.Tensor, batch: int) -> list:
    batch = check_count(batch, "batch (images per paired batch)", 1)
    if len(test) != len(labels):
        raise ValueError(f"{len(test)} test images but {len(labels)} labels")
    if not len(test):
        raise ValueError("no test images: give at least one, with its label")
    labels = check_labels(torch.as_tensor(labels))
    return [(test[i:i + batch], labels[i:i + batch]) for i in range(0, len(test), batch)]


def _grid(bits, modes) -> tuple[list, list[RoundingMode]]:
    """The widths and modes to measure, each given once: none would give an empty table,
    and a repeat the same rows twice."""
    bits, modes = list(bits), [RoundingMode.parse(m) for m in modes]
    for name, given in (("bits", bits), ("modes", [m.value for m in modes])):
        if not given:
            raise ValueError(f"{name} is empty: give at least one to measure")
        if len(set(given)) < len(given):
            raise ValueError(f"{name} {given} repeats a value: give each once (a seed "
                             "measured twice would count twice in the share of seeds)")
    return bits, modes


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
