"""The fused exact quantizer (qerror._fused): the same codes as the rational reference and as
the block engine, on and beside every boundary, per tensor and per channel; its fallback."""

import contextlib
import os
import warnings

import numpy as np
import pytest
import torch

from qerror import (
    PreparedQuantizer,
    QuantSpec,
    RoundingMode,
    _compiled,
    _fused,
    fake_quantize,
    quantize,
)
from qerror._compiled import Kernels
from tests.qerror.test_quantizer import DETERMINISTIC, boundary_values, exact_code, fresh_python


def tiled(values: np.ndarray, at_least: int = _fused.MIN_ELEMENTS) -> np.ndarray:
    """``values`` repeated into a float32 array large enough for the fused path."""
    reps = -(-at_least // values.size)
    return np.tile(values.astype(np.float32), reps)


def engine(call, monkeypatch):
    """``call()`` on the block engine (the fused path turned off)."""
    with monkeypatch.context() as m:
        m.setenv("QERROR_FUSED", "0")
        return call()


# the reference casts the nearest integer of +-3e38 / s to float32: inf, compared harmlessly
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("mode", DETERMINISTIC)
@pytest.mark.parametrize("scale, zero_point", [(0.1, 0), (0.0371, 3), (0.37, -5), (0.25, 7),
                                               (1e35, 0), (3e-30, 0)])
def test_fused_codes_are_exact_on_boundaries(mode, scale, zero_point, fused_calls,
                                             monkeypatch):
    spec = QuantSpec(bits=8, symmetric=zero_point == 0, rounding=mode)
    base = boundary_values(scale, np.float32)
    base = np.concatenate([base[np.isfinite(base)], np.float32([3e38, -3e38, -0.0])])
    expected = [exact_code(v, scale, zero_point, mode, spec.qmin, spec.qmax, np.float32)
                for v in base]
    x = tiled(base)
    q = quantize(x, spec, scale, zero_point)
    assert fused_calls == [mode]
    np.testing.assert_array_equal(q[:base.size], expected)
    np.testing.assert_array_equal(q, np.tile(q[:base.size], x.size // base.size))
    # fake-quantized values (as numbers: a zero's sign is not specified) and saturation counts
    t = torch.from_numpy(x)
    fq, sat = fake_quantize(t, spec, scale, zero_point, return_saturation=True)
    ref, ref_sat = engine(lambda: fake_quantize(t, spec, scale, zero_point,
                                                return_saturation=True), monkeypatch)
    assert torch.equal(fq, ref)
    assert (int(sat.low), int(sat.high)) == (int(ref_sat.low), int(ref_sat.high))
    assert len(fused_calls) == 2


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_fused_per_channel_equals_the_block_engine(mode, fused_calls, monkeypatch):
    """Per-channel scales and zero points (channel axis in the middle), values on, beside
    and between the boundaries of each channel's own grid."""
    scales = np.float32([0.1, 0.0371, 0.37, 0.25, 1.7, 3e-3])
    zps = np.array([0, 3, -5, 7, 100, -128])
    spec = QuantSpec(bits=8, symmetric=False, axis=1, rounding=mode)
    # every kind of value of each channel's grid: on, beside and between its boundaries
    rows = [boundary_values(float(s), np.float32, count=150)[::3] for s in scales]
    x = np.ascontiguousarray(np.stack(rows)[None].repeat(4, axis=0))  # (4, 6, 901)
    assert x.size >= _fused.MIN_ELEMENTS
    t = torch.from_numpy(x)
    for fn in (quantize, fake_quantize):
        got = fn(t, spec, scales, zps)
        ref = engine(lambda: fn(t, spec, scales, zps), monkeypatch)
        assert torch.equal(got, ref)
    assert len(fused_calls) == 2
    sat = fake_quantize(t, spec, scales, zps, return_saturation=True)[1]
    expected = [[exact_code(v, float(s), int(z), mode, spec.qmin, spec.qmax, np.float32)
                 for v in row[::7]] for row, s, z in zip(rows, scales, zps)]
    np.testing.assert_array_equal(quantize(t, spec, scales, zps)[0, :, ::7].numpy(), expected)
    ref_sat = engine(lambda: fake_quantize(t, spec, scales, zps, return_saturation=True)[1],
                     monkeypatch)
    np.testing.assert_array_equal(sat.low, ref_sat.low)
    np.testing.assert_array_equal(sat.high, ref_sat.high)


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_eager_rule_equals_the_compiled_one(mode):
    """_fused.codes run eagerly gives the compiled result: the rule, not the compiler, makes
    the codes exact."""
    base = boundary_values(0.0371, np.float32)
    x = torch.from_numpy(tiled(base)).reshape(1, 1, -1)
    params = [torch.full((1, 1, 1), v, dtype=torch.float32)
              for v in (np.float32(0.0371), 3.0, -128.0 - 3.0, 127.0 - 3.0)]
    for fake in (True, False):
        eager = _fused.codes(x, *params, mode=mode, fake=fake)
        compiled = _fused.run(x, *params, mode=mode, fake=fake)
        for a, b in zip(eager, compiled):
            assert torch.equal(a, b)


def test_small_reciprocal_and_float64_inputs_take_the_block_engine(fused_calls):
    from qerror import ScaleArithmetic
    big = np.linspace(-3, 3, _fused.MIN_ELEMENTS, dtype=np.float32)
    quantize(big[:100], QuantSpec(), 0.1)
    quantize(big[:100], QuantSpec(rounding=RoundingMode.STOCHASTIC), 0.1, generator=0)
    quantize(big, QuantSpec(arithmetic=ScaleArithmetic.RECIPROCAL), 0.1)
    quantize(big.astype(np.float64), QuantSpec(), 0.1)
    quantize(torch.from_numpy(big).half(), QuantSpec(), 0.1)
    assert fused_calls == []
    quantize(big, QuantSpec(), 0.1)
    quantize(big, QuantSpec(rounding=RoundingMode.STOCHASTIC), 0.1, generator=0)
    assert len(fused_calls) == 2


STOCHASTIC = RoundingMode.STOCHASTIC


@pytest.mark.parametrize("scale, zero_point", [(0.1, 0), (0.0371, 3), (0.37, -5), (1e35, 0),
                                               (3e-30, 0)])
def test_fused_stochastic_draws_are_the_block_engines(scale, zero_point, fused_calls,
                                                      monkeypatch):
    """STOCHASTIC on the fused path: every code, fake value and saturation count equal the
    block engine's for the same key and offset (the same hash of the same flat index, the
    same comparison with the same quotient's fraction, levels fl(k s) given code k), on and
    beside every boundary and past the range's ends, for an integer seed, a generator (drawn
    from once per call), and parts of a larger array (offsets)."""
    spec = QuantSpec(bits=8, symmetric=zero_point == 0, rounding=STOCHASTIC)
    base = boundary_values(scale, np.float32)
    base = np.concatenate([base[np.isfinite(base)], np.float32([3e38, -3e38, -0.0])])
    rng = np.random.default_rng(5)
    # between the boundaries too: fractions of every size, so both draws' outcomes occur
    between = (rng.uniform(-140, 140, 4000) * np.float64(scale)).astype(np.float32)
    x = np.concatenate([tiled(base, 3 * _fused.MIN_ELEMENTS), between])
    t = torch.from_numpy(x)
    for gen, offset in ((7, 0), (7, 12345), (np.random.default_rng(1), 0)):
        kw = {"generator": gen, "offset": offset}
        ref_gen = np.random.default_rng(1) if isinstance(gen, np.random.Generator) else gen
        ref_kw = {"generator": ref_gen, "offset": offset}
        q = quantize(x, spec, scale, zero_point, **kw)
        ref = engine(lambda: quantize(x, spec, scale, zero_point, **ref_kw), monkeypatch)
        np.testing.assert_array_equal(q, ref)
        if isinstance(gen, np.random.Generator):
            continue
        fq, sat = fake_quantize(t, spec, scale, zero_point, return_saturation=True, **kw)
        ref_fq, ref_sat = engine(lambda: fake_quantize(t, spec, scale, zero_point,
                                                       return_saturation=True, **ref_kw),
                                 monkeypatch)
        assert torch.equal(fq, ref_fq)
        assert (int(sat.low), int(sat.high)) == (int(ref_sat.low), int(ref_sat.high))
    assert fused_calls == [STOCHASTIC] * 5
    # a level fl(k s) is code k; a draw decides the rest, both ways
    levels = (np.arange(-50, 50) * np.float32(scale)).astype(np.float32)
    on = quantize(tiled(levels), spec, scale, zero_point, generator=3)[:levels.size]
    expected = [exact_code(v, scale, zero_point, STOCHASTIC, spec.qmin, spec.qmax, np.float32)
                for v in levels]
    np.testing.assert_array_equal(on, expected)
    if scale < 1:
        q = quantize(x, spec, scale, zero_point, generator=7)[-between.size:]
        lower = np.floor(between.astype(np.float64) / np.float32(scale)) + zero_point
        inside = (lower > spec.qmin) & (lower + 1 < spec.qmax)
        ups = q[inside] - lower[inside]
        assert set(np.unique(ups)) == {0, 1}


def test_fused_stochastic_per_channel_and_parts_equal_the_block_engine(fused_calls,
                                                                      monkeypatch):
    """Per-channel scales and zero points (channel axis in the middle); the draws of a batch
    quantized in two parts (each with its offset) equal the whole batch's."""
    scales = np.float32([0.1, 0.0371, 0.37, 0.25, 1.7, 3e-3])
    zps = np.array([0, 3, -5, 7, 100, -128])
    spec = QuantSpec(bits=8, symmetric=False, axis=1, rounding=STOCHASTIC)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 6, 40, 40, generator=gen) * torch.from_numpy(scales)[:, None, None]
         * 60)
    for fn in (quantize, fake_quantize):
        got = fn(x, spec, scales, zps, generator=11)
        ref = engine(lambda: fn(x, spec, scales, zps, generator=11), monkeypatch)
        assert torch.equal(got, ref)
        half = x[:4].numel()
        parts = torch.cat([fn(x[:4], spec, scales, zps, generator=11),
                           fn(x[4:], spec, scales, zps, generator=11, offset=half)])
        assert torch.equal(parts, got)
    assert fused_calls == [STOCHASTIC] * 6


def test_eager_stochastic_rule_equals_the_compiled_one():
    from qerror.rounding import hash_stream
    x = torch.from_numpy(tiled(boundary_values(0.0371, np.float32))).reshape(1, 1, -1)
    params = [torch.full((1, 1, 1), v, dtype=torch.float32)
              for v in (np.float32(0.0371), 3.0, -128.0 - 3.0, 127.0 - 3.0)]
    stream = hash_stream(2**63 + 12345, 999)
    for fake in (True, False):
        eager = _fused.codes(x, *params, stream, mode=STOCHASTIC, fake=fake)
        compiled = _fused.run(x, *params, stream, mode=STOCHASTIC, fake=fake)
        for a, b in zip(eager, compiled):
            assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_hash_draws_are_the_numpy_kernels(threads):
    # The hash's int64 products wrap; compiled with the step as a constant, inductor folded
    # arange * step into C++ index arithmetic, where the overflow is undefined, and the
    # AVX-512 code gave wrong words from the 25th element on (hash_stream). Compiled here
    # alone, at both thread counts (the thread count is fixed in compiled code), against the
    # numpy kernel, on lengths with and without a vector tail.
    from qerror.rounding import _hash_numpy, hash_draws, hash_stream
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn = torch.compile(hash_draws, dynamic=True, fullgraph=True)
        for n, offset in ((1000, 0), (53956, 999), (1 << 17, 3)):
            got = fn(torch.empty(n), hash_stream(2**63 + 12345, offset))
            np.testing.assert_array_equal(got.numpy().view(np.uint64),
                                          _hash_numpy(n, 2**63 + 12345, offset))
    finally:
        torch.set_num_threads(before)


def fresh_state(monkeypatch):
    """The fused path's state as in a new process, restored after the test."""
    old = _fused.KERNELS
    monkeypatch.setattr(_fused, "KERNELS", Kernels(old.what, old.instead, old.stacklevel))


def no_compiler(monkeypatch):
    """A fresh fused path (:func:`fresh_state`) whose torch.compile gives functions that fail
    as a missing C++ compiler does."""
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return fail

    fresh_state(monkeypatch)
    monkeypatch.setattr(torch, "compile", broken)


def test_a_compiler_failure_warns_once_and_gives_the_same_codes(monkeypatch):
    no_compiler(monkeypatch)
    x = tiled(boundary_values(0.1, np.float32))
    ref = engine(lambda: quantize(x, QuantSpec(), 0.1), monkeypatch)
    with pytest.warns(RuntimeWarning, match="not used.*no C\\+\\+ compiler"):
        got = quantize(x, QuantSpec(), 0.1)
    np.testing.assert_array_equal(got, ref)
    assert not _fused.enabled()
    np.testing.assert_array_equal(quantize(x, QuantSpec(), 0.1), ref)  # no second warning


def _one_unit_stride(x):
    """``x[:1]``: contiguous, but with another stride on its unit dimension than C's."""
    return torch.empty((1, *x.shape[1:])).as_strided((1, *x.shape[1:]), (1, *x[0].stride())) \
        .copy_(x[:1])


ROUTES = {  # every way a call reaches the fused loop, each through its own frames of qerror
    "C order": lambda x: fake_quantize(x, QuantSpec(), 0.1),
    "numpy": lambda x: quantize(x.numpy(), QuantSpec(), 0.1),
    "numpy, other byte order": lambda x: quantize(x.numpy().astype(">f4"), QuantSpec(), 0.1),
    "channels_last": lambda x: fake_quantize(x.contiguous(memory_format=torch.channels_last),
                                             QuantSpec(axis=1), 0.1),
    "transposed": lambda x: quantize(x.transpose(2, 3), QuantSpec(), 0.1),
    "unit strides": lambda x: fake_quantize(_one_unit_stride(x), QuantSpec(), 0.1),
    "prepared": lambda x: PreparedQuantizer(QuantSpec(), 0.1).fake_quantize(x),
    "prepared, gapped": lambda x: PreparedQuantizer(QuantSpec(), 0.1).quantize(
        torch.cat([x, x], 3)[..., ::2]),
    "prepared, unit strides": lambda x: PreparedQuantizer(QuantSpec(), 0.1).fake_quantize(
        _one_unit_stride(x)),
}


@pytest.mark.parametrize("route", ROUTES)
def test_a_compiler_failure_is_attributed_to_the_callers_line_on_every_route(route,
                                                                            monkeypatch):
    no_compiler(monkeypatch)
    x = torch.from_numpy(tiled(boundary_values(0.1, np.float32), 4 * 8 * 32 * 64)
                         [:4 * 8 * 32 * 64].reshape(4, 8, 32, 64))
    ref = engine(lambda: ROUTES[route](x), monkeypatch)
    with pytest.warns(RuntimeWarning, match="not used.*no C\\+\\+ compiler") as caught:
        got = ROUTES[route](x)
    assert caught[0].filename == __file__, (caught[0].filename, caught[0].lineno)
    assert isinstance(got, type(ref)) and (got == ref).all()


def test_unsafe_math_in_inductor_turns_the_fused_path_off(monkeypatch, fused_calls):
    from torch._inductor import config
    with config.patch({"cpp.enable_unsafe_math_opt_flag": True}):
        quantize(tiled(np.float32([0.05, 0.15])), QuantSpec(), 0.1)
    assert fused_calls == []


@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_fused_unsigned_grid_clamps_negative_values_as_the_engine(mode, fused_calls,
                                                                 monkeypatch):
    """An unsigned grid with zero point 0 (ReLU outputs): negative values, tiny ones and -0
    among them, clamp to code 0 as in the engine."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False, rounding=mode)
    base = np.concatenate([boundary_values(0.1, np.float32, count=30),
                           np.float32([-0.0, -1e-45, -1e-30, 1e-45, -3e38])])
    t = torch.from_numpy(tiled(base))
    for fn in (quantize, fake_quantize):
        got = fn(t, spec, 0.1, 0)
        ref = engine(lambda: fn(t, spec, 0.1, 0), monkeypatch)
        assert torch.equal(got, ref)
    assert len(fused_calls) == 2


def test_a_kernel_that_fails_after_running_turns_off_alone(monkeypatch):
    """A trusted kernel whose later call fails (here the compiler's limit of variants, hit
    when a new input pattern asks for a recompilation) falls back to the engine, warns once
    and turns off that kernel only."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def limited(fn, **kwargs):
        compiled = torch_compile(fn, **kwargs)
        if "floor" not in fn.__code__.co_name:
            return compiled
        calls = []

        def call(*a, **k):
            calls.append(1)
            if len(calls) > 1:
                raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
            return compiled(*a, **k)
        return call

    torch_compile = torch.compile
    fresh_state(monkeypatch)
    monkeypatch.setattr(torch, "compile", limited)
    x = tiled(boundary_values(0.1, np.float32))
    floor = QuantSpec(rounding=RoundingMode.FLOOR)
    ref = engine(lambda: quantize(x, floor, 0.1), monkeypatch)
    np.testing.assert_array_equal(quantize(x, floor, 0.1), ref)  # compiled, trusted
    with pytest.warns(RuntimeWarning, match="not used.*FailOnRecompileLimitHit") as caught:
        np.testing.assert_array_equal(quantize(x, floor, 0.1), ref)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert _fused.enabled()  # the other kernels go on
    assert [k[0][0] for k in _fused.KERNELS.failed] == [RoundingMode.FLOOR]
    quantize(x, QuantSpec(), 0.1)
    assert any(k[0][0] is RoundingMode.NEAREST_EVEN for k in _fused.KERNELS.ready)


def test_one_compiled_variant_serves_each_layout_and_grad_mode(monkeypatch, fused_calls):
    """The compiler's limit of variants per function is not what turns the fused quantizer
    off in a long process: with the limit set to one, views of tensors of other ranks and
    sizes (the compiler guarded on their bases), inference tensors (another dispatch key
    set) and per-channel grids whose sizes equal one another (duck sizing) each take the
    fused path and give the block engine's codes, without a warning."""
    fresh_state(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    per_tensor = QuantSpec(rounding="floor")
    per_channel = QuantSpec(rounding="floor", axis=1)
    cases = []
    for shape in ((128, 128), (64, 256), (16, 16, 64), (2, 8, 32, 32)):
        cases.append((torch.randn(shape, generator=gen), per_tensor, 0.05))
    for shape in ((32, 32, 32), (16, 32, 64), (64, 32, 16)):  # equal sizes, then none
        scales = torch.rand(32, generator=gen).numpy() / 10 + 0.01
        cases.append((torch.randn(shape, generator=gen), per_channel, scales))
    with torch.inference_mode():
        cases.append((torch.randn(64, 256, generator=gen), per_tensor, 0.05))
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("error", RuntimeWarning)
        for x, spec, scale in cases:
            ref = engine(lambda: fake_quantize(x, spec, scale), monkeypatch)
            assert torch.equal(fake_quantize(x, spec, scale), ref)
            ref = engine(lambda: quantize(x, spec, scale), monkeypatch)
            np.testing.assert_array_equal(quantize(x, spec, scale), ref)
    assert len(fused_calls) == 2 * len(cases)
    assert not _fused.KERNELS.failed


@contextlib.contextmanager
def _deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def _float64_default():
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


#: States of torch that guards of compiled code read beside the grad mode (plain first).
TORCH_STATES = (contextlib.nullcontext, torch.inference_mode, _deterministic,
                lambda: torch.autocast("cpu"), _float64_default)


def test_one_compiled_variant_serves_each_state_of_torch(monkeypatch, fused_calls):
    """A prepared quantizer's tensors (its scale, made once) and the caller's (a weight, no
    inference tensor) given to the kernel inside and outside inference mode, with
    deterministic algorithms, under autocast and with float64 as the default dtype: guards
    of the compiler read each, so each is a key of its own; with the limit of variants set
    to one, every call takes the fused path and gives the block engine's codes, without a
    warning."""
    fresh_state(monkeypatch)
    prepared = PreparedQuantizer(QuantSpec(rounding="floor"), 0.05)
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("error", RuntimeWarning)
        for state in TORCH_STATES:
            with state():
                ref = engine(lambda: prepared.fake_quantize(x), monkeypatch)
                assert torch.equal(prepared.fake_quantize(x), ref)
    assert len(fused_calls) == len(TORCH_STATES)
    assert not _fused.KERNELS.failed


class OlderGuard:
    """A global state guard as torch 2.1 has it: ``check()`` alone, its fields out of
    Python's sight (a C type without ``__dict__``), so that the ``__getstate__`` every
    object inherits answers None."""

    __slots__ = ()
    held: dict = {}

    def __init__(self):
        OlderGuard.held[id(self)] = torch.is_grad_enabled(), torch.get_default_dtype()

    def check(self) -> bool:
        return OlderGuard.held[id(self)] == (torch.is_grad_enabled(), torch.get_default_dtype())


@pytest.mark.parametrize("guard", ["compiler's", "none", "older"])
def test_torch_state_tells_apart_what_the_global_guards_read(guard, monkeypatch):
    """The state part of the key, read through the compiler's own guard or, in a torch
    without it or with an older one that cannot state its state (whose
    ``torch.is_autocast_enabled`` takes no device either), through the API: grad mode,
    inference mode, deterministic algorithms, the default dtype, autocast and the thread
    count each change it; the same state gives it again."""
    if guard == "none":
        monkeypatch.setattr(_compiled, "GlobalStateGuard", None)
    elif guard == "older":
        assert OlderGuard().__getstate__() is None
        monkeypatch.setattr(_compiled, "GlobalStateGuard", OlderGuard)
        monkeypatch.setattr(_compiled, "_LAST_STATE", [])
    enabled = torch.is_autocast_enabled

    def state():  # torch.autocast itself calls torch.is_autocast_enabled(device)
        with monkeypatch.context() as older:
            if guard == "older":
                older.setattr(torch, "is_autocast_enabled", lambda: enabled("cuda"))
                older.setattr(torch, "is_autocast_cpu_enabled", lambda: enabled("cpu"))
            return _compiled.torch_state()

    plain = state()
    assert state() == plain
    with torch.no_grad():
        assert state() != plain
    with torch.inference_mode():
        assert state() != plain
    with torch.autocast("cpu"):
        assert state() != plain
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert state() != plain
    finally:
        torch.use_deterministic_algorithms(before)
    dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert state() != plain
    finally:
        torch.set_default_dtype(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert state() != plain
    finally:
        torch.set_num_threads(threads)
    matmul = torch.backends.cuda.matmul
    for flag in ("allow_tf32", "allow_fp16_reduced_precision_reduction",
                 "allow_bf16_reduced_precision_reduction"):
        before = getattr(matmul, flag)
        try:
            setattr(matmul, flag, not before)
            assert state() != plain, flag
        finally:
            setattr(matmul, flag, before)
    with torch._C.DisableTorchFunction():
        assert state() != plain
    assert state() == plain


def test_a_key_that_cannot_be_made_turns_the_family_off_with_a_warning(monkeypatch):
    """A key that cannot be made (an argument that cannot be hashed; a torch whose state
    torch_state cannot read, a private function gone, say) raised out of Kernels.call, out
    of quantize itself; now the family is turned off with one warning and the caller's
    eager code gives the result."""
    def unreadable():
        raise AttributeError("module 'torch._C' has no attribute '_dispatch_tls_local_include_set'")

    kernels = Kernels("the demo kernel", "eager instead", stacklevel=2)
    with pytest.warns(RuntimeWarning, match="its key could not be made: TypeError"):
        assert kernels.call("a", lambda: (lambda x: x), ([1],)) is None  # a list: unhashable
    assert kernels.broken
    fresh_state(monkeypatch)
    monkeypatch.setattr(_compiled, "torch_state", unreadable)
    x = tiled(boundary_values(0.1, np.float32))
    ref = engine(lambda: quantize(x, QuantSpec(), 0.1), monkeypatch)
    with pytest.warns(RuntimeWarning, match="not used \\(its key could not be made: "
                                            "AttributeError"):
        got = quantize(x, QuantSpec(), 0.1)
    np.testing.assert_array_equal(got, ref)
    assert not _fused.enabled()


def test_layout_keys_tell_apart_what_the_guards_read():
    key = _compiled.layout_key
    a = torch.zeros(4, 4, 1)
    assert key((a, None)) == (((2, 2, 1, 0), False), ("NoneType", None))
    assert key((torch.zeros(4, 5, 1),)) != key((a,))       # equal sizes or not
    assert key((torch.zeros(4, 5, 1), torch.zeros(1, 5, 1))) == \
        key((torch.zeros(6, 7, 1), torch.zeros(1, 7, 1)))  # sizes themselves are symbolic
    assert key((torch.zeros(6, 7, 1), torch.zeros(1, 6, 1))) != \
        key((torch.zeros(6, 7, 1), torch.zeros(1, 7, 1)))  # across tensors too
    with torch.inference_mode():
        assert key((torch.zeros(4, 4, 1),)) != key((a,))
    assert key((a, 0.5)) != key((a, 0.25))  # numbers by value
    assert key((torch.zeros(17)[1:].view(4, 4, 1),)) != key((a,))  # offset 1, specialised
    rows = torch.zeros(10, 4, 1)
    assert key((rows[1:5],)) != key((rows[2:6],))  # offset 4 equals a size, offset 8 none
    assert key((rows[2:6],)) == key((rows[3:7],))  # offsets 8 and 12: one symbol
    view = torch.zeros(8, 16)[:4].reshape(4, 4, 4)
    own = _compiled.own(view)
    assert view._base is not None and own._base is None
    assert own.data_ptr() == view.data_ptr() and own.stride() == view.stride()


def test_compiled_code_that_switches_on_flushing_is_undone(monkeypatch):
    fresh_state(monkeypatch)
    states = iter([False, True])  # before the first call: not flushing; after: flushing
    monkeypatch.setattr(_compiled, "flushing_denormals", lambda: next(states))
    undone = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: undone.append(on))
    x = tiled(boundary_values(0.1, np.float32))
    ref = engine(lambda: quantize(x, QuantSpec(), 0.1), monkeypatch)
    with pytest.warns(RuntimeWarning, match="flushing subnormal numbers; that was undone"):
        np.testing.assert_array_equal(quantize(x, QuantSpec(), 0.1), ref)
    assert undone == [False] and not _fused.enabled()


@pytest.mark.parametrize("bits, signed, zero_point, scale", [
    (2, True, 0, 0.5), (2, False, 3, 0.1), (16, True, 0, 1e-4), (16, False, 60000, 3e-3),
    (8, True, 0, 1.2e-38), (8, True, -20, 2e36), (4, False, 15, 7.0)])
@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_fused_codes_are_exact_at_the_ends_of_the_range(bits, signed, zero_point, scale, mode,
                                                        fused_calls):
    """Values on and beside the boundaries at and past both ends of the integer range, for
    the narrowest and widest grids and the extreme scales: the clamp to two codes beyond the
    range changes no code."""
    spec = QuantSpec(bits=bits, signed=signed, symmetric=False, rounding=mode)
    s = np.float32(scale)
    k = np.concatenate([np.arange(spec.qmin - 4, spec.qmin + 4),
                        np.arange(spec.qmax - 4, spec.qmax + 5)]).astype(np.float64) - zero_point
    exact = np.concatenate([(k + 0.5) * np.float64(s), k * np.float64(s)]).astype(np.float32)
    levels = (k.astype(np.float32) * s).astype(np.float32)  # the stored levels fl32(k s)
    base = np.concatenate([exact, levels])
    base = np.concatenate([base, np.nextafter(base, np.float32(np.inf)),
                           np.nextafter(base, np.float32(-np.inf))])
    base = base[np.isfinite(base)]
    expected = [exact_code(v, float(s), zero_point, mode, spec.qmin, spec.qmax, np.float32)
                for v in base]
    q = quantize(tiled(base), spec, float(s), zero_point)
    np.testing.assert_array_equal(q[:base.size], expected)
    assert len(fused_calls) == 1


def test_numpy_per_channel_non_contiguous_and_inference_inputs(fused_calls, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, 3, 3, generator=gen)
    spec = QuantSpec(bits=4, axis=0, rounding=RoundingMode.FLOOR)
    scales = (w.abs().amax(dim=(1, 2, 3)) / 7).numpy()
    for x in (w.numpy(), w.transpose(2, 3), w.contiguous(memory_format=torch.channels_last)):
        got = fake_quantize(x, spec, scales)
        ref = engine(lambda: fake_quantize(x, spec, scales), monkeypatch)
        assert np.array_equal(np.asarray(got), np.asarray(ref))
    with torch.inference_mode():
        got = fake_quantize(w, spec, scales)
    assert torch.equal(got, engine(lambda: fake_quantize(w, spec, scales), monkeypatch))
    frozen = w.numpy().copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(quantize(frozen, spec, scales), quantize(w, spec, scales).numpy())
    with torch.inference_mode():
        made_there = w * 1.0  # an inference tensor
    assert torch.equal(fake_quantize(made_there, spec, scales),
                       engine(lambda: fake_quantize(w, spec, scales), monkeypatch))
    assert len(fused_calls) == 7


AVX2_CHECK = """
import os, numpy as np, torch
from qerror import QuantSpec, RoundingMode, fake_quantize, quantize
from qerror import _fused
torch.set_num_threads(int(os.environ["THREADS"]))
gen = torch.Generator().manual_seed(0)
bad = []
for shape, axis in (((1, 64, 576), 1), ((100000,), None)):
    x = torch.randn(*shape, generator=gen) * 0.05
    scales = 0.05 * 4 / 127 if axis is None else np.linspace(1e-3, 3e-3, shape[1], dtype=np.float32)
    for mode in RoundingMode:
        if mode.is_random:
            continue
        spec = QuantSpec(bits=8, axis=axis, rounding=mode)
        for fn in (quantize, fake_quantize):
            os.environ["QERROR_FUSED"] = "1"
            kw = {"return_saturation": True} if fn is fake_quantize else {}
            got = fn(x, spec, scales, **kw)
            os.environ["QERROR_FUSED"] = "0"
            ref = fn(x, spec, scales, **kw)
            if fn is fake_quantize:
                same = torch.equal(got[0], ref[0]) and np.array_equal(got[1].low, ref[1].low) \
                    and np.array_equal(got[1].high, ref[1].high)
            else:
                same = torch.equal(got, ref)
            if not same:
                bad.append(f"{shape} {mode.value} {fn.__name__}")
from torch._inductor.cpu_vec_isa import pick_vec_isa
print("ISA", pick_vec_isa(), "READY", len(_fused.KERNELS.ready), "BAD", bad)
"""


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f " in f.read()
    except OSError:
        return False


READ_ONLY_CHECK = """
import warnings
import numpy as np
from qerror import QuantSpec, quantize
frozen = np.linspace(-1, 1, 1 << 15, dtype=np.float32)
frozen.flags.writeable = False
with warnings.catch_warnings():
    warnings.simplefilter("error")
    quantize(frozen, QuantSpec(), 0.01)
print("no warning")
"""


def test_read_only_numpy_input_raises_no_torch_warning():
    # torch warns of read-only memory once per process, and a suppressed warning uses up
    # that once: only a new interpreter shows whether the fused path lets it through.
    assert fresh_python(READ_ONLY_CHECK)[0] == "no warning"


@pytest.mark.slow
@pytest.mark.skipif(not _has_avx512(), reason="needs a CPU with AVX-512 (and so AVX2) to "
                                              "compile for two instruction sets")
def test_code_compiled_for_another_instruction_set_is_not_reused(tmp_path):
    """Inductor's cache once handed code compiled under ATEN_CPU_CAPABILITY=avx2 to an
    AVX-512 process (and the reverse): wrong codes and a corrupted heap. A process with the
    AVX2 kernels, then a native one, sharing one cache, both agree with the engine."""
    import subprocess
    import sys

    cache = tmp_path / "inductor"
    isas = []
    for capability in ("avx2", "avx512"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "THREADS": "2",
               "ATEN_CPU_CAPABILITY": capability, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
        for name in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "QERROR_FUSED"):
            env.pop(name, None)
        out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", AVX2_CHECK],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        last = out.stdout.strip().splitlines()[-1]
        assert last.endswith("READY 20 BAD []"), (capability, last)  # every kernel compiled
        isas.append(last.split(" READY")[0])
    assert isas[0] != isas[1], isas  # two instruction sets, one cache


@pytest.mark.parametrize("mode", [RoundingMode.NEAREST_EVEN, RoundingMode.STOCHASTIC])
def test_non_finite_input_on_the_fused_path_gets_the_engines_error(mode, fused_calls,
                                                                   monkeypatch):
    """The fused loop counts non-finite values instead of a scan before it: an input with
    NaN or ±inf, in C order or another layout, per tensor or per channel, gets the error the
    block engine gives (count, first value, its index in the input as given), and no
    result."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, 32, 32, generator=gen)
    cases = []
    for bad_at, value in (((1, 3, 5, 7), float("nan")), ((3, 7, 31, 0), float("inf")),
                          ((0, 0, 0, 0), -float("inf"))):
        x = base.clone()
        x[bad_at] = value
        x[2, 1, 0, 0] = float("nan")
        cases += [x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3)]
    for x in cases:
        assert x.numel() >= _fused.MIN_ELEMENTS
        for axis, scale in ((None, 0.05), (1, np.full(8, 0.05))):
            spec = QuantSpec(bits=8, axis=axis, rounding=mode)
            for fn in (quantize, fake_quantize):
                with pytest.raises(ValueError) as engine_err:
                    engine(lambda: fn(x, spec, scale, generator=1), monkeypatch)
                before = len(fused_calls)
                with pytest.raises(ValueError) as fused_err:
                    fn(x, spec, scale, generator=1)
                assert len(fused_calls) == before + 1  # the fused loop found it
                assert str(fused_err.value) == str(engine_err.value)
                assert "non-finite" in str(fused_err.value)


def test_fused_stochastic_zeros_keep_the_engines_sign(fused_calls, monkeypatch):
    """-0.0 and +0.0 (and tiny values either side) get the engine's fake values with their
    signs: a zero is not taken for the level fl(0 s)."""
    base = np.float32([-0.0, 0.0, -1e-45, 1e-45, -1e-30, 1e-30, 0.05, -0.05])
    t = torch.from_numpy(tiled(base))
    for zero_point, sym in ((0, True), (3, False)):
        spec = QuantSpec(bits=8, symmetric=sym, rounding=STOCHASTIC)
        got = fake_quantize(t, spec, 0.1, zero_point, generator=4)
        ref = engine(lambda: fake_quantize(t, spec, 0.1, zero_point, generator=4), monkeypatch)
        assert torch.equal(got, ref)
        assert torch.equal(torch.signbit(got), torch.signbit(ref))
    assert len(fused_calls) == 2


def test_a_refused_stochastic_call_draws_nothing_from_a_generator(fused_calls, monkeypatch):
    """Non-finite data with a generator object: the error comes before the draw (the
    generator is left as it was), as on the engine; without a generator, the non-finite
    error comes first, as on the engine."""
    x = torch.from_numpy(tiled(np.float32([0.1, -0.3, np.nan])))
    spec = QuantSpec(rounding=STOCHASTIC)
    for make in (lambda: np.random.default_rng(9), lambda: torch.Generator().manual_seed(9)):
        gen = make()
        with pytest.raises(ValueError, match="non-finite"):
            quantize(x, spec, 0.1, generator=gen)
        fresh = make()
        if isinstance(gen, np.random.Generator):
            assert gen.integers(0, 1 << 62) == fresh.integers(0, 1 << 62)
        else:
            assert torch.equal(torch.randint(0, 1 << 62, (1,), generator=gen),
                               torch.randint(0, 1 << 62, (1,), generator=fresh))
    with pytest.raises(ValueError) as fused_err:
        quantize(x, spec, 0.1)
    with pytest.raises(ValueError) as engine_err:
        engine(lambda: quantize(x, spec, 0.1), monkeypatch)
    assert str(fused_err.value) == str(engine_err.value)
    assert "non-finite" in str(fused_err.value)


def test_non_finite_values_in_gapped_one_channel_and_fallback_inputs_are_refused(monkeypatch):
    """The other ways into the fused path refuse non-finite data with the engine's error:
    a strided tensor with gaps (quantized as a copy), a one-channel channels_last batch,
    numpy input, and a fused call that falls back to the engine."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 8, 32, 64, generator=gen)
    wide[1, 2, 3, 10] = float("nan")
    one = torch.randn(64, 1, 32, 32, generator=gen)
    one[5, 0, 7, 9] = float("inf")
    one = one.contiguous(memory_format=torch.channels_last)
    arr = tiled(np.float32([0.2, np.inf, 0.1]))
    spec = QuantSpec(rounding=RoundingMode.FLOOR)
    cases = [wide[:, :, :, ::2], one, arr]
    for x in cases:
        with pytest.raises(ValueError) as engine_err:
            engine(lambda: fake_quantize(x, spec, 0.1), monkeypatch)
        with pytest.raises(ValueError) as fused_err:
            fake_quantize(x, spec, 0.1)
        assert str(fused_err.value) == str(engine_err.value)
    monkeypatch.setattr(_fused, "run", lambda *a, **k: None)  # the compiled path unavailable
    for x in cases:
        with pytest.raises(ValueError, match="non-finite"):
            fake_quantize(x, spec, 0.1)


def test_a_failing_stochastic_kernel_turns_off_alone(monkeypatch):
    """The stochastic kernel's first failure falls back to the engine (same codes, one
    warning) and leaves the deterministic kernels on."""
    def picky(fn, **kwargs):
        if "stochastic" in fn.__code__.co_name:
            def fail(*a, **k):
                raise RuntimeError("cannot compile the hash")
            return fail
        return torch_compile(fn, **kwargs)

    torch_compile = torch.compile
    fresh_state(monkeypatch)
    monkeypatch.setattr(torch, "compile", picky)
    x = tiled(boundary_values(0.1, np.float32))
    spec = QuantSpec(rounding=STOCHASTIC)
    ref = engine(lambda: quantize(x, spec, 0.1, generator=2), monkeypatch)
    with pytest.warns(RuntimeWarning, match="not used.*cannot compile the hash"):
        np.testing.assert_array_equal(quantize(x, spec, 0.1, generator=2), ref)
    assert _fused.enabled()
    assert [k[0][0] for k in _fused.KERNELS.failed] == [STOCHASTIC]
    quantize(x, QuantSpec(), 0.1)
    assert any(k[0][0] is RoundingMode.NEAREST_EVEN for k in _fused.KERNELS.ready)


def test_a_ctrl_c_torch_turned_into_another_error_is_raised_not_taken_for_a_failure(
        monkeypatch):
    """Inside a torch.compile trace, torch's C++ argument parsing turns a KeyboardInterrupt
    into a TypeError ("failed to unpack the object ... KeyboardInterrupt"); the fallback took
    it for a compiler failure, turned the kernels off and went on, and the Ctrl-C was lost.
    An interrupt counted during the call (qerror.interrupts) is raised again instead."""
    from qerror.interrupts import note_interrupt

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(_compiled, "compile_options", lambda: {})
    kernels = Kernels("the demo kernel", "eager instead", stacklevel=2)

    def interrupted():
        def fn(x):
            note_interrupt()  # what the counting SIGINT handler does before it raises
            raise TypeError('failed to unpack the object at pos 1 with error '
                            '"KeyboardInterrupt: <EMPTY MESSAGE>"')
        return fn

    with pytest.raises(KeyboardInterrupt):
        kernels.call("a", interrupted, (1,), breaks_all=True)
    assert not kernels.broken and not kernels.failed and not kernels.warned

    def broken():
        def fn(x):
            raise TypeError("an operator the compiler does not take")
        return fn

    with pytest.warns(RuntimeWarning, match="demo kernel is not used"):
        assert kernels.call("b", broken, (1,), breaks_all=True) is None
    assert kernels.broken  # a real failure still turns the family off
