"""Early-exit ResNets: exit heads on a torchvision ResNet, exit policies, calibration, MACs.

* :class:`EarlyExitResNet` attaches small classifiers (:class:`ExitHead`) to a torchvision
  ResNet (by default at the ends of ``layer1``, ``layer2`` and ``layer3``; the ResNet's own
  ``fc`` is the last exit) and splits the network into :class:`ExitStage` modules, one per
  exit, each returning its features and its logits.
* :class:`ExitRule` says when a sample leaves: a :class:`ExitPolicy` (max-softmax or
  entropy), one threshold per early exit and optionally one temperature per exit.
* :func:`run_early_exit` evaluates stage by stage and drops the samples that exit, so an
  exited sample does no further work; it runs any sequence of stage callables, the float
  ones of :meth:`EarlyExitResNet.stages` as well as the INT8 compiled ones of
  :func:`qerror.nn.pt2e.quantize_exit_stages`.
* :func:`fit_temperature`, :func:`expected_calibration_error` and :func:`calibrate_exits`
  calibrate the confidences of each exit with a temperature; :func:`fit_isotonic` with a
  monotone map where one temperature cannot, and :func:`confidence_ece` scores any
  calibrator's confidences.
* :func:`exit_result_from_logits` takes the runner's decisions from every exit's logits,
  so :func:`threshold_sweep` prices many thresholds with one forward pass;
  :func:`choose_operating_point` (and :func:`refine_thresholds`, one threshold per exit)
  choose among them by :func:`qualifies`, on the point estimate or on a paired
  non-inferiority test; :func:`select_rule` runs a :class:`SelectionProcedure` (policy,
  shared or per-exit thresholds, margin) and :func:`cross_validate_selection` scores
  procedures on samples they did not choose on; :func:`exits_per_class` and
  :func:`compare_exits` summarise them.
* :func:`count_macs`, :func:`exit_costs`, :func:`block_mac_fractions` and
  :func:`sdn_exit_points` count multiply-accumulates from the graph with PyTorch's FLOP
  counter.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qerror._checks import (
    check_count,
    check_flag,
    check_labels,
    check_seed,
    is_real,
)
from qerror._enums import Choice
from qerror.nn._anatomy import UnsupportedModelError, eval_mode
from qerror.stats import paired_accuracy_equivalence

__all__ = [
    "CALIBRATION_OBJECTIVES",
    "DEFAULT_EXIT_POINTS",
    "SDN_FRACTIONS",
    "EarlyExitResNet",
    "ExitCalibration",
    "ExitAgreement",
    "ExitCosts",
    "ExitHead",
    "ExitPolicy",
    "ExitResult",
    "ExitRule",
    "ExitStage",
    "CrossValidated",
    "IsotonicMap",
    "FinalHead",
    "OperatingPoint",
    "SweepPoint",
    "backbone_blocks",
    "block_mac_fractions",
    "calibrate_exits",
    "check_resnet",
    "confidence_ece",
    "choose_operating_point",
    "clears",
    "CLEARS_SLACK",
    "compare_exits",
    "count_macs",
    "exit_confidence",
    "exit_costs",
    "exit_loss",
    "exit_result_from_logits",
    "exits_per_class",
    "expected_calibration_error",
    "fit_isotonic",
    "fit_temperature",
    "RefinedRule",
    "SelectionProcedure",
    "qualifies",
    "refine_thresholds",
    "cross_validate_selection",
    "select_rule",
    "run_early_exit",
    "sdn_exit_points",
    "selection_order",
    "threshold_sweep",
]

#: Exits at the ends of these stages, then the ResNet's own classifier.
DEFAULT_EXIT_POINTS = ("layer1", "layer2", "layer3")

#: Where Shallow-Deep Networks place their internal classifiers, as fractions of the FLOPs.
SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)

_STEM = ("conv1", "bn1", "relu", "maxpool")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ExitPolicy(Choice):
    """How confident an exit is, as a score in [0, 1] that a threshold is compared with.

    ``MAX_SOFTMAX``
        The largest class probability, ``max_c softmax(z / T)_c``.
    ``ENTROPY``
        One minus the normalized entropy of ``p = softmax(z / T)``,
        ``1 - H(p) / log C`` with ``H(p) = -sum_c p_c log p_c``.

    A sample leaves at an exit when its score is strictly greater than the exit's
    threshold; see :class:`ExitRule`.
    """

    MAX_SOFTMAX = "max-softmax"
    ENTROPY = "entropy"


def exit_confidence(logits: torch.Tensor, policy: ExitPolicy | str,
                    temperature: float = 1.0) -> torch.Tensor:
    """The confidence score of each row of ``logits`` under ``policy``.

    Parameters
    ----------
    logits : torch.Tensor
        (N, C) logits, C >= 2.
    policy : ExitPolicy or str
    temperature : float
        Positive; the logits are divided by it before the softmax.

    Returns
    -------
    torch.Tensor
        (N,) scores in [0, 1], in the logits' floating dtype.

    Raises
    ------
    ValueError
        The logits hold NaN or Inf values, or ``logits / temperature`` overflows their
        dtype (a small temperature on large float16 logits, or one that rounds to 0 in it):
        the softmax would give NaN scores, which never exceed a threshold, so the sample
        would go on to the last exit without a word.

    Notes
    -----
    For ``ENTROPY`` the score is ``1 - H(p)/log C``; BranchyNet's rule "exit when the
    entropy is below ``e``" [1]_ is this score above ``1 - e/log C``. ``p log p`` is taken
    as 0 where ``p = 0`` (:func:`torch.special.entr`). A row of equal logits (a uniform
    ``p``) scores exactly 0, so that threshold 0 keeps it.

    References
    ----------
    .. [1] S. Teerapittayanon, B. McDanel, H. T. Kung, "BranchyNet: fast inference via
       early exiting from deep neural networks", ICPR 2016.
    """
    policy = ExitPolicy.parse(policy)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError("logits must be a (N, C) tensor with C >= 2 classes, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    _check_temperature(temperature, "temperature")
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits hold NaN or Inf values: the network that made them "
                             "diverged or overflowed its dtype; check its weights and inputs")
        raise ValueError(
            f"logits / temperature overflows {logits.dtype} (temperature {temperature!r}, "
            f"largest |logit| {float(logits.abs().max()):g}): the scores would be NaN and "
            "never exit; use a larger temperature or compute the logits in a wider dtype")
    p = torch.softmax(scaled, dim=1)
    if policy is ExitPolicy.MAX_SOFTMAX:
        return p.amax(dim=1)
    entropy = torch.special.entr(p).sum(dim=1)
    score = (1.0 - entropy / math.log(logits.shape[1])).clamp(0.0, 1.0)
    # a row of equal logits is uniform, whose score is 0, not the rounding of H(p) below
    # log C (6e-8 at C = 10 in float32), which threshold 0 would let exit
    return score.masked_fill(scaled.amax(dim=1) == scaled.amin(dim=1), 0.0)


def _check_temperature(t, name: str) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) \
            or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {t!r}")
    return float(t)


def _check_threshold(t, name: str) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) \
            or not (0.0 <= t <= 1.0):  # also refuses NaN
        raise ValueError(f"{name} must be a number in [0, 1], got {t!r}")
    return float(t)


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    """``input_shape`` as a (C, H, W) tuple of ints >= 1 (a tuple or a list of three;
    torch would take True as 1 and refuse 32.0 in its own words)."""
    if not (isinstance(input_shape, tuple | list) and len(input_shape) == 3):
        raise ValueError(f"input_shape must be (C, H, W) positive integers, got "
                         f"{input_shape!r}")
    return tuple(check_count(d, "each size of input_shape", 1) for d in input_shape)


def _threshold_list(values, name: str) -> list[float]:
    """``values`` (any iterable of numbers in [0, 1], a numpy array too) as a non-empty list of
    floats, or an error naming ``name`` and the first bad value."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of numbers in [0, 1], got "
                        f"{type(values).__name__}")
    values = [_check_threshold(t, f"{name}[{i}]") for i, t in enumerate(values)]
    if not values:
        raise ValueError(f"{name} is empty; give at least one threshold")
    return values


def _as_sequence(value, what: str) -> Sequence:
    """``value`` as a sequence: itself, or a one-dimensional numpy array's items (what a
    sweep gives); TypeError ``"{what}, got {type}"`` for anything else (a string, a set, a
    scalar, an array of another shape)."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return list(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        shape = f" of shape {value.shape}" if isinstance(value, np.ndarray) else ""
        raise TypeError(f"{what}, got {type(value).__name__}{shape}")
    return value


@dataclass(frozen=True)
class ExitRule:
    """When a sample leaves an early-exit network.

    Parameters
    ----------
    policy : ExitPolicy or str
        The confidence score (:func:`exit_confidence`).
    thresholds : sequence of float
        One per early exit (the last exit takes every sample left), each in [0, 1]; a
        one-dimensional numpy array too. A
        sample leaves at exit ``k`` when its score there is strictly greater than
        ``thresholds[k]``: ``1.0`` never exits early, ``0.0`` exits every sample whose
        score is positive (every sample, for max-softmax).
    temperatures : sequence of float, optional
        One per exit, the last included (it scales the reported confidence only, since
        the last exit takes everyone); positive. Default: 1 everywhere.
    """

    policy: ExitPolicy
    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "policy", ExitPolicy.parse(self.policy))
        thresholds = _as_sequence(self.thresholds, "thresholds must be a sequence of numbers "
                                  "in [0, 1], one per early exit")
        object.__setattr__(self, "thresholds", tuple(
            _check_threshold(t, f"thresholds[{i}]") for i, t in enumerate(thresholds)))
        if self.temperatures is not None:
            object.__setattr__(self, "temperatures", _as_sequence(
                self.temperatures, "temperatures must be a sequence of positive numbers, one "
                "per exit"))
            if len(self.temperatures) != len(self.thresholds) + 1:
                raise ValueError(
                    f"temperatures needs one value per exit ({len(self.thresholds) + 1}: the "
                    f"{len(self.thresholds)} early exits and the last), got "
                    f"{len(self.temperatures)}")
            object.__setattr__(self, "temperatures", tuple(
                _check_temperature(t, f"temperatures[{i}]")
                for i, t in enumerate(self.temperatures)))

    @property
    def num_exits(self) -> int:
        """Early exits plus the last."""
        return len(self.thresholds) + 1

    def temperature(self, k: int) -> float:
        """The temperature of exit ``k``."""
        return 1.0 if self.temperatures is None else self.temperatures[k]


@dataclass(frozen=True)
class ExitResult:
    """What :func:`run_early_exit` returns, one row per input sample, in input order.

    Attributes
    ----------
    logits : torch.Tensor
        (N, C) logits at the exit each sample took (before the temperature).
    exit_index : torch.Tensor
        (N,) int64, the exit each sample took (0 is the first early exit).
    confidence : torch.Tensor
        (N,) the score that decided (at the last exit: the score there, which decides
        nothing).
    rows_per_stage : tuple of int
        How many samples each stage computed: the first computes all N, stage ``k``
        those that did not leave before it.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor
    rows_per_stage: tuple[int, ...]

    @property
    def predictions(self) -> torch.Tensor:
        """(N,) int64 top-1 classes."""
        return self.logits.argmax(dim=1)

    @classmethod
    def concat(cls, parts: Sequence[ExitResult]) -> ExitResult:
        """One result from the results of consecutive batches, in their order; each
        stage's row count is the sum of the batches'."""
        parts = list(parts)
        if not parts or len({len(p.rows_per_stage) for p in parts}) != 1:
            raise ValueError("concat needs at least one result, all of networks with the "
                             "same number of exits")
        classes = [p.logits.shape[1] for p in parts]
        if len(set(classes)) != 1:
            # torch.cat's 'Sizes of tensors must match' named neither the results nor why
            raise ValueError(f"concat needs results of networks with the same classes; their "
                             f"logits have {classes} classes")
        return cls(torch.cat([p.logits for p in parts]),
                   torch.cat([p.exit_index for p in parts]),
                   torch.cat([p.confidence for p in parts]),
                   tuple(int(sum(r)) for r in zip(*(p.rows_per_stage for p in parts))))

    def exit_counts(self) -> tuple[int, ...]:
        """Samples that left at each exit."""
        n = len(self.rows_per_stage)
        return tuple(int(c) for c in torch.bincount(self.exit_index, minlength=n)[:n])

    def mean_macs(self, exit_macs: Sequence[int]) -> float:
        """Average MACs per sample, given the cumulative MACs of each exit
        (:attr:`ExitCosts.macs`)."""
        if len(exit_macs) != len(self.rows_per_stage):
            raise ValueError(f"exit_macs needs {len(self.rows_per_stage)} values, one per exit, "
                             f"got {len(exit_macs)}")
        cost = torch.as_tensor(list(exit_macs), dtype=torch.float64)
        return float(cost[self.exit_index].mean())


StageFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Modules whose output depends on the other samples of the batch, or on chance, in training
# (a BatchNorm without running statistics does in evaluation mode too)
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _mixes_samples(m: nn.Module) -> bool:
    return isinstance(m, _MODE_DEPENDENT) and (
        m.training or (isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and not m.track_running_stats))
_TRAINING_MODE = ("call .eval() before running the early-exit network: in training mode "
                  "BatchNorm mixes the samples of a batch (and one without running "
                  "statistics does in any mode), and early exit changes the batch")


def _stage_output(k: int, out, rows: int, classes: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage ``k``'s ``(features, logits)`` for ``rows`` samples, or a ValueError saying what
    it gave instead (``classes``: the earlier stages' class count, None at the first)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)):
        raise ValueError(f"stage {k} must return a pair (features, logits) of tensors, as an "
                         f"ExitStage does; got {type(out).__name__}")
    h, logits = out
    if not logits.dtype.is_floating_point or logits.ndim != 2 or logits.shape[0] != rows \
            or logits.shape[1] < 2 or (classes is not None and logits.shape[1] != classes):
        want = "C >= 2" if classes is None else f"C = {classes}, as the earlier stages"
        raise ValueError(f"stage {k} ran {rows} samples and must give (N, C) floating-point "
                         f"logits with N = {rows} and {want}; got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if h.ndim < 1 or h.shape[0] != rows:
        raise ValueError(f"stage {k} ran {rows} samples but its features have shape "
                         f"{tuple(h.shape)}: the first dimension must be the samples")
    return h, logits


def run_early_exit(stages: Sequence[StageFn], x: torch.Tensor, rule: ExitRule) -> ExitResult:
    """Evaluate an early-exit network stage by stage, dropping the samples that leave.

    Parameters
    ----------
    stages : sequence of callables
        Stage ``k`` maps its input (N_k, ...) to ``(features, logits)``, the features the
        next stage takes and the (N_k, C) logits of exit ``k``: the :class:`ExitStage`
        modules of :meth:`EarlyExitResNet.stages`, or compiled INT8 versions of them.
    x : torch.Tensor
        (N, ...) input batch of the first stage.
    rule : ExitRule
        Needs ``len(stages) - 1`` thresholds.

    Returns
    -------
    ExitResult

    Raises
    ------
    RuntimeError
        A stage holds a BatchNorm or dropout in training mode (a sample's output would
        depend on which others are still in the batch).
    ValueError
        ``x`` holds NaN or Inf values. A stage gives something other than
        ``(features, logits)`` with one row per sample
        it ran and the same classes at every exit, or NaN or Inf logits, or logits that the
        rule's temperature scales past their dtype's range (:func:`exit_confidence`).

    Notes
    -----
    After each early exit the rows that leave are removed from the features, so every
    later stage runs on the survivors only and does no work for a sample that has left;
    once no sample is left, no later stage is called. With every threshold at 1.0 no
    sample leaves early, each stage runs the whole batch, and the result equals the
    uninterrupted network's output. Exits whose logits differ in dtype give the result's
    logits in their promoted dtype (:func:`torch.promote_types`), as
    :func:`exit_result_from_logits` does. Runs without autograd.
    """
    if len(stages) < 1:
        raise ValueError("stages is empty; an early-exit network needs at least one stage")
    if rule.num_exits != len(stages):
        raise ValueError(f"the rule has {len(rule.thresholds)} thresholds but the network has "
                         f"{len(stages) - 1} early exits (and {len(stages)} stages)")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.ndim < 2 \
            or x.shape[0] == 0:
        raise ValueError("x must be a non-empty floating-point batch (N, ...), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not bool(torch.isfinite(x).all()):
        # a float stage's NaN logits were refused below, but an INT8 stage quantizes NaN and
        # Inf to ordinary codes: its finite logits would exit such a sample silently
        raise ValueError("x holds NaN or Inf values; an early exit's decision on them would "
                         "mean nothing (an INT8 stage quantizes them to ordinary codes): "
                         "give finite inputs")
    if any(isinstance(s, nn.Module) and any(_mixes_samples(m) for m in s.modules())
           for s in stages):
        raise RuntimeError(_TRAINING_MODE)
    n = x.shape[0]
    alive = torch.arange(n)
    out_logits: torch.Tensor | None = None
    exit_index = torch.full((n,), -1, dtype=torch.int64)
    confidence = torch.empty(n, dtype=torch.float64)
    rows = []
    h = x
    last = len(stages) - 1
    with torch.no_grad():
        for k, stage in enumerate(stages):
            rows.append(int(alive.numel()))
            h, logits = _stage_output(k, stage(h), rows[-1],
                                      None if out_logits is None else out_logits.shape[1])
            if not bool(torch.isfinite(logits).all()):
                # as the logits path refuses them: a NaN score never exits, and the sample
                # would go on silently (counts and MACs off)
                raise ValueError(f"stage {k} gave NaN or Inf logits")
            if out_logits is None:
                out_logits = torch.empty((n, logits.shape[1]), dtype=logits.dtype)
            elif logits.dtype != out_logits.dtype:
                # exits of different dtypes (a float64 last stage after float32 ones): in the
                # promoted dtype, as exit_result_from_logits stacks them; exact for the rows
                # already stored
                out_logits = out_logits.to(torch.promote_types(out_logits.dtype, logits.dtype))
            score = exit_confidence(logits, rule.policy, rule.temperature(k))
            # in float64: a threshold is a Python float, which torch would round to the
            # score's dtype first (1 - 1e-8 to 1.0 in float32, 0.999 to 1.0 in bfloat16)
            leave = (torch.ones_like(score, dtype=torch.bool) if k == last
                     else score.double() > rule.thresholds[k])
            # the bookkeeping stays on the CPU whatever device the stages run on
            gone = leave.cpu()
            idx = alive[gone]
            out_logits[idx] = logits[leave].cpu().to(out_logits.dtype)
            exit_index[idx] = k
            confidence[idx] = score[leave].to(torch.float64).cpu()
            if k == last or bool(gone.all()):
                break
            if bool(gone.any()):
                h, alive = h[~leave], alive[~gone]
    rows += [0] * (len(stages) - len(rows))
    return ExitResult(out_logits, exit_index, confidence, tuple(rows))


# ---------------------------------------------------------------------------------------------
# The network


def check_resnet(model: nn.Module) -> None:
    """Require a torchvision-style ResNet: stem, four stages of blocks, pool and classifier.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    UnsupportedModelError
        A missing part is named: ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` to
        ``layer4`` (each a non-empty ``nn.Sequential`` of blocks), ``avgpool``, ``fc``
        (an ``nn.Linear``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    missing = [name for name in (*_STEM, *_STAGES, "avgpool", "fc")
               if not isinstance(getattr(model, name, None), nn.Module)]
    missing += [f"{name} (a non-empty nn.Sequential of blocks)" for name in _STAGES
                if name not in missing and (not isinstance(getattr(model, name), nn.Sequential)
                                            or len(getattr(model, name)) == 0)]
    if "fc" not in missing and not isinstance(model.fc, nn.Linear):
        missing.append("fc (an nn.Linear)")
    if missing:
        raise UnsupportedModelError(
            f"an early-exit ResNet needs a torchvision-style ResNet; {type(model).__name__} "
            f"lacks: {', '.join(missing)}. Build one with qerror.nn.models.fashion_resnet or "
            "torchvision.models.resnet18/50")


def backbone_blocks(model: nn.Module) -> list[str]:
    """Names of the ResNet's blocks in order, ``"layer1.0"`` to ``"layer4.<last>"``; these
    (and the stage names ``"layer1"`` ... ``"layer3"``, meaning their last block) are where
    exits may be placed."""
    check_resnet(model)
    return [f"{s}.{i}" for s in _STAGES for i in range(len(getattr(model, s)))]


def _resolve_exit_points(model: nn.Module, exit_points: Sequence[str]) -> list[int]:
    blocks = backbone_blocks(model)
    positions = []
    for point in exit_points:
        name = point
        if isinstance(point, str) and point in _STAGES:
            name = f"{point}.{len(getattr(model, point)) - 1}"
        if name not in blocks[:-1]:
            raise ValueError(
                f"exit point {point!r} is not a block of this ResNet before its last one; "
                f"choose among {', '.join(_STAGES[:-1])} or {blocks[0]} ... {blocks[-2]}")
        positions.append(blocks.index(name))
    if not positions:
        raise ValueError("exit_points is empty; give at least one, e.g. "
                         f"{DEFAULT_EXIT_POINTS}")
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError(f"exit points must be distinct and in network order, got "
                         f"{list(exit_points)}")
    return positions


class ExitHead(nn.Module):
    """An internal classifier: 1×1 convolution, BatchNorm, ReLU, average pool, linear.

    Parameters
    ----------
    in_channels : int
        Channels of the features it reads.
    num_classes : int
    width : int
        Channels after the 1×1 convolution.
    pool : int
        Side of the average-pooled grid fed to the linear layer (``pool × pool`` cells).

    Notes
    -----
    Input (N, in_channels, H, W), output (N, num_classes). Its MACs are
    ``in_channels · width · H · W + width · pool² · num_classes``.

    The design takes from each of the two classic early-exit papers what fits a ResNet
    run at 32×32:

    * BranchyNet [1]_ builds its branches from a few convolutions and a fully connected
      layer, and keeps them cheap so that a sample that does not exit loses little. The
      1×1 convolution is the cheapest convolution that mixes channels; it reduces
      ``in_channels`` (256 to 1024 in ResNet50) to ``width`` before anything else. At
      width 64 the three default heads of the 32×32 ResNet50 cost 1.28%, 0.64% and 0.32%
      of its MACs; a 3×3 convolution at the end of ``layer1`` would cost nine times as
      much, 11.5%, which would eat most of the saving of exiting there.
    * Shallow-Deep Networks [2]_ reduce each internal classifier's features with a pooling
      to at most 4×4 cells and then apply a single linear layer, and place the classifiers
      at about 15, 30, 45, 60, 75 and 90% of the network's FLOPs. Here the pooling is an
      average pool to ``pool × pool`` cells (2×2 by default: at 32×32 the stages end at
      8×8, 4×4, 2×2 and 1×1, so 4×4 would keep all of ``layer2``), followed by one linear
      layer. SDN's learned mix of max and average pooling is left out: an average pool
      keeps the head a conv-linear chain that quantizes to INT8 like the backbone.
      The default exits, the ends of ``layer1``, ``layer2`` and ``layer3``, sit at 17.6%,
      43.3% and 79.8% of the 32×32 ResNet50's MACs, near SDN's 15, 45 and 75%;
      :func:`sdn_exit_points` picks the blocks nearest to all six of SDN's fractions.

    The BatchNorm makes the head trainable on a frozen backbone whose features have
    arbitrary scale; it folds into the convolution at inference.

    References
    ----------
    .. [1] S. Teerapittayanon, B. McDanel, H. T. Kung, "BranchyNet: fast inference via
       early exiting from deep neural networks", ICPR 2016.
    .. [2] Y. Kaya, S. Hong, T. Dumitras, "Shallow-Deep Networks: understanding and
       mitigating network overthinking", ICML 2019.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, pool: int = 2):
        super().__init__()
        in_channels, num_classes, width, pool = (
            check_count(v, name, 1) for v, name in ((in_channels, "in_channels"),
                                                    (num_classes, "num_classes"),
                                                    (width, "width"), (pool, "pool")))
        self.conv = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(width * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.bn(self.conv(x))))))


def exit_loss(weights: Sequence[float], *, distill: float = 0.0,
              temperature: float = 1.0) -> Callable[[Sequence[torch.Tensor], torch.Tensor],
                                                    torch.Tensor]:
    """The training loss of a multi-exit network: a weighted sum over its exits.

    Parameters
    ----------
    weights : sequence of float
        One non-negative weight per exit, the last (the network's own classifier)
        included; an exit of weight 0 is left out of the sum.
    distill : float
        In [0, 1]: how much of each *early* exit's loss is distillation from the last
        exit rather than cross-entropy with the labels. 0 (default) is BranchyNet's joint
        objective, a weighted sum of cross-entropies [1]_.
    temperature : float
        Positive: the softening temperature ``T`` of the distillation term.

    Returns
    -------
    callable
        ``loss(outputs, labels)``: ``outputs`` every exit's (N, C) logits in order,
        ``labels`` the (N,) classes; a scalar tensor.

    Notes
    -----
    Early exit ``k`` with logits ``z_k`` contributes, with ``p = softmax(z_last / T)``
    detached (the last exit is the teacher, not pulled towards its students),

    .. math:: w_k \\big[(1 - d)\\,\\mathrm{CE}(z_k, y)
              + d\\, T^2\\, \\mathrm{KL}\\big(p \\,\\|\\, \\mathrm{softmax}(z_k / T)\\big)\\big],

    the last exit ``w_last CE(z_last, y)``. This is the distillation-based training of
    multi-exit networks of Phuong and Lampert [2]_, with Hinton et al.'s ``T^2`` that keeps
    the soft term's gradients on the scale of the hard one's as ``T`` grows [3]_. Why it
    suits an early-exit model judged against its own full network: an early exit's
    decision changes the model's output only where it disagrees with the last exit, and
    distillation trains each exit towards the last exit's predictions (the equivalence
    test's discordant pairs) rather than towards the labels alone.

    References
    ----------
    .. [1] S. Teerapittayanon, B. McDanel, H. T. Kung, "BranchyNet: fast inference via
       early exiting from deep neural networks", ICPR 2016.
    .. [2] M. Phuong, C. H. Lampert, "Distillation-based training for multi-exit
       architectures", ICCV 2019.
    .. [3] G. Hinton, O. Vinyals, J. Dean, "Distilling the knowledge in a neural
       network", NIPS Deep Learning Workshop 2014.
    """
    if isinstance(weights, (str, bytes)) or not all(is_real(w) for w in weights):
        raise ValueError(f"weights must be a sequence of numbers, one per exit; got "
                         f"{weights!r}")
    weights = [float(w) for w in weights]
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) \
            or not any(weights):
        raise ValueError(f"weights must be finite, non-negative and not all 0, one per exit; "
                         f"got {weights!r}")
    if not is_real(distill) or not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be a number in [0, 1], got {distill!r}")
    if not is_real(temperature) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    d, t = float(distill), float(temperature)

    def loss(outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if len(outputs) != len(weights):
            raise ValueError(f"the loss has {len(weights)} weights but the network gave "
                             f"{len(outputs)} exits")
        teacher = None
        if d:
            teacher = F.log_softmax(outputs[-1].detach() / t, 1)
        # summed in at least float32 whatever the outputs' precision
        total = outputs[-1].new_zeros((), dtype=torch.promote_types(outputs[-1].dtype,
                                                                    torch.float32))
        for k, (w, z) in enumerate(zip(weights, outputs)):
            if not w:
                continue
            if k == len(outputs) - 1 or not d:
                total = total + w * F.cross_entropy(z, labels)
                continue
            soft = F.kl_div(F.log_softmax(z / t, 1), teacher, reduction="batchmean",
                            log_target=True) * t * t
            hard = F.cross_entropy(z, labels) if d < 1 else z.new_zeros(())
            total = total + w * ((1 - d) * hard + d * soft)
        return total

    return loss


class FinalHead(nn.Module):
    """The ResNet's own classifier as an exit head: its ``avgpool``, flatten, its ``fc``
    (the same modules, shared with the ResNet)."""

    def __init__(self, avgpool: nn.Module, fc: nn.Module):
        super().__init__()
        self.avgpool = avgpool
        self.flatten = nn.Flatten(1)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(x)))


class ExitStage(nn.Module):
    """One stage of an early-exit network: a body, and the head that reads its output.

    ``forward(x)`` returns ``(features, logits)``: the body's output (the next stage's
    input) and the head's (N, C) logits. Export and quantization take one stage at a
    time, since the decision to go on depends on the data.
    """

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return h, self.head(h)


class EarlyExitResNet(nn.Module):
    """A torchvision ResNet with exit heads after some of its blocks.

    Parameters
    ----------
    backbone : torchvision.models.ResNet
        Copied (the given model is left alone), e.g. a
        :func:`qerror.nn.models.fashion_resnet` baseline; see :func:`check_resnet`.
    exit_points : sequence of str
        Blocks after which an exit is placed, in order, before the last block:
        ``"layer1"`` to ``"layer3"`` (the end of that stage) or a block name such as
        ``"layer3.2"`` (:func:`backbone_blocks`). The ResNet's ``fc`` is always the last
        exit.
    width, pool : int
        Of each :class:`ExitHead`.
    input_shape : tuple of int, optional
        (C, H, W) of one input image, used to find the channels at each exit point and kept
        as :attr:`input_shape` (the default of :func:`exit_costs`). None (the default): the
        backbone's ``conv1`` channels at 32×32, the Fashion-MNIST baselines' shape.
    seed : int
        Seed of the heads' initialisation; the global generator is left untouched.

    Notes
    -----
    The state dict holds ``backbone.*`` (the ResNet's own keys under ``backbone.``) and
    ``heads.<k>.*``, so a baseline checkpoint loads into :attr:`backbone` as it is.
    ``forward(x)`` returns the logits of every exit for every sample (training and
    calibration); :meth:`run` is the inference that exits early. See :class:`ExitHead`
    for the placement and the design of the heads.
    """

    def __init__(self, backbone: nn.Module, exit_points: Sequence[str] = DEFAULT_EXIT_POINTS,
                 *, width: int = 64, pool: int = 2, input_shape: tuple[int, ...] | None = None,
                 seed: int = 0):
        super().__init__()
        check_resnet(backbone)
        # torch.manual_seed would take 2.5 as 2, True as 1 and -1 as 2**64 - 1 without a word
        seed = check_seed(seed, "seed")
        if input_shape is None:
            input_shape = (backbone.conv1.in_channels, 32, 32)
        if isinstance(exit_points, str):
            exit_points = (exit_points,)
        positions = _resolve_exit_points(backbone, exit_points)
        self.backbone = copy.deepcopy(backbone)
        self.exit_points = tuple(exit_points)
        self._cuts = tuple(p + 1 for p in positions)
        input_shape = _check_input_shape(input_shape)
        channels = self._exit_channels(input_shape)
        self.input_shape = input_shape
        num_classes = self.backbone.fc.out_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.heads = nn.ModuleList(ExitHead(c, num_classes, width, pool) for c in channels)
        first = next(self.backbone.parameters())  # the heads live where the backbone does
        self.heads.to(device=first.device, dtype=first.dtype)
        self.train(self.backbone.training)

    def _blocks(self) -> list[nn.Module]:
        return [block for s in _STAGES for block in getattr(self.backbone, s)]

    def _bodies(self) -> list[nn.Sequential]:
        stem = [getattr(self.backbone, name) for name in _STEM]
        blocks = self._blocks()
        edges = (0, *self._cuts, len(blocks))
        bodies = [nn.Sequential(*blocks[a:b]) for a, b in zip(edges, edges[1:])]
        bodies[0] = nn.Sequential(*stem, *bodies[0])
        return bodies

    def _exit_channels(self, input_shape: tuple[int, int, int]) -> list[int]:
        first = next(self.backbone.parameters())
        batch_mixing = [n for n, m in self.backbone.named_modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        and not m.track_running_stats]
        if batch_mixing:
            raise UnsupportedModelError(
                f"{batch_mixing[0]!r} is a BatchNorm without running statistics: it normalises "
                "with the batch's own even in evaluation mode, so a sample's output would "
                "depend on which others have not exited yet; use BatchNorms that track "
                "running statistics (torchvision's default)")
        with eval_mode(self.backbone), torch.no_grad():
            probe = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0),
                                dtype=first.dtype).to(first.device)
            h, channels = probe, []
            for body in self._bodies():
                h = body(h)
                channels.append(h.shape[1])
            chained = FinalHead(self.backbone.avgpool, self.backbone.fc)(h)
            whole = self.backbone(probe)
        # The stages run the ResNet's modules in torchvision's order; a forward of its own
        # (a subclass normalising its input, say) would be lost, and threshold 1.0 would not
        # be the given network. The same operations on the same input give the same values
        # (the tolerance is float rounding's, not a network's difference).
        if not (bool(torch.isfinite(whole).all()) and bool(torch.isfinite(chained).all())):
            raise ValueError(f"{type(self.backbone).__name__} gives NaN or Inf logits on a "
                             "random input: its weights or statistics are not finite; load "
                             "a sound checkpoint")
        if whole.shape != chained.shape or not torch.allclose(
                whole, chained, rtol=1e-4, atol=1e-5 * float(whole.abs().max().clamp(min=1))):
            raise UnsupportedModelError(
                f"{type(self.backbone).__name__}'s forward is not torchvision ResNet's (stem, "
                "layer1 to layer4, avgpool, flatten, fc): its output differs from those "
                "modules run in that order, which is what an early-exit network runs; move "
                "the extra work into a module of that chain (e.g. an input normalisation "
                "before conv1) or into the data")
        return channels[:-1]

    @property
    def num_exits(self) -> int:
        """Early exits plus the ResNet's own classifier."""
        return len(self.heads) + 1

    def stages(self) -> list[ExitStage]:
        """The network as :class:`ExitStage` modules, one per exit, sharing this model's
        modules (built on each call; they hold no state of their own)."""
        heads = [*self.heads, FinalHead(self.backbone.avgpool, self.backbone.fc)]
        return [ExitStage(body, head) for body, head in zip(self._bodies(), heads)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The (N, C) logits of every exit, for every sample, first exit first."""
        out = []
        h = x
        for stage in self.stages():
            h, logits = stage(h)
            out.append(logits)
        return tuple(out)

    def run(self, x: torch.Tensor, rule: ExitRule) -> ExitResult:
        """Early-exit inference (:func:`run_early_exit`) in evaluation mode.

        Raises
        ------
        RuntimeError
            The model is in training mode, where BatchNorm would use batch statistics and
            a sample's output would depend on which others are still in the batch.
        """
        if self.training:
            raise RuntimeError(_TRAINING_MODE)
        first = next(self.parameters())
        if isinstance(x, torch.Tensor) and (x.dtype != first.dtype or x.device != first.device):
            raise ValueError(f"x is {x.dtype} on {x.device}, the network {first.dtype} on "
                             f"{first.device}: convert one to the other first")
        return run_early_exit(self.stages(), x, rule)


# ---------------------------------------------------------------------------------------------
# MACs


def count_macs(module: Callable, *args) -> int:
    """Multiply-accumulates of one call ``module(*args)``, counted from the graph.

    Notes
    -----
    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the
    convolutions and matrix products (``mm``, ``addmm``, ``bmm``, ...) that run and
    reports ``FLOPs = 2 × MACs``; BatchNorm, activations, pooling and residual additions
    are not counted, as in the usual published figures (torchvision's ResNet50 at 224×224:
    4.089 GMACs). Runs without autograd; the count is for the whole batch of ``args``.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    flops = counter.get_total_flops()
    return int(flops // 2)


@dataclass(frozen=True)
class ExitCosts:
    """MACs per image of an early-exit network, exit by exit.

    Attributes
    ----------
    exit_points : tuple of str
        Where the exits are; the last is ``"fc"``.
    backbone_macs : tuple of int
        Cumulative MACs of the backbone up to each exit (the last: the whole ResNet but its
        ``fc``, which is the last exit's head).
    head_macs : tuple of int
        MACs of each exit's head alone (the last: the ResNet's ``fc``).
    macs : tuple of int
        What a sample that leaves at each exit has cost: the backbone up to there and
        every head it was evaluated at on the way.
    full_macs : int
        The plain ResNet, no exit heads.
    """

    exit_points: tuple[str, ...]
    backbone_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    macs: tuple[int, ...]
    full_macs: int

    @property
    def backbone_fractions(self) -> tuple[float, ...]:
        """``backbone_macs`` as fractions of ``full_macs``."""
        return tuple(m / self.full_macs for m in self.backbone_macs)

    @property
    def fractions(self) -> tuple[float, ...]:
        """``macs`` as fractions of ``full_macs``."""
        return tuple(m / self.full_macs for m in self.macs)


def exit_costs(model: EarlyExitResNet, input_shape: tuple[int, ...] | None = None) -> ExitCosts:
    """Count the MACs per image (C, H, W) at each exit of ``model`` (see :func:`count_macs`);
    ``input_shape`` (C, H, W), each an int >= 1, defaults to the one the model was built for
    (its :attr:`input_shape`).

    Returns
    -------
    ExitCosts

    Notes
    -----
    Measured for :func:`qerror.nn.models.fashion_resnet` at 32×32 with the default stem
    and exits: ResNet50 costs 81,825,792 MACs, and ``layer1``, ``layer2`` and ``layer3``
    end at 14,434,304 (17.6%), 35,405,824 (43.3%) and 65,290,240 (79.8%); the default
    heads add 1,051,136, 526,848 and 264,704. ResNet18 costs 35,410,944 MACs, its stages
    ending at 28.9%, 52.6% and 76.3%. torchvision's ResNet50 at 224×224 counts
    4,089,184,256 MACs, the published 4.089 G.
    """
    if not isinstance(model, EarlyExitResNet):
        raise TypeError(f"model must be an EarlyExitResNet, got {type(model).__name__}")
    input_shape = model.input_shape if input_shape is None else _check_input_shape(input_shape)
    first = next(model.parameters())  # the probe image goes where the model is (a GPU's)
    x = torch.zeros((1, *input_shape), dtype=first.dtype, device=first.device)
    with eval_mode(model):  # each module's own mode back after (a frozen backbone's BN)
        full = count_macs(model.backbone, x)
        backbone, heads = [], []
        h = x
        for stage in model.stages():
            backbone.append((backbone[-1] if backbone else 0) + count_macs(stage.body, h))
            with torch.no_grad():
                h = stage.body(h)
            heads.append(count_macs(stage.head, h))
    head_sums = np.cumsum(heads)
    macs = tuple(int(b + s) for b, s in zip(backbone, head_sums))
    return ExitCosts((*model.exit_points, "fc"), tuple(backbone), tuple(heads), macs, full)


def block_mac_fractions(model: nn.Module, input_shape: tuple[int, ...] | None = None
                        ) -> dict[str, float]:
    """The cumulative fraction of a ResNet's MACs at the end of each block (stem included in
    the first), per image of shape (C, H, W) (default: the stem's input channels at 32×32,
    as :class:`EarlyExitResNet`)."""
    check_resnet(model)
    input_shape = (model.conv1.in_channels, 32, 32) if input_shape is None \
        else _check_input_shape(input_shape)
    first = next(model.parameters())  # the probe image goes where the model is (a GPU's)
    x = torch.zeros((1, *input_shape), dtype=first.dtype, device=first.device)
    with eval_mode(model):
        full = count_macs(model, x)
        stem = nn.Sequential(*(getattr(model, n) for n in _STEM))
        done = count_macs(stem, x)
        with torch.no_grad():
            h = stem(x)
        out = {}
        for name in backbone_blocks(model):
            stage, i = name.split(".")
            block = getattr(model, stage)[int(i)]
            done += count_macs(block, h)
            with torch.no_grad():
                h = block(h)
            out[name] = done / full
    return out


def sdn_exit_points(model: nn.Module, fractions: Sequence[float] = SDN_FRACTIONS,
                    input_shape: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """The block ends nearest to given fractions of a ResNet's MACs (Shallow-Deep Networks'
    placement by default), usable as ``exit_points`` of :class:`EarlyExitResNet`.

    Blocks chosen twice are kept once; the last block (the ResNet's own exit) is never
    chosen.

    References
    ----------
    .. [1] Y. Kaya, S. Hong, T. Dumitras, "Shallow-Deep Networks: understanding and
       mitigating network overthinking", ICML 2019.
    """
    for i, f in enumerate(fractions):
        _check_threshold(f, f"fractions[{i}]")
    ends = list(block_mac_fractions(model, input_shape).items())[:-1]
    chosen = {min(ends, key=lambda e: abs(e[1] - f))[0] for f in fractions}
    return tuple(name for name, _ in ends if name in chosen)


# ---------------------------------------------------------------------------------------------
# Calibration


def _check_logits_labels(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point \
            or logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError("logits must be a non-empty floating-point (N, C) tensor with C >= 2, "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits hold NaN or Inf values")
    labels = check_labels(labels, logits.shape[1], logits.shape[0])
    # on the CPU whatever the device: fits and counts are small, and a reference's
    # correctness and a result's exits are CPU tensors (logits of a GPU network mixed
    # with them raised torch's device mismatch)
    return logits.detach().to(device="cpu", dtype=torch.float64), labels.cpu()


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits / temperature, labels))


CALIBRATION_OBJECTIVES = ("nll", "ece")
ECE_GRID_POINTS = 2001  # log-spaced temperatures searched by objective="ece"


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *,
                    bounds: tuple[float, float] = (0.05, 20.0), objective: str = "nll",
                    n_bins: int = 15) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (or their
    expected calibration error).

    Parameters
    ----------
    logits : torch.Tensor
        (N, C) logits of a held-out (validation) split; never the split reported on.
    labels : torch.Tensor
        (N,) integer classes.
    bounds : (float, float)
        Search interval of T. With ``objective="nll"`` the result is a bound exactly when
        the NLL does not turn inside the interval (its minimum lies at or beyond that
        bound: the lower one for logits that classify every sample right, the upper one
        for logits that carry no information); otherwise it is the interior minimum.
    objective : {"nll", "ece"}
        What T minimises on these logits: the negative log-likelihood (Guo et al.'s
        temperature scaling, the default) or :func:`expected_calibration_error` with
        ``n_bins`` bins.
    n_bins : int
        Bins of the ECE objective (unused by ``"nll"``).

    Returns
    -------
    float
        T > 0; calibrated probabilities are ``softmax(logits / T)``.

    Raises
    ------
    ValueError
        Bad logits, labels, bounds or objective; or logits so large (a diverged network)
        that ``logits / T`` at the lower bound, or the differences of a row's logits,
        overflow float64.

    Notes
    -----
    Temperature scaling [1]_: one scalar per classifier, fitted on validation logits by
    minimising ``NLL(T) = mean_i [logsumexp(z_i / T) - z_{i,y_i} / T]``. As a function of
    ``β = 1/T`` the NLL is convex (a log-sum-exp of functions linear in β minus a linear
    term), so its slope in β decides whether the minimum lies at a bound, and otherwise
    the bounded scalar search over ``log T`` (Brent's method, in float64) finds the
    global minimum inside the interval. Dividing by T keeps the arg-max, so accuracy is
    unchanged.

    The NLL is a proper score of the whole softmax; the ECE looks at the top
    probability only. They can disagree: a network trained with label smoothing keeps a
    miscalibration no single T removes, and the NLL's T may leave an ECE the ECE's own T
    halves. ECE is piecewise smooth in T with jumps where a confidence crosses a bin edge,
    so ``objective="ece"`` searches ``ECE_GRID_POINTS`` log-spaced temperatures over
    ``bounds`` (neighbours 0.3 % apart over the default bounds) and returns the first
    minimum; as any T fitted on a split, judge it on another.

    References
    ----------
    .. [1] C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On calibration of modern neural
       networks", ICML 2017.
    """
    z, y = _check_logits_labels(logits, labels)
    if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence) \
            or len(bounds) != 2 or not all(isinstance(b, numbers.Real)
                                           and not isinstance(b, (bool, np.bool_))
                                           for b in bounds):
        raise ValueError(f"bounds must be a pair (low, high) of numbers, got {bounds!r}")
    lo, hi = (float(b) for b in bounds)
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
    if objective not in CALIBRATION_OBJECTIVES:
        raise ValueError(f"objective must be one of {CALIBRATION_OBJECTIVES}, got "
                         f"{objective!r}")
    # Logits near float64's limit overflow logits / T (or the slope's differences) in the
    # interval: the searches then read NaN and stopped anywhere (0.1669 where 0.1258 was due
    # with one row at 3e307, 0.493 for the bound 0.05 at 1e308).
    largest = float(z.abs().max())
    if not bool(torch.isfinite(z / lo).all()):
        raise ValueError(
            f"logits reach {largest:g}: divided by the lower bound T = {lo:g} they overflow "
            "float64, so the calibration cannot be computed; give a larger lower bound, or "
            "check the network (logits this large come from one that diverged)")
    if objective == "ece":
        grid = np.exp(np.linspace(math.log(lo), math.log(hi), ECE_GRID_POINTS))
        eces = [expected_calibration_error(z, y, float(t), n_bins) for t in grid]
        return float(grid[int(np.argmin(eces))])
    # The NLL is convex in beta = 1/T: where its slope does not change sign between the
    # bounds, the minimum is the bound itself. Brent's search could not tell: the NLL of
    # separable logits rounds to exactly 0 for every T below some value (log(1 + 1e-20) is 0),
    # and it stopped anywhere on that plateau (0.2057 where 0.05 was due).
    slope_lo, slope_hi = _nll_slope(z, y, 1.0 / lo), _nll_slope(z, y, 1.0 / hi)
    if not (math.isfinite(slope_lo) and math.isfinite(slope_hi)):
        # NaN slopes (a difference of two logits past float64's range) decided nothing
        raise ValueError(
            f"logits reach {largest:g}: the differences of a row's logits overflow float64, "
            "so the NLL cannot be computed; check the network that gave them (logits this "
            "large come from one that diverged)")
    if slope_lo <= 0:
        return float(lo)
    if slope_hi >= 0:
        return float(hi)
    res = optimize.minimize_scalar(lambda u: _nll(z, y, math.exp(u)),
                                   bounds=(math.log(lo), math.log(hi)), method="bounded",
                                   options={"xatol": 1e-6})
    return float(math.exp(res.x))


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """d NLL / d beta at ``beta = 1/T``: ``mean_i sum_c p_ic (z_ic - z_iy)``, ``p`` the
    softmax of ``beta z`` (differences to the label's logit, so no cancellation)."""
    d = logits - logits.gather(1, labels[:, None])
    return float((torch.softmax(beta * d, dim=1) * d).sum(dim=1).mean())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor,
                               temperature: float = 1.0, n_bins: int = 15) -> float:
    """Expected calibration error of the max-softmax confidence, equal-width bins.

    Parameters
    ----------
    logits : torch.Tensor
        (N, C).
    labels : torch.Tensor
        (N,) integer classes.
    temperature : float
        Applied before the softmax.
    n_bins : int
        Bins ``(0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1]`` with ``M = n_bins``; 15 as in
        Guo et al. [1]_. The edges are the float64 values nearest ``b/M``; a confidence
        equal to one (0.07 of 100 bins) is in the lower bin, one above it in the upper.

    Returns
    -------
    float
        ``ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|`` in [0, 1], where ``conf`` is
        the mean max-softmax probability in the bin and ``acc`` the fraction of top-1
        predictions that are right; empty bins add nothing.

    Raises
    ------
    ValueError
        Bad logits, labels, temperature or ``n_bins``; or ``logits / temperature``
        overflows float64 (its softmax would be NaN).

    Notes
    -----
    Confidences never fall below 1/C, so the lowest bins stay empty for small C. Equal
    width follows Naeini et al. [2]_ and Guo et al. [1]_; the value depends on the
    binning, so compare ECEs computed with the same ``n_bins`` only.

    References
    ----------
    .. [1] C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On calibration of modern neural
       networks", ICML 2017.
    .. [2] M. P. Naeini, G. F. Cooper, M. Hauskrecht, "Obtaining well calibrated
       probabilities using Bayesian binning", AAAI 2015.
    """
    z, y = _check_logits_labels(logits, labels)
    _check_temperature(temperature, "temperature")
    scaled = z / temperature
    if not bool(torch.isfinite(scaled).all()):
        # the softmax would be NaN, refused as 'not a confidence', naming neither cause
        raise ValueError(
            f"logits / temperature overflows float64 (temperature {temperature!r}, largest "
            f"|logit| {float(z.abs().max()):g}): use a larger temperature, or check the "
            "network that gave such logits")
    p = torch.softmax(scaled, dim=1)
    conf, pred = p.max(dim=1)
    return confidence_ece(conf, pred == y, n_bins)


def confidence_ece(confidence, correct, n_bins: int = 15) -> float:
    """:func:`expected_calibration_error` of given confidences: ``confidence`` in [0, 1]
    and whether each prediction was right (``correct``, booleans), any calibrator's output.
    """
    n_bins = check_count(n_bins, "n_bins", 1)
    conf, correct = (torch.from_numpy(a) for a in _check_confidences(confidence, correct))
    correct = correct.to(torch.float64)
    # Bin b holds (e_b, e_{b+1}], e_j the float64 nearest j/M: a confidence equal to an edge
    # (0.07 of 100 bins) goes in the lower bin, the next float above it in the upper.
    # ceil(conf*M)-1 would round the product first and misplace both within an ulp of an edge.
    # sum_b |B_b|/N |mean conf - mean acc| = sum_b |sum conf - sum acc| / N.
    edges = np.arange(1, n_bins, dtype=np.float64) / n_bins
    bins = torch.from_numpy(np.searchsorted(edges, conf.numpy(), side="left"))
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / len(conf))


def _float64(values) -> np.ndarray:
    """A float64 numpy copy of a tensor (any device, with or without grad), array or number;
    a Python float keeps all its digits (no float32 on the way)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _confidence_values(confidence) -> np.ndarray:
    """A float64 copy of ``confidence`` (any shape), or ValueError unless every value lies
    in [0, 1]."""
    conf = _float64(confidence)
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must lie in [0, 1] (NaN is not a confidence)")
    return conf


def _check_confidences(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """(N,) float64 confidences in [0, 1] and (N,) booleans, or ValueError saying which
    input is wrong; what :func:`confidence_ece` and :func:`fit_isotonic` accept."""
    conf = _float64(confidence).reshape(-1)
    right = torch.as_tensor(correct).detach().cpu().reshape(-1)
    if right.dtype != torch.bool or len(right) != len(conf) or not len(conf):
        raise ValueError("correct must be booleans, one per confidence, and not empty")
    return _confidence_values(conf), right.numpy()


@dataclass(frozen=True)
class IsotonicMap:
    """A non-decreasing map of confidences to calibrated ones (:func:`fit_isotonic`).

    Attributes
    ----------
    knots, values : tuple of float
        Increasing distinct confidences of the fitting split and their fitted values;
        between knots the map interpolates linearly, beyond them it is constant.
    """

    knots: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self):
        k, v = np.asarray(self.knots, dtype=np.float64), np.asarray(self.values, dtype=np.float64)
        if k.ndim != 1 or k.shape != v.shape or not len(k):
            raise ValueError(f"knots and values must be equally long and not empty, got "
                             f"{k.shape} and {v.shape}")
        if not (np.all(np.diff(k) > 0) and np.all(np.diff(v) >= 0)):
            raise ValueError("knots must increase and values must not decrease")
        if not (np.all((k >= 0) & (k <= 1)) and np.all((v >= 0) & (v <= 1))):
            raise ValueError("knots and values must lie in [0, 1]")

    def __call__(self, confidence) -> torch.Tensor:
        """The calibrated confidences, float64, of the input's shape (a 0-d tensor for a
        number); ValueError unless every confidence lies in [0, 1] (NaN would map to NaN
        and a value outside to the map's end without a word)."""
        out = np.interp(_confidence_values(confidence), np.asarray(self.knots),
                        np.asarray(self.values))
        return torch.as_tensor(np.asarray(out, dtype=np.float64))


def fit_isotonic(confidence, correct) -> IsotonicMap:
    """Isotonic regression of correctness on confidence: a calibrator that keeps the order
    of the confidences it maps.

    Parameters
    ----------
    confidence : tensor or array
        (N,) confidences in [0, 1] of a held-out (validation) split, e.g. the max-softmax
        probability after a temperature.
    correct : tensor or array of bool
        (N,) whether each prediction was right.

    Returns
    -------
    IsotonicMap

    Notes
    -----
    Zadrozny and Elkan's calibration by isotonic regression [1]_, compared by Guo et al.
    [2]_ with temperature scaling: at the distinct confidences, the non-decreasing values
    ``g`` that minimise ``sum_i (g(c_i) - y_i)^2`` (pool adjacent violators,
    :func:`scipy.optimize.isotonic_regression` weighted by the counts), interpolated linearly
    between them. The map does not decrease, so it never reverses two confidences, but it
    makes many of them equal: an exit rule stays on the raw score (its decisions unchanged)
    and the mapped value is what is reported as the confidence. Where
    one scalar temperature cannot remove a miscalibration (label smoothing bends the
    confidence curve in a way no single T straightens), a monotone map still can; fitted on
    one split, judge it on another.

    References
    ----------
    .. [1] B. Zadrozny, C. Elkan, "Transforming classifier scores into accurate multiclass
       probability estimates", KDD 2002.
    .. [2] C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On calibration of modern neural
       networks", ICML 2017.
    """
    conf, right = _check_confidences(confidence, correct)
    knots, inverse, counts = np.unique(conf, return_inverse=True, return_counts=True)
    mean_right = np.bincount(inverse, weights=right.astype(np.float64)) / counts
    fitted = optimize.isotonic_regression(mean_right, weights=counts.astype(np.float64)).x
    return IsotonicMap(tuple(float(k) for k in knots), tuple(float(v) for v in fitted))


@dataclass(frozen=True)
class ExitCalibration:
    """Temperature scaling of one exit: the fitted T and the ECE and NLL before and after
    (each on the logits it was fitted on unless computed otherwise)."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n_bins: int


def calibrate_exits(logits: Sequence[torch.Tensor], labels: torch.Tensor, *,
                    n_bins: int = 15, objective: str = "nll") -> tuple[ExitCalibration, ...]:
    """Fit one temperature per exit (:func:`fit_temperature`) on validation logits.

    Parameters
    ----------
    logits : sequence of torch.Tensor
        The (N, C) logits of each exit on the same N validation samples, as
        :meth:`EarlyExitResNet.forward` returns them.
    labels : torch.Tensor
        (N,) classes.
    n_bins : int
        Of :func:`expected_calibration_error`.
    objective : {"nll", "ece"}
        What each temperature minimises (:func:`fit_temperature`).

    Returns
    -------
    tuple of ExitCalibration
        One per exit; ``tuple(c.temperature for c in result)`` is an
        :class:`ExitRule`'s ``temperatures``.
    """
    out = []
    for z in logits:
        t = fit_temperature(z, labels, objective=objective, n_bins=n_bins)
        z64, y = _check_logits_labels(z, labels)
        out.append(ExitCalibration(
            t, expected_calibration_error(z, labels, 1.0, n_bins),
            expected_calibration_error(z, labels, t, n_bins),
            _nll(z64, y, 1.0), _nll(z64, y, t), n_bins))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Exit decisions from every exit's logits: sweeps, operating points, agreement


def _check_exit_logits(logits) -> list[torch.Tensor]:
    logits = list(logits)
    if not logits:
        raise ValueError("logits is empty; give the (N, C) logits of every exit")
    first = logits[0]
    for k, z in enumerate(logits):
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point or z.ndim != 2 \
                or z.shape[1] < 2 or z.shape[0] == 0 or z.shape != first.shape:
            raise ValueError(f"logits[{k}] must be a non-empty floating-point (N, C) tensor "
                             f"with C >= 2, of the shape of logits[0] {tuple(first.shape)}, "
                             f"got {getattr(z, 'shape', type(z).__name__)}")
        if not bool(torch.isfinite(z).all()):
            # a NaN score never exits: the sample would go on silently, counts and MACs off
            raise ValueError(f"logits[{k}] hold NaN or Inf values")
    return logits


def _first_exit(scores: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """(N,) int64: for every sample, the first exit whose score (``scores``, (E, N)) exceeds
    its threshold, or the last exit."""
    leave = torch.zeros_like(scores, dtype=torch.bool)
    for k, t in enumerate(thresholds):
        leave[k] = scores[k].double() > t  # exactly, as run_early_exit compares
    leave[-1] = True
    return leave.to(torch.int8).argmax(dim=0).to(torch.int64)  # the first True


def exit_result_from_logits(logits: Sequence[torch.Tensor], rule: ExitRule) -> ExitResult:
    """The decisions :func:`run_early_exit` takes, computed from every exit's logits.

    Parameters
    ----------
    logits : sequence of torch.Tensor
        The (N, C) logits of each exit for every sample, first exit first, as
        :meth:`EarlyExitResNet.forward` returns them.
    rule : ExitRule
        Needs ``len(logits) - 1`` thresholds.

    Returns
    -------
    ExitResult
        The same exits, logits, confidences and ``rows_per_stage`` that
        :func:`run_early_exit` returns on a network whose stages produce these logits.

    Notes
    -----
    In evaluation mode a stage computes each sample on its own, so a sample's logits at
    an exit do not depend on which other samples are still in the batch, and deciding
    from logits computed for everyone gives what the runner decides; this lets a sweep of
    thresholds cost one forward pass. Sample ``i`` leaves at the first exit ``k`` whose
    score exceeds ``thresholds[k]``, or at the last.
    """
    logits = _check_exit_logits(logits)
    if rule.num_exits != len(logits):
        raise ValueError(f"the rule has {len(rule.thresholds)} thresholds but the logits "
                         f"have {len(logits) - 1} early exits")
    n = logits[0].shape[0]
    # Compared in the logits' dtype, as the runner compares them.
    scores = torch.stack([exit_confidence(z, rule.policy, rule.temperature(k))
                          for k, z in enumerate(logits)])
    exit_index = _first_exit(scores, rule.thresholds)
    scores = scores.to(torch.float64)
    rows = torch.arange(n, device=exit_index.device)
    out = torch.stack(logits)[exit_index, rows]
    rows_per_stage = tuple(int((exit_index >= k).sum()) for k in range(len(logits)))
    # on the CPU, as the runner's: a result's exits index the CPU's MAC counts
    return ExitResult(out.cpu(), exit_index.cpu(), scores[exit_index, rows].cpu(),
                      rows_per_stage)


@dataclass(frozen=True)
class SweepPoint:
    """One threshold of :func:`threshold_sweep`.

    Attributes
    ----------
    policy : ExitPolicy
    threshold : float
        The threshold of every early exit.
    correct, n : int
        Right top-1 predictions out of ``n`` samples.
    mean_macs : float
        Average MACs per sample.
    macs_fraction : float
        ``mean_macs`` over the plain network's MACs.
    exit_counts : tuple of int
        Samples that left at each exit.
    right : torch.Tensor or None
        (n,) bool: which samples it got right (:func:`threshold_sweep` fills it; the paired
        test of :func:`qualifies` needs it).
    """

    policy: ExitPolicy
    threshold: float
    correct: int
    n: int
    mean_macs: float
    macs_fraction: float
    exit_counts: tuple[int, ...]
    right: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def threshold_sweep(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                    policy: ExitPolicy | str, thresholds: Sequence[float],
                    costs: ExitCosts, temperatures: Sequence[float] | None = None
                    ) -> tuple[SweepPoint, ...]:
    """Accuracy and average MACs of an early-exit network at each of several thresholds.

    Parameters
    ----------
    logits : sequence of torch.Tensor
        Every exit's (N, C) logits on the same samples (:func:`exit_result_from_logits`).
    labels : torch.Tensor
        (N,) integer classes.
    policy : ExitPolicy or str
    thresholds : sequence of float
        Each in [0, 1]; one :class:`ExitRule` per value, the value at every early exit.
    costs : ExitCosts
        Of the network (:func:`exit_costs`); its ``macs`` price each exit.
    temperatures : sequence of float, optional
        One per exit (:func:`calibrate_exits`); default 1.

    Returns
    -------
    tuple of SweepPoint
        In the order of ``thresholds``.

    Notes
    -----
    One threshold for all exits keeps the sweep one-dimensional; with a temperature per
    exit the scores of different exits are calibrated probabilities (max-softmax), so the
    same threshold means about the same expected accuracy of the samples that leave at
    every exit. Threshold 1.0 never exits early and gives the plain network.
    """
    logits = _check_exit_logits(logits)
    if len(costs.macs) != len(logits):
        raise ValueError(f"costs price {len(costs.macs)} exits but the logits have "
                         f"{len(logits)}")
    _, y = _check_logits_labels(logits[-1], labels)
    thresholds = _threshold_list(thresholds, "thresholds")
    temps = None if temperatures is None else tuple(temperatures)
    points = []
    for t in thresholds:
        rule = ExitRule(policy, (t,) * (len(logits) - 1), temps)
        res = exit_result_from_logits(logits, rule)
        mean = res.mean_macs(costs.macs)
        right = res.predictions == y
        points.append(SweepPoint(rule.policy, float(t), int(right.sum()), len(y), mean,
                                 mean / costs.full_macs, res.exit_counts(), right))
    return tuple(points)


@dataclass(frozen=True)
class OperatingPoint:
    """The sweep point :func:`choose_operating_point` chose, and whether it met the rule
    (``met``; when no point did, the most accurate one is returned with ``met=False``).
    ``alpha`` is the level of the paired test that decided ``met``, None when the point
    estimate did (:func:`qualifies`)."""

    point: SweepPoint
    met: bool
    reference_accuracy: float
    margin: float
    alpha: float | None = None


def _reference(reference, n: int | None = None) -> tuple[float, torch.Tensor | None]:
    """``(accuracy, right or None)`` of a reference given as an accuracy or as its (N,)
    per-sample correctness."""
    if isinstance(reference, torch.Tensor) and reference.dim() > 0:
        if reference.dim() != 1 or reference.dtype != torch.bool:
            raise ValueError(f"a reference given per sample must be a 1-D bool tensor (which "
                             f"samples it got right), got {reference.dtype} of shape "
                             f"{tuple(reference.shape)}")
        if n is not None and len(reference) != n:
            raise ValueError(f"the reference scores {len(reference)} samples but the points "
                             f"{n}; give its correctness on the same samples")
        return float(reference.double().mean()), reference.cpu()
    return _check_threshold(reference, "reference"), None


#: Slack of :func:`clears`: far below the 1/N that separates two accuracies of N samples.
CLEARS_SLACK = 1e-12


def clears(accuracy: float, reference: float, margin: float) -> bool:
    """Whether ``accuracy >= reference - margin`` (the estimate rule of :func:`qualifies`),
    with a slack of :data:`CLEARS_SLACK` so that a point exactly at the boundary in exact
    arithmetic qualifies: in floating point ``0.03 >= 0.035 - 0.005`` is False (the right
    side rounds to 0.030000000000000002). Accuracies of N samples differ by at least 1/N,
    so the slack changes no other comparison for any N below 10^12.
    """
    return accuracy >= reference - margin - CLEARS_SLACK


def qualifies(right: torch.Tensor, reference, margin: float,
              alpha: float | None = None) -> bool:
    """Whether a classifier's accuracy is within ``margin`` of a reference's, on the same
    samples.

    Parameters
    ----------
    right : torch.Tensor
        (N,) bool: the samples the candidate (an operating point) got right.
    reference : float or torch.Tensor
        The reference's accuracy on those samples, or its (N,) bool correctness; the
        paired test needs the latter.
    margin : float
        In [0, 1] (a fraction: 0.005 is half a point); in (0, 1] with ``alpha``.
    alpha : float, optional
        None (default): the point estimate decides, ``accuracy >= reference - margin``
        (:func:`clears`).
        A level in (0, 0.5): the candidate qualifies when a paired one-sided test rejects
        ``accuracy <= reference - margin`` at that level (non-inferiority, the lower half
        of :func:`qerror.stats.paired_accuracy_equivalence`'s TOST).

    Returns
    -------
    bool

    Notes
    -----
    Choosing the cheapest point whose *estimate* clears ``reference - margin`` picks, among
    many thresholds, one whose estimate is as low as the rule allows, so its accuracy on
    fresh samples is below its estimate more often than not (the winner's curse). Asking
    instead that the paired test *show* non-inferiority on the selection split keeps a
    margin of about ``z_{1-alpha}`` standard errors of the paired difference between the
    estimate and the boundary, sized by the discordant samples of that very point: a
    point that disagrees with the reference on many samples must be further above the
    boundary than one that rarely does.

    At the same ``margin``, a point the test accepts has its estimate above the boundary
    too whenever ``alpha <= 1 - Phi(sqrt(1.5)) ≈ 0.110`` (the adjusted Wald's pseudo-counts
    shrink the estimate toward zero by at most ``2/(n + 2)``, less than ``z_{1-alpha}``
    standard errors there), for every ``n`` and every count; above that level a point with
    one discordant sample can pass the test and fail the estimate.
    """
    right = torch.as_tensor(right)
    if right.dim() != 1 or right.dtype != torch.bool or len(right) == 0:
        raise ValueError(f"right must be a non-empty 1-D bool tensor, got {right.dtype} of "
                         f"shape {tuple(right.shape)}")
    ref_accuracy, ref_right = _reference(reference, len(right))
    margin = _check_threshold(margin, "margin")
    if alpha is None:
        return clears(float(right.double().mean()), ref_accuracy, margin)
    if ref_right is None:
        raise ValueError("the paired test (alpha given) needs the reference's per-sample "
                         "correctness, not only its accuracy")
    right = right.cpu()
    only_a = int((right & ~ref_right).sum())
    only_b = int((ref_right & ~right).sum())
    test = paired_accuracy_equivalence(only_a, only_b, len(right), margin, alpha)
    return bool(test.p_low < test.alpha)


def selection_order(accuracy: float, mean_macs: float, met: bool) -> tuple:
    """The key by which operating points are chosen, smallest first: points that qualify
    (``met``, :func:`qualifies`) before the others; among those, fewer average MACs, then
    higher accuracy; among the others, higher accuracy, then fewer MACs.

    :func:`choose_operating_point` and :func:`refine_thresholds` order by it; so can a
    caller choosing among their results.
    """
    met = check_flag(met, "met (whether the point qualifies)")
    return (0, mean_macs, -accuracy) if met else (1, -accuracy, mean_macs)


def choose_operating_point(points: Sequence[SweepPoint], reference, margin: float, *,
                           alpha: float | None = None) -> OperatingPoint:
    """The cheapest sweep point whose accuracy is within ``margin`` of a reference.

    Parameters
    ----------
    points : sequence of SweepPoint
        A sweep on the validation split (never the split reported on).
    reference : float or torch.Tensor
        The reference (the FP32 full network) on the same samples: its accuracy, or its
        (N,) bool per-sample correctness (needed with ``alpha``).
    margin : float
        In [0, 1]: how far below the reference a point may be (:func:`qualifies`).
    alpha : float, optional
        None: a point qualifies when its accuracy is at least ``reference - margin``; a
        level: when a paired non-inferiority test at that level shows it
        (:func:`qualifies`; each point must carry ``right``, as :func:`threshold_sweep`'s
        do).

    Returns
    -------
    OperatingPoint
        The first point by :func:`selection_order`, ties to the higher threshold: among
        the qualifying points, the one with the fewest average MACs, ties to the more
        accurate. When none qualifies, the most accurate point (ties to fewer MACs), with
        ``met=False``.
    """
    points = list(points)
    if not points:
        raise ValueError("points is empty; sweep at least one threshold")
    ref_accuracy, _ = _reference(reference, points[0].n)
    margin = _check_threshold(margin, "margin")

    def met(p: SweepPoint) -> bool:
        if alpha is None:
            return clears(p.accuracy, ref_accuracy, margin)
        if p.right is None:
            raise ValueError("the paired test (alpha given) needs each point's per-sample "
                             "correctness (SweepPoint.right, as threshold_sweep returns)")
        return qualifies(p.right, reference, margin, alpha)

    keyed = [(selection_order(p.accuracy, p.mean_macs, met(p)), -p.threshold, i)
             for i, p in enumerate(points)]
    key = min(keyed)
    best = points[key[2]]
    return OperatingPoint(best, key[0][0] == 0, ref_accuracy, margin, alpha)


@dataclass(frozen=True)
class RefinedRule:
    """The per-exit thresholds :func:`refine_thresholds` chose, and what they give on the
    samples they were chosen on.

    Attributes
    ----------
    rule : ExitRule
        One threshold per early exit.
    correct, n : int
    mean_macs, macs_fraction : float
    exit_counts : tuple of int
    met : bool
        Whether it qualifies (:func:`qualifies`, with the reference, margin and alpha given).
    rounds : int
        Passes over the exits until one changed nothing.
    """

    rule: ExitRule
    correct: int
    n: int
    mean_macs: float
    macs_fraction: float
    exit_counts: tuple[int, ...]
    met: bool
    rounds: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def refine_thresholds(logits: Sequence[torch.Tensor], labels: torch.Tensor, start: ExitRule,
                      candidates: Sequence[float], costs: ExitCosts,
                      reference, margin: float, *, alpha: float | None = None,
                      max_rounds: int = 50) -> RefinedRule:
    """A threshold per early exit, by coordinate descent from ``start`` on the same rule.

    Parameters
    ----------
    logits, labels
        Every exit's (N, C) logits and the (N,) classes of a validation split (never the
        split reported on), as for :func:`threshold_sweep`.
    start : ExitRule
        Policy, temperatures and the thresholds to start from (the shared-threshold
        operating point of :func:`choose_operating_point`).
    candidates : sequence of float
        The thresholds each exit may take, each in [0, 1].
    costs : ExitCosts
    reference, margin, alpha
        As for :func:`choose_operating_point`: when a rule qualifies (:func:`qualifies`).
    max_rounds : int
        Upper bound on the passes over the exits (each pass that changes something strictly
        improves the order below, so the search ends before it on any real input).

    Returns
    -------
    RefinedRule

    Notes
    -----
    Rules are ordered by :func:`selection_order`, as :func:`choose_operating_point` orders
    sweep points. Each round visits the early exits first to last and moves exit ``k`` to the
    candidate (others held) that is strictly first in that order, the higher threshold on a
    tie, keeping its threshold when none is strictly better; so the result is never worse
    than ``start``. Scores are computed once, in the logits' dtype, as
    :func:`exit_result_from_logits` computes them, and the decisions are those it takes.
    A shared threshold treats the exits alike; per-exit thresholds can trade an early exit
    that is cheap but unreliable against a later one, at the price of being fitted to the
    validation split more closely (report them on the test split).
    """
    logits = _check_exit_logits(logits)
    if start.num_exits != len(logits):
        raise ValueError(f"start has {len(start.thresholds)} thresholds but the logits have "
                         f"{len(logits) - 1} early exits")
    if len(costs.macs) != len(logits):
        raise ValueError(f"costs price {len(costs.macs)} exits but the logits have "
                         f"{len(logits)}")
    _, y = _check_logits_labels(logits[-1], labels)
    cands = sorted(set(_threshold_list(candidates, "candidates")), reverse=True)
    _reference(reference, len(y))
    margin = _check_threshold(margin, "margin")
    max_rounds = check_count(max_rounds, "max_rounds", 1)
    # The decisions of exit_result_from_logits, from scores computed once.
    scores = torch.stack([exit_confidence(z, start.policy, start.temperature(k))
                          for k, z in enumerate(logits)]).cpu()  # on the logits' device
    right = torch.stack([z.argmax(1).cpu() == y for z in logits])          # (E, N)
    macs = torch.as_tensor(list(costs.macs), dtype=torch.float64)
    n, last = len(y), len(logits) - 1
    rows = torch.arange(n)

    def evaluate(thresholds):
        exit_index = _first_exit(scores, thresholds)
        got = right[exit_index, rows]
        correct = int(got.sum())
        mean = float(macs[exit_index].mean())  # as ExitResult.mean_macs
        met = qualifies(got, reference, margin, alpha)
        return (selection_order(correct / n, mean, met), correct, mean, exit_index)

    current = list(start.thresholds)
    best = evaluate(current)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for k in range(last):
            for t in cands:
                if t == current[k]:
                    continue
                trial = current.copy()
                trial[k] = t
                result = evaluate(trial)
                if result[0] < best[0]:
                    best, current, changed = result, trial, True
        if not changed:
            break
    order, correct, mean, exit_index = best
    counts = tuple(int(c) for c in torch.bincount(exit_index, minlength=len(logits)))
    rule = ExitRule(start.policy, tuple(current), start.temperatures)
    return RefinedRule(rule, correct, n, mean, mean / costs.full_macs, counts,
                       order[0] == 0, rounds)


@dataclass(frozen=True)
class SelectionProcedure:
    """A way to choose an exit rule on a selection split (:func:`select_rule`).

    Attributes
    ----------
    policy : ExitPolicy
    per_exit : bool
        False: one threshold shared by the early exits (:func:`choose_operating_point`);
        True: one per exit, refined from the shared one (:func:`refine_thresholds`).
    margin : float
        In [0, 1]: how far below the reference a rule may be and still qualify
        (:func:`qualifies`).
    """

    policy: ExitPolicy
    per_exit: bool
    margin: float

    def __post_init__(self):
        object.__setattr__(self, "policy", ExitPolicy.parse(self.policy))
        object.__setattr__(self, "per_exit", check_flag(self.per_exit, "per_exit"))
        object.__setattr__(self, "margin", _check_threshold(self.margin, "margin"))

    @property
    def label(self) -> str:
        """The policy, and "per exit" when the thresholds are per exit."""
        return f"{self.policy.value} per exit" if self.per_exit else self.policy.value


def select_rule(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                procedure: SelectionProcedure, candidates: Sequence[float], costs: ExitCosts,
                reference, *, temperatures: Sequence[float] | None = None,
                alpha: float | None = None) -> RefinedRule:
    """The rule ``procedure`` chooses on these samples, and what it gives on them.

    A shared threshold is the one :func:`choose_operating_point` picks from a
    :func:`threshold_sweep` over ``candidates``; per-exit thresholds are then refined from
    it by :func:`refine_thresholds` over the same candidates. ``reference`` and ``alpha``
    are as for :func:`choose_operating_point`, ``procedure.margin`` its margin. A shared
    threshold's :class:`RefinedRule` has ``rounds = 0``.
    """
    if not isinstance(procedure, SelectionProcedure):
        raise TypeError(f"procedure must be a SelectionProcedure, got "
                        f"{type(procedure).__name__}")
    logits = _check_exit_logits(logits)
    temps = None if temperatures is None else tuple(temperatures)
    sweep = threshold_sweep(logits, labels, procedure.policy, candidates, costs, temps)
    op = choose_operating_point(sweep, reference, procedure.margin, alpha=alpha)
    rule = ExitRule(procedure.policy, (op.point.threshold,) * (len(logits) - 1), temps)
    if procedure.per_exit:
        return refine_thresholds(logits, labels, rule, candidates, costs, reference,
                                 procedure.margin, alpha=alpha)
    p = op.point
    return RefinedRule(rule, p.correct, p.n, p.mean_macs, p.macs_fraction, p.exit_counts,
                       op.met, 0)


@dataclass(frozen=True)
class CrossValidated:
    """A selection procedure scored out of fold (:func:`cross_validate_selection`).

    Attributes
    ----------
    procedure : SelectionProcedure
    right : torch.Tensor
        (N,) bool: each sample scored by the rule the procedure chose on the other folds.
    mean_macs, macs_fraction : float
        Average MACs of those rules on the samples they did not see (and over the plain
        network's MACs).
    met : bool
        Whether ``right`` qualifies against the reference (:func:`qualifies` at
        ``qualifying_margin`` and the level :func:`cross_validate_selection` was given).
    qualifying_margin : float
        The margin it qualified by: the one given, or, planned for a split of ``plan_n``
        images, that margin less ``z_{1-alpha}`` standard errors of the paired difference
        this procedure's out-of-fold discordance predicts there (with a level, 0 or
        less: it cannot qualify, the paired test needs a positive margin).
    """

    procedure: SelectionProcedure
    right: torch.Tensor = field(repr=False, compare=False)
    mean_macs: float
    macs_fraction: float
    met: bool
    qualifying_margin: float

    @property
    def accuracy(self) -> float:
        return float(self.right.double().mean())


def cross_validate_selection(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                             procedures: Sequence[SelectionProcedure],
                             candidates: Sequence[float], costs: ExitCosts,
                             reference: torch.Tensor, margin: float, *,
                             alpha: float | None = None, folds: int = 5, seed: int = 0,
                             calibration: str | None = "nll",
                             plan_n: int | None = None) -> tuple[CrossValidated, ...]:
    """How each selection procedure does on samples it did not choose on, by K-fold
    cross-validation of one selection split.

    Parameters
    ----------
    logits, labels
        Every exit's (N, C) logits and the (N,) classes of the selection (validation)
        split.
    procedures : sequence of SelectionProcedure
    candidates : sequence of float
        The thresholds every procedure chooses from.
    costs : ExitCosts
    reference : torch.Tensor
        (N,) bool: which samples the reference (FP32 full) got right; each fold's rules are
        chosen against its share.
    margin, alpha
        How the pooled out-of-fold correctness qualifies against the reference
        (:func:`qualifies`: ``margin`` in (0, 1] with ``alpha``, in [0, 1] without);
        ``alpha`` is also the level of each procedure's own test.
    folds : int
        K, at least 2 and at most N.
    seed : int
        From 0 to 2**64 - 1 (Python's or numpy's int): of the random assignment of samples
        to folds (equal sizes within one sample).
    calibration : {"nll", "ece"} or None
        The objective of a temperature per exit fitted afresh on each fold's training part
        (:func:`calibrate_exits`), as the rules use temperatures fitted on the whole split;
        None: no temperatures.
    plan_n : int, optional
        The images of the split the chosen rule will be reported on by an equivalence test
        (TOST) at ``margin`` and ``alpha`` (which it then needs). A procedure then qualifies
        only when the pooled out-of-fold test shows its accuracy above the reference's minus
        ``margin - z_{1-alpha} se``, with ``se`` the standard error of the paired difference
        on ``plan_n`` images that its out-of-fold discordance predicts (Bonett and Price's
        adjusted proportions, as :func:`qerror.stats.paired_accuracy_equivalence`).

    Returns
    -------
    tuple of CrossValidated
        One per procedure, in order. Choose among them with :func:`selection_order`
        (``accuracy``, ``mean_macs``, ``met``; ties to the smaller margin, the more
        cautious), then run the chosen procedure on the whole split (:func:`select_rule`).

    Notes
    -----
    A rule chosen as the cheapest of many that qualify on a split is judged on that split
    by the very samples that made it win, so on fresh samples it is less accurate than it
    was there (the winner's curse): the more thresholds a procedure may tune (one per exit
    rather than one shared) and the nearer to the boundary it may go (a wider margin), the
    larger the fall. Scoring every sample with a rule chosen without it measures each
    procedure's fall instead of assuming it; asking the pooled out-of-fold correctness to
    qualify at the margin that matters lets the data say how much closer to the boundary a
    procedure must aim (its ``margin``) for its choice to hold. Three cautions. The rule
    finally used is chosen on all N samples, K/(K-1) times those each fold's rules saw;
    where more samples make a learner better that makes the estimate pessimistic (Hastie,
    Tibshirani and Friedman, *The Elements of Statistical Learning*, 2nd ed., Sec. 7.10),
    but here more samples make the paired test more powerful, so the rule chosen on all N
    may aim nearer the boundary than the folds' rules did and the out-of-fold estimate can
    flatter it. The pooled correctness comes from K rules, not one, and the paired test
    treats it as one rule's, so its standard error is somewhat too small. And choosing the
    cheapest of several procedures is itself a selection, a smaller one: a few procedures
    instead of every threshold.

    Qualifying at the equivalence margin itself asks too little of a rule that an
    equivalence test will judge: the TOST on ``plan_n`` images passes only when the
    measured difference lies more than ``z_{1-alpha} se`` inside the margin, so a rule
    whose true difference sits just inside it fails about half the time or more. With
    ``plan_n`` a procedure qualifies when the selection split shows, at level ``alpha``,
    its true difference to lie beyond ``-(margin - z_{1-alpha} se)``, where that test
    passes about half the time: a little less, since both of its one-sided tests must
    pass and the counts are discrete (0.4995 at a discordance of 1 % on 10,000 images,
    0.455 at 4 %, computed exactly over the trinomial counts).
    """
    logits = _check_exit_logits(logits)
    _, y = _check_logits_labels(logits[-1], labels)
    n = len(y)
    _, ref_right = _reference(reference, n)
    if ref_right is None:
        raise ValueError("cross-validation needs the reference's per-sample correctness (an "
                         "(N,) bool tensor), to choose each fold's rules against its share")
    if check_count(folds, "folds", 2) > n:
        raise ValueError(f"folds must be an int from 2 to the {n} samples, got {folds!r}")
    procedures = list(procedures)
    if not procedures or not all(isinstance(p, SelectionProcedure) for p in procedures):
        raise ValueError("procedures must be a non-empty sequence of SelectionProcedure")
    if len(costs.macs) != len(logits):
        raise ValueError(f"costs price {len(costs.macs)} exits but the logits have "
                         f"{len(logits)}")
    if calibration is not None and calibration not in CALIBRATION_OBJECTIVES:
        raise ValueError(f"calibration must be one of {CALIBRATION_OBJECTIVES} or None, got "
                         f"{calibration!r}")
    margin = _check_threshold(margin, "margin")
    if alpha is not None and margin == 0:
        # every procedure would be 'not met' whatever the data, after running every fold
        raise ValueError("margin must be above 0 with alpha (the paired non-inferiority test "
                         "needs a positive margin, as qualifies says); give a margin in "
                         "(0, 1], or alpha=None for the estimate rule, which takes 0")
    if plan_n is not None:
        plan_n = check_count(plan_n, "plan_n (the images of the split the rule will be "
                                     "reported on)", 1)
        if alpha is None:
            raise ValueError("plan_n plans for an equivalence test at level alpha; give alpha")
    # an int: int() of 0.5 or True would seed 0 or 1 and give their folds without a word
    gen = torch.Generator().manual_seed(check_seed(seed, "seed"))
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=gen)] = torch.arange(n) % folds
    logits = [z.cpu() for z in logits]
    right = torch.zeros(len(procedures), n, dtype=torch.bool)
    macs = torch.zeros(len(procedures), n, dtype=torch.float64)
    prices = torch.as_tensor(list(costs.macs), dtype=torch.float64)
    for f in range(folds):
        held = (fold_of == f).nonzero().squeeze(1)
        seen = (fold_of != f).nonzero().squeeze(1)
        part = [z[seen] for z in logits]
        temps = None if calibration is None else tuple(
            c.temperature for c in calibrate_exits(part, y[seen], objective=calibration))
        for i, proc in enumerate(procedures):
            chosen = select_rule(part, y[seen], proc, candidates, costs, ref_right[seen],
                                 temperatures=temps, alpha=alpha)
            res = exit_result_from_logits([z[held] for z in logits], chosen.rule)
            right[i, held] = res.predictions == y[held]
            macs[i, held] = prices[res.exit_index]
    out = []
    for i, proc in enumerate(procedures):
        mean = float(macs[i].mean())
        bar = margin
        if plan_n is not None:
            # the spread per image of the TOST's adjusted Wald statistic, on plan_n images
            spread = paired_accuracy_equivalence(
                int((right[i] & ~ref_right).sum()), int((ref_right & ~right[i]).sum()), n,
                margin, alpha).std
            bar = margin - NormalDist().inv_cdf(1 - alpha) * spread / math.sqrt(plan_n + 2)
        # the paired test needs a positive margin; the estimate rule also takes 0
        met = (bar > 0 if alpha is not None else bar >= 0) and qualifies(
            right[i], ref_right, min(bar, 1.0), alpha)
        out.append(CrossValidated(proc, right[i], mean, mean / costs.full_macs, met, bar))
    return tuple(out)


def exits_per_class(result: ExitResult, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(num_classes, num_exits) counts: samples of each true class that left at each exit."""
    num_classes = check_count(num_classes, "num_classes", 1)
    labels = check_labels(torch.as_tensor(labels), num_classes, len(result.exit_index))
    e = len(result.rows_per_stage)
    flat = torch.bincount(labels * e + result.exit_index, minlength=num_classes * e)
    return flat.reshape(num_classes, e).numpy().astype(np.int64)


@dataclass(frozen=True)
class ExitAgreement:
    """How two early-exit runs on the same samples agree (:func:`compare_exits`).

    Attributes
    ----------
    n : int
    same_exit, same_prediction, same_both : int
        Samples that left at the same exit, got the same top-1 class, and both.
    earlier, later : int
        Samples that left ``b`` at an earlier, later exit than ``a``.
    exit_matrix : numpy.ndarray
        (E, E) counts, row: the exit under ``a``, column: under ``b``.
    """

    n: int
    same_exit: int
    same_prediction: int
    same_both: int
    earlier: int
    later: int
    exit_matrix: np.ndarray


def compare_exits(a: ExitResult, b: ExitResult) -> ExitAgreement:
    """Agreement of two early-exit runs on the same samples (e.g. simulated against real
    INT8, or INT8 against FP32): exits, predictions, and which way the exits moved."""
    if a.exit_index.shape != b.exit_index.shape or \
            len(a.rows_per_stage) != len(b.rows_per_stage):
        raise ValueError("a and b must be runs of networks with the same exits on the same "
                         "samples")
    e = len(a.rows_per_stage)
    ea, eb = a.exit_index, b.exit_index
    same_pred = a.predictions == b.predictions
    matrix = torch.bincount(ea * e + eb, minlength=e * e).reshape(e, e).numpy()
    return ExitAgreement(int(ea.numel()), int((ea == eb).sum()), int(same_pred.sum()),
                         int(((ea == eb) & same_pred).sum()), int((eb < ea).sum()),
                         int((eb > ea).sum()), matrix.astype(np.int64))
