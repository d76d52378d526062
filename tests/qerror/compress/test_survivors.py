"""Rounding the survivors of pruning: exact on a hand-made layer, and the truncation claims."""

import re

import numpy as np
import pandas as pd
import pytest
import torch

from qerror import QuantSpec, RoundingMode, calibrate, fake_quantize
from qerror.compress import prune_global, quantize_survivors


def _layer(values):
    layer = torch.nn.Linear(len(values[0]), len(values), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(values, dtype=torch.float32))
    return torch.nn.Sequential(layer)


def test_hand_made_layer_nearest_and_truncation():
    # 3-bit symmetric per row: qmax 3, scale = max|w| / 3 = 1 for the row [3, 1.6, -0.7, 0].
    # Survivors 3, 1.6, -0.7 (the 0 is pruned). In LSB:
    #   nearest:    3 -> 3, 1.6 -> 2, -0.7 -> -1: errors 0, +0.4, -0.3
    #   truncation: 3 -> 3, 1.6 -> 1, -0.7 -> 0:  errors 0, -0.6, +0.7 (one survivor zeroed)
    model = _layer([[3.0, 1.6, -0.7, 0.0]])
    near = quantize_survivors(model, QuantSpec(bits=3, axis=0))
    trunc = quantize_survivors(model, QuantSpec(bits=3, axis=0,
                                                rounding=RoundingMode.TOWARD_ZERO))
    assert near.model[0].weight.tolist() == [[3.0, 2.0, -1.0, 0.0]]
    assert trunc.model[0].weight.tolist() == [[3.0, 1.0, 0.0, 0.0]]
    assert torch.equal(model[0].weight, torch.tensor([[3.0, 1.6, -0.7, 0.0]]))  # untouched
    r, t = near.layers.iloc[0], trunc.layers.iloc[0]
    assert (r.n, r.survivors, r.zeroed, t.zeroed) == (4, 3, 0, 1)
    # float32 inputs: 1.6 and 0.7 are off by up to 2^-24 relative, hence abs=1e-6
    assert r.bias_lsb == pytest.approx(0.1 / 3, abs=1e-6)
    assert r.shrink_lsb == pytest.approx((0 - 0.4 - 0.3) / 3, abs=1e-6)
    assert t.shrink_lsb == pytest.approx((0 + 0.6 + 0.7) / 3, abs=1e-6)
    assert t.mse_lsb == pytest.approx((0.36 + 0.49) / 3, abs=1e-6)
    assert r.mae_lsb == pytest.approx((0 + 0.4 + 0.3) / 3, abs=1e-6)
    assert t.mae_lsb == pytest.approx((0 + 0.6 + 0.7) / 3, abs=1e-6)
    assert r.mean_abs_lsb == pytest.approx(5.3 / 3, abs=1e-6)


def test_pruned_zeros_stay_zero_and_truncation_shrinks_by_half_an_lsb():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    masks = prune_global(model, 0.75, keep_dense=())
    trunc = quantize_survivors(model, QuantSpec(bits=8, axis=0,
                                                rounding=RoundingMode.TOWARD_ZERO))
    near = quantize_survivors(model, QuantSpec(bits=8, axis=0))
    for name, mask in masks.items():
        layer = name.rpartition(".")[0]
        for q in (trunc, near):
            w = q.model.get_submodule(layer).weight
            assert (w[~mask] == 0).all()
    # Under the uniform model the survivors' shrink is 1/2 LSB (truncation) and 0
    # (nearest), each error uniform with variance 1/12. Over the n survivors the mean has
    # standard error sqrt(1/12/n); 5 standard errors (two-sided α ≈ 6e-7) is the tolerance.
    n = trunc.survivors
    tol = 5 * np.sqrt(1 / 12 / n)
    assert trunc.pooled("shrink_lsb") == pytest.approx(0.5, abs=tol)
    assert near.pooled("shrink_lsb") == pytest.approx(0.0, abs=tol)
    assert near.pooled("mse_lsb") < trunc.pooled("mse_lsb")


def test_affine_spec_is_refused():
    with pytest.raises(ValueError, match="symmetric spec"):
        quantize_survivors(_layer([[1.0]]), QuantSpec(bits=8, symmetric=False))


def test_unsigned_spec_is_refused():
    # an unsigned grid clamps every negative survivor to 0: "zeroed" would count them
    with pytest.raises(ValueError, match="signed spec"):
        quantize_survivors(_layer([[1.0, -0.5]]), QuantSpec(bits=4, signed=False, axis=0))


@pytest.mark.parametrize("model, spec, message", [
    (_layer([[1.0]]), "int8", "spec must be a QuantSpec, got str"),
    (_layer([[1.0]]), 8, "spec must be a QuantSpec, got int"),
    (torch.ones(2, 2), QuantSpec(bits=8, axis=0), "model must be a torch.nn.Module, got Tensor"),
    ({"0.weight": torch.ones(2, 2)}, QuantSpec(bits=8, axis=0),
     "model must be a torch.nn.Module, got dict")])
def test_a_model_or_spec_of_the_wrong_type_is_refused_by_name(model, spec, message):
    # an AttributeError ('str' object has no attribute 'symmetric', 'Tensor' object has no
    # attribute 'named_modules') before: the argument is named, with what to pass
    with pytest.raises(TypeError, match=re.escape(message)):
        quantize_survivors(model, spec)


def test_a_layer_without_survivors_adds_nothing_to_the_pooled_means():
    # Row [3, 1.6, -0.7, 0] as in the hand-made test, then a layer pruned away entirely:
    # the pooled figures are the first layer's, not NaN.
    model = _layer([[3.0, 1.6, -0.7, 0.0]])
    model.append(torch.nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[1].weight.zero_()
    q = quantize_survivors(model, QuantSpec(bits=3, axis=0))
    assert q.layers.survivors.tolist() == [3, 0]
    assert np.isnan(q.layers.bias_lsb.iloc[1])
    assert q.pooled("bias_lsb") == q.layers.bias_lsb.iloc[0]
    none = quantize_survivors(_layer([[0.0, 0.0]]), QuantSpec(bits=3, axis=0))
    assert np.isnan(none.pooled("bias_lsb"))


def test_a_negative_channel_axis_is_the_same_as_its_positive_twin():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    for rounding in (RoundingMode.NEAREST_EVEN, RoundingMode.TOWARD_ZERO):
        pos = quantize_survivors(model, QuantSpec(bits=4, axis=1, rounding=rounding))
        neg = quantize_survivors(model, QuantSpec(bits=4, axis=-1, rounding=rounding))
        assert torch.equal(pos.model[0].weight, neg.model[0].weight)
        pd.testing.assert_frame_equal(pos.layers, neg.layers)


def test_stochastic_rounding_draws_one_stream_per_layer_from_the_seed():
    # Two layers with the same weights: layer i is rounded with SeedSequence([seed, i]), so
    # the two round differently (each survivor off the grid, 58 of the 64 here, rounds up or
    # down on its own draw), each equals fake_quantize with its own key, and the seed
    # repeats it.
    w = (torch.arange(64, dtype=torch.float32).reshape(4, 16) - 31.5) / 16
    model = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False),
                                torch.nn.Linear(16, 4, bias=False))
    with torch.no_grad():
        for m in model:
            m.weight.copy_(w)
    spec = QuantSpec(bits=4, axis=0, rounding=RoundingMode.STOCHASTIC)
    q = quantize_survivors(model, spec, seed=7)
    qp = calibrate(w, spec)
    for i in range(2):
        key = int(np.random.SeedSequence([7, i]).generate_state(1)[0])
        assert torch.equal(q.model[i].weight, fake_quantize(w, spec, qp.scale, qp.zero_point,
                                                            generator=key)), i
    assert not torch.equal(q.model[0].weight, q.model[1].weight)
    assert torch.equal(quantize_survivors(model, spec, seed=7).model[1].weight,
                       q.model[1].weight)
