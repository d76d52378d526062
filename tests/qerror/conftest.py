"""Fixtures of the core library's tests."""

import pytest

from qerror import _fused


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls that took the fused path (a list to read after the call); each must have
    returned the compiled result, not fallen back to the engine."""
    calls = []
    run = _fused.run

    def counted(*args, **kwargs):
        res = run(*args, **kwargs)
        assert res is not None, "the fused path fell back to the block engine"
        calls.append(kwargs["mode"])
        return res

    monkeypatch.setattr(_fused, "run", counted)
    return calls
