"""One process at a time per stage and output folder; one computation at a time per cache entry.

- `stage_lock`: two `transferlab train` started in the same project write the same `models/` and
  `checkpoints/`: one of them used to die half-way with a traceback from a checkpoint the other
  had moved. A stage now holds an exclusive `flock` on `<output folder>/.transferlab/<stage>.lock`
  while it runs, and a second one stops at once with one line naming the holder.
- `computing_alone`: the processes of a parallel sweep (`hydra/launcher=joblib`, Ray on one
  machine) or runs started together want the same cache entries (backbone features, a TFLite
  copy) at the same moment, and each used to compute them. The first now computes while the
  others wait for it, then read what it stored.

The kernel drops a lock when its holder ends, however it ends (`kill -9` included), so a stale
lock file never blocks anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from transferlab.errors import TransferlabError

log = logging.getLogger(__name__)

# Longest wait for another process computing the same cache entry, in seconds; past it, this
# process computes the entry too (a duplicate, never a failure). A feature pass over 100,000
# photos on a few cores takes well under an hour.
COMPUTE_WAIT_S = 3600.0
# How often a waiting process tries the lock again.
POLL_S = 0.1
# The folder of a cache's lock files, inside the cache.
LOCKS_DIR = ".locks"


class BusyError(TransferlabError):
    """Another process is running the same stage on the same output folder."""


@contextlib.contextmanager
def stage_lock(folder: Path, stage: str) -> Iterator[None]:
    """Hold `folder/<stage>.lock` while the block runs; `BusyError` if another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}.lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(
                f"{stage} is already running in {folder.parent} ({_holder(handle)}); two at once would overwrite "
                "each other's files: wait for it to end, or stop it"
            ) from None
        _name_holder(handle)
        yield


@contextlib.contextmanager
def computing_alone(path: Path, what: str, timeout_s: float = COMPUTE_WAIT_S) -> Iterator[bool]:
    """Hold the lock file `path` while this process computes `what`, which other processes may want too.

    When another process holds it, wait (at most `timeout_s`, saying once who is computing) until
    it is released. Yields whether this process waited: if so, the entry may be stored by now, and
    the caller looks for it again before computing. Without a lock (a file system without `flock`,
    or a wait that ran out) the block runs anyway: the caller computes, as it would alone.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as exc:
        log.debug("no lock for %s (%s): computing without one", what, exc)
        yield False
        return
    with handle:
        waited = _lock_when_free(handle, what, timeout_s)
        yield waited


def _lock_when_free(handle: IO[str], what: str, timeout_s: float) -> bool:
    """Take the exclusive lock on `handle`, waiting at most `timeout_s` for another holder; whether it waited."""
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _name_holder(handle)
            return waited
        except BlockingIOError:
            pass
        except OSError as exc:  # ENOLCK and the like: a file system that does not lock
            log.debug("no lock for %s (%s): computing without one", what, exc)
            return waited
        if time.monotonic() >= deadline:
            log.warning("waited %g s for another process computing %s: computing it here too", timeout_s, what)
            return True
        if not waited:
            log.info("waiting for %s, which is computing %s", _holder(handle), what)
            waited = True
        time.sleep(POLL_S)


def _holder(handle: IO[str]) -> str:
    """Who holds the lock, as its holder wrote it ("pid N on HOST")."""
    handle.seek(0)
    return handle.read().strip() or "another process"


def _name_holder(handle: IO[str]) -> None:
    """Write who holds the lock into its file, for the message of whoever finds it held."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
