"""Tests of qerror.nn.pt2e: untied ReLUs, and real INT8 early exit through torchao's PT2E flow.

The compiled tests are marked ``slow``: inductor compiles three graphs per stage (batch 1,
2-15, 16 and up), about 20-40 s per stage on one core. The fast check runs the same
quantized graphs uncompiled.
"""

import re
import types

import pytest
import torch
import torchvision
from torch import nn
from torch._dynamo.utils import counters

from qerror.nn.early_exit import EarlyExitResNet, ExitRule, exit_result_from_logits
from qerror.nn.models import fashion_resnet
from qerror.nn.pt2e import (
    LOWERING_COUNTERS,
    Int8ExitStages,
    Pt2eTimes,
    UntiedBottleneck,
    ZeroPaddedConv2d,
    pad_single_channel_convs,
    quantize_exit_stages,
    quantize_pt2e,
    untie_relus,
)


def _prepare(module, x):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    return prepare_pt2e(torch.export.export(module.eval(), (x,)).module(), quantizer)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_untie_relus_keeps_the_state_dict_and_the_function(arch):
    # zero_init_residual off: with it every block's last BatchNorm scales by 0, so the
    # ReLUs inside the blocks (those untied) added nothing to the outputs compared below:
    # an untied block that dropped relu1 (BasicBlock) or relu2 (Bottleneck) passed
    model = fashion_resnet(arch, seed=2, zero_init_residual=False).eval()
    untied = untie_relus(model)
    a, b = model.state_dict(), untied.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), untied(x))
    for block in [*untied.layer1, *untied.layer4]:
        relus = [m for m in block.children() if isinstance(m, nn.ReLU)]
        assert len(relus) == (3 if arch == "resnet50" else 2)
        assert len({id(r) for r in relus}) == len(relus)
    assert type(model.layer1[0]).__name__ in ("BasicBlock", "Bottleneck")  # left alone


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_untie_relus_keeps_each_module_s_mode(arch):
    """A training network with frozen BatchNorms (evaluation mode, as in fine-tuning): each
    untied block set every module it took over to the block's mode, so the copy normalised
    with batch statistics, computed another function and moved the running statistics."""
    model = fashion_resnet(arch, seed=1, zero_init_residual=False).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    untied = untie_relus(model)
    assert [(n, m.training) for n, m in untied.named_modules() if not isinstance(m, nn.ReLU)] \
        == [(n, m.training) for n, m in model.named_modules() if not isinstance(m, nn.ReLU)]
    assert all(m.training for m in untied.modules() if isinstance(m, nn.ReLU))
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), untied(x))
    a, b = model.state_dict(), untied.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("activation", [nn.ReLU6(), nn.SiLU(), nn.LeakyReLU(0.1)])
def test_untie_relus_keeps_another_activation_and_refuses_one_with_parameters(activation):
    """A torchvision block whose ``relu`` was swapped for another activation: untying put a
    ReLU at each call site, another function without a word (probe_untie_activation: the
    untied resnet18's logits 0.69 off with ReLU6, 1.20 with SiLU, 0.54 with LeakyReLU; a
    PReLU's weight left the state dict)."""
    model = torchvision.models.resnet18(num_classes=5).eval()
    for block in [*model.layer1, *model.layer2, *model.layer3, *model.layer4]:
        block.relu = activation
    untied = untie_relus(model)
    x = 3 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), untied(x))
    sites = [untied.layer2[0].relu1, untied.layer2[0].relu2]
    assert all(type(a) is type(activation) for a in sites) and sites[0] is not sites[1]
    model.layer1[0].relu = nn.PReLU()
    with pytest.raises(ValueError, match="activation, PReLU, holds parameters or buffers"):
        untie_relus(model)


def test_untie_relus_refuses_hooks_it_would_drop():
    """Hooks on a block or on its shared ReLU: the untied copy (a new block, a new ReLU at
    each call site) called none of them (a forward hook on resnet18's layer1.0 and one on
    its relu: two ReLU calls and one block call on the model, none on the untied copy)."""
    model = torchvision.models.resnet18(num_classes=5).eval()
    for where, module in (("layer1.0", model.layer1[0]), ("layer2.1.relu", model.layer2[1].relu)):
        handle = module.register_forward_hook(lambda *args: None)
        with pytest.raises(ValueError, match=rf"^{re.escape(where)} has forward hooks"):
            untie_relus(model)
        handle.remove()
    handle = model.layer3[0].register_forward_pre_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"layer3\.0 has forward pre hooks"):
        untie_relus(model)
    with pytest.raises(ValueError, match="the block has forward pre hooks"):
        untie_relus(model.layer3[0])
    handle.remove()
    calls = []  # a hook inside a block (its conv, which the untied block keeps) is kept
    model.layer3[0].conv1.register_forward_hook(lambda *args: calls.append(1))
    untied = untie_relus(model)
    assert type(untied.layer3[0]).__name__ == "UntiedBasicBlock"
    with torch.no_grad():
        untied(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_a_block_used_at_two_places_is_untied_at_both():
    """A block object used twice (weights shared between two places): untie_relus skipped
    its second place (named_children skips a module met before), which kept its tied ReLU,
    and quantize_pt2e stopped in prepare_pt2e with "Input partition has more than one
    output node" (probe_shared_block.log)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = torchvision.models.resnet.BasicBlock(8, 8)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block, block,
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    untied = untie_relus(net)
    assert [type(m).__name__ for m in untied[1:3]] == ["UntiedBasicBlock"] * 2
    assert untied[1] is not untied[2] and untied[1].conv1 is untied[2].conv1  # still shared
    assert list(untied.state_dict()) == list(net.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 8, 8, generator=gen)
    with torch.no_grad():
        assert torch.equal(untied(x), net(x))
        q = quantize_pt2e(net, [torch.randn(8, 3, 8, 8, generator=gen)], compile=False)
        assert q(x).shape == (5, 4)


def test_tied_relu_is_the_trap_and_untying_removes_it():
    block = torchvision.models.resnet.Bottleneck(64, 16).eval()
    x = torch.randn(2, 64, 8, 8)
    with pytest.raises(ValueError, match="Input partition has more than one output node"):
        _prepare(block, x)
    untied = untie_relus(block)
    assert isinstance(untied, UntiedBottleneck)
    _prepare(untied, x)


def test_padding_a_single_channel_conv_keeps_its_function():
    model = nn.Sequential(nn.Conv2d(1, 8, 7, stride=2, padding=3, bias=False), nn.ReLU()).eval()
    padded = pad_single_channel_convs(model)
    assert isinstance(padded[0], ZeroPaddedConv2d) and padded[0].conv.in_channels == 2
    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(padded(x), model(x), rtol=1e-6, atol=1e-6)
    assert isinstance(model[0], nn.Conv2d)  # left alone


def test_a_single_channel_conv_used_at_two_places_is_padded_at_both():
    """A one-channel convolution used twice was padded at its first place only (named_children
    skips a module met before); compiled, quantize_pt2e then stopped on the second with
    inductor's "expected size 8==8, stride 1==64 at dim=1", the trap the padding removes
    (probe_shared_pad.before.log; after: within 0.0011 of float)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(1, 8, 3, padding=1)
        net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 1, 1), conv, nn.ReLU()).eval()
    padded = pad_single_channel_convs(net)
    assert isinstance(padded[0], ZeroPaddedConv2d) and padded[3] is padded[0]
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(padded(x), net(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A briefly trained tiny early-exit ResNet


def _tiny_resnet(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                          num_classes=10)
        model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _task(n, seed, templates):
    """Ten classes: a fixed random 32×32 template per class plus white noise of twice its
    standard deviation; after 60 steps the exits reach about 55, 93, 99.7 and 99.8% top-1."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return templates[labels] + 2 * torch.randn(n, 1, 32, 32, generator=gen), labels


@pytest.fixture(scope="module")
def trained():
    """An untrained network's logits are nearly tied, so INT8 noise flips its arg-max at
    random; 60 steps on a learnable task give the margins a trained network has."""
    templates = torch.randn(10, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    model = EarlyExitResNet(_tiny_resnet(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(60):
        x, y = _task(32, 100 + step, templates)
        loss = sum(nn.functional.cross_entropy(z, y) for z in model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib = [_task(32, 1000 + i, templates)[0] for i in range(4)]
    test_x, test_y = _task(200, 2000, templates)
    return model, calib, test_x, test_y


def _agreement(a, b):
    return float((a.argmax(1) == b.argmax(1)).double().mean())


def _check_agreement(ref, got, labels):
    """At least 99% top-1 agreement at the last exit and at every exit that is itself
    accurate (>= 90%). The first exit, about 55% accurate after 60 steps, has logits within
    0.03 of each other on many images, and INT8 noise flips 0-4% of its arg-maxes
    (measured: 96% compiled on AMX and AVX512-VNNI, 98-100% uncompiled and on AVX2), so it
    gets 90%."""
    agreement = [_agreement(r, g) for r, g in zip(ref, got)]
    accuracy = [float((r.argmax(1) == labels).double().mean()) for r in ref]
    assert agreement[-1] >= 0.99, (agreement, accuracy)
    for a, acc in zip(agreement, accuracy):
        assert a >= (0.99 if acc >= 0.9 else 0.90), (agreement, accuracy)
    return agreement


def test_quantizing_the_stages_gives_every_module_its_own_mode_back():
    """The frozen-backbone pattern (heads training, backbone BatchNorms in evaluation mode)
    survives quantize_exit_stages, which runs the stages in evaluation mode."""
    model = EarlyExitResNet(fashion_resnet("resnet18", seed=1).eval(), seed=0)
    model.train()
    model.backbone.eval()
    before = {name: m.training for name, m in model.named_modules()}
    quantize_exit_stages(model, [torch.randn(4, 1, 32, 32)], compile=False)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_pt2e_quantized_stages_agree_with_fp32_uncompiled(trained):
    """The fast check: each stage exported, quantized and converted (not compiled); the
    quantized graphs agree with float32 top-1 on at least 99% of 200 images (see
    :func:`_check_agreement`)."""
    model, calib, x, y = trained
    q = quantize_exit_stages(model, calib, compile=False)
    with torch.no_grad():
        ref, got = model(x), q(x)
    _check_agreement(ref, got, y)
    assert all(s.lowered == {} for s in q.stages)
    assert q.saturates_pairs is False  # float ops only


class _LinearStage(nn.Module):
    """An exit stage of two linear layers: (features, logits)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return h, self.head(h)


def _linear_int8_stages() -> Int8ExitStages:
    """Two _LinearStage networks quantized (uncompiled), the second calibrated on the
    first's features."""
    torch.manual_seed(0)
    floats = [_LinearStage().eval(), _LinearStage().eval()]
    calib = [torch.randn(8, 4, generator=torch.Generator().manual_seed(1))]
    return Int8ExitStages((quantize_pt2e(floats[0], calib, compile=False),
                           quantize_pt2e(floats[1], [floats[0].body(calib[0]).detach()],
                                         compile=False)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_stages_refuse_a_non_finite_input_on_every_exit_s_logits_too(bad):
    """The INT8 stages quantize NaN and Inf to ordinary codes: called for every exit's
    logits (the path the early_exit study's threshold sweeps take), they gave finite logits,
    which exit_result_from_logits exited at the first exit, where the float stages' NaN
    logits are refused and run() refuses the input (probe_int8_call_nan.before.log)."""
    q = _linear_int8_stages()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    rule = ExitRule("max-softmax", (0.0,))
    assert exit_result_from_logits(list(q(x)), rule).exit_index.tolist() == [0, 0, 0]
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x holds NaN or Inf values"):
        q(x)
    with pytest.raises(ValueError, match="x holds NaN or Inf values"):
        q.run(x, rule)


def test_the_recorded_times_are_the_intervals_between_the_steps(monkeypatch):
    """Each Pt2eTimes field is the interval of its own step and the stage totals add up to
    the whole, checked on a fake clock (not the wall clock: the project times nothing in a
    test). The clock's k-th reading is 2**k, so every interval is a distinct sum of powers
    of two and a field taken over the wrong readings, or a step left out of a total, gives
    another number, exactly."""
    readings = []

    def clock():
        readings.append(2.0 ** len(readings))
        return readings[-1]

    monkeypatch.setattr("qerror.nn.pt2e.time", types.SimpleNamespace(perf_counter=clock))
    q = _linear_int8_stages()
    assert len(readings) == 12  # six per stage: before export and after each of five steps
    for k, stage in enumerate(q.stages):
        r = readings[6 * k:6 * k + 6]
        assert stage.times == Pt2eTimes(r[1] - r[0], r[2] - r[1], r[3] - r[2], r[4] - r[3],
                                        r[5] - r[4])
        assert stage.times.total == r[5] - r[0]
    assert q.compile_seconds == (readings[5] - readings[4]) + (readings[11] - readings[10])
    assert q.quantize_seconds == (readings[4] - readings[0]) + (readings[10] - readings[6])
    assert q.compile_seconds + q.quantize_seconds == \
        (readings[5] - readings[0]) + (readings[11] - readings[6])


@pytest.mark.slow
def test_int8_compiled_early_exit_agrees_with_fp32_and_runs_any_batch(trained):
    model, calib, x, y = trained
    q = quantize_exit_stages(model, calib)
    # Inductor replaced every convolution and linear layer with oneDNN's quantized kernels.
    for stage in q.stages:
        assert set(stage.lowered) == set(LOWERING_COUNTERS)
        assert stage.lowered["qconv_unary_lower_count"] > 0
    assert q.stages[0].lowered["qconv2d_binary_lower_count"] > 0  # conv + residual add
    assert all(s.lowered["qlinear_unary_lower_count"] > 0 for s in q.stages)
    # the per-size record adds up to the total, and the graphs of two or more images have
    # their linear layers on oneDNN (Int8Module.lowered_by_size: not so at one image)
    for s in q.stages:
        assert set(s.lowered_by_size) == {1, 2, 16}
        assert {k: sum(c[k] for c in s.lowered_by_size.values()) for k in LOWERING_COUNTERS} \
            == s.lowered
        assert s.lowered_by_size[2]["qlinear_unary_lower_count"] > 0

    with torch.no_grad():
        ref, got = model(x), q(x)
    _check_agreement(ref, got, y)

    # The runner on INT8 stages: thresholds 1.0 give the INT8 full model; others drop rows,
    # and every batch size (1, 2-15, 16+: the three compiled graphs) gives the same answer.
    full = q.run(x, ExitRule("max-softmax", (1.0, 1.0, 1.0)))
    torch.testing.assert_close(full.logits, got[-1], rtol=0, atol=0)
    rule = ExitRule("entropy", (0.6, 0.6, 0.6))
    whole = q.run(x, rule)
    assert whole.rows_per_stage[0] == 200 and whole.rows_per_stage[-1] < 200
    graphs = counters["stats"]["unique_graphs"]
    start = 0
    for size in (1, 7, 16, 37, 139):
        part = q.run(x[start:start + size], rule)
        assert torch.equal(part.exit_index, whole.exit_index[start:start + size])
        # oneDNN may pick other kernels for other batch sizes; the logits stay within
        # a few output LSB of each other.
        torch.testing.assert_close(part.logits, whole.logits[start:start + size],
                                   rtol=0, atol=0.05)
        start += size
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up compiled every graph


@pytest.mark.slow
def test_graphs_compiled_after_the_warm_up_are_lowered_and_recorded():
    """A batch size no warm-up graph serves, and a channels-last input, compile new graphs
    on their first call: under inductor freezing, as the warm-up's, so their convolutions
    and linear layer are lowered to oneDNN, and the lowering is recorded under the call's
    batch size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            torchvision.models.resnet.BasicBlock(8, 8),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    gen = torch.Generator().manual_seed(1)
    q = quantize_pt2e(net, [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)],
                      warmup_sizes=(2,))
    warm = dict(q.lowered_by_size[2])
    assert warm["qconv_unary_lower_count"] > 0 and warm["qlinear_unary_lower_count"] > 0
    x = torch.randn(20, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = q.converted(x)
    graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0.1)
    assert counters["stats"]["unique_graphs"] > graphs  # 16 and up: a graph of its own
    assert q.lowered_by_size[20] == warm  # the same patterns, lowered as in the warm-up
    graphs = counters["stats"]["unique_graphs"]
    q(x[:2].contiguous(memory_format=torch.channels_last))
    assert counters["stats"]["unique_graphs"] > graphs
    assert q.lowered_by_size[2]["qconv_unary_lower_count"] == \
        2 * warm["qconv_unary_lower_count"]
    assert q.lowered == {k: sum(c[k] for c in q.lowered_by_size.values())
                         for k in LOWERING_COUNTERS}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_pt2e(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="float32"):
        quantize_pt2e(nn.Linear(2, 2), [torch.zeros(3, 2, dtype=torch.float64)])
    with pytest.raises(TypeError, match="EarlyExitResNet"):
        quantize_exit_stages(nn.Linear(2, 2), [torch.zeros(3, 2)])
    # a module of another dtype stopped in its first layer ("Input type (float) and bias
    # type (double) should be the same"), naming neither the module nor the remedy
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=f"module must be float32 on the CPU .* holds "
                                             f"{dtype} tensors; pass module.float"):
            quantize_pt2e(nn.Linear(2, 2).to(dtype), [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match=r"model must be float32 on the CPU .* holds "
                                         r"torch.float64 tensors; pass model.float\(\).cpu"):
        quantize_exit_stages(EarlyExitResNet(_tiny_resnet(0)).double(), [torch.zeros(3, 1, 8, 8)])
    with pytest.raises(ValueError, match="calibration holds a single image; give at least two"):
        quantize_pt2e(nn.Linear(2, 2), [torch.zeros(1, 2)])
    # running: float64 or half inputs failed inside torchao ("Expecting input to have dtype
    # torch.float32") or, compiled, with a dynamo trace
    q = quantize_pt2e(nn.Linear(2, 2), [torch.randn(4, 2)], compile=False)
    assert q(torch.zeros(3, 2)).shape == (3, 2)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=f"takes float32 CPU tensors .* got {dtype}"):
            q(torch.zeros(3, 2, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_calibration_holding_nan_or_inf_is_refused_naming_the_batch(bad):
    """A NaN or Inf in a calibration batch stopped in the histogram observer with torch's
    "torch.histc: range of [nan, nan] is not finite", naming neither the calibration nor
    the batch."""
    calib = [torch.randn(4, 2), torch.randn(4, 2)]
    calib[1][2, 1] = bad
    with pytest.raises(ValueError, match=r"calibration\[1\] holds NaN or Inf values"):
        quantize_pt2e(nn.Linear(2, 2), calib, compile=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["0.weight", "1.weight", "1.running_var"])
def test_a_module_holding_nan_or_inf_is_refused_naming_the_tensor(where, bad):
    """A NaN in a weight, or in a BatchNorm's weight or variance (folded into the
    convolution's), stopped in torchao's weight observer with "AssertionError: min
    tensor([nan, ...]) should be less than max", naming neither the module nor the tensor;
    an Inf one was quantized without a word (probe_nonfinite_weights.log)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        net.state_dict(keep_vars=True)[where].view(-1)[0] = bad
    said = rf"the module holds non-finite values \(NaN or Inf\), .*: {re.escape(where)} holds 1 (NaN|Inf);"
    with pytest.raises(ValueError, match=said):
        quantize_pt2e(net, [torch.randn(4, 3, 6, 6)], compile=False)
    model = EarlyExitResNet(_tiny_resnet(0))
    with torch.no_grad():
        model.backbone.layer1[0].bn1.running_var[0] = bad
    with pytest.raises(ValueError, match=r"the model holds non-finite values .*: "
                                         r"backbone\.layer1\.0\.bn1\.running_var holds 1 (NaN|Inf);"):
        quantize_exit_stages(model, [torch.randn(4, 1, 32, 32)], compile=False)


def test_calibration_on_another_device_is_refused_naming_the_batch():
    """A calibration batch off the CPU (here on the meta device, which any machine has)
    stopped in the finiteness check with "Tensor.item() cannot be called on meta tensors"
    (before it, at the export, with torch's device mismatch)."""
    calib = [torch.randn(4, 2), torch.randn(4, 2, device="meta")]
    with pytest.raises(ValueError, match=r"calibration\[1\] must be a non-empty float32 CPU "
                                         r"batch .* got torch.float32 on meta \(4, 2\)"):
        quantize_pt2e(nn.Linear(2, 2), calib, compile=False)


def test_calibration_batches_of_other_sample_shapes_are_refused_naming_the_batch():
    """The graph is exported on one batch and takes its sample shape only: a calibration
    batch of another (its images larger, or more channels) stopped in the graph's guard,
    "AssertionError: Guard failed: input.size()[2] == 8", the calibration unnamed."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)).eval()
    for other in ((4, 3, 16, 16), (4, 4, 8, 8), (4, 3, 8)):
        calib = [torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(*other)]
        said = f"calibration[2] holds samples of shape {other[1:]} and calibration[0] of " \
               "(3, 8, 8)"
        with pytest.raises(ValueError, match=re.escape(said)):
            quantize_pt2e(net, calib, compile=False)


def test_a_max_batch_below_a_calibration_batch_or_below_two_is_refused():
    """max_batch below a calibration batch stopped in torch: the export's example with
    "ConstraintViolationError: 4 not in range [2, 2]", a later batch in the prepared graph's
    guard "input.size()[0] <= 8"; max_batch 1 with "Cannot create Dim with inconsistent
    min=1, max=1"."""
    net = nn.Linear(2, 2)
    for max_batch, calib, largest in ((2, [torch.randn(4, 2)], 4),
                                      (8, [torch.randn(4, 2), torch.randn(16, 2)], 16)):
        with pytest.raises(ValueError, match=rf"max_batch \({max_batch}\) is below the largest "
                                             rf"calibration batch \({largest} samples\)"):
            quantize_pt2e(net, calib, compile=False, warmup_sizes=(1,), max_batch=max_batch)
    with pytest.raises(ValueError, match="max_batch must be an int >= 2, got 1$"):
        quantize_pt2e(net, [torch.randn(1, 2)] * 2, compile=False, warmup_sizes=(1,),
                      max_batch=1)
    q = quantize_pt2e(net, [torch.randn(1, 2)] * 2, compile=False, warmup_sizes=(1,),
                      max_batch=2)  # the two single images make an example batch of 2
    assert q(torch.randn(2, 2)).shape == (2, 2)


def test_a_call_with_another_sample_shape_or_too_large_a_batch_is_refused():
    """The exported graph takes its example's sample shape and batches up to max_batch: a
    call with another stopped in the graph's guard, "AssertionError: Guard failed:
    input.size()[1] == 3", which says neither what the module takes nor what to do."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)).eval()
    q = quantize_pt2e(net, [torch.randn(4, 3, 8, 8)], compile=False, warmup_sizes=(1,),
                      max_batch=8)
    for shape in ((2, 4, 8, 8), (2, 3, 16, 16), (3, 8, 8), (2, 3, 8, 8, 1)):
        said = f"takes batches (N, 3, 8, 8) as it was exported, got {shape}"
        with pytest.raises(ValueError, match=re.escape(said)):
            q(torch.randn(*shape))
    with pytest.raises(ValueError, match=r"a batch of 9 is above the exported graph's "
                                         r"max_batch \(8\); split it"):
        q(torch.randn(9, 3, 8, 8))
    assert q(torch.randn(8, 3, 8, 8)).shape == (8, 4, 1, 1)
    assert (q.sample_shape, q.max_batch) == ((3, 8, 8), 8)


def test_calibration_that_starts_with_one_image_exports_a_dynamic_batch():
    """A first batch of one image would fix the exported batch size to 1: the example is
    the first batch of two or more, or the first two single images together."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    gen = torch.Generator().manual_seed(1)
    for calib in ([torch.randn(1, 4, generator=gen), torch.randn(5, 4, generator=gen)],
                  [torch.randn(1, 4, generator=gen), torch.randn(1, 4, generator=gen)]):
        q = quantize_pt2e(net, calib, compile=False)
        x = torch.randn(6, 4, generator=gen)
        assert q(x).shape == (6, 3) and q(x[:1]).shape == (1, 3)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        untie_relus("resnet50")


def test_an_uncompiled_module_saturates_nothing():
    """The converted graph runs float ops only: no int16 pair sum to saturate."""
    q = quantize_pt2e(nn.Linear(2, 2), [torch.randn(4, 2)], compile=False)
    assert q.saturates_pairs is False


# A child process, since oneDNN reads ONEDNN_MAX_CPU_ISA once: a compiled convolution whose
# activations use the full range 0..255 against weights of both signs near the channel's
# maximum, so that many adjacent (uint8, int8) pair sums leave int16 (255 * 127 * 2 > 32767).
# Its float output is held against two accumulators computed from the converted graph's own
# codes and scales: the exact one, and the one with the int16 saturation of qerror's oneDNN
# model (qerror.nn.int8, Library.ONEDNN). oneDNN turns the exact int32 accumulator a into
# a * s_x * s_w[c] + b in float32: from int32 (exact below 2**24), s_x to float32, two
# products and a sum, each rounding once, so the kernel's value lies within 8u (|a s_x s_w| +
# |b|) of the model it follows (u = 2**-24), and each difference is given in those bounds.
_SATURATION_CHILD = r"""
import functools, json, warnings
import numpy as np, torch
import torch.nn.functional as F
from torch import nn
from qerror import QParams
from qerror.nn import int8
from qerror.nn.pt2e import quantize_pt2e

warnings.filterwarnings("ignore")
g = torch.Generator().manual_seed(0)
net = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1)).eval()
with torch.no_grad():
    net[0].weight.copy_(torch.sign(torch.randn(16, 32, 3, 3, generator=g))
                        * (0.5 + 0.5 * torch.rand(16, 32, 3, 3, generator=g)))
calib = torch.rand(4, 32, 6, 6, generator=g) * 4
q = quantize_pt2e(net, [calib], warmup_sizes=(2,))
gm = q.converted
attr = lambda node: functools.reduce(getattr, node.target.split("."), gm)
ops = torch.ops.quantized_decomposed
qx = next(n for n in gm.graph.nodes if n.target == ops.quantize_per_tensor.default)
dw = next(n for n in gm.graph.nodes if n.target == ops.dequantize_per_channel.default)
conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)
sx, zx = float(qx.args[1]), int(qx.args[2])
wq, sw = attr(dw.args[0]).to(torch.float64), attr(dw.args[1]).to(torch.float64)
b = attr(conv.args[2]).detach().to(torch.float64).reshape(1, -1, 1, 1)
# Inputs on code centres (no code depends on how the graph rounds x / s_x), all codes used.
codes = torch.clamp(torch.round(calib[:2].double() / sx) + zx, 0, 255)
x = ((codes - zx) * sx).float()
assert torch.equal(torch.round(x.double() / sx) + zx, codes)
acc = F.conv2d(codes - zx, wq, padding=1)
layer = nn.Conv2d(32, 16, 3, padding=1)
with torch.no_grad():
    layer.weight.copy_(wq * sw.reshape(-1, 1, 1, 1))
qp = int8.LayerQParams(QParams(sx, zx), QParams(sw.numpy(), 0), QParams(1.0, 0))
plan = int8._plan(layer, qp, bn=None, relu=False, act_spec=int8.ACTIVATION_SPEC,
                  out_spec=int8.ACTIVATION_SPEC, name="conv", engine=None,
                  library=int8.Library.ONEDNN)
corr = plan._saturation(codes.to(torch.int32), plan.pairs[int8.ScaleArithmetic.RECIPROCAL],
                        acc.shape)
scale = sx * sw.reshape(1, -1, 1, 1)
with torch.no_grad():
    y = q(x).double()
out = {"recorded": q.saturates_pairs, "probe": int8.kernel_probe("onednn").saturates_pairs,
       "pairs_saturated": int((corr != 0).sum())}
for name, a in (("exact", acc), ("saturating", acc + corr)):
    bound = 8 * 2.0**-24 * ((a * scale).abs() + b.abs())
    out[name] = float(((y - (a * scale + b)).abs() / bound).max())
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, "AVX2", "AVX512_CORE"])
def test_the_compiled_module_records_whether_its_kernels_saturate(cap):
    """Int8Module.saturates_pairs is the answer of oneDNN's kernels, not of the CPU: with
    oneDNN held to AVX2 or to AVX-512 without VNNI (ONEDNN_MAX_CPU_ISA, on any CPU of this
    kind) it saturates and the compiled convolution follows the saturating accumulator; left
    to the CPU, it follows whichever the record names (exact on AVX512-VNNI and AMX,
    saturating on AVX2), and the other accumulator is far outside the float32 bound. Held
    to AVX512_CORE on an AMD EPYC, oneDNN pairs some products otherwise than modelled (no
    pipeline is faithful there) and was recorded None, "could not tell", though it
    saturates."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cap is not None:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    run = subprocess.run([sys.executable, "-c", _SATURATION_CHILD], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["recorded"] is out["probe"] is not None
    if cap is not None:
        assert out["recorded"] is True
    assert out["pairs_saturated"] > 0
    follows, other = ("saturating", "exact") if out["recorded"] else ("exact", "saturating")
    assert out[follows] <= 1, out
    assert out[other] > 1000, out


def test_a_block_of_ones_own_calling_one_relu_twice_is_named():
    """untie_relus unties torchvision's blocks only; a block of the user's own that calls its
    one ReLU at two places stopped in torchao with "Input partition has more than one output
    node", naming nothing. The error names the module and its calls, and what to do."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.c2(self.relu(self.c1(x))) + x)

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block()).eval()
    with pytest.raises(ValueError, match=r"more than one output node\): the module calls "
                       r"1\.relu \(2 calls\) at more than one place") as err:
        quantize_pt2e(net, [torch.randn(4, 3, 8, 8)], compile=False)
    assert "a module of its own" in str(err.value)
    assert not any(m._forward_pre_hooks for m in net.modules())  # the copy was hooked
