"""qerror.nn.geometry: map sizes and live kernel taps, exact against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from qerror.nn.geometry import layer_geometry, live_taps
from qerror.nn.models import Stem, fashion_resnet


def brute_live(h, w, conv: nn.Conv2d) -> tuple[int, int]:
    """Live (position, tap) pairs by running the convolution on an all-ones input with
    all-ones weights: each output counts the taps that read data."""
    probe = nn.Conv2d(1, 1, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      bias=False)
    nn.init.ones_(probe.weight)
    with torch.no_grad():
        y = probe(torch.ones(1, 1, h, w))  # integer counts, exact in float32
    kh, kw = probe.kernel_size
    return int(round(float(y.sum()))), y.shape[-2] * y.shape[-1] * kh * kw


@pytest.mark.parametrize("size, k, s, p, d", list(itertools.product(
    (1, 2, 3, 5, 8), (1, 3, 7), (1, 2), (0, 1, 3), (1, 2))))
def test_live_taps_equals_the_convolution_of_ones(size, k, s, p, d):
    span = d * (k - 1) + 1
    if size + 2 * p < span:
        with pytest.raises(ValueError, match="does not fit"):
            live_taps(size, k, s, p, d)
        return
    # One axis: a (k, 1) kernel over a (size, 1) input.
    live, _ = brute_live(size, 1, nn.Conv2d(1, 1, (k, 1), (s, 1), (p, 0), (d, 1)))
    assert live == live_taps(size, k, s, p, d)


def test_resnet50_224_layer4_sees_most_of_its_kernels():
    model = torchvision.models.resnet50()
    geo = {g.layer: g for g in layer_geometry(model, torch.zeros(1, 3, 224, 224))}
    assert len(geo) == 54  # 53 convolutions and the classifier
    g = geo["layer4.0.conv2"]  # stride 2: 14x14 -> 7x7
    assert (g.in_h, g.out_h) == (14, 7)
    c = geo["layer4.1.conv2"]  # 7x7, 3x3, pad 1: per axis 2 + 5*3 + 2 = 19 of 21 taps
    assert (c.in_h, c.out_h, c.live_taps, c.taps) == (7, 7, 19 * 19, 49 * 9)
    assert geo["fc"].live_fraction == 1.0
    assert geo["conv1"].out_h == 112


def test_fashion_stand_in_layer4_uses_only_the_centre_tap():
    # 32x32 with the ImageNet stem: layer4 runs on 1x1 maps, so a 3x3 kernel's only live
    # tap is its centre (the "8 of 9 taps see only padding").
    model = fashion_resnet("resnet50", Stem.IMAGENET)
    geo = {g.layer: g for g in layer_geometry(model, torch.zeros(1, 1, 32, 32))}
    g = geo["layer4.1.conv2"]
    assert (g.in_h, g.in_w, g.live_taps, g.taps) == (1, 1, 1, 9)
    for name, x in geo.items():
        brute = brute_live(x.in_h, x.in_w, dict(model.named_modules())[name]) \
            if x.kind == "conv" else (1, 1)
        assert (x.live_taps, x.taps) == brute, name


def test_model_mode_is_restored_and_hooks_removed():
    model = fashion_resnet("resnet18", Stem.IMAGENET).train()
    layer_geometry(model, torch.zeros(2, 1, 32, 32))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("padding", [1, "same"])
def test_non_zero_padding_is_refused(padding):
    # "same" pads too (a 3x3 kernel: one on each side), so a reflect mode fills it with data
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=padding, padding_mode="reflect"))
    with pytest.raises(ValueError, match="zero padding"):
        layer_geometry(model, torch.zeros(1, 1, 4, 4))


def test_same_padding_of_a_one_tap_kernel_pads_nothing_whatever_the_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, padding="same", padding_mode="reflect"))
    geo, = layer_geometry(model, torch.zeros(1, 1, 4, 4))
    assert geo.live_taps == geo.taps == 16


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's, on speed
@pytest.mark.parametrize("kernel, dilation", [((3, 4), (1, 1)), ((2, 5), (2, 1)),
                                               ((1, 4), (1, 3))])
def test_same_and_valid_padding_are_counted_as_pytorch_pads(kernel, dilation):
    # "same" pads d(k - 1) in all, the odd one after: brute force on ones with torch's own
    # "same" convolution, and "valid" (no padding) against the count by numbers.
    for padding in ("same", "valid"):
        conv = nn.Conv2d(1, 1, kernel, padding=padding, dilation=dilation, bias=False)
        nn.init.ones_(conv.weight)
        geo, = layer_geometry(nn.Sequential(conv), torch.zeros(1, 1, 9, 11))
        with torch.no_grad():
            y = conv(torch.ones(1, 1, 9, 11))
        assert (geo.out_h, geo.out_w) == tuple(y.shape[-2:]), padding
        assert geo.live_taps == int(round(float(y.sum()))), padding
        assert geo.taps == y.shape[-2] * y.shape[-1] * kernel[0] * kernel[1], padding
    assert geo.live_fraction == 1.0  # "valid" reads data only


def test_live_taps_takes_a_before_after_pair():
    # one axis, size 6, kernel 4, padded 1 before and 2 after: brute force with F.pad
    x = torch.nn.functional.pad(torch.ones(1, 1, 6, 1), (0, 0, 1, 2))
    y = torch.nn.functional.conv2d(x, torch.ones(1, 1, 4, 1))
    assert live_taps(6, 4, 1, (1, 2)) == int(y.sum()) == 3 + 4 + 4 + 4 + 3 + 2
    assert live_taps(6, 4, 1, (1, 1)) == live_taps(6, 4, 1, 1)
    with pytest.raises(ValueError, match="before, after"):
        live_taps(6, 4, 1, (1, 2, 3))


def test_non_zero_padding_mode_without_padding_is_counted():
    # nothing is padded, so the mode never acts: every tap reads data
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=0, padding_mode="reflect"))
    geo, = layer_geometry(model, torch.zeros(1, 1, 5, 5))
    assert (geo.live_taps, geo.taps) == (81, 81)


def test_live_taps_takes_numpy_integers():
    assert live_taps(np.int64(4), np.int32(3), np.int8(1), np.uint8(1)) == live_taps(4, 3, 1, 1)


@pytest.mark.parametrize("bad, kind", [
    (dict(size=0), ValueError), (dict(kernel=0), ValueError), (dict(stride=0), ValueError),
    (dict(padding=-1), ValueError), (dict(dilation=True), TypeError),
    (dict(size=2.0), TypeError)])
def test_live_taps_refuses_bad_arguments(bad, kind):
    """An integer below its least is a ValueError; a bool or a float, even 2.0, a TypeError
    (a ValueError before), as every count of the package."""
    args = dict(size=4, kernel=3, stride=1, padding=1, dilation=1) | bad
    name, value = next(iter(bad.items()))
    with pytest.raises(kind, match=rf"^{name} must be an int >= \d, got {value!r}"):
        live_taps(**args)
