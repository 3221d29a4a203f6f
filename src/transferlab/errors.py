"""Errors that reach the user as one clear line instead of a traceback."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
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


# Exit statuses of the command-line entry points.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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
    """`ClassName: first line`, as shown on the console and in the `transferlab.error` tag."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def run_reporting_errors(task: Callable[[], int]) -> int:
    """Run a command: a `TransferlabError` prints one line and exits 2, Ctrl-C exits 130.

    The one failure wrapper of every entry point (`transferlab ...` and single `transferlab-train` runs).
    """
    try:
        return int(task())
    except TransferlabError as exc:
        print(describe(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


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
