"""errors.py: the one-line form of an error and the failure wrapper every command runs in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from transferlab import errors
from transferlab.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    DataError,
    Interrupted,
    describe,
    first_line,
    interrupts_deferred,
    run_reporting_errors,
    stop_on_signals,
)


class KeyedError(Exception):
    full_key = "data.source"


def test_first_line_folds_whitespace_and_names_the_full_key() -> None:
    assert first_line(ValueError("  bad   value\n  Traceback detail\n")) == "bad value"
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(KeyedError("Missing mandatory value: source")) == "Missing mandatory value: source (data.source)"
    assert describe(DataError("x.csv not found\nmore")) == "DataError: x.csv not found"


def test_wrapper_turns_errors_into_one_line_and_an_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_reporting_errors(lambda: 0) == 0

    def fails() -> int:
        raise DataError("no images\nsecond line")

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_reporting_errors(fails) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "DataError: no images\n"
    assert run_reporting_errors(interrupted) == EXIT_INTERRUPTED
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: its traceback shows
        run_reporting_errors(lambda: 1 // 0)


def test_interrupts_name_their_signal_and_exit_like_a_shell(capsys: pytest.CaptureFixture[str]) -> None:
    def terminated() -> int:
        raise Interrupted(signal.SIGTERM)

    assert run_reporting_errors(terminated) == 143
    assert capsys.readouterr().err == "interrupted (SIGTERM received)\n"
    assert Interrupted(signal.SIGINT).exit_status == EXIT_INTERRUPTED == 130
    assert describe(Interrupted(signal.SIGTERM)) == "Interrupted: SIGTERM received"
    assert describe(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert isinstance(Interrupted(signal.SIGTERM), KeyboardInterrupt), "Ctrl-C clean-up must apply to SIGTERM too"


@pytest.fixture
def stop_handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`stop_on_signals` installed for one test; the process's own handlers and state restored after."""
    saved = {signum: signal.getsignal(signum) for signum in errors.STOP_SIGNALS}
    monkeypatch.setattr(errors, "_received", [])
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # put back after the test
    stop_on_signals()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _send(signum: int) -> None:
    """Signal this process and wait (up to 5 s) until its handler has run in the main thread."""
    seen = len(errors._received)
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while len(errors._received) == seen and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_raises_interrupted_in_the_main_thread(stop_handlers: None) -> None:
    """Issue 12: SIGTERM ended the process on the spot and left its MLflow run RUNNING."""
    assert not errors.interrupted()
    with pytest.raises(Interrupted, match="SIGTERM received"):
        _send(signal.SIGTERM)
    assert errors.interrupted()


def test_an_error_that_a_stop_signal_caused_is_the_stop(
    stop_handlers: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """CI: Ctrl-C while TensorFlow traced a tf.data function came out as a ValueError ("Could not
    pack sequence"); the command printed a traceback and exited 1 instead of 130."""

    def library_turns_the_interrupt_into_its_own_error() -> int:
        try:
            _send(signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError("Could not pack sequence.") from None
        return 0

    assert run_reporting_errors(library_turns_the_interrupt_into_its_own_error) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted (SIGINT received)\n"
    with pytest.raises(Interrupted) as stopped, errors.stops_as_interrupts():
        raise DataError("a stage's own error after the signal")
    assert isinstance(stopped.value.__cause__, DataError), "the error it stands for stays in the traceback"


def test_deferred_interrupt_is_raised_when_the_block_ends(stop_handlers: None) -> None:
    steps = []
    with pytest.raises(Interrupted, match="SIGINT"), interrupts_deferred():
        _send(signal.SIGINT)
        steps.append("finished the block")
    assert steps == ["finished the block"]
    with pytest.raises(ValueError, match="own error"), interrupts_deferred():  # the block's own error wins
        _send(signal.SIGTERM)
        raise ValueError("own error")
    with interrupts_deferred():  # nothing held over from before
        pass


def test_a_stop_python_cannot_raise_prints_no_traceback() -> None:
    """A SIGTERM that lands in a finaliser (a sweep job's models being freed) was printed as
    "Exception ignored in ..." with a traceback; the stop itself is raised again later
    (`stop_if_received`). Other errors in finalisers are still printed."""
    script = """
import signal
from transferlab.errors import Interrupted, stop_on_signals
stop_on_signals()
class Stopped:
    def __del__(self):
        raise Interrupted(signal.SIGTERM)
class Broken:
    def __del__(self):
        raise ValueError("a bug in a finaliser")
Stopped()
Broken()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert "Interrupted" not in done.stderr and "SIGTERM" not in done.stderr, done.stderr
    assert "ValueError: a bug in a finaliser" in done.stderr


def test_a_received_stop_is_raised_where_work_must_not_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "_received", [])
    errors.stop_if_received()  # nothing received: nothing happens
    monkeypatch.setattr(errors, "_received", [signal.SIGTERM])
    with pytest.raises(Interrupted, match="SIGTERM received"):
        errors.stop_if_received()


def test_a_job_handles_stops_while_it_runs_and_gives_back_the_handlers_it_found(stop_handlers: None) -> None:
    """A Ray worker's own SIGTERM handler (it ends the worker between jobs) is back after a job."""

    def workers_own(signum: int, frame: object) -> None:
        raise AssertionError("not while the job runs")

    signal.signal(signal.SIGTERM, workers_own)
    with pytest.raises(Interrupted, match="SIGTERM"), errors.stops_handled():
        _send(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is workers_own
    assert signal.getsignal(signal.SIGINT) is errors._on_stop_signal  # what it found: the fixture's


def test_a_plain_keyboard_interrupt_after_a_stop_is_reported_as_that_stop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray's ray.get turns the Interrupted of a SIGTERM into a KeyboardInterrupt of its own: the
    driver of a Ray sweep said `interrupted` (and exited 130) instead of naming SIGTERM (143)."""
    monkeypatch.setattr(errors, "_received", [signal.SIGTERM])
    assert errors.report_interrupt(KeyboardInterrupt()) == 143
    assert capsys.readouterr().err == "interrupted (SIGTERM received)\n"
    monkeypatch.setattr(errors, "_received", [])
    assert errors.report_interrupt(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted\n"
