"""One process at a time per stage and output folder (locks.py).

Two `transferlab train` started in the same project used to share `models/` and `checkpoints/`;
one died half-way with a traceback (FileNotFoundError on a checkpoint the other had moved).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import VENV_BIN, prepare_project, tiny_cfg

from transferlab.config import write_params
from transferlab.locks import BusyError, stage_lock

WAIT_S = 300  # the longest the first training below may take to start or to finish


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with stage_lock(tmp_path / "locks", "train"):
        refused = rf"^train is already running in {tmp_path} \(pid {os.getpid()} on "
        with pytest.raises(BusyError, match=refused), stage_lock(tmp_path / "locks", "train"):
            pass
        with stage_lock(tmp_path / "locks", "evaluate"):  # another stage: its own lock
            pass
    with stage_lock(tmp_path / "locks", "train"):  # released on leaving the block
        pass


def test_a_killed_holder_leaves_no_lock_behind(tmp_path: Path) -> None:
    """`kill -9` cannot run any clean-up: the kernel drops the lock with the process."""
    folder = tmp_path / "locks"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from transferlab.locks import stage_lock\n"
            f"with stage_lock(Path({str(folder)!r}), 'train'):\n"
            "    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=rf"pid {holder.pid} on "), stage_lock(folder, "train"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (folder / "train.lock").exists()
    with stage_lock(folder, "train"):
        pass


def test_two_trainings_in_one_project_the_second_stops_with_one_line(tmp_path: Path) -> None:
    """The second `transferlab train` ends at once (status 2, one line); the first finishes untouched."""
    cfg = tiny_cfg("train.epochs=3", "mlflow.log_model=false", "mlflow.system_metrics=false")
    paths = prepare_project(cfg, tmp_path / "project")
    write_params(cfg, paths.root / "params.yaml")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(VENV_BIN / "transferlab"), "train"]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(command, cwd=paths.root, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + WAIT_S
            while "epoch 1/3" not in log.read_text():  # it holds the lock and is writing checkpoints
                assert first.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the first training did not reach epoch 1"
                time.sleep(0.05)
            first.send_signal(signal.SIGSTOP)  # paused, so it surely still runs while the second starts
            try:
                second = subprocess.run(
                    command, cwd=paths.root, env=env, capture_output=True, text=True, timeout=WAIT_S
                )
            finally:
                first.send_signal(signal.SIGCONT)
        finally:
            status = first.wait(timeout=WAIT_S)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (
        f"BusyError: train is already running in {paths.root} (pid {first.pid} on {os.uname().nodename}); "
        "two at once would overwrite each other's files: wait for it to end, or stop it"
    )
    assert status == 0, log.read_text()
    assert paths.model_file.exists() and "model (epoch 3) saved" in log.read_text()
