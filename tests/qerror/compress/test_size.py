"""Byte counting: sizes from element counts and formats, checked against arrays held."""

import math
import re
import warnings

import numpy as np
import pytest
import torch

from qerror.compress import (
    ModelSize,
    SizePart,
    SparseFormat,
    StorageFormat,
    decode_tensor,
    elias_fano_bits,
    elias_fano_decode,
    elias_fano_encode,
    encode_tensor,
    held_bytes,
    index_bits,
    index_dtype,
    model_bytes,
    pack_bits,
    packed_bytes,
    prune_global,
    read_model,
    semi_structured_masks,
    storage_bytes,
    tensor_bytes,
    unpack_bits,
    write_model,
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


# 0.29 * 100 is 28.999999999999996 in binary floating point: int() made it 28 nonzeros
_NNZ = 0.29 * 100


@pytest.mark.parametrize("call, name", [
    (lambda: tensor_bytes((10, 10), _NNZ, "csr"), "nnz"),
    (lambda: tensor_bytes((10, 10.9)), "shape"),
    (lambda: tensor_bytes((10, 10), None, "dense", "int8", scales=1.5), "scales"),
    (lambda: tensor_bytes((10, 10), True, "csr"), "nnz"),
    (lambda: storage_bytes("float32", _NNZ), "elements"),
    (lambda: packed_bytes(2.5, 3), "elements"),
    (lambda: packed_bytes(8, 2.5), "bits"),
    (lambda: index_bits(256.5), "choices"),
    (lambda: index_dtype(255.5), "max_value"),
    (lambda: SizePart("x", 2.5, 3), "elements"),
    (lambda: pack_bits(np.arange(4), 2.5), "bits"),
    (lambda: unpack_bits(b"\x00", 2.5, 3), "count"),
    (lambda: elias_fano_bits([2.5], 3), "lengths"),
    (lambda: elias_fano_bits([2], 3.5), "universe_bits"),
])
def test_counts_that_are_not_integers_are_refused_not_truncated(call, name):
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        call()


@pytest.mark.parametrize("sparse", ["dense", "csr", "bitmask", "2:4"])
def test_a_negative_nonzero_count_is_refused(sparse):
    with pytest.raises(ValueError, match="^nnz must be an int >= 0, got -1$"):
        tensor_bytes((4, 8), -1, sparse)
    assert tensor_bytes((4, 8), 0, sparse).total >= 0  # zero nonzeros: a count


@pytest.mark.parametrize("values", ["int8", "uint8", "int4_packed"])
@pytest.mark.parametrize("scales", [0, -1])
def test_integer_values_need_one_scale_or_more(values, scales):
    with pytest.raises(ValueError, match=f"^scales must be an int >= 1, got {scales}$"):
        tensor_bytes((4, 8), None, "dense", values, scales=scales)


@pytest.mark.parametrize("scales", [False, 0.0, 2.5, np.float64(1.0)])
def test_float_values_refuse_scales_that_are_no_count(scales):
    """Float formats take no scales, and took False and 0.0 as none; 2.5 was 'carry no
    quantization scales' (a ValueError) where every other count's wrong type is a
    TypeError."""
    with pytest.raises(TypeError, match="^scales must be an int >= 0"):
        tensor_bytes((4, 8), None, "dense", "float16", scales=scales)
    for none in (None, 0, np.int64(0)):
        assert tensor_bytes((4, 8), None, "dense", "float16", scales=none).total == 64
    with pytest.raises(ValueError, match="^scales must be an int >= 0, got -1$"):
        tensor_bytes((4, 8), values="float32", scales=-1)


def test_numpy_integer_counts_are_taken():
    assert packed_bytes(np.int64(3), np.uint8(3)) == 2
    assert tensor_bytes((np.int32(4), 4), np.int64(3), "csr").values == 12
    assert index_bits(np.uint16(256)) == 8
    assert elias_fano_bits(np.array([1], np.uint8), np.int64(3)) == elias_fano_bits([1], 3)


# --------------------------------------------------------------------------- sparse formats


@pytest.mark.parametrize("max_value, dtype", [(0, "uint8"), (255, "uint8"), (256, "uint16"),
                                              (65535, "uint16"), (65536, "uint32"),
                                              (2**32, "uint64")])
def test_index_dtype_is_the_smallest_unsigned_that_holds(max_value, dtype):
    assert index_dtype(max_value) == np.dtype(dtype)


def test_sparse_counts_from_shapes_and_element_sizes():
    shape, n, nnz = (64, 32, 3, 3), 64 * 32 * 9, 1843
    assert tensor_bytes(shape).total == 4 * n
    # CSR: 65 row pointers sized for up to n = 18432 (uint16), 1843 column indices < 288
    # (uint16), 1843 float32 values.
    assert tensor_bytes(shape, nnz, "csr") == tensor_bytes(shape, nnz, SparseFormat.CSR)
    b = tensor_bytes(shape, nnz, "csr")
    assert (b.row_pointers, b.indices, b.values) == (65 * 2, nnz * 2, nnz * 4)
    assert tensor_bytes((10, 200), 7, "csr").indices == 7  # columns < 256: one byte each
    b = tensor_bytes(shape, nnz, "bitmask", "int8")
    assert (b.mask, b.values, b.scales, b.zero_points) == (n // 8, nnz, 64 * 4, 64)
    b = tensor_bytes(shape, n // 2, "2:4")
    assert (b.values, b.mask) == (n // 2 * 4, n // 8)  # 4 bits of metadata per group of 4
    b = tensor_bytes((1000, 2048), 10**6, "2:4", "int8", scales=1)
    assert b.total == 1_024_000 + 1_024_000 * 2 // 8 + 4 + 1


def test_sparse_count_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        tensor_bytes((4, 6), 4, "2:4")
    # a 3-D weight has no groups along its input dimension in this layout (as
    # qerror.compress.sparse.is_two_four): refused, not grouped in memory order
    w = torch.zeros(1, 4, 3)
    w[0, :2] = 1.0  # 2 of 4 along the inputs at every kernel position
    for call in (lambda: tensor_bytes((1, 4, 3), 6, "2:4"), lambda: encode_tensor(w, "2:4")):
        with pytest.raises(ValueError, match="2-D or 4-D weight"):
            call()
    with pytest.raises(ValueError, match="at most half"):
        tensor_bytes((4, 8), 17, "2:4")
    with pytest.raises(ValueError, match="nnz must be in"):
        tensor_bytes((4, 8), 33, "csr")
    with pytest.raises(ValueError, match="carry no quantization scales"):
        tensor_bytes((4, 8), values="float32", scales=4)
    with pytest.raises(ValueError, match="sparse format 'coo' is not one of"):
        tensor_bytes((4, 8), sparse="coo")


def _pruned(shape, sparsity, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight = torch.nn.Parameter(w)
    prune_global(layer, sparsity, keep_dense=())
    return layer.weight.detach()


@pytest.mark.parametrize("values", ["float32", "float16", "int8"])
@pytest.mark.parametrize("sparse", list(SparseFormat), ids=lambda f: f.value)
@pytest.mark.parametrize("shape", [(12, 8), (6, 8, 3, 3), (300, 4)])
def test_encoding_holds_exactly_the_counted_bytes_and_decodes(sparse, values, shape):
    if sparse is SparseFormat.TWO_FOUR:
        layer = torch.nn.Conv2d(shape[1], shape[0], 3) if len(shape) == 4 \
            else torch.nn.Linear(shape[1], shape[0])
        torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(1))
        semi_structured_masks(layer, keep_dense=())
        w = layer.weight.detach()
    else:
        w = _pruned(shape, 0.9)
    arrays = encode_tensor(w, sparse, values)
    nnz = int((w != 0).sum())
    assert sum(a.nbytes for a in arrays) == tensor_bytes(shape, nnz, sparse, values).total
    buffer = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays) + b"tail"
    back, used = decode_tensor(buffer, shape, sparse, values)
    assert used == len(buffer) - 4
    expected = w.numpy().astype(values if values != "int8" else "float32").astype(np.float32)
    if values == "int8":
        # Symmetric per-row INT8: error at most half a step, zeros exact.
        step = np.abs(w.numpy().reshape(shape[0], -1)).max(1) / 127
        err = np.abs(back - expected).reshape(shape[0], -1)
        assert (err <= step[:, None] / 2 * (1 + 1e-6)).all()
        assert (back[expected == 0] == 0).all()
    else:
        np.testing.assert_array_equal(back, expected)


def test_two_four_encoding_refuses_dense_groups():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        encode_tensor(torch.ones(2, 8), "2:4")
    with pytest.raises(ValueError, match="encoding supports"):
        encode_tensor(torch.ones(2, 8), "dense", "int4_packed")
    for values in ("uint8", "int4_packed"):  # decoding refuses what encoding never writes
        with pytest.raises(ValueError, match="decoding supports"):
            decode_tensor(bytes(64), (2, 8), "dense", values)


@pytest.mark.parametrize("values", ["uint8", "int4_packed", "float16", "float32"])
def test_two_four_count_checks_the_groups_whatever_the_value_format(values):
    # Groups of 4 with three nonzeros below 1 in magnitude: a cast to uint8 once read them
    # as zeros (and int4_packed, no numpy type, raised numpy's TypeError).
    w = torch.tensor([[0.3, -0.2, 0.1, 0.0, 0.5, 0.0, 0.0, 0.0]])
    layer = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        model_bytes(torch.nn.Sequential(layer), "2:4", values)
    with torch.no_grad():
        layer.weight[0, 2] = 0.0  # now 2:4: counted in every format
    assert model_bytes(torch.nn.Sequential(layer), "2:4", values).total > 0


def _small_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, bias=False),
                               torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10))


@pytest.mark.parametrize("sparse, values", [("dense", "float32"), ("csr", "float32"),
                                            ("bitmask", "float16"), ("2:4", "float32"),
                                            ("csr", "int8"), ("2:4", "int8")])
def test_model_file_size_is_the_count_and_reads_back(tmp_path, sparse, values):
    model = _small_cnn()
    with torch.no_grad():  # statistics a trained network would have, not the defaults
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    if sparse == "2:4":
        semi_structured_masks(model)
    else:
        prune_global(model, 0.9)
    count = model_bytes(model, sparse, values)
    path = tmp_path / "model.bin"
    assert write_model(model, path, sparse, values) == count.total == path.stat().st_size
    # By hand: the first conv dense (72 + 8 bias), BN 4×8, then the compressed weights.
    other = 4 * (72 + 8 + 4 * 8 + 10)
    assert count.total - count.compressed_bytes == other
    assert count.compressed == {"3.weight", "5.weight"}
    # Another seed and default BatchNorm: every stored entry differs until it is read back.
    copy = _small_cnn(seed=1)
    stored = [n for n in model.state_dict() if not n.endswith("num_batches_tracked")]
    assert not any(torch.equal(copy.state_dict()[n], model.state_dict()[n]) for n in stored)
    read_model(copy, path, sparse, values)
    for name in stored:
        t, got = model.state_dict()[name], copy.state_dict()[name]
        if values == "float32" or name not in count.compressed:
            assert torch.equal(got, t), name
        elif values == "float16":
            assert torch.equal(got, t.half().float()), name
        else:
            # symmetric INT8 per output channel: within half a step (max|w| / 127 / 2) of
            # the weight, plus the float32 rounding of code × scale
            step = t.reshape(t.shape[0], -1).abs().amax(dim=1) / 127
            err = (got - t).reshape(t.shape[0], -1).abs().amax(dim=1)
            assert torch.equal(got == 0, t == 0), name
            assert (err <= step / 2 * (1 + 2 ** -20)).all(), name
    data = path.read_bytes()
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="1 bytes past the layout"):
        read_model(copy, path, sparse, values)
    path.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="shorter than its layout"):
        read_model(copy, path, sparse, values)


def test_sparse_storage_pays_off_only_when_sparse_enough():
    model = _small_cnn()
    prune_global(model, 0.5)
    dense, csr = model_bytes(model).total, model_bytes(model, "csr").total
    # At 50 % CSR stores each kept float32 with a column index of 1 byte (the linear
    # layer's 256 columns) or 2: more than 5/8 of dense.
    assert csr > 5 / 8 * dense
    prune_global(model, 0.95)
    assert model_bytes(model, "csr").total < 0.2 * dense
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
    # a negative value is refused by its own check: at 64 bits no shift of the maximum
    # catches it (at 3 bits -1 >> 3 == -1 does, so that case alone never tested the check)
    for bits in (3, 64):
        with pytest.raises(ValueError, match=rf"\[0, 2\*\*{bits}\), got \[-1, -1\]"):
            pack_bits(np.array([-1]), bits)
    with pytest.raises(TypeError, match="values must be integers, got dtype float64"):
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


def test_elias_fano_takes_a_63_bit_universe_and_refuses_a_wider_one():
    """2^63 itself, formed for L = floor(log2(2^u / m)), overflowed int64: every call at
    universe_bits = 63 (int64 values, any of them in range) raised OverflowError from inside.
    L is u - ceil(log2 m) now: for the sets {5} and {1, 2, 2^63 - 1}, L = 63 and 61, and
    1 + 63 + 1 plus 3 + 3·61 + 4 bits; 64 bits and more are refused by name."""
    values, lengths = [5, 1, 2, 2**63 - 1], [1, 3]
    assert elias_fano_bits(lengths, 63) == (1 + 63 + 1) + (3 + 3 * 61 + 4)
    bits = elias_fano_encode(values, lengths, 63)
    assert bits.size == elias_fano_bits(lengths, 63)
    assert elias_fano_decode(bits, lengths, 63).tolist() == values
    for call in (lambda: elias_fano_bits(lengths, 64),
                 lambda: elias_fano_encode(values, lengths, 64)):
        with pytest.raises(ValueError, match=re.escape(
                "universe_bits must be at most 63 (the values are int64), got 64")):
            call()


@pytest.mark.parametrize("sparse", ["bitmask", "csr"])
def test_int8_sparse_count_leaves_out_weights_whose_code_is_zero(tmp_path, sparse):
    # Row 0: scale 1/127, so 0.001 (0.127 steps) is code 0 and is not stored; 0.5 is code
    # 64 (63.5 rounds half to even). Row 1 holds one nonzero. 3 codes stored of 4 nonzeros.
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.001, 0.0, 0.5], [0.0, 0.0, 2.0, 0.0]]))
    model = torch.nn.Sequential(layer)
    count = model_bytes(model, sparse, "int8", keep_dense=())
    assert count.total == tensor_bytes((2, 4), 3, sparse, "int8").total
    path = tmp_path / "m.bin"
    assert write_model(model, path, sparse, "int8", keep_dense=()) == count.total \
        == path.stat().st_size


def test_a_refused_model_leaves_the_file_as_it_was(tmp_path):
    model = _small_cnn()
    path = tmp_path / "model.bin"
    good = write_model(model, path)
    before = path.read_bytes()
    assert len(before) == good
    # not 2:4 sparse, an unknown layer, a format that cannot be encoded: refused before
    # anything is written, the earlier file intact, no temporary file left beside it
    for args, kwargs, match in [(("2:4", "float32"), {}, "not 2:4 sparse"),
                                (("dense", "float32"), {"keep_dense": ["nope"]}, "nope"),
                                (("dense", "int4_packed"), {}, "encoding supports")]:
        with pytest.raises(ValueError, match=match):
            write_model(model, path, *args, **kwargs)
        assert path.read_bytes() == before
        with pytest.raises(ValueError, match=match):
            write_model(model, tmp_path / "new.bin", *args, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_count_refuses_what_the_file_could_not_hold():
    # 2:4: the count would be that of a 2:4 tensor, but the tensor cannot be written so
    lin = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., 2., 3., 0., 0., 0., 0., 0.],
                                       [0., 0., 0., 0., 1., 0., 1., 0.]]))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        model_bytes(lin, "2:4", keep_dense=())
    # NaN and infinity: an INT8 row would lose every value to an undefined scale
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            lin.weight[0, 0] = bad
        for fmt in [("dense", "float32"), ("csr", "int8")]:
            with pytest.raises(ValueError, match="NaN or infinite"):
                model_bytes(lin, *fmt, keep_dense=())
    # beyond float16's range: it would be stored as an infinity
    with torch.no_grad():
        lin.weight.fill_(7e4)
    with pytest.raises(ValueError, match="float16's range"):
        model_bytes(lin, "dense", "float16", keep_dense=())
    # an empty layer has nothing to store; an integer buffer float32 cannot hold exactly
    with warnings.catch_warnings():  # torch warns that it cannot initialise no elements
        warnings.simplefilter("ignore", UserWarning)
        empty = torch.nn.Linear(4, 0)
    with pytest.raises(ValueError, match="no elements"):
        model_bytes(empty, keep_dense=())
    holder = torch.nn.Module()
    holder.register_buffer("count", torch.tensor([2 ** 24 + 1]))
    with pytest.raises(ValueError, match="float32 cannot hold exactly"):
        model_bytes(holder)
    holder.count.fill_(2 ** 24)
    assert model_bytes(holder).total == 4


def test_a_float64_weight_beyond_float32_s_range_is_named_as_such_and_not_written(tmp_path):
    # 1e300 is finite: the message must not call it a NaN or an infinity, and its cast to
    # float32 (an infinity) must not warn on the way to the refusal
    lin = torch.nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():
        lin.weight[0, 0] = 1e300
    path = tmp_path / "model.bin"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for call in (lambda: model_bytes(lin, "csr", keep_dense=()),
                     lambda: write_model(lin, path, "csr", keep_dense=())):
            with pytest.raises(ValueError, match=r"beyond float32's range \(largest \|value\| "
                                                 r"1e\+300"):
                call()
    assert not path.exists()
    # the largest float64 that rounds to float32's largest value is stored, and read back so
    edge = float(np.nextafter(np.float64(np.finfo(np.float32).max)
                              + np.float64(2.0 ** 103), 0))
    with torch.no_grad():
        lin.weight[0, 0] = edge
    assert write_model(lin, path, keep_dense=()) == model_bytes(lin, keep_dense=()).total
    assert read_model(lin, path, keep_dense=()).weight[0, 0] == float(np.finfo(np.float32).max)


def test_float16_count_is_of_the_values_as_stored(tmp_path):
    # weights that round to 0 in float16 are not stored by a sparse format, nor counted
    lin = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1e-9, 0.5, 0, 0, 0, 0, 0, 1e-9],
                                       [0, 0, 2.0, 0, 1e-10, 0, 0, 0]]))
    for sparse in ("csr", "bitmask"):
        count = model_bytes(lin, sparse, "float16", keep_dense=())
        path = tmp_path / f"{sparse}.bin"
        assert write_model(lin, path, sparse, "float16", keep_dense=()) == count.total \
            == path.stat().st_size
        nnz = 2  # 0.5 and 2.0; the others are below float16's smallest subnormal
        expected = tensor_bytes((2, 8), nnz, sparse, "float16").total
        assert count.total == expected


@pytest.mark.parametrize("sparse, corrupt, match", [
    ("csr", lambda b: b[:1] + bytes([b[1] + 5]) + b[2:], "row pointers"),  # row 0 too long
    ("csr", lambda b: b[:3] + bytes([200]) + b[4:], "column indices"),  # index past the row
    # Each check alone: the file is row pointers [0, 3, 7] (bytes 0-2), then the column
    # indices [0, 2, 5 | 1, 3, 4, 7] (bytes 3-9). A first pointer of 1 (the rows' lengths
    # still possible), a row's last index at the column count (still increasing), and a
    # repeated index (in range) are refused by no other check: without theirs, the first two
    # raised numpy's IndexError and the third decoded, with a weight dropped.
    ("csr", lambda b: bytes([1]) + b[1:], "row pointers do not start at 0"),
    ("csr", lambda b: b[:5] + bytes([8]) + b[6:], "column indices are out of range"),
    ("csr", lambda b: b[:4] + bytes([0]) + b[5:], "column indices are out of range or not "
                                                  "increasing"),
    ("2:4", lambda b: bytes([0b0101]) + b[1:], "repeats a position"),  # positions 1 and 1
])
def test_impossible_sparse_structure_is_refused(tmp_path, sparse, corrupt, match):
    lin = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., 0., 3., 0., 0., 2., 0., 0.],
                                       [0., 4., 0., 5., 6., 0., 0., 7.]]))
    path = tmp_path / "m.bin"
    write_model(lin, path, sparse, keep_dense=())
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=match):
        read_model(torch.nn.Linear(8, 2, bias=False), path, sparse, keep_dense=())


def test_bfloat16_models_are_counted_and_written(tmp_path):
    lin = torch.nn.Linear(8, 4).bfloat16()
    count = model_bytes(lin)
    assert count.total == 4 * (32 + 4)  # float32 storage of every value, as bfloat16 fits
    path = tmp_path / "m.bin"
    assert write_model(lin, path) == count.total == path.stat().st_size


class _Tied(torch.nn.Module):
    """One Linear under two names (``dec`` is ``enc``), and a bias-free head."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(64, 64, bias=False)
        self.dec = self.enc
        self.head = torch.nn.Linear(64, 3)


@pytest.mark.parametrize("values", ["float32", "int8"])
def test_a_tensor_under_two_names_is_counted_and_stored_once(tmp_path, values):
    """It was counted twice (INT8 under its first name, float32 under its second), and
    read back the float32 copy last, over the INT8 one."""
    import copy

    torch.manual_seed(0)
    tied = _Tied()
    single = torch.nn.Module()
    single.enc, single.head = tied.enc, tied.head  # the same tensors, each under one name
    got, want = model_bytes(tied, values=values, keep_dense=[]), \
        model_bytes(single, values=values, keep_dense=[])
    assert [n for n, _ in got.tensors] == ["enc.weight", "head.weight", "head.bias"]
    assert got.total == want.total
    path = tmp_path / "tied.bin"
    assert write_model(tied, path, values=values, keep_dense=[]) == got.total \
        == path.stat().st_size
    blank = copy.deepcopy(tied)
    with torch.no_grad():
        blank.enc.weight.fill_(float("nan"))
    back = read_model(blank, path, values=values, keep_dense=[])
    ref = read_model(copy.deepcopy(single), _written(single, tmp_path, values), values=values,
                     keep_dense=[])
    assert back.dec.weight is back.enc.weight
    assert torch.equal(back.enc.weight, ref.enc.weight)
    if values == "int8":
        assert not torch.equal(back.enc.weight, tied.enc.weight)  # dequantized, not float32


def _written(model, tmp_path, values):
    path = tmp_path / "single.bin"
    write_model(model, path, values=values, keep_dense=[])
    return path


def test_a_reparametrized_weight_is_refused():
    """prune's weight_orig and weight_mask were counted as two dense float32 tensors."""
    from torch.nn.utils import prune

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"0.weight_orig is a reparametrization.*prune.remove"):
        model_bytes(model, "csr", keep_dense=[])
    prune.remove(model[0], "weight")
    assert model_bytes(model, "csr", keep_dense=[]).total > 0


def test_a_shape_2_4_cannot_take_is_named_by_counting_as_by_writing(tmp_path):
    """A linear layer of 6 inputs cannot be 2:4 (groups of 4 along the input): writing the
    model named the layer, counting its bytes did not (a helper's review); both do now."""
    from torch import nn

    from qerror.compress.size import model_bytes, write_model

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"cannot store 2\.weight in 2:4 float32: 2:4 needs"):
        model_bytes(model, "2:4")
    with pytest.raises(ValueError, match=r"cannot store 2\.weight in 2:4 float32: 2:4 needs"):
        write_model(model, tmp_path / "model.bin", "2:4")
    assert not (tmp_path / "model.bin").exists()


def test_a_scalar_tensor_is_refused_by_encoding_and_decoding_as_by_counting():
    # tensor_bytes refuses the shape (); encode_tensor and decode_tensor failed on it with
    # an IndexError ("tuple index out of range") instead of saying what was wrong
    with pytest.raises(ValueError, match=r"need a shape of one or more"):
        tensor_bytes(())
    for scalar in (torch.tensor(3.0), np.float32(3.0)):
        with pytest.raises(ValueError, match=r"0-dimensional .*reshape\(1\)"):
            encode_tensor(scalar)
    with pytest.raises(ValueError, match=r"need a shape of one or more"):
        decode_tensor(b"\0" * 4, ())
    # one element as shape (1,), as model_bytes and write_model store a scalar entry
    arrays = encode_tensor(torch.tensor(3.0).reshape(1))
    assert sum(a.nbytes for a in arrays) == tensor_bytes((1,)).total == 4


def test_decoding_refuses_a_shape_2_4_cannot_take_as_encoding_does(tmp_path):
    # the 51 bytes of a (3, 8) 2:4 tensor decoded, silently, as a (4, 6) or a (24,) one,
    # shapes whose groups of 4 along the input dimension do not exist
    w = np.array([[1, 0, 2, 0, 0, 3, 0, 4]] * 3, np.float32)
    buffer = b"".join(a.tobytes() for a in encode_tensor(w, "2:4"))
    assert decode_tensor(buffer, (3, 8), "2:4")[1] == len(buffer) == 51
    for shape in ((4, 6), (24,), (3, 5)):
        with pytest.raises(ValueError, match="2:4 needs a 2-D or 4-D weight"):
            encode_tensor(np.zeros(shape, np.float32), "2:4")
        with pytest.raises(ValueError, match="2:4 needs a 2-D or 4-D weight"):
            decode_tensor(buffer, shape, "2:4")
    # so a file read into a model whose layer 2:4 cannot hold is refused, not misread
    path = tmp_path / "model.bin"
    written = torch.nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        written.weight.copy_(torch.from_numpy(w))
    write_model(written, path, "2:4", keep_dense=())
    with pytest.raises(ValueError, match="does not decode as this model in 2:4 float32"):
        read_model(torch.nn.Linear(6, 4, bias=False), path, "2:4", keep_dense=())


@pytest.mark.parametrize("values, lengths, error, what", [
    ([9, 3, 1, 2], [2, 2], ValueError, "strictly increasing"),
    ([3, 3], [2], ValueError, "strictly increasing"),
    ([40], [1], ValueError, r"lie in \[0, 2\*\*4\)"),
    ([16, 1, 2], [1, 2], ValueError, r"lie in \[0, 2\*\*4\)"),
    ([-1, 2], [1, 1], ValueError, r"lie in \[0, 2\*\*4\)"),
    ([3.5], [1], TypeError, "integers"),
])
def test_elias_fano_refuses_values_it_cannot_encode(values, lengths, error, what):
    # probe before the fix: [40] in a 4-bit universe raised a bare IndexError, [16, 1, 2]
    # (16 outside the universe) was encoded and read back, [9, 3, 1, 2] and [-1, 2] wrote
    # streams that elias_fano_decode calls corrupt, [3, 3] and [3.5] (read as 3) were taken
    with pytest.raises(error, match=what):
        elias_fano_encode(values, lengths, 4)
    # sets are sorted each on its own: the next set may start lower
    assert elias_fano_decode(elias_fano_encode([3, 9, 1, 15], [2, 2], 4), [2, 2],
                             4).tolist() == [3, 9, 1, 15]
