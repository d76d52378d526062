"""qerror.nn._anatomy: which models the wing accepts, and where BatchNorms feed layers."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from qerror import QuantSpec, RangePolicy, fake_quantize, quantize
from qerror.nn import (
    QuantConfig,
    Target,
    UnsupportedModelError,
    bn_fed_layers,
    check_model,
    measure,
    reestimate_bn,
    untie_relus,
)
from qerror.nn._anatomy import RangeObserver, is_block
from tests.qerror.nn.nets import images


def test_bn_fed_layers_follow_torchvision_blocks(setup):
    model, _, _ = setup
    # 3.conv1 reads the stem's relu(bn) directly (the block has no downsample)
    assert sorted(bn_fed_layers(model)) == ["3.conv1", "3.conv2", "4.conv2"]
    r50 = torchvision.models.resnet50()
    fed = bn_fed_layers(r50)
    assert len(fed) == 2 * 16 and fed["layer1.0.conv3"] is r50.layer1[0].bn2


def test_unsupported_layers_are_refused_with_their_names():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.LSTM(2, 2))
    with pytest.raises(UnsupportedModelError, match="Conv1d, LSTM"):
        check_model(model)


def test_a_model_without_batchnorm_is_refused_where_batchnorm_is_needed():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    check_model(model)
    with pytest.raises(UnsupportedModelError, match="no BatchNorm2d"):
        check_model(model, need_batchnorm=True)
    with pytest.raises(UnsupportedModelError, match="no BatchNorm2d"):
        reestimate_bn(model, [torch.randn(2, 1, 3, 3)], QuantConfig.make(8))


def test_a_batchnorm_without_running_statistics_is_refused():
    """In evaluation mode it normalises by the batch's own statistics: an image's output
    depends on the others, which no paired pass or BN re-estimation can take."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="keep no running statistics"):
        check_model(model)
    with pytest.raises(UnsupportedModelError, match="1 keep no running statistics"):
        reestimate_bn(model, [torch.randn(2, 1, 3, 3)], QuantConfig.make(8))


class _EmptyShortcutBlock(nn.Module):
    """pytorch-cifar's BasicBlock: the identity shortcut is an empty nn.Sequential."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        return torch.relu(self.bn1(self.conv1(x)) + self.shortcut(x))


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.1), nn.Tanh(), nn.ELU(), nn.PReLU(),
                                 nn.Dropout2d()], ids=lambda a: type(a).__name__)
def test_element_wise_activations_and_an_empty_sequential_are_accepted(act):
    """Element-wise activations, dropout and an empty Sequential treat samples
    independently: the paired pass's float half equals the float forward exactly."""

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), act,
                          _EmptyShortcutBlock(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    check_model(model)
    _assert_float_half_is_the_forward(
        model, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)))


def _assert_float_half_is_the_forward(model, x):
    """The paired pass's float half (8-bit, ranges calibrated on ``x``) equals ``model(x)``
    exactly."""
    from qerror.nn import calibrate_activations, paired_forward

    config = QuantConfig.make(8)
    act_qparams = calibrate_activations(model, [x], config.activation)
    with torch.no_grad():
        ref = model(x)
        with paired_forward(model, config, act_qparams):
            out = model(torch.cat([x, x]))
    assert torch.equal(out[:len(x)], ref)


def test_the_refusal_does_not_suggest_a_wrapper_it_would_refuse():
    class Wrapped(nn.Module):
        def forward(self, x):
            return x.roll(1, 0)  # mixes samples

    with pytest.raises(UnsupportedModelError, match="Wrapped") as err:
        check_model(nn.Sequential(nn.Conv2d(1, 2, 3), Wrapped()))
    assert "wrap" not in str(err.value).replace("Wrapped", "")


def test_an_observer_refuses_non_finite_activations_in_any_batch():
    """A NaN batch's aminmax is NaN, which min/max dropped without a word after the first
    batch: the range came from the other batches alone."""
    from qerror.calibration import RangePolicy
    from qerror.nn._anatomy import RangeObserver
    from qerror.quantizer import QuantSpec

    obs = RangeObserver(QuantSpec(), RangePolicy(), torch.Generator())
    obs.add(torch.tensor([-1.0, 1.0]))
    for bad in (torch.tensor([float("nan"), 5.0]), torch.tensor([0.0, float("inf")])):
        with pytest.raises(ValueError, match="NaN or Inf"):
            obs.add(bad)
    with pytest.raises(ValueError, match="empty"):
        obs.add(torch.empty(0))
    assert (obs.lo, obs.hi, obs.batches) == (-1.0, 1.0, 1)


@pytest.mark.parametrize("bad, match", [
    (torch.full((2, 1, 8, 8), float("nan")), "NaN or Inf"),
    (torch.empty(0, 1, 8, 8), "non-empty batch"),
], ids=["nan", "empty"])
def test_crosscheck_refuses_a_bad_calibration_batch_clearly(bad, match):
    from qerror.nn.int8 import crosscheck_model

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    good = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        crosscheck_model(model, [good, bad], [good])


def test_a_batchnorm_whose_flag_was_set_without_buffers_is_refused():
    """torch's evaluation forward uses batch statistics where the buffers are None, whatever
    track_running_stats says: the flag alone let such a model through, and the paired
    pass's float half differed from the float forward."""
    bn = nn.BatchNorm2d(2, track_running_stats=False)
    bn.track_running_stats = True
    model = nn.Sequential(nn.Conv2d(1, 2, 3), bn, nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="1 keep no running statistics"):
        check_model(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_an_observer_finds_a_finite_grid_for_activations_at_their_formats_end(dtype, symmetric,
                                                                             method):
    """The sampled path (percentile, MSE) calibrated float64 samples, so float32 activations
    at ±float32 max got float64's cap, the scale max/127, and 127 s fake-quantized to ±inf
    (/work/runs/s42/overflow2/probe_observer_before.txt). The scale is now at most the
    activations' own dtype's max_scale, and every value of the stream fake-quantizes to a
    finite number of that dtype."""
    spec = QuantSpec(bits=8, symmetric=symmetric)
    top = float(torch.finfo(dtype).max)
    obs = RangeObserver(spec, RangePolicy(method, percentile=100.0),
                        torch.Generator().manual_seed(0))
    x = torch.tensor([-top, -1.0, 0.0, 1.0, top], dtype=dtype)
    obs.add(x)
    obs.add(x[1:4])
    qp = obs.qparams()
    assert qp.scale <= spec.max_scale(qp.zero_point, dtype)
    with np.errstate(all="raise"):
        out = fake_quantize(x, spec, qp.scale, qp.zero_point)
        codes = quantize(x, spec, qp.scale, qp.zero_point)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    # each end's level s (q - z), exactly, lies within one step of it (the upper end clamps
    # to 127 s on -128..127)
    step = Fraction(qp.scale)
    for q, end in zip(codes[[0, -1]].tolist(), (-top, top)):
        assert abs(step * (int(q) - qp.zero_point) - Fraction(end)) <= step
    assert obs.dtype == dtype


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_an_observer_of_float64_activations_accepts_their_range_beyond_float32(method):
    """The min-max path called qparams_from_range for float32 data, which refuses a range
    beyond 3.4e38: a float64 model's activations at ±1e300 were refused
    (probe_observer_before.txt). They now get float64's grid, 1e300 / 127 as for calibrate."""
    obs = RangeObserver(QuantSpec(), RangePolicy(method, percentile=100.0), torch.Generator())
    obs.add(torch.tensor([-1e300, 0.5, 1e300], dtype=torch.float64))
    assert obs.qparams().scale == 1e300 / 127 and obs.qparams().zero_point == 0


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_an_observer_refuses_a_stream_of_two_dtypes_and_a_non_float_one(method):
    """A stream whose batches come in two dtypes has no one grid (the largest scale and range
    are its dtype's): the second dtype is refused and the observer keeps what it had."""
    obs = RangeObserver(QuantSpec(), RangePolicy(method, percentile=100.0), torch.Generator())
    obs.add(torch.tensor([-1.0, 1.0]))
    before = obs.qparams()
    with pytest.raises(ValueError, match="torch.float64 in this batch but torch.float32 in the "
                                         "earlier ones.*one dtype"):
        obs.add(torch.tensor([-4.0, 4.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype torch.int64, for which no range is found"):
        obs.add(torch.tensor([-4, 4]))
    assert (obs.lo, obs.hi, obs.batches, obs.dtype) == (-1.0, 1.0, 1, torch.float32)
    assert len(obs.samples) == (method != "minmax") and obs.qparams() == before


@pytest.mark.parametrize("progress", [False, True])
def test_a_single_tensor_given_for_the_batches_is_refused(progress):
    """A tensor of images passed as ``batches`` (not ``[images]``) iterated over its images
    one at a time: a convolution took each as an unbatched image, and AdaRound stopped deep
    in torch ('mat1 and mat2 shapes cannot be multiplied', the adaround review) or a
    calibration went on over single images. Refused, with or without a progress bar."""
    from qerror.nn import calibrate_activations
    from qerror.nn.adaround import adaround

    torch.manual_seed(0)
    spec = QuantSpec(bits=8)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    x = torch.randn(4, 1, 6, 6)
    with pytest.raises(ValueError, match=r"single tensor of shape \(4, 1, 6, 6\).*\[images\]"):
        calibrate_activations(model, x, spec, progress=progress)
    with pytest.raises(ValueError, match=r"single tensor of shape \(4, 1, 6, 6\)"):
        adaround(model, x, iterations=1)
    calibrate_activations(model, [x], spec, progress=progress)  # a list of one batch is taken


class _StandardisedConv(nn.Conv2d):
    """A convolution of its standardised weight (timm's StdConv2d): a forward of its own."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w / w.std((1, 2, 3), keepdim=True), self.bias)


class _RenamedConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward."""


def test_a_layer_subclass_with_its_own_forward_is_refused():
    """The paired pass replaces each layer's forward with Conv2d's on its weight: a
    subclass's own forward ran in neither half, so the float half was another network
    (probe3: a weight-standardised conv's float half 10.6 off the model's output). It is
    refused, a subclass keeping Conv2d's forward is not, and the plain Conv2d holding the
    computed weight that the message advises gives the float half the model's output."""
    from qerror.nn import paired_forward

    def net(conv):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), conv(4, 4, 3), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 3)).eval()

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    config = QuantConfig.make(8)
    model = net(_StandardisedConv)
    with pytest.raises(UnsupportedModelError, match=r"'2' \(_StandardisedConv\).*plain Conv2d"):
        check_model(model)
    with pytest.raises(UnsupportedModelError, match="_StandardisedConv"):
        paired_forward(model, config, None).__enter__()
    assert all(not m._forward_hooks and "forward" not in vars(m) for m in model.modules())
    check_model(net(_RenamedConv))
    plain = net(nn.Conv2d)
    with torch.no_grad():
        w = model[2].weight - model[2].weight.mean((1, 2, 3), keepdim=True)
        plain[2].weight.copy_(w / w.std((1, 2, 3), keepdim=True))
        assert torch.equal(plain(x), model(x))
    check_model(plain)
    _assert_float_half_is_the_forward(plain, x)


class _RenamedLinear(nn.Linear):
    """A subclass that keeps Linear's forward."""


class _RenamedBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm2d's forward."""


class _ShiftedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own: its statistics, then 1 added."""

    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps) + 1.0


def test_a_batchnorm_subclass_with_its_own_forward_is_not_read_as_a_batchnorm():
    """A subclass's node is read as its torch.nn base's: a BatchNorm2d subclass whose forward
    adds 1 was folded into the conv before it (the folded conv 1.0 off the model's first two
    modules) and named as the BatchNorm feeding the next layer, whose input mean its running
    statistics do not give. Its forward is traced through, as any other module's: no fold,
    no BN-fed layer; the subclass keeping BatchNorm2d's forward is still one node."""
    from qerror.nn._anatomy import fold_bn, layer_chains

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _ShiftedBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # what folding it would compute: its statistics without the 1
        assert torch.allclose(fold_bn(model[0], model[1])(x) + 1.0, model[1](model[0](x)),
                              atol=1e-5)
    assert [(s.name, s.bn) for s in layer_chains(model, True, who="test")] == [
        ("0", None), ("3", None), ("5", None)]
    assert bn_fed_layers(model) == {}
    model[1] = _RenamedBatchNorm(4).eval()
    assert [(s.name, s.bn) for s in layer_chains(model, True, who="test")] == [
        ("0", model[1]), ("3", None), ("5", None)]
    assert bn_fed_layers(model) == {"3": model[1]}


def test_the_graph_holds_subclasses_of_layers_and_batchnorms():
    """torch.fx keeps only torch.nn's own classes as one node: a subclass defined elsewhere
    was traced through, so its layer was missing from the graph (probe4: path depths
    {'0': 1, '5': 2} for four layers in a chain, the last conv's one short) and a
    BatchNorm2d subclass's input check failed the trace (no path depths, no chains, no
    BN-fed layers). Path depth by hand: the four layers of a chain, 1 to 4."""
    from qerror.nn._anatomy import layer_chains, path_depths

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _RenamedConv(4, 4, 3),
                          _RenamedBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                          _RenamedLinear(4 * 6 * 6, 3)).eval()
    assert path_depths(model) == {"0": 1, "3": 2, "6": 3, "8": 4}
    assert [(s.name, s.bn, s.relu) for s in layer_chains(model, True, who="test")] == [
        ("0", model[1], True), ("3", model[4], True), ("6", None, False), ("8", None, False)]
    assert bn_fed_layers(model) == {"3": model[1], "6": model[4]}


def test_a_residual_module_with_batchnorms_and_a_downsample_is_a_block():
    """measure's promise: a residual block is a module with BatchNorm children and a
    ``downsample`` attribute or one named ``*Block``/``Bottleneck``. Only the names were
    read: untie_relus' UntiedBottleneck (the same function, the same state dict) lost the
    block site that torchvision's Bottleneck has (probe_block: ['3'] against [])."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        torchvision.models.resnet.Bottleneck(8, 4, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).double().eval()
    config = QuantConfig.make(8, target=Target.WEIGHTS)
    x = [images(4, 2)]
    for m in (model, untie_relus(model)):
        assert [s.name for s in measure(m, x, config).sites if s.kind == "block"] == ["3"]

    class Unit(nn.Module):
        def __init__(self, downsample: bool = True, bn: bool = True):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
            if downsample:
                self.downsample = None

    assert is_block(Unit()) and not is_block(Unit(downsample=False))
    assert not is_block(Unit(bn=False)) and not is_block(nn.Sequential(nn.BatchNorm2d(2)))
