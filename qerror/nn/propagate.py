"""Quantization error travelling through a CNN: the float and the quantized network side by side.

The instrumented model runs a *paired batch*: the float images and a copy of them are
stacked along the batch axis, and every convolution and linear layer computes the first
half with its float weights and input and the second half with fake-quantized weights and a
fake-quantized input. Every other module of a torchvision-style CNN in evaluation mode
(BatchNorm with running statistics, ReLU, pooling, residual additions, flattening) treats
samples independently, so the two halves never mix and each tensor inside the network holds
the float activation and its quantized counterpart at once. Accumulated error, drift, SQNR,
saturation and BatchNorm inconsistency are then reductions of the two halves, streamed
batch by batch; nothing is kept per image. Each layer's output is reduced as it is made:
for float32 maps on the CPU, one compiled pass over the quantized and the float output gives
every (image, channel)'s sums of the error, of its square and of both outputs and their
squares (:mod:`qerror.nn._moments`; other tensors take torch's reductions). A batch of more
than 32 images is measured in two paired passes of half its images (``pair_batch``,
:func:`default_pair_batch`), so each pass holds as many images as the batch's float forward
(its peak memory against the float forward's is measured by ``python -m studies.bench
--only drift``, and the README's bench records state it).

:func:`measure_many` extends the pair to a *K-way batch*: the float chunk and one chunk per
configuration (say every rounding mode of a bit width), so one float pass serves them all
and each configuration's figures are those :func:`measure` gives it alone.

Sites (the quantities as the README's Conventions define them):

* every ``Conv2d`` and ``Linear``: the quantizer at its input (per tensor, affine by default),
  its weights (per channel), the *local* error (quantized layer minus float layer, both fed
  the float input; measured on the first ``local_samples`` images of each batch) and the
  *accumulated* error at its output;
* every ``BatchNorm2d``: the batch statistics of its input under both paths against the
  running statistics it normalises with (when a layer feeds it directly, the layer's
  output sums serve; any module run in between, such as an in-place ReLU, or the return of
  a module that called the layer, such as a pre-activation block that adds its shortcut in
  place to its last convolution's output, makes it reduce its own input; a functional
  in-place operation between the two within one module's ``forward`` is not seen). Its
  site holds these statistics only, no error figures: the error after it is the next
  layer's input error or its block's output error;
* every residual block (a module with BatchNorm children and a ``downsample`` attribute or
  named ``*Block``/``Bottleneck``): the accumulated error at its output;
* the logits: accuracy of both paths, agreement, McNemar counts, SQNR.

Hooks and patched ``forward`` attributes are removed in ``finally`` blocks, so a failing
forward pass leaves the model as it was; a module that already replaces its ``forward``
(another measurement still open on the model) is refused before anything is patched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from qerror._checks import check_count, check_finite, check_flag, check_labels, check_seed
from qerror._enums import Choice
from qerror._progress import progress_bar
from qerror.calibration import RangePolicy, calibrate
from qerror.nn import parallel
from qerror.nn._anatomy import (
    LAYERS,
    RangeObserver,
    UnsupportedModelError,
    check_model,
    eval_mode,
    is_block,
    iter_batches,
    model_device,
    own_forwards,
    path_depths,
)
from qerror.nn._moments import (
    channel_sums,
    difference_sums,
    network_roundoff,
    resolved_variance,
    unit_roundoff,
)
from qerror.nn.bn import BNInconsistency
from qerror.nn.growth import debiased_rms
from qerror.quantizer import PreparedQuantizer, QParams, QuantSpec, fake_quantize
from qerror.rounding import RoundingMode

__all__ = [
    "LogitResult",
    "PropagationResult",
    "QuantConfig",
    "QuantizedWeights",
    "SiteResult",
    "Target",
    "agreement_terms",
    "calibrate_activations",
    "check_drawn_batches",
    "default_pair_batch",
    "drawn_batches",
    "local_error_means",
    "measure",
    "measure_many",
    "output_key",
    "paired_forward",
    "paired_forward_many",
    "quantize_weights",
    "quantized_forward",
    "sqnr_db",
]


class Target(Choice):
    """What is quantized: weights only, activations only, or both."""

    WEIGHTS = "weights"
    ACTIVATIONS = "activations"
    BOTH = "both"


def _weight_spec(bits: int, rounding: RoundingMode) -> QuantSpec:
    return QuantSpec(bits=bits, signed=True, symmetric=True, axis=0, rounding=rounding)


def _activation_spec(bits: int, rounding: RoundingMode) -> QuantSpec:
    return QuantSpec(bits=bits, signed=False, symmetric=False, rounding=rounding)


@dataclass(frozen=True)
class QuantConfig:
    """How the quantized path quantizes.

    Parameters
    ----------
    weight : QuantSpec or None
        Spec for every conv/linear weight (``axis=0`` for per output channel, ``None``
        for per tensor); ``None`` keeps float weights.
    activation : QuantSpec or None
        Per-tensor spec for the input of every conv/linear; ``None`` keeps float inputs.
    seed : int
        Key of stochastic rounding, from 0 to 2**64 - 1 (each layer and batch draws from its
        own stream).
    activation_range : RangePolicy
        How :func:`calibrate_activations` finds the activation ranges for this config
        (min-max by default).
    bn_outputs, block_outputs : bool
        Also quantize, with the activation spec, the output of every BatchNorm and of every
        residual block (the ReLU'd sum), as engines that keep those tensors in INT8 do. Their
        qparams come from :func:`calibrate_activations` with ``outputs=True``.

    Notes
    -----
    The default :meth:`make` uses what INT8 engines use: symmetric signed per-channel
    weights (scale ``max|w|/qmax``) and affine unsigned per-tensor activations.
    """

    weight: QuantSpec | None
    activation: QuantSpec | None
    seed: int = 0
    bn_outputs: bool = False
    block_outputs: bool = False
    activation_range: RangePolicy = RangePolicy()

    def __post_init__(self):
        # torch.manual_seed would take True as 1 and -1 as 2**64 - 1, SeedSequence True as 1
        object.__setattr__(self, "seed", check_seed(self.seed, "QuantConfig.seed"))
        # read by truth value, 'False' would quantize every output it names
        for name in ("bn_outputs", "block_outputs"):
            object.__setattr__(self, name, check_flag(getattr(self, name), f"QuantConfig.{name}"))
        if self.weight is None and self.activation is None:
            raise ValueError("QuantConfig quantizes nothing: give a weight or an activation spec")
        if (self.bn_outputs or self.block_outputs) and self.activation is None:
            raise ValueError("bn_outputs and block_outputs quantize activations: give an "
                             "activation spec")
        for name in ("weight", "activation"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(f"{name} must be a QuantSpec or None, got {type(spec).__name__}")
        if self.activation is not None and self.activation.axis is not None:
            raise ValueError("activation quantization is per tensor: set activation.axis=None")
        if self.weight is not None and self.weight.axis not in (None, 0):
            raise ValueError(f"weight.axis must be 0 (per output channel) or None, got "
                             f"{self.weight.axis}")
        if not isinstance(self.activation_range, RangePolicy):
            raise TypeError(f"activation_range must be a RangePolicy, got "
                            f"{type(self.activation_range).__name__}")
        if self.activation is not None:
            self.activation_range.check(self.activation)

    @classmethod
    def make(cls, bits: int = 8, rounding: RoundingMode | str = RoundingMode.NEAREST_EVEN,
             target: Target | str = Target.BOTH, *,
             activation_range: RangePolicy = RangePolicy(),
             seed: int = 0, bn_outputs: bool = False,
             block_outputs: bool = False) -> QuantConfig:
        """The usual configuration: ``bits`` and ``rounding`` for weights and/or activations."""
        rounding = RoundingMode.parse(rounding)
        target = Target.parse(target)
        w = _weight_spec(bits, rounding) if target is not Target.ACTIVATIONS else None
        a = _activation_spec(bits, rounding) if target is not Target.WEIGHTS else None
        return cls(w, a, seed, bn_outputs, block_outputs, activation_range)

    @property
    def rounding(self) -> RoundingMode:
        spec = self.weight or self.activation
        return spec.rounding

    @property
    def target(self) -> Target:
        if self.weight is None:
            return Target.ACTIVATIONS
        return Target.WEIGHTS if self.activation is None else Target.BOTH

    @property
    def label(self) -> str:
        bits = {s.bits for s in (self.weight, self.activation) if s is not None}
        modes = {s.rounding.value for s in (self.weight, self.activation) if s is not None}
        extra = "".join(t for t, on in (("+bn", self.bn_outputs), ("+blocks", self.block_outputs))
                        if on)
        return (f"{'/'.join(sorted(modes))}-{'/'.join(map(str, sorted(bits)))}b-"
                f"{self.target.value}{extra}")


def check_config(config, what: str = "config") -> QuantConfig:
    """``config``, refused with a TypeError naming ``what`` unless it is a
    :class:`QuantConfig`: None, a bit count or a list passed in its place would fail later,
    in words about iterables or missing attributes."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"{what} must be a QuantConfig (qerror.nn.QuantConfig.make), got "
                        f"{type(config).__name__}")
    return config


# --------------------------------------------------------------------------- calibration

OUTPUT_SUFFIX = ".output"


def output_key(name: str) -> str:
    """Key of a BatchNorm's or block's output quantizer in the activation qparams."""
    return name + OUTPUT_SUFFIX


def _key_words(key: str, layer: str) -> str:
    """A quantizer's key in a message: "the output of 'name'" for an output's
    (:func:`output_key`), else ``layer`` (how the message calls a layer's) and the name."""
    if key.endswith(OUTPUT_SUFFIX):
        return f"the output of {key[:-len(OUTPUT_SUFFIX)]!r}"
    return f"{layer} {key!r}"


class MadeFor(dict):
    """Per-layer quantization parameters (a dict: layer name → :class:`QParams` from
    :func:`calibrate_activations`, → :class:`QuantizedWeights` from :func:`quantize_weights`)
    and the :class:`QuantSpec` they were made for (``spec``).

    A scale is a range divided by a grid's steps, so ranges made for one grid quantize
    wrongly on another, silently: 8-bit ranges on a 4-bit grid after a ReLU (zero point 0,
    valid on both) clamp every activation above 15 of the 8-bit steps, about 6 % of the
    range. And weights quantized with one rounding, given to a configuration of another,
    measure the one under the other's name. A pass refuses activation ranges made for
    another grid (bits, signedness, symmetry, narrow range: the rounding does not enter a
    range, and one calibration serves every mode of a width) and weights made by another
    quantizer (any field of the spec) (:func:`check_made_for`); a plain dict (learned
    weights, ranges of the user's) is taken as it is.

    Quantized weights also say which float weights they were made from (``made_from``: layer
    name → :func:`~qerror.nn.parallel.digest` of its weight; None for activation ranges):
    weights of another model of the same shapes, given to a pass, would be measured against
    this model's float network, and the pass refuses them (:func:`check_weights_fit`).
    """

    def __init__(self, items, spec: QuantSpec, made_from: Mapping[str, str] | None = None):
        super().__init__(items)
        self.spec = spec
        self.made_from = made_from

    def __reduce__(self):  # pickled (broadcast to other ranks) with its spec and sources
        return (type(self), (dict(self), self.spec, self.made_from))


#: The fields of a QuantSpec that activation ranges depend on (:func:`check_made_for`).
GRID_FIELDS = ("bits", "signed", "symmetric", "narrow")


def check_made_for(params, spec: QuantSpec | None, what: str, where: str = "") -> None:
    """Refuse ``params`` (a :class:`MadeFor`) made for another quantizer than ``spec``.

    ``what`` is "activation ranges" (compared on :data:`GRID_FIELDS`) or "quantized weights"
    (every field); ``where`` names the configuration. A mapping that does not say what it
    was made for passes, as does any where ``spec`` is None (nothing quantized).

    Raises
    ------
    ValueError
        They differ: the message names the fields and how to make the right ones.
    """
    made = getattr(params, "spec", None)
    if made is None or spec is None:
        return
    weights = what == "quantized weights"
    fields = [f.name for f in dataclasses.fields(QuantSpec)] if weights else GRID_FIELDS

    def word(v):
        return getattr(v, "value", v)

    differ = [f"{f} {word(getattr(made, f))}, not {word(getattr(spec, f))}" for f in fields
              if getattr(made, f) != getattr(spec, f)]
    if differ:
        how = ("quantize_weights(model, config.weight)" if weights else
               "calibrate_activations(model, batches, config.activation)")
        harm = ("the pass would measure them under its name" if weights
                else "their scales would be wrong")
        raise ValueError(f"{what} were made for another quantizer than the configuration"
                         f"{where} quantizes with ({'; '.join(differ)}): {harm}; make them "
                         f"for it with {how}")


def check_weights_fit(model: nn.Module, weights, where: str = "", *,
                      digests: dict[str, str] | None = None) -> None:
    """Refuse quantized weights (layer name → :class:`QuantizedWeights`) that are not the
    model's layers': one whose weight's shape is not its layer's (a convolution would run
    another network, or fail in torch), or, for what :func:`quantize_weights` returns
    (:class:`MadeFor`), one made from other float weights than its layer holds (another
    model's, or this one's before they changed), which the pass would measure against this
    model's float network. ``where`` names the configuration. A plain mapping is checked for
    shapes only: learned weights, or another model's weights measured on purpose.
    ``digests`` (layer name → digest of its weight now), filled as the layers are read,
    lets the configurations of one pass share them: the digests of ResNet50's weights take
    about 0.1 s.

    Raises
    ------
    ValueError
        The first layer whose weight does not fit, and how to make the right ones.
    """
    if not isinstance(weights, Mapping):
        return
    layers = dict(model.named_modules())
    made_from = getattr(weights, "made_from", None) or {}
    digests = {} if digests is None else digests
    for name, qw in weights.items():
        layer = layers.get(name)
        w = getattr(layer, "weight", None)
        if not isinstance(qw, QuantizedWeights) or not isinstance(w, torch.Tensor):
            continue
        if tuple(qw.weight.shape) != tuple(w.shape):
            raise ValueError(
                f"the quantized weight of layer {name!r}{where} has shape "
                f"{tuple(qw.weight.shape)}; the layer's weight has {tuple(w.shape)}: they were "
                "made for another model; make them for this one with "
                "quantize_weights(model, config.weight)")
        source = made_from.get(name)
        if source is None:
            continue
        if name not in digests:
            digests[name] = parallel.digest(w.detach())
        if source != digests[name]:
            raise ValueError(
                f"the quantized weights of layer {name!r}{where} were made from other float "
                "weights than the layer holds (another model's, or this model's before they "
                "changed): the pass would measure them against this model's float network; "
                "make them for this model with quantize_weights(model, config.weight) (or, to "
                "measure another model's weights on purpose, pass them as a plain dict)")


def check_layer_params(config: QuantConfig, names: Iterable[str], act_qparams, weights,
                       where: str = "") -> None:
    """Refuse quantizing the layers ``names`` under ``config`` without a layer's activation
    ranges (``act_qparams``, where it quantizes activations) or its quantized weight
    (``weights``, where it quantizes weights); ``where`` names the configuration.

    Raises
    ------
    ValueError
        The first layer without them, and how to make them.
    """
    for n in names:
        if config.activation is not None and (not isinstance(act_qparams, Mapping)
                                              or n not in act_qparams):
            raise ValueError(f"no activation qparams for layer {n!r}{where}; calibrate with "
                             "qerror.nn.propagate.calibrate_activations on the same model")
        if config.weight is not None and (not isinstance(weights, Mapping) or n not in weights):
            raise ValueError(f"no quantized weight for layer {n!r}{where}; use "
                             "qerror.nn.propagate.quantize_weights on the same model")


def calibrate_activations(model: nn.Module, batches: Iterable, spec: QuantSpec,
                          policy: RangePolicy = RangePolicy(), *, outputs: bool = False,
                          sample_per_batch: int = 1 << 15, seed: int = 0,
                          progress: bool = False) -> MadeFor:
    """Per-tensor scale and zero point for the input of every conv/linear layer.

    With ``outputs=True`` also for the output of every BatchNorm and residual block, under
    the key :func:`output_key` of its name (for ``QuantConfig.bn_outputs`` and
    ``block_outputs``).

    Ranges come from the float model's activations on ``batches`` (the calibration split;
    never the test split). ``policy`` chooses the range (a config's ``activation_range``):
    MINMAX uses the exact extremes over all batches; PERCENTILE and MSE use :func:`qerror.calibrate` on a uniform random sample of at most
    ``sample_per_batch`` elements of each batch, plus the extremes.

    Returns
    -------
    MadeFor
        Layer name → :class:`QParams`, with ``spec`` (a pass on another grid refuses them).
    """
    check_model(model)
    if spec.axis is not None:
        raise ValueError("activation calibration is per tensor: use a spec with axis=None")
    sample_per_batch = check_count(sample_per_batch, "sample_per_batch", 1)
    seed = check_seed(seed, "seed")
    outputs, progress = check_flag(outputs, "outputs"), check_flag(progress, "progress")
    names = {m: n for n, m in model.named_modules() if isinstance(m, LAYERS)}
    out_names = {m: output_key(n) for n, m in model.named_modules()
                 if outputs and (isinstance(m, nn.BatchNorm2d) or is_block(m))}
    gen = torch.Generator().manual_seed(seed)
    observers = {n: RangeObserver(spec, policy, gen, sample_per_batch=sample_per_batch)
                 for n in (*names.values(), *out_names.values())}

    def hook(module, args):
        observers[names[module]].add(args[0])

    def out_hook(module, args, out):
        observers[out_names[module]].add(out)

    handles = [m.register_forward_pre_hook(hook) for m in names]
    handles += [m.register_forward_hook(out_hook) for m in out_names]
    seen = 0
    try:
        with eval_mode(model), torch.inference_mode():
            for x, _ in iter_batches(progress_bar(batches, progress, "calibrate"),
                                     model_device(model)):
                model(x)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("calibrate_activations needs at least one batch")
    never = [n for n, obs in observers.items() if obs.batches == 0]
    if never:
        what = _key_words(never[0], "layer")
        raise UnsupportedModelError(
            f"{what} was never called in the forward pass: it has no activations to take a "
            "range from, and a pass that quantizes activations needs one for each; remove the "
            "module the forward pass does not run from the model (an unused head, say), or "
            "quantize weights only (Target.WEIGHTS)")
    return MadeFor({n: obs.qparams() for n, obs in observers.items()}, spec)


@dataclass(frozen=True)
class QuantizedWeights:
    """One layer's fake-quantized weight, its qparams and its error (in LSB)."""

    weight: torch.Tensor
    qparams: QParams
    error_mean_lsb: float
    error_mse_lsb: float
    saturation: float


def quantize_weights(model: nn.Module, spec: QuantSpec, *, seed: int = 0) -> MadeFor:
    """Fake-quantize every conv/linear weight with scales calibrated on the weight itself:
    layer name → :class:`QuantizedWeights`, with ``spec`` and the digest of each float
    weight (:class:`MadeFor`); ``seed`` (an int from 0 to 2**64 - 1) keys stochastic
    rounding. A weight tied between layers (one parameter) is quantized once, at its first
    layer, and every layer that holds it gets that one quantized weight. A weight holding
    NaN or Inf is refused (ValueError naming the layer)."""
    seed = check_seed(seed, "seed")
    out, made_from = {}, {}
    # id of a weight → (the weight, held so that its id is not reused; the layer that
    # quantized it)
    first: dict[int, tuple[torch.Tensor, str]] = {}
    for i, (name, m) in enumerate((n, m) for n, m in model.named_modules()
                                  if isinstance(m, LAYERS)):
        _, tied = first.setdefault(id(m.weight), (m.weight, name))
        if tied != name:
            # stochastic rounding would otherwise draw the one parameter twice: two values
            out[name], made_from[name] = out[tied], made_from[tied]
            continue
        w = m.weight.detach()
        # calibrate's own check would name it "x", as if the images held it
        check_finite(w, f"the weight of layer {name!r}")
        made_from[name] = parallel.digest(w)
        qp = calibrate(w, spec)
        key = int(np.random.SeedSequence([seed, 1, i]).generate_state(1)[0]) \
            if spec.rounding.is_random else None
        wq, sat = fake_quantize(w, spec, qp.scale, qp.zero_point, generator=key,
                                return_saturation=True)
        s = torch.as_tensor(np.asarray(qp.scale), dtype=torch.float64, device=w.device)
        if spec.axis is not None:
            s = s.reshape((-1,) + (1,) * (w.ndim - 1))
        e = (wq.double() - w.double()) / s
        out[name] = QuantizedWeights(wq, qp, float(e.mean()), float((e * e).mean()),
                                     float((sat.low.sum() + sat.high.sum()) / sat.total.sum()))
    return MadeFor(out, spec, made_from)


def _quantizing(weights):
    """What of ``weights`` (layer → :class:`QuantizedWeights`) the quantized network
    computes with, for the ranks to compare: each layer's quantized weight and qparams,
    without what summarises them (the error means, which another thread count or GPU sums
    in another order: their last bits differ between ranks that quantized the same
    weights); anything else as it is."""
    if not isinstance(weights, Mapping):
        return weights
    return {n: (q.weight, q.qparams) if isinstance(q, QuantizedWeights) else q
            for n, q in weights.items()}


def agreement_terms(**arguments) -> list[tuple[str, Any, Any]]:
    """What ranks that make one measurement together compare of the arguments that decide
    their quantized network, for :func:`qerror.nn.parallel.check_agreement`.

    :func:`measure_many` and :func:`qerror.nn.seeds.bn_image_moments` with ``across_ranks``
    send these in the gather they make anyway, so that ranks that would merge the figures
    of different quantized networks all refuse.

    Parameters
    ----------
    **arguments
        By the caller's argument name, in the order to check: the model; a
        :class:`QuantConfig` or a sequence of them; anything else (activation ranges,
        quantized weights, corrections, BatchNorm statistics, None, or a sequence of one per
        configuration).

    Returns
    -------
    list of (name, compared, shown)
        Per argument, in order. A model counts by the digest of its ``state_dict()`` (its
        parameters and persistent buffers, not its non-persistent ones, which a model may
        build lazily: another checkpoint on one rank would otherwise merge its figures with
        the others' without a word); configurations count by value and show their labels;
        anything else counts by its :func:`~qerror.nn.parallel.digest` (shows nothing), of
        :class:`QuantizedWeights` only what the network computes with, each layer's
        quantized weight and qparams: their error summaries are float sums that
        :func:`quantize_weights` adds in an order the thread count or the GPU sets, so
        their last bits may differ between ranks that quantized the same weights.
    """
    terms = []
    for name, value in arguments.items():
        if isinstance(value, nn.Module):
            terms.append((name, parallel.digest(value.state_dict()), None))
        elif isinstance(value, QuantConfig):
            terms.append((name, value, value.label))
        elif isinstance(value, Sequence) and value and \
                all(isinstance(c, QuantConfig) for c in value):
            terms.append((name, list(value), [c.label for c in value]))
        else:
            each = [_quantizing(v) for v in value] if isinstance(value, list) else \
                _quantizing(value)
            terms.append((name, parallel.digest(each), None))
    return terms


def drawn_batches(configs: Sequence[QuantConfig], first_batch: int, batches: int
                  ) -> range | None:
    """The batch indices that a rank's stochastic rounding keys its draws by, for
    :func:`check_drawn_batches`: ``first_batch`` plus each of its ``batches``' positions,
    or None where no configuration rounds activations stochastically (then no draw depends
    on a batch's index)."""
    if any(c.activation is not None and c.activation.rounding.is_random for c in configs):
        return range(first_batch, first_batch + batches)
    return None


def check_drawn_batches(ranges: Sequence[range | None]) -> None:
    """Refuse, with the same ValueError on every rank, ranks whose stochastic rounding
    keyed different images by the same batch index.

    :func:`measure_many` and :func:`qerror.nn.seeds.bn_image_moments` with ``across_ranks``
    send each rank's :func:`drawn_batches` in the gather they make anyway, once the ranks'
    configurations are known to agree (so every rank sends a range or every rank None),
    and every rank calls this with what that gather returned. Each batch's draws depend on
    its index alone, so the ranks' indices need not be contiguous or in rank order, only
    apart; a rank without batches keys nothing.

    Parameters
    ----------
    ranges : sequence of range or None
        Per rank, in rank order, the batch indices it keyed its draws by (None on every
        rank: nothing drawn, nothing to check).

    Raises
    ------
    ValueError
        Two ranks' indices overlap: they drew the same numbers for different images, which
        one process never does. The message gives each rank's indices and how to number
        them.
    """
    if any(r is None for r in ranges):
        return
    spans = sorted((r.start, r.stop) for r in ranges if len(r))
    if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])):
        raise ValueError(
            "the ranks' batch indices overlap (" + ", ".join(
                f"rank {i}: " + (f"{r.start} to {r.stop - 1}" if len(r) else "none")
                for i, r in enumerate(ranges))
            + "): stochastic rounding draws each batch's stream from its index, "
            "first_batch plus its position in the rank's batches, so ranks whose indices "
            "overlap draw the same numbers for different images, which one process never "
            "does; give each rank first_batch = the index of its first batch among all "
            "the ranks' (with qerror.nn.parallel.shard over n batches: shard(n).start)")


def _in_model_layout(model: nn.Module, weights: Mapping[str, QuantizedWeights] | None
                     ) -> Mapping[str, QuantizedWeights] | None:
    """``weights`` with each quantized weight stored as its layer's weight is (channels_last
    under :func:`qerror.nn.models.memory_format`): the same values, and a convolution that
    does not convert its weight on every call."""
    if weights is None:
        return None
    layers = dict(model.named_modules())
    out = dict(weights)
    for name, qw in weights.items():
        w = getattr(layers.get(name), "weight", None)
        if isinstance(w, torch.Tensor) and isinstance(qw, QuantizedWeights) and \
                qw.weight.shape == w.shape and qw.weight.stride() != w.stride():
            out[name] = replace(
                qw, weight=torch.empty_like(w, dtype=qw.weight.dtype).copy_(qw.weight))
    return out


def _arm_weights(model: nn.Module, configs, weights) -> list:
    """Each configuration's quantized weights: those given, or quantized here where it
    quantizes weights and none were given; in the model's layout (:func:`_in_model_layout`).
    Weights given for a configuration that quantizes none are refused: they would not be
    used, and their error would still be reported."""
    digests: dict[str, str] = {}  # of the model's weights, read once for every configuration
    for i, (c, w) in enumerate(zip(configs, weights)):
        if w is not None and c.weight is None:
            raise ValueError(
                f"weights were given for configuration {i} ({c.label}), which quantizes no "
                "weights (activations only): they would not be used; pass None for it")
        check_made_for(w, c.weight, "quantized weights", f" {i} ({c.label})")
        check_weights_fit(model, w, f" (configuration {i}, {c.label})", digests=digests)
    return [_in_model_layout(model, quantize_weights(model, c.weight, seed=c.seed)
                             if w is None and c.weight is not None else w)
            for c, w in zip(configs, weights)]


# --------------------------------------------------------------------------- accumulators

def _channel_dims(t: torch.Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, t.ndim))


def _add_into(total: torch.Tensor | None, part: np.ndarray) -> torch.Tensor:
    """``total + part``: added in place through numpy into ``total`` (a float64 CPU tensor of
    ours), or, where there is none yet, a tensor of its own holding a copy of ``part``."""
    if total is None:
        return torch.from_numpy(part.copy())
    arr = total.numpy()
    np.add(arr, part, out=arr)
    return total


class _Moments:
    """Per-channel Σ and Σ² of a quantity, plus per-image Σ of its mean (for standard errors)."""

    __slots__ = ("img_c1", "img_c2", "img_n", "img_q1", "img_q2", "img_s1", "img_s2", "keep",
                 "kept", "length", "n", "s1", "s2")

    def __init__(self, keep: int = 0):
        self.n = 0
        self.length = 1  # elements per (image, channel): the longest summed
        self.s1 = self.s2 = None
        self.img_n = 0
        self.img_s1 = self.img_s2 = 0.0
        self.img_q1 = self.img_q2 = 0.0
        # per channel: Σ and Σ² over images of each image's channel mean, and the first
        # ``keep`` images' channel means themselves (for resampling images)
        self.img_c1 = self.img_c2 = None
        self.keep = keep
        self.kept: list[torch.Tensor] = []

    def add(self, t: torch.Tensor, per_image: bool = True) -> None:
        self.add_sums(*channel_sums(t), per_image=per_image)

    def add_sums(self, s: torch.Tensor, q: torch.Tensor, per_channel: int,
                 per_image: bool = True) -> None:
        """Add images whose per (image, channel) Σ and Σ² over ``per_channel`` elements are
        ``s`` and ``q`` (float64, CPU, shape (N, C); see :func:`channel_sums`)."""
        _Moments.add_chunks([self], s, q, per_channel, per_image)

    @staticmethod
    def add_chunks(moments: Sequence[_Moments], s: torch.Tensor, q: torch.Tensor,
                   per_channel: int, per_image: bool = True) -> None:
        """:meth:`add_sums` for each of ``moments``, whose images are the consecutive equal
        chunks of ``s`` and ``q`` (K·N, C) in order (one quantized network's each: see
        :func:`difference_sums`' ``chunks``), every reduction made once for all K.

        The arithmetic is numpy's on the tensors' memory: these are small arrays, met once
        per site, chunk and pass, where torch's fixed cost per operation was most of the
        work (measured on (32, 256) sums with per-image figures: 151 µs a call in torch, 58
        in numpy); for the same reason the K networks' sums are reduced together."""
        k = len(moments)
        sn = s.numpy().reshape(k, -1, s.shape[1])
        qn = q.numpy().reshape(k, -1, q.shape[1])
        images = sn.shape[1]
        s0, q0 = sn.sum(1), qn.sum(1)
        if per_image:
            m1 = sn.sum(2) / (per_channel * sn.shape[2])
            m2 = qn.sum(2) / (per_channel * sn.shape[2])
            # per channel, Σ and Σ² over images of each image's channel mean sn / L, from
            # the sums already taken (Σ) and one pass without a temporary (Σ²)
            c1 = s0 / per_channel
            c2 = np.einsum("knc,knc->kc", sn, sn) / (per_channel * per_channel)
        for i, m in enumerate(moments):
            m.s1, m.s2 = _add_into(m.s1, s0[i]), _add_into(m.s2, q0[i])
            m.n += images * per_channel
            m.length = max(m.length, per_channel)
            if not per_image:
                continue
            m.img_n += images
            r1, r2 = m1[i], m2[i]
            m.img_s1 += float(r1.sum())
            m.img_s2 += float(r1 @ r1)
            m.img_q1 += float(r2.sum())
            m.img_q2 += float(r2 @ r2)
            m.img_c1, m.img_c2 = _add_into(m.img_c1, c1[i]), _add_into(m.img_c2, c2[i])
            room = m.keep - sum(t.shape[0] for t in m.kept)
            if room > 0:  # the first images' channel means themselves
                m.kept.append(torch.from_numpy(sn[i, :room] / per_channel))

    # per channel
    def mean_c(self) -> np.ndarray:
        return (self.s1 / self.n).numpy()

    def sq_c(self) -> np.ndarray:
        return (self.s2 / self.n).numpy()

    def var_c(self, u: float) -> np.ndarray:
        """Per channel, the variance over every image and position, 0 where the rounding
        of sums taken with unit roundoff ``u`` does not resolve it
        (:func:`~qerror.nn._moments.resolved_variance`)."""
        return resolved_variance(self.mean_c(), self.sq_c(), self.length,
                                 self.n // self.length, u)

    def var(self, u: float) -> float:
        """The variance over every image, position and channel, resolved as :meth:`var_c`
        (the sum over channels is one more float64 sum)."""
        return float(resolved_variance(self.mean(), self.sq(), self.length,
                                       self.n // self.length + self.s1.numel(), u))

    # whole tensor
    def mean(self) -> float:
        return float(self.s1.sum()) / (self.n * self.s1.numel())

    def sq(self) -> float:
        return float(self.s2.sum()) / (self.n * self.s2.numel())

    def se_mean(self) -> float:
        return _se(self.img_n, self.img_s1, self.img_s2)

    def se_sq(self) -> float:
        return _se(self.img_n, self.img_q1, self.img_q2)

    def var_mean_c(self) -> np.ndarray | None:
        """Per channel, the sampling variance of the channel mean, with images as units."""
        n = self.img_n
        if n < 2 or self.img_c1 is None:
            return None
        c1, c2 = self.img_c1.numpy(), self.img_c2.numpy()
        return np.maximum(c2 - c1 * c1 / n, 0.0) / (n - 1) / n


def _se(n: int, s1: float, s2: float) -> float:
    if n < 2:
        return math.nan
    var = max(s2 / n - (s1 / n) ** 2, 0.0) * n / (n - 1)
    return math.sqrt(var / n)


class _SiteAcc:
    """Everything measured at one site."""

    def __init__(self, name: str, kind: str, order: int, keep_images: int = 0):
        self.name, self.kind, self.order = name, kind, order
        self.err = _Moments(keep_images)  # accumulated error  yq - yf
        self.ref = _Moments()        # float activation   yf
        self.local = _Moments()      # local error (layers)
        self.act_err = _Moments()    # activation quantizer error, in LSB (layers)
        self.sat_low = self.sat_high = self.sat_total = 0
        # layers, for the images whose error means are kept: whether the quantized path's
        # input held a value that its quantizer clamps, whatever the rounding draw (CPU)
        self.beyond: list[torch.Tensor] = []
        # layers, for the same images: the mean square of each one's float output (CPU)
        self.ref_power: list[torch.Tensor] = []
        self.bn_f = _Moments()       # BatchNorm input, float path
        self.bn_q = _Moments()       # BatchNorm input, quantized path
        # mean maps of the float input, for the predicted drift (layers)
        self.in_sum = self.in_pos = self.in_neg = None
        self.in_n = 0
        # a BatchNorm fed directly by a layer: its float input statistics are that layer's
        # reference statistics, not computed twice
        self.bn_input_of: _SiteAcc | None = None


_MOMENT_COUNTS = ("n", "img_n")
_MOMENT_FLOATS = ("img_s1", "img_s2", "img_q1", "img_q2")
_MOMENT_TENSORS = ("s1", "s2", "img_c1", "img_c2")
_SITE_MOMENTS = ("err", "ref", "local", "act_err", "bn_f", "bn_q")
_SITE_COUNTS = ("sat_low", "sat_high", "sat_total", "in_n")
_SITE_TENSORS = ("in_sum", "in_pos", "in_neg")


#: Why :func:`measure` takes images of one size only (its batches', and its ranks').
_ONE_SIZE = ("drift and mse weight each image by its elements, while their standard errors "
             "and the debiased channel drift take images as equal units, so across sizes "
             "they would describe another mean")


def _merge_ranks(moments: list[_Moments], sites: list[_SiteAcc], counts: list[int],
                 image_shape: tuple[int, ...] | None, u: float, labelled: bool | None,
                 agreed: list[tuple[str, Any, Any]], keyed: range | None,
                 failure: Exception | None) -> tuple[list[int], float]:
    """Sum every rank's accumulators into this rank's (in place) and return the summed
    ``counts`` and the unit roundoff of the merged sums; the images kept for resampling are
    gathered in rank order.

    Integers are summed exactly as int64; float sums as float64, so the merged sums differ
    from one process's only by the order of the additions. ``image_shape`` (this rank's
    images') must be every rank's: one process refuses images of two shapes, and each rank
    sees only its own; so must ``labelled`` (whether this rank's batches have labels), and
    each argument of ``agreed``: ``(name, compared, shown)``, ``compared`` equal on every
    rank (a :func:`qerror.nn.parallel.digest` for tensors) and ``shown`` in the message
    where it tells the ranks apart (:func:`qerror.nn.parallel.check_agreement`). ``keyed``
    is the range of batch indices that this rank's stochastic rounding keyed its draws by
    (:func:`drawn_batches`): the ranks' ranges must not overlap, or two ranks drew the same
    numbers for different images, which one process never does
    (:func:`check_drawn_batches`). Every rank raises the same error when the ranks
    disagree, an argument's before anything it may have changed. ``u`` (the unit roundoff
    of this rank's sums) and each accumulator's ``length`` are merged as one process merges
    its batches': to the largest of any rank's, the rounding bound that holds for every
    rank's sums, so that every rank resolves the same variances.

    ``failure`` is the error this rank met before the merge (its accumulators then count
    for nothing). The first collective carries it to every rank
    (:func:`qerror.nn.parallel.gather_outcomes`), so no rank waits for it (or pairs with
    its next call): this rank raises ``failure``, every other rank a RuntimeError that
    names each failed rank and its error. All of this rides in one gather, before any sum
    is reduced.
    """
    def tensors(m):
        return [getattr(m, k) for k in _MOMENT_TENSORS]

    holders = [m for m in moments] + [getattr(a, k) for a in sites for k in _SITE_MOMENTS]
    layout = [(a.name, a.kind, a.order) for a in sites]
    shapes = [[None if t is None else tuple(t.shape) for t in tensors(m)] for m in holders]
    shapes += [[None if getattr(a, k) is None else tuple(getattr(a, k).shape)
                for k in _SITE_TENSORS] for a in sites]
    gathered = parallel.gather_outcomes(
        (image_shape, labelled, u, [m.length for m in holders], layout, shapes, agreed,
         keyed), failure, "the ranks' sums were merged")
    parallel.check_agreement([g[6] for g in gathered],
                             "the batches, first_batch, pair_batch and progress", "sums")
    # the configurations agree, so either every rank drew stochastically or none did
    check_drawn_batches([g[7] for g in gathered])
    if len({g[0] for g in gathered}) != 1:
        raise ValueError(
            "the ranks' images differ in shape (" + ", ".join(
                f"rank {r}: {g[0]}" for r, g in enumerate(gathered)) + f"): {_ONE_SIZE}; give "
            "every rank images of one size (measure each size apart)")
    if len({repr(g[4:6]) for g in gathered}) != 1:
        raise RuntimeError("the ranks measured different sites or shapes; every rank must run "
                           "the same model and configuration on at least one batch")
    if len({g[1] for g in gathered}) != 1:
        raise ValueError("some ranks' batches have labels and some do not")
    u = max(g[2] for g in gathered)
    for m, lengths in zip(holders, zip(*(g[3] for g in gathered))):
        m.length = max(lengths)
    ints = [getattr(m, k) for m in holders for k in _MOMENT_COUNTS]
    ints += [getattr(a, k) for a in sites for k in _SITE_COUNTS] + list(counts)
    floats = [torch.tensor([getattr(m, k) for m in holders for k in _MOMENT_FLOATS],
                           dtype=torch.float64)]
    floats += [t.reshape(-1) for m in holders for t in tensors(m) if t is not None]
    floats += [getattr(a, k).reshape(-1) for a in sites for k in _SITE_TENSORS
               if getattr(a, k) is not None]
    ints = parallel.all_reduce_sum(torch.tensor(ints, dtype=torch.int64)).tolist()
    flat = parallel.all_reduce_sum(torch.cat([f.double() for f in floats]))
    it = iter(ints)
    for m in holders:
        for k in _MOMENT_COUNTS:
            setattr(m, k, next(it))
    for a in sites:
        for k in _SITE_COUNTS:
            setattr(a, k, next(it))
    merged_counts = list(it)
    pos = 0

    def take(like: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        out = flat[pos:pos + like.numel()].reshape(like.shape).to(like.dtype)
        pos += like.numel()
        return out

    scalars = take(floats[0]).tolist()
    for i, (m, k) in enumerate((m, k) for m in holders for k in _MOMENT_FLOATS):
        setattr(m, k, scalars[i])
    for m in holders:
        for k in _MOMENT_TENSORS:
            if getattr(m, k) is not None:
                setattr(m, k, take(getattr(m, k)))
    for a in sites:
        for k in _SITE_TENSORS:
            if getattr(a, k) is not None:
                setattr(a, k, take(getattr(a, k)))
    # every rank kept its own first images: the first of them in rank order, copied out
    def first_of_ranks(pieces, keep):
        got = parallel.gather_first_rows(pieces, keep)
        return [parallel.first_rows(got, None)] if got else []

    for m in holders:
        if m.keep:
            m.kept = first_of_ranks(m.kept, m.keep)
    for a in sites:
        if a.err.keep:
            a.beyond = first_of_ranks(a.beyond, a.err.keep)
            a.ref_power = first_of_ranks(a.ref_power, a.err.keep)
    return merged_counts, u


# --------------------------------------------------------------------------- instrumentation

def _key(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


class _Arm:
    """One quantized network of an instrumented pass: its configuration, what it quantizes
    with, and the sites it measures against the float chunk that every arm shares."""

    def __init__(self, config: QuantConfig, act_qparams, weights, corrections, bn_stats,
                 image_means: int = 0):
        self.config = check_config(config)
        check_made_for(act_qparams, config.activation, "activation ranges",
                       f" ({config.label})")
        self.act_qparams = act_qparams or {}
        self.weights = weights or {}
        self.corrections = corrections or {}
        self.bn_stats = bn_stats or {}
        self.image_means = image_means
        self.sites: dict[str, _SiteAcc] = {}
        self.order = 0
        self.last = None  # (tensor, site, this arm's sums) of the last layer's output
        self._quantizers: dict[str, tuple[QParams, PreparedQuantizer]] = {}

    def quantizer(self, name: str) -> PreparedQuantizer:
        """The activation quantizer of ``name`` (a layer's input or an output key), its
        parameters checked once for as long as its qparams are the same object."""
        qp = self.act_qparams[name]
        held = self._quantizers.get(name)
        if held is None or held[0] is not qp:
            held = self._quantizers[name] = (qp, PreparedQuantizer(
                self.config.activation, qp.scale, qp.zero_point))
        return held[1]

    def site(self, name: str, kind: str) -> _SiteAcc:
        acc = self.sites.get(name)
        if acc is None:
            keep = self.image_means if kind in ("conv", "linear") else 0
            acc = self.sites[name] = _SiteAcc(name, kind, self.order, keep)
            self.order += 1
        return acc

    def layer_params(self, name: str, module: nn.Module):
        """The quantized layer's weight and bias (with this arm's bias correction)."""
        w = self.weights[name].weight if self.config.weight is not None else module.weight
        b = module.bias
        corr = self.corrections.get(name)
        if corr is not None:
            corr = corr.to(module.weight.device, module.weight.dtype)
            b = corr if b is None else b + corr
        return w, b


class _Instrument:
    """Patches a model for one pass over the data; :meth:`close` restores it.

    Paired, a pass's batch is ``len(arms) + 1`` equal chunks: the float network's, then one
    per arm; alone (not paired), the batch is the one arm's.
    """

    def __init__(self, model: nn.Module, arms: list[_Arm], *, paired: bool,
                 local_samples: int = 0, collect: bool = True, input_maps: bool = False,
                 local_only: bool = False):
        if not arms or (not paired and len(arms) != 1) or (local_only and paired):
            raise ValueError("an instrumented pass needs one arm alone (local_only: not "
                             "paired), or one or more paired")
        self.model, self.arms, self.paired = model, arms, paired
        # the float network alone, each layer's local error measured beside it
        self.local_only = local_only
        self.collect = collect
        self.input_maps = input_maps
        self.batch_index = 0
        # Within a batch measured in several paired passes: the index of the pass's first
        # image in the batch (stochastic rounding draws each element the number it has in
        # the whole batch's stream, so the draws do not depend on how the batch is split),
        # and how many of its images the local error and the quantizer's own error use (the
        # first ``local_samples`` images of the batch, whichever pass holds them).
        self.first_image = 0
        self.local_images = local_samples
        self.act_err_images = max(1, local_samples)
        self._handles = []
        self._patched = []
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]
        # Everything is checked before anything is patched: a refused set-up leaves the
        # model as it was.
        modules = list(model.named_modules())
        for k, arm in enumerate(arms):
            config = arm.config
            which = f" (configuration {k}, {config.label})" if len(arms) > 1 else ""
            check_layer_params(config, (n for n, _ in self.layers), arm.act_qparams,
                               arm.weights, which)
            for n, m in modules:
                quantized = not local_only and (
                    (isinstance(m, nn.BatchNorm2d) and config.bn_outputs)
                    or (is_block(m) and config.block_outputs))
                if quantized and output_key(n) not in arm.act_qparams:
                    raise ValueError(f"no output qparams for {n!r}{which}; calibrate with "
                                     "calibrate_activations(..., outputs=True)")
        own = [repr(n) if n else "the model" for n in own_forwards(modules)]
        if own:  # restoring the class's forward on closing would delete theirs
            raise ValueError(
                f"{', '.join(own[:3])}{' and more' if len(own) > 3 else ''} already "
                "replace(s) forward on the module itself (another measurement still open on "
                "this model, or a wrapper of your own); close the other block first, or "
                "measure a copy (copy.deepcopy(model))")
        for idx, (n, m) in enumerate(self.layers):
            self._patch(m, self._layer_forward(idx, n, m))
        # sites that gather statistics, counted per forward pass: a module called twice
        # would pool both calls' figures under one site (refused where it is met, whether
        # or not torch.fx can trace the model for path_depths)
        self._calls: set[str] = set()
        if collect and (paired or local_only):
            self._handles.append(model.register_forward_pre_hook(
                lambda module, args: self._calls.clear()))
        if local_only:
            return
        for idx, (n, m) in enumerate(modules):
            bn_site, block_site = isinstance(m, nn.BatchNorm2d), is_block(m)
            outputs = [a for a in arms if (bn_site and a.config.bn_outputs)
                       or (block_site and a.config.block_outputs)]
            if outputs:
                # registered first: the statistics hooks below see the quantized output
                self._handles.append(m.register_forward_hook(
                    self._quantize_output(idx, n, "bn" if bn_site else "block", outputs)))
            if bn_site:
                if any(n in a.bn_stats for a in arms):
                    self._patch(m, self._bn_forward(n, m))
                if collect and paired:
                    self._handles.append(m.register_forward_hook(self._bn_hook(n)))
            elif collect and paired and block_site:
                self._handles.append(m.register_forward_hook(self._out_hook(n, "block")))
            if collect and paired and not bn_site:
                # Any other module between a layer and a BatchNorm (an in-place ReLU, say)
                # may change the tensor the BatchNorm receives: its statistics are then its
                # own, not the layer's output's (see _bn_hook). So may the rest of the
                # forward of a module that called the layer: a pre-activation block adds its
                # shortcut in place to its last convolution's output (``out += x``), and the
                # next block's first BatchNorm receives that sum; a container's return ends
                # the layer's sums' claim too.
                if any(True for _ in m.children()):
                    self._handles.append(m.register_forward_hook(self._forget_after))
                else:
                    self._handles.append(m.register_forward_pre_hook(self._forget_last))
        self._handles.append(model.register_forward_hook(self._next_batch))

    def _called(self, name: str) -> None:
        if name in self._calls:
            raise UnsupportedModelError(
                f"{name!r} is called more than once in one forward pass; the statistics "
                "measured per layer and per BatchNorm would pool the calls under one site: "
                "give each call its own module")
        self._calls.add(name)

    @staticmethod
    def _refuse_linear_input(name: str, x: torch.Tensor) -> None:
        """Refuse measuring a Linear fed more than (N, features): every per-channel figure
        reduces over dimension 1 as the channels, which of such an output (N, T, ...,
        out_features) is not the layer's outputs, so its channel means (and the bias
        corrections made from them) would be another axis's under the outputs' name."""
        raise UnsupportedModelError(
            f"Linear {name!r} is fed inputs of shape {tuple(x.shape[1:])} per image: its "
            "per-channel figures (drift_channel, local_drift_channel, local_error_means) "
            "take dimension 1 as the channels, which is its output features only for "
            "(N, features) inputs; flatten its input (nn.Flatten) or measure a model whose "
            "Linear layers take (N, features)")

    def _forget_last(self, module, args):
        for arm in self.arms:
            arm.last = None

    def _forget_after(self, module, args, out):
        self._forget_last(module, args)

    def _next_batch(self, module, args, out):
        # Stochastic rounding draws a fresh stream for every batch.
        self.batch_index += 1

    def _patch(self, module, fn):
        module.forward = fn
        self._patched.append(module)

    def close(self):
        for h in self._handles:
            h.remove()
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._handles, self._patched = [], []

    def chunks(self, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The float chunk and each arm's chunk of a paired tensor (views)."""
        h = t.shape[0] // (len(self.arms) + 1)
        return t[:h], [t[h * (k + 1):h * (k + 2)] for k in range(len(self.arms))]

    # -- quantization of one layer's input
    def _quantize_input(self, arm: _Arm, idx: int, name: str, x: torch.Tensor,
                        acc: _SiteAcc | None, stream: int):
        spec = arm.config.activation
        if spec is None:
            return x
        qp = arm.act_qparams[name]
        key, offset = None, 0
        if spec.rounding.is_random:
            # x holds images first_image, first_image + 1, ... of the batch (a pass's chunk,
            # or its first images for the local error): their elements' indices in the
            # batch's tensor
            key = _key(arm.config.seed, 2, idx, self.batch_index, stream)
            offset = self.first_image * x[0].numel()
        if acc is None:  # nothing measured here: the quantizer alone, no counting
            return self._fake_quantize(arm, name, x, generator=key, offset=offset)
        room = acc.err.keep - sum(b.shape[0] for b in acc.beyond)
        if room > 0 and acc.kind in ("conv", "linear"):
            # per kept image: any input that the rounding mode maps beyond the grid's ends
            # whatever its draw (R(u) - u within the mode's error interval), so clamped
            s, z = float(qp.scale), float(qp.zero_point)
            bounds = spec.rounding.interval
            rows = x[:room].reshape(min(room, x.shape[0]), -1)
            lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # not aminmax(dim=1): ~20x slower
            acc.beyond.append(((lo < s * (spec.qmin - bounds.negative[1] - z))
                               | (hi > s * (spec.qmax - bounds.positive[0] - z))).cpu())
        xq, sat = self._fake_quantize(arm, name, x, generator=key, return_saturation=True,
                                      offset=offset)
        acc.sat_low += int(sat.low)
        acc.sat_high += int(sat.high)
        acc.sat_total += int(sat.total)
        # the quantizer's own error, on the images the local error uses
        m = min(self.act_err_images, x.shape[0])
        if m:
            # in LSB: the sums of (xq - x) / s, divided after summing (the scale is one number)
            sd, qd, per_channel = difference_sums(xq[:m], x[:m])
            step = float(qp.scale)
            acc.act_err.add_sums(sd / step, qd / (step * step), per_channel, per_image=False)
        return xq

    @staticmethod
    def _fake_quantize(arm: _Arm, name: str, x: torch.Tensor, **kwargs):
        """``arm``'s quantizer of ``name`` applied to ``x``; NaN or Inf there is named as what
        it is, values the network made (the quantizer's own message would name "x", as if
        the images held them, and say to remove them)."""
        try:
            return arm.quantizer(name).fake_quantize(x, **kwargs)
        except ValueError as exc:
            if bool(torch.isfinite(x).all()):
                raise
            where = _key_words(name, "the input of layer")
            raise ValueError(
                f"{where} holds NaN or Inf values ({arm.config.label}), which no quantizer "
                "takes: from finite images (measure checks its batches) the network made "
                "them, through an activation that overflowed its dtype or a layer whose "
                "weights, corrections or BatchNorm statistics give NaN; check the images "
                "and the layers before it, or measure in float64") from exc

    def _quantize_output(self, idx: int, name: str, kind: str, arms: list[_Arm]) -> Callable:
        key = output_key(name)
        site = 1_000_000 + idx  # a stochastic stream apart from the layers' inputs

        def hook(module, args, out):
            if not self.paired:
                return self._quantize_input(self.arms[0], site, key, out, None, 0)
            yf, ys = self.chunks(out)
            parts = [yf]
            for arm, y in zip(self.arms, ys):
                if arm in arms:
                    acc = arm.site(name, kind) if self.collect else None
                    y = self._quantize_input(arm, site, key, y, acc, 0)
                parts.append(y)
            return torch.cat(parts)
        return hook

    def _layer_forward(self, idx: int, name: str, module: nn.Module) -> Callable:
        conv = isinstance(module, nn.Conv2d)
        kind = "conv" if conv else "linear"

        def op(x, w, b):
            return module._conv_forward(x, w, b) if conv else F.linear(x, w, b)

        def forward(x):
            if self.collect and (self.paired or self.local_only):
                self._called(name)
                if not conv and x.ndim != 2:
                    self._refuse_linear_input(name, x)
            if self.local_only:  # the float layer, and its quantized version beside it
                arm = self.arms[0]
                yf = op(x, module.weight, module.bias)
                xl = self._quantize_input(arm, idx, name, x, None, 1)
                # the channel means alone are read (local_error_means): no per-image figures
                arm.site(name, kind).local.add_sums(
                    *difference_sums(op(xl, *arm.layer_params(name, module)), yf),
                    per_image=False)
                return yf
            if not self.paired:
                arm = self.arms[0]
                return op(self._quantize_input(arm, idx, name, x, None, 0),
                          *arm.layer_params(name, module))
            xf, xs = self.chunks(x)
            h = xf.shape[0]
            yf = op(xf, module.weight, module.bias)
            parts = [yf]
            params = [arm.layer_params(name, module) for arm in self.arms]
            accs = [arm.site(name, kind) if self.collect else None for arm in self.arms]
            for arm, xq, wb, acc in zip(self.arms, xs, params, accs):
                parts.append(op(self._quantize_input(arm, idx, name, xq, acc, 0), *wb))
            out = torch.cat(parts)
            del parts, yf  # the chunks themselves are freed: the pass holds one copy
            yf = out[:h]
            if self.collect:
                # one pass over every arm's output and the float output: each arm's error
                # sums, its own (those of a BatchNorm it feeds) and the float output's (each
                # arm's reference), every reduction once for all arms
                k = len(self.arms)
                sd, qd, sa, qa, sf, qf, per_channel = difference_sums(
                    out[h:], yf, of_a=True, of_b=True, chunks=k)
                _Moments.add_chunks([acc.err for acc in accs], sd, qd, per_channel)
                m = min(self.local_images, h)
                for j, (arm, acc, wb) in enumerate(zip(self.arms, accs, params)):
                    acc.ref.add_sums(sf, qf, per_channel, per_image=False)
                    room = acc.err.keep - sum(p.shape[0] for p in acc.ref_power)
                    if room > 0:  # the images whose error means are kept, in their order
                        acc.ref_power.append(qf[:room].sum(1) / (per_channel * qf.shape[1]))
                    arm.last = (out, acc, (sa[j * h:(j + 1) * h], qa[j * h:(j + 1) * h],
                                           per_channel))
                    if m:
                        xl = self._quantize_input(arm, idx, name, xf[:m], None, 1)
                        acc.local.add_sums(*difference_sums(op(xl, *wb), yf[:m]),
                                           per_image=True)
                    if self.input_maps:
                        self._input_map(arm, acc, name, xf)
            return out

        return forward

    def _input_map(self, arm: _Arm, acc: _SiteAcc, name: str, xf: torch.Tensor) -> None:
        x = xf.detach()
        if arm.config.activation is not None:
            qp = arm.act_qparams[name]
            origin = -float(qp.zero_point) * float(qp.scale)
        else:
            origin = 0.0
        s = x.sum(0).double().cpu()
        # a real zero (a ReLU's) is on the grid whatever the zero point: no error, in neither
        off = x != 0
        p = ((x > origin) & off).sum(0).double().cpu()
        n = ((x < origin) & off).sum(0).double().cpu()
        if acc.in_sum is None:
            acc.in_sum, acc.in_pos, acc.in_neg = s, p, n
        else:
            acc.in_sum += s
            acc.in_pos += p
            acc.in_neg += n
        acc.in_n += x.shape[0]

    def _bn_forward(self, name: str, module: nn.BatchNorm2d) -> Callable:
        def norm(x, stats):
            mean, var = stats  # re-estimated statistics may live on another device
            return F.batch_norm(x, mean.to(x), var.to(x), module.weight, module.bias, False,
                                0.0, module.eps)

        running = (module.running_mean, module.running_var)

        def forward(x):
            if not self.paired:  # the quantized path alone: its own statistics throughout
                return norm(x, self.arms[0].bn_stats.get(name, running))
            xf, xs = self.chunks(x)
            return torch.cat([norm(xf, running)] + [norm(xq, arm.bn_stats.get(name, running))
                                                     for arm, xq in zip(self.arms, xs)])

        return forward

    def _bn_hook(self, name: str) -> Callable:
        def hook(module, args, out):
            self._called(name)
            x = args[0]
            sums = None
            for k, arm in enumerate(self.arms):
                acc = arm.site(name, "bn")
                last = arm.last
                if last is not None and last[0] is x and last[1] is not None:
                    acc.bn_input_of = last[1]
                    acc.bn_q.add_sums(*last[2], per_image=False)
                    continue
                if sums is None:
                    s, q, per_channel = channel_sums(x)
                    sums = self.chunks(s), self.chunks(q), per_channel
                (sf, s_arms), (qf, q_arms), per_channel = sums
                acc.bn_f.add_sums(sf, qf, per_channel, per_image=False)
                acc.bn_q.add_sums(s_arms[k], q_arms[k], per_channel, per_image=False)
        return hook

    def _out_hook(self, name: str, kind: str) -> Callable:
        def hook(module, args, out):
            h = self.chunks(out)[0].shape[0]
            sd, qd, s, q, per_channel = difference_sums(out[h:], out[:h], of_b=True,
                                                        chunks=len(self.arms))
            accs = [arm.site(name, kind) for arm in self.arms]
            _Moments.add_chunks([acc.err for acc in accs], sd, qd, per_channel)
            for acc in accs:
                acc.ref.add_sums(s, q, per_channel, per_image=False)
        return hook


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SiteResult:
    """What was measured at one site (layer output, BatchNorm, block output).

    Whole-tensor figures are floats; per-channel figures are arrays of shape (C,).
    ``None`` where a figure does not apply to the site's kind or was not measured.

    Variances (``float_std``, ``float_std_channel``, the BatchNorm inputs' variances) are
    0 where the float rounding of the sums they come from does not resolve them
    (:func:`qerror.nn._moments.resolved_variance`: a constant channel's, or one whose mean
    lies more than about ``1/√(3 L u)`` standard deviations from 0 on a map of ``L``
    positions, summed in float32 (``u = 2⁻²⁴``): 330 on a 7×7 map, 84 on 28×28, 21 on
    112×112; the bound holds for every order of the additions, and the sums usually resolve
    such a channel's variance to a few digits, so this errs towards calling a live channel
    constant); such a channel is not live, and the per-channel figures relative to the float
    std leave it out.

    The local figures (``local_drift``, ``local_mse``) are taken on the ``local_images``
    that carry the local error (the first ``local_samples`` of each batch), while
    ``local_sqnr_db`` divides the float output's power over every measured image by
    ``local_mse``: two estimates over nested sets of the same random images, each unbiased
    for its expectation, the ratio consistent, and its noise mostly the local error's.

    ``input_error_mean_lsb`` and ``input_error_mse_lsb`` are the rounding error of the
    layer's input quantizer, in steps of its grid, on the quantized network's own input to
    the layer (which carries the error accumulated before it), not on the float network's.
    """

    name: str
    kind: str
    order: int
    depth: int
    path_depth: int | None = None
    elements: int = 0
    drift: float | None = None
    drift_se: float | None = None
    drift_rel: float | None = None
    drift_rel_rms_channel: float | None = None
    drift_rel_rms_channel_debiased: float | None = None
    mse: float | None = None
    mse_se: float | None = None
    rms_rel: float | None = None
    sqnr_db: float | None = None
    float_std: float | None = None
    drift_channel: np.ndarray | None = field(default=None, repr=False)
    float_std_channel: np.ndarray | None = field(default=None, repr=False)
    local_drift: float | None = None
    local_drift_se: float | None = None
    local_mse: float | None = None
    local_sqnr_db: float | None = None
    local_drift_channel: np.ndarray | None = field(default=None, repr=False)
    local_images: int = 0
    drift_image_channel: np.ndarray | None = field(default=None, repr=False)
    beyond_range_image: np.ndarray | None = field(default=None, repr=False)
    float_power_image: np.ndarray | None = field(default=None, repr=False)
    input_error_mean_lsb: float | None = None
    input_error_mse_lsb: float | None = None
    saturation_low: float | None = None
    saturation_high: float | None = None
    weight_error_mean_lsb: float | None = None
    weight_error_mse_lsb: float | None = None
    weight_saturation: float | None = None
    bn: object | None = field(default=None, repr=False)
    input_mean_map: np.ndarray | None = field(default=None, repr=False)
    input_pos_map: np.ndarray | None = field(default=None, repr=False)
    input_neg_map: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LogitResult:
    """The network's output under both paths."""

    n: int
    float_correct: int | None
    quant_correct: int | None
    agree: int
    float_only: int | None
    quant_only: int | None
    sqnr_db: float
    drift_rel: float

    @property
    def float_accuracy(self) -> float | None:
        return None if self.float_correct is None else self.float_correct / self.n

    @property
    def quant_accuracy(self) -> float | None:
        return None if self.quant_correct is None else self.quant_correct / self.n

    @property
    def agreement(self) -> float:
        return self.agree / self.n


@dataclass(frozen=True)
class PropagationResult:
    """Per-site results of one configuration, in execution order, and the logits."""

    config: QuantConfig
    sites: tuple[SiteResult, ...]
    logits: LogitResult
    images: int

    def site(self, name: str) -> SiteResult:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites are {[s.name for s in self.sites][:5]}...")

    def layers(self) -> list[SiteResult]:
        return [s for s in self.sites if s.kind in ("conv", "linear")]

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: one per site × metric (``value`` and its standard error ``se``)."""
        rows = []
        scalar = ("drift", "drift_rel", "drift_rel_rms_channel",
                  "drift_rel_rms_channel_debiased", "mse", "rms_rel", "sqnr_db",
                  "float_std", "local_drift", "local_mse", "local_sqnr_db",
                  "input_error_mean_lsb", "input_error_mse_lsb", "saturation_low",
                  "saturation_high", "weight_error_mean_lsb", "weight_error_mse_lsb",
                  "weight_saturation")
        ses = {"drift": "drift_se", "mse": "mse_se", "local_drift": "local_drift_se"}
        for s in self.sites:
            base = {"site": s.name, "kind": s.kind, "order": s.order, "depth": s.depth,
                    "path_depth": math.nan if s.path_depth is None else s.path_depth}
            for metric in scalar:
                v = getattr(s, metric)
                if v is None:
                    continue
                se = getattr(s, ses[metric]) if metric in ses else None
                rows.append({**base, "metric": metric, "value": float(v),
                             "se": math.nan if se is None else float(se)})
            if s.bn is not None:
                for metric, v in s.bn.summary().items():
                    rows.append({**base, "metric": metric, "value": float(v), "se": math.nan})
        return pd.DataFrame(rows)


def _site_result(acc: _SiteAcc, depth: int, weights, bn_ref, path_depth: int | None, *,
                 u: float) -> SiteResult:
    """One site's figures; ``u``: the unit roundoff of the sums (the activations' dtype's)."""
    err, ref = acc.err, acc.ref
    kw = {}
    power = ref.sq() if ref.n else math.nan
    if err.n:
        # a constant channel's float variance is rounding, not spread: 0, so not live
        std_f = math.sqrt(ref.var(u))
        std_c = np.sqrt(ref.var_c(u))
        drift_c = err.mean_c()
        live = std_c > 0
        rel_c = drift_c[live] / std_c[live]
        var_c = err.var_mean_c()
        debiased = math.nan if var_c is None else debiased_rms(drift_c, var_c, std_c)
        if err.kept:
            kw["drift_image_channel"] = torch.cat(err.kept).numpy()
            err.kept.clear()  # the pieces go as each site is done: one site's copy at a time
        if acc.beyond:
            kw["beyond_range_image"] = torch.cat(acc.beyond).numpy()  # kept on the CPU
        if acc.ref_power:
            kw["float_power_image"] = torch.cat(acc.ref_power).numpy()
        mse = err.sq()
        kw.update(
            elements=err.n * err.s1.numel(), drift=err.mean(), drift_se=err.se_mean(),
            drift_rel=err.mean() / std_f if std_f > 0 else math.nan,
            drift_rel_rms_channel=float(np.sqrt(np.mean(rel_c**2))) if rel_c.size else math.nan,
            drift_rel_rms_channel_debiased=debiased,
            mse=mse, mse_se=err.se_sq(),
            rms_rel=math.sqrt(mse) / std_f if std_f > 0 else math.nan,
            sqnr_db=sqnr_db(power, mse), float_std=std_f, drift_channel=drift_c,
            float_std_channel=std_c)
    if acc.local.n:
        kw.update(local_drift=acc.local.mean(), local_drift_se=acc.local.se_mean(),
                  local_mse=acc.local.sq(), local_drift_channel=acc.local.mean_c(),
                  local_sqnr_db=sqnr_db(power, acc.local.sq()), local_images=acc.local.img_n)
    if acc.sat_total:
        kw.update(saturation_low=acc.sat_low / acc.sat_total,
                  saturation_high=acc.sat_high / acc.sat_total,
                  input_error_mean_lsb=acc.act_err.mean(), input_error_mse_lsb=acc.act_err.sq())
    w = weights.get(acc.name) if weights else None
    if w is not None:
        kw.update(weight_error_mean_lsb=w.error_mean_lsb, weight_error_mse_lsb=w.error_mse_lsb,
                  weight_saturation=w.saturation)
    if acc.bn_q.n:
        bn_f = acc.bn_input_of.ref if acc.bn_input_of is not None else acc.bn_f
        (mean_f_run, var_f_run), (mean_run, var_run) = bn_ref[acc.name]
        kw["bn"] = BNInconsistency.from_stats(bn_f.mean_c(), bn_f.var_c(u), acc.bn_q.mean_c(),
                                              acc.bn_q.var_c(u), mean_run, var_run,
                                              mean_f_run, var_f_run)
        kw["elements"] = acc.bn_q.n * acc.bn_q.s1.numel()
    if acc.in_sum is not None:
        kw.update(input_mean_map=(acc.in_sum / acc.in_n).numpy(),
                  input_pos_map=(acc.in_pos / acc.in_n).numpy(),
                  input_neg_map=(acc.in_neg / acc.in_n).numpy())
    return SiteResult(name=acc.name, kind=acc.kind, order=acc.order, depth=depth,
                      path_depth=path_depth, **kw)


def sqnr_db(power: float, noise: float) -> float:
    """``10 log10(power / noise)``: the SQNR of a signal of mean square ``power`` under an
    error of mean square ``noise`` (any common normalisation cancels); ``inf`` without
    error, ``-inf`` for a zero signal with error (or a ratio below the smallest float);
    ``nan`` where either mean square is not finite (a sum that overflowed, or NaN
    activations): no figure, as :func:`qerror.nn._moments.resolved_variance` gives none."""
    if not (math.isfinite(power) and math.isfinite(noise)):
        return math.nan
    if noise == 0:
        return math.inf
    ratio = power / noise
    return 10.0 * math.log10(ratio) if ratio > 0 else -math.inf


# --------------------------------------------------------------------------- entry points

def _batchnorms(model: nn.Module, bn_stats) -> dict[str, nn.BatchNorm2d]:
    """The model's BatchNorm2d layers by name; ``bn_stats`` may name only those, each with a
    finite mean and a finite, non-negative variance per channel (a NaN there would surface
    as non-finite data at the next quantizer, as if the images held it)."""
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for n, stats in (bn_stats or {}).items():
        if n not in bns:
            raise ValueError(f"bn_stats names {n!r}, which is not a BatchNorm2d of the model")
        if not isinstance(stats, (tuple, list)) or len(stats) != 2:
            raise ValueError(f"bn_stats[{n!r}] must be a (mean, var) pair")
        c = bns[n].num_features
        for what, t in zip(("mean", "var"), stats):
            t = torch.as_tensor(t)
            if tuple(t.shape) != (c,):
                raise ValueError(f"bn_stats[{n!r}] {what} has shape {tuple(t.shape)}; the "
                                 f"BatchNorm has {c} channels, so give ({c},)")
            if not bool(torch.isfinite(t).all()) or (what == "var" and bool((t < 0).any())):
                raise ValueError(f"bn_stats[{n!r}] {what} holds "
                                 f"{'negative or ' if what == 'var' else ''}non-finite values")
    return bns


def _check_corrections(model: nn.Module, corrections) -> None:
    """``corrections`` may name only the model's Conv2d and Linear layers, each with one
    value per output channel (a bias correction, added to the layer's bias)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LAYERS)}
    for n, c in (corrections or {}).items():
        if n not in layers:
            raise ValueError(f"corrections names {n!r}, which is not a Conv2d or Linear of the "
                             f"model (its layers: {', '.join(list(layers)[:6])}, …)")
        m = layers[n]
        out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        shape = tuple(torch.as_tensor(c).shape)
        if shape != (out,):
            raise ValueError(f"corrections[{n!r}] has shape {shape}; the layer has {out} "
                             f"outputs, so give one value per output ({out},)")
        if not bool(torch.isfinite(torch.as_tensor(c)).all()):
            raise ValueError(f"corrections[{n!r}] holds non-finite values")


MIN_CHUNK = 32  # images per chunk of a paired pass, at least (see default_pair_batch)


def default_pair_batch(images: int, arms: int = 1, min_chunk: int = MIN_CHUNK) -> int:
    """Images per paired pass that :func:`measure` (``arms = 1``) and :func:`measure_many`
    (``arms`` configurations) take from a batch of ``images`` by default.

    ``ceil(images / (arms + 1))``, so that a pass, which holds ``arms + 1`` copies of its
    images, holds about as many images as the batch's float forward; but at least
    :data:`MIN_CHUNK` (32) images or the whole batch; then evened out, so that the passes
    differ by at most one image (no small last pass: 200 images in 15 configurations' chunks
    make 7 passes of 29, not 6 of 32 and one of 8). For one configuration that is half the
    batch above 32 images, the whole batch up to 32. Each chunk costs its own operations at
    every site (a convolution, a quantizer, the statistics' reductions), and in small chunks
    these fixed costs eat what sharing the float chunk saves: 15 configurations of the Fashion-MNIST
    ResNet50 on 200 images, one thread here, took about as long in chunks of 16 as measured
    one by one, and about a fifth less in chunks of 25 to 50 (below 16 images,
    single-threaded PyTorch also runs unstrided 1×1 convolutions on its slow path). A pass
    of many configurations then holds more images than the batch. ``min_chunk`` replaces
    the floor of 32 where memory allows larger passes (``studies.drift`` takes 64 for its
    small images).
    """
    images, arms, min_chunk = (check_count(v, name, low) for v, name, low in (
        (images, "images", 0), (arms, "arms (a number of configurations)", 1),
        (min_chunk, "min_chunk (a number of images)", 1)))
    size = max(1, -(-images // (arms + 1)), min(images, min_chunk))
    passes = max(1, -(-images // size))
    return max(1, -(-images // passes))


def _passes(batches: Iterable, pair_batch: int | None, arms: int = 1):
    """The paired passes over ``batches``: (batch index, first image of the pass within the
    batch, images, labels); a batch is measured in passes of ``pair_batch`` images, by
    default :func:`default_pair_batch`.
    """
    for b, (x, y) in enumerate(batches):
        size = pair_batch if pair_batch is not None else default_pair_batch(x.shape[0], arms)
        for start in range(0, x.shape[0], size):
            yield b, start, x[start:start + size], None if y is None else y[start:start + size]


def _per_config(value, count: int, what: str, shared: bool = False) -> list:
    """One ``what`` per configuration: ``value`` is None (none for any), a sequence of one
    per configuration, or (``shared``) one mapping that every configuration uses."""
    if value is None:
        return [None] * count
    if isinstance(value, Mapping):
        if shared or count == 1:
            return [value] * count
        raise TypeError(f"{what}: give a sequence of one per configuration ({count}), or None")
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{what}: {len(value)} given for {count} configurations; give one "
                         "per configuration (None where a configuration has none)")
    return value


def measure(model: nn.Module, batches: Iterable, config: QuantConfig,
            act_qparams: Mapping[str, QParams] | None = None, *,
            weights: Mapping[str, QuantizedWeights] | None = None,
            corrections: Mapping[str, torch.Tensor] | None = None,
            bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            local_samples: int = 32, input_maps: bool = False, pair_batch: int | None = None,
            image_means: int = 0, progress: bool = False, first_batch: int = 0,
            across_ranks: bool = False) -> PropagationResult:
    """Run the float and the quantized network on the same batches and measure every site.

    Parameters
    ----------
    model : nn.Module
        A torchvision-style CNN (see :func:`check_model`); it is put in evaluation mode
        for the pass and restored afterwards, its parameters untouched.
    batches : iterable
        Images ``(N, ...)`` or ``(images, labels)`` pairs, every image of one shape
        (ValueError otherwise: see the Raises section).
    config : QuantConfig
    act_qparams : dict, optional
        From :func:`calibrate_activations` (required when ``config.activation`` is set).
    weights : dict, optional
        From :func:`quantize_weights`; computed from ``config.weight`` when omitted.
    corrections : dict, optional
        Layer name → per-output-channel tensor added to the quantized layer's bias
        (see :mod:`qerror.nn.correction`).
    bn_stats : dict, optional
        BatchNorm name → (mean, var) that the quantized path normalises with instead of
        the running statistics (see :func:`qerror.nn.correction.reestimate_bn`).
    local_samples : int
        Images of each batch (its first ones, whichever paired pass holds them) on which
        the local error is measured (0: not measured).
    input_maps : bool
        Also keep each layer's mean float input map (C, H, W) and the fractions of
        values above and below the quantizer's real zero (for predicted drift; the value 0,
        on the grid whatever the zero point, in neither).
    pair_batch : int, optional
        Images per paired forward pass: each batch is measured in consecutive passes of
        this many images, each holding the activations of ``2 * pair_batch`` images.
        Default: half the batch (rounded up) above 32 images, so that measuring a batch
        holds as many images as its float forward; a smaller batch in one pass
        (:func:`default_pair_batch`); at least the batch size measures it in one pass.
        Stochastic rounding keys its stream by the batch's index and hashes each element's
        uniform from its flat index in the batch's tensor, so its draws do not depend on
        ``pair_batch``. Float32 arithmetic may, slightly: a kernel may round differently at
        another batch size (oneDNN's 1×1 convolution of the Fashion-MNIST ResNet50's
        layer1.1.conv1 on 200 images against 16: up to 4e-6 apart), which moves the values
        that sit on a rounding boundary; the figures then differ by far less than their
        standard errors (the drift study's deterministic figures between passes of 100 and
        of 16 images: accuracies equal, SQNR within 0.02 dB).
    image_means : int
        Keep, for every conv/linear output, the per-channel mean drift of each of the first
        ``image_means`` images (``SiteResult.drift_image_channel``, shape (N, C)), so that
        statistics can be resampled over images (:mod:`qerror.nn.growth`); and, for every
        conv/linear input the configuration quantizes, whether each of those images held a
        value that the quantizer clamps whatever its rounding draw: above
        ``s·(qmax − a − z)`` or below ``s·(qmin − b − z)``, where ``a`` is the mode's lowest
        error ``R(u) − u`` for positive ``u`` and ``b`` its highest for negative ``u``
        (:attr:`qerror.RoundingMode.interval`; for round-to-nearest half a step outside the
        grid's ends, for floor a whole step above and none below), up to float
        rounding at that boundary (``SiteResult.beyond_range_image``, shape (N,), bool):
        the images the calibrated range clips there. Inputs clamped by the BatchNorm and
        block-output quantizers (``bn_outputs``, ``block_outputs``) are not flagged: the next
        layer's input is then inside the grid already. Also each of those images' mean
        square of the float conv/linear output (``SiteResult.float_power_image``, shape
        (N,)), so that an image's drift can be set against how much activation it carries.
    progress : bool
        Show a progress bar.
    first_batch : int
        The index of the first of ``batches`` among all the batches measured: stochastic
        rounding draws the stream of each batch from its index, so a share of the batches
        (:func:`qerror.nn.parallel.shard`) rounds as it does within the whole.
    across_ranks : bool
        Under torchrun, each rank passed its own share of the batches (each at least one,
        contiguous, ``first_batch`` its first index): the sums of every rank are merged
        before the results are computed, and every rank returns the result of all the
        batches (images of different floating dtypes on different ranks count as they do
        in one process: a variance is resolved against the rounding of the coarsest).
        Every rank passes the same model (its parameters and persistent buffers),
        ``config``, ``act_qparams``, ``weights``, ``corrections``, ``bn_stats``,
        ``local_samples``, ``input_maps`` and ``image_means`` (checked, the tensors by their
        :func:`~qerror.nn.parallel.digest`: every rank raises the same ValueError naming
        the first that differs); ``pair_batch`` and ``progress`` may differ (a pass's size
        does not change the draws), and ``first_batch`` is each rank's own. Where the
        configuration rounds activations stochastically, the ranks' batch indices
        (``first_batch`` up to ``first_batch`` plus the rank's batches, less one) must not
        overlap (checked: every rank raises the same ValueError), or two ranks would draw
        the same numbers for different images; they need not be contiguous or in rank
        order, since each batch's draws depend on its index alone (contiguous shares in rank
        order, :func:`~qerror.nn.parallel.shard`, give one process's figures). Without
        stochastic rounding ``first_batch`` changes nothing and is not checked.
        Of ``weights`` the quantized weights and their qparams are compared, not what
        summarises them (each rank reports its own): their error means, which
        :func:`quantize_weights` sums in an order that the thread count or the GPU sets,
        may differ in their last bits between ranks that quantized the same weights.
        A rank that fails before the merge (an argument or a batch its checks refuse, a
        batch its network cannot take, an error of its forward or its loader, no batch)
        does not leave the others waiting: it raises its own error and every other rank a
        RuntimeError naming it (see Raises). Outside a process group this changes nothing.

    Returns
    -------
    PropagationResult

    Raises
    ------
    UnsupportedModelError
        A layer (``Conv2d``, ``Linear``) or a BatchNorm is called more than once in one
        forward pass: its statistics would pool the calls under one site (refused from the
        graph where torch.fx traces the model, else where the second call is met). Or a
        ``Linear`` is fed more than two dimensions (N, T, ..., features): its per-channel
        figures would reduce over dimension 1, not over its output features.
    TypeError
        ``config`` is not a :class:`QuantConfig`.
    TypeError, ValueError
        ``local_samples``, ``pair_batch``, ``image_means`` or ``first_batch`` that is not an
        integer (TypeError: a bool, or a float even when integral) or is below its least
        (ValueError: 0, ``pair_batch`` 1).
    TypeError, ValueError
        Labels that are not integer class indices (TypeError: a bool, float or complex
        tensor, even of whole numbers), not one per image, or outside 0 to C - 1 for logits
        of C classes (ValueError): such images would count as wrong.
    ValueError
        Batches of images of another shape than the first's: ``drift`` and ``mse`` are
        means over every element, which weight an image by its size, while ``drift_se``,
        ``mse_se``, ``local_drift_se`` and ``drift_rel_rms_channel_debiased`` take images as
        equal units; across sizes the two would be estimates of different means. With
        ``across_ranks``, also ranks whose images differ in shape, whose batches have
        labels on some ranks only, that passed different arguments where they must agree,
        or whose batch indices overlap under stochastic rounding (see ``across_ranks``; on
        every rank).
    RuntimeError
        With ``across_ranks``, on every rank but those that failed before the ranks' sums
        were merged, which raise their own error (a float64 batch to a float32 network:
        torch's RuntimeError; integer images: TypeError): the message names each failed
        rank and its error, so that no rank waits for another in the merge's collective.

    See Also
    --------
    measure_many : several configurations on the same batches, one float chunk for all.

    Notes
    -----
    Batches are moved to the device of the model's parameters; the sums are kept on the
    CPU in float64. Every statistic is a function of sums over images, so merging the
    ranks' sums (:func:`qerror.nn.parallel.all_reduce_sum`) gives the single-process
    result up to the order of float64 additions, and the counts (accuracy, agreement,
    McNemar, saturation) exactly.
    """
    # config is checked in measure_many, where a rank's refusal reaches the other ranks
    return measure_many(model, batches, [config], act_qparams, weights=[weights],
                        corrections=[corrections], bn_stats=[bn_stats],
                        local_samples=local_samples, input_maps=input_maps,
                        pair_batch=pair_batch, image_means=image_means, progress=progress,
                        first_batch=first_batch, across_ranks=across_ranks)[0]


def measure_many(model: nn.Module, batches: Iterable, configs: Sequence[QuantConfig],
                 act_qparams=None, *, weights=None, corrections=None, bn_stats=None,
                 local_samples: int = 32, input_maps: bool = False,
                 pair_batch: int | None = None, image_means: int = 0, progress: bool = False,
                 first_batch: int = 0, across_ranks: bool = False) -> list[PropagationResult]:
    """:func:`measure` for several configurations at once: one float chunk serves them all.

    Each pass runs a batch of ``len(configs) + 1`` chunks of the same images: the float
    network's and one quantized network's per configuration. Every non-layer module treats
    images independently, so each configuration's chunk meets exactly what it would meet
    in :func:`measure`; the float network runs once instead of once per configuration.

    Parameters
    ----------
    configs : sequence of QuantConfig
        The configurations, in the order of the results.
    act_qparams : dict or sequence of dicts, optional
        One mapping that every configuration uses (e.g. the ranges of one bit width), or
        one per configuration.
    weights, corrections, bn_stats : sequence, optional
        One per configuration (None where a configuration has none), as for
        :func:`measure`; missing weights are computed from each ``config.weight``.
    pair_batch : int, optional
        Images per pass; each pass holds ``(len(configs) + 1) * pair_batch`` images.
        Default :func:`default_pair_batch` (``images``, ``len(configs)``): a pass holds
        about as many images as the batch's float forward, unless that would make chunks
        of fewer than 32 images (then more: 16 chunks of about 32 for 15 configurations),
        the passes evened out.
    local_samples, input_maps, image_means, progress, first_batch, across_ranks
        As for :func:`measure`.

    Returns
    -------
    list of PropagationResult
        One per configuration, each what :func:`measure` returns for it with the same
        ``pair_batch`` (equal up to the order of float64 additions; stochastic rounding
        draws the same numbers, keyed by each configuration's seed). With another
        ``pair_batch`` (measure's default differs), see :func:`measure` on pass sizes.
    """
    # read by truth value, 'False' would gather a share from every other rank
    across_ranks = check_flag(across_ranks, "across_ranks")
    shared = across_ranks and parallel.world()[1] > 1  # one process: its sums are merged
    failure = None
    image_shape = None
    inst = None
    n_img = fc = 0
    last = -1  # the index of this rank's last measured batch, from 0
    u = 0.0
    labelled = None
    logit_ref = _Moments()
    arms: list[_Arm] = []
    logit_err: list[_Moments] = []
    counts: list[list[int]] = []  # per arm: quant correct, agree, f_only, q_only
    agreed: list[tuple[str, Any, Any]] = []
    try:
        # the arguments are checked here, where a rank's refusal reaches the other ranks
        check_model(model)
        if isinstance(configs, QuantConfig):
            raise TypeError("configs must be a sequence of QuantConfig; measure takes one")
        configs = list(configs)
        if not configs:
            raise ValueError("measure_many needs at least one configuration")
        for c in configs:
            check_config(c, "a configuration (measure's config, each of measure_many's "
                            "configs)")
        check_count(first_batch, "first_batch (a batch index)")
        if pair_batch is not None:
            check_count(pair_batch, "pair_batch (a number of images)", 1)
        check_count(image_means, "image_means (a number of images)")
        check_count(local_samples, "local_samples (a number of images)")
        input_maps, progress = check_flag(input_maps, "input_maps"), check_flag(progress, "progress")
        k = len(configs)
        act_qparams = _per_config(act_qparams, k, "act_qparams", shared=True)
        weights = _per_config(weights, k, "weights")
        corrections = _per_config(corrections, k, "corrections")
        bn_stats = _per_config(bn_stats, k, "bn_stats")
        if shared:  # what every rank must pass alike: (name, compared, shown)
            agreed = [("local_samples", local_samples, local_samples),
                      ("input_maps", bool(input_maps), bool(input_maps)),
                      ("image_means", image_means, image_means)]
            agreed += agreement_terms(model=model, configs=configs, act_qparams=act_qparams,
                                      weights=weights, corrections=corrections,
                                      bn_stats=bn_stats)
        try:
            depths = path_depths(model)
        except UnsupportedModelError:  # a layer called twice: its statistics would be pooled
            raise
        except ValueError:  # an untraceable model has no path depths; execution order remains
            depths = {}
        weights = _arm_weights(model, configs, weights)
        for corr in corrections:
            _check_corrections(model, corr)
        # Each path's BatchNorm inputs are compared with the statistics that path normalises
        # with: the float path always with the model's running statistics, a quantized arm
        # with its re-estimated ones where given (bn_stats).
        bn_refs = []
        for stats in bn_stats:
            bns = _batchnorms(model, stats)
            own = {n: (m.running_mean.detach().double().cpu(),
                       m.running_var.detach().double().cpu()) for n, m in bns.items()}
            ref = dict(own)
            for n, st in (stats or {}).items():
                ref[n] = (st[0].detach().double().cpu(), st[1].detach().double().cpu())
            bn_refs.append({n: (own[n], ref[n]) for n in own})
        arms = [_Arm(c, a, w, corr, st, image_means) for c, a, w, corr, st in
                zip(configs, act_qparams, weights, corrections, bn_stats)]
        # the unit roundoff of the activations' sums: the coarsest of the parameters' and
        # the images' floating dtypes (a float32 network on float64 images computes in
        # float32)
        u = network_roundoff(model)
        counts = [[0, 0, 0, 0] for _ in arms]
        logit_err = [_Moments() for _ in arms]
        with eval_mode(model), torch.inference_mode():
            inst = _Instrument(model, arms, paired=True, local_samples=local_samples,
                               input_maps=input_maps)
            label = configs[0].label if k == 1 else f"{k} configurations"
            batches = iter_batches(progress_bar(batches, progress, label), model_device(model))
            for batch, start, x, y in _passes(batches, pair_batch, k):
                if image_shape is None:
                    image_shape = tuple(x.shape[1:])
                elif tuple(x.shape[1:]) != image_shape:
                    raise ValueError(
                        f"batch {batch} holds images of shape {tuple(x.shape[1:])}, the first "
                        f"{image_shape}: {_ONE_SIZE}; measure each image size apart")
                if x.is_floating_point():
                    u = max(u, unit_roundoff(x.dtype))
                inst.batch_index, inst.first_image = first_batch + batch, start
                inst.local_images = min(max(local_samples - start, 0), x.shape[0])
                inst.act_err_images = max(inst.local_images, int(start == 0))
                lf, lqs = inst.chunks(model(torch.cat([x] * (k + 1))))
                logit_ref.add(lf)
                pf = lf.argmax(1)
                if labelled is None:
                    labelled = y is not None
                if (y is not None) != labelled:
                    raise ValueError("some batches have labels and some do not")
                if y is not None:
                    y = check_labels(y, lf.shape[1], x.shape[0])
                cf = None if y is None else pf == y
                if cf is not None:
                    fc += int(cf.sum())
                for c, err, lq in zip(counts, logit_err, lqs):
                    err.add(lq - lf)
                    pq = lq.argmax(1)
                    c[1] += int((pf == pq).sum())
                    if cf is not None:
                        cq = pq == y
                        c[0] += int(cq.sum())
                        c[2] += int((cf & ~cq).sum())
                        c[3] += int((cq & ~cf).sum())
                n_img += x.shape[0]
                last = batch
        if n_img == 0:
            raise ValueError("measure needs at least one batch")
    except Exception as exc:
        if not shared:
            raise
        # the other ranks are on their way to the merge's first collective: this rank's
        # error goes there with them, and every rank raises (none waits for this one)
        failure = exc
    finally:
        if inst is not None:
            inst.close()
    ordered = [sorted(arm.sites.values(), key=lambda a: a.order) for arm in arms]
    if shared:
        keyed = None if failure is not None else drawn_batches(configs, first_batch, last + 1)
        merged, u = _merge_ranks([logit_ref, *logit_err],
                                 [s for sites in ordered for s in sites],
                                 [n_img, fc, *(v for c in counts for v in c)], image_shape,
                                 u, labelled, agreed, keyed, failure)
        n_img, fc = merged[:2]
        counts = [merged[2 + 4 * i:6 + 4 * i] for i in range(k)]
    lstd = math.sqrt(logit_ref.var(u))
    results = []
    for config, sites_k, w, bn_ref, err, (qc, agree, f_only, q_only) in zip(
            configs, ordered, weights, bn_refs, logit_err, counts):
        sites = []
        depth = 0
        for acc in sites_k:
            if acc.kind in ("conv", "linear"):
                depth += 1
            sites.append(_site_result(acc, depth, w, bn_ref, depths.get(acc.name), u=u))
        logits = LogitResult(
            n=n_img, float_correct=fc if labelled else None,
            quant_correct=qc if labelled else None, agree=agree,
            float_only=f_only if labelled else None, quant_only=q_only if labelled else None,
            sqnr_db=sqnr_db(logit_ref.sq(), err.sq()),
            drift_rel=err.mean() / lstd if lstd > 0 else math.nan)
        results.append(PropagationResult(config, tuple(sites), logits, n_img))
    return results


def local_error_means(model: nn.Module, batches: Iterable, config: QuantConfig,
                      act_qparams: Mapping[str, QParams] | None = None, *,
                      weights: Mapping[str, QuantizedWeights] | None = None,
                      progress: bool = False, first_batch: int = 0) -> dict[str, np.ndarray]:
    """Each conv/linear layer's mean local error, per output channel, over every image and
    position of ``batches``, from the float network's forward alone.

    A layer's local error is its quantized version (quantized weight, quantized input) minus
    its float version, both fed the float network's input at that layer: the
    ``local_drift_channel`` of :func:`measure` with ``local_samples`` at least the batch
    size. Here the float network runs alone and every layer computes its quantized version
    beside it (one more convolution per layer), without :func:`measure`'s quantized network
    and statistics. Stochastic rounding draws the numbers :func:`measure` draws for the local
    error (keyed by the batch's index from ``first_batch`` and the layer, hashed from each
    element's flat index in the batch), so the means equal :func:`measure`'s up to float
    rounding (tested): the sums' order, and the convolution of another batch size.

    Parameters
    ----------
    model, batches, config, act_qparams, weights, progress, first_batch
        As for :func:`measure` (no remedies: the local error is measured without them).

    Returns
    -------
    dict
        Layer name → float64 array (C_out,), in the order the forward pass meets the layers.

    Raises
    ------
    UnsupportedModelError
        As :func:`measure`: a layer called twice in one forward pass, or a ``Linear`` fed
        more than (N, features).
    ValueError
        No batch, an empty batch or one holding NaN or infinite values; activations
        quantized and ``act_qparams`` missing a layer.
    TypeError
        ``config`` not a QuantConfig; a batch that is not a floating-point tensor.
    """
    check_model(model)
    check_config(config)
    check_count(first_batch, "first_batch (a batch index)")
    arm = _Arm(config, act_qparams, _arm_weights(model, [config], [weights])[0], None, None)
    inst = None
    seen = 0
    try:
        with eval_mode(model), torch.inference_mode():
            inst = _Instrument(model, [arm], paired=False, local_only=True)
            for b, (x, _) in enumerate(iter_batches(
                    progress_bar(batches, progress, f"local error, {config.label}"),
                    model_device(model))):
                inst.batch_index, inst.first_image = first_batch + b, 0
                model(x)
                seen += 1
    finally:
        if inst is not None:
            inst.close()
    if seen == 0:
        raise ValueError("local_error_means needs at least one batch")
    return {acc.name: acc.local.mean_c()
            for acc in sorted(arm.sites.values(), key=lambda a: a.order)}


@contextlib.contextmanager
def paired_forward(model: nn.Module, config: QuantConfig,
                   act_qparams: Mapping[str, QParams] | None = None, *,
                   weights: Mapping[str, QuantizedWeights] | None = None,
                   corrections: Mapping[str, torch.Tensor] | None = None,
                   bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   first_batch: int = 0):
    """Within the block, ``model(torch.cat([x, x]))`` is the paired pass of :func:`measure`
    without its statistics: the first half of the output is the float network's, the second
    the quantized network's, on the same images.

    What :func:`measure` costs beyond this pass is the cost of its measurements; the bench
    (``python -m studies.bench --only drift``) times the two against each other. Arguments
    as for :func:`quantized_forward`; stochastic rounding draws the stream of each call from
    its batch index, ``first_batch`` (an int from 0, as for :func:`measure`: the index of
    the block's first batch among all the batches, so that a share of them rounds as it
    does within the whole) plus the number of calls before it in the block. The model's
    BatchNorms must be in evaluation mode (ValueError otherwise): in training mode they
    would normalise the two halves together.
    """
    with _uninstrumented(model, config, act_qparams, weights, corrections, bn_stats,
                         paired=True, first_batch=first_batch) as inst:
        yield inst


@contextlib.contextmanager
def quantized_forward(model: nn.Module, config: QuantConfig,
                      act_qparams: Mapping[str, QParams] | None = None, *,
                      weights: Mapping[str, QuantizedWeights] | None = None,
                      corrections: Mapping[str, torch.Tensor] | None = None,
                      bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                      first_batch: int = 0):
    """Within the block, ``model(x)`` runs the quantized network alone (no float half).

    Used by BatchNorm re-estimation and by anything that needs the simulated model
    itself; the model's modules are restored on exit, even after an error. ``corrections``
    and ``bn_stats`` (re-estimated BatchNorm statistics, used in eval mode) are the
    remedies, as in :func:`measure`. Stochastic rounding draws the stream of each call from
    its batch index, ``first_batch`` (an int from 0, as for :func:`measure`) plus the number
    of calls before it in the block.
    """
    with _uninstrumented(model, config, act_qparams, weights, corrections, bn_stats,
                         paired=False, first_batch=first_batch) as inst:
        yield inst


@contextlib.contextmanager
def paired_forward_many(model: nn.Module, configs: Sequence[QuantConfig], act_qparams=None, *,
                        weights=None, corrections=None, bn_stats=None):
    """Within the block, ``model(torch.cat([x] * (len(configs) + 1)))`` is the K-way pass of
    :func:`measure_many` without its statistics: the first chunk of the output is the float
    network's, chunk ``k + 1`` the quantized network of ``configs[k]``, on the same images.

    What :func:`measure_many` costs beyond this pass is the cost of its measurements; the
    bench times the two against each other. Arguments as for :func:`measure_many`.
    """
    with _uninstrumented(model, configs, act_qparams, weights, corrections, bn_stats,
                         paired=True) as inst:
        yield inst


@contextlib.contextmanager
def _uninstrumented(model, configs, act_qparams, weights, corrections, bn_stats, *,
                    paired: bool, first_batch: int = 0):
    """The model patched to run the quantized network(s) (paired or alone), measuring
    nothing; one configuration, or (paired) several, each with its own chunk; the first
    call's batch index ``first_batch``, each later call's one more."""
    check_model(model)
    check_count(first_batch, "first_batch (a batch index)")
    given = type(configs).__name__
    configs = [configs] if isinstance(configs, QuantConfig) else (
        list(configs) if isinstance(configs, Iterable) else [])
    k = len(configs)
    if not configs or not all(isinstance(c, QuantConfig) for c in configs):
        raise TypeError(f"configs must be one QuantConfig or a non-empty sequence of them, "
                        f"got {given}")
    act_qparams = _per_config(act_qparams, k, "act_qparams", shared=True)
    weights, corrections, bn_stats = (_per_config(v, k, what) for v, what in (
        (weights, "weights"), (corrections, "corrections"), (bn_stats, "bn_stats")))
    for corr, stats in zip(corrections, bn_stats):
        _batchnorms(model, stats)
        _check_corrections(model, corr)
    training = [n or "the model" for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if paired and training:
        raise ValueError(f"{training[0]!r} is a BatchNorm in training mode: the paired pass "
                         "runs the float and quantized networks in one batch, which it would "
                         "normalise together; call model.eval() first (measure does)")
    weights = _arm_weights(model, configs, weights)
    inst = _Instrument(model, [_Arm(*arm) for arm in zip(configs, act_qparams, weights,
                                                        corrections, bn_stats)],
                       paired=paired, collect=False)
    inst.batch_index = first_batch
    try:
        yield inst
    finally:
        inst.close()
