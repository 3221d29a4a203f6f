"""Evaluate stage: reports on a test split whose predictions are known, MLflow logging, clear errors,
and (slow) the whole `dvc repro` pipeline on synthetic data."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from helpers import CLASSES, chatter, colour_config, make_project, undeclared_files

from transferlab.cli import main
from transferlab.config import Config, EvaluateConfig, MlflowConfig, ModelConfig, write_params
from transferlab.errors import DataError, ModelError, TransferlabError
from transferlab.manifests import splits_digest
from transferlab.paths import StagePaths
from transferlab.stages.evaluate import RUN_ID_KEY, evaluate, figure_files
from transferlab.tracking import RunRecord


@pytest.fixture
def colour_cfg(synthetic_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return colour_config(synthetic_cfg)


@pytest.fixture(scope="module")
def evaluated(
    tmp_path_factory: pytest.TempPathFactory, colour_model: Path, synthetic_cfg: Config
) -> tuple[StagePaths, dict[str, float]]:
    """The evaluate stage run once on the known test split (the tests below only read its outputs)."""
    cfg = colour_config(synthetic_cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        paths = make_project(tmp_path_factory.mktemp("evaluated") / "project", colour_model, cfg)
        return paths, evaluate(cfg, paths)


def test_metrics_json_holds_the_expected_numbers(evaluated: tuple[StagePaths, dict[str, float]]) -> None:
    paths, returned = evaluated
    metrics = json.loads(paths.metrics.read_text())
    assert metrics.pop(RUN_ID_KEY) == RunRecord.read(paths.run_file).run_id  # the reverse link to MLflow
    assert metrics == returned
    assert metrics["test_images"] == 12
    assert metrics["test_accuracy"] == pytest.approx(10 / 12, abs=1e-6)
    assert metrics["test_top2_accuracy"] == 1.0
    # per class (precision, recall): red (3/4, 3/4), green (4/5, 1), blue (1, 3/4)
    f1 = [0.75, 2 * 0.8 / 1.8, 2 * 0.75 / 1.75]
    assert metrics["test_macro_precision"] == pytest.approx((0.75 + 0.8 + 1.0) / 3, abs=1e-6)
    assert metrics["test_macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-6)
    assert metrics["test_weighted_f1"] == pytest.approx((4 * f1[0] + 4 * f1[1] + 4 * f1[2]) / 12, abs=1e-6)
    assert 0 < metrics["test_log_loss"] < 5
    assert 0 <= metrics["test_ece"] <= 1
    assert all(isinstance(v, int | float) for v in metrics.values())


def test_per_class_and_confusion_csv(evaluated: tuple[StagePaths, dict[str, float]]) -> None:
    paths, _ = evaluated
    per_class = pd.read_csv(paths.per_class)
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class["class"].tolist() == CLASSES
    assert per_class["precision"].tolist() == pytest.approx([0.75, 0.8, 1.0])
    assert per_class["recall"].tolist() == pytest.approx([0.75, 1.0, 0.75])
    assert per_class["support"].tolist() == [4, 4, 4]
    confusion = pd.read_csv(paths.confusion)
    assert list(confusion.columns) == ["actual", "predicted"]
    assert confusion.shape == (12, 2)
    assert set(confusion["actual"]) | set(confusion["predicted"]) <= set(CLASSES)
    counts = confusion.value_counts().to_dict()
    assert counts == {("red", "red"): 3, ("red", "green"): 1, ("green", "green"): 4, ("blue", "blue"): 3,
                      ("blue", "red"): 1}  # fmt: skip


def test_figures_are_written(evaluated: tuple[StagePaths, dict[str, float]]) -> None:
    paths, _ = evaluated
    for figure in figure_files(paths):
        assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG"
        assert figure.stat().st_size > 5_000


def test_results_land_in_the_training_run(evaluated: tuple[StagePaths, dict[str, float]]) -> None:
    from mlflow.tracking import MlflowClient

    paths, metrics = evaluated
    record = RunRecord.read(paths.run_file)
    client = MlflowClient(record.tracking_uri)
    run = client.get_run(record.run_id)
    assert run.data.metrics["final_val_accuracy"] == 0.9  # val and test results in one run
    for key, value in metrics.items():
        assert run.data.metrics[key] == pytest.approx(value)
    assert run.info.status == "FINISHED"
    evaluation = {Path(a.path).name for a in client.list_artifacts(record.run_id, "evaluation")}
    assert evaluation == {"metrics.json", "per_class.csv", "confusion.csv"}
    figures = {Path(a.path).name for a in client.list_artifacts(record.run_id, "figures")}
    assert {f.name for f in figure_files(paths)} <= figures
    (test_input,) = run.inputs.dataset_inputs  # the test split, as a dataset input of the run
    assert (test_input.dataset.name, test_input.dataset.digest) == ("colours-test", splits_digest(paths))
    assert {t.key: t.value for t in test_input.tags}["mlflow.data.context"] == "test"
    assert run.data.tags["mlflow.note.content"].startswith("**Test**: accuracy **0.833**, top-2 accuracy 1.000")


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_are_replaced_as_one_unit(
    tmp_path: Path, colour_model: Path, colour_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: a failure after metrics.json was written left new metrics beside old figures."""
    paths = make_project(tmp_path / "p", colour_model, colour_cfg)
    evaluate(colour_cfg, paths)
    before = _contents(paths.evaluation)
    assert sorted(before) == sorted(
        p.relative_to(paths.evaluation).as_posix() for p in paths.stage_outputs()["evaluate"]
    )

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("transferlab.plots.plot_reliability", broken)  # the last figure, after the metrics
    other = dataclasses.replace(colour_cfg, evaluate=EvaluateConfig(top_k=3, misclassified=2, calibration_bins=7))
    with pytest.raises(OSError, match="disk full"):
        evaluate(other, paths)
    assert _contents(paths.evaluation) == before
    assert sorted(p.name for p in paths.reports.iterdir()) == ["evaluation"], "no temporary folder is left"


def test_missing_inputs_name_the_stage_to_run(tmp_path: Path, colour_model: Path, colour_cfg: Config) -> None:
    paths = make_project(tmp_path / "p", colour_model, colour_cfg, with_run=False)
    with pytest.raises(TransferlabError, match=r"run\.json not found: run `dvc repro train`"):
        evaluate(colour_cfg, paths)
    paths.model_file.unlink()
    with pytest.raises(ModelError, match=r"model\.keras not found: run `dvc repro train`"):
        evaluate(colour_cfg, paths)
    paths.manifest("test").unlink()
    with pytest.raises(DataError, match=r"test\.csv not found: run `dvc repro split`"):
        evaluate(colour_cfg, paths)
    paths.classes.unlink()
    with pytest.raises(DataError, match="dvc repro split"):
        evaluate(colour_cfg, paths)


def test_stale_splits_are_named_first(tmp_path: Path, colour_model: Path, colour_cfg: Config) -> None:
    """After `data.name` changed, evaluate blamed a missing image listed in test.csv; train named the stale splits."""
    paths = make_project(tmp_path / "p", colour_model, colour_cfg)
    moved = dataclasses.replace(colour_cfg, data=dataclasses.replace(colour_cfg.data, name="myflowers"))
    with pytest.raises(
        DataError, match=r"^prepared splits are stale \(data\.name is 'myflowers', splits were made with 'colours'\)"
    ):
        evaluate(moved, paths)


def test_model_for_other_classes_is_rejected(tmp_path: Path, colour_model: Path, colour_cfg: Config) -> None:
    paths = make_project(tmp_path / "p", colour_model, colour_cfg, with_run=False)
    paths.classes.write_text(json.dumps(["red", "green", "blue", "black"]))
    with pytest.raises(ModelError, match=r"predicts 3 classes but .* lists 4"):
        evaluate(colour_cfg, paths)


def test_cli_reports_one_line(
    tmp_path: Path,
    colour_model: Path,
    colour_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = make_project(tmp_path / "p", colour_model, colour_cfg, with_run=False)
    write_params(colour_cfg, paths.root / "params.yaml")
    paths.model_file.unlink()
    monkeypatch.chdir(paths.root)
    assert main(["evaluate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ModelError: ") and "dvc repro train" in err[-1]


@pytest.mark.slow
def test_dvc_repro_end_to_end_on_synthetic_data(
    project_copy: Path, synthetic_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """download -> split -> train -> evaluate in a temporary clone, then DVC and MLflow show the results."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the clone's own mlruns/
    from mlflow.tracking import MlflowClient

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=project_copy, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert chatter(done.stdout + done.stderr) == [], "library internals reached the terminal"
        return done.stdout

    cfg = dataclasses.replace(
        synthetic_cfg,
        model=ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights=None),  # offline: no ImageNet download
        train=dataclasses.replace(synthetic_cfg.train, epochs=1),
        mlflow=MlflowConfig(experiment="repro-test", system_metrics=False, registered_model="repro-classifier"),
    )
    write_params(cfg, project_copy / "params.yaml")
    before = {path for path in project_copy.rglob("*") if path.is_file()}
    run("dvc", "repro")
    assert undeclared_files(project_copy, before) == [], "every file a stage writes is declared in dvc.yaml"
    shown = run("dvc", "metrics", "show")
    metrics_file = StagePaths(project_copy).metrics.relative_to(project_copy).as_posix()  # reports/evaluation/...
    assert metrics_file in shown
    metrics = json.loads(run("dvc", "metrics", "show", "--json"))
    values = next(iter(metrics.values()))["data"][metrics_file]["data"]
    for key in ("test_accuracy", "test_top2_accuracy", "test_macro_f1", "test_log_loss", "test_ece"):
        assert 0 <= values[key] <= (10 if key == "test_log_loss" else 1)
    run("dvc", "plots", "show", "--out", "plots_html")
    assert (project_copy / "plots_html" / "index.html").stat().st_size > 0
    paths = StagePaths(project_copy)
    assert list(pd.read_csv(paths.confusion).columns) == ["actual", "predicted"]
    assert all(f.is_file() for f in figure_files(paths))
    record = RunRecord.read(paths.run_file)
    logged = MlflowClient(record.tracking_uri).get_run(record.run_id).data.metrics
    assert {"final_val_accuracy", "test_accuracy", "test_ece"} <= set(logged)  # one run, val and test
    client = MlflowClient(record.tracking_uri)
    datasets = {d.dataset.name for d in client.get_run(record.run_id).inputs.dataset_inputs}
    assert datasets == {"synthetic-train", "synthetic-val", "synthetic-test"}
    (version,) = client.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")
    assert version.run_id == record.run_id, "a dvc repro training run registers its model"

    # Commit, re-evaluate with another k: only evaluate reruns, and DVC compares with HEAD.
    git = ["git", "-c", "user.name=transferlab tests", "-c", "user.email=tests@transferlab.invalid"]
    run(*git, "add", "-A")
    run(*git, "commit", "-q", "--no-verify", "-m", "pipeline run")
    write_params(dataclasses.replace(cfg, evaluate=EvaluateConfig(top_k=3)), project_copy / "params.yaml")
    assert "Running stage 'train'" not in run("dvc", "repro")
    diff = json.loads(run("dvc", "metrics", "diff", "--all", "--json"))[metrics_file]
    assert diff["test_top2_accuracy"]["old"] == values["test_top2_accuracy"]
    assert diff["test_top3_accuracy"]["new"] == 1.0
    assert values["test_accuracy"] == json.loads(paths.metrics.read_text())["test_accuracy"]
    rows = list(csv.DictReader(io.StringIO(run("dvc", "exp", "show", "--csv", "--no-pager"))))
    committed = [row for row in rows if row["typ"] == "baseline" and row["rev"] != "workspace"]
    assert float(committed[0]["test_accuracy"]) == pytest.approx(values["test_accuracy"])  # read from the cache


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flip", "crops"),
    [(True, 1), (False, 1), (True, 3), (False, 2)],
    ids=["test-time-flip", "no-flip", "flip-and-3-crops", "2-crops"],
)
def test_scoring_from_cached_features_gives_the_full_models_metrics(
    prepared_project: StagePaths, caplog, flip: bool, crops: int
) -> None:
    """A frozen backbone: only the head runs on cached test features (and, with test-time
    flipping and crops, on those of their mirror images and other squares), and the metrics do
    not change."""
    import logging

    from helpers import tiny_cfg, widen_photos

    from transferlab.stages.train import train

    overrides = (f"model.test_time_flip={str(flip).lower()}", f"model.test_time_crops={crops}")
    cfg = tiny_cfg("train.epochs=2", "mlflow.log_model=false", *overrides)
    if crops > 1:
        widen_photos(prepared_project)
    result = train(cfg, prepared_project)
    with caplog.at_level(logging.INFO, logger="transferlab"):
        from_memory = evaluate(cfg, prepared_project, model=result.classifier.model)
        from_disk = evaluate(cfg, prepared_project)  # the DVC stage: loads models/model.keras
    assert "test features from the cache (computed once)" in caplog.text
    assert "test features from the cache (hit)" in caplog.text
    assert ("of the mirror images of" in caplog.text) == flip
    assert ("of the squares at 1 along the long side of" in caplog.text) == (crops > 1)
    shutil.rmtree(prepared_project.feature_cache)
    full = evaluate(cfg, prepared_project)  # no cached features: the whole model on the images
    assert not prepared_project.feature_cache.exists(), "the full path does not fill the cache"
    for cached in (from_memory, from_disk):
        assert cached.keys() == full.keys()
        for name, value in full.items():
            assert cached[name] == pytest.approx(value, abs=1e-5), name
