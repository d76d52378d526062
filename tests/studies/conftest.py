"""Fixtures of the studies' tests."""

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No study in these tests sees a real cached baseline."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
