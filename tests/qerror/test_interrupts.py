"""qerror.interrupts: a Ctrl-C that Python drops as unraisable is counted once and sent
again, within the block only; the handler and the unraisable hook are put back."""

from __future__ import annotations

import signal
import sys
import threading
import time
import weakref

import pytest

from qerror.interrupts import interrupts, sigint_counted

pytestmark = [
    pytest.mark.skipif(threading.current_thread() is not threading.main_thread()
                       or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                       reason="counted only in the main thread under Python's own handler"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


class _Thing:
    pass


def _dropped_ctrl_c():
    """SIGINT raised inside a weak-reference callback: Python prints the KeyboardInterrupt
    as "Exception ignored in ..." and goes on."""
    thing = _Thing()
    ref = weakref.ref(thing, lambda r: signal.raise_signal(signal.SIGINT))
    del thing
    return ref


def test_a_dropped_ctrl_c_is_sent_again_and_counted_once():
    before, hook = interrupts(), sys.unraisablehook
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with sigint_counted():
            _dropped_ctrl_c()
            time.sleep(30)  # cut short by the SIGINT sent again
    assert time.monotonic() - start < 25
    assert interrupts() == before + 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sys.unraisablehook is hook


def test_nothing_is_sent_after_the_block():
    """A drop just before the block ends: the SIGINT lands in the block or not at all (the
    study finds the count when the block ends), never in the caller's code."""
    for _ in range(20):
        try:
            with sigint_counted():
                _dropped_ctrl_c()
        except KeyboardInterrupt:
            pass
        time.sleep(0.01)  # a SIGINT sent now would raise here, under Python's handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_other_unraisable_errors_are_reported_and_not_sent():
    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_type)
    try:
        with sigint_counted():
            thing = _Thing()
            ref = weakref.ref(thing, lambda r: 1 / 0)
            del thing
            time.sleep(0.05)
    finally:
        sys.unraisablehook = previous
    assert seen == [ZeroDivisionError] and ref() is None
