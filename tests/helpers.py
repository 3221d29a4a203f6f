"""Constants and small builders the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from transferlab.config import Config, compose

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


def tiny_cfg(*overrides: str) -> Config:
    """The synthetic data of `prepared_project`, the small random-init CNN, one epoch, plus `overrides`."""
    return compose([*SYNTHETIC_OVERRIDES, *TINY_MODEL, "train.epochs=1", *overrides], config_dir=REPO_ROOT / "conf")


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


def offline_dom(page: Path, budget_ms: int = 10_000) -> str:
    """The DOM of the local HTML file `page` after headless Chromium rendered it with no network.

    Chromium runs in its own network namespace with only loopback up (`unshare --net`, as root),
    so nothing it tries to fetch from the internet can arrive. Skips the test, saying why, when
    Chromium or network namespaces are not available (`.ci/run` installs Debian's `chromium`).
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace (`unshare --net` needs root)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",  # without it, --dump-dom may not wait for scripts
            "--dump-dom",
            page.resolve().as_uri(),
        ]
        script = 'ip link set lo up && exec "$@"'
        done = subprocess.run(
            ["unshare", "--net", "sh", "-c", script, "sh", chromium, *flags],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
