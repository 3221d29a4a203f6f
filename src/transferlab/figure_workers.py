"""Figures drawn in a worker process while a sweep goes on with its jobs.

A later sweep job spent a third of its time in matplotlib, on one core, while the machine's
other core idled. A sweep started in this process (`start`, called by the sweep's callback)
gets one worker process; `draw` hands it a plot function and its data and returns at once.
Without a worker (single runs, jobs in joblib or Ray worker processes), `draw` draws at once,
in this process.

A job collects a figure either itself (`Drawing.path`), or, while a worker draws (`defers`),
leaves it to follow the job: `follow` runs what needs the files (logging them to MLflow, then
the test metrics) once they are written, at a later `follow` or `collect`, while the next job
trains. The sweep collects every one before it ends, also when it is stopped (`stop`).

The worker is a fresh interpreter (spawned: forking a process that runs TensorFlow is unsafe)
that imports only matplotlib and what the plot functions need. It ignores Ctrl-C and SIGTERM,
which the sweep handles, and dies with this process, also when this one is killed. A worker
that dies, hangs or cannot start costs nothing but time: the figure is drawn here, and the next
one gets a new worker; after `MAX_FAILURES` of them, this process draws every figure itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from transferlab.errors import first_line, interrupts_deferred

log = logging.getLogger(__name__)

# Longest wait for one figure, in seconds: a figure takes well under one.
TIMEOUT_S = 120.0
# Workers that may fail (die, hang, not start) before this process draws everything itself.
MAX_FAILURES = 3
# How long a worker that is no longer needed may take to exit before it is killed.
EXIT_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # prctl(2)

_pool: ProcessPoolExecutor | None = None
_warm_up_done: Future[None] | None = None
_started = False
_failures = 0
# Figures that follow their job, with what to do once they are written: oldest first.
_followers: list[tuple[list[Drawing], Callable[[list[Path]], None], str]] = []


class Drawing:
    """A figure on its way: `path` waits for it and returns where it was written."""

    def __init__(self, future: Future[Path] | None, plot: Callable[..., Path], args: tuple, kwargs: dict) -> None:
        self._future, self._plot, self._args, self._kwargs = future, plot, args, kwargs
        self._path: Path | None = None if future is not None else plot(*args, **kwargs)

    def done(self) -> bool:
        """True once the figure is written (or its drawing failed)."""
        return self._future is None or self._future.done()

    def settle(self) -> None:
        """Wait (at most `TIMEOUT_S`) until the worker is done with it, whatever the outcome: before
        the folder it is written to goes (a job that failed or was stopped)."""
        if self._future is not None and not self._future.done():
            concurrent.futures.wait([self._future], timeout=TIMEOUT_S)

    def path(self) -> Path:
        """The figure's file, once written; the plot function's own error if it failed."""
        if self._path is None:
            assert self._future is not None
            try:
                self._path = self._future.result(timeout=TIMEOUT_S)
                log.info("wrote %s (in the figure worker)", self._path)
            except (BrokenProcessPool, concurrent.futures.TimeoutError) as exc:
                _worker_failed(_failure(exc), self._plot)
                self._path = self._plot(*self._args, **self._kwargs)
        return self._path


@contextlib.contextmanager
def settled(*drawings: Drawing) -> Iterator[None]:
    """Settle `drawings` when the block ends, also when it raises."""
    try:
        yield
    finally:
        for drawing in drawings:
            drawing.settle()


def start() -> None:
    """Draw figures in a worker process from now on in this process (a sweep's start): the
    worker starts with the first figure, and gets `MAX_FAILURES` tries again."""
    global _started, _failures
    _started, _failures = True, 0


def draw(plot: Callable[..., Path], *args: Any, **kwargs: Any) -> Drawing:
    """`plot(*args, **kwargs)` in the worker once it is ready; else here, at once.

    `plot` is a module-level function returning the path it wrote; its arguments are pickled.
    The first call starts the worker, which imports the plotting modules while this process
    goes on (the sweep's first job draws its own figures, while its backbone pass no longer
    needs both cores).
    """
    pool = _ready_pool()
    if pool is None:
        return Drawing(None, plot, args, kwargs)
    try:
        future = pool.submit(plot, *args, **kwargs)
    except BrokenProcessPool:
        _worker_failed("stopped", plot)
        return Drawing(None, plot, args, kwargs)
    return Drawing(future, plot, args, kwargs)


def defers() -> bool:
    """True while a worker draws, or is starting to: a job may leave its figures to `follow` it."""
    return _started and _failures < MAX_FAILURES


@contextlib.contextmanager
def outputs_followed() -> Iterator[bool]:
    """Whether a job's figures may follow it (`defers`); when they may, Ctrl-C and SIGTERM wait
    until the block ends, so the job's folder goes in place with its figures on their way, or
    neither does."""
    if not defers():
        yield False
        return
    with interrupts_deferred():
        yield True


def follow(drawings: Sequence[Drawing], then: Callable[[list[Path]], None], what: str) -> None:
    """`then(paths)` once every one of `drawings` is written: now if they are, else at a later
    `follow` or `collect`. Follow-ups run in the order they were given; `what` names them in a
    warning when one fails."""
    _followers.append((list(drawings), then, what))
    collect(wait=False)


def collect(*, wait: bool) -> None:
    """Run the follow-ups whose figures are written, oldest first, up to the first one still
    being drawn; with `wait`, every one (each figure waited for at most `TIMEOUT_S`, then drawn
    here). One that fails is skipped with a warning: it belongs to a job that has already ended."""
    while _followers:
        drawings, then, what = _followers[0]
        if not wait and not all(drawing.done() for drawing in drawings):
            return
        del _followers[0]
        try:
            then([drawing.path() for drawing in drawings])
        except Exception as exc:  # the plot's or the store's own error
            log.warning("%s did not complete: %s", what, first_line(exc))


def stop() -> None:
    """Collect every figure that follows a job; then draw in this process again, and the idle worker exits."""
    global _started
    collect(wait=True)
    _started = False
    _discard_pool(EXIT_GRACE_S)


def _ready_pool() -> ProcessPoolExecutor | None:
    """The worker, if started and done importing; starts it when there is none."""
    global _pool, _warm_up_done
    if not defers():
        return None
    if _pool is None:
        context = multiprocessing.get_context("spawn")  # it imports __main__: our entry points guard it
        _pool = ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),))
        _warm_up_done = _pool.submit(_warm_up)
        return None
    if _warm_up_done is None or not _warm_up_done.done():
        return None
    if _warm_up_done.exception() is not None:  # it cannot draw: its imports failed, or it died
        _worker_failed(f"did not start ({_warm_up_done.exception()!r})", None)
        return None
    return _pool


def _worker_failed(how: str, plot: Callable[..., Path] | None) -> None:
    global _failures
    _failures += 1
    what = f"drawing {plot.__name__} here" if plot else "drawing here"
    if _failures >= MAX_FAILURES:
        what += "; every figure of this process will be"
    log.warning("the figure worker %s: %s", how, what)
    _discard_pool(0.0)


def _discard_pool(grace: float) -> None:
    """Shut the worker down: it exits within `grace` seconds, or is killed (a hung one would linger)."""
    global _pool, _warm_up_done
    if _pool is not None:
        workers = list((_pool._processes or {}).values())
        _pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.join(grace)
            if worker.is_alive():
                worker.kill()
        _pool, _warm_up_done = None, None


def _failure(exc: BaseException) -> str:
    return "took too long" if isinstance(exc, concurrent.futures.TimeoutError) else "stopped"


def _warm_up() -> None:
    """In the worker: import what every plot function needs."""
    import matplotlib.backends.backend_agg  # noqa: F401  (what `savefig` draws with)

    import transferlab.plots  # noqa: F401


def _init_worker(parent: int) -> None:
    """In the worker: leave stop signals to the sweep, and die with it (Linux: prctl)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(1)
