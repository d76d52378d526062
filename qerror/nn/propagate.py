"""Quantization error travelling through a CNN: the float and the quantized network side by side.

The instrumented model runs a *paired batch*: the float images and a copy of them are
stacked along the batch axis, and every convolution and linear layer computes the first
half with its float weights and input and the second half with fake-quantized weights and a
fake-quantized input. Every other module of a torchvision-style CNN in evaluation mode
(BatchNorm with running statistics, ReLU, pooling, residual additions, flattening) treats
samples independently, so the two halves never mix and each tensor inside the network holds
the float activation and its quantized counterpart at once. Accumulated error, drift, SQNR,
saturation and BatchNorm inconsistency are then reductions of the two halves, streamed
batch by batch; nothing is kept per image. Each batch is measured in two paired passes of
half its images (``pair_batch``), so each pass holds as many images as the batch's float
forward (peak memory about 1.4× the float forward's; ``python -m studies.bench --only drift``).

Sites (DESIGN §2):

* every ``Conv2d`` and ``Linear``: the quantizer at its input (per tensor, affine by default),
  its weights (per channel), the *local* error (quantized layer minus float layer, both fed
  the float input; measured on the first ``local_samples`` images of each batch) and the
  *accumulated* error at its output;
* every ``BatchNorm2d``: the batch statistics of its input under both paths against the
  running statistics it normalises with, and the accumulated error at its output;
* every residual block (a module with BatchNorm children and a ``downsample`` attribute or
  named ``*Block``/``Bottleneck``): the accumulated error at its output;
* the logits: accuracy of both paths, agreement, McNemar counts, SQNR.

Hooks and patched ``forward`` attributes are removed in ``finally`` blocks, so a failing
forward pass leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

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
    path_depths,
)
from qerror.nn.bn import BNInconsistency
from qerror.nn.growth import debiased_rms
from qerror.quantizer import QParams, QuantSpec, fake_quantize
from qerror.rounding import RoundingMode

__all__ = [
    "LogitResult",
    "PropagationResult",
    "QuantConfig",
    "QuantizedWeights",
    "SiteResult",
    "Target",
    "calibrate_activations",
    "default_pair_batch",
    "measure",
    "output_key",
    "paired_forward",
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
        Key of stochastic rounding (each layer and batch draws from its own stream).
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


# --------------------------------------------------------------------------- calibration

OUTPUT_SUFFIX = ".output"


def output_key(name: str) -> str:
    """Key of a BatchNorm's or block's output quantizer in the activation qparams."""
    return name + OUTPUT_SUFFIX


def calibrate_activations(model: nn.Module, batches: Iterable, spec: QuantSpec,
                          policy: RangePolicy = RangePolicy(), *, outputs: bool = False, sample_per_batch: int = 1 << 15,
                          seed: int = 0, progress: bool = False) -> dict[str, QParams]:
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
    dict
        Layer name → :class:`QParams`.
    """
    check_model(model)
    if spec.axis is not None:
        raise ValueError("activation calibration is per tensor: use a spec with axis=None")
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
        raise UnsupportedModelError(f"layer {never[0]!r} was never called in the forward pass")
    return {n: obs.qparams() for n, obs in observers.items()}


@dataclass(frozen=True)
class QuantizedWeights:
    """One layer's fake-quantized weight, its qparams and its error (in LSB)."""

    weight: torch.Tensor
    qparams: QParams
    error_mean_lsb: float
    error_mse_lsb: float
    saturation: float


def quantize_weights(model: nn.Module, spec: QuantSpec, *, seed: int = 0
                     ) -> dict[str, QuantizedWeights]:
    """Fake-quantize every conv/linear weight with scales calibrated on the weight itself."""
    out = {}
    for i, (name, m) in enumerate((n, m) for n, m in model.named_modules()
                                  if isinstance(m, LAYERS)):
        w = m.weight.detach()
        qp = calibrate(w, spec)
        key = int(np.random.SeedSequence([seed, 1, i]).generate_state(1)[0]) \
            if spec.rounding.is_random else None
        wq, sat = fake_quantize(w, spec, qp.scale, qp.zero_point, generator=key,
                                return_saturation=True)
        s = torch.as_tensor(np.asarray(qp.scale), dtype=torch.float64)
        if spec.axis is not None:
            s = s.reshape((-1,) + (1,) * (w.ndim - 1))
        e = (wq.double() - w.double()) / s
        out[name] = QuantizedWeights(wq, qp, float(e.mean()), float((e * e).mean()),
                                     float((sat.low.sum() + sat.high.sum()) / sat.total.sum()))
    return out


# --------------------------------------------------------------------------- accumulators

def _channel_dims(t: torch.Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, t.ndim))


def _sums(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per (image, channel) of ``t`` (N, C, ...): Σ and Σ² over the remaining dimensions,
    as float64 CPU tensors (N, C), and the number of elements each sums."""
    t = t.detach()
    dims = tuple(range(2, t.ndim))
    per_channel = int(np.prod(t.shape[2:])) if t.ndim > 2 else 1
    if per_channel == 1:
        s = t.reshape(t.shape[0], -1)
        q = s * s
    else:
        # one pass for the sum of squares, no temporary (half the cost of (t*t).sum)
        s = t.sum(dim=dims)
        q = torch.linalg.vector_norm(t, dim=dims).square_()
    # Sums leave the device here: (N, C) at most, and the results are numpy arrays.
    return s.double().cpu(), q.double().cpu(), per_channel


class _Moments:
    """Per-channel Σ and Σ² of a quantity, plus per-image Σ of its mean (for standard errors)."""

    __slots__ = ("img_c1", "img_c2", "img_n", "img_q1", "img_q2", "img_s1", "img_s2", "keep",
                 "kept", "n", "s1", "s2")

    def __init__(self, keep: int = 0):
        self.n = 0
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
        self.add_sums(*_sums(t), per_image=per_image)

    def add_sums(self, s: torch.Tensor, q: torch.Tensor, per_channel: int,
                 per_image: bool = True) -> None:
        """Add images whose per (image, channel) Σ and Σ² over ``per_channel`` elements are
        ``s`` and ``q`` (float64, CPU, shape (N, C); see :func:`_sums`)."""
        cs, cq = s.sum(0), q.sum(0)
        if self.s1 is None:
            self.s1, self.s2 = cs, cq
        else:
            self.s1, self.s2 = self.s1 + cs, self.s2 + cq
        self.n += s.shape[0] * per_channel
        if per_image:
            m1 = s.sum(1) / (per_channel * s.shape[1])
            m2 = q.sum(1) / (per_channel * s.shape[1])
            self.img_n += s.shape[0]
            self.img_s1 += float(m1.sum())
            self.img_s2 += float((m1 * m1).sum())
            self.img_q1 += float(m2.sum())
            self.img_q2 += float((m2 * m2).sum())
            mc = s / per_channel  # (N, C): each image's channel means
            c1, c2 = mc.sum(0), (mc * mc).sum(0)
            if self.img_c1 is None:
                self.img_c1, self.img_c2 = c1, c2
            else:
                self.img_c1, self.img_c2 = self.img_c1 + c1, self.img_c2 + c2
            room = self.keep - sum(k.shape[0] for k in self.kept)
            if room > 0:
                self.kept.append(mc[:room].clone())

    # per channel
    def mean_c(self) -> np.ndarray:
        return (self.s1 / self.n).numpy()

    def sq_c(self) -> np.ndarray:
        return (self.s2 / self.n).numpy()

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


def _merge_ranks(moments: list[_Moments], sites: list[_SiteAcc], counts: list[int]
                 ) -> list[int]:
    """Sum every rank's accumulators into this rank's (in place) and return the summed
    ``counts``; the images kept for resampling are gathered in rank order.

    Integers are summed exactly as int64; float sums as float64, so the merged sums differ
    from one process's only by the order of the additions.
    """
    def tensors(m):
        return [getattr(m, k) for k in _MOMENT_TENSORS]

    holders = [m for m in moments] + [getattr(a, k) for a in sites for k in _SITE_MOMENTS]
    layout = [(a.name, a.kind, a.order) for a in sites]
    shapes = [[None if t is None else tuple(t.shape) for t in tensors(m)] for m in holders]
    shapes += [[None if getattr(a, k) is None else tuple(getattr(a, k).shape)
                for k in _SITE_TENSORS] for a in sites]
    if len({repr(x) for x in parallel.gather_objects((layout, shapes))}) != 1:
        raise RuntimeError("the ranks measured different sites or shapes; every rank must run "
                           "the same model and configuration on at least one batch")
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
    for m in holders:
        if m.keep:
            kept = [torch.cat(k) for k in parallel.gather_objects(m.kept) if k]
            m.kept = [torch.cat(kept)[:m.keep]] if kept else []
    return merged_counts


# --------------------------------------------------------------------------- instrumentation

def _key(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


class _Instrument:
    """Patches a model for one pass over the data; :meth:`close` restores it."""

    def __init__(self, model: nn.Module, config: QuantConfig, act_qparams, weights,
                 *, paired: bool, corrections=None, bn_stats=None, local_samples: int = 0,
                 collect: bool = True, input_maps: bool = False, image_means: int = 0):
        self.model, self.config, self.paired = model, config, paired
        self.image_means = image_means
        self.act_qparams = act_qparams or {}
        self.weights = weights or {}
        self.corrections = corrections or {}
        self.bn_stats = bn_stats or {}
        self.collect = collect
        self.input_maps = input_maps
        self.batch_index = 0
        # Within a batch measured in several paired passes: the pass's index (its stochastic
        # stream), and how many of its images the local error and the quantizer's own error
        # use (the first ``local_samples`` images of the batch, whichever pass holds them).
        self.chunk = 0
        self.local_images = local_samples
        self.act_err_images = max(1, local_samples)
        self.sites: dict[str, _SiteAcc] = {}
        self.order = 0
        self._last_output = None  # (tensor, site, quantized half's sums) of the last layer
        self._handles = []
        self._patched = []
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]
        for idx, (n, m) in enumerate(self.layers):
            if config.activation is not None and n not in self.act_qparams:
                raise ValueError(f"no activation qparams for layer {n!r}; calibrate with "
                                 "qerror.nn.propagate.calibrate_activations on the same model")
            if config.weight is not None and n not in self.weights:
                raise ValueError(f"no quantized weight for layer {n!r}; use "
                                 "qerror.nn.propagate.quantize_weights on the same model")
            self._patch(m, self._layer_forward(idx, n, m))
        for idx, (n, m) in enumerate(model.named_modules()):
            bn_site, block_site = isinstance(m, nn.BatchNorm2d), is_block(m)
            if (bn_site and config.bn_outputs) or (block_site and config.block_outputs):
                if output_key(n) not in self.act_qparams:
                    raise ValueError(f"no output qparams for {n!r}; calibrate with "
                                     "calibrate_activations(..., outputs=True)")
                # registered first: the statistics hooks below see the quantized output
                self._handles.append(m.register_forward_hook(
                    self._quantize_output(idx, n, "bn" if bn_site else "block")))
            if bn_site:
                if n in self.bn_stats:
                    self._patch(m, self._bn_forward(n, m))
                if collect and paired:
                    self._handles.append(m.register_forward_hook(self._bn_hook(n)))
            elif collect and paired and block_site:
                self._handles.append(m.register_forward_hook(self._out_hook(n, "block")))
        self._handles.append(model.register_forward_hook(self._next_batch))

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

    def site(self, name: str, kind: str) -> _SiteAcc:
        acc = self.sites.get(name)
        if acc is None:
            keep = self.image_means if kind in ("conv", "linear") else 0
            acc = self.sites[name] = _SiteAcc(name, kind, self.order, keep)
            self.order += 1
        return acc

    # -- quantization of one layer's input
    def _quantize_input(self, idx: int, name: str, x: torch.Tensor, acc: _SiteAcc | None,
                        stream: int):
        spec = self.config.activation
        if spec is None:
            return x
        qp = self.act_qparams[name]
        chunk = (self.chunk,) if self.chunk else ()
        key = _key(self.config.seed, 2, idx, self.batch_index, stream, *chunk) \
            if spec.rounding.is_random else None
        if acc is None:  # nothing measured here: the quantizer alone, no counting
            return fake_quantize(x, spec, qp.scale, qp.zero_point, generator=key)
        xq, sat = fake_quantize(x, spec, qp.scale, qp.zero_point, generator=key,
                                return_saturation=True)
        acc.sat_low += int(sat.low)
        acc.sat_high += int(sat.high)
        acc.sat_total += int(sat.total)
        # the quantizer's own error, on the images the local error uses
        m = min(self.act_err_images, x.shape[0])
        if m:
            acc.act_err.add((xq[:m] - x[:m]) / qp.scale, per_image=False)
        return xq

    def _quantize_output(self, idx: int, name: str, kind: str) -> Callable:
        key = output_key(name)
        site = 1_000_000 + idx  # a stochastic stream apart from the layers' inputs

        def hook(module, args, out):
            if not self.paired:
                return self._quantize_input(site, key, out, None, 0)
            half = out.shape[0] // 2
            acc = self.site(name, kind) if self.collect else None
            return torch.cat([out[:half], self._quantize_input(site, key, out[half:], acc, 0)])
        return hook

    def _layer_forward(self, idx: int, name: str, module: nn.Module) -> Callable:
        conv = isinstance(module, nn.Conv2d)
        config = self.config

        def op(x, w, b):
            return module._conv_forward(x, w, b) if conv else F.linear(x, w, b)

        def quant_params():
            w = self.weights[name].weight if config.weight is not None else module.weight
            b = module.bias
            corr = self.corrections.get(name)
            if corr is not None:
                corr = corr.to(module.weight.device, module.weight.dtype)
                b = corr if b is None else b + corr
            return w, b

        def forward(x):
            w_hat, b_hat = quant_params()
            if not self.paired:
                return op(self._quantize_input(idx, name, x, None, 0), w_hat, b_hat)
            half = x.shape[0] // 2
            xf, xq = x[:half], x[half:]
            yf = op(xf, module.weight, module.bias)
            acc = self.site(name, "conv" if conv else "linear") if self.collect else None
            yq = op(self._quantize_input(idx, name, xq, acc, 0), w_hat, b_hat)
            if acc is not None:  # the error first: its temporary is gone before the cat
                acc.err.add(yq - yf)
            out = torch.cat([yf, yq])
            yf = yq = out[:half]  # the halves themselves are freed: the pass holds one copy
            q_sums = None
            if acc is not None:
                # both halves' sums in one reduction of the pass's output: the float half's
                # are the site's reference, the quantized half's those of a BatchNorm it feeds
                s, q, per_channel = _sums(out)
                acc.ref.add_sums(s[:half], q[:half], per_channel, per_image=False)
                q_sums = s[half:], q[half:], per_channel
                m = min(self.local_images, half)
                if m:
                    xl = self._quantize_input(idx, name, xf[:m], None, 1)
                    acc.local.add(op(xl, w_hat, b_hat) - yf[:m], per_image=True)
                if self.input_maps:
                    self._input_map(acc, name, xf)
            self._last_output = (out, acc, q_sums)
            return out

        return forward

    def _input_map(self, acc: _SiteAcc, name: str, xf: torch.Tensor) -> None:
        x = xf.detach()
        if self.config.activation is not None:
            qp = self.act_qparams[name]
            origin = -float(qp.zero_point) * float(qp.scale)
        else:
            origin = 0.0
        s = x.sum(0).double().cpu()
        p, n = (x > origin).sum(0).double().cpu(), (x < origin).sum(0).double().cpu()
        if acc.in_sum is None:
            acc.in_sum, acc.in_pos, acc.in_neg = s, p, n
        else:
            acc.in_sum += s
            acc.in_pos += p
            acc.in_neg += n
        acc.in_n += x.shape[0]

    def _bn_forward(self, name: str, module: nn.BatchNorm2d) -> Callable:
        mean_q, var_q = self.bn_stats[name]

        def forward(x):
            args = (module.weight, module.bias, False, 0.0, module.eps)
            if not self.paired:  # the quantized path alone: its own statistics throughout
                return F.batch_norm(x, mean_q.to(x), var_q.to(x), *args)
            half = x.shape[0] // 2
            yf = F.batch_norm(x[:half], module.running_mean, module.running_var, *args)
            yq = F.batch_norm(x[half:], mean_q.to(x.dtype), var_q.to(x.dtype), *args)
            return torch.cat([yf, yq])

        return forward

    def _bn_hook(self, name: str) -> Callable:
        def hook(module, args, out):
            x = args[0]
            half = x.shape[0] // 2
            acc = self.site(name, "bn")
            last = self._last_output
            if last is not None and last[0] is x and last[1] is not None:
                acc.bn_input_of = last[1]
                acc.bn_q.add_sums(*last[2], per_image=False)
            else:
                s, q, per_channel = _sums(x)
                acc.bn_f.add_sums(s[:half], q[:half], per_channel, per_image=False)
                acc.bn_q.add_sums(s[half:], q[half:], per_channel, per_image=False)
        return hook

    def _out_hook(self, name: str, kind: str) -> Callable:
        def hook(module, args, out):
            half = out.shape[0] // 2
            acc = self.site(name, kind)
            acc.err.add(out[half:] - out[:half])
            s, q, per_channel = _sums(out[:half])
            acc.ref.add_sums(s, q, per_channel, per_image=False)
        return hook


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SiteResult:
    """What was measured at one site (layer output, BatchNorm, block output).

    Whole-tensor figures are floats; per-channel figures are arrays of shape (C,).
    ``None`` where a figure does not apply to the site's kind or was not measured.
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
    drift_image_channel: np.ndarray | None = field(default=None, repr=False)
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


def _site_result(acc: _SiteAcc, depth: int, weights, bn_ref,
                 path_depth: int | None = None) -> SiteResult:

    err, ref = acc.err, acc.ref
    kw = {}
    power = ref.sq() if ref.n else math.nan
    if err.n:
        mean_f = ref.mean()
        std_f = math.sqrt(max(power - mean_f**2, 0.0))
        std_c = np.sqrt(np.maximum(ref.sq_c() - ref.mean_c() ** 2, 0.0))
        drift_c = err.mean_c()
        live = std_c > 0
        rel_c = drift_c[live] / std_c[live]
        var_c = err.var_mean_c()
        debiased = math.nan if var_c is None else debiased_rms(drift_c, var_c, std_c)
        if err.kept:
            kw["drift_image_channel"] = torch.cat(err.kept).numpy()
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
                  local_sqnr_db=sqnr_db(power, acc.local.sq()))
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
        mean_run, var_run = bn_ref[acc.name]
        kw["bn"] = BNInconsistency.from_sums(bn_f, acc.bn_q, mean_run, var_run)
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
    error, ``-inf`` for a zero signal with error."""
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(power / noise) if power > 0 else -math.inf


# --------------------------------------------------------------------------- entry points

def _batchnorms(model: nn.Module, bn_stats) -> dict[str, nn.BatchNorm2d]:
    """The model's BatchNorm2d layers by name; ``bn_stats`` may name only those."""
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for n in bn_stats or {}:
        if n not in bns:
            raise ValueError(f"bn_stats names {n!r}, which is not a BatchNorm2d of the model")
    return bns


def default_pair_batch(images: int) -> int:
    """Images per paired pass that :func:`measure` takes from a batch of ``images`` by default:
    ``ceil(images / 2)``, so a paired pass holds as many images as the batch's float forward."""
    return max(1, -(-int(images) // 2))


def _passes(batches: Iterable, pair_batch: int | None):
    """The paired passes over ``batches``: (batch index, pass index within the batch, first
    image of the pass within the batch, images, labels); a batch is measured in passes of
    ``pair_batch`` images, by default :func:`default_pair_batch`.
    """
    for b, (x, y) in enumerate(batches):
        size = pair_batch if pair_batch is not None else default_pair_batch(x.shape[0])
        for c, start in enumerate(range(0, x.shape[0], size)):
            yield b, c, start, x[start:start + size], None if y is None else y[start:start + size]


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
        Images ``(N, ...)`` or ``(images, labels)`` pairs.
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
        values above and below the quantizer's real zero (for predicted drift).
    pair_batch : int, optional
        Images per paired forward pass: each batch is measured in consecutive passes of
        this many images, each holding the activations of ``2 * pair_batch`` images.
        Default: half the batch (rounded up), so that measuring a batch holds as many
        images as its float forward; at least the batch size measures it in one pass.
        Stochastic rounding draws each pass's stream from the batch's index and the
        pass's index within it, so its draws depend on ``pair_batch``; nothing else does
        (beyond the order of float64 additions).
    image_means : int
        Keep, for every conv/linear output, the per-channel mean drift of each of the first
        ``image_means`` images (``SiteResult.drift_image_channel``, shape (N, C)), so that
        statistics can be resampled over images (:mod:`qerror.nn.growth`).
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
        batches. Outside a process group this changes nothing.

    Returns
    -------
    PropagationResult

    Notes
    -----
    Batches are moved to the device of the model's parameters; the sums are kept on the
    CPU in float64. Every statistic is a function of sums over images, so merging the
    ranks' sums (:func:`qerror.nn.parallel.all_reduce_sum`) gives the single-process
    result up to the order of float64 additions, and the counts (accuracy, agreement,
    McNemar, saturation) exactly.
    """
    check_model(model)
    if isinstance(first_batch, bool) or not isinstance(first_batch, int) or first_batch < 0:
        raise ValueError(f"first_batch must be a batch index >= 0, got {first_batch!r}")
    if pair_batch is not None and (isinstance(pair_batch, bool) or int(pair_batch) < 1):
        raise ValueError(f"pair_batch must be a positive number of images, got {pair_batch!r}")
    if isinstance(image_means, bool) or not isinstance(image_means, int) or image_means < 0:
        raise ValueError(f"image_means must be a number of images >= 0, got {image_means!r}")
    try:
        depths = path_depths(model)
    except ValueError:  # an untraceable model has no path depths; execution order remains
        depths = {}
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if weights is None and config.weight is not None:
        weights = quantize_weights(model, config.weight, seed=config.seed)
    bns = _batchnorms(model, bn_stats)
    bn_ref = {n: (m.running_mean.detach().double().cpu(), m.running_var.detach().double().cpu())
              for n, m in bns.items()}
    for n, stats in (bn_stats or {}).items():
        bn_ref[n] = (stats[0].detach().double().cpu(), stats[1].detach().double().cpu())
    inst = None
    n_img = 0
    fc = qc = agree = f_only = q_only = 0
    labelled = None
    logit_err, logit_ref = _Moments(), _Moments()
    try:
        with eval_mode(model), torch.inference_mode():
            inst = _Instrument(model, config, act_qparams, weights, paired=True,
                               corrections=corrections, bn_stats=bn_stats,
                               local_samples=local_samples, input_maps=input_maps,
                               image_means=image_means)
            batches = iter_batches(progress_bar(batches, progress, config.label),
                                   model_device(model))
            for batch, chunk, start, x, y in _passes(batches, pair_batch):
                inst.batch_index, inst.chunk = first_batch + batch, chunk
                inst.local_images = min(max(local_samples - start, 0), x.shape[0])
                inst.act_err_images = max(inst.local_images, int(start == 0))
                out = model(torch.cat([x, x]))
                half = x.shape[0]
                lf, lq = out[:half], out[half:]
                logit_err.add(lq - lf)
                logit_ref.add(lf)
                pf, pq = lf.argmax(1), lq.argmax(1)
                agree += int((pf == pq).sum())
                if labelled is None:
                    labelled = y is not None
                if (y is not None) != labelled:
                    raise ValueError("some batches have labels and some do not")
                if y is not None:
                    cf, cq = pf == y, pq == y
                    fc += int(cf.sum())
                    qc += int(cq.sum())
                    f_only += int((cf & ~cq).sum())
                    q_only += int((cq & ~cf).sum())
                n_img += half
    finally:
        if inst is not None:
            inst.close()
    if n_img == 0:
        raise ValueError("measure needs at least one batch")
    if across_ranks:
        n_img, fc, qc, agree, f_only, q_only = _merge_ranks(
            [logit_err, logit_ref], sorted(inst.sites.values(), key=lambda a: a.order),
            [n_img, fc, qc, agree, f_only, q_only])
        if len({bool(v) for v in parallel.gather_objects(labelled)}) != 1:
            raise ValueError("some ranks' batches have labels and some do not")
    sites = []
    depth = 0
    for acc in sorted(inst.sites.values(), key=lambda a: a.order):
        if acc.kind in ("conv", "linear"):
            depth += 1
        sites.append(_site_result(acc, depth, weights, bn_ref, depths.get(acc.name)))
    lstd = math.sqrt(max(logit_ref.sq() - logit_ref.mean() ** 2, 0.0))
    logits = LogitResult(
        n=n_img, float_correct=fc if labelled else None, quant_correct=qc if labelled else None,
        agree=agree, float_only=f_only if labelled else None,
        quant_only=q_only if labelled else None, sqnr_db=sqnr_db(logit_ref.sq(), logit_err.sq()),
        drift_rel=logit_err.mean() / lstd if lstd > 0 else math.nan)
    return PropagationResult(config, tuple(sites), logits, n_img)


@contextlib.contextmanager
def paired_forward(model: nn.Module, config: QuantConfig,
                   act_qparams: Mapping[str, QParams] | None = None, *,
                   weights: Mapping[str, QuantizedWeights] | None = None,
                   corrections: Mapping[str, torch.Tensor] | None = None,
                   bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Within the block, ``model(torch.cat([x, x]))`` is the paired pass of :func:`measure`
    without its statistics: the first half of the output is the float network's, the second
    the quantized network's, on the same images.

    What :func:`measure` costs beyond this pass is the cost of its measurements; the bench
    (``python -m studies.bench --only drift``) times the two against each other. Arguments
    as for :func:`quantized_forward`; stochastic rounding draws the stream of each call from
    the number of calls before it in the block.
    """
    with _uninstrumented(model, config, act_qparams, weights, corrections, bn_stats,
                         paired=True) as inst:
        yield inst


@contextlib.contextmanager
def quantized_forward(model: nn.Module, config: QuantConfig,
                      act_qparams: Mapping[str, QParams] | None = None, *,
                      weights: Mapping[str, QuantizedWeights] | None = None,
                      corrections: Mapping[str, torch.Tensor] | None = None,
                      bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Within the block, ``model(x)`` runs the quantized network alone (no float half).

    Used by BatchNorm re-estimation and by anything that needs the simulated model
    itself; the model's modules are restored on exit, even after an error. ``corrections``
    and ``bn_stats`` (re-estimated BatchNorm statistics, used in eval mode) are the
    remedies, as in :func:`measure`.
    """
    with _uninstrumented(model, config, act_qparams, weights, corrections, bn_stats,
                         paired=False) as inst:
        yield inst


@contextlib.contextmanager
def _uninstrumented(model, config, act_qparams, weights, corrections, bn_stats, *,
                    paired: bool):
    """The model patched to run the quantized network (paired or alone), measuring nothing."""
    check_model(model)
    _batchnorms(model, bn_stats)
    if weights is None and config.weight is not None:
        weights = quantize_weights(model, config.weight, seed=config.seed)
    inst = _Instrument(model, config, act_qparams, weights, paired=paired,
                       corrections=corrections, bn_stats=bn_stats, collect=False)
    try:
        yield inst
    finally:
        inst.close()
