"""Ctrl-C that is not lost: SIGINTs counted, so that code which finds one swallowed can act.

Python's own SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens to
be, and two places of a CPU run drop it there: a weak-reference callback or a ``__del__``
(Python prints "Exception ignored in ..." and goes on), and torch's C++ argument parsing
inside a ``torch.compile`` trace, which turns it into a ``TypeError`` ("failed to unpack
the object ... KeyboardInterrupt") that a fallback to eager code then takes for a compiler
failure. Both were seen here with a study's ``--smoke`` run interrupted at the wrong moment:
the run went on, published its results and exited 0.

Under :func:`sigint_counted` each SIGINT is counted before it is raised as Python's handler
raises it, and one that Python drops as unraisable (the first place) is sent again from
another thread as soon as the report of it is printed, so that it lands in ordinary code. :func:`interrupts` tells code
that survived a swallowed one (the second place) that it came:
a fallback that catches errors (:class:`qerror._compiled.Kernels`, the bench's compiled rows)
raises it again under :func:`interrupt_reraised` instead of taking it for a failure, a study
refuses to publish, and its ``main`` exits as interrupted. :func:`sigint_held` holds a
Ctrl-C over a block that must not be cut (an optimizer update), counting it too.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
import time

__all__ = ["interrupt_reraised", "interrupts", "note_interrupt", "sigint_counted",
           "sigint_held"]

_COUNT = 0
_REDELIVERED = 0  # SIGINTs sent again (_send_again_soon), counted once already
_IN_HOOK = False  # the unraisable hook is running
_ACTIVE = False  # a sigint_counted block is running (SIGINTs may be sent again)
_LOCK = threading.Lock()


def interrupts() -> int:
    """SIGINTs counted in this process so far (under :func:`sigint_counted`, or noted by a
    handler that holds them, :func:`note_interrupt`)."""
    return _COUNT


def note_interrupt() -> None:
    """Count one SIGINT (for a handler of its own that holds it for later)."""
    global _COUNT
    _COUNT += 1


def _count_arrival() -> None:
    """Count a SIGINT that arrives, unless it is one :func:`_send_again_soon` sent again."""
    global _REDELIVERED
    if _REDELIVERED:
        _REDELIVERED -= 1
    else:
        note_interrupt()


def _counting_handler(signum, frame):
    _count_arrival()
    if _IN_HOOK:  # raised here, it would be dropped as the one being reported was
        _send_again_soon()
        return
    raise KeyboardInterrupt


def _send_again_soon() -> None:
    """Send SIGINT to the main thread from another thread once the unraisable hook has
    returned (raised in the hook, it would be dropped as the one being reported was)."""
    global _REDELIVERED
    _REDELIVERED += 1
    threading.Thread(target=_send_again, name="qerror-sigint", daemon=True).start()


def _send_again() -> None:
    while True:
        with _LOCK:
            if not _ACTIVE:  # the block ended: the study finds the count itself
                return
            if not _IN_HOOK:
                if hasattr(signal, "pthread_kill"):  # wakes the main thread from a wait
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                else:
                    _thread.interrupt_main(signal.SIGINT)
                return
        time.sleep(0.001)


def _redelivering_hook(previous):
    """An unraisable-exception hook that reports as ``previous`` does and has a dropped
    ``KeyboardInterrupt`` sent to the main thread again (:func:`_send_again_soon`)."""

    def hook(unraisable):
        global _IN_HOOK
        _IN_HOOK = True
        try:
            previous(unraisable)
        finally:
            if unraisable.exc_type is not None \
                    and issubclass(unraisable.exc_type, KeyboardInterrupt):
                _send_again_soon()
            _IN_HOOK = False

    return hook


def _raises_keyboard_interrupt(handler) -> bool:
    """Whether a SIGINT handler is Python's own or the counting one: both raise
    ``KeyboardInterrupt`` where the main thread is (:func:`sigint_held` may replace either
    and put it back; a handler someone else installed is theirs)."""
    return handler is signal.default_int_handler or handler is _counting_handler


@contextlib.contextmanager
def sigint_counted():
    """For the block, SIGINT raises ``KeyboardInterrupt`` as under Python's own handler and is
    counted first (:func:`interrupts`); one that Python drops as unraisable (raised in a
    weak-reference callback or a ``__del__``) is reported as before and sent again to the
    main thread (``sys.unraisablehook``, put back after the block unless someone replaced it
    meanwhile; none is sent after the block). Only from the main thread and where
    Python's own handler is installed (SIG_IGN, a background job's, or someone else's
    handler is left alone); the previous handler is put back after the block."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    global _ACTIVE, _REDELIVERED
    previous_hook = sys.unraisablehook
    hook = _redelivering_hook(previous_hook)
    # A SIGINT is taken where a call returns: one that lands as the handler is installed,
    # or as a step of the clean-up ends, must find every later step still to come (each in
    # a finally of its own), and the handler put back last.
    try:
        with _LOCK:
            _ACTIVE, _REDELIVERED = True, 0
        signal.signal(signal.SIGINT, _counting_handler)
        sys.unraisablehook = hook
        yield
    finally:
        try:
            try:
                with _LOCK:  # no SIGINT is sent again after this (one sent now still lands)
                    _ACTIVE, _REDELIVERED = False, 0
            finally:
                if sys.unraisablehook is hook:
                    sys.unraisablehook = previous_hook
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def sigint_held():
    """Hold a Ctrl-C until the block ends, then raise it (an optimizer update interrupted
    half-way would leave weights, momenta and step counter out of step with each other);
    the held SIGINT is counted (:func:`interrupts`). A block that raises an ``Exception``
    after a Ctrl-C came raises the ``KeyboardInterrupt`` instead, the error chained, so a
    caller that catches the error does not lose the Ctrl-C. Only the main thread can set
    handlers, and a handler someone else installed (or SIG_IGN) is theirs to keep: in both
    cases the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() \
            or not _raises_keyboard_interrupt(previous):
        yield
        return
    pending = []

    def hold(signum, frame):
        _count_arrival()
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    except Exception as err:
        if pending:  # the Ctrl-C held, not an error a caller may catch and survive
            raise KeyboardInterrupt from err
        raise
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
