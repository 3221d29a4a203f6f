"""A quick end for console commands that loaded TensorFlow.

Once a command has done its work and said so, Python's shutdown frees every object of every
module one at a time and runs TensorFlow's C++ destructors: 3-5 s on 2 cores with TensorFlow
loaded, for nothing the user needs. `run_and_exit` runs a console script's main function and
then lets Python shut down as usual up to the last exit handler: non-daemon threads are joined
and every other `atexit` handler runs (MLflow ends its active runs there). Its own handler,
registered first so that it runs last, then flushes the log handlers and the standard streams
and ends the process with the status it was going to have. Without TensorFlow loaded, or when
the main function raised anything but `SystemExit`, the usual shutdown runs unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

_status: list[int] = []  # the status the process ends with, once the main function is done


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """`sys.exit(main())`, ending the process right after the exit handlers when TensorFlow is loaded."""
    atexit.register(_end_process)
    try:
        code = main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            _status.append(exc.code or 0)
        raise
    _status.append(code or 0)
    sys.exit(code)


def _end_process() -> None:
    if not _status or "tensorflow" not in sys.modules:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe: nothing to write to
            stream.flush()
    os._exit(_status[0])
