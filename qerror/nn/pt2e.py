"""Real INT8 on oneDNN through torchao's PT2E flow, stage by stage for early exit.

* :func:`untie_relus` gives each ReLU call site of torchvision's residual blocks its own
  module (the state dict is unchanged), which PT2E's x86 quantizer needs.
* :func:`quantize_pt2e` exports one module with a dynamic batch dimension, quantizes it
  with :class:`X86InductorQuantizer`'s default config, calibrates, converts and compiles
  it with inductor freezing, and times each step.
* :func:`quantize_exit_stages` does this for every :class:`~qerror.nn.early_exit.ExitStage`
  of an :class:`~qerror.nn.early_exit.EarlyExitResNet`; the result runs with
  :func:`~qerror.nn.early_exit.run_early_exit`.

torchao is imported on first use (it takes seconds), so ``import qerror`` stays light.

Measured (PyTorch 2.14.1, torchao 0.18.0, one thread, a Xeon with AMX): every convolution
and linear layer of the stages is lowered to oneDNN's quantized kernels
(:attr:`Int8Module.lowered`), but for the linear layers of the graph of a batch of one,
which inductor leaves as a float product of dequantized weights
(:attr:`Int8Module.lowered_by_size`). On an AMD EPYC with AVX512-VNNI and no AMX the
batch-one graphs' linear layers were lowered too (the early-exit study's recorded
``lowered_by_size``): which it is depends on the machine, and is recorded, not assumed. On briefly trained tiny ResNets like the tests' one, top-1
agreed with float32 on 100% of 200 images at every exit at least 90% accurate, with
oneDNN on AMX, capped at AVX512-VNNI and capped at AVX2 (``ONEDNN_MAX_CPU_ISA``). AMX and
VNNI gave the same largest logit errors to four digits, AVX2 other ones: its int8
kernels compute differently.

oneDNN's AVX2 kernels (and AVX-512 ones without VNNI) add the products of adjacent
(uint8 activation, int8 weight) pairs in int16 with saturation, as FBGEMM's do
(:mod:`qerror.nn.int8`), and the default config's activations use the full range 0..255
(torchao advises ``reduce_range`` on CPUs without VNNI; this module keeps the default on
every CPU): there the compiled module computes another function than ``converted``, by
many steps wherever a pair sum leaves int16. Measured on the Fashion-MNIST ResNet50
baseline (2,000 test images, 512 calibration images, one AMX machine with oneDNN capped at
AVX2 and not): saturation changed 0.30 % of top-1 predictions against ``converted`` (0.05 %
uncapped) and moved accuracy by no more than sampling does (89.95 % against 89.75 %), while
``reduce_range`` (7-bit activations) cost about a point on both (89.00 % capped, 89.35 %
against 90.30 % uncapped) and doubled or more the disagreement with float32 (3.05 % of
predictions capped, 2.65 % uncapped, against 1.05 % and 0.90 %): the full range is kept. Which kernel ran is asked of oneDNN at run
time (:func:`~qerror.nn.int8.kernel_probe` on the ``onednn`` engine, the same library
under the same ``ONEDNN_MAX_CPU_ISA``) and recorded in :attr:`Int8Module.saturates_pairs`.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qerror._checks import check_count, listing
from qerror.nn._anatomy import eval_mode, forward_calls
from qerror.nn.early_exit import EarlyExitResNet, ExitResult, ExitRule, run_early_exit
from qerror.nn.int8 import Engine, kernel_probe
from qerror.nn.models import non_finite_tensors

__all__ = [
    "LOWERING_COUNTERS",
    "Int8ExitStages",
    "Int8Module",
    "Pt2eTimes",
    "UntiedBasicBlock",
    "UntiedBottleneck",
    "ZeroPaddedConv2d",
    "pad_single_channel_convs",
    "quantize_exit_stages",
    "quantize_pt2e",
    "untie_relus",
]


def _call_site(activation: nn.Module) -> nn.Module:
    """A module of its own for one call site of a block's shared activation: a new ReLU
    where it is one (the same function), a copy of any other (a ``ReLU6`` or ``SiLU`` put
    in torchvision's block), which a ReLU in its place would have replaced by another
    function without a word. ValueError for one with parameters or buffers (a ``PReLU``):
    a copy per call site would split what the call sites share, and the state dict."""
    if type(activation) is nn.ReLU:
        return nn.ReLU()
    if [*activation.parameters(), *activation.buffers()]:
        raise ValueError(f"a residual block's activation, {type(activation).__name__}, holds "
                         "parameters or buffers, which its call sites share: untying it would "
                         "split them (and change the state dict); use a parameter-free "
                         "activation or leave the block tied")
    return copy.deepcopy(activation)


def _keep_modes(untied: nn.Module, block: nn.Module) -> None:
    """The untied block in ``block``'s mode, its new ReLUs too, and every module it took over
    in its own: ``train(mode)`` would set them all, switching a BatchNorm frozen in evaluation
    mode inside a training network to batch statistics (another function)."""
    untied.training = block.training
    for child in untied.children():
        if isinstance(child, nn.ReLU):
            child.training = block.training


class UntiedBasicBlock(torchvision.models.resnet.BasicBlock):
    """torchvision's ``BasicBlock`` with one ReLU module per call site (``relu1``, ``relu2``)
    instead of one ``relu`` called twice; the same parameters and state-dict keys."""

    def __init__(self, block: torchvision.models.resnet.BasicBlock):
        nn.Module.__init__(self)
        self.conv1, self.bn1, self.relu1 = block.conv1, block.bn1, _call_site(block.relu)
        self.conv2, self.bn2, self.relu2 = block.conv2, block.bn2, _call_site(block.relu)
        self.downsample = block.downsample
        self.stride = block.stride
        _keep_modes(self, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class UntiedBottleneck(torchvision.models.resnet.Bottleneck):
    """torchvision's ``Bottleneck`` with one ReLU module per call site (``relu1`` to
    ``relu3``) instead of one ``relu`` called three times; the same parameters and
    state-dict keys."""

    def __init__(self, block: torchvision.models.resnet.Bottleneck):
        nn.Module.__init__(self)
        self.conv1, self.bn1, self.relu1 = block.conv1, block.bn1, _call_site(block.relu)
        self.conv2, self.bn2, self.relu2 = block.conv2, block.bn2, _call_site(block.relu)
        self.conv3, self.bn3, self.relu3 = block.conv3, block.bn3, _call_site(block.relu)
        self.downsample = block.downsample
        self.stride = block.stride
        _keep_modes(self, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


def untie_relus(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every torchvision residual block calls a ReLU module of
    its own at each call site.

    Parameters
    ----------
    model : nn.Module
        Any module; its ``BasicBlock`` and ``Bottleneck`` submodules are replaced in the
        copy by :class:`UntiedBasicBlock` and :class:`UntiedBottleneck` (already untied
        blocks and other modules are kept); a block used at several places is replaced at
        each by an untied block of its own, all sharing its convolutions and BatchNorms.
        ``model`` itself is left alone.

    Returns
    -------
    nn.Module
        The same function of its input, with the same state dict (keys, order and values).
        A block whose ``relu`` is another activation (``ReLU6``, ``SiLU``) gets a copy of it
        at each call site.

    Raises
    ------
    ValueError
        A block's activation holds parameters or buffers (a ``PReLU``), which untying would
        split between the call sites; or a block or its activation has hooks registered on
        it (forward, forward-pre or backward), which the untied block, a new module, would
        not call: register them on the untied model.

    Notes
    -----
    torchvision's ``Bottleneck`` calls its one ``nn.ReLU`` three times (``BasicBlock``
    twice). ``torch.export`` then records every call under the same module, and the
    source partitions :class:`X86InductorQuantizer` matches its conv-add-ReLU fusion
    against have one input partition with several output nodes; ``prepare_pt2e`` stops
    with ``ValueError: Input partition has more than one output node``. A ReLU has no
    parameters or buffers, so giving each call site its own changes no state-dict entry.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    untie = {torchvision.models.resnet.BasicBlock: UntiedBasicBlock,
             torchvision.models.resnet.Bottleneck: UntiedBottleneck}
    if type(model) in untie:
        _check_no_hooks(model, "the block")
        return untie[type(model)](model)
    # Every place a block sits, each with an untied block of its own: named_children and
    # named_modules skip a module met before, which left a block used twice tied at its
    # second place (and prepare_pt2e stopped on it).
    for name, child in list(model.named_modules(remove_duplicate=False)):
        if type(child) in untie:
            _check_no_hooks(child, name)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, untie[type(child)](child))
    return model


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _check_no_hooks(block: nn.Module, name: str) -> None:
    """ValueError where ``block`` or its shared activation has hooks of its own: the untied
    block is a new module with a new ReLU at each call site, so they would be lost."""
    for where, module in ((name, block), (f"{name}.relu", block.relu)):
        kinds = [k.strip("_").removesuffix("s").replace("_", " ") for k in _HOOKS
                 if getattr(module, k, None)]
        if kinds:
            raise ValueError(f"{where} has {', '.join(kinds)}s registered on it, which the "
                             "untied block (a new module, a ReLU of its own at each call "
                             "site) would not call: remove them and register them on the "
                             "model untie_relus returns (its relu1, relu2, relu3 for the "
                             "activation's)")


class ZeroPaddedConv2d(nn.Module):
    """A convolution with ``extra`` zero input channels appended to its input and to its
    weight: the same function of the original input. Built by
    :func:`pad_single_channel_convs`."""

    def __init__(self, conv: nn.Conv2d, extra: int = 1):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("only convolutions with groups=1 can be padded")
        self.extra = check_count(extra, "extra", 1)
        self.conv = nn.Conv2d(conv.in_channels + self.extra, conv.out_channels,
                              conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                              bias=conv.bias is not None, padding_mode=conv.padding_mode)
        self.conv.to(dtype=conv.weight.dtype, device=conv.weight.device)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :conv.in_channels] = conv.weight
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
        self.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 0, 0, 0, 0, self.extra)))


def pad_single_channel_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``Conv2d`` layers with one input channel take a second,
    zero channel (:class:`ZeroPaddedConv2d`), at every place it is used (one padded module
    for a convolution used at several); ``model`` is left alone.

    Notes
    -----
    With PyTorch 2.14 and torchao 0.18, inductor's lowering of a quantized convolution
    with a single input channel and a dynamic batch size predicts a channels-last output
    while oneDNN's kernel returns a contiguous one (a (N, 1, H, W) tensor has the same
    strides in both formats), and the compiled code stops with "expected size ...,
    stride ..." on its first call with a batch of two or more. Two input channels remove
    the ambiguity. The zero channel changes no output: its weights are zero, and zero is
    exactly representable on every affine grid the observers choose (their range always
    includes 0). It does add zeros to what the input's histogram observer sees, which
    can move the input's scale slightly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)

    def single(m: nn.Module) -> bool:
        return type(m) is nn.Conv2d and m.in_channels == 1 and m.groups == 1

    if single(model):
        return ZeroPaddedConv2d(model)
    # Every place a convolution sits (named_children skips a module met before, which left
    # one used twice unpadded at its second place), one padded module per convolution, so
    # a convolution used at several places stays one.
    padded: dict[int, ZeroPaddedConv2d] = {}
    for name, child in list(model.named_modules(remove_duplicate=False)):
        if single(child):
            if id(child) not in padded:
                padded[id(child)] = ZeroPaddedConv2d(child)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, padded[id(child)])
    return model


@dataclass(frozen=True)
class Pt2eTimes:
    """Seconds spent quantizing one module: ``export`` (``torch.export``), ``prepare``
    (annotation and observers), ``calibrate``, ``convert``, and ``compile`` (the first
    calls of the compiled module, which is when inductor compiles, at every warm-up batch
    size).

    Inductor keeps compiled kernels in an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``,
    by default under the system's temporary folder), so compiling the same graphs again,
    in this process or a later one, takes a fraction of the first, cold, compile; a
    report of compile time should say which it measured."""

    export: float
    prepare: float
    calibrate: float
    convert: float
    compile: float

    @property
    def total(self) -> float:
        return self.export + self.prepare + self.calibrate + self.convert + self.compile


#: Inductor's counters of quantized convolutions and linear layers lowered to oneDNN.
LOWERING_COUNTERS = ("qconv_unary_lower_count", "qconv2d_binary_lower_count",
                     "qlinear_unary_lower_count", "qlinear_binary_lower_count")


@dataclass(frozen=True)
class Int8Module:
    """A module quantized by :func:`quantize_pt2e`.

    Attributes
    ----------
    fn : callable
        The compiled module (or ``converted`` when not compiled).
    converted : torch.fx.GraphModule
        The quantized graph before compilation: quantize and dequantize nodes around
        float ops, the reference of the INT8 arithmetic, runnable eagerly.
    times : Pt2eTimes
    lowered : dict of str to int
        How many patterns inductor lowered to oneDNN's quantized kernels while compiling,
        by counter (:data:`LOWERING_COUNTERS`: ``qconv_unary`` is a convolution with or
        without ReLU, ``qconv2d_binary`` one with a fused residual add, ``qlinear_*``
        the linear layers); summed over the graphs of every warm-up size. Empty when not
        compiled.
    lowered_by_size : dict of int to dict
        The same counts for each warm-up size's call, which compiles the graph that serves
        that size (zeros where an earlier size's graph served it), plus those of any graph a
        later call compiles (a size no warm-up graph serves, a channels-last input), added
        under that call's batch size and to ``lowered``: every call runs under inductor
        freezing, so a graph compiled late is lowered as the warm-up ones are. At a batch of
        one, which dynamo specialises, inductor (PyTorch 2.14.1) can leave the linear layers
        as a float matrix product of dequantized weights (measured on a Xeon with AMX: no
        ``qlinear`` count at size 1, one per linear layer at sizes 2 and 16; on an AMD EPYC
        with AVX512-VNNI one at every size), and batch-1 latency then times float linear
        layers beside INT8 convolutions.
    saturates_pairs : bool or None
        Whether ``fn``'s INT8 kernels add adjacent product pairs in int16 with saturation
        (oneDNN on AVX2, or on AVX-512 without VNNI; not with VNNI or AMX), as
        :func:`~qerror.nn.int8.kernel_probe` finds oneDNN's kernels on this machine: then
        ``fn`` and ``converted`` differ by many steps wherever a pair sum leaves int16.
        None where the probe could not tell; False when not compiled (``converted`` runs
        float ops only).
    sample_shape : tuple of int or None
        The shape of one sample of the export's example (the input is (N, *sample_shape));
        None: not checked.
    max_batch : int or None
        The largest batch the exported graph takes; None: not checked.

    Notes
    -----
    The input's quantize node maps NaN and Inf to ordinary codes, so a non-finite input gives
    finite outputs where the float module gives NaN; a call does not check (it would add a
    pass over the input to every timed call): :func:`~qerror.nn.early_exit.run_early_exit`
    and :class:`Int8ExitStages` refuse such an input, other callers check their own.
    """

    fn: object = field(repr=False)
    converted: torch.fx.GraphModule = field(repr=False)
    times: Pt2eTimes
    lowered: dict = field(default_factory=dict)
    lowered_by_size: dict = field(default_factory=dict)
    saturates_pairs: bool | None = None
    sample_shape: tuple | None = None
    max_batch: int | None = None

    def __call__(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError("an INT8 module takes float32 CPU tensors (it quantizes them "
                             "itself), got "
                             + (f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor)
                                else type(x).__name__) + "; convert with .float().cpu()")
        # else the graph's guard stopped it ("AssertionError: Guard failed: x.size()[1] == 3")
        if self.sample_shape is not None and tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"an INT8 module takes batches (N, "
                             f"{', '.join(map(str, self.sample_shape))}) as it was exported, "
                             f"got {tuple(x.shape)}")
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise ValueError(f"a batch of {x.shape[0]} is above the exported graph's max_batch "
                             f"({self.max_batch}); split it, or quantize with a larger "
                             "max_batch")
        with torch.no_grad():
            if self.fn is self.converted:
                return self.fn(x)
            return _compiled_call(self.fn, x, self.lowered, self.lowered_by_size)


def _compiled_call(fn, x: torch.Tensor, lowered: dict, by_size: dict):
    """Call a compiled module under inductor freezing (without it a graph compiled now would
    lower no quantized pattern: dequantize, float op, quantize), and add what a graph
    compiled by this call lowered to ``by_size[batch]`` and to ``lowered``."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    before = dict(counters["inductor"])
    with _freezing(), warnings.catch_warnings():
        # PyTorch's own oneDNN lowering copies a tensor with torch.tensor(); harmless.
        warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
        out = fn(x)
    if counters["stats"]["unique_graphs"] != graphs:
        size = int(x.shape[0])
        counts = by_size.setdefault(size, dict.fromkeys(LOWERING_COUNTERS, 0))
        for k in LOWERING_COUNTERS:
            new = counters["inductor"][k] - before.get(k, 0)
            counts[k] += new
            lowered[k] += new
    return out


def _check_float32_cpu(module: nn.Module, what: str) -> None:
    """ValueError unless every floating-point parameter and buffer of ``module`` is a
    float32 CPU tensor, as the x86 quantizer's graph computes (otherwise the calibration
    stopped in the first layer: "Input type (float) and bias type (double) should be the
    same")."""
    tensors = [*module.parameters(), *module.buffers()]
    dtypes = sorted({str(t.dtype) for t in tensors
                     if t.is_floating_point() and t.dtype != torch.float32})
    devices = sorted({str(t.device) for t in tensors if t.device.type != "cpu"})
    if dtypes or devices:
        raise ValueError(f"the {what} must be float32 on the CPU to be quantized for x86, but "
                         f"it holds {', '.join(dtypes + devices)} tensors; pass "
                         f"{what}.float().cpu()")


def _check_finite_weights(module: nn.Module, what: str) -> None:
    """ValueError naming every parameter and buffer of ``module`` that holds NaN or Inf
    (a diverged or corrupt model): a NaN weight, or one that BatchNorm folds into a
    convolution's, stopped in the weight observer with torchao's "AssertionError: min
    tensor([nan, ...]) should be less than max", naming neither the module nor the tensor;
    an Inf one was quantized without a word. As :func:`~qerror.nn.models.check_state_dict`
    refuses such a state dict."""
    bad = non_finite_tensors(module.state_dict())
    if bad:
        raise ValueError(f"the {what} holds non-finite values (NaN or Inf), which no "
                         f"quantization range can cover: {listing(bad, 5)}; quantize a model "
                         "with finite weights and buffers")


def _check_batches(batches, what: str) -> list[torch.Tensor]:
    batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    if not batches:
        raise ValueError(f"{what} is empty; give at least one batch")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dtype != torch.float32 or b.ndim < 2 \
                or b.shape[0] == 0 or b.device.type != "cpu":
            raise ValueError(f"{what}[{i}] must be a non-empty float32 CPU batch (N, ...) (the "
                             "x86 quantizer's, as an INT8 module's input), got "
                             f"{getattr(b, 'dtype', type(b).__name__)} "
                             + (f"on {b.device} " if isinstance(b, torch.Tensor) else "")
                             + f"{tuple(getattr(b, 'shape', ()))}")
        if not bool(torch.isfinite(b).all()):
            # the histogram observer stopped in torch.histc ("range of [nan, nan] is not
            # finite"), naming neither the calibration nor the batch
            raise ValueError(f"{what}[{i}] holds NaN or Inf values, which no observer can "
                             "range; calibrate on finite inputs")
        if b.shape[1:] != batches[0].shape[1:]:
            # the exported graph takes the example's sample shape only: the batch stopped in
            # its guard ("Guard failed: input.size()[2] == 8"), the calibration unnamed
            raise ValueError(f"{what}[{i}] holds samples of shape {tuple(b.shape[1:])} and "
                             f"{what}[0] of {tuple(batches[0].shape[1:])}; the exported graph "
                             "takes one sample shape: give every batch the same")
    return batches


def _shared_call_sites(model: nn.Module, example: torch.Tensor, err: Exception) -> str:
    """What to say of prepare_pt2e's "Input partition has more than one output node": the
    leaf modules ``model`` calls at more than one place in a forward of ``example`` (its
    own block calling one ReLU twice, as torchvision's blocks do), counted by hooks."""
    calls = forward_calls(model, [(name, m) for name, m in model.named_modules()
                                  if name and not any(m.children())], example)
    shared = [f"{name} ({n} calls)" for name, n in calls.items() if n > 1]
    where = (f"the module calls {listing(shared)} at more than one place in one forward"
             if shared else "no module is called at two places in one forward (hooks "
             "counted), so the cause is elsewhere in the graph")
    return (f"prepare_pt2e could not match its fusion patterns ({err}): {where}. Give each "
            "call site a module of its own (untie_relus does so for torchvision's BasicBlock "
            "and Bottleneck; an activation without parameters or buffers, as nn.ReLU, "
            "changes no state-dict entry)")


@contextlib.contextmanager
def _freezing():
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = old


def _quantizer():
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    return quantizer


def quantize_pt2e(module: nn.Module, calibration: Iterable[torch.Tensor], *,
                  compile: bool = True, warmup_sizes: Sequence[int] = (1, 2, 16),
                  max_batch: int = 65536) -> Int8Module:
    """Quantize a float32 module to INT8 with torchao's PT2E flow for x86 (oneDNN).

    Parameters
    ----------
    module : nn.Module
        Takes one float32 batch (N, ...); its outputs may be a tensor or a tuple of
        tensors. Its parameters and buffers must be finite float32 CPU tensors. Copied,
        untied (:func:`untie_relus`), its single-input-channel convolutions padded
        (:func:`pad_single_channel_convs`) and put in evaluation mode; the given module is
        left alone.
    calibration : iterable of torch.Tensor
        Float32 input batches the activation observers see. The first of two or more
        images is also the example input of the export; at least two images in all.
    compile : bool
        Compile the converted graph with ``torch.compile`` (inductor, freezing on). Off,
        ``fn`` is the converted graph run eagerly, which computes the quantized function
        with float ops and is slow; it is the compiled module's function only where
        oneDNN's kernels do not saturate int16 pair sums (:attr:`Int8Module.saturates_pairs`).
    warmup_sizes : sequence of int
        Batch sizes the compiled module is first called with, so that compilation
        happens here and is timed in :attr:`Pt2eTimes.compile` rather than in the first
        real call. Three graphs cover every size: dynamo specialises a batch of 1, and
        the meta function of ``aten.conv2d`` branches on a batch below 16 (its choice of
        memory format), so sizes 2 to 15 and 16 upwards compile apart; the default warms
        up one size of each.
    max_batch : int
        Upper bound of the dynamic batch dimension: at least 2 (a dimension bounded by 1 is
        no dynamic one) and at least the largest calibration batch.

    Returns
    -------
    Int8Module

    Raises
    ------
    ValueError
        Where ``prepare_pt2e`` cannot match its fusion patterns because the module calls
        one of its modules at several places in a forward (a block of the user's own
        calling one ReLU twice; torchvision's blocks are untied here): naming each such
        module, counted by hooks on a forward of the example batch.

    Notes
    -----
    The steps, each timed: ``torch.export.export`` with the batch dimension marked
    dynamic (``torch.export.Dim``), so one graph serves any number of samples;
    ``prepare_pt2e`` with :class:`X86InductorQuantizer` and its default config
    (activations: per-tensor affine uint8 from a histogram observer; weights: per-channel
    symmetric int8; BatchNorm folded into the convolutions); the calibration batches;
    ``convert_pt2e``; ``torch.compile`` with ``torch._inductor.config.freezing = True``,
    which lets inductor's quantization passes fold the weights and replace each
    dequantize-convolution-quantize pattern (with its ReLU and residual add) by a oneDNN
    quantized convolution (``onednn.qconv_pointwise``, ``qconv2d_pointwise.binary``) and
    each linear layer by ``onednn.qlinear_pointwise``; in the graph of one image the linear
    layers can stay a float matrix product of dequantized weights, depending on the machine
    (:attr:`Int8Module.lowered_by_size` records what each size's graph got).

    References
    ----------
    .. [1] PyTorch tutorials, "PyTorch 2 Export Quantization with X86 Backend through
       Inductor", https://pytorch.org/tutorials/prototype/pt2e_quant_x86_inductor.html
    """
    from torch._dynamo.utils import counters
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_float32_cpu(module, "module")
    _check_finite_weights(module, "module")
    batches = _check_batches(calibration, "calibration")
    max_batch = check_count(max_batch, "max_batch", 2)
    largest = max(b.shape[0] for b in batches)
    if largest > max_batch:
        # the export stopped on it ("ConstraintViolationError: 4 not in range [2, 2]"), or
        # the calibration in the prepared graph's guard ("input.size()[0] <= 8")
        raise ValueError(f"max_batch ({max_batch}) is below the largest calibration batch "
                         f"({largest} samples), which the exported graph must take: raise "
                         "max_batch or split the batch")
    warmup_sizes = [check_count(s, "each of warmup_sizes (a batch size)", 1)
                    for s in warmup_sizes]
    if any(s > max_batch for s in warmup_sizes):
        raise ValueError(f"warmup_sizes must be batch sizes in [1, {max_batch}], got "
                         f"{warmup_sizes}")
    model = pad_single_channel_convs(untie_relus(module)).eval()
    # A batch of one would specialise the exported batch dimension to 1: the example is
    # the first batch of two or more (or the first two single images together).
    example = next((b for b in batches if b.shape[0] >= 2), None)
    if example is None:
        if len(batches) < 2:
            raise ValueError("calibration holds a single image; give at least two (the "
                             "export's example batch needs two or more to keep its batch "
                             "size dynamic)")
        example = torch.cat(batches[:2])
    with torch.no_grad():
        t0 = time.perf_counter()
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        t1 = time.perf_counter()
        try:
            prepared = prepare_pt2e(exported.module(), _quantizer())
        except ValueError as err:
            if "more than one output node" not in str(err):
                raise
            raise ValueError(_shared_call_sites(model, example, err)) from err
        t2 = time.perf_counter()
        for b in batches:
            prepared(b)
        t3 = time.perf_counter()
        converted = convert_pt2e(prepared)
        t4 = time.perf_counter()
        fn = converted
        by_size: dict[int, dict[str, int]] = {}
        if compile:
            with _freezing(), warnings.catch_warnings():
                # PyTorch's own oneDNN lowering copies a tensor with torch.tensor(); harmless.
                warnings.filterwarnings("ignore", "To copy construct from a tensor",
                                        UserWarning)
                fn = torch.compile(converted)
                for size in dict.fromkeys(warmup_sizes):  # a size again compiles nothing
                    x = example[:1].expand(size, *example.shape[1:]).contiguous()
                    if size > 1:
                        torch._dynamo.maybe_mark_dynamic(x, 0)
                    before = dict(counters["inductor"])
                    fn(x)
                    by_size[size] = {k: counters["inductor"][k] - before.get(k, 0)
                                     for k in LOWERING_COUNTERS}
        t5 = time.perf_counter()
    times = Pt2eTimes(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
    lowered = ({k: sum(c[k] for c in by_size.values()) for k in LOWERING_COUNTERS}
               if compile else {})
    # The compiled graph runs oneDNN's kernels, which saturate int16 pair sums or not
    # depending on the instructions oneDNN picks here: asked of oneDNN, not the CPU flags.
    saturates = kernel_probe(Engine.ONEDNN).saturates_pairs if compile else False
    return Int8Module(fn, converted, times, lowered, by_size, saturates,
                      tuple(example.shape[1:]), max_batch)


@dataclass(frozen=True)
class Int8ExitStages:
    """The stages of an early-exit network, each quantized by :func:`quantize_pt2e`.

    ``stages`` are callable like :class:`~qerror.nn.early_exit.ExitStage` (features and
    logits, float32 between stages) and run with
    :func:`~qerror.nn.early_exit.run_early_exit`; :meth:`run` does that.
    """

    stages: tuple[Int8Module, ...]

    def run(self, x: torch.Tensor, rule: ExitRule) -> ExitResult:
        """Early-exit inference on the INT8 stages (:func:`run_early_exit`)."""
        return run_early_exit(self.stages, x, rule)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The logits of every exit for every sample, as ``EarlyExitResNet.forward``.

        Raises
        ------
        ValueError
            ``x`` holds NaN or Inf values: the stages would quantize them to ordinary codes
            and give finite logits, which the exit decisions taken from them
            (:func:`~qerror.nn.early_exit.exit_result_from_logits`) would take, where the
            float network's NaN logits are refused (as :meth:`run` refuses such an input).
        """
        if isinstance(x, torch.Tensor) and not bool(torch.isfinite(x).all()):
            raise ValueError("x holds NaN or Inf values; the INT8 stages would quantize them "
                             "to ordinary codes and give finite logits: give finite inputs")
        out = []
        h = x
        for stage in self.stages:
            h, logits = stage(h)
            out.append(logits)
        return tuple(out)

    @property
    def saturates_pairs(self) -> bool | None:
        """Whether any stage's kernels saturate int16 pair sums
        (:attr:`Int8Module.saturates_pairs`); None if a stage's probe could not tell."""
        answers = [s.saturates_pairs for s in self.stages]
        return True if True in answers else None if None in answers else False

    @property
    def compile_seconds(self) -> float:
        """Compilation time of all stages (:attr:`Pt2eTimes.compile`)."""
        return sum(s.times.compile for s in self.stages)

    @property
    def quantize_seconds(self) -> float:
        """Export, prepare, calibrate and convert time of all stages."""
        return sum(s.times.total - s.times.compile for s in self.stages)


def quantize_exit_stages(model: EarlyExitResNet, calibration: Iterable[torch.Tensor], *,
                         compile: bool = True, warmup_sizes: Sequence[int] = (1, 2, 16),
                         max_batch: int = 65536) -> Int8ExitStages:
    """Quantize each stage (body and exit head) of an early-exit ResNet on its own.

    Parameters
    ----------
    model : EarlyExitResNet
        Float32, with finite parameters and buffers; left alone.
    calibration : iterable of torch.Tensor
        Float32 image batches (N, C, H, W). Every stage is calibrated on all of them,
        stage ``k`` on the float features the float stages before it produce, so the
        calibration does not depend on any exit rule.
    compile, warmup_sizes, max_batch
        As :func:`quantize_pt2e`.

    Returns
    -------
    Int8ExitStages

    Notes
    -----
    ``torch.export`` captures a graph without data-dependent control flow, and whether a
    sample goes on is decided by its data; so the network is exported, quantized and
    compiled one stage at a time, each with a dynamic batch dimension, and
    :func:`~qerror.nn.early_exit.run_early_exit` drops the samples that leave between
    the compiled stages. Each stage quantizes its own input on entry and returns float32
    features, so adjacent stages meet at one extra quantize-dequantize of the features.
    """
    if not isinstance(model, EarlyExitResNet):
        raise TypeError(f"model must be an EarlyExitResNet, got {type(model).__name__}")
    _check_float32_cpu(model, "model")
    _check_finite_weights(model, "model")
    batches = _check_batches(calibration, "calibration")
    with eval_mode(model):  # each module's own mode back after (a frozen backbone's BN)
        stages = []
        inputs = batches
        for stage in model.stages():
            stages.append(quantize_pt2e(stage, inputs, compile=compile,
                                        warmup_sizes=warmup_sizes, max_batch=max_batch))
            with torch.no_grad():
                inputs = [stage.body(b) for b in inputs]
    return Int8ExitStages(tuple(stages))
