"""One project, three entry points: `dvc repro`, a Hydra sweep and `dvc exp run` agree.

In a scratch copy of the repo, once for this module, as a user would: `transferlab compose` with
their own images (a folder of class folders outside the project), `dvc repro`, a sweep with no data
overrides, then `dvc exp run -S model.dropout=0.3`. The tests read back what each command printed
and what landed in MLflow, git and DVC; the last one renders `dvc plots show` in a browser with
the network off.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO_ROOT, VENV_BIN, offline_dom
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from transferlab import tracking
from transferlab.config import MlflowConfig, SyntheticConfig
from transferlab.synthetic import generate
from transferlab.workspace import copy_project

SETTINGS = (
    "model=small_cnn",
    "data.image_size=64",
    "train.batch_size=8",
    "train.epochs=1",
    "mlflow.log_model=false",
    "mlflow.system_metrics=false",
)
SWEEP_DIR = "outputs/sweeps/entrypoints"
EXPERIMENT = "dropout-03"
VEGA_PLOTS = 5  # dvc.yaml: confusion, accuracy, loss, l2_search, per_class_f1 (the other four are PNG images)


@dataclass
class Project:
    root: Path
    images: Path
    printed: dict[str, str]  # what each step printed (stdout + stderr)
    pipeline_run: str  # the MLflow run `dvc repro` made
    client: MlflowClient

    def runs(self) -> list[Run]:
        experiment = self.client.get_experiment_by_name(MlflowConfig().experiment)
        return self.client.search_runs([experiment.experiment_id])

    def run_command(self, *args: str) -> str:
        return _run(self.root, *args)


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    base = tmp_path_factory.mktemp("entrypoints")
    images = base / "my_images"
    generate(SyntheticConfig(num_classes=3, images_per_class=12, image_size=64), images)
    root = copy_project(REPO_ROOT, base / "repo")
    own_images = ("data=folder", f"data.source={images}", "data.name=my_images")
    printed = {"compose": _run(root, "transferlab", "compose", *own_images, *SETTINGS)}
    git = ("git", "-c", "user.name=transferlab tests", "-c", "user.email=tests@transferlab.invalid")
    _run(root, *git, "add", "-A")
    _run(root, *git, "commit", "-q", "-m", "project settings: own images")
    printed["repro"] = _run(root, "dvc", "repro")
    pipeline_run = json.loads((root / "models" / "run.json").read_text())["run_id"]
    printed["sweep"] = _run(root, "transferlab-train", "-m", "model.dropout=0.1,0.2", f"hydra.sweep.dir={SWEEP_DIR}")
    printed["exp"] = _run(root, "dvc", "exp", "run", "-S", "model.dropout=0.3", "--name", EXPERIMENT)
    with pytest.MonkeyPatch.context() as env:  # MLflow sets it for the store an earlier test opened
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = MlflowClient(tracking.tracking_uri(MlflowConfig(), root))
    return Project(root, images, printed, pipeline_run, client)


@pytest.mark.slow
def test_all_three_train_on_the_project_settings_images(project: Project) -> None:
    assert "data.source=" in project.printed["compose"] and "wrote params.yaml" in project.printed["compose"]
    runs = project.runs()
    assert len(runs) == 1 + 2 + 1 + 1  # dvc repro, two sweep jobs and their parent, the experiment
    trained = [run for run in runs if run.data.tags.get(tracking.TAG_SWEEP) != "parent"]
    assert {run.info.status for run in trained} == {"FINISHED"}
    for run in trained:
        assert run.data.params["data.source"] == str(project.images)
        assert run.data.params["data.name"] == "my_images"
    assert len({run.data.tags[tracking.TAG_MANIFEST_HASH] for run in trained}) == 1, "the same splits"
    dropouts = sorted(float(run.data.params["model.dropout"]) for run in trained)
    assert dropouts == [0.1, 0.2, 0.2, 0.3]


@pytest.mark.slow
def test_each_entry_point_prints_where_its_results_are(project: Project) -> None:
    for step in ("repro", "exp"):
        assert re.search(
            r"results: \S*reports/evaluation/metrics\.json, \S*reports/evaluation/figures/ and \S*models/model\.keras",
            project.printed[step],
        )
    assert f"Ran experiment(s): {EXPERIMENT}" in project.printed["exp"]
    assert re.search(
        rf"sweep summary: {SWEEP_DIR}/sweep_summary\.csv; MLflow parent run \w+ \(FINISHED\)", project.printed["sweep"]
    )


@pytest.mark.slow
def test_the_sweeps_parent_links_only_to_its_own_children(project: Project) -> None:
    """Job model.dropout=0.2 has the config of the `dvc repro` run: it is trained as this sweep's child."""
    runs = project.runs()
    (parent,) = [run for run in runs if run.data.tags.get(tracking.TAG_SWEEP) == "parent"]
    children = {run.info.run_id for run in runs if run.data.tags.get(tracking.TAG_PARENT_RUN) == parent.info.run_id}
    summary = list(csv.DictReader((project.root / SWEEP_DIR / "sweep_summary.csv").open()))
    assert [row["status"] for row in summary] == ["FINISHED", "FINISHED"]
    assert {row["run_id"] for row in summary} == children
    assert project.pipeline_run not in children
    assert parent.data.tags[tracking.TAG_BEST_CHILD] in children


@pytest.mark.slow
def test_the_experiments_run_carries_its_name_and_dvc_links_back(project: Project) -> None:
    (run,) = [r for r in project.runs() if r.data.tags.get(tracking.TAG_DVC_EXP_NAME) == EXPERIMENT]
    assert run.info.run_name == EXPERIMENT
    assert run.data.params["model.dropout"] == "0.3"
    baseline = project.run_command("git", "rev-parse", "HEAD").strip()
    assert run.data.tags[tracking.TAG_DVC_EXP_BASELINE] == baseline
    assert run.data.tags[tracking.TAG_GIT_COMMIT] == baseline  # what was checked out while it ran
    ref = run.data.tags[tracking.TAG_DVC_EXP_REF]
    assert ref.startswith(f"refs/exps/{baseline[:2]}/{baseline[2:]}/") and ref.endswith(EXPERIMENT)
    experiment_commit = project.run_command("git", "rev-parse", ref).strip()
    # The reverse link: the experiment's metrics name its MLflow run, as `dvc exp show` lists them.
    shown = json.loads(project.run_command("dvc", "exp", "show", "--json"))
    (record,) = [exp for row in shown for exp in row.get("experiments") or [] if exp.get("name") == EXPERIMENT]
    assert record["revs"][0]["rev"] == experiment_commit
    metrics = record["revs"][0]["data"]["metrics"]["reports/evaluation/metrics.json"]["data"]
    assert metrics["mlflow_run_id"] == run.info.run_id
    assert metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])


@pytest.mark.slow
def test_exps_shows_what_differs_and_the_three_test_metrics(project: Project) -> None:
    rows = list(csv.DictReader(io.StringIO(project.run_command("transferlab", "exps", "--csv"))))
    columns = set(rows[0])
    wanted = {"test_accuracy", "test_macro_f1", "test_ece", "mlflow_run_id", "model.dropout"}
    assert wanted <= columns
    assert not [c for c in columns if c.startswith(("test_", "final_", "data", "src/", "models/")) and c not in wanted]
    table = project.run_command("transferlab", "exps", "--md")
    assert max(len(line) for line in table.splitlines()) < 160
    assert EXPERIMENT in table


@pytest.mark.slow
def test_dvc_plots_render_with_the_network_off(project: Project) -> None:
    from dvc_render.html import PAGE_HTML  # DVC's own page, which loads Vega from a CDN

    project.run_command("dvc", "plots", "show")
    page = project.root / "dvc_plots" / "index.html"
    assert not re.search(r"<script[^>]*\bsrc=", page.read_text())
    dom = offline_dom(page)
    assert dom.count('class="marks"') == VEGA_PLOTS, "every Vega plot drew its SVG"
    assert dom.count('role="graphics-symbol"') > VEGA_PLOTS
    assert dom.count("<img") >= 4  # the PNG figures
    # The check has teeth: DVC's default page draws nothing offline.
    default = project.root / "default_template.html"
    default.write_text(PAGE_HTML)
    project.run_command("dvc", "plots", "show", "--html-template", str(default), "-o", "default_plots")
    assert offline_dom(project.root / "default_plots" / "index.html").count('class="marks"') == 0
    assert "dvc_plots" not in project.run_command("git", "status", "--porcelain"), "git-ignored"
