"""qerror.nn._anatomy: which models the wing accepts, and where BatchNorms feed layers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from qerror.nn import (
    QuantConfig,
    UnsupportedModelError,
    bn_fed_layers,
    check_model,
    reestimate_bn,
)


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
    from qerror.nn import calibrate_activations, paired_forward

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), act,
                          _EmptyShortcutBlock(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    check_model(model)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    config = QuantConfig.make(8)
    act_qparams = calibrate_activations(model, [x], config.activation)
    with torch.no_grad():
        ref = model(x)
        with paired_forward(model, config, act_qparams):
            out = model(torch.cat([x, x]))
    assert torch.equal(out[:4], ref)


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
