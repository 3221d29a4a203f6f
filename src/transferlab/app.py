"""`transferlab-train`: the Hydra app. Composes `conf/`, trains and evaluates, logs to MLflow.

    transferlab-train model.dropout=0.3                       # one run
    transferlab-train -m model.feature_power=0.5,1.0          # a sweep: parent + child runs
    transferlab-train -m hparams_search=optuna                # Optuna TPE over the same knobs

Jobs read the splits prepared by `dvc repro split` and write models and reports into their
Hydra output folder, so sweep jobs never overwrite each other or the DVC outputs. Each run (or
sweep) gets a folder of its own, created here before Hydra starts (see `reserve_output_dir`).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from transferlab import console
from transferlab.config import CONFIG_NAME, check_overrides, conf_dir
from transferlab.errors import received_stop, report_interrupt, run_reporting_errors
from transferlab.process_exit import run_and_exit

if TYPE_CHECKING:
    from omegaconf import DictConfig

RUNS_DIR = Path("outputs/runs")
SWEEPS_DIR = Path("outputs/sweeps")
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
HYDRA_SUBDIR = ".hydra"  # hydra.output_subdir: the job's composed config, written as it starts
HYDRA_ERROR_EXIT = 1  # what Hydra exits with after printing an error raised in its own code or a job
# Hydra options that print something and run no job: they need no output folder.
_NO_JOB_FLAGS = frozenset(
    {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
)


def _task(node: DictConfig) -> float:
    from transferlab.sweep import run_job

    return run_job(node)


def reserve_output_dir(parent: Path, stamp: str) -> Path:
    """Create `parent/<stamp>` (or `<stamp>_1`, `<stamp>_2`, ...) and return it.

    `mkdir` without `exist_ok` either creates the folder or fails, atomically, so two processes
    started in the same second can never get the same folder: the second one takes the next name.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for count in range(100_000):
        folder = parent / (stamp if count == 0 else f"{stamp}_{count}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"no free output folder for {stamp} in {parent}")


def with_output_dir(argv: Sequence[str]) -> tuple[list[str], Path | None]:
    """`argv` plus `hydra.run.dir=` (or `hydra.sweep.dir=` with `-m`) naming a folder reserved
    for this process, and that folder; `argv` and None when the command line already names one
    or runs no job (`--cfg job`)."""
    args = list(argv)
    if any(arg.split("=", 1)[0] in _NO_JOB_FLAGS for arg in args):
        return args, None
    multirun = bool({"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(args))
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(re.match(rf"^\+{{0,2}}{re.escape(key)}=", arg) for arg in args):
        return args, None
    folder = reserve_output_dir(SWEEPS_DIR if multirun else RUNS_DIR, time.strftime(STAMP_FORMAT))
    return [*args, f"{key}={folder}"], folder


def remove_if_unused(folder: Path) -> None:
    """Remove `folder` when it holds only what Hydra writes as a job starts (`.hydra/`, empty log
    files) and the traceback of the failure (`error.txt`, whose line was printed), as after a run
    that failed before doing any work."""
    from transferlab.sweep import ERROR_FILE

    for entry in folder.iterdir():
        started = entry.name == HYDRA_SUBDIR and entry.is_dir()
        empty_log = entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0
        if not (started or empty_log or entry.name == ERROR_FILE):
            return
    shutil.rmtree(folder)
    for parent in (folder.parent, folder.parent.parent):
        if parent in (RUNS_DIR, SWEEPS_DIR, RUNS_DIR.parent):  # outputs/runs/, outputs/: when now empty
            with contextlib.suppress(OSError):
                parent.rmdir()


def run() -> None:
    """The `transferlab-train` console script: `main`, then a quick exit (see process_exit)."""
    run_and_exit(main)


def main() -> None:
    """Compose the config from `conf/` and the command line, run the job or the sweep."""
    console.configure()
    # conf/hydra/launcher/ray.yaml has the plugin's schema name on purpose (it sets the plugin's
    # options); Hydra's deprecation notice about such name matches is noise there.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/ray' is validated against ConfigStore schema")
    # A misspelt key or option: one line, before any folder or run exists (Hydra's own message
    # runs to several lines and does not say what is known).
    status = run_reporting_errors(lambda: check_overrides(sys.argv[1:]) or 0)
    if status:
        sys.exit(status)
    sys.argv[1:], folder = with_output_dir(sys.argv[1:])
    try:
        _run_hydra()
    except SystemExit as exc:
        if exc.code and folder is not None:  # a run that failed at once leaves no empty folder behind
            remove_if_unused(folder)
        raise


def _run_hydra() -> NoReturn:
    """Let Hydra run the job or the sweep that `sys.argv` asks for, then exit."""
    import hydra

    try:
        hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")(_task)()
    except KeyboardInterrupt as exc:  # a sweep stopped (single runs report and exit in run_job)
        _stopped(exc)
    except SystemExit as exc:
        stop = received_stop()
        # Hydra prints an error raised in its own code and exits 1: a stop signal that landed while
        # it composed a job's config can come out of OmegaConf as an AttributeError. The stop wins.
        if exc.code == HYDRA_ERROR_EXIT and stop is not None:
            _stopped(stop)
        raise
    from transferlab.sweep import sweep_exit_status  # imported already, by Hydra's callback

    sys.exit(sweep_exit_status())  # non-zero after a sweep in which no job finished


def _stopped(stop: KeyboardInterrupt) -> NoReturn:
    """Say that the sweep stopped and exit 130 / 143. A Ray sweep leaves its cluster first: its
    jobs end there, and no line of theirs comes after this one."""
    from transferlab.ray_launcher import leave_cluster

    leave_cluster()
    sys.exit(report_interrupt(stop))


if __name__ == "__main__":
    run()
