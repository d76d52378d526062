"""qerror's simulation against PyTorch's real INT8 kernels: exact agreement where the
arithmetic is reproduced, a one-LSB bound where it is not, BN folding, the model sweep."""

import dataclasses
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qerror import (
    QParams,
    QuantSpec,
    RangeMethod,
    RangePolicy,
    RoundingMode,
    ScaleArithmetic,
    calibrate,
    qparams_from_range,
    quantize,
)
from qerror.nn import calibrate_activations, fold_bn, int8
from qerror.nn.int8 import (
    ACTIVATION_SPEC,
    WEIGHT_SPEC,
    CrossCheck,
    Engine,
    KernelProbeWarning,
    LayerQParams,
    Library,
    Pipeline,
    crosscheck_layer,
    crosscheck_model,
    kernel_probe,
    real_int8,
    simulate_int8,
)
from qerror.nn.models import fashion_resnet

EXACT, RECIPROCAL = ScaleArithmetic.EXACT, ScaleArithmetic.RECIPROCAL
SIGNED_ACT = QuantSpec(bits=8, signed=True, symmetric=False)
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(
    e not in torch.backends.quantized.supported_engines,
    reason=f"this PyTorch build has no {e} quantized engine"))
    for e in ("fbgemm", "x86", "onednn")]

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines,
    reason="this PyTorch build has no FBGEMM quantized engine")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(kind: str, seed: int, **kw) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(**kw) if kind == "linear" else nn.Conv2d(**kw)


def _qparams(layer, x, *, relu=False, headroom=1.0, act_spec=ACTIVATION_SPEC, bn=None):
    """Min-max qparams: input range widened by ``headroom``, per-channel weights, output."""
    folded = fold_bn(layer, bn) if bn is not None else layer
    w = calibrate(folded.weight.detach(), WEIGHT_SPEC)
    qi = qparams_from_range(float(x.min()) * headroom, float(x.max()) * headroom, act_spec)
    with torch.no_grad():
        y = folded(x)
    if relu:
        y = y.relu()
    qo = qparams_from_range(float(y.min()), float(y.max()), ACTIVATION_SPEC)
    return LayerQParams(qi, QParams(w.scale, 0), qo)


# (layer kind, constructor arguments, input shape): the convolution paths FBGEMM takes
# (im2col, pointwise, strided 1x1, a 1-channel 7x7 stem whose reduction pairs straddle
# kernel taps, an odd channel count, dilation, non-square kernels) and linear layers with
# an odd and an even reduction length.
CASES = {
    "conv3x3": ("conv", {"in_channels": 16, "out_channels": 32, "kernel_size": 3,
                         "padding": 1}, (3, 16, 10, 10)),
    "pointwise": ("conv", {"in_channels": 16, "out_channels": 24, "kernel_size": 1},
                  (3, 16, 8, 8)),
    "1x1-stride2": ("conv", {"in_channels": 16, "out_channels": 24, "kernel_size": 1,
                             "stride": 2}, (3, 16, 8, 8)),
    "stem7x7": ("conv", {"in_channels": 1, "out_channels": 32, "kernel_size": 7, "stride": 2,
                         "padding": 3, "bias": False}, (3, 1, 16, 16)),
    "odd-channels": ("conv", {"in_channels": 3, "out_channels": 16, "kernel_size": 3,
                              "padding": 1}, (3, 3, 9, 9)),
    "dilated": ("conv", {"in_channels": 6, "out_channels": 12, "kernel_size": 3, "padding": 2,
                         "dilation": 2}, (3, 6, 11, 11)),
    "3x5-stride": ("conv", {"in_channels": 6, "out_channels": 12, "kernel_size": (3, 5),
                            "padding": (1, 2), "stride": (2, 1)}, (3, 6, 11, 11)),
    "linear-odd": ("linear", {"in_features": 37, "out_features": 10}, (16, 37)),
    "linear": ("linear", {"in_features": 256, "out_features": 20}, (16, 256)),
}


# FBGEMM's groupwise path, which it takes for groups=1 too (C_in == C_out of 8 or 16, 3x3,
# padding 1, stride 1 or 2) and whose kernel saturates or not by the CPU (the probe says).
GROUPWISE_CASES = {
    f"groupwise{c}-stride{s}": ("conv", {"in_channels": c, "out_channels": c, "kernel_size": 3,
                                         "padding": 1, "stride": s}, (3, c, 10, 10))
    for c in (8, 16) for s in (1, 2)}


def _case(name: str, seed: int = 0):
    kind, kw, shape = {**CASES, **GROUPWISE_CASES}[name]
    layer = _layer(kind, seed, **kw)
    x = torch.randn(shape, generator=_gen(seed + 1))
    return layer, x


# --------------------------------------------------------------------------- codes

def test_reciprocal_codes_are_pytorchs_and_exact_ones_differ_only_at_ties():
    """The integer pipelines with RECIPROCAL arithmetic start from PyTorch's own codes."""
    s, z = 0.0123, 117
    g = _gen(0)
    # Values within float32 rounding of a half-integer multiple of s, where the rounding of
    # x·fl(1/s) and of the exact quotient may part.
    k = torch.randint(-200, 200, (4000,), generator=g).to(torch.float64)
    ties = ((k + 0.5) * np.float32(s)).to(torch.float32)
    x = torch.cat([torch.randn(100_000, generator=g) * 2, ties])
    spec = ACTIVATION_SPEC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = torch.quantize_per_tensor(x, s, z, torch.quint8).int_repr().to(torch.int32)
    assert torch.equal(quantize(x, spec.replace(arithmetic=RECIPROCAL), s, z), theirs)
    exact = quantize(x, spec.replace(arithmetic=EXACT), s, z)
    differ = exact != theirs
    assert differ.any()
    u = x[differ].double() / np.float32(s)
    assert torch.all((u - u.floor() - 0.5).abs() < 1e-5)
    assert torch.all((exact - theirs).abs() <= 1)


# --------------------------------------------------------------------------- exactness

@pytest.mark.needs_saturating_kernel
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_saturating_pipeline_reproduces_the_kernel_exactly(name, relu):
    layer, x = _case(name)
    result = crosscheck_layer(layer, x, _qparams(layer, x, relu=relu), relu=relu)
    row = result.get("layer", RECIPROCAL, Pipeline.SATURATING)
    # Full-range activations and min-max weights: the int16 pair sums do saturate, so the
    # case exercises the part of the mimic that goes beyond exact integer arithmetic.
    assert row.saturated > 0
    assert row.equal == row.elements
    assert row.max_abs_lsb == 0


@pytest.mark.parametrize("name", list(CASES))
def test_integer_pipeline_is_exact_wherever_nothing_saturates(name):
    """Exact int32 accumulation plus FBGEMM's float32 bias and requantization is the
    kernel's arithmetic, so codes agree on every element the int16 saturation leaves alone
    (on a VNNI CPU, which does not saturate, on every element)."""
    layer, x = _case(name, seed=3)
    result = crosscheck_layer(layer, x, _qparams(layer, x))
    row = result.get("layer", RECIPROCAL, Pipeline.INTEGER)
    assert row.max_abs_lsb_unsaturated == 0


@pytest.mark.parametrize("name", list(CASES))
def test_reduced_range_activations_cannot_saturate(name):
    """Activation codes in [0, 128] (reduce_range) bound each int16 pair sum by
    2·128·127 = 32512 < 32767: the plain integer pipeline is then exact everywhere."""
    layer, x = _case(name, seed=5)
    x = x.relu()
    result = crosscheck_layer(layer, x, _qparams(layer, x, headroom=2.0))
    row = result.get("layer", RECIPROCAL, Pipeline.INTEGER)
    assert row.saturated == row.avx2_saturated == 0
    assert row.equal == row.elements


def test_float_pipeline_is_within_one_lsb_without_saturation():
    """Without saturation the kernel rounds t' and the float simulation rounds t'', both
    the exact t = y/s_y up to float32 rounding of O(K) operations, far less than one
    apart; values less than one apart round to codes at most one apart (R is monotone
    and R(t + 1) = R(t) + 1; clamping is 1-Lipschitz)."""
    layer = _layer("conv", 7, in_channels=32, out_channels=64, kernel_size=3, padding=1)
    x = torch.randn(8, 32, 16, 16, generator=_gen(8)).relu()
    qp = _qparams(layer, x, headroom=2.0)
    result = crosscheck_layer(layer, x, qp)
    for arithmetic in ScaleArithmetic:
        row = result.get("layer", arithmetic, Pipeline.FLOAT)
        assert row.saturated == 0
        assert row.max_abs_lsb <= 1


def test_float_pipeline_differs_only_on_rounding_boundaries():
    """Outputs placed exactly on half-integers: the kernel's float32 arithmetic is exact
    there (dyadic weight scale, multiplier 1, bias 0.5 accumulator units) and rounds the
    tie to even; the float simulation's rounding errors push each tie either way. Channels
    whose outputs sit a quarter away from any boundary must agree exactly."""
    sx, sw = float(np.float32(0.0123)), 2.0**-7
    m = float(np.float32(sx) * np.float32(sw))     # exact: sw is a power of two
    layer = _layer("conv", 70, in_channels=4, out_channels=8, kernel_size=3, padding=1)
    g = _gen(71)
    tie = torch.arange(8) < 4
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-2, 3, (8, 4, 3, 3), generator=g) * sw)
        layer.bias.copy_(torch.where(tie, 0.5, 0.25) * m)
    x = (torch.randint(0, 4, (4, 4, 8, 8), generator=g).double() * sx).float()
    qp = LayerQParams(QParams(sx, 0), QParams(np.full(8, sw), 0), QParams(m, 128))
    real = real_int8(layer, x, qp)
    for arithmetic in ScaleArithmetic:
        sim = simulate_int8(layer, x, qp, arithmetic=arithmetic, pipeline=Pipeline.FLOAT)
        differ = sim != real
        assert differ[:, tie].any()
        assert not differ[:, ~tie].any()
        assert (sim - real).abs().max() == 1
        assert torch.equal(simulate_int8(layer, x, qp, arithmetic=arithmetic,
                                         pipeline=Pipeline.INTEGER), real)


def test_exact_arithmetic_parts_from_the_kernel_only_through_its_input_codes():
    """Inputs on near-ties: EXACT codes differ from PyTorch's there, and so do the integer
    pipeline's outputs, while RECIPROCAL codes reproduce the kernel exactly."""
    layer = _layer("conv", 9, in_channels=8, out_channels=16, kernel_size=3, padding=1)
    s = float(np.float32(0.0123))
    k = torch.randint(0, 128, (4, 8, 10, 10), generator=_gen(10)).double()
    x = ((k + 0.5) * s).float()
    qp = _qparams(layer, x)
    qp = LayerQParams(QParams(s, 0), qp.weight, qp.output)
    result = crosscheck_layer(layer, x, qp)
    assert result.get("layer", RECIPROCAL, Pipeline.INTEGER).frac_equal == 1.0
    assert result.get("layer", EXACT, Pipeline.INTEGER).frac_equal < 1.0


@pytest.mark.needs_saturating_kernel
def test_signed_activations_run_as_the_same_unsigned_grid():
    layer, x = _case("conv3x3", seed=11)
    qp = _qparams(layer, x, act_spec=SIGNED_ACT)
    assert quantize(x, SIGNED_ACT, qp.input.scale, qp.input.zero_point).min() == -128
    result = crosscheck_layer(layer, x, qp, act_spec=SIGNED_ACT)
    assert result.get("layer", RECIPROCAL, Pipeline.SATURATING).frac_equal == 1.0
    assert result.get("layer", RECIPROCAL, Pipeline.FLOAT).max_abs_lsb_unsaturated <= 1
    signed_out = crosscheck_layer(layer, x, LayerQParams(qp.input, qp.weight, QParams(
        qp.output.scale, qp.output.zero_point - 128)), act_spec=SIGNED_ACT, out_spec=SIGNED_ACT)
    assert signed_out.get("layer", RECIPROCAL, Pipeline.SATURATING).frac_equal == 1.0
    codes = real_int8(layer, x, signed_out.qparams["layer"], act_spec=SIGNED_ACT,
                      out_spec=SIGNED_ACT)
    assert codes.min() >= -128 and codes.max() <= 127 and codes.min() < 0


@pytest.mark.needs_saturating_kernel
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cin=st.integers(1, 12), cout=st.integers(1, 12),
       k=st.integers(1, 5), stride=st.integers(1, 3), pad=st.integers(0, 2),
       relu=st.booleans())
def test_saturating_pipeline_exact_on_random_convolutions(seed, cin, cout, k, stride, pad,
                                                          relu):
    layer = _layer("conv", seed, in_channels=cin, out_channels=cout, kernel_size=k,
                   stride=stride, padding=pad)
    x = torch.randn(2, cin, 9, 9, generator=_gen(seed)) * 3
    result = crosscheck_layer(layer, x, _qparams(layer, x, relu=relu), relu=relu)
    row = result.get("layer", RECIPROCAL, Pipeline.SATURATING)
    assert row.equal == row.elements


@pytest.mark.needs_saturating_kernel
def test_saturation_counts_the_padding_when_its_zero_point_is_above_every_code():
    """A padded convolution of inputs below the zero point (a mostly negative range, as
    before a ReLU): the padding holds the zero point, the largest code the kernel
    multiplies, and the pairs that read it saturate too (they were left out)."""
    layer = _layer("conv", 5, in_channels=2, out_channels=2, kernel_size=3, padding=1,
                   bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = -5 - torch.rand(1, 2, 5, 5, generator=_gen(5)) * 5
    qi = qparams_from_range(-10.0, 0.05, ACTIVATION_SPEC)
    assert int(quantize(x, ACTIVATION_SPEC, qi.scale, qi.zero_point).max()) < qi.zero_point
    qp = LayerQParams(qi, QParams(np.full(2, 1 / 127), 0), QParams(1.0, 255))
    row = crosscheck_layer(layer, x, qp).get("layer", RECIPROCAL, Pipeline.SATURATING)
    assert row.equal == row.elements and row.saturated > 0


# --------------------------------------------------------------------------- results

def test_rows_counts_and_batches_accumulate():
    layer, x = _case("conv3x3", seed=13)
    qp = _qparams(layer, x)
    one = crosscheck_layer(layer, x, qp, name="c")
    two = crosscheck_layer(layer, [x, x], qp, name="c")
    assert len(one.rows) == 6
    assert {(r.arithmetic, r.pipeline) for r in one.rows} == {
        (a, p) for a in ScaleArithmetic for p in Pipeline}
    for r1 in one.rows:
        r2 = two.get("c", r1.arithmetic, r1.pipeline)
        assert r2.elements == 2 * r1.elements == 2 * x.shape[0] * 32 * 10 * 10
        assert r2.equal == 2 * r1.equal and r2.max_abs_lsb == r1.max_abs_lsb
        assert r2.saturated == 2 * r1.saturated
        assert r2.avx2_saturated == 2 * r1.avx2_saturated
        assert sum(c for _, c in r1.histogram) == r1.elements
        assert r1.count(0) == r1.equal
        assert r1.n_abs1 + r1.n_abs_gt1 == r1.elements - r1.equal
        assert r1.sum_delta == sum(d * c for d, c in r1.histogram)
    frame = one.to_frame()
    assert len(frame) == 6 and set(frame.layer) == {"c"}
    assert {"frac_equal", "max_abs_lsb", "mean_delta", "n_abs1", "saturated"} <= set(frame)
    summary = one.summary()
    assert len(summary) == 6 and (summary.layers == 1).all()


# --------------------------------------------------------------------------- the kernel probe

def test_kernel_probe_is_cached_and_is_the_kernel_s_own_answer():
    probe = kernel_probe()
    assert kernel_probe("fbgemm") is probe
    assert probe.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert set(probe.cpu_flags) <= set(int8._KERNEL_FLAGS)
    layer, x, qp = int8._probe_case()
    codes = {p: tuple(simulate_int8(layer, x, qp, pipeline=p).flatten().tolist())
             for p in (Pipeline.INTEGER, Pipeline.SATURATING)}
    # Every pair sum saturates under AVX2, so the two answers are far apart on both signs.
    assert codes[Pipeline.INTEGER] == probe.integer_codes == (248, 8)
    assert codes[Pipeline.SATURATING] == probe.saturating_codes == (189, 67)
    assert tuple(real_int8(layer, x, qp).flatten().tolist()) == probe.real_codes
    assert probe.faithful is not None and probe.problem == ""
    assert probe.real_codes == codes[probe.faithful]
    assert probe.saturates_pairs is (probe.faithful is Pipeline.SATURATING)
    assert probe.linear_library is probe.conv_library is Library.FBGEMM


def test_describe_names_the_cpu_by_its_flags_and_aten_s_capability_as_aten_s():
    """ATEN_CPU_CAPABILITY=avx2 on an AVX512-VNNI CPU caps ATen's dispatch, not the CPU
    nor the quantized kernels: the sentence must not call the CPU AVX2 beside a kernel that
    does not saturate, nor AVX-512 beside one held to AVX2 that does."""
    probe = kernel_probe()
    vnni = ("avx2", "avx512f", "avx512bw", "avx512_vnni")
    for cap, flags, saturates, cpu in (("AVX2", vnni, False, "AVX512-VNNI"),
                                       ("AVX512", vnni, True, "AVX512-VNNI"),
                                       ("AVX2", ("avx2",), True, "AVX2"),
                                       ("AVX512", vnni[:3], True, "AVX-512 without VNNI"),
                                       ("DEFAULT", (), None, "flags unknown")):
        text = dataclasses.replace(probe, cpu_capability=cap, cpu_flags=flags,
                                   saturates_pairs=saturates).describe()
        assert f"this CPU ({cpu}; ATen's CPU capability {cap})" in text, text


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_kernel_probe_names_each_kind_s_library(engine):
    """oneDNN runs the onednn engine throughout and the x86 engine's convolutions where
    the CPU has VNNI (else FBGEMM does); FBGEMM runs the x86 engine's linear layers."""
    probe = kernel_probe(engine)
    assert probe.faithful is not None, probe.describe()
    if engine == "onednn":
        assert probe.linear_library is probe.conv_library is Library.ONEDNN
    else:
        assert probe.linear_library is Library.FBGEMM
        assert probe.conv_library in (Library.FBGEMM, Library.ONEDNN)
    assert f"{probe.conv_library.value}'s" in probe.describe()


@pytest.mark.parametrize("conv", [False, True])
def test_probe_cases_tell_every_candidate_apart(conv):
    """Whatever the CPU: on the probe's cases each candidate (library × pipeline, and
    FBGEMM's saturating one with and without its groupwise kernel saturating) gives other
    codes than every other one, so a kernel can match one at most; the saturation case
    parts the pipelines, the tie case the libraries, and for convolutions the padded
    3-channel case parts the libraries' saturating pairs and the groupwise cases FBGEMM's
    groupwise kernel saturating or not."""
    cases = int8._probe_cases(conv)
    codes = int8._candidate_codes(cases)
    keys = list(codes)
    assert len(keys) == 5
    # the groupwise variant parts from FBGEMM's other saturating candidate on convolutions
    # only: a linear kernel cannot tell it, and the probe takes its answer from the
    # convolutions (test_the_probe_finds_whether_fbgemm_s_groupwise_kernel_saturates)
    alike = set() if conv else {((Library.FBGEMM, Pipeline.SATURATING, False),
                                 (Library.FBGEMM, Pipeline.SATURATING, True))}
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (codes[a] == codes[b]) is ((a, b) in alike), (a, b)
    names = list(cases)
    at = {name: {key: codes[key][i] for key in keys} for i, name in enumerate(names)}
    F_, O_ = Library.FBGEMM, Library.ONEDNN
    for lib in Library:
        assert at["saturation"][(lib, Pipeline.INTEGER, False)] != \
            at["saturation"][(lib, Pipeline.SATURATING, False)]
    for pipe in (Pipeline.INTEGER, Pipeline.SATURATING):
        tie = at["requantization tie"]
        assert all(abs(a - b) == 1 for a, b in zip(tie[(F_, pipe, False)],
                                                    tie[(O_, pipe, False)]))
    if not conv:
        # oneDNN's halves paired apart change its saturating codes on the 258-input case
        halves = "258-input linear (oneDNN's halves)"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(int8, "_ONEDNN_HALVES", range(0))
            one_run = int8._candidate_codes({halves: cases[halves]})
        key = (O_, Pipeline.SATURATING, False)
        assert at[halves][key] != one_run[key][0]
    if conv:
        padded = at["padded 3-channel 3x3"]
        assert padded[(F_, Pipeline.SATURATING, False)] != padded[(O_, Pipeline.SATURATING,
                                                                   False)]
        for name in names[3:]:
            assert "groupwise" in name
            g = at[name]
            assert g[(F_, Pipeline.SATURATING, False)] == g[(F_, Pipeline.INTEGER, False)]
            assert g[(F_, Pipeline.SATURATING, True)] != g[(F_, Pipeline.INTEGER, False)]
            assert g[(O_, Pipeline.SATURATING, False)] != g[(O_, Pipeline.INTEGER, False)]


@pytest.mark.parametrize("groupwise", [False, True])
def test_the_probe_finds_whether_fbgemm_s_groupwise_kernel_saturates(monkeypatch, groupwise):
    """Measured: FBGEMM's groupwise kernel saturates as its im2col kernel does on a CPU
    with AVX2 only (an AMD EPYC, Zen 3) and not at all on CPUs with AVX512-VNNI whose
    FBGEMM is held to AVX2. A stand-in kernel of either kind is found as it is."""
    def kernel(layer, x, qp, **kw):
        return simulate_int8(layer, x, qp, pipeline=Pipeline.SATURATING,
                             groupwise_saturates=groupwise)

    monkeypatch.setattr(int8, "real_int8", kernel)
    probe = int8._probe.__wrapped__(Engine.FBGEMM)
    assert probe.faithful is Pipeline.SATURATING and probe.groupwise_saturates is groupwise
    assert ("its groupwise 3x3 kernel too" if groupwise else
            "but not its groupwise 3x3 kernel") in probe.describe()
    layer, x = _case("groupwise8-stride1", seed=3)
    qp = _qparams(layer, x)
    real = kernel(layer, x, qp)
    other = simulate_int8(layer, x, qp, pipeline=Pipeline.SATURATING,
                          groupwise_saturates=not groupwise)
    assert not torch.equal(real, other)  # on a groupwise layer the answer matters


def test_kernel_probe_says_why_when_the_engine_is_missing(monkeypatch):
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack"])
    # The cached function's body, so that the process-wide answer is left alone.
    probe = int8._probe.__wrapped__(Engine.FBGEMM)
    assert probe.faithful is None and probe.saturates_pairs is None
    assert probe.real_codes == ()
    assert "'fbgemm' is not in this PyTorch build" in probe.problem
    assert probe.problem in probe.describe()


def test_kernel_probe_matching_neither_pipeline_is_flagged(monkeypatch):
    monkeypatch.setattr(int8, "real_int8", lambda *a, **k: torch.tensor([[1, 2]]))
    probe = int8._probe.__wrapped__(Engine.FBGEMM)
    assert probe.faithful is None and probe.saturates_pairs is None
    assert "match neither" in probe.problem and "(1, 2)" in probe.problem
    assert "fbgemm/integer fails the saturation case" in probe.problem
    monkeypatch.setattr(int8, "kernel_probe", lambda engine=Engine.FBGEMM: probe)
    layer, x = _case("conv3x3")
    with pytest.warns(KernelProbeWarning, match="match neither"):
        result = crosscheck_layer(layer, x, _qparams(layer, x))
    assert not any(result.faithful(r) for r in result.rows)
    assert all(r.saturated is None and r.avx2_saturated > 0 for r in result.rows)
    summary = result.summary()
    assert not summary.faithful.any() and summary.saturated.isna().all()


def test_a_saturating_kernel_no_pipeline_models_is_still_called_saturating(monkeypatch):
    """oneDNN held to AVX-512 without VNNI on an AMD EPYC (ONEDNN_MAX_CPU_ISA=AVX512_CORE)
    saturates int16 pair sums but pairs a 258-input linear layer in one run, not in halves:
    no candidate reproduces every case, yet the saturation case shows that it saturates
    (PT2E's compiled modules recorded None, "could not tell", for such kernels). A stand-in
    kernel of that kind is called saturating, no pipeline faithful, and a cross-check counts
    no saturation (its count would take the unfaithful model's pairs). Where the engine's
    convolution kernel does not saturate, the engine has no one answer."""
    def one_run(conv_pipeline):
        def kernel(layer, x, qp, **kw):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(int8, "_ONEDNN_HALVES", range(0))
                pipeline = conv_pipeline if isinstance(layer, nn.Conv2d) else \
                    Pipeline.SATURATING
                return simulate_int8(layer, x, qp, pipeline=pipeline, library=Library.ONEDNN)
        return kernel

    monkeypatch.setattr(int8, "real_int8", one_run(Pipeline.SATURATING))
    probe = int8._probe.__wrapped__(Engine.ONEDNN)
    assert probe.faithful is None and probe.saturates_pairs is True
    assert "onednn/saturating fails the 258-input linear (oneDNN's halves) case" in probe.problem
    assert probe.problem.endswith("it saturates int16 pair sums, but no simulation models "
                                  "this kernel")
    monkeypatch.setattr(int8, "kernel_probe", lambda engine=Engine.FBGEMM: probe)
    layer, x = _case("linear")
    with pytest.warns(KernelProbeWarning, match="it saturates int16 pair sums"):
        result = crosscheck_layer(layer, x, _qparams(layer, x), engine="onednn")
    assert not any(result.faithful(r) for r in result.rows)
    assert all(r.saturated is None and r.avx2_saturated > 0 for r in result.rows)
    monkeypatch.setattr(int8, "real_int8", one_run(Pipeline.INTEGER))
    mixed = int8._probe.__wrapped__(Engine.ONEDNN)
    assert mixed.faithful is None and mixed.saturates_pairs is None


def test_a_probe_whose_convolution_and_linear_kernels_differ_marks_nothing(monkeypatch):
    """The x86 engine runs convolutions in oneDNN and linear layers in FBGEMM, which pick
    their instructions apart: when the two disagree on the probe, neither pipeline is
    faithful for the engine (each layer kind would need its own), and the problem says so."""
    real = int8.real_int8

    def mixed(layer, x, qp, **kw):
        if isinstance(layer, nn.Conv2d):  # the convolution kernel: no saturation
            return simulate_int8(layer, x, qp, pipeline=Pipeline.INTEGER)
        return simulate_int8(layer, x, qp, pipeline=Pipeline.SATURATING)

    monkeypatch.setattr(int8, "real_int8", mixed)
    probe = int8._probe.__wrapped__(Engine.FBGEMM)
    assert probe.faithful is None and probe.saturates_pairs is None
    assert "linear kernel follows the saturating pipeline but its convolution kernel " \
           "follows integer" in probe.problem
    monkeypatch.setattr(int8, "real_int8", real)
    same = int8._probe.__wrapped__(Engine.FBGEMM)
    assert same.faithful is not None and same.problem == ""


def test_the_x86_probe_with_fbgemm_alone_held_to_avx2():
    """With FBGEMM alone held to AVX2 (oneDNN, which runs the x86 engine's convolutions,
    left to the CPU), the x86 probe is faithful only where both kernels agree: a
    saturating answer on an AVX2 CPU, none on an AVX512-VNNI one."""
    import subprocess
    import sys

    code = ("from qerror.nn import int8; e = int8.Engine.X86; "
            "k = [int8._probe_kind(e, c).faithful for c in (False, True)]; "
            "p = int8.kernel_probe(e); print(k[0], k[1], p.faithful)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                              "OMP_NUM_THREADS": "1"}, check=True).stdout.split()
    linear, conv, faithful = out
    assert linear == "Pipeline.SATURATING"
    assert faithful == (linear if conv == linear else "None")


def test_a_one_channel_convolution_is_faithful_only_where_the_probe_saw_it_so():
    """oneDNN held to AVX-512 without VNNI (a Skylake-SP's kernels; on an AVX2 CPU the cap
    is AVX2) pairs a one-input-channel convolution's products otherwise than its other
    convolutions (measured on an AMX CPU: kernel column by kernel column, where its AVX2
    kernel does not pair them at all). A row the cross-check marks faithful must
    reproduce every code of such a layer, full-range activations included; where no
    pipeline does, the layer is unmodelled and no row of it faithful. Where the probe finds
    no faithful pipeline at all under that cap (measured on an AMD EPYC with AVX512-VNNI:
    its linear kernel does not pair 258 inputs in halves there), no row can be marked and
    the probe never reaches the one-channel case: the test skips, saying so, rather than
    pass on zero marked rows."""
    import subprocess
    import sys

    code = """if True:
        import numpy as np, torch
        from torch import nn
        from qerror import QParams, calibrate, qparams_from_range
        from qerror.nn import int8
        probe = int8.kernel_probe("onednn")
        print(probe.faithful is not None, probe.single_channel_conv_modelled)
        print(probe.describe())
        for k, pad, stride in ((7, 3, 2), (3, 1, 1)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                layer = nn.Conv2d(1, 32, k, padding=pad, stride=stride)
            x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
            w = calibrate(layer.weight.detach(), int8.WEIGHT_SPEC)
            with torch.no_grad():
                y = layer(x)
            qp = int8.LayerQParams(
                qparams_from_range(float(x.min()), float(x.max()), int8.ACTIVATION_SPEC),
                QParams(w.scale, 0),
                qparams_from_range(float(y.min()), float(y.max()), int8.ACTIVATION_SPEC))
            result = int8.crosscheck_layer(layer, x, qp, engine="onednn")
            marked = [r for r in result.rows if result.faithful(r)]
            print(len(marked), sum(r.elements - r.equal for r in marked),
                  result.get("layer", "reciprocal", "saturating").avx2_saturated)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                              "OMP_NUM_THREADS": "1"}, check=True).stdout.split("\n")
    lines = [line for line in out if line]
    # the probe's answer, then one line per shape: a silent subprocess checks nothing
    assert len(lines) == 4, out
    found, modelled = lines[0].split()
    if found == "False":
        pytest.skip(f"oneDNN held to AVX512_CORE: no pipeline is faithful to it here, so "
                    f"no one-channel row can be marked ({lines[1]})")
    for line in lines[2:]:
        marked, wrong, _ = map(int, line.split())
        assert marked == (1 if modelled == "True" else 0) and wrong == 0, out


def test_a_probe_whose_one_channel_convolution_differs_leaves_such_layers_unmodelled(
        monkeypatch):
    """The probe runs a one-input-channel convolution beside its other cases: a kernel
    that pairs its products otherwise than the candidate that matched every other case
    (here, like FBGEMM's im2col, where oneDNN's model pairs nothing) keeps the engine's
    faithful pipeline but marks no row of a one-channel convolution faithful; other
    layers keep theirs."""
    def one_channel_apart(layer, x, qp, **kw):
        lib = ("fbgemm" if isinstance(layer, nn.Conv2d) and layer.in_channels == 1
               else "onednn")
        return simulate_int8(layer, x, qp, pipeline=Pipeline.SATURATING, library=lib)

    case = int8._single_channel_case()
    codes = {lib: simulate_int8(*case, pipeline=Pipeline.SATURATING, library=lib)
             for lib in Library}
    plain = simulate_int8(*case, pipeline=Pipeline.INTEGER, library=Library.ONEDNN)
    # The case saturates FBGEMM's pairs, and oneDNN's per-tap pairs not at all.
    assert not torch.equal(codes[Library.FBGEMM], codes[Library.ONEDNN])
    assert torch.equal(codes[Library.ONEDNN], plain)

    monkeypatch.setattr(int8, "real_int8", one_channel_apart)
    probe = int8._probe.__wrapped__(Engine.ONEDNN)
    assert probe.faithful is Pipeline.SATURATING and probe.conv_library is Library.ONEDNN
    assert probe.single_channel_conv_modelled is False
    assert "one input channel" in probe.describe()
    monkeypatch.setattr(int8, "kernel_probe", lambda engine=Engine.FBGEMM: probe)
    for cin, faithful in ((1, 0), (2, 1)):
        layer = _layer("conv", 3, in_channels=cin, out_channels=4, kernel_size=3, padding=1)
        x = torch.randn(2, cin, 6, 6, generator=_gen(3))
        result = crosscheck_layer(layer, x, _qparams(layer, x), engine="onednn")
        assert sum(result.faithful(r) for r in result.rows) == faithful
        assert result.unmodelled == ({"layer"} if cin == 1 else set())
    assert int8._probe.__wrapped__(Engine.ONEDNN).single_channel_conv_modelled is False
    # Over layers, a pipeline is faithful only where it is on every layer: a one-channel
    # convolution behind a modelled one (not only a stem) leaves no summary row marked.
    model = nn.Sequential(nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)).eval()
    data = [torch.randn(2, 2, 6, 6, generator=_gen(4))]
    check = crosscheck_model(model, data, data, engine="onednn")
    assert check.unmodelled == {"1"}
    assert check.to_frame().faithful.sum() == 1
    assert not check.summary().faithful.any()
    monkeypatch.undo()
    # The real kernel's own answer: a bool, found afresh as the process-wide one was.
    answer = kernel_probe("onednn").single_channel_conv_modelled
    assert answer in (True, False)
    assert int8._probe.__wrapped__(Engine.ONEDNN).single_channel_conv_modelled is answer


def test_summary_and_rows_mark_the_faithful_pipeline():
    layer, x = _case("conv3x3")
    result = crosscheck_layer(layer, x, _qparams(layer, x))
    probe = result.probe
    assert probe is kernel_probe()
    frame, summary = result.to_frame(), result.summary()
    for table in (frame, summary):
        marked = table[table.faithful]
        assert marked[["arithmetic", "pipeline"]].values.tolist() == [
            ["reciprocal", probe.faithful.value]]
    assert summary[summary.faithful].min_frac_equal.item() == 1.0
    # Full-range activations: the AVX2 kernel would saturate here, on any CPU.
    assert (summary.avx2_saturated > 0).all()
    expected = summary.avx2_saturated if probe.saturates_pairs else 0
    assert (summary.saturated == expected).all()


def test_the_other_probe_answer_names_the_other_pipeline(monkeypatch):
    """Pure bookkeeping, valid on any CPU: told that the kernel behaves the other way, the
    cross-check marks the other pipeline faithful, and counts kernel saturation only if
    that answer says the kernel saturates."""
    real = kernel_probe()
    other = dataclasses.replace(
        real, saturates_pairs=not real.saturates_pairs,
        faithful=Pipeline.INTEGER if real.saturates_pairs else Pipeline.SATURATING)
    monkeypatch.setattr(int8, "kernel_probe", lambda engine=Engine.FBGEMM: other)
    layer, x = _case("conv3x3")
    result = crosscheck_layer(layer, x, _qparams(layer, x))
    assert result.probe is other
    summary = result.summary()
    assert summary[summary.faithful].pipeline.tolist() == [other.faithful.value]
    for r in result.rows:
        assert r.avx2_saturated > 0
        if other.saturates_pairs:
            assert r.saturated == r.avx2_saturated
        else:
            # No kernel saturation: no element is set apart from the unsaturated maximum.
            assert r.saturated == 0 and r.max_abs_lsb_unsaturated == r.max_abs_lsb
    assert (summary.saturated == (summary.avx2_saturated if other.saturates_pairs else 0)).all()


@pytest.mark.needs_nonsaturating_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_integer_pipeline_reproduces_a_nonsaturating_kernel_exactly(name):
    """On AVX512-VNNI the products are accumulated in int32 without saturation: the plain
    integer pipeline is exact even where the AVX2 kernel would have saturated."""
    layer, x = _case(name)
    result = crosscheck_layer(layer, x, _qparams(layer, x))
    row = result.get("layer", RECIPROCAL, Pipeline.INTEGER)
    assert row.avx2_saturated > 0 and row.saturated == 0
    assert row.equal == row.elements


@pytest.mark.parametrize("name", list(GROUPWISE_CASES))
def test_fbgemm_s_groupwise_path_saturates_as_the_probe_found(name):
    """FBGEMM runs these shapes through its groupwise kernel, which saturates int16 pair
    sums on some CPUs and not on others (the probe's ``groupwise_saturates``): the faithful
    row is exact on every CPU, and elements count as saturated exactly where the probe
    found that kernel saturating. The same weights and input with padding 2 (FBGEMM's
    im2col kernel) do saturate under AVX2, so the input is one that would show it."""
    layer, x = _case(name, seed=3)
    result = crosscheck_layer(layer, x, _qparams(layer, x))
    faithful = [r for r in result.rows if result.faithful(r)]
    assert len(faithful) == 1 and faithful[0].equal == faithful[0].elements
    if result.probe.groupwise_saturates:
        assert faithful[0].avx2_saturated > 0 and faithful[0].saturated > 0
    else:
        assert all(r.avx2_saturated == 0 and r.saturated == 0 for r in result.rows)
    wide = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=2, stride=layer.stride)
    wide.load_state_dict(layer.state_dict())
    control = crosscheck_layer(wide, x, _qparams(wide, x))
    row = control.get("layer", RECIPROCAL, control.probe.faithful)
    assert row.avx2_saturated > 0 and row.equal == row.elements


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", list(CASES) + list(GROUPWISE_CASES))
def test_the_faithful_pipeline_is_exact_on_every_engine(engine, name, relu):
    """Whichever library runs each layer kind of the engine (oneDNN pairs the channels of
    each kernel tap and skips the padding under AVX2; FBGEMM's groupwise kernel saturates
    or not by the CPU), the row the probe marks faithful reproduces every code, with full-range
    activations that saturate the AVX2 kernels' pair sums. oneDNN with a fused ReLU is
    marked faithful nowhere (its rounding of rare near-ties is not modelled), nor a
    one-channel convolution where the probe found its pairs unmodelled."""
    layer, x = _case(name)
    result = crosscheck_layer(layer, x, _qparams(layer, x, relu=relu), relu=relu,
                              engine=engine)
    faithful = [r for r in result.rows if result.faithful(r)]
    library = result.probe.library(isinstance(layer, nn.Conv2d))
    if (relu and library is Library.ONEDNN) or (
            name == "stem7x7" and result.probe.single_channel_conv_modelled is False):
        assert faithful == [] and result.unmodelled == {"layer"}
        return
    assert len(faithful) == 1, result.probe.describe()
    assert faithful[0].equal == faithful[0].elements, result.probe.describe()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("features", [256, 257, 258, 259, 262, 513, 766, 769, 1026])
def test_the_faithful_pipeline_is_exact_on_long_linear_layers(engine, features):
    """oneDNN's AVX2 linear kernel reduces 257 to 768 inputs in two halves, pairing each
    from its own start: with ⌈K/2⌉ odd its pairs part from the single run's (measured:
    every K from 257 to 766 that is 1 or 2 mod 4 missed before, a few LSB on about half
    the outputs). Full-range activations and min-max weights, which saturate pair sums:
    the row the probe marks faithful reproduces every code, on every engine and CPU."""
    layer = _layer("linear", features, in_features=features, out_features=6)
    x = torch.randn(5, features, generator=_gen(features)) * 2
    result = crosscheck_layer(layer, x, _qparams(layer, x), engine=engine)
    row = result.get("layer", RECIPROCAL, result.probe.faithful)
    assert result.faithful(row) and row.avx2_saturated > 0
    assert row.equal == row.elements, (result.probe.describe(), row.histogram)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cin=st.integers(1, 12), cout=st.integers(1, 12),
       k=st.integers(1, 5), stride=st.integers(1, 3), pad=st.integers(0, 2),
       relu=st.booleans())
@pytest.mark.parametrize("engine", ENGINES)
def test_the_faithful_pipeline_is_exact_on_random_convolutions(engine, seed, cin, cout, k,
                                                               stride, pad, relu):
    layer = _layer("conv", seed, in_channels=cin, out_channels=cout, kernel_size=k,
                   stride=stride, padding=pad)
    x = torch.randn(2, cin, 9, 9, generator=_gen(seed)) * 3
    result = crosscheck_layer(layer, x, _qparams(layer, x, relu=relu), relu=relu,
                              engine=engine)
    row = result.get("layer", RECIPROCAL, result.probe.faithful)
    if "layer" in result.unmodelled:
        assert not result.faithful(row)
    else:
        assert result.faithful(row) and row.equal == row.elements


def _tie_layer(kind: str, zo: int):
    """A layer whose every requantized value is an exact tie: ``s_x = 2⁻⁴``, ``s_w = 2⁻⁷``,
    ``s_y = s_x s_w`` and a bias of half an accumulator unit, so the value rounded is
    ``a + 1/2`` for an integer accumulator ``a`` (all exact in float32)."""
    sx, sw = 2.0**-4, 2.0**-7
    g = _gen(7)
    if kind == "linear":
        layer = _layer("linear", 7, in_features=5, out_features=3)
        x = torch.randint(0, 2, (8, 5), generator=g) * sx
    else:
        layer = _layer("conv", 7, in_channels=5, out_channels=3, kernel_size=3, padding=1)
        x = torch.randint(0, 2, (2, 5, 5, 5), generator=g) * sx
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-3, 4, layer.weight.shape, generator=g) * sw)
        layer.bias.fill_(0.5 * sx * sw)
    qp = LayerQParams(QParams(sx, 0), QParams(np.full(3, sw), 0), QParams(sx * sw, zo))
    return layer, x.to(torch.float32), qp


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("zo", [127, 128])
def test_the_libraries_round_requantization_ties_to_their_own_neighbours(kind, zo):
    """Against integer arithmetic: FBGEMM rounds ``a + 1/2`` half to even, then adds the
    zero point; oneDNN adds the zero point first and rounds ``a + 1/2 + z_y``. With an
    even ``z_y`` the two agree, with an odd one they differ by one on every code."""
    layer, x, qp = _tie_layer(kind, zo)
    sx, sw = qp.input.scale, float(qp.weight.scale[0])
    xq, wq = (x / sx).double(), (layer.weight.detach() / sw).double()
    acc = (F.linear(xq, wq) if kind == "linear" else F.conv2d(xq, wq, padding=1)).numpy()
    expected = {Library.FBGEMM: np.rint(acc + 0.5) + zo, Library.ONEDNN: np.rint(acc + 0.5 + zo)}
    for lib, want in expected.items():
        got = simulate_int8(layer, x, qp, pipeline=Pipeline.INTEGER, library=lib)
        assert np.array_equal(got.numpy(), np.clip(want, 0, 255).astype(np.int32)), lib
    inside = (expected[Library.FBGEMM] >= 0) & (expected[Library.FBGEMM] <= 255)
    differ = expected[Library.FBGEMM] != expected[Library.ONEDNN]
    assert inside.sum() > inside.size // 2
    assert (differ[inside] == bool(zo % 2)).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("zo", [127, 128, 129])
def test_the_faithful_pipeline_is_exact_at_requantization_ties(engine, kind, zo):
    """Every output a requantization tie, with odd and even output zero points: the row
    the probe marks faithful (in the library it found for the layer's kind) reproduces
    every code of every engine."""
    layer, x, qp = _tie_layer(kind, zo)
    result = crosscheck_layer(layer, x, qp, engine=engine)
    row = result.get("layer", RECIPROCAL, result.probe.faithful)
    assert row.equal == row.elements, result.probe.describe()


# --------------------------------------------------------------------------- folding

def _bn(channels: int, seed: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    g = _gen(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(channels, generator=g) * 2 + 0.05)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.2)
    return bn.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_fold_bn_equals_conv_then_bn_up_to_float32_rounding(bias):
    conv = _layer("conv", 21, in_channels=8, out_channels=16, kernel_size=3, padding=1,
                  bias=bias)
    bn = _bn(16, 22)
    before = {k: v.clone() for k, v in {**conv.state_dict(), **bn.state_dict()}.items()}
    x = torch.randn(4, 8, 12, 12, generator=_gen(23))
    folded = fold_bn(conv, bn)
    with torch.no_grad():
        ref = bn(conv(x)).double()
        got = folded(x).double()
        # Each side evaluates a K-term dot product plus a bias (error at most γ_K+1 times
        # the sum of the terms' magnitudes, γ_n ≈ n·u) and a few more roundings (BN's
        # subtract, multiply, add; the folded weights' own rounding), all bounded by the
        # magnitudes T below; 2(K + 1) + 10 units of u·T bound the two paths' difference.
        f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double().reshape(1, -1, 1, 1)
        b = conv.bias.double() if bias else torch.zeros(16, dtype=torch.float64)
        terms = torch.nn.functional.conv2d(x.abs().double(), conv.weight.abs().double(),
                                           padding=1) * f.abs()
        terms += (f.abs() * (b - bn.running_mean.double()).abs().reshape(1, -1, 1, 1)
                  + bn.bias.double().abs().reshape(1, -1, 1, 1))
    k = 8 * 3 * 3
    u = 2.0**-24
    assert torch.all((got - ref).abs() <= (2 * (k + 1) + 10) * u * terms)
    assert isinstance(folded, nn.Conv2d) and folded.bias is not None
    assert folded is not conv
    after = {**conv.state_dict(), **bn.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fold_bn_refuses_what_cannot_be_folded():
    conv = _layer("conv", 0, in_channels=2, out_channels=4, kernel_size=3)
    with pytest.raises(ValueError, match="training mode"):
        fold_bn(conv, nn.BatchNorm2d(4).train())
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="4 output channels"):
        fold_bn(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        fold_bn(conv, nn.BatchNorm1d(4).eval())
    with pytest.raises(TypeError, match="nn.Conv2d"):
        fold_bn(nn.Linear(2, 4), nn.BatchNorm2d(4).eval())


@pytest.mark.needs_saturating_kernel
def test_crosscheck_layer_folds_bn_and_fuses_relu():
    conv = _layer("conv", 31, in_channels=8, out_channels=16, kernel_size=3, padding=1)
    bn = _bn(16, 32)
    x = torch.randn(3, 8, 10, 10, generator=_gen(33))
    qp = _qparams(conv, x, relu=True, bn=bn)
    result = crosscheck_layer(conv, x, qp, bn=bn, relu=True)
    assert result.rows[0].kind == "conv+bn+relu"
    assert result.get("layer", RECIPROCAL, Pipeline.SATURATING).frac_equal == 1.0
    codes = real_int8(conv, x, qp, bn=bn, relu=True)
    assert codes.min() >= qp.output.zero_point


# --------------------------------------------------------------------------- a model

def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _randomise_bn(model: nn.Module, seed: int) -> None:
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def test_crosscheck_model_on_resnet18():
    model = fashion_resnet("resnet18", zero_init_residual=False).eval()
    _randomise_bn(model, 41)
    g = _gen(42)
    calib = [torch.randn(2, 1, 32, 32, generator=g) for _ in range(2)]
    evaluation = [(torch.randn(2, 1, 32, 32, generator=g), torch.zeros(2))]
    result = crosscheck_model(model, calib, evaluation)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert result.layers == layers and len(layers) == 21
    assert len(result.rows) == 6 * len(layers)
    assert set(result.qparams) == set(layers)
    kinds = {r.layer: r.kind for r in result.rows}
    assert kinds["conv1"] == "conv+bn+relu"
    assert kinds["layer1.0.conv1"] == "conv+bn+relu"
    assert kinds["layer1.0.conv2"] == "conv+bn"      # its output meets the residual first
    assert kinds["layer2.0.downsample.0"] == "conv+bn"
    assert kinds["fc"] == "linear"
    for name in layers:
        row = result.get(name, RECIPROCAL, Pipeline.INTEGER)
        assert row.max_abs_lsb_unsaturated == 0
        assert result.get(name, RECIPROCAL, Pipeline.FLOAT).max_abs_lsb_unsaturated <= 1
        assert result.qparams[name].weight.scale.shape == (
            dict(model.named_modules())[name].weight.shape[0],)
    assert result.probe is kernel_probe()
    faithful = [r for r in result.rows if result.faithful(r)]
    assert len(faithful) == len(layers) and all(r.equal == r.elements for r in faithful)
    assert result.get("conv1", RECIPROCAL, Pipeline.FLOAT).elements == 2 * 64 * 16 * 16
    assert _hooks(model) == 0
    assert all(not m.training for m in model.modules())


def _small_model() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(50)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                              nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    _randomise_bn(model, 51)
    return model.eval()


def test_crosscheck_model_percentile_calibration_narrows_the_ranges():
    model = _small_model()
    g = _gen(52)
    batches = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(2)]
    minmax = crosscheck_model(model, batches, batches[:1])
    pct = crosscheck_model(model, batches, batches[:1], act_range=RangePolicy(
        RangeMethod.PERCENTILE, percentile=99.0))
    assert [r.kind for r in minmax.rows[::6]] == ["conv+bn+relu", "conv", "linear"]
    for name in ("0", "3", "5"):
        assert pct.qparams[name].input.scale < minmax.qparams[name].input.scale


def test_crosscheck_model_calibrates_with_the_simulation_s_observer():
    """One observer: MINMAX input ranges equal calibrate_activations' (scales in float32),
    and MSE ranges, which need the observer's samples, are supported and no wider."""
    model = _small_model()
    g = _gen(53)
    batches = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(2)]
    minmax = crosscheck_model(model, batches, batches[:1])
    sim = calibrate_activations(model, batches, ACTIVATION_SPEC)
    for name, qp in sim.items():
        assert minmax.qparams[name].input.scale == float(np.float32(qp.scale))
        assert minmax.qparams[name].input.zero_point == qp.zero_point
    mse = crosscheck_model(model, batches, batches[:1], act_range=RangePolicy(RangeMethod.MSE))
    for name in sim:
        assert mse.qparams[name].input.scale <= minmax.qparams[name].input.scale


def test_hooks_are_removed_when_the_forward_pass_fails():
    model = _small_model()
    bad = [torch.randn(2, 1, 9, 9)]               # the linear layer gets the wrong width
    with pytest.raises(RuntimeError):
        crosscheck_model(model, bad, bad)
    assert _hooks(model) == 0

    def failing():
        yield torch.randn(2, 1, 8, 8)
        raise RuntimeError("data source failed")

    with pytest.raises(RuntimeError, match="data source failed"):
        crosscheck_model(model, [torch.randn(2, 1, 8, 8)], failing())
    assert _hooks(model) == 0


@pytest.mark.parametrize("relu", [False, True])
def test_fbgemm_outputs_from_two_to_the_31_lsb_get_the_lowest_code(relu):
    """FBGEMM converts the rounded output to int32 before adding the zero point, and a value
    of 2**31 LSB or more converts to -2**31: the lowest code (the zero point under ReLU), as
    the integer pipelines now say. Before, they clamped it to 255 (128 of 256 codes apart).
    A one-weight linear layer whose output is q_x · 2**24 LSB: from q_x = 128 on it is 2**31."""
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.arange(256, dtype=torch.float32).reshape(-1, 1)
    qp = LayerQParams(QParams(1.0, 0), QParams(np.array([1 / 127]), 0), QParams(2.0**-24, 10))
    lo = 10 if relu else 0
    want = torch.where(x.flatten() < 128, 255, lo).to(torch.int32)
    want[0] = 10  # q_x = 0: the zero point
    for pipeline in (Pipeline.INTEGER, Pipeline.SATURATING):
        got = simulate_int8(layer, x, qp, pipeline=pipeline, relu=relu).flatten()
        assert torch.equal(got, want)
    assert torch.equal(real_int8(layer, x, qp, relu=relu).flatten(), want)
    assert torch.equal(simulate_int8(layer, x, qp, pipeline=Pipeline.INTEGER, relu=relu,
                                     library=Library.ONEDNN).flatten()[128:],
                       torch.full((128,), 255, dtype=torch.int32))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_fbgemm_requantization_of_nan_gets_the_lowest_code(relu, signed):
    """FBGEMM's float32 requantization gives NaN where ``0 · ∞`` arises: a product of scales
    ``s_x s_w`` below float32 (bias ``b / m = ∞`` times multiplier ``m / s_y = 0``), or a
    multiplier ``m / s_y`` above it times a zero accumulator. Its float-to-int32 conversion
    takes NaN to -2**31, as it does 2**31: the lowest code (the zero point under ReLU). The
    integer pipelines returned -2**31 itself, a code outside the output range."""
    out_spec = SIGNED_ACT if signed else ACTIVATION_SPEC
    zo = -28 if signed else 100
    lo = zo if relu else out_spec.qmin
    tiny = nn.Linear(4, 3)
    with torch.no_grad():
        tiny.weight.copy_(torch.randn(3, 4, generator=_gen(90)) * 1e-30)
        tiny.bias.copy_(torch.tensor([0.5, -0.5, 0.25]))
    zero_sum = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        zero_sum.weight.copy_(torch.randn(3, 4, generator=_gen(91)))
    for layer, x, (sx, sw, so) in (
            (tiny, torch.randn(5, 4, generator=_gen(92)) * 1e-28, (1e-30, 1e-30, 0.1)),
            (zero_sum, torch.zeros(5, 4), (4.0, 4.0, float(np.finfo(np.float32).tiny)))):
        qp = LayerQParams(QParams(sx, 0), QParams(np.full(3, sw), 0), QParams(so, zo))
        want = torch.full((5, 3), lo, dtype=torch.int32)
        assert torch.equal(real_int8(layer, x, qp, relu=relu, out_spec=out_spec), want)
        for pipeline in (Pipeline.INTEGER, Pipeline.SATURATING):
            got = simulate_int8(layer, x, qp, pipeline=pipeline, relu=relu, out_spec=out_spec)
            assert torch.equal(got, want), (pipeline, got.unique())
        row = crosscheck_layer(layer, x, qp, relu=relu, out_spec=out_spec).get(
            "layer", RECIPROCAL, Pipeline.INTEGER)
        assert row.equal == row.elements and row.max_abs_lsb == 0


# --------------------------------------------------------------------------- errors

def _good():
    layer, x = _case("conv3x3", seed=60)
    return layer, x, _qparams(layer, x)


def test_bad_layers_and_inputs_raise_clearly():
    layer, x, qp = _good()
    with pytest.raises(TypeError, match="nn.Conv2d and nn.Linear"):
        crosscheck_layer(nn.Conv1d(16, 32, 3), x, qp)
    grouped = nn.Conv2d(16, 32, 3, padding=1, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        crosscheck_layer(grouped, x, qp)
    with pytest.raises(ValueError, match="padding_mode"):
        crosscheck_layer(nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect"), x, qp)
    with pytest.raises(ValueError, match="16 channels"):
        crosscheck_layer(layer, x[:, :8], qp)
    with pytest.raises(TypeError, match="float32"):
        crosscheck_layer(layer, x.double(), qp)
    with pytest.raises(ValueError, match="NaN"):
        crosscheck_layer(layer, x.clone().fill_(float("nan")), qp)
    with pytest.raises(ValueError, match="training mode"):
        crosscheck_layer(layer, x, qp, bn=nn.BatchNorm2d(32).train())
    with pytest.raises(TypeError, match="nn.Conv2d only"):
        crosscheck_layer(nn.Linear(4, 32), torch.randn(2, 4), qp, bn=nn.BatchNorm2d(32).eval())


@pytest.mark.parametrize("what", ["weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_a_layer_with_non_finite_parameters_is_refused_naming_them(kind, value, what):
    """A NaN or Inf in the layer's weight or bias is refused up front, naming it. Before, a
    non-finite weight was reported as non-finite values of x, and a NaN bias gave the
    INTEGER and SATURATING pipelines the code -2147483648, outside out_spec's range (an Inf
    one 255 where the FBGEMM kernel gives 0)."""
    layer, x = _case(kind, seed=61)
    qp = _qparams(layer, x)
    with torch.no_grad():
        getattr(layer, what).view(-1)[1] = value
    for pipeline in Pipeline:
        with pytest.raises(ValueError, match=f"the layer's {what} holds 1 NaN or Inf value"):
            simulate_int8(layer, x, qp, pipeline=pipeline)
    with pytest.raises(ValueError, match=f"the layer's {what} holds 1 NaN or Inf value"):
        real_int8(layer, x, qp)
    model = nn.Sequential(layer).eval()
    with pytest.raises(ValueError, match=f"layer '0': the layer's {what} holds 1 NaN"):
        crosscheck_model(model, [x], [x])


def test_bad_qparams_and_specs_raise_clearly():
    layer, x, qp = _good()
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        crosscheck_layer(layer, x, LayerQParams(qp.input, QParams(qp.weight.scale[:5], 0),
                                                qp.output))
    with pytest.raises(ValueError, match="zero points must all be 0"):
        crosscheck_layer(layer, x, LayerQParams(qp.input, QParams(qp.weight.scale, 3),
                                                qp.output))
    with pytest.raises(ValueError, match="per tensor"):
        crosscheck_layer(layer, x, LayerQParams(QParams(np.ones(3), 0), qp.weight, qp.output))
    with pytest.raises(ValueError, match="zero_point 300"):
        crosscheck_layer(layer, x, LayerQParams(qp.input, qp.weight, QParams(0.1, 300)))
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(TypeError, match=r"input qparams.zero_point must be an integer"):
            crosscheck_layer(layer, x, LayerQParams(QParams(0.1, bad), qp.weight, qp.output))
    with pytest.raises(ValueError, match="positive"):
        crosscheck_layer(layer, x, LayerQParams(QParams(-1.0, 0), qp.weight, qp.output))
    with pytest.raises(TypeError, match="LayerQParams"):
        crosscheck_layer(layer, x, (qp.input, qp.weight, qp.output))
    with pytest.raises(ValueError, match="nearest-even"):
        crosscheck_layer(layer, x, qp, act_spec=ACTIVATION_SPEC.replace(
            rounding=RoundingMode.TOWARD_ZERO))
    with pytest.raises(ValueError, match="8-bit per-tensor"):
        crosscheck_layer(layer, x, qp, out_spec=ACTIVATION_SPEC.replace(bits=7))
    with pytest.raises(ValueError, match="engine 'tpu'"):
        crosscheck_layer(layer, x, qp, engine="tpu")


def test_missing_engine_is_named(monkeypatch):
    layer, x, qp = _good()
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack"])
    with pytest.raises(RuntimeError, match="'fbgemm' is not in this PyTorch build"):
        crosscheck_layer(layer, x, qp, engine=Engine.FBGEMM)


def test_bad_models_raise_clearly():
    model = _small_model()
    batches = [torch.randn(2, 1, 8, 8)]
    with pytest.raises(ValueError, match="evaluation mode"):
        crosscheck_model(model.train(), batches, batches)
    model.eval()
    with pytest.raises(ValueError, match="no calibration data"):
        crosscheck_model(model, [], batches)
    with pytest.raises(ValueError, match="no batches"):
        crosscheck_model(model, batches, [])
    with pytest.raises(TypeError, match="float32"):
        crosscheck_model(model, [torch.zeros(2, 1, 8, 8, dtype=torch.int64)], batches)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)).eval()
    with pytest.raises(ValueError, match="'0'.*grouped"):
        crosscheck_model(grouped, batches, batches)
    assert isinstance(crosscheck_model(model, batches, batches), CrossCheck)
    assert int8.__all__ and all(hasattr(int8, n) for n in int8.__all__)


def test_flags_that_are_not_bools_are_refused():
    """A flag passed as a string was read by ``bool()``: ``groupwise_saturates='False'``
    simulated the saturating groupwise kernel, ``relu='no'`` a fused ReLU, and
    ``reduce_range='False'`` halved the input range, each without a word."""
    layer, x, qp = _good()
    for call, flag in ((simulate_int8, "groupwise_saturates"), (simulate_int8, "relu"),
                       (real_int8, "relu"), (crosscheck_layer, "relu")):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'False'"):
            call(layer, x, qp, **{flag: "False"})
    model = _small_model()
    batches = [torch.randn(2, 1, 8, 8, generator=_gen(7))]
    for flag in ("reduce_range", "fuse_relu"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 0"):
            crosscheck_model(model, batches, batches, **{flag: 0})
    assert _hooks(model) == 0
    assert torch.equal(simulate_int8(layer, x, qp, relu=np.True_),
                       simulate_int8(layer, x, qp, relu=True))


def test_reduce_range_refuses_a_signed_activation_quantizer():
    """Halving a signed range gives codes -64..63, which the kernel runs as 64..191: the
    int16 pair sums reduce_range promises to keep clear could saturate. Refused before any
    calibration; the unsigned default is accepted."""
    model = _small_model()
    batches = [torch.randn(2, 1, 8, 8, generator=_gen(7))]
    signed = ACTIVATION_SPEC.replace(signed=True)
    with pytest.raises(ValueError, match="reduce_range .* signed act_spec"):
        crosscheck_model(model, batches, batches, act_spec=signed, reduce_range=True)
    assert _hooks(model) == 0
    crosscheck_model(model, batches, batches, reduce_range=True)
