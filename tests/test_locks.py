"""One process at a time per stage and output folder, one at a time per cache entry (locks.py).

Two `transferlab train` started in the same project used to share `models/` and `checkpoints/`;
one died half-way with a traceback (FileNotFoundError on a checkpoint the other had moved). Two
processes wanting the same cache entry used to both compute it; see also test_feature_cache.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Process, prepare_project, tiny_cfg

from transferlab.config import write_params
from transferlab.locks import BusyError, computing_alone, stage_lock

# A process that computes "the features" under the lock for argv[2] seconds, then stores them (argv[3]).
HOLDER = """
import sys, time
from pathlib import Path
from transferlab.locks import computing_alone
with computing_alone(Path(sys.argv[1]), "the features") as waited:
    assert not waited
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    Path(sys.argv[3]).write_text("stored")
"""


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
    first = Process(["transferlab", "train"], paths.root)
    first.wait_for(r"epoch 1/3")  # it holds the lock and is writing checkpoints
    os.kill(first.popen.pid, signal.SIGSTOP)  # paused, so it surely still runs while the second starts
    try:
        second = Process(["transferlab", "train"], paths.root)
        assert second.finish() == 2, second.output
    finally:
        os.kill(first.popen.pid, signal.SIGCONT)
    assert second.output.strip() == (
        f"BusyError: train is already running in {paths.root} (pid {first.popen.pid} on {os.uname().nodename}); "
        "two at once would overwrite each other's files: wait for it to end, or stop it"
    )
    assert first.finish() == 0, first.output
    assert paths.model_file.exists() and "model (epoch 3) saved" in first.output


def test_a_process_wanting_an_entry_being_computed_waits_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It says who is computing, and goes on once the holder is done (the caller then finds the entry stored)."""
    lock, stored = tmp_path / "cache" / ".locks" / "entry.lock", tmp_path / "stored"
    holder = Process(["python", "-c", HOLDER, str(lock), "1.5", str(stored)], tmp_path)
    holder.wait_for("held")
    caplog.set_level(logging.INFO, logger="transferlab.locks")
    with computing_alone(lock, "the features") as waited:
        assert waited and stored.read_text() == "stored", "went on before the holder was done"
    waiting = f"waiting for pid {holder.popen.pid} on {os.uname().nodename}, which is computing the features"
    assert waiting in caplog.text
    assert holder.finish() == 0, holder.output


def test_a_wait_that_runs_out_computes_here_too_and_a_killed_holder_blocks_no_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = tmp_path / "cache" / ".locks" / "entry.lock"
    holder = Process(["python", "-c", HOLDER, str(lock), "600", str(tmp_path / "never")], tmp_path)
    holder.wait_for("held")
    try:
        with computing_alone(lock, "the features", timeout_s=0.5) as waited:
            assert waited
        assert "waited 0.5 s for another process computing the features: computing it here too" in caplog.text
    finally:
        holder.kill()
    with computing_alone(lock, "the features", timeout_s=0.5) as waited:  # the kernel dropped the lock
        assert not waited
