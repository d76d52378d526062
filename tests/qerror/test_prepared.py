"""PreparedQuantizer: the module functions' results (values, zeros' signs, layout,
saturation, errors) with the parameters checked once; which inputs take its own path to the
fused loop and which go through the module functions."""

import numpy as np
import pytest
import torch

from qerror import PreparedQuantizer, QuantSpec, RoundingMode, fake_quantize, quantize
from qerror import quantizer as quantizer_module
from tests.qerror.test_quantizer import boundary_values

MODES = list(RoundingMode)


@pytest.fixture
def module_calls(monkeypatch):
    """How many calls went through the module functions' engine (``_run``)."""
    calls = []
    run = quantizer_module._run

    def counted(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(quantizer_module, "_run", counted)
    return calls


def activations(scale: float, shape=(4, 6, 33, 33)) -> torch.Tensor:
    """Values on, beside and between the boundaries of a grid of ``scale``, past both ends
    of an 8-bit range, zeros of both signs, laid out as an NCHW batch (C-contiguous)."""
    base = boundary_values(scale, np.float32, count=150)
    base = np.concatenate([base[np.isfinite(base)], np.float32([0.0, -0.0, 3e38, -3e38])])
    n = int(np.prod(shape))
    flat = np.resize(np.random.default_rng(0).permutation(base), n)
    return torch.from_numpy(flat.reshape(shape))


def same(got, want):
    """Equal values with equal zeros' signs, dtype and strides; equal saturation counts."""
    if isinstance(want, tuple):
        (g, gs), (w, ws) = got, want
        for f in ("low", "high", "total"):
            np.testing.assert_array_equal(getattr(gs, f), getattr(ws, f))
        got, want = g, w
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.stride() == want.stride()
    assert torch.equal(got, want)
    if got.is_floating_point():
        assert torch.equal(torch.signbit(got), torch.signbit(want))


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
            "transposed": x.transpose(2, 3)}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", [None, 1, -3])
def test_prepared_calls_equal_the_module_functions(mode, axis, fused_calls, module_calls):
    spec = QuantSpec(bits=8, signed=False, symmetric=False, axis=axis, rounding=mode)
    if axis is None:
        scale, zp = torch.tensor(0.0371), torch.tensor(3)
    else:
        scale = torch.tensor([0.0371, 0.1, 0.37, 0.25, 1.7, 3e-3])
        zp = torch.tensor([3, 0, 5, 7, 100, 128])
    prepared = PreparedQuantizer(spec, scale, zp)
    x = activations(0.0371)
    seed = 12345 if mode.is_random else None
    for name, xl in layouts(x).items():
        for offset in (0, 7 * xl.numel() + 3):
            for count in (False, True):
                want = fake_quantize(xl, spec, scale, zp, generator=seed, offset=offset,
                                     return_saturation=count)
                before = (len(fused_calls), len(module_calls))
                got = prepared.fake_quantize(xl, generator=seed, offset=offset,
                                             return_saturation=count)
                # its own way to the fused loop: one loop call, no module function
                assert (len(fused_calls), len(module_calls)) == (before[0] + 1, before[1]), name
                same(got, want)
            same(prepared.quantize(xl, generator=seed, offset=offset, return_saturation=True),
                 quantize(xl, spec, scale, zp, generator=seed, offset=offset,
                          return_saturation=True))


@pytest.mark.parametrize("mode", [RoundingMode.TOWARD_ZERO, RoundingMode.STOCHASTIC])
def test_other_inputs_go_through_the_module_functions(mode, module_calls):
    fused_min = quantizer_module._fused.MIN_ELEMENTS
    spec = QuantSpec(bits=8, signed=True, rounding=mode)
    prepared = PreparedQuantizer(spec, 0.05)
    x = activations(0.05)
    seed = 7 if mode.is_random else None
    wide = activations(0.05, shape=(4, 12, 33, 33))
    cases = {
        "small": x[:1, :1, :4],
        "float64": x.double(),
        "numpy": x.numpy(),
        "gapped": wide[:, ::2],
        # channels_last strides on a one-channel batch (torch keeps C strides there when
        # asked to convert, so they are made here)
        "one channel, channels_last": torch.empty_strided(
            (16, 1, 33, 33), (1089, 1, 33, 1)).copy_(activations(0.05, shape=(16, 1, 33, 33))),
        # a transpose with a unit dimension: dense, but its strides there are not C's
        "transposed, unit dimension": activations(0.05, shape=(128, 129)).t().unsqueeze(0),
        "requires grad": x.clone().requires_grad_(True),
    }
    for name, xi in cases.items():
        if name not in ("small", "float64", "numpy"):
            assert xi.numel() >= fused_min, name  # large enough for the fused loop
        before = len(module_calls)
        got = prepared.fake_quantize(xi, generator=seed, return_saturation=True)
        # stochastic rounding quantizes a C-ordered copy of a dense input, whatever its
        # strides, and copies the result back into them: its own path, as _run_in_layout
        own = mode.is_random and name == "transposed, unit dimension"
        assert (len(module_calls) > before) != own, name
        want = fake_quantize(xi, spec, 0.05, generator=seed, return_saturation=True)
        if isinstance(xi, np.ndarray):
            np.testing.assert_array_equal(got[0], want[0])
        else:
            same((got[0].detach(), got[1]), (want[0].detach(), want[1]))
    if mode.is_random:  # a generator object: drawn from as the module function draws
        before = len(module_calls)
        got = prepared.fake_quantize(x, generator=np.random.default_rng(3))
        assert len(module_calls) > before
        same(got, fake_quantize(x, spec, 0.05, generator=np.random.default_rng(3)))


def test_scale_and_zero_point_are_read_when_made():
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    scale, zp = torch.tensor(0.02), torch.tensor(3)
    prepared = PreparedQuantizer(spec, scale, zp)
    x = activations(0.02).abs()
    want = fake_quantize(x, spec, 0.02, 3)
    scale.mul_(2)
    zp.add_(1)
    same(prepared.fake_quantize(x), want)
    # the attributes give copies: changing one changes nothing
    prepared.scale.mul_(3)
    same(prepared.fake_quantize(x), want)
    with pytest.raises(AttributeError):
        prepared.scale = torch.tensor(0.5)


@pytest.mark.parametrize("mode", [RoundingMode.NEAREST_EVEN, RoundingMode.STOCHASTIC])
def test_non_finite_input_gets_the_module_functions_error(mode):
    spec = QuantSpec(bits=8, rounding=mode)
    prepared = PreparedQuantizer(spec, 0.05)
    x = activations(0.05).contiguous(memory_format=torch.channels_last)
    x[2, 4, 5, 6] = float("nan")
    seed = 1 if mode.is_random else None
    with pytest.raises(ValueError) as want:
        fake_quantize(x, spec, 0.05, generator=seed)
    with pytest.raises(ValueError) as got:
        prepared.fake_quantize(x, generator=seed)
    assert str(got.value) == str(want.value)
    assert "index (2, 4, 5, 6)" in str(got.value)


def test_integer_seeds_of_numpy_type_inference_mode_and_codes(fused_calls, module_calls):
    spec = QuantSpec(bits=8, signed=False, symmetric=False, rounding=RoundingMode.STOCHASTIC)
    prepared = PreparedQuantizer(spec, 0.03, 2)
    x = activations(0.03).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = prepared.fake_quantize(x, generator=np.int64(9), offset=5)
    assert (len(fused_calls), len(module_calls)) == (1, 0)
    same(got, fake_quantize(x, spec, 0.03, 2, generator=9, offset=5))
    # an offset of numpy's integer type: the module function's path, its result
    before = len(module_calls)
    same(prepared.fake_quantize(x, generator=9, offset=np.int64(5)), got)
    assert len(module_calls) > before
    before = (len(fused_calls), len(module_calls))
    codes = prepared.quantize(x, generator=9, return_saturation=True)
    assert (len(fused_calls), len(module_calls)) == (before[0] + 1, before[1])
    same(codes, quantize(x, spec, 0.03, 2, generator=9, return_saturation=True))


def test_a_scalar_scale_per_channel_fits_every_channel_count(fused_calls):
    spec = QuantSpec(bits=8, axis=1)
    prepared = PreparedQuantizer(spec, 0.1)
    for shape in [(4, 6, 33, 33), (4, 5, 33, 33)]:
        x = activations(0.1, shape=shape)
        same(prepared.fake_quantize(x, return_saturation=True),
             fake_quantize(x, spec, 0.1, return_saturation=True))


@pytest.mark.parametrize("zero_point", [1.5, torch.tensor(2.5), 300])
def test_bad_zero_points_get_the_module_functions_message(zero_point):
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    x = activations(0.1).abs()
    with pytest.raises((TypeError, ValueError)) as want:
        fake_quantize(x, spec, 0.1, zero_point)
    with pytest.raises(type(want.value)) as got:
        PreparedQuantizer(spec, 0.1, zero_point).fake_quantize(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("scale, zero_point, match", [
    (-0.1, 0, "scale must be positive"),
    (0.1, 300, "zero_point 300 is outside"),
    (torch.tensor([0.1, 0.2]), 0, "scale has 2 values but the spec is per-tensor"),
])
def test_bad_parameters_get_the_module_functions_error_on_every_call(scale, zero_point, match):
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    prepared = PreparedQuantizer(spec, scale, zero_point)
    x = activations(0.1).abs()
    for _ in range(2):  # a refusal is not cached as checked
        with pytest.raises(ValueError, match=match):
            prepared.fake_quantize(x)


def test_per_channel_parameters_must_fit_each_input():
    spec = QuantSpec(bits=8, axis=1)
    prepared = PreparedQuantizer(spec, torch.full((6,), 0.1))
    prepared.fake_quantize(activations(0.1))  # six channels: checked and kept
    with pytest.raises(ValueError, match="axis 1 of the input has 5 channels"):
        prepared.fake_quantize(activations(0.1, shape=(4, 5, 33, 33)))


def test_spec_must_be_a_quantspec():
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        PreparedQuantizer("int8", 0.1)


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("codes_first", [True, False])
def test_a_scale_whose_grid_ends_overflow_is_refused_for_fake_quantize_only(
        axis, codes_first, fused_calls, module_calls):
    """On the fused loop a scale above max_scale fake-quantized data at ±float32 max to ±inf,
    silently (/work/runs/s42/overflow2/probe_user_scale.py). fake_quantize now refuses it on
    every call with the module function's error, whether or not a quantize call has already
    checked and cached the parameters; quantize takes it on the fused loop with the module
    function's codes; max_scale itself fake-quantizes there to the module function's values."""
    spec = QuantSpec(bits=8, axis=axis)
    top = float(np.finfo(np.float32).max)
    best = spec.max_scale(0, np.float32)
    over = float(np.nextafter(np.float32(best), np.float32(np.inf)))
    scale = over if axis is None else torch.tensor([best] * 5 + [over], dtype=torch.float64)
    x = activations(0.1)
    x[0, -1, 0, :2] = torch.tensor([top, -top])
    prepared = PreparedQuantizer(spec, scale)
    with pytest.raises(ValueError) as want:
        fake_quantize(x, spec, scale)
    assert "its fake-quantized values would be ±inf" in str(want.value)
    for step in ("codes", "fake", "fake") if codes_first else ("fake", "codes", "fake"):
        if step == "codes":
            before = len(fused_calls)
            same(prepared.quantize(x), quantize(x, spec, scale))
            assert len(fused_calls) == before + 2  # both on the fused loop
        else:
            with pytest.raises(ValueError) as got:
                prepared.fake_quantize(x)
            assert str(got.value) == str(want.value)
    fine = PreparedQuantizer(spec, best)
    with np.errstate(all="raise"):
        same(fine.fake_quantize(x), fake_quantize(x, spec, best))
    assert bool(torch.isfinite(fine.fake_quantize(x)).all())
