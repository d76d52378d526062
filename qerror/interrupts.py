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
a fallback that catches errors (:class:`qerror._compiled.Kernels`, the bench's compiled rows)
raises it again under :func:`interrupt_reraised` instead of taking it for a failure, a study
refuses to publish, and its ``main`` exits as interrupted. :func:`sigint_held` holds a
Ctrl-C over a block that must not be cut (an optimizer update), counting it too.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["interrupt_reraised", "interrupts", "note_interrupt", "sigint_counted",
           "sigint_held"]

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


def _raises_keyboard_interrupt(handler) -> bool:
    """Whether a SIGINT handler is Python's own or the counting one: both raise
    ``KeyboardInterrupt`` where the main thread is (:func:`sigint_held` may replace either
    and put it back; a handler someone else installed is theirs)."""
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


@contextlib.contextmanager
def sigint_held():
    """Hold a Ctrl-C until the block ends, then raise it (an optimizer update interrupted
    half-way would leave weights, momenta and step counter out of step with each other);
    the held SIGINT is counted (:func:`interrupts`). Only the main thread can set handlers,
    and a handler someone else installed (or SIG_IGN) is theirs to keep: in both cases the
    block runs as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() \
            or not _raises_keyboard_interrupt(previous):
        yield
        return
    pending = []

    def hold(signum, frame):
        note_interrupt()
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_reraised():
    """For a block whose errors a caller catches and survives (a fallback): an ``Exception``
    raised after a SIGINT was counted in the block is raised as the ``KeyboardInterrupt`` it
    was (torch turns one into a ``TypeError`` inside a compile trace), the error chained."""
    seen = _COUNT
    try:
        yield
    except Exception as err:
        if _COUNT != seen:
            raise KeyboardInterrupt from err
        raise
