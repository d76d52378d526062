"""The API's bad-input table: each wrong call raises one exception of the right type whose
message names the problem (and, where there is one, the fix); none is an AttributeError or
another accident of the implementation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qerror import (
    QuantSpec,
    RoundingMode,
    bias_test,
    calibrate,
    data,
    dequantize,
    error_moments,
    fake_quantize,
    mcnemar_from_counts,
    quantize,
    wilson_ci,
)
from qerror.compress.size import storage_bytes
from qerror.nn.models import CheckpointNotFoundError, load_checkpoint

SPEC = QuantSpec()
X = np.array([0.5, 1.0], np.float32)

# (case id, call, exception type, regular expression its message must match)
CASES = [
    ("quantize-a-list", lambda: quantize([1.0, 2.0], SPEC, 0.1), TypeError,
     r"x must be a numpy\.ndarray or torch\.Tensor, got list; convert with numpy\.asarray"),
    ("fake-quantize-a-tuple", lambda: fake_quantize((1.0,), SPEC, 0.1), TypeError,
     r"got tuple"),
    ("calibrate-a-list", lambda: calibrate([1.0, 2.0], SPEC), TypeError, r"got list"),
    ("dequantize-a-list", lambda: dequantize([1, 2], 0.1), TypeError, r"q must be .* got list"),
    ("integer-array", lambda: quantize(np.array([1, 2]), SPEC, 0.1), TypeError,
     r"floating-point array .* got dtype int64; convert with x\.astype"),
    ("integer-tensor", lambda: quantize(torch.tensor([1, 2]), SPEC, 0.1), TypeError,
     r"floating-point tensor .* convert with x\.float\(\)"),
    ("nan-in-data", lambda: quantize(np.array([1.0, np.nan], np.float32), SPEC, 0.1),
     ValueError, r"1 non-finite value\(s\) \(first nan at index \(1,\)\)"),
    ("empty-data", lambda: quantize(np.array([], np.float32), SPEC, 0.1), ValueError,
     r"x is empty"),
    ("zero-scale", lambda: quantize(X, SPEC, 0.0), ValueError,
     r"scale must be positive and finite"),
    ("nan-scale", lambda: quantize(X, SPEC, float("nan")), ValueError,
     r"scale must be positive and finite"),
    ("bits-1", lambda: QuantSpec(bits=1), ValueError, r"bits must be between 2 and 16, got 1"),
    ("bits-a-float", lambda: QuantSpec(bits=8.0), TypeError, r"bits must be an int"),
    ("spec-a-string", lambda: quantize(X, "int8", 0.1), TypeError, r"spec must be a QuantSpec"),
    ("stochastic-without-generator",
     lambda: fake_quantize(X, QuantSpec(rounding=RoundingMode.STOCHASTIC), 0.1), ValueError,
     r"STOCHASTIC rounding needs generator="),
    ("distribution-missing", lambda: error_moments(None, SPEC, 0.1), TypeError,
     r"dist must be a frozen scipy\.stats continuous distribution"),
    ("wilson-no-trials", lambda: wilson_ci(5, 0), ValueError, r"n must be at least 1"),
    # a count is checked in one place (qerror._checks.check_count): stats and compress said
    # TypeError 'must be an integer' and ValueError 'must be an int >= 0' for the same 2.5
    ("count-a-float-stats", lambda: wilson_ci(2.5, 10), TypeError,
     r"^successes must be an int >= 0, got 2\.5 \(float\): .* round\(\)"),
    ("count-a-float-compress", lambda: storage_bytes("float32", 2.5), TypeError,
     r"^elements must be an int >= 0, got 2\.5 \(float\): .* round\(\)"),
    ("count-a-bool-stats", lambda: mcnemar_from_counts(True, 0, 5), TypeError,
     r"^only_a must be an int >= 0, got True \(bool\)"),
    ("count-a-bool-compress", lambda: storage_bytes("float32", True), TypeError,
     r"^elements must be an int >= 0, got True \(bool\)"),
    ("count-negative-stats", lambda: wilson_ci(-1, 10), ValueError,
     r"^successes must be an int >= 0, got -1$"),
    ("count-negative-compress", lambda: storage_bytes("float32", -1), ValueError,
     r"^elements must be an int >= 0, got -1$"),
    ("bias-test-one-value", lambda: bias_test([1.0]), ValueError, r"need at least 2"),
    ("checkpoint-missing", lambda: load_checkpoint("/nonexistent/model.pt"),
     CheckpointNotFoundError, r"no checkpoint at /nonexistent/model\.pt"),
    ("data-root-missing", lambda: data.fashion_mnist_splits("/nonexistent"),
     data.DataNotFoundError, r"/nonexistent does not exist"),
]


@pytest.mark.parametrize("call, kind, pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_api_input_raises_a_clear_error(call, kind, pattern):
    with pytest.raises(kind) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


def test_a_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data.write_idx(path, np.zeros(100, np.uint8))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(data.DataError, match=re.escape(str(path))):
        data.read_idx(path)
