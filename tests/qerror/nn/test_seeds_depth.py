"""qerror.nn.seeds: the deepest convolution is the one of largest path depth."""

from __future__ import annotations

import numpy as np
import torch

from qerror.nn.growth import debiased_gap
from qerror.nn.propagate import QuantConfig, calibrate_activations, measure
from qerror.nn.seeds import deepest_drift_gap, statement_values
from qerror.rounding import RoundingMode
from tests.qerror.nn.nets import images, tiny_resnet


def test_drift_deep_is_taken_at_the_deepest_convolution_not_the_last_to_run():
    """In tiny_resnet's last block the shortcut's 1x1 convolution runs after the block's
    second one, one layer below it: drift_deep and deepest_drift_gap are the second's
    (the shortcut's was taken: 0.293 here, against the deepest's 0.345)."""
    model = tiny_resnet()
    x = images(48, 1)
    y = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(2))
    act = calibrate_activations(model, [x], QuantConfig.make(4).activation)
    res = {m: measure(model, [(x, y)], QuantConfig.make(4, m), act, image_means=48)
           for m in (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO)}
    trunc, near = res[RoundingMode.TOWARD_ZERO], res[RoundingMode.NEAREST_EVEN]
    convs = {s.name: s for s in trunc.layers() if s.kind == "conv"}
    last, deepest = list(convs)[-1], "4.conv2"
    assert last == "4.downsample.0"
    assert convs[deepest].path_depth == max(s.path_depth for s in convs.values())
    assert convs[last].path_depth < convs[deepest].path_depth
    # the two figures differ, so the check tells which was taken
    assert (convs[last].drift_rel_rms_channel_debiased
            != convs[deepest].drift_rel_rms_channel_debiased)
    assert statement_values(trunc)["drift_deep"] == convs[deepest].drift_rel_rms_channel_debiased
    a, b = convs[deepest], near.site(deepest)
    want = debiased_gap(a.drift_image_channel, a.float_std_channel, b.drift_image_channel,
                        b.float_std_channel, resamples=200, seed=3)
    got = deepest_drift_gap(trunc, near, resamples=200, seed=3)
    assert np.array_equal([got.gap, got.lo, got.hi], [want.gap, want.lo, want.hi])
