"""Tests of qerror.nn.early_exit: the runner, exit policies, calibration and MAC counts."""

import dataclasses
import itertools
import math
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from qerror.nn import UnsupportedModelError
from qerror.nn.early_exit import (
    EarlyExitResNet,
    ExitHead,
    ExitPolicy,
    ExitResult,
    ExitRule,
    IsotonicMap,
    SelectionProcedure,
    SweepPoint,
    block_mac_fractions,
    calibrate_exits,
    choose_operating_point,
    clears,
    compare_exits,
    confidence_ece,
    count_macs,
    cross_validate_selection,
    exit_confidence,
    exit_costs,
    exit_loss,
    exit_result_from_logits,
    exits_per_class,
    expected_calibration_error,
    fit_isotonic,
    fit_temperature,
    qualifies,
    refine_thresholds,
    run_early_exit,
    sdn_exit_points,
    select_rule,
    selection_order,
    threshold_sweep,
)
from qerror.nn.models import fashion_resnet
from qerror.stats import paired_accuracy_equivalence


def images(n, seed=0, dtype=torch.float32):
    return torch.randn(n, 1, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet18():
    # zero_init_residual off: with it every block's last BatchNorm scales by 0, and 16 of
    # the 20 convolutions add nothing to any exit's logits; a runner that ran a block's
    # convolution with another kernel gave exactly the full model's logits
    return fashion_resnet("resnet18", seed=3, zero_init_residual=False).eval()


@pytest.fixture(scope="module")
def exit18(resnet18):
    # float64: the reference below recomputes the exits on the whole batch, and float64
    # keeps any batch-size-dependent kernel choice from moving a decision.
    return EarlyExitResNet(resnet18, seed=1).double().eval()


# ---------------------------------------------------------------------------------------------
# MACs and parameters


def test_torchvision_resnet50_at_224_has_its_published_macs_and_parameters():
    model = torchvision.models.resnet50().eval()
    macs = count_macs(model, torch.zeros(1, 3, 224, 224))
    assert macs == 4_089_184_256
    assert round(macs / 1e9, 3) == 4.089  # the published 4.089 GMACs
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_fashion_resnet50_exit_fractions_are_the_issue_figures():
    """The 32×32 ResNet50 costs 81.8 MMACs; layer1/2/3 end at 17.6%, 43.3% and 79.8%."""
    model = EarlyExitResNet(fashion_resnet("resnet50")).eval()
    costs = exit_costs(model)
    assert costs.full_macs == 81_825_792
    assert round(costs.full_macs / 1e6, 1) == 81.8
    assert [round(100 * f, 1) for f in costs.backbone_fractions[:3]] == [17.6, 43.3, 79.8]
    # The last exit is the ResNet itself: its backbone plus its fc is the full model.
    assert costs.backbone_macs[-1] + costs.head_macs[-1] == costs.full_macs
    # Each head's MACs from the formula in ExitHead's Notes (width 64, 2×2 pool, 10 classes):
    # stage ends at 256×8×8, 512×4×4, 1024×2×2.
    expected_heads = [c * 64 * s * s + 64 * 4 * 10 for c, s in ((256, 8), (512, 4), (1024, 2))]
    assert list(costs.head_macs[:3]) == expected_heads
    assert costs.head_macs[-1] == 2048 * 10
    assert list(costs.macs) == list(np.cumsum(costs.head_macs) + np.array(costs.backbone_macs))
    # Heads add little: 1.28%, 0.64% and 0.32% of the model, 2.25% in all.
    assert round(sum(costs.head_macs[:3]) / costs.full_macs, 4) == 0.0225


def test_count_macs_counts_convolutions_and_matmuls_only():
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, bias=True), nn.BatchNorm2d(5), nn.ReLU()).eval()
    assert count_macs(conv, torch.zeros(2, 3, 6, 6)) == 2 * 5 * 4 * 4 * 3 * 9
    assert count_macs(nn.Linear(7, 4), torch.zeros(3, 7)) == 3 * 7 * 4


def test_block_fractions_increase_to_one_and_sdn_points_are_nearest(resnet18):
    fractions = block_mac_fractions(resnet18)
    values = list(fractions.values())
    assert all(b > a for a, b in zip(values, values[1:]))
    # done / full is an integer ratio rounded once, 1 - 5120 / full rounds twice: within
    # 2 u (u = 2**-53) of each other, plus a little; measured equal
    assert values[-1] == pytest.approx(1 - 512 * 10 / count_macs(resnet18, images(1)),
                                       rel=3 * 2**-53, abs=0)
    points = sdn_exit_points(resnet18)
    ends = list(fractions.items())[:-1]
    for target in (0.15, 0.30, 0.45, 0.60, 0.75, 0.90):
        nearest = min(ends, key=lambda e: abs(e[1] - target))[0]
        assert nearest in points
    model = EarlyExitResNet(resnet18, points)
    assert model.num_exits == len(points) + 1


# ---------------------------------------------------------------------------------------------
# The runner


def test_all_thresholds_one_gives_exactly_the_full_model(resnet18):
    model = EarlyExitResNet(resnet18).eval()
    x = images(24, seed=5)
    with torch.no_grad():
        full = resnet18(x)
    for policy in ExitPolicy:
        result = model.run(x, ExitRule(policy, (1.0, 1.0, 1.0)))
        assert torch.equal(result.logits, full)
        assert torch.equal(result.predictions, full.argmax(1))
        assert result.exit_index.tolist() == [3] * 24
        assert result.rows_per_stage == (24, 24, 24, 24)


def test_threshold_one_holds_even_for_saturated_softmax():
    """A confidence of exactly 1.0 (float softmax saturates) does not exceed threshold 1.0."""
    logits = torch.tensor([[200.0, 0.0], [0.0, 1.0]])
    assert exit_confidence(logits, "max-softmax")[0] == 1.0
    stages = [lambda h: (h, h), lambda h: (h, -h)]
    result = run_early_exit(stages, logits, ExitRule("max-softmax", (1.0,)))
    assert result.exit_index.tolist() == [1, 1]


@pytest.mark.parametrize("dtype, threshold", [(torch.float32, 1 - 1e-8),
                                              (torch.bfloat16, 0.999), (torch.float16, 0.9999)])
def test_a_score_above_its_threshold_exits_whatever_the_logits_dtype(dtype, threshold):
    """Saturated softmax scores of exactly 1.0 exceed a threshold just below 1 that the
    logits' dtype would round up to 1.0 (and 1.0 itself is still never exceeded)."""
    logits = torch.tensor([[20.0, 0.0], [0.0, 20.0]], dtype=dtype)
    assert exit_confidence(logits, "max-softmax").tolist() == [1.0, 1.0]
    assert torch.tensor(threshold, dtype=dtype).item() == 1.0  # what rounding would compare
    stages = [lambda h: (h, logits[:len(h)]), lambda h: (h, torch.zeros(len(h), 2, dtype=dtype))]
    for t, exits in ((threshold, [0, 0]), (1.0, [1, 1])):
        rule = ExitRule("max-softmax", (t,))
        assert run_early_exit(stages, torch.zeros(2, 3, dtype=dtype), rule).exit_index.tolist() \
            == exits
        both = [logits, torch.zeros(2, 2, dtype=dtype)]
        assert exit_result_from_logits(both, rule).exit_index.tolist() == exits


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_counting_macs_gives_every_module_its_own_mode_back():
    """A frozen backbone under training heads (the pattern fit sets up for frozen
    BatchNorms) keeps its BatchNorms in evaluation mode through exit_costs and
    block_mac_fractions; a model-wide train(True) afterwards would have turned them on."""
    model = EarlyExitResNet(fashion_resnet("resnet18", seed=1).eval(), seed=0)
    model.train()
    model.backbone.eval()
    before = _modes(model)
    assert not before["backbone.bn1"] and before["heads.0"]
    exit_costs(model)
    assert _modes(model) == before
    backbone = model.backbone
    backbone.train()
    backbone.layer1.eval()
    inner = _modes(backbone)
    block_mac_fractions(backbone)
    assert _modes(backbone) == inner


def test_macs_are_counted_wherever_the_model_lives():
    """exit_costs and block_mac_fractions made their probe image on the CPU, so a model on
    another device (a GPU; here the meta device, which runs no kernels) failed with "Tensor
    on device meta is not on the expected device cpu!"; the counts do not depend on it."""
    model = EarlyExitResNet(fashion_resnet("resnet18", seed=1)).eval()
    costs = exit_costs(model)
    fractions = block_mac_fractions(model.backbone)
    model.to("meta")
    assert exit_costs(model) == costs
    assert block_mac_fractions(model.backbone) == fractions


def _counting_hooks(model):
    seen = {}
    modules = {"layer1": model.backbone.layer1[0], "layer2": model.backbone.layer2[0],
               "layer3": model.backbone.layer3[0], "layer4": model.backbone.layer4[0],
               **{f"head{k}": h for k, h in enumerate(model.heads)}, "fc": model.backbone.fc}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].shape[0]))
        for name, m in modules.items()]
    return seen, handles


@pytest.mark.parametrize("policy", list(ExitPolicy))
def test_exited_samples_are_not_computed_further(exit18, policy):
    x = images(64, seed=7, dtype=torch.float64)
    with torch.no_grad():
        all_logits = exit18(x)
    scores = [exit_confidence(z, policy) for z in all_logits]
    thresholds = tuple(float(s.median()) for s in scores[:3])
    # Reference: the first exit whose score exceeds its threshold, on the whole batch.
    leaves = torch.stack([s > t for s, t in zip(scores[:3], thresholds)]
                         + [torch.ones(64, dtype=torch.bool)])
    first = leaves.int().argmax(0)
    expected_rows = tuple(int((first >= k).sum()) for k in range(4))
    assert expected_rows[0] == 64 and expected_rows[-1] < 32  # some leave at every exit

    seen, handles = _counting_hooks(exit18)
    try:
        result = exit18.run(x, ExitRule(policy, thresholds))
    finally:
        for h in handles:
            h.remove()
    assert result.rows_per_stage == expected_rows
    for k, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        assert seen[name] == [expected_rows[k]]
    assert [seen[f"head{k}"] for k in range(3)] == [[r] for r in expected_rows[:3]]
    assert seen["fc"] == [expected_rows[3]]
    assert torch.equal(result.exit_index, first)
    expected_logits = torch.stack([all_logits[int(k)][i] for i, k in enumerate(first)])
    torch.testing.assert_close(result.logits, expected_logits, rtol=1e-12, atol=1e-12)
    assert result.exit_counts() == tuple(int((first == k).sum()) for k in range(4))


def test_threshold_zero_exits_everyone_first_and_later_stages_never_run(exit18):
    seen, handles = _counting_hooks(exit18)
    try:
        result = exit18.run(images(10, dtype=torch.float64), ExitRule("max-softmax", (0, 0.5, 1)))
    finally:
        for h in handles:
            h.remove()
    assert result.exit_index.tolist() == [0] * 10
    assert result.rows_per_stage == (10, 0, 0, 0)
    assert set(seen) == {"layer1", "head0"}
    costs = exit_costs(exit18)
    assert result.mean_macs(costs.macs) == costs.macs[0]


def test_runner_handles_any_batch_size_including_one(exit18):
    x = images(9, seed=2, dtype=torch.float64)
    rule = ExitRule("entropy", (0.3, 0.3, 0.3), temperatures=(0.5, 1.0, 2.0, 1.0))
    whole = exit18.run(x, rule)
    for i in range(9):
        one = exit18.run(x[i:i + 1], rule)
        assert one.exit_index.item() == whole.exit_index[i].item()
        torch.testing.assert_close(one.logits[0], whole.logits[i], rtol=1e-10, atol=1e-12)


def test_state_dict_has_the_baseline_keys_and_leaves_it_alone(resnet18):
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    model = EarlyExitResNet(resnet18)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    backbone = {k[len("backbone."):]: v for k, v in model.state_dict().items()
                if k.startswith("backbone.")}
    assert list(backbone) == list(before)
    assert all(torch.equal(v, resnet18.state_dict()[k]) for k, v in before.items())
    assert set(model.state_dict()) - {f"backbone.{k}" for k in before} == {
        f"heads.{k}.{n}" for k in range(3) for n in ExitHead(8, 10).state_dict()}


def test_forward_gives_every_exit_and_training_mode_run_is_refused(resnet18):
    model = EarlyExitResNet(resnet18).eval()
    out = model(images(3))
    assert [tuple(z.shape) for z in out] == [(3, 10)] * 4
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.run(images(3), ExitRule("entropy", (0.5, 0.5, 0.5)))


def test_heads_take_the_backbones_dtype_and_inputs_of_another_dtype_are_refused():
    """The heads were float32 whatever the backbone: a float64 ResNet's forward, run and
    exit_costs failed ("expected scalar type Double but found Float"); an input of another
    dtype than the network's failed inside torch."""
    model = EarlyExitResNet(fashion_resnet("resnet18", seed=2, zero_init_residual=False)
                            .double().eval()).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    x = images(4, dtype=torch.float64)
    rule = ExitRule("max-softmax", (1.0, 1.0, 1.0))
    assert torch.equal(model.run(x, rule).logits, model.backbone(x))
    assert exit_costs(model).macs[-1] > 0
    with pytest.raises(ValueError, match="x is torch.float32 on cpu, the network "
                                         "torch.float64 on cpu"):
        model.run(images(4), rule)


def test_a_resnet_whose_forward_does_more_than_its_modules_is_refused():
    """A subclass normalising its input in forward was taken; the early-exit network runs
    the modules alone, so threshold 1.0 was silently another network."""

    class Normalised(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward((x - 0.3) / 0.35)

    net = Normalised(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    with pytest.raises(UnsupportedModelError, match="Normalised's forward is not torchvision "
                                                    "ResNet's"):
        EarlyExitResNet(net.eval())
    plain = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                      num_classes=10)
    plain.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    plain.load_state_dict(net.state_dict())
    EarlyExitResNet(plain.eval())  # the same modules without the extra step: taken


def test_a_backbone_with_non_finite_weights_or_batch_statistics_is_refused_clearly():
    """A NaN weight crashed the probe inside torch.allclose ('atol must be greater than or
    equal to zero, but got -nan'); BatchNorms without running statistics failed on the
    probe's batch of one, and would mix the samples of a batch in evaluation mode too."""
    net = fashion_resnet("resnet18", seed=4).eval()
    with torch.no_grad():
        net.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf logits on a random input"):
        EarlyExitResNet(net)
    plain = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.BatchNorm2d(
        c, track_running_stats=False))
    with pytest.raises(UnsupportedModelError, match="'bn1' is a BatchNorm without running "
                                                    "statistics"):
        EarlyExitResNet(plain.eval())


def test_the_runner_refuses_stages_in_training_mode(resnet18):
    """run_early_exit ran stages whose BatchNorms were training: a sample's output depended
    on which others were still in the batch, and the running statistics moved."""
    model = EarlyExitResNet(resnet18).eval()
    stages = model.stages()
    rule = ExitRule("max-softmax", (0.5, 0.5, 0.5))
    run_early_exit(stages, images(4), rule)  # evaluation mode: runs
    model.heads[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="call .eval\\(\\) before running"):
        run_early_exit(model.stages(), images(4), rule)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------
# Policies


def test_confidence_scores():
    uniform = torch.zeros(2, 10)
    assert torch.allclose(exit_confidence(uniform, "max-softmax"), torch.full((2,), 0.1))
    # Exactly zero: the rounding of 1 - H/log C left 1.2e-7 (float32, C = 10) to 0.0039
    # (bfloat16), so threshold 0 let a sample with no information exit.
    for c, dtype in itertools.product((2, 3, 10, 1000), (torch.float32, torch.float64,
                                                        torch.float16, torch.bfloat16)):
        tied = torch.full((3, c), 0.7, dtype=dtype)
        assert exit_confidence(tied, "entropy").tolist() == [0.0] * 3, (c, dtype)
        assert exit_confidence(tied, "entropy", 3.0).tolist() == [0.0] * 3, (c, dtype)
        res = exit_result_from_logits([tied, tied], ExitRule("entropy", (0.0,)))
        assert res.exit_index.tolist() == [1] * 3, (c, dtype)
    sure = torch.tensor([[1000.0] + [0.0] * 9])
    assert exit_confidence(sure, ExitPolicy.ENTROPY).item() == 1.0
    # Two classes with p = (0.8, 0.2): H = -(0.8 ln 0.8 + 0.2 ln 0.2), score 1 - H/ln 2.
    z = torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64)
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert exit_confidence(z, "entropy").item() == pytest.approx(1 - h / math.log(2), abs=1e-12)
    assert exit_confidence(z, "max-softmax").item() == pytest.approx(0.8, abs=1e-12)
    # A temperature of 2 halves the logits: p = (2/3, 1/3).
    assert exit_confidence(z, "max-softmax", 2.0).item() == pytest.approx(2 / 3, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Calibration


def _overconfident(n, t_true, seed=0):
    """Logits whose labels are drawn from softmax(logits / t_true): calibrated at t_true."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, 10, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / t_true, 1), 1, generator=gen).squeeze(1)
    return logits, labels


def _se_log_temperature(logits, t):
    """Standard error of the maximum-likelihood log T of labels drawn from softmax(z / t):
    with β = 1/T a label's score is z_y − E_p[z], so the Fisher information of β is
    Σ_i Var_{p_i}(z_i) (p_i = softmax(z_i / t)), and SE(log T̂) = SE(log β̂) = SE(β̂) / β."""
    beta = 1.0 / t
    p = torch.softmax(beta * logits, 1)
    var = (p * logits * logits).sum(1) - (p * logits).sum(1) ** 2
    return 1.0 / (beta * math.sqrt(float(var.sum())))


def test_fit_temperature_minimises_nll_and_recovers_the_true_temperature():
    logits, labels = _overconfident(20000, 2.5)
    t = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(1.5), np.log(4), 801))
    nll = [float(nn.functional.cross_entropy(logits / g, labels)) for g in grid]
    t_grid = grid[int(np.argmin(nll))]
    assert 0 < np.argmin(nll) < 800  # an interior minimum
    assert abs(math.log(t) - math.log(t_grid)) < 1.5e-3  # the grid's spacing is 1.2e-3 in log T
    # The maximum-likelihood T of 20000 labels drawn at T = 2.5: |log(T / 2.5)| within
    # z = 3.29 standard errors (α = 0.001, two-sided), the SE from the Fisher information,
    # 0.81 % here (over seeds 0 to 20 the fits' log T scattered with sd 0.93 %; this seed's
    # is +1.06 %, 1.3 SE).
    assert abs(math.log(t / 2.5)) <= 3.29 * _se_log_temperature(logits, 2.5)


@pytest.mark.parametrize("gap", [3.0, 10.0, 50.0])
def test_fit_temperature_is_the_bound_where_the_nll_does_not_turn_inside(gap):
    """Logits that classify every sample right by ``gap``: the NLL falls towards 0 as T does,
    so its minimum over the bounds is the lower one. In float64 the NLL is exactly 0 on a
    plateau of small T (log(1 + 1e-20) is 0), where the search used to stop anywhere
    (0.0695, 0.2057, 0.2057 for these gaps). Labels the logits say nothing about (the
    wrong class always on top) put the minimum at the upper bound."""
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(500, 10)
    logits[torch.arange(500), labels] = gap
    assert fit_temperature(logits, labels) == 0.05
    assert fit_temperature(logits, labels, bounds=(0.01, 3.0)) == 0.01
    wrong = torch.zeros(500, 10)
    wrong[torch.arange(500), (labels + 1) % 10] = gap
    assert fit_temperature(wrong, labels) == 20.0


def test_fit_temperature_by_ece_recovers_the_true_temperature_and_beats_nll_on_its_own_score():
    # Calibrated at T = 2.5: the ECE's minimiser is noisier than the NLL's and has no
    # closed-form SE. Over seeds 0 to 20 its log(T / 2.5) had mean 0.0004 and sd 0.0168
    # (this seed's +0.0154); the bound is their two-sided prediction bound at α = 0.001 for
    # a new draw, |mean| + t(0.9995, 20)·sd·sqrt(1 + 1/21) = 0.0004 + 3.85·0.0168·1.02 = 0.067.
    logits, labels = _overconfident(20000, 2.5)
    assert abs(math.log(fit_temperature(logits, labels, objective="ece") / 2.5)) <= 0.067
    # Half the samples calibrated at T = 1, half at T = 4: no single T fits both; the NLL's
    # compromise leaves an ECE the ECE's own T cuts. The ratio of the two ECEs is sampled:
    # over the seed pairs (1, 2), (3, 4), ..., (23, 24) it was 0.41 to 0.60, mean 0.483,
    # sd 0.051 (these seeds gave the lowest, 5.5 % against 2.2 %; "more than halves" failed on
    # 4 of the 12). The bound is its one-sided prediction bound at α = 0.001 for a new draw,
    # mean + t(0.999, 11)·sd·sqrt(1 + 1/12) = 0.483 + 4.02·0.051·1.04 = 0.70.
    a, b = _overconfident(5000, 1.0, seed=1), _overconfident(5000, 4.0, seed=2)
    z, y = torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    # calibrate_exits passes the objective on to fit_temperature; the NLL's T keeps the
    # lower NLL.
    (by_nll,), (by_ece,) = (calibrate_exits([z], y, objective=o) for o in ("nll", "ece"))
    assert by_nll.temperature == fit_temperature(z, y)
    assert by_ece.ece_after < 0.70 * by_nll.ece_after and by_nll.nll_after <= by_ece.nll_after


def test_isotonic_map_is_the_monotone_least_squares_fit_and_keeps_the_order():
    # 1,0,1,0,1 at increasing confidences: the violators pool to 0.5 until the last 1.
    g = fit_isotonic(torch.tensor([.1, .2, .3, .4, .5], dtype=torch.float64),
                     torch.tensor([1, 0, 1, 0, 1]).bool())
    assert g.values == (0.5, 0.5, 0.5, 0.5, 1.0)
    # equal confidences are one knot holding their mean; between knots linear, beyond flat
    g = fit_isotonic(torch.tensor([.2, .2, .5, .6], dtype=torch.float64),
                     torch.tensor([1, 0, 1, 0]).bool())
    assert g.knots == (.2, .5, .6) and g.values == (0.5, 0.5, 0.5)
    g = fit_isotonic(torch.tensor([.2, .2, .6], dtype=torch.float64),
                     torch.tensor([1, 0, 1]).bool())
    assert g(torch.tensor([0.0, 0.4, 0.9], dtype=torch.float64)).tolist() == [0.5, 0.75, 1.0]
    assert g(0.4).item() == 0.75 and g(0.4).shape == ()  # a number gives a 0-d tensor
    # monotone: a threshold on the raw confidence keeps its decisions after the map
    logits, labels = _overconfident(3000, 2.0, seed=5)
    conf, pred = torch.softmax(logits, 1).max(1)
    g = fit_isotonic(conf, pred == labels)
    mapped = g(conf)
    order = torch.argsort(conf)
    assert (mapped[order].diff() >= 0).all() and mapped.min() >= 0 and mapped.max() <= 1


def test_isotonic_calibration_beats_any_single_temperature_where_none_fits():
    # Half the samples calibrated at T = 1, half at T = 4, shuffled; the map is fitted on one
    # half and judged on the other. On the held-out half the best single T (by the ECE of
    # the fitting half) leaves 2.6 %, the isotonic map on its confidences 0.7 %.
    a, b = _overconfident(10000, 1.0, seed=1), _overconfident(10000, 4.0, seed=2)
    perm = torch.randperm(20000, generator=torch.Generator().manual_seed(3))
    z, y = torch.cat([a[0], b[0]])[perm], torch.cat([a[1], b[1]])[perm]
    (zf, yf), (ze, ye) = (z[:10000], y[:10000]), (z[10000:], y[10000:])
    t = fit_temperature(zf, yf, objective="ece")
    conf, pred = torch.softmax(zf / t, 1).max(1)
    g = fit_isotonic(conf, pred == yf)
    held_conf, held_pred = torch.softmax(ze / t, 1).max(1)
    assert confidence_ece(g(held_conf), held_pred == ye) < 0.5 * expected_calibration_error(
        ze, ye, t)
    # and on the split it was fitted on, every bin's confidence is its accuracy
    assert confidence_ece(g(conf), pred == yf) < 1e-12


def _ece_reference(conf, correct, n_bins):
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.digitize(conf, edges[1:-1], right=True)  # bin b holds (edge_b, edge_b+1]
    total = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() / len(conf) * abs(correct[sel].mean() - conf[sel].mean())
    return total


def test_ece_matches_an_independent_computation_and_puts_edges_in_the_lower_bin():
    logits, labels = _overconfident(3000, 2.0, seed=4)
    p = torch.softmax(logits, 1)
    conf, pred = p.max(1)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(logits, labels, n_bins=n_bins) == pytest.approx(
            _ece_reference(conf.numpy(), (pred == labels).numpy().astype(float), n_bins),
            abs=1e-12)
    # An edge must share a bin with the confidences below it: 0.5 (exact in binary, the edge
    # of bins 4 and 5 of 10) right and 0.45 wrong are one bin in (0.4, 0.5], ECE
    # |0.95 - 1| / 2 = 0.025; were the edge put in the upper bin, (0.5 + 0.45) / 2 = 0.475.
    # (The tolerance: a few float64 roundings of numbers below 1.)
    conf = torch.tensor([0.5, 0.45], dtype=torch.float64)
    assert confidence_ece(conf, torch.tensor([True, False]), 10) == pytest.approx(0.025,
                                                                                 abs=1e-15)


@pytest.mark.parametrize("n_bins", [3, 7, 10, 15, 20, 25, 50, 100])
def test_ece_bins_a_confidence_on_or_just_above_an_edge_as_documented(n_bins):
    """Bin b holds (e_b, e_{b+1}], e_j the float64 nearest j/M: the edge itself (0.07 of 100
    bins) shares the lower bin with the confidence halfway down it, the next float above the
    edge the upper bin with the one halfway up. A shared bin of c (right) and d (wrong) gives
    |c + d - 1| / 2, separate bins (1 - c + d) / 2, at least 1/(2M) apart; the tolerance is a
    few float64 roundings of numbers below 2."""
    right_wrong = torch.tensor([True, False])
    for j in range(1, n_bins):
        edge = j / n_bins
        above = float(np.nextafter(edge, 1.0))
        for c, d in ((edge, (j - 0.5) / n_bins), (above, (j + 0.5) / n_bins)):
            got = confidence_ece(torch.tensor([c, d], dtype=torch.float64), right_wrong, n_bins)
            assert got == pytest.approx(abs(c + d - 1) / 2, abs=1e-15), (j, c)


def test_calibrate_exits_lowers_ece_and_nll_on_overconfident_exits():
    # one set of labels, drawn at T = 2 from the first exit's logits z; the second exit's
    # logits are 1.5 z, for which the same labels are calibrated at T = 3 (softmax(1.5 z / 3)
    # = softmax(z / 2)). Both exits once shared z and its T, so a fit of the wrong exit's
    # logits, or a rule reading the wrong exit's temperature, passed.
    z, labels = _overconfident(5000, 2.0, seed=1)
    cals = calibrate_exits([z, 1.5 * z], labels)
    # each fitted log T within z = 3.29 Fisher standard errors of its own truth (α = 0.001,
    # two-sided; 1.49 % here)
    for c, logits, t in ((cals[0], z, 2.0), (cals[1], 1.5 * z, 3.0)):
        assert abs(math.log(c.temperature / t)) <= 3.29 * _se_log_temperature(logits, t)
    for c in cals:
        assert c.nll_after <= c.nll_before
        assert c.ece_after < c.ece_before
        assert c.n_bins == 15
    rule = ExitRule("max-softmax", (0.9,), temperatures=tuple(c.temperature for c in cals))
    assert rule.temperature(0) == cals[0].temperature
    assert rule.temperature(1) == cals[1].temperature


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("thresholds", [(-0.1, 0.5, 0.5), (0.5, 1.5, 0.5), (0.5, 0.5, math.nan),
                                        (0.5, "0.5", 0.5), (True, 0.5, 0.5)])
def test_thresholds_outside_unit_interval_are_refused(thresholds):
    with pytest.raises(ValueError, match=r"thresholds\[\d\] must be a number in \[0, 1\]"):
        ExitRule("max-softmax", thresholds)


def test_bad_rules_are_refused(exit18):
    with pytest.raises(ValueError, match="policy"):
        ExitRule("margin", (0.5,))
    with pytest.raises(TypeError, match="sequence"):
        ExitRule("entropy", 0.5)
    with pytest.raises(ValueError, match="one value per exit"):
        ExitRule("entropy", (0.5, 0.5), temperatures=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive finite"):
        ExitRule("entropy", (0.5,), temperatures=(0.0, 1.0))
    with pytest.raises(ValueError, match="2 thresholds but the network has 3 early exits"):
        exit18.run(images(2, dtype=torch.float64), ExitRule("entropy", (0.5, 0.5)))
    with pytest.raises(ValueError, match="non-empty"):
        exit18.run(torch.zeros(0, 1, 32, 32, dtype=torch.float64),
                   ExitRule("entropy", (0.5,) * 3))


def test_a_model_without_the_expected_stages_is_refused(resnet18):
    no_layer3 = fashion_resnet("resnet18")
    del no_layer3.layer3
    with pytest.raises(UnsupportedModelError, match="lacks: layer3"):
        EarlyExitResNet(no_layer3)
    with pytest.raises(UnsupportedModelError, match="conv1.*fc"):
        EarlyExitResNet(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EarlyExitResNet("resnet18")
    with pytest.raises(ValueError, match="exit point 'layer4'"):
        EarlyExitResNet(resnet18, ("layer1", "layer4"))
    with pytest.raises(ValueError, match="network order"):
        EarlyExitResNet(resnet18, ("layer2", "layer1"))
    with pytest.raises(ValueError, match="exit point 'layer9.0'"):
        EarlyExitResNet(resnet18, ("layer9.0",))


def test_bad_calibration_input_is_refused():
    logits, labels = _overconfident(50, 1.0)
    with pytest.raises(ValueError, match="not class indices of the"):
        fit_temperature(logits, labels + 10)
    for bad in (labels.double(), labels > 0):  # bools were read as classes 0 and 1
        with pytest.raises(TypeError, match="labels must be integer class indices"):
            expected_calibration_error(logits, bad)
    with pytest.raises(ValueError, match=r"labels must be of shape \(50,\)"):
        fit_temperature(logits, labels[:-1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_temperature(torch.full((2, 3), math.nan), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_temperature(logits, labels, objective="brier")
    # a bool was taken for 1 (True, 2.0 searched [1, 2]); a single number or strings failed
    # in unpacking or in '<'
    for bounds in ((True, 2.0), (0.05, np.True_), (1.0,), (0.05, 2.0, 3.0), ("a", 2), 0.05):
        with pytest.raises(ValueError, match="bounds must be a pair"):
            fit_temperature(logits, labels, bounds=bounds)
    for bounds in ((0.0, 2.0), (2.0, 1.0), (0.05, math.inf), (math.nan, 2.0)):
        with pytest.raises(ValueError, match="0 < low < high < inf"):
            fit_temperature(logits, labels, bounds=bounds)
    assert fit_temperature(logits, labels, bounds=[np.float32(0.5), 3]) == fit_temperature(
        logits, labels, bounds=(0.5, 3.0))
    with pytest.raises(ValueError, match="confidences must lie in"):
        fit_isotonic(torch.tensor([0.5, math.nan]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="correct must be booleans"):
        fit_isotonic(torch.tensor([0.5, 0.6]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="knots must increase"):
        IsotonicMap((0.5, 0.4), (0.1, 0.2))
    # the map took NaN to NaN and 1.5 or -0.2 to its ends without a word
    g = fit_isotonic(torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64),
                     torch.tensor([False, True, True]))
    for bad in (math.nan, 1.5, -0.2, torch.tensor([0.4, math.nan]), np.array([[0.4], [1.5]])):
        with pytest.raises(ValueError, match="confidences must lie in"):
            g(bad)
    assert g(np.array([[0.0], [1.0]])).tolist() == [[0.0], [1.0]]
    with pytest.raises(ValueError, match="confidences must lie in"):
        confidence_ece(torch.tensor([1.5]), torch.tensor([True]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(logits, labels, n_bins=0)


# ---------------------------------------------------------------------------------------------
# Decisions from every exit's logits, sweeps, operating points


@pytest.mark.parametrize("policy", ["max-softmax", "entropy"])
@pytest.mark.parametrize("thresholds", [(0.11, 0.13, 0.2), (0.3, 1.0, 0.0), (1.0, 1.0, 1.0)])
def test_decisions_from_logits_equal_the_runner(exit18, policy, thresholds):
    x = images(40, seed=5, dtype=torch.float64)
    rule = ExitRule(policy, thresholds, (0.5, 2.0, 1.0, 1.5))
    with torch.no_grad():
        every = exit18(x)
    ran = exit18.run(x, rule)
    got = exit_result_from_logits(every, rule)
    assert torch.equal(got.exit_index, ran.exit_index)
    assert got.rows_per_stage == ran.rows_per_stage
    torch.testing.assert_close(got.logits, ran.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.confidence, ran.confidence, rtol=0, atol=0)


def _logits_with_scores(top):
    """Two-class logits whose max-softmax is ``top`` (each in (0.5, 1)) at one exit."""
    top = torch.as_tensor(top, dtype=torch.float64)
    return torch.stack([torch.log(top), torch.log1p(-top)], dim=1)


def test_sweep_and_operating_point_on_a_hand_made_case():
    # Four samples, two exits. Exit 0 scores .6/.7/.8/.95 and is right on samples 2 and 3
    # only; exit 1 is right on all. Costs: 10 MACs at exit 0, 100 at exit 1 (full 95).
    e0 = _logits_with_scores([0.6, 0.7, 0.8, 0.95])
    e0[:2] = e0[:2].flip(1)  # samples 0 and 1 predicted class 1 at exit 0
    e1 = _logits_with_scores([0.99] * 4)
    labels = torch.zeros(4, dtype=torch.int64)
    from qerror.nn.early_exit import ExitCosts

    costs = ExitCosts(("layer1", "fc"), (8, 95), (2, 1), (10, 98), 95)
    pts = threshold_sweep([e0, e1], labels, "max-softmax", [1.0, 0.75, 0.65, 0.5], costs)
    assert [p.exit_counts for p in pts] == [(0, 4), (2, 2), (3, 1), (4, 0)]
    assert [p.correct for p in pts] == [4, 4, 3, 2]
    assert [p.mean_macs for p in pts] == [98, (2 * 10 + 2 * 98) / 4, (3 * 10 + 98) / 4, 10]
    assert pts[0].macs_fraction == 98 / 95
    op = choose_operating_point(pts, reference=1.0, margin=0.0)
    assert op.met and op.point.threshold == 0.75  # the cheapest with accuracy 1
    op = choose_operating_point(pts, reference=1.0, margin=0.25)
    assert op.met and op.point.threshold == 0.65
    # nothing qualifies: the most accurate, then the cheapest of those
    op = choose_operating_point(pts[2:], reference=1.0, margin=0.0)
    assert not op.met and op.point.threshold == 0.65


def test_per_exit_thresholds_beat_a_shared_one_on_a_hand_made_case():
    # Exit 0 is confidently wrong on samples 0 and 1 (score .9) and right on 2 and 3 (.6);
    # exit 1 is right on all at .7; the last exit is right on all. A shared threshold must
    # stay above .9 to spare samples 0 and 1, so nobody leaves before the last (100 MACs);
    # per exit, exit 0 at 1.0 and exit 1 at .65 send everyone out at exit 1 (50 MACs).
    from qerror.nn.early_exit import ExitCosts

    e0 = _logits_with_scores([0.9, 0.9, 0.6, 0.6])
    e0[:2] = e0[:2].flip(1)
    e1 = _logits_with_scores([0.7] * 4)
    e2 = _logits_with_scores([0.99] * 4)
    labels = torch.zeros(4, dtype=torch.int64)
    costs = ExitCosts(("layer1", "layer2", "fc"), (8, 40, 95), (2, 2, 1), (10, 50, 100), 100)
    cands = [1.0, 0.95, 0.8, 0.65, 0.5]
    op = choose_operating_point(threshold_sweep([e0, e1, e2], labels, "max-softmax", cands,
                                                costs), 1.0, 0.0)
    assert op.met and op.point.mean_macs == 100 and op.point.threshold == 1.0
    start = ExitRule("max-softmax", (op.point.threshold,) * 2)
    got = refine_thresholds([e0, e1, e2], labels, start, cands, costs, 1.0, 0.0)
    assert got.rule.thresholds == (1.0, 0.65)  # on a tie (0.5 gives the same) the higher
    assert (got.correct, got.n, got.mean_macs, got.exit_counts) == (4, 4, 50.0, (0, 4, 0))
    assert got.met and got.macs_fraction == 0.5 and got.rounds == 2


def _four_exits(n: int, strengths):
    """Seeded labels of 5 classes and four exits' logits, noise + strength · one-hot(label)
    (a larger strength, a clearer signal), priced 10, 30, 60 and 100 MACs."""
    from qerror.nn.early_exit import ExitCosts

    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (n,), generator=gen)
    logits = [torch.randn(n, 5, generator=gen, dtype=torch.float64)
              + s * nn.functional.one_hot(labels, 5) for s in strengths]
    costs = ExitCosts(("a", "b", "c", "fc"), (1, 2, 3, 4), (1, 1, 1, 1), (10, 30, 60, 100),
                      100)
    return labels, logits, costs


@pytest.mark.parametrize("policy", ["max-softmax", "entropy"])
def test_refined_thresholds_decide_as_the_runner_and_never_lose_to_the_start(policy):
    labels, logits, costs = _four_exits(400, (0.5, 1.5, 3.0, 5.0))
    cands = [1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3]
    temps = (1.3, 1.1, 0.9, 1.0)
    pts = threshold_sweep(logits, labels, policy, cands, costs, temps)
    ref = float((logits[-1].argmax(1) == labels).double().mean())
    op = choose_operating_point(pts, ref, 0.01)
    start = ExitRule(policy, (op.point.threshold,) * 3, temps)
    got = refine_thresholds(logits, labels, start, cands, costs, ref, 0.01)
    res = exit_result_from_logits(logits, got.rule)
    assert got.correct == int((res.predictions == labels).sum())
    assert got.mean_macs == res.mean_macs(costs.macs)
    assert got.exit_counts == res.exit_counts()
    assert got.rule.temperatures == temps and got.rule.policy is ExitPolicy.parse(policy)
    assert got.met == op.met
    assert got.mean_macs <= op.point.mean_macs
    if got.mean_macs == op.point.mean_macs:
        assert got.correct >= op.point.correct


def test_refine_thresholds_inputs_are_checked():
    from qerror.nn.early_exit import ExitCosts

    z = _logits_with_scores([0.6, 0.9])
    costs = ExitCosts(("layer1", "fc"), (8, 95), (2, 1), (10, 98), 95)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="start has 2 thresholds but the logits have 1"):
        refine_thresholds([z, z], y, ExitRule("entropy", (0.5, 0.5)), [0.5], costs, 0.9, 0.0)
    with pytest.raises(ValueError, match="candidates is empty"):
        refine_thresholds([z, z], y, ExitRule("entropy", (0.5,)), [], costs, 0.9, 0.0)
    with pytest.raises(ValueError, match="must be a number in"):
        refine_thresholds([z, z], y, ExitRule("entropy", (0.5,)), [1.5], costs, 0.9, 0.0)
    with pytest.raises(ValueError, match="max_rounds"):
        refine_thresholds([z, z], y, ExitRule("entropy", (0.5,)), [0.5], costs, 0.9, 0.0,
                          max_rounds=0)


def test_exits_per_class_and_compare_exits():
    from qerror.nn.early_exit import ExitResult

    def result(exits, preds):
        exits = torch.tensor(exits)
        logits = nn.functional.one_hot(torch.tensor(preds), 3).double()
        rows = tuple(int((exits >= k).sum()) for k in range(3))
        return ExitResult(logits, exits, torch.ones(len(exits), dtype=torch.float64), rows)

    a = result([0, 1, 2, 2, 0], [0, 1, 2, 1, 0])
    b = result([0, 2, 1, 2, 0], [0, 1, 1, 1, 2])
    counts = exits_per_class(a, torch.tensor([0, 1, 1, 2, 0]), 3)
    assert counts.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 1]]
    agree = compare_exits(a, b)
    assert (agree.n, agree.same_exit, agree.same_prediction, agree.same_both) == (5, 3, 3, 2)
    assert (agree.earlier, agree.later) == (1, 1)
    assert agree.exit_matrix.tolist() == [[2, 0, 0], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="not class indices of the 3 classes"):
        exits_per_class(a, torch.tensor([0, 1, 1, 3, 0]), 3)


def test_sweep_inputs_are_checked():
    z = _logits_with_scores([0.6, 0.9])
    from qerror.nn.early_exit import ExitCosts

    costs = ExitCosts(("layer1", "fc"), (8, 95), (2, 1), (10, 98), 95)
    with pytest.raises(ValueError, match="must be a number in"):
        threshold_sweep([z, z], torch.tensor([0, 1]), "entropy", [1.5], costs)
    with pytest.raises(ValueError, match="price 2 exits"):
        threshold_sweep([z, z, z], torch.tensor([0, 1]), "entropy", [0.5], costs)
    with pytest.raises(ValueError, match="shape of logits"):
        exit_result_from_logits([z, z[:1]], ExitRule("entropy", (0.5,)))
    with pytest.raises(ValueError, match="points is empty"):
        choose_operating_point([], 0.9, 0.01)
    # a single number failed with "'float' object is not iterable", a string was read
    # character by character ("got '0'"), and an empty sweep returned nothing without a word
    y = torch.tensor([0, 1])
    for bad in (0.5, "0.5"):
        with pytest.raises(TypeError, match="thresholds must be a sequence of numbers"):
            threshold_sweep([z, z], y, "entropy", bad, costs)
        with pytest.raises(TypeError, match="candidates must be a sequence of numbers"):
            refine_thresholds([z, z], y, ExitRule("entropy", (0.5,)), bad, costs, 0.9, 0.0)
    with pytest.raises(ValueError, match="thresholds is empty"):
        threshold_sweep([z, z], y, "entropy", [], costs)
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be a number in"):
        threshold_sweep([z, z], y, "entropy", [0.5, math.nan], costs)
    assert threshold_sweep([z, z], y, "entropy", np.array([0.5, 0.7]), costs) == \
        threshold_sweep([z, z], y, "entropy", [0.5, 0.7], costs)


def _paired(n, only_candidate, only_reference, both=0):
    """Correctness vectors of a candidate and a reference on n samples with the given
    discordant counts (and ``both`` samples right by both)."""
    cand, ref = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    cand[:only_candidate] = True
    ref[only_candidate:only_candidate + only_reference] = True
    start = only_candidate + only_reference
    cand[start:start + both] = ref[start:start + both] = True
    return cand, ref


def test_qualifies_by_estimate_and_by_the_paired_test():
    # 1000 samples; the candidate loses 8 and gains 6 against the reference: -0.2 points.
    cand, ref = _paired(1000, 6, 8, both=800)
    assert qualifies(cand, ref, 0.005)                          # -0.2 >= -0.5 points
    assert qualifies(cand, float(ref.double().mean()), 0.005)   # the accuracy alone
    assert not qualifies(cand, ref, 0.001)
    # The paired test decides by the lower one-sided test of the TOST, nothing else.
    for margin in (0.005, 0.01, 0.02, 0.05):
        low = paired_accuracy_equivalence(6, 8, 1000, margin, 0.05).p_low
        assert qualifies(cand, ref, margin, alpha=0.05) == (low < 0.05)
    # With 14 discordant samples in 1000 the paired standard error is about 0.40 points, so
    # -0.2 is not shown above -0.5 (the estimate rule accepted it) but is above -1.
    assert not qualifies(cand, ref, 0.005, alpha=0.05)
    assert qualifies(cand, ref, 0.01, alpha=0.05)


def test_a_point_exactly_at_the_boundary_qualifies_by_estimate():
    # 300 of 10,000 right against 350: exactly the 0.005 margin below, which floating
    # point puts a hair above 0.03 (0.035 - 0.005 = 0.030000000000000002). Whole counts
    # decide, so it qualifies and one more loss does not.
    assert not 300 / 10_000 >= 350 / 10_000 - 0.005  # the rounding the rule must absorb
    cand, ref = _paired(10_000, 0, 50, both=300)
    assert qualifies(cand, ref, 0.005) and qualifies(cand, 0.035, 0.005)
    worse, _ = _paired(10_000, 0, 51, both=299)
    assert not qualifies(worse, ref, 0.005)
    # choose_operating_point takes the same comparison
    pts = [SweepPoint(ExitPolicy.MAX_SOFTMAX, 0.5, 300, 10_000, 1.0, 0.5, (10_000, 0))]
    assert choose_operating_point(pts, 0.035, 0.005).met
    assert clears(0.03, 0.035, 0.005) and not clears(0.0299, 0.035, 0.005)


def test_the_paired_test_only_ever_accepts_what_the_estimate_accepts():
    # At the same margin and alpha <= 0.11 (qualifies' Notes), a point the test accepts
    # has its estimate above the bar, so the paired rule's choice is never cheaper than the
    # estimate rule's. The hardest margin for a candidate behind the reference is one just
    # under its loss (the estimate rejects it): exhaustively, every n up to 60 and every
    # pair of discordant counts, the test rejects it too.
    for n in range(1, 61):
        for lost in range(1, n + 1):
            for gained in range(0, min(lost, n - lost + 1)):
                margin = (lost - gained) / n * (1 - 1e-9)
                low = paired_accuracy_equivalence(gained, lost, n, margin, 0.05).p_low
                assert low >= 0.05, (n, gained, lost)
    cand, ref = _paired(1000, 6, 8, both=800)
    for margin in (0.005, 0.02, 0.1):
        if qualifies(cand, ref, margin, alpha=0.05):
            assert qualifies(cand, ref, margin)
    # Above alpha ≈ 0.11 it fails: one loss in two samples passes the test at margin 0.48
    # (the pseudo-counts shrink the -0.5 estimate to -0.25) and fails the estimate.
    cand, ref = _paired(2, 0, 1)
    assert qualifies(cand, ref, 0.48, alpha=0.3) and not qualifies(cand, ref, 0.48)


def test_choose_and_refine_under_the_paired_test():
    # The last exit (the reference) is right on about 94 % of them, the others less often.
    labels, logits, costs = _four_exits(600, (1.0, 2.0, 2.5, 3.0))
    cands = [1.0] + [1 - k / 50 for k in range(1, 40)]
    ref = logits[-1].argmax(1) == labels
    pts = threshold_sweep(logits, labels, "max-softmax", cands, costs)
    assert all(torch.equal(p.right, exit_result_from_logits(
        logits, ExitRule("max-softmax", (p.threshold,) * 3)).predictions == labels)
        for p in pts)
    est = choose_operating_point(pts, ref, 0.02)
    test = choose_operating_point(pts, ref, 0.02, alpha=0.05)
    assert est.met and test.met and test.alpha == 0.05 and est.alpha is None
    # the estimate rule's choice equals the one from the accuracy alone
    assert est.point == choose_operating_point(pts, float(ref.double().mean()), 0.02).point
    # the paired rule keeps a distance: here it costs strictly more MACs than the estimate's
    assert test.point.mean_macs > est.point.mean_macs
    assert qualifies(test.point.right, ref, 0.02, alpha=0.05)
    cheaper = [p for p in pts if p.mean_macs < test.point.mean_macs]
    assert cheaper and not any(qualifies(p.right, ref, 0.02, alpha=0.05) for p in cheaper)
    start = ExitRule("max-softmax", (test.point.threshold,) * 3)
    got = refine_thresholds(logits, labels, start, cands, costs, ref, 0.02, alpha=0.05)
    res = exit_result_from_logits(logits, got.rule)
    assert got.met == qualifies(res.predictions == labels, ref, 0.02, alpha=0.05) is True
    assert got.mean_macs <= test.point.mean_macs



@pytest.mark.parametrize("per_exit", [False, True])
def test_select_rule_is_the_shared_choice_then_its_refinement(per_exit):
    labels, logits, costs = _four_exits(600, (1.0, 2.0, 2.5, 3.0))
    cands = [1.0] + [1 - k / 50 for k in range(1, 40)]
    ref = logits[-1].argmax(1) == labels
    temps = (1.2, 1.0, 0.9, 1.1)
    got = select_rule(logits, labels, SelectionProcedure("entropy", per_exit, 0.02), cands,
                      costs, ref, temperatures=temps, alpha=0.05)
    op = choose_operating_point(threshold_sweep(logits, labels, "entropy", cands, costs,
                                                temps), ref, 0.02, alpha=0.05)
    start = ExitRule("entropy", (op.point.threshold,) * 3, temps)
    if per_exit:
        assert got == refine_thresholds(logits, labels, start, cands, costs, ref, 0.02,
                                        alpha=0.05)
    else:
        assert got.rule == start and got.rounds == 0 and got.met == op.met
        assert (got.correct, got.mean_macs, got.exit_counts) == (
            op.point.correct, op.point.mean_macs, op.point.exit_counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logits_and_labels_of_a_gpu_network_give_the_cpus_decisions():
    """A GPU network's logits and labels, passed as they come: every decision function
    answers as on the CPU copies (it mixed the CPU's MAC counts and a reference's
    correctness with CUDA exits, a device mismatch). float64 logits: the CUDA and CPU
    scores agree to about 1e-16, far from any candidate threshold here."""
    labels, logits, costs = _four_exits(600, (1.0, 2.0, 2.5, 3.0))
    logits = [z.double() for z in logits]
    cands = [1.0] + [1 - k / 50 for k in range(1, 40)]
    ref = logits[-1].argmax(1) == labels
    proc = SelectionProcedure("entropy", True, 0.02)
    gpu = ([z.cuda() for z in logits], labels.cuda(), ref.cuda())

    def decide(z, y, r):
        temps = tuple(c.temperature for c in calibrate_exits(z, y))
        rule = select_rule(z, y, proc, cands, costs, r, temperatures=temps, alpha=0.05)
        sweep = threshold_sweep(z, y, "entropy", cands, costs, temps)
        res = exit_result_from_logits(z, rule.rule)
        return (temps, rule, [(p.correct, p.mean_macs, p.exit_counts) for p in sweep],
                res.exit_index.tolist(), fit_temperature(z[0], y))

    assert decide(*gpu) == decide(logits, labels, ref)


def test_cross_validation_scores_each_sample_by_a_rule_chosen_on_the_other_folds():
    """Against a loop over the folds written out here: the documented fold assignment, a
    temperature per exit fitted on each training part, each procedure run there and its
    rule applied to the held-out fold; pooled correctness, MACs and qualification."""
    labels, logits, costs = _four_exits(500, (1.0, 2.0, 2.5, 3.0))
    cands = [1.0] + [1 - k / 25 for k in range(1, 20)]
    ref = logits[-1].argmax(1) == labels
    procs = [SelectionProcedure(p, per, m) for p in ("max-softmax", "entropy")
             for per in (False, True) for m in (0.04, 0.01)]
    got = cross_validate_selection(logits, labels, procs, cands, costs, ref, 0.03,
                                   alpha=0.05, folds=4, seed=9)
    fold_of = torch.empty(500, dtype=torch.long)
    fold_of[torch.randperm(500, generator=torch.Generator().manual_seed(9))] = \
        torch.arange(500) % 4
    assert sorted(torch.bincount(fold_of).tolist()) == [125] * 4
    for proc, cv in zip(procs, got):
        right = torch.zeros(500, dtype=torch.bool)
        macs = torch.zeros(500, dtype=torch.float64)
        for f in range(4):
            seen, held = fold_of != f, fold_of == f
            part = [z[seen] for z in logits]
            temps = tuple(c.temperature for c in calibrate_exits(part, labels[seen]))
            rule = select_rule(part, labels[seen], proc, cands, costs, ref[seen],
                               temperatures=temps, alpha=0.05).rule
            res = exit_result_from_logits([z[held] for z in logits], rule)
            right[held] = res.predictions == labels[held]
            macs[held] = torch.tensor(costs.macs, dtype=torch.float64)[res.exit_index]
        assert cv.procedure == proc and torch.equal(cv.right, right)
        assert cv.mean_macs == pytest.approx(float(macs.mean()), rel=1e-15)
        assert cv.macs_fraction == pytest.approx(cv.mean_macs / 100, rel=1e-15)
        assert cv.met == qualifies(right, ref, 0.03, alpha=0.05)
        assert cv.qualifying_margin == 0.03
    # the procedures differ out of fold (a wider margin is cheaper here), so the
    # comparison above is not of one rule repeated
    assert len({cv.mean_macs for cv in got}) > 1


def test_planning_for_the_reporting_split_narrows_the_margin_by_its_standard_error():
    """With plan_n the bar is the margin less z_{1-alpha} standard errors of the paired
    difference on plan_n images: on plan_n = N that is the standard error of the TOST of
    the out-of-fold correctness itself; more images, a smaller se, a wider bar."""
    labels, logits, costs = _four_exits(500, (1.0, 2.0, 2.5, 3.0))
    cands = [1.0] + [1 - k / 25 for k in range(1, 20)]
    ref = logits[-1].argmax(1) == labels
    procs = [SelectionProcedure(p, per, 0.04) for p in ("max-softmax", "entropy")
             for per in (False, True)]
    kw = {"alpha": 0.05, "folds": 4, "seed": 9}
    plain = cross_validate_selection(logits, labels, procs, cands, costs, ref, 0.05, **kw)
    z = 1.6448536269514722
    for plan_n in (500, 40_000):
        got = cross_validate_selection(logits, labels, procs, cands, costs, ref, 0.05,
                                       plan_n=plan_n, **kw)
        for a, b in zip(plain, got):
            assert torch.equal(a.right, b.right) and a.mean_macs == b.mean_macs
            only_a, only_b = int((b.right & ~ref).sum()), int((ref & ~b.right).sum())
            se = paired_accuracy_equivalence(only_a, only_b, 500, 0.05, 0.05).se
            if plan_n == 500:
                assert b.qualifying_margin == pytest.approx(0.05 - z * se, rel=1e-12)
            else:
                assert 0.05 - z * se < b.qualifying_margin < 0.05
            assert b.met == (b.qualifying_margin > 0 and qualifies(
                b.right, ref, b.qualifying_margin, alpha=0.05))
            assert b.met <= a.met  # a narrower bar qualifies no procedure the margin does not
    assert any(a.met and not b.met for a, b in zip(plain, cross_validate_selection(
        logits, labels, procs, cands, costs, ref, 0.05, plan_n=500, **kw)))


def test_cross_validation_refuses_margin_zero_with_a_level():
    """The paired test needs a positive margin, as qualifies() says; at margin 0 with a
    level cross_validate_selection ran every fold and then called every procedure 'not
    met' without a word, whatever the data."""
    labels, logits, costs = _four_exits(60, (1.0, 2.0, 2.5, 3.0))
    ref = logits[-1].argmax(1) == labels
    procs = [SelectionProcedure("max-softmax", False, 0.05)]
    with pytest.raises(ValueError, match=r"margin must be above 0 with alpha"):
        cross_validate_selection(logits, labels, procs, [0.5, 1.0], costs, ref, 0.0,
                                 alpha=0.05, calibration=None)
    with pytest.raises(ValueError, match="margin must be in"):
        qualifies(ref, ref, 0.0, alpha=0.05)


def test_cross_validation_with_the_estimate_rule_at_margin_zero():
    # No level and margin 0: a procedure qualifies when its out-of-fold accuracy is at
    # least the reference's, as qualifies() says (it could not at all before).
    labels, logits, costs = _four_exits(300, (1.0, 2.0, 2.5, 3.0))
    cands = [1.0, 0.9, 0.5]
    ref = logits[-1].argmax(1) == labels
    procs = [SelectionProcedure("max-softmax", False, 0.0)]
    got = cross_validate_selection(logits, labels, procs, cands, costs, ref, 0.0, folds=3)
    assert got[0].met == qualifies(got[0].right, ref, 0.0)
    # never exiting early (threshold 1.0 is a candidate) matches the reference exactly
    assert got[0].met and got[0].accuracy >= float(ref.double().mean())


def test_cross_validation_inputs_are_checked():
    labels, logits, costs = _four_exits(20, (1.0, 2.0, 2.5, 3.0))
    ref = logits[-1].argmax(1) == labels
    procs = [SelectionProcedure("entropy", False, 0.01)]
    with pytest.raises(ValueError, match="folds must be an int >= 2, got 1"):
        cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01, folds=1)
    with pytest.raises(TypeError, match="folds must be an int >= 2, got 3.0"):
        cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01, folds=3.0)
    with pytest.raises(ValueError, match="folds must be an int from 2 to the 20 samples"):
        cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01, folds=21)
    with pytest.raises(ValueError, match="per-sample correctness"):
        cross_validate_selection(logits, labels, procs, [0.5], costs, 0.9, 0.01)
    with pytest.raises(ValueError, match="non-empty sequence of SelectionProcedure"):
        cross_validate_selection(logits, labels, [], [0.5], costs, ref, 0.01)
    with pytest.raises(ValueError, match=r"plan_n \(the images .*\) must be an int >= 1"):
        cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01, alpha=0.05,
                                 plan_n=0)
    with pytest.raises(ValueError, match="give alpha"):
        cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01, plan_n=100)
    with pytest.raises(ValueError, match="calibration must be one of"):
        cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01,
                                 calibration="mse")
    # int() made 0.5 seed 0 and True seed 1, and gave their folds without a word
    for seed, kind in ((0.5, TypeError), (True, TypeError), (2.0, TypeError), (-1, ValueError)):
        with pytest.raises(kind, match=r"seed must be an int from 0 to 2\*\*64 - 1"):
            cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01,
                                     seed=seed, calibration=None)
    by_numpy, by_int = (cross_validate_selection(logits, labels, procs, [0.5], costs, ref, 0.01,
                                                 seed=s, calibration=None)
                        for s in (np.int64(3), 3))
    assert torch.equal(by_numpy[0].right, by_int[0].right)
    with pytest.raises(ValueError, match="margin must be"):
        SelectionProcedure("entropy", False, 1.5)
    with pytest.raises(TypeError, match="per_exit must be True or False"):
        SelectionProcedure("entropy", "yes", 0.01)
    with pytest.raises(TypeError, match="procedure must be a SelectionProcedure"):
        select_rule(logits, labels, ("entropy", False, 0.01), [0.5], costs, ref)

def test_selection_inputs_are_checked():
    from qerror.nn.early_exit import ExitCosts

    z = _logits_with_scores([0.6, 0.9])
    y = torch.tensor([0, 1])
    costs = ExitCosts(("layer1", "fc"), (8, 95), (2, 1), (10, 98), 95)
    pts = threshold_sweep([z, z], y, "entropy", [0.5], costs)
    right = torch.tensor([True, False])
    with pytest.raises(ValueError, match="needs the reference's per-sample correctness"):
        qualifies(right, 0.5, 0.01, alpha=0.05)
    with pytest.raises(ValueError, match="needs the reference's per-sample correctness"):
        choose_operating_point(pts, 0.5, 0.01, alpha=0.05)
    with pytest.raises(ValueError, match="scores 3 samples but the points 2"):
        choose_operating_point(pts, torch.ones(3, dtype=torch.bool), 0.01)
    with pytest.raises(ValueError, match="1-D bool tensor"):
        qualifies(right, torch.ones(2), 0.01)
    with pytest.raises(ValueError, match="margin must be in"):
        qualifies(right, torch.ones(2, dtype=torch.bool), 0.0, alpha=0.05)
    bare = [dataclasses.replace(pts[0], right=None)]
    with pytest.raises(ValueError, match="SweepPoint.right"):
        choose_operating_point(bare, torch.ones(2, dtype=torch.bool), 0.01, alpha=0.05)
    with pytest.raises(TypeError, match=r"met \(whether the point qualifies\) must be True or False"):
        selection_order(0.9, 10.0, 0.85)  # a floor, as the old signature took


# --------------------------------------------------------------------------- exit_loss

def _independent_exit_loss(weights, outputs, labels, distill, temperature):
    """The Notes' formula written out sample by sample in float64."""
    z = [o.detach().double() for o in outputs]
    last = len(z) - 1
    total = 0.0
    for i, c in enumerate(labels.tolist()):
        p = torch.softmax(z[last][i] / temperature, 0)
        for k, w in enumerate(weights):
            ce = -torch.log_softmax(z[k][i], 0)[c]
            if k == last or distill == 0:
                total += w * ce
                continue
            q = torch.log_softmax(z[k][i] / temperature, 0)
            kl = (p * (p.log() - q)).sum() * temperature ** 2
            total += w * ((1 - distill) * ce + distill * kl)
    return float(total) / len(labels)


@pytest.mark.parametrize("distill, temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0),
                                                  (1.0, 4.0)])
def test_exit_loss_is_the_documented_weighted_sum(distill, temperature):
    gen = torch.Generator().manual_seed(3)
    outputs = [torch.randn(7, 5, generator=gen) * 3 for _ in range(4)]
    labels = torch.randint(0, 5, (7,), generator=gen)
    weights = [0.5, 1.0, 0.0, 2.0]
    got = exit_loss(weights, distill=distill, temperature=temperature)(outputs, labels)
    want = _independent_exit_loss(weights, outputs, labels, distill, temperature)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_exit_loss_teacher_gets_no_gradient_from_distillation():
    gen = torch.Generator().manual_seed(4)
    early = torch.randn(6, 3, generator=gen, requires_grad=True)
    last = torch.randn(6, 3, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (6,), generator=gen)
    exit_loss([1.0, 0.0], distill=1.0, temperature=2.0)([early, last], labels).backward()
    assert last.grad is None or not last.grad.any()
    assert early.grad.abs().sum() > 0
    # a student that already equals its teacher has nothing to learn from it
    same = last.detach().clone().requires_grad_(True)
    loss = exit_loss([1.0, 0.0], distill=1.0)([same, last.detach()], labels)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    assert same.grad.abs().max() < 1e-7


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": []}, "weights"), ({"weights": [1.0, -1.0]}, "weights"),
    ({"weights": [0.0, 0.0]}, "weights"), ({"weights": [1.0, float("nan")]}, "weights"),
    ({"weights": [1.0, 1.0], "distill": 1.5}, "distill"),
    ({"weights": [1.0, 1.0], "distill": True}, "distill"),
    ({"weights": [1.0, 1.0], "temperature": 0.0}, "temperature"),
    ({"weights": [1.0, 1.0], "temperature": float("inf")}, "temperature"),
    ({"weights": "12"}, "weights"), ({"weights": [True, 1.0]}, "weights"),
    ({"weights": [1.0, 1.0], "temperature": np.bool_(True)}, "temperature"),
])
def test_exit_loss_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exit_loss(**kwargs)


def test_exit_loss_takes_numpy_numbers():
    gen = torch.Generator().manual_seed(5)
    outputs = [torch.randn(4, 3, generator=gen) for _ in range(2)]
    labels = torch.randint(0, 3, (4,), generator=gen)
    got = exit_loss(np.array([1, 2]), distill=np.int64(1), temperature=np.int64(2))(
        outputs, labels)
    assert float(got) == pytest.approx(
        _independent_exit_loss([1, 2], outputs, labels, 1.0, 2.0), rel=1e-6)


def test_exit_loss_refuses_outputs_of_another_exit_count():
    loss = exit_loss([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="3 weights but the network gave 2 exits"):
        loss([torch.zeros(2, 3), torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long))


def test_the_model_keeps_the_input_shape_it_was_built_for():
    """A three-channel torchvision ResNet50 builds without being told its channels, and
    exit_costs counts at the shape the model was built for."""
    from torchvision.models import resnet50

    rgb = EarlyExitResNet(resnet50(num_classes=10))
    assert rgb.input_shape == (3, 32, 32)
    big = EarlyExitResNet(resnet50(num_classes=10), input_shape=(3, 224, 224))
    costs = exit_costs(big)
    assert costs.full_macs == exit_costs(big, (3, 224, 224)).full_macs
    assert costs.full_macs > 40 * exit_costs(rgb).full_macs  # 224² against 32² pixels


def test_results_of_consecutive_batches_concatenate_to_the_whole_run():
    gen = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(20, 4, generator=gen)
    stages = [lambda h: (h, h), lambda h: (h, h.flip(1)), lambda h: (h, -h)]
    rule = ExitRule("max-softmax", (0.8, 0.7))
    whole = run_early_exit(stages, logits, rule)
    parts = ExitResult.concat([run_early_exit(stages, logits[a:b], rule)
                               for a, b in ((0, 7), (7, 8), (8, 20))])
    for f in ("logits", "exit_index", "confidence"):
        assert torch.equal(getattr(parts, f), getattr(whole, f))
    assert parts.rows_per_stage == whole.rows_per_stage and whole.rows_per_stage[-1] < 20
    with pytest.raises(ValueError, match="same number of exits"):
        ExitResult.concat([whole, run_early_exit(stages[:2], logits, ExitRule("max-softmax",
                                                                              (0.8,)))])
    # results of networks with other classes: torch.cat's size error named neither
    with pytest.raises(ValueError, match=r"same classes; their logits have \[4, 3\] classes"):
        ExitResult.concat([whole, run_early_exit(stages, logits[:, :3], rule)])


def test_non_finite_logits_at_any_exit_are_refused():
    """A NaN or Inf at an early exit gave a NaN score that never exits (counts, MACs and
    the chosen rule silently off); only the last exit's were refused."""
    from qerror.nn.early_exit import ExitCosts

    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(6, 3, generator=g) for _ in range(3)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    costs = ExitCosts(("layer1", "layer2", "fc"), (8, 40, 95), (2, 2, 1), (10, 42, 98), 95)
    for bad in (float("nan"), float("inf")):
        z = [t.clone() for t in logits]
        z[0][2, 1] = bad
        with pytest.raises(ValueError, match=r"logits\[0\] hold NaN or Inf"):
            exit_result_from_logits(z, ExitRule("max-softmax", (0.0, 0.0)))
        with pytest.raises(ValueError, match=r"logits\[0\] hold NaN or Inf"):
            threshold_sweep(z, labels, "max-softmax", [0.0, 0.5], costs)
    # at threshold 0 every sample leaves at the first exit
    assert exit_result_from_logits(logits, ExitRule("max-softmax", (0.0, 0.0))).exit_index \
        .eq(0).all()


def test_exits_per_class_refuses_labels_that_are_not_class_indices():
    g = torch.Generator().manual_seed(4)
    result = exit_result_from_logits([torch.randn(4, 3, generator=g) for _ in range(2)],
                                     ExitRule("max-softmax", (0.5,)))
    for bad in (torch.tensor([0.0, 1.7, 2.9, 0.5]), torch.tensor([-0.5, 0.0, 1.0, 2.0]),
                torch.tensor([True, False, True, False])):
        with pytest.raises(TypeError, match="integer class indices"):
            exits_per_class(result, bad, 3)
    assert exits_per_class(result, torch.tensor([0, 1, 2, 0]), 3).sum() == 4


def test_stage_runner_refuses_nan_logits_as_the_logits_path_does():
    """A NaN score never clears a threshold: the runner once sent such a sample on to the
    last exit silently (counts, MACs and confidence off) where the logits path refuses."""
    good = torch.tensor([[4.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    bad = good.clone()
    bad[1, 0] = float("nan")

    def stage(logits):
        return lambda h: (h, logits[h[:, 0].long()])

    x = torch.arange(3.0).reshape(3, 1)
    rule = ExitRule("max-softmax", (0.0,))
    assert run_early_exit([stage(good), stage(good)], x, rule).exit_index.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="stage 0 gave NaN or Inf logits"):
        run_early_exit([stage(bad), stage(good)], x, rule)
    with pytest.raises(ValueError, match="NaN or Inf"):
        exit_result_from_logits([bad, good], rule)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_stage_runner_refuses_a_non_finite_input(value):
    """An INT8 stage quantizes NaN and Inf to ordinary codes and gives finite logits (a
    float stage gives NaN, refused above): the runner took such an input and exited it on
    whatever its codes gave. Stages that clamp their input as a quantizer does stand in."""
    def clamping(h):
        h = torch.nan_to_num(h, nan=0.0).clamp(-1.0, 1.0)
        return h, torch.cat([h, -h], dim=1)

    x = torch.zeros(3, 1)
    rule = ExitRule("max-softmax", (0.0,))
    assert run_early_exit([clamping, clamping], x, rule).exit_index.tolist() == [0, 0, 0]
    x[1, 0] = value
    with pytest.raises(ValueError, match="x holds NaN or Inf values"):
        run_early_exit([clamping, clamping], x, rule)


@pytest.mark.parametrize("dtype, temperature", [(torch.float16, 0.05), (torch.float32, 1e-300)])
def test_a_temperature_that_overflows_the_logits_dtype_is_refused(dtype, temperature):
    """Finite logits divided by a valid temperature overflowed the dtype (4000 / 0.05 > 65504
    in float16; 1e-300 rounds to 0 in float32): the NaN score never exited, and the most
    confident sample went on to the last exit without a word, on both paths."""
    z = torch.tensor([[4000.0, 0.0], [1.0, 0.0]], dtype=dtype)
    rule = ExitRule("max-softmax", (0.5,), (temperature, 1.0))
    for policy in ExitPolicy:
        with pytest.raises(ValueError, match=r"logits / temperature overflows"):
            exit_confidence(z, policy, temperature)
    with pytest.raises(ValueError, match=r"logits / temperature overflows"):
        run_early_exit([lambda h: (h, h), lambda h: (h, h)], z, rule)
    with pytest.raises(ValueError, match=r"logits / temperature overflows"):
        exit_result_from_logits([z, z], rule)
    with pytest.raises(ValueError, match="logits hold NaN or Inf"):
        exit_confidence(torch.tensor([[math.nan, 0.0]], dtype=dtype), "entropy")
    # a temperature the logits' dtype can take still decides as before
    assert exit_result_from_logits([z, z], dataclasses.replace(rule, temperatures=(1.0, 1.0))) \
        .exit_index.tolist() == [0, 0]


@pytest.mark.parametrize("out, match", [
    (lambda h: torch.zeros(len(h), 3), "stage 0 must return a pair"),
    (lambda h: (h, torch.zeros(len(h)), h), "stage 0 must return a pair"),
    (lambda h: (h, torch.zeros(len(h))), r"must give \(N, C\).*got torch.float32 \(3,\)"),
    (lambda h: (h, torch.zeros(len(h) - 1, 3)), r"ran 3 samples.*N = 3.*got .* \(2, 3\)"),
    (lambda h: (h, torch.zeros(len(h), 3, dtype=torch.long)), "floating-point logits"),
    (lambda h: (h[:1], torch.zeros(len(h), 3)), "its features have shape"),
])
def test_stage_runner_says_what_a_stage_gave_instead_of_features_and_logits(out, match):
    """A stage of the wrong shape once failed deep inside the runner (an IndexError, 'too
    many values to unpack', a broadcast or dtype error) that named neither the stage nor
    what it should have given."""
    x = torch.zeros(3, 1)
    good = (lambda h: (h, torch.zeros(len(h), 3)))
    with pytest.raises(ValueError, match=match):
        run_early_exit([out, good], x, ExitRule("max-softmax", (1.0,)))
    # the class count of a later exit against the earlier ones', nobody having left yet
    with pytest.raises(ValueError, match=r"stage 1 .*C = 3, as the earlier stages; got .*4\)"):
        run_early_exit([good, lambda h: (h, torch.zeros(len(h), 4))], x,
                       ExitRule("max-softmax", (1.0,)))
    assert run_early_exit([good, lambda h: [h, torch.zeros(len(h), 3)]], x,
                          ExitRule("max-softmax", (1.0,))).exit_index.tolist() == [1, 1, 1]


def test_mac_fractions_default_to_the_stems_channels():
    """A torchvision ResNet reads 3 channels: the default input follows its stem, as
    EarlyExitResNet's does (a 1-channel default failed inside a convolution)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    assert block_mac_fractions(model) == block_mac_fractions(model, (3, 32, 32))
    assert sdn_exit_points(model) == sdn_exit_points(model, input_shape=(3, 32, 32))
    with pytest.raises(TypeError, match="temperatures must be a sequence"):
        ExitRule("max-softmax", (0.5, 0.5), temperatures=2.0)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64),
                                    (torch.float16, torch.bfloat16)])
def test_stage_runner_takes_exits_of_different_dtypes_as_the_logits_path_does(dtypes):
    """A stage whose logits had another dtype than the first stage's (a float64 last exit
    after a float32 one) stopped the runner with torch's 'Index put requires the source and
    destination dtypes match'; the logits path stacks them in the promoted dtype."""
    first = torch.tensor([[2.0, 0.0], [0.25, 0.0], [0.0, 3.0]], dtype=dtypes[0])
    last = torch.tensor([[0.0, 1.0], [1.0 / 3.0, 0.0], [0.0, 1.0]], dtype=dtypes[1])
    stages = [lambda h: (h, first[h[:, 0].long()]), lambda h: (h, last[h[:, 0].long()])]
    x = torch.arange(3.0).reshape(3, 1)
    rule = ExitRule("max-softmax", (0.8,))
    got = run_early_exit(stages, x, rule)
    want = exit_result_from_logits([first, last], rule)
    wide = torch.promote_types(*dtypes)
    assert got.exit_index.tolist() == [0, 1, 0] and got.rows_per_stage == (3, 1)
    assert got.logits.dtype == wide
    assert torch.equal(got.logits, torch.stack([first[0].to(wide), last[1].to(wide),
                                                first[2].to(wide)]))
    for f in ("logits", "exit_index", "confidence"):
        assert torch.equal(getattr(got, f), getattr(want, f))


def test_calibration_refuses_logits_that_overflow_float64_instead_of_a_wrong_temperature():
    """Logits near float64's limit made logits / T, or a row's differences, overflow: the
    fit read NaN and stopped anywhere (0.493 for one right sample at 1e308, where the NLL
    falls to the bound 0.05; 0.1669 for 0.1258 with one row at 3e307; 19.99999 with bounds
    (1, 20) where 1 was due), and the ECE's NaN softmax was refused as 'not a confidence'."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=g)
    z = 0.08 * (3 * nn.functional.one_hot(y, 3).double()
                + 2 * torch.randn(400, 3, generator=g, dtype=torch.float64))
    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 4001))
    nll = [float(nn.functional.cross_entropy(z / t, y)) for t in grid]
    assert 0 < int(np.argmin(nll)) < 4000  # an interior minimum, near the lower bound
    assert fit_temperature(z, y) == pytest.approx(grid[int(np.argmin(nll))], rel=2e-3)
    z[0] = torch.tensor([3e307, -3e307, 0.0], dtype=torch.float64)  # 3e307 / 0.05 = inf
    y[0] = 0
    for objective in ("nll", "ece"):
        with pytest.raises(ValueError, match=r"logits reach 3e\+307: divided by the lower "
                                             r"bound T = 0.05 they overflow float64"):
            fit_temperature(z, y, objective=objective)
    one = torch.tensor([[1e308, -1e308]], dtype=torch.float64)
    with pytest.raises(ValueError, match="divided by the lower bound T = 0.05"):
        fit_temperature(one, torch.tensor([0]))
    with pytest.raises(ValueError, match="the differences of a row's logits overflow"):
        fit_temperature(one, torch.tensor([0]), bounds=(1.0, 20.0))
    assert fit_temperature(one / 10, torch.tensor([0]), bounds=(1.0, 20.0)) == 1.0
    with pytest.raises(ValueError, match=r"logits / temperature overflows float64 "
                                         r"\(temperature 1e-300"):
        expected_calibration_error(torch.tensor([[1e10, 0.0], [0.0, 1.0]]),
                                   torch.tensor([0, 1]), 1e-300)
    assert expected_calibration_error(one / 10, torch.tensor([0]), 0.5) == 0.0


def test_a_rule_takes_the_numpy_arrays_a_sweep_gives():
    """threshold_sweep takes numpy arrays of thresholds, ExitRule refused them ("got
    ndarray"): a one-dimensional array is taken as its items; other shapes are refused."""
    rule = ExitRule("max-softmax", np.array([0.5, 0.75]), temperatures=np.array([1.0, 2.0, 3.0]))
    assert rule == ExitRule("max-softmax", (0.5, 0.75), temperatures=(1.0, 2.0, 3.0))
    assert type(rule.thresholds) is tuple and type(rule.temperatures) is tuple
    assert all(type(t) is float for t in rule.thresholds + rule.temperatures)
    for bad, shape in ((np.array(0.5), "()"), (np.array([[0.5]]), "(1, 1)")):
        with pytest.raises(TypeError, match=re.escape(f"got ndarray of shape {shape}")):
            ExitRule("max-softmax", bad)
