"""qerror's fake-quantization simulation held against PyTorch's real INT8 kernels.

For one ``nn.Conv2d`` (optionally with its ``BatchNorm2d`` folded in, and a ReLU fused
after) or ``nn.Linear``, fed a float input, with given scales and zero points
(per-tensor affine activations, per-channel symmetric INT8 weights, per-tensor output),
the output integer codes are computed four ways:

* **real**: ``torch.quantize_per_tensor`` of the input, ``torch.quantize_per_channel``
  of the weight, and PyTorch's quantized CPU kernel (``quantized::conv2d``,
  ``quantized::conv2d_relu``, ``quantized::linear``, ``quantized::linear_relu``);
* :attr:`Pipeline.FLOAT`: what a fake-quantized network computes: qerror's
  :func:`~qerror.quantizer.fake_quantize` of input and weight, a float32 convolution
  plus the float bias (and ReLU), then :func:`~qerror.quantizer.quantize` of the result;
* :attr:`Pipeline.INTEGER`: qerror's codes of input and weight, their exact integer
  accumulation, and the float32 bias and requantization step of the kernel's library
  (:class:`Library`: FBGEMM's or oneDNN's);
* :attr:`Pipeline.SATURATING`: :attr:`Pipeline.INTEGER` plus the int16 saturation of the
  AVX2 instruction the library multiplies with, in the library's own pairing.

Each simulation runs with qerror's :attr:`~qerror.quantizer.ScaleArithmetic.EXACT` and
:attr:`~qerror.quantizer.ScaleArithmetic.RECIPROCAL` arithmetic, and its codes are
compared with the real ones: the fraction that agree exactly, the largest difference in
LSB of the output quantizer and the histogram of the differences ``Δ = simulated - real``.
:func:`crosscheck_model` does this for every convolution and linear layer of a
torchvision-style ResNet, each fed its float input, streaming over batches.

Where the codes differ, and why (FBGEMM, PyTorch 2.x)
----------------------------------------------------
1. *Input and weight codes.* PyTorch quantizes as ``nearbyint(x · fl(1/s)) + z``, which is
   RECIPROCAL arithmetic bit for bit; EXACT rounds the exact quotient ``x/s`` and can
   differ by one code where ``x/s`` lies within a rounding error of a half-integer.
2. *Accumulation.* The kernel sums ``(q_x - z_x) q_w`` exactly in int32 (the zero point is
   taken out through the weights' column sums). The float pipeline sums the products of
   the dequantized values in float32, each addition rounded.
3. *Bias and requantization.* The kernel turns the int32 accumulator ``a`` into an output
   code as ``nearbyint((fl(a) + fl(b / m_c)) · fl(m_c / s_y)) + z_y`` in float32, with
   ``m_c = fl(s_x s_w[c])``: the float bias is divided into accumulator units (older
   PyTorch versions rounded it to int32 at scale ``s_x s_w[c]`` instead) and one float32
   multiplier rescales. The float pipeline computes ``y = Σ x̂ ŵ + b`` and rounds ``y / s_y``.
   Items 2 and 3 change the value being rounded by a relative few float32 ulps, so they
   move a code only where ``y / s_y`` lies that close to a half-integer, and then by one.
   FBGEMM converts the rounded value to int32 before adding ``z_y``, and from ``2³¹`` up
   (or for a NaN, where ``0 · ∞`` arises from scales whose products leave float32) that
   conversion gives ``-2³¹``: such an output gets the lowest code (``z_y`` with a
   fused ReLU), not the highest (measured; the integer pipelines do so too, the float one
   does not).
4. *int16 saturation.* On AVX2, FBGEMM multiplies with ``vpmaddubsw``, which adds the
   products of two adjacent (uint8 activation, int8 weight) pairs into an int16 with
   saturation before they reach the int32 accumulator. ``255 · 127 · 2 = 64770`` does
   not fit, so with full-range 8-bit activations and large weights the accumulator is
   clipped; the output can be off by many LSB. This is why PyTorch's default FBGEMM/x86
   observers use ``reduce_range=True`` (7-bit activations, which cannot saturate).
   :attr:`Pipeline.SATURATING` reproduces it: the reduction index of the convolution is
   ordered as FBGEMM's im2col orders it (kernel row, kernel column, input channel), and
   pairs ``(2j, 2j+1)`` of it saturate, the padding's zero-point codes included. For
   ``groups=1`` FBGEMM runs a 3x3 convolution with padding 1, dilation 1, stride 1 or 2
   and ``C_in == C_out`` of 8 or 16 through its groupwise kernel
   (``fbgemmOptimizedGConv``), which follows the CPU, not the rest of FBGEMM: measured, on
   a CPU with AVX2 only (AMD EPYC, Zen 3) it saturates exactly as the im2col kernel does,
   while on CPUs with AVX512-VNNI whose FBGEMM is held to AVX2
   (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``, which its other kernels obey) it does not
   saturate. :func:`kernel_probe` finds which (:attr:`KernelProbe.groupwise_saturates`)
   and SATURATING follows its answer. On a CPU with AVX512-VNNI FBGEMM multiplies with
   ``vpdpbusd`` instead, which accumulates the products in int32 and never saturates.

The INTEGER pipeline with RECIPROCAL codes reproduces items 1–3 and SATURATING item 4
too: with FBGEMM on an AVX2 CPU the former differs from the real codes only where the
accumulator saturated, the latter nowhere; on a VNNI CPU the former is exact everywhere
and the latter is wrong wherever it saturates (by tens of LSB). The FLOAT pipeline with
RECIPROCAL codes differs through items 2–4; where nothing saturates, by at most one LSB,
since two values less than one apart round to integers at most one apart. EXACT
arithmetic adds item 1.

oneDNN (:attr:`Library.ONEDNN`) differs from FBGEMM in two places, both modelled:

5. *Its requantization* is ``nearbyint(fl(fl(fl(fl(a · s_x) · s_w[c]) + b) · fl(1/s_y))
   + z_y)`` in float32: the zero point is added *before* rounding, so at a tie with an
   odd ``z_y`` it rounds to the other neighbour than FBGEMM's ``nearbyint(v) + z_y``
   (one LSB), and its products round elsewhere.
6. *Its AVX2 pairs* lie within one kernel tap: the input channels of each tap are paired
   ``(2j, 2j+1)`` (an odd count padded with a zero weight), and the taps that fall on the
   padding are skipped rather than multiplied by the zero point, so they never saturate.
   Its linear kernel reduces 257 to 768 inputs in two halves, ``[0, ⌈K/2⌉)`` and
   ``[⌈K/2⌉, K)``, each paired from its own start (measured: with ``⌈K/2⌉`` odd, every
   such ``K`` from 257 to 766 gave other codes than one run of pairs; 256 and fewer, and
   769 to 3,100, gave one run's), at any batch size, output count and thread count.

One thing is not modelled: held to AVX-512 without VNNI (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``
on an AMX CPU; a Skylake-SP's own kernels), oneDNN pairs a convolution with *one* input
channel across kernel taps, kernel column by kernel column (measured: the reduction index
in (kernel column, kernel row) order paired ``(2j, 2j+1)``, padding adding nothing),
where its AVX2 kernel leaves one channel unpaired and the other convolutions keep the
pairs above. :func:`kernel_probe` runs a one-input-channel convolution too, and where the
pipeline it finds faithful misses it, such layers are marked unmodelled
(:attr:`KernelProbe.single_channel_conv_modelled`).

Which kernel ran is measured, not guessed from CPU flags: :func:`kernel_probe` runs the
real kernel once per process and engine on tiny inputs that tell the candidates apart:
int16 pair sums that saturate (255 · 127 · 2), requantization ties with an odd output
zero point, a 258-input linear layer whose halves oneDNN pairs apart, a padded 3x3
convolution with an odd channel count whose border pairs the two libraries saturate
differently, and FBGEMM's groupwise shapes. It reports which library's
arithmetic the linear and the convolution kernels follow, and which of INTEGER and
SATURATING reproduced them on every probe, or that nothing did; and whether that
pipeline also reproduces a convolution with one input channel. :class:`CrossCheck`
carries that answer, simulates each layer with its kind's library, marks the faithful
pipeline, and counts kernel saturation only where the probe says the kernel saturates.

Engines: ``fbgemm`` runs FBGEMM throughout; ``onednn`` runs oneDNN throughout; ``x86``
(PyTorch's default on x86) runs FBGEMM for linear layers and, on CPUs with AVX512-VNNI,
oneDNN for convolutions (measured: also when oneDNN is held to AVX2 there).
``kernel_probe(engine)`` says which, and whether one pipeline models both kinds.
Every engine takes quint8 activations only: an INT8 activation quantizer is run on the
real kernel as the UINT8 quantizer with the same grid (codes and zero point + 128), which
represents the same real values.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from qerror._checks import check_flag, check_seed
from qerror._enums import Choice
from qerror._progress import progress_bar
from qerror.calibration import RangePolicy, calibrate
from qerror.nn._anatomy import (
    RangeObserver,
    Site,
    batch_images,
    fold_bn,
    layer_chains,
    pre_hooks,
)
from qerror.quantizer import (
    QParams,
    QuantSpec,
    ScaleArithmetic,
    check_spec,
    fake_quantize,
    quantize,
)
from qerror.rounding import RoundingMode

__all__ = [
    "ACTIVATION_SPEC",
    "WEIGHT_SPEC",
    "Agreement",
    "CrossCheck",
    "Engine",
    "KernelProbe",
    "KernelProbeWarning",
    "LayerQParams",
    "Library",
    "Pipeline",
    "crosscheck_layer",
    "crosscheck_model",
    "kernel_probe",
    "real_int8",
    "simulate_int8",
]

ACTIVATION_SPEC = QuantSpec(bits=8, signed=False, symmetric=False, axis=None,
                            rounding=RoundingMode.NEAREST_EVEN)
"""Per-tensor affine UINT8, nearest-even: the activation quantizer the real kernels take."""

WEIGHT_SPEC = QuantSpec(bits=8, signed=True, symmetric=True, axis=0,
                        rounding=RoundingMode.NEAREST_EVEN)
"""Per-output-channel symmetric INT8 weights (codes -128..127), nearest-even."""

# The products of two adjacent (uint8, int8) pairs are summed into an int16 by vpmaddubsw.
_INT16_MIN, _INT16_MAX = -(2**15), 2**15 - 1
# The float32 value from which x86's float-to-int32 conversion overflows to -2**31.
_INT32_OVERFLOW = 2.0**31
_UINT8_MAX = 255
# oneDNN's linear kernel reduces this many inputs (K) in two halves, each paired apart.
_ONEDNN_HALVES = range(257, 769)
# Elements of one gathered block of activation pairs in the saturation mimic.
_SATURATION_BLOCK = 1 << 21
_DEPRECATION = r".*quantized tensor creation functions.* deprecated"
# /proc/cpuinfo flags that decide which int8 dot-product instructions a kernel can use.
_KERNEL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile",
                 "amx_int8")
# The best int8 dot-product instructions a CPU has, by the flag that shows them.
_INT8_ISA = (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
             ("avx512bw", "AVX-512 without VNNI"), ("avx2", "AVX2"))


class Engine(Choice):
    """PyTorch's quantized CPU engine (``torch.backends.quantized.engine``)."""

    FBGEMM = "fbgemm"
    X86 = "x86"
    ONEDNN = "onednn"


class Library(Choice):
    """Whose integer arithmetic a real kernel follows (see the module notes).

    ``FBGEMM``
        Requantizes as ``nearbyint((fl(a) + fl(b/m)) · fl(m/s_y)) + z_y``; on AVX2 pairs
        the reduction in im2col order, padding (the zero point) included; its groupwise
        path saturates so too, or not at all, by the CPU (see the module notes).
    ``ONEDNN``
        Requantizes as ``nearbyint(fl(fl(fl(a·s_x)·s_w) + b) · fl(1/s_y)) + z_y)``; on AVX2
        pairs the input channels within each kernel tap and skips the padded taps, and
        pairs a linear layer of 257 to 768 inputs in two halves apart.
    """

    FBGEMM = "fbgemm"
    ONEDNN = "onednn"


class Pipeline(Choice):
    """How the simulated output codes are computed (see the module notes).

    ``FLOAT``
        qerror's fake quantization, float32 layer, then quantization of the output:
        what a fake-quantized network computes.
    ``INTEGER``
        qerror's integer codes accumulated exactly, then the float32 bias and
        requantization of the kernel's :class:`Library`.
    ``SATURATING``
        ``INTEGER`` with the int16 saturation of adjacent product pairs that the
        library's AVX2 kernels incur.
    """

    FLOAT = "float"
    INTEGER = "integer"
    SATURATING = "saturating"


@dataclass(frozen=True)
class LayerQParams:
    """Scales and zero points of one layer's input, weight and output quantizers.

    ``input`` and ``output`` hold a scalar scale and zero point; ``weight`` one scale per
    output channel (shape ``(C_out,)``) and zero points 0. All parties use the scales
    rounded to float32, the precision the kernels and qerror work in for float32 data.
    """

    input: QParams
    weight: QParams
    output: QParams


@dataclass(frozen=True)
class Agreement:
    """How one simulation's output codes compare with the real kernel's, for one layer.

    ``Δ = simulated - real``, in LSB of the output quantizer.

    Attributes
    ----------
    layer, kind : str
        Layer name, and what was fused into it (``"conv+bn+relu"``, ``"linear"``, ...).
    arithmetic : ScaleArithmetic
        qerror's arithmetic for the simulation's quantizers.
    pipeline : Pipeline
    elements : int
        Output elements compared.
    equal : int
        Elements with ``Δ = 0``.
    max_abs_lsb : int
        Largest ``|Δ|``.
    sum_delta, sum_abs_delta : int
        Sums of ``Δ`` and of ``|Δ|``.
    saturated : int or None
        Output elements whose int32 accumulator the real kernel's int16 saturation changed:
        ``avx2_saturated`` where :func:`kernel_probe` found that the kernel saturates, 0
        where it found that it does not, None where the probe was inconclusive or found no
        faithful pipeline (whose pairs the count would take). The same in every row of a
        layer.
    max_abs_lsb_unsaturated : int
        Largest ``|Δ|`` over the elements the kernel did not saturate (where the probe was
        inconclusive, over those the AVX2 kernel would not saturate); 0 if there are none.
    avx2_saturated : int
        Output elements whose accumulator the int16 pair saturation of the AVX2 kernel
        changes (found by the SATURATING pipeline on RECIPROCAL codes, which are PyTorch's
        own), whether or not the kernel that ran saturates; the same in every row of a
        layer.
    histogram : tuple of (int, int)
        ``(Δ, count)`` for every ``Δ`` seen, in increasing order.
    """

    layer: str
    kind: str
    arithmetic: ScaleArithmetic
    pipeline: Pipeline
    elements: int
    equal: int
    max_abs_lsb: int
    sum_delta: int
    sum_abs_delta: int
    saturated: int | None
    max_abs_lsb_unsaturated: int
    avx2_saturated: int
    histogram: tuple[tuple[int, int], ...] = field(repr=False)

    @property
    def frac_equal(self) -> float:
        return self.equal / self.elements if self.elements else math.nan

    @property
    def mean_delta(self) -> float:
        return self.sum_delta / self.elements if self.elements else math.nan

    @property
    def mean_abs_delta(self) -> float:
        return self.sum_abs_delta / self.elements if self.elements else math.nan

    def count(self, delta: int) -> int:
        """Elements with ``Δ = delta``."""
        return dict(self.histogram).get(int(delta), 0)

    @property
    def n_abs1(self) -> int:
        """Elements with ``|Δ| = 1``."""
        return self.count(1) + self.count(-1)

    @property
    def n_abs_gt1(self) -> int:
        """Elements with ``|Δ| > 1``."""
        return self.elements - self.equal - self.n_abs1


class KernelProbeWarning(UserWarning):
    """The real kernel agreed with neither integer pipeline on :func:`kernel_probe`'s input."""


@dataclass(frozen=True)
class KernelProbe:
    """Which integer pipeline is the faithful model of the real kernel on this machine.

    Found by :func:`kernel_probe` from the kernel's own output on inputs that tell the
    candidate models apart (int16 pair sums that saturate, requantization ties, padded and
    groupwise convolutions), not from CPU flags.

    Attributes
    ----------
    engine : Engine
        The quantized engine probed.
    saturates_pairs : bool or None
        Whether the kernel saturates the int16 sums of adjacent product pairs (AVX2's
        ``vpmaddubsw``) or not (AVX512-VNNI's ``vpdpbusd``), as the probe's saturation case
        shows for every layer kind: also where no pipeline is ``faithful`` (a kernel that
        saturates but pairs some products otherwise than modelled, as oneDNN held to
        AVX-512 without VNNI on an AMD EPYC). None if the probe could not tell (see
        ``problem``).
    faithful : Pipeline or None
        :attr:`Pipeline.SATURATING` or :attr:`Pipeline.INTEGER`, whichever reproduced the
        kernel's codes with RECIPROCAL arithmetic on every probe input, for linear layers
        and convolutions alike; None if neither did, or the kernel could not run.
    linear_library, conv_library : Library or None
        Whose arithmetic the engine's linear and convolution kernels followed on the probe
        (the ``x86`` engine runs the two kinds in different libraries); None where the
        probe found none (or did not get to that kind).
    cpu_capability : str
        ``torch.backends.cpu.get_cpu_capability()``: the vector ISA PyTorch dispatches to
        (FBGEMM picks its own kernels, so this is context, not the answer).
    cpu_flags : tuple of str
        Which of avx2, avx512f, avx512bw, avx512_vnni, avx_vnni, amx_tile and amx_int8
        ``/proc/cpuinfo`` lists; empty where it cannot be read.
    real_codes, integer_codes, saturating_codes : tuple of int
        The probe's output codes from the kernel and from the two simulations (empty if
        the kernel did not run).
    problem : str
        Empty when ``faithful`` is set; otherwise why not.
    single_channel_conv_modelled : bool or None
        Whether ``faithful``, in ``conv_library``'s arithmetic, also reproduced the kernel
        on a convolution with one input channel (whose products the kernel may pair
        otherwise, see the module notes); where not, no row of such a layer is faithful.
        None where the probe did not get to it.
    groupwise_saturates : bool or None
        Whether FBGEMM's groupwise kernel (3x3 convolutions with 8 or 16 channels in and
        out, see the module notes) saturated int16 pair sums as its im2col kernel does
        (True) or not at all (False), where the faithful model is FBGEMM's SATURATING
        pipeline for convolutions; None elsewhere (no pair saturates, or another library
        runs them).
    """

    engine: Engine
    saturates_pairs: bool | None
    faithful: Pipeline | None
    linear_library: Library | None
    conv_library: Library | None
    cpu_capability: str
    cpu_flags: tuple[str, ...]
    real_codes: tuple[int, ...]
    integer_codes: tuple[int, ...]
    saturating_codes: tuple[int, ...]
    problem: str
    single_channel_conv_modelled: bool | None = None
    groupwise_saturates: bool | None = None

    @property
    def cpu_words(self) -> str:
        """The CPU in words: the best int8 instructions its flags list, then ATen's
        capability named as ATen's (``ATEN_CPU_CAPABILITY`` caps it, and the quantized
        kernels pick their own instructions), e.g. "AMX; ATen's CPU capability AVX512"."""
        best = next((name for flag, name in _INT8_ISA if flag in self.cpu_flags),
                    "flags unknown" if not self.cpu_flags else "no AVX2")
        return f"{best}; ATen's CPU capability {self.cpu_capability}"

    def describe(self) -> str:
        """One sentence for captions and reports (the CPU as :attr:`cpu_words`)."""
        cpu = self.cpu_words
        if self.faithful is None:
            return f"{self.engine.value} on this CPU ({cpu}): {self.problem}"
        how = "saturates" if self.saturates_pairs else "does not saturate"
        if self.linear_library is self.conv_library:
            libraries = f"{self.linear_library.value}'s arithmetic"
        else:
            libraries = (f"{self.linear_library.value}'s arithmetic for linear layers and "
                         f"{self.conv_library.value}'s for convolutions")
        but = ("" if self.single_channel_conv_modelled is not False else
               ", but not its convolutions with one input channel, whose products it pairs "
               "otherwise")
        sums = "int16 pair sums" + ("" if self.groupwise_saturates is None else
                                    " (its groupwise 3x3 kernel too)" if self.groupwise_saturates
                                    else " (but not its groupwise 3x3 kernel)")
        return (f"{self.engine.value} on this CPU ({cpu}) {how} {sums}; "
                f"the {self.faithful.value} pipeline with {libraries} models it{but}")

    def library(self, conv: bool) -> Library:
        """The library a layer of this kind is simulated with: the probe's answer, else
        the engine's own (FBGEMM for ``fbgemm`` and ``x86``, oneDNN for ``onednn``)."""
        found = self.conv_library if conv else self.linear_library
        if found is not None:
            return found
        return Library.ONEDNN if self.engine is Engine.ONEDNN else Library.FBGEMM


@dataclass(frozen=True)
class CrossCheck:
    """Agreement of every (layer, arithmetic, pipeline) with the real kernel.

    Attributes
    ----------
    rows : tuple of Agreement
        In layer order, then arithmetic, then pipeline.
    engine : Engine
        The quantized engine the real kernels ran on.
    qparams : Mapping[str, LayerQParams]
        The scales and zero points used, by layer name.
    probe : KernelProbe
        What :func:`kernel_probe` found about ``engine`` on this machine: which pipeline
        is faithful to the kernel that ran, and whether it saturates.
    unmodelled : frozenset of str
        Layers whose kernel does something no pipeline models (see :meth:`faithful`): no
        row of theirs is faithful.
    """

    rows: tuple[Agreement, ...]
    engine: Engine
    qparams: Mapping[str, LayerQParams] = field(repr=False)
    probe: KernelProbe
    unmodelled: frozenset = frozenset()

    def faithful(self, row: Agreement) -> bool:
        """Whether ``row`` is the probe's faithful pipeline on PyTorch's own (RECIPROCAL)
        codes: the simulation that should agree with the kernel on every code.

        Never for a layer in ``unmodelled``: oneDNN with a fused ReLU, whose fused kernel
        rounds a few near-ties otherwise than its plain requantization (measured: one code
        in about 10⁶ off by one LSB), and a oneDNN convolution with one input channel whose
        windows can lie wholly in the padding (those outputs differ by many LSB), which
        the probe does not show; and any convolution with one input channel where the
        probe found that the faithful pipeline misses one
        (:attr:`KernelProbe.single_channel_conv_modelled`)."""
        return (row.arithmetic is ScaleArithmetic.RECIPROCAL
                and row.pipeline is self.probe.faithful and row.layer not in self.unmodelled)

    def get(self, layer: str, arithmetic: ScaleArithmetic | str,
            pipeline: Pipeline | str) -> Agreement:
        """The row of one layer, arithmetic and pipeline."""
        arithmetic = ScaleArithmetic.parse(arithmetic)
        pipeline = Pipeline.parse(pipeline)
        for row in self.rows:
            if (row.layer, row.arithmetic, row.pipeline) == (layer, arithmetic, pipeline):
                return row
        raise KeyError(f"no row for layer {layer!r}; layers: {self.layers}")

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(row.layer for row in self.rows))

    def to_frame(self) -> pd.DataFrame:
        """One row per layer × arithmetic × pipeline, enums as their values."""
        return pd.DataFrame([{
            "layer": r.layer, "kind": r.kind, "arithmetic": r.arithmetic.value,
            "pipeline": r.pipeline.value, "engine": self.engine.value,
            "elements": r.elements, "equal": r.equal, "frac_equal": r.frac_equal,
            "max_abs_lsb": r.max_abs_lsb, "mean_delta": r.mean_delta,
            "mean_abs_delta": r.mean_abs_delta, "n_abs1": r.n_abs1, "n_abs_gt1": r.n_abs_gt1,
            "max_abs_lsb_unsaturated": r.max_abs_lsb_unsaturated,
            "saturated": math.nan if r.saturated is None else r.saturated,
            "frac_saturated": (r.saturated / r.elements if r.elements and r.saturated is not None
                               else math.nan),
            "avx2_saturated": r.avx2_saturated, "faithful": self.faithful(r),
        } for r in self.rows])

    def summary(self) -> pd.DataFrame:
        """Per arithmetic × pipeline, across layers: the smallest and median fraction of
        equal codes, the largest ``|Δ|`` (all elements, and unsaturated ones), the totals
        of elements, equal elements, kernel-saturated elements (NaN where the probe was
        inconclusive) and elements the AVX2 kernel would saturate, and whether the row is
        the faithful pipeline on every one of its layers (False where a layer is unmodelled,
        see :meth:`faithful`)."""
        return (self.to_frame().groupby(["arithmetic", "pipeline"], sort=False)
                .agg(layers=("layer", "count"), min_frac_equal=("frac_equal", "min"),
                     median_frac_equal=("frac_equal", "median"),
                     max_abs_lsb=("max_abs_lsb", "max"),
                     max_abs_lsb_unsaturated=("max_abs_lsb_unsaturated", "max"),
                     elements=("elements", "sum"), equal=("equal", "sum"),
                     saturated=("saturated", lambda v: v.sum(min_count=1)),
                     avx2_saturated=("avx2_saturated", "sum"),
                     faithful=("faithful", "all"))
                .reset_index())


# --------------------------------------------------------------------------- checks

def _check_layer(layer) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(
                f"grouped convolutions (groups={layer.groups}) are not supported: FBGEMM runs "
                "them through its groupwise/depthwise kernels, whose arithmetic the integer "
                "pipelines do not model")
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r} is not supported: the "
                             "quantized kernels pad with zeros only")
        if isinstance(layer.padding, str):
            raise TypeError(f"padding={layer.padding!r} is not supported; give the padding "
                             "as integers")
    elif not isinstance(layer, nn.Linear):
        raise TypeError(f"only nn.Conv2d and nn.Linear layers can be cross-checked, got "
                        f"{type(layer).__name__}")
    if layer.weight.dtype != torch.float32:
        raise TypeError(f"the layer's weight must be float32, got {layer.weight.dtype}")
    # A NaN bias would reach the integer pipelines' float-to-int32 cast (-2**31, far outside
    # the output range), and a NaN weight would be reported as one of x.
    for what, t in (("weight", layer.weight), ("bias", layer.bias)):
        bad = 0 if t is None else int((~torch.isfinite(t.detach())).sum())
        if bad:
            raise ValueError(f"the layer's {what} holds {bad} NaN or Inf value(s) (after "
                             "folding its BatchNorm, if one was given); the kernels and the "
                             "simulations need finite parameters: replace them first")


def _check_spec(spec: QuantSpec, what: str) -> None:
    check_spec(spec, what)
    if spec.bits != 8 or spec.axis is not None or spec.narrow:
        raise ValueError(f"{what} must be an 8-bit per-tensor quantizer without narrow "
                         f"range, as the real kernels use; got {spec}")
    if spec.rounding is not RoundingMode.NEAREST_EVEN:
        raise ValueError(f"{what} rounds {spec.rounding.value}, but the real kernels round "
                         "to nearest-even; use rounding=RoundingMode.NEAREST_EVEN")


def _check_input(layer, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x must be a float32 torch.Tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}; PyTorch's quantized kernels run on the CPU")
    want = (4, layer.in_channels) if isinstance(layer, nn.Conv2d) else (2, layer.in_features)
    if x.ndim != want[0] or x.shape[1] != want[1]:
        kind = "(N, C, H, W)" if want[0] == 4 else "(N, in_features)"
        raise ValueError(f"x must have shape {kind} with {want[1]} channels for this "
                         f"{type(layer).__name__}, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf values")


def _scalar_qparams(qp, spec: QuantSpec, what: str) -> tuple[float, int]:
    if not isinstance(qp, QParams):
        raise TypeError(f"{what} must be a QParams, got {type(qp).__name__}")
    s = np.asarray(qp.scale, dtype=np.float64)
    z = np.asarray(qp.zero_point)
    if s.size != 1 or z.size != 1:
        raise ValueError(f"{what} must be per tensor (one scale and one zero point), got "
                         f"shapes {s.shape} and {z.shape}")
    scale = float(np.float32(s.reshape(())))
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"{what}.scale must be positive and finite in float32, got {qp.scale}")
    # an infinite or NaN zero point would reach round() (OverflowError, ValueError unnamed)
    if z.dtype.kind not in "iu" and not (z.dtype.kind == "f" and np.isfinite(z)
                                         and float(z) == round(float(z))):
        raise TypeError(f"{what}.zero_point must be an integer, got {qp.zero_point!r}")
    zp = int(z.reshape(()))
    if not spec.qmin <= zp <= spec.qmax or (spec.symmetric and zp != 0):
        raise ValueError(f"{what}.zero_point {zp} is not valid for {spec}")
    return scale, zp


def _weight_scales(qp, channels: int) -> np.ndarray:
    if not isinstance(qp, QParams):
        raise TypeError(f"weight qparams must be a QParams, got {type(qp).__name__}")
    s = np.asarray(qp.scale, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] != channels:
        raise ValueError(f"weight scales must have shape ({channels},), one per output channel "
                         f"(axis 0), got shape {s.shape}")
    s = s.astype(np.float32)
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError("weight scales must be positive and finite in float32")
    z = np.asarray(qp.zero_point)
    if np.any(z != 0):
        raise ValueError("weight zero points must all be 0: the weights are symmetric INT8")
    return s.astype(np.float64)


# --------------------------------------------------------------------------- engines

@contextlib.contextmanager
def _engine(engine: Engine) -> Iterator[None]:
    engines = torch.backends.quantized.supported_engines
    if engine.value not in engines:
        usable = [e.value for e in Engine if e.value in engines]
        raise RuntimeError(f"the quantized engine {engine.value!r} is not in this PyTorch "
                           f"build (it has {engines}); pass engine= one of {usable}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine.value
    try:
        with warnings.catch_warnings():
            # Quantized tensors are deprecated in favour of torchao, but they are what the
            # engines' eager kernels take; the warning says nothing about this comparison.
            warnings.filterwarnings("ignore", message=_DEPRECATION,
                                    category=UserWarning)
            yield
    finally:
        torch.backends.quantized.engine = previous


# --------------------------------------------------------------------------- one layer

class _Tally:
    """Running counts of ``Δ`` for one (layer, arithmetic, pipeline)."""

    def __init__(self) -> None:
        self.elements = self.equal = self.max_abs = 0
        self.sum_delta = self.sum_abs = self.avx2_saturated = self.max_abs_unsaturated = 0
        self.hist: Counter = Counter()

    def add(self, delta: torch.Tensor, avx2: torch.Tensor | None,
            saturates: bool | None) -> None:
        """Count one batch; ``avx2`` marks the elements the AVX2 kernel saturates (None:
        none), ``saturates`` is the probe's answer for the kernel that ran."""
        # Only a kernel that saturates (or might) sets elements apart as saturated.
        saturated = None if saturates is False else avx2
        differ = delta != 0
        # Differences are rare, so every statistic but the count is taken over them only.
        nz = delta[differ].to(torch.int64)
        same = delta.numel() - nz.numel()
        self.elements += delta.numel()
        self.equal += same
        if same:
            self.hist[0] += same
        if avx2 is not None:
            self.avx2_saturated += int(avx2.sum())
        if not nz.numel():
            return
        values, counts = torch.unique(nz, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            self.hist[int(v)] += int(c)
        self.max_abs = max(self.max_abs, int(nz.abs().max()))
        self.sum_delta += int(nz.sum())
        self.sum_abs += int(nz.abs().sum())
        rest = nz if saturated is None else nz[~saturated[differ]]
        if rest.numel():
            self.max_abs_unsaturated = max(self.max_abs_unsaturated, int(rest.abs().max()))

    def result(self, name, kind, arithmetic, pipeline, saturates: bool | None) -> Agreement:
        saturated = None if saturates is None else self.avx2_saturated if saturates else 0
        return Agreement(name, kind, arithmetic, pipeline, self.elements, self.equal,
                         self.max_abs, self.sum_delta, self.sum_abs, saturated,
                         self.max_abs_unsaturated, self.avx2_saturated,
                         tuple(sorted(self.hist.items())))


@dataclass(frozen=True)
class _Pairs:
    """The weight pairs whose int16 partial sum can saturate, in FBGEMM's reduction order."""

    out: torch.Tensor       # output channel of each pair
    chan: torch.Tensor      # (2, P): input channel, kernel row, kernel column of both members
    row: torch.Tensor
    col: torch.Tensor
    weight: torch.Tensor    # (2, P) int32 weight codes (0 for the padding member)
    pos: torch.Tensor       # (P,) sum of the positive weights of the pair
    neg: torch.Tensor       # (P,) sum of the negative weights of the pair


def _risky_pairs(codes: torch.Tensor, per_tap: bool, split: int = 0) -> _Pairs:
    """Pairs ``(2j, 2j+1)`` of the library's reduction index that can leave int16.

    Both libraries order the reduction index as (kernel row, kernel column, input
    channel). FBGEMM's im2col pads the whole index with zero weights to an even length
    (``per_tap`` False), so with an odd channel count a pair can straddle two taps;
    oneDNN pads each tap's channels (``per_tap`` True). ``split``, where not 0, is the
    index at which the pairs start afresh (oneDNN's linear layers of
    :data:`_ONEDNN_HALVES` inputs): an odd one pairs the element before it with a zero.
    With activations in ``[0, 255]`` a pair sum lies in ``[255 Σ w⁻, 255 Σ w⁺]``; only
    pairs where that range leaves int16 are kept.
    """
    out_ch, in_ch, _, kw = codes.shape
    # int16 holds every pair sum of int8 codes, and halves the traffic of int32.
    b = codes.to(torch.int16).permute(0, 2, 3, 1)
    if per_tap and in_ch % 2:
        b = F.pad(b, (0, 1))
    width = b.shape[-1]  # channels per tap in the padded index
    b = b.reshape(out_ch, -1)
    length = b.shape[1]
    odd_split = split % 2 == 1
    if odd_split:
        b = torch.cat([b[:, :split], b.new_zeros(out_ch, 1), b[:, split:]], dim=1)
    k = b.shape[1]
    if k % 2:
        b = F.pad(b, (0, 1))
    b0, b1 = b[:, 0::2], b[:, 1::2]
    pos = b0.clamp(min=0) + b1.clamp(min=0)
    neg = b0.clamp(max=0) + b1.clamp(max=0)
    # 255·pos > 32767 and 255·neg < -32768, in integers: pos > 128 and neg < -128.
    o, j = ((pos > _INT16_MAX // _UINT8_MAX) | (neg < -(-_INT16_MIN // _UINT8_MAX))).nonzero(
        as_tuple=True)
    idx = torch.stack([2 * j, torch.clamp(2 * j + 1, max=k - 1)])
    if odd_split:  # back to the index without the zero (which any element stands for)
        idx = torch.clamp(idx - (idx > split).to(idx.dtype), max=length - 1)
    weight = torch.stack([b0[o, j], b1[o, j]]).to(torch.int32)
    # A padding member has weight 0; any real channel of its tap stands in for it.
    chan = torch.clamp(idx % width, max=in_ch - 1)
    return _Pairs(out=o, chan=chan, row=idx // (width * kw), col=(idx // width) % kw,
                  weight=weight, pos=pos[o, j].to(torch.int32),
                  neg=neg[o, j].to(torch.int32))


def _fbgemm_groupwise(layer) -> bool:
    """Whether FBGEMM runs this convolution through its groupwise kernel.

    ``fbgemmOptimizedGConv`` takes ``C_in/G == C_out/G`` in {2, 4, 8, 16}, a 3x3 kernel,
    padding 1, dilation 1 and stride 1 or 2 in both directions, when ``G`` reaches the
    number of groups its AVX2 kernel packs together: 4, 2, 1 and 1 for those widths, so
    for ``groups=1`` only widths 8 and 16 qualify. Whether that kernel saturates int16
    pair sums depends on the CPU (the module notes; :func:`kernel_probe` finds out).
    """
    return (isinstance(layer, nn.Conv2d) and layer.in_channels == layer.out_channels
            and layer.in_channels in (8, 16) and tuple(layer.kernel_size) == (3, 3)
            and tuple(layer.padding) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and tuple(layer.stride) in ((1, 1), (2, 2)))


class _Plan:
    """One layer, prepared: folded float weight, quantized weights, packed real weights."""

    def __init__(self, layer, qparams: LayerQParams, *, relu: bool, act_spec: QuantSpec,
                 out_spec: QuantSpec, name: str, kind: str, engine: Engine | None,
                 library: Library, single_channel_modelled: bool = True,
                 groupwise_saturates: bool = False):
        _check_layer(layer)
        _check_spec(act_spec, "act_spec")
        _check_spec(out_spec, "out_spec")
        if not isinstance(qparams, LayerQParams):
            raise TypeError(f"qparams must be a LayerQParams, got {type(qparams).__name__}")
        relu = check_flag(relu, "relu")
        groupwise_saturates = check_flag(groupwise_saturates, "groupwise_saturates")
        single_channel_modelled = check_flag(single_channel_modelled, "single_channel_modelled")
        self.name, self.kind, self.relu = name, kind, relu
        self.conv = isinstance(layer, nn.Conv2d)
        self.library = Library.parse(library)
        # What oneDNN does that no pipeline models (CrossCheck.faithful says what).
        self.modelled = self.library is Library.FBGEMM or not (relu or (
            self.conv and layer.in_channels == 1 and any(
                p >= (k - 1) * d + 1 for p, k, d in zip(layer.padding, layer.kernel_size,
                                                        layer.dilation))))
        # The probe's one-input-channel convolution, which the faithful pipeline missed.
        if self.conv and layer.in_channels == 1 and not single_channel_modelled:
            self.modelled = False
        # FBGEMM's groupwise kernel, where it does not saturate: no pair of it is at risk.
        saturates = groupwise_saturates or not (self.library is Library.FBGEMM
                                                and _fbgemm_groupwise(layer))
        self.act_spec, self.out_spec = act_spec, out_spec
        weight = layer.weight.detach().contiguous()
        self.out_channels = weight.shape[0]
        self.bias = None if layer.bias is None else layer.bias.detach().to(torch.float32)
        self.sx, self.zx = _scalar_qparams(qparams.input, act_spec, "input qparams")
        self.so, self.zo = _scalar_qparams(qparams.output, out_spec, "output qparams")
        self.sw = _weight_scales(qparams.weight, self.out_channels)
        self.qparams = LayerQParams(QParams(self.sx, self.zx), QParams(self.sw, 0),
                                    QParams(self.so, self.zo))
        # The kernels take quint8 activations: a signed grid runs as the same grid + 128.
        self.x_shift = 0 if not act_spec.signed else 128
        self.y_shift = 0 if not out_spec.signed else 128
        if self.conv:
            self.stride, self.padding = tuple(layer.stride), tuple(layer.padding)
            self.dilation = tuple(layer.dilation)
        self.weight = weight
        # oneDNN pairs the two halves of a linear layer of _ONEDNN_HALVES inputs apart
        split = (-(-weight.shape[1] // 2) if not self.conv and self.library is Library.ONEDNN
                 and weight.shape[1] in _ONEDNN_HALVES else 0)
        self.w_fake, self.w_codes, self.pairs = {}, {}, {}
        for arith in ScaleArithmetic:
            spec = WEIGHT_SPEC.replace(arithmetic=arith)
            self.w_fake[arith] = fake_quantize(weight, spec, self.sw, 0)
            codes = quantize(weight, spec, self.sw, 0)
            self.w_codes[arith] = codes.to(torch.int8)
            self.pairs[arith] = None if not saturates else _risky_pairs(
                codes if self.conv else codes[:, :, None, None],
                per_tap=self.library is Library.ONEDNN, split=split)
        # The requantization constants, each one float32 operation as in the kernels.
        self.sx32 = torch.tensor(self.sx, dtype=torch.float32)
        self.sw32 = torch.from_numpy(self.sw.astype(np.float32))
        so32 = torch.tensor(self.so, dtype=torch.float32)
        m = self.sx32 * self.sw32
        self.multiplier = m / so32                        # FBGEMM
        self.bias_units = None if self.bias is None else self.bias / m
        self.inv_so = torch.tensor(1.0, dtype=torch.float32) / so32   # oneDNN
        self.packed = None
        if engine is not None:
            self._pack(engine)

    def _pack(self, engine: Engine) -> None:
        with _engine(engine):
            qw = torch.quantize_per_channel(
                self.weight, torch.from_numpy(self.sw), torch.zeros(self.out_channels,
                                                                    dtype=torch.int64),
                0, torch.qint8)
            if self.conv:
                self.packed = torch.ops.quantized.conv2d_prepack(
                    qw, self.bias, list(self.stride), list(self.padding), list(self.dilation), 1)
            else:
                self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    def _channel_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1, 1, 1) if self.conv else t.reshape(1, -1)

    def _op(self, x, w, b=None):
        if self.conv:
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)
        return F.linear(x, w, b)

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """The real kernel's output codes, in the output spec's integer range (int32)."""
        qx = torch.quantize_per_tensor(x, self.sx, self.zx + self.x_shift, torch.quint8)
        zo = self.zo + self.y_shift
        if self.conv:
            op = torch.ops.quantized.conv2d_relu if self.relu else torch.ops.quantized.conv2d
            y = op.new(qx, self.packed, self.so, zo)
        else:
            op = torch.ops.quantized.linear_relu if self.relu else torch.ops.quantized.linear
            y = op(qx, self.packed, self.so, zo)
        return (y.int_repr().to(torch.int32) - self.y_shift).contiguous()

    def float_codes(self, x: torch.Tensor, arith: ScaleArithmetic) -> torch.Tensor:
        spec = self.act_spec.replace(arithmetic=arith)
        y = self._op(fake_quantize(x, spec, self.sx, self.zx), self.w_fake[arith], self.bias)
        if self.relu:
            y = F.relu(y)
        return quantize(y, self.out_spec.replace(arithmetic=arith), self.so, self.zo)

    def integer_codes(self, x: torch.Tensor, arith: ScaleArithmetic
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes of the INTEGER and SATURATING pipelines, and where saturation changed
        the accumulator (a bool tensor, or None where it changed nothing)."""
        xq = quantize(x, self.act_spec.replace(arithmetic=arith), self.sx, self.zx)
        # Products of codes and their sums are integers far below 2**53, so the float64
        # layer accumulates them exactly, in any order.
        acc = self._op((xq - self.zx).to(torch.float64), self.w_codes[arith].to(torch.float64))
        plain = self._requantize(acc)
        pairs = self.pairs[arith]
        corr = None if pairs is None else self._saturation(xq + self.x_shift, pairs, acc.shape)
        if corr is None:
            return plain, plain, None
        return plain, self._requantize(acc + corr), corr != 0

    def _requantize(self, acc: torch.Tensor) -> torch.Tensor:
        # int32 → float32 and float64 → float32 both round the exact integer to nearest even.
        raw = acc.to(torch.float32)
        if self.library is Library.ONEDNN:
            t = raw * self.sx32 * self._channel_view(self.sw32)
            if self.bias is not None:
                t = t + self._channel_view(self.bias)
            # The zero point is added in float32 before rounding, on the kernel's uint8 grid
            # (the float sum rounds at that magnitude); a fused ReLU clamps before the
            # scaling, which after rounding is the clamp at the zero point below.
            zo = torch.tensor(self.zo + self.y_shift, dtype=torch.float32)
            v = torch.round(t * self.inv_so + zo) - self.y_shift
        else:
            if self.bias_units is not None:
                raw = raw + self._channel_view(self.bias_units)
            v = torch.round(raw * self._channel_view(self.multiplier))
            # The kernel converts to int32 before adding the zero point: from 2**31 up, and
            # for NaN (0 · ∞ where s_x·s_w or m/s_y leaves float32), that conversion gives
            # -2**31, which the clamp below takes to the lowest code.
            v = v.masked_fill_((v >= _INT32_OVERFLOW) | v.isnan(), -_INT32_OVERFLOW) + self.zo
        lo = self.zo if self.relu else self.out_spec.qmin
        return v.clamp_(lo, self.out_spec.qmax).to(torch.int32)

    def _saturation(self, xu8: torch.Tensor, pairs: _Pairs, out_shape) -> torch.Tensor | None:
        """What the library's int16 saturation adds to the accumulator (float64), or None.

        ``xu8`` are the raw uint8 activation codes the kernel multiplies; FBGEMM's im2col
        fills the padding with the zero point, oneDNN skips the padded taps (a code of 0
        here: their pairs add nothing).
        """
        pad_code = self.zx + self.x_shift if self.library is Library.FBGEMM else 0
        top = int(xu8.max())
        if self.conv and any(self.padding):  # the padding's codes multiply too
            top = max(top, pad_code)
        live = (pairs.pos * top > _INT16_MAX) | (pairs.neg * top < _INT16_MIN)
        if not bool(live.any()):
            return None
        sel = live.nonzero(as_tuple=True)[0]
        if self.conv:
            ph, pw = self.padding
            xpad = F.pad(xu8, (pw, pw, ph, ph), value=pad_code)
            (sh, sw), (dh, dw) = self.stride, self.dilation
            ho, wo = out_shape[2], out_shape[3]
        else:
            xpad = xu8[:, :, None, None]
            sh = sw = dh = dw = ho = wo = 1
        oh = torch.arange(ho) * sh
        ow = torch.arange(wo) * sw
        corr = torch.zeros((xu8.shape[0], self.out_channels, ho, wo), dtype=torch.float64)
        step = max(1, _SATURATION_BLOCK // (xu8.shape[0] * ho * wo))
        for start in range(0, sel.numel(), step):
            p = sel[start:start + step]
            total = None
            for m in (0, 1):
                rows = pairs.row[m, p, None] * dh + oh
                cols = pairs.col[m, p, None] * dw + ow
                a = xpad[:, pairs.chan[m, p, None, None], rows[:, :, None], cols[:, None, :]]
                term = a * pairs.weight[m, p].reshape(1, -1, 1, 1)
                total = term if total is None else total + term
            excess = total.clamp(_INT16_MIN, _INT16_MAX) - total
            corr.index_add_(1, pairs.out[p], excess.to(torch.float64))
        return corr if self.conv else corr[:, :, 0, 0]

    def compare(self, x: torch.Tensor, tallies: dict, saturates: bool | None) -> None:
        """Add this batch's differences to ``tallies[(arithmetic, pipeline)]``;
        ``saturates`` is :attr:`KernelProbe.saturates_pairs`."""
        real = self.real(x)
        integer = {arith: self.integer_codes(x, arith) for arith in ScaleArithmetic}
        # RECIPROCAL codes are PyTorch's, so their saturation is what an AVX2 kernel does.
        avx2 = integer[ScaleArithmetic.RECIPROCAL][2]
        for arith, (plain, saturating, _) in integer.items():
            for pipeline, codes in ((Pipeline.FLOAT, self.float_codes(x, arith)),
                                    (Pipeline.INTEGER, plain),
                                    (Pipeline.SATURATING, saturating)):
                tallies[(arith, pipeline)].add(codes - real, avx2, saturates)

    def results(self, tallies: dict, saturates: bool | None) -> list[Agreement]:
        return [tallies[(a, p)].result(self.name, self.kind, a, p, saturates)
                for a in ScaleArithmetic for p in Pipeline]


def _kind(layer, bn: bool, relu: bool) -> str:
    base = "conv" if isinstance(layer, nn.Conv2d) else "linear"
    return base + ("+bn" if bn else "") + ("+relu" if relu else "")


def _plan(layer, qparams, *, bn, relu, act_spec, out_spec, name, engine,
          library=Library.FBGEMM, single_channel_modelled=True,
          groupwise_saturates=False) -> _Plan:
    kind = _kind(layer, bn is not None, relu)
    if bn is not None:
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"a BatchNorm can be folded into an nn.Conv2d only, got "
                            f"{type(layer).__name__}")
        layer = fold_bn(layer, bn)
    return _Plan(layer, qparams, relu=relu, act_spec=act_spec, out_spec=out_spec, name=name,
                 kind=kind, engine=engine, library=library,
                 single_channel_modelled=single_channel_modelled,
                 groupwise_saturates=groupwise_saturates)


def real_int8(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, qparams: LayerQParams, *,
              bn: nn.BatchNorm2d | None = None, relu: bool = False,
              act_spec: QuantSpec = ACTIVATION_SPEC, out_spec: QuantSpec = ACTIVATION_SPEC,
              engine: Engine | str = Engine.FBGEMM) -> torch.Tensor:
    """Output codes of PyTorch's real INT8 kernel for one layer.

    Parameters
    ----------
    layer : nn.Conv2d (groups=1, zero padding) or nn.Linear
        Float32 weights.
    x : torch.Tensor
        Float32 input, (N, C, H, W) for a convolution, (N, in_features) for a linear layer.
    qparams : LayerQParams
    bn : nn.BatchNorm2d, optional
        Folded into the convolution first (:func:`fold_bn`).
    relu : bool
        Run the kernel with the ReLU fused (``conv2d_relu``, ``linear_relu``).
    act_spec, out_spec : QuantSpec
        8-bit per-tensor nearest-even quantizers of input and output; a signed one runs on
        the kernel as the equivalent UINT8 grid.
    engine : Engine or str

    Returns
    -------
    torch.Tensor
        int32 codes in ``out_spec``'s range, shaped as the layer's float output.
    """
    engine = Engine.parse(engine)
    plan = _plan(layer, qparams, bn=bn, relu=relu, act_spec=act_spec, out_spec=out_spec,
                 name="layer", engine=engine)
    _check_input(layer, x)
    with _engine(engine), torch.inference_mode():
        return plan.real(x)


def simulate_int8(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, qparams: LayerQParams, *,
                  arithmetic: ScaleArithmetic | str = ScaleArithmetic.RECIPROCAL,
                  pipeline: Pipeline | str = Pipeline.FLOAT,
                  bn: nn.BatchNorm2d | None = None, relu: bool = False,
                  act_spec: QuantSpec = ACTIVATION_SPEC,
                  out_spec: QuantSpec = ACTIVATION_SPEC,
                  library: Library | str = Library.FBGEMM,
                  groupwise_saturates: bool = False) -> torch.Tensor:
    """Output codes of one layer as qerror simulates them (see :class:`Pipeline`).

    Same arguments as :func:`real_int8`, plus the ``arithmetic`` of the simulation's
    quantizers (their own ``arithmetic`` field is overridden), the ``pipeline``, the
    ``library`` whose requantization and int16 pairing the INTEGER and SATURATING
    pipelines follow (:attr:`KernelProbe.linear_library` and
    :attr:`KernelProbe.conv_library` say which one an engine's kernels follow), and
    whether SATURATING saturates FBGEMM's groupwise shapes too
    (:attr:`KernelProbe.groupwise_saturates` says whether this CPU's kernel does).
    Returns int32 codes in ``out_spec``'s range.
    """
    arithmetic = ScaleArithmetic.parse(arithmetic)
    pipeline = Pipeline.parse(pipeline)
    plan = _plan(layer, qparams, bn=bn, relu=relu, act_spec=act_spec, out_spec=out_spec,
                 name="layer", engine=None, library=Library.parse(library),
                 groupwise_saturates=groupwise_saturates)
    _check_input(layer, x)
    with torch.inference_mode():
        if pipeline is Pipeline.FLOAT:
            return plan.float_codes(x, arithmetic)
        plain, saturating, _ = plan.integer_codes(x, arithmetic)
        return plain if pipeline is Pipeline.INTEGER else saturating


# --------------------------------------------------------------------------- the probe

def _cpu_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return tuple(f for f in _KERNEL_FLAGS if f in present)
    return ()


def _probe_case(conv: bool = False) -> tuple[nn.Linear | nn.Conv2d, torch.Tensor,
                                               LayerQParams]:
    """A linear layer (or the same as a 1x1 convolution on a 1x1 map) on which every int16
    pair sum leaves int16, and the two integer pipelines give codes far apart.

    Activation codes 255 against weight codes 127 (channel 0) and -127 (channel 1): each
    of the 32 pairs sums to ±64770, which AVX2 saturates to 32767 / -32768. The exact
    accumulators ±2072640 map to codes 128 ± 120, the saturated ones to about 128 ± 61.
    """
    k = 64
    # The layer's random initialisation must not move torch's global generator, which the
    # studies seed: a probe run between two seeded draws would change the second.
    with torch.random.fork_rng(devices=[]):
        layer = nn.Conv2d(k, 2, 1) if conv else nn.Linear(k, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [-1.0]]).expand(2, k)
                           .reshape(layer.weight.shape))
        layer.bias.zero_()
    sx, sw = np.float32(1 / _UINT8_MAX), np.float32(1 / 127)
    # The exact accumulator k·255·127, times the kernel's multiplier fl(sx·sw), is 120 LSB.
    so = k * _UINT8_MAX * 127 * float(sx * sw) / 120
    qp = LayerQParams(QParams(float(sx), 0), QParams(np.full(2, float(sw)), 0),
                      QParams(so, 128))
    return layer, torch.ones((1, k, 1, 1) if conv else (1, k)), qp


def _probe_layer(codes: torch.Tensor, sw: float, bias: float, conv: bool,
                 **conv_kw) -> nn.Linear | nn.Conv2d:
    """A layer whose weights are ``codes · sw`` exactly and whose bias is ``bias``."""
    out_ch, in_ch = codes.shape[:2]
    # The layer's random initialisation must not move torch's global generator, which the
    # studies seed: a probe run between two seeded draws would change the second.
    with torch.random.fork_rng(devices=[]):
        layer = (nn.Conv2d(in_ch, out_ch, codes.shape[2:], **conv_kw) if conv
                 else nn.Linear(in_ch, out_ch))
    with torch.no_grad():
        layer.weight.copy_((codes * sw).reshape(layer.weight.shape))
        layer.bias.fill_(bias)
    return layer


def _tie_case(conv: bool) -> tuple[nn.Linear | nn.Conv2d, torch.Tensor, LayerQParams]:
    """Every output an exact tie of the requantization, with the odd output zero point 129.

    ``s_x = 2⁻⁴``, ``s_w = 2⁻⁷``, ``s_y = s_x s_w`` and a bias of half an accumulator unit:
    every value rounded is ``a + 1/2`` exactly, in both libraries' float32 arithmetic.
    FBGEMM rounds it to even and then adds 129; oneDNN adds 129 first and rounds
    ``a + 129.5`` to even: the codes differ by one everywhere. Small codes (activations 0
    and 1, weights -3..3, a 3x3 convolution with padding 1 or a 4-input linear layer) keep
    every pair sum far inside int16 and every output inside 0..255.
    """
    sx, sw = 2.0**-4, 2.0**-7
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 3, 3) if conv else (2, 4)
    codes = torch.randint(-3, 4, shape, generator=g).to(torch.float32)
    layer = _probe_layer(codes, sw, 0.5 * sx * sw, conv, padding=1)
    x = torch.randint(0, 2, (2, 4, 4, 4) if conv else (6, 4), generator=g) * sx
    qp = LayerQParams(QParams(sx, 0), QParams(np.full(2, sw), 0), QParams(sx * sw, 129))
    return layer, x.to(torch.float32), qp


def _saturating_conv(in_ch: int, out_ch: int, stride: int, size: int
                     ) -> tuple[nn.Conv2d, torch.Tensor, LayerQParams]:
    """A 3x3 convolution with padding 1 whose every in-map pair sum leaves int16.

    Activation codes 255 with zero point 128 against weight codes 127 (even output
    channels) and -127 (odd ones); the padding holds the zero point 128 (or is skipped),
    whose pairs do not saturate (128 · 127 · 2 < 32767). An interior output's exact
    accumulator maps to 120 LSB from the output zero point 128.
    """
    sign = torch.tensor([1.0, -1.0]).repeat(out_ch)[:out_ch].reshape(-1, 1, 1, 1)
    codes = (127 * sign).expand(out_ch, in_ch, 3, 3)
    sx, sw = np.float32(1 / _UINT8_MAX), np.float32(1 / 127)
    layer = _probe_layer(codes, float(sw), 0.0, True, padding=1, stride=stride)
    so = 9 * in_ch * 127 * 127 * float(sx * sw) / 120
    qp = LayerQParams(QParams(float(sx), 128), QParams(np.full(out_ch, float(sw)), 0),
                      QParams(so, 128))
    return layer, torch.full((1, in_ch, size, size), 127 * float(sx)), qp


def _single_channel_case() -> tuple[nn.Conv2d, torch.Tensor, LayerQParams]:
    """A padded 3x3 convolution with one input channel, on which pairing the taps' products
    saturates: seeded weight codes in -127..127 and activation codes in 0..255 (zero point
    0), 16 output channels. oneDNN's AVX2 kernel pairs nothing here, FBGEMM's im2col pairs
    the taps row by row, and oneDNN held to AVX-512 without VNNI column by column, on maps
    this large: on small ones it can run a kernel that pairs nothing (measured: one 8x8
    image with 8 output channels), so the case is two 16x16 images.
    """
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (16, 1, 3, 3), generator=g).to(torch.float32)
    sx, sw = np.float32(1 / _UINT8_MAX), np.float32(1 / 127)
    layer = _probe_layer(codes, float(sw), 0.0, True, padding=1)
    x = torch.randint(0, _UINT8_MAX + 1, (2, 1, 16, 16), generator=g) * float(sx)
    # The largest accumulator, 9 · 255 · 127, maps to 240 LSB: most codes stay inside 0..255.
    so = 9 * _UINT8_MAX * 127 * float(sx * sw) / 240
    qp = LayerQParams(QParams(float(sx), 0), QParams(np.full(16, float(sw)), 0),
                      QParams(so, 128))
    return layer, x.to(torch.float32), qp


def _halves_case() -> tuple[nn.Linear, torch.Tensor, LayerQParams]:
    """A linear layer of 258 inputs, whose halves oneDNN pairs apart (:data:`_ONEDNN_HALVES`):
    seeded weight codes in -127..127 and activation codes in 0..255 (zero point 0), 8
    outputs for 4 rows, on which pairing each half from its own start saturates other
    pairs than one run of pairs does."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-127, 128, (8, 258), generator=g).to(torch.float32)
    sx, sw = np.float32(1 / _UINT8_MAX), np.float32(1 / 127)
    layer = _probe_layer(codes, float(sw), 0.0, False)
    x = torch.randint(0, _UINT8_MAX + 1, (4, 258), generator=g) * float(sx)
    # The accumulator's standard deviation, √258 · (255/√3)(127/√3) ≈ 1.7·10⁵, is 67 LSB:
    # most codes stay inside 0..255.
    so = 16 * _UINT8_MAX * 127 * float(sx * sw) / 200
    qp = LayerQParams(QParams(float(sx), 0), QParams(np.full(8, float(sw)), 0),
                      QParams(so, 128))
    return layer, x.to(torch.float32), qp


def _probe_cases(conv: bool) -> dict[str, tuple]:
    """The probe's inputs for one layer kind, by name. On each, the simulations of the
    candidate models (:class:`Library` × saturating or not) give different codes."""
    cases = {"saturation": _probe_case(conv), "requantization tie": _tie_case(conv)}
    if not conv:
        cases["258-input linear (oneDNN's halves)"] = _halves_case()
    if conv:
        # Three channels: FBGEMM's pairs straddle taps, oneDNN's do not, and at the border
        # FBGEMM multiplies the padding where oneDNN skips it.
        cases["padded 3-channel 3x3"] = _saturating_conv(3, 2, 1, 4)
        # FBGEMM's groupwise path, for both of its widths and strides.
        cases["8-channel 3x3 (FBGEMM's groupwise path)"] = _saturating_conv(8, 8, 1, 4)
        cases["16-channel 3x3 stride 2 (FBGEMM's groupwise path)"] = _saturating_conv(
            16, 16, 2, 5)
    return cases


@functools.cache
def _probe(engine: Engine) -> KernelProbe:
    linear = _probe_kind(engine, conv=False)
    if linear.faithful is None:
        if linear.saturates_pairs is None:
            return linear
        # No model, but the saturation case answered: the engine's answer where its
        # convolution kernel gives the same one.
        conv = _probe_kind(engine, conv=True)
        return replace(linear, saturates_pairs=_same_answer(linear, conv))
    # The x86 engine runs convolutions in oneDNN and linear layers in FBGEMM: two libraries
    # that pick their instructions apart (FBGEMM_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA).
    conv = _probe_kind(engine, conv=True)
    if conv.faithful is linear.faithful:
        return replace(linear, conv_library=conv.conv_library,
                       single_channel_conv_modelled=conv.single_channel_conv_modelled,
                       groupwise_saturates=conv.groupwise_saturates)
    if conv.faithful is None:
        return replace(linear, saturates_pairs=_same_answer(linear, conv), faithful=None,
                       problem=f"its convolution kernel: {conv.problem}")
    return replace(linear, saturates_pairs=None, faithful=None, problem=(
        f"its linear kernel follows the {linear.faithful.value} pipeline but its "
        f"convolution kernel follows {conv.faithful.value} (codes {conv.real_codes} on the "
        "same probe): the "
        "engine's libraries run different instruction sets (see FBGEMM_ENABLE_INSTRUCTIONS "
        "and ONEDNN_MAX_CPU_ISA); no one simulation models both"))


def _same_answer(linear: KernelProbe, conv: KernelProbe) -> bool | None:
    """Whether pair sums saturate, where both layer kinds' probes say the same; else None."""
    return linear.saturates_pairs if conv.saturates_pairs is linear.saturates_pairs else None


#: The probe's candidate models: (library, pipeline, whether FBGEMM's groupwise kernel
#: saturates too), the last True only where it makes a difference.
_CANDIDATES = tuple((lib, p, False) for lib in Library
                    for p in (Pipeline.INTEGER, Pipeline.SATURATING)) + (
    (Library.FBGEMM, Pipeline.SATURATING, True),)


def _candidate_name(key: tuple[Library, Pipeline, bool]) -> str:
    lib, pipeline, groupwise = key
    return f"{lib.value}/{pipeline.value}" + (
        " with its groupwise kernel saturating" if groupwise else "")


def _candidate_codes(cases: dict) -> dict[tuple[Library, Pipeline, bool],
                                          list[tuple[int, ...]]]:
    """Each candidate model's codes on every probe case, in the order of ``cases``."""
    codes: dict = {key: [] for key in _CANDIDATES}
    # one plan gives both pipelines' codes: one plan per (library, groupwise rule)
    plans = dict.fromkeys((lib, groupwise) for lib, _, groupwise in _CANDIDATES)
    for layer, x, qp in cases.values():
        for lib, groupwise in plans:
            plan = _plan(layer, qp, bn=None, relu=False, act_spec=ACTIVATION_SPEC,
                         out_spec=ACTIVATION_SPEC, name="probe", engine=None, library=lib,
                         groupwise_saturates=groupwise)
            with torch.inference_mode():
                plain, saturating, _ = plan.integer_codes(x, ScaleArithmetic.RECIPROCAL)
            for pipeline, got in ((Pipeline.INTEGER, plain), (Pipeline.SATURATING, saturating)):
                if (lib, pipeline, groupwise) in codes:
                    codes[(lib, pipeline, groupwise)].append(tuple(got.flatten().tolist()))
    return codes


def _probe_kind(engine: Engine, conv: bool) -> KernelProbe:
    cases = _probe_cases(conv)
    candidates = _candidate_codes(cases)
    machine = (torch.backends.cpu.get_cpu_capability(), _cpu_flags())
    default = KernelProbe(engine, None, None, None, None, *machine, (), (), (), "")
    # The saturation case's codes are reported with the library found (else the engine's).
    lib = default.library(conv)
    integer_codes = candidates[(lib, Pipeline.INTEGER, False)][0]
    saturating_codes = candidates[(lib, Pipeline.SATURATING, False)][0]
    try:
        real = [tuple(real_int8(layer, x, qp, engine=engine).flatten().tolist())
                for layer, x, qp in cases.values()]
    except RuntimeError as err:
        # A PyTorch build without the engine, or a kernel that refuses to run: recorded,
        # so that a manifest can say why there is no answer.
        return replace(default, integer_codes=integer_codes, saturating_codes=saturating_codes,
                       problem=f"the {engine.value} kernel could not run: {err}")
    # The cases tell every candidate apart (a test checks it), so at most one matches.
    match = next((key for key, codes in candidates.items() if codes == real), None)
    if match is None:
        names = list(cases)

        def first_miss(codes: list) -> str:
            return names[next(i for i, (c, r) in enumerate(zip(codes, real)) if c != r)]

        failed = "; ".join(f"{_candidate_name(key)} fails the {first_miss(codes)} case"
                           for key, codes in candidates.items())
        # The saturation case parts the two pipelines in either library's arithmetic (a
        # test checks it): where the kernel gave one of them there, it says whether the
        # kernel saturates, though no candidate reproduces every case.
        seen = {pipeline for (_, pipeline, _), codes in candidates.items()
                if codes[0] == real[0]}
        saturates = Pipeline.SATURATING in seen if len(seen) == 1 else None
        verdict = "no simulation models this kernel" if saturates is None else (
            f"it {'saturates' if saturates else 'does not saturate'} int16 pair sums, but no "
            "simulation models this kernel")
        return replace(default, saturates_pairs=saturates, real_codes=real[0],
                       integer_codes=integer_codes, saturating_codes=saturating_codes, problem=(
            f"on the probe its codes match neither pipeline with either library's "
            f"arithmetic ({failed}); on the saturation case its codes {real[0]} against the "
            f"integer pipeline's {integer_codes} and the saturating pipeline's "
            f"{saturating_codes} ({lib.value}'s arithmetic): {verdict}"))
    lib, pipeline, groupwise = match
    kind = {"conv_library" if conv else "linear_library": lib}
    if conv:
        if lib is Library.FBGEMM and pipeline is Pipeline.SATURATING:
            kind["groupwise_saturates"] = groupwise
        # Not among the cases above: a kernel that pairs a one-channel convolution apart
        # keeps its answer for every other layer.
        layer, x, qp = _single_channel_case()
        try:
            real_one = real_int8(layer, x, qp, engine=engine)
        except RuntimeError:
            real_one = None
        kind["single_channel_conv_modelled"] = real_one is not None and torch.equal(
            real_one, simulate_int8(layer, x, qp, pipeline=pipeline, library=lib,
                                    groupwise_saturates=groupwise))
    return replace(default, saturates_pairs=pipeline is Pipeline.SATURATING,
                   faithful=pipeline, real_codes=real[0],
                   integer_codes=candidates[(lib, Pipeline.INTEGER, False)][0],
                   saturating_codes=candidates[(lib, Pipeline.SATURATING, False)][0], **kind)


def kernel_probe(engine: Engine | str = Engine.FBGEMM) -> KernelProbe:
    """Which integer pipeline reproduces the real kernel of ``engine`` on this machine.

    Runs the kernel once per process and engine (later calls return the cached answer)
    on a few tiny inputs per layer kind and compares its codes with the INTEGER and
    SATURATING simulations in each :class:`Library`'s arithmetic: a 64-input linear layer
    whose int16 pair sums all saturate under AVX2 (and the same as a 1x1 convolution),
    requantization ties with an odd output zero point (which FBGEMM and oneDNN round to
    different neighbours), for linear layers a 258-input one (whose halves oneDNN pairs
    apart, see the module notes), and for convolutions a padded 3x3 one with three input channels
    (where the two libraries' AVX2 pairs differ) and FBGEMM's groupwise shapes (8 and 16
    channels in and out, whose kernel saturates or not by the CPU: FBGEMM's SATURATING
    candidate is tried both ways, :attr:`KernelProbe.groupwise_saturates`). The
    one candidate that reproduces every case is the answer, for each kind; a padded
    convolution with one input channel is then run apart, and where that candidate misses
    it, :attr:`KernelProbe.single_channel_conv_modelled` is False; both kinds must
    follow the same pipeline (the ``x86`` engine runs convolutions in oneDNN, linear layers
    in FBGEMM: held to different instruction sets, they differ, and no pipeline is then
    marked faithful). Takes milliseconds; never raises for a missing engine or a kernel
    that fails (the result says why instead).

    Parameters
    ----------
    engine : Engine or str

    Returns
    -------
    KernelProbe
        ``faithful`` is None, and ``problem`` says why, when the engine is missing, its
        kernel fails, or its codes match no candidate on every case.

    Notes
    -----
    FBGEMM picks its kernels at run time from the CPU (``vpmaddubsw`` pair sums that
    saturate at int16 on AVX2, ``vpdpbusd`` that does not on AVX512-VNNI), and the ``x86``
    engine may run oneDNN instead; asking the kernel is the one answer that cannot be
    out of date with either.
    """
    return _probe(Engine.parse(engine))


def _probed(engine: Engine) -> KernelProbe:
    """The probe for a cross-check, which warns when no pipeline can be marked faithful."""
    probe = kernel_probe(engine)
    if probe.faithful is None:
        warnings.warn(f"no simulation is marked faithful to the real kernel: "
                      f"{probe.describe()}", KernelProbeWarning, stacklevel=3)
    return probe


def _counted_saturation(probe: KernelProbe) -> bool | None:
    """The probe's answer as a cross-check counts it: the saturated elements are the faithful
    model's pairs, so without a faithful pipeline they are not counted (None)."""
    return probe.saturates_pairs if probe.faithful is not None else None


def _tallies() -> dict:
    return {(a, p): _Tally() for a in ScaleArithmetic for p in Pipeline}


def crosscheck_layer(layer: nn.Conv2d | nn.Linear, x: torch.Tensor | Iterable[torch.Tensor],
                     qparams: LayerQParams, *, bn: nn.BatchNorm2d | None = None,
                     relu: bool = False, act_spec: QuantSpec = ACTIVATION_SPEC,
                     out_spec: QuantSpec = ACTIVATION_SPEC,
                     engine: Engine | str = Engine.FBGEMM, name: str = "layer") -> CrossCheck:
    """Compare every simulation of one layer with its real INT8 kernel.

    Parameters
    ----------
    layer, qparams, bn, relu, act_spec, out_spec, engine
        As in :func:`real_int8`.
    x : torch.Tensor or iterable of torch.Tensor
        One float32 input batch, or several (counts are accumulated; memory does not grow
        with their number).
    name : str
        The layer's name in the result.

    Returns
    -------
    CrossCheck
        Six rows: each :class:`~qerror.quantizer.ScaleArithmetic` × :class:`Pipeline`.

    Notes
    -----
    ``Δ = simulated - real`` in output LSB. Without int16 saturation (activation codes
    below 128, as with ``reduce_range``, or small weights), and on outputs below ``2³¹``
    LSB of the output quantizer (see the module notes), the float pipeline with
    RECIPROCAL arithmetic is within one LSB of the real codes: it rounds
    ``y / s_y`` where the kernel rounds a value that differs from it by float32 rounding
    only, far less than one, and values less than one apart round (and clamp) to integers
    at most one apart. See the module notes for every source of difference.
    """
    engine = Engine.parse(engine)
    probe = _probed(engine)
    saturates = _counted_saturation(probe)
    plan = _plan(layer, qparams, bn=bn, relu=relu, act_spec=act_spec, out_spec=out_spec,
                 name=name, engine=engine, library=probe.library(isinstance(layer, nn.Conv2d)),
                 single_channel_modelled=probe.single_channel_conv_modelled is not False,
                 groupwise_saturates=probe.groupwise_saturates is True)
    tallies = _tallies()
    batches = [x] if isinstance(x, torch.Tensor) else x
    seen = False
    with _engine(engine), torch.inference_mode():
        for batch in batches:
            _check_input(layer, batch)
            plan.compare(batch, tallies, saturates)
            seen = True
    if not seen:
        raise ValueError("x holds no batches")
    return CrossCheck(tuple(plan.results(tallies, saturates)), engine,
                      MappingProxyType({name: plan.qparams}), probe,
                      frozenset() if plan.modelled else frozenset({name}))


# --------------------------------------------------------------------------- a model

def _float32_scale(qp: QParams) -> QParams:
    """The kernels hold scales in float32."""
    return QParams(float(np.float32(qp.scale)), int(qp.zero_point))


def crosscheck_model(model: nn.Module, calibration: Iterable, evaluation: Iterable, *,
                     act_spec: QuantSpec = ACTIVATION_SPEC, out_spec: QuantSpec | None = None,
                     act_range: RangePolicy = RangePolicy(),
                     engine: Engine | str = Engine.FBGEMM, fuse_relu: bool = True,
                     reduce_range: bool = False, seed: int = 0,
                     progress: bool = False) -> CrossCheck:
    """Cross-check every convolution and linear layer of a model, each fed its float input.

    Parameters
    ----------
    model : nn.Module
        A torchvision-style CNN in evaluation mode, traceable by ``torch.fx``; its
        convolutions are ``nn.Conv2d`` with ``groups=1``. It is not modified.
    calibration, evaluation : iterable
        Batches of float32 images (N, C, H, W), or (images, labels) pairs.
    act_spec : QuantSpec
        Quantizer of every layer's input (8-bit per tensor, nearest-even).
    out_spec : QuantSpec, optional
        Quantizer of every layer's output; default ``act_spec``.
    act_range : RangePolicy
        How the input and output ranges are calibrated, as in
        :func:`qerror.nn.propagate.calibrate_activations` (min-max by default).
    engine : Engine or str
        Quantized engine of the real kernels.
    fuse_relu : bool
        Fuse a ReLU that directly follows a layer (after its BatchNorm) into the kernel,
        as INT8 engines do; its output range then starts at 0.
    reduce_range : bool
        Calibrate every layer's input range onto half the codes (0..127), as PyTorch's
        x86/FBGEMM observers do with ``reduce_range=True``: the AVX2 kernel's int16 pair
        sums then cannot saturate on calibration-range inputs. Unsigned ``act_spec`` only
        (ValueError otherwise): a signed one's halved codes (-64..63) reach the kernel as
        64..191, which can saturate.
    seed : int
        Seed of the calibration samples (PERCENTILE and MSE ranges), from 0 to 2**64 - 1.
    progress : bool
        Show a progress bar over the evaluation batches.

    Returns
    -------
    CrossCheck
        Six rows per layer (arithmetic × pipeline) and the qparams used.

    Notes
    -----
    Each convolution is folded with the BatchNorm that is its only user (:func:`fold_bn`).
    Calibration runs the float model over ``calibration`` with forward pre-hooks and
    records, per layer, the range of its input and of its folded (and ReLU'd) float
    output with the observer that calibrates the simulation
    (:class:`qerror.nn._anatomy.RangeObserver`: exact extremes for MINMAX, a seeded sample
    of every batch for PERCENTILE and MSE). Weight scales are the per-channel min-max of
    the folded weights.
    All scales are rounded to float32. Evaluation runs the float model again and, inside
    each layer's pre-hook, compares the real kernel and the simulations on that layer's
    float input: the comparison is layer-local, errors do not propagate. Only counts are
    kept, so memory does not grow with the number of batches. Hooks are removed in
    ``finally`` blocks, also when the forward pass fails.
    """
    engine = Engine.parse(engine)
    # torch.manual_seed would take -1 as 2**64 - 1 without a word
    seed = check_seed(seed, "seed")
    out_spec = act_spec if out_spec is None else out_spec
    _check_spec(act_spec, "act_spec")
    _check_spec(out_spec, "out_spec")
    fuse_relu = check_flag(fuse_relu, "fuse_relu")
    if check_flag(reduce_range, "reduce_range") and act_spec.signed:
        raise ValueError("reduce_range maps each input onto the kernel's codes 0..127, which a "
                         "signed act_spec's halved codes (-64..63, run as 64..191) are not: "
                         "pass an unsigned act_spec (signed=False), as the default is")
    if not isinstance(act_range, RangePolicy):
        raise TypeError(f"act_range must be a RangePolicy, got {type(act_range).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"the model must be in evaluation mode (BatchNorm must use its running "
                         f"statistics to be folded); {len(training)} module(s) are training, "
                         f"e.g. {training[0]!r}; call model.eval() first")
    sites = layer_chains(model, fuse_relu, who="crosscheck_model", check_layer=_check_layer)
    folded = {s.name: s.layer if s.bn is None else fold_bn(s.layer, s.bn) for s in sites}
    gen = torch.Generator().manual_seed(seed)
    inputs = {s.name: RangeObserver(act_spec, act_range, gen) for s in sites}
    outputs = {s.name: RangeObserver(out_spec, act_range, gen) for s in sites}

    def observe(site: Site, x: torch.Tensor) -> None:
        inputs[site.name].add(x)
        # Functional, not the module: calling a hooked module from its own hook recurses.
        layer = folded[site.name]
        y = F.linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else \
            F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        outputs[site.name].add(F.relu(y) if site.relu else y)

    with torch.inference_mode(), pre_hooks(sites, observe):
        for item in calibration:
            model(batch_images(item))
    missing = [s.name for s in sites if inputs[s.name].batches == 0]
    if missing:
        raise ValueError(f"{len(missing)} layer(s) saw no calibration data (e.g. "
                         f"{missing[0]!r}); pass at least one calibration batch that reaches "
                         "every layer")
    # reduce_range: the input range maps onto half the codes (0..127 for uint8)
    input_spec = act_spec.replace(bits=act_spec.bits - 1) if reduce_range else act_spec
    probe = _probed(engine)
    saturates = _counted_saturation(probe)
    plans: dict[str, _Plan] = {}
    for s in sites:
        w = calibrate(folded[s.name].weight.detach(), WEIGHT_SPEC)
        qp = LayerQParams(_float32_scale(inputs[s.name].qparams(input_spec)),
                          QParams(np.asarray(w.scale, dtype=np.float32).astype(np.float64), 0),
                          _float32_scale(outputs[s.name].qparams()))
        plans[s.name] = _Plan(folded[s.name], qp, relu=s.relu, act_spec=act_spec,
                              out_spec=out_spec, name=s.name,
                              kind=_kind(s.layer, s.bn is not None, s.relu), engine=engine,
                              library=probe.library(isinstance(s.layer, nn.Conv2d)),
                              single_channel_modelled=(
                                  probe.single_channel_conv_modelled is not False),
                              groupwise_saturates=probe.groupwise_saturates is True)
    tallies = {s.name: _tallies() for s in sites}

    def check(site: Site, x: torch.Tensor) -> None:
        plans[site.name].compare(x.contiguous(), tallies[site.name], saturates)

    with _engine(engine), torch.inference_mode(), pre_hooks(sites, check):
        for item in progress_bar(evaluation, progress, "int8 cross-check"):
            model(batch_images(item))
    if all(t.elements == 0 for t in tallies[sites[0].name].values()):
        raise ValueError("evaluation holds no batches")
    rows = [row for s in sites
            for row in plans[s.name].results(tallies[s.name], saturates)]
    return CrossCheck(tuple(rows), engine,
                      MappingProxyType({s.name: plans[s.name].qparams for s in sites}), probe,
                      frozenset(s.name for s in sites if not plans[s.name].modelled))
