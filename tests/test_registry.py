"""registry.py and `transferlab promote`: registered versions, moving aliases, `models:/<name>@<alias>` in
predict and export, on a real SQLite MLflow store. (A sweep's `candidate` and the registry over a
tracking server are checked in test_ui.py.)"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from transferlab import registry, tracking
from transferlab.cli import main
from transferlab.config import MlflowConfig, compose, write_params
from transferlab.errors import TransferlabError

NAME = "colours-classifier"
CLASSES = ["red", "green", "blue"]
MLFLOW = MlflowConfig(experiment="registry-tests", system_metrics=False, registered_model=NAME)


@dataclass
class Project:
    root: Path
    store: tracking.Store
    with_model: list[str]  # runs that logged the colour model
    without_model: str


@pytest.fixture(scope="module")
def project(colour_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A project (params.yaml naming the registered model) whose store holds two runs that logged the
    colour model and one that logged none; nothing registered yet."""
    from helpers import REPO_ROOT, SYNTHETIC_OVERRIDES

    root = tmp_path_factory.mktemp("registry_project")
    cfg = compose([*SYNTHETIC_OVERRIDES, f"mlflow.registered_model={NAME}"], config_dir=REPO_ROOT / "conf")
    write_params(cfg, root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        store = tracking.open_store(MLFLOW, root)
        runs = []
        for name in ("first", "second"):
            with store.start_run(run_name=name) as run:
                run.log_model(colour_model, CLASSES, 64)
            runs.append(run.run_id)
        with store.start_run(run_name="no-model") as run:
            pass
    return Project(root, store, runs, run.run_id)


def versions(project: Project) -> dict[str, str]:
    """version -> run id of every version of the registered model."""
    found = MlflowClient(project.store.uri).search_model_versions(f"name = '{NAME}'")
    return {str(v.version): v.run_id for v in found}


@pytest.mark.slow
def test_a_run_is_registered_once_and_aliases_move(project: Project) -> None:
    store, (first, second) = project.store, project.with_model
    assert registry.register_run_model(store, NAME, first) == "1"
    assert registry.register_run_model(store, NAME, first) == "1", "the same run's model is not registered twice"
    assert registry.register_run_model(store, NAME, second, alias=registry.CANDIDATE_ALIAS) == "2"
    assert versions(project) == {"1": first, "2": second}
    version = MlflowClient(store.uri).get_model_version(NAME, "2")
    assert version.source == store.logged_model_uri(second) and version.source.startswith("models:/m-")

    assert registry.promote(store, NAME, "1", "champion") == "1"
    assert store.alias_version(NAME, "champion") == "1"
    assert registry.promote(store, NAME, second, "champion") == "2", "a run id picks its existing version"
    assert store.alias_version(NAME, "champion") == "2"
    assert registry.promote(store, NAME, "@champion", "previous") == "2", "an alias names a version too"
    assert store.alias_version(NAME, registry.CANDIDATE_ALIAS) == "2"
    assert len(versions(project)) == 2


@pytest.mark.slow
def test_candidate_moves_only_to_a_better_model_of_the_same_splits(
    colour_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep's best child becomes @candidate unless @candidate holds a model trained on the same
    splits with a higher validation accuracy; it is registered either way."""
    store = tracking.open_store(MLFLOW, tmp_path)
    name = "sweeps-classifier"

    def sweep_best(splits: str, accuracy: float) -> str:
        with store.start_run(run_name=f"{splits}-{accuracy}", tags={tracking.TAG_MANIFEST_HASH: splits}) as run:
            run.log_metrics({registry.VALIDATION_METRIC: accuracy})
            run.log_model(colour_model, CLASSES, 64)
        return run.run_id

    def candidate() -> str:
        return store.alias_version(name, registry.CANDIDATE_ALIAS)

    caplog.set_level(logging.INFO, logger="transferlab.registry")
    assert registry.register_candidate(store, name, sweep_best("splits-a", 0.90)) == "1" == candidate()
    assert registry.register_candidate(store, name, sweep_best("splits-a", 0.85)) == "2"
    assert candidate() == "1", "a worse model of the same splits does not take the alias"
    assert (
        f"{name}@candidate stays at version 1 (validation accuracy 0.9000 on the same splits); this sweep's best "
        f"is version 2 (0.8500): `transferlab promote 2 --alias candidate` moves the alias to it"
    ) in caplog.text
    assert registry.register_candidate(store, name, sweep_best("splits-a", 0.95)) == "3" == candidate()
    assert f"{name}@candidate is version 3" in caplog.text and "was version 1)" in caplog.text
    assert registry.register_candidate(store, name, sweep_best("splits-b", 0.70)) == "4" == candidate(), (
        "accuracies on other splits are not compared"
    )


@pytest.mark.slow
def test_promote_refuses_what_it_cannot_resolve_in_one_line(project: Project) -> None:
    store = project.store
    cases = {
        "latest": "neither a version number, an @alias nor an MLflow run id",
        "@nobody": f"registered model {NAME} has no alias @nobody",
        "99": f"version 99 of registered model {NAME}",
        project.without_model: "logged no model to register",
        "f" * 32: f"run {'f' * 32}",
    }
    for argument, message in cases.items():
        with pytest.raises(TransferlabError, match=message) as caught:
            registry.promote(store, NAME, argument, "champion")
        assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_cli_promotes_then_predicts_and_exports_by_alias(
    project: Project,
    colour_image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import mlflow

    caplog.set_level(logging.INFO, logger="transferlab.export")
    monkeypatch.chdir(project.root)  # its params.yaml names the registered model, its mlruns/ is the store
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # MLflow's global store points elsewhere,
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # (which also sets this variable): the commands must not follow it
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the fetched model goes
    (tmp_path / "tmp").mkdir()
    first = project.with_model[0]
    assert main(["promote", first, "--alias", "production"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"models:/{NAME}@production -> version ")

    image = colour_image("red.png", (230, 20, 20))
    assert main(["predict", f"models:/{NAME}@production", str(image), "--json", "-k", "1"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["predictions"][0]["label"] == "red", "classes come from the registered model"
    assert main(["export", f"models:/{NAME}@production", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "saved_model.pb").is_file()
    assert f"exported models:/{NAME}@production as savedmodel" in caplog.text, "named as given, not its temp file"
    assert not list((tmp_path / "tmp").glob("transferlab-model-*")), "the fetched model is removed afterwards"

    assert main(["predict", f"models:/{NAME}@nobody", str(image)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("TransferlabError: models:/")
    assert main(["predict", f"runs:/{first}/figures", str(image)]) == 2  # a run's files, not its model
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("TransferlabError: runs:/")
    assert main(["predict", f"runs:/{first}/model", str(image), "--json"]) == 0  # a run's model by URI
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] == "red"


def test_commands_need_a_store_and_a_model_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["predict", f"models:/{NAME}@champion", "x.png"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists(), "looking for a model creates no store"
    write_params(compose(["mlflow.registered_model=null"]), tmp_path / "params.yaml")
    assert main(["promote", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ConfigError: mlflow.registered_model is null in params.yaml: pass --name NAME"
    )
