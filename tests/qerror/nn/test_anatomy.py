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
