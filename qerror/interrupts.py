"""Ctrl-C that is not lost: SIGINTs counted, so that code which finds one swallowed can act.

Python's own SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens to
be, and two places of a CPU run drop it there: a weak-reference callback or a ``__del__``
(Python prints "Exception ignored in ..." and goes on), and torch's C++ argument parsing
inside a ``torch.compile`` trace, which turns it into a ``TypeError`` ("failed to unpack
the object ... KeyboardInterrupt") that a fallback to eager code then takes for a compiler
failure. Both were seen here with a study's ``--smoke`` run interrupted at the wrong moment:
the run went on, published its results and exited 0.

Under :func:`sigint_counted` each SIGINT is counted before it is raised as Python's handler
raises it, so :func:`interrupts` tells code that survived a swallowed one that it came:
:class:`qerror._compiled.Kernels` raises it again instead of falling back (and keeps its
kernels on), a study refuses to publish, and its ``main`` exits as interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["interrupts", "note_interrupt", "raises_keyboard_interrupt", "sigint_counted"]

_COUNT = 0


def interrupts() -> int:
    """SIGINTs counted in this process so far (under :func:`sigint_counted`, or noted by a
    handler that holds them, :func:`note_interrupt`)."""
    return _COUNT


def note_interrupt() -> None:
    """Count one SIGINT (for a handler of its own that holds it for later)."""
    global _COUNT
    _COUNT += 1


def _counting_handler(signum, frame):
    note_interrupt()
    raise KeyboardInterrupt


def raises_keyboard_interrupt(handler) -> bool:
    """Whether a SIGINT handler is Python's own or the counting one: both raise
    ``KeyboardInterrupt`` where the main thread is (code that holds a Ctrl-C for a while may
    replace either and put it back; a handler someone else installed is theirs)."""
    return handler is signal.default_int_handler or handler is _counting_handler


@contextlib.contextmanager
def sigint_counted():
    """For the block, SIGINT raises ``KeyboardInterrupt`` as under Python's own handler and is
    counted first (:func:`interrupts`). Only from the main thread and where Python's own
    handler is installed (SIG_IGN, a background job's, or someone else's handler is left
    alone); the previous handler is put back after the block."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _counting_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
