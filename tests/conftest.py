"""Shared fixtures: a tiny synthetic dataset, a prepared project, a copy of the repo for DVC.

- `synthetic_cfg`: validated Config for `data=synthetic`, 3 classes x 12 images of 64 px.
- `synthetic_raw`: that dataset generated (real JPEGs) into `data/raw/` of a temporary project.
- `prepared_project`: a temporary project with params.yaml, data/raw/<name>/ and data/splits/
  made by the real download and split stages; returns its `StagePaths`.
- `hydra_project`: `prepared_project`'s data plus conf/, once per module, for `transferlab-train`.
- `project_copy`: the repo's files (tracked plus untracked-not-ignored) in a fresh git repo,
  with one commit, so `dvc repro` and `dvc exp run` can run there without touching the checkout.
- `shared_dir`: `../shared` beside the checkout (real flower photos, ImageNet weights); tests
  that use it are skipped when it is absent.
- `loopback_namespace`, `tracking_server`: one loopback-only network namespace per session, and in
  it PostgreSQL + `mlflow server` (tests/services.py), shared by the scale-out tests.
- `colour_model`, `logged_colour_run`, `model_server`: a tiny classifier whose predictions are
  known, that model logged to MLflow (and registered as `colours-classifier@champion`), and one
  `mlflow models serve` of it, by registered name, for the session; `limited_model_server`: the
  same model behind `transferlab serve` (request bodies bounded in bytes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO_ROOT, SYNTHETIC_OVERRIDES, VENV_BIN, ModelServer, prepare_project, serve_model
from services import LoopbackNamespace, TrackingService

from transferlab.config import Config, MlflowConfig, compose
from transferlab.paths import StagePaths
from transferlab.workspace import copy_project


@pytest.fixture(scope="session")
def synthetic_cfg() -> Config:
    """Config for a small synthetic dataset (3 classes x 12 JPEGs, 64 px); frozen, so safe to share."""
    return compose(list(SYNTHETIC_OVERRIDES), config_dir=REPO_ROOT / "conf")


@pytest.fixture
def synthetic_raw(synthetic_cfg: Config, tmp_path: Path) -> Path:
    """The `synthetic_cfg` dataset generated into the project `tmp_path`: `data/raw/<name>/<class>/*.jpg`."""
    from transferlab.synthetic import generate

    assert synthetic_cfg.data.synthetic is not None
    raw = StagePaths(tmp_path).raw_dataset(synthetic_cfg.data.name)
    generate(synthetic_cfg.data.synthetic, raw)
    return raw


@pytest.fixture
def prepared_project(synthetic_cfg: Config, tmp_path: Path) -> StagePaths:
    """A project folder with params.yaml, data/raw and data/splits made by the download and split stages."""
    return prepare_project(synthetic_cfg, tmp_path / "project")


@pytest.fixture(scope="module")
def hydra_project(synthetic_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `prepared_project` makes, plus conf/ for `transferlab-train`; made once per test module."""
    return prepare_project(synthetic_cfg, tmp_path_factory.mktemp("hydra_project"), conf=True).root


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repo's tracked and untracked-not-ignored files in a new git repo with one commit.

    For the test's duration this venv's console scripts (`transferlab`, `dvc`) come first on
    PATH, so subprocesses run there use the installed package; DVC's analytics are off.
    """
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return copy_project(REPO_ROOT, tmp_path / "repo")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`shared/` beside the checkout; skips the test when it is not there."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real flower photos and ImageNet weights live there)")
    return path


@pytest.fixture(scope="session")
def loopback_namespace() -> Iterator[LoopbackNamespace]:
    """A network namespace with only 127.0.0.1, for services that would pick an external address."""
    namespace = LoopbackNamespace.create()
    yield namespace
    namespace.close()


@pytest.fixture(scope="session")
def tracking_server(loopback_namespace: LoopbackNamespace) -> Iterator[TrackingService]:
    """`mlflow server --serve-artifacts` on PostgreSQL inside `loopback_namespace` (reach it from there)."""
    service = TrackingService(loopback_namespace)
    try:
        service.start()
        yield service
    finally:
        service.close()


# --- evaluate, predict, export, serving: a tiny colour classifier and images for it ---------

COLOUR_CLASSES = ("red", "green", "blue")
COLOUR_IMAGE_SIZE = 64
COLOUR_REGISTERED = "colours-classifier"  # the served model is addressed by registered name and alias


def _build_colour_model():  # returns keras.Model (keras is imported lazily)
    """[0, 255] RGB -> softmax over red/green/blue by mean colour: predictions known in advance."""
    import keras
    import numpy as np

    inputs = keras.Input((COLOUR_IMAGE_SIZE, COLOUR_IMAGE_SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(len(COLOUR_CLASSES), activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="colour_classifier")
    model.get_layer("probabilities").set_weights([6.0 * np.eye(3, dtype="float32"), np.zeros(3, dtype="float32")])
    return model


@pytest.fixture(scope="session")
def colour_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<project>/models/model.keras`: 64 px input, classes red/green/blue by mean colour, with
    `<project>/data/splits/classes.json` beside it as the train and split stages lay them out.
    Read-only: copy it before changing anything around it."""
    import json

    project = tmp_path_factory.mktemp("colour_project")
    model_file = StagePaths(project).model_file
    model_file.parent.mkdir(parents=True)
    _build_colour_model().save(model_file)
    StagePaths(project).classes.parent.mkdir(parents=True)
    StagePaths(project).classes.write_text(json.dumps(list(COLOUR_CLASSES)))
    return model_file


@pytest.fixture
def colour_image(tmp_path: Path):  # returns the factory below
    """Factory: `colour_image(name, (r, g, b))` writes a solid 32 px image (format from the suffix)."""
    from PIL import Image

    def write(name: str, rgb: tuple[int, int, int], size: int = 32) -> Path:
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), rgb).save(path)
        return path

    return write


@pytest.fixture(scope="session")
def logged_colour_run(
    colour_model: Path, synthetic_cfg: Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A training-like MLflow run (sqlite store in a temp project) holding the colour model, registered
    as COLOUR_REGISTERED@champion: (run id, URI)."""
    import dataclasses

    from transferlab.registry import register_run_model
    from transferlab.tracking import open_store

    root = tmp_path_factory.mktemp("serving_project")
    cfg = dataclasses.replace(synthetic_cfg, mlflow=MlflowConfig(system_metrics=False))
    _forget_tracking_uri()  # this project's own store
    with open_store(cfg.mlflow, root).start_run(run_name="serving-test") as run:
        run.log_metrics({"val_accuracy": 1.0})
        run.log_model(colour_model, list(COLOUR_CLASSES), COLOUR_IMAGE_SIZE)
    run.record.write(root / "models" / "run.json")
    register_run_model(run.store, COLOUR_REGISTERED, run.run_id, alias="champion")
    _forget_tracking_uri()
    yield run.run_id, run.store.uri


@pytest.fixture(scope="session")
def model_server(logged_colour_run: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """`mlflow models serve` of the registered colour model on 127.0.0.1 (at most 40 rows per request)."""
    _, uri = logged_colour_run
    server = serve_model(f"models:/{COLOUR_REGISTERED}@champion", uri, tmp_path_factory.mktemp("server") / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def limited_model_server(
    logged_colour_run: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    """`transferlab serve` of the registered colour model on 127.0.0.1: at most 40 rows and
    SERVE_MAX_BYTES (1 MiB) per request."""
    _, uri = logged_colour_run
    log_file = tmp_path_factory.mktemp("limited_server") / "serve.log"
    server = serve_model(f"models:/{COLOUR_REGISTERED}@champion", uri, log_file, transferlab=True)
    yield server
    server.stop()


def _forget_tracking_uri() -> None:
    """Unset MLFLOW_TRACKING_URI: `mlflow.set_tracking_uri` (called by every run start) sets it for
    subprocesses, and monkeypatch's `delenv` of an unset variable would not undo that."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _isolated_mlflow() -> Iterator[None]:
    """Runs go to each test project's own SQLite store, never to a server set in the environment,
    nor, after the test, to the store the test used (later fixtures and commands inherit the variable)."""
    _forget_tracking_uri()
    yield
    _forget_tracking_uri()


# --- running on several workers (`make test`: pytest-xdist, `--dist loadgroup`) ------------

# Session fixtures that take seconds to set up: the tests using one run on one worker, so that it
# is set up once, not once per worker.
_SHARED_SESSION_SETUP = ("loopback_namespace", "logged_colour_run")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group tests by the costly setup they share: their module, when it has module-scoped fixtures
    of its own, else a session fixture above; the rest are handed out one test at a time."""
    for item in items:
        module = item.nodeid.split("::")[0]
        if _uses_module_fixture_of(module, item):
            group = module
        else:
            group = next((name for name in _SHARED_SESSION_SETUP if name in item.fixturenames), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def _uses_module_fixture_of(module: str, item: pytest.Item) -> bool:
    fixture_info = getattr(item, "_fixtureinfo", None)
    definitions = fixture_info.name2fixturedefs.values() if fixture_info else ()
    return any(d[-1].scope == "module" and d[-1].baseid == module for d in definitions)
