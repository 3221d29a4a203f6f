"""Constants and small builders the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from transferlab import tracking
from transferlab.config import Config, EvaluateConfig, MlflowConfig, compose, write_params
from transferlab.paths import StagePaths

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

SYNTHETIC_OVERRIDES = (
    "data=synthetic",
    "data.synthetic.num_classes=3",
    "data.synthetic.images_per_class=12",
    "data.synthetic.image_size=64",
    "data.image_size=64",
)
# Adam: plumbing tests count, kill and resume the head's epochs; test_linear_head tests the L-BFGS default.
TINY_MODEL = ("model=small_cnn", "train.batch_size=8", "train.head_solver=adam")
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


def widen_photos(paths: StagePaths) -> None:
    """Make every synthetic photo 96 x 64 (its own 64 px square, then the mirror image of its left
    half), and split again: squares at different places along the long side now differ."""
    import numpy as np
    from PIL import Image

    from transferlab.stages.split import split

    for photo in paths.raw_dataset("synthetic").rglob("*.jpg"):
        square = np.asarray(Image.open(photo).convert("RGB"))
        Image.fromarray(np.concatenate([square, square[:, :32][:, ::-1]], axis=1)).save(photo, quality=95)
    split(tiny_cfg(), paths)


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


def class_folders(root: Path, per_class: int = 4) -> Path:
    """`root/red/` and `root/blue/`, each with `per_class` small PNGs of distinct colours (0.png, ...)."""
    from PIL import Image

    for n, label in enumerate(("red", "blue")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (200 - 150 * n, 20 + 10 * i, 50 + 150 * n)).save(root / label / f"{i}.png")
    return root


def declared_png(width: int, height: int) -> bytes:
    """A valid black PNG of `width` x `height` pixels that stays small on disk (1-bit grey,
    compressed row by row): 16000 x 16000 is 32 KB, and 768 MB once decoded to RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def damaged_jpeg(path: Path) -> Path:
    """A real JPEG (a synthetic class image, 64 px) with a stray marker written into the middle
    of its compressed data: libjpeg complains of it ("Corrupt JPEG data", "Unsupported marker
    type") as it decodes. Written to `path`, which is returned."""
    import numpy as np

    from transferlab.synthetic import CLASSES, JPEG_QUALITY, draw_image

    encoded = io.BytesIO()
    draw_image(CLASSES[0], 64, np.random.default_rng(0)).save(encoded, "JPEG", quality=JPEG_QUALITY)
    data = bytearray(encoded.getvalue())
    middle = len(data) // 2
    data[middle : middle + 4] = b"\xff\x56\xff\x56"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


# --- a project for evaluate: the colour model (conftest's `colour_model`) and 12 test images ---

CLASSES = ["red", "green", "blue"]
# (folder = true class, file name, colour). The colour model predicts the dominant channel, so
# `red/3.png` (mostly green) is predicted green and `blue/3.png` (mostly red) is predicted red;
# in both the true class is the runner-up, so top-2 accuracy is 1.
TEST_IMAGES = [
    *[("red", f"{i}.png", (230, 20, 20)) for i in range(3)],
    ("red", "3.png", (60, 200, 0)),
    *[("green", f"{i}.png", (20, 230, 20)) for i in range(4)],
    *[("blue", f"{i}.png", (20, 20, 230)) for i in range(3)],
    ("blue", "3.png", (200, 0, 90)),
]


def make_project(root: Path, colour_model: Path, cfg: Config, with_run: bool = True) -> StagePaths:
    """Splits, raw images, model and (optionally) a finished training run, as train leaves them."""
    import json

    import pandas as pd
    from PIL import Image

    from transferlab.manifests import split_settings
    from transferlab.paths import StagePaths
    from transferlab.tracking import open_store

    paths = StagePaths(root)
    raw = paths.raw_dataset(cfg.data.name)
    for label, name, rgb in TEST_IMAGES:
        (raw / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), rgb).save(raw / label / name)
    paths.splits.mkdir(parents=True)
    paths.split_report.write_text(json.dumps({"settings": split_settings(cfg.data)}))
    paths.classes.write_text(json.dumps(CLASSES))
    rows = [{"path": f"{label}/{name}", "label": label} for label, name, _ in TEST_IMAGES]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(paths.manifest("test"), index=False)
    paths.models.mkdir(parents=True)
    shutil.copy(colour_model, paths.model_file)
    if with_run:
        with open_store(cfg.mlflow, root).start_run(run_name="colour-training") as run:
            run.log_metrics({"final_val_accuracy": 0.9})
        run.record.write(paths.run_file)
    return paths


def colour_config(synthetic_cfg: Config) -> Config:
    """`synthetic_cfg` for `make_project`: dataset `colours`, experiment `evaluate-tests`."""
    return dataclasses.replace(
        synthetic_cfg,
        data=dataclasses.replace(synthetic_cfg.data, name="colours"),
        evaluate=EvaluateConfig(top_k=2, misclassified=4, calibration_bins=5),
        mlflow=MlflowConfig(experiment="evaluate-tests", system_metrics=False),
    )


# --- `mlflow models serve` on 127.0.0.1 (conftest's `model_server` starts one per session) ---

SERVER_START_TIMEOUT_S = 180
SERVE_MAX_ROWS = 40  # TRANSFERLAB_SERVE_MAX_ROWS of the test server: more than one chunk of 32
SERVE_MAX_BYTES = 2**20  # TRANSFERLAB_SERVE_MAX_BYTES of `transferlab serve`: 1 MiB, ample for 40 small images


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class ModelServer:
    """A running `mlflow models serve` (a process group: the CLI and its uvicorn worker)."""

    base: str
    process: subprocess.Popen
    log_file: Path

    def post(self, payload: dict) -> tuple[int, dict]:
        """POST /invocations; (HTTP status, JSON body)."""
        import json

        return self.post_body(json.dumps(payload).encode())

    def post_body(self, body: bytes | Iterable[bytes]) -> tuple[int, dict]:
        """POST /invocations with a raw JSON `body`: bytes (sent with its Content-Length) or an
        iterable of chunks (sent chunked, its length unknown in advance); (HTTP status, JSON body)."""
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{self.base}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def rss_mb(self) -> float:
        """Resident memory of the server and its workers, in MB."""
        import psutil

        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20

    def wait_until_ready(self) -> None:
        wait_until_answering(self.process, f"{self.base}/ping", self.log_file, "mlflow models serve")

    def stop(self) -> None:
        """SIGTERM to the process group this test started, SIGKILL if it lingers."""
        import signal

        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def serve_model(model_uri: str, tracking_uri: str, log_file: Path, *, transferlab: bool = False) -> ModelServer:
    """Start `mlflow models serve` (or, with `transferlab`, `transferlab serve` with at most
    SERVE_MAX_BYTES per request body) for `model_uri` on a free 127.0.0.1 port and wait for /ping."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the server execs `uvicorn`
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TRANSFERLAB_SERVE_MAX_ROWS": str(SERVE_MAX_ROWS),
        "TRANSFERLAB_SERVE_MAX_BYTES": str(SERVE_MAX_BYTES),
    }
    port = free_port()
    if transferlab:
        command = [str(VENV_BIN / "transferlab"), "serve", model_uri, "--host", "127.0.0.1", "--port", str(port)]
    else:
        command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri]
        command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log_file.open("w") as log:
        process = subprocess.Popen(
            command, cwd=log_file.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ModelServer(f"http://127.0.0.1:{port}", process, log_file)
    try:
        server.wait_until_ready()
    except BaseException:
        server.stop()
        raise
    return server


def released_together(commands: Sequence[Sequence[str]], folder: Path, **popen: object) -> list[subprocess.Popen]:
    """Start one process per command, each given two more arguments: a file to create once it is
    ready, and a file to wait for (at most 60 s) before it acts. Creates that file when all are
    ready (at most 120 s), so they act at the same moment."""
    import time

    go = folder / "go"
    ready = [folder / f"ready-{i}" for i in range(len(commands))]
    procs = [
        subprocess.Popen([*command, str(flag), str(go)], **popen) for command, flag in zip(commands, ready, strict=True)
    ]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    return procs


def wait_until_answering(process: subprocess.Popen, url: str, log_file: Path, what: str) -> None:
    """Poll `url` until it answers 200, for at most SERVER_START_TIMEOUT_S; `RuntimeError` with the
    log's tail if the process exits first or the time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log_file.read_text()[-3000:]
    raise RuntimeError(f"{what}: no answer from {url} within {SERVER_START_TIMEOUT_S} s:\n{tail}")


# --- a `transferlab` or `transferlab-train` process, its output read as it comes ---------------

PROCESS_WAIT_S = 300  # the longest a `Process` may take to reach a moment or to finish


class Process:
    """A `transferlab` or `transferlab-train` process; its output lines are collected as they come."""

    def __init__(
        self, command: Sequence[str], cwd: Path, prefix: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        """`prefix`: what runs the command (`nsenter` into a network namespace); `env`: more environment
        (the project's own MLflow store unless it names `MLFLOW_TRACKING_URI`)."""
        environment = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        environment.pop("MLFLOW_TRACKING_URI", None)
        self.popen = subprocess.Popen(
            [*prefix, str(VENV_BIN / command[0]), *command[1:]],
            cwd=cwd,
            env={**environment, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, moment: str | Callable[[], bool]) -> None:
        """Until a line matches the regex `moment` (or `moment()` is true); fails if the process ends first."""
        deadline = time.monotonic() + PROCESS_WAIT_S
        while time.monotonic() < deadline:
            if isinstance(moment, str):
                if any(re.search(moment, line) for line in list(self.lines)):
                    return
            elif moment():
                return
            if self.popen.poll() is not None:
                self._reader.join(timeout=10)
                if isinstance(moment, str) and any(re.search(moment, line) for line in self.lines):
                    return
                pytest.fail(f"ended ({self.popen.returncode}) before {moment!r}:\n{self.output[-3000:]}")
            time.sleep(0.01)
        pytest.fail(f"{moment!r} did not come within {PROCESS_WAIT_S} s:\n{self.output[-3000:]}")

    def finish(self) -> int:
        self.popen.wait(timeout=PROCESS_WAIT_S)
        self._reader.join(timeout=10)
        return self.popen.returncode

    def kill(self, may_have_ended: bool = False) -> None:
        """`kill -9` to the process (and anything it started).

        `may_have_ended`: the moment is its last line, after which it exits within milliseconds
        (process_exit.py), so the kill may find it ended, successfully.
        """
        os.killpg(self.popen.pid, signal.SIGKILL)
        assert self.finish() in ((-signal.SIGKILL, 0) if may_have_ended else (-signal.SIGKILL,))

    def stop(self, signum: int) -> int:
        """Send `signum` to the process, as Ctrl-C or a scheduler would; its exit status."""
        os.kill(self.popen.pid, signum)
        return self.finish()


# --- what a stopped run left: its checkpoint, its MLflow runs, its folder ----------------------


def epochs_done(state_file: Path) -> int:
    """Epochs a training checkpoint records (0 while there is none)."""
    try:
        return int(json.loads(state_file.read_text())["epochs_done"])
    except (OSError, ValueError, KeyError):
        return 0


def checkpointed_run(state_file: Path) -> str:
    """The MLflow run a training checkpoint belongs to."""
    return json.loads(state_file.read_text())["run_id"]


def running_runs(client: MlflowClient, experiment: str = MlflowConfig().experiment) -> list:
    """The runs of `experiment` that are RUNNING now (none while the experiment does not exist)."""
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")


def job_outputs(paths: StagePaths, client: MlflowClient) -> str | None:
    """The run whose results a run's folder holds, None while it holds none; fails on a mix: the
    history and curves must be the ones that run logged, the evaluation the test metrics it logged."""
    if not paths.models.exists():
        left = [p for p in (paths.history, paths.training_curves, paths.evaluation) if p.exists()]
        assert not left, f"{left} without models/"
        return None
    assert sorted(p.name for p in paths.models.iterdir()) == ["model.keras", "run.json"]
    run_id = tracking.RunRecord.read(paths.run_file).run_id
    logged_files = ((paths.history, "history.csv"), (paths.training_curves, "figures/training_curves.png"))
    with tempfile.TemporaryDirectory() as fetched:
        for on_disk, artifact in logged_files:
            logged = Path(client.download_artifacts(run_id, artifact, fetched)).read_bytes()
            assert on_disk.read_bytes() == logged, f"{on_disk.name} is not run {run_id}'s"
    if paths.evaluation.exists():
        on_disk = {k: v for k, v in json.loads(paths.metrics.read_text()).items() if k.startswith("test_")}
        logged = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("test_")}
        assert on_disk and logged == pytest.approx(on_disk), f"{paths.evaluation} is not run {run_id}'s evaluation"
    return run_id


def mlflow_client(paths: StagePaths) -> MlflowClient:
    """A client of the MLflow store that `tiny_cfg` runs in `paths` log to."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri(tiny_cfg().mlflow, paths.root))


def run_cli(paths: StagePaths, *args: str, **popen: object) -> subprocess.Popen:
    """`transferlab ARGS` in the project `paths`, unbuffered, its output and errors in one pipe."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [str(VENV_BIN / "transferlab"), *args],
        cwd=paths.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def train_killed_after(paths: StagePaths, state_file: Path, epochs: int) -> None:
    """`transferlab train` in the project `paths`, killed (SIGKILL, with its children) once the
    checkpoint state `state_file` records `epochs` finished epochs."""
    proc = run_cli(paths, "train", start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.is_file() and json.loads(state_file.read_text())["epochs_done"] >= epochs:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"


def train_to_the_end(paths: StagePaths) -> str:
    """`transferlab train` in the project `paths`, which must succeed; its output."""
    proc = run_cli(paths, "train")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    return out


def curve_panels(curves_png: Path) -> int:
    """How many panels `reports/training_curves.png` has (each is 5 inches wide)."""
    from PIL import Image

    from transferlab import plots

    with Image.open(curves_png) as image:
        return round(image.width / (5 * plots.DPI))
