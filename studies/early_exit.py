"""An INT8 early-exit ResNet50: accuracy against average MACs, calibration, real INT8 kernels.

From the Fashion-MNIST baseline (the cached ResNet50 by default, trained first if missing):

* exit heads at the ends of ``layer1``-``layer3`` (:class:`qerror.nn.EarlyExitResNet`)
  trained on the frozen baseline with the whole training split, and the same network
  fine-tuned jointly with a weighted sum of the exits' losses (``--distill``: part of each
  early exit's loss distillation from the last exit,
  :func:`qerror.nn.early_exit.exit_loss`); accuracy per exit of both, on the validation and
  test splits, each early exit against the last with McNemar's test;
* a temperature per exit fitted on the validation split by minimising the NLL and by
  minimising the ECE, the test ECE before and after each; the rules use ``--calibration``'s
  (default NLL), and an isotonic map of each exit's max-softmax confidence at the rules'
  temperature, fitted on validation (:func:`qerror.nn.early_exit.fit_isotonic`; it only
  reports confidence, the rules keep their scores, so no exit decision changes, under the
  entropy policy too), gives the calibrated confidences;
* threshold sweeps (max-softmax and entropy, one threshold at every early exit) giving
  accuracy against average MACs for FP32 early exit, real INT8 early exit (torchao PT2E on
  oneDNN, :mod:`qerror.nn.pt2e`) and qerror's simulated INT8 with nearest-even and with
  truncation rounding, beside the FP32 full and the INT8 full network;
* the operating point chosen on the validation split alone (rule: the fewest average MACs
  for which a paired non-inferiority test against the FP32 full network, at alpha 0.05,
  shows the validation accuracy above FP32 full's minus a margin,
  :func:`qerror.nn.early_exit.qualifies`), with one threshold shared by the early exits and
  with one per exit (refined from the shared one on the same split,
  :func:`qerror.nn.early_exit.select_rule`), each reported on the test split: Wilson
  intervals, McNemar's test against FP32 full and a paired equivalence test (TOST) with a
  margin of half a point. The margin and the headline policy come from ``--cv-folds``-fold
  cross-validation of the validation split (``--select cv``, the default,
  :func:`qerror.nn.early_exit.cross_validate_selection`): the cheapest procedure whose
  out-of-fold accuracy the paired test shows within the equivalence margin less what the
  test split's TOST needs of it (``z_{1-alpha}`` standard errors there, planned from the
  procedure's out-of-fold disagreements).
  ``--select paired-test`` fixes the margin (``--select-margin``, by default the
  equivalence margin); ``--select estimate`` asks only that the estimate be above it, by
  default half the margin;
* exits per class; how the rounding mode of simulated INT8 moves confidences and exit
  decisions; how the simulated decisions agree with the real INT8 ones;
* with compiled INT8 (the default; ``--no-compile`` runs the quantized graphs eagerly),
  batch-1 latency (median, 99th percentile) and batch-256 throughput of FP32 eager full,
  INT8 full and INT8 early exit as paired ratios (:func:`studies.bench.early_exit_rows`),
  and the compile time apart.

Scale: ``--device cuda`` trains the heads and runs every FP32 and simulated-INT8 forward pass
on a GPU (TF32 off, so the FP32 reference is float32 as on the CPU); the real INT8 graphs and
the latency rows stay on the CPU, whose oneDNN kernels they measure.

``--smoke`` runs the same code on an untrained ResNet18 and a few images: its outputs say
that they are smoke and judge no goal.

Run: ``python -m studies.early_exit`` (``--smoke`` for the test suite's tiny preset).
"""

from __future__ import annotations

import argparse
import copy
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from qerror import RoundingMode
from qerror.data import find_fashion_mnist, split_images
from qerror.files import torch_save
from qerror.nn import (
    QuantConfig,
    Target,
    UnsupportedModelError,
    calibrate_activations,
    estimate_running_stats,
    quantized_forward,
)
from qerror.nn.early_exit import (
    CALIBRATION_OBJECTIVES,
    DEFAULT_EXIT_POINTS,
    EarlyExitResNet,
    ExitPolicy,
    ExitResult,
    ExitRule,
    SelectionProcedure,
    calibrate_exits,
    compare_exits,
    confidence_ece,
    cross_validate_selection,
    exit_confidence,
    exit_costs,
    exit_loss,
    exit_result_from_logits,
    exits_per_class,
    expected_calibration_error,
    fit_isotonic,
    select_rule,
    selection_order,
    threshold_sweep,
)
from qerror.nn.models import DEFAULT_STEM, Arch, Stem, fashion_resnet
from qerror.nn.training import (
    Device,
    Schedule,
    TrainConfig,
    disable_tf32,
    fit,
    resolve_device,
    tensor_batches,
)
from qerror.stats import (
    mcnemar_from_counts,
    mcnemar_test,
    median_ranks,
    paired_accuracy_equivalence,
    places_for,
    wilson_ci,
)
from studies._common import (
    DATA_ROOT_HELP,
    PRINT_WIDTH,
    SPLIT_WORDS,
    RunDir,
    StudyError,
    base_parser,
    check_out,
    check_trained_on,
    figure_style,
    held_out,
    int_at_least,
    nonnegative_int,
    positive_float,
    positive_int,
    refuse_beyond_splits,
    study_main,
    user_path,
)
from studies._latex import escape, letters, signed
from studies._latex import p_value as format_p
from studies.bench import MEDIAN_LEVEL

ALPHA = 0.05  # level of every interval, McNemar test and of each one-sided test of the TOST
#: How a validation operating point qualifies (--select), see qerror.nn.early_exit.qualifies.
SELECT_RULES = ("cv", "paired-test", "estimate")
#: --select cv: the inner margins its procedures may aim at, as fractions of MARGIN.
CV_MARGIN_FRACTIONS = (1.0, 0.8, 0.6, 0.4, 0.2)
CV_FOLDS = 5
MARGIN = 0.005  # the equivalence margin: half a point of accuracy
# The early exits' training loss (heads and joint): this share of it distillation from the
# last exit at this temperature (qerror.nn.early_exit.exit_loss).
DISTILL = 0.0
DISTILL_TEMPERATURE = 1.0
ECE_GOAL = 0.02
MACS_GOAL = 0.5  # at most half the full network's MACs on average
SIM_MODES = (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO)
FP32, INT8 = "fp32", "int8"
SYSTEMS = (FP32, INT8, *(f"sim_{m.value}" for m in SIM_MODES))
def smoke_note(trained: bool, test_images: int) -> str:
    """What a smoke run's outputs say they are (``trained``: a checkpoint was given)."""
    model = "the given checkpoint" if trained else "an untrained model"
    return (f"smoke: {model}, smoke-sized head training and sweeps, {test_images} test "
            "images; not evidence for any goal")


def unit_interval(text: str) -> float:
    """An argparse ``type=`` for thresholds: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def default_thresholds(points: int) -> list[float]:
    """``points`` thresholds evenly in [0, 1] and as many crowded towards 1 (1 - 10^-k),
    where a trained network's confidences lie; 1.0 (never exit) always included."""
    even = np.linspace(0.0, 1.0, points)
    near_one = 1.0 - np.geomspace(1e-4, 0.5, points)
    return sorted({round(float(t), 6) for t in (*even, *near_one, 1.0)})


# --------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class Data:
    train: Split
    val: Split
    calib: Split
    test: Split
    identity: dict


def load_data(data_root, train_images: int, val_images: int, calib_images: int,
              test_images: int, seed: int, held: dict[str, int] | None = None) -> Data:
    """A seeded subset of the training split (head training; all of it when
    ``train_images`` is at least its size), the first images of the validation,
    calibration and test splits; the test split is never used to choose. ``held``: the
    held-out split sizes the backbone was trained beside (:func:`studies._common.held_out`)."""
    from qerror.data import fashion_mnist_splits, to_tensor

    splits = fashion_mnist_splits(data_root, **(held or {}))
    parts = {}
    ident = {"dataset": "fashion-mnist", "source": splits.test.source}
    rng = np.random.default_rng(seed)
    for name, ims, n in (("train", splits.train, train_images), ("val", splits.val, val_images),
                         ("calib", splits.calib, calib_images), ("test", splits.test,
                                                                  test_images)):
        n = min(n, len(ims))
        index = np.sort(rng.permutation(len(ims))[:n]) if name == "train" else np.arange(n)
        sub = ims.subset(index)
        parts[name] = Split(to_tensor(sub.images), torch.as_tensor(sub.labels))
        ident[f"{name}_images"] = n
        ident[f"{name}_sha256"] = sub.sha256
    ident["test_split_whole"] = ident["test_images"] == len(splits.test)
    ident["train_split_whole"] = ident["train_images"] == len(splits.train)
    return Data(**parts, identity=ident)


def load_backbone(args, data_root):
    """(model, identity): the checkpoint given, the cached baseline (trained first if
    missing), or for ``--smoke`` without ``--checkpoint`` an untrained ResNet."""
    from qerror.nn.models import FASHION_CLASSES, load_checkpoint
    from studies.train import get_or_train_baseline

    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint, expected_arch=args.arch,
                               expected_stem=args.stem,
                               expected_num_classes=FASHION_CLASSES)
    elif args.smoke:
        model = fashion_resnet(args.arch, args.stem, seed=args.seed)
        return model, {"model": f"fashion-{args.arch.value}-untrained-smoke", "seed": args.seed}
    else:
        ckpt = get_or_train_baseline(args.arch, args.stem, train_if_missing=not args.no_train,
                                     data_root=data_root)
    check_trained_on(ckpt.info, data_root)
    return ckpt.model, {"model": f"fashion-{ckpt.info.arch.value}-{ckpt.info.stem.value}",
                        "checkpoint": str(ckpt.info.path), "sha256": ckpt.info.sha256,
                        "metrics": ckpt.info.metrics, "held_out": held_out(ckpt.info)}


def build_exit_model(backbone, exit_points, seed: int) -> EarlyExitResNet:
    """The early-exit network, or StudyError naming what the model lacks."""
    try:
        return EarlyExitResNet(backbone, exit_points, seed=seed)
    except (UnsupportedModelError, TypeError) as err:
        raise StudyError(f"cannot attach exit heads to this model: {err}") from err
    except ValueError as err:
        raise StudyError(f"--exit-points: {err}") from err


# --------------------------------------------------------------------------- training

def train_heads(model: EarlyExitResNet, data: Data, epochs: int, batch: int, lr: float,
                seed: int, device: torch.device = torch.device("cpu"), *,
                distill: float = 0.0, temperature: float = 1.0) -> EarlyExitResNet:
    """Heads trained on the frozen backbone (its BatchNorms keep their statistics); the
    last exit is the backbone's own and does not change. ``distill`` and ``temperature``
    as for :func:`qerror.nn.early_exit.exit_loss`, the last exit the teacher. The copy
    returned is on ``device``."""
    model = copy.deepcopy(model)
    n_early = model.num_exits - 1
    config = TrainConfig(epochs=epochs, batch_size=min(batch, len(data.train.y)), lr=lr,
                         seed=seed, schedule=Schedule.ONE_CYCLE)
    fit(model, tensor_batches(data.train.x, data.train.y), len(data.train.y), config,
        trainable=lambda name: name.startswith("heads."),
        loss=exit_loss([1.0] * n_early + [0.0], distill=distill, temperature=temperature),
        device=device,
        desc="heads (frozen backbone)")
    return model.eval()


def train_joint(model: EarlyExitResNet, data: Data, epochs: int, batch: int, lr: float,
                weights, seed: int, device: torch.device = torch.device("cpu"), *,
                distill: float = 0.0, temperature: float = 1.0) -> EarlyExitResNet:
    """Every parameter fine-tuned from the frozen-backbone solution with the weighted sum
    of the exits' losses (``distill`` and ``temperature`` as for
    :func:`qerror.nn.early_exit.exit_loss`, the last exit, itself trained, the teacher), at
    a constant learning rate; the copy returned is on ``device``."""
    model = copy.deepcopy(model)
    config = TrainConfig(epochs=epochs, batch_size=min(batch, len(data.train.y)), lr=lr,
                         seed=seed, schedule=Schedule.CONSTANT)
    fit(model, tensor_batches(data.train.x, data.train.y), len(data.train.y), config,
        loss=exit_loss(weights, distill=distill, temperature=temperature), device=device,
        desc="joint fine-tuning")
    return model.eval()


# --------------------------------------------------------------------------- evaluation

def all_logits(fn, x: torch.Tensor, batch: int, desc: str,
               device: torch.device = torch.device("cpu")) -> list[torch.Tensor]:
    """Every exit's logits of ``fn`` (a model or INT8 stages, on ``device``) on ``x``, in
    batches; the logits come back as float32 CPU tensors."""
    parts = []
    with torch.no_grad():
        for lo in tqdm(range(0, len(x), batch), desc=desc, unit="batch", leave=False):
            parts.append([z.float().cpu() for z in fn(x[lo:lo + batch].to(device))])
    return [torch.cat(z) for z in zip(*parts)]


def simulated_logits(model, data: Data, mode: RoundingMode, batch: int, seed: int):
    """qerror's fake-quantized 8-bit model (weights per channel, activations per tensor,
    ``mode`` for both), on the model's device: every exit's logits on the validation and
    test splits."""
    device = next(model.parameters()).device
    cfg = QuantConfig.make(8, mode, Target.BOTH, seed=seed)
    qp = calibrate_activations(model, [(data.calib.x.to(device), data.calib.y.to(device))],
                               cfg.activation)
    with quantized_forward(model, cfg, qp):
        return (all_logits(model, data.val.x, batch, f"sim {mode.value} val", device),
                all_logits(model, data.test.x, batch, f"sim {mode.value} test", device))


def accuracy_rows(variant: str, split: str, logits, labels, costs) -> list[dict]:
    """Each exit's accuracy with its Wilson interval, and its paired difference from the
    last exit on the same images with McNemar's p (none for the last exit itself)."""
    rows = []
    last = logits[-1].argmax(1) == labels
    for k, z in enumerate(logits):
        right = z.argmax(1) == labels
        w = wilson_ci(int(right.sum()), len(labels), ALPHA)
        mc = None if k == len(logits) - 1 else mcnemar_test(right, last, ALPHA)
        rows.append({"variant": variant, "split": split, "exit": k,
                     "exit_point": costs.exit_points[k], "macs_fraction": costs.fractions[k],
                     "accuracy": w.estimate, "acc_lo": w.ci[0], "acc_hi": w.ci[1],
                     "images": len(labels),
                     "delta_vs_last": math.nan if mc is None else mc.estimate,
                     "mcnemar_p_vs_last": math.nan if mc is None else mc.p_value})
    return rows


def sweep_frame(system: str, split: str, logits, labels, thresholds, costs, temps) -> list[dict]:
    rows = []
    for policy in ExitPolicy:
        for p in threshold_sweep(logits, labels, policy, thresholds, costs, temps):
            rows.append({"system": system, "policy": policy.value, "split": split,
                         "threshold": p.threshold, "accuracy": p.accuracy,
                         "mean_macs": p.mean_macs, "macs_fraction": p.macs_fraction,
                         **{f"exit{k}": c for k, c in enumerate(p.exit_counts)}})
    return rows


def thresholds_text(rule: ExitRule) -> str:
    """A rule's thresholds as its tables print them, first exit first: ``0.75/0.55/0.6``."""
    return "/".join(f"{t:g}" for t in rule.thresholds)


def p_value(v, alpha: float | None = None) -> str:
    """A p-value to two digits for a table ("--" when there is none); with ``alpha``, the
    level a verdict beside it judges it at, more where two would print it on the other side
    (0.0496 at 0.05 is "0.0496", not "0.05" beside "equivalent: yes")."""
    if pd.isna(v):
        return "--"
    digits = 2 if alpha is None else places_for(v, lambda p: p < alpha,
                                                lambda n: f"{v:.{n}g}", 2)
    return f"{v:.{digits}g}"


def operating_points_table(pts: pd.DataFrame) -> pd.DataFrame:
    """The operating points for the paper: percentages with two decimals, the test accuracy
    with its interval in one cell, thresholds and p-values to a few digits (the CSV keeps
    every digit)."""
    def thresholds(text) -> str:
        return "/".join(f"{float(t):.3g}" for t in text.split("/")) if \
            isinstance(text, str) and text else "--"

    return pd.DataFrame({
        "system": pts.system, "policy": pts.policy,
        "thresholds": [thresholds(t) for t in pts.thresholds],
        "val. acc. (%)": [f"{100 * v:.2f}" for v in pts.val_accuracy],
        f"test acc. (%), {100 * (1 - ALPHA):g}% CI": [
            f"{100 * a:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
            for a, lo, hi in zip(pts.accuracy, pts.acc_lo, pts.acc_hi)],
        "MACs (%)": [f"{100 * m:.1f}" for m in pts.macs_fraction],
        "vs FP32 full (points)": [f"{100 * d:+.2f}" for d in pts.delta_vs_fp32_full],
        "McNemar p": [p_value(v) for v in pts.mcnemar_p],
        "TOST p": [p_value(v, ALPHA) for v in pts.tost_p],
        "equivalent": ["yes" if e else "no" for e in pts.equivalent]})


def selection_text(select_margin: float | None, select_alpha: float | None, *,
                   latex: bool = True, cv_folds: int | None = None) -> str:
    """How the operating points were chosen on validation, in a phrase: for the captions
    (LaTeX) and for the manifest (plain). With ``cv_folds`` the margin was chosen by
    cross-validation (None: not yet known, for the manifest written before the run)."""
    if select_alpha is None:
        return (f"fewest average MACs with accuracy at least FP32 full's minus "
                f"{100 * select_margin:g} points")
    level = f"$\\alpha={select_alpha:g}$" if latex else f"alpha {select_alpha:g}"
    text = (f"fewest average MACs for which a paired one-sided test against FP32 full at "
            f"{level} shows the accuracy above FP32 full's minus ")
    if cv_folds is None:
        return text + f"{100 * select_margin:g} points"
    chosen = "" if select_margin is None else f" ({100 * select_margin:g} points here)"
    return (text + f"a margin{chosen} that {cv_folds}-fold cross-validation on the same "
            f"split chose with the headline policy: the cheapest procedure whose "
            f"out-of-fold accuracy that test shows above FP32 full's minus "
            f"{100 * MARGIN:g} points less what the test split's equivalence test needs")


def cv_row(c, ref: torch.Tensor, chosen: bool) -> dict:
    """A row of ``selection_cv.csv``: one procedure's out-of-fold accuracy and MACs on the
    validation split, against FP32 full on the same images."""
    only_a, only_b, eq = paired_test(c.right, ref)
    return {"policy": c.procedure.label, "margin": c.procedure.margin,
            "accuracy": c.accuracy, "delta_vs_fp32_full": eq.estimate, "se": eq.se,
            "p_noninferior": eq.p_low, "qualifying_margin": c.qualifying_margin,
            "p_qualifying": paired_accuracy_equivalence(
                only_a, only_b, len(c.right), c.qualifying_margin, ALPHA).p_low
            if c.qualifying_margin > 0 else math.nan, "macs_fraction": c.macs_fraction,
            "only_right": only_a, "only_ref_right": only_b, "met": c.met,
            "chosen": chosen}


def paired_test(correct: torch.Tensor, ref: torch.Tensor):
    """Discordant counts of ``correct`` against ``ref`` on the same images (right only by
    it, right only by the reference) and the paired TOST of their accuracies."""
    only_a, only_b = int((correct & ~ref).sum()), int((ref & ~correct).sum())
    return only_a, only_b, paired_accuracy_equivalence(only_a, only_b, len(correct), MARGIN,
                                                       ALPHA)


def compare_to_reference(name: str, correct: torch.Tensor, ref: torch.Tensor) -> dict:
    """Wilson interval of ``correct``; McNemar and the paired TOST against ``ref``."""
    n = len(correct)
    w = wilson_ci(int(correct.sum()), n, ALPHA)
    only_a, only_b, eq = paired_test(correct, ref)
    mc = mcnemar_from_counts(only_a, only_b, n, ALPHA)
    return {"system": name, "images": n, "accuracy": w.estimate, "acc_lo": w.ci[0],
            "acc_hi": w.ci[1], "delta_vs_fp32_full": mc.estimate, "delta_lo": mc.ci[0],
            "delta_hi": mc.ci[1], "mcnemar_p": mc.p_value, "tost_p": eq.p_value,
            "tost_p_below": eq.p_low, "tost_p_above": eq.p_high,
            "tost_ci_lo": eq.ci[0], "tost_ci_hi": eq.ci[1], "equivalent": eq.significant}


def equivalence_sides(p_below: float, p_above: float) -> str:
    """Which of the TOST's one-sided tests (H: at least the margin below the reference;
    H: at least the margin above it) were rejected at ALPHA, in words."""
    low, high = p_below < ALPHA, p_above < ALPHA
    if low and high:
        return "both one-sided tests pass"
    if low:
        return ("shown not to be worse than FP32 full by the margin, but not shown to be "
                "better by less than it: the early exit may be better by more than the margin")
    if high:
        return ("shown not to be better than FP32 full by the margin, but not shown to be "
                "worse by less than it")
    return "neither one-sided test passes"


# --------------------------------------------------------------------------- figures

def figure_sweeps(plt, sweeps: pd.DataFrame, points: pd.DataFrame):
    # near the paper's text width (printed at 0.9 of it): its text prints at 6.5 to 8 points
    fig, axes = plt.subplots(1, 2, figsize=(1.1 * PRINT_WIDTH, 3.6), sharey=True)
    for ax, policy in zip(axes, [p.value for p in ExitPolicy]):
        d = sweeps[(sweeps.split == "test") & (sweeps.policy == policy)]
        colors = {}
        for system in SYSTEMS:
            s = d[d.system == system].sort_values("mean_macs")
            if len(s):
                (line,) = ax.plot(100 * s.macs_fraction, 100 * s.accuracy, ".-", ms=3, lw=1,
                                  label=system)
                colors[system] = line.get_color()
        # each system's operating points (and its full network's) in its curve's colour:
        # in black, the marks of the four systems could not be told apart
        marks = {policy: "*", f"{policy} per exit": "P", "none": "s"}
        for _, r in points[points.policy.isin(list(marks))].iterrows():
            system = r.system.removesuffix("_early_exit").removesuffix("_full")
            ax.plot(100 * r.macs_fraction, 100 * r.accuracy, marks[r.policy], ms=6,
                    color=colors.get(system, "k"), mec="k", mew=0.5)
        ax.set_xlabel("average MACs (% of the full network)")
        ax.set_title(textwrap.fill(f"{policy} (test split; chosen on validation: * shared "
                                   "threshold, + one per exit)", 48), fontsize=8)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_calibration(plt, calib: pd.DataFrame):
    d = calib[calib.split == "test"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    x = np.arange(len(d))
    w = 0.2
    ax.bar(x - 1.5 * w, 100 * d.ece_before, w, label="T = 1")
    for i, o in enumerate(CALIBRATION_OBJECTIVES):
        ax.bar(x + (i - 0.5) * w, 100 * d[f"ece_after_{o}"], w,
               label=f"T minimising the validation {o.upper()}")
    ax.bar(x + 1.5 * w, 100 * d.ece_after_isotonic, w,
           label="isotonic map on the rules' T (validation)")
    ax.axhline(100 * ECE_GOAL, color="k", ls=":", lw=0.8, label="goal")
    ax.set_xticks(x, list(d.exit_point))
    ax.set_ylabel("ECE on the test split (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_exits_per_class(plt, per_class: np.ndarray, exit_points):
    fig, ax = plt.subplots(figsize=(5, 3.6))
    share = per_class / np.maximum(per_class.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(exit_points)), list(exit_points))
    ax.set_yticks(range(per_class.shape[0]))
    ax.set_ylabel("true class")
    ax.set_xlabel("exit taken (INT8, chosen operating point)")
    fig.colorbar(im, ax=ax, label="share of the class")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("early_exit", __doc__.splitlines()[0], force=True)
    parser.add_argument("--arch", type=Arch.parse, default=None,
                        help="backbone architecture (default resnet50; resnet18 with --smoke)")
    parser.add_argument("--stem", type=Stem.parse, default=DEFAULT_STEM,
                        help=f"the baseline's stem (default {DEFAULT_STEM.value})")
    parser.add_argument("--checkpoint", type=user_path, default=None,
                        help="a qerror checkpoint of --arch/--stem (default: the cached "
                             "baseline, trained first if missing)")
    parser.add_argument("--no-train", action="store_true",
                        help="fail instead of training a missing baseline")
    parser.add_argument("--data-root", type=user_path, default=None, help=DATA_ROOT_HELP)
    parser.add_argument("--exit-points", nargs="+", default=None,
                        help="blocks after which an exit is placed (default: "
                             f"{' '.join(DEFAULT_EXIT_POINTS)})")
    parser.add_argument("--train-images", type=int_at_least(2), default=None,
                        help=f"training images for the heads (default {split_images('train')}, "
                             "the whole training split; smoke 64)")
    parser.add_argument("--val-images", type=int_at_least(2), default=None,
                        help="validation images: temperatures and the operating point "
                             f"(default {split_images('val')}, the whole split; smoke 64)")
    parser.add_argument("--test-images", type=int_at_least(2), default=None,
                        help=f"test images reported on (default {split_images('test')}, the "
                             "whole split; smoke 64)")
    parser.add_argument("--calib-images", type=int_at_least(2), default=None,
                        help="INT8 calibration images from the calibration split (default "
                             "512, smoke 32)")
    parser.add_argument("--batch-size", type=int_at_least(2), default=None,
                        help="training and evaluation batch (default 128, smoke 32)")
    parser.add_argument("--head-epochs", type=positive_int, default=None,
                        help="epochs of head training on the frozen backbone (default 3, "
                             "smoke 3: one-cycle needs more than four steps)")
    parser.add_argument("--distill", type=unit_interval, default=DISTILL,
                        help="share of each early exit's training loss that is distillation "
                             "from the last exit rather than cross-entropy with the labels "
                             f"(Phuong and Lampert; default {DISTILL:g}; 0: cross-entropy "
                             "only, BranchyNet's loss)")
    parser.add_argument("--distill-temperature", type=positive_float, default=None,
                        help="softening temperature of the distillation term (default "
                             f"{DISTILL_TEMPERATURE:g})")
    parser.add_argument("--joint-epochs", type=nonnegative_int, default=None,
                        help="epochs of joint fine-tuning (default 1, smoke 1; 0 skips it)")
    parser.add_argument("--lr", type=positive_float, default=0.05,
                        help="peak learning rate of head training (default 0.05; joint: a "
                             "tenth of it)")
    parser.add_argument("--joint-weights", nargs="+", type=positive_float, default=None,
                        help="loss weight of each exit in joint fine-tuning, last exit "
                             "included (default: 1 each)")
    parser.add_argument("--variant", choices=["frozen", "joint"], default="frozen",
                        help="which trained network the sweeps and INT8 use (default frozen: "
                             "its last exit is the baseline itself)")
    parser.add_argument("--thresholds", nargs="+", type=unit_interval, default=None,
                        help="thresholds swept, each in [0, 1] (default: 21 even ones and 21 "
                             "near 1; smoke 6 and 6)")
    parser.add_argument("--calibration", choices=CALIBRATION_OBJECTIVES, default="nll",
                        help="what each exit's temperature minimises on the validation split "
                             "(default nll: Guo et al.'s temperature scaling; ece: the "
                             "expected calibration error itself); both are reported, the "
                             "rules use this one, and an isotonic map fitted on top of it "
                             "gives the calibrated confidences the goal is judged on")
    parser.add_argument("--select", choices=SELECT_RULES, default="cv",
                        help="when a validation operating point qualifies (the cheapest that "
                             "does is chosen): paired-test, a paired non-inferiority test "
                             "against FP32 full at alpha 0.05 shows its accuracy above FP32 "
                             "full's minus --select-margin; estimate, its accuracy is at "
                             "least that; cv (default), the paired test with the margin and "
                             "the headline policy chosen by --cv-folds-fold cross-validation "
                             "on the validation split from --cv-margins (the cheapest whose "
                             "out-of-fold accuracy the test shows within the 0.5-point "
                             "equivalence margin)")
    parser.add_argument("--cv-folds", type=int_at_least(2), default=None,
                        help=f"folds of --select cv (default {CV_FOLDS})")
    parser.add_argument("--cv-margins", nargs="+", type=unit_interval, default=None,
                        help="the margins --select cv tries, as fractions (default: "
                             + ", ".join(f"{MARGIN * f:g}" for f in CV_MARGIN_FRACTIONS)
                             + ")")
    parser.add_argument("--select-margin", type=unit_interval, default=None,
                        help="how far below FP32 full's validation accuracy a point may be "
                             "(default: the equivalence margin, 0.005, with paired-test; "
                             "half of it, 0.0025, with estimate)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the INT8 graphs with inductor (default on; off with "
                             "--smoke): needed for latency, minutes per stage")
    parser.add_argument("--latency-pairs", type=positive_int, default=None,
                        help="alternating timing pairs of the latency rows, which need "
                             "--compile (default 200, smoke 20)")
    parser.add_argument("--device", type=Device.parse, default=Device.CPU,
                        help="cpu (default), cuda or auto: where the heads are trained and "
                             "the FP32 and simulated INT8 networks run (real INT8 and latency "
                             "stay on the CPU); the manifest names the one used")
    return parser


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.arch = args.arch or (Arch.RESNET18 if smoke else Arch.RESNET50)
    pick = lambda value, full, small: value if value is not None else (small if smoke else full)
    refuse_beyond_splits(parser, {"--train-images": (args.train_images, "train"),
                                  "--val-images": (args.val_images, "val"),
                                  "--test-images": (args.test_images, "test"),
                                  "--calib-images": (args.calib_images, "calib")})
    train_images = pick(args.train_images, split_images("train"), 64)
    val_images = pick(args.val_images, split_images("val"), 64)
    test_images = pick(args.test_images, split_images("test"), 64)
    calib_images = pick(args.calib_images, 512, 32)
    batch = pick(args.batch_size, 128, 32)
    head_epochs = pick(args.head_epochs, 3, 3)
    joint_epochs = pick(args.joint_epochs, 1, 1)
    compile_int8 = pick(args.compile, True, False)
    # An option that would change nothing is refused, not recorded as if it had been used.
    unused = [(args.latency_pairs, "--latency-pairs", not compile_int8,
               "latency is measured on compiled graphs only (--compile)"),
              (args.distill_temperature, "--distill-temperature", args.distill == 0,
               "--distill 0 trains without distillation"),
              (args.joint_weights, "--joint-weights", joint_epochs == 0,
               "--joint-epochs 0 skips joint fine-tuning"),
              (args.cv_folds, "--cv-folds", args.select != "cv",
               f"--select {args.select} does not cross-validate")]
    for value, flag, idle, why in unused:
        if value is not None and idle:
            parser.error(f"{flag} would change nothing: {why}")
    latency_pairs = pick(args.latency_pairs, 200, 20) if compile_int8 else None
    distill_temperature = None if args.distill == 0 else (
        args.distill_temperature if args.distill_temperature is not None
        else DISTILL_TEMPERATURE)
    thresholds = sorted(set(args.thresholds)) if args.thresholds is not None else \
        default_thresholds(6 if smoke else 21)
    exit_points = tuple(args.exit_points) if args.exit_points else DEFAULT_EXIT_POINTS
    if args.joint_weights is not None and len(args.joint_weights) != len(exit_points) + 1:
        parser.error(f"--joint-weights: give one weight per exit, {len(exit_points) + 1} "
                     f"(the {len(exit_points)} early exits and the last), got "
                     f"{len(args.joint_weights)}")
    joint_weights = tuple(args.joint_weights or [1.0] * (len(exit_points) + 1)) \
        if joint_epochs else None
    if args.variant == "joint" and joint_epochs == 0:
        parser.error("--variant joint needs --joint-epochs of at least 1")
    if args.select == "cv" and args.select_margin is not None:
        parser.error("--select-margin applies to --select paired-test and estimate; --select "
                     "cv chooses the margin from --cv-margins")
    if args.select != "cv" and args.cv_margins is not None:
        parser.error("--cv-margins applies to --select cv only")
    cv_margins = tuple(sorted(set(args.cv_margins), reverse=True)) \
        if args.cv_margins is not None else tuple(MARGIN * f for f in CV_MARGIN_FRACTIONS)
    if args.select == "cv" and min(cv_margins) == 0:
        parser.error("--cv-margins must be above 0 (a non-inferiority test needs a margin)")
    select_margin = None if args.select == "cv" else (
        args.select_margin if args.select_margin is not None else
        (MARGIN if args.select == "paired-test" else MARGIN / 2))
    select_alpha = None if args.select == "estimate" else ALPHA
    if args.select == "paired-test" and select_margin == 0:
        parser.error("--select-margin must be above 0 with --select paired-test (a "
                     "non-inferiority test needs a margin)")
    cv_folds = (args.cv_folds or CV_FOLDS) if args.select == "cv" else None
    if cv_folds and cv_folds > val_images:
        parser.error(f"--cv-folds {cv_folds} is more than the {val_images} validation images; "
                     f"give fewer folds or more images")
    check_out(args.out, "early_exit", force=args.force)
    device = resolve_device(args.device)  # a GPU asked for and missing: refused here
    find_fashion_mnist(args.data_root)  # the data before the model, which may mean training
    # --exit-points checked on an untrained network of --arch/--stem (a second): the baseline
    # may be trained first, most of an hour
    build_exit_model(fashion_resnet(args.arch, args.stem), exit_points, args.seed)

    started = time.perf_counter()
    backbone, model_id = load_backbone(args, args.data_root)
    data = load_data(args.data_root, train_images, val_images, calib_images, test_images,
                     args.seed, model_id.get("held_out"))
    # A checkpoint trained beside other held-out splits than the defaults leaves splits of
    # other sizes: a count asked for by name beyond its split is refused, a default takes
    # the split, and the manifest records the counts taken.
    for option, asked, split in (("--train-images", args.train_images, "train"),
                                 ("--val-images", args.val_images, "val"),
                                 ("--calib-images", args.calib_images, "calib")):
        taken = data.identity[f"{split}_images"]
        if asked is not None and taken < asked:
            held = model_id["held_out"]
            raise StudyError(
                f"{option} {asked}: the checkpoint {model_id['checkpoint']} was trained beside "
                f"{held['val']:,} validation and {held['calib']:,} calibration images held "
                f"out of the training file, so its {SPLIT_WORDS[split]} split holds "
                f"{taken:,} images; give at most {taken}")
    train_images, val_images, calib_images, test_images = (
        data.identity[f"{split}_images"] for split in ("train", "val", "calib", "test"))
    if smoke and args.checkpoint is None:
        # its stages checked first: the BatchNorm estimation would refuse a model without
        # BatchNorm with a message that names no stage
        build_exit_model(backbone, exit_points, args.seed)
        estimate_running_stats(backbone, [data.calib.x])
    backbone.eval()
    base = build_exit_model(backbone, exit_points, args.seed)
    config = {"arch": args.arch.value, "stem": args.stem.value, "exit_points": exit_points,
              "train_images": train_images, "val_images": val_images,
              "test_images": test_images, "calib_images": calib_images, "batch_size": batch,
              "head_epochs": head_epochs, "joint_epochs": joint_epochs, "lr": args.lr,
              "distill": args.distill, "distill_temperature": distill_temperature,
              "joint_lr": args.lr / 10, "joint_weights": joint_weights,
              "variant": args.variant, "thresholds": thresholds,
              "select": args.select, "select_margin": select_margin,
              "select_alpha": select_alpha, "cv_folds": cv_folds,
              "cv_margins": cv_margins if cv_folds else None,
              "margin": MARGIN, "alpha": ALPHA,
              "calibration": args.calibration,
              "compile": compile_int8, "latency_pairs": latency_pairs, "seed": args.seed,
              "smoke": smoke, "device": device.type,
              "evidence": smoke_note(args.checkpoint is not None, test_images) if smoke
              else "measured",
              "operating_point_rule": "on the validation split: the "
                                      + selection_text(select_margin, select_alpha,
                                                       latex=False, cv_folds=cv_folds)
                                      + " (none: the most accurate point), with "
                                      "one threshold shared by the early exits and with one "
                                      "per exit refined from it; the headline (goals, exits "
                                      "per class, simulated vs real) is the INT8 rule of the "
                                      "four that "
                                      + ("cross-validation chose" if cv_folds else
                                         "is cheapest on validation among those that met "
                                         "the rule"),
              "equivalence": "paired TOST (Bonett-Price adjusted Wald), each one-sided test "
                             "at alpha, against FP32 full on the test split"}
    plt = figure_style()
    with RunDir(args.out, "early_exit", argv, config, force=args.force) as run:
        run.extra.update(model=model_id, data=data.identity)
        if device.type == "cuda":  # the FP32 reference stays float32 on a GPU
            run.extra.update(precision=disable_tf32())
        results = compute(base, data, args, config, device)
        results["whole_test"] = bool(data.identity["test_split_whole"])
        results.update(train_images=int(data.identity["train_images"]),
                       train_whole=bool(data.identity["train_split_whole"]))
        results["seconds_to_results"] = time.perf_counter() - started
        write_outputs(run, plt, results, config)
        out = run.finish()
    _report(results, out, config["evidence"] if smoke else None)
    return 0


def compute(base: EarlyExitResNet, data: Data, args, config,
            device: torch.device = torch.device("cpu")) -> dict:
    """Train, evaluate, quantize, sweep, choose, compare; returns every table. Training
    and the FP32 and simulated forward passes run on ``device``, real INT8 on the CPU."""
    costs = exit_costs(base)
    frozen = train_heads(base, data, config["head_epochs"], config["batch_size"], args.lr,
                         args.seed, device, distill=config["distill"],
                         temperature=config["distill_temperature"] or DISTILL_TEMPERATURE)
    variants = {"frozen": frozen}
    if config["joint_epochs"]:
        variants["joint"] = train_joint(frozen, data, config["joint_epochs"],
                                        config["batch_size"], args.lr / 10,
                                        config["joint_weights"], args.seed, device,
                                        distill=config["distill"],
                                        temperature=config["distill_temperature"] or DISTILL_TEMPERATURE)
    batch = config["batch_size"]
    heads_rows, variant_logits = [], {}
    for name, net in variants.items():
        variant_logits[name] = tuple(all_logits(net, getattr(data, split).x, batch,
                                                f"{name} {split}", device)
                                     for split in ("val", "test"))
        for split, z in zip(("val", "test"), variant_logits[name]):
            heads_rows += accuracy_rows(name, split, z, getattr(data, split).y, costs)
    model = variants[config["variant"]]

    logits = {FP32: variant_logits[config["variant"]]}
    # The FP32 full network is the baseline itself: the backbone the heads were put on.
    full = base.backbone if device.type == "cpu" else copy.deepcopy(base.backbone).to(device)
    full_val = all_logits(lambda x: (full(x),), data.val.x, batch, "full val", device)[0]
    full_test = all_logits(lambda x: (full(x),), data.test.x, batch, "full test", device)[0]
    for mode in SIM_MODES:
        logits[f"sim_{mode.value}"] = simulated_logits(model, data, mode, batch, args.seed)

    from qerror.nn.pt2e import quantize_exit_stages, quantize_pt2e

    calib = [data.calib.x[i:i + batch] for i in range(0, len(data.calib.x), batch)]
    # Real INT8 runs oneDNN's CPU kernels: the trained model comes back to the CPU for it.
    cpu_model = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    q_stages = quantize_exit_stages(cpu_model, calib, compile=config["compile"])
    # INT8 full: the baseline quantized as one graph (no exit heads, no stage boundaries).
    q_full = quantize_pt2e(base.backbone, calib, compile=config["compile"])
    logits[INT8] = (all_logits(q_stages, data.val.x, batch, "int8 val"),
                    all_logits(q_stages, data.test.x, batch, "int8 test"))
    int8_full_test = all_logits(lambda x: (q_full(x),), data.test.x, batch, "int8 full")[0]
    int8_full_val = all_logits(lambda x: (q_full(x),), data.val.x, batch, "int8 full val")[0]

    # Temperatures: each system's own, fitted on its validation logits by both objectives;
    # the rules use config["calibration"]'s.
    calib_rows, temps = [], {}
    for system, (val, test) in logits.items():
        fitted = {o: calibrate_exits(val, data.val.y, objective=o)
                  for o in CALIBRATION_OBJECTIVES}
        temps[system] = tuple(c.temperature for c in fitted[config["calibration"]])
        for k, t in enumerate(temps[system]):
            def rules_confidence(z):
                return torch.softmax(z.double() / t, 1).max(1)

            # The isotonic map of the max-softmax confidence at the rules' temperature (the
            # confidence ECE is defined on, whichever policy the rules use), fitted on
            # validation only.
            conf, pred = rules_confidence(val[k])
            iso = fit_isotonic(conf, pred == data.val.y)
            for split, z, y in (("val", val[k], data.val.y), ("test", test[k], data.test.y)):
                ece = {o: expected_calibration_error(z, y, fitted[o][k].temperature)
                       for o in CALIBRATION_OBJECTIVES}
                row = {"system": system, "exit": k, "exit_point": costs.exit_points[k],
                       "split": split, "objective": config["calibration"], "temperature": t,
                       "ece_before": expected_calibration_error(z, y, 1.0),
                       "ece_after": ece[config["calibration"]]}
                for o in CALIBRATION_OBJECTIVES:
                    row[f"temperature_{o}"] = fitted[o][k].temperature
                    row[f"ece_after_{o}"] = ece[o]
                conf, pred = rules_confidence(z)
                row["ece_after_isotonic"] = confidence_ece(iso(conf), pred == y)
                calib_rows.append(row)
    calibration = pd.DataFrame(calib_rows)

    sweeps = []
    for system, (val, test) in logits.items():
        for split, z, y in (("val", val, data.val.y), ("test", test, data.test.y)):
            sweeps += sweep_frame(system, split, z, y, config["thresholds"], costs,
                                  temps[system])
    sweeps = pd.DataFrame(sweeps)

    ref_val = full_val.argmax(1) == data.val.y
    ref_test = full_test.argmax(1) == data.test.y
    points, chosen = [], {}
    full_rows = [("fp32_full", full_test, full_val), ("int8_full", int8_full_test,
                                                      int8_full_val)]
    for name, zt, zv in full_rows:
        row = compare_to_reference(name, zt.argmax(1) == data.test.y, ref_test)
        row.update(policy="none", threshold=1.0, thresholds="", val_accuracy=float(
            (zv.argmax(1) == data.val.y).double().mean()),
            val_mean_macs=float(costs.full_macs), met_rule=True,
            macs_fraction=1.0, mean_macs=float(costs.full_macs))
        points.append(row)
    def operating_row(system, label, rule, met, val_accuracy, val_macs, test):
        res = exit_result_from_logits(test, rule)
        row = compare_to_reference(f"{system}_early_exit", res.predictions == data.test.y,
                                   ref_test)
        mean = res.mean_macs(costs.macs)
        shared = len(set(rule.thresholds)) == 1
        row.update(policy=label, threshold=rule.thresholds[0] if shared else math.nan,
                   thresholds=thresholds_text(rule),
                   val_accuracy=val_accuracy, val_mean_macs=val_macs, met_rule=met,
                   macs_fraction=mean / costs.full_macs, mean_macs=mean,
                   **{f"exit{k}": c for k, c in enumerate(res.exit_counts())})
        points.append(row)
        return res

    # Which validation points qualify: the reference's per-sample correctness (the paired
    # test needs it; the estimate rule uses its accuracy only).
    margin, cv_rows, cv_head = config["select_margin"], None, None
    if config["cv_folds"]:
        # Each procedure (policy, shared or per-exit thresholds, inner margin) run on all
        # folds of the validation split but one and scored on the fold it did not see; the
        # cheapest whose out-of-fold accuracy qualifies, at the equivalence margin less what
        # the test split's TOST needs of it (planned for its size), sets the margin of
        # every rule below and the headline policy.
        procs = [SelectionProcedure(p, per, m) for p in ExitPolicy for per in (False, True)
                 for m in config["cv_margins"]]
        cv = cross_validate_selection(
            logits[INT8][0], data.val.y, procs, config["thresholds"], costs, ref_val, MARGIN,
            alpha=ALPHA, folds=config["cv_folds"], seed=args.seed,
            calibration=config["calibration"], plan_n=len(data.test.y))
        # ties (the same out-of-fold images right at the same MACs) to the smaller margin,
        # the more cautious rule on the whole split, then to the first listed
        best = min(cv, key=lambda c: (selection_order(c.accuracy, c.mean_macs, c.met),
                                      c.procedure.margin))
        margin, cv_head = best.procedure.margin, best.procedure.label
        cv_rows = pd.DataFrame([cv_row(c, ref_val, c is best) for c in cv])
    for system, (val, test) in logits.items():
        for policy in ExitPolicy:
            # One threshold shared by the early exits, then one per exit refined on the same
            # validation split from it: never worse there, reported on the test split too.
            for per_exit in (False, True):
                proc = SelectionProcedure(policy, per_exit, margin)
                fine = select_rule(val, data.val.y, proc, config["thresholds"], costs,
                                   ref_val, temperatures=temps[system],
                                   alpha=config["select_alpha"])
                res = operating_row(system, proc.label, fine.rule, fine.met, fine.accuracy,
                                    fine.mean_macs, test)
                chosen[(system, proc.label)] = (fine.rule, res, (fine.accuracy,
                                                                 fine.mean_macs, fine.met))
    points = pd.DataFrame(points)

    # Headline policy: the one cross-validation chose; without it, the INT8 operating point
    # (shared or per-exit thresholds) that is first on validation by the order every point
    # was chosen by: the cheapest of those that met the rule there; when none did, the most
    # accurate.
    head_policy = cv_head or min((k for s, k in chosen if s == INT8),
                                 key=lambda p: selection_order(*chosen[(INT8, p)][2]))
    rule8, res8, _ = chosen[(INT8, head_policy)]
    # The headline on the split it was chosen on and on the one it is reported on, each
    # against FP32 full on the same images: are the two differences further apart than
    # their sampling allows (independent splits, so the variances add)?
    head_val = exit_result_from_logits(logits[INT8][0], rule8).predictions == data.val.y
    *_, val_eq = paired_test(head_val, ref_val)
    *_, test_eq = paired_test(res8.predictions == data.test.y, ref_test)
    shift = {"val_delta": val_eq.estimate, "val_se": val_eq.se,
             "test_delta": test_eq.estimate, "test_se": test_eq.se,
             "z": (val_eq.estimate - test_eq.estimate) / math.hypot(val_eq.se, test_eq.se)}
    per_class = exits_per_class(res8, data.test.y, int(model.backbone.fc.out_features))
    per_class_rows = [{"system": sys_, "policy": head_policy, "class": c, "exit": k,
                       "exit_point": costs.exit_points[k], "count": int(m[c, k])}
                      for sys_, m in ((INT8, per_class),
                                      (FP32, exits_per_class(chosen[(FP32, head_policy)][1],
                                                             data.test.y, per_class.shape[0])))
                      for c in range(m.shape[0]) for k in range(m.shape[1])]

    # Rounding: the FP32 rule (its thresholds and temperatures) applied to each system's
    # logits, so that only the arithmetic differs; confidences per exit on the test split.
    rule32 = chosen[(FP32, head_policy)][0]
    fp32_res = exit_result_from_logits(logits[FP32][1], rule32)
    rounding_rows = []
    for system, (_, test) in logits.items():
        res = exit_result_from_logits(test, rule32)
        agree = compare_exits(fp32_res, res)
        row = {"system": system, "images": agree.n, "same_exit": agree.same_exit / agree.n,
               "earlier": agree.earlier / agree.n, "later": agree.later / agree.n,
               "same_prediction": agree.same_prediction / agree.n,
               "accuracy": float((res.predictions == data.test.y).double().mean()),
               "macs_fraction": res.mean_macs(costs.macs) / costs.full_macs}
        for k, z in enumerate(test):
            conf = exit_confidence(z, rule32.policy, rule32.temperature(k)).double()
            ref = exit_confidence(logits[FP32][1][k], rule32.policy,
                                  rule32.temperature(k)).double()
            row[f"conf_shift_exit{k}"] = float((conf - ref).mean())
            row[f"top1_agree_exit{k}"] = float((z.argmax(1) == logits[FP32][1][k].argmax(1))
                                               .double().mean())
        rounding_rows.append(row)

    # Simulated against real INT8 under the real INT8 operating rule.
    # Two reference rows: the float network under the same rule (what a simulation must
    # beat to be informative), and the real INT8 runner itself, which drops exited samples
    # between stages, against the figures above, computed from every stage on whole batches
    # (they agree where the compiled stages give the same output at every batch size).
    runner = ExitResult.concat([q_stages.run(data.test.x[i:i + batch], rule8)
                                for i in range(0, len(data.test.x), batch)])
    sim_rows = []
    for name, sim in ([(f"{mode.value}", exit_result_from_logits(
            logits[f"sim_{mode.value}"][1], rule8)) for mode in SIM_MODES]
            + [("fp32", exit_result_from_logits(logits[FP32][1], rule8)),
               ("int8_runner", runner)]):
        agree = compare_exits(res8, sim)
        sim_rows.append({"simulation": name, "policy": head_policy,
                         "thresholds": thresholds_text(rule8),
                         "images": agree.n,
                         "same_exit": agree.same_exit / agree.n,
                         "same_prediction": agree.same_prediction / agree.n,
                         "same_both": agree.same_both / agree.n,
                         "sim_earlier": agree.earlier / agree.n,
                         "sim_later": agree.later / agree.n,
                         **{f"exits_{i}_{j}": int(agree.exit_matrix[i, j])
                            for i in range(agree.exit_matrix.shape[0])
                            for j in range(agree.exit_matrix.shape[1])}})

    times = pd.DataFrame([{"what": "int8 early-exit stages", "quantize_s":
                           q_stages.quantize_seconds, "compile_s": q_stages.compile_seconds,
                           "compiled": config["compile"]},
                          {"what": "int8 full", "quantize_s": q_full.times.total
                           - q_full.times.compile, "compile_s": q_full.times.compile,
                           "compiled": config["compile"]}])
    latency = None
    if config["compile"]:
        from studies.bench import early_exit_rows

        latency = early_exit_rows(base.backbone, q_full, q_stages, rule8, data.test.x,
                                  config["latency_pairs"], seed=args.seed)
    return {"costs": costs, "heads": pd.DataFrame(heads_rows), "calibration": calibration,
            "sweeps": sweeps, "points": points, "head_policy": head_policy,
            "select_margin": margin, "cv": cv_rows, "cv_folds": config["cv_folds"],
            "per_class": per_class, "per_class_rows": pd.DataFrame(per_class_rows),
            "rounding": pd.DataFrame(rounding_rows), "sim_vs_real": pd.DataFrame(sim_rows),
            "times": times, "latency": latency, "rule8": rule8, "shift": shift,
            "lowered": [s.lowered for s in q_stages.stages],
            "lowered_by_size": [{str(k): v for k, v in s.lowered_by_size.items()}
                                for s in q_stages.stages],
            "exit_points": costs.exit_points, "variant": config["variant"],
            "model": model}


def _interval_words(row, show, inverted: bool) -> str:
    """The median ratio's distribution-free interval of a bench row, in the goal's terms
    (``inverted``: as a speed-up, its ends swapped), or that there are too few pairs."""
    if not (math.isfinite(row.median_lo) and math.isfinite(row.median_hi)):
        return "too few pairs for an interval of the median"
    lo, hi = (row.median_hi, row.median_lo) if inverted else (row.median_lo, row.median_hi)
    coverage = median_ranks(int(row.pairs), 1.0 - MEDIAN_LEVEL)[1]
    return (f"median's {100 * coverage:.1f}% interval {show(lo)} to "
            f"{show(hi)}")


def goals(results: dict, smoke: str | None, whole_test: bool) -> pd.DataFrame:
    """Each goal of the issue with its measured figure; nothing is judged on smoke data, and
    the accuracy, MAC and calibration goals only on the whole test split."""
    pts = results["points"]
    policy = results["head_policy"]
    ee = pts[(pts.system == f"{INT8}_early_exit") & (pts.policy == policy)].iloc[0]
    cal = results["calibration"]
    cal = cal[(cal.system == INT8) & (cal.split == "test")]
    rows = [
        {"goal": "INT8 early exit within 0.5 points of FP32 full (test split, paired TOST)",
         "measured": f"{100 * ee.delta_vs_fp32_full:+.2f} points, "
                     f"{100 * (1 - 2 * ALPHA):g}% CI [{100 * ee.tost_ci_lo:+.2f}, "
                     f"{100 * ee.tost_ci_hi:+.2f}], TOST p="
                     f"{format_p(ee.tost_p, latex=False, alpha=ALPHA)} (one-sided p "
                     f"{format_p(ee.tost_p_below, latex=False, alpha=ALPHA)} below, "
                     f"{format_p(ee.tost_p_above, latex=False, alpha=ALPHA)} above: "
                     f"{equivalence_sides(ee.tost_p_below, ee.tost_p_above)})",
         "met": bool(ee.equivalent)},
        {"goal": "at least 50% fewer average MACs than the full network",
         "measured": f"{100 * ee.macs_fraction:.1f}% of the full MACs",
         "met": bool(ee.macs_fraction <= MACS_GOAL)},
        {"goal": "ECE at most 2% at every exit after calibration (INT8, test split)",
         "measured": f"max {100 * cal.ece_after_isotonic.max():.2f}% (isotonic map of the "
                     f"max-softmax confidence at the rules' temperatures, fitted on "
                     f"validation; temperature alone: "
                     + ", ".join(f"{o.upper()}'s T max {100 * cal[f'ece_after_{o}'].max():.2f}%"
                                 for o in CALIBRATION_OBJECTIVES) + ")",
         "met": bool((cal.ece_after_isotonic <= ECE_GOAL).all())},
    ]
    lat = results["latency"]
    speed = {"throughput": "at least 5x the throughput of FP32 eager full at batch 256 "
                           "(smaller with fewer test images)",
             "latency": "lower batch-1 median latency than INT8 full"}
    if lat is None:
        rows += [{"goal": g, "measured": "not measured (INT8 not compiled)", "met": None}
                 for g in speed.values()]
    else:
        thr = [r for r in lat if "time per batch" in r.name and
               r.candidate == "int8 early exit" and r.baseline == "fp32 eager full"][0]
        b1 = [r for r in lat if r.name.startswith("batch 1,") and
              r.candidate == "int8 early exit" and r.baseline == "int8 full"][0]
        # decided on the distribution-free interval of the median ratio (studies.bench):
        # met, not met, or not resolved by the pairs
        decided = {"met": True, "not met": False}
        rows += [{"goal": speed["throughput"],
                  "measured": f"{1 / thr.ratio_median:.2f}x (paired, {thr.pairs} pairs; "
                              f"{_interval_words(thr, lambda v: f'{1 / v:.2f}x', True)})",
                  "met": decided.get(thr.goal_verdict), "said": thr.goal_verdict},
                 {"goal": speed["latency"],
                  "measured": f"{b1.candidate_ms:.2f} vs {b1.baseline_ms:.2f} ms (median "
                              f"ratio {b1.ratio_median:.3f}; "
                              f"{_interval_words(b1, lambda v: f'{v:.3f}', False)})",
                  "met": decided.get(b1.goal_verdict), "said": b1.goal_verdict}]
    frame = pd.DataFrame(rows)
    frame["met"] = frame["met"].astype(object)
    said = frame["said"] if "said" in frame else pd.Series([None] * len(frame))
    frame["verdict"] = [s if isinstance(s, str) else
                        "not measured" if m is None else ("met" if m else "not met")
                        for m, s in zip(frame.met, said)]
    frame = frame.drop(columns="said", errors="ignore")
    if not whole_test:
        part = frame.index < 3  # the goals stated on the whole test split
        frame.loc[part, "verdict"] = (f"not judged: {int(ee.images)} test images, not the "
                                      "whole test split")
        frame.loc[part, "met"] = None
    if smoke:
        frame["verdict"] = "not judged: " + smoke
        frame["met"] = None
    return frame


def write_outputs(run: RunDir, plt, r: dict, config: dict) -> None:
    smoke = config["smoke"]
    evidence = config["evidence"]
    costs = r["costs"]
    macs = pd.DataFrame({"exit": range(len(costs.macs)), "exit_point": costs.exit_points,
                         "backbone_macs": costs.backbone_macs, "head_macs": costs.head_macs,
                         "macs": costs.macs, "fraction": costs.fractions,
                         "full_macs": costs.full_macs})
    tables = {"macs.csv": macs, "heads.csv": r["heads"], "calibration.csv": r["calibration"],
              "sweeps.csv": r["sweeps"], "operating_points.csv": r["points"],
              "exits_per_class.csv": r["per_class_rows"], "rounding.csv": r["rounding"],
              "sim_vs_real.csv": r["sim_vs_real"]}
    if r["cv"] is not None:
        tables["selection_cv.csv"] = r["cv"]
    for name, frame in tables.items():
        run.write_csv(name, frame.assign(evidence=evidence))
    run.write_csv("compile_times.csv", r["times"], timing=True)
    goal = goals(r, smoke and evidence, r["whole_test"])
    speed_in_goals = r["latency"] is not None
    run.write_csv("goals.csv", goal, timing=speed_in_goals)
    # The network the sweeps and INT8 used, for studies.bench: the heads alone when the
    # backbone is the baseline's (frozen), everything after joint fine-tuning.
    state = {k: v.cpu() for k, v in r["model"].state_dict().items()}  # CPU-loadable
    if r["variant"] == "frozen":
        state = {k: v for k, v in state.items() if k.startswith("heads.")}
    torch_save(state, run.path("exit_model.pt"), "the early-exit network (exit_model.pt)")
    if r["latency"] is not None:
        from dataclasses import asdict

        run.write_csv("latency.csv", pd.DataFrame([asdict(x) for x in r["latency"]]),
                      timing=True)
    tag = " (smoke run: not evidence)" if smoke else ""
    pts = r["points"]
    run.write_latex_table(
        "operating_points.tex", operating_points_table(pts),
        f"Operating points chosen on the validation split ("
        f"{selection_text(r['select_margin'], config['select_alpha'], cv_folds=r['cv_folds'])}"
        f"), "
        f"reported on {int(pts.images.iloc[0])} test images: {100 * (1 - ALPHA):g}\\% Wilson "
        f"intervals, the paired difference from FP32 full with McNemar's p, and the paired "
        f"TOST with a margin of {100 * MARGIN:g} points (each one-sided test at "
        f"$\\alpha={ALPHA:g}$){tag}.", "tab:early-exit-points")
    heads = r["heads"].pivot_table(index=["exit_point"], columns=["variant", "split"],
                                   values="accuracy", sort=False)
    heads.columns = [f"{v} {s}" for v, s in heads.columns]
    vs_last = r["heads"][(r["heads"].variant == "frozen") & (r["heads"].split == "test")]
    heads["frozen test: McNemar p vs last exit"] = [
        p_value(v) for v in vs_last.set_index("exit_point").mcnemar_p_vs_last[heads.index]]
    run.write_latex_table(
        "heads.tex", heads.reset_index(),
        "Top-1 accuracy per exit: heads trained on the frozen baseline"
        + (f" against joint fine-tuning with weights "
           f"{', '.join(f'{w:g}' for w in config['joint_weights'])}"
           if config["joint_weights"] else " (no joint fine-tuning)")
        + f", and McNemar's p of each frozen-backbone exit against the last exit on the same "
        f"test images{tag}.", "tab:early-exit-heads")
    cal = r["calibration"]
    run.write_latex_table(
        "calibration.tex", cal[cal.split == "test"][
            ["system", "exit_point", "ece_before"]
            + [c for o in CALIBRATION_OBJECTIVES for c in (f"temperature_{o}",
                                                           f"ece_after_{o}")]
            + ["ece_after_isotonic"]],
        f"Temperature per exit fitted on the validation split by minimising the NLL (Guo et "
        f"al.) or the ECE, and the ECE (15 bins) on the test split before and after each; "
        f"the exit rules use the {config['calibration'].upper()}'s, and the last column is "
        f"the ECE after an isotonic map of those confidences, fitted on validation{tag}.",
        "tab:early-exit-calibration")
    if r["cv"] is not None:
        cv = r["cv"]
        run.write_latex_table(
            "selection_cv.tex", pd.DataFrame({
                "policy": cv.policy, "margin (points)": [f"{100 * m:g}" for m in cv.margin],
                "out-of-fold acc. (%)": [f"{100 * a:.2f}" for a in cv.accuracy],
                "vs FP32 full, points (SE)": [f"{100 * d:+.2f} ({100 * e:.2f})"
                                          for d, e in zip(cv.delta_vs_fp32_full, cv.se)],
                "bar (points)": [f"{100 * b:.2f}" for b in cv.qualifying_margin],
                "p at the bar": [p_value(v) for v in cv.p_qualifying],
                "MACs (%)": [f"{100 * f:.1f}" for f in cv.macs_fraction],
                "qualifies": ["yes" if m else "no" for m in cv.met],
                "chosen": ["yes" if c else "" for c in cv.chosen]}),
            f"Each selection procedure for the INT8 early-exit network scored by "
            f"{config['cv_folds']}-fold cross-validation of the validation split: every "
            f"image judged by the rule the procedure chose on the other folds (difference "
            f"from FP32 full with its standard error). A procedure qualifies when a paired "
            f"one-sided test at $\\alpha={ALPHA:g}$ shows that difference above minus the "
            f"bar: the {100 * MARGIN:g}-point equivalence margin less $z_{{1-\\alpha}}$ "
            f"standard errors of the difference its discordance predicts on the "
            f"{int(r['points'].images.iloc[0])} test images, so that the test split's TOST "
            f"would pass about half the time (a little less). The cheapest that qualifies "
            f"(none: the most accurate) is chosen, then run on the whole split{tag}.",
            "tab:early-exit-cv")
    run.write_goals_table("goals.tex", goal[["goal", "measured", "verdict"]],
                          f"The issue's goals and what was measured{tag}.",
                          "tab:early-exit-goals")
    if speed_in_goals:
        run.timing_outputs.add("goals.tex")
    summary = {"smoke": smoke, "evidence": evidence, "head_policy": r["head_policy"],
               "select_margin": r["select_margin"],
               "selection_cv": None if r["cv"] is None else r["cv"].to_dict(orient="records"),
               "int8_rule": {"policy": r["rule8"].policy.value,
                             "thresholds": r["rule8"].thresholds,
                             "temperatures": r["rule8"].temperatures},
               "exit_points": list(r["exit_points"]), "full_macs": costs.full_macs,
               "exit_macs": list(costs.macs), "lowered": r["lowered"],
               "lowered_by_size": r["lowered_by_size"],
               "operating_points": pts.to_dict(orient="records"),
               "headline_val_vs_test": r["shift"],
               "sim_vs_real": r["sim_vs_real"].to_dict(orient="records"),
               # the speed goals hold timings: goals.csv (a timing output) has them
               "goals": goal.iloc[:3].to_dict(orient="records")}
    run.write_json("summary.json", summary)
    run.write_macros("macros.tex", _macros(r, config, smoke))
    fig = figure_sweeps(plt, r["sweeps"], pts)
    run.save_figure(fig, "sweeps")
    plt.close(fig)
    fig = figure_calibration(plt, cal[cal.system == INT8])
    run.save_figure(fig, "calibration")
    plt.close(fig)
    fig = figure_exits_per_class(plt, r["per_class"], r["exit_points"])
    run.save_figure(fig, "exits_per_class")
    plt.close(fig)


def _macros(r: dict, config: dict, smoke: bool) -> dict:
    pts = r["points"]
    m = {"Smoke": "true" if smoke else "false", "HeadPolicy": escape(r["head_policy"]),
         "SelectMargin": f"{100 * r['select_margin']:g}", "Margin": f"{100 * MARGIN:g}"}
    cv = r["cv"]
    m["CvFolds"] = "--" if cv is None else str(r["cv_folds"])
    m["CvProcedures"] = "--" if cv is None else str(len(cv))
    m["CvQualified"] = "--" if cv is None else str(int(cv.met.sum()))
    margins = [] if cv is None else sorted(set(cv.margin))
    m["CvMargins"] = str(len(margins)) if margins else "--"
    m["CvMarginMax"] = f"{100 * margins[-1]:g}" if margins else "--"
    m["CvMarginMin"] = f"{100 * margins[0]:g}" if margins else "--"
    head = pts[(pts.system == f"{INT8}_early_exit") & (pts.policy == r["head_policy"])].iloc[0]
    m["AccHead"] = f"{100 * head.accuracy:.2f}"
    m["MacsHead"] = f"{100 * head.macs_fraction:.1f}"
    # Validation against test: how far the headline is from FP32 full on the split it was
    # chosen on and on the one it is reported on.
    full = pts[pts.system == "fp32_full"].iloc[0]
    m["ValAccHead"] = f"{100 * head.val_accuracy:.2f}"
    m["ValAccFull"] = f"{100 * full.val_accuracy:.2f}"
    m["ValDeltaHead"] = signed(100 * r["shift"]["val_delta"])
    m["DeltaHead"] = signed(100 * r["shift"]["test_delta"])
    z = r["shift"]["z"]
    m["ShiftZ"] = f"{abs(z):.1f}"
    # Two-sided at ALPHA: are the validation and test differences further apart than
    # sampling of the two splits allows?
    m["ShiftVerdict"] = (
        "within what the sampling of the two splits produces at "
        f"$\\alpha={ALPHA:g}$, so not shown to be a shift between them"
        if abs(z) < NormalDist().inv_cdf(1 - ALPHA / 2) else
        f"more than the sampling of the two splits produces at $\\alpha={ALPHA:g}$")
    m["TrainImages"] = f"{r['train_images']:,}".replace(",", "{,}")
    m["TrainWhole"] = "the whole training split" if r["train_whole"] else \
        "a subset of the training split"
    m["Distill"] = f"{config['distill']:g}"
    m["TostLevel"] = f"{100 * (1 - 2 * ALPHA):g}"
    m["TostPHead"] = format_p(head.tost_p, alpha=ALPHA)
    m["TostPBelowHead"] = format_p(head.tost_p_below, alpha=ALPHA)
    m["TostPAboveHead"] = format_p(head.tost_p_above, alpha=ALPHA)
    m["TostCiLoHead"] = signed(100 * head.tost_ci_lo)
    m["TostCiHiHead"] = signed(100 * head.tost_ci_hi)
    m["TostSidesHead"] = equivalence_sides(head.tost_p_below, head.tost_p_above)
    m["ValSeHead"] = f"{100 * r['shift']['val_se']:.2f}"
    m["SeHead"] = f"{100 * r['shift']['test_se']:.2f}"
    for _, row in pts.iterrows():
        key = letters(f"{row.system} {row.policy}".replace("_", " "))
        m[f"Acc{key}"] = f"{100 * row.accuracy:.2f}"
        m[f"Macs{key}"] = f"{100 * row.macs_fraction:.1f}"
    # The last exit's test accuracy after each variant (the heads table's figures): joint
    # fine-tuning trains the backbone too, the frozen variant leaves the baseline's
    test_heads = r["heads"][r["heads"].split == "test"]
    for variant in ("frozen", "joint"):
        rows = test_heads[test_heads.variant == variant]
        m[f"LastTest{variant.capitalize()}"] = "--" if rows.empty else \
            f"{100 * rows.loc[rows.exit.idxmax()].accuracy:.2f}"
    cal = r["calibration"]
    worst = cal[(cal.split == "test") & (cal.system == INT8)]
    m["EceAfterMaxInt"] = f"{100 * worst.ece_after.max():.2f}"
    m["EceBeforeMaxInt"] = f"{100 * worst.ece_before.max():.2f}"
    for o in CALIBRATION_OBJECTIVES:
        m[f"EceAfterMaxInt{o.capitalize()}"] = f"{100 * worst[f'ece_after_{o}'].max():.2f}"
    m["CalibrationObjective"] = escape(worst.objective.iloc[0].upper())
    m["EceAfterMaxIntIsotonic"] = f"{100 * worst.ece_after_isotonic.max():.2f}"
    for _, row in r["sim_vs_real"].iterrows():
        m[f"SameExit{letters(row.simulation.replace('_', ' '))}"] = f"{100 * row.same_exit:.1f}"
    return m


def _report(r: dict, out: Path, smoke: str | None) -> None:
    pts = r["points"]
    print(pts[["system", "policy", "thresholds", "accuracy", "macs_fraction",
               "delta_vs_fp32_full", "tost_p", "equivalent"]].to_string(index=False))
    print(r["sim_vs_real"][["simulation", "same_exit", "same_prediction"]].to_string(
        index=False))
    if smoke:
        print(f"[early_exit] {smoke}")
    print(f"[early_exit] results in {r['seconds_to_results']:.0f} s; written to {out}")


main = study_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
