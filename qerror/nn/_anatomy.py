"""The anatomy of a torchvision-style CNN, shared by everything in :mod:`qerror.nn`.

Which modules a network is made of and whether the paired batch can run it
(:func:`check_model`), where its quantized layers are (:func:`layer_names`, :func:`is_block`,
:func:`layer_chains` with the BatchNorm and ReLU that follow each layer,
:func:`bn_fed_layers`, each read from a hook-free ``torch.fx`` trace, :func:`fx_graph`),
folding a BatchNorm into its convolution (:func:`fold_bn`), the
batches a network is fed (:func:`iter_batches`, :func:`batch_images`,
:func:`bn_batches`),
hooks that are always removed (:func:`pre_hooks`), the evaluation-mode guard
(:func:`eval_mode`) and the one activation-range observer (:class:`RangeObserver`) that
calibrates both the simulation (:mod:`qerror.nn.propagate`) and the INT8 cross-check
(:mod:`qerror.nn.int8`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qerror._checks import MAKE_WEIGHT_PLAIN
from qerror.calibration import RangeMethod, RangePolicy, calibrate, qparams_from_range
from qerror.quantizer import QParams, QuantSpec, largest_finite

#: Leaf modules whose evaluation-mode forward treats samples independently (element-wise
#: activations, pooling, dropout, BatchNorm with running statistics).
PER_SAMPLE_LEAVES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish,
    nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Mish, nn.Softplus,
)

LAYERS = (nn.Conv2d, nn.Linear)


def _per_sample_leaf(m: nn.Module) -> bool:
    """A leaf the paired batch runs as it is: a quantized layer, a per-sample module, or an
    empty ``nn.Sequential`` (the identity shortcut of many CIFAR ResNets)."""
    return isinstance(m, LAYERS + PER_SAMPLE_LEAVES) or (isinstance(m, nn.Sequential)
                                                         and len(m) == 0)


class UnsupportedModelError(ValueError):
    """The model holds a module the paired-batch instrumentation cannot run exactly."""


def layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's Conv2d and Linear layers, in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, LAYERS)]


def is_block(module: nn.Module) -> bool:
    """Whether the module is a residual block: torchvision's ``BasicBlock`` or
    ``Bottleneck`` (by class name), a class named ``*Block``, or a module with BatchNorm2d
    children and a ``downsample`` attribute (the shortcut of torchvision's blocks, kept by
    subclasses that rename them, such as :class:`qerror.nn.pt2e.UntiedBottleneck`)."""
    name = type(module).__name__
    if name in ("Bottleneck", "BasicBlock") or name.endswith("Block"):
        return True
    return hasattr(module, "downsample") and any(isinstance(c, nn.BatchNorm2d)
                                                 for c in module.children())


def own_forwards(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Names of the modules that replace ``forward`` on the module itself (an instance
    attribute, as an open measurement or a user's wrapper does): code that patches
    ``forward`` and deletes the patch afterwards must refuse them, or it deletes theirs."""
    return [n for n, m in modules if "forward" in vars(m)]


def check_model(model: nn.Module, *, need_batchnorm: bool = False) -> None:
    """Refuse models the paired batch cannot run exactly, with a message saying why.

    Raises
    ------
    UnsupportedModelError
        A leaf module that is neither a Conv2d/Linear nor known to treat samples
        independently in evaluation mode, a grouped-input layer type (Conv1d, Conv3d,
        transposed convolutions), a subclass of Conv2d or Linear with its own ``forward``
        (which the pass would replace), no Conv2d/Linear at all, a BatchNorm without running
        statistics, or (``need_batchnorm``) no BatchNorm2d.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bad = sorted({type(m).__name__ for m in model.modules()
                  if not list(m.children()) and not _per_sample_leaf(m)})
    if bad:
        raise UnsupportedModelError(
            f"the model has layer types qerror.nn.propagate cannot instrument: {', '.join(bad)}. "
            "Supported: Conv2d and Linear (quantized), and BatchNorm2d, pooling, Flatten, "
            "Dropout, Identity (or an empty Sequential) and the element-wise activations of "
            "torch.nn (ReLU, LeakyReLU, GELU, Tanh, ...; run per sample in eval mode). "
            "Replace or remove the others.")
    if not layer_names(model):
        raise UnsupportedModelError("the model has no Conv2d or Linear layer to quantize")
    own = [f"{n!r} ({type(m).__name__})" for n, m in model.named_modules()
           if isinstance(m, LAYERS) and not _keeps_forward(m)]
    if own:
        # the pass replaces each layer's forward with Conv2d's or Linear's computation on
        # its weight: a subclass's own forward would run in neither half
        raise UnsupportedModelError(
            f"the layers {', '.join(own[:3])}{' and more' if len(own) > 3 else ''} subclass "
            "Conv2d or Linear with a forward of their own, which qerror.nn.propagate "
            "replaces by the plain layer's (the float half would not be the model's output). "
            "Replace each by a plain Conv2d or Linear holding the weight its forward "
            "computes (in evaluation mode, a fixed weight), or measure without them")
    batch_stats = untracked_batchnorms(model, nn.modules.batchnorm._BatchNorm)
    if batch_stats:
        raise UnsupportedModelError(
            f"the BatchNorm layers {', '.join(batch_stats)} keep no running statistics "
            "(track_running_stats=False, or no running_mean/running_var buffers): in "
            "evaluation mode they normalise by each batch's "
            "own statistics, so one image's output depends on the others and on the batch "
            "size. Build them with track_running_stats=True and estimate the statistics "
            "(qerror.nn.bn.estimate_running_stats)")
    if need_batchnorm and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise UnsupportedModelError(
            "the model has no BatchNorm2d: BatchNorm inconsistency and BN re-estimation need "
            "one. Measure drift without them (bn=False), or use a model with BatchNorm")


def untracked_batchnorms(model: nn.Module, kind: type[nn.Module] = nn.BatchNorm2d
                         ) -> list[str]:
    """Names, sorted, of the ``kind`` layers of ``model`` that keep no running statistics:
    built with ``track_running_stats=False``, or without a ``running_mean`` or
    ``running_var`` buffer (torch's evaluation forward reads the buffers, training the
    flag)."""
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, kind)
                  and (not m.track_running_stats or m.running_mean is None
                       or m.running_var is None))


def check_batch(x, name="x") -> torch.Tensor:
    """A non-empty, finite, floating-point batch (N, ...), or a clear error."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return x


def check_own_weight(model: nn.Module, name: str, layer: nn.Module, *, computed: str,
                     tied: str) -> None:
    """Refuse a layer whose weight is not its own parameter of the model: one computed from
    others by a forward pre-hook (``torch.nn.utils.prune``, ``weight_norm``), which would
    overwrite a substituted weight, or one tied to another layer's. ``computed`` and ``tied``
    say what each would do to the caller's result (and, for ``tied``, what to do)."""
    key = f"{name}.weight" if name else "weight"  # "" names the model itself
    named = dict(model.named_parameters(remove_duplicate=False))
    if named.get(key) is not layer.weight:
        raise ValueError(f"the weight of {name!r} is not a parameter of the model but computed "
                         "from others (torch.nn.utils.prune's weight_orig and weight_mask, or "
                         f"weight_norm's weight_g and weight_v): {computed}; make it a plain "
                         f"parameter first ({MAKE_WEIGHT_PLAIN})")
    others = [n for n, p in named.items() if p is layer.weight and n != key]
    if others:
        raise ValueError(f"the weight of {name!r} is also {', '.join(others)} (tied): {tied}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer), where its inputs must be;
    the CPU for a model without either."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in evaluation mode for the block; each module's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.train(t)


def iter_batches(batches, device: torch.device | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, labels or None) of each batch, checked (:func:`check_batch`), and moved to
    ``device`` when one is given (that of the model they feed).

    A single tensor of at most four dimensions is refused (ValueError): iterated, it gives
    its images one at a time, which a convolution takes as unbatched images and a linear
    layer as one vector each, so the mistake surfaced deep in torch ("mat1 and mat2 shapes
    cannot be multiplied") or not at all."""
    one = getattr(batches, "iterable", batches)  # under a progress bar (tqdm's), its own
    if isinstance(one, torch.Tensor) and one.ndim <= 4:
        raise ValueError(f"batches is a single tensor of shape {tuple(one.shape)}, which "
                         "iterates over its images one at a time; pass a list of batches "
                         "([images]) or a DataLoader")
    for item in batches:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ValueError("batches must yield images or (images, labels) pairs")
            x, y = item
        else:
            x, y = item, None
        x = check_batch(x)
        if y is not None:
            y = torch.as_tensor(y)
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels of shape {tuple(y.shape)} do not match a batch of "
                                 f"{x.shape[0]} images")
        if device is not None:
            x = x.to(device)
            y = None if y is None else y.to(device)
        yield x, y


def bn_batches(batches, device: torch.device | None, who: str) -> Iterator[torch.Tensor]:
    """The images of each batch (:func:`iter_batches`) that BatchNorm statistics are
    estimated on: ``(N, C, H, W)`` with ``N >= 2``, or a clear error naming ``who``
    (a single tensor passed for the batches iterates over its images, each a 3-D tensor:
    the error says to wrap it in a list)."""
    for x, _ in iter_batches(batches, device):
        if x.ndim != 4:
            raise ValueError(f"{who} takes batches of images (N, C, H, W), got one of shape "
                             f"{tuple(x.shape)}" + ("; a single tensor of images iterates "
                                                    "over its images one at a time: pass a "
                                                    "list of batches, [images]"
                                                    if x.ndim == 3 else ""))
        if x.shape[0] < 2:
            raise ValueError(f"{who} needs batches of at least 2 images, got one of shape "
                             f"{tuple(x.shape)}")
        yield x


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution equal to ``bn(conv(x))`` with ``bn`` in evaluation mode.

    Parameters
    ----------
    conv : nn.Conv2d
    bn : nn.BatchNorm2d
        In evaluation mode, with running statistics, ``num_features == conv.out_channels``.

    Returns
    -------
    nn.Conv2d
        A copy of ``conv`` with weight ``W_c f_c`` and bias ``(b_c - μ_c) f_c + β_c``,
        ``f_c = γ_c / sqrt(σ²_c + ε)``, computed in float64 and rounded once to the
        convolution's dtype. ``conv`` and ``bn`` are left unchanged.

    Notes
    -----
    Folding is what INT8 engines do before they quantize the weights, so the per-channel
    weight scales are those of the folded weight.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("the BatchNorm is in training mode, where it normalises with batch "
                         "statistics and cannot be folded; call model.eval() (or bn.eval()) "
                         "first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("the BatchNorm keeps no running statistics "
                         "(track_running_stats=False), so there is nothing to fold")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"the BatchNorm has {bn.num_features} features but the convolution "
                         f"has {conv.out_channels} output channels")
    with torch.no_grad():
        wide = torch.float64
        var = bn.running_var.to(wide)
        gamma = bn.weight.to(wide) if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.to(wide) if bn.bias is not None else torch.zeros_like(var)
        factor = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.to(wide) if conv.bias is not None else torch.zeros_like(var)
        weight = conv.weight.to(wide) * factor.reshape(-1, 1, 1, 1)
        bias = (bias - bn.running_mean.to(wide)) * factor + beta
        # A fresh module, not a copy: a copy would carry the original's hooks along.
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, bias=True,
                           padding_mode=conv.padding_mode, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        folded.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        folded.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return folded.train(conv.training)


@dataclass(frozen=True)
class Site:
    """A quantized layer as the network calls it, with the BatchNorm and ReLU after it."""

    name: str
    layer: nn.Module
    bn: nn.BatchNorm2d | None
    relu: bool


def is_relu(node, modules) -> bool:
    """Whether a ``torch.fx`` node applies a ReLU (module, function or method)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _keeps_forward(m: nn.Module) -> bool:
    """Whether ``m`` is a module :func:`check_model` knows (a layer, a per-sample module) or a
    subclass of one that keeps its ``forward``: the graph readers take such a node for that
    module (a BatchNorm's statistics folded, a ReLU fused)."""
    return any(isinstance(m, base) and type(m).forward is base.forward
               for base in LAYERS + PER_SAMPLE_LEAVES)


class _HookFreeTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, calling each traced container's ``forward`` without its hooks,
    with every module :func:`check_model` knows (a layer, a per-sample module) one node, its
    subclasses that keep its ``forward`` too (one with a forward of its own is traced
    through, as any other module)."""

    def call_module(self, m, forward, args, kwargs):
        return super().call_module(m, m.forward, args, kwargs)

    def is_leaf_module(self, m, module_qualified_name):
        # torch.fx keeps only torch.nn's own classes whole: a subclass defined elsewhere
        # is traced through, a layer's call then a bare F.conv2d that no graph reader
        # counts (a later layer's path depth one short) and a BatchNorm's input check
        # control flow that fails the trace. A subclass with a forward of its own is not
        # that module: a node of it would be read as one (a BatchNorm's statistics folded
        # while its forward adds to them)
        return _keeps_forward(m) or super().is_leaf_module(m, module_qualified_name)


def fx_graph(model: nn.Module, who: str, advice: str = "") -> torch.fx.Graph:
    """The ``torch.fx`` graph of ``model``, traced without calling any module's hooks.

    ``torch.fx.symbolic_trace`` records a leaf module (a layer) as one node without calling
    its hooks, but runs a container (a block, a stage) through its ``__call__``, hooks
    included, on tracing proxies: a user's hook that reads a value (``float(out.mean())``,
    ``out.numpy()``) then fails the trace of a network that traces well without it. Here
    every container's ``forward`` is called directly, so no hook, the user's or global,
    runs and the graph is that of the forward passes (a hook that changes a container's
    input or output is not in it, as a layer's hooks are not in ``symbolic_trace``'s).

    Raises
    ------
    ValueError
        The model cannot be traced; the message names ``who`` reads the graph, the error,
        and ``advice`` (appended).
    """
    try:
        return _HookFreeTracer().trace(model)
    except Exception as exc:  # tracing raises many kinds of errors, all meaning "untraceable"
        raise ValueError(f"{who} reads the torch.fx graph, and symbolic tracing failed on "
                         f"this model ({type(exc).__name__}: {exc}){advice}") from exc


def layer_chains(model: nn.Module, fuse_relu: bool, *, who: str,
                 check_layer: Callable[[nn.Module], None] | None = None) -> list[Site]:
    """Every Conv2d and Linear the model calls, with the BatchNorm and ReLU that follow.

    The chains are read from the ``torch.fx`` graph: a BatchNorm is folded when it is the
    convolution's only user, a ReLU fused when it is the only user of the chain's end.
    ``who`` names the caller in error messages; ``check_layer`` refuses a layer the caller
    cannot handle (its message is prefixed with the layer's name).
    """
    modules = dict(model.named_modules())
    graph = fx_graph(model, f"{who} (its conv→BN→ReLU chains)")
    sites: dict[str, Site] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        layer = modules[node.target]
        if isinstance(layer, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                              nn.ConvTranspose3d)):
            raise TypeError(f"layer {node.target!r} is an {type(layer).__name__}; "
                             f"{who} covers nn.Conv2d and nn.Linear only")
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        if node.target in sites:
            raise ValueError(f"layer {node.target!r} is called more than once; shared layers "
                             "are not supported")
        if check_layer is not None:
            try:
                check_layer(layer)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"layer {node.target!r}: {exc}") from exc
        bn, tail = None, node
        users = list(node.users)
        if isinstance(layer, nn.Conv2d) and len(users) == 1 and users[0].op == "call_module" \
                and isinstance(modules.get(users[0].target), nn.BatchNorm2d):
            bn, tail = modules[users[0].target], users[0]
        relu = fuse_relu and len(tail.users) == 1 and is_relu(next(iter(tail.users)), modules)
        sites[node.target] = Site(node.target, layer, bn, relu)
    if not sites:
        raise ValueError("the model calls no nn.Conv2d or nn.Linear layer")
    return list(sites.values())


def path_depths(model: nn.Module) -> dict[str, int]:
    """Path depth of every conv/linear layer: the quantized layers on the longest path from
    the input to its output, itself included.

    Execution order is not depth: in a residual block the shortcut's 1×1 convolution runs
    after the block's third convolution yet lies only one layer below the block's input.
    Growth of the error "with depth" is read against this depth.

    Raises
    ------
    ValueError
        The model cannot be traced by ``torch.fx`` (:func:`fx_graph`).
    UnsupportedModelError
        A layer is called more than once (one depth per module cannot hold both calls).
    """
    modules = dict(model.named_modules())
    graph = fx_graph(model, "path depth")
    depth: dict[torch.fx.Node, int] = {}
    out: dict[str, int] = {}
    for node in graph.nodes:  # topological order
        below = max((depth[a] for a in node.all_input_nodes), default=0)
        layer = modules.get(node.target) if node.op == "call_module" else None
        here = below + isinstance(layer, LAYERS)
        depth[node] = here
        if isinstance(layer, LAYERS):
            if node.target in out:
                # one module called twice: its statistics would be pooled under one depth
                raise UnsupportedModelError(
                    f"layer {node.target!r} is called more than once in the forward pass; "
                    "path depth (and the statistics measured per layer) needs one module per "
                    "call: give each call its own module")
            out[node.target] = here
    return out


def batch_images(item) -> torch.Tensor:
    """The float32 images of a batch given as images or (images, labels), checked as
    :func:`check_batch` checks them (non-empty, finite)."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError("batches must yield float32 image tensors or (images, labels) pairs, "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")
    return check_batch(x, "images")


def forward_calls(model: nn.Module, modules: Iterable[tuple[str, nn.Module]],
                  x: torch.Tensor) -> dict[str, int]:
    """How many times one forward of ``x`` (no autograd) calls each of the named ``modules``
    of ``model``, counted by forward pre-hooks removed afterwards; 0 for one it never calls."""
    calls = {name: 0 for name, _ in modules}

    def counter(name):
        def pre(module, args):
            calls[name] += 1
        return pre

    handles = [m.register_forward_pre_hook(counter(name)) for name, m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@contextlib.contextmanager
def pre_hooks(sites: list[Site], fn) -> Iterator[None]:
    """``fn(site, input)`` before every call of each site's layer, for the block."""
    handles = []
    try:
        for site in sites:
            handles.append(site.layer.register_forward_pre_hook(
                lambda module, args, site=site: fn(site, args[0])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def bn_fed_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Layers whose input is ``relu(bn(...))``, each with that BatchNorm.

    Read from the ``torch.fx`` graph: a Conv2d or Linear whose input is a ReLU (module,
    function or method) of a BatchNorm2d's output. In torchvision's blocks these are
    ``conv{k}`` for k ≥ 2 (fed by ``relu(bn{k-1}(...))``); the stem, each block's first
    conv and downsample (fed by the previous block's ReLU'd residual sum), the classifier and
    a layer fed by a BatchNorm without a ReLU are absent.

    Raises
    ------
    ValueError
        The model cannot be traced by ``torch.fx`` (:func:`fx_graph`).
    """
    modules = dict(model.named_modules())
    graph = fx_graph(model, "which BatchNorm feeds which layer",
                     "; take the layers' input means from measured maps instead "
                     "(source='measured')")
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], LAYERS) \
                or not node.args:
            continue
        feed = node.args[0]
        if isinstance(feed, torch.fx.Node) and is_relu(feed, modules) and feed.args:
            bn = feed.args[0]
            if isinstance(bn, torch.fx.Node) and bn.op == "call_module" \
                    and isinstance(modules[bn.target], nn.BatchNorm2d):
                out[node.target] = modules[bn.target]
    return out


class RangeObserver:
    """The range of one stream of activations, observed batch by batch.

    Parameters
    ----------
    spec : QuantSpec
        The grid whose scale and zero point :meth:`qparams` returns.
    policy : RangePolicy
        What is kept: MINMAX keeps the exact extremes; PERCENTILE and MSE keep, besides the
        extremes, a uniform random sample (with replacement) of at most ``sample_per_batch``
        elements of each batch, on which :func:`qerror.calibrate` chooses the range at the end.
    generator : torch.Generator
        Source of the samples; observers of one network share one, so a calibration pass
        is reproducible from one seed.
    sample_per_batch : int

    Notes
    -----
    Memory is two floats per stream for MINMAX and ``sample_per_batch`` values of the
    activations' dtype per batch otherwise (calibration uses a few batches).

    The range is found for the activations' own dtype (``dtype``, set by the first batch;
    a batch of another dtype is refused): a scale whose grid's ends would overflow it is
    lowered, and a range beyond its largest number refused, as
    :func:`qerror.calibration.qparams_from_range` does for that ``dtype``.
    """

    def __init__(self, spec: QuantSpec, policy: RangePolicy, generator: torch.Generator, *,
                 sample_per_batch: int = 1 << 15):
        policy.check(spec)
        self.spec, self.policy = spec, policy
        self.generator = generator
        self.sample_per_batch = sample_per_batch
        self.lo, self.hi = math.inf, -math.inf
        self.dtype: torch.dtype | None = None
        self.batches = 0
        self.samples: list[torch.Tensor] = []

    @property
    def sampled(self) -> bool:
        return self.policy.method is not RangeMethod.MINMAX

    def add(self, x: torch.Tensor) -> None:
        """Observe one batch of the stream (finite values of the stream's one floating
        dtype; ValueError or TypeError otherwise, leaving the observer as it was)."""
        if x.numel() == 0:
            raise ValueError("the observed activations are empty: no range to observe")
        try:
            largest_finite(x.dtype)
        except TypeError as err:
            raise TypeError(f"the observed activations have dtype {x.dtype}, for which no "
                            f"range is found: {err}") from None
        if self.dtype is not None and x.dtype != self.dtype:
            # The grid's largest scale and the largest range are the dtype's: one stream in
            # two dtypes has no one grid.
            raise ValueError(f"the observed activations are {x.dtype} in this batch but "
                             f"{self.dtype} in the earlier ones: a stream's range is found "
                             "for its one dtype; run every batch through the model in one "
                             "dtype")
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            # min/max below would drop a NaN batch silently, or keep an infinite end
            raise ValueError(f"the observed activations hold NaN or Inf values (range {lo} .. "
                             f"{hi}): the model's forward pass produced non-finite values, "
                             "which no quantization range holds")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.dtype = x.dtype
        self.batches += 1
        if self.sampled:
            flat = x.detach().reshape(-1)
            k = min(self.sample_per_batch, flat.numel())
            idx = torch.randint(flat.numel(), (k,), generator=self.generator)
            self.samples.append(flat[idx.to(flat.device)].cpu())

    def qparams(self, spec: QuantSpec | None = None) -> QParams:
        """Scale and zero point of ``spec`` (default the observer's) for the observed range."""
        spec = self.spec if spec is None else spec
        if self.batches == 0:
            raise ValueError("the observer saw no batch")
        if not self.sampled:
            return qparams_from_range(self.lo, self.hi, spec, dtype=self.dtype)
        # the extremes are values of the stream's dtype: exact in it
        data = torch.cat(self.samples + [torch.tensor([self.lo, self.hi], dtype=self.dtype)])
        return calibrate(data, spec, self.policy)
