"""Input quantization inside the model against offline codes dequantized on load."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from qerror import (
    Dequantizer,
    InputQuantizer,
    QParams,
    QuantSpec,
    RoundingMode,
    calibrate,
    dequantize,
    on_codes,
    quantize_offline,
    with_input_quantizer,
)

DETERMINISTIC = [m for m in RoundingMode if not m.is_random]
# Affine signed codes, as a model whose normalized input is not centred on 0 would use.
SPEC = QuantSpec(bits=8, signed=True, symmetric=False)


def small_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)).eval()


def images(seed: int, n: int) -> torch.Tensor:
    """(n, 1, 12, 12) float32 with an offset, so the affine zero point is not 0."""
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) + 0.7


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", DETERMINISTIC, ids=lambda m: m.value)
def test_input_quantizer_in_the_model_equals_offline_codes_bit_for_bit(mode, bits):
    net = small_net()
    spec = SPEC.replace(bits=bits, rounding=mode)
    qp = calibrate(images(1, 32), spec)  # calibration images apart from the test ones
    x = images(2, 48)
    codes = quantize_offline(x, spec, qp)
    assert codes.dtype == torch.int8
    with torch.inference_mode():
        in_model = with_input_quantizer(net, spec, qp)(x)
        offline = on_codes(net, spec, qp)(codes)
    assert torch.equal(in_model, offline)


@pytest.mark.parametrize("mode", DETERMINISTIC, ids=lambda m: m.value)
def test_in_model_and_offline_agree_on_ties(mode):
    """Half the inputs lie exactly half-way between two codes (a power-of-two scale makes
    x/s exact), where the nearest modes' tie rules decide: the model sees the same input
    values either way, and a model that rounded its ties by another rule would not."""
    net = small_net()
    spec = SPEC.replace(rounding=mode)
    qp = QParams(0.125, -3)
    k = torch.arange(-120, 120, dtype=torch.float32)
    x = ((k / 2 - qp.zero_point) * qp.scale).reshape(10, 1, 4, 6)  # x/s + z = k/2
    assert float((x / qp.scale + qp.zero_point).frac().abs().eq(0.5).float().mean()) == 0.5
    codes = quantize_offline(x, spec, qp)
    seen_in_model = InputQuantizer(spec, qp)(x)
    seen_offline = on_codes(nn.Identity(), spec, qp)(codes)
    assert torch.equal(seen_in_model, seen_offline)
    other = {RoundingMode.NEAREST_EVEN: RoundingMode.NEAREST_AWAY,
             RoundingMode.NEAREST_AWAY: RoundingMode.NEAREST_EVEN}.get(mode)
    if other is not None:  # the tie rule shows: another one gives other input
        assert not torch.equal(InputQuantizer(spec.replace(rounding=other), qp)(x),
                               seen_offline)
    with torch.inference_mode():
        assert torch.equal(with_input_quantizer(net, spec, qp)(x), on_codes(net, spec, qp)(codes))


def test_unsigned_codes_are_stored_as_uint8():
    spec = SPEC.replace(signed=False)
    x = images(4, 3)
    codes = quantize_offline(x, spec, calibrate(x, spec))
    assert codes.dtype == torch.uint8 and codes.shape == x.shape


def test_stochastic_codes_follow_the_seed():
    spec = SPEC.replace(rounding=RoundingMode.STOCHASTIC)
    x = images(5, 4)
    qp = calibrate(x, spec)
    a, b = quantize_offline(x, spec, qp, seed=1), quantize_offline(x, spec, qp, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, quantize_offline(x, spec, qp, seed=2))


def test_quantize_offline_refuses_codes_wider_than_a_byte():
    with pytest.raises(ValueError, match="int8"):
        quantize_offline(torch.zeros(4), QuantSpec(bits=9, symmetric=False),
                         calibrate(torch.arange(4.0), QuantSpec(bits=9, symmetric=False)))


@pytest.mark.parametrize("x, hint, expected", [
    (np.zeros((2, 4), np.float32), "torch.from_numpy(x)", [[-3] * 4] * 2),
    ([0.0, 0.5], "torch.as_tensor(x, dtype=torch.float32)", [-3, 47]),  # 0.5 / 0.01 - 3
])
def test_quantize_offline_refuses_input_that_is_not_a_tensor(x, hint, expected):
    """A numpy array (a stored data set's usual form) gave AttributeError "'numpy.ndarray'
    object has no attribute 'to'" after quantizing it, and a list quantize's TypeError,
    whose advice (numpy.asarray) led to that AttributeError."""
    qp = QParams(0.01, -3)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got (numpy\.ndarray|list)"
                       r": offline codes are returned as an int8 or uint8 tensor; convert with "
                       + re.escape(hint)):
        quantize_offline(x, SPEC, qp)
    # converted as the message says, it is taken
    codes = quantize_offline(torch.as_tensor(np.asarray(x, np.float32)), SPEC, qp)
    assert torch.equal(codes, torch.tensor(expected, dtype=torch.int8))


@pytest.mark.parametrize("q, hint", [
    (np.array([[-3, 47]], np.int8), "torch.from_numpy(q)"),
    ([[-3, 47]], "torch.as_tensor(q)"),
])
def test_the_dequantizer_refuses_codes_that_are_not_a_tensor(q, hint):
    """Codes as a stored data set holds them (a numpy array) or a list gave "AttributeError:
    'numpy.ndarray' object has no attribute 'numel'" ('list' ... 'dtype')
    (/work/runs/s48/calib/p7_deq_numpy.before.txt); converted as the message says, they give
    what the tensor codes do."""
    qp = QParams(0.01, -3)
    with pytest.raises(TypeError, match=r"codes must be a torch\.Tensor, got (numpy\.ndarray"
                       r"|list): .*convert with " + re.escape(hint)):
        Dequantizer(SPEC, qp)(q)
    got = Dequantizer(SPEC, qp)(torch.as_tensor(np.asarray(q)))
    assert torch.equal(got, torch.tensor([[0.0, 0.5]]))


def test_qparams_that_are_not_qparams_are_refused_by_name():
    """A (scale, zero point) tuple in place of QParams gave "AttributeError: 'tuple' object
    has no attribute 'scale'" from InputQuantizer, Dequantizer and quantize_offline alike."""
    message = r"qparams must be a qerror\.QParams .*got tuple"
    with pytest.raises(TypeError, match=message):
        InputQuantizer(SPEC, (0.01, -3))
    with pytest.raises(TypeError, match=message):
        Dequantizer(SPEC, (0.01, -3))
    with pytest.raises(TypeError, match=message):
        quantize_offline(torch.zeros(3), SPEC, (0.01, -3))


@pytest.mark.parametrize("spec", ["int8", 8, None])
def test_a_spec_that_is_not_a_quantspec_is_refused_by_name(spec):
    """A spec given as a name or a bit count gave "AttributeError: 'str' object has no
    attribute 'rounding'" from InputQuantizer ('... check_zero_point' from Dequantizer and
    quantize_offline), where quantize refuses it by name."""
    qp = QParams(0.01, 0)
    message = rf"spec must be a QuantSpec, got {type(spec).__name__}"
    for make in (lambda: InputQuantizer(spec, qp), lambda: Dequantizer(spec, qp),
                 lambda: with_input_quantizer(nn.Identity(), spec, qp),
                 lambda: on_codes(nn.Identity(), spec, qp),
                 lambda: quantize_offline(torch.zeros(3), spec, qp)):
        with pytest.raises(TypeError, match=message):
            make()


def test_per_channel_input_codes_give_the_model_the_same_input():
    """A per-channel input spec (one scale per image channel): the offline codes, read with
    the spec's axis, feed the network what the in-model quantizer does (the Dequantizer once
    took no axis and refused them)."""
    from qerror import calibrate

    spec = QuantSpec(8, signed=True, symmetric=False, axis=1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([1.0, 5.0, 0.1]).reshape(1, 3, 1, 1)
    qp = calibrate(x, spec)
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()).eval()
    codes = quantize_offline(x, spec, qp)
    with torch.inference_mode():
        assert torch.equal(with_input_quantizer(net, spec, qp)(x),
                           on_codes(net, spec, qp)(codes))


def test_codes_read_with_the_other_sign_or_beyond_the_grid_are_refused():
    """int8 bytes read as uint8 (other values), or codes a spec cannot make, reached the
    model without a word."""
    spec = SPEC  # signed 8-bit: int8 codes in [-128, 127]
    x = images(6, 2)
    qp = calibrate(x, spec)
    codes = quantize_offline(x, spec, qp)
    with pytest.raises(TypeError, match="int8"):
        on_codes(nn.Identity(), spec, qp)(codes.view(torch.uint8))
    with pytest.raises(ValueError, match="beyond the spec's grid"):
        on_codes(nn.Identity(), spec, qp)(codes.to(torch.int32) * 3)
    unsigned = SPEC.replace(signed=False)
    with pytest.raises(TypeError, match="uint8"):
        on_codes(nn.Identity(), unsigned, calibrate(x, unsigned))(codes)
    four = SPEC.replace(bits=4)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        on_codes(nn.Identity(), four, qp)(torch.tensor([-9, 0, 7], dtype=torch.int8))
    assert torch.equal(on_codes(nn.Identity(), spec, qp)(codes.to(torch.int64)),
                       on_codes(nn.Identity(), spec, qp)(codes))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_codes_in_wide_unsigned_dtypes_are_bounds_checked_and_dequantized(dtype):
    """12-bit codes stored as numpy uint16 (torch.from_numpy gives torch.uint16) gave
    NotImplementedError '"min_all" not implemented for 'UInt16'' from the grid check, though
    dequantize takes them; uint32 and uint64 alike."""
    spec = QuantSpec(bits=12, signed=False, symmetric=False)
    qp = QParams(0.01, 2048)
    stored = np.array([[0, 2048, 4095]], dtype=np.uint16)
    codes = torch.from_numpy(stored).to(dtype)
    assert torch.equal(Dequantizer(spec, qp)(codes),
                       Dequantizer(spec, qp)(torch.from_numpy(stored.astype(np.int64))))
    with pytest.raises(ValueError, match=r"codes span \[0, 4096\], beyond the spec's grid "
                                         r"\[0, 4095\]"):
        Dequantizer(spec, qp)(torch.tensor([0, 4096]).to(dtype))


def test_parameters_no_quantizer_of_the_spec_could_have_used_are_refused():
    # a zero point beyond the grid, or one on a symmetric grid: quantize refuses them, and
    # the codes' side turned them into plausible floats (0.01 * (1 - 500) = -4.99)
    with pytest.raises(ValueError, match="zero_point 500 is outside the integer range"):
        on_codes(nn.Identity(), SPEC, QParams(0.01, 500))
    with pytest.raises(ValueError, match="must be 0 for a symmetric spec"):
        on_codes(nn.Identity(), QuantSpec(bits=8), QParams(0.01, 3))
    with pytest.raises(ValueError, match="outside the integer range"):
        quantize_offline(images(7, 1), SPEC, QParams(0.01, 500))


@pytest.mark.parametrize("scale", [float("nan"), 0.0, -0.01, float("inf"),
                                   np.array([0.01, float("nan")])])
def test_a_scale_every_call_would_refuse_is_refused_where_the_module_is_made(scale):
    """Dequantizer and InputQuantizer were built with it, silently; each call then failed."""
    spec = SPEC.replace(axis=0) if np.ndim(scale) else SPEC
    for make in (lambda: Dequantizer(spec, QParams(scale, 0)),
                 lambda: on_codes(nn.Identity(), spec, QParams(scale, 0), dtype=torch.float64),
                 lambda: InputQuantizer(spec, QParams(scale, 0)),
                 lambda: with_input_quantizer(nn.Identity(), spec, QParams(scale, 0))):
        with pytest.raises(ValueError, match=r"^scale must be positive and finite, got "):
            make()


@pytest.mark.parametrize("qp", [QParams(np.array([0.01, 0.02]), 0),
                                QParams(torch.tensor([0.01, 0.02]), 0),
                                QParams(0.01, np.array([0, 1]))], ids=["scale", "tensor", "zp"])
def test_per_channel_qparams_on_a_per_tensor_spec_are_refused_where_the_module_is_made(qp):
    """Both modules were built with them; every call then refused them, the Dequantizer's
    with advice it cannot take ("scale has 2 values; pass axis= for per-channel codes":
    its axis is the spec's)."""
    spec = QuantSpec(bits=8, signed=True, symmetric=False)  # axis=None: per tensor
    message = (r"^(scale|zero_point) has 2 values but the spec is per-tensor \(axis=None\); "
               r"pass a scalar or set QuantSpec\(axis=\.\.\.\)")
    for make in (lambda: Dequantizer(spec, qp), lambda: on_codes(nn.Identity(), spec, qp),
                 lambda: InputQuantizer(spec, qp),
                 lambda: with_input_quantizer(nn.Identity(), spec, qp),
                 lambda: quantize_offline(torch.zeros(2, 2), spec, qp)):
        with pytest.raises(ValueError, match=message):
            make()
    # one value in an array is a per-tensor value, taken as before
    one = QParams(np.array([0.01]), np.array([1]))
    codes = torch.tensor([[-3, 47]], dtype=torch.int8)
    assert torch.equal(Dequantizer(spec, one)(codes), Dequantizer(spec, QParams(0.01, 1))(codes))


def test_the_dequantizer_checks_its_scale_in_the_precision_it_computes_in():
    """A scale below float32's normal range is one a float32 dequantization refuses on every
    call (it would round to a subnormal), so it is refused when the module is made; a
    float64 one takes it, exactly as dequantize does; the in-model quantizer's precision is
    its input's, so its call checks that."""
    codes = torch.tensor([1, -3], dtype=torch.int8)
    with pytest.raises(ValueError, match="not a normal float32 number.*dtype=float64"):
        Dequantizer(SPEC, QParams(1e-40, 0))
    with pytest.raises(TypeError, match="dtype must be one of torch's"):
        Dequantizer(SPEC, QParams(0.01, 0), dtype=torch.int32)
    wide = Dequantizer(SPEC, QParams(1e-40, 0), dtype=torch.float64)(codes)
    assert torch.equal(wide, dequantize(codes, 1e-40, 0, dtype=torch.float64))
    quantizer = InputQuantizer(SPEC, QParams(1e-40, 0))
    with pytest.raises(ValueError, match="not a normal float32 number.*float64 data"):
        quantizer(torch.zeros(2))


def test_an_input_quantizer_refuses_a_zero_point_off_the_grid_where_it_is_made():
    with pytest.raises(ValueError, match="must be 0 for a symmetric spec"):
        InputQuantizer(QuantSpec(bits=8), QParams(0.01, 3))
    with pytest.raises(ValueError, match="zero_point 500 is outside the integer range"):
        with_input_quantizer(nn.Identity(), SPEC, QParams(0.01, 500))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_offline_codes_feed_a_model_of_another_dtype_the_same_input(dtype):
    """The dequantizer gave float32 whatever the model: a float64 model refused it, and
    the values differed from the in-model quantizer's on float64 or float16 input."""
    spec = SPEC
    x = images(7, 4).to(dtype)
    qp = calibrate(x, spec)
    codes = quantize_offline(x, spec, qp)
    assert torch.equal(InputQuantizer(spec, qp)(x),
                       on_codes(nn.Identity(), spec, qp, dtype=dtype)(codes))
    if dtype == torch.float64:
        net = small_net().double()
        with torch.inference_mode():
            assert torch.equal(with_input_quantizer(net, spec, qp)(x),
                               on_codes(net, spec, qp, dtype=dtype)(codes))


def test_a_stochastic_input_quantizer_is_refused_where_it_is_made():
    """It was accepted, and its first forward failed with "STOCHASTIC rounding needs
    generator=: pass an integer seed ...", an argument the InputQuantizer does not take."""
    spec = SPEC.replace(rounding=RoundingMode.STOCHASTIC)
    qp = calibrate(images(8, 4), SPEC)
    for make in (lambda: InputQuantizer(spec, qp),
                 lambda: with_input_quantizer(small_net(), spec, qp)):
        with pytest.raises(ValueError, match="quantize_offline"):
            make()


def test_print_shows_the_spec_and_qparams():
    """print(model) showed InputQuantizer() and Dequantizer(): nothing of the grid or the
    scale a model's input is quantized with. They now show bits, signedness and rounding,
    the spec's other fields where not their default, a scalar scale and zero point in full
    and per-channel ones as their shape and range."""
    qp = QParams(1 / 255, -128)
    wrapped = with_input_quantizer(nn.Identity(), SPEC, qp)
    assert str(wrapped).split("\n")[1] == (
        "  (0): InputQuantizer(bits=8, signed=True, rounding=nearest_even, symmetric=False, "
        "scale=0.00392156862745098, zero_point=-128)")
    assert repr(InputQuantizer(QuantSpec(bits=4, signed=False, rounding="floor"),
                               QParams(np.float32(0.1), 0))) == (
        "InputQuantizer(bits=4, signed=False, rounding=floor, scale=0.10000000149011612, "
        "zero_point=0)")  # the float32 scale's exact value
    spec = QuantSpec(bits=8, symmetric=False, axis=1, narrow=True)
    channels = QParams(torch.tensor([0.02, 0.5, 0.125]), np.array([3, 3, 3]))
    assert repr(Dequantizer(spec, channels, dtype=torch.float64)) == (
        "Dequantizer(bits=8, signed=True, rounding=nearest_even, symmetric=False, axis=1, "
        "narrow=True, scale=(3,) in [0.02, 0.5], zero_point=(3,) all 3, dtype=torch.float64)")
