"""The fused exact quantizer (qerror._fused): the same codes as the rational reference and as
the block engine, on and beside every boundary, per tensor and per channel; its fallback."""

import numpy as np
import pytest
import torch

from qerror import QuantSpec, _fused, fake_quantize, quantize
from tests.qerror.test_quantizer import DETERMINISTIC, boundary_values, exact_code


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of calls that took the fused path (a list to read after the call)."""
    calls = []
    run = _fused.run

    def counted(*args, **kwargs):
        calls.append(kwargs["mode"])
        return run(*args, **kwargs)

    monkeypatch.setattr(_fused, "run", counted)
    return calls


def tiled(values: np.ndarray, at_least: int = _fused.MIN_ELEMENTS) -> np.ndarray:
    """``values`` repeated into a float32 array large enough for the fused path."""
    reps = -(-at_least // values.size)
    return np.tile(values.astype(np.float32), reps)


def engine(call, monkeypatch):
    """``call()`` on the block engine (the fused path turned off)."""
    with monkeypatch.context() as m:
        m.setenv("QERROR_FUSED", "0")
        return call()


# the reference casts the nearest integer of +-3e38 / s to float32: inf, compared harmlessly
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("mode", DETERMINISTIC)
@pytest.mark.parametrize("scale, zero_point", [(0.1, 0), (0.0371, 3), (0.37, -5), (0.25, 7),
                                               (1e35, 0), (3e-30, 0)])
def test_fused_codes_are_exact_on_boundaries(mode, scale, zero_point, fused_calls,
                                             monkeypatch):
    spec = QuantSpec(bits=8, symmetric=zero_point == 0, rounding=mode)
    base = boundary_values(scale, np.float32)
    base = np.concatenate([base[np.isfinite(base)], np.float32([3e38, -3e38, -0.0])])
    expected = [exact_code(v, scale, zero_point, mode, spec.qmin, spec.qmax, np.float32)
                for v in base]
    x = tiled(base)
    q = quantize(x, spec, scale, zero_point)
    assert fused_calls == [mode]
    np.testing.assert_array_equal(q[:base.size], expected)
    np.testing.assert_array_equal(q, np.tile(q[:base.size], x.size // base.size))
    # fake-quantized values (as numbers: a zero's sign is not specified) and saturation counts
    t = torch.from_numpy(x)
    fq, sat = fake_quantize(t, spec, scale, zero_point, return_saturation=True)
    ref, ref_sat = engine(lambda: fake_quantize(t, spec, scale, zero_point,
                                                return_saturation=True), monkeypatch)
    assert torch.equal(fq, ref)
    assert (int(sat.low), int(sat.high)) == (int(ref_sat.low), int(ref_sat.high))
    assert len(fused_calls) == 2


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_fused_per_channel_equals_the_block_engine(mode, fused_calls, monkeypatch):
    """Per-channel scales and zero points (channel axis in the middle), values on, beside
    and between the boundaries of each channel's own grid."""
    scales = np.float32([0.1, 0.0371, 0.37, 0.25, 1.7, 3e-3])
    zps = np.array([0, 3, -5, 7, 100, -128])
    spec = QuantSpec(bits=8, symmetric=False, axis=1, rounding=mode)
    rows = [boundary_values(float(s), np.float32, count=150)[:900] for s in scales]
    x = np.ascontiguousarray(np.stack(rows)[None].repeat(4, axis=0))  # (4, 6, 900)
    assert x.size >= _fused.MIN_ELEMENTS
    t = torch.from_numpy(x)
    for fn in (quantize, fake_quantize):
        got = fn(t, spec, scales, zps)
        ref = engine(lambda: fn(t, spec, scales, zps), monkeypatch)
        assert torch.equal(got, ref)
    assert len(fused_calls) == 2
    sat = fake_quantize(t, spec, scales, zps, return_saturation=True)[1]
    expected = [[exact_code(v, float(s), int(z), mode, spec.qmin, spec.qmax, np.float32)
                 for v in row[::7]] for row, s, z in zip(rows, scales, zps)]
    np.testing.assert_array_equal(quantize(t, spec, scales, zps)[0, :, ::7].numpy(), expected)
    ref_sat = engine(lambda: fake_quantize(t, spec, scales, zps, return_saturation=True)[1],
                     monkeypatch)
    np.testing.assert_array_equal(sat.low, ref_sat.low)
    np.testing.assert_array_equal(sat.high, ref_sat.high)


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_eager_rule_equals_the_compiled_one(mode):
    """_fused.codes run eagerly gives the compiled result: the rule, not the compiler, makes
    the codes exact."""
    base = boundary_values(0.0371, np.float32)
    x = torch.from_numpy(tiled(base)).reshape(1, 1, -1)
    params = [torch.full((1, 1, 1), v, dtype=torch.float32)
              for v in (np.float32(0.0371), 3.0, -128.0 - 3.0, 127.0 - 3.0)]
    for fake in (True, False):
        eager = _fused.codes(x, *params, mode=mode, fake=fake)
        compiled = _fused.run(x, *params, mode=mode, fake=fake)
        for a, b in zip(eager, compiled):
            assert torch.equal(a, b)


def test_small_stochastic_reciprocal_and_float64_inputs_take_the_block_engine(fused_calls):
    from qerror import RoundingMode, ScaleArithmetic
    big = np.linspace(-3, 3, _fused.MIN_ELEMENTS, dtype=np.float32)
    quantize(big[:100], QuantSpec(), 0.1)
    quantize(big, QuantSpec(rounding=RoundingMode.STOCHASTIC), 0.1, generator=0)
    quantize(big, QuantSpec(arithmetic=ScaleArithmetic.RECIPROCAL), 0.1)
    quantize(big.astype(np.float64), QuantSpec(), 0.1)
    quantize(torch.from_numpy(big).half(), QuantSpec(), 0.1)
    assert fused_calls == []
    quantize(big, QuantSpec(), 0.1)
    assert len(fused_calls) == 1


def test_a_compiler_failure_warns_once_and_gives_the_same_codes(monkeypatch):
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return fail

    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(_fused, "_BROKEN", [])
    monkeypatch.setattr(torch, "compile", broken)
    x = tiled(boundary_values(0.1, np.float32))
    ref = engine(lambda: quantize(x, QuantSpec(), 0.1), monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not be compiled.*no C\\+\\+ compiler"):
        got = quantize(x, QuantSpec(), 0.1)
    np.testing.assert_array_equal(got, ref)
    assert not _fused.enabled()
    np.testing.assert_array_equal(quantize(x, QuantSpec(), 0.1), ref)  # no second warning


def test_unsafe_math_in_inductor_turns_the_fused_path_off(monkeypatch, fused_calls):
    from torch._inductor import config
    with config.patch({"cpp.enable_unsafe_math_opt_flag": True}):
        quantize(tiled(np.float32([0.05, 0.15])), QuantSpec(), 0.1)
    assert fused_calls == []


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_fused_unsigned_grid_clamps_negative_values_as_the_engine(mode, fused_calls,
                                                                 monkeypatch):
    """An unsigned grid with zero point 0 (ReLU outputs): negative values, tiny ones and -0
    among them, clamp to code 0 as in the engine."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False, rounding=mode)
    base = np.concatenate([boundary_values(0.1, np.float32, count=30),
                           np.float32([-0.0, -1e-45, -1e-30, 1e-45, -3e38])])
    t = torch.from_numpy(tiled(base))
    for fn in (quantize, fake_quantize):
        got = fn(t, spec, 0.1, 0)
        ref = engine(lambda: fn(t, spec, 0.1, 0), monkeypatch)
        assert torch.equal(got, ref)
    assert len(fused_calls) == 2
