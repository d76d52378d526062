"""The environment switches that studies.bench times (QERROR_FUSED): a value they do not
know is refused, not read as the default."""

import numpy as np
import pytest

from qerror import QuantSpec, fake_quantize
from qerror._compiled import allowed, fused_switch
from studies import bench


@pytest.mark.parametrize("value", ["false", "off", "no", "2"])
def test_an_unknown_fused_switch_is_refused_not_read_as_on(value, monkeypatch):
    """QERROR_FUSED=false (or off) left the compiled kernels on, while a run's manifest
    recorded the variable as if it had turned them off."""
    monkeypatch.setenv("QERROR_FUSED", value)
    with pytest.raises(ValueError, match="QERROR_FUSED"):
        fused_switch()
    with pytest.raises(ValueError, match="QERROR_FUSED"):
        fake_quantize(np.linspace(-1, 1, 1 << 15, dtype=np.float32), QuantSpec(), 0.01)


@pytest.mark.parametrize("value, on", [("0", False), ("1", True), ("", True), (" 0 ", False)])
def test_the_fused_switch_values(value, on, monkeypatch):
    monkeypatch.setenv("QERROR_FUSED", value)
    assert fused_switch() is on
    if not on:
        assert not allowed()


def test_bench_refuses_an_unknown_fused_switch_before_any_work(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setitem(bench.GROUPS, "empirical", lambda args: ran.append(1) or [])
    monkeypatch.setenv("QERROR_FUSED", "false")
    out = tmp_path / "bench"
    assert bench.main(["--only", "empirical", "--out", str(out)]) == 2
    assert not ran and not out.exists()
    assert "QERROR_FUSED='false'" in capsys.readouterr().err


def test_fused_path_enabled_refuses_an_unknown_switch_after_a_family_broke(monkeypatch):
    """fused_path_enabled (which studies call to refuse a bad QERROR_FUSED before any work)
    asked the switch only while no compiled family had broken: after a compiler failure it
    said False for any value, so the refusal depended on what had failed before."""
    from qerror import _fused
    from qerror.quantizer import fused_path_enabled

    monkeypatch.setattr(_fused.KERNELS, "broken", ["a compiler failure"])
    monkeypatch.setenv("QERROR_FUSED", "off")
    with pytest.raises(ValueError, match="QERROR_FUSED='off'"):
        fused_path_enabled()
    monkeypatch.setenv("QERROR_FUSED", "1")
    assert fused_path_enabled() is False  # the family stays off


def test_a_sums_row_says_when_the_compiled_loop_is_off(monkeypatch):
    """The instrument's sums rows ("difference_sums, compiled loop" against torch's
    reductions) said nothing where the compiled loop was off (QERROR_FUSED=0, a compiler
    failure): torch's reductions timed against themselves under the compiled loop's name,
    where the fused quantizer's rows say "fused path OFF here"."""
    from qerror.nn import compiled_sums_enabled

    monkeypatch.setenv("QERROR_FUSED", "0")
    assert not compiled_sums_enabled()
    model, x, _, cfg, act, w, arch = bench._drift_setup(True, 0)
    rows = bench.sums_rows(model, x[:2], act, cfg, w, arch, 1)
    assert len(rows) == 2
    assert all("compiled sums OFF here" in r.note for r in rows)
