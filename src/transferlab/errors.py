"""Errors that reach the user as one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class TransferlabError(Exception):
    """Base class: the CLI prints `ClassName: message` and exits non-zero."""


class ConfigError(TransferlabError):
    """A composed config has an unknown key, a wrong type or an out-of-range value."""


class DataError(TransferlabError):
    """Input data is missing, stale, corrupt or unsuitable."""


class DownloadError(TransferlabError):
    """A dataset source could not be fetched, verified or extracted."""


class ModelError(TransferlabError):
    """A model or its weights could not be built or loaded."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (schedulers, `docker stop`, Ray) arrived: stop like on Ctrl-C.

    A `KeyboardInterrupt`, so everything that cleans up after Ctrl-C (runs end KILLED, temporary
    folders are removed, checkpoints stay for a resume) does the same for SIGTERM.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received")

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + self.signum


# Exit statuses of the command-line entry points.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # stop signals this process has seen
_deferred: list[int] = []  # stop signals held back by `interrupts_deferred`
_defer_depth = 0


def stop_on_signals() -> None:
    """Raise `Interrupted` in the main thread on SIGINT and SIGTERM (every entry point calls this).

    Python's default raises KeyboardInterrupt on SIGINT only; SIGTERM would end the process on
    the spot and leave its MLflow run RUNNING. Does nothing outside the main thread.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_stop_signal)
        _hide_swallowed_stops()


def _hide_swallowed_stops() -> None:
    """Keep Python from printing a traceback for an `Interrupted` it cannot propagate.

    A stop signal can land while a `__del__` or a weakref callback runs (garbage collection, as a
    sweep job's models are freed): Python prints "Exception ignored in ..." with a traceback and
    drops the exception. `stop_if_received` raises the stop again at the next point that checks,
    so that traceback tells the user nothing; other unraisable errors go to the hook found here.
    """
    previous = sys.unraisablehook
    if getattr(previous, "hides_swallowed_stops", False):
        return

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            previous(unraisable)

    hook.hides_swallowed_stops = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def stops_handled() -> Iterator[None]:
    """`stop_on_signals` for the block, then the SIGINT/SIGTERM handlers it found back.

    A launcher's worker process runs a job inside code of its own: a Ray worker's SIGTERM handler
    ends the worker when it idles between jobs, as Ray means it to. Outside the main thread, as
    `stop_on_signals`, it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    stop_on_signals()
    try:
        yield
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if _defer_depth and not _deferred:  # a second signal does not wait
        _deferred.append(signum)
        return
    raise Interrupted(signum)


def interrupted() -> bool:
    """True once this process has received SIGINT or SIGTERM."""
    return bool(_received)


@contextlib.contextmanager
def stops_as_interrupts() -> Iterator[None]:
    """Once SIGINT or SIGTERM has arrived, let any error of the block leave as `Interrupted`.

    Library code can catch the `Interrupted` raised in it and fail with an error of its own:
    Ctrl-C while TensorFlow traces a `tf.data` function comes out as a `ValueError` ("Could not
    pack sequence"). The stop is what happened; it must end the run KILLED and exit 130, not
    look like a crash.
    """
    try:
        yield
    except Exception as exc:
        stop = received_stop()
        if stop is not None:
            raise stop from exc
        raise


def received_stop() -> Interrupted | None:
    """The last stop signal this process received, as the `Interrupted` it raised; None before any."""
    return Interrupted(_received[-1]) if _received else None


def stop_if_received() -> None:
    """Raise the stop signal this process received, for the points where work must not go on
    after one (an epoch's end, the model just logged, a sweep job or evaluate about to start).

    Its `Interrupted` normally ends the process where it lands; these points catch one that a
    library swallowed (raised inside a `__del__`, it is only printed) or that was dropped for an
    error ending the block that held it back (`interrupts_deferred`).
    """
    stop = received_stop()
    if stop is not None:
        raise stop


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends, for steps that must not stop half way
    (swapping a folder, an MLflow call, closing a run). A signal that arrived meanwhile is
    raised at the end, unless the block already ends with an exception. A second signal is
    raised at once: pressing Ctrl-C twice still stops a step that hangs."""
    global _defer_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        held = _deferred[-1] if _deferred and not _defer_depth else None
        if not _defer_depth:
            _deferred.clear()
    if held is not None:
        raise Interrupted(held)


def strip_ansi(text: str) -> str:
    """`text` without ANSI escape sequences (Keras puts bold codes into its exception messages)."""
    return _ANSI_ESCAPE.sub("", text)


def first_line(exc: BaseException | object) -> str:
    """The first non-blank line of an exception's message (or of any object's text), whitespace folded,
    without ANSI codes.

    Falls back to the type name when the message is empty. OmegaConf names only the leaf of a
    key in its first line, so its `full_key` is appended when it adds information.
    """
    lines = [" ".join(line.split()) for line in strip_ansi(str(exc)).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{first} ({key})" if key and key not in first else first


def describe(exc: BaseException) -> str:
    """`ClassName: first line` (or just `ClassName` without a message), as shown on the console
    and in the `transferlab.error` tag."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc)}" if str(exc).strip() else name


def run_reporting_errors(task: Callable[[], int]) -> int:
    """Run a command: a `TransferlabError` prints one line and exits 2; Ctrl-C exits 130, SIGTERM 143.

    The one failure wrapper of every entry point (`transferlab ...` and `transferlab-train`).
    """
    try:
        with stops_as_interrupts():
            return int(task())
    except TransferlabError as exc:
        print(describe(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        return report_interrupt(exc)


def report_interrupt(exc: KeyboardInterrupt) -> int:
    """Print `interrupted (SIGTERM received)` (or just `interrupted`); return the exit status.

    A plain `KeyboardInterrupt` after a stop signal is that stop: Ray's `ray.get` turns the
    `Interrupted` raised while it waits into a `KeyboardInterrupt` of its own.
    """
    stop = exc if isinstance(exc, Interrupted) else received_stop()
    print(f"interrupted ({stop})" if stop else "interrupted", file=sys.stderr)
    return stop.exit_status if stop else EXIT_INTERRUPTED


def stop_sweep_on_error(task: Callable[[], T]) -> T:
    """Run part of a Hydra callback: a `TransferlabError` prints one line and ends the process (status 2).

    Hydra turns an exception in a callback into a warning and carries on with the sweep; a sweep
    that cannot start (no tracking server, no Ray node for a job) must stop before any job runs.
    """
    try:
        return task()
    except TransferlabError as exc:
        print(describe(exc), file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from exc
