"""One process at a time per stage and output folder.

Two `transferlab train` started in the same project write the same `models/` and `checkpoints/`:
one of them used to die half-way with a traceback from a checkpoint the other had moved. A stage
now holds an exclusive `flock` on `<output folder>/.transferlab/<stage>.lock` while it runs, and a
second one stops at once with one line naming the holder. The kernel drops the lock when the
holder ends, however it ends (`kill -9` included), so a stale lock file never blocks anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from transferlab.errors import TransferlabError


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
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BusyError(
                f"{stage} is already running in {folder.parent} ({holder}); two at once would overwrite "
                "each other's files: wait for it to end, or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
