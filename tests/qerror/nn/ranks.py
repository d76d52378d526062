"""Two gloo ranks for the qerror.nn tests of what ranks do together under torchrun."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

#: Seconds two spawned gloo ranks may take (each imports torch and qerror: 20 to 40 s on two
#: shared cores) before :func:`two_ranks` calls them hung: a rank left waiting in a
#: collective waits for gloo's own timeout, 30 minutes.
RANKS_LIMIT = 300


def two_ranks(target, *args) -> None:
    """Run ``target(rank, 2, port, *args)`` in two spawned processes on a free port; fail
    the test, killing both, if they have not ended within :data:`RANKS_LIMIT`.

    Spawned, not forked: a forked rank inherits the test process's autograd state, and once
    any earlier test in this worker has run a compiled backward (torch.compile), the child's
    first backward refuses ("autograd's threading in combination with fork-based
    multiprocessing"). Which tests ran before depends on xdist's scheduling, so only a
    fresh interpreter per rank is order-independent (it costs a few seconds of imports).

    ``target`` must be a module-level function (a spawned process imports it by name); an
    error it raises fails the test through torch.multiprocessing's join."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.start_processes(target, args=(2, port, *args), nprocs=2, join=False,
                               start_method="spawn")
    end = time.monotonic() + RANKS_LIMIT
    try:
        while not ranks.join(timeout=1):
            if time.monotonic() > end:
                hung = [r for r, p in enumerate(ranks.processes) if p.is_alive()]
                pytest.fail(f"ranks {hung} still running after {RANKS_LIMIT} s: a collective "
                            "hangs")
    finally:
        for p in ranks.processes:
            if p.is_alive():
                p.kill()
                p.join()


def as_rank(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank ``rank`` of ``world`` as torchrun would: its
    environment (loopback rendezvous on ``port``) and one thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def record_calls(path: Path, calls: Iterable[Callable[[], str]]) -> None:
    """Make each call in turn; its line, or the error it raised as ``"Type: message"``, goes
    to ``path``, rewritten after every call (a hang shows how far the rank got)."""
    said = []
    for call in calls:
        try:
            said.append(call())
        except Exception as exc:
            said.append(f"{type(exc).__name__}: {exc}")
        path.write_text("\n".join(said))
