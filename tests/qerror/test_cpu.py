"""Flushing of subnormals (qerror.cpu): a per-thread flag, set by the block in the calling
thread and its OpenMP team and put back in all of them; the quantizer's codes for subnormal
inputs are then the exact ones after a block and consistently the flushed ones inside it."""

import os

import numpy as np
import pytest
import torch

from qerror import QuantSpec, RoundingMode, quantize
from qerror.cpu import flush_denormal, flushing_denormals, set_flush_denormal, team_flushing
from tests.qerror.test_quantizer import fresh_python, in_forked_child

CEIL = QuantSpec(bits=8, rounding=RoundingMode.CEIL)


@pytest.fixture
def team():
    """Skips where the OpenMP team cannot be reached (no runtime found): asked in the test,
    not at collection, which would start the team's threads in every worker."""
    if team_flushing() is None:
        pytest.skip("no OpenMP runtime with GOMP_parallel found through libtorch_cpu")


def test_block_flushes_in_every_thread_of_the_team_and_puts_the_setting_back(team):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.zeros(1 << 22).add_(1)  # the team exists before the block
        assert team_flushing() == (False, False)
        with flush_denormal():
            assert team_flushing() == (True, True) and flushing_denormals()
        assert team_flushing() == (False, False) and not flushing_denormals()
    finally:
        torch.set_num_threads(before)


def test_threads_created_in_a_block_stop_flushing_after_it_and_codes_are_exact(team):
    # Subnormal inputs under CEIL: the exact code is 1; read as 0 (flushed) it is 0. The
    # fused path (float32, OpenMP team) and the block engine (float64, qerror's pool
    # threads) both run their first parallel work inside the block.
    lines = fresh_python("""
        import numpy as np, torch
        from qerror import QuantSpec, RoundingMode, quantize
        from qerror.cpu import flush_denormal, team_flushing
        spec = QuantSpec(bits=8, rounding=RoundingMode.CEIL)
        x32, x64 = np.full(1 << 20, 1e-40, np.float32), np.full(1 << 20, 1e-310)
        x16 = torch.full((1 << 20,), 1e-39, dtype=torch.bfloat16)  # torch kernels, pool teams
        def codes():
            return [np.unique(np.asarray(quantize(x, spec, 0.01))).tolist()
                    for x in (x32, x64, x16)]
        with flush_denormal():
            torch.zeros(1 << 22).add_(1)
            print(team_flushing())
            print(codes())
        print(team_flushing())
        print(codes())
    """)
    assert lines[:4] == ["(True, True)", "[[0], [0], [0]]", "(False, False)", "[[1], [1], [1]]"]


def test_a_count_lowered_to_one_in_a_block_leaves_no_parked_thread_flushing(team):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with flush_denormal():
            torch.zeros(1 << 22).add_(1)  # a team of two, flushing
            torch.set_num_threads(1)  # the second thread parks
        torch.set_num_threads(2)  # and is used again
        assert team_flushing() == (False, False)
    finally:
        torch.set_num_threads(before)


def test_the_team_is_the_one_torch_calls_where_two_runtimes_are_loaded(team, tmp_path):
    # Two copies of torch's libgomp: one preloaded, which torch binds to (same soname), and
    # one loaded by "another package" first, at a path that sorts before it. A choice by
    # path would set the other package's threads and leave torch's flushing.
    maps = open("/proc/self/maps").read().split()
    ours = next((p for p in maps if os.path.basename(p).startswith("libgomp")
                 and p.startswith(os.path.dirname(torch.__file__))), None)
    if ours is None:
        pytest.skip("this torch does not ship its own GNU libgomp")
    used, other = tmp_path / "libgomp.so.1", tmp_path / "a" / "libgomp-other.so.1"
    other.parent.mkdir()
    for path in (used, other):
        path.write_bytes(open(ours, "rb").read())
    lines = fresh_python(f"""
        import ctypes
        ctypes.CDLL({str(other)!r})
        import torch
        from qerror.cpu import flush_denormal
        loaded = {{l.split()[-1] for l in open("/proc/self/maps")}}
        assert {{{str(used)!r}, {str(other)!r}}} <= loaded
        torch.set_flush_denormal(True)
        torch.zeros(1 << 22).add_(1)
        torch.set_flush_denormal(False)
        with flush_denormal():
            pass
        x = torch.full((1 << 22,), 1e-40)
        print(int((x * 1.0 == 0).sum()))
    """, LD_PRELOAD=str(used))
    assert lines[0] == "0"


def test_quantizer_pool_follows_the_calling_threads_setting():
    # float64 goes to the block engine, 2**20 elements to several blocks on its threads
    x = np.full(1 << 20, 1e-310)
    assert np.unique(quantize(x, CEIL, 0.01)).tolist() == [1]  # the pool exists now
    with flush_denormal():
        assert np.unique(quantize(x, CEIL, 0.01)).tolist() == [0]
    assert np.unique(quantize(x, CEIL, 0.01)).tolist() == [1]


def test_setting_reports_whether_the_team_was_reached():
    assert set_flush_denormal(False) is (team_flushing() is not None)
    assert not flushing_denormals()


def _set_in_child(queue):
    queue.put(set_flush_denormal(False))


def test_forked_child_sets_its_own_thread_only(team):
    torch.zeros(1 << 22).add_(1)  # the parent's team exists
    assert in_forked_child(_set_in_child) is False
