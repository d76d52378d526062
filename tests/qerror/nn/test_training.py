"""The library's training loop: two gloo ranks against one process, resuming, hooks,
parameter selection, and refusals. Tiny models and synthetic data, fixed seeds."""

import contextlib
import dataclasses
import io
import math
import os
import re
import types
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from qerror.nn import training
from qerror.nn.training import (
    Batch,
    DeviceError,
    DivergedError,
    Evaluation,
    ResumeError,
    Schedule,
    TrainConfig,
    TrainError,
    fit,
    tensor_batches,
)
from tests.qerror.nn import ranks

N_TRAIN, N_FEATURES, N_CLASSES = 96, 8, 3
CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.1, seed=3)  # 6 steps an epoch, 12 in all
STEPS = 12
# DDP against one process, in float32. Each step's gradient is the same mean over the global
# batch of B = 16, summed in another order (two partial means of 8, then the all-reduce), so
# it differs by rounding only: at most about (B - 1) * eps = 15 * 1.19e-7 = 1.8e-6 relative
# (the worst case of recursive summation). Twelve SGD steps at this small learning rate on a
# smooth problem add such differences up, they do not amplify them: at most about
# 12 * 1.8e-6 = 2.1e-5 of the weights' scale. RTOL is five times that; ATOL covers weights
# near zero, where a relative bound means nothing (2.1e-5 of a typical |w| of 0.05). Seen
# here: 3e-8 absolute, 2e-6 relative at most. Other batches (another order, which the test
# checks; a wrong shard, a missing sample, gradients not averaged) move them by 1e-2 or more.
RTOL, ATOL = 1e-4, 1e-6


def tiny_model(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(N_FEATURES, 32)]
    layers += [nn.BatchNorm1d(32)] if batchnorm else []
    layers += [nn.Tanh(), nn.Linear(32, N_CLASSES)]
    return nn.Sequential(*layers)


def synthetic(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, N_FEATURES, generator=gen)
    y = (x @ torch.randn(N_FEATURES, N_CLASSES, generator=gen)).argmax(1)
    return x, y


def noisy_batches(x, y):
    """Inputs with Gaussian noise drawn for the whole global batch from the batch's
    generator, then cut to the shard: the contract that makes augmentation rank-independent."""

    def batch(b: Batch):
        noise = 0.05 * torch.randn(len(b.indices), N_FEATURES, generator=b.generator)
        rows = torch.from_numpy(b.indices[b.shard])
        return x[rows] + noise[b.shard], y[rows]

    return batch


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank, world, port, folder):
    """One torchrun-like rank: the environment torchrun would set, then the loop, three ways."""
    ranks.as_rank(rank, world, port)
    x, y = synthetic()
    out = {}
    with training.distributed("cpu") as place:
        out["placement"] = (place.rank, place.world_size, str(place.device))
        seen = []  # the dataset rows this rank computed, one list a step

        def recorded(b: Batch):
            seen.append(b.indices[b.shard].tolist())
            return noisy_batches(x, y)(b)

        full = fit(tiny_model(), recorded, N_TRAIN, CONFIG, progress=False)
        out["full"] = _weights(full.model)
        out["losses"] = [r.loss for r in full.history.steps]
        out["rows"] = seen
        patched = []  # rank 0 alone runs on_epoch: no BatchNorm may wait in a collective there
        bn = fit(tiny_model(batchnorm=True), noisy_batches(x, y), N_TRAIN, CONFIG,
                 progress=False, on_epoch=lambda rec, m: patched.append(
                     any("forward" in vars(mod) for mod in m.modules())))
        out["bn"] = _weights(bn.model)
        out["patched_in_on_epoch"] = patched
        # Each rank names its own state file, as on machines without a shared disk: only
        # rank 0 writes, and the resumed state reaches rank 1 from rank 0.
        state = folder / f"rank{rank}" / "state.pt"
        part = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                   stop_after_steps=5, progress=False)
        out["part_step"] = part.step
        rest = fit(tiny_model(seed=9), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                   progress=False)
        out["resumed"] = _weights(rest.model)
        out["resumed_sessions"] = rest.history.sessions
        try:
            fit(tiny_model(), noisy_batches(x, y), N_TRAIN, replace(CONFIG, batch_size=15),
                progress=False)
        except TrainError as exc:
            out["unequal"] = str(exc)
        # a budget below one step's time: the run stops after its first step, and says so
        # once (tqdm's write prints whatever its bar's disable says)
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            budget = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, progress=False,
                         time_budget_s=1e-9)
        out["budget"] = (budget.step, said.getvalue())
    torch.save(out, folder / f"out{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    ranks.two_ranks(_ddp_worker, folder)
    return folder, [torch.load(folder / f"out{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_gloo_ranks_end_equal_and_match_one_process(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["placement"] == (0, 2, "cpu") and r1["placement"] == (1, 2, "cpu")
    # Both ranks hold the same weights, bit for bit (DDP applies the same averaged update).
    assert all(torch.equal(r0["full"][k], r1["full"][k]) for k in r0["full"])
    assert r0["losses"] == r1["losses"]
    x, y = synthetic()
    single = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, progress=False)
    ref = _weights(single.model)
    for k in ref:
        torch.testing.assert_close(r0["full"][k], ref[k], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r0["losses"], [r.loss for r in single.history.steps],
                               rtol=RTOL)
    # The tolerance discriminates: another batch order moves the weights far beyond it.
    other = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, replace(CONFIG, seed=4),
                progress=False)
    far = max(float((other.model.state_dict()[k] - ref[k]).abs().max()) for k in ref)
    assert far > 1e-2


def test_two_ranks_share_every_global_batch_without_overlap(two_ranks):
    _, (r0, r1) = two_ranks
    assert len(r0["rows"]) == len(r1["rows"]) == STEPS
    for a, b in zip(r0["rows"], r1["rows"]):
        assert len(a) == len(b) == CONFIG.batch_size // 2 and not set(a) & set(b)
    # together, the single process's batches, in its order
    expect = []
    batches = noisy_batches(*synthetic())
    fit(tiny_model(), lambda b: expect.append(b.indices.tolist()) or batches(b), N_TRAIN,
        CONFIG, progress=False)
    assert [a + b for a, b in zip(r0["rows"], r1["rows"])] == expect


def test_two_ranks_train_batchnorm_on_the_global_batch(two_ranks):
    # Each rank's BatchNorm normalises by the statistics of the whole global batch, so the
    # run follows one process, running statistics included, within the bound derived at
    # RTOL above (the statistics are sums over the global batch, added in another order).
    _, (r0, r1) = two_ranks
    assert all(torch.equal(r0["bn"][k], r1["bn"][k]) for k in r0["bn"])
    assert r0["patched_in_on_epoch"] == [False, False] and r1["patched_in_on_epoch"] == []
    x, y = synthetic()
    single = fit(tiny_model(batchnorm=True), noisy_batches(x, y), N_TRAIN, CONFIG,
                 progress=False)
    ref = _weights(single.model)
    assert set(ref) == set(r0["bn"])
    for k in ref:
        torch.testing.assert_close(r0["bn"][k], ref[k], rtol=RTOL, atol=ATOL)
    # Each rank's own statistics (plain DDP) would not: normalising the two halves of every
    # batch apart, in one process, moves the weights far beyond the tolerance.
    ghost = tiny_model(batchnorm=True)
    ghost[1] = _TwoHalves(ghost[1])
    halves = fit(ghost, noisy_batches(x, y), N_TRAIN, CONFIG, progress=False).model
    far = max(float((halves[i].weight - single.model[i].weight).detach().abs().max()) for i in (0, 3))
    assert far > 1e-2


class _TwoHalves(nn.Module):
    """A BatchNorm applied to each half of the batch apart: plain DDP's two ranks, in one
    process."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        h = len(x) // 2
        return torch.cat([self.bn(x[:h]), self.bn(x[h:])])


def test_two_ranks_resume_from_rank_0s_state_exactly(two_ranks):
    folder, (r0, r1) = two_ranks
    assert r0["part_step"] == r1["part_step"] == 5
    assert r0["resumed_sessions"] == r1["resumed_sessions"] == 2
    for r in (r0, r1):
        assert all(torch.equal(r["resumed"][k], r0["full"][k]) for k in r0["full"])
    assert (folder / "rank0" / "state.pt").is_file()
    assert not (folder / "rank1").exists()  # rank 1 never writes


def test_a_global_batch_the_ranks_cannot_share_is_refused(two_ranks):
    _, (r0, r1) = two_ranks
    assert "global batch of 15 cannot be shared equally by 2 ranks" in r0["unequal"]
    assert r1["unequal"] == r0["unequal"]


def test_under_two_ranks_rank_0_alone_says_the_time_budget_is_spent(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["budget"] == (1, "[train] the time budget of 1e-09 s is spent at step 1 of 12\n")
    assert r1["budget"] == (1, "")


def test_resume_equals_uninterrupted(tmp_path):
    x, y = synthetic()
    state = tmp_path / "state.pt"
    full = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, progress=False)
    part = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
               stop_after_steps=7, progress=False)
    assert (part.step, part.complete) == (7, False)
    # A differently initialised model: everything comes from the state.
    rest = fit(tiny_model(seed=5), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
               progress=False)
    assert rest.complete and rest.history.sessions == 2
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.loss for r in rest.history.steps] == [r.loss for r in full.history.steps]
    with pytest.raises(ResumeError, match=r"different recipe \(lr: 0.1 saved, 0.2 now\)"):
        fit(tiny_model(), noisy_batches(x, y), N_TRAIN, replace(CONFIG, lr=0.2),
            state_path=state, progress=False)


def test_the_progress_bar_counts_the_steps_the_run_will_take(monkeypatch, tmp_path):
    """With stop_after_steps the bar counted every step of the config's epochs (the
    compression study's 200-step fine-tunings showed 421 steps, an ETA twice too long); it
    now ends where the run stops, a resumed run's bar starting at its step."""
    totals = []

    class Bar:
        def __init__(self, *, total, initial, **kwargs):
            totals.append((initial, total))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(training, "tqdm", Bar)
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=7)
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=9)
    total = CONFIG.epochs * (N_TRAIN // CONFIG.batch_size)
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=total + 5)
    assert totals == [(0, 7), (7, 9), (9, total)]


def test_the_time_estimate_counts_the_steps_and_validations_the_run_will_take(monkeypatch,
                                                                             tmp_path):
    """With stop_after_steps the estimate after the first steps counted every step and
    validation of the config's epochs, as the bar did (a run of 400 steps stopped at 10 said
    "the 396 steps left ... about 29.8 s in all" for 0.5 s of work); it now counts those up
    to where the run stops. CONFIG has 6 steps an epoch; the estimate comes after 4 steps of
    a session, at step 4 of a fresh run and at step 6 of one resumed at step 2."""
    seen = []

    def record(bar, config, times, steps_left, epochs_left, *args):
        seen.append((steps_left, epochs_left))

    monkeypatch.setattr(training, "_print_estimate", record)
    x, y = synthetic()
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG)
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, stop_after_steps=8)
    state = tmp_path / "state.pt"
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=2)
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=9)
    # steps 5-12 and both validations; steps 5-8 and epoch 1's; steps 7-9 and epoch 1's
    assert seen == [(8, 2), (4, 1), (3, 1)]


def test_hooks_are_called_and_after_step_keeps_a_pruning_mask():
    x, y = synthetic()
    model = tiny_model()
    mask = (torch.arange(model[0].weight.numel()) % 2 == 0).reshape(model[0].weight.shape)
    calls, epochs = [], []

    def prune(m):
        calls.append(m)
        with torch.no_grad():
            m[0].weight.mul_(mask)

    def validate(m):
        assert not m.training
        return Evaluation(loss=1.0, correct=48, n=96)

    def evaluate(m):
        m.eval()
        result = validate(m)
        m.train()
        return result

    result = fit(model, tensor_batches(x, y), N_TRAIN, CONFIG, after_step=prune,
                 on_epoch=lambda record, m: epochs.append(record), val=evaluate, val_size=96,
                 progress=False)
    assert len(calls) == STEPS and all(m is model for m in calls)
    assert [e.epoch for e in epochs] == [1, 2] and [e.step for e in epochs] == [6, 12]
    assert epochs[0].val_accuracy == 0.5 and epochs[0].val_ci_low < 0.5 < epochs[0].val_ci_high
    assert result.history.epochs == epochs
    assert bool((result.model[0].weight[~mask] == 0).all())
    assert bool((result.model[0].weight[mask] != 0).all())


def test_trainable_trains_only_the_chosen_parameters():
    """A frozen backbone: its parameters and its BatchNorm statistics stay bit-identical;
    the head learns; requires_grad is given back as it was."""
    x, y = synthetic()
    model = tiny_model(batchnorm=True)
    before = _weights(model)
    fit(model, tensor_batches(x, y), N_TRAIN, CONFIG, trainable={"3.weight", "3.bias"},
        progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"3.weight", "3.bias"}  # BatchNorm's running stats included
    assert all(p.requires_grad for p in model.parameters())
    # A predicate selects the same way; unfreezing BatchNorm lets its statistics move.
    model = tiny_model(batchnorm=True)
    fit(model, tensor_batches(x, y), N_TRAIN, CONFIG,
        trainable=lambda name: name.startswith(("1.", "3.")), progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                       "1.num_batches_tracked", "3.weight", "3.bias"}


def test_without_a_selection_batchnorm_without_parameters_still_learns_its_statistics():
    x, y = synthetic()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.BatchNorm1d(32, affine=False),
                          nn.Tanh(), nn.Linear(32, N_CLASSES))
    fit(model, tensor_batches(x, y), N_TRAIN, CONFIG, progress=False)
    assert int(model[1].num_batches_tracked) == STEPS
    assert not torch.equal(model[1].running_mean, torch.zeros(32))


def test_a_custom_loss_on_a_multi_output_model():
    """Exit heads return a list of logits; the loss weighs them, accuracy reads the last."""

    class TwoExits(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body, self.early, self.final = (nn.Linear(N_FEATURES, 16),
                                                 nn.Linear(16, N_CLASSES),
                                                 nn.Linear(16, N_CLASSES))

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return [self.early(h), self.final(h)]

    def weighted(outputs, y):
        ce = nn.functional.cross_entropy
        return 0.3 * ce(outputs[0], y) + 0.7 * ce(outputs[1], y)

    x, y = synthetic()
    result = fit(TwoExits(), tensor_batches(x, y), N_TRAIN, CONFIG, loss=weighted,
                 progress=False)
    steps = result.history.steps
    assert len(steps) == STEPS and all(0 <= r.correct <= r.batch for r in steps)
    assert np.mean([r.loss for r in steps[-3:]]) < np.mean([r.loss for r in steps[:3]])


def test_a_diverging_loss_stops_with_the_step():
    x, y = synthetic()
    x = x.clone()
    x[40:] = float("nan")
    with pytest.raises(training.DivergedError, match=r"the loss became nan at step \d+ of 12") \
            as info:
        fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, progress=False)
    assert 1 <= info.value.step <= STEPS and info.value.epoch in (1, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"trainable": {"9.weight"}}, "names 1 parameters the model does not have: 9.weight"),
    ({"trainable": lambda name: False}, "selects none of the model's parameters"),
    ({"n_train": 10}, "batch size 16 exceeds the 10 training samples"),
    # 4 steps of 16, a quarter of them warm-up: one step, where OneCycleLR divides by zero
    ({"n_train": 64, "epochs": 1}, "4 steps are too few for the one-cycle schedule"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1, got 0"),
    ({"checkpoint_every": -4}, "checkpoint_every must be an int >= 1"),
    ({"stop_after_steps": -3}, "stop_after_steps must be an int >= 1"),
    ({"n_train": -1}, "n_train must be an int >= 0, got -1"),
    # an epoch permuted range(n_train): torch's bare IndexError at a later step
    ({"n_train": N_TRAIN + 1}, rf"n_train is {N_TRAIN + 1} but the batch function holds "
                               rf"{N_TRAIN} samples; pass n_train={N_TRAIN}"),
    ({"time_budget_s": math.nan}, "time_budget_s must be a positive number"),
    ({"time_budget_s": -1}, "time_budget_s must be a positive number"),
    ({"time_budget_s": "60"}, "time_budget_s must be a positive number of seconds .*got '60'"),
    ({"time_budget_s": math.inf}, "time_budget_s must be a positive number .*got inf"),
    ({"time_budget_s": 0}, "time_budget_s must be a positive number .*got 0"),
    # a bool is no number of seconds: True was a budget of one second
    ({"time_budget_s": True}, "time_budget_s must be a positive number .*got True"),
    ({"time_budget_s": np.True_}, "time_budget_s must be a positive number .*got np.True_"),
])
def test_bad_runs_are_refused(kwargs, message):
    x, y = synthetic()
    n = kwargs.pop("n_train", N_TRAIN)
    config = dataclasses.replace(CONFIG, epochs=kwargs.pop("epochs")) if "epochs" in kwargs \
        else CONFIG
    with pytest.raises(TrainError, match=message):
        fit(tiny_model(), tensor_batches(x, y), n, config, progress=False, **kwargs)


@pytest.mark.parametrize("budget, steps", [(np.float32(1e-9), 1), (np.int64(600), STEPS),
                                           (np.float64(1e-9), 1)])
def test_a_time_budget_in_numpys_numbers_is_the_budget_it_says(budget, steps):
    """np.float32 and np.int64 seconds are positive numbers (qerror._checks.is_real): they
    were refused as "not a positive number", while np.float64 (a float subclass) was taken.
    A budget below one step's time stops the run after its first step."""
    x, y = synthetic()
    result = fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, time_budget_s=budget,
                 progress=False)
    assert result.step == steps


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_every": 2.5}, r"checkpoint_every must be an int >= 1, got 2\.5 \(float\)"),
    ({"checkpoint_every": True}, r"checkpoint_every must be an int >= 1, got True \(bool\)"),
    ({"stop_after_steps": True}, r"stop_after_steps must be an int >= 1, got True \(bool\)"),
    ({"n_train": float(N_TRAIN)}, r"n_train must be an int >= 0, got \d+\.0 \(float\)"),
    ({"val_size": "100"}, r"val_size must be an int >= 0, got '100' \(str\)"),
])
def test_counts_of_a_run_that_are_no_integers_are_a_type_error(kwargs, message):
    """A float or a bool where fit takes a count is a TypeError, as everywhere in the
    package (qerror._checks.check_count); it was a TrainError (2.5, True) or, for n_train,
    not refused at all (a float n_train gave float step counts)."""
    x, y = synthetic()
    n = kwargs.pop("n_train", N_TRAIN)
    with pytest.raises(TypeError, match=message):
        fit(tiny_model(), tensor_batches(x, y), n, CONFIG, progress=False, **kwargs)


@pytest.mark.parametrize("fields, message", [
    ({"epochs": True}, r"TrainConfig\.epochs must be an int >= 1, got True \(bool\)"),
    ({"batch_size": 16.0}, r"TrainConfig\.batch_size must be an int >= 1, got 16\.0"),
    ({"seed": True}, r"TrainConfig\.seed must be an int from 0 to 2\*\*64 - 1, got True \(bool\)"),
    ({"seed": 1.5}, r"TrainConfig\.seed must be an int from 0 to 2\*\*64 - 1, got 1\.5 \(float\)"),
])
def test_config_counts_that_are_no_integers_are_a_type_error(fields, message):
    with pytest.raises(TypeError, match=message):
        replace(CONFIG, **fields)


def test_one_value_per_channel_at_a_training_batchnorm_is_a_train_error():
    """A BatchNorm that trains on one value per channel (one image, a vector or a 1x1 map)
    has no batch statistics: a TrainError naming the batch size to pick, instead of torch's
    ValueError. One image with larger maps, no BatchNorm, or every BatchNorm frozen: fine."""
    x, y = synthetic()
    one = dataclasses.replace(CONFIG, batch_size=1, epochs=1)
    with pytest.raises(TrainError, match=r"one value per channel at step 1 \(1 image\(s\) "
                                         r"in the global batch.*at least 2"):
        fit(tiny_model(batchnorm=True), tensor_batches(x, y), N_TRAIN, one, progress=False)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8, N_CLASSES))
    images = x.reshape(N_TRAIN, 1, 1, N_FEATURES).expand(-1, 1, 4, -1)[:, :, :, :2] \
        .reshape(N_TRAIN, 1, 4, 2).contiguous()
    assert fit(conv, tensor_batches(images, y), N_TRAIN, one, progress=False).complete
    assert fit(tiny_model(), tensor_batches(x, y), N_TRAIN, one, progress=False).complete
    frozen = fit(tiny_model(batchnorm=True), tensor_batches(x, y), N_TRAIN, one,
                 progress=False, trainable=lambda name: not name.startswith("1."))
    assert frozen.complete


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("batch_size", 0), ("lr", math.nan), ("lr", 0.0), ("momentum", 0.97),
    ("momentum", 0.0), ("momentum", 0.02),  # one-cycle would run at momentum - 0.05 < 0
    ("warmup_fraction", 0.0), ("seed", -1), ("schedule", "cosine"),
])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field if field != "schedule" else "schedule"):
        replace(CONFIG, **{field: value})


@pytest.mark.parametrize("fields, message", [
    ({"batch_size": 0}, r"TrainConfig\.batch_size must be an int >= 1, got 0"),
    ({"seed": -1}, r"TrainConfig\.seed must be an int from 0 to 2\*\*64 - 1, got -1"),
    ({"lr": "0.1"}, r"TrainConfig\.lr must be a finite number in \(0\.0, inf\), got '0\.1'"),
    ({"lr": math.inf}, r"TrainConfig\.lr must be a finite number in \(0\.0, inf\), got inf"),
    ({"momentum": 1.0, "schedule": Schedule.CONSTANT},
     r"TrainConfig\.momentum must be a finite number in \[0, 1\), got 1\.0"),
    ({"label_smoothing": 1.0}, r"TrainConfig\.label_smoothing must be a finite number in "
                               r"\[0, 1\), got 1\.0"),
    ({"warmup_fraction": 1.0}, r"TrainConfig\.warmup_fraction must be a finite number in "
                               r"\(0, 1\), got 1\.0"),
    ({"momentum": 0.95}, r"TrainConfig\.momentum=0\.95 leaves no room for the one-cycle"),
    ({"momentum": 0.0, "schedule": Schedule.CONSTANT},
     r"Nesterov momentum needs TrainConfig\.momentum > 0"),
])
def test_config_refusals_name_the_field_the_bound_and_the_value(fields, message):
    """Each bound at its edge (the documented intervals are half-open), and a bool or a
    string where a number belongs: a ValueError saying what is allowed, never a TypeError
    from a comparison or a config the optimizer refuses later."""
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **fields)


@pytest.mark.parametrize("field, value", [
    ("lr", True), ("weight_decay", True), ("label_smoothing", False),
    ("warmup_fraction", np.True_),
])
def test_config_refuses_a_bool_where_a_number_belongs(field, value):
    """``True`` is no learning rate: ``lr=True`` trained at 1.0, ``weight_decay=True`` decayed
    by 1.0 and ``label_smoothing=False`` smoothed by 0, each without a word (a bool is an int
    to ``isinstance``)."""
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be a finite number in "
                                         rf".*, got {value!r}"):
        replace(CONFIG, **{field: value})


def test_config_takes_numpy_floats_as_the_numbers_they_are():
    """``np.float32(0.1)`` is a finite number in (0, inf): it was refused as if it were not
    (``isinstance(np.float32(0.1), float)`` is false), with a message saying it is out of
    the range it lies in. Each is kept as the Python float of its value (the recipe's plain
    numbers), as an integer is."""
    config = replace(CONFIG, lr=np.float32(0.1), momentum=np.float32(0.9),
                     weight_decay=np.float16(0), label_smoothing=np.float64(0.1),
                     warmup_fraction=np.float32(0.25))
    assert config.lr == np.float32(0.1) and config.momentum == np.float32(0.9)
    fields = ("lr", "momentum", "weight_decay", "label_smoothing", "warmup_fraction")
    assert all(type(getattr(config, f)) is float for f in fields)
    assert type(replace(CONFIG, lr=1).lr) is float


def test_flags_that_are_not_bools_are_refused(tmp_path):
    """A flag passed as a string was read by its truth value: ``nesterov='False'`` trained
    with Nesterov momentum (the weights of ``nesterov=True``) and recorded ``'False'`` in the
    state's recipe, ``channels_last='False'`` changed the memory format, and
    ``fit(resume='False')`` resumed the state it was told not to, each without a word."""
    for field in ("nesterov", "channels_last"):
        with pytest.raises(TypeError, match=f"TrainConfig.{field} must be True or False, "
                                            "got 'False'"):
            replace(CONFIG, **{field: "False"})
    assert replace(CONFIG, nesterov=np.False_, schedule=Schedule.CONSTANT).nesterov is False
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=2, progress=False)
    kept = state.read_bytes()
    for flag in ("resume", "progress", "return_interrupted"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'False'"):
            fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                **{"progress": False, flag: "False"})
    assert state.read_bytes() == kept  # refused before the state was read or replaced


def test_config_accepts_the_edges_of_its_ranges():
    """The closed ends: one-cycle momentum 0.05 (its range then starts at 0), a zero weight
    decay, label smoothing and momentum without Nesterov under the constant schedule, where
    a momentum of 0.97 is fine (no one-cycle range), and numpy integers."""
    replace(CONFIG, momentum=0.05)
    replace(CONFIG, weight_decay=0.0, label_smoothing=0.0)
    replace(CONFIG, schedule=Schedule.CONSTANT, momentum=0.0, nesterov=False)
    replace(CONFIG, schedule=Schedule.CONSTANT, momentum=0.97)
    replace(CONFIG, epochs=np.int64(2), batch_size=np.int32(16), seed=np.int64(0))


def test_tensor_batches_refuse_inputs_and_targets_of_other_lengths():
    x, y = synthetic()
    with pytest.raises(ValueError, match=f"x holds 5 samples but y {N_TRAIN}"):
        tensor_batches(x[:5], y)


def test_an_identity_that_repeats_the_config_is_refused():
    x, y = synthetic()
    with pytest.raises(ValueError, match=r"identity repeats TrainConfig fields or n_train "
                                         r"\(lr, n_train\); leave them to the config and fit"):
        fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, identity={"lr": 0.2,
            "n_train": 1, "data": "x"}, progress=False)


def test_what_is_not_a_state_file_at_the_state_path_is_refused_and_kept(tmp_path):
    """A link (even to a real state), a folder, a text file, and a file whose first bytes
    name a member ``data.pkl`` without a zip signature: each is someone else's, left as
    it is, with the advice to pass another path (never resumed through, never an
    IsADirectoryError, never called a damaged state)."""
    x, y = synthetic()
    real = tmp_path / "real.pt"
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=real,
        stop_after_steps=3, progress=False)
    link, folder, text, fake = (tmp_path / n for n in ("link.pt", "dir.pt", "a.txt", "f.pt"))
    link.symlink_to(real)
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "elsewhere" / "state.pt")
    folder.mkdir()
    text.write_text("not a state\n")
    name = b"archive/data.pkl"
    fake.write_bytes(b"\0" * 26 + len(name).to_bytes(2, "little") + b"\0\0" + name + b"\0" * 64)
    kept = {p: (p.is_symlink(), p.is_dir(), p.read_bytes() if p.is_file() else None)
            for p in (link, folder, text, fake)}
    for path, what in ((link, "is not a regular file"), (folder, "is not a regular file"),
                       (dangling, "is not a regular file"),
                       (text, r"is not a qerror training state \(not a torch archive\)"),
                       (fake, r"is not a qerror training state \(not a torch archive\)")):
        with pytest.raises(TrainError, match=f"state_path {re.escape(str(path))} exists and "
                                             f"{what}; it is left as it is. Pass another "
                                             "path"):
            fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=path,
                progress=False)
    assert kept == {p: (p.is_symlink(), p.is_dir(), p.read_bytes() if p.is_file() else None)
                    for p in kept}
    assert dangling.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_a_state_of_version_3_without_n_train_resumes_and_says_so(tmp_path, capsys):
    """Version 3 states written before n_train was recorded resume (the size cannot be
    compared: said, not refused as a different recipe)."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    full = fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, progress=False)
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=5, progress=False)
    saved = torch.load(state, weights_only=True)
    del saved["recipe"]["n_train"]
    torch.save(saved, state)
    capsys.readouterr()
    rest = fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
               progress=False)
    assert "state.pt was written by an older qerror, which did not record n_train: not " \
        "checked" in capsys.readouterr().out
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert rest.step == STEPS and all(torch.equal(a[k], b[k]) for k in a)


def test_starting_over_removes_the_old_state_before_the_first_step(tmp_path):
    """resume=False replaces the state: a fresh run that fails before its first save must
    not leave the old run's state behind as if it were its own (the divergence message
    then said the old step-3 state "stays in" the path)."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=3, progress=False)

    def nan_loss(out, target):
        return nn.functional.cross_entropy(out, target) * math.nan

    with pytest.raises(DivergedError) as err:
        fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
            resume=False, loss=nan_loss, progress=False)
    assert "No checkpoint was written. Start over" in str(err.value)
    assert not state.exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(version=training.STATE_VERSION + 1), "is not a version-3 training "
                                                             "state; delete"),
    (lambda s: s.update(recipe=None), "records no recipe; delete"),
    (lambda s: s["recipe"].update(data="images-a"), r"different recipe \(data: 'images-a' "
                                                    r"saved, absent now\)"),
])
def test_a_state_of_another_version_or_recipe_is_refused(tmp_path, change, message):
    """A state written by a later version (which this one cannot read correctly), one with
    no recipe, and one whose recipe holds an identity this run does not pass."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=3, progress=False)
    saved = torch.load(state, weights_only=True)
    change(saved)
    torch.save(saved, state)
    with pytest.raises(ResumeError, match=message):
        fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
            progress=False)


def test_auto_device_is_cuda_exactly_where_a_gpu_is_found():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training.resolve_device("auto").type == expected
    assert training.resolve_device(training.Device.AUTO).type == expected


def test_a_device_string_with_an_index_is_read_as_torch_reads_it():
    assert training.resolve_device("cpu:0") == torch.device("cpu")
    assert training.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match="'cuda:x' is not a device torch knows"):
        training.resolve_device("cuda:x")
    if torch.cuda.is_available():
        assert training.resolve_device("cuda:0") == torch.device("cuda", 0)
    else:
        with pytest.raises(DeviceError, match="finds no usable GPU"):
            training.resolve_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_refused_clearly():
    with pytest.raises(DeviceError, match=r"finds no usable GPU here.*--device cpu"):
        training.resolve_device("cuda")
    with pytest.raises(DeviceError):
        fit(tiny_model(), tensor_batches(*synthetic()), N_TRAIN, CONFIG, device="cuda",
            progress=False)


def test_torchrun_environment_is_read_whole_or_not_at_all():
    assert training.torchrun_ranks({}) == (0, 1, 0)
    assert training.torchrun_ranks({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) \
        == (1, 4, 1)
    with pytest.raises(TrainError, match="RANK set but WORLD_SIZE, LOCAL_RANK not"):
        training.torchrun_ranks({"RANK": "0"})
    with pytest.raises(TrainError, match="out of range"):
        training.torchrun_ranks({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})


def test_a_network_with_dropout_resumes_step_for_step(tmp_path):
    # Dropout draws from torch's global generator, which the state keeps (one process).
    def dropout_model(seed=0):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.Tanh(), nn.Dropout(0.3),
                             nn.Linear(32, N_CLASSES))

    x, y = synthetic()
    state = tmp_path / "state.pt"
    torch.manual_seed(11)
    full = fit(dropout_model(), noisy_batches(x, y), N_TRAIN, CONFIG, progress=False)
    torch.manual_seed(11)
    fit(dropout_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=7, progress=False)
    torch.manual_seed(12345)  # whatever the generator holds when the run resumes
    rest = fit(dropout_model(seed=5), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
               progress=False)
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_of_another_network_is_refused_before_anything_is_loaded(tmp_path):
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=3, progress=False)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.Tanh(), nn.Linear(32, N_CLASSES + 1))
    before = _weights(other)
    with pytest.raises(ResumeError, match=r"does not fit Sequential; nothing was loaded"):
        fit(other, noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state, progress=False)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_state_of_another_float_width_is_refused_before_anything_is_loaded(tmp_path):
    """load_state_dict casts float32 to float64: the run went on in float64 from a float32
    state, the uninterrupted run of neither width, without a word."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=3, progress=False)
    written = state.read_bytes()
    wide = tiny_model(seed=5).double()
    before = _weights(wide)
    with pytest.raises(ResumeError, match=r"0\.weight: torch\.float32 saved, "
                                          r"torch\.float64 now;.*nothing was loaded"):
        fit(wide, noisy_batches(x.double(), y), N_TRAIN, CONFIG, state_path=state,
            progress=False)
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())
    assert state.read_bytes() == written


def test_cuda_under_torchrun_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training._local_gpu() == 1
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert training._local_gpu() == 2  # a launcher that set the device itself


def test_a_state_of_the_version_before_resumes_in_one_process_only(tmp_path, capsys):
    """Version 2 recorded less of the recipe (no training images) and trained BatchNorm on
    each rank's share under torchrun: it resumes in one process, saying what it cannot
    check, and is refused on several ranks."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    identity = {"data": {"train_sha256": "f" * 64}}
    full = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, identity=identity,
               progress=False)
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        identity=identity, stop_after_steps=7, progress=False)
    old = torch.load(state, weights_only=True)
    old["version"] = 2
    del old["recipe"]["data"], old["rng"]
    torch.save(old, state)
    recipe = training._recipe(CONFIG, identity, None, N_TRAIN)
    with pytest.raises(ResumeError, match="Resume it in one process"):
        training._load_state(state, training._read_state(state), recipe, world=2)
    capsys.readouterr()
    rest = fit(tiny_model(seed=5), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
               identity=identity, progress=False)
    assert "written by an older qerror, which did not record data: not checked" in \
        capsys.readouterr().out
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _CtrlCAt(nn.Module):
    """Raises KeyboardInterrupt inside the forward pass of the ``at``-th training call, after
    the layers before it have run (BatchNorm statistics moved, dropout drawn): where a
    Ctrl-C usually lands."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return x


def _bn_dropout_model(seed=0, stop_at=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.BatchNorm1d(32), nn.Tanh(),
                         nn.Dropout(0.3), _CtrlCAt(stop_at), nn.Linear(32, N_CLASSES))


def test_a_ctrl_c_inside_a_step_resumes_exactly_and_is_raised_again(tmp_path):
    """Ctrl-C in step 8's forward pass, after its BatchNorm updated its running statistics
    and its dropout drew: the state saved is step 7's as it was (statistics and generator
    put back), so the resumed run equals the uninterrupted one bit for bit. fit raises the
    KeyboardInterrupt again (a caller must not go on with a half-trained network) unless
    return_interrupted, which reports it as not complete."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    torch.manual_seed(11)
    full = fit(_bn_dropout_model(), noisy_batches(x, y), N_TRAIN, CONFIG, progress=False)
    torch.manual_seed(11)
    with pytest.raises(KeyboardInterrupt):
        fit(_bn_dropout_model(stop_at=8), noisy_batches(x, y), N_TRAIN, CONFIG,
            state_path=state, progress=False)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 7 and int(saved["model"]["1.num_batches_tracked"]) == 7
    torch.manual_seed(12345)
    rest = fit(_bn_dropout_model(seed=5), noisy_batches(x, y), N_TRAIN, CONFIG,
               state_path=state, progress=False)
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(11)
    told = fit(_bn_dropout_model(stop_at=8), noisy_batches(x, y), N_TRAIN, CONFIG,
               progress=False, return_interrupted=True)
    assert told.interrupted and told.step == 7 and not told.complete
    assert int(told.model[1].num_batches_tracked) == 7  # the model is step 7's too


def test_a_state_of_another_training_set_size_is_refused(tmp_path):
    """The number of training samples sets the schedule's length and the batches: a state
    resumes only under the same n_train, even when the steps per epoch stay the same."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=5, progress=False)
    more = tensor_batches(torch.cat([x, x[:4]]), torch.cat([y, y[:4]]))  # room for n + 4
    for n in (N_TRAIN + 4, N_TRAIN - 16):  # the same 6 steps an epoch, then 5
        with pytest.raises(ResumeError, match=f"n_train: {N_TRAIN} saved, {n} now"):
            fit(tiny_model(), more, n, CONFIG, state_path=state, progress=False)


def test_a_ctrl_c_during_the_last_save_is_held_until_the_state_is_written(tmp_path,
                                                                          monkeypatch):
    """A Ctrl-C while the final state is written (after stop_after_steps) waits for the write
    and is then reported as an interruption at that step (it escaped fit as a bare
    KeyboardInterrupt, which studies.train took for one before training started)."""
    import signal

    x, y = synthetic()
    state = tmp_path / "state.pt"
    real = training._save_state

    def save_with_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        real(*args, **kwargs)

    monkeypatch.setattr(training, "_save_state", save_with_ctrl_c)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                     stop_after_steps=5, progress=False, return_interrupted=True)
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.interrupted and result.step == 5 and not result.complete
    assert torch.load(state, weights_only=True)["step"] == 5


def test_resuming_in_another_environment_warns_and_every_session_is_recorded(tmp_path):
    """The weights are bitwise the uninterrupted run's only under the same torch threads,
    version, device, CPU kernels and ranks: each session's are kept in the state, and a
    resume under other ones goes on with a warning that says so (one under the same ones
    says nothing)."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", training.EnvironmentChangedWarning)
            fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                stop_after_steps=3, progress=False)
            fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                stop_after_steps=6, progress=False)
        torch.set_num_threads(2)
        with pytest.warns(training.EnvironmentChangedWarning,
                          match=r"torch_threads: 1 before, 2 now\): the run goes on, but .*"
                                r"not be the uninterrupted run's bit for bit"):
            rest = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    assert rest.complete and rest.history.sessions == 3
    first = {"torch_version": str(torch.__version__), "device_type": "cpu",
             "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": 1,
             "world_size": 1}
    assert rest.history.environments == [first, first, {**first, "torch_threads": 2}]
    assert torch.load(state, weights_only=True)["history"]["environments"] == \
        rest.history.environments


def test_a_state_that_recorded_no_environments_resumes_without_a_warning(tmp_path):
    """States written before environments and validation times were recorded load; their
    sessions count as not recorded (None), not as differing."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    full = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, progress=False)
    fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=7, val=lambda m: Evaluation(1.0, 1, 2), progress=False)
    old = torch.load(state, weights_only=True)
    assert len(old["history"]["val_seconds"]) == 1
    del old["history"]["environments"], old["history"]["val_seconds"]
    torch.save(old, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", training.EnvironmentChangedWarning)
        rest = fit(tiny_model(), noisy_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                   val=lambda m: Evaluation(1.0, 1, 2), progress=False)
    assert rest.history.environments[0] is None and rest.history.environments[1] is not None
    assert len(rest.history.val_seconds) == 1  # the second epoch's
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _nan_gradient(out, target):
    """A finite loss whose gradient is NaN (0 times the infinite slope of sqrt|z| at 0)."""
    return nn.functional.cross_entropy(out, target) \
        + 0.0 * torch.sqrt((out - out.detach()).abs()).sum()


@pytest.mark.parametrize("n_train, stop", [(CONFIG.batch_size, None), (N_TRAIN, 1)])
def test_non_finite_weights_after_the_last_update_raise_without_a_state_path(n_train, stop):
    """The last update makes the weights NaN: with no state to save they were returned as a
    complete run, after validation and on_epoch had used them. Checked at the epoch's end
    (one step an epoch) and at the end of a run stopped mid-epoch."""
    x, y = synthetic()
    config = replace(CONFIG, epochs=1, schedule=Schedule.CONSTANT)
    used = []
    with pytest.raises(DivergedError, match=r"the weights became non-finite \(0.weight holds "
                                            rf"\d+ NaN.* at step 1 of {n_train // 16} "):
        fit(tiny_model(), tensor_batches(x, y), n_train, config, loss=_nan_gradient,
            val=lambda m: used.append("val") or Evaluation(1.0, 1, 2),
            on_epoch=lambda record, m: used.append("on_epoch"), stop_after_steps=stop,
            progress=False)
    assert used == []


class _Clock:
    """A perf_counter that the batches and the validation move by set amounts."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_the_time_budget_foresees_the_validation_after_an_epochs_last_step(monkeypatch):
    """Steps of 1 s, 6 an epoch, and 5 s of validation after each: 11 s after epoch 1 and
    16 s after step 11. Step 12 would take the run to 17 s and its validation to 22 s, past
    a budget of 20 s: the run stops before it (it ran it and ended at 22 s)."""
    clock = _Clock()
    monkeypatch.setattr(training, "time", clock)
    x, y = synthetic()
    plain = tensor_batches(x, y)

    def one_second(b):
        clock.now += 1.0
        return plain(b)

    def five_seconds(model):
        clock.now += 5.0
        return Evaluation(1.0, 1, 2)

    result = fit(tiny_model(), one_second, N_TRAIN, CONFIG, val=five_seconds,
                 time_budget_s=20, progress=False)
    assert (result.step, result.history.train_seconds) == (11, 16.0)
    assert result.history.val_seconds == [5.0]
    # Before any validation was measured, val_size samples at a third of a step's time each:
    # 576 samples, 36 batches of 16, 12 s foreseen after step 6, past 5 + 1 + 12 > 17 s.
    early = fit(tiny_model(), one_second, N_TRAIN, CONFIG, val=five_seconds, val_size=576,
                time_budget_s=17, progress=False)
    assert (early.step, early.history.train_seconds) == (5, 5.0)


def test_budgets_below_a_minute_are_shown_in_seconds(capsys):
    """A budget of 3 s read "0.1 min" in the estimate, one of 1e-9 s "0.0 min" when spent."""
    x, y = synthetic()
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, progress=False,
        time_budget_s=1e-9)
    assert "[train] the time budget of 1e-09 s is spent at step 1 of 12" in \
        capsys.readouterr().out
    said = []
    training._print_estimate(types.SimpleNamespace(write=said.append), CONFIG, [0.5] * 3,
                             steps_left=10, epochs_left=1, n_val=0, budget_s=3.0, spent_s=0.0)
    assert "take about 5 s, plus 0 s of validation, about 5 s in all; that exceeds the " \
        "budget of 3 s" in said[0]
    training._print_estimate(types.SimpleNamespace(write=said.append), CONFIG, [30.0] * 3,
                             steps_left=100, epochs_left=0, n_val=0, budget_s=2700.0,
                             spent_s=0.0)
    assert "about 50.0 min in all; that exceeds the budget of 45.0 min" in said[1]


def test_a_damaged_state_is_named_as_such_and_left_as_it_is(tmp_path):
    """A state cut short (a copy that stopped) read as someone else's file ("pass another
    --checkpoint"): it is called damaged, kept, and deleting it is how to start over,
    resuming or not. A whole torch file of another kind is still someone else's."""
    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=3, progress=False)
    cut = state.read_bytes()[:state.stat().st_size // 2]
    state.write_bytes(cut)
    for resume in (True, False):
        with pytest.raises(TrainError, match=rf"the training state {re.escape(str(state))} "
                                             r"is damaged: it is a torch archive that does not "
                                             r"read .* delete " + re.escape(str(state))
                                             + " to start over"):
            fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
                resume=resume, progress=False)
        assert state.read_bytes() == cut
    torch.save({"weights": torch.zeros(3)}, state)
    with pytest.raises(TrainError, match="is not a qerror training state.*another --checkpoint"):
        fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
            progress=False)


def test_a_state_whose_bytes_changed_is_damaged_though_torch_loads_it(tmp_path):
    """A byte flipped in a tensor's data: torch.load reads it without the zip checksum, and
    the run resumed to the end with the changed weights."""
    import zipfile

    x, y = synthetic()
    state = tmp_path / "state.pt"
    fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
        stop_after_steps=3, progress=False)
    with zipfile.ZipFile(state) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    raw = bytearray(state.read_bytes())
    name = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[info.header_offset + 30 + name + extra + 5] ^= 0xFF
    state.write_bytes(bytes(raw))
    torch.load(state, map_location="cpu", weights_only=True)  # loads: no checksum read
    with pytest.raises(TrainError, match="is damaged: a member of its archive fails its "
                                         "checksum"):
        fit(tiny_model(), tensor_batches(x, y), N_TRAIN, CONFIG, state_path=state,
            progress=False)
    assert state.read_bytes() == bytes(raw)


def _bytes_read() -> int:
    """Bytes this process has read by read() calls so far (Linux's rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_resuming_reads_the_state_once(tmp_path):
    """The checksums are tested on the bytes that are loaded: the state of a 2-million-weight
    network (16 MB with its momentum) is read once on resuming, not once to test it and
    again to load it (2.0 times its size before). The bound 1.5 leaves half a state for
    whatever else the resume reads (nothing of this size: it measured 1.00 after)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 2000), nn.Tanh(), nn.Linear(2000, 1000),
                          nn.Linear(1000, N_CLASSES))
    x, y = synthetic()
    config = replace(CONFIG, schedule=Schedule.CONSTANT)
    state = tmp_path / "state.pt"
    fit(model, tensor_batches(x, y), N_TRAIN, config, state_path=state, stop_after_steps=1,
        progress=False)
    size = state.stat().st_size
    assert size > 16e6
    before = _bytes_read()
    rest = fit(model, tensor_batches(x, y), N_TRAIN, config, state_path=state,
               stop_after_steps=1, progress=False)
    read = _bytes_read() - before
    assert rest.history.sessions == 2
    assert read < 1.5 * size, f"resuming read {read / size:.2f} times the state's bytes"
