"""The Pareto front and the budget queries, exact on hand-made sets of models."""

import numpy as np
import pytest

from qerror.compress import best_within, dominated_by, pareto_front, smallest_within

# (bytes, accuracy) of seven made-up models, chosen so that every rule shows:
SIZE = [100, 200, 200, 300, 400, 400, 50]
ACC = [0.80, 0.85, 0.83, 0.85, 0.90, 0.90, 0.70]
# 0: front (nothing smaller is as accurate)           1: front
# 2: dominated by 1 (same size, less accurate)        3: dominated by 1 (larger, as accurate)
# 4 and 5: identical, both on the front (neither strictly better)
# 6: front (the smallest)


def test_front_on_a_hand_made_example():
    assert dominated_by(SIZE, ACC).tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert pareto_front(SIZE, ACC).tolist() == [True, True, False, False, True, True, True]


def test_a_front_point_dominated_by_several():
    # the last model is beaten by all three others in both coordinates
    assert dominated_by([1, 2, 3, 9], [0.5, 0.6, 0.7, 0.1]).tolist() == [0, 0, 0, 3]


def test_best_within_each_budget():
    # 40: nothing fits; 50: only model 6; 250: 1 beats 0 and 2; 10**6: 4 and 5 tie, 4 first
    assert best_within(SIZE, ACC, [40, 50, 250, 300, 10**6]).tolist() == [-1, 6, 1, 1, 4]
    # equally accurate: the smaller wins over the earlier
    assert best_within([300, 200], [0.9, 0.9], [500]).tolist() == [1]


def test_smallest_within_a_margin_of_the_reference():
    assert smallest_within(SIZE, ACC, 0.90, 0.05) == 1     # 0.85 >= 0.85, 200 B
    assert smallest_within(SIZE, ACC, 0.90, 0.0) == 4      # only 4 and 5; 4 is first
    assert smallest_within(SIZE, ACC, 0.90, 0.25) == 6
    assert smallest_within(SIZE, ACC, 0.99, 0.0) == -1
    # equal size: the more accurate
    assert smallest_within([10, 10], [0.5, 0.6], 0.6, 0.2) == 1


@pytest.mark.parametrize("size, acc, match", [([1, 2], [0.5], "same length"),
                                              ([1, np.nan], [0.5, 0.6], "finite"),
                                              ([1, 2], [0.5, np.nan], "finite"),
                                              ([1, 2], [np.inf, 0.6], "finite"),
                                              ([-1], [0.5], ">= 0")])
def test_bad_points_are_refused(size, acc, match):
    with pytest.raises(ValueError, match=match):
        pareto_front(size, acc)


def test_a_bad_reference_or_margin_is_refused():
    with pytest.raises(ValueError, match="margin >= 0"):
        smallest_within([1], [0.5], 0.5, -0.01)
    # a NaN reference made every comparison False: -1, "no model qualifies", without a word
    for ref in (np.nan, np.inf):
        with pytest.raises(ValueError, match="need a finite reference"):
            smallest_within([1], [0.5], ref, 0.01)
    # a string or None said only numpy's "ufunc 'isfinite' not supported"; a bool is no accuracy
    for ref, margin in (("0.5", 0.01), (0.5, "0.01"), (None, 0.01), (0.5, None), (True, 0.01),
                        (0.5, np.True_)):
        with pytest.raises(ValueError, match="need a finite reference"):
            smallest_within([1], [0.5], ref, margin)


def test_a_model_of_zero_bytes_and_a_budget_of_zero_are_counts_like_any_other():
    # sizes and budgets are byte counts >= 0: a model of 0 bytes (a constant predictor)
    # fits a budget of 0, and is on the front as the smallest
    assert best_within([0, 10], [0.1, 0.9], [0, 9, 10]).tolist() == [0, 0, 1]
    assert pareto_front([0, 10], [0.1, 0.9]).tolist() == [True, True]
    assert smallest_within([0, 10], [0.1, 0.9], 0.1, 0.0) == 0


def test_a_model_exactly_the_margin_below_qualifies_whatever_the_float_rounding():
    # Accuracies k/n: a model 100 correct answers of 10,000 below the reference is exactly
    # one point below it. In floating point k/n - 0.01 lands an ulp above (k-100)/n for
    # hundreds of k; every one of them must still qualify.
    n = 10_000
    missed = [k for k in range(100, n + 1)
              if smallest_within([100, 10], [k / n, (k - 100) / n], k / n, 0.01) != 1]
    assert missed == []
    # one answer fewer is beyond the margin
    assert smallest_within([100, 10], [0.5097, 0.4996], 0.5097, 0.01) == 0
    # also on a split of 200,000 (step 5e-6): the slack stays below one answer
    n = 200_000
    for k in (2_000, 101_937, n):
        at, beyond = (k - 2_000) / n, (k - 2_001) / n
        assert smallest_within([100, 10], [k / n, at], k / n, 0.01) == 1, k
        assert smallest_within([100, 10], [k / n, beyond], k / n, 0.01) == 0, k


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0])
def test_a_budget_that_is_no_byte_count_is_refused(budget):
    with pytest.raises(ValueError, match="byte budget"):
        best_within([10, 20], [0.5, 0.6], [budget])


@pytest.mark.parametrize("budget", [True, np.bool_(True), "15", b"15", None, 15 + 0j])
def test_a_budget_that_is_no_real_number_is_refused(budget):
    # True was taken as 1 byte and "15" as 15 (float() read them): the one check of a byte
    # budget, fit_wisard's and tiny_cnn_within's, refuses them
    with pytest.raises(ValueError, match="each byte budget must be a finite number of bytes "
                                         ">= 0, got"):
        best_within([10, 20], [0.5, 0.6], [budget])


def test_numpy_and_huge_integer_budgets_are_taken_as_the_numbers_they_are():
    for budget in (np.int64(15), np.float32(15.0), np.uint8(15), 15.0):
        assert best_within([10, 20], [0.5, 0.6], [budget]).tolist() == [0], budget
    # beyond float64's range (float() overflowed): every model fits
    assert best_within([10, 20], [0.5, 0.6], [10 ** 400]).tolist() == [1]
