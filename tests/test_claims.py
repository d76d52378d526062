"""The claims ledger: one test per claim of the research notes, asserting its verdict."""

import ast
from pathlib import Path

import numpy as np
import torch

from qerror import QuantSpec, RoundingMode, apply_rounding, dequantize, quantize
from studies.ledger import CLAIMS, Verdict, claim


def test_every_claim_has_its_deciding_test_here():
    tree = ast.parse(Path(__file__).read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    deciding = {c.test for c in CLAIMS}
    assert deciding <= defined, deciding - defined
    claim_tests = {name for name in defined if name.startswith("test_claim_")}
    assert claim_tests == deciding, claim_tests ^ deciding
    assert len({c.id for c in CLAIMS}) == len(CLAIMS)


def test_claim_R1_torch_round_is_half_to_even():
    assert claim("R1").verdict is Verdict.FALSE
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5])
    assert torch.round(ties).tolist() == [0, 2, 2, 4, -0.0, -2, -2]
    away = apply_rounding(ties, RoundingMode.NEAREST_AWAY)
    assert not torch.equal(torch.round(ties), away)
    # The notes' example cannot tell the two rules apart.
    assert torch.round(torch.tensor(-1.5)) == away[5] == -2


def test_claim_R2_round_to_nearest():
    assert claim("R2").verdict is Verdict.TRUE
    assert torch.round(torch.tensor([2.3, 2.7, -2.3, -2.7])).tolist() == [2, 3, -2, -3]


def _notes_quantizer(tensor, scale, zero_point, dtype=torch.int8):
    """The notes' linear_q_with_scale_and_zero_point, verbatim in behaviour."""
    scaled_and_shifted = tensor / scale + zero_point
    rounded = torch.round(scaled_and_shifted)
    info = torch.iinfo(dtype)
    return rounded.clamp(info.min, info.max).to(dtype)


def test_claim_R3_rounding_error_bound_needs_no_clipping():
    assert claim("R3").verdict is Verdict.CONDITIONAL
    scale = 0.05
    x = torch.linspace(-8, 8, 20001)
    q = _notes_quantizer(x, scale, 0)
    e = (q.double() - x.double() / scale)  # the notes' e = q - x, in LSB
    inside = (x / scale).abs() <= 127
    assert e[inside].abs().max() <= 0.5 + 1e-5  # float32 x/s: the bound holds to rounding
    assert e[~inside].abs().max() > 30  # clamped values: far outside [-0.5, 0.5]
    # qerror's quantizer agrees with the notes' inside the range (scale is a power of two
    # times an odd number here, so the tie handling is the only possible difference).
    ours = quantize(x, QuantSpec(bits=8), scale)
    assert (ours.to(torch.int8) == q).float().mean() > 0.999


def test_claim_T1_trunc_drops_the_fraction():
    assert claim("T1").verdict is Verdict.TRUE
    assert torch.trunc(torch.tensor([2.9, -2.9])).tolist() == [2, -2]
    assert apply_rounding(np.array([2.9, -2.9]), RoundingMode.TOWARD_ZERO).tolist() == [2, -2]


def test_claim_T2_int_cast_truncates_in_range():
    assert claim("T2").verdict is Verdict.CONDITIONAL
    x = torch.linspace(-1000.5, 1000.5, 40001)
    assert torch.equal(x.to(torch.int32).float(), torch.trunc(x))
    # Out of int32 range the cast has no defined value; truncation then clamping does.
    big = torch.tensor([3e9, -3e9])
    spec = QuantSpec(bits=16, rounding=RoundingMode.TOWARD_ZERO)
    assert quantize(big, spec, 1.0).tolist() == [spec.qmax, spec.qmin]


def test_claim_T3_truncation_error_sign_follows_u():
    assert claim("T3").verdict is Verdict.CONDITIONAL
    spec = QuantSpec(bits=8, symmetric=False, rounding=RoundingMode.TOWARD_ZERO)
    scale = 0.1
    x = np.linspace(-3, 3, 6001)
    for z in (0, -20, 20):
        q = quantize(x, spec, scale, z)
        u = x / scale + z
        e = (q - z) - (x / scale)  # error in LSB: R(u) - u
        granular = (q > spec.qmin) & (q < spec.qmax)
        pos, neg = granular & (u > 0.5), granular & (u < -0.5)
        tol = 1e-9  # the float64 evaluation of x/s here, not the quantizer, is inexact
        assert np.all((e[pos] > -1 - tol) & (e[pos] <= tol))
        assert np.all((e[neg] >= -tol) & (e[neg] < 1 + tol))
        assert e[pos].mean() < -0.4 and e[neg].mean() > 0.4
    # With z = -20, x = 1.0 is positive but u = -10 + ... < 0: it is rounded *up*.
    q = quantize(np.array([1.05]), spec, scale, -20)
    assert dequantize(q, scale, -20, dtype=np.float64)[0] > 1.05


def test_claim_T4_truncation_pulls_toward_minus_z_s():
    assert claim("T4").verdict is Verdict.CONDITIONAL
    rng = np.random.default_rng(0)
    w = rng.standard_normal(100_000) * 0.5
    sym = QuantSpec(bits=8, rounding=RoundingMode.TOWARD_ZERO)
    w_sym = dequantize(quantize(w, sym, 0.01), 0.01, dtype=np.float64)
    assert np.all(np.abs(w_sym) <= np.abs(w))  # symmetric: always toward zero
    aff = sym.replace(symmetric=False)
    z, scale = -50, 0.01  # u = 0 at the real value -z*s = 0.5
    w_aff = dequantize(quantize(w, aff, scale, z), scale, z, dtype=np.float64)
    granular = np.abs(w / scale + z) < 127
    toward_attractor = np.abs(w_aff - 0.5) <= np.abs(w - 0.5) + 1e-12
    assert np.all(toward_attractor[granular])
    between = granular & (w > 0.02) & (w < 0.48)
    assert np.all(np.abs(w_aff[between]) >= np.abs(w[between]))  # away from zero
    assert np.mean(np.abs(w_aff[between]) > np.abs(w[between])) > 0.99
