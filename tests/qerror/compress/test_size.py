"""Byte counting: sizes from element counts and formats, checked against arrays held."""

import math

import numpy as np
import pytest
import torch

from qerror.compress import StorageFormat, held_bytes, packed_bytes, storage_bytes


@pytest.mark.parametrize("fmt", [f for f in StorageFormat if f is not StorageFormat.INT4_PACKED],
                         ids=lambda f: f.value)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (5, 1, 32, 32)])
def test_byte_formats_count_what_numpy_and_torch_hold(fmt, shape):
    arr = np.zeros(shape, dtype=fmt.value)
    count = math.prod(shape)
    assert storage_bytes(fmt, count) == arr.nbytes == held_bytes(arr)
    assert held_bytes(torch.from_numpy(arr)) == arr.nbytes


@pytest.mark.parametrize("elements, expected", [(0, 0), (1, 1), (2, 1), (3, 2), (784, 392)])
def test_int4_packs_two_codes_per_byte(elements, expected):
    assert storage_bytes(StorageFormat.INT4_PACKED, elements) == expected
    assert storage_bytes("int4_packed", elements) == expected


def test_packed_bytes_is_exact_for_counts_beyond_float_precision():
    # 2**60 + 1 three-bit values: a float product would round away the last partial byte.
    n = 2**60 + 1
    assert packed_bytes(n, 3) == (3 * n + 7) // 8
    assert packed_bytes(2**53 + 1, 8) == 2**53 + 1


def test_imagenet_sizes():
    val = 50_000 * 3 * 224 * 224
    assert storage_bytes("float32", val) == 4 * val
    assert storage_bytes(StorageFormat.UINT8, val) == val
    assert storage_bytes(StorageFormat.FLOAT16, val) / storage_bytes("float32", val) == 0.5


def test_formats_bits_labels_and_parsing():
    assert [f.bits for f in StorageFormat] == [32, 16, 8, 8, 4]
    assert StorageFormat.INT4_PACKED.label == "int4 packed"
    assert StorageFormat.parse("INT8") is StorageFormat.INT8
    with pytest.raises(ValueError, match="storage format 'int3' is not one of"):
        storage_bytes("int3", 1)


def test_bad_counts_and_objects_are_refused():
    with pytest.raises(ValueError):
        packed_bytes(-1, 8)
    with pytest.raises(ValueError):
        packed_bytes(1, 0)
    with pytest.raises(TypeError):
        held_bytes([1, 2, 3])
