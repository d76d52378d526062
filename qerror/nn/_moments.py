"""Per (image, channel) sums and sums of squares of an activation, and of the difference of two,
in one pass over the data: the statistics the instrument (:mod:`qerror.nn.propagate`) takes
at every site.

Every figure the drift measurement reports is a function of these sums, taken on every layer
output of every chunk of every pass. Computed with torch's own reductions, a sum and a sum of
squares read the tensor twice, and an error ``yq - yf`` is first written out and then read
twice; on the small maps of a 32×32 network (2×2 and 4×4) torch's reduction over so short an
inner dimension is also slow for its size. Here one compiled loop
(:class:`qerror._compiled.Kernels`) reads ``a`` and ``b`` once and gives ``Σ(a-b)``,
``Σ(a-b)²``, ``Σa``, ``Σa²``, ``Σb`` and ``Σb²`` for every (image, channel);
``studies.bench`` (drift group) times the instrument with it against the same passes without
statistics.

Notes
-----
Float32 data is summed in float32, as torch's reductions sum it, and the per (image, channel)
sums returned in float64 (the caller accumulates them over images in float64). Whatever the
order of the additions, a float32 sum of ``L`` terms is within ``γ(L - 1) Σ|x|`` of the exact
one, a sum of squares within ``γ(L) Σx²`` (each square rounded once) and a sum of differences
within ``γ(L) Σ|a - b|`` (each difference rounded once), where ``γ(k) = k u / (1 - k u)`` and
``u = 2**-24`` (to first order ``k u``). Torch's reductions take a sum of squares as the
square of a float32 norm, three roundings more (the square root, doubled by the squaring,
and the squaring): within ``γ(L + 3) Σx²``, which a map of 2 positions reaches (1.8 γ(2)
measured on random data). The tests check the compiled and the eager sums against float64
references with these bounds. The compiled loop adds in the order its
vectorisation takes (lane-wise, then across lanes), torch's in a pairwise order, whose typical
error is smaller; so the compiled loop takes maps of at most :data:`MAX_INNER` positions
(32×32), where the bound is at most ``2**-14`` of ``Σ|x|`` and the typical error about
``√L u``, far below the sampling error of any figure built on the sums. Maps of at most
:data:`STATIC_INNER` positions get a kernel of their own per size, whose reduction inductor
unrolls (the same order of additions for every image). Maps of one position or of more than
:data:`MAX_INNER`, maps of one channel, other layouts, float64 and half-precision data (the
latter summed in float32), tensors off the CPU and images of fewer than
:data:`MIN_IMAGE_ELEMENTS` elements take torch's reductions, which give the same sums up to
that rounding. Which of the two sums a tensor depends on its images' shape
and layout alone, never on how many images it holds, so an image's sums are the same bits in a
pass of :func:`~qerror.nn.measure` and in one of :func:`~qerror.nn.measure_many` (tested).
``QERROR_FUSED=0`` turns the compiled loop off with the fused quantizer
(:func:`qerror._compiled.allowed`); a compiler that fails turns it off after one warning.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qerror._checks import check_count
from qerror._compiled import Kernels, named, own

#: Maps with more positions than this are summed by torch's reductions (see Notes).
MAX_INNER = 1024
#: Maps of at most this many positions get a kernel of their own with the map's size fixed:
#: inductor then unrolls the reduction into one vectorised pass over the (image, channel)
#: pairs, where with a symbolic size it loops over 2 or 4 positions per pair (measured on
#: an AMD EPYC with AVX-512, one (128, 1024, 2, 2) pair of outputs: ~0.4 ms against 1.3).
STATIC_INNER = 4
#: Tensors with fewer elements than this per image are summed by torch's reductions: a
#: compiled call's fixed cost (guards, dispatch) is larger than the whole work of a few such
#: images. Per image, not per tensor, so that an image's sums do not depend on how many
#: images are summed with it (a pass of measure against one of measure_many).
MIN_IMAGE_ELEMENTS = 1 << 10

#: The compiled sums. A warning of theirs points at the line of qerror.nn.propagate that called
#: channel_sums or difference_sums (past _warn_once, call, _compiled and that function): the
#: sums are the instrument's, met inside the model's forward.
KERNELS = Kernels("the compiled channel sums", "summing with torch's reductions instead "
                  "(the same sums up to float rounding)", stacklevel=5)


def _make(two: bool, dim: int, units: tuple[bool, ...], inner: int | None):
    """The kernel: the sums over ``dim`` of ``x`` and ``x²``, or of ``a - b``, ``(a - b)²``,
    ``a``, ``a²``, ``b`` and ``b²`` (all six in the one pass that reads ``a`` and ``b``),
    each summed in float32 and written as float64. ``inner``: the size of ``dim`` where it
    is fixed in the compiled code (``None``: symbolic). Of two, ``a`` has one more leading
    dimension than ``b`` (its chunks, each of ``b``'s shape), reduced over ``dim + 1``."""
    if two:
        def kernel(a, b):
            d = a - b
            return tuple(r.double() for r in (
                d.sum(dim + 1), (d * d).sum(dim + 1), a.sum(dim + 1), (a * a).sum(dim + 1),
                b.sum(dim), (b * b).sum(dim)))
    else:
        def kernel(a):
            return a.sum(dim).double(), (a * a).sum(dim).double()
    shape = "x".join("1" if u else "n" for u in units)
    return named(kernel, f"channel_sums_{'difference' if two else 'one'}_dim{dim}_{shape}"
                         f"{'' if inner is None else f'_of{inner}'}")


def _per_channel(t: torch.Tensor) -> int:
    n = 1
    for d in t.shape[2:]:
        n *= d
    return n


def _view(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``t`` (N, C, ...) as a 3-D view on its own memory and the dimension of its positions:
    (N, C, L) reduced over 2 for C order, (N, L, C) over 1 for channels_last; None where
    the compiled loop does not take it."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.ndim < 3 or t.shape[0] < 1:
        return None
    n, c, length = t.shape[0], t.shape[1], _per_channel(t)
    # one channel: the compiled loop has only the map to reduce and splits it across threads
    # where the map is long (1024 positions over 2 threads, say), in another order than the
    # loop for many channels: an image's sums would depend on the images beside it
    if c == 1 or not 2 <= length <= MAX_INNER or c * length < MIN_IMAGE_ELEMENTS:
        return None
    if t.is_contiguous():
        return t.view(n, c, length), 2
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(n, length, c), 1  # a view: NHWC memory
    return None


def _compiled(*tensors: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, ...] | None:
    """The compiled sums of one tensor, or of ``a - b``, ``a`` and ``b`` where ``a`` holds
    ``chunks`` consecutive chunks of ``b``'s shape; None where the loop does not take them."""
    views = [_view(t) for t in tensors]
    if any(v is None for v in views) or len({v[1] for v in views}) != 1 \
            or not KERNELS.enabled():
        return None
    dim = views[0][1]
    two = len(tensors) == 2
    args = tuple(v[0] for v in views)
    if two:  # one layout and shapes that difference_sums checked: views that fit
        a, b = args
        args = (a.view(chunks, *b.shape), b)
    args = tuple(own(t) for t in args)
    # sizes are symbolic except 0 and 1, which the compiler specialises, and a short map's
    # (STATIC_INNER), fixed in the key; the unit dimensions name the kernel (what else its
    # guards read, Kernels.call adds to the key: one compiled variant per key)
    units = tuple(d == 1 for d in args[0].shape)
    inner = args[-1].shape[dim]
    if inner <= STATIC_INNER:
        for t in args:  # tensors of their own (own): the mark is theirs alone
            torch._dynamo.mark_static(t, t.ndim - 3 + dim)
    else:
        inner = None
    res = KERNELS.call((two, dim, units, inner), lambda: _make(two, dim, units, inner), args,
                       breaks_all=True)
    if res is None or not two:
        return res
    return tuple(r.reshape(-1, r.shape[-1]) for r in res[:4]) + tuple(res[4:])


def _eager(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(2, t.ndim))
    if t.dtype in (torch.float16, torch.bfloat16):
        # summed and returned in float32: float16's own sums of squares underflow below
        # 6.1e-5 (a channel at 2.5e-4 over 7x7), where no relative bound holds
        t = t.float()
    if _per_channel(t) == 1:
        s = t.reshape(t.shape[0], -1)
        q = s * s
    else:
        # one pass for the sum of squares, no temporary (half the cost of (t*t).sum)
        s = t.sum(dim=dims)
        q = torch.linalg.vector_norm(t, dim=dims).square_()
    return s.double(), q.double()


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u`` of the per (image, channel) sums :func:`channel_sums` returns for data in
    ``dtype`` before they become float64: float32's ``2**-24``, float64's ``2**-53``, and for
    half precision its own dtype's (float16's ``2**-11``), a bound: its sums are taken and
    returned in float32, where the squares of its values are exact and, unlike a sum rounded
    to float16, do not underflow."""
    return float(torch.finfo(dtype).eps) / 2


def network_roundoff(model: torch.nn.Module) -> float:
    """The unit roundoff of the coarsest floating parameter of ``model`` (0.0 where it has
    none): where variances of its activations are resolved from rounding
    (:func:`resolved_variance`), the ``u`` is the largest of this and :func:`unit_roundoff`
    of every floating batch's dtype, over every batch and rank (a float32 network on
    float64 images computes in float32; float32 images carry float32's rounding into a
    float64 network), as :func:`qerror.nn.propagate.measure` and
    :func:`qerror.nn.seeds.bn_image_moments` take it."""
    return max((unit_roundoff(p.dtype) for p in model.parameters() if p.is_floating_point()),
               default=0.0)


def resolved_variance(mean, sq, length: int, images: int, u: float) -> np.ndarray:
    """``E[x²] − E[x]²`` from the sums' means, and 0 where it lies within their rounding.

    ``mean`` and ``sq`` are ``E[x]`` and ``E[x²]`` over ``images`` images of ``length``
    elements each (arrays, per channel, or scalars), from per (image, channel) sums returned
    in a dtype of unit roundoff ``u`` (:func:`unit_roundoff`) and added over images in
    float64. By the bounds of the module's Notes each mean is within ``γ(L) E[x²]``
    (``E[x²]``) or ``γ(L) E|x|`` (``E[x]``) of its exact value, ``γ(k) = k v / (1 − k v)``
    with ``v`` the unit roundoff of the accumulation (``u``, float32's for half-precision
    data), plus at most three roundings to ``u`` of the returned sums and ``γ₆₄(N)`` of the
    float64 sum over ``N`` images; so the difference is within ``3 (γ(L) + 3u + γ₆₄(N))
    E[x²]`` of the exact variance (``|E[x]| E|x| ≤ E[x²]``). A variance no larger than that is
    not resolved from the rounding (a constant channel, whose exact variance is 0, gives one
    of that size) and is returned as 0. In float32 that is a channel whose mean lies beyond
    about ``1/√(3 L u)`` standard deviations (21 on a 112×112 map, 330 on 7×7): the bound is
    the worst case of any order of the additions, and such a channel's variance is often
    resolved by the sums in fact (summing ``x − m`` with ``m`` near the mean would resolve
    it; not done). A moment that is not finite (an activation that overflowed) gives
    ``nan``, never 0: it is no variance quantization collapsed.
    """
    mean, sq = np.asarray(mean, dtype=np.float64), np.asarray(sq, dtype=np.float64)
    bound = variance_rounding(sq, length, images, u)
    with np.errstate(invalid="ignore"):  # inf − inf: nan, returned as nan below
        var = np.maximum(sq - mean * mean, 0.0)
        unresolved = var <= bound
    broken = ~(np.isfinite(mean) & np.isfinite(sq))
    return np.where(broken, np.nan, np.where(unresolved, 0.0, var))


def variance_rounding(sq, length: int, images: int, u: float) -> np.ndarray:
    """The bound of :func:`resolved_variance` on the rounding of ``E[x²] − E[x]²``,
    ``3 (γ(L) + 3u + γ₆₄(N)) |E[x²]|``, for the same arguments: the computed difference is
    within it of the exact variance, so never below ``−`` it."""
    accumulate = min(u, 2.0**-24)  # torch sums half-precision data in float32
    return 3.0 * (_gamma(length, accumulate) + 3.0 * u + _gamma(images, 2.0**-53)) \
        * np.abs(np.asarray(sq, dtype=np.float64))


def _gamma(k: int, u: float) -> float:
    return k * u / (1.0 - k * u) if k * u < 1.0 else math.inf


def compiled_sums_enabled() -> bool:
    """Whether :func:`channel_sums` and :func:`difference_sums` may take the compiled loop
    here: False under ``QERROR_FUSED=0``, without inductor or with its unsafe floating-point
    optimisations on, in a forked child, or after a compiler failure turned the loop off
    (:meth:`qerror._compiled.Kernels.enabled`); where True, a tensor it does not take (see
    Notes of the module) is still summed by torch's reductions."""
    return KERNELS.enabled()


def channel_sums(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per (image, channel) of ``t`` (N, C, ...): Σ and Σ² over the remaining dimensions,
    as float64 CPU tensors (N, C), and the number of elements each sums."""
    t = t.detach()
    got = _compiled(t)
    s, q = got if got is not None else _eager(t)
    # Sums leave the device here: (N, C) at most, and the results are numpy arrays.
    return s.cpu(), q.cpu(), _per_channel(t)


def difference_sums(a: torch.Tensor, b: torch.Tensor, *, of_a: bool = False,
                    of_b: bool = False, chunks: int = 1) -> tuple[torch.Tensor, ...]:
    """Per (image, channel) of ``d = a - b`` (both (N, C, ...), of one shape): Σd and Σd² as
    :func:`channel_sums` gives them, then Σa and Σa² if ``of_a``, then Σb and Σb² if
    ``of_b``, then the number of elements each sums. Where the compiled loop takes them,
    ``a - b`` is not written out and ``a`` and ``b`` are read once for all six sums; torch's
    reductions take only those asked for.

    With ``chunks`` K, ``a`` holds K consecutive chunks of ``b``'s shape (K·N images: several
    quantized networks' outputs beside one float output) and ``d`` is each chunk less ``b``:
    the sums of ``d`` and ``a`` are (K·N, C), those of ``b`` (N, C), in one call; each
    image's sums are the bits that a call on its chunk alone gives (tested)."""
    a, b = a.detach(), b.detach()
    chunks = check_count(chunks, "chunks", 1)
    if a.shape[1:] != b.shape[1:] or a.shape[0] != chunks * b.shape[0]:
        raise ValueError(f"difference_sums needs two tensors of one shape"
                         f"{f' ({chunks} chunks of the second in the first)' if chunks > 1 else ''}"
                         f", got {tuple(a.shape)} and {tuple(b.shape)}")
    got = _compiled(a, b, chunks=chunks)
    if got is None:
        d = (a.reshape(chunks, *b.shape) - b).reshape(a.shape) if chunks > 1 else a - b
        got = _eager(d) + (_eager(a) if of_a else (None, None)) \
            + (_eager(b) if of_b else (None, None))
    keep = (True, True, of_a, of_a, of_b, of_b)
    return tuple(g.cpu() for g, k in zip(got, keep) if k) + (_per_channel(a),)
