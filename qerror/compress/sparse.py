"""Sparse networks: magnitude pruning (one-shot and gradual), 2:4 semi-structured masks,
structured channel pruning that makes a ResNet physically smaller, and CSR-backed layers.

What runs where (measured on this project's CPU machines with torch 2.14):

* **Unstructured and 2:4 masks** are plain dense tensors with zeros: they change accuracy
  and storage (counted by :mod:`qerror.compress.size`), never dense latency.
* **CSR** (``Tensor.to_sparse_csr()`` with ``torch.sparse.mm`` / ``@``) runs on the CPU:
  :func:`to_csr` turns a pruned ``Linear`` or ``Conv2d`` into a module that multiplies by a
  CSR matrix, so CPU latency of unstructured sparsity can be measured for real.
* **2:4 kernels** are CUDA-only: ``torch.sparse.to_sparse_semi_structured`` raises
  ``RuntimeError`` on a CPU tensor ("Only CUDA tensors are currently supported"), and
  torchao ships no CPU sparse kernels. :func:`to_semi_structured` is the GPU path; on a
  machine without CUDA it raises :class:`SparseKernelError`, and a study reports 2:4
  latency as "not measured here".
* **Structured channel pruning** (:func:`prune_channels`) returns an ordinary, smaller
  dense model: its size and latency are real on any device.

Masks are dicts from parameter names (``"layer1.0.conv1.weight"``) to boolean tensors of
the parameter's shape, True where the weight is kept. :func:`apply_masks` zeroes the rest;
:func:`mask_hook` re-applies them after every optimizer step of
:func:`qerror.nn.training.fit` (``after_step=``), so fine-tuning never regrows a pruned
weight.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qerror._checks import MAKE_WEIGHT_PLAIN, check_count, is_integer_dtype
from qerror.compress.size import dense_layers, first_conv

Masks = dict[str, torch.Tensor]

#: The layers whose weights pruning considers.
PRUNABLE = (nn.Conv2d, nn.Linear)


class PruningError(ValueError):
    """A model or request that pruning cannot act on; the message says why."""


class SparseKernelError(RuntimeError):
    """The sparse kernel asked for does not exist on this machine (e.g. 2:4 on a CPU)."""


def _check_sparsity(sparsity: float) -> float:
    # numbers.Real takes numpy's floats and integers too; bool (numpy's included) is refused
    if isinstance(sparsity, bool | np.bool_) or not isinstance(sparsity, numbers.Real) \
            or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}: it is the "
                         "fraction of weights set to zero, and 1 would remove every weight")
    return float(sparsity)


def _check_own_weight(name: str, layer: nn.Module) -> None:
    """PruningError unless ``layer``'s weight is a parameter it holds: under
    ``torch.nn.utils.prune``, a parametrization or the old ``weight_norm`` hook the weight is
    a tensor computed from other parameters, which no mask by name can reach."""
    if not isinstance(layer.weight, nn.Parameter):
        raise PruningError(
            f"layer {name!r} computes its weight from a reparametrization "
            "(torch.nn.utils.prune, a parametrization such as weight_norm, or the old "
            "weight_norm hook), so its weight is no parameter a mask can zero: make it "
            f"permanent first ({MAKE_WEIGHT_PLAIN})")


def prunable_weights(model: nn.Module, *,
                     keep_dense: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """The weights pruning acts on: those of every ``Conv2d`` and ``Linear`` not kept dense.

    Parameters
    ----------
    model : torch.nn.Module
    keep_dense : iterable of str, optional
        Module names left dense. None (the default): the first convolution
        (:func:`qerror.compress.size.first_conv`), as Gale et al. [1]_ do; ``()`` prunes
        every layer.

    Returns
    -------
    dict
        Parameter name (``"<module>.weight"``) → the parameter, in module order.

    Raises
    ------
    PruningError
        A name in ``keep_dense`` is no prunable module, nothing is left to prune, or a layer
        to prune computes its weight from a reparametrization (``torch.nn.utils.prune``, a
        parametrization, ``weight_norm``): make it permanent first.

    Notes
    -----
    The final ``Linear`` (ResNet's ``fc``) is pruned with the rest by default; name it in
    ``keep_dense`` to keep it dense. The first convolution of the Fashion-MNIST ResNet50
    holds 1·64·7·7 = 3 136 of its 23.5 M weights (0.013 %), so leaving it dense costs
    almost nothing, while pruning it removes input pixels' only path into the network.

    References
    ----------
    .. [1] T. Gale, E. Elsen, S. Hooker, "The state of sparsity in deep neural networks",
       arXiv:1902.09574, 2019.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    if not layers:
        raise PruningError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    dense = dense_layers(model, keep_dense, PruningError)
    for n, m in layers.items():
        if n not in dense:
            _check_own_weight(n, m)
    # A weight two modules share is one tensor: pruned once, under the model's own name for
    # it (named_parameters', that of the first module holding it, which need not be a
    # prunable layer: an embedding tied to a classifier), and kept dense only if every layer
    # sharing it is.
    own = {id(p): name for name, p in model.named_parameters()}
    first: dict[int, str] = {}
    for n, m in layers.items():
        other = first.setdefault(id(m.weight), n)
        if other != n and (other in dense) != (n in dense):
            named = f"keep_dense names {sorted(dense & {other, n})[0]!r}" \
                if keep_dense is not None else \
                f"the default keep_dense keeps the first convolution, {first_conv(model)!r}, dense"
            raise PruningError(f"layers {other!r} and {n!r} share one weight tensor, and "
                               f"{named}: pass keep_dense naming both or neither")
    out = {}
    for n, m in layers.items():
        if first[id(m.weight)] != n or n in dense:
            continue
        if m.weight.numel() == 0:
            raise PruningError(f"layer {n!r} has no weights ({tuple(m.weight.shape)}): "
                               "magnitude pruning has nothing to rank there; remove the "
                               "empty layer, or name it in keep_dense")
        out[own[id(m.weight)]] = m.weight
    if not out:
        raise PruningError(f"every prunable layer is kept dense ({sorted(dense)}): nothing "
                           "to prune")
    return out


def zero_count(sparsity: float | Fraction, n: int) -> int:
    """Weights zeroed to reach ``sparsity`` among ``n``: ``⌊s·n + 1/2⌋``, computed exactly on
    the binary value of ``s``, or on ``s`` itself when it is a :class:`fractions.Fraction`
    (round half up; no float product to round first); ``n`` an int >= 0."""
    checked = _check_sparsity(sparsity)
    n = check_count(n, "n")
    s = sparsity if isinstance(sparsity, Fraction) else Fraction(checked)
    return int(s * n + Fraction(1, 2))


def prune_global(model: nn.Module, sparsity: float, *,
                 keep_dense: Iterable[str] | None = None, apply: bool = True) -> Masks:
    """Global unstructured magnitude pruning to an exact sparsity.

    The ``k = zero_count(sparsity, n)`` weights of smallest magnitude among all ``n``
    prunable weights (:func:`prunable_weights`) are pruned, whatever layer they sit in.

    Parameters
    ----------
    model : torch.nn.Module
        Pruned in place when ``apply``.
    sparsity : float or fractions.Fraction
        Fraction of the prunable weights to zero, in [0, 1) (e.g. 0.5, 0.75, 0.9, 0.95);
        a ``Fraction`` is taken exactly (:func:`zero_count`).
    keep_dense : iterable of str, optional
        See :func:`prunable_weights` (default: the first convolution stays dense).
    apply : bool
        Zero the pruned weights (else only return the masks).

    Returns
    -------
    dict
        Parameter name → bool mask of its shape (True: kept). Exactly ``k`` entries False.

    Raises
    ------
    ValueError
        ``sparsity`` outside [0, 1).
    PruningError
        No prunable layer, or a NaN weight (its magnitude has no order).

    Notes
    -----
    Ties at the threshold magnitude are broken by position: weights are ordered by
    (``|w|``, index in the concatenation of the flattened tensors in module order), so the
    mask, and its count of zeros, is a deterministic function of the weights. Weights that
    are already zero have the smallest magnitude and are pruned first: in gradual pruning
    (:class:`MagnitudePruner`, which zeroes the pruned weights again before each update) a
    pruned weight stays pruned as the sparsity grows. The weights' own count of zeros
    equals ``k`` unless more than ``k`` were zero before.
    """
    k = zero_count(sparsity, 1)  # validates before the model is touched
    params = prunable_weights(model, keep_dense=keep_dense)
    with torch.no_grad():
        mags = torch.cat([p.detach().abs().reshape(-1).to("cpu", torch.float64)
                          for p in params.values()])
    if torch.isnan(mags).any():
        raise PruningError("the model has NaN weights; magnitude pruning cannot order them")
    k = zero_count(sparsity, mags.numel())
    if k == mags.numel():
        raise PruningError(f"sparsity {sparsity!r} of {k} prunable weights rounds to all "
                           f"{k}: no weight would be left; pass a sparsity below "
                           f"{(k - 0.5) / k!r}")
    keep = torch.ones(mags.numel(), dtype=torch.bool)
    if k:
        threshold = torch.kthvalue(mags, k).values
        below = mags < threshold
        ties = torch.nonzero(mags == threshold).reshape(-1)
        keep[below] = False
        keep[ties[: k - int(below.sum())]] = False
    masks, start = {}, 0
    for name, p in params.items():
        masks[name] = keep[start:start + p.numel()].reshape(p.shape).to(p.device)
        start += p.numel()
    if apply:
        apply_masks(model, masks)
    return masks


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, every parameter entry whose mask is False.

    Raises
    ------
    PruningError
        A mask names no parameter of the model or has another shape.
    """
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in named:
                raise PruningError(f"mask {name!r} names no parameter of the model")
            p = named[name]
            if mask.shape != p.shape:
                raise PruningError(f"mask {name!r} has shape {tuple(mask.shape)}, the "
                                   f"parameter {tuple(p.shape)}")
            p.masked_fill_(~mask.to(p.device, torch.bool), 0)


def mask_hook(masks: Mapping[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """``after_step`` for :func:`qerror.nn.training.fit` that re-applies fixed masks.

    The optimizer's momentum would otherwise regrow pruned weights; zeroing them after each
    update keeps the pruned set fixed while the kept weights fine-tune.
    """
    masks = dict(masks)
    return lambda model: apply_masks(model, masks)


def sparsity_of(model: nn.Module, *, keep_dense: Iterable[str] | None = None) -> float:
    """Fraction of exact zeros among the prunable weights (:func:`prunable_weights`, the
    same ``keep_dense`` default), a float in [0, 1]."""
    params = prunable_weights(model, keep_dense=keep_dense)
    zeros = sum(int((p.detach() == 0).sum()) for p in params.values())
    return zeros / sum(p.numel() for p in params.values())


# --------------------------------------------------------------------------- gradual pruning


@dataclass(frozen=True)
class GradualSchedule:
    """Zhu & Gupta's gradual pruning schedule [1]_.

    Parameters
    ----------
    final : float
        s_f, the sparsity reached, in [0, 1).
    updates : int
        n ≥ 1: the masks are recomputed at steps ``start + j·interval``, j = 0..n.
    interval : int
        Δt ≥ 1, optimizer steps between updates.
    initial : float
        s_i in [0, s_f].
    start : int
        t0 ≥ 0, the step of the first update.

    Notes
    -----
    .. math:: s_t = s_f + (s_i - s_f)\\left(1 - \\frac{t - t_0}{n\\,\\Delta t}\\right)^3,
       \\quad t \\in [t_0, t_0 + n\\Delta t],

    ``s_i`` before ``t0`` and ``s_f`` after the last update. It is non-decreasing, prunes
    fast while redundant weights abound and slowly near the end.

    References
    ----------
    .. [1] M. Zhu, S. Gupta, "To prune, or not to prune: exploring the efficacy of pruning
       for model compression", arXiv:1710.01878, 2017.
    """

    final: float
    updates: int
    interval: int = 1
    initial: float = 0.0
    start: int = 0

    def __post_init__(self):
        # kept as Python floats: Fraction (exact_sparsity) refuses numpy's
        object.__setattr__(self, "final", _check_sparsity(self.final))
        object.__setattr__(self, "initial", _check_sparsity(self.initial))
        if self.initial > self.final:
            raise ValueError(f"initial sparsity {self.initial} exceeds final {self.final}")
        for name, low in (("updates", 1), ("interval", 1), ("start", 0)):
            object.__setattr__(self, name,
                               check_count(getattr(self, name), f"GradualSchedule.{name}", low))

    @property
    def end(self) -> int:
        """Step of the last update, ``t0 + n·Δt``."""
        return self.start + self.updates * self.interval

    def exact_sparsity(self, step: int) -> Fraction:
        """s_t at optimizer step ``step`` (clamped to [s_i, s_f] outside the window), exactly,
        on the binary values of ``initial`` and ``final``; the pruner counts its zeros from
        it (:func:`zero_count`). ``step`` is an int ``>= 0`` (Python's or numpy's): a float,
        bool or string is a TypeError, a negative step a ValueError."""
        step = check_count(step, "GradualSchedule step")
        frac = min(max(Fraction(step - self.start, self.updates * self.interval),
                       Fraction(0)), Fraction(1))
        final = Fraction(self.final)
        return final + (Fraction(self.initial) - final) * (1 - frac) ** 3

    def sparsity(self, step: int) -> float:
        """s_t at optimizer step ``step`` (clamped to [s_i, s_f] outside the window), the float
        nearest to :meth:`exact_sparsity` (so never outside [s_i, s_f])."""
        return float(self.exact_sparsity(step))

    def is_update(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``, an int ``>= 0`` (as in
        :meth:`exact_sparsity`)."""
        step = check_count(step, "GradualSchedule step")
        return self.start <= step <= self.end and (step - self.start) % self.interval == 0


class MagnitudePruner:
    """Gradual global magnitude pruning as an ``after_step`` hook of
    :func:`qerror.nn.training.fit`.

    Each call counts one optimizer step; at the schedule's update steps the masks are
    recomputed by :func:`prune_global` at ``schedule.exact_sparsity(step)``, and at every
    step the current masks are re-applied. Before an update the current masks are applied
    first: the optimizer's update has moved the pruned weights off zero, and they would
    otherwise compete with the kept ones; so a pruned weight stays pruned as the sparsity
    grows. The first call is step 1, after the first optimizer step: with the schedule's
    ``start`` at 0 its update at step 0 would come before any step and is not made, and the
    first masks are those of step 1's sparsity — ``s_i`` where updates are more than one step
    apart, the schedule's value at step 1 with an update every step (no difference at the
    default ``s_i = 0``).

    Parameters
    ----------
    schedule : GradualSchedule
        When and to what sparsity to prune (anything else, a bare final sparsity included,
        is a TypeError).
    keep_dense : str or iterable of str, optional
        See :func:`prunable_weights`.
    step : int
        Steps already done, an integer ``>= 0`` (else TypeError or ValueError), for a run
        resumed without the pruner's saved state: the masks of the last update are then
        rebuilt from the weights after the first step, which that step has moved, so the
        run is close to the uninterrupted one but not equal.
        :func:`qerror.nn.training.fit` saves the pruner's state (:meth:`state_dict`) with
        its own and restores it on resuming, which repeats the uninterrupted run exactly.

    Attributes
    ----------
    masks : dict
        The current masks (empty before the first update).
    step : int
        Steps counted so far.
    """

    def __init__(self, schedule: GradualSchedule, *,
                 keep_dense: Iterable[str] | str | None = None, step: int = 0):
        if not isinstance(schedule, GradualSchedule):
            raise TypeError(f"schedule must be a GradualSchedule, got "
                            f"{type(schedule).__name__} {schedule!r}: give the final sparsity "
                            "and the updates as GradualSchedule(final=..., updates=..., "
                            "interval=...)")
        self.schedule = schedule
        if keep_dense is not None and not isinstance(keep_dense, str):
            keep_dense = tuple(keep_dense)  # read at every update: an iterator only once
        self.keep_dense = keep_dense
        self.step = check_count(step, "MagnitudePruner.step")
        self.masks: Masks = {}

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        sched = self.schedule
        if sched.is_update(self.step) or (not self.masks and self.step > sched.start):
            if self.masks:
                apply_masks(model, self.masks)
            # A resumed pruner without its state rebuilds the masks of the last update.
            last = min(self.step, sched.end)
            last -= (last - sched.start) % sched.interval
            self.masks = prune_global(model, sched.exact_sparsity(last),
                                      keep_dense=self.keep_dense, apply=False)
        if self.masks:
            apply_masks(model, self.masks)

    def state_dict(self) -> dict:
        """The steps counted and the current masks (copies), for a training state."""
        return {"step": self.step,
                "masks": {n: m.detach().to("cpu", torch.bool).clone()
                          for n, m in self.masks.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises
        ------
        PruningError
            ``state`` is not such a state (a step count and bool masks by name).
        """
        step, masks = state.get("step"), state.get("masks")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 \
                or not isinstance(masks, Mapping) or not all(
                    isinstance(n, str) and isinstance(m, torch.Tensor) and m.dtype == torch.bool
                    for n, m in masks.items()):
            raise PruningError("not a MagnitudePruner state: expected a step count and bool "
                               "masks by parameter name")
        self.step = step
        self.masks = {n: m.clone() for n, m in masks.items()}


# --------------------------------------------------------------------------- 2:4


def _groups_of_four(w: torch.Tensor) -> torch.Tensor:
    # NVIDIA's layout: groups run along the input (reduction) dimension; for a convolution
    # along the input channels at a fixed (output, kernel row, kernel column), as apex's ASP.
    return (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).reshape(-1, 4)


def _ungroup(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        o, i, kh, kw = shape
        return g.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return g.reshape(shape)


def semi_structured_masks(model: nn.Module, *, keep_dense: Iterable[str] | None = None,
                          apply: bool = True) -> Masks:
    """2:4 semi-structured pruning: in every group of 4 consecutive weights along the input
    dimension keep the 2 of largest magnitude.

    Parameters
    ----------
    model : torch.nn.Module
        Pruned in place when ``apply``.
    keep_dense : iterable of str, optional
        See :func:`prunable_weights` (default: the first convolution, whose single input
        channel cannot form groups of four).
    apply : bool

    Returns
    -------
    dict
        Masks with exactly two True in every group (50 % sparsity in each group).

    Raises
    ------
    PruningError
        A pruned layer's input dimension (``in_features``, or ``in_channels`` of a
        convolution) is not a multiple of 4; keep it dense.

    Notes
    -----
    A convolution's groups run along the input channels at a fixed output channel and
    kernel position, the layout NVIDIA's sparse tensor cores expect for the implicit GEMM
    (and apex's ASP uses). Ties keep the earlier position.
    """
    params = prunable_weights(model, keep_dense=keep_dense)
    masks = {}
    for name, p in params.items():
        if p.dim() not in (2, 4) or p.shape[1] % 4:
            raise PruningError(f"{name} has input dimension {p.shape[1]}, not a multiple of 4: "
                               "2:4 groups cannot be formed; name its layer in keep_dense")
        g = _groups_of_four(p.detach().abs())
        if torch.isnan(g).any():
            raise PruningError(f"{name} has NaN weights; magnitude pruning cannot order them")
        order = torch.sort(g, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, order[:, :2], True)
        masks[name] = _ungroup(keep, p.shape).contiguous()
    if apply:
        apply_masks(model, masks)
    return masks


def is_two_four(w: torch.Tensor) -> bool:
    """Whether every group of 4 along the input dimension has at most 2 nonzeros.

    PruningError for a weight in which such groups cannot be formed (not a 2-D or 4-D
    weight, or an input dimension that is not a multiple of 4), as
    :func:`semi_structured_masks` refuses it."""
    if w.dim() not in (2, 4) or w.shape[1] % 4:
        raise PruningError(f"a weight of shape {tuple(w.shape)} has no groups of 4 along its "
                           "input dimension (2-D or 4-D, input dimension a multiple of 4)")
    return bool(((_groups_of_four(w.detach()) != 0).sum(1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """A ``Linear`` whose weight is a CUDA 2:4 sparse tensor (float16)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def to_semi_structured(layer: nn.Linear, *, device: str | torch.device = "cuda") -> nn.Module:
    """A 2:4-pruned ``Linear`` on PyTorch's semi-structured sparse kernels (GPU only).

    Parameters
    ----------
    layer : torch.nn.Linear
        Its weight must be 2:4 sparse (:func:`semi_structured_masks`).
    device : str or torch.device
        A CUDA device.

    Returns
    -------
    SemiStructuredLinear
        float16, on ``device``; its input must be float16 on the same device.

    Raises
    ------
    SparseKernelError
        ``device`` is not CUDA, or no CUDA device is present: PyTorch's
        ``to_sparse_semi_structured`` runs on CUDA tensors only (compute capability ≥ 8.0)
        and there is no CPU 2:4 kernel in PyTorch or torchao.
    PruningError
        The weight is not 2:4 sparse.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SparseKernelError(
            f"2:4 sparse kernels need a CUDA GPU (device {str(device)!r} asked, CUDA "
            f"{'available' if torch.cuda.is_available() else 'not available'}): PyTorch's "
            "to_sparse_semi_structured supports CUDA tensors only and torchao has no CPU "
            "sparse kernels. On CPU, report 2:4 size and accuracy; latency is not measured")
    if not isinstance(layer, nn.Linear):
        raise PruningError(f"to_semi_structured takes an nn.Linear, got {type(layer).__name__}")
    if not is_two_four(layer.weight):
        raise PruningError("the weight is not 2:4 sparse; prune it with semi_structured_masks")
    from torch.sparse import to_sparse_semi_structured

    w = layer.weight.detach().to(device, torch.float16)
    b = None if layer.bias is None else layer.bias.detach().to(device, torch.float16)
    return SemiStructuredLinear(to_sparse_semi_structured(w), b)


# --------------------------------------------------------------------------- CSR (CPU kernels)


def _csr(w: torch.Tensor) -> torch.Tensor:
    # checked here, not at the first forward: the CSR product of a float16 or bfloat16
    # weight stops there in a NotImplementedError of an MKL kernel
    if w.device.type == "cpu" and w.dtype not in (torch.float32, torch.float64):
        raise SparseKernelError(f"PyTorch's CPU CSR kernels multiply float32 and float64 "
                                f"only, and the weight is {w.dtype}: convert the layer or "
                                "model with .float() before to_csr, and time the dense one "
                                "in float32 too")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return w.detach().reshape(w.shape[0], -1).to_sparse_csr()


class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held in CSR form; input (N, in), output (N, out)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.weight = _csr(layer.weight)
        self.bias = None if layer.bias is None else layer.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # reshape by the known width: an empty batch has no -1 to infer
        y = torch.sparse.mm(self.weight, x.reshape(-1, self.weight.shape[1]).T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.weight.shape[0])


class CSRConv2d(nn.Module):
    """A ``Conv2d`` as a CSR matrix times the im2col (``unfold``) of its input.

    The weight (out, in, kh, kw) becomes a CSR matrix (out, in·kh·kw); the input (N, in, H,
    W) is unfolded to (in·kh·kw, N·L) with L output positions, multiplied, and folded back
    to (N, out, H', W').
    """

    def __init__(self, layer: nn.Conv2d):
        super().__init__()
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise PruningError("CSRConv2d supports groups=1, zero padding given as numbers; got "
                               f"groups={layer.groups}, padding={layer.padding!r}, "
                               f"padding_mode={layer.padding_mode!r}")
        self.weight = _csr(layer.weight)
        self.bias = None if layer.bias is None else layer.bias.detach().clone()
        self.out_channels = layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # one unbatched image, as Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # (N, in·kh·kw, L)
        y = torch.sparse.mm(self.weight, cols.transpose(0, 1).reshape(cols.shape[1], -1))
        ho, wo = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size,
                                        self.stride, strict=True))
        y = y.reshape(self.out_channels, n, ho, wo).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


def to_csr(module: nn.Module, *, keep_dense: Iterable[str] | None = ()) -> nn.Module:
    """CSR-backed copy of a pruned layer or model, for CPU latency measurement.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Linear`` or ``nn.Conv2d`` (returns :class:`CSRLinear` / :class:`CSRConv2d`),
        or a model: a deep copy in which every such layer not in ``keep_dense`` is replaced,
        wherever it is attached (a layer used twice becomes one CSR module used twice).
    keep_dense : iterable of str, or str
        Module names left as dense layers (a string: one name; default: none).

    Returns
    -------
    torch.nn.Module
        Inference only (the CSR weight is no parameter): equal to the dense masked module
        up to float summation order.

    Raises
    ------
    PruningError
        A name in ``keep_dense`` is not a ``Conv2d`` or ``Linear`` of the model, or no such
        layer is left to convert.
    SparseKernelError
        A weight on the CPU that is neither float32 nor float64 (float16, bfloat16): the CPU
        CSR product has no kernel for it.

    Notes
    -----
    CSR pays off only at high sparsity: its kernels do ``nnz`` multiply-adds but with an
    indirect load each, against dense kernels' blocked, vectorised loops. Time it against
    the dense layer (``studies.bench``) rather than assume a speed-up.
    """
    if isinstance(module, nn.Linear):
        return CSRLinear(module)
    if isinstance(module, nn.Conv2d):
        return CSRConv2d(module)
    dense = dense_layers(module, () if keep_dense is None else keep_dense, PruningError)
    out = copy.deepcopy(module)
    names = [n for n, m in out.named_modules() if isinstance(m, PRUNABLE) and n not in dense]
    if not names:
        raise PruningError(f"{type(module).__name__} has no Conv2d or Linear layer to convert")
    # a layer attached in several places is converted once and replaced at each of them
    converted = {id(out.get_submodule(n)): None for n in names}
    for name, m in list(out.named_modules(remove_duplicate=False)):
        if id(m) in converted:
            if converted[id(m)] is None:
                converted[id(m)] = to_csr(m)
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, converted[id(m)])
    return out.eval()


# --------------------------------------------------------------------------- structured


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    # Where each module is attached (parent, attribute) and which modules hold each tensor:
    # a layer that shrinking replaces must be attached once and own its tensors, or the
    # slices would untie it from its other uses (and the copy could outgrow the model).
    places: dict[int, set[tuple[int, str]]] = {}
    holders: dict[int, set[int]] = {}
    for parent in model.modules():
        for attr, child in parent.named_children():
            places.setdefault(id(child), set()).add((id(parent), attr))
        for t in [*parent.parameters(recurse=False), *parent.buffers(recurse=False)]:
            holders.setdefault(id(t), set()).add(id(parent))
    out = []
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock | Bottleneck) and m.conv2.groups != 1:
            raise PruningError(f"block {name} has a grouped convolution (groups="
                               f"{m.conv2.groups}); channel pruning handles groups=1 only")
        if isinstance(m, Bottleneck):
            convs = ["conv1", "conv2"]
        elif isinstance(m, BasicBlock):
            convs = ["conv1"]
        else:
            continue
        for c in convs:
            bn = getattr(m, _bn_of(c))
            if not isinstance(bn, nn.BatchNorm2d) or not bn.affine:
                raise PruningError(
                    f"{name + '.' if name else ''}{_bn_of(c)} is {bn}: channel pruning "
                    "slices a BatchNorm2d with a weight and a bias (the masks zero them so a "
                    "removed channel puts out 0); blocks built with another norm_layer "
                    "cannot be pruned by channel")
        for leaf in dict.fromkeys(x for c in convs for x in (c, _bn_of(c), _next_conv(c))):
            layer = getattr(m, leaf)
            if isinstance(layer, nn.Conv2d):
                _check_own_weight(f"{name + '.' if name else ''}{leaf}", layer)
            if len(places[id(layer)]) > 1 or any(
                    len(holders[id(t)]) > 1 for t in [*layer.parameters(), *layer.buffers()]):
                raise PruningError(
                    f"{name + '.' if name else ''}{leaf} shares its weights with another "
                    "layer of the model (a tied tensor, or one layer attached in two places): "
                    "channel pruning slices each layer into a copy of its own, which would "
                    "untie them; give each layer its own weights before pruning channels")
        out.append((name, m, convs))
    if not out:
        raise PruningError(f"{type(model).__name__} has no torchvision BasicBlock or "
                           "Bottleneck: structured channel pruning acts on ResNet blocks")
    return out


def channel_plan(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Which output channels of each block's inner convolutions survive.

    Parameters
    ----------
    model : torch.nn.Module
        A torchvision ResNet (or any model with ``BasicBlock`` / ``Bottleneck`` blocks).
    fraction : float
        Fraction of each inner convolution's output channels removed, in [0, 1):
        ``zero_count(fraction, C)`` of C, leaving at least one.

    Returns
    -------
    dict
        Convolution name (``"layer1.0.conv1"``) → sorted int64 indices of the kept channels.

    Raises
    ------
    ValueError
        ``fraction`` outside [0, 1).
    PruningError
        No ResNet block, a grouped inner convolution, an inner convolution followed by
        another norm than a ``BatchNorm2d`` with affine parameters, a NaN weight in an
        inner convolution (its filter's L1 norm has no order), an inner convolution, its
        BatchNorm or the next convolution sharing its weights with another layer, or one of
        those convolutions computing its weight from a reparametrization
        (``torch.nn.utils.prune``, a parametrization, ``weight_norm``).

    Notes
    -----
    The inner convolutions are ``conv1`` and ``conv2`` of a bottleneck and ``conv1`` of a
    basic block: their outputs feed only their BatchNorm and the next convolution, so they
    shrink without touching the residual path (whose width the block's last convolution,
    the downsample branch and the skip connection share). Channels are ranked by the L1
    norm of their filters (Li et al. [1]_), summed in float64 whatever the weights' dtype,
    ties keeping the lower index.

    References
    ----------
    .. [1] H. Li, A. Kadav, I. Durdanovic, H. Samet, H. P. Graf, "Pruning filters for
       efficient ConvNets", ICLR 2017.
    """
    _check_sparsity(fraction)
    plan = {}
    for bname, block, convs in _blocks(model):
        for c in convs:
            name = f"{bname}.{c}" if bname else c
            w = getattr(block, c).weight.detach()
            drop = min(zero_count(fraction, w.shape[0]), w.shape[0] - 1)
            # summed in float64: a float16 or bfloat16 sum rounds (or overflows) to ties
            norms = w.to(torch.float64).abs().reshape(w.shape[0], -1).sum(1)
            if torch.isnan(norms).any():
                bad = int(torch.nonzero(torch.isnan(norms))[0])
                raise PruningError(f"{name} has NaN weights (filter {bad}); ranking its "
                                   "filters by L1 norm cannot order them")
            order = torch.sort(norms, descending=True, stable=True).indices
            plan[name] = torch.sort(order[: w.shape[0] - drop]).values
    return plan


def _bn_of(conv: str) -> str:
    return conv[: -len("conv1")] + "bn" + conv[-1]


def _next_conv(conv: str) -> str:
    return conv[:-1] + str(int(conv[-1]) + 1)


def _checked_plan(model: nn.Module, plan: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``plan`` with each entry as int64 channel indices, once each the checks of
    :func:`shrink_channels` pass (PruningError otherwise): the one reading of a plan, so the
    masked and the shrunk model are built from the same channels."""
    inner = {f"{b}.{c}" if b else c: getattr(m, c)
             for b, m, convs in _blocks(model) for c in convs}
    out = {}
    for conv, kept in plan.items():
        if conv not in inner:
            raise PruningError(f"{conv!r} is not an inner convolution of a ResNet block; "
                               f"plan from channel_plan")
        try:
            given = torch.as_tensor(kept)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PruningError(f"the plan for {conv} must list channel indices as a flat "
                               f"sequence of integers, got {kept!r}") from exc
        if given.dim() == 1 and given.numel() == 0:
            raise PruningError(f"the plan keeps no channel of {conv}")
        if given.dim() != 1 or not is_integer_dtype(given.dtype):
            raise PruningError(f"the plan for {conv} must list channel indices as a flat "
                               f"sequence of integers, got {kept!r}")
        idx = given.to(torch.long)
        channels = inner[conv].out_channels
        if len(idx.unique()) != len(idx) or idx.min() < 0 or idx.max() >= channels:
            raise PruningError(f"the plan for {conv} keeps channels {idx.tolist()}: each must "
                               f"be named once and lie in 0..{channels - 1}")
        out[conv] = idx
    return out


def channel_masks(model: nn.Module, plan: Mapping[str, torch.Tensor]) -> Masks:
    """Masks that zero the removed channels in place of removing them: the conv's filters,
    its BatchNorm's weight and bias (so the channel outputs exactly 0 in eval and in
    training mode), and the next convolution's input slices.

    Raises
    ------
    PruningError
        The plans and models :func:`shrink_channels` refuses.
    """
    params = dict(model.named_parameters())
    masks: Masks = {}
    for conv, kept in _checked_plan(model, plan).items():
        w = params[f"{conv}.weight"]
        keep = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        keep[kept.to(w.device)] = True
        own = masks.get(f"{conv}.weight", torch.ones_like(w, dtype=torch.bool))
        masks[f"{conv}.weight"] = own & keep.reshape(-1, 1, 1, 1)
        for p in ("weight", "bias"):
            masks[f"{_bn_of(conv)}.{p}"] = keep.clone()
        nxt = params[f"{_next_conv(conv)}.weight"]
        masks[f"{_next_conv(conv)}.weight"] = (masks.get(f"{_next_conv(conv)}.weight",
                                                         torch.ones_like(nxt, dtype=torch.bool))
                                               & keep.reshape(1, -1, 1, 1))
    return masks


def _slice_conv(conv: nn.Conv2d, out_idx=None, in_idx=None) -> nn.Conv2d:
    w = conv.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach() if out_idx is None else conv.bias.detach()[out_idx])
    _keep_frozen(new, conv)
    new.train(conv.training)
    return new


def _keep_frozen(new: nn.Module, old: nn.Module) -> None:
    """The sliced layer's parameters as trainable as the old one's (a frozen layer came back
    trainable: new parameters require grad)."""
    for name, p in new.named_parameters(recurse=False):
        p.requires_grad_(getattr(old, name).requires_grad)


def _slice_bn(bn: nn.BatchNorm2d, idx) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device, dtype=bn.weight.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(new, name).copy_(src.detach()[idx])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    _keep_frozen(new, bn)
    new.train(bn.training)
    return new


def shrink_channels(model: nn.Module, plan: Mapping[str, torch.Tensor]) -> nn.Module:
    """A physically smaller deep copy of ``model`` with only the planned channels.

    Each planned convolution keeps the planned output filters, its BatchNorm the same
    channels (affine parameters and running statistics), and the next convolution the same
    input slices. The copy computes what ``model`` with :func:`channel_masks` applied
    computes, on any input, up to the order of float summation: it leaves out the masked
    model's exact zeros, and the kernels then sum the rest in another order (in float64
    within about 1e-12 relative on a small ResNet, the test's tolerance; in float32 about
    1e-6; a BatchNorm in training mode normalising a few values can magnify it).

    Raises
    ------
    PruningError
        A plan entry names no inner convolution of a ResNet block, keeps no channel, or
        names a channel twice or one the convolution does not have; a planned convolution,
        its BatchNorm or the next convolution shares its weights with another layer (a
        tied tensor, or one layer attached in two places), which slicing would untie, or
        one of those convolutions computes its weight from a reparametrization.
    """
    checked = _checked_plan(model, plan)
    out = copy.deepcopy(model)
    for conv, idx in checked.items():
        block = out.get_submodule(conv.rpartition(".")[0]) if "." in conv else out
        leaf = conv.rpartition(".")[2]
        bn, nxt = _bn_of(leaf), _next_conv(leaf)
        setattr(block, leaf, _slice_conv(getattr(block, leaf), out_idx=idx))
        setattr(block, bn, _slice_bn(getattr(block, bn), idx))
        setattr(block, nxt, _slice_conv(getattr(block, nxt), in_idx=idx))
    return out


def prune_channels(model: nn.Module, fraction: float) -> nn.Module:
    """Structured channel pruning: ``shrink_channels(model, channel_plan(model, fraction))``,
    a smaller dense model (``model`` is left unchanged)."""
    return shrink_channels(model, channel_plan(model, fraction))


__all__ = [
    "CSRConv2d", "CSRLinear", "GradualSchedule", "MagnitudePruner", "Masks", "PRUNABLE",
    "PruningError", "SemiStructuredLinear", "SparseKernelError", "apply_masks",
    "channel_masks", "channel_plan", "is_two_four", "mask_hook",
    "prunable_weights", "prune_channels", "prune_global", "semi_structured_masks",
    "shrink_channels", "sparsity_of", "to_csr", "to_semi_structured", "zero_count",
]
