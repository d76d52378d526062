"""Input validation shared by the library: one clear message per mistake."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

#: How a weight that a reparametrization computes (``torch.nn.utils.prune``, a
#: parametrization such as ``parametrizations.weight_norm``, the old ``weight_norm`` hook)
#: becomes a plain parameter again: the advice of every refusal of such a weight.
MAKE_WEIGHT_PLAIN = ("torch.nn.utils.prune.remove, "
                     "torch.nn.utils.parametrize.remove_parametrizations, or "
                     "torch.nn.utils.remove_weight_norm")

_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def listing(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, and how many more there are: the
    list a message names (of tensors, keys, files) without running on for pages."""
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... ({len(items) - limit} more)" if len(items) > limit else "")


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether a torch dtype holds integers (bool, floats and complex do not)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_labels(y, classes: int | None = None, n: int | None = None,
                 name: str = "labels") -> torch.Tensor:
    """``y`` as an int64 tensor of class indices: the one check of labels in the library.

    Parameters
    ----------
    y : torch.Tensor
        Labels of an integer dtype (a bool, float or complex tensor is refused, a float one
        even where its values are whole: a float target means class probabilities to
        torch's ``cross_entropy``, and a NaN or fractional label matches no prediction).
    classes : int, optional
        The label space's size: every label in 0 to ``classes - 1``. None: only 0 or more.
    n : int, optional
        The samples the labels go with: shape ``(n,)``. None: any one-dimensional shape.
    name : str
        How messages name the labels.

    Raises
    ------
    TypeError
        ``y`` is not a tensor, or not of an integer dtype.
    ValueError
        ``y`` is not of shape ``(n,)`` (one-dimensional where ``n`` is None), or holds a
        label below 0 or from ``classes`` up: a label outside the label space counts its
        sample wrong whatever the network predicts (and ``cross_entropy`` leaves out the
        samples labelled -100, its ``ignore_index``).
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of integer class indices, got "
                        f"{type(y).__name__}")
    if not is_integer_dtype(y.dtype):
        hint = "; labels that are whole numbers convert with .long()" \
            if y.dtype.is_floating_point else ""
        raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}{hint}")
    if (y.ndim != 1) if n is None else (tuple(y.shape) != (n,)):
        want = "one-dimensional," if n is None else f"of shape ({n},), one per sample,"
        raise ValueError(f"{name} must be {want} got shape {tuple(y.shape)}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (classes is not None and hi >= classes):
            space = "which start at 0" if classes is None else \
                f"of the {classes} classes (0 to {classes - 1})"
            raise ValueError(f"{name} from {lo} to {hi} are not class indices {space}; give "
                             "labels of the model's label space")
    return y.long()


#: The largest seed. A seed is an integer from 0 to 2**64 - 1: torch's generators take no
#: more (``manual_seed`` refuses 2**64 and reads -1 as 2**64 - 1), while numpy's
#: ``SeedSequence`` takes any size. Within that range torch's CPU generator (a Mersenne
#: twister) starts from the seed's low 32 bits only (torch 2.14: seeds 5, 5 + 2**32 and
#: 5 + 2**63 give the same ``randperm``): draws made with torch on the CPU (a network's
#: initial weights, a shuffle, a calibration sample) repeat for seeds 2**32 apart, while
#: numpy's (bootstraps, training's batch order, stochastic rounding's keys) and CUDA's use
#: all 64 bits.
MAX_SEED = 2 ** 64 - 1


def _is_integer(value) -> bool:
    """Whether ``value`` is an integer, Python's or numpy's, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_real(value) -> bool:
    """Whether ``value`` is a real number, Python's or numpy's, and not a bool (``True`` is
    an int to ``isinstance``, and no rate, weight or size)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_flag(value, name: str) -> bool:
    """``value`` as a Python bool, where it is one (Python's or numpy's): a string such as
    ``'False'``, a number or None is refused, where ``bool()`` would read ``'False'`` as true
    without a word.

    Raises
    ------
    TypeError
        ``value`` is not a bool.
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r} "
                        f"({type(value).__name__})")
    return bool(value)


def check_count(value, name: str, low: int = 0) -> int:
    """``value`` as an int, where it is an integer (Python's or numpy's; not a bool) ≥
    ``low``: the one check of a count in the library.

    Raises
    ------
    TypeError
        ``value`` is not an integer: a bool (``True`` is no count), a string, or a float,
        even an integral one: a count computed in floating point (``0.29 * 100`` is
        28.999999999999996) would be truncated by ``int()`` without a word.
    ValueError
        ``value`` is an integer below ``low``.
    """
    if not _is_integer(value):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r} "
                        f"({type(value).__name__}): an integer, Python's or numpy's, not a "
                        f"bool or a float (even an integral one); round a count computed in "
                        f"floating point with round() before passing it")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_byte_budget(value, name: str) -> int | float:
    """``value`` as a Python int (an integer) or float (another real number), where it is a
    real number of bytes, Python's or numpy's, not a bool, finite and ≥ 0: the one check of
    a byte budget in the library. An integer stays exact however large; a float compares
    exactly with the int byte counts it bounds.

    Raises
    ------
    ValueError
        ``value`` is a bool (``True`` is no budget), a string or another non-number, NaN
        (every comparison with it is false, so a search would take any model or none), an
        infinity, or below 0.
    """
    if not is_real(value) or not (_is_integer(value) or math.isfinite(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number of bytes >= 0, got {value!r}")
    return int(value) if _is_integer(value) else float(value)


def check_seed(value, name: str) -> int:
    """``value`` as an int, where it is an integer (Python's or numpy's; not a bool) from 0
    to :data:`MAX_SEED` = 2**64 - 1: the one check of a seed in the library.

    Raises
    ------
    TypeError
        ``value`` is not an integer: a bool, None, a string, or a float, even an integral
        one (``int()`` would take 2.5 as 2, the seed of other draws).
    ValueError
        ``value`` is below 0 or above 2**64 - 1: torch would refuse it or read -1 as
        2**64 - 1, and a 64-bit key would take 2**64 as 0, the draws of another seed.

    Notes
    -----
    torch's CPU generator reads only the low 32 bits of a seed (:data:`MAX_SEED`): for
    draws that must differ between seeds, use seeds below 2**32.
    """
    if not _is_integer(value):
        raise TypeError(f"{name} must be an int from 0 to 2**64 - 1, got {value!r} "
                        f"({type(value).__name__}): a seed is an integer, Python's or "
                        f"numpy's, not a bool or a float (even an integral one)")
    if not 0 <= int(value) <= MAX_SEED:
        raise ValueError(f"{name} must be an int from 0 to 2**64 - 1, got {value!r}: seeds "
                         f"are 64-bit, the range of torch's generators")
    return int(value)


#: What a ``generator=`` argument takes (:func:`check_seed_or_generator`): an int seed from 0
#: to :data:`MAX_SEED`, Python's or numpy's, a ``numpy.random.Generator`` or a
#: ``torch.Generator``. The one annotation of such an argument in the library.
SeedOrGenerator = int | np.integer | np.random.Generator | torch.Generator


def check_seed_or_generator(value, name: str = "generator"):
    """``value`` itself where it is a ``numpy.random.Generator`` or ``torch.Generator``,
    else :func:`check_seed`'s int: the one check of a ``generator=`` argument (None, which
    each procedure names in its own words, is the caller's to refuse first).

    Raises
    ------
    TypeError
        ``value`` is neither a generator nor an integer (a bool or a float included).
    ValueError
        ``value`` is an integer outside 0 to 2**64 - 1.
    """
    if isinstance(value, np.random.Generator | torch.Generator):
        return value
    if not _is_integer(value):
        raise TypeError(f"{name} must be an int seed from 0 to 2**64 - 1, a "
                        f"numpy.random.Generator or a torch.Generator, got {value!r} "
                        f"({type(value).__name__})")
    return check_seed(value, name)


def check_float_array(x, name: str) -> None:
    """Require a non-empty floating-point numpy array or torch tensor."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask quantization would ignore; "
                        f"pass {name}.compressed() or {name}.filled(value)")
    if isinstance(x, torch.Tensor):
        if x.dtype not in _TORCH_FLOATS:
            raise TypeError(
                f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                f"got dtype {x.dtype}; convert with {name}.float()"
            )
        size = x.numel()
    elif isinstance(x, np.ndarray):
        if x.dtype.type not in _NUMPY_FLOATS:
            raise TypeError(
                f"{name} must be a floating-point array (float16/float32/float64), got dtype "
                f"{x.dtype}; convert with {name}.astype(numpy.float32)"
            )
        size = x.size
    else:
        raise TypeError(
            f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}; "
            f"convert with numpy.asarray({name}, dtype=numpy.float32)"
        )
    if size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one element")


def check_finite(x, name: str) -> None:
    """Raise if ``x`` holds NaN or +-Inf, saying how many and where the first is."""
    if isinstance(x, torch.Tensor):
        if x.numel() == 1 or x.dtype in (torch.float16, torch.bfloat16):
            ok = bool(torch.isfinite(x).all())
        else:
            # aminmax propagates NaN and exposes +-Inf in one reduction pass.
            lo, hi = torch.aminmax(x.detach())
            ok = math.isfinite(float(lo)) and math.isfinite(float(hi))
        if ok:
            return
        bad = ~torch.isfinite(x)
        count = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        value = float(x[first]) if first else float(x.reshape(-1)[0])
    else:
        if np.isfinite(x).all():
            return
        bad = ~np.isfinite(x)
        count = int(bad.sum())
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        value = float(x[first]) if first else float(x.reshape(-1)[0])
    raise ValueError(
        f"{name} holds {count} non-finite value(s) (first {value} at index {first}); "
        "quantization needs finite data: remove or replace NaN/Inf first"
    )


def check_positive_finite(value, name: str):
    """Require a positive finite real scalar or array; return it as float64 numpy."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
    raw = np.asarray(value)
    if raw.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a real number or array of them, got {value!r}")
    arr = raw.astype(np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        bad = arr[~(np.isfinite(arr) & (arr > 0))].reshape(-1)[0]
        raise ValueError(f"{name} must be positive and finite, got {bad!r}")
    return arr
