"""The suite's own set-up: how pytest-xdist's workers share the cores."""

import pytest

from tests.conftest import share_the_cores


@pytest.mark.parametrize("workers, cores, threads", [
    ("2", 2, 1), ("2", 8, 4), ("3", 2, 1), ("4", 16, 4), ("3", 8, 2)])
def test_workers_share_the_cores(workers, cores, threads):
    env = {"PYTEST_XDIST_WORKER_COUNT": workers}
    assert share_the_cores(env, cores) == threads
    assert env["OMP_NUM_THREADS"] == str(threads)  # the studies a test starts inherit it


@pytest.mark.parametrize("env", [
    {},  # not under xdist
    {"PYTEST_XDIST_WORKER_COUNT": "1"},
    {"PYTEST_XDIST_WORKER_COUNT": "2", "OMP_NUM_THREADS": "2"},  # the caller chose
])
def test_threads_left_alone(env):
    before = dict(env)
    assert share_the_cores(env, 8) is None
    assert env == before
