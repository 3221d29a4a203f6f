"""Fault cases end to end (issue 12): real processes, real signals, a real SQLite MLflow store,
real files. Module tests reproduce each defect at unit level; these run the commands a user runs.

The kill tests kill one process per moment, at five moments each, chosen from the process's
log lines or from the files it writes. After every kill the result on disk is the old one or the
new one, never a mix:
- train: `models/model.keras` is byte for byte the model the run in `models/run.json` logged,
  and `reports/history.csv` and `reports/training_curves.png` are the ones that run logged;
- evaluate: `reports/evaluation/` is exactly one of two complete evaluations, and the newest
  batch of test metrics in MLflow is one whole evaluation too.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import signal
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    REPO_ROOT,
    SERVE_MAX_ROWS,
    SYNTHETIC_OVERRIDES,
    TINY_MODEL,
    ModelServer,
    Process,
    checkpointed_run,
    class_folders,
    colour_config,
    declared_png,
    epochs_done,
    job_outputs,
    make_project,
    running_runs,
    tiny_cfg,
)
from mlflow.tracking import MlflowClient

from transferlab import tracking
from transferlab.config import Config, EvaluateConfig, MlflowConfig, write_params
from transferlab.paths import StagePaths

pytestmark = pytest.mark.slow

QUIET = ("mlflow.system_metrics=false",)


def client_for(root: Path, experiment: str = MlflowConfig().experiment) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=tracking.tracking_uri(MlflowConfig(), root))
    return client, client.get_experiment_by_name(experiment).experiment_id


@pytest.fixture
def project(hydra_project: Path, tmp_path: Path) -> StagePaths:
    """A fresh copy of `hydra_project` (its own MLflow store, models and reports)."""
    return StagePaths(Path(shutil.copytree(hydra_project, tmp_path / "project")))


# --- 1: two runs started together --------------------------------------------------------


def test_two_runs_started_together_keep_their_own_folders_and_results(project: StagePaths) -> None:
    """The issue's repro: both `transferlab-train` wrote one folder, and both MLflow runs then
    carried the same test metrics."""
    common = [*SYNTHETIC_OVERRIDES, *TINY_MODEL, "train.epochs=2", "mlflow.log_model=false", *QUIET]
    runs = [Process(["transferlab-train", *common, f"train.seed={seed}"], project.root) for seed in (1, 2)]
    for run in runs:
        assert run.finish() == 0, run.output[-3000:]
    folders = sorted((project.root / "outputs" / "runs").iterdir())
    assert len(folders) == 2, folders
    client, _ = client_for(project.root)
    seeds, run_ids = set(), set()
    for folder in folders:
        out = StagePaths(project.root, folder)
        record = tracking.RunRecord.read(out.run_file)
        run = client.get_run(record.run_id)
        on_disk = {key: value for key, value in json.loads(out.metrics.read_text()).items() if key.startswith("test_")}
        logged = {key: value for key, value in run.data.metrics.items() if key.startswith("test_")}
        assert logged == pytest.approx(on_disk), f"{folder.name}: MLflow holds another run's test metrics"
        seeds.add(run.data.params["train.seed"])
        run_ids.add(record.run_id)
    assert seeds == {"1", "2"} and len(run_ids) == 2


# --- 3, 4, 7: kills and SIGTERM while training (the model and its run record change together) ---


def saved_run(paths: StagePaths, client: MlflowClient, experiment_id: str) -> str:
    """The run `models/` holds, after checking that `models/model.keras` is the model that run
    logged, and `reports/history.csv` and `training_curves.png` are the ones it logged."""
    assert sorted(p.name for p in paths.models.iterdir()) == ["model.keras", "run.json"]
    run_id = tracking.RunRecord.read(paths.run_file).run_id
    ready = [m for m in logged_models(client, experiment_id, run_id) if m.status.name == "READY"]
    assert len(ready) == 1, [(m.model_id, m.status) for m in ready]
    logged = Path(urllib.parse.urlparse(ready[0].artifact_location).path) / "artifacts" / "model.keras"
    assert logged.read_bytes() == paths.model_file.read_bytes(), f"models/ mixes another model with run {run_id}"
    artifacts = Path(urllib.parse.urlparse(client.get_run(run_id).info.artifact_uri).path)
    for on_disk, artifact in ((paths.history, "history.csv"), (paths.training_curves, "figures/training_curves.png")):
        assert on_disk.read_bytes() == (artifacts / artifact).read_bytes(), f"{on_disk.name} is not run {run_id}'s"
    return run_id


def logged_models(client: MlflowClient, experiment_id: str, run_id: str) -> list:
    return list(client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"))


def test_kills_while_training_leave_the_old_model_and_run_or_the_new(project: StagePaths) -> None:
    """Five stops of `transferlab train` at five moments, one process each, each resuming the run
    the one before left; `models/` must pair a model with its own run after every one.

    The issue's repros: `kill -9` at "Validating input example" paired the new model with the old
    run (evaluate then logged into the old run) and the resumed run had two models; SIGTERM left
    the run RUNNING; a corrupt checkpoint blocked every later run; the resumed run kept the
    error tag of its interrupted attempt.
    """
    from transferlab.stages.train import train

    cfg = tiny_cfg("train.epochs=3", "train.feature_cache=false", *QUIET)
    write_params(cfg, project.root / "params.yaml")
    old = train(cfg, project).run_id  # the previous result, made in this process
    client, experiment_id = client_for(project.root)
    assert saved_run(project, client, experiment_id) == old
    state_file = project.checkpoints / "state.json"

    def new() -> str:
        return checkpointed_run(state_file)

    def stopped_at(moment: str | Callable[[], bool], signum: int = signal.SIGKILL) -> Process:
        process = Process(["transferlab", "train"], project.root)
        process.wait_for(moment)
        if signum == signal.SIGKILL:
            process.kill()
        else:
            assert process.stop(signum) == 128 + signum, process.output[-3000:]
        assert saved_run(project, client, experiment_id) in {old, new()}, f"after a stop at {moment!r}"
        return process

    stopped_at(r"head: .*epochs 1\.\.3")  # 1: the run started, no epoch done yet

    process = stopped_at(lambda: epochs_done(state_file) >= 2, signal.SIGTERM)  # 2: mid-training, SIGTERM
    assert process.output.strip().splitlines()[-1] == "interrupted (SIGTERM received)"
    assert "Traceback" not in process.output
    run = client.get_run(new())
    assert run.info.status == "KILLED" and run.data.tags[tracking.TAG_ERROR] == "Interrupted: SIGTERM received"
    state = json.loads(state_file.read_text())
    logged = sorted(m.step for m in client.get_metric_history(new(), "val_accuracy"))
    done = state["epochs_done"]  # the epoch checkpointed just as the signal came may be logged on resume
    assert logged in (list(range(1, done + 1)), list(range(1, done))), "each epoch logged once, none lost"
    before = json.loads((project.checkpoints / "previous.json").read_text())  # the epoch before's state
    newest, previous = state["model_file"], before["model_file"]
    (project.checkpoints / newest).write_bytes(b"PK\x03\x04 a checkpoint damaged on disk")

    process = stopped_at(r"wrote .*training_curves")  # 3: finishing, the model not yet saved
    assert f"checkpoint {newest} is unreadable" in process.output
    assert f"resuming from {previous}" in process.output
    # 4: MLflow is logging the new model (its INFO lines no longer reach the log, so the logged
    # model's PENDING state marks the moment)
    stopped_at(lambda: any(m.status.name == "PENDING" for m in logged_models(client, experiment_id, new())))
    # 5: models/ swapped (now or before); the run not ended
    stopped_at(r"model \(epoch \d+\) saved to|already holds run")
    resumed = new()
    assert saved_run(project, client, experiment_id) == resumed

    process = Process(["transferlab", "train"], project.root)
    assert process.finish() == 0, process.output[-3000:]
    assert f"already holds run {resumed}" in process.output
    run = client.get_run(resumed)
    assert run.info.status == "FINISHED" and tracking.TAG_ERROR not in run.data.tags
    assert [m.status.name for m in logged_models(client, experiment_id, resumed)] == ["READY"], "one, none PENDING"
    assert saved_run(project, client, experiment_id) == resumed
    # The epochs after the checkpoint resumed from were trained again: logged twice if they had
    # been logged before; every other epoch exactly once.
    retrained = range(before["epochs_done"] + 1, done + 1)
    steps = sorted(m.step for m in client.get_metric_history(resumed, "val_accuracy"))
    assert steps == sorted([1, 2, 3, *(epoch for epoch in retrained if epoch in logged)])
    assert pd.read_csv(project.history)["epoch"].tolist() == [1, 2, 3]
    assert not project.checkpoints.exists()


# --- 7: Ctrl-C and SIGTERM on `transferlab-train`, one run and a sweep ---------------------

# All 50 epochs, without early stopping: on the synthetic images it stopped a job within seconds,
# and a stop meant for its training could land after its run had ended, before evaluate began.
LONG_RUN = (*SYNTHETIC_OVERRIDES, *TINY_MODEL, "train.epochs=50", "train.early_stopping=null", *QUIET)


Moment = str | Callable[[], bool]


def stop_at(
    command: Sequence[str],
    root: Path,
    moment: Moment,
    signum: int,
    client: MlflowClient,
    evaluating: StagePaths | None = None,
) -> list[str]:
    """Start `command`, send `signum` at `moment`; check it stopped cleanly and that the runs it had
    open, and the run it was `evaluating` (training done: the run ended), end KILLED with the
    reason, none left RUNNING. Returns those runs.

    An evaluation can end in the fraction of a second between its first line and the signal (the
    runs open are read in between): a run of `evaluating` that MLflow records as FINISHED before
    the signal was sent is then whole, and the stop is one between jobs (moment 4 of a sweep)."""
    process = Process(command, root)
    process.wait_for(moment)
    stopped = [run.info.run_id for run in running_runs(client)]
    evaluated = tracking.RunRecord.read(evaluating.run_file).run_id if evaluating is not None else None
    if evaluated is not None:
        stopped.append(evaluated)
    name = signal.Signals(signum).name
    signal_sent_ms = time.time() * 1000
    assert process.stop(signum) == 128 + signum, f"at {moment!r}:\n{process.output[-3000:]}"
    # the last line of a run; a sweep's summary follows it
    assert f"interrupted ({name} received)" in [line.strip() for line in process.lines], process.output[-3000:]
    assert "Traceback" not in process.output, process.output[-3000:]
    assert stopped, f"no MLflow run was open at {moment!r}"
    for run_id in stopped:
        run = client.get_run(run_id)
        if run_id == evaluated and run.info.status == "FINISHED" and run.info.end_time < signal_sent_ms:
            assert evaluating is not None and job_outputs(evaluating, client) == evaluated, "a whole evaluation"
            continue
        assert run.info.status == "KILLED", f"{run.info.run_name} is {run.info.status} after a stop at {moment!r}"
        expected = f"Interrupted: {name} received"
        if run.data.tags.get(tracking.TAG_SWEEP) == "parent":
            expected = "sweep stopped early (KILLED) after "
        assert run.data.tags[tracking.TAG_ERROR].startswith(expected), (moment, run.data.tags[tracking.TAG_ERROR])
    assert not running_runs(client), f"runs left RUNNING after a stop at {moment!r}"
    return stopped


def store_client(root: Path) -> MlflowClient:
    """A client of the project's store, its tables made before any process under test opens it."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(MlflowConfig(), root))
    client.search_experiments()
    return client


def test_ctrl_c_at_five_moments_of_a_transferlab_train_run(project: StagePaths) -> None:
    """Ctrl-C at five moments of one `transferlab-train` run, each attempt resuming what the one
    before left in the run's folder. After each: the run KILLED with the reason, none RUNNING,
    and the folder empty or holding one run's whole results. The last stop came after training
    had ended (the run KILLED, not resumable): the next attempt trains a new run and finishes it."""
    folder = project.root / "outputs" / "runs" / "interrupted"
    out = StagePaths(project.root, folder)
    command = ["transferlab-train", *LONG_RUN, f"hydra.run.dir={folder}"]
    client = store_client(project.root)

    def model_pending() -> bool:
        return any(
            model.status.name == "PENDING"
            for run in running_runs(client)
            for model in logged_models(client, run.info.experiment_id, run.info.run_id)
        )

    moments: list[tuple[Moment, StagePaths | None]] = [
        (lambda: bool(running_runs(client)), None),  # 1: start-up, the MLflow run just created
        (r"computing pooled backbone features", None),  # 2: the backbone's features being cached
        (r"epoch 2/50", None),  # 3: mid-training
        (model_pending, None),  # 4: MLflow logging the model (before models/ is replaced)
        (r"evaluating .* on \d+ test images", out),  # 5: evaluate scoring the test split
    ]
    for moment, evaluating in moments:
        stopped = stop_at(command, project.root, moment, signal.SIGINT, client, evaluating)
        assert job_outputs(out, client) in {None, *stopped}, f"after Ctrl-C at {moment!r}"
    (evaluated,) = stopped
    assert job_outputs(out, client) == evaluated, "the last stop came after models/ was replaced"
    experiment_id = client.get_run(evaluated).info.experiment_id
    assert [m.status.name for m in logged_models(client, experiment_id, evaluated)] == ["READY"], "none PENDING"

    process = Process(command, project.root)  # its training had finished: trained again, in a new run
    assert process.finish() == 0, process.output[-3000:]
    rerun = saved_run(out, client, experiment_id)
    run = client.get_run(rerun)
    assert run.info.status == "FINISHED" and tracking.TAG_ERROR not in run.data.tags
    assert job_outputs(out, client) == rerun != evaluated and out.evaluation.exists()
    assert client.get_run(evaluated).info.status == "KILLED"
    assert not running_runs(client)


def two_job_sweep(project: StagePaths) -> tuple[list[str], Path, list[StagePaths]]:
    """The command of a sweep of two long jobs (learning rates 0.01 and 0.001), its folder, its jobs' paths."""
    sweep_dir = project.root / "outputs" / "sweeps" / "stopped"
    jobs = [StagePaths(project.root, sweep_dir / str(job)) for job in (0, 1)]
    sweep = ["-m", *LONG_RUN, "mlflow.log_model=false", "train.learning_rate=0.01,0.001"]
    return ["transferlab-train", *sweep, f"hydra.sweep.dir={sweep_dir}"], sweep_dir, jobs


def test_sigterm_at_five_moments_of_a_sweep(project: StagePaths) -> None:
    """SIGTERM at five moments of a two-job sweep, each attempt resuming the one before. After
    each: the parent and the running child KILLED with the reason, none RUNNING, each job's
    folder empty or whole; the last attempt skips the finished job, resumes the other in its run
    and finishes the sweep."""
    command, sweep_dir, jobs = two_job_sweep(project)
    client = store_client(project.root)
    moments: list[tuple[Moment, StagePaths | None]] = [
        (lambda: (sweep_dir / "mlflow_parent_run.json").exists(), None),  # 1: the parent made, no job started
        (lambda: epochs_done(jobs[0].checkpoints / "state.json") >= 1, None),  # 2: job 0 mid-training
        (r"evaluating .* on \d+ test images", jobs[0]),  # 3: job 0 evaluating
        (lambda: (sweep_dir / "0" / "job_result.json").exists(), None),  # 4: between the jobs
        (lambda: epochs_done(jobs[1].checkpoints / "state.json") >= 1, None),  # 5: job 1 mid-training
    ]
    for moment, evaluating in moments:
        stopped = stop_at(command, project.root, moment, signal.SIGTERM, client, evaluating)
        for job in jobs:
            job_outputs(job, client)  # nothing, or one run's whole results

    process = Process(command, project.root)
    assert process.finish() == 0, process.output[-3000:]
    assert "skipping train.learning_rate=0.01" in process.output, "job 0 finished before: skipped"
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(MlflowConfig().experiment).experiment_id],
        f"tags.`{tracking.TAG_SWEEP}` = 'parent'",
    )
    assert parent.info.status == "FINISHED" and tracking.TAG_ERROR not in parent.data.tags
    results = [job_outputs(job, client) for job in jobs]
    assert len(set(results)) == 2 and set(results) <= set(finished_children(client, parent.info.run_id))
    assert results[1] in stopped, "job 1 resumed in the run its stop left KILLED"
    assert not running_runs(client)


def test_sigterm_as_a_finished_sweep_job_is_freed(project: StagePaths) -> None:
    """SIGTERM just after a sweep job's run has ended, as the job's models are freed: landing in a
    finaliser, the stop was printed as "Exception ignored in ..." with a traceback. Now the sweep
    stops with its one line, the job stays FINISHED and whole, and the rerun skips it."""
    command, _, jobs = two_job_sweep(project)
    client = store_client(project.root)

    def job_0_evaluated() -> bool:
        if not jobs[0].run_file.exists():
            return False
        run = client.get_run(tracking.RunRecord.read(jobs[0].run_file).run_id)
        return run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics

    stop_at(command, project.root, job_0_evaluated, signal.SIGTERM, client, jobs[0])
    process = Process(command, project.root)
    assert process.finish() == 0, process.output[-3000:]
    assert "skipping train.learning_rate=0.01" in process.output, "job 0 finished before: skipped"


def finished_children(client: MlflowClient, parent_id: str) -> list[str]:
    """Run ids of the FINISHED children of the sweep parent `parent_id`."""
    experiment = client.get_experiment_by_name(MlflowConfig().experiment)
    query = f"attributes.status = 'FINISHED' and tags.`mlflow.parentRunId` = '{parent_id}'"
    return [run.info.run_id for run in client.search_runs([experiment.experiment_id], query)]


# --- 9: kills while evaluating (the reports change as one unit) ----------------------------


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def newest_metrics_batch(client: MlflowClient, run_id: str) -> set[str]:
    """The test metrics MLflow got last (evaluate logs them in one batch, one timestamp)."""
    latest = {
        key: max(m.timestamp for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
        if key.startswith("test_")
    }
    newest = max(latest.values())
    return {key for key, stamp in latest.items() if stamp == newest}


def test_kills_while_evaluating_leave_the_old_reports_or_the_new(
    tmp_path: Path, colour_model: Path, synthetic_cfg: Config
) -> None:
    """The issue's repro: a kill after metrics.json was written left new metrics beside old
    figures, and no test metrics in MLflow."""
    from transferlab.stages.evaluate import evaluate

    base = colour_config(synthetic_cfg)
    configs = {
        "A": base,
        "B": dataclasses.replace(base, evaluate=EvaluateConfig(top_k=3, misclassified=2, calibration_bins=7)),
    }
    paths = make_project(tmp_path / "project", colour_model, base)
    results, batches = {}, {}
    for name, cfg in configs.items():  # both complete results, made in this process
        batches[name] = set(evaluate(cfg, paths))
        results[name] = contents(paths.evaluation)
    assert results["A"] != results["B"] and batches["A"] != batches["B"]
    client, _ = client_for(paths.root, base.mlflow.experiment)
    run_id = tracking.RunRecord.read(paths.run_file).run_id
    current = "B"
    moments = [
        r"evaluating .* on 12 test images",  # nothing written yet
        r"wrote .*confusion_matrix\.png",  # the first figure, in the folder aside
        r"wrote .*reliability\.png",  # the last figure
        r"logging the evaluation to MLflow",  # reports and metrics going to MLflow
        r"test accuracy",  # the folder swapped in: the last line
    ]
    for moment in moments:
        other = "A" if current == "B" else "B"
        write_params(configs[other], paths.root / "params.yaml")
        process = Process(["transferlab", "evaluate"], paths.root)
        process.wait_for(moment)
        process.kill(may_have_ended=moment == moments[-1])
        on_disk = [name for name, result in results.items() if contents(paths.evaluation) == result]
        assert on_disk in (["A"], ["B"]), f"after a kill at {moment!r}: reports/evaluation mixes two evaluations"
        current = on_disk[0]
        assert newest_metrics_batch(client, run_id) in batches.values(), f"after a kill at {moment!r}"
    assert current == other, "the last kill came after the swap"


# --- 2: bad requests to the served model ---------------------------------------------------


def test_bad_requests_get_400_with_the_reason_and_the_server_keeps_its_memory(
    model_server: ModelServer, colour_image
) -> None:
    """A PNG declaring 16000 x 16000 pixels made the worker grow by 0.8 GB and answer 200;
    20,000 rows were accepted (5.3 GB) and the worker kept 3.1 GB afterwards."""
    from transferlab.serving import IMAGE_COLUMN, encode_image_file

    def request(images: list[str]) -> dict:
        return {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[image] for image in images]}}

    good = encode_image_file(colour_image("red.png", (230, 20, 20)))
    assert model_server.post(request([good] * 3))[0] == 200  # warm: the model is loaded and traced
    before = model_server.rss_mb()

    bomb = base64.b64encode(declared_png(16000, 16000)).decode()
    status, body = model_server.post(request([good, bomb]))
    assert status == 400
    assert "row 1: image is 16000x16000 pixels, over the limit of 67,108,864" in body["message"]
    assert "stack_trace" not in body
    for rows in (SERVE_MAX_ROWS + 1, 20_000):  # 20,000: the request
        status, body = model_server.post(request([good] * rows))
        assert status == 400
        assert f"request has {rows} rows, over the limit of {SERVE_MAX_ROWS}" in body["message"]
        assert "stack_trace" not in body
    status, body = model_server.post(request([good] * SERVE_MAX_ROWS))  # two chunks
    assert status == 200 and [row["label"] for row in body["predictions"]] == ["red"] * SERVE_MAX_ROWS

    grown = model_server.rss_mb() - before
    assert grown < 150, f"the server grew by {grown:.0f} MB"


# --- 2, 5, 6, 8: the commands' one-line refusals ---------------------------------------------


def run_command(cwd: Path, *command: str) -> tuple[int, str]:
    process = Process(command, cwd)
    return process.finish(), process.output


def test_archive_bomb_is_refused_in_one_line_and_the_dataset_kept(tmp_path: Path) -> None:
    from transferlab.config import compose

    images = tmp_path / "images"
    for label in ("cats", "dogs"):
        (images / label).mkdir(parents=True)
        (images / label / "a.png").write_bytes(declared_png(8, 8))
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("cats/zeros.png", "w") as member:
        for _ in range(64):
            member.write(bytes(2**20))
    for source, expected in ((images, 0), (bomb, 2)):
        cfg = compose(["data=folder", f"data.source={source}", "data.name=pets"], config_dir=REPO_ROOT / "conf")
        write_params(cfg, tmp_path / "params.yaml")
        status, output = run_command(tmp_path, "transferlab", "download")
        assert status == expected, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"DownloadError: {bomb}: member 'cats/zeros.png' expands the")
    assert "data.max_compression_ratio" in last
    assert sorted(p.relative_to(tmp_path / "data" / "raw").as_posix() for p in (tmp_path / "data/raw").rglob("*")) == [
        "pets",
        "pets/cats",
        "pets/cats/a.png",
        "pets/dogs",
        "pets/dogs/a.png",
    ]


def test_links_are_followed_and_oversized_images_skipped(tmp_path: Path) -> None:
    from PIL import Image

    from transferlab.config import compose

    images = tmp_path / "images"
    for label, rgb in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        (images / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), rgb).save(images / label / f"{i}.png")
    (images / "red" / "linked.png").symlink_to("0.png")  # relative
    (images / "blue" / "bomb.png").write_bytes(declared_png(16000, 16000))
    cfg = compose(["data=folder", f"data.source={images}", "data.name=colours"], config_dir=REPO_ROOT / "conf")
    write_params(cfg, tmp_path / "params.yaml")
    for stage in ("download", "split"):
        status, output = run_command(tmp_path, "transferlab", stage)
        assert status == 0, output[-2000:]
    report = json.loads(StagePaths(tmp_path).split_report.read_text())
    assert report["counts"]["red"]["total"] == 4, "the linked image is used"
    (skipped,) = report["skipped"]
    assert skipped["path"] == "blue/bomb.png"
    assert skipped["reason"].startswith("too large to decode safely: image is 16000x16000 pixels")


def test_out_of_range_seed_is_one_line_at_the_door(project: StagePaths) -> None:
    status, output = run_command(project.root, "transferlab", "compose", "train.seed=-5", "--out", "seed.yaml")
    assert status == 2 and output.strip().splitlines()[-1] == (
        "ConfigError: train.seed must be in [0, 4294967295] (2**32 - 1), got -5"
    )
    status, output = run_command(project.root, "transferlab-train", *SYNTHETIC_OVERRIDES, "train.seed=4294967296")
    assert status == 2 and output.strip().splitlines()[-1].startswith("ConfigError: train.seed must be in [0, ")
    assert "Traceback" not in output


def test_a_missing_input_stops_make_run_before_dvc_removes_anything(project_copy: Path, tmp_path: Path) -> None:
    """A new user's `compose model.weights=/nonexistent.h5`, then `make run`: DVC removed models/
    before the train stage found the file missing. `transferlab repro` now stops first; under
    plain `dvc repro` the source stage stops first, and a stage that fails after DVC removed its
    outputs says how to get them back."""
    images = class_folders(tmp_path / "images")
    status, output = run_command(project_copy, "transferlab", "compose", "data=folder", f"data.source={images}")
    assert status == 0 and "does not exist" not in output, output[-2000:]
    status, output = run_command(project_copy, "transferlab", "repro", "split")
    assert status == 0, output[-2000:]
    prepared = contents(project_copy / "data")

    missing = tmp_path / "moved-away"
    status, output = run_command(project_copy, "transferlab", "compose", f"data.source={missing}")
    assert status == 0 and f"data.source {missing} does not exist: `make run`" in output, output[-2000:]
    status, output = run_command(project_copy, "transferlab", "repro", "split")
    assert status == 2 and output.strip().splitlines()[-1] == (
        f"ConfigError: data.source {missing} does not exist: no stage was run (set it with `transferlab compose`)"
    )
    assert contents(project_copy / "data") == prepared, "nothing removed"
    status, output = run_command(project_copy, "dvc", "repro", "split")  # around that check
    assert status != 0 and f"DownloadError: data.source {missing} does not exist" in output, output[-2000:]
    assert "dvc checkout" not in output and contents(project_copy / "data") == prepared, "the source stage kept it"

    not_an_archive = tmp_path / "photos.tgz"
    not_an_archive.write_text("not an archive")
    run_command(project_copy, "transferlab", "compose", f"data.source={not_an_archive}")
    status, output = run_command(project_copy, "dvc", "repro", "split")
    assert status != 0 and "is neither a .tgz/.tar/.zip archive" in output and "Running stage 'download'" not in output
    assert contents(project_copy / "data") == prepared, "stopped by the source stage"

    escaping = tmp_path / "escaping.zip"  # an archive the source stage accepts and the download refuses
    with zipfile.ZipFile(escaping, "w") as zf:
        zf.writestr("../outside.png", b"")
    run_command(project_copy, "transferlab", "compose", f"data.source={escaping}")
    status, output = run_command(project_copy, "dvc", "repro", "split")  # the download runs: DVC removes data/raw
    assert status != 0 and "`dvc checkout download` restores them" in output, output[-2000:]
    status, output = run_command(project_copy, "dvc", "checkout", "download")
    restored = {**contents(project_copy / "data"), "source.json": prepared["source.json"]}  # the source stage's
    assert status == 0 and restored == prepared, output[-2000:]


def test_an_empty_class_folder_stops_the_download_in_one_line(tmp_path: Path) -> None:
    """DVC keeps no empty folders, so an empty class folder used to vanish without a word."""
    from transferlab.config import compose

    images = class_folders(tmp_path / "images")
    (images / "green").mkdir()
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(images.rglob("*")):
            zf.write(path, path.relative_to(images).as_posix())
    for source in (images, archive):
        cfg = compose(["data=folder", f"data.source={source}", "data.name=colours"], config_dir=REPO_ROOT / "conf")
        write_params(cfg, tmp_path / "params.yaml")
        status, output = run_command(tmp_path, "transferlab", "download")
        assert status == 2 and output.strip().splitlines()[-1] == (
            f"DataError: class folder 'green' of {source} holds no files: add images to it or remove it"
        )
        assert not (tmp_path / "data" / "raw" / "colours").exists()
