"""Constants and small builders the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

from transferlab.config import Config, compose, write_params
from transferlab.paths import StagePaths

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

SYNTHETIC_OVERRIDES = (
    "data=synthetic",
    "data.synthetic.num_classes=3",
    "data.synthetic.images_per_class=12",
    "data.synthetic.image_size=64",
    "data.image_size=64",
)
TINY_MODEL = ("model=small_cnn", "train.batch_size=8")
# Library internals no user can act on, as they reached the terminal before console.configure():
# absl's preamble and absl/glog lines ("I0000 00:00:1795893590.097380   26424 port.cc:153] oneDNN custom
# operations are on..."), TensorFlow Lite's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
# MLflow's INFO lines ("INFO mlflow.store.db.utils: Creating initial MLflow database tables...") and
# the artifact download bar of every model it logs.
CHATTER_LINE = re.compile(
    r"absl::InitializeLog|^[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\]|^INFO: |oneDNN| INFO mlflow|Downloading artifacts",
    re.M,
)


def chatter(output: str) -> list[str]:
    """The lines of `output` that are TensorFlow or MLflow internals a user should never see."""
    return [line for line in output.splitlines() if CHATTER_LINE.search(line)]


def user_environment(**extra: str) -> dict[str, str]:
    """This process's environment without the quiet-output settings `make` exports (a user runs the
    commands outside make too: they must quiet themselves), plus `extra`."""
    from transferlab.console import QUIET_ENVIRONMENT

    return {**{k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}, **extra}


def tiny_cfg(*overrides: str) -> Config:
    """The synthetic data of `prepared_project`, the small random-init CNN, one epoch, plus `overrides`."""
    return compose([*SYNTHETIC_OVERRIDES, *TINY_MODEL, "train.epochs=1", *overrides], config_dir=REPO_ROOT / "conf")


def quick_job_overrides(experiment: str) -> tuple[str, ...]:
    """A job that takes seconds on the synthetic data: `small_cnn`, one epoch, no model or system
    metrics logged, in the MLflow experiment `experiment` (for tests whose point is where runs go)."""
    return (
        *SYNTHETIC_OVERRIDES,
        *TINY_MODEL,
        "train.epochs=1",
        "mlflow.log_model=false",
        "mlflow.system_metrics=false",
        f"mlflow.experiment={experiment}",
    )


def prepare_project(cfg: Config, root: Path, *, conf: bool = False) -> StagePaths:
    """A project at `root` as `dvc repro split` leaves it: params.yaml of `cfg`, data/raw and
    data/splits; with `conf`, a copy of conf/ too (what `transferlab-train` composes)."""
    from transferlab.stages.download import download
    from transferlab.stages.split import split

    paths = StagePaths(root)
    root.mkdir(parents=True, exist_ok=True)
    write_params(cfg, root / "params.yaml")
    download(cfg, paths)
    split(cfg, paths)
    if conf:
        shutil.copytree(REPO_ROOT / "conf", root / "conf")
    return paths


def declared_outputs(root: Path) -> dict[str, list[Path]]:
    """Per stage of `root/dvc.yaml`, the paths it declares as `outs` or `metrics`."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {
        name: [
            root / (next(iter(out)) if isinstance(out, dict) else out)
            for out in [*spec.get("outs", []), *spec.get("metrics", [])]
        ]
        for name, spec in stages.items()
    }


def undeclared_files(root: Path, before: set[Path]) -> list[Path]:
    """Files under `root` that are new since `before` and neither a declared stage output nor a cache.

    Ignored: git and DVC internals, the MLflow store, `dvc.lock`.
    """
    from transferlab.paths import StagePaths

    allowed = [path for outs in declared_outputs(root).values() for path in outs] + StagePaths(root).caches
    internal = [root / ".git", root / ".dvc", root / "mlruns", root / "dvc.lock"]
    new = [p for p in root.rglob("*") if p.is_file() and p not in before]
    return sorted(p for p in new if not any(p == a or a in p.parents for a in [*allowed, *internal]))


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1100",
)


def unavailable(reason: str) -> NoReturn:
    """A test's system requirement is missing: skip it, saying what is missing, or fail it in CI
    (`.ci/run` installs the system packages the tests use and sets TRANSFERLAB_CI)."""
    if os.environ.get("TRANSFERLAB_CI"):
        pytest.fail(f"{reason} (in CI: .ci/run should have installed it)")
    pytest.skip(reason)


def offline_dom(page: Path | str, budget_ms: int = 10_000, screenshot: Path | None = None) -> str:
    """The DOM of a page after headless Chromium ran its scripts, with no way to the internet.

    `page` is a local HTML file (Chromium then runs in its own network namespace with only
    loopback up: `unshare --net`, as root) or a URL on 127.0.0.1 (every other host name is
    unresolvable). With `screenshot`, a PNG of the page is saved there too. Skips the test,
    saying why, when Chromium or network namespaces are not available, and fails it in CI
    (`.ci/run` installs Debian's `chromium` and sets TRANSFERLAB_CI).
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        unavailable("chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    if isinstance(page, Path):
        if subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False).returncode != 0:
            unavailable("cannot create a network namespace (`unshare --net` needs root)")
        url, isolation = (
            page.resolve().as_uri(),
            ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"],
        )
    else:
        isolation, url = [], page
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [*isolation, chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        command += ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]  # nothing leaves this machine
        command += [f"--virtual-time-budget={budget_ms}"]  # without it, --dump-dom may not wait for scripts
        done = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and done.stdout, f"chromium could not render {url}:\n{done.stderr[-3000:]}"
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = subprocess.run([*command, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
            assert shot.returncode == 0, shot.stderr[-3000:]
    return done.stdout
