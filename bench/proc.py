"""Run one measured phase as a fresh child process: wall time, peak RSS, exit status, log.

Peak resident memory comes from `os.wait4`, which reports the `ru_maxrss` of exactly that
child (and any processes it waited for), so every phase's figure is its own, not the
benchmark driver's.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench")

PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 1800


class PhaseError(RuntimeError):
    """A child process exited non-zero; the message names its log file."""


@dataclass(frozen=True)
class ProcessRun:
    """What the driver saw of one child process."""

    started: float  # time.time() just before the child was started
    ended: float
    peak_rss_mib: float
    log_file: Path
    load_before: float  # 1-minute load average when the child started and when it ended
    load_after: float

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


def child_env() -> dict[str, str]:
    """The driver's environment, with this venv first, quiet TensorFlow, and no remote MLflow.

    MLFLOW_TRACKING_URI is dropped so benchmark runs land in the scratch project's own
    SQLite store, never on a team server.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def run(command: Sequence[str], log_file: Path, cwd: Path) -> ProcessRun:
    """Run `command` to completion; stdout and stderr go to `log_file`. Raises PhaseError."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with log_file.open("w") as sink:
        started = time.time()
        child = subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=sink, stderr=subprocess.STDOUT)
        status, usage = _wait(child)
        ended = time.time()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise PhaseError(f"{' '.join(command[:3])} ... exited with {code}; see {log_file}")
    # Linux reports ru_maxrss in KiB.
    return ProcessRun(started, ended, usage.ru_maxrss / 1024, log_file, load_before, os.getloadavg()[0])


def _wait(child: subprocess.Popen) -> tuple[int, os.struct_rusage]:
    """Block in wait4 (exact end time); a timer kills a child that hangs past TIMEOUT_S."""
    killer = threading.Timer(TIMEOUT_S, child.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(child.pid, 0)
    finally:
        killer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)
    return status, usage


def python(script: str, *args: str) -> list[str]:
    """`python bench/<script> args...` with this interpreter."""
    return [PYTHON, str(Path(__file__).resolve().parent / script), *args]


def console_script(name: str, *args: str) -> list[str]:
    """One of this venv's console scripts (`transferlab`, `transferlab-train`)."""
    return [str(VENV_BIN / name), *args]
