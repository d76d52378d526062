"""The instrument's per (image, channel) sums: the compiled loop and torch's reductions against
float64 references, within the bounds that float32 summation in any order allows."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

from qerror.nn import _moments
from qerror.nn._moments import MAX_INNER, channel_sums, difference_sums
from tests.qerror.test_fused import TORCH_STATES

U = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture
def compiled_calls(monkeypatch):
    """Each call of the compiled loop, by its key (the kernels' state as in a new process)."""
    old = _moments.KERNELS
    kernels = _moments.Kernels(old.what, old.instead, old.stacklevel)
    monkeypatch.setattr(_moments, "KERNELS", kernels)
    calls = []
    call = kernels.call

    def counted(key, make, args, **kw):
        calls.append(key)
        return call(key, make, args, **kw)
    monkeypatch.setattr(kernels, "call", counted)
    return calls


def eager(monkeypatch):
    """A context in which the compiled loop is off (QERROR_FUSED=0)."""
    class Off:
        def __enter__(self):
            monkeypatch.setenv("QERROR_FUSED", "0")

        def __exit__(self, *exc):
            monkeypatch.delenv("QERROR_FUSED")
    return Off()


def data(shape, seed, layout=torch.contiguous_format):
    """Values of many magnitudes and both signs (sums that cancel, sums of squares that
    do not), in the layout asked for."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape, generator=gen))
    return x.contiguous(memory_format=layout)


def reference(t: torch.Tensor):
    """Exact enough: float64 sums of float32 values (float64 sums of at most 1024 terms
    are within 1024 * 2**-53 of the exact, far inside the float32 bounds)."""
    d = t.double().flatten(2) if t.ndim > 2 else t.double()[:, :, None]
    return d.sum(2), (d * d).sum(2), d.abs().sum(2)




def gamma(k: float) -> float:
    """Higham's γ(k) = k u / (1 - k u): the bound on k float32 roundings compounded."""
    return k * U / (1 - k * U)


def within_bounds(got_s, got_q, t: torch.Tensor, length: int, extra: float = 0.0,
                  norm: bool = False):
    """Σ within γ(L - 1 + extra) Σ|x| and Σ² within γ(L + 2 extra) Σx² of the exact: any
    order of float32 additions, each square rounded once; ``extra`` 1 where each term is
    itself a rounded difference of the exact ``t`` (u |d| for the term, 2u d² for its
    square). ``norm``: Σ² taken as the square of a float32 norm (torch's reductions), three
    roundings more: the norm's square root (doubled by the squaring) and the squaring."""
    s, q, a = reference(t)
    # the float64 reference's own error: at most L 2**-53 of the same magnitudes (products
    # of float32 values are exact in float64)
    ref = length * 2.0 ** -53
    assert torch.all((got_s - s).abs() <= (gamma(length - 1 + extra) + ref) * a)
    assert torch.all((got_q - q).abs() <= (gamma(length + 2 * extra + 3 * norm) + ref) * q)


SHAPES = [(3, 256, 2, 2), (5, 64, 4, 4), (2, 16, 8, 8), (2, 8, 32, 32), (4, 300, 3, 5),
          (3, 40, 30), (4, 400, 1, 3), (3, 600, 2, 1)]


@pytest.mark.parametrize("shape, layout", [
    (shape, layout) for shape in SHAPES for layout in ("contiguous", "channels_last")
    if layout == "contiguous" or len(shape) == 4])  # channels_last is a 4-D layout
def test_channel_sums_are_within_the_float32_bound_compiled_and_eager(shape, layout,
                                                                     compiled_calls,
                                                                     monkeypatch):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    t = data(shape, 0, fmt)
    length = int(np.prod(shape[2:]))
    s, q, per = channel_sums(t)
    assert per == length and s.dtype == q.dtype == torch.float64
    assert s.shape == q.shape == shape[:2] and s.device.type == "cpu"
    assert len(compiled_calls) == 1  # the compiled loop took it
    within_bounds(s, q, t, length)
    with eager(monkeypatch):
        se, qe, _ = channel_sums(t)
    assert len(compiled_calls) == 1  # not asked again
    within_bounds(se, qe, t, length, norm=True)


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_difference_sums_are_within_the_float32_bound(shape, layout, compiled_calls,
                                                      monkeypatch):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    a, b = data(shape, 1, fmt), data(shape, 2, fmt)
    b = a + 1e-3 * b  # a small difference of large values: the error of a layer
    length = int(np.prod(shape[2:]))
    sd, qd, sa, qa, sb, qb, per = difference_sums(a, b, of_a=True, of_b=True)
    assert per == length and len(compiled_calls) == 1
    d = (a.double() - b.double()).float()  # the rounded differences the sums add
    within_bounds(sd, qd, a.double() - b.double(), length, extra=1.0)
    within_bounds(sa, qa, a, length)
    within_bounds(sb, qb, b, length)
    with eager(monkeypatch):
        got = difference_sums(a, b, of_a=True, of_b=True)
        only = difference_sums(a, b)
        first = difference_sums(a, b, of_a=True)
        second = difference_sums(a, b, of_b=True)
    within_bounds(got[0], got[1], d, length, norm=True)  # torch's own differences, summed
    within_bounds(got[2], got[3], a, length, norm=True)
    within_bounds(got[4], got[5], b, length, norm=True)
    assert len(got) == 7 and len(only) == 3
    assert torch.equal(only[0], got[0]) and torch.equal(only[1], got[1])
    assert all(torch.equal(x, y) for x, y in zip(first[2:4], got[2:4]))
    assert all(torch.equal(x, y) for x, y in zip(second[2:4], got[4:6]))
    compiled = difference_sums(a, b, of_b=True)
    assert len(compiled) == 5 and torch.equal(compiled[2], sb) and torch.equal(compiled[3], qb)


@pytest.mark.parametrize("shape", [(9, 64, 4, 4), (5, 3, 32, 32), (5, 2, 32, 16), (7, 512, 2, 2),
                                   (6, 700, 1, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_an_images_sums_do_not_depend_on_the_images_beside_it(shape, layout, compiled_calls):
    """measure and measure_many sum the same images in tensors of other sizes (passes of
    2 and of K + 1 chunks): every image's sums are the same bits whatever else is summed,
    for many channels and for few (an RGB input's 3, the smallest map the loop takes)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    t = data(shape, 3, fmt)
    n = shape[0]
    s, q, _ = channel_sums(t)
    for first, stop in ((0, 1), (2, 3), (1, n - 2), (n - 4, n)):
        sp, qp, _ = channel_sums(t[first:stop].clone())
        assert torch.equal(sp, s[first:stop]) and torch.equal(qp, q[first:stop])
    a, b = data(shape, 4, fmt), data(shape, 5, fmt)
    whole = difference_sums(a, b, of_a=True, of_b=True)
    for i in range(n):
        one = difference_sums(a[i:i + 1].clone(), b[i:i + 1].clone(), of_a=True, of_b=True)
        assert all(torch.equal(o, w[i:i + 1]) for o, w in zip(one[:6], whole[:6]))
    assert {key[1] for key in compiled_calls} == {1 if layout == "channels_last" else 2}


def test_one_channels_sums_do_not_depend_on_the_images_beside_it():
    """A one-channel map (the first layer's input) is summed by torch: compiled, a long
    map's reduction alone is split across threads in an order that depends on the images'
    count."""
    t = data((5, 1, 32, 32), 10)
    s, q, _ = channel_sums(t)
    d = difference_sums(t, data((5, 1, 32, 32), 11), of_a=True, of_b=True)
    for i in range(5):
        one = channel_sums(t[i:i + 1].clone())
        assert torch.equal(one[0], s[i:i + 1]) and torch.equal(one[1], q[i:i + 1])
        pair = difference_sums(t[i:i + 1].clone(), data((5, 1, 32, 32), 11)[i:i + 1].clone(),
                               of_a=True, of_b=True)
        assert all(torch.equal(x, y[i:i + 1]) for x, y in zip(pair[:6], d[:6]))


@pytest.mark.parametrize("case", ["one position", "long map", "float64", "few elements",
                                  "gapped", "two dimensions", "one channel"])
def test_what_the_compiled_loop_does_not_take_is_summed_by_torch(case, compiled_calls):
    gen = torch.Generator().manual_seed(6)
    shapes = {"one position": (4, 600, 1, 1), "long map": (2, 3, 40, 40),
              "float64": (4, 64, 4, 4), "few elements": (4, 8, 4, 4),
              "gapped": (4, 64, 4, 8), "two dimensions": (4, 600),
              "one channel": (4, 1, 32, 32)}
    t = torch.randn(shapes[case], generator=gen)
    if case == "float64":
        t = t.double()
    if case == "gapped":
        t = t[..., ::2]
    other = t + 1
    assert (case == "long map") == (np.prod(t.shape[2:]) > MAX_INNER)
    s, q, per = channel_sums(t)
    sd, qd, _ = difference_sums(t, other)
    assert compiled_calls == []
    length = int(np.prod(t.shape[2:])) if t.ndim > 2 else 1
    assert per == length
    within_bounds(s, q, t, length, norm=length > 1)
    within_bounds(sd, qd, t.double() - other.double(), length, extra=1.0, norm=length > 1)


def test_a_difference_of_two_layouts_is_summed_by_torch(compiled_calls):
    t = data((4, 64, 4, 4), 7)
    other = data((4, 64, 4, 4), 8, torch.channels_last)
    sd, qd, _ = difference_sums(t, other)
    assert compiled_calls == []
    within_bounds(sd, qd, t.double() - other.double(), 16, extra=1.0, norm=True)


@pytest.mark.parametrize("shape", [(6, 64, 4, 4), (5, 256, 2, 2), (4, 40, 8, 8), (3, 700, 1, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("compiled", [True, False])
def test_chunks_are_summed_as_each_chunk_alone(shape, layout, compiled, compiled_calls,
                                               monkeypatch):
    """K quantized networks' outputs beside one float output (the instrument's pass): in
    one call, every chunk's sums are the bits of a call on that chunk alone, and the float
    output's those of a one-chunk call; compiled (a kernel for K = 1 and one for K > 1) and
    by torch's reductions."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    k = 3
    b = data(shape, 12, fmt)
    a = torch.cat([data(shape, 13 + j, fmt) for j in range(k)])
    with contextlib.ExitStack() as stack:
        if not compiled:
            stack.enter_context(eager(monkeypatch))
        whole = difference_sums(a, b, of_a=True, of_b=True, chunks=k)
        n = shape[0]
        assert [t.shape for t in whole[:6]] == [(k * n, shape[1])] * 4 + [shape[:2]] * 2
        for j in range(k):
            one = difference_sums(a[j * n:(j + 1) * n].clone(), b, of_a=True, of_b=True)
            assert all(torch.equal(o, w[j * n:(j + 1) * n]) for o, w in zip(one[:4], whole[:4]))
            assert all(torch.equal(o, w) for o, w in zip(one[4:6], whole[4:6]))
        # fewer images in each chunk: each image's sums the same bits
        few = difference_sums(torch.cat([a[j * n + 1:j * n + 3] for j in range(k)]),
                              b[1:3].clone(), of_a=True, of_b=True, chunks=k)
        for j in range(k):
            assert all(torch.equal(f[2 * j:2 * j + 2], w[j * n + 1:j * n + 3])
                       for f, w in zip(few[:4], whole[:4]))
    assert bool(compiled_calls) == compiled


@pytest.mark.parametrize("chunks, a_shape, error", [
    (2, (3, 4, 4, 4), ValueError), (0, (4, 4, 4, 4), ValueError), (1.5, (4, 4, 4, 4), TypeError),
    (True, (2, 4, 4, 4), TypeError)])
def test_chunks_that_do_not_fit_are_refused(chunks, a_shape, error):
    with pytest.raises(error, match="chunks|two tensors of one shape"):
        difference_sums(torch.zeros(a_shape), torch.zeros(2, 4, 4, 4), chunks=chunks)


def test_chunks_of_numpy_integer_type_are_taken():
    a, b = torch.randn(6, 64, 4, 4), torch.randn(2, 64, 4, 4)
    got = difference_sums(a, b, chunks=np.int64(3))
    want = difference_sums(a, b, chunks=3)
    assert all(torch.equal(x, y) for x, y in zip(got[:2], want[:2]))


def test_tensors_of_two_shapes_are_refused():
    with pytest.raises(ValueError, match="two tensors of one shape"):
        difference_sums(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


def sums_within_bounds(t: torch.Tensor, *states) -> None:
    """``channel_sums`` of ``t`` and ``difference_sums`` of ``t`` and ``t / 2``, taken
    inside the context managers that ``states`` make, each within its float32 bound."""
    half = t * 0.5
    with contextlib.ExitStack() as stack:
        for state in states:
            stack.enter_context(state())
        s, q, length = channel_sums(t)
        sd, qd, per = difference_sums(t, half)
    within_bounds(s, q, t, length)
    within_bounds(sd, qd, t.double() - half.double(), per, extra=1.0)


def test_one_compiled_variant_serves_each_layout_and_grad_mode(monkeypatch, compiled_calls):
    """With the compiler's limit of variants per function set to one, slices of batches of
    other sizes (views: the compiler guarded on their bases), inference tensors, gradients
    on and off, and batches whose size equals the channel count (duck sizing) are all
    summed by the compiled loop, without a warning, within the float32 bound."""
    batches = [data((n, 64, 4, 4), n)[: n // 2] for n in (8, 12, 128)]
    with torch.inference_mode():
        batches.append(data((6, 64, 4, 4), 1))
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("error", RuntimeWarning)
        for grad in (True, False):
            for t in batches:
                sums_within_bounds(t, lambda: torch.set_grad_enabled(grad))
    assert len(compiled_calls) == 4 * len(batches)
    assert not _moments.KERNELS.failed


def test_one_compiled_variant_serves_each_state_of_torch(compiled_calls):
    """A batch of the caller's (no inference tensor) summed with gradients off, inside and
    outside inference mode, with deterministic algorithms, under autocast and with float64
    as the default dtype: guards of the compiler read each, so each is a key of its own;
    with the limit of variants set to one, every call is summed by the compiled loop,
    without a warning, within the float32 bound."""
    t = data((6, 64, 4, 4), 2)
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("error", RuntimeWarning)
        for state in TORCH_STATES:
            sums_within_bounds(t, torch.no_grad, state)
    assert len(compiled_calls) == 2 * len(TORCH_STATES)
    assert not _moments.KERNELS.failed


def test_a_compiler_failure_warns_once_and_gives_torchs_sums(monkeypatch, compiled_calls):
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return fail

    t = data((4, 64, 4, 4), 9)
    with eager(monkeypatch):
        ref = channel_sums(t)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="compiled channel sums is not used.*no C\\+\\+"):
        got = channel_sums(t)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], ref[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = channel_sums(t)
    assert all(torch.equal(a, b) for a, b in zip(again[:2], ref[:2]))


def test_a_variance_within_the_sums_rounding_is_zero():
    """resolved_variance: E[x²] − E[x]² below 3 (γ(L) + γ₆₄(N)) E[x²] is rounding."""
    from qerror.nn._moments import resolved_variance, unit_roundoff

    u = unit_roundoff(torch.float32)
    assert u == 2.0**-24 and unit_roundoff(torch.float64) == 2.0**-53
    bound = 3 * (64 * u / (1 - 64 * u) + 3 * u + 10 * 2.0**-53 / (1 - 10 * 2.0**-53))
    assert resolved_variance(0.0, 1.0, 64, 10, u) == 1.0
    assert resolved_variance(np.sqrt(1 - 0.99 * bound), 1.0, 64, 10, u) == 0.0
    assert resolved_variance(np.sqrt(1 - 1.01 * bound), 1.0, 64, 10, u) > 0.0
    got = resolved_variance(np.array([0.0, 2.0]), np.array([1.0, 4.0]), 64, 10, u)
    np.testing.assert_array_equal(got, [1.0, 0.0])  # a constant 2: its variance is 0
    # moments of an overflowed activation are no collapsed variance: nan, not 0
    got = resolved_variance(np.array([1.0, np.nan, np.inf, 1.0]),
                            np.array([2.0, 1.0, np.inf, np.inf]), 64, 10, u)
    np.testing.assert_array_equal(got, [1.0, np.nan, np.nan, np.nan])
    # half precision: summed in float32, rounded once more to its own dtype; a map of
    # 1024 positions still resolves a channel whose mean is a few standard deviations
    half = unit_roundoff(torch.float16)
    assert resolved_variance(5.0, 26.0, 1024, 10, half) == pytest.approx(1.0)
    assert resolved_variance(0.0, 1.0, 1024, 10, half) == 1.0


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (7, 7), (32, 32)])
def test_a_constant_half_precision_channel_of_small_values_has_no_variance(shape):
    """The sums of float16 data were rounded to float16, where a sum of squares below 6.1e-5
    is subnormal: a channel constant at 2.4557e-4 over 7×7 gave Σx² = 2.95e-6 with an
    absolute spacing of 6e-8 (up to 2 %; squares below 6e-8 became 0), beyond the relative
    bound, and resolved_variance called 85 of 400 such constant channels varying. Summed
    and returned in float32, the squares of float16 values are exact and do not underflow."""
    from qerror.nn._moments import resolved_variance, unit_roundoff

    rng = np.random.default_rng(0)
    n, c = 10, 400
    values = rng.choice([-1, 1], c) * 10.0 ** rng.uniform(-5, -2, c)
    t = torch.from_numpy(values).to(torch.float16)[None, :, None, None].expand(n, c, *shape)
    s, q, length = channel_sums(t.contiguous())
    exact = (t.double() ** 2).sum((2, 3))
    u = unit_roundoff(torch.float16)
    assert torch.all((q - exact).abs() <= gamma(length + 3) * exact)  # float32's γ: within u
    var = resolved_variance(s.sum(0).numpy() / (n * length), q.sum(0).numpy() / (n * length),
                            length, n, u)
    np.testing.assert_array_equal(var, 0.0)
