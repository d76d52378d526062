"""The CPU's flushing of subnormal numbers, set for a block in the calling thread and its
OpenMP team and put back after it.

Public so that studies and notebooks can run long CPU work under flush-to-zero without
leaving the process changed.

Notes
-----
The flag lives in each thread's floating-point control register (MXCSR on x86), and a new
thread copies it from the thread that creates it. ``torch.set_flush_denormal`` sets it in the
calling thread only. torch's intra-op OpenMP threads are created on the first parallel
region, so with that setter alone they flush inside a block or not depending on whether they
existed before it, and those created inside it flush for the rest of the process: an exact
quantizer reading a subnormal input there gets the code of 0 in some chunks of an array and
the exact code in others. :func:`set_flush_denormal` also sets the flag in every thread of
the calling thread's OpenMP team, by a parallel region of the OpenMP runtime torch calls
(``GOMP_parallel``, looked up through ``libtorch_cpu``; GNU libgomp, LLVM's libomp and Intel's
libiomp5 all export it) that runs the C library's ``fesetenv`` with the calling thread's
environment. qerror's own worker threads (:mod:`qerror.quantizer`) take the calling thread's
setting with each task, and their teams too where a task runs torch's parallel kernels.

Not reached: the teams of other Python threads, a forked child's team (the child sets its
own thread only: a parallel region there can hang), and every team where no runtime is found
(then :func:`set_flush_denormal` says so). Checked with GNU libgomp only; LLVM's libomp
shares parked threads among teams, which this module does not track.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

import numpy as np
import torch

#: Bytes reserved for a C ``fenv_t`` (32 on x86-64 glibc, 8 on aarch64): ample.
_FENV_BYTES = 512
_RUNTIME: list = []  # [_Runtime] or [None], found on first use
_FORKED: list[bool] = []


def _mark_forked_child() -> None:
    _FORKED.append(True)


os.register_at_fork(after_in_child=_mark_forked_child)


def in_forked_child() -> bool:
    """Whether this process is a forked child of the one that imported qerror.

    Returns
    -------
    bool
        True in a child made by ``os.fork`` (multiprocessing's fork start method).

    Notes
    -----
    GNU libgomp's threads do not survive a fork, and a parallel region in the child of a
    process that had them can hang: such a child sets only its own thread's flushing here,
    and quantizes on the block engine (:mod:`qerror._fused`).
    """
    return bool(_FORKED)


def _openmp():
    """The OpenMP runtime this process loaded and the C library's environment functions
    (:class:`_Runtime`), or None where either is not found or in a forked child (then only
    the calling thread is set)."""
    if in_forked_child():
        return None
    if not _RUNTIME:
        _RUNTIME.append(_find_openmp())
    return _RUNTIME[0]


class _Runtime:
    """``GOMP_parallel`` and ``omp_get_thread_num`` of torch's OpenMP runtime, and the C
    library's ``fegetenv`` and ``fesetenv`` (the latter as an address, to run on a team)."""

    def __init__(self, omp, libm):
        self.parallel = omp.GOMP_parallel
        self.parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                  ctypes.c_uint]
        self.parallel.restype = None
        self.thread_num = omp.omp_get_thread_num
        self.thread_num.restype = ctypes.c_int
        self.getenv = libm.fegetenv
        self.getenv.argtypes = [ctypes.c_void_p]
        self.setenv = ctypes.cast(libm.fesetenv, ctypes.c_void_p).value

    def run(self, function_address: int, data, threads: int) -> None:
        """``function(data)`` on every thread of a team of ``threads`` (the calling one
        included), returning when all have run it."""
        self.parallel(function_address, data, max(1, threads), 0)


def _find_openmp() -> _Runtime | None:
    # The runtime torch itself calls: symbols looked up through libtorch_cpu's handle are
    # searched in its own dependencies, so the copy torch is bound to is found (its own, or a
    # preloaded one), never another package's.
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps}
        torch_cpu = sorted(p for p in paths if os.path.basename(p).startswith("libtorch_cpu."))
        if not torch_cpu:
            return None
        omp = ctypes.CDLL(torch_cpu[0])
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        return _Runtime(omp, libm)
    except (OSError, AttributeError):  # no /proc (not Linux), no OpenMP, no fenv functions
        return None


def flushing_denormals() -> bool:
    """Whether the calling thread flushes denormals to zero now.

    Returns
    -------
    bool
        True when a denormal float32 product comes out as zero.

    Notes
    -----
    torch has a setter (``torch.set_flush_denormal``) but no getter: the state is read by
    multiplying the denormal 1e-45 by 1 in this thread and checking whether it survives.
    """
    return bool(np.float32(1e-45) * np.float32(1.0) == 0)


def set_flush_denormal(on: bool) -> bool:
    """Set flushing of denormals to zero in the calling thread and in every thread of its
    OpenMP team (torch's intra-op threads).

    Parameters
    ----------
    on : bool
        Flush (True) or compute with denormals (False).

    Returns
    -------
    bool
        Whether the team was reached. False where no OpenMP runtime or C ``fesetenv`` is
        found, or in a forked child: then only the calling thread is set, as by
        ``torch.set_flush_denormal``.
    """
    torch.set_flush_denormal(bool(on))
    found = _openmp()
    if found is None:
        return False
    env = ctypes.create_string_buffer(_FENV_BYTES)
    if found.getenv(env) != 0:
        return False
    # Every thread of the team, the calling one included, takes the calling one's whole
    # environment (rounding mode too, as a thread it created would). A team of at least two:
    # one of a single thread returns at once in libgomp and would leave the threads a larger
    # count parked (keeping their setting) as they are; a team of two releases them.
    found.run(found.setenv, ctypes.addressof(env), max(2, torch.get_num_threads()))
    return True


def team_flushing() -> tuple[bool, ...] | None:
    """Whether each thread of the calling thread's OpenMP team flushes denormals now
    (the calling thread first), or None where the team cannot be reached.

    Returns
    -------
    tuple of bool or None
        One entry per thread of a team of ``torch.get_num_threads()`` threads.

    Notes
    -----
    A diagnostic: each thread runs :func:`flushing_denormals` through a Python callback,
    so it takes the interpreter lock in turn.
    """
    found = _openmp()
    if found is None:
        return None
    threads = max(1, torch.get_num_threads())
    states: list = [None] * threads

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def probe(_):
        states[found.thread_num()] = flushing_denormals()

    found.run(ctypes.cast(probe, ctypes.c_void_p).value, None, threads)
    return tuple(states)


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush denormals to zero inside the block in the calling thread and its OpenMP team,
    then give them all the calling thread's earlier setting.

    Yields
    ------
    None

    Notes
    -----
    Long CPU training and inference here slow down 3-8x at random without it. The flag is
    per thread (see the module's notes): the block sets it in the calling thread and its
    OpenMP team with :func:`set_flush_denormal`, so the intra-op threads flush inside it
    whether or not they existed before it, and none flushes after it unless the caller's
    thread did, so a study run in-process (a test, a notebook) leaves the process as it was.

    Examples
    --------
    >>> with flush_denormal():
    ...     assert flushing_denormals()
    """
    before = flushing_denormals()
    set_flush_denormal(True)
    try:
        yield
    finally:
        set_flush_denormal(before)
