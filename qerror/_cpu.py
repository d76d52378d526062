"""Process-wide CPU floating-point state, set for a block and put back after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def flushing_denormals() -> bool:
    """Whether the CPU flushes denormals to zero now (torch has a setter but no getter)."""
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush denormals to zero inside the block, then restore the caller's setting.

    Long CPU training and inference here slow down 3-8x at random without it; the flag is
    global to the process, so a study run in-process (a test, a notebook) must not leave it
    changed.
    """
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
