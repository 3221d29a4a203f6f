"""The figure worker of a sweep: figures drawn in another process, the same as here, and a
worker that fails, dies or outlives nothing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from transferlab import figure_workers, plots

WAIT_S = 60.0


def pid_file(path: Path) -> Path:
    """A 'figure' that records which process drew it."""
    path.write_text(str(os.getpid()))
    return path


def slow_pid_file(path: Path) -> Path:
    time.sleep(1.0)
    return pid_file(path)


def failing_plot(path: Path) -> Path:
    raise ValueError(f"cannot draw {path.name}")


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[int]:
    """A started figure worker, done importing, and its process id. Figures are drawn here
    until it is ready."""
    figure_workers.start()
    deadline = time.monotonic() + WAIT_S
    while (pid := drawn_by(figure_workers.draw(pid_file, tmp_path / "probe"))) == os.getpid():
        assert time.monotonic() < deadline, "the figure worker did not start"
        time.sleep(0.1)
    yield pid
    figure_workers.stop()


def drawn_by(drawing: figure_workers.Drawing) -> int:
    return int(drawing.path().read_text())


def test_without_a_sweep_figures_are_drawn_here(tmp_path: Path) -> None:
    assert drawn_by(figure_workers.draw(pid_file, tmp_path / "a.png")) == os.getpid()


def test_a_started_worker_draws_in_another_process(worker: int, tmp_path: Path) -> None:
    assert drawn_by(figure_workers.draw(pid_file, tmp_path / "a.png")) == worker != os.getpid()


def test_the_first_figure_is_drawn_here_while_the_worker_starts(tmp_path: Path) -> None:
    figure_workers.start()
    try:
        assert drawn_by(figure_workers.draw(pid_file, tmp_path / "first.png")) == os.getpid()
    finally:
        figure_workers.stop()


def test_a_figure_from_the_worker_is_the_same_png(worker: int, tmp_path: Path) -> None:
    confusion = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    classes = ["daisy", "roses", "tulips"]
    there = figure_workers.draw(plots.plot_confusion_matrix, confusion, classes, tmp_path / "there.png")
    here = plots.plot_confusion_matrix(confusion, classes, tmp_path / "here.png")
    assert there.path().read_bytes() == here.read_bytes()


def test_without_a_worker_a_follow_up_runs_at_once(tmp_path: Path) -> None:
    assert not figure_workers.defers()
    done: list[list[Path]] = []
    figure_workers.follow([figure_workers.draw(pid_file, tmp_path / "a.png")], done.append, "job a")
    assert done == [[tmp_path / "a.png"]]


def test_follow_ups_run_once_their_figures_are_written_and_in_order(worker: int, tmp_path: Path) -> None:
    """A job's follow-up (log its figures, then its test metrics) waits for its figures, and the
    next job's waits behind it even when its own are written: MLflow gets them in job order."""
    assert figure_workers.defers()
    done: list[str] = []
    slow = figure_workers.draw(slow_pid_file, tmp_path / "slow.png")
    figure_workers.follow([slow], lambda paths: done.append(f"job 0: {paths[0].read_text()}"), "job 0")
    quick = figure_workers.draw(pid_file, tmp_path / "quick.png")
    figure_workers.follow([quick], lambda paths: done.append(f"job 1: {paths[0].read_text()}"), "job 1")
    assert done == [], "the first figure takes a second"
    figure_workers.collect(wait=False)
    assert done == []
    figure_workers.collect(wait=True)
    assert done == [f"job 0: {worker}", f"job 1: {worker}"]


def test_a_follow_up_that_fails_warns_and_the_next_one_runs(
    worker: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="transferlab.figure_workers")
    done: list[Path] = []
    figure_workers.follow(
        [figure_workers.draw(failing_plot, tmp_path / "x.png")], done.extend, "the evaluation of run 1"
    )
    figure_workers.follow([figure_workers.draw(pid_file, tmp_path / "a.png")], done.extend, "the evaluation of run 2")
    figure_workers.collect(wait=True)
    assert "the evaluation of run 1 did not complete: cannot draw x.png" in caplog.text
    assert done == [tmp_path / "a.png"]


def test_stopping_the_sweep_runs_every_follow_up_first(tmp_path: Path) -> None:
    figure_workers.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while drawn_by(figure_workers.draw(pid_file, tmp_path / "probe")) == os.getpid():
            assert time.monotonic() < deadline, "the figure worker did not start"
            time.sleep(0.1)
        done: list[Path] = []
        figure_workers.follow([figure_workers.draw(slow_pid_file, tmp_path / "slow.png")], done.extend, "job 0")
        assert done == []
    finally:
        figure_workers.stop()
    assert done == [tmp_path / "slow.png"] and not figure_workers.defers()


def test_a_failing_job_waits_for_its_figures_before_its_folder_goes(worker: int, tmp_path: Path) -> None:
    drawing = figure_workers.draw(slow_pid_file, tmp_path / "slow.png")
    with pytest.raises(RuntimeError, match="the job failed"), figure_workers.settled(drawing):
        raise RuntimeError("the job failed")
    assert (tmp_path / "slow.png").read_text() == str(worker), "written before the block was left"


def test_an_error_in_the_worker_is_raised_here(worker: int, tmp_path: Path) -> None:
    drawing = figure_workers.draw(failing_plot, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"cannot draw x\.png"):
        drawing.path()


def test_a_killed_worker_costs_only_time(worker: int, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.kill(worker, signal.SIGKILL)
    caplog.set_level(logging.WARNING, logger="transferlab.figure_workers")
    drawing = figure_workers.draw(pid_file, tmp_path / "a.png")
    assert drawn_by(drawing) == os.getpid()
    assert "the figure worker stopped: drawing pid_file here" in caplog.text
    deadline = time.monotonic() + WAIT_S  # the next figure gets a new worker
    while drawn_by(figure_workers.draw(pid_file, tmp_path / "b.png")) == os.getpid():
        assert time.monotonic() < deadline, "no new figure worker"
        time.sleep(0.1)


def test_after_repeated_failures_every_figure_is_drawn_here(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="transferlab.figure_workers")
    figure_workers.start()
    try:
        for failure in range(figure_workers.MAX_FAILURES):
            deadline = time.monotonic() + WAIT_S
            while (pid := drawn_by(figure_workers.draw(pid_file, tmp_path / "probe"))) == os.getpid():
                assert time.monotonic() < deadline, f"no figure worker after {failure} failures"
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            assert drawn_by(figure_workers.draw(pid_file, tmp_path / "a.png")) == os.getpid()
        assert "every figure of this process will be" in caplog.text
        for _ in range(20):
            assert drawn_by(figure_workers.draw(pid_file, tmp_path / "b.png")) == os.getpid()
            time.sleep(0.1)
    finally:
        figure_workers.stop()


def test_the_worker_ignores_stop_signals_which_the_sweep_handles(worker: int, tmp_path: Path) -> None:
    os.kill(worker, signal.SIGINT)
    os.kill(worker, signal.SIGTERM)
    assert drawn_by(figure_workers.draw(pid_file, tmp_path / "a.png")) == worker


def test_the_worker_dies_with_the_sweep(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from transferlab import figure_workers
        from test_figure_workers import pid_file
        figure_workers.start()
        while True:
            pid = int(figure_workers.draw(pid_file, Path({str(tmp_path)!r}) / "p").path().read_text())
            if pid != os.getpid():
                break
            time.sleep(0.1)
        print(pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pid = int(done.stdout)
    deadline = time.monotonic() + WAIT_S
    while _alive(pid):
        assert time.monotonic() < deadline, f"figure worker {pid} outlived the killed sweep"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with Path(f"/proc/{pid}/stat").open() as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False
