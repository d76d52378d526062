"""Process-wide CPU floating-point state, set for a block and put back after it.

Public so that studies and notebooks can run long CPU work under flush-to-zero without
leaving the process changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def flushing_denormals() -> bool:
    """Whether the CPU flushes denormals to zero now.

    Returns
    -------
    bool
        True when a denormal float32 product comes out as zero.

    Notes
    -----
    torch has a setter (``torch.set_flush_denormal``) but no getter: the state is read by
    multiplying the denormal 1e-39 by 1 and checking whether it survives.
    """
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush denormals to zero inside the block, then restore the caller's setting.

    Yields
    ------
    None

    Notes
    -----
    Long CPU training and inference here slow down 3-8x at random without it; the flag is
    global to the process, so a study run in-process (a test, a notebook) must not leave it
    changed.

    Examples
    --------
    >>> with flush_denormal():
    ...     assert flushing_denormals()
    """
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
