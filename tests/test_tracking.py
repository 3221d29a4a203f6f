"""tracking.py: the store (opened once, safe to open concurrently), runs bound to their ids, run records,
dataset inputs and descriptions, and mlruns/ in the repository."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, released_together, tiny_cfg
from mlflow.tracking import MlflowClient

from transferlab import errors, tracking
from transferlab.config import Config, MlflowConfig
from transferlab.errors import Interrupted, TransferlabError
from transferlab.manifests import split_datasets, splits_digest
from transferlab.paths import StagePaths


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.tracking_uri(MlflowConfig(), root))


def test_uri_precedence_environment_then_config_then_project_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tracking.tracking_uri(MlflowConfig(), tmp_path)
    assert default == f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').resolve()}"
    assert tracking.tracking_uri(MlflowConfig(tracking_uri="http://127.0.0.1:5999"), tmp_path).endswith(":5999")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5998")
    assert tracking.tracking_uri(MlflowConfig(tracking_uri="http://127.0.0.1:5999"), tmp_path).endswith(":5998")


def test_dvc_temp_workspaces_log_to_the_repos_store(tmp_path: Path) -> None:
    """Queued and --temp experiments run in <repo>/.dvc/tmp/exps/...: their runs belong to the repo."""
    repo = tmp_path / "repo"
    expected = tracking.tracking_uri(MlflowConfig(), repo)
    for workspace in (".dvc/tmp/exps/tmpab12cd", ".dvc/tmp/exps/standalone/tmpab12cd"):
        assert tracking.tracking_uri(MlflowConfig(), repo / workspace) == expected
    assert expected == f"sqlite:///{(repo / 'mlruns' / 'mlflow.db').resolve()}"


def test_store_is_opened_once_per_process_with_artifacts_beside_the_database(tmp_path: Path) -> None:
    store = tracking.open_store(MlflowConfig(experiment="once"), tmp_path)
    assert tracking.open_store(MlflowConfig(experiment="once"), tmp_path) is store
    experiment = client_for(tmp_path).get_experiment(store.experiment_id)
    assert experiment.name == "once"
    assert experiment.artifact_location == (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
    assert tracking.open_store(MlflowConfig(experiment="other"), tmp_path) is not store


def test_run_handles_log_to_their_own_run_while_another_is_active(tmp_path: Path) -> None:
    """A sweep has a parent and a child open at once: each handle must write where it points."""
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    parent = store.create_parent_run("sweep", {}, tmp_path)
    with store.start_run(run_name="child", parent_run_id=parent.run_id) as child:
        parent.log_metrics({"best_val_accuracy": 0.5})
        child.log_metrics({"val_accuracy": 0.9}, step=1)
        parent.set_tag("where", "parent")
    client = client_for(tmp_path)
    assert client.get_run(parent.run_id).data.metrics == {"best_val_accuracy": 0.5}
    assert client.get_run(child.run_id).data.metrics == {"val_accuracy": 0.9}
    assert "where" not in client.get_run(child.run_id).data.tags
    assert child.logged_steps("val_accuracy") == {1}
    assert client.get_run(child.run_id).info.status == "FINISHED"


def test_failed_block_ends_the_run_failed_with_the_reason(tmp_path: Path) -> None:
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    with pytest.raises(ValueError, match="boom"), store.start_run(run_name="fails") as run:
        raise ValueError("boom\nsecond line")
    info = client_for(tmp_path).get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags[tracking.TAG_ERROR] == "ValueError: boom"


def test_interrupted_block_ends_the_run_killed(tmp_path: Path) -> None:
    """Issue 12: Ctrl-C ended runs FAILED (MLflow's own context does that on any exception)."""
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    with pytest.raises(Interrupted), store.start_run(run_name="stopped") as run:
        raise Interrupted(signal.SIGTERM)
    info = client_for(tmp_path).get_run(run.run_id)
    assert info.info.status == "KILLED"
    assert info.data.tags[tracking.TAG_ERROR] == "Interrupted: SIGTERM received"
    with pytest.raises(KeyboardInterrupt), store.reopen_run(run.run_id):  # evaluate's reopened run too
        raise KeyboardInterrupt
    assert client_for(tmp_path).get_run(run.run_id).info.status == "KILLED"


def test_an_error_after_a_stop_signal_ends_the_run_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI: Ctrl-C during TensorFlow's tracing surfaced as a ValueError and ended the run FAILED."""
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    monkeypatch.setattr(errors, "_received", [signal.SIGINT])  # the handler ran; TensorFlow raised its own error
    with pytest.raises(Interrupted), store.start_run(run_name="stopped") as run:
        raise ValueError("Could not pack sequence.")
    info = client_for(tmp_path).get_run(run.run_id)
    assert info.info.status == "KILLED"
    assert info.data.tags[tracking.TAG_ERROR] == "Interrupted: SIGINT received"
    with store.start_run(run_name="trained") as trained:
        pass
    with pytest.raises(Interrupted), store.killed_if_interrupted(trained.run_id):  # evaluate scoring it
        raise ValueError("Could not pack sequence.")
    assert client_for(tmp_path).get_run(trained.run_id).info.status == "KILLED"


def test_config_params_show_the_image_size_a_backbone_default_gives(tmp_path: Path) -> None:
    """`data.image_size: null` is logged as the size the run trains at, so runs compare in MLflow."""
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    cfg = tiny_cfg("data.image_size=null", "model=mobilenet_v2")
    with store.start_run(run_name="sized") as run:
        run.log_config(cfg)
    params = client_for(tmp_path).get_run(run.run_id).data.params
    assert cfg.data.image_size is None and params["data.image_size"] == "288"


def test_resumed_run_that_finishes_drops_the_old_error(tmp_path: Path) -> None:
    """Issue 12: a resumed run ended FINISHED but kept `transferlab.error` from its killed attempt."""
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    with pytest.raises(KeyboardInterrupt), store.start_run(run_name="resumed") as run:
        raise KeyboardInterrupt
    with store.start_run(run_id=run.run_id):
        pass
    info = client_for(tmp_path).get_run(run.run_id)
    assert info.info.status == "FINISHED" and tracking.TAG_ERROR not in info.data.tags
    with pytest.raises(ValueError), store.reopen_run(run.run_id):
        raise ValueError("evaluate failed")
    assert client_for(tmp_path).get_run(run.run_id).data.tags[tracking.TAG_ERROR] == "ValueError: evaluate failed"
    with store.reopen_run(run.run_id):
        pass
    info = client_for(tmp_path).get_run(run.run_id)
    assert info.info.status == "FINISHED" and tracking.TAG_ERROR not in info.data.tags


def test_models_of_an_earlier_attempt_are_discarded(tmp_path: Path) -> None:
    """A kill while MLflow logs the model leaves it PENDING; the resumed run must end with one model."""
    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    client = client_for(tmp_path)
    with store.start_run(run_name="resumed") as run:
        stuck = client.create_logged_model(store.experiment_id, name="model", source_run_id=run.run_id)
        other_run = client.create_run(store.experiment_id).info.run_id
        unrelated = client.create_logged_model(store.experiment_id, name="model", source_run_id=other_run)
        assert stuck.status.name == "PENDING"
        assert run.discard_logged_models() == [stuck.model_id]
        assert run.discard_logged_models() == []
    left = client.search_logged_models([store.experiment_id])
    assert [model.model_id for model in left] == [unrelated.model_id]


def test_run_record_round_trip_and_clear_errors(tmp_path: Path) -> None:
    record = tracking.RunRecord("abc", "sqlite:///x.db", "1")
    record.write(tmp_path / "run.json")
    assert tracking.RunRecord.read(tmp_path / "run.json") == record
    with pytest.raises(TransferlabError, match="not found: run `dvc repro train` first"):
        tracking.RunRecord.read(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TransferlabError, match="not a valid run record"):
        tracking.RunRecord.read(tmp_path / "bad.json")


def test_reopening_a_missing_run_names_the_store(tmp_path: Path) -> None:
    store = tracking.open_store(MlflowConfig(), tmp_path)
    with pytest.raises(TransferlabError, match="run nope not found in sqlite"), store.reopen_run("nope"):
        pass


CONFIGURE_SCRIPT = """
import sys, time
from pathlib import Path
from transferlab import errors, tracking
from transferlab.config import MlflowConfig
Path(sys.argv[1]).touch()  # imported: ready
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
print(tracking.open_store(MlflowConfig(), Path.cwd()).experiment_id)
"""


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    """joblib jobs or `dvc queue start -j N` on a fresh project: MLflow's schema migrations race.

    Without the store lock in `tracking.open_store`, two processes fail this (3 tries of 3)."""
    command = [sys.executable, "-c", CONFIGURE_SCRIPT]
    procs = released_together(
        [command] * 2, tmp_path, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-1500:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1, "all must see one experiment"


DATASETS_SCRIPT = """
import sys, time
from pathlib import Path
import pandas as pd
from transferlab import tracking
from transferlab.config import MlflowConfig
from transferlab.manifests import SplitDataset
store = tracking.open_store(MlflowConfig(system_metrics=False), Path.cwd())
frame = pd.DataFrame({"path": ["a.jpg"], "label": ["rose"]})
with store.start_run(run_name="racer") as run:
    Path(sys.argv[-2]).touch()  # ready
    go = Path(sys.argv[-1])
    while not go.exists():
        time.sleep(0.005)
    started = time.time()
    for dataset in range(DATASETS):  # a new dataset every 0.3 s, at the same moments in every process
        while time.time() < started + 0.3 * dataset:
            time.sleep(0.001)
        split = SplitDataset("train", "flowers-train", "training", f"digest-{dataset}", "train.csv", "folder", frame)
        run.log_datasets([split])
print(run.run_id)
"""


@pytest.mark.slow
def test_runs_logging_the_same_new_dataset_at_once_all_succeed(tmp_path: Path) -> None:
    """Two `transferlab-train` started together (tests/test_faults.py) failed now and then with
    "UNIQUE constraint failed: datasets...": MLflow's SQL store looks a dataset up and inserts it
    if missing, unserialised. Without the retry in `Run.log_datasets`, 3 of 4 processes failed this
    (3 tries of 3)."""
    datasets = 6
    tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)  # the store exists: only the inserts race
    command = [sys.executable, "-c", DATASETS_SCRIPT.replace("DATASETS", str(datasets))]
    procs = released_together(
        [command] * 4, tmp_path, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [err[-1500:] for _, err in outputs]
    client = client_for(tmp_path)
    for out, _ in outputs:
        logged = client.get_run(out.strip()).inputs.dataset_inputs
        assert sorted(d.dataset.digest for d in logged) == sorted(f"digest-{i}" for i in range(datasets))


@pytest.mark.slow
def test_failed_job_marks_the_run_its_training_left(tmp_path: Path) -> None:
    """Training finished but evaluate failed: the run must not stay FINISHED (a re-run would skip it)."""
    cfg = MlflowConfig()
    store = tracking.open_store(cfg, tmp_path)
    experiment = store.experiment_id
    client = client_for(tmp_path)
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    tags = {tracking.TAG_JOB: "job-1"}
    trained = client.create_run(experiment, tags={**tags, "mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(trained, "FINISHED")

    run_id = store.failed_child_run("x", parent, tags, "DataError: boom", "Traceback ...")
    assert run_id == trained
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_ERROR] == "DataError: boom"
    assert [a.path for a in client.list_artifacts(run_id)] == ["error.txt"]

    fresh = store.failed_child_run("y", parent, {tracking.TAG_JOB: "job-2"}, "ConfigError: bad")
    run = client.get_run(fresh)
    assert run.info.status == "FAILED" and run.info.run_name == "y"
    assert run.data.tags["mlflow.parentRunId"] == parent


def test_runs_of_a_dvc_experiment_are_named_and_tagged_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run` hands stage commands DVC_EXP_NAME and DVC_EXP_BASELINE_REV (the real thing runs in
    test_entrypoints.py); outside an experiment the run is named after backbone and data."""
    cfg = tiny_cfg()
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.DvcExperiment.current() is None
    assert tracking.default_run_name(cfg) == "small_cnn-synthetic"
    assert tracking.TAG_DVC_EXP_NAME not in tracking.base_tags(cfg, Path.cwd())
    baseline = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("DVC_EXP_NAME", "dropout-03")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    assert tracking.default_run_name(cfg) == "dropout-03"
    tags = tracking.base_tags(cfg, Path.cwd())
    assert tags[tracking.TAG_DVC_EXP_NAME] == "dropout-03"
    assert tags[tracking.TAG_DVC_EXP_REF] == f"refs/exps/01/{baseline[2:]}/dropout-03"
    assert tags[tracking.TAG_DVC_EXP_BASELINE] == baseline


def test_a_logged_table_is_replaced_not_appended_to(tmp_path: Path) -> None:
    import pandas as pd

    store = tracking.open_store(MlflowConfig(system_metrics=False), tmp_path)
    with store.start_run(run_name="resumed sweep parent") as run:
        run.log_table(pd.DataFrame({"job": [0, 1]}), "summary.json")
        run.log_table(pd.DataFrame({"job": [0, 1, 2]}), "summary.json")
    local = store.client.download_artifacts(run.run_id, "summary.json", str(tmp_path))
    assert pd.read_json(local, orient="split")["job"].tolist() == [0, 1, 2]


def test_datasets_and_description_are_logged_to_a_finished_run(
    prepared_project: StagePaths, synthetic_cfg: Config
) -> None:
    """Evaluate adds to the training run after it finished: inputs and description go in by run id."""
    store = tracking.open_store(MlflowConfig(experiment="datasets", system_metrics=False), prepared_project.root)
    with store.start_run(run_name="trained") as run:
        run.log_datasets(split_datasets(synthetic_cfg, prepared_project, ["train", "val"]))
    run.log_datasets(split_datasets(synthetic_cfg, prepared_project))  # test added; train, val kept once
    run.description = "**small_cnn** on synthetic"
    client = client_for(prepared_project.root)
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    inputs = {d.dataset.name: d for d in finished.inputs.dataset_inputs}
    assert sorted(inputs) == ["synthetic-test", "synthetic-train", "synthetic-val"]
    contexts = {name: {t.key: t.value for t in d.tags} for name, d in inputs.items()}
    assert contexts["synthetic-val"] == {"mlflow.data.context": "validation", "transferlab.data_source": "synthetic"}
    digest = splits_digest(prepared_project)
    assert {d.dataset.digest for d in inputs.values()} == {digest}
    assert json.loads(inputs["synthetic-test"].dataset.source) == {"uri": "data/splits/test.csv"}
    by_data = client.search_runs([store.experiment_id], f"datasets.digest = '{digest}'")
    assert [r.info.run_id for r in by_data] == [run.run_id], "one search finds the runs trained on these splits"
    assert run.description == "**small_cnn** on synthetic"
    assert finished.data.tags["mlflow.note.content"] == run.description


def test_mlruns_is_in_the_repository_with_only_its_readme() -> None:
    """A fresh clone has mlruns/ (like conf/ and src/); the store's files there are never committed."""
    tracked = subprocess.run(["git", "ls-files", "mlruns"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert tracked.stdout.split() == ["mlruns/README.md"]
    assert "mlflow.db" in (REPO_ROOT / "mlruns" / "README.md").read_text()
    for path in ("mlruns/mlflow.db", "mlruns/artifacts/1/x/artifacts/model.keras"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO_ROOT)
        assert ignored.returncode == 0, f"{path} is not ignored"
