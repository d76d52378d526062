"""How quantization error travels through ResNet50: drift, SQNR, saturation, BatchNorm, accuracy.

The main job of qerror. For each rounding mode × bit width × what is quantized (weights,
activations, both), the float and the fake-quantized network run on the same test images
(:func:`qerror.nn.propagate.measure`) and every conv/linear layer, BatchNorm and residual block
reports the accumulated error (drift raw and relative to the float activation's std, MSE,
SQNR), the local error it adds itself, the saturation of its input quantizer at qmin and at
qmax, and the BatchNorm inconsistency of its input (as the README's Conventions define it). At the output: accuracy of
both networks with Wilson intervals and McNemar's test of quantized against float.

Then:

* drift growth with path depth (:mod:`qerror.nn.growth`): a power law ``y ∝ depth^p``
  fitted to the channel-RMS relative drift (its sampling noise removed) and to the relative
  RMS error of the conv/linear outputs, with bootstrap intervals over images and over blocks
  of layers, and "linear" or "√depth" said only where an interval separates them;
* remedies on a few configurations: BatchNorm re-estimation, analytic bias correction
  (E[ΔW]·E[x] + Ŵ·E[e_x], E[x] from the preceding BN and ReLU) and empirical bias
  correction, and how much of the lost accuracy and drift each recovers;
* how much each fitted remedy recovers against the number of calibration images it was fitted
  on (``--calib-curve``, Fashion-MNIST: 100 to 1000 images at every remedy width,
  accuracy on the first ``--curve-images`` test images by a plain quantized forward), so
  that the remedies' own sampling noise is seen beside their effect;
* the quantities of the ledger's network claims N1-N4 on this network
  (:func:`qerror.nn.seeds.statement_values`, weights and activations quantized, nearest,
  truncation and floor), in ``statements.csv``, as ``studies.seeds`` measures them on its
  twenty small networks, and beside them what decides them on this one network with the
  images random (:func:`image_statements`: the deepest drift's gap to round-to-nearest,
  the growth exponent and the BatchNorm inconsistency, each with a bootstrap over images);
* the predicted mean local error of every layer (the analytic model) against the measured one;
* a cross-check of the simulation against PyTorch's real INT8 kernels, layer by layer.

Default: the cached Fashion-MNIST ResNet50 baseline (trained first if missing, after saying
how long that takes), calibration on the calibration split, measurement on a seeded subset
of the test split whose size a pilot chooses (``--images auto``): every configuration is
first measured on validation images, and the subset takes the most images any
configuration needs for its median layer's drift and MSE to be resolved from zero
(:func:`qerror.stats.units_to_resolve`), rounded up to one significant figure and held
between ``--min-images`` and ``--max-images``; ``pilot.csv`` gives each configuration's
need and names those beyond the ceiling. The plan is rough where it matters: a need of a
few hundred images means the pilot's own drift is one or two standard errors from zero, so
the need is known to within a factor of two or three; the rule never gives fewer images
for a larger need.
``--data PATH --weights IMAGENET1K_V2`` (or a local weights file) runs the
same on an ImageNet-style folder.

ImageNet folders are labelled with the weights' class indices
(:func:`qerror.data.imagenet_folder`: synset sub-folders, any subset of the 1000 classes, or
the flat ILSVRC2012 validation folder; ``--labels FILE`` for other folder names).

Scale: ``--device cuda`` runs the networks on a GPU (TF32 off, so the float reference stays
float32); ``torchrun --nproc-per-node N -m studies.drift ...`` (multi-node through torchrun's
rendezvous arguments) gives each rank a contiguous share of the measured batches, each image
measured once: rank 0 calibrates and fits the remedies and broadcasts them, the streaming
sums are merged with ``all_reduce`` (:mod:`qerror.nn.parallel`), and rank 0 alone writes.
After the pilot (which has a progress bar of its own) and before the measurement the study
prints its estimate of every phase (:func:`estimate`: the pilot's own rate for the
instrumented passes, short timed probes for the rest) and, when that is long on a CPU, how
to shorten it; ``timing.csv`` keeps it, with the pilot's seconds, each phase's, the whole
run's from the model in hand (``measured_s``) and, apart, what getting the model took
(``measured_model_s``: the baseline's training where it was not cached).

Run: ``python -m studies.drift`` (``--smoke`` for the test suite's tiny preset).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from scipy import stats as sps
from tqdm import tqdm

from qerror import RangeMethod, RangePolicy, RoundingMode
from qerror.calibration import ACIQ_LAWS
from qerror.data import PixelBatches, find_fashion_mnist, imagenet_folder, split_images
from qerror.nn import (
    MeanSource,
    PropagationResult,
    QuantConfig,
    Target,
    UnsupportedModelError,
    bias_correction,
    calibrate_activations,
    check_model,
    default_pair_batch,
    empirical_bias_correction,
    layer_geometry,
    local_error_means,
    measure,
    measure_many,
    model_device,
    parallel,
    predicted_local_drift,
    quantize_weights,
    quantized_forward,
    reestimate_bn,
    sqnr_db,
)
from qerror.nn.bn import estimate_running_stats, inconsistency_bounds
from qerror.nn.correction import BN_REESTIMATION_PASSES
from qerror.nn.growth import (
    RESIDUAL_AC1_LIMIT,
    image_bootstrap,
    layer_block_bootstrap,
    linear_or_sqrt,
)
from qerror.nn.models import forward_layout, imagenet_eval_sizes, memory_format
from qerror.nn.seeds import (
    STATEMENT_MODES,
    bn_image_moments,
    bn_moments_bytes,
    deepest_drift_gap,
    growth_over_images,
    statement_values,
)
from qerror.nn.training import Device, DeviceError, TrainError, disable_tf32, distributed
from qerror.stats import (
    mcnemar_from_counts,
    mcnemar_resolution,
    places_for,
    tail_share,
    tail_share_normal,
    units_to_resolve,
    wilson_ci,
)
from studies._common import (
    DATA_ROOT_HELP,
    PRINT_WIDTH,
    RunDir,
    StudyError,
    available_memory,
    base_parser,
    calibration_batches,
    check_out,
    check_trained_on,
    figure_style,
    given_options,
    held_out,
    holm_columns,
    int_at_least,
    int_in,
    labelled_batches,
    machine_load,
    nonnegative_int,
    positive_int,
    refuse_beyond_splits,
    row_width,
    study_main,
    user_path,
)
from studies._latex import escape, letters, number

ALPHA = 0.05  # level of every accuracy interval and McNemar test in this study
# power with which the image counts are chosen and stated (the pilot's needs, precision.csv's
# images_to_resolve, accuracy.csv's detectable drop and images_needed); the manifest's
# config records it as resolve_power
RESOLVE_POWER = 0.8
FIT_LEVEL = 0.95  # confidence of the growth exponents
DEFAULT_MODES = (RoundingMode.NEAREST_EVEN, RoundingMode.NEAREST_AWAY, RoundingMode.TOWARD_ZERO,
                 RoundingMode.FLOOR, RoundingMode.STOCHASTIC)
DEFAULT_BITS = (8, 6, 4)
REMEDY_MODES = (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO)
GROWTH_METRICS = ("drift_rel_rms_channel_debiased", "rms_rel")
GROWTH_LABELS = {"drift_rel_rms_channel_debiased": "per-channel |drift| / std\n(RMS, debiased)",
                 "rms_rel": "RMS error / float std"}  # the growth figures' y axes
BOOTSTRAP = 1000  # resamples of each growth interval
CURVE_SIZES = (100, 300, 1000)  # calibration images of the remedy curve; the split has 1000
CURVE_IMAGES = 2000  # test images each point of the curve is evaluated on
IMAGENET_WEIGHTS = "IMAGENET1K_V2"  # --data's default --weights
# --act-percentile's values, as qerror.calibration.RangePolicy takes them on the activations'
# affine grid (its check): the help and the refusal say the same
ACT_PERCENTILES = ("in (50, 100]: the activations' grid is affine, its range from the "
                   "(100 - p)th to the pth percentile, so p must be above 50 (100: min-max)")
# --images auto (the Fashion-MNIST default): a pilot on validation images sizes the subset
AUTO = "auto"
PILOT_IMAGES = 64  # validation images of the pilot
MIN_IMAGES = 200  # the subset's floor: what its accuracy table had before it was sized
MAX_IMAGES = 500  # the subset's ceiling: what the default run's time affords
# Images per chunk of a K-way pass, at least (qerror.nn.default_pair_batch's min_chunk):
# larger than the library's 32, which keeps a pass's memory down for large images. The 15
# configurations of one width on 256 images: studies.bench's drift group times chunks of 64
# against 32 (the README's bench-drift-avx2-prepared record: 0.91 of the time on an
# AVX2-only machine); chunks of 128 were no faster there (three alternating pairs, not kept).
KWAY_CHUNK = 64
SIZED_METRICS = ("drift", "mse")  # statistics the subset is sized for (all images' units)
TAIL_TOP = 5  # most extreme images whose share of a layer's drift variance precision.csv gives


@dataclass(frozen=True)
class Data:
    """The images of a run, as this rank holds them.

    ``test`` and ``headline`` are this rank's contiguous shares of the measured and of the
    headline batches (all of them on one process), starting at batch ``first_batch`` and
    ``headline_first``; ``calib`` and ``int8_test`` (the first test images, for the INT8
    cross-check) are rank 0's alone. An ImageNet folder's ``test`` is a
    :class:`qerror.data.PixelBatches` (8-bit pixels normalised as each batch is read).
    """

    calib: list[tuple[torch.Tensor, torch.Tensor]]
    test: Sequence[tuple[torch.Tensor, torch.Tensor]]
    identity: dict
    headline: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    first_batch: int = 0
    headline_first: int = 0
    int8_test: torch.Tensor | None = None
    curve_calib: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    curve_test: list[tuple[torch.Tensor, torch.Tensor]] | None = None


# --------------------------------------------------------------------------- inputs

def _first_images(batches, n: int) -> torch.Tensor:
    return torch.cat([b[0] for b in batches])[:n] if batches else torch.empty(0)


def fashion_data(data_root, images: int, calib_images: int, batch: int, seed: int,
                 headline_images: int = 0, int8_images: int = 0, curve_calib: int = 0,
                 curve_images: int = 0, held: dict[str, int] | None = None) -> Data:
    """Calibration images from the calibration split, measured ones from the test split, and
    the first ``headline_images`` of the whole test split (in order) for the headline
    accuracy; under torchrun each rank keeps its share of the measured and headline
    batches (:func:`qerror.nn.parallel.shard`). Rank 0 also keeps the first ``curve_calib``
    images of the calibration split and the first ``curve_images`` of the test split for
    the remedies' calibration curve. ``held``: the held-out split sizes the model was
    trained beside (:func:`studies._common.held_out`)."""
    from qerror.data import fashion_mnist_splits, to_tensor

    splits = fashion_mnist_splits(data_root, **(held or {}))
    n_test = min(images, len(splits.test))
    pick = np.sort(np.random.default_rng(seed).permutation(len(splits.test))[:n_test])
    test = splits.test.subset(pick)
    calib = splits.calib.subset(np.arange(min(calib_images, len(splits.calib))))
    ident = {"dataset": "fashion-mnist", "source": test.source, "test_sha256": test.sha256,
             "calib_sha256": calib.sha256, "test_images": len(test), "calib_images": len(calib),
             "calib_split_images": len(splits.calib), "test_split_images": len(splits.test)}
    test_batches = labelled_batches(to_tensor(test.images), torch.as_tensor(test.labels),
                                    batch)
    mine = parallel.shard(len(test_batches))
    headline, headline_first = None, 0
    if headline_images:
        whole = splits.test.subset(np.arange(min(headline_images, len(splits.test))))
        all_headline = labelled_batches(to_tensor(whole.images),
                                        torch.as_tensor(whole.labels), batch)
        share = parallel.shard(len(all_headline))
        headline, headline_first = all_headline[share.start:share.stop], share.start
        ident.update(headline_images=len(whole), headline_sha256=whole.sha256)
    curve = (None, None)
    if curve_calib and curve_images and parallel.world()[0] == 0:
        cal = splits.calib.subset(np.arange(min(curve_calib, len(splits.calib))))
        tst = splits.test.subset(np.arange(min(curve_images, len(splits.test))))
        curve = (calibration_batches(to_tensor(cal.images), torch.as_tensor(cal.labels), batch),
                 labelled_batches(to_tensor(tst.images), torch.as_tensor(tst.labels), batch))
        ident.update(curve_calib_images=len(cal), curve_calib_sha256=cal.sha256,
                     curve_test_images=len(tst), curve_test_sha256=tst.sha256)
    return Data(calibration_batches(to_tensor(calib.images), torch.as_tensor(calib.labels),
                                     batch),
                test_batches[mine.start:mine.stop], ident, headline, mine.start,
                headline_first, _first_images(test_batches, int8_images), *curve)


def fashion_pilot(data_root, images: int, batch: int, seed: int,
                  held: dict[str, int] | None = None):
    """The pilot's images: a seeded sample of the validation split, which the study uses
    for nothing else (the baseline's training only reported its accuracy on it), so that
    the test subset is not sized by looking at itself. Returns ``(batches, identity)``."""
    from qerror.data import fashion_mnist_splits, to_tensor

    val = fashion_mnist_splits(data_root, **(held or {})).val
    n = min(images, len(val))
    pick = np.sort(np.random.default_rng([seed, 1]).permutation(len(val))[:n])
    pilot = val.subset(pick)
    return (labelled_batches(to_tensor(pilot.images), torch.as_tensor(pilot.labels), batch),
            {"pilot_split": "val", "pilot_images": len(pilot), "pilot_sha256": pilot.sha256})


def check_folder_counts(ds, images: int, calib_images: int) -> None:
    """StudyError unless the ImageNet folder ``ds`` holds ``calib_images`` calibration
    images (half of its images at most calibrate: BatchNorm statistics need two, and so do
    the measured ones) and ``images`` measured ones beside them. From the folder's listing
    alone: refused before the weights load or any image is read, not once all are."""
    if len(ds) < 4:
        raise StudyError(f"--data {ds.root}: found {len(ds)} images; need at least 4 (two "
                         "calibration images and two measured)")
    n_cal = min(calib_images, len(ds) // 2)
    for option, want, got, why in (
            ("--calib-images", calib_images, n_cal,
             " (half of the folder's images at most calibrate)"),
            ("--images", images, len(ds) - n_cal, "")):
        if got < want:
            raise StudyError(f"{option} {want}: the data hold {got} such images{why}; give at "
                             f"most {got}")


def imagenet_data(ds, images: int, calib_images: int, batch: int, seed: int,
                  labels: Path | None = None, int8_images: int = 0) -> Data:
    """A seeded split of an ImageNet folder (a :class:`qerror.data.ImageNetFolder`):
    calibration images, then measured ones. Each rank reads only its share of the measured
    batches, and holds them as 8-bit pixels (:class:`qerror.data.PixelBatches`:
    :func:`imagenet_pixel_bytes` an image); rank 0 reads the calibration images and the
    INT8 cross-check's, as float images."""
    check_folder_counts(ds, images, calib_images)
    order = np.random.default_rng(seed).permutation(len(ds))
    n_cal = min(calib_images, len(ds) // 2)
    test_index = order[n_cal:n_cal + images]
    starts = range(0, len(test_index), batch)
    mine = parallel.shard(len(starts))
    main = parallel.world()[0] == 0

    def load(index, what, cut=labelled_batches):
        if not len(index):
            return []
        xs, ys = zip(*(ds[int(i)] for i in tqdm(index, desc=what, unit="img", leave=False,
                                                  disable=not main)))
        return cut(torch.stack(xs), torch.as_tensor(ys), batch)

    def load_pixels(index, what):
        """The measured images as 8-bit pixels, normalised batch by batch as they are read
        (a quarter of their float32 memory), filled in place (no second copy)."""
        if not len(index):
            return []
        pixels = torch.empty((len(index), 3, ds.crop, ds.crop), dtype=torch.uint8)
        labels = torch.empty(len(index), dtype=torch.int64)
        for k, i in enumerate(tqdm(index, desc=what, unit="img", leave=False,
                                   disable=not main)):
            pixels[k], labels[k] = ds.pixels(int(i))
        return PixelBatches(pixels, labels, batch, ds.normalise)

    calib = load(order[:n_cal], "load calibration images", calibration_batches) \
        if main else []
    lo = starts[mine.start] if len(mine) else len(test_index)
    hi = starts[mine.stop] if mine.stop < len(starts) else len(test_index)
    test = load_pixels(test_index[lo:hi], "load test images")
    first = load(test_index[:int8_images], "load INT8 images") if main and int8_images else []
    ident = {"dataset": "imagenet-folder", **ds.identity(),
             "labels_file": None if labels is None else str(Path(labels).resolve()),
             "test_images": int(len(test_index)), "calib_images": int(n_cal)}
    return Data(calib, test, ident, None, mine.start, 0, _first_images(first, int8_images))


def _load_model(args, data_root):
    """(model, identity) for the arguments; SystemExit with the reason when it cannot."""
    from qerror.nn.models import (
        FASHION_CLASSES,
        StateDictMismatchError,
        WeightsNotFoundError,
        fashion_resnet,
        load_checkpoint,
        load_imagenet_resnet50,
    )
    from studies.train import get_or_train_baseline

    if args.data is not None:
        if args.model != "resnet50":
            given = " (--smoke's default model is resnet18)" if args.smoke else ""
            raise StudyError(f"--data (ImageNet) supports --model resnet50 only, got "
                             f"{args.model}{given}; pass --model resnet50")
        weights = args.weights or IMAGENET_WEIGHTS
        try:
            loaded = load_imagenet_resnet50(weights, download=args.download)
        except (WeightsNotFoundError, StateDictMismatchError) as err:
            raise StudyError(str(err)) from err
        # the sha256 of the bytes the weights were read from (a local file's, or the hub
        # cache's file of named weights), not of a second read that a replaced file escapes
        return loaded.model, {"model": "resnet50-imagenet", "weights": str(weights),
                              "weights_file": str(loaded.path),
                              "weights_sha256": loaded.sha256}
    if args.smoke and args.weights is None:
        torch.manual_seed(args.seed)
        model = fashion_resnet(args.model)
        return model, {"model": f"fashion-{args.model}-untrained-smoke", "seed": args.seed}
    if args.weights is not None and not Path(args.weights).exists() \
            and args.weights in torchvision.models.ResNet50_Weights.__members__:
        raise StudyError(f"--weights {args.weights} names torchvision's ImageNet weights, "
                         "which are measured on ImageNet images: pass --data (an ImageNet "
                         "folder) too. On Fashion-MNIST --weights takes a qerror checkpoint "
                         "file, or leave it out for the cached baseline")
    # A refused checkpoint is a CheckpointError, which study_main reports as a refusal.
    if args.weights is not None:
        ckpt = load_checkpoint(args.weights, expected_arch=args.model,
                               expected_num_classes=FASHION_CLASSES)
    else:
        # Under torchrun every rank would train its own copy into the same cache:
        # a missing baseline is trained by one process first (the message says how).
        ckpt = get_or_train_baseline(args.model, train_if_missing=not args.no_train
                                     and parallel.world()[1] == 1, data_root=data_root)
    check_trained_on(ckpt.info, data_root, use="--weights")
    return ckpt.model, {"model": f"fashion-{args.model}", "stem": ckpt.info.stem.value,
                        "checkpoint": str(ckpt.info.path), "sha256": ckpt.info.sha256,
                        "metrics": ckpt.info.metrics, "held_out": held_out(ckpt.info)}


# --------------------------------------------------------------------------- compute

def grid(modes, bits_list, targets, seed: int, act_range: RangePolicy = RangePolicy(),
         **outputs) -> list[QuantConfig]:
    """Every mode × width × target; ``outputs`` (bn_outputs, block_outputs) and the
    activation range policy where the target quantizes activations."""
    return [QuantConfig.make(b, m, t, seed=seed,
                             **(dict(outputs, activation_range=act_range)
                                if t is not Target.WEIGHTS else {}))
            for t in targets for b in bits_list for m in modes]


def weights_arg(text: str) -> str:
    """``--weights``: a file's ``~`` expanded as :func:`studies._common.user_path` does; a
    name of torchvision's weights (``IMAGENET1K_V2``) as it is."""
    return str(user_path(text)) if text.startswith("~") else text


def act_range_policy(method: RangeMethod, percentile: float | None,
                     aciq_law: str | None) -> RangePolicy:
    """The activation range policy of ``--act-range``, ``--act-percentile`` and
    ``--aciq-law`` (each of the last two only with its method), checked against the
    activations' grid; ValueError otherwise, a percentile the grid cannot take
    (:data:`ACT_PERCENTILES`; NaN too) named as ``--act-percentile``'s."""
    if percentile is not None and method is not RangeMethod.PERCENTILE:
        raise ValueError("--act-percentile sets the percentile of --act-range percentile; "
                         f"this run's range is {method.value}")
    if aciq_law is not None and method is not RangeMethod.ACIQ:
        raise ValueError(f"--aciq-law sets the law of --act-range aciq; this run's range is "
                         f"{method.value}")
    extra = {"percentile": percentile} if percentile is not None else {}
    try:
        policy = RangePolicy(method, aciq_law=aciq_law or "laplace", **extra)
        policy.check(QuantConfig.make(8).activation)  # every width's grid is affine alike
    except ValueError as err:
        if percentile is None:
            raise
        raise ValueError(f"--act-percentile {percentile}: give a percentile "
                         f"{ACT_PERCENTILES}") from err
    return policy


def _bits(cfg: QuantConfig) -> int:
    return (cfg.weight or cfg.activation).bits


def width_groups(configs) -> dict[int, list[QuantConfig]]:
    """The configurations by bit width, each width's in their order: every configuration of
    a width shares its activation ranges, and is measured with the others in one K-way
    batch (:func:`qerror.nn.measure_many`, one float chunk for all)."""
    groups: dict[int, list[QuantConfig]] = {}
    for cfg in configs:
        groups.setdefault(_bits(cfg), []).append(cfg)
    return groups


def _config_columns(cfg: QuantConfig) -> dict:
    return {"mode": cfg.rounding.value, "bits": _bits(cfg), "target": cfg.target.value}


def accuracy_row(cfg_cols: dict, res: PropagationResult, remedy: str = "none") -> dict:
    lg = res.logits
    row = {**cfg_cols, "remedy": remedy, "images": lg.n, "agreement": lg.agreement,
           "logit_sqnr_db": lg.sqnr_db, "logit_drift_rel": lg.drift_rel}
    if lg.float_correct is not None:
        wf, wq = wilson_ci(lg.float_correct, lg.n, ALPHA), wilson_ci(lg.quant_correct, lg.n, ALPHA)
        mc = mcnemar_from_counts(lg.float_only, lg.quant_only, lg.n, ALPHA)
        # what these images can resolve: the smallest drop detected with RESOLVE_POWER, and
        # the images the observed drop would need (qerror.stats.mcnemar_resolution)
        res_ = mcnemar_resolution(lg.float_only, lg.quant_only, lg.n, ALPHA, RESOLVE_POWER)
        row.update(float_acc=wf.estimate, float_lo=wf.ci[0], float_hi=wf.ci[1],
                   quant_acc=wq.estimate, quant_lo=wq.ci[0], quant_hi=wq.ci[1],
                   delta=-mc.estimate, delta_lo=-mc.ci[1], delta_hi=-mc.ci[0],
                   float_only=lg.float_only, quant_only=lg.quant_only,
                   mcnemar_p=mc.p_value, differs=bool(mc.p_value < ALPHA),
                   detectable=res_.detectable,
                   images_needed=float(math.ceil(res_.images_needed))
                   if math.isfinite(res_.images_needed) else math.inf)
    return row


HEADLINE_MODES = (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO, RoundingMode.FLOOR,
                  RoundingMode.STOCHASTIC)


def headline_accuracy(model, batches, act_qparams, seed: int, bits: int = 8,
                      first_batch: int = 0, weights_of=None, logits: dict | None = None,
                      keep: int = 0, outputs: dict | None = None) -> pd.DataFrame | None:
    """Accuracy of float and of each headline mode (``bits``, weights and activations), on
    the same images, by a plain quantized forward (no instrumentation).

    Each row: Wilson intervals, the paired difference from float and from round-to-nearest
    (even) with McNemar's test on the same images. Under torchrun each rank passes its share
    of the batches (``first_batch`` the index of its first) and rank 0 returns the table of
    all of them, the other ranks None. ``weights_of`` (configuration → quantized weights),
    where given, supplies the weights the run has already quantized. ``logits``, a dict,
    receives the logits (float64, CPU) of this rank's first ``keep`` images with their
    labels: key "float" and each mode's configuration, value (labels, logits), for a later
    phase that runs the same networks on those images (the calibration curve). ``outputs``
    (``bn_outputs``, ``block_outputs``) are the run's, so that the headline's networks are
    the ones every other table of the run measures (``act_qparams`` then holds the outputs'
    ranges too).
    """
    device = next(model.parameters()).device
    main = parallel.world()[0] == 0

    def predictions(key):
        z = [model(x.to(device)) for x, _ in batches]
        if logits is not None and keep > 0 and z:
            logits[key] = (labels[:keep].cpu(), torch.cat(z)[:keep].double().cpu())
        return torch.cat([t.argmax(1) for t in z]
                         + [torch.empty(0, dtype=torch.long, device=device)])

    with torch.inference_mode():
        labels = torch.cat([y for _, y in batches] + [torch.empty(0, dtype=torch.long)])
        labels = labels.to(device)
        with memory_format(model, forward_layout()):
            right = {"float": predictions("float") == labels}
        for mode in tqdm(HEADLINE_MODES, desc="headline accuracy", unit="mode",
                         disable=not main):
            cfg = QuantConfig.make(bits, mode, Target.BOTH, seed=seed, **(outputs or {}))
            weights = None if weights_of is None else weights_of(cfg)
            with memory_format(model, forward_layout(mode)), \
                    quantized_forward(model, cfg, act_qparams, weights=weights,
                                      first_batch=first_batch):
                pred = predictions(cfg)
            right[mode.value] = pred == labels
    shares = parallel.gather_objects({k: v.cpu() for k, v in right.items()})
    if not main:
        return None
    right = {k: torch.cat([share[k] for share in shares]) for k in right}
    n = int(right["float"].numel())
    rows = []
    near = right[RoundingMode.NEAREST_EVEN.value]
    for name, ok in right.items():
        w = wilson_ci(int(ok.sum()), n, ALPHA)
        row = {"mode": name, "bits": 32 if name == "float" else bits, "images": n,
               "acc": w.estimate, "acc_lo": w.ci[0], "acc_hi": w.ci[1]}
        refs = [] if name == "float" else [("float", right["float"])]
        if name not in ("float", RoundingMode.NEAREST_EVEN.value):
            refs.append(("nearest", near))
        for ref_name, ref in refs:
            mc = mcnemar_from_counts(int((ref & ~ok).sum()), int((ok & ~ref).sum()), n, ALPHA)
            row.update({f"delta_vs_{ref_name}": -mc.estimate,
                        f"delta_vs_{ref_name}_lo": -mc.ci[1],
                        f"delta_vs_{ref_name}_hi": -mc.ci[0],
                        f"p_vs_{ref_name}": mc.p_value})
        rows.append(row)
    return holm_columns(pd.DataFrame(rows), ["p_vs_float", "p_vs_nearest"])


def growth_rows(res: PropagationResult, seed: int) -> list[dict]:
    """Growth exponent of each metric along path depth, with bootstrap intervals.

    ``drift_rel_rms_channel_debiased`` gets an image bootstrap (every layer's figure
    recomputed from a resample of the images' per-channel drift) and a moving-block
    bootstrap over layers; ``rms_rel`` the block bootstrap only (its per-image values are
    not kept). ``answer`` says linear or √depth only where every interval is defined and
    gives that answer, the layer bootstrap's only where its residuals do not follow each
    other (:func:`qerror.nn.growth.linear_or_sqrt` of all of them).
    """
    layers = [s for s in res.layers() if s.path_depth is not None]
    depth = np.array([s.path_depth for s in layers], dtype=float)
    rows = []
    for metric in GROWTH_METRICS:
        values = np.array([getattr(s, metric) for s in layers], dtype=float)
        fits = [layer_block_bootstrap(depth, values, level=FIT_LEVEL, resamples=BOOTSTRAP,
                                      seed=seed)]
        per_image = [s.drift_image_channel for s in layers]
        if metric == "drift_rel_rms_channel_debiased" and all(v is not None for v in per_image):
            fits.insert(0, image_bootstrap(
                depth, per_image, [s.float_std_channel for s in layers], level=FIT_LEVEL,
                resamples=BOOTSTRAP, seed=seed))
        # residual_ac1: near 0 the layer bootstrap's interval holds its level, well above 0
        # it is too narrow (qerror.nn.growth.layer_block_bootstrap)
        row = {"metric": metric, "layers": len(layers), "layers_fitted": fits[0].layers,
               "exponent": fits[0].exponent, "residual_ac1": fits[0].residual_ac1,
               "answer": linear_or_sqrt(*fits)}
        for f in fits:
            tag = "images" if f.method.startswith("image") else "layers"
            # resamples_*: those whose fit was defined, of BOOTSTRAP (the interval is theirs)
            row.update({f"lo_{tag}": f.lo, f"hi_{tag}": f.hi, f"method_{tag}": f.method,
                        f"resamples_{tag}": f.resamples})
        rows.append(row)
    return rows


def remedies(model, data: Data, cfg: QuantConfig, act_qparams, weights, base: PropagationResult
             ) -> tuple[list[tuple[str, PropagationResult]], pd.DataFrame]:
    """Measure BN re-estimation and both bias corrections; predicted vs measured drift.

    The remedies are fitted on the calibration images by rank 0 and broadcast; every rank
    measures them on its share of the test batches, the three remedied networks in one
    K-way batch (:func:`qerror.nn.measure_many`: each result is what :func:`qerror.nn.measure`
    gives it, up to float rounding). Rank 0 gets the prediction rows, the other ranks an
    empty frame.
    """
    device = next(model.parameters()).device
    main = parallel.world()[0] == 0
    fitted = None
    if main:
        calib = measure(model, data.calib, cfg, act_qparams, weights=weights,
                        local_samples=1 << 30, input_maps=True)
        preds = {src: predicted_local_drift(model, cfg, calib, act_qparams, weights=weights,
                                            source=src) for src in MeanSource}
        with memory_format(model, forward_layout(cfg.rounding)):  # two plain passes
            stats = reestimate_bn(model, data.calib, cfg, act_qparams, weights=weights)
        fixes = {
            "bn_reestimation": {"bn_stats": stats},
            "bias_analytic": {"corrections": bias_correction(preds[MeanSource.BN])},
            "bias_empirical": {"corrections": empirical_bias_correction(
                model, data.calib, cfg, act_qparams, weights=weights, calibration=calib)},
        }
        fitted = fixes, preds
    fixes, preds = parallel.broadcast_object(fitted, map_location=device)
    # the three remedied networks in one K-way batch: one float chunk serves them all
    names = list(fixes)
    measured = measure_many(model, data.test, [cfg] * len(names), act_qparams,
                            weights=[weights] * len(names),
                            corrections=[fixes[n].get("corrections") for n in names],
                            bn_stats=[fixes[n].get("bn_stats") for n in names],
                            local_samples=0, first_batch=data.first_batch, across_ranks=True)
    results = list(zip(names, measured))
    rows = []
    if not main:
        return results, pd.DataFrame()
    for s in base.layers():
        if s.local_drift_channel is None:
            continue
        meas = s.local_drift_channel
        row = {**_config_columns(cfg), "layer": s.name, "depth": s.depth,
               "measured": float(np.mean(meas)), "measured_se": s.local_drift_se,
               "float_std": s.float_std}
        for src, pred in preds.items():
            p = pred[s.name]
            row[f"predicted_{src.value}"] = float(np.mean(p))
            c = np.corrcoef(p, meas)[0, 1] if p.size > 1 and np.std(p) > 0 and np.std(meas) > 0 \
                else math.nan
            row[f"channel_corr_{src.value}"] = float(c)
        rows.append(row)
    return results, pd.DataFrame(rows)


def _first_of(batches, n: int, batch: int, start: int = 0):
    """Images ``start`` to ``start + n`` of ``batches`` (the first ``n`` by default), re-cut
    into batches of ``batch``; a last batch of one image joins the one before it (BatchNorm
    re-estimation needs two)."""
    x = torch.cat([b[0] for b in batches])[start:start + n]
    y = torch.cat([b[1] for b in batches])[start:start + n]
    return calibration_batches(x, y, batch)


def draws_at(size: int, available: int, draws: int) -> int:
    """How many disjoint subsets of ``size`` calibration images the curve fits a remedy on:
    ``draws``, or as many as ``available`` images hold (at least one)."""
    return max(1, min(draws, available // size))


def pilot_local_samples(pilot_batch: int, batch: int, local_samples: int) -> int:
    """The local error's images in each pilot batch of ``pilot_batch`` images: the share of
    a full batch of the run that carries it (``local_samples`` of ``batch``), rounded up."""
    return min(pilot_batch, -(-local_samples * pilot_batch // batch)) if batch else 0


def run_pilot(model, batches, configs, act_qp, weights_of, local_samples: int,
              batch: int) -> tuple[pd.DataFrame, float]:
    """Every configuration measured on the pilot's images (each width in one K-way batch) and
    reduced to :func:`precision_rows`: how well those images pin down each layer's
    statistics, and the images the median layer needs; and the seconds the K-way batches
    took (every configuration's weights quantized before, as the run has them cached).

    The subset is sized on the drift and the MSE (:data:`SIZED_METRICS`), not on the local
    drift, so the pilot carries the local error on the share of its images that the run's
    batches of ``batch`` do (:func:`pilot_local_samples`: 8 of a 64-image pilot batch where
    the run measures it on 32 of 256), not on ``local_samples`` of each of its batches
    (half of them): its seconds are then the instrumented phase's rate, which
    :func:`estimate` takes, instead of one that erred about twice too slow, and it does
    not compute a local error nothing reads."""
    n = sum(len(y) for _, y in batches)
    for cfg in configs:
        weights_of(cfg)
    pilot_batch = max((len(y) for _, y in batches), default=0)
    local = pilot_local_samples(pilot_batch, batch, local_samples)
    with tqdm(total=len(configs), desc="pilot", unit="config") as bar:
        start = time.perf_counter()
        # the standard errors come from the streaming per-image sums: no means kept
        measured = list(measure_widths(model, batches, configs, act_qp, weights_of,
                                       local, bar))
        seconds = time.perf_counter() - start
    frames = [res.to_frame().assign(**_config_columns(cfg)) for cfg, res in measured]
    return precision_rows(pd.concat(frames, ignore_index=True), n,
                          local_images(n, pilot_batch, local)), seconds


def _claims_config(cfg: QuantConfig) -> bool:
    """Whether ``cfg`` is one the ledger's network claims are stated on: weights and
    activations quantized in one of their modes."""
    return cfg.target is Target.BOTH and cfg.rounding in STATEMENT_MODES


def _states(cfg: QuantConfig, results: dict) -> bool:
    """Whether the ledger's network claims are measured on ``cfg``: one they are stated on
    (:func:`_claims_config`), on labelled images."""
    res = results[tuple(_config_columns(cfg).values())]
    return _claims_config(cfg) and res.logits.float_correct is not None


def image_statements(cfg: QuantConfig, res: PropagationResult, results: dict, bounds,
                     seed: int, kept_images: int | None = None) -> dict[str, float]:
    """The quantities that decide the network claims on this network with the images random.

    ``growth_image_lo``: the lower end of the image bootstrap's interval for the growth
    exponent of the debiased drift over the convolutions, the layers whose exponent the
    claims' ``growth`` and ``growth_lo`` are (:func:`qerror.nn.seeds.growth_over_images`;
    :func:`growth_rows` fits the linear layers too), NaN where the images' drifts were not
    kept; ``bn_some_lo`` and ``bn_all_hi``:
    ``bounds`` (:func:`qerror.nn.bn.inconsistency_bounds`) — some BatchNorm's figure exceeds
    a threshold below ``bn_some_lo``, every one's lies under a threshold above
    ``bn_all_hi``; and for a mode other than round-to-nearest, ``drift_deep_gap``,
    ``drift_deep_gap_lo`` and ``drift_deep_gap_hi``: its ``drift_deep`` less
    round-to-nearest's at the same width, with the image bootstrap's interval
    (:func:`qerror.nn.seeds.deepest_drift_gap`, over the first ``kept_images`` images where
    given, as measured with ``image_means=kept_images``), where round-to-nearest was
    measured too.
    """
    fit = growth_over_images(res, level=FIT_LEVEL, resamples=BOOTSTRAP, seed=seed)
    out = {"growth_image_lo": math.nan if fit is None else fit.lo,
           "bn_some_lo": bounds.some_lo, "bn_all_hi": bounds.all_hi}
    near = {**_config_columns(cfg), "mode": RoundingMode.NEAREST_EVEN.value}
    reference = results.get(tuple(near.values()))
    if cfg.rounding is not RoundingMode.NEAREST_EVEN and reference is not None:
        gap = deepest_drift_gap(res, reference, level=FIT_LEVEL, resamples=BOOTSTRAP,
                                seed=seed, kept_images=kept_images)
        out.update(drift_deep_gap=gap.gap, drift_deep_gap_lo=gap.lo, drift_deep_gap_hi=gap.hi)
    return out


def measure_widths(model, batches, configs, act_qp, weights_of, local_samples: int, bar=None,
                   **kwargs):
    """``(configuration, result)`` for every configuration, each width's in one K-way batch
    (:func:`qerror.nn.measure_many`, with ``kwargs``; chunks of at least :data:`KWAY_CHUNK`
    images, passes cut from the largest batch's size), width by width; ``bar`` (a tqdm) says
    which width runs and advances by its configurations."""
    size = max((len(y) for _, y in batches), default=1)
    for bits, group in width_groups(configs).items():
        if bar is not None:
            bar.set_postfix_str(f"{bits} bits: {len(group)} configurations in one K-way batch")
        measured = measure_many(model, batches, group, act_qp[bits],
                                weights=[weights_of(c) for c in group],
                                local_samples=local_samples,
                                pair_batch=default_pair_batch(size, len(group),
                                                              min_chunk=KWAY_CHUNK), **kwargs)
        yield from zip(group, measured)
        if bar is not None:
            bar.update(len(group))


def calibration_curve(model, calib, test, cfgs, act_qparams, weights_of, sizes,
                      batch: int, known: dict | None = None, draws: int = 1) -> pd.DataFrame:
    """Accuracy after BN re-estimation and after empirical bias correction fitted on the
    first ``n`` calibration images, for each ``n`` in ``sizes``, on the ``test`` batches by a
    plain quantized forward (no instrumentation); with ``draws`` above 1, also on the next
    disjoint blocks of ``n`` images, up to ``draws`` blocks in all where the calibration
    images hold them (:func:`draws_at`; column ``draw``, 0 for the first images), so
    that a remedy's own sampling noise at one size shows as the spread between its fits.

    Each row: the remedy's accuracy with its Wilson interval, the unremedied and float
    accuracy on the same images, the share of the lost accuracy recovered, McNemar's test
    of the remedy against no remedy (paired, same images), and the logits' SQNR against the
    float network's with and without the remedy (:func:`qerror.nn.sqnr_db` of
    ``Σ z_f²`` and ``Σ (z_q − z_f)²`` in float64, as :class:`qerror.nn.LogitResult` has
    it). A remedy's own sampling noise shows as the spread of its figures across ``n``;
    where quantization costs little accuracy (eight bits) it shows in the SQNR.

    ``known`` (:func:`headline_accuracy`'s ``logits``: "float" or a configuration → labels
    and logits of the first images of the same split) stands in for the float network's
    forward and for a configuration's unremedied one where it covers every image of
    ``test`` with the same labels: the same networks on the same images, computed once (up
    to float rounding where the headline's batches cut the images elsewhere). The caller
    vouches that they are the same images (both the split's first, in order); the labels
    only catch a mismatch of order or length.
    """
    device = next(model.parameters()).device

    def forward():
        with torch.inference_mode():
            z = torch.cat([model(x.to(device)).double().cpu() for x, _ in test])
        return z.argmax(1) == labels, z

    def reused(key):
        """(right, logits) from ``known`` where it holds every image of ``test``."""
        got = (known or {}).get(key)
        if got is None or len(got[0]) < len(labels) or \
                not torch.equal(got[0][:len(labels)], labels):
            return None
        z = got[1][:len(labels)]
        return z.argmax(1) == labels, z

    def logit_sqnr(z):
        return sqnr_db(float((z_float ** 2).sum()), float(((z - z_float) ** 2).sum()))

    labels = torch.cat([y for _, y in test])
    right_float, z_float = reused("float") or (None, None)
    if z_float is None:
        with memory_format(model, forward_layout()):
            right_float, z_float = forward()
    n_img = int(right_float.numel())
    rows = []
    available = sum(len(y) for _, y in calib)
    work = [(cfg, n, d) for cfg in cfgs for n in sizes
            for d in range(draws_at(n, available, draws))]
    base = {}
    for cfg, n, draw in tqdm(work, desc="calibration curve", unit="fit", leave=False):
        cols = _config_columns(cfg)
        qp, w = act_qparams[cols["bits"]], weights_of(cfg)
        layout = forward_layout(cfg.rounding)  # plain passes; bias correction measures
        if cfg.label not in base:
            base[cfg.label] = reused(cfg)
        if base[cfg.label] is None:
            with memory_format(model, layout), quantized_forward(model, cfg, qp, weights=w):
                base[cfg.label] = forward()
        none, z_none = base[cfg.label]
        cal = _first_of(calib, n, batch, start=draw * n)
        with memory_format(model, layout):
            stats = reestimate_bn(model, cal, cfg, qp, weights=w)
        fixes = {"bn_reestimation": {"bn_stats": stats},
                 "bias_empirical": {"corrections": empirical_bias_correction(
                     model, cal, cfg, qp, weights=w)}}
        for remedy, kw in fixes.items():
            with memory_format(model, layout), \
                    quantized_forward(model, cfg, qp, weights=w, **kw):
                ok, z = forward()
            ci = wilson_ci(int(ok.sum()), n_img, ALPHA)
            mc = mcnemar_from_counts(int((ok & ~none).sum()), int((none & ~ok).sum()), n_img,
                                     ALPHA)
            acc_none, acc_float = float(none.double().mean()), float(right_float.double().mean())
            rows.append({**cols, "remedy": remedy, "calib_images": sum(len(y) for _, y in cal),
                         "draw": draw,
                         "images": n_img, "acc": ci.estimate, "acc_lo": ci.ci[0],
                         "acc_hi": ci.ci[1], "acc_unremedied": acc_none, "float_acc": acc_float,
                         "recovered": recovered_share(right_float, none, ok),
                         "delta_vs_unremedied": mc.estimate, "delta_lo": mc.ci[0],
                         "delta_hi": mc.ci[1], "p_vs_unremedied": mc.p_value,
                         "logit_sqnr_db": logit_sqnr(z),
                         "logit_sqnr_unremedied_db": logit_sqnr(z_none)})
    return pd.DataFrame(rows)


def curve_spread(curve: pd.DataFrame) -> pd.DataFrame:
    """Per remedy, configuration and size fitted on more than one disjoint draw of
    calibration images: the draws, the mean and the standard deviation across them
    (``ddof=1``) of the accuracy and of the logit SQNR. Every draw is evaluated on the same
    test images, so the spread is the remedy's own sampling noise at that size (the test
    images' is in each draw's Wilson interval). Empty where no size had two draws."""
    keys = ["mode", "bits", "target", "remedy", "calib_images"]
    g = curve.groupby(keys, sort=False)
    out = g.agg(draws=("draw", "size"), acc_mean=("acc", "mean"), acc_sd=("acc", "std"),
                logit_sqnr_mean_db=("logit_sqnr_db", "mean"),
                logit_sqnr_sd_db=("logit_sqnr_db", "std")).reset_index()
    return out[out.draws > 1].reset_index(drop=True)


def curve_macros(curve: pd.DataFrame) -> dict:
    """The calibration curve's ends for the paper, per remedy, mode and width: accuracy (%),
    recovered share (%) and logit SQNR (dB) at the fewest and at the most calibration
    images, and the unremedied figures; of the first draw (the split's first images)."""
    curve = curve[curve.draw == 0]
    least, most = int(curve.calib_images.min()), int(curve.calib_images.max())
    m = {"CurveImages": f"{int(curve.images.iloc[0]):,}", "CurveLeast": f"{least:,}",
         "CurveMost": f"{most:,}", "CurveFloat": number(100 * curve.float_acc.iloc[0], 3)}
    for _, r in curve[curve.calib_images.isin([least, most])].iterrows():
        key = letters(f"{r.remedy}_{r['mode']}_{r.bits}")
        # both ends where the curve has one size: it is the fewest and the most images
        for end in [e for e, size in (("Least", least), ("Most", most))
                    if r.calib_images == size]:
            m[f"CurveAcc{end}{key}"] = number(100 * r.acc, 3)
            m[f"CurveRecovered{end}{key}"] = ("n/a" if not np.isfinite(r.recovered)
                                              else number(100 * r.recovered, 2))
            m[f"CurveSqnr{end}{key}"] = number(r.logit_sqnr_db, 3)
    for (mode, bits), d in curve.groupby(["mode", "bits"]):
        key = letters(f"{mode}_{bits}")
        m[f"CurveUnremedied{key}"] = number(100 * d.acc_unremedied.iloc[0], 3)
        m[f"CurveSqnrUnremedied{key}"] = number(d.logit_sqnr_unremedied_db.iloc[0], 3)
    return m


def recovered_fraction(float_acc, unremedied_acc, remedied_acc, lost_significant):
    """The share of the accuracy lost to quantization that a remedy wins back:
    ``(remedied - unremedied) / (float - unremedied)``, NaN unless the loss is positive and
    significant (McNemar against float at ALPHA, ``lost_significant``): a share of a loss
    indistinguishable from 0 means nothing (a loss of one image in a few thousand once gave
    shares of several hundred per cent). Scalars or arrays of one length."""
    lost = np.asarray(float_acc, dtype=float) - np.asarray(unremedied_acc, dtype=float)
    real = np.asarray(lost_significant, dtype=bool) & (lost > 0)
    share = np.where(real, (np.asarray(remedied_acc, dtype=float)
                            - np.asarray(unremedied_acc, dtype=float))
                     / np.where(lost > 0, lost, 1.0), np.nan)
    return float(share) if share.ndim == 0 else share


def recovered_share(right_float: torch.Tensor, unremedied: torch.Tensor,
                    remedied: torch.Tensor) -> float:
    """:func:`recovered_fraction` from each image's correctness (bool tensors) under the
    float, the unremedied and the remedied network, the loss's McNemar test on these
    images."""
    n = int(right_float.numel())
    mc = mcnemar_from_counts(int((right_float & ~unremedied).sum()),
                             int((unremedied & ~right_float).sum()), n, ALPHA)
    return recovered_fraction(right_float.double().mean().item(),
                              unremedied.double().mean().item(),
                              remedied.double().mean().item(), mc.p_value < ALPHA)


def recovery(acc: pd.DataFrame) -> pd.DataFrame:
    """Per remedy: the fraction of the accuracy lost to quantization it wins back
    (:func:`recovered_fraction`, the loss's significance from the unremedied row's
    ``differs``), and its change of the logits' SQNR (dB), against the same configuration
    without remedy.
    """
    if "quant_acc" not in acc:
        return acc
    keys = ["mode", "bits", "target"]
    base = acc.loc[acc.remedy == "none", [*keys, "quant_acc", "logit_sqnr_db", "differs"]]
    joined = acc.merge(base, on=keys, how="left", suffixes=("", "_unremedied"))
    remedied = (joined.remedy != "none").to_numpy()
    joined["recovered"] = recovered_fraction(
        joined.float_acc, joined.quant_acc_unremedied, joined.quant_acc,
        remedied & joined.differs_unremedied.fillna(False).astype(bool).to_numpy())
    joined["sqnr_gain_db"] = np.where(remedied,
                                      joined.logit_sqnr_db - joined.logit_sqnr_db_unremedied,
                                      np.nan)
    return joined.drop(columns=["quant_acc_unremedied", "logit_sqnr_db_unremedied",
                                "differs_unremedied"])


def int8_crosscheck(model, data: Data, images: int, act_range: RangePolicy = RangePolicy()):
    """Per-layer agreement of the simulation with PyTorch's real INT8 kernels.

    Every conv (BatchNorm folded, ReLU fused) and the classifier run on their float inputs
    through FBGEMM and through qerror's simulations, with the same scales: full-range
    8-bit activations, and 7-bit ones (PyTorch's ``reduce_range``, which its x86 observers
    use because the AVX2 kernel's int16 pair sums saturate otherwise).

    Returns the per-layer rows, the per-variant summary (its ``faithful`` column marks the
    pipeline that models the kernel that ran; ``saturated`` counts kernel saturation, zero
    where the kernel does not saturate, and ``avx2_saturated`` what AVX2 would saturate)
    and the :class:`qerror.nn.int8.KernelProbe` that decided which pipeline is faithful.
    """
    from qerror.nn import int8

    def split(x):
        return [x[i:i + 64] for i in range(0, len(x), 64)]

    calib, test = split(_first_images(data.calib, images)), split(data.int8_test[:images])
    frames, summaries = [], []
    for label, reduce_range in (("full_range", False), ("reduce_range", True)):
        check = int8.crosscheck_model(model, calib, test, reduce_range=reduce_range,
                                      act_range=act_range)
        frames.append(check.to_frame().assign(activations=label))
        summaries.append(check.summary().assign(activations=label))
    return (pd.concat(frames, ignore_index=True), pd.concat(summaries, ignore_index=True),
            check.probe)


def int8_caption(probe) -> str:
    """The INT8 table's caption: what was compared, and which pipeline the kernel probe
    found faithful on this CPU (or that it found none)."""
    engine = probe.engine.value.upper()
    if probe.faithful is None:
        found = ("The kernel probe matched neither integer pipeline on this CPU "
                 f"({probe.cpu_words}), so no row is faithful; summary.json says why.")
    else:
        how = "saturates" if probe.saturates_pairs else "does not saturate"
        found = (f"On this CPU ({probe.cpu_words}) the kernel probe found "
                 f"that {engine} {how} int16 pair sums: the faithful model is the "
                 f"{probe.faithful.value} pipeline with reciprocal arithmetic.")
        if probe.single_channel_conv_modelled is False:
            found += (" It does not model this kernel's convolutions with one input channel "
                      "(it pairs their products across kernel taps), so no row of such a "
                      "layer, and no row over all layers, is marked faithful.")
    return (f"qerror's simulation against PyTorch's {engine} INT8 kernels, layer by layer on "
            "the same float inputs and scales: fraction of output codes equal and the "
            f"largest difference in LSB. {found}")


# --------------------------------------------------------------------------- time

LONG_S = 600  # an estimate above this on a CPU comes with the ways to shorten the run
RUN_PHASES = ("instrumented", "remedies", "headline", "curve")  # as estimate() names them


def estimate(model, data: Data, configs, remedy_configs, act_qp, weights_of, local_samples: int,
             place, curve_sizes=(), kway_rate: float | None = None, curve_draws: int = 1
             ) -> dict:
    """Time what each phase runs on this rank's first batch and extrapolate every phase.

    The instrumented phase runs at ``kway_rate`` (images × configurations per second) where
    the pilot measured it (``rate_source`` "pilot"): the same configurations in K-way
    batches, on a batch of pilot images carrying the local error on the run's share of its
    images (:func:`run_pilot`). Without a pilot (``rate_source`` "probe") the
    first configuration of each target is timed, one instrumented pass and one plain
    quantized forward over the first batch, and each configuration is costed at its
    target's rates less the float forward a width's K-way batch shares, for which its plain
    forward stands in (the modes differ in cost, stochastic rounding most, and the probe
    runs each target's first). The remedies' target is probed in either case
    (``probe_targets``; ``probe_s`` and ``plain_probe_s`` are the probes' summed seconds,
    ``measure_images_per_s`` and ``plain_images_per_s`` their rates averaged over the probed
    targets). The headline's float forward and its four modes' plain forwards are timed on
    up to 64 images of the first batch (at the run's widest width where it has no 8-bit
    ranges).

    Phases (seconds, ``estimated_<phase>_s``): ``instrumented``, images × configurations
    (``images_per_s_per_config`` the rate); ``remedies``, per remedy configuration a
    calibration pass with every image's local error (timed on up to 64 images of the first
    batch), a BatchNorm re-estimation (``BN_REESTIMATION_PASSES`` plain forwards) and a
    K-way instrumented pass of the three remedied networks over the test images;
    ``headline``, the float forward and
    the four modes over the headline images; ``curve`` (rank 0), a float forward and per
    remedy configuration an unremedied plain forward over the curve's test images and, at
    each calibration size, both remedies' fits (the bias correction's timed on up to 64
    images: :func:`qerror.nn.local_error_means`), BatchNorm re-estimation's plain
    forwards over the calibration images and two plain forwards. ``estimated_s`` is
    the instrumented passes alone (configurations and the remedies'), ``estimated_total_s``
    the sum of the phases.
    ``load_average`` and ``usable_cpus`` (:func:`studies._common.machine_load`, taken before
    the probes) say whether other work shared the CPUs while they ran: on a busy machine
    every figure above may be several times a quiet one's (a ResNet50's 64-image 8-bit
    forward measured here 2.2 ms an image quiet and 40 ms beside four other processes on
    two CPUs), and :func:`estimate_message` says so.
    Not in the estimate: each configuration's analysis on rank 0 (growth bootstraps,
    statements), the statement configurations' passes for their BatchNorm moments (a plain
    paired pass each: :func:`qerror.nn.seeds.bn_image_moments`), the pilot, these probes,
    the INT8 cross-check and the outputs; the whole-run bar's ETA absorbs them as the
    phases end.
    """
    x, y = data.test[0]
    device = place.device
    source = "pilot" if kway_rate else "probe"
    load = machine_load()  # before the probes add their own
    # the run's output quantizers (the headline's networks are those of the run)
    outputs = next(({"bn_outputs": c.bn_outputs, "block_outputs": c.block_outputs}
                    for c in configs if c.activation is not None), {})

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def plain_s(cfg, images, w=None) -> float:
        """Seconds per image of a plain forward of ``images`` (float where cfg is None), in
        the layout the run's plain passes take (:func:`qerror.nn.models.forward_layout`);
        the shorter of two calls after a first (which sets up that layout's kernels, which
        the run's passes pay once): a call that another process stalled is not taken."""
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            stack.enter_context(memory_format(model, forward_layout(
                None if cfg is None else cfg.rounding)))
            if cfg is not None:
                stack.enter_context(quantized_forward(model, cfg, act_qp[_bits(cfg)],
                                                      weights=w))
            model(images.to(device))
            return min(timed(lambda: model(images.to(device))) for _ in range(2)) / len(images)

    def probe(cfg) -> tuple[float, float]:
        """Seconds per image of ``cfg``'s instrumented pass and of its plain forward."""
        qp, w = act_qp[_bits(cfg)], weights_of(cfg)
        inst_s = timed(lambda: measure(model, [(x, y)], cfg, qp, weights=w,
                                       local_samples=min(local_samples, len(y))))
        return inst_s / len(y), plain_s(cfg, x, w)

    wanted = [*remedy_configs, *(configs if source == "probe" else [])]
    probes: dict[Target, tuple[float, float]] = {}
    for cfg in wanted:
        if cfg.target not in probes:
            probes[cfg.target] = probe(cfg)
    if source == "probe":
        # A width's K configurations share one float chunk: each costs its measure less the
        # share of the float forward it no longer runs (its plain forward stands in for it).
        many = sum(max(probes[c.target][0] - probes[c.target][1] * (len(g) - 1) / len(g),
                       probes[c.target][1])
                   for g in width_groups(configs).values() for c in g)  # s per image, all
        kway_rate = len(configs) / many
    images = data.identity["test_images"]
    passes = len(configs) + 3 * len(remedy_configs)
    share = -(-images // place.world_size)  # the largest share a rank measures, about
    n_remedy = len(remedy_configs)
    inst_r, fwd_r = probes[remedy_configs[0].target] if remedy_configs else (0.0, 0.0)
    few_x, few_y = x[:64], y[:64]  # the shorter probes' images
    # a calibration image of the remedies' fit (an instrumented pass measuring every image's
    # local error) and of the curve's (each layer's local error beside the float forward)
    calib_r = fit_r = 0.0
    if remedy_configs:
        cfg = remedy_configs[0]
        qp, w = act_qp[_bits(cfg)], weights_of(cfg)
        calib_r = timed(lambda: measure(model, [(few_x, few_y)], cfg, qp, weights=w,
                                        local_samples=len(few_y))) / len(few_y)
        if data.curve_calib:
            fit_r = timed(lambda: local_error_means(model, [(few_x, few_y)], cfg, qp,
                                                    weights=w)) / len(few_y)
    calib = sum(len(b[1]) for b in data.calib)
    head = sum(len(b[1]) for b in data.headline) if data.headline else 0
    curve_test = sum(len(b[1]) for b in data.curve_test) if data.curve_test else 0
    sizes = list(curve_sizes) if data.curve_calib else []
    # each size fitted on as many disjoint draws as the curve's calibration images hold
    drawn = sum(len(b[1]) for b in data.curve_calib) if data.curve_calib else 0
    fits = {n: draws_at(n, drawn, curve_draws) for n in sizes}
    fwd_float = plain_s(None, few_x) if head or sizes else 0.0
    fwd_head = 0.0
    if head:  # the headline's own modes, 8-bit weights and activations
        # where the run calibrates no 8-bit ranges (the headline calibrates its own), its
        # widest width's stand in, the weights quantized apart (the run keeps none of them)
        width = 8 if 8 in act_qp else max(act_qp)
        for mode in HEADLINE_MODES:
            cfg = QuantConfig.make(width, mode, Target.BOTH, seed=configs[0].seed, **outputs)
            fwd_head += plain_s(cfg, few_x, weights_of(cfg) if width == 8 else None)
    # the three remedied networks' K-way pass: three measures less the two float chunks they
    # share (a plain forward stands in for a float chunk), as for the configurations above
    remedy_kway = max(3 * inst_r - 2 * fwd_r, 3 * fwd_r)
    # as calibration_curve decides it: the headline's share holds the curve's images, and a
    # configuration is one the headline runs
    covers = bool(head) and head >= curve_test
    reused = sum(1 for c in remedy_configs if covers and c in {
        QuantConfig.make(8, m, Target.BOTH, seed=c.seed, **outputs) for m in HEADLINE_MODES})
    phases = {
        "instrumented": len(configs) * share / kway_rate,
        # BatchNorm re-estimation's plain passes over the calibration images
        "remedies": n_remedy * (calib * (calib_r + BN_REESTIMATION_PASSES * fwd_r)
                                + share * remedy_kway),
        "headline": head * (fwd_float + fwd_head),
        # the headline's forwards stand in for the float and the unremedied forwards of the
        # configurations it runs (calibration_curve's ``known``)
        "curve": ((n_remedy - reused) * curve_test * fwd_r
                  + (0.0 if covers else curve_test * fwd_float)
                  + n_remedy * sum(fits[n] * (n * (fit_r + BN_REESTIMATION_PASSES * fwd_r)
                                               + 2 * curve_test * fwd_r)  # both remedies
                                   for n in sizes)) if sizes else 0.0,
    }
    rates = list(probes.values())
    return {"device": device.type, "world_size": place.world_size, **load,
            "probe_images": len(y),
            "probe_targets": " ".join(t.value for t in probes),
            "probe_s": sum(p[0] for p in rates) * len(y),
            "images_per_s_per_config": kway_rate,
            "rate_source": source,
            "measure_images_per_s": len(rates) / sum(p[0] for p in rates) if rates
            else math.nan,
            "plain_probe_s": sum(p[1] for p in rates) * len(y),
            "plain_images_per_s": len(rates) / sum(p[1] for p in rates) if rates else math.nan,
            "images": images, "configurations": len(configs),
            "remedy_configurations": n_remedy, "passes": passes,
            "estimated_s": phases["instrumented"] + n_remedy * share * remedy_kway,
            **{f"estimated_{k}_s": v for k, v in phases.items()},
            "estimated_total_s": sum(phases.values())}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate_message(t: dict) -> str:
    """What :func:`estimate` found, in words, with the ways to shorten a long CPU run."""
    ranks = f" on each of {t['world_size']} ranks" if t["world_size"] > 1 else ""
    msg = (f"[drift] {t['images_per_s_per_config']:.3g} images/s per configuration "
           f"on {t['device']}{ranks} (each width's configurations in one K-way batch, "
           + ("as the pilot measured them" if t.get("rate_source") == "pilot" else
              f"from measure's rate on a first batch of {t['probe_images']}") + "); "
           f"{t['images']} images x {t['passes']} passes ({t['configurations']} "
           f"configurations + 3 remedies x {t['remedy_configurations']}) "
           f"{'/ ' + str(t['world_size']) + ' ranks ' if t['world_size'] > 1 else ''}"
           f"≈ {_duration(t['estimated_s'])}")
    total = t.get("estimated_total_s")
    if total is not None:
        parts = ", ".join(f"{k} {_duration(t[f'estimated_{k}_s'])}" for k in RUN_PHASES
                          if t.get(f"estimated_{k}_s"))
        msg += f"; the whole run ≈ {_duration(total)} ({parts}) plus the INT8 cross-check"
    else:
        msg += ", plus calibration, headline and INT8 passes"
    if t["device"] == "cpu" and t.get("load_average", 0.0) > t.get("usable_cpus", math.inf):
        msg += (f"\n[drift] the machine was busy while these were timed (load average "
                f"{t['load_average']:.1f} on {t['usable_cpus']:.0f} usable CPUs): each "
                "figure may be several times what a quiet machine takes; the whole-run bar's "
                "ETA follows the phases as they end")
    if max(t["estimated_s"], total or 0.0) > LONG_S and t["device"] == "cpu":
        msg += ("\n[drift] that is long: measure fewer images (--images), fewer "
                "configurations (--modes, --bits, --targets, --remedy-bits with no value), "
                "run on a GPU (--device cuda), or split the images across processes or "
                "machines (torchrun --nproc-per-node N -m studies.drift ...)")
    return msg


# --------------------------------------------------------------------------- figures

def figure_depth(plt, sites: pd.DataFrame, bits: int, target: str):
    panels = [("drift_rel", "drift / float std"),
              ("drift_rel_rms_channel_debiased", "per-channel |drift| / std (RMS, debiased)"),
              ("sqnr_db", "SQNR (dB)"),
              ("saturation", "saturated inputs (solid: qmax, dashed: qmin)"),
              ("bn_mean_shift_qf_mean", "BN mean shift from quantization (σ_run)"),
              ("bn_var_ratio_qf_gmean", "BN variance ratio σ²_q/σ²_f")]
    d = sites[(sites.bits == bits) & (sites.target == target)]
    # near the paper's text width (printed at 7/8 of this): its text prints at 6 to 8 points
    fig, axes = plt.subplots(2, 3, figsize=(1.15 * PRINT_WIDTH, 5.4), sharex=True)
    modes = list(dict.fromkeys(d["mode"]))
    colors = dict(zip(modes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (metric, label) in zip(axes.flat, panels):
        for mode in modes:
            dm = d[d["mode"] == mode]
            if metric == "saturation":
                for m, ls in (("saturation_high", "-"), ("saturation_low", "--")):
                    s = dm[dm.metric == m].sort_values("order")
                    ax.plot(s.order, s.value, ls, color=colors[mode],
                            label=mode if ls == "-" else None)
                continue
            s = dm[dm.metric == metric].sort_values("order")
            ax.plot(s.order, s.value, "-", color=colors[mode], label=mode, lw=1)
        ax.set_title(textwrap.fill(label, 28), fontsize=8)
        ax.tick_params(labelsize=7)
        if metric == "drift_rel_rms_channel_debiased":
            ax.set_yscale("symlog", linthresh=1e-4)
    for ax in axes[1]:
        ax.set_xlabel("site (execution order)", fontsize=8)
    axes[0, 0].legend(fontsize=6.5)
    fig.suptitle(f"{bits}-bit, {target}: quantized minus float network along depth",
                 fontsize=9)
    fig.tight_layout()
    return fig


def figure_accuracy(plt, acc: pd.DataFrame):
    targets = list(dict.fromkeys(acc.target))
    fig, axes = plt.subplots(1, len(targets), figsize=(row_width(len(targets), 4.0), 3.4), sharey=True,
                             squeeze=False)
    for ax, target in zip(axes[0], targets):
        d = acc[(acc.target == target) & (acc.remedy == "none")]
        modes = list(dict.fromkeys(d["mode"]))
        widths = sorted(d.bits.unique(), reverse=True)
        # the widths side by side, centred on their mode's tick and within ±0.4 of it
        step = min(0.25, 0.8 / len(widths))
        for j, bits in enumerate(widths):
            db = d[d.bits == bits].set_index("mode").reindex(modes)
            x = np.arange(len(modes)) + (j - (len(widths) - 1) / 2) * step
            ax.errorbar(x, db.quant_acc, yerr=[db.quant_acc - db.quant_lo,
                                               db.quant_hi - db.quant_acc],
                        fmt="o", ms=4, capsize=2, label=f"{bits} bits")
        f = d.iloc[0]
        ax.axhspan(f.float_lo, f.float_hi, color="0.85", zorder=0, label="float (CI)")
        ax.set_xticks(range(len(modes)), modes, rotation=30, fontsize=7)
        ax.set_title(f"quantized: {target}")
    axes[0, 0].set_ylabel(f"accuracy ({100 * (1 - ALPHA):g}% Wilson CI)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_growth(plt, sites: pd.DataFrame, target: str, metric: str):
    bits_list = sorted(sites.bits.unique(), reverse=True)
    fig, axes = plt.subplots(1, len(bits_list), figsize=(row_width(len(bits_list), 4.2, 0.85), 3.6),
                             squeeze=False, sharey=True)
    for ax, bits in zip(axes[0], bits_list):
        d = sites[(sites.bits == bits) & (sites.target == target) & (sites.metric == metric)
                  & sites.kind.isin(["conv", "linear"])]
        for mode in dict.fromkeys(d["mode"]):
            s = d[d["mode"] == mode].sort_values("path_depth")
            ax.loglog(s.path_depth, s.value, ".", ms=4, label=mode)
        if len(d):
            ref = np.arange(1, d.path_depth.max() + 1)
            y0 = d[d.path_depth == d.path_depth.min()].value.median()
            ax.loglog(ref, y0 * ref, "k:", lw=0.8, label="∝ depth")
            ax.loglog(ref, y0 * np.sqrt(ref), "k--", lw=0.8, label="∝ √depth")
        ax.set_title(f"{bits}-bit, {target}", fontsize=9)
    # one label under the row: a label per panel is wider than its panel and they overlap
    fig.supxlabel("path depth (quantized layers on the longest path)", fontsize=9)
    axes[0, 0].set_ylabel(GROWTH_LABELS.get(metric, metric.replace("_", " ")))
    # beside the last panel: inside it, it hid the deepest layers' points
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def figure_remedies(plt, acc: pd.DataFrame):
    d = acc[acc.target == "both"]
    d = d[d.set_index(["mode", "bits"]).index.isin(
        d[d.remedy != "none"].set_index(["mode", "bits"]).index)]
    configs = list(dict.fromkeys(zip(d["mode"], d.bits)))
    labels = [f"{m}\n{b} bit" for m, b in configs]
    remedies_ = list(dict.fromkeys(d.remedy))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 3.6))
    for j, rem in enumerate(remedies_):
        dr = d[d.remedy == rem]
        # each point over its own configuration's label, whatever order the rows came in
        x = np.array([configs.index(c) for c in zip(dr["mode"], dr.bits)]) \
            + (j - len(remedies_) / 2) * 0.18
        ax.errorbar(x, dr.quant_acc, yerr=[dr.quant_acc - dr.quant_lo, dr.quant_hi - dr.quant_acc],
                    fmt="o", ms=4, capsize=2, label=rem)
    if len(d):
        ax.axhline(d.float_acc.iloc[0], color="k", lw=0.8, ls=":", label="float")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_calibration_curve(plt, curve: pd.DataFrame):
    """Accuracy (top) and logit SQNR (bottom) after each remedy against the calibration
    images it was fitted on, one column per width; dotted: the same without a remedy; open
    markers: the fits on further disjoint draws of as many images."""
    widths = sorted(curve.bits.unique(), reverse=True)
    fig, axes = plt.subplots(2, len(widths), figsize=(row_width(len(widths), 4.2, 0.85), 6.2), squeeze=False,
                             sharex=True)
    for col, bits in enumerate(widths):
        for (mode, remedy), d in curve[curve.bits == bits].groupby(["mode", "remedy"],
                                                                  sort=False):
            more = d[d.draw > 0]  # other disjoint draws: open markers at their sizes
            d = d[d.draw == 0].sort_values("calib_images")
            label = f"{mode}, {remedy}"
            err = [100 * (d.acc - d.acc_lo), 100 * (d.acc_hi - d.acc)]
            bars = axes[0, col].errorbar(d.calib_images, 100 * d.acc, yerr=err, marker="o",
                                         ms=3, lw=1, capsize=2, label=label)
            color = bars[0].get_color()
            if len(more):
                axes[0, col].plot(more.calib_images, 100 * more.acc, "o", ms=3, mfc="none",
                                  mew=0.6, color=color)
                axes[1, col].plot(more.calib_images, more.logit_sqnr_db, "o", ms=3, mfc="none",
                                  mew=0.6, color=color)
            axes[0, col].axhline(100 * d.acc_unremedied.iloc[0], lw=0.6, ls=":", color=color)
            axes[1, col].plot(d.calib_images, d.logit_sqnr_db, "o-", ms=3, lw=1, color=color)
            axes[1, col].axhline(d.logit_sqnr_unremedied_db.iloc[0], lw=0.6, ls=":",
                                 color=color)
        axes[0, col].axhline(100 * curve.float_acc.iloc[0], color="k", lw=0.8, label="float")
        axes[0, col].set_title(f"{bits}-bit weights and activations", fontsize=8)
        axes[1, col].set_xscale("log")
        axes[1, col].set_xlabel("calibration images the remedy is fitted on")
    axes[0, 0].set_ylabel("top-1 accuracy (%)")
    axes[1, 0].set_ylabel("logit SQNR (dB)")
    # Below the axes: the lines span the whole width at heights that differ by mode.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def figure_prediction(plt, pred: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(4.4, 4))
    for (mode, bits), d in pred.groupby(["mode", "bits"], sort=False):
        rel = d.float_std.where(d.float_std > 0)
        ax.plot(d.predicted_bn / rel, d.measured / rel, ".", ms=4, label=f"{mode} {bits} bit")
    lim = ax.get_xlim()
    ax.plot(lim, lim, "k:", lw=0.8)
    ax.set_xlabel("predicted mean local error / float std")
    ax.set_ylabel("measured mean local error / float std")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main

def prediction_error(pred: pd.DataFrame) -> float:
    """Median over layers of |predicted − measured| mean local error, in float stds."""
    return float(np.nanmedian(np.abs(pred.predicted_bn - pred.measured)
                              / pred.float_std.where(pred.float_std > 0)))


MACRO_MODES = (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO)


def _macros(acc: pd.DataFrame, fits: pd.DataFrame, sites: pd.DataFrame, pred: pd.DataFrame,
            xsummary: pd.DataFrame | None, headline: pd.DataFrame | None,
            test_split: int | None = None) -> dict:
    """The numbers the paper quotes, each from this run's tables.

    A macro is written only when its configuration was measured, so a run with fewer modes
    or widths gives fewer macros and the paper's build names the missing ones.
    ``test_split``: the images of the test split the headline's first images come from;
    ``HeadlineScope`` says, in words, whether the headline read all of them.
    """
    m = {}
    base = acc[acc.remedy == "none"]
    both = base[base.target == "both"] if "target" in base else base.iloc[:0]
    if "float_acc" in base and len(base):
        m["FloatAccuracy"] = f"{100 * base.float_acc.iloc[0]:.2f}"
    if "detectable" in base and len(base):
        # what the measured subset resolves (Table tab:drift-accuracy)
        m["SubsetImages"] = f"{int(base.images.iloc[0]):,}"
        m["MeasuredConfigs"] = str(len(base))
        m["UnresolvedDrops"] = str(int((~base.differs.astype(bool)).sum()))
        if (k := _unresolved_holm(base)) is not None:
            m["UnresolvedDropsHolm"] = str(k)
        det = base.detectable[np.isfinite(base.detectable)]
        if len(det):
            # in points to a tenth, as the table prints them (one significant digit made
            # 11.5 read 10)
            m["DetectableMin"] = f"{100 * det.min():.1f}"
            m["DetectableMax"] = f"{100 * det.max():.1f}"
    for mode in (x.value for x in MACRO_MODES):
        for bits in (8, 4):
            key = letters(f"{mode}_{bits}")
            r = both[(both["mode"] == mode) & (both.bits == bits)]
            if len(r):
                m[f"Acc{key}"] = f"{100 * r.quant_acc.iloc[0]:.2f}"
                m[f"LogitSqnr{key}"] = number(r.logit_sqnr_db.iloc[0], 2)
            s = sites[(sites["mode"] == mode) & (sites.bits == bits) & (sites.target == "both")]
            sat = s[(s.kind == "conv") & (s.metric == "saturation_high")].value
            if len(sat):
                # Fractions of each conv input's elements clamped at qmax (the README's
                # saturation at the top: rounded beyond the top code), in percent: two
                # decimals, or as many more as keep a share above 0 from reading as none
                for name, share in (("Max", 100 * sat.max()), ("Mean", 100 * sat.mean())):
                    places = places_for(share, lambda v: v > 0, lambda k: f"{share:.{k}f}", 2)
                    m[f"SatHigh{name}{key}"] = f"{share:.{places}f}"
            bn = s[(s.kind == "bn") & (s.metric == "bn_mean_shift_qf_rms")].value
            if len(bn):
                m[f"BnShiftMedian{key}"] = number(bn.median(), 2)
                m[f"BnShiftMax{key}"] = number(bn.max(), 2)
    rem = acc[(acc.remedy != "none") & (acc.target == "both")] if "target" in acc else acc.iloc[:0]
    for _, r in rem.iterrows():
        if r["mode"] in [x.value for x in MACRO_MODES] and np.isfinite(r.sqnr_gain_db):
            key = letters(f"{r.remedy}_{r['mode']}_{r.bits}")
            m[f"SqnrGain{key}"] = number(r.sqnr_gain_db, 2)
    for _, r in fits.iterrows():
        if r.target != "both" or r.bits != 8 or not np.isfinite(r.get("exponent", np.nan)):
            continue
        met = "Drift" if r.metric == "drift_rel_rms_channel_debiased" else "Rms"
        m[f"Exp{met}{letters(r['mode'])}"] = number(r.exponent, 3)
    if len(pred):
        m["PredictionMedianError"] = number(prediction_error(pred), 2)
        m["PredictionMedianCorr"] = number(np.nanmedian(pred.channel_corr_bn), 2)
    if xsummary is not None and len(xsummary):
        for act, rows in xsummary.groupby("activations", sort=True):
            key = letters(act)
            faithful = rows[rows.faithful.astype(bool)]
            elements = f"{int(rows.elements.iloc[0]):,}"
            if len(faithful):
                f = faithful.iloc[0]
                m[f"IntEightPipeline{key}"] = escape(f"{f.arithmetic}/{f.pipeline}")
                # as many digits as keep a missed code from reading as all of them (100)
                share = 100 * f.equal / f.elements
                digits = places_for(share, lambda v: v < 100, lambda k: f"{share:.{k}g}", 4)
                m[f"IntEightEqual{key}"] = f"{share:.{digits}g}"
                m[f"IntEightAgreement{key}"] = (
                    f"the \\code{{{m[f'IntEightPipeline{key}']}}} pipeline agrees with the "
                    f"kernel on {m[f'IntEightEqual{key}']}\\,\\% of {elements} output codes")
            else:
                # the paper's sentence holds on any CPU: on one whose kernel no pipeline
                # models (the probe says why, in the table's caption), it says so
                m[f"IntEightAgreement{key}"] = (
                    f"no pipeline is marked faithful to the kernel over its {elements} "
                    "output codes (the probe found none that models it; the table's caption "
                    "says why)")
            m[f"IntEightAvxSaturated{key}"] = f"{int(rows.avx2_saturated.iloc[0]):,}"
            m[f"IntEightElements{key}"] = elements
    if headline is not None and len(headline):
        images = int(headline.images.iloc[0])
        m["HeadlineImages"] = f"{images:,}"
        m["HeadlineScope"] = (
            "the whole test split" if images == test_split
            else f"the first {images:,} of the test split's {test_split:,} images" if test_split
            else f"the first {images:,} test images")
        for _, r in headline.iterrows():
            m[f"Headline{letters(r['mode'])}"] = f"{100 * r.acc:.2f}"
    return m


def _main(argv: list[str]) -> int:
    parser = base_parser("drift", __doc__.splitlines()[0], force=True)
    parser.add_argument("--model", choices=["resnet50", "resnet18"], default=None,
                        help="architecture (default resnet50; resnet18 with --smoke)")
    parser.add_argument("--weights", type=weights_arg, default=None,
                        help="Fashion-MNIST: a qerror checkpoint file (default: the cached "
                             "baseline). ImageNet (--data): IMAGENET1K_V1, IMAGENET1K_V2 or a "
                             "local state-dict file (default IMAGENET1K_V2)")
    parser.add_argument("--data", type=user_path, default=None,
                        help="an ImageNet folder: sub-folders named by synset id (all 1000 "
                             "classes or any subset), the flat ILSVRC2012 validation folder, "
                             "or any sub-folders with --labels; default: Fashion-MNIST")
    parser.add_argument("--labels", type=user_path, default=None,
                        help="with --data: a file of 'FOLDER CLASS' lines (CLASS an index "
                             "0..999 or a synset id) labelling sub-folders that are not named "
                             "by synset id")
    parser.add_argument("--data-root", type=user_path, default=None, help=DATA_ROOT_HELP)
    parser.add_argument("--device", type=Device.parse, default=Device.CPU,
                        help="cpu (default), cuda (cuda:LOCAL_RANK under torchrun) or auto "
                             "(cuda where a GPU is found); the statistics agree to float "
                             "round-off across devices, and the manifest names the one used")
    parser.add_argument("--download", action="store_true",
                        help="allow downloading ImageNet weights missing from the hub cache")
    parser.add_argument("--no-train", action="store_true",
                        help="fail instead of training a missing Fashion-MNIST baseline")
    parser.add_argument("--modes", nargs="+", type=RoundingMode.parse, default=None,
                        help="rounding modes (default: "
                             + " ".join(m.value for m in DEFAULT_MODES)
                             + "; smoke nearest_even toward_zero)")
    parser.add_argument("--bits", nargs="+", type=int_in(2, 16), default=None,
                        help="bit widths, 2 to 16 (default: 8 6 4; smoke 8 4)")
    parser.add_argument("--targets", nargs="+", type=Target.parse, default=None,
                        help="what is quantized: " + ", ".join(t.value for t in Target)
                             + " (default: both weights activations; smoke both)")
    # Two images at least: accuracy intervals, BN batch statistics and per-channel spreads
    # need more than one.
    parser.add_argument("--images", type=int_at_least(2, AUTO), default=None,
                        help="test images measured, or 'auto': sized by a pilot on "
                             "validation images so that every configuration's median "
                             "layer's drift and MSE are resolved from zero, within "
                             "--min-images and --max-images (default auto on Fashion-MNIST, "
                             "200 with --data, smoke 16)")
    parser.add_argument("--pilot-images", type=int_at_least(2), default=None,
                        help="with --images auto: validation images of the pilot (default "
                             f"{PILOT_IMAGES}, smoke 8)")
    parser.add_argument("--min-images", type=int_at_least(2), default=None,
                        help=f"with --images auto: the fewest test images (default "
                             f"{MIN_IMAGES}, smoke 8)")
    parser.add_argument("--max-images", type=int_at_least(2), default=None,
                        help=f"with --images auto: the most test images; configurations "
                             f"that need more are named, not chased (default {MAX_IMAGES}, "
                             "smoke 32)")
    parser.add_argument("--calib-images", type=int_at_least(2), default=None,
                        help="calibration images (ranges, BN re-estimation, bias correction; "
                             "default 200, smoke 16)")
    parser.add_argument("--resample-images", type=int_at_least(2), default=None,
                        help="the first N measured images keep their per-image statistics "
                             "(each channel's mean drift, each BatchNorm's moments) for the "
                             "bootstraps over images: the growth intervals, the tails, the "
                             "deepest-drift gap and the BatchNorm bounds; accuracy and the "
                             "layer statistics use every image. Their memory grows with N "
                             "(the run refuses what would not fit, naming an N that does; "
                             "default: every measured image)")
    parser.add_argument("--act-range", type=RangeMethod.parse, default=RangeMethod.MINMAX,
                        metavar="{" + ",".join(m.value for m in RangeMethod) + "}",
                        help="how each activation quantizer's range is found on the "
                             "calibration images: minmax (the extremes; default), percentile "
                             "(--act-percentile), mse (the shrink of min-max with the least "
                             "fake-quantization MSE) or aciq (Banner et al.'s clipping value "
                             "for --aciq-law fitted to the data); computed for "
                             "round-to-nearest and shared by every mode of a width, as the "
                             "ranges are")
    parser.add_argument("--act-percentile", type=float, default=None,
                        help="with --act-range percentile: the percentile of each tail, "
                             f"{ACT_PERCENTILES} (default {RangePolicy().percentile:g})")
    parser.add_argument("--aciq-law", choices=ACIQ_LAWS, default=None,
                        help="with --act-range aciq: the law fitted (default laplace, as "
                             "Banner et al. recommend for activations)")
    parser.add_argument("--batch-size", type=int_at_least(2), default=None,
                        help="default 256, smoke 16")
    parser.add_argument("--local-samples", type=positive_int, default=None,
                        help="images per batch on which each layer's local error is measured, "
                             "at most --batch-size (default 32, or the batch size if smaller)")
    parser.add_argument("--remedy-bits", nargs="*", type=int_in(2, 16), default=None,
                        help="bit widths at which the remedies run, each one of --bits (modes "
                             "nearest_even and toward_zero, both quantized; default: 8 4 "
                             "where in --bits; none given: no remedies)")
    parser.add_argument("--quantize-bn-outputs", action="store_true",
                        help="also quantize every BatchNorm's output (with the activation "
                             "spec) wherever activations are quantized")
    parser.add_argument("--quantize-block-outputs", action="store_true",
                        help="also quantize every residual block's output (the ReLU'd sum)")
    parser.add_argument("--headline-images", type=nonnegative_int, default=None,
                        help="Fashion-MNIST test images of the headline accuracy (8-bit "
                             "nearest, truncation, floor, stochastic against float by a plain "
                             "quantized forward; default: the whole test split, smoke 32; 0 "
                             "skips it)")
    parser.add_argument("--calib-curve", nargs="*", type=int_at_least(2), default=None,
                        help="calibration-image counts at which the remedies are refitted "
                             "for the calibration curve (Fashion-MNIST only; default "
                             f"{' '.join(map(str, CURVE_SIZES))}, smoke 4 8; none given: no "
                             "curve); at every --remedy-bits")
    parser.add_argument("--curve-draws", type=int_at_least(1), default=1,
                        help="disjoint subsets of calibration images each size of the curve "
                             "fits the remedies on, where the calibration split holds them "
                             "(default 1: the split's first images; more show a remedy's own "
                             "sampling noise, in calibration_spread.csv, at that many times "
                             "the curve's time)")
    parser.add_argument("--curve-images", type=int_at_least(2), default=None,
                        help="first test images each point of the calibration curve is "
                             f"evaluated on (default {CURVE_IMAGES}, smoke 16)")
    parser.add_argument("--int8-images", type=nonnegative_int, default=None,
                        help="calibration and test images of the real-INT8 cross-check "
                             "(default 32, smoke 8; 0 skips it)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.model = args.model or ("resnet18" if smoke else "resnet50")
    try:
        args.act_policy = act_range_policy(args.act_range, args.act_percentile, args.aciq_law)
    except ValueError as err:
        parser.error(str(err))
    modes = list(dict.fromkeys(args.modes)) if args.modes is not None else (
        [RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO] if smoke else list(DEFAULT_MODES))
    bits_list = list(dict.fromkeys(args.bits)) if args.bits is not None else (
        [8, 4] if smoke else list(DEFAULT_BITS))
    targets = list(dict.fromkeys(args.targets)) if args.targets is not None \
        else ([Target.BOTH] if smoke else [Target.BOTH, Target.WEIGHTS, Target.ACTIVATIONS])
    images = args.images if args.images is not None else (
        16 if smoke else 200 if args.data is not None else AUTO)
    sizing = {"pilot_images": args.pilot_images, "min_images": args.min_images,
              "max_images": args.max_images}
    if images != AUTO:
        given = [k for k, v in sizing.items() if v is not None]
        if given:
            parser.error(f"--{given[0].replace('_', '-')}: sizes the subset of --images auto "
                         f"only; with --images {images} leave it out"
                         + ("" if args.data is not None else ", or pass --images auto"))
        sizing = {}
    else:
        if args.data is not None:
            parser.error("--images auto: the pilot runs on Fashion-MNIST's validation split; "
                         "with --data give --images N")
        sizing = {"pilot_images": args.pilot_images or (8 if smoke else PILOT_IMAGES),
                  "min_images": args.min_images or (8 if smoke else MIN_IMAGES),
                  "max_images": args.max_images or (32 if smoke else MAX_IMAGES)}
        if sizing["min_images"] > sizing["max_images"]:
            parser.error(f"--min-images {sizing['min_images']} is above --max-images "
                         f"{sizing['max_images']}; give a floor at most the ceiling")
        refuse_beyond_splits(parser, {"--max-images": (args.max_images, "test"),
                                      "--pilot-images": (args.pilot_images, "val")})
    if args.data is None:  # Fashion-MNIST: a count beyond its split is refused, not clamped
        refuse_beyond_splits(parser, {
            "--images": (None if args.images in (None, AUTO) else args.images, "test"),
            "--headline-images": (args.headline_images, "test"),
            "--curve-images": (args.curve_images, "test"),
            "--calib-images": (args.calib_images, "calib"),
            "--calib-curve": (max(args.calib_curve or [], default=None), "calib")})
    calib_images = args.calib_images if args.calib_images is not None else (16 if smoke else 200)
    batch = args.batch_size if args.batch_size is not None else (16 if smoke else 256)
    # The cross-check takes its images from the calibration images and the measured test
    # subset (with --images auto, at least --min-images of them): its default is cut to
    # them (and recorded so), a value asked for beyond them refused.
    measured = sizing["min_images"] if images == AUTO else images
    if args.int8_images is not None:
        if args.int8_images > min(calib_images, measured):
            parser.error(f"--int8-images {args.int8_images}: the INT8 cross-check takes its "
                         f"images from the {calib_images} calibration images and the "
                         f"{measured} measured test images"
                         + (" (--min-images under --images auto)" if images == AUTO else "")
                         + f"; give at most {min(calib_images, measured)}")
    if args.remedy_bits is None:
        remedy_bits = [b for b in [8, 4] if b in bits_list]
    else:
        remedy_bits = list(dict.fromkeys(args.remedy_bits))
        missing = [b for b in remedy_bits if b not in bits_list]
        if missing:
            parser.error(f"--remedy-bits {' '.join(map(str, missing))}: not among --bits "
                         f"{' '.join(map(str, bits_list))}; the remedies run on configurations "
                         "the study measures, so add them to --bits or leave them out")
        if remedy_bits and Target.BOTH not in targets:
            parser.error("--remedy-bits: the remedies need --targets to include 'both'")
        if remedy_bits and not any(m in modes for m in REMEDY_MODES):
            parser.error("--remedy-bits: the remedies need --modes to include "
                         + " or ".join(m.value for m in REMEDY_MODES))
    local_samples = args.local_samples if args.local_samples is not None else min(32, batch)
    if local_samples > batch:
        parser.error(f"--local-samples {args.local_samples}: more than --batch-size {batch}; the "
                     "local error is measured on that many images of each batch, so pass at "
                     "most the batch size")
    int8_images = args.int8_images if args.int8_images is not None else min(
        8 if smoke else 32, calib_images, measured)
    headline_images = args.headline_images if args.headline_images is not None else (
        32 if smoke else split_images("test"))
    if args.labels is not None and args.data is None:
        parser.error("--labels: labels an ImageNet folder, so it needs --data")
    given = given_options(parser, argv, args)
    if args.data is not None:
        if "headline_images" in given and args.headline_images:
            parser.error("--headline-images: the headline runs on Fashion-MNIST's test split "
                         "only; leave it out with --data")
        headline_images = 0  # the headline runs on Fashion-MNIST's whole test split only
        if args.calib_curve:
            parser.error("--calib-curve: the calibration curve runs on Fashion-MNIST's "
                         "calibration split only; leave it out with --data")
    curve_sizes = sorted(set(args.calib_curve)) if args.calib_curve is not None else (
        [] if args.data is not None else [4, 8] if smoke else list(CURVE_SIZES))
    if not (remedy_bits and Target.BOTH in targets and any(m in modes for m in REMEDY_MODES)):
        if args.calib_curve:  # asked for by name: say why there is none
            parser.error("--calib-curve: the curve refits the remedies, and this run has none "
                         "(they need --remedy-bits, --targets both and --modes with "
                         + " or ".join(m.value for m in REMEDY_MODES) + "); leave it out "
                         "or ask for the remedies")
        curve_sizes = []  # the curve refits the remedies: where none run, no curve
    if not (remedy_bits and Target.BOTH in targets and any(m in modes for m in REMEDY_MODES)):
        remedy_bits = []  # none run: none recorded as if they had (the default's widths)
    for option, idle in (("--curve-draws", args.curve_draws > 1),
                         ("--curve-images", "curve_images" in given)):
        if idle and not curve_sizes:
            parser.error(f"{option}: this run has no calibration curve (it runs on "
                         "Fashion-MNIST with the remedies and --calib-curve sizes); leave it "
                         "out")
    # activations are quantized by an activation or both target, the headline and the INT8
    # cross-check: without any, the activation options would change nothing
    if not (headline_images or int8_images
            or any(t in (Target.ACTIVATIONS, Target.BOTH) for t in targets)):
        for dest in ("act_range", "act_percentile", "aciq_law", "quantize_bn_outputs",
                     "quantize_block_outputs"):
            if dest in given:
                parser.error(f"--{dest.replace('_', '-')} would change nothing: this run "
                             "quantizes no activations (--targets weights, --headline-images "
                             "0, --int8-images 0)")
        args.act_policy = None
    # the BatchNorm and block output quantizers act in the network's own quantized passes
    # (an activation or both target, the headline): the INT8 cross-check quantizes each
    # layer's own input and output, not those
    if not (headline_images or any(t in (Target.ACTIVATIONS, Target.BOTH) for t in targets)):
        for dest in ("quantize_bn_outputs", "quantize_block_outputs"):
            if dest in given:
                parser.error(f"--{dest.replace('_', '-')} would change nothing: this run "
                             "quantizes no activations in the network's own passes "
                             "(--targets weights, --headline-images 0), and the INT8 "
                             "cross-check quantizes each layer's input and output, not "
                             "BatchNorm or block outputs")
    if "download" in given and args.data is None:
        parser.error("--download allows downloading the ImageNet weights that --data runs "
                     "with; without --data the study measures the Fashion-MNIST baseline, "
                     "which it never downloads")
    if "no_train" in given and (args.data is not None or args.weights is not None or smoke):
        parser.error("--no-train would change nothing: it stops the study training a missing "
                     "Fashion-MNIST baseline, and this run loads none (--data, --weights or "
                     "--smoke's untrained network); leave it out")
    if "data_root" in given and args.data is not None:
        parser.error("--data-root would change nothing: it names the Fashion-MNIST files, and "
                     "with --data the study reads none of them; leave it out")
    curve_images = args.curve_images if args.curve_images is not None else (
        16 if smoke else CURVE_IMAGES)
    check_out(args.out, "drift", force=args.force)

    # Data before the model: loading it may mean training a baseline for half an hour, and
    # an ImageNet folder's labels are checked before any image is read.
    if args.data is None:
        find_fashion_mnist(args.data_root)
    else:
        # the weights' own evaluation preprocessing (V2's short side is 232, not 256)
        folder = imagenet_folder(args.data, args.labels,
                                 **imagenet_eval_sizes(args.weights or IMAGENET_WEIGHTS))
        check_folder_counts(folder, images, calib_images)

    started = time.perf_counter()
    try:
        with distributed(args.device) as place:
            return _run(args, argv, place, started, modes, bits_list, targets, images,
                        calib_images, batch, local_samples, remedy_bits, int8_images,
                        headline_images, None if args.data is None else folder,
                        curve_sizes, curve_images, sizing)
    except (DeviceError, TrainError) as err:
        raise StudyError(f"--device {args.device.value}: {err}") from err


def _run(args, argv, place, started, modes, bits_list, targets, images, calib_images, batch,
         local_samples, remedy_bits, int8_images, headline_images, folder, curve_sizes=(),
         curve_images=0, sizing=None) -> int:
    """Measure on every rank (each its share of the test batches), write on rank 0; with
    ``images`` :data:`AUTO`, rank 0 first sizes the test subset by a pilot (``sizing``)."""
    main = place.is_main
    smoke = args.smoke
    model_start = time.perf_counter()
    model, model_id = _load_model(args, args.data_root)
    # A baseline trained first (half an hour) is not the run's time: measured apart
    model_s = time.perf_counter() - model_start
    try:
        check_model(model, need_batchnorm=True)
    except UnsupportedModelError as err:
        raise StudyError(f"cannot run the drift study on this model: {err}") from err

    def load(n: int) -> Data:
        # A missing or corrupt source raises DataNotFoundError/DataError: study_main says so.
        return (imagenet_data(folder, n, calib_images, batch, args.seed, args.labels,
                              int8_images)
                if folder is not None else
                fashion_data(args.data_root, n, calib_images, batch, args.seed,
                             headline_images, int8_images,
                             max((n * args.curve_draws for n in curve_sizes), default=0),
                             curve_images if curve_sizes else 0, model_id.get("held_out")))

    outputs = {"bn_outputs": args.quantize_bn_outputs,
               "block_outputs": args.quantize_block_outputs}
    quantizes_activations = args.act_policy is not None
    act_range = args.act_policy or RangePolicy()  # (no activation is quantized with it)
    configs = grid(modes, bits_list, targets, args.seed, act_range, **outputs)

    def check_memory(n_images: int) -> None:
        """Refuse (every rank) a run whose per-image statistics and images would not fit this
        machine's memory, warn (rank 0) where they take more than half of it; rank 0 decides
        for the ranks on its machine, which each hold every kept statistic once merged (an
        all-gather) and their share of the images."""
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        per_pixels = 0 if folder is None else imagenet_pixel_bytes(folder.crop)
        verdict = parallel.broadcast_object(
            memory_verdict(local_ranks * resampled_bytes(model, configs, 1),
                           per_pixels * local_ranks / place.world_size, n_images,
                           min(args.resample_images or n_images, n_images),
                           available_memory(), len(configs), auto=images == AUTO,
                           min_images=sizing["min_images"] if sizing else MIN_IMAGES)
            if main else None)
        if verdict is not None and verdict[0] == "error":
            raise StudyError(verdict[1])
        if verdict is not None and main:
            print(f"[drift] warning: {verdict[1]}", flush=True)

    if images != AUTO:  # known now: refused before any image is read
        check_memory(images)
    # Sized by the pilot below; until then the floor (the checks hold for more images too).
    data = load(sizing["min_images"] if images == AUTO else images)
    # the data hold fewer images than asked (a checkpoint trained with a smaller calibration
    # split; an ImageNet folder's counts were checked before any work, check_folder_counts):
    # refused, not measured on fewer while the manifest says more
    for option, want, got in (("--calib-images", calib_images, data.identity["calib_images"]),
                              ("--images", None if images == AUTO else images,
                               data.identity["test_images"])):
        if want is not None and got < want:
            raise StudyError(f"{option} {want}: the data hold {got} such images; give at most "
                             f"{got}")
    have = data.identity.get("calib_split_images")  # known to every rank: all stop, or none
    if curve_sizes and have is not None and max(curve_sizes) > have:
        raise StudyError(f"--calib-curve {max(curve_sizes)}: the calibration split holds "
                         f"{have} images; give sizes of at most {have}")
    check_batches(data, batch, place.world_size, auto=images == AUTO)
    if model_id["model"].endswith("untrained-smoke"):
        if main:
            estimate_running_stats(model, (x for x, _ in data.calib))
        model.load_state_dict(parallel.broadcast_object(dict(model.named_buffers())),
                              strict=False)
    model.eval()
    model.to(place.device)
    # The float reference is float32 on every device: no TF32 convolutions on GPUs.
    precision = disable_tf32() if place.device.type == "cuda" else {}

    config = {"modes": [m.value for m in modes], "bits": bits_list,
              "targets": [t.value for t in targets], "images": images,
              "calib_images": calib_images, "resample_images": args.resample_images,
              "batch_size": batch,
              "local_samples": local_samples, "remedy_bits": remedy_bits,
              "int8_images": int8_images, "headline_images": headline_images,
              "calib_curve": list(curve_sizes), "curve_images": curve_images if curve_sizes
              else 0, "curve_draws": args.curve_draws if curve_sizes else 0, **outputs,
              "alpha": ALPHA, "resolve_power": RESOLVE_POWER, "fit_level": FIT_LEVEL,
              "tail_top": TAIL_TOP,
              "seed": args.seed, "smoke": smoke,
              "weight_spec": "signed symmetric per output channel, min-max",
              "activation_spec": f"unsigned affine per tensor, {act_range.label} on "
                                 "calibration images" if quantizes_activations else None,
              "act_range": act_range.method.value if quantizes_activations else None,
              "act_percentile":
                  float(act_range.percentile) if quantizes_activations
                  and act_range.method is RangeMethod.PERCENTILE else None,
              "aciq_law": act_range.aciq_law if quantizes_activations
              and act_range.method is RangeMethod.ACIQ else None}
    # Calibrated once, on rank 0, so that every rank quantizes with the same ranges.
    act_qp = parallel.broadcast_object(
        {b: calibrate_activations(model, data.calib, QuantConfig.make(b).activation,
                                  act_range, outputs=any(outputs.values()), seed=args.seed)
         for b in bits_list} if main else None, map_location=place.device)
    weight_cache: dict = {}

    def weights_of(cfg):
        if cfg.weight is None:
            return None
        key = (cfg.weight.bits, cfg.rounding.value)
        if key not in weight_cache:
            weight_cache[key] = quantize_weights(model, cfg.weight, seed=cfg.seed)
        return weight_cache[key]

    remedy_configs = [QuantConfig.make(b, m, Target.BOTH, seed=args.seed, **outputs)
                      for b in remedy_bits if Target.BOTH in targets
                      for m in REMEDY_MODES if m in modes]
    pilot, kway_rate = None, None
    pilot_start = time.perf_counter()
    if images == AUTO:
        chosen = None
        if main:
            batches, pilot_id = fashion_pilot(args.data_root, sizing["pilot_images"], batch,
                                              args.seed, model_id.get("held_out"))
            prec, kway_s = run_pilot(model, batches, configs, act_qp, weights_of,
                                     local_samples, batch)
            # the pilot ran every configuration in K-way batches as the run does: its rate
            # is the instrumented phase's, measured (see estimate on how it errs)
            kway_rate = len(configs) * sum(len(y) for _, y in batches) / kway_s
            chosen, pilot = choose_images(prec, sizing["min_images"], sizing["max_images"])
            beyond = int((~pilot.within_max).sum())
            print(f"[drift] pilot on {pilot_id['pilot_images']} validation images: the "
                  f"configurations' median layers need {pilot.need.min():.0f} to "
                  f"{pilot.need.max():.0f} images; measuring {chosen} test images (the "
                  "largest need rounded up to one significant figure, held between "
                  f"{sizing['min_images']} and {sizing['max_images']}); {beyond} of "
                  f"{len(pilot)} configurations need more than {sizing['max_images']} "
                  "(pilot.csv)", flush=True)
        chosen, kway_rate = parallel.broadcast_object((chosen, kway_rate))
        if chosen != data.identity["test_images"]:
            data = load(chosen)
            check_batches(data, batch, place.world_size, auto=True)
        if main:
            data.identity.update(pilot_id)
        config.update(sizing, chosen_images=chosen)
    pilot_s = time.perf_counter() - pilot_start if images == AUTO else math.nan
    if images == AUTO:  # sized by the pilot: known now
        check_memory(data.identity["test_images"])
    timing = estimate(model, data, configs, remedy_configs, act_qp, weights_of,
                      local_samples, place, curve_sizes, kway_rate=kway_rate,
                      curve_draws=args.curve_draws)
    timing["measured_pilot_s"] = pilot_s
    if main:
        print(estimate_message(timing), flush=True)
    # The whole run in estimated seconds, advanced as each phase ends: its ETA is the
    # estimate's, corrected by how fast the phases so far went against theirs.
    run_bar = tqdm(total=sum(round(timing[f"estimated_{p}_s"]) for p in RUN_PHASES),
                   desc="whole run", disable=not main, smoothing=0,
                   bar_format="{l_bar}{bar}| {n}/{total} estimated s "
                              "[{elapsed} so far, ETA {remaining}]")
    phase_start = time.perf_counter()

    def phase_done(phase: str) -> None:
        nonlocal phase_start
        now = time.perf_counter()
        timing[f"measured_{phase}_s"] = now - phase_start
        phase_start = now
        run_bar.update(round(timing[f"estimated_{phase}_s"]))

    frames, acc_rows, fits, preds, statements = [], [], [], [], []
    tails: dict[tuple, dict] = {}
    results: dict[tuple, PropagationResult] = {}
    # every rank's per-image statistics over the first n_resample images of all of them
    n_images = data.identity["test_images"]
    n_resample = min(args.resample_images or n_images, n_images)
    config["resampled_images"] = n_resample
    bar = tqdm(total=len(configs), desc="drift", unit="config", disable=not main)
    for cfg, res in measure_widths(model, data.test, configs, act_qp, weights_of,
                                   local_samples, bar, image_means=n_resample,
                                   first_batch=data.first_batch, across_ranks=True):
        results[tuple(_config_columns(cfg).values())] = res
    bar.close()
    # The network claims with the images random on this one network: each statement
    # configuration's BatchNorm inputs, image by image (every rank its images), bounded.
    bn_bounds = {}
    for cfg in tqdm([c for c in configs if _states(c, results)], desc="BatchNorm over images",
                    unit="config", disable=not main):
        moments = bn_image_moments(model, data.test, cfg, act_qp[_bits(cfg)],
                                   weights=weights_of(cfg), first_batch=data.first_batch,
                                   across_ranks=True, images=n_resample)
        if main:
            bn_bounds[tuple(_config_columns(cfg).values())] = inconsistency_bounds(
                moments, alpha=ALPHA, resamples=BOOTSTRAP, seed=args.seed)
        del moments
    # The analysis in the grid's order, as the outputs list the configurations.
    for cfg in tqdm(configs, desc="analysis", unit="config", disable=not main):
        cols = _config_columns(cfg)
        res = results[tuple(cols.values())]
        if main:
            frames.append(res.to_frame().assign(**cols))
            tails[tuple(cols.values())] = drift_tails(res)
            acc_rows.append(accuracy_row(cols, res))
            grown = growth_rows(res, args.seed)
            fits += [{**cols, **row} for row in grown]
            if _states(cfg, results):
                # The ledger's network claims on this network (qerror.nn.seeds), and what
                # decides them with the images random
                values = statement_values(res, seed=args.seed)
                values.update(image_statements(cfg, res, results,
                                               bn_bounds[tuple(cols.values())], args.seed,
                                               n_resample))
                statements += [{"bits": cols["bits"], "mode": cols["mode"], "quantity": k,
                                "value": v} for k, v in values.items()]
    phase_done("instrumented")
    n_base = len(frames)
    for cfg in tqdm(remedy_configs, desc="remedies", unit="config", disable=not main):
        cols = _config_columns(cfg)
        res_list, pred = remedies(model, data, cfg, act_qp[cols["bits"]],
                                  weight_cache.get((cols["bits"], cols["mode"])),
                                  results[tuple(cols.values())])
        preds.append(pred)
        for name, res in res_list:
            if main:
                acc_rows.append(accuracy_row(cols, res, name))
                frames.append(res.to_frame().assign(**cols, remedy=name))
    phase_done("remedies")
    headline = None
    known: dict = {}  # the headline's logits of the curve's images (rank 0's first ones)
    # Known to every rank (a rank's share may be empty), so all of them join or none.
    if data.headline is not None:
        qp8 = act_qp.get(8) or parallel.broadcast_object(
            calibrate_activations(model, data.calib, QuantConfig.make(8).activation,
                                  act_range, outputs=any(outputs.values()), seed=args.seed)
            if main else None, map_location=place.device)
        headline = headline_accuracy(model, data.headline, qp8, args.seed,
                                     first_batch=data.headline_first, weights_of=weights_of,
                                     logits=known, keep=curve_images if data.curve_calib
                                     else 0, outputs=outputs)
    phase_done("headline")
    if not main:
        return 0
    curve = None
    if data.curve_calib:  # rank 0 alone, where _main found remedy configurations
        curve = calibration_curve(model, data.curve_calib, data.curve_test, remedy_configs,
                                  act_qp, weights_of, curve_sizes, batch, known=known,
                                  draws=args.curve_draws)
    phase_done("curve")
    run_bar.close()
    sites = pd.concat(frames[:n_base], ignore_index=True)
    fits = pd.DataFrame(fits)
    # the grid's differences from float are one family of tests, adjusted together
    acc = recovery(pd.DataFrame(acc_rows))
    if len(acc):
        acc = holm_columns(acc, ["mcnemar_p"], acc.remedy == "none")
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    remedy_sites = pd.concat(frames[n_base:], ignore_index=True) \
        if len(frames) > n_base else pd.DataFrame()
    # FBGEMM's kernels run on the CPU: the cross-check uses a CPU copy of the model.
    cpu_model = model if place.device.type == "cpu" else copy.deepcopy(model).cpu()
    int8_start = time.perf_counter()
    xcheck, xsummary, probe = int8_crosscheck(cpu_model, data, int8_images, act_range) \
        if int8_images else (None, None, None)
    timing["measured_int8_s"] = time.perf_counter() - int8_start if int8_images else math.nan
    config.update(device=place.device.type, world_size=place.world_size, **precision)
    plt = figure_style()
    with RunDir(args.out, "drift", argv, config, force=args.force) as run:
        run.extra.update(model=model_id, data=data.identity)
        if headline is not None:
            run.write_csv("headline.csv", headline)
            tests = int(headline.filter(regex=r"^p_vs_\w+_holm$").notna().to_numpy().sum())
            run.write_latex_table(
                "headline.tex", headline[[c for c in ("mode", "images", "acc", "acc_lo",
                                                      "acc_hi", "delta_vs_float",
                                                      "p_vs_float_holm", "delta_vs_nearest",
                                                      "p_vs_nearest_holm")
                                          if c in headline]],
                f"Headline accuracy on {int(headline.images.iloc[0])} test "
                f"images, 8-bit weights and activations: {100 * (1 - ALPHA):g}\\% Wilson "
                "intervals, and the paired difference from float and from round-to-nearest "
                f"with McNemar's p, Holm-adjusted over the table's {tests} tests (each "
                "unadjusted in headline.csv).", "tab:drift-headline", float_format="%.4g")
        run.write_csv("sites.csv", sites)
        base_acc = acc[acc.remedy == "none"]
        measured = int(base_acc.images.iloc[0]) if len(base_acc) else 0
        precision_frame = precision_rows(sites, measured,
                                         local_images(measured, batch, local_samples),
                                         tails) if len(base_acc) else pd.DataFrame()
        run.write_csv("precision.csv", precision_frame)
        if pilot is not None:
            run.write_csv("pilot.csv", pilot)
        # One calibration image (rank 0 always holds them) on the model's device.
        example = data.calib[0][0][:1].to(model_device(model))
        geometry = pd.DataFrame([g.record() for g in layer_geometry(model, example)])
        run.write_csv("geometry.csv", geometry)
        run.write_latex_table(
            "geometry.tex", geometry[["layer", "in_h", "in_w", "out_h", "out_w", "kernel_h",
                                      "kernel_w", "live_fraction"]],
            "Where each layer runs: input and output map sizes, kernel, and the share of the "
            "kernel's products that multiply data rather than zero padding.", "tab:drift-geometry",
            float_format="%.3g")
        run.write_csv("accuracy.csv", acc)
        if statements:
            run.write_csv("statements.csv", pd.DataFrame(statements))
        if curve is not None:
            run.write_csv("calibration_curve.csv", curve)
            drawn = bool((curve.draw > 0).any())
            columns = ["mode", "bits", "remedy", "calib_images"] + (["draw"] if drawn else [])
            more = " and on the next disjoint blocks of $n$ (draw 1, 2, ...)" if drawn else ""
            run.write_latex_table(
                "calibration_curve.tex", curve[columns + [
                    "acc", "acc_lo", "acc_hi", "acc_unremedied", "recovered", "p_vs_unremedied",
                    "logit_sqnr_db", "logit_sqnr_unremedied_db"]],
                f"Each remedy refitted on the first $n$ calibration images{more}, evaluated "
                f"on the first {int(curve.images.iloc[0])} test images by a plain quantized "
                f"forward (weights and activations): accuracy with its "
                f"{100 * (1 - ALPHA):g}\\% "
                "Wilson interval, without the remedy, the share of the lost accuracy it "
                "recovers, McNemar's p against no remedy, and the logits' SQNR (dB) with and "
                "without it.", "tab:drift-calibration-curve",
                float_format="%.4g")
            fig = figure_calibration_curve(plt, curve)
            run.save_figure(fig, "calibration_curve")
            plt.close(fig)
            if drawn:
                run.write_csv("calibration_spread.csv", curve_spread(curve))
        run.write_csv("growth.csv", fits)
        if len(pred):
            run.write_csv("prediction.csv", pred)
        if len(remedy_sites):
            run.write_csv("remedy_sites.csv", remedy_sites)
        if xcheck is not None:
            run.write_csv("int8_crosscheck.csv", xcheck)
            run.write_csv("int8_summary.csv", xsummary)
            run.write_latex_table(
                "int8.tex", xsummary[["activations", "arithmetic", "pipeline", "faithful",
                                      "layers", "min_frac_equal", "median_frac_equal",
                                      "max_abs_lsb"]],
                int8_caption(probe), "tab:drift-int8", float_format="%.6g")
        summary = _summary(acc, fits, pred, sites, xsummary, probe)
        if headline is not None:
            summary["headline"] = headline.to_dict(orient="records")
        if curve is not None:
            summary["calibration_curve"] = curve.to_dict(orient="records")
        run.write_json("summary.json", summary)
        _tables(run, acc, fits, pred)
        macros = _macros(acc, fits, sites, pred, xsummary, headline,
                         data.identity.get("test_split_images"))
        convs = geometry[geometry.kind == "conv"]
        macros.update(_precision_macros(precision_frame))
        if pilot is not None:
            macros.update(_pilot_macros(pilot, sizing))
        macros["ConvLayers"] = f"{len(convs)}"
        macros["ConvsMostlyPadding"] = f"{int((convs.live_fraction < 0.5).sum())}"
        macros["MinLiveTaps"] = number(100 * convs.live_fraction.min(), 3)
        if curve is not None:
            macros.update(curve_macros(curve))
        run.write_macros("macros.tex", macros)
        for bits in bits_list:
            for target in [t.value for t in targets]:
                fig = figure_depth(plt, sites, bits, target)
                run.save_figure(fig, f"depth_{bits}bit_{target}")
                plt.close(fig)
        fig = figure_accuracy(plt, acc)
        run.save_figure(fig, "accuracy")
        plt.close(fig)
        # of the target growth.tex shows: both where measured (the paper sets them together)
        shown = Target.BOTH if Target.BOTH in targets else targets[0]
        for metric in GROWTH_METRICS:
            fig = figure_growth(plt, sites, shown.value, metric)
            run.save_figure(fig, f"growth_{metric}")
            plt.close(fig)
        if (acc.remedy != "none").any():
            fig = figure_remedies(plt, acc)
            run.save_figure(fig, "remedies")
            plt.close(fig)
        if len(pred):
            fig = figure_prediction(plt, pred)
            run.save_figure(fig, "prediction")
            plt.close(fig)
        timing["measured_model_s"] = model_s
        # last before the manifest: the whole run's time counts the writing of its outputs
        timing["measured_s"] = time.perf_counter() - model_start - model_s
        run.write_csv("timing.csv", pd.DataFrame([timing]), timing=True)
        out = run.finish()
    _report(acc, fits, out, time.perf_counter() - started, model_s)
    return 0


# The statistics of each layer that carry a standard error (images as units), and the scale
# each error is also given in: the layer's float standard deviation, or the statistic itself.
PRECISION_UNITS = {"drift": "float_std", "local_drift": "float_std", "mse": "value"}


def drift_tails(res: PropagationResult) -> dict:
    """How much a few images decide each layer's drift, and whether clipping is why.

    Over the convolution and linear layers with kept image means: the median (the upper
    middle one of an even count, one layer's own figure) share of the per-image drift's
    variance that its :data:`TAIL_TOP` most extreme images carry
    (:func:`qerror.stats.tail_share`), the same share in normal samples of as many images
    (:func:`qerror.stats.tail_share_normal`), and the median excess kurtosis. Then, at the
    median layer (the layer whose share is the median, the upper one of an even count),
    where the quantized path's inputs were checked against their calibrated ranges
    (``SiteResult.beyond_range_image``): the fraction of images that a range clipped at or
    before it (in execution order, a superset of the layer's ancestors), how many of its
    :data:`TAIL_TOP` most extreme images were among them, the tail share among the others
    and that of normal samples of as many. NaN where no image means were kept, where no
    inputs were checked (weights alone) and, for the shares, where no more than
    :data:`TAIL_TOP` unclipped images remain or they are constant.

    Whether the images' own activation makes the tail: where each kept image's float output
    power was kept (``SiteResult.float_power_image``), the same median share for the drift
    divided by the image's float RMS at the layer (``tail_top_share_relative``), and at the
    median layer the share its most extreme images carry of the float RMS's own variance
    (``tail_rms_share``), and how many of the :data:`TAIL_TOP` images whose drift lies
    furthest from the mean are among the ``2 * TAIL_TOP`` with the largest float RMS
    (``tail_top_in_rms_top``; about ``2 * TAIL_TOP**2 / n`` if the two were unrelated). A
    rank correlation over all images would mostly measure the bulk, whose drift is noise;
    the tail is a few images. If a systematic error (a weight shrunk toward zero) moves an
    image's output roughly in step with the activation it carries, images with much more
    activation than the rest make a heavy tail of drift that the relative drift does not
    have."""
    layers, n = [], 0
    upstream = None
    for site in sorted(res.sites, key=lambda s: s.order):
        flags = site.beyond_range_image
        if flags is not None:
            flags = np.asarray(flags, dtype=bool)
            upstream = flags if upstream is None else upstream | flags
        m = site.drift_image_channel
        if site.kind not in ("conv", "linear") or m is None or len(m) <= TAIL_TOP:
            continue
        # every channel has as many elements: the image's drift is its channels' mean
        per_image = np.asarray(m, dtype=np.float64).mean(axis=1)
        share = tail_share(per_image, TAIL_TOP)
        if math.isnan(share):
            continue
        n = len(per_image)
        # the flags, the powers and the image means are kept for the same images
        rms = None if site.float_power_image is None else np.sqrt(
            np.asarray(site.float_power_image, dtype=np.float64))
        layers.append((share, float(sps.kurtosis(per_image)), per_image, upstream, rms))
    out = {"tail_images": n, "tail_top_share": math.nan,
           "tail_top_share_normal": tail_share_normal(n, TAIL_TOP) if n > TAIL_TOP
           else math.nan, "tail_kurtosis": math.nan, "tail_clipped_share": math.nan,
           "tail_top_clipped": math.nan, "tail_top_share_unclipped": math.nan,
           "tail_top_share_unclipped_normal": math.nan, "tail_top_share_relative": math.nan,
           "tail_rms_share": math.nan, "tail_top_in_rms_top": math.nan}
    if not layers:
        return out
    shares = np.array([row[0] for row in layers])
    # the median layer: the upper middle one when the count is even, and every column below
    # is read at that one layer (an average of two middle layers is no layer's share)
    middle = int(np.argsort(shares, kind="stable")[len(shares) // 2])
    out["tail_top_share"] = float(shares[middle])
    out["tail_kurtosis"] = float(np.median([row[1] for row in layers]))
    relative = [tail_share(row[2] / row[4], TAIL_TOP) for row in layers
                if row[4] is not None and (row[4] > 0).all()]
    relative = [v for v in relative if not math.isnan(v)]
    if relative:
        out["tail_top_share_relative"] = float(np.median(relative))
    _, _, per_image, clipped, rms = layers[middle]
    top = np.argsort(np.abs(per_image - per_image.mean()), kind="stable")[-TAIL_TOP:]
    if rms is not None:
        out["tail_rms_share"] = tail_share(rms, TAIL_TOP)
        largest = np.argsort(rms, kind="stable")[-2 * TAIL_TOP:]
        out["tail_top_in_rms_top"] = int(np.isin(top, largest).sum())
    if clipped is not None:
        out["tail_clipped_share"] = float(clipped.mean())
        out["tail_top_clipped"] = int(clipped[top].sum())
        rest = per_image[~clipped]
        if len(rest) > TAIL_TOP:
            out["tail_top_share_unclipped"] = tail_share(rest, TAIL_TOP)
            out["tail_top_share_unclipped_normal"] = tail_share_normal(len(rest), TAIL_TOP)
    return out


def precision_rows(sites: pd.DataFrame, images: int, local_images: int,
                   tails: dict | None = None) -> pd.DataFrame:
    """How well the measured subset pins down each layer's statistics.

    For each configuration and each statistic with a standard error (images as units), over
    the convolution and linear layers: the median error in units of the layer's float
    standard deviation (drift, local drift) or of the statistic itself (MSE); how many
    layers' statistics the subset resolves from zero (``|value| >= z_{1-α/2} · se``); and the
    images with which a statistic of the layers' median relative error (``se / |value|``;
    with an even count of layers the mean of the two middle ones', unlike
    :func:`drift_tails`' median layer, the upper middle one) would be resolved so with
    probability :data:`RESOLVE_POWER` (errors fall as ``1/sqrt(images)``). ``se_images`` is the number
    of images each error comes from: ``images`` for drift and MSE, ``local_images`` (the
    first ``local_samples`` of each batch) for the local drift, and ``images_to_resolve``
    counts images of the same kind (local-error images for the local drift).

    ``tails`` (configuration key → :func:`drift_tails`) adds to each drift row how much its
    most extreme images carry of the per-image drift's variance: where they carry most of
    it, the normal approximation behind the errors, the resolved counts and the plan rests
    on those few images (the plan is then optimistic: a larger sample meets more of them);
    and the share of images a calibrated range clipped, how many of the extreme ones were
    among them, and the share without them (``tail_clipped_share``, ``tail_top_clipped``,
    ``tail_top_share_unclipped`` beside ``tail_top_share_unclipped_normal``, at the median
    layer).
    """
    layers = sites[sites.kind.isin(["conv", "linear"])]
    keys = [c for c in ("mode", "bits", "target") if c in layers]
    std = layers[layers.metric == "float_std"].set_index(keys + ["site"]).value
    za = float(sps.norm.ppf(1 - ALPHA / 2))
    rows = []
    for metric, unit in PRECISION_UNITS.items():
        part = layers[(layers.metric == metric) & layers.se.notna()]
        for cfg, g in part.groupby(keys, sort=False):
            g = g.set_index(keys + ["site"])
            scale = std.reindex(g.index) if unit == "float_std" else g.value.abs()
            in_unit = (g.se / scale.where(scale > 0)).dropna()
            rel = g.se / g.value.abs()  # inf where the statistic is exactly 0
            if not len(in_unit):
                continue
            med_rel = float(rel.median())
            n_se = local_images if metric == "local_drift" else images
            rows.append({**dict(zip(keys, cfg)), "metric": metric, "images": images,
                         "se_images": n_se,
                         "layers": len(g), "unit": unit, "median_se": float(in_unit.median()),
                         "max_se": float(in_unit.max()),
                         # exactly 0 with no spread (0 >= 0) is not told apart from 0
                         "resolved_layers": int(((g.value.abs() >= za * g.se)
                                                 & (g.value != 0)).sum()),
                         "median_se_rel": med_rel,
                         # 0/0 (no spread and no value anywhere): never resolved
                         "images_to_resolve": math.inf if math.isnan(med_rel) else
                         units_to_resolve(med_rel, n_se, ALPHA, RESOLVE_POWER),
                         **(tails.get(cfg, {}) if tails and metric == "drift" else {})})
    return pd.DataFrame(rows)


def check_batches(data: Data, batch: int, world_size: int, auto: bool = False) -> None:
    """SystemExit unless every rank gets a batch of the measured images. Every rank knows the
    number of batches, so all of them stop here, or none."""
    n_test = data.identity["test_images"]
    if -(-n_test // batch) < world_size:
        raise StudyError(f"{n_test} test images in batches of {batch} make fewer batches than "
                         f"the {world_size} ranks, and each rank measures whole batches; "
                         f"pass --batch-size at most {max(1, n_test // world_size)}"
                         + (", a larger --min-images" if auto else "")
                         + " or start fewer processes")


def kept_means_bytes(model, configs, images: int) -> int:
    """Bytes of the per-image channel means the run keeps for the growth bootstraps: every
    configuration keeps, at every convolution and linear layer, each resampled image's mean
    drift per output channel in float64, and every rank holds all of them once the ranks'
    shares are merged (an all-gather). Nearly half the default run's peak memory (4.5 of 10.0
    GiB resident on the Fashion-MNIST ResNet50 with 45 configurations and 500 images)."""
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    channels = sum(m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
                   for m in model.modules() if isinstance(m, layers))
    return 8 * int(images) * len(configs) * channels


def resampled_bytes(model, configs, images: int) -> int:
    """Bytes of the per-image statistics the run keeps for ``images`` resampled images
    (``--resample-images``), on each rank: the kept channel means
    (:func:`kept_means_bytes`) and, where a configuration decides the network claims, one
    such configuration's BatchNorm moments at a time
    (:func:`qerror.nn.seeds.bn_moments_bytes`, measured after the means, beside them)."""
    return kept_means_bytes(model, configs, images) + (
        bn_moments_bytes(model, images) if any(map(_claims_config, configs)) else 0)


def imagenet_pixel_bytes(crop: int) -> int:
    """Bytes of one measured ImageNet image as a rank holds it: 8-bit pixels, three
    channels of ``crop`` × ``crop`` (:class:`qerror.data.PixelBatches`)."""
    return 3 * int(crop) ** 2


MEMORY_ERROR_SHARE = 0.75  # of the available memory: beyond it the run is refused
MEMORY_WARN_SHARE = 0.5  # ... and beyond this it warns


def memory_verdict(per_resampled: int, per_image: float, images: int, resampled: int,
                   have: int | None, configs: int, *, auto: bool = False,
                   min_images: int = MIN_IMAGES) -> tuple[str, str] | None:
    """Whether the per-image statistics and the images fit this machine's memory.

    They take ``need = per_resampled * resampled + per_image * images`` bytes: each
    resampled image's statistics (:func:`resampled_bytes` of one image, times the ranks on
    the machine) and each measured image as the machine's ranks hold it (their shares;
    0 where the images are a few KB, Fashion-MNIST's). ("error", message) where that is
    more than three quarters of the memory available (``have``): the rest of the run needs
    the remainder (model, calibration images, the K-way passes: about 5.5 of the default
    run's 10.0 GiB, measured when the passes took chunks of 32 images; :data:`KWAY_CHUNK`
    doubles them), so such a run would be killed before it ends; ("warning", message)
    where it is more than half; None otherwise or where the available memory is unknown.
    The advice names counts that bring it within half: ``--resample-images K`` (the
    bootstraps over fewer images, every image still measured), ``--images N`` or, with
    ``--images auto`` (``auto``), ``--max-images N`` (and ``--min-images N`` where N is below
    ``min_images``), and fewer configurations.
    """
    need = per_resampled * resampled + per_image * images
    if have is None or need <= MEMORY_WARN_SHARE * have:
        return None
    room = MEMORY_WARN_SHARE * have
    gb = lambda b: f"{b / 2**30:.1f} GiB"
    ways = []
    keep = int((room - per_image * images) // per_resampled) if per_resampled else 0
    if 2 <= keep < resampled:
        ways.append(f"keep the per-image statistics of fewer images (--resample-images "
                    f"{keep}; every image is still measured)")
    # the most images N with per_resampled * min(resampled, N) + per_image * N within room
    fits = int(room // (per_resampled + per_image)) if per_resampled + per_image else images
    if per_image and resampled < images and resampled <= fits:
        fits = int((room - per_resampled * resampled) // per_image)
    if 2 <= fits < images:
        ways.append(f"measure fewer images (--max-images {fits}" + (
            f" --min-images {fits}" if fits < min_images else "") + ")" if auto
            else f"measure fewer images (--images {fits})")
    ways.append("measure fewer configurations (--modes, --bits, --targets)")
    what = (f"keeping the per-image statistics for the bootstraps over images (channel "
            f"drifts, BatchNorm moments) takes about {gb(per_resampled * resampled)} for "
            f"{resampled} resampled images x {configs} configurations"
            + (f", and the {images} measured images {gb(per_image * images)} as 8-bit pixels"
               if per_image else "") + f", {gb(need)} in all: ")
    advice = "; " + ", or ".join(ways)
    if need > MEMORY_ERROR_SHARE * have:
        return ("error", what + f"more than three quarters of the {gb(have)} of memory "
                "available here, and the rest of the run needs the remainder, so it would be "
                "killed before it ends" + advice)
    return ("warning", what + f"more than half the {gb(have)} available here; the run may "
            "swap or be killed" + advice)


def local_images(images: int, batch: int, local_samples: int) -> int:
    """The local error's images among ``images`` measured in batches of ``batch``: the first
    ``local_samples`` of each batch."""
    return sum(min(local_samples, batch, images - i) for i in range(0, images, batch))


def choose_images(prec: pd.DataFrame, low: int, high: int) -> tuple[int, pd.DataFrame]:
    """The test subset's size from a pilot's :func:`precision_rows`.

    Each configuration needs ``need`` images: the most its median layer needs for any of
    :data:`SIZED_METRICS` to be resolved from zero with :data:`RESOLVE_POWER`. The subset
    takes the largest need rounded up to one significant figure (:func:`round_up_1sf`),
    held between ``low`` and ``high`` images: a configuration that needs more than ``high``
    (``within_max`` false; infinitely many where the pilot saw no drift at all) gets the
    ceiling, and is named rather than resolved. The rounding costs nothing the plan can
    tell (it is known to a factor of two or three) and keeps the size from following the
    last bits of a CPU's sums (measured: the same pilot planned 512 images with AVX-512
    kernels and 499 with AVX2 ones). The rule is monotone: a larger need never gives fewer
    images. Returns ``(images, table)``, the table one row per configuration with its needs
    per statistic, ``need`` and ``within_max``.
    """
    if not 2 <= low <= high:
        raise ValueError(f"need 2 <= low <= high images, got low={low}, high={high}")
    keys = [c for c in ("mode", "bits", "target") if c in prec]
    sized = prec[prec.metric.isin(SIZED_METRICS)]
    if not len(sized):
        raise ValueError("the pilot's precision table has none of the statistics the subset "
                         f"is sized for ({', '.join(SIZED_METRICS)})")
    table = sized.pivot_table(index=keys, columns="metric", values="images_to_resolve",
                              aggfunc="first", sort=False)
    table.columns = [f"need_{m}" for m in table.columns]
    table = table.reset_index()
    table.insert(len(keys), "pilot_images", int(sized.images.iloc[0]))
    table["need"] = table[[c for c in table if c.startswith("need_")]].max(axis=1)
    table["within_max"] = table.need <= high
    images = int(min(high, max(low, round_up_1sf(table.need.max()))))
    return images, table.assign(images=images)


def round_up_1sf(x: float) -> float:
    """``x`` rounded up to one significant figure (9 → 9, 43 → 50, 512 → 600); inf stays."""
    if not math.isfinite(x) or x <= 0:
        return x
    unit = 10.0 ** math.floor(math.log10(x))
    return math.ceil(x / unit - 1e-9) * unit


def _precision_macros(prec: pd.DataFrame) -> dict:
    """The paper's sentence on the subset's precision: 8-bit weights and activations."""
    m = {}
    if not len(prec):
        return m
    for mode in (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO):
        key = letters(mode.value)
        r = prec[(prec["mode"] == mode.value) & (prec.bits == 8) & (prec.target == "both")
                 & (prec.metric == "drift")]
        if len(r):
            m["PrecisionLayers"] = str(int(r.layers.iloc[0]))
            m[f"DriftResolved{key}"] = str(int(r.resolved_layers.iloc[0]))
            m[f"DriftSeMedian{key}"] = number(r.median_se.iloc[0], 2)
            need = r.images_to_resolve.iloc[0]
            m[f"DriftImagesToResolve{key}"] = f"{int(need):,}" if np.isfinite(need) else \
                "no finite number of"
            if "tail_top_share" in r and np.isfinite(r.tail_top_share.iloc[0]):
                # DriftTailShare{key} itself: with the relative share, below
                m["DriftTailShareNormal"] = f"{100 * r.tail_top_share_normal.iloc[0]:.0f}"
                m["DriftTailImages"] = f"{int(r.tail_images.iloc[0]):,}"
            if "tail_clipped_share" in r:
                def text(column, show):  # "--" where the run could not say (NaN)
                    v = r[column].iloc[0]
                    return show(v) if np.isfinite(v) else "--"

                m[f"DriftTailClipped{key}"] = text("tail_clipped_share",
                                                   lambda v: number(100 * v, 2))
                m[f"DriftTailTopClipped{key}"] = text("tail_top_clipped", lambda v: str(int(v)))
                for suffix, column in (("", "tail_top_share_unclipped"),
                                       ("Normal", "tail_top_share_unclipped_normal")):
                    m[f"DriftTailShareUnclipped{suffix}{key}"] = text(
                        column, lambda v: f"{100 * v:.0f}")
        # the tail set against each image's own activation, for both targets at 8 bits
        for target, label in (("both", ""), ("weights", "Weights")):
            r = prec[(prec["mode"] == mode.value) & (prec.bits == 8)
                     & (prec.target == target) & (prec.metric == "drift")]
            # "--" where the run has no such configuration (a smoke run: no weights alone)
            row = r.iloc[0] if len(r) and "tail_top_share_relative" in r else None
            for name, column, show in (
                    ("DriftTailShare", "tail_top_share", lambda v: f"{100 * v:.0f}"),
                    ("DriftTailShareRelative", "tail_top_share_relative",
                     lambda v: f"{100 * v:.0f}"),
                    ("DriftTailRmsShare", "tail_rms_share", lambda v: f"{100 * v:.0f}"),
                    ("DriftTailTopInRmsTop", "tail_top_in_rms_top", lambda v: str(int(v)))):
                v = math.nan if row is None else row[column]
                m[f"{name}{label}{key}"] = show(v) if np.isfinite(v) else "--"
    return m


def _pilot_macros(pilot: pd.DataFrame, sizing: dict) -> dict:
    """The paper's sentence on how the subset was sized (``--images auto``)."""
    return {"PilotImages": f"{int(pilot.pilot_images.iloc[0]):,}",
            "SubsetMinImages": f"{sizing['min_images']:,}",
            "SubsetMaxImages": f"{sizing['max_images']:,}",
            "SubsetBeyondMax": str(int((~pilot.within_max).sum())),
            "SubsetConfigurations": str(len(pilot))}


def _summary(acc, fits, pred, sites, xcheck, probe) -> dict:
    s = {"configs": int((acc.remedy == "none").sum()),
         "accuracy": acc.to_dict(orient="records"),
         "growth": fits.to_dict(orient="records")}
    if len(pred):
        s["prediction_median_abs_error_rel"] = prediction_error(pred)
    if xcheck is not None and len(xcheck):
        s["int8"] = xcheck.to_dict(orient="records")  # the per-variant summary
        s["int8_kernel"] = probe
    return s


def _unresolved_holm(base: pd.DataFrame) -> int | None:
    """How many of the grid's differences from float the family-wise test does not resolve
    (Holm-adjusted McNemar p at or above ALPHA); None for a table without the column."""
    if "mcnemar_p_holm" not in base:
        return None
    tested = base.mcnemar_p_holm.notna()
    return int((tested & ~(base.mcnemar_p_holm < ALPHA)).sum())


def _tables(run, acc, fits, pred) -> None:
    base = acc[acc.remedy == "none"]
    cols = [c for c in ("mode", "bits", "target", "quant_acc", "quant_lo", "quant_hi", "delta",
                        "mcnemar_p", "mcnemar_p_holm", "detectable", "images_needed",
                        "logit_sqnr_db")
            if c in base]
    n = sorted(set(base["images"])) if "images" in base else []
    unresolved = int((~base["differs"]).sum()) if "differs" in base else 0
    holm_unresolved = _unresolved_holm(base)
    run.write_latex_table("accuracy.tex", base[cols],
                          f"Accuracy of the fake-quantized network with its "
                          f"{100 * (1 - ALPHA):g}\\% Wilson interval, its difference from float "
                          f"(quantized minus float: negative where accuracy is lost) and "
                          f"McNemar's p against float, on the same "
                          f"{', '.join(f'{v:,}' for v in n)} test images; "
                          f"\\texttt{{detectable}}: the smallest drop these images detect "
                          f"with probability {RESOLVE_POWER:g} at the observed discordance, "
                          f"\\texttt{{images\\_needed}}: the images the observed drop "
                          f"would need so (Connor's plan). {unresolved} of {len(base)} differences "
                          f"from float are not resolved here (p $\\geq$ {ALPHA:g})"
                          + ("" if holm_unresolved is None else
                             f", {holm_unresolved} when Holm's procedure adjusts the "
                             f"{int(base.mcnemar_p_holm.notna().sum())} tests together")
                          + ".",
                          "tab:drift-accuracy")
    fcols = [c for c in ("mode", "bits", "target", "metric", "exponent", "lo_images",
                         "hi_images", "lo_layers", "hi_layers", "residual_ac1", "answer")
             if c in fits]
    # weights and activations quantized; a run that measured no such configuration shows
    # every target it measured (the table was empty)
    shown = fits[fits.target == "both"] if (fits.target == "both").any() else fits
    run.write_latex_table("growth.tex", shown[fcols],
                          f"Growth of the error with path depth: exponent p of depth$^p$ with "
                          f"{100 * FIT_LEVEL:g}\\% bootstrap intervals over images and over "
                          "blocks of layers, the lag-1 autocorrelation of the fit's residuals "
                          "along depth (near 0 the interval over layers holds its level, well "
                          "above 0 it is too narrow), and whether the intervals separate "
                          "linear from $\\sqrt{\\text{depth}}$ (an answer only where every "
                          "interval gives it, and none from the interval over layers where "
                          f"that autocorrelation exceeds {RESIDUAL_AC1_LIMIT:g}).",
                          "tab:drift-growth")
    rem = acc[acc.remedy != "none"]
    if len(rem):
        rcols = [c for c in ("mode", "bits", "remedy", "quant_acc", "quant_lo", "quant_hi",
                             "recovered", "logit_sqnr_db", "sqnr_gain_db") if c in rem]
        run.write_latex_table("remedies.tex", rem[rcols],
                              "Accuracy after each remedy (both weights and activations "
                              "quantized).", "tab:drift-remedies")


def _report(acc, fits, out, seconds, model_s) -> None:
    base = acc[acc.remedy == "none"]
    cols = [c for c in ("mode", "bits", "target", "quant_acc", "delta", "mcnemar_p",
                        "agreement") if c in base]
    print(base[cols].to_string(index=False))
    f = fits[fits.target == "both"] if (fits.target == "both").any() else fits  # growth.tex's
    fc = [c for c in ("mode", "bits", "metric", "exponent", "lo_images", "hi_images",
                      "lo_layers", "hi_layers", "residual_ac1", "answer") if c in f]
    print(f[fc].to_string(index=False))
    print(f"[drift] {len(base)} configurations in {seconds:.0f} s ({model_s:.0f} s of them "
          f"getting the model); written to {out}")


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
