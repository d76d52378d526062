"""Byte counting: sizes from element counts and formats, checked against arrays held."""

import math

import numpy as np
import pytest
import torch

from qerror.compress import (
    ModelSize,
    SizePart,
    StorageFormat,
    elias_fano_bits,
    elias_fano_decode,
    elias_fano_encode,
    held_bytes,
    index_bits,
    pack_bits,
    packed_bytes,
    storage_bytes,
    unpack_bits,
)


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


@pytest.mark.parametrize("choices, bits", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (784, 10),
                                           (1024, 10), (1025, 11), (5488, 13)])
def test_index_bits_names_every_choice(choices, bits):
    assert index_bits(choices) == bits
    assert 2**bits >= choices


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 64])
def test_pack_bits_round_trips_in_exactly_the_counted_bytes(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**min(bits, 63), 37, dtype=np.uint64)
    if bits == 64:
        values[0] = np.uint64(2**64 - 1)
    packed = pack_bits(values, bits)
    assert len(packed) == packed_bytes(37, bits)
    assert np.array_equal(unpack_bits(packed, 37, bits), values)


def test_pack_bits_layout_is_least_significant_bit_first():
    # 3-bit values 5, 1, 6 give the stream (value bits LSB first) 101 100 01|1: byte 0 holds
    # stream bits 0..7 as its bits 0..7 (0b10001101), byte 1 the last bit.
    assert pack_bits(np.array([5, 1, 6]), 3) == bytes([0b10001101, 0b00000001])


def test_pack_bits_refuses_values_that_do_not_fit():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*3\)"):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([-1]), 3)
    with pytest.raises(TypeError):
        pack_bits(np.array([0.5]), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(b"\0", 3, 3)


def test_model_size_sums_its_parts():
    size = ModelSize((SizePart("header", 10, 8), SizePart("bits", 9, 1),
                      SizePart("wiring", 0, 1, "seeded")))
    assert size.total_bytes == 10 + 2 + 0
    assert size.part("bits").bytes == 2
    assert [r["bytes"] for r in size.rows()] == [10, 2, 0]
    with pytest.raises(KeyError, match="no part 'x'"):
        size.part("x")
    with pytest.raises(ValueError):
        SizePart("bad", -1, 8)


def test_elias_fano_on_a_hand_example():
    # Universe 2^4, one set {3, 9}: L = floor(log2(16/2)) = 3 low bits each (3 → 110,
    # 9 → 001 read LSB first as 1,0,0), high parts 0 and 1 set bits 0+0 and 1+1 of
    # 2 + 16>>3 = 4 unary bits.
    bits = elias_fano_encode([3, 9], [2], 4)
    assert bits.tolist() == [1, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    assert elias_fano_bits([2], 4) == 10
    assert elias_fano_decode(bits, [2], 4).tolist() == [3, 9]


@pytest.mark.parametrize("universe_bits", [1, 3, 12, 20])
def test_elias_fano_round_trips_in_the_counted_bits(universe_bits):
    rng = np.random.default_rng(universe_bits)
    lengths = rng.integers(0, min(2**universe_bits, 40) + 1, 30)
    lengths[3] = 0
    values = np.concatenate([np.sort(rng.choice(2**universe_bits, k, replace=False))
                             for k in lengths])
    bits = elias_fano_encode(values, lengths, universe_bits)
    assert bits.size == elias_fano_bits(lengths, universe_bits)
    assert np.array_equal(elias_fano_decode(bits, lengths, universe_bits), values)
    # A set of m values costs at most m·u + 2m + 1 bits (L ≤ u - log2 m, 2^u >> L < 2m).
    assert bits.size <= sum(m * universe_bits + 2 * m + 1 for m in lengths if m)
