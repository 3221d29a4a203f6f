"""app.py: every `transferlab-train` run or sweep gets an output folder of its own; a misspelt
key or option stops it with one line before anything is made.

Two runs started in the same second used to share `outputs/runs/<time>/` (models, reports,
checkpoints) and log each other's test metrics (issue 12). The end-to-end case (two real
trainings at once) is in test_faults.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import VENV_BIN, released_together

from transferlab.app import RUNS_DIR, SWEEPS_DIR, remove_if_unused, reserve_output_dir, with_output_dir


def test_the_same_second_gives_different_folders(tmp_path: Path) -> None:
    first = reserve_output_dir(tmp_path, "2026-11-28_12-00-00")
    second = reserve_output_dir(tmp_path, "2026-11-28_12-00-00")
    assert (first.name, second.name) == ("2026-11-28_12-00-00", "2026-11-28_12-00-00_1")
    assert first.is_dir() and second.is_dir()


RESERVE_SCRIPT = """
import sys, time
from pathlib import Path
from transferlab.app import reserve_output_dir
Path(sys.argv[2]).touch()  # imported: ready
go = Path(sys.argv[3])
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.001)
print(reserve_output_dir(Path(sys.argv[1]), "2026-11-28_12-00-00").name)
"""


def test_processes_reserving_at_the_same_moment_never_share_a_folder(tmp_path: Path) -> None:
    command = [sys.executable, "-c", RESERVE_SCRIPT, str(tmp_path / "runs")]
    procs = released_together([command] * 6, tmp_path, stdout=subprocess.PIPE, text=True)
    names = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert len(set(names)) == 6, names
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(names)


def test_output_dir_is_added_unless_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    single, folder = with_output_dir(["model.dropout=0.3"])
    assert single == ["model.dropout=0.3", f"hydra.run.dir={folder}"]
    assert folder is not None and folder.parent == RUNS_DIR and folder.is_dir()
    sweep, folder = with_output_dir(["-m", "train.learning_rate=0.1,0.01"])
    assert sweep[-1] == f"hydra.sweep.dir={folder}" and folder is not None and folder.parent == SWEEPS_DIR
    for given in (["hydra.run.dir=mine"], ["-m", "hydra.sweep.dir=mine"], ["--cfg", "job"], ["--help"]):
        assert with_output_dir(given) == (given, None)


def _started_run(folder: Path, **files: str) -> Path:
    """A run folder as Hydra leaves it when the job starts (`.hydra/`, an empty app.log), plus `files`."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("train: {}\n")
    (folder / "app.log").touch()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("files", "removed"),
    [
        ({}, True),
        ({"error.txt": "Traceback ...\nConfigError: ...\n"}, True),
        ({"app.log": "epoch 1/100\n"}, False),
        ({"model.keras": "", "error.txt": "Traceback ...\n"}, False),
    ],
    ids=["nothing-done", "failed-at-once", "log-written", "results"],
)
def test_only_a_folder_without_results_is_removed(tmp_path: Path, files: dict[str, str], removed: bool) -> None:
    folder = _started_run(tmp_path / "run", **files)
    remove_if_unused(folder)
    assert folder.exists() is not removed
    assert tmp_path.is_dir()


# hydra/launcher options: Hydra's `basic`, the plugins' (`joblib`; `ray` and `ray_aws` with the ray
# extra) and conf/hydra/launcher/ (`ray`).
RAY_PLUGIN = importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None
LAUNCHERS = "basic, joblib, ray, ray_aws" if RAY_PLUGIN else "basic, joblib, ray"
MISSPELT_KEY_LINE = (
    "ConfigError: unknown key model.dropuot (known: alpha, backbone, dropout, feature_power, head_batchnorm, "
    "test_time_crops, test_time_flip, weights)"
)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["model.dropuot=0.3"],
            MISSPELT_KEY_LINE,
        ),
        (
            ["-m", "model.dropuot=0.3,0.4"],
            MISSPELT_KEY_LINE,
        ),
        (
            ["-m", "data=synthetic,sinthetic"],
            "ConfigError: data=sinthetic: no such option (available: flowers, folder, synthetic)",
        ),
        (
            ["-m", "train.epochs=2", "model.dropout=0.2,0.3", "hydra/launcher=joblibb"],
            f"ConfigError: hydra/launcher=joblibb: no such option (available: {LAUNCHERS})",
        ),
        (
            ["-m", "hydra/sweeper=optuan"],
            "ConfigError: hydra/sweeper=optuan: no such option (available: basic, optuna)",
        ),
    ],
)
def test_a_misspelt_key_or_option_is_one_line_and_nothing_is_made(tmp_path: Path, args: list[str], line: str) -> None:
    """Hydra printed six lines (or fifteen) and exited 1; a sweep also left a FAILED parent run."""
    done = subprocess.run(
        [str(VENV_BIN / "transferlab-train"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, line, "")
    assert list(tmp_path.iterdir()) == []  # no output folder, no MLflow store


def test_a_run_that_fails_before_any_work_leaves_no_folder(tmp_path: Path) -> None:
    """The value is checked once composed, in the job: its folder held only Hydra's `.hydra/` and an empty app.log."""
    done = subprocess.run(
        [str(VENV_BIN / "transferlab-train"), "train.learning_rate=-0.01"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = "ConfigError: train.learning_rate must be in (0, 10], got -0.01"
    assert (done.returncode, done.stderr.strip()) == (2, line)
    assert list(tmp_path.iterdir()) == [], "nor an empty outputs/runs/"


HYDRA_FAILS_SCRIPT = """
import signal, sys
from transferlab import app, errors
if sys.argv[1] == "stopped":
    errors._received.append(signal.SIGTERM)  # the handler ran while Hydra composed the job's config
sys.argv = ["transferlab-train", "hydra.job.chdir=maybe", "data=synthetic"]  # Hydra's own config rejects it
app.main()
"""


@pytest.mark.parametrize(("moment", "status"), [("stopped", 143), ("running", 1)])
def test_an_error_hydra_reports_after_a_stop_signal_exits_as_the_stop(tmp_path: Path, moment: str, status: int) -> None:
    """CI: SIGTERM while Hydra composed a sweep job's config came out of OmegaConf as an
    AttributeError; Hydra printed it and exited 1, where a stopped sweep exits 143."""
    done = subprocess.run(
        [sys.executable, "-c", HYDRA_FAILS_SCRIPT, moment], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == status, done.stderr[-2000:]
    assert ("interrupted (SIGTERM received)" in done.stderr) == (moment == "stopped"), done.stderr[-2000:]
