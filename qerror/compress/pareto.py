"""Size against accuracy: the Pareto front of a set of models and what each budget buys.

Every function takes the models as two aligned 1-D arrays, their sizes (bytes, smaller is
better) and their accuracies (larger is better), so the same code serves any mix of
methods: dense, sparse, INT8, weightless and small CNNs alike.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np

from qerror._checks import check_byte_budget, is_real

# Below the bar of smallest_within by float rounding alone (see its Notes).
_SLACK = 1e-12


def _points(size, accuracy) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(size, dtype=np.float64).reshape(-1)
    a = np.asarray(accuracy, dtype=np.float64).reshape(-1)
    if s.shape != a.shape:
        raise ValueError(f"size and accuracy must have the same length, got {s.size} and "
                         f"{a.size}")
    if not (np.isfinite(s).all() and np.isfinite(a).all()):
        raise ValueError("size and accuracy must be finite: a NaN has no place on a front")
    if (s < 0).any():
        raise ValueError("sizes are byte counts, >= 0")
    return s, a


def dominated_by(size, accuracy) -> np.ndarray:
    """For each model, how many others dominate it.

    Parameters
    ----------
    size, accuracy : array_like, shape (n,)
        Bytes (smaller is better) and accuracy (larger is better), finite.

    Returns
    -------
    numpy.ndarray of int64, shape (n,)

    Notes
    -----
    Model ``j`` dominates model ``i`` when it is no larger and no less accurate, and
    strictly better in one of the two: ``s_j <= s_i``, ``a_j >= a_i`` and
    ``(s_j, a_j) != (s_i, a_i)``. Two models with the same size and accuracy do not
    dominate each other, so both stay on the front. The comparison is all pairs (``n²``),
    exact on the given numbers; a study compares tens of models.
    """
    s, a = _points(size, accuracy)
    no_worse = (s[None, :] <= s[:, None]) & (a[None, :] >= a[:, None])
    better = (s[None, :] < s[:, None]) | (a[None, :] > a[:, None])
    return (no_worse & better).sum(axis=1).astype(np.int64)


def pareto_front(size, accuracy) -> np.ndarray:
    """Whether each model is on the Pareto front (dominated by no other), bool ``(n,)``.

    See :func:`dominated_by` for the order; ties in both coordinates are all kept.
    """
    return dominated_by(size, accuracy) == 0


def best_within(size, accuracy, budgets: Iterable[float]) -> np.ndarray:
    """For each byte budget, the index of the most accurate model that fits in it.

    Parameters
    ----------
    size, accuracy : array_like, shape (n,)
    budgets : iterable of float
        Byte budgets, each a finite real number ``>= 0`` (an int or a float, not a bool or
        a string: ValueError); a model fits when ``size <= budget``.

    Returns
    -------
    numpy.ndarray of int64, shape (len(budgets),)
        The index, or -1 where no model fits. Among equally accurate models the smaller
        wins, then the earlier.
    """
    s, a = _points(size, accuracy)
    out = []
    for budget in budgets:
        budget = check_byte_budget(budget, "each byte budget")
        # an int budget beyond float64's range holds every (finite) size
        fits = np.nonzero(s <= float(min(budget, sys.float_info.max)))[0]
        if fits.size == 0:
            out.append(-1)
            continue
        # lexsort: last key first; most accurate, then smallest, then first
        order = np.lexsort((fits, s[fits], -a[fits]))
        out.append(int(fits[order[0]]))
    return np.asarray(out, dtype=np.int64)


def smallest_within(size, accuracy, reference: float, margin: float) -> int:
    """Index of the smallest model whose accuracy is at least ``reference - margin``.

    Parameters
    ----------
    size, accuracy : array_like, shape (n,)
    reference : float
        The accuracy to stay near (e.g. the dense baseline's).
    margin : float
        How much below it still counts, ``>= 0`` (e.g. 0.01 for one point).
        Both are real numbers (Python's or numpy's, not a bool or a string), finite:
        ValueError otherwise.

    Returns
    -------
    int
        The index, or -1 when no model qualifies; ties in size go to the more accurate,
        then the earlier.

    Notes
    -----
    Accuracies are fractions of counts, ``k/n``: a model exactly ``margin`` below the
    reference qualifies, though ``reference - margin`` in floating point can land an ulp
    above it (``0.5097 - 0.01 > 0.4997``). The bar is lowered by :data:`_SLACK` (1e-12),
    far below the step of any accuracy a test split gives (``1/n``).
    """
    s, a = _points(size, accuracy)
    if not (is_real(reference) and is_real(margin) and np.isfinite(reference)
            and np.isfinite(margin) and margin >= 0):
        raise ValueError(f"need a finite reference and a finite margin >= 0, got "
                         f"{reference!r} and {margin!r}")
    ok = np.nonzero(a >= reference - margin - _SLACK)[0]
    if ok.size == 0:
        return -1
    order = np.lexsort((ok, -a[ok], s[ok]))
    return int(ok[order[0]])


__all__ = ["best_within", "dominated_by", "pareto_front", "smallest_within"]
