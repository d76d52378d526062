"""Fixtures of the qerror.nn tests."""

import pytest
import torch

from tests.qerror.nn.nets import images, tiny_resnet


@pytest.fixture(scope="module")
def setup():
    model = tiny_resnet()
    calib = [images(32, 1)]
    test = [(images(16, 2), torch.arange(16) % 10), (images(16, 3), torch.arange(16) % 7)]
    return model, calib, test
