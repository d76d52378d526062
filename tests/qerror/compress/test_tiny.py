"""The budget-sized CNN: the widest that fits, counted as the file it writes."""

import pytest
import torch

from qerror.compress import TinyCNN, model_bytes, tiny_cnn_within, write_model


def _params(w, c=1, k=10):
    # the formula of TinyCNN's Notes, without the BatchNorm running statistics
    return 9 * c * w + 18 * w * w + 72 * w * w + 4 * w * k + k + 2 * 7 * w


@pytest.mark.parametrize("width", [1, 3, 16])
def test_parameter_count_and_output_shape(width):
    m = TinyCNN(width)
    assert sum(p.numel() for p in m.parameters()) == _params(width)
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("budget", [5_000, 45_000, 100_000, 250_000])
def test_widest_within_budget(budget, tmp_path):
    m = tiny_cnn_within(budget)
    size = model_bytes(m, "dense", "int8", keep_dense=()).total
    assert size <= budget < model_bytes(TinyCNN(m.width + 1), "dense", "int8",
                                        keep_dense=()).total
    assert write_model(m, tmp_path / "m.bin", "dense", "int8", keep_dense=()) == size


def test_same_seed_same_weights_and_global_generator_untouched():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a, b = TinyCNN(4, seed=1), TinyCNN(4, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bad_budget_and_width():
    with pytest.raises(ValueError, match="width 1 takes"):
        tiny_cnn_within(100)
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        TinyCNN(0)
