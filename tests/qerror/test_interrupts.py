"""qerror.interrupts: a Ctrl-C that Python drops as unraisable is counted once and sent
again, within the block only; the handler and the unraisable hook are put back."""

from __future__ import annotations

import contextlib
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


def test_a_ctrl_c_during_the_report_of_another_dropped_error_is_sent_again():
    """A SIGINT that arrives while the unraisable hook reports some other error (here: the
    report itself raises it): raised there it would be dropped with the report's own
    error, so it is counted and sent again to ordinary code."""
    before = interrupts()
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: signal.raise_signal(signal.SIGINT)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_counted():
                thing = _Thing()
                ref = weakref.ref(thing, lambda r: 1 / 0)
                del thing
                time.sleep(10)  # cut short by the SIGINT sent again
    finally:
        sys.unraisablehook = previous
    assert time.monotonic() - start < 8 and ref() is None
    assert interrupts() == before + 1


def _ignore(signum, frame):
    pass


@pytest.mark.parametrize("theirs", [signal.SIG_IGN, _ignore])
def test_someone_elses_sigint_handler_is_left_alone(theirs):
    """Under SIG_IGN (a background job) or a handler someone else installed, neither block
    takes SIGINT over: it stays theirs during the block and after it, and a SIGINT is
    neither counted nor raised."""
    from qerror.interrupts import sigint_held

    before = interrupts()
    signal.signal(signal.SIGINT, theirs)
    try:
        for block in (sigint_counted, sigint_held):
            with block():
                assert signal.getsignal(signal.SIGINT) is theirs
                signal.raise_signal(signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is theirs
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert interrupts() == before


def test_outside_the_main_thread_both_blocks_run_as_they_are():
    """Only the main thread may set a signal handler (signal.signal raises ValueError
    elsewhere): in another thread both blocks run their body and change nothing."""
    from qerror.interrupts import sigint_held

    ran, errors = [], []

    def body():
        try:
            for block in (sigint_counted, sigint_held):
                with block():
                    ran.append(block.__name__)
        except Exception as err:  # reported to the test, not lost in the thread
            errors.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == [] and ran == ["sigint_counted", "sigint_held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_unraisable_hook_replaced_in_the_block_is_kept():
    before = sys.unraisablehook

    def theirs(unraisable):
        pass

    try:
        with sigint_counted():
            sys.unraisablehook = theirs
        assert sys.unraisablehook is theirs
    finally:
        sys.unraisablehook = before


def test_a_held_ctrl_c_is_counted_once_and_raised_when_the_block_ends():
    """sigint_held holds a SIGINT over its block, under Python's handler and under the
    counting one alike (an optimizer update inside a study's main must not be cut), then
    raises it; it is counted once."""
    from qerror.interrupts import sigint_held

    for outer in (contextlib.nullcontext, sigint_counted):
        before, finished = interrupts(), []
        with pytest.raises(KeyboardInterrupt):
            with outer():
                with sigint_held():
                    signal.raise_signal(signal.SIGINT)
                    finished.append(True)
        assert finished == [True] and interrupts() == before + 1
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_ctrl_c_is_not_lost_when_the_block_then_raises():
    """A block that fails after a Ctrl-C came raises the KeyboardInterrupt, the error
    chained: a caller that catches the error (a fallback) would otherwise go on as if no
    Ctrl-C had come."""
    from qerror.interrupts import sigint_held

    with pytest.raises(KeyboardInterrupt) as got:
        try:
            with sigint_held():
                signal.raise_signal(signal.SIGINT)
                raise ValueError("the step failed")
        except ValueError:
            pass  # a caller's fallback: the Ctrl-C must not end here
    assert isinstance(got.value.__cause__, ValueError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(ValueError, match="no Ctrl-C"):  # without one, the error as it was
        with sigint_held():
            raise ValueError("no Ctrl-C")


def test_a_sigint_sent_again_after_the_block_does_not_make_the_next_block_miss_one(
        monkeypatch):
    """A KeyboardInterrupt dropped in the moment the block ends is marked as sent again
    but never sent (the block is over): the next block starts from no such mark, so its
    first real SIGINT is counted."""
    from qerror import interrupts as module

    monkeypatch.setattr(module, "_REDELIVERED", 1)  # what that moment leaves behind
    before = interrupts()
    with pytest.raises(KeyboardInterrupt):
        with sigint_counted():
            signal.raise_signal(signal.SIGINT)
    assert interrupts() == before + 1


@pytest.mark.parametrize("when", ["installed", "put back"])
def test_a_sigint_as_the_handler_is_installed_or_put_back_leaves_nothing_changed(
        when, monkeypatch):
    """A SIGINT is taken where a call returns: one landing just as signal.signal installed
    the counting handler (before the block's try) left that handler installed for good and
    the block marked running; one landing just as Python's handler was put back left the
    block's unraisable hook installed. Here signal.signal raises SIGINT as it returns."""
    from qerror import interrupts as module

    real, hook, landed = signal.signal, sys.unraisablehook, []

    def signal_then_sigint(signum, handler):
        previous = real(signum, handler)
        if not landed and (handler is module._counting_handler if when == "installed"
                           else handler is signal.default_int_handler):
            landed.append(handler)
            signal.raise_signal(signal.SIGINT)
        return previous

    monkeypatch.setattr(module.signal, "signal", signal_then_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_counted():
                pass
        left = signal.getsignal(signal.SIGINT), sys.unraisablehook, module._ACTIVE
    finally:  # a failure here must not change the tests after it
        monkeypatch.undo()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook, module._ACTIVE = hook, False
    assert landed and left == (signal.default_int_handler, hook, False)
