"""Tests of qerror.nn.updown: the Taylor estimate and local MSE against independent
computations, nearest's weight MSE, reproducibility, and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from qerror.calibration import calibrate
from qerror.nn import UnsupportedModelError, middle_layer, updown_experiment
from qerror.quantizer import QuantSpec, fake_quantize
from qerror.rounding import RoundingMode
from qerror.stats import wilson_ci
from tests.qerror.nn.nets import RTOL64, images, tiny_resnet


def _linear_problem(seed=0):
    """A one-layer softmax classifier (float64): 5 inputs, 3 classes, 15 weights."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 5, generator=g, dtype=torch.float64))
        model[1].bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(40, 1, 1, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def test_taylor_and_local_mse_match_an_independent_computation():
    """The Taylor estimate against torch.autograd.functional.hessian of the loss in the 15
    weights, the local MSE against the layer's output error computed directly, the loss
    against a plain forward pass: float64 sums in another order, so RTOL64."""
    model, x, y = _linear_problem()
    res = updown_experiment(model, "1", [(x, y)], 3, roundings=6, seed=2)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    xf = x.flatten(1)

    def loss(flat):
        return F.cross_entropy(xf @ flat.reshape(3, 5).T + b, y)

    g = torch.autograd.functional.jacobian(loss, w.flatten())
    h = torch.autograd.functional.hessian(loss, w.flatten())
    spec = QuantSpec(3, signed=True, symmetric=True, axis=0, rounding=RoundingMode.STOCHASTIC)
    qp = calibrate(w, spec)
    for k in range(6):
        gen = int(np.random.SeedSequence([2, k]).generate_state(1)[0])
        wq = fake_quantize(w, spec, qp.scale, generator=gen)
        dw = (wq - w).flatten()
        taylor = float(loss(w.flatten()) + g @ dw + 0.5 * dw @ h @ dw)
        assert res.taylor[k] == pytest.approx(taylor, rel=RTOL64)
        assert res.loss[k] == pytest.approx(float(loss(wq.flatten())), rel=RTOL64)
        assert res.local_mse[k] == pytest.approx(float(((xf @ (wq - w).T) ** 2).mean()),
                                                 rel=RTOL64)


def test_nearest_has_the_smallest_weight_error_and_the_counts_add_up():
    model = tiny_resnet()
    x = images(32, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = updown_experiment(model, "0", [(x, y)], 4, roundings=20, seed=0, taylor=False)
    # pointwise closest (ledger R5), so the smallest mean squared weight error
    assert res.nearest_weight_mse_lsb <= res.weight_mse_lsb.min()
    assert np.isnan(res.taylor).all() and np.isnan(res.taylor_rho)
    beat = int((res.loss < res.nearest_loss).sum())
    assert res.beat.estimate * 20 == beat
    assert res.beat.ci == wilson_ci(beat, 20, 0.05).ci
    frame = res.to_frame()
    assert len(frame) == 21 and frame.rounding.iloc[0] == "nearest"
    assert int(frame.beats_nearest.sum()) == beat
    assert res.summary()["beat"] == beat and res.images == 32
    again = updown_experiment(model, "0", [(x, y)], 4, roundings=20, seed=0, taylor=False)
    assert np.array_equal(again.loss, res.loss)  # seeded: the same roundings


def test_middle_layer_and_model_untouched():
    model = tiny_resnet()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert middle_layer(model) == names[len(names) // 2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(8, 2)
    updown_experiment(model, middle_layer(model), [(x, torch.zeros(8, dtype=torch.long))], 4,
                      roundings=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


_SEED = r"must be an int from 0 to 2\*\*64 - 1"


@pytest.mark.parametrize("kw, err, match", [
    ({"layer": "1"}, ValueError, "not a Conv2d or Linear"),
    ({"bits": 1}, ValueError, "bits must be"),
    ({"roundings": 0}, ValueError, "roundings must be"),
    ({"batches": [images(4, 1)]}, ValueError, "labelled batches"),
    ({"batches": []}, ValueError, "at least one batch"),
    ({"alpha": 1.5}, ValueError, "alpha must be in"),
    ({"alpha": "0.05"}, TypeError, "alpha must be a number"),
    ({"seed": -1}, ValueError, r"seed \(rounding k draws .*\) " + _SEED + r", got -1"),
    ({"seed": 1.5}, TypeError, r"seed \(rounding k draws .*\) " + _SEED + r", got 1\.5"),
    ({"seed": True}, TypeError, r"seed \(rounding k draws .*\) " + _SEED + r", got True"),
    ({"bits": 4.0}, TypeError, "bits must be an int >= 2, got 4.0"),
    ({"bits": 17}, ValueError, "bits must be an integer from 2 to 16, got 17"),
    # bool("False") is True: the Taylor estimate (a backward pass per rounding, the
    # gradient's graph kept) was computed, and a progress bar shown, without a word
    ({"taylor": "False"}, TypeError, "taylor must be True or False, got 'False'"),
    ({"taylor": None}, TypeError, "taylor must be True or False, got None"),
    ({"progress": "no"}, TypeError, "progress must be True or False, got 'no'"),
    # -100 is cross_entropy's ignore_index: that image was left out of every loss
    ({"batches": [(images(4, 1), torch.tensor([0, -100, 1, 2]))]}, ValueError,
     "labels from -100 to 2 are not class indices which start at 0"),
    ({"batches": [(images(4, 1), torch.zeros(4))]}, TypeError, "integer class indices"),
    ({"batches": [(images(4, 1), torch.zeros(4, 1, dtype=torch.long))]}, ValueError,
     r"labels of shape \(4, 1\) do not match a batch of 4"),
])
def test_bad_input(kw, err, match):
    """Refused before any forward pass (a bad alpha was refused only after every rounding
    had run: 53 forward passes for 50 roundings; a bad seed by numpy's SeedSequence after
    the float loss, the gradient's graph and nearest's, 'expected non-negative integer')."""
    args = {"layer": "0", "batches": [(images(4, 1), torch.zeros(4, dtype=torch.long))],
            "bits": 4, "roundings": 3, **kw}
    model = tiny_resnet()
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(err, match=match):
        updown_experiment(model, args.pop("layer"), args.pop("batches"), **args)
    assert not calls


def test_labels_beyond_the_logits_classes_are_refused_after_the_float_pass():
    """A label from the class count up failed in cross_entropy with torch's bare IndexError
    ('Target 1000 is out of bounds'); the count is the logits', so the refusal follows the
    float forward pass, before any rounding's."""
    model = tiny_resnet()
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"labels from 0 to 1000 are not class indices of "
                                         r"the \d+ classes"):
        updown_experiment(model, "0", [(images(4, 1), torch.tensor([0, 1, 2, 1000]))],
                          bits=4, roundings=3)
    assert calls == [1]


def test_refused_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LSTM(2, 2))
    with pytest.raises(UnsupportedModelError, match="LSTM"):
        updown_experiment(model, "0", [(images(4, 1), torch.zeros(4, dtype=torch.long))], 4)


def test_a_layer_the_forward_pass_never_calls_is_refused():
    """It has no input to measure a local error on (an IndexError before)."""
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x.flatten(1))

    x, y = torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="'b' is never called"):
        updown_experiment(Unused(), "b", [(x, y)], 4, roundings=3)


def test_a_layer_called_twice_has_its_local_error_counted_at_both_calls():
    """The local MSE averages the layer's output error over every call (the first call's
    input alone before), checked against the two calls computed directly."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.a(torch.tanh(self.a(x.flatten(1))))))

    torch.manual_seed(0)
    model = Twice().double()
    x, y = torch.randn(10, 1, 2, 2, dtype=torch.float64), torch.randint(0, 3, (10,))
    res = updown_experiment(model, "a", [(x, y)], 3, roundings=3, seed=1, taylor=False)
    w = model.a.weight.detach()
    x1 = x.flatten(1)
    x2 = torch.tanh(model.a(x1)).detach()
    spec = QuantSpec(3, signed=True, symmetric=True, axis=0, rounding=RoundingMode.STOCHASTIC)
    qp = calibrate(w, spec)
    for k in range(3):
        gen = int(np.random.SeedSequence([1, k]).generate_state(1)[0])
        dw = fake_quantize(w, spec, qp.scale, generator=gen) - w
        both = torch.cat([x1 @ dw.T, x2 @ dw.T])
        assert res.local_mse[k] == pytest.approx(float((both ** 2).mean()), rel=RTOL64)
        assert res.local_mse[k] != pytest.approx(float(((x1 @ dw.T) ** 2).mean()), rel=1e-6)


def test_a_weight_that_is_not_the_layers_own_parameter_is_refused():
    """A pruned layer's weight is recomputed from weight_orig * weight_mask by a forward
    pre-hook, which overwrote the rounded weights: every loss was the float loss (beat 0
    of 5) or, with the Taylor estimate, autograd failed after the forward passes. A weight
    tied to another layer's was rounded in both while the local MSE counted one layer's
    calls. Each is now refused before any forward pass."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.head = nn.Linear(4, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x.flatten(1))))))

    torch.manual_seed(0)
    pruned = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    prune.l1_unstructured(pruned[1], "weight", amount=0.25)
    tied = Tied().double()
    x, y = torch.randn(10, 1, 2, 2, dtype=torch.float64), torch.randint(0, 3, (10,))
    for model, layer, match in [(pruned, "1", r"weight of '1' is not a parameter.*prune\.remove"),
                                (tied, "a", r"weight of 'a' is also b\.weight \(tied\)"),
                                (tied, "b", r"weight of 'b' is also a\.weight \(tied\)")]:
        calls = []
        hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
        for taylor in (False, True):
            with pytest.raises(ValueError, match=match):
                updown_experiment(model, layer, [(x, y)], 2, roundings=5, seed=1, taylor=taylor)
        hook.remove()
        assert not calls
    prune.remove(pruned[1], "weight")  # a plain parameter again: accepted
    res = updown_experiment(pruned, "1", [(x, y)], 2, roundings=5, seed=1)
    assert np.ptp(res.loss) > 0
    # the model itself as the layer ("" in named_modules): its weight is "weight", not
    # ".weight", which the check above took for a weight computed from others
    alone = nn.Linear(4, 3).double()
    flat = x.flatten(1)
    res = updown_experiment(alone, "", [(flat, y)], 2, roundings=5, seed=1)
    assert np.ptp(res.loss) > 0


def test_a_float_loss_that_is_not_finite_is_refused_before_any_rounding():
    """A NaN weight in another layer made every loss NaN, and NaN compares as not below
    nearest's: the result said 0 of 5 roundings beat nearest (Wilson [0, 0.43])."""
    x, y = images(8, 1), torch.zeros(8, dtype=torch.long)
    for where in ("7.weight", "3.bn1.running_var"):
        model = tiny_resnet()
        with torch.no_grad():
            dict((*model.named_parameters(), *model.named_buffers()))[where].view(-1)[0] = \
                float("nan")
        calls = []
        model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
        with pytest.raises(ValueError, match="the float network's loss on these images is nan"):
            updown_experiment(model, "0", [(x, y)], 4, roundings=5, taylor=False)
        assert len(calls) == 1  # the float loss's pass alone


def test_a_non_finite_weight_of_the_layer_is_named_before_any_forward_pass():
    """A NaN or infinite weight in the layer itself was reported as "x holds 1 non-finite
    value(s)" (calibrate's name for its data), as if the images held it."""
    x, y = images(8, 1), torch.zeros(8, dtype=torch.long)
    for value in (float("nan"), float("inf")):
        model = tiny_resnet()
        with torch.no_grad():
            model[3].conv1.weight[0, 0, 0, 0] = value
        calls = []
        model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
        with pytest.raises(ValueError, match=r"layer '3.conv1' holds 1 non-finite weight"):
            updown_experiment(model, "3.conv1", [(x, y)], 4, roundings=5, taylor=False)
        assert not calls


def test_a_rounding_whose_loss_is_nan_is_refused():
    """A float16 rounding up of 0.3 to 3/7 overflowed the logit (50000 + 40000 * 3/7), whose
    loss is NaN, and NaN compares as not below nearest's: counted as losing to it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False)).half()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.3], [0.0, 1.0]]))
    x = torch.tensor([[[[50000.0, 40000.0]]]], dtype=torch.float16)
    with pytest.raises(FloatingPointError, match=r"the loss with '1' rounded is NaN .*float16"):
        updown_experiment(model, "1", [(x, torch.tensor([1]))], 4, roundings=8, taylor=False)
