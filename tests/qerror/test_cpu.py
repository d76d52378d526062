"""Flushing of subnormals (qerror.cpu): a per-thread flag, set by the block in the calling
thread and its OpenMP team and put back in all of them; the quantizer's codes for subnormal
inputs are then the exact ones after a block and consistently the flushed ones inside it."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qerror import QuantSpec, RoundingMode, quantize
from qerror.cpu import flush_denormal, flushing_denormals, set_flush_denormal, team_flushing
from tests.qerror.test_quantizer import in_forked_child

TEAM = team_flushing() is not None
needs_team = pytest.mark.skipif(not TEAM, reason="no OpenMP runtime with GOMP_parallel found")
CEIL = QuantSpec(bits=8, rounding=RoundingMode.CEIL)


def fresh_python(code: str) -> list[str]:
    """The lines ``code`` prints in a new interpreter (two intra-op threads): the OpenMP team
    is created where the code first runs a parallel region, not earlier."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=300, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")


@needs_team
def test_block_flushes_in_every_thread_of_the_team_and_puts_the_setting_back():
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


@needs_team
def test_threads_created_in_a_block_stop_flushing_after_it_and_codes_are_exact():
    # Subnormal inputs under CEIL: the exact code is 1; read as 0 (flushed) it is 0. The
    # fused path (float32, OpenMP team) and the block engine (float64, qerror's pool
    # threads) both run their first parallel work inside the block.
    lines = fresh_python("""
        import numpy as np, torch
        from qerror import QuantSpec, RoundingMode, quantize
        from qerror.cpu import flush_denormal, team_flushing
        spec = QuantSpec(bits=8, rounding=RoundingMode.CEIL)
        x32, x64 = np.full(1 << 20, 1e-40, np.float32), np.full(1 << 20, 1e-310)
        with flush_denormal():
            torch.zeros(1 << 22).add_(1)
            print(team_flushing())
            print(np.unique(quantize(x32, spec, 0.01)), np.unique(quantize(x64, spec, 0.01)))
        print(team_flushing())
        print(np.unique(quantize(x32, spec, 0.01)), np.unique(quantize(x64, spec, 0.01)))
    """)
    assert lines[:4] == ["(True, True)", "[0] [0]", "(False, False)", "[1] [1]"]


@needs_team
def test_a_block_mends_threads_that_torchs_own_setter_left_flushing():
    # torch.set_flush_denormal sets the calling thread only: a thread of the team created
    # while it was on keeps flushing (the test's premise, checked), until a block ends.
    lines = fresh_python("""
        import torch
        from qerror.cpu import flush_denormal, team_flushing
        torch.set_flush_denormal(True)
        torch.zeros(1 << 22).add_(1)
        torch.set_flush_denormal(False)
        print(team_flushing())
        with flush_denormal():
            pass
        print(team_flushing())
    """)
    assert lines[:2] == ["(False, True)", "(False, False)"]


def test_quantizer_pool_follows_the_calling_threads_setting():
    # float64 goes to the block engine, 2**20 elements to several blocks on its threads
    x = np.full(1 << 20, 1e-310)
    assert np.unique(quantize(x, CEIL, 0.01)).tolist() == [1]  # the pool exists now
    with flush_denormal():
        assert np.unique(quantize(x, CEIL, 0.01)).tolist() == [0]
    assert np.unique(quantize(x, CEIL, 0.01)).tolist() == [1]


def test_setting_reports_whether_the_team_was_reached():
    assert set_flush_denormal(False) is TEAM
    assert not flushing_denormals()


def _set_in_child(queue):
    queue.put(set_flush_denormal(False))


@needs_team
def test_forked_child_sets_its_own_thread_only():
    torch.zeros(1 << 22).add_(1)  # the parent's team exists
    assert in_forked_child(_set_in_child) is False
