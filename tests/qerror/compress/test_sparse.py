"""Pruning: exact sparsity, the gradual schedule, masks through fit, 2:4, structured
pruning against its masked equivalent, CSR layers against dense ones, bad input."""

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.utils.prune
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qerror.compress import (
    CSRConv2d,
    CSRLinear,
    GradualSchedule,
    MagnitudePruner,
    PruningError,
    SparseKernelError,
    apply_masks,
    channel_masks,
    channel_plan,
    is_two_four,
    mask_hook,
    prunable_weights,
    prune_channels,
    prune_global,
    semi_structured_masks,
    shrink_channels,
    sparsity_of,
    to_csr,
    to_semi_structured,
    zero_count,
)
from qerror.nn.training import Schedule, TrainConfig, fit, tensor_batches


def tiny_resnet(seed=0, dtype=torch.float32):
    """Stem, one bottleneck (width 8), one basic block, a classifier: 1×8×8 in, 10 out."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 32, 3, padding=1, bias=False))
    model.add_module("bn1", nn.BatchNorm2d(32))
    model.add_module("relu", nn.ReLU())
    model.add_module("layer1", nn.Sequential(Bottleneck(32, 8), BasicBlock(32, 32)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(32, 10))
    # Random BatchNorm statistics and affine parameters, so channels differ after BN.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.to(dtype)


def n_pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9, 0.95])
def test_global_pruning_reaches_the_exact_count(sparsity):
    model = tiny_resnet()
    n = sum(p.numel() for p in prunable_weights(model).values())
    masks = prune_global(model, sparsity)
    k = zero_count(sparsity, n)
    assert k == math.floor(sparsity * n + 0.5)
    assert n_pruned(masks) == k
    assert sparsity_of(model) == k / n
    # The first convolution stays dense by default; the fc is pruned with the rest.
    assert "conv1.weight" not in masks and "fc.weight" in masks
    assert (model.conv1.weight != 0).all()


def test_pruned_weights_are_the_smallest_with_ties_broken_by_position():
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 3.0, 1.0], [5.0, 1.0, 6.0, 7.0]]))
        model[1].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 9.0]]))
    # 12 weights, six of magnitude 1; a sparsity of 0.25 prunes 3: the first three ones.
    masks = prune_global(model, 0.25, keep_dense=())
    assert masks["0.weight"].tolist() == [[False, False, True, False], [True, True, True, True]]
    assert masks["1.weight"].all()
    again = prune_global(model, 0.25, keep_dense=(), apply=False)
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_keep_dense_choices():
    model = tiny_resnet()
    masks = prune_global(model, 0.5, keep_dense=("fc",))
    assert "conv1.weight" in masks and "fc.weight" not in masks
    assert (model.fc.weight != 0).all()


def test_gradual_schedule_endpoints_and_monotonicity():
    s = GradualSchedule(final=0.9, updates=10, interval=5, initial=0.1, start=20)
    assert s.end == 70
    assert s.sparsity(0) == s.sparsity(20) == pytest.approx(0.1)
    assert s.sparsity(70) == s.sparsity(1000) == 0.9
    values = [s.sparsity(t) for t in range(0, 100)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    # Zhu & Gupta's cubic at the midpoint: s_f + (s_i - s_f)/8.
    assert s.sparsity(45) == pytest.approx(0.9 - 0.8 / 8)
    assert [t for t in range(100) if s.is_update(t)] == list(range(20, 71, 5))


def test_gradual_schedule_is_exact_and_stays_within_its_endpoints():
    from fractions import Fraction

    # 0.9 + (0.1 - 0.9) is 0.09999999999999998 in floats, below s_i
    s = GradualSchedule(final=0.9, updates=6, interval=3, initial=0.1, start=2)
    assert s.sparsity(0) == s.sparsity(2) == 0.1 and s.sparsity(20) == 0.9
    assert s.exact_sparsity(2) == Fraction(0.1) and s.exact_sparsity(20) == Fraction(0.9)
    mid = Fraction(0.9) + (Fraction(0.1) - Fraction(0.9)) * Fraction(1, 8)
    assert s.exact_sparsity(11) == mid and s.sparsity(11) == float(mid)
    # 15 weights at s_i: ⌊0.1·15 + 1/2⌋ = 2 zeros (1 from the float formula)
    assert zero_count(s.exact_sparsity(2), 15) == 2
    # a Fraction is counted on its own value: 1/2 of 3 rounds half up to 2, and s·n of a
    # half-integer below a float's reach is not rounded first
    assert zero_count(Fraction(1, 2), 3) == 2
    assert zero_count(Fraction(1, 3), 3) == 1 and zero_count(1 / 3, 3) == 1
    assert zero_count(Fraction(1, 6), 3) == 1  # exactly 0.5 + 0.5
    assert GradualSchedule(final=0.5, updates=np.int64(2), interval=np.int32(1)).end == 2
    # numpy's floats are accepted and kept as the float they are (Fraction refused them at
    # the first pruning step)
    g = GradualSchedule(final=np.float32(0.5), updates=2, initial=np.float64(0.25))
    assert type(g.final) is float and g.final == 0.5 and g.initial == 0.25
    assert g.exact_sparsity(1) == Fraction(0.5) + Fraction(-0.25) * Fraction(1, 8)


def test_masks_survive_fit_steps():
    model = tiny_resnet()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.1, schedule=Schedule.CONSTANT)
    masks = prune_global(model, 0.75)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit(model, tensor_batches(x, y), 64, config, after_step=mask_hook(masks), progress=False)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        assert not torch.equal(params[name][mask], before[name][mask])  # the rest trained
    assert sparsity_of(model) == zero_count(0.75, sum(m.numel() for m in masks.values())) \
        / sum(m.numel() for m in masks.values())


def test_gradual_pruner_through_fit_reaches_the_final_sparsity():
    model = tiny_resnet()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    schedule = GradualSchedule(final=0.9, updates=3, interval=1, start=1)
    pruner = MagnitudePruner(schedule)
    seen = []

    def after_step(m):
        pruner(m)
        seen.append(sparsity_of(m))

    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, schedule=Schedule.CONSTANT)
    fit(model, tensor_batches(x, y), 96, config, after_step=after_step, progress=False)
    n = sum(p.numel() for p in prunable_weights(model).values())
    expected = [0.0] + [zero_count(schedule.exact_sparsity(t), n) / n for t in (2, 3, 4, 4, 4)]
    assert seen == pytest.approx(expected, abs=0)
    assert all(b >= a for a, b in zip(seen, seen[1:]))


def _pruning_run(state_path=None, pruner=None, stop=None, lr=0.2):
    model = tiny_resnet()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    schedule = GradualSchedule(final=0.9, updates=4, interval=3)
    pruner = pruner or MagnitudePruner(schedule)
    config = TrainConfig(epochs=3, batch_size=16, lr=lr, seed=0, schedule=Schedule.CONSTANT)
    fit(model, tensor_batches(x, y), 96, config, state_path=state_path, after_step=pruner,
        progress=False, stop_after_steps=stop)
    return model, pruner


def test_a_pruned_weight_stays_pruned_as_the_sparsity_grows():
    """At a high learning rate the update moves the pruned weights far from zero; the
    pruner zeroes them again before it chooses the next masks, so none comes back."""
    schedule = GradualSchedule(final=0.9, updates=4, interval=3)
    pruner, history = MagnitudePruner(schedule), []

    def hook(model):
        pruner(model)
        history.append({n: m.clone() for n, m in pruner.masks.items()})

    model = tiny_resnet()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    config = TrainConfig(epochs=3, batch_size=16, lr=3.0, seed=0, schedule=Schedule.CONSTANT)
    fit(model, tensor_batches(x, y), 96, config, after_step=hook, progress=False)
    revived = sum(int((~a[n] & b[n]).sum()) for a, b in zip(history, history[1:]) if a
                  for n in a)
    # masks at s_i = 0 after the first step, then the updates at steps 3, 6, 9 and 12
    assert len({int(sum((~m).sum() for m in h.values())) for h in history}) == 5
    assert revived == 0


def test_a_resumed_pruning_run_repeats_the_uninterrupted_one(tmp_path):
    whole, _ = _pruning_run()
    state = tmp_path / "state.pt"
    _pruning_run(state, stop=4)  # between two updates (3 and 6)
    resumed, pruner = _pruning_run(state)
    assert pruner.step == 18
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a pruner without the saved state, told the step, rebuilds the masks from the weights
    # after the next update: the run is close, not the same (documented)
    _pruning_run(state2 := tmp_path / "again.pt", stop=4)
    loaded = torch.load(state2, weights_only=True)
    del loaded["after_step"]
    torch.save(loaded, state2)
    approx, _ = _pruning_run(state2, pruner=MagnitudePruner(GradualSchedule(
        final=0.9, updates=4, interval=3), step=4))
    assert sparsity_of(approx) == sparsity_of(whole)


def test_a_state_with_a_pruner_refuses_to_resume_without_one(tmp_path):
    from qerror.nn.training import ResumeError

    state = tmp_path / "state.pt"
    _pruning_run(state, stop=4)
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.2, seed=0, schedule=Schedule.CONSTANT)
    for hook in (None, mask_hook({})):
        with pytest.raises(ResumeError, match="state of an after_step hook"):
            fit(model, tensor_batches(x, y), 96, config, state_path=state, after_step=hook,
                progress=False)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(PruningError, match="not a MagnitudePruner state"):
        MagnitudePruner(GradualSchedule(final=0.5, updates=1)).load_state_dict(
            {"step": 1, "masks": {"w": torch.ones(2)}})


def test_a_hook_state_the_hook_refuses_leaves_the_weights_and_says_resume(tmp_path):
    """The hook's state was loaded after the weights: a pruner refusing another hook's state
    raised its own PruningError with the caller's weights already replaced."""
    from qerror.nn.training import ResumeError

    class Counter:
        def __init__(self):
            self.k = 0

        def __call__(self, model):
            self.k += 1

        def state_dict(self):
            return {"k": self.k}

        def load_state_dict(self, state):
            self.k = state["k"]

    state = tmp_path / "state.pt"
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 1, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.2, seed=0, schedule=Schedule.CONSTANT)
    fit(tiny_resnet(), tensor_batches(x, y), 96, config, state_path=state, after_step=Counter(),
        stop_after_steps=4, progress=False)
    model = tiny_resnet(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ResumeError, match="hook's state this run's hook refuses") as err:
        fit(model, tensor_batches(x, y), 96, config, state_path=state, progress=False,
            after_step=MagnitudePruner(GradualSchedule(final=0.5, updates=1)))
    assert isinstance(err.value.__cause__, PruningError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_pruner_takes_one_dense_layer_by_name():
    model = tiny_resnet()
    pruner = MagnitudePruner(GradualSchedule(final=0.5, updates=1), keep_dense="fc")
    pruner(model)
    assert "fc.weight" not in pruner.masks and "conv1.weight" in pruner.masks


def test_two_four_keeps_the_two_largest_of_every_group():
    model = tiny_resnet()
    original = {k: p.detach().clone() for k, p in prunable_weights(model).items()}
    masks = semi_structured_masks(model)

    def groups(t):
        return (t.permute(0, 2, 3, 1) if t.dim() == 4 else t).reshape(-1, 4)

    for name, p in prunable_weights(model).items():
        kept, mags = groups(masks[name]), groups(original[name]).abs()
        assert (kept.sum(1) == 2).all()
        assert is_two_four(p) and n_pruned({name: masks[name]}) * 2 == p.numel()
        smallest_kept = mags.masked_fill(~kept, math.inf).min(1).values
        largest_pruned = mags.masked_fill(kept, -math.inf).max(1).values
        assert (smallest_kept >= largest_pruned).all()


def test_two_four_on_a_known_layer():
    lin = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -4.0, 3.0, 0.2, 1.0, 1.0, 1.0, -1.0]]))
    masks = semi_structured_masks(lin, keep_dense=())
    assert masks["weight"].tolist() == [[False, True, True, False, True, True, False, False]]


def test_two_four_refuses_an_input_width_not_multiple_of_four():
    model = tiny_resnet()
    with pytest.raises(PruningError, match="multiple of 4.*keep_dense"):
        semi_structured_masks(model, keep_dense=())


def test_two_four_kernels_are_cuda_only():
    lin = nn.Linear(64, 64)
    semi_structured_masks(lin, keep_dense=())
    if not torch.cuda.is_available():
        with pytest.raises(SparseKernelError, match="CUDA"):
            to_semi_structured(lin)
        # The claim in the module's docstring: torch's own conversion refuses CPU tensors.
        from torch.sparse import to_sparse_semi_structured
        with pytest.raises(RuntimeError, match="CUDA"):
            to_sparse_semi_structured(lin.weight.detach())
    with pytest.raises(SparseKernelError):
        to_semi_structured(lin, device="cpu")


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_structured_smaller_model_equals_the_masked_one(fraction):
    model = tiny_resnet(dtype=torch.float64).eval()
    plan = channel_plan(model, fraction)
    small = shrink_channels(model, plan)
    masked = tiny_resnet(dtype=torch.float64).eval()
    apply_masks(masked, channel_masks(masked, plan))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Float64, and the two differ only in adding exact zeros and the order of summation over
    # at most 32·9 = 288 terms per output: relative error of order 288·2⁻⁵³ ≈ 3e-14 per
    # layer, a few layers deep; 1e-12 leaves a margin.
    torch.testing.assert_close(small(x), masked(x), rtol=1e-12, atol=1e-12)
    block = small.layer1[0]
    width = 8 - zero_count(fraction, 8)
    assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == width
    assert block.conv3.in_channels == block.conv2.out_channels == width
    assert small.layer1[1].conv1.out_channels == 32 - zero_count(fraction, 32)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())


def test_prune_channels_keeps_the_largest_filters_and_leaves_the_model():
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = channel_plan(model, 0.5)
    norms = model.layer1[0].conv1.weight.abs().sum((1, 2, 3))
    assert set(plan["layer1.0.conv1"].tolist()) == set(norms.topk(4).indices.tolist())
    prune_channels(model, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shrinking_keeps_a_frozen_layer_frozen():
    """The sliced convolutions and BatchNorms were new modules whose parameters require grad:
    a layer the user had frozen came back trainable. Each keeps its own flags now."""
    model = tiny_resnet()
    block = model.layer1[0]
    for m in (block.conv1, block.bn1):
        m.requires_grad_(False)
    small = prune_channels(model, 0.5)
    got = small.layer1[0]
    assert got.conv1.weight.shape[0] < block.conv1.weight.shape[0]  # sliced, not kept
    assert not any(p.requires_grad for m in (got.conv1, got.bn1) for p in m.parameters())
    assert all(p.requires_grad for p in got.conv2.parameters())  # its next conv: trainable
    assert all(p.requires_grad for p in small.layer1[1].conv1.parameters())  # another block


def test_csr_linear_and_conv_equal_the_dense_masked_layers():
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(40, 12)
    prune_global(lin, 0.9, keep_dense=())
    x = torch.randn(5, 40, generator=gen)
    # Same products, summed in another order: float32 tolerance from the sum's length.
    torch.testing.assert_close(to_csr(lin)(x), lin(x), rtol=1e-5, atol=1e-6)
    assert isinstance(to_csr(lin), CSRLinear)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1)
    prune_global(conv, 0.75, keep_dense=())
    xc = torch.randn(2, 6, 9, 7, generator=gen)
    assert isinstance(to_csr(conv), CSRConv2d)
    torch.testing.assert_close(to_csr(conv)(xc), conv(xc), rtol=1e-5, atol=1e-6)
    model = tiny_resnet().eval()
    prune_global(model, 0.9)
    xm = torch.randn(4, 1, 8, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(to_csr(model)(xm), model(xm), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, np.bool_(True),
                                 np.float32(1.0), False, np.bool_(False)])
def test_sparsity_outside_the_unit_interval_is_refused(bad):
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        prune_global(model, bad)
    with pytest.raises(ValueError, match="sparsity"):
        channel_plan(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_numpy_sparsities_are_numbers_and_none_removes_every_weight():
    # numpy's floats are taken as the numbers they are
    a, b = nn.Linear(10, 1, bias=False), nn.Linear(10, 1, bias=False)
    b.load_state_dict(a.state_dict())
    assert torch.equal(prune_global(a, np.float32(0.5), keep_dense=())["weight"],
                       prune_global(b, 0.5, keep_dense=())["weight"])
    # a sparsity below 1 that rounds to every weight (0.96 of 10 is 9.6, rounded to 10) is
    # refused before the model is touched, with the largest sparsity that leaves one
    before = a.weight.detach().clone()
    with pytest.raises(PruningError, match="below 0.95"):
        prune_global(a, 0.96, keep_dense=())
    assert torch.equal(a.weight, before)
    assert int((prune_global(a, 0.94, keep_dense=())["weight"]).sum()) == 1


def test_a_channel_plan_naming_a_channel_twice_or_none_there_is_refused():
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kept, what in (([0, 0, 1], "named once"), ([0, 8], "lie in 0..7"), ([-1, 2], "0..7"),
                       ([0.9, 1.9, 2.2], "flat sequence of integers"),
                       ([[0, 1], [2, 3]], "flat sequence of integers"),
                       ([True, False], "flat sequence of integers")):
        with pytest.raises(PruningError, match=what):
            shrink_channels(model, {"layer1.0.conv1": torch.tensor(kept)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_to_csr_takes_one_name_as_a_string_and_refuses_unknown_names():
    model = tiny_resnet()
    prune_global(model, 0.5)
    kept = to_csr(model, keep_dense="conv1")
    assert isinstance(kept.conv1, nn.Conv2d) and not isinstance(kept.conv1, CSRConv2d)
    assert isinstance(kept.fc, CSRLinear)
    assert isinstance(to_csr(model).conv1, CSRConv2d)  # default: none kept dense
    with pytest.raises(PruningError, match=r"keep_dense names \['nope'\]"):
        to_csr(model, keep_dense=["conv1", "nope"])


@pytest.mark.parametrize("shape", [(2, 6), (3, 3), (4,), (2, 4, 3)])
def test_is_two_four_refuses_weights_without_groups_of_four(shape):
    with pytest.raises(PruningError, match="no groups of 4"):
        is_two_four(torch.zeros(shape))
    assert is_two_four(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    assert not is_two_four(torch.tensor([[1.0, 3.0, 2.0, 0.0]]))


def test_a_weight_two_layers_share_is_pruned_once():
    # b.weight is a.weight: 16 distinct weights, so a quarter of them is 4 zeros, under the
    # first layer's name (the model's own for the tensor); it was counted twice (8 zeros of
    # a 32-weight pool, or a mask naming no parameter)
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    with torch.no_grad():
        a.weight.copy_(torch.arange(16.0).reshape(4, 4) - 7.5)
    model = nn.Sequential(a, b)
    assert list(prunable_weights(model, keep_dense=())) == ["0.weight"]
    masks = prune_global(model, 0.25, keep_dense=())
    assert list(masks) == ["0.weight"] and int((~masks["0.weight"]).sum()) == 4
    assert int((a.weight == 0).sum()) == 4 and sparsity_of(model, keep_dense=()) == 0.25
    c = nn.Linear(8, 4, bias=False)
    tied = nn.Sequential(c, nn.Linear(8, 4, bias=False))
    tied[1].weight = c.weight
    assert list(semi_structured_masks(tied, keep_dense=())) == ["0.weight"]
    with pytest.raises(PruningError, match="share one weight tensor"):
        prune_global(model, 0.25, keep_dense=("1",))


def test_a_weight_tied_to_an_embedding_is_named_as_the_model_names_it():
    # an output layer tied to an input embedding: the tensor's name is the embedding's
    # (named_parameters'), and the masks name it so (they named the Linear's, no parameter)
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.hidden = nn.Linear(4, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    assert list(prunable_weights(model, keep_dense=())) == ["hidden.weight", "emb.weight"]
    masks = prune_global(model, 0.5, keep_dense=())
    assert set(masks) == {"hidden.weight", "emb.weight"}
    assert int((model.emb.weight == 0).sum()) + int((model.hidden.weight == 0).sum()) == 20
    pruner = MagnitudePruner(GradualSchedule(final=0.5, updates=1), keep_dense=())
    pruner(model)
    assert set(pruner.masks) == {"hidden.weight", "emb.weight"}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch's, on Linear(0, 3)
def test_an_empty_layer_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(0, 3))
    for call in (lambda: prune_global(model, 0.5, keep_dense=()),
                 lambda: sparsity_of(model, keep_dense=())):
        with pytest.raises(PruningError, match="layer '1' has no weights"):
            call()


def test_two_four_refuses_nan_weights():
    layer = nn.Linear(8, 2)
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")
    with pytest.raises(PruningError, match="NaN"):
        semi_structured_masks(layer, keep_dense=())


def test_csr_layers_take_what_the_dense_layers_take():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    prune_global(conv, 0.5, keep_dense=())
    x = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(5))  # unbatched
    torch.testing.assert_close(to_csr(conv)(x), conv(x), rtol=1e-5, atol=1e-6)
    lin = nn.Linear(13, 4)
    empty = torch.zeros(0, 13)
    assert to_csr(lin)(empty).shape == lin(empty).shape == (0, 4)


def test_models_without_prunable_layers_are_refused():
    with pytest.raises(PruningError, match="no Conv2d or Linear"):
        prune_global(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 0.5)
    with pytest.raises(PruningError, match="every prunable layer is kept dense"):
        prune_global(nn.Conv2d(1, 2, 3), 0.5)
    with pytest.raises(PruningError, match="not Conv2d or Linear"):
        prune_global(tiny_resnet(), 0.5, keep_dense=("nope",))
    with pytest.raises(PruningError, match="BasicBlock or Bottleneck"):
        channel_plan(nn.Sequential(nn.Conv2d(1, 2, 3)), 0.5)
    with pytest.raises(PruningError, match="names no parameter"):
        apply_masks(nn.Linear(2, 2), {"nope": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="GradualSchedule.updates"):
        GradualSchedule(final=0.5, updates=0)
    with pytest.raises(ValueError, match="exceeds final"):
        GradualSchedule(final=0.5, updates=2, initial=0.6)


def test_global_pruning_refuses_nan_weights_and_leaves_the_model():
    # without the check, kthvalue ranked the NaN as the largest magnitude: it was kept, and
    # the pruned model still carried it
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")
    before = layer.weight.detach().clone()
    with pytest.raises(PruningError, match="the model has NaN weights; magnitude pruning "
                                           "cannot order them"):
        prune_global(layer, 0.5, keep_dense=())
    assert torch.equal(layer.weight.isnan(), before.isnan())
    assert torch.equal(layer.weight.nan_to_num(), before.nan_to_num())



def test_a_channel_plan_refuses_nan_weights_and_leaves_the_model():
    # without the check the filter's L1 norm was NaN, which torch's sort ranks above every
    # number: the broken filter was kept (channel 5 of 8 at fraction 0.5) and the smaller
    # network put out NaN
    model = tiny_resnet()
    with torch.no_grad():
        model.layer1[0].conv1.weight[5, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: channel_plan(model, 0.5), lambda: prune_channels(model, 0.5)):
        with pytest.raises(PruningError, match=r"layer1\.0\.conv1 has NaN weights \(filter "
                                               r"5\); ranking its filters by L1 norm cannot "
                                               r"order them"):
            call()
    after = model.state_dict()
    assert all(torch.equal(v.nan_to_num(), after[k].nan_to_num()) for k, v in before.items())

def test_a_mask_of_another_shape_is_refused_even_where_it_broadcasts():
    # a (4,) mask broadcasts over a (2, 4) weight: without the check it zeroed columns 1
    # and 3 of every row
    layer = nn.Linear(4, 2, bias=False)
    before = layer.weight.detach().clone()
    with pytest.raises(PruningError, match=r"mask 'weight' has shape \(4,\), the parameter "
                                           r"\(2, 4\)"):
        apply_masks(layer, {"weight": torch.tensor([True, False, True, False])})
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("conv", [nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                                  nn.Conv2d(2, 3, 3, padding="same"),
                                  nn.Conv2d(2, 4, 3, padding=1, groups=2)],
                         ids=["reflect", "same", "groups"])
def test_csr_conv_refuses_what_its_unfold_would_compute_otherwise(conv):
    # unfold pads with zeros: a reflect-padded convolution came out of CSRConv2d with its
    # border outputs wrong (by 0.75 on a random 5x5 input) and no word
    with pytest.raises(PruningError, match="CSRConv2d supports groups=1, zero padding given "
                                           "as numbers"):
        to_csr(conv)


def test_channel_plans_keep_one_channel_and_shrink_only_inner_convolutions():
    model = tiny_resnet()
    # 0.99 of 8 rounds to all 8: each inner convolution keeps its largest filter
    plan = channel_plan(model, 0.99)
    assert {k: len(v) for k, v in plan.items()} == {
        "layer1.0.conv1": 1, "layer1.0.conv2": 1, "layer1.1.conv1": 1}
    assert prune_channels(model, 0.99).layer1[0].conv1.out_channels == 1
    with pytest.raises(PruningError, match="'layer1.1.conv2' is not an inner convolution"):
        shrink_channels(model, {"layer1.1.conv2": torch.tensor([0, 1])})
    with pytest.raises(PruningError, match="the plan keeps no channel of layer1.0.conv1"):
        shrink_channels(model, {"layer1.0.conv1": torch.tensor([], dtype=torch.long)})


def test_a_pruner_resumed_without_its_state_prunes_from_its_first_step():
    # resumed between two updates (every 10 steps), it rebuilds the masks of the last one
    # at once; without that it pruned nothing until the next update
    schedule = GradualSchedule(final=0.5, initial=0.5, updates=2, interval=10)
    model = nn.Linear(10, 10, bias=False)
    pruner = MagnitudePruner(schedule, keep_dense=(), step=5)
    pruner(model)
    assert pruner.step == 6 and not schedule.is_update(6)
    assert int((model.weight == 0).sum()) == zero_count(schedule.exact_sparsity(0), 100) == 50


def test_one_weight_to_prune_is_the_smallest_and_the_first_of_equals():
    # 8 weights at sparsity 1/8: ⌊1 + 1/2⌋ = 1 zero, the smallest magnitude; 0.1 twice, so
    # the earlier of the two
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 2.0, -0.1, 3.0], [4.0, 0.1, -6.0, 7.0]]))
    assert zero_count(0.125, 8) == 1
    masks = prune_global(layer, 0.125, keep_dense=())
    assert masks["weight"].tolist() == [[True, True, False, True], [True, True, True, True]]
    assert int((layer.weight == 0).sum()) == 1 and layer.weight[1, 1] == 0.1


def test_a_schedule_without_a_step_between_updates_or_before_step_zero_is_refused():
    # interval 0 would make every update the same step (is_update divides by it), a start
    # below 0 an update before the first optimizer step
    with pytest.raises(ValueError, match="GradualSchedule.interval must be an int >= 1, got 0"):
        GradualSchedule(final=0.5, updates=2, interval=0)
    with pytest.raises(ValueError, match="GradualSchedule.start must be an int >= 0, got -1"):
        GradualSchedule(final=0.5, updates=2, start=-1)


@pytest.mark.parametrize("step, error", [(12.9, TypeError), (20.0, TypeError),
                                         (True, TypeError), ("12", TypeError),
                                         (-3, ValueError)])
def test_a_schedule_s_step_is_a_count(step, error):
    # int() truncated 12.9 to 12 (s_t of step 12), read True as step 1 and "12" as 12;
    # a step below 0 came back as s_i: now check_count's refusals
    s = GradualSchedule(final=0.5, updates=4, interval=5, start=10)
    for method in (s.exact_sparsity, s.is_update, s.sparsity):
        with pytest.raises(error, match=f"GradualSchedule step must be an int >= 0, got "
                                        f"{re.escape(repr(step))}"):
            method(step)


def test_a_schedule_takes_numpy_integer_steps():
    s = GradualSchedule(final=0.5, updates=4, interval=5, start=10)
    for step in range(30):
        assert s.exact_sparsity(np.int64(step)) == s.exact_sparsity(step)
        assert s.is_update(np.uint16(step)) is s.is_update(step)
    assert [t for t in range(31) if s.is_update(t)] == [10, 15, 20, 25, 30]


def test_a_pruner_resumed_between_updates_rebuilds_the_last_update_s_masks():
    # updates at 0, 10, 20; resumed at step 15, the first call is step 16, between the
    # updates at 10 and 20: the masks are those of step 10's sparsity,
    # 1/2 + (1/4 - 1/2)(1 - 1/2)³ = 0.46875, 47 of 100 weights (step 16's would be 50)
    schedule = GradualSchedule(final=0.5, initial=0.25, updates=2, interval=10)
    assert zero_count(schedule.exact_sparsity(10), 100) == 47
    assert zero_count(schedule.exact_sparsity(16), 100) == 50
    model = nn.Linear(10, 10, bias=False)
    pruner = MagnitudePruner(schedule, keep_dense=(), step=15)
    pruner(model)
    assert int((model.weight == 0).sum()) == 47


def test_a_pruner_state_with_a_negative_step_is_refused():
    pruner = MagnitudePruner(GradualSchedule(final=0.5, updates=1))
    with pytest.raises(PruningError, match="not a MagnitudePruner state"):
        pruner.load_state_dict({"step": -1, "masks": {}})
    assert pruner.step == 0


def _set_filter_norms(conv, norms):
    # every entry of filter c is ±norms[c]/k (k entries per filter, a power of two here, so
    # exact): its L1 norm is norms[c]; the signs alternate so that a signed sum would differ
    k = conv.weight[0].numel()
    signs = torch.tensor([(-1.0) ** j for j in range(k)]).reshape(conv.weight[0].shape)
    with torch.no_grad():
        for c, v in enumerate(norms):
            conv.weight[c] = signs * (v / k)


def test_a_channel_plan_breaks_ties_toward_the_lower_index_and_lists_channels_in_order():
    model = tiny_resnet()
    # bottleneck conv1 (8 filters of 32 entries): keep 4 of norms [1, 3, 2, 3, 2, 1, 2, 0]:
    # the two 3s (channels 1, 3), then two of the three 2s (2, 4, 6): the lower, 2 and 4
    _set_filter_norms(model.layer1[0].conv1, [1.0, 3.0, 2.0, 3.0, 2.0, 1.0, 2.0, 0.0])
    # basic block conv1 (32 filters of 288 entries, not a power of two: equal anyway, as
    # every filter is the same tensor): all equal, keep the first 16
    with torch.no_grad():
        model.layer1[1].conv1.weight.copy_(model.layer1[1].conv1.weight[:1].expand(32, -1, -1, -1))
    plan = channel_plan(model, 0.5)
    assert plan["layer1.0.conv1"].tolist() == [1, 2, 3, 4]
    assert plan["layer1.1.conv1"].tolist() == list(range(16))
    for kept in plan.values():
        assert kept.dtype == torch.int64 and torch.equal(kept, kept.sort().values)


@pytest.mark.parametrize("dtype, small, large", [
    # bfloat16 (8 significant bits): 256 and 257 are both 256 once the sum is rounded to it
    (torch.bfloat16, [128.0, 64.0, 32.0, 32.0], [128.0, 64.0, 32.0, 33.0]),
    # float16: both sums overflow to an infinity
    (torch.float16, [40000.0, 40000.0, 0.0, 0.0], [40000.0, 40000.0, 1.0, 0.0])])
def test_a_channel_plan_ranks_low_precision_filters_by_their_exact_l1_norm(dtype, small, large):
    # a Bottleneck(4, 2): conv1 holds 2 filters of 4 entries; the plan keeps one of them,
    # the larger in L1 (257 > 256, 80001 > 80000), which a sum in the weights' dtype ties
    block = Bottleneck(4, 2).to(dtype)
    with torch.no_grad():
        block.conv1.weight.copy_(torch.tensor([small, large]).reshape(2, 4, 1, 1))
    assert channel_plan(block, 0.5)["conv1"].tolist() == [1]


def test_channel_masks_zero_the_filters_batchnorm_and_next_inputs_of_exactly_the_removed():
    model = tiny_resnet()
    plan = channel_plan(model, 0.5)
    masks = channel_masks(model, plan)
    k1, k2, kb = (set(plan[c].tolist()) for c in ("layer1.0.conv1", "layer1.0.conv2",
                                                   "layer1.1.conv1"))
    # entry (o, i, ...) of each weight is kept where its output channel (o) survives the
    # plan of that convolution and its input channel (i) the plan of the one before
    expect = {"layer1.0.conv1.weight": (k1, None), "layer1.0.conv2.weight": (k2, k1),
              "layer1.0.conv3.weight": (None, k2), "layer1.1.conv1.weight": (kb, None),
              "layer1.1.conv2.weight": (None, kb)}
    params = dict(model.named_parameters())
    for name, (outs, ins) in expect.items():
        o, i = params[name].shape[:2]
        want = torch.tensor([[(outs is None or a in outs) and (ins is None or b in ins)
                              for b in range(i)] for a in range(o)])
        assert torch.equal(masks[name], want[:, :, None, None].expand_as(params[name])), name
    for bn, kept in (("layer1.0.bn1", k1), ("layer1.0.bn2", k2), ("layer1.1.bn1", kb)):
        want = torch.tensor([c in kept for c in range(params[f"{bn}.weight"].numel())])
        assert torch.equal(masks[f"{bn}.weight"], want), bn
        assert torch.equal(masks[f"{bn}.bias"], want), bn
    assert set(masks) == set(expect) | {f"{bn}.{p}" for bn in ("layer1.0.bn1", "layer1.0.bn2",
                                                               "layer1.1.bn1")
                                        for p in ("weight", "bias")}
    # the removed channels put out exactly 0 after their BatchNorm, in training mode too
    apply_masks(model, masks)
    seen = {}
    model.layer1[0].bn1.register_forward_hook(lambda m, i, out: seen.update(bn1=out))
    model.train()(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    removed = sorted(set(range(8)) - k1)
    assert (seen["bn1"][:, removed] == 0).all()


def test_shrinking_keeps_the_planned_biases_and_a_cumulative_batchnorm_s_count():
    # inner convolutions with a bias (torchvision's have none) and BatchNorm averaging over
    # all batches (momentum None, after 3 batches): the smaller model must equal the masked
    # one in eval mode, and one training step must move its running mean as the masked
    # model's kept channels move (weight 1/4 for the 4th batch)
    def model():
        m = tiny_resnet(dtype=torch.float64)
        blk = m.layer1[0]
        torch.manual_seed(1)
        blk.conv1 = nn.Conv2d(32, 8, 1, bias=True, dtype=torch.float64)
        blk.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True, dtype=torch.float64)
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            bn.momentum = None
            bn.num_batches_tracked.fill_(3)
        return m.eval()

    big = model()
    plan = channel_plan(big, 0.5)
    small = shrink_channels(big, plan)
    masked = model()
    apply_masks(masked, channel_masks(masked, plan))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        # float64, as test_structured_smaller_model_equals_the_masked_one
        torch.testing.assert_close(small(x), masked(x), rtol=1e-12, atol=1e-12)
        small.train()(x)
        masked.train()(x)
    for conv, bn in (("layer1.0.conv1", "layer1.0.bn1"), ("layer1.0.conv2", "layer1.0.bn2")):
        got, want = small.get_submodule(bn), masked.get_submodule(bn)
        assert int(got.num_batches_tracked) == 4
        torch.testing.assert_close(got.running_mean, want.running_mean[plan[conv]],
                                   rtol=1e-12, atol=1e-12)


def test_a_pruner_told_a_step_that_is_no_count_refuses_it():
    # the constructor truncated 2.7 to 2, took True as 1 and "3" as 3, and a step of -1
    # made the first call step 0, an update before any optimizer step (25 zeros of 100)
    schedule = GradualSchedule(final=0.5, updates=2, interval=10)
    for bad in (2.7, True, "3"):
        with pytest.raises(TypeError, match="MagnitudePruner.step must be an int >= 0"):
            MagnitudePruner(schedule, step=bad)
    with pytest.raises(ValueError, match="MagnitudePruner.step must be an int >= 0, got -1"):
        MagnitudePruner(schedule, step=-1)
    assert MagnitudePruner(schedule, step=np.int64(4)).step == 4


def test_channel_pruning_refuses_layers_that_share_weights_and_takes_a_block_used_twice():
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    # a tied tensor: slicing each layer on its own would untie it (probe: a ResNet18 whose
    # layer1.1 convolutions were tied to layer1.0's grew from 44,470,056 to 44,764,968
    # bytes when "pruned" at fraction 0)
    tied = tiny_resnet()
    tied.layer1[1].conv2.weight = tied.layer1[1].conv1.weight
    # one layer attached in two places (the basic block's second convolution, which
    # channel pruning of its first slices along the inputs)
    attached = tiny_resnet()
    attached.extra = attached.layer1[1].conv2
    for model in (tied, attached):
        name = "layer1.1.conv1"
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for call in (lambda: prune_channels(model, 0.5), lambda: channel_plan(model, 0.5),
                     lambda: shrink_channels(model, {name: torch.tensor([0])}),
                     lambda: channel_masks(model, {name: torch.tensor([0])})):
            with pytest.raises(PruningError, match="shares its weights with another layer"):
                call()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # one block attached twice shrinks as one: the copy equals the masked model
    block = Bottleneck(32, 8)
    twice = tiny_resnet()
    twice.layer1 = nn.Sequential(block, block)
    twice.eval()
    plan = channel_plan(twice, 0.5)
    small = shrink_channels(twice, plan)
    assert small.layer1[0] is small.layer1[1] and small.layer1[0].conv1.out_channels == 4
    masked = copy.deepcopy(twice)
    apply_masks(masked, channel_masks(masked, plan))
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_channel_masks_and_shrinking_read_a_plan_alike():
    # probe before the fix: channel_masks took [-1] (and masked the last channel) and
    # [[1, 2]], and fell on a bare IndexError, KeyError or AttributeError for the other
    # plans here; shrink_channels on a scalar raised a bare TypeError (len() of a 0-d tensor)
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for plan, what in (({"layer1.0.conv1": torch.tensor(3)}, "flat sequence of integers"),
                       ({"layer1.0.conv1": 3}, "flat sequence of integers"),
                       ({"layer1.0.conv1": ["a"]}, "flat sequence of integers"),
                       ({"layer1.0.conv1": torch.tensor([[1, 2]])}, "flat sequence of integers"),
                       ({"layer1.0.conv1": torch.tensor([1.0])}, "flat sequence of integers"),
                       ({"layer1.0.conv1": torch.tensor([-1])}, "lie in 0..7"),
                       ({"layer1.0.conv1": torch.tensor([8])}, "lie in 0..7"),
                       ({"layer1.0.conv1": [1, 1]}, "named once"),
                       ({"layer1.0.conv1": []}, "keeps no channel"),
                       ({"layer1.0.conv3": torch.tensor([1])}, "not an inner convolution")):
        for build in (shrink_channels, channel_masks):
            with pytest.raises(PruningError, match=what):
                build(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a plan of lists or numpy arrays is read the same by both
    plan = {"layer1.0.conv1": [5, 1], "layer1.1.conv1": np.arange(0, 32, 3)}
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    small = shrink_channels(model.eval(), plan)
    masked = copy.deepcopy(model)
    apply_masks(masked, channel_masks(masked, plan))
    assert small.layer1[0].conv1.out_channels == 2 and small.layer1[1].conv1.out_channels == 11
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_a_weight_the_first_convolution_shares_is_refused_naming_the_default():
    # probe before the fix: "keep_dense names one of them" though no keep_dense was passed
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    model[1].weight = model[0].weight
    default = ("layers '0' and '1' share one weight tensor, and the default keep_dense keeps "
               "the first convolution, '0', dense: pass keep_dense naming both or neither")
    for prune in (lambda **kw: prune_global(model, 0.5, **kw),
                  lambda **kw: semi_structured_masks(model, **kw)):
        with pytest.raises(PruningError, match=re.escape(default)):
            prune()
        with pytest.raises(PruningError, match="and keep_dense names '1': pass keep_dense"):
            prune(keep_dense=("1",))
    assert list(prune_global(model, 0.5, keep_dense=())) == ["0.weight"]


@pytest.mark.parametrize("norm", [lambda c: nn.BatchNorm2d(c, affine=False),
                                  lambda c: nn.GroupNorm(2, c), lambda c: nn.Identity()],
                         ids=["batchnorm-without-affine", "groupnorm", "identity"])
def test_channel_pruning_refuses_blocks_normalized_otherwise_than_by_affine_batchnorm(norm):
    # probe before the fix: a bare AttributeError from slicing ('NoneType' object has no
    # attribute 'device'; 'GroupNorm' object has no attribute 'momentum'; 'Identity' ...
    # 'eps'), for blocks that torchvision builds with its norm_layer argument
    model = tiny_resnet()
    model.layer1 = nn.Sequential(Bottleneck(32, 8, norm_layer=norm))
    plan = {"layer1.0.conv1": torch.tensor([0, 1])}
    for call in (lambda: channel_plan(model, 0.5), lambda: prune_channels(model, 0.5),
                 lambda: shrink_channels(model, plan), lambda: channel_masks(model, plan)):
        with pytest.raises(PruningError, match=r"layer1\.0\.bn1 is .*cannot be pruned by channel"):
            call()
    # batch statistics alone (no running ones) are a BatchNorm2d with affine parameters
    model.layer1 = nn.Sequential(Bottleneck(
        32, 8, norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False)))
    small = prune_channels(model.eval(), 0.5)
    masked = copy.deepcopy(model)
    apply_masks(masked, channel_masks(masked, channel_plan(model, 0.5)))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_to_csr_converts_a_layer_used_twice_at_both_places():
    # probe before the fix: Sequential(Linear, lin, ReLU, lin) came back as CSRLinear,
    # CSRLinear, ReLU, Linear: the second use of lin stayed dense in the "CSR" model
    lin = nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(16, 16), lin, nn.ReLU(), lin)
    prune_global(model, 0.9, keep_dense=())
    csr = to_csr(model)
    assert [type(m) for m in csr] == [CSRLinear, CSRLinear, nn.ReLU, CSRLinear]
    assert csr[1] is csr[3] and isinstance(model[3], nn.Linear)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(csr(x), model(x), rtol=1e-5, atol=1e-6)
    kept = to_csr(model, keep_dense="1")
    assert [type(m) for m in kept] == [CSRLinear, nn.Linear, nn.ReLU, nn.Linear]


def _reparametrize(layer, how):
    if how == "torch.nn.utils.prune":
        torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
    elif how == "parametrizations.weight_norm":
        torch.nn.utils.parametrizations.weight_norm(layer)
    else:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(layer)


@pytest.mark.parametrize("how", ["torch.nn.utils.prune", "parametrizations.weight_norm",
                                 "weight_norm"])
def test_a_layer_whose_weight_a_reparametrization_computes_is_refused_naming_it(how):
    # probe /work/runs/s55/compress/p7_reparam.py, p8_channel_reparam.py: the weight of such
    # a layer is no parameter of the model, and pruning stopped in a KeyError naming a
    # memory address (prune_global, 2:4, sparsity_of) or 'conv1.weight' (channel_masks)
    message = (r"computes its weight from a reparametrization \(torch\.nn\.utils\.prune, a "
               r"parametrization such as weight_norm, or the old weight_norm hook\), so its "
               r"weight is no parameter a mask can zero: make it permanent first "
               r"\(torch\.nn\.utils\.prune\.remove, "
               r"torch\.nn\.utils\.parametrize\.remove_parametrizations, or "
               r"torch\.nn\.utils\.remove_weight_norm\)")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    _reparametrize(model[0], how)
    for call in (lambda: prune_global(model, 0.5, keep_dense=()),
                 lambda: semi_structured_masks(model, keep_dense=()),
                 lambda: sparsity_of(model, keep_dense=())):
        with pytest.raises(PruningError, match="layer '0' " + message):
            call()
    # left dense, it is no concern of pruning: the other layer is pruned
    masks = prune_global(model, 0.5, keep_dense=("0",))
    assert list(masks) == ["2.weight"] and n_pruned(masks) == 16
    for conv in ("conv1", "conv2"):
        block = BasicBlock(8, 8).eval()
        _reparametrize(getattr(block, conv), how)
        plan = {"conv1": torch.arange(4)}
        for call in (lambda: channel_plan(block, 0.5), lambda: channel_masks(block, plan),
                     lambda: shrink_channels(block, plan)):
            with pytest.raises(PruningError, match=f"layer '{conv}' " + message):
                call()


@pytest.mark.parametrize("schedule", [0.9, None, {"final": 0.9, "updates": 4}])
def test_a_pruner_given_no_schedule_refuses_it_before_training(schedule):
    # probe /work/runs/s55/compress/p7_reparam.py: MagnitudePruner(0.9) was built, and the
    # first optimizer step of fit stopped in "'float' object has no attribute 'is_update'"
    with pytest.raises(TypeError, match=re.escape(
            f"schedule must be a GradualSchedule, got {type(schedule).__name__} "
            f"{schedule!r}: give the final sparsity and the updates as "
            "GradualSchedule(final=..., updates=..., interval=...)")):
        MagnitudePruner(schedule)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_csr_refuses_a_weight_the_cpu_csr_kernels_cannot_multiply(dtype):
    # probe /work/runs/s55/compress/p9_csr_dtypes.py: the conversion went through, and the
    # first forward stopped in '"addmm_out_sparse_csr_impl_mkl" not implemented for
    # 'Half'', while the dense layers run in these dtypes on the CPU
    message = re.escape(f"PyTorch's CPU CSR kernels multiply float32 and float64 only, and "
                        f"the weight is {dtype}: convert the layer or model with .float() "
                        "before to_csr, and time the dense one in float32 too")
    for layer in (nn.Linear(8, 4), nn.Conv2d(4, 4, 3)):
        with pytest.raises(SparseKernelError, match=message):
            to_csr(layer.to(dtype))
    with pytest.raises(SparseKernelError, match=message):
        to_csr(nn.Sequential(nn.Linear(8, 4), nn.ReLU()).to(dtype))
    assert to_csr(nn.Linear(8, 4).to(dtype).float())(torch.ones(2, 8)).dtype == torch.float32
