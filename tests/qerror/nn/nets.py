"""Small networks and images shared by the tests of qerror.nn."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

#: Float64 reductions of the same numbers in another order agree to this relative tolerance.
RTOL64 = 1e-9


def tiny_resnet(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """conv-bn-relu, two torchvision BasicBlocks (one with a downsample), pool, linear."""
    torch.manual_seed(seed)
    block = torchvision.models.resnet.BasicBlock
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        block(8, 8), block(8, 16, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model = model.to(dtype)
    with torch.no_grad():  # BatchNorm statistics that fit the model's own activations
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()
        model(torch.randn(64, 1, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(9)))
    return model.eval()


def images(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(seed))
