"""What a user sees, checked in a real browser: `make demo` and a small sweep, then the MLflow UI
(`mlflow ui` on 127.0.0.1) and the `dvc plots show` page rendered by headless Chromium.

The module runs the real demo (`python -m transferlab.demo`: `dvc repro` on synthetic images) in a
copy of the repo, then a two-job Hydra sweep on the demo's splits into the same MLflow store:
- the demo and the sweep print no TensorFlow or MLflow internals;
- the demo's run lists its three datasets and is version 1 of the registered model; the sweep's
  best child is `<name>@candidate`, and `transferlab predict models:/<name>@candidate` works;
- over the `mlflow ui` server (a tracking server), `promote` moves `champion` and the model fetches;
- Chromium renders the run page, the experiment page, the compare view of the sweep's children,
  the registered model's page and the DVC plots page; their DOMs hold what a user looks for.
`KEEP_SCREENSHOTS=1` keeps screenshots of each page in reports/. Without Chromium (Debian package
`chromium`; `.ci/run` installs it) the browser checks are skipped, except in CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO_ROOT, VENV_BIN, chatter, offline_dom, user_environment, wait_until_answering
from mlflow.tracking import MlflowClient

from transferlab import registry, tracking
from transferlab.config import MlflowConfig
from transferlab.workspace import copy_project

pytestmark = pytest.mark.slow

EXPERIMENT = "transferlab-demo"  # conf/experiment/demo.yaml
MODEL_NAME = "synthetic-classifier"  # mlflow.registered_model: ${data.name}-classifier
SWEEP = ("+experiment=demo", "train.epochs=2", "finetune.epochs=1", "model.dropout=0.1,0.5")
# Chromium runs JavaScript for this much virtual time, then dumps the DOM (without it, it never stops).
VIRTUAL_TIME_MS = 15_000


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in user_environment().items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"})
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def run(command: list[str], cwd: Path, timeout: float = 900, **env: str) -> str:
    """Run a command; it must succeed and print no library internals. Returns its stdout."""
    done = subprocess.run(command, cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    assert chatter(output) == [], f"{' '.join(command)} printed library internals"
    return done.stdout


@dataclass
class Demo:
    repo: Path  # the copy of the repo `make demo` ran in (its mlruns/ is the store)
    workdir: Path  # build/demo: the pipeline's scratch copy
    store_uri: str
    client: MlflowClient
    experiment_id: str
    run_id: str  # the demo's training run
    parent_id: str  # the sweep's parent run
    children: list[str]
    best_child: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """`make demo`, then a two-job sweep on its splits, in a copy of the repo."""
    repo = copy_project(REPO_ROOT, tmp_path_factory.mktemp("ui") / "repo")
    run([sys.executable, "-m", "transferlab.demo"], cwd=repo)
    workdir = repo / "build" / "demo"
    store_uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    sweep = [str(VENV_BIN / "transferlab-train"), "-m", *SWEEP, "hydra.sweep.dir=outputs/sweeps/ui"]
    run(sweep, cwd=workdir, MLFLOW_TRACKING_URI=store_uri)

    client = MlflowClient(store_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`transferlab.sweep` = 'parent'")
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    run_id = json.loads((workdir / "models" / "run.json").read_text())["run_id"]
    best = parent.data.tags[tracking.TAG_BEST_CHILD]
    return Demo(
        repo,
        workdir,
        store_uri,
        client,
        experiment_id,
        run_id,
        parent.info.run_id,
        [r.info.run_id for r in children],
        best,
    )


def test_the_demo_run_lists_three_datasets_and_is_a_registered_version(demo: Demo) -> None:
    run = demo.client.get_run(demo.run_id)
    inputs = {
        d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for d in run.inputs.dataset_inputs
    }
    assert inputs == {"synthetic-train": "training", "synthetic-val": "validation", "synthetic-test": "test"}
    assert demo.client.get_model_version(MODEL_NAME, "1").run_id == demo.run_id
    assert "**Test**: accuracy" in run.data.tags["mlflow.note.content"]


def test_the_sweeps_best_child_is_the_candidate_and_predicts_by_alias(demo: Demo) -> None:
    assert len(demo.children) == 2
    candidate = demo.client.get_model_version_by_alias(MODEL_NAME, registry.CANDIDATE_ALIAS)
    assert candidate.run_id == demo.best_child
    registered = {v.run_id for v in demo.client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert registered == {demo.run_id, demo.best_child}, "sweep children are not registered, only the best"
    assert "sweep_val_accuracy.png" in {a.path for a in demo.client.list_artifacts(demo.parent_id)}

    image = next((demo.workdir / "data" / "raw" / "synthetic" / "red_circle").glob("*.jpg"))
    command = ["transferlab", "predict", f"models:/{MODEL_NAME}@candidate", str(image), "--json"]
    prediction = json.loads(run(command, cwd=demo.workdir, MLFLOW_TRACKING_URI=demo.store_uri))[0]["predictions"][0]
    assert prediction["label"] in {"red_circle", "green_square", "blue_triangle"}


# --- the MLflow UI ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ui(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow ui` over the demo's store on 127.0.0.1; yields its base URL, stops it afterwards."""
    port = _free_port()
    mlruns = demo.repo / "mlruns"
    command = [str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", demo.store_uri]
    command += ["--default-artifact-root", str(mlruns / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1"]
    log_file = tmp_path_factory.mktemp("ui_server") / "mlflow_ui.log"
    env = environment(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner: starts in seconds
    with log_file.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(server, f"{base}/health", log_file, "mlflow ui")
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the process group this fixture started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_the_registry_works_over_a_tracking_server(demo: Demo, ui: str) -> None:
    """The same promote and `models:/` fetch through the UI's server (an `mlflow server`) instead of SQLite."""
    cfg = MlflowConfig(tracking_uri=ui)
    store = tracking.connect(cfg, demo.workdir)
    assert registry.promote(store, MODEL_NAME, demo.run_id, "champion") == "1"
    assert demo.client.get_model_version_by_alias(MODEL_NAME, "champion").run_id == demo.run_id
    with registry.local_model(f"models:/{MODEL_NAME}@champion", cfg, demo.workdir) as model_file:
        assert model_file.suffix == ".keras" and model_file.stat().st_size > 0
        classes = json.loads((model_file.parent / "classes.json").read_text())
    assert classes == ["blue_triangle", "green_square", "red_circle"]


def render(page: str | Path, name: str) -> str:
    """The DOM of `page` (a URL on 127.0.0.1 or a local file) after Chromium ran its JavaScript;
    with KEEP_SCREENSHOTS=1 also a screenshot, reports/<name>.png."""
    keep = os.environ.get("KEEP_SCREENSHOTS") == "1"
    return offline_dom(page, VIRTUAL_TIME_MS, REPO_ROOT / "reports" / f"{name}.png" if keep else None)


def visible_text(dom: str) -> str:
    """The page's text, tags removed (what a person reads)."""
    import html

    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "\n", text))


def js_number(value: float) -> str:
    """A number as the UI's JavaScript shows it (shortest round-trip form, no trailing .0)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def test_the_run_page_shows_name_metrics_datasets_description_and_registered_model(demo: Demo, ui: str) -> None:
    run = demo.client.get_run(demo.run_id)
    text = visible_text(render(f"{ui}/#/experiments/{demo.experiment_id}/runs/{demo.run_id}", "ui_run"))
    assert run.info.run_name in text
    assert js_number(run.data.metrics["test_accuracy"]) in text
    assert f"synthetic-train ({run.data.tags[tracking.TAG_MANIFEST_HASH]})" in text
    assert "+2" in text, "the run page shows one dataset and +2 more"
    assert MODEL_NAME in text and "v1" in text, "Registered models: the version this run made"
    assert "Best epoch" in text and "small_cnn" in text, "the description"


def test_the_experiment_page_lists_runs_with_their_datasets(demo: Demo, ui: str) -> None:
    url = f"{ui}/#/experiments/{demo.experiment_id}/runs?workflowType=machine_learning"
    text = visible_text(render(url, "ui_experiment"))
    for name in ("synthetic-train", "synthetic-val", "synthetic-test", "small_cnn-synthetic", "sweep-ui"):
        assert name in text, name


def test_the_compare_view_shows_the_childrens_params(demo: Demo, ui: str) -> None:
    runs = json.dumps(demo.children)
    url = f"{ui}/#/compare-runs?runs={runs}&experiments={json.dumps([demo.experiment_id])}"
    text = visible_text(render(url.replace(" ", ""), "ui_compare"))
    assert "model.dropout" in text and "0.1" in text and "0.5" in text
    # The metrics table is a virtualised grid 300 px high: only its first rows, in alphabetical
    # order, are in the DOM. `test_accuracy` sorts after `system/*`, which a run logs only once it
    # outlasts MLflow's sampling interval (on a loaded machine), so its row may not be rendered.
    assert registry.VALIDATION_METRIC in text, "the metric the sweep ranks its children by"


def test_the_model_page_shows_versions_and_aliases(demo: Demo, ui: str) -> None:
    text = visible_text(render(f"{ui}/#/models/{MODEL_NAME}", "ui_model"))
    assert "Version 1" in text and "Version 2" in text
    assert "candidate" in text, "the alias the sweep set"


# --- dvc plots show ----------------------------------------------------------------------------


def plot_sections(dom: str) -> dict[str, str]:
    """The rendered DOM of each plot `<div id=...>` of a `dvc plots show` page."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="([^"]+)"', dom)]
    ends = [start for start, _ in starts[1:]] + [len(dom)]
    return {name: dom[start:end] for (start, name), end in zip(starts, ends, strict=True)}


def test_dvc_plots_draw_the_confusion_matrix_and_accuracy_curves(demo: Demo, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    run(["dvc", "plots", "show", "--out", str(out)], cwd=demo.workdir)
    sections = plot_sections(render(out / "index.html", "dvc_plots"))
    confusion, accuracy = sections["confusion"], sections["accuracy"]
    classes = 3
    assert "<svg" in confusion and confusion.count('aria-roledescription="rect mark"') >= classes
    assert "Test confusion matrix" in confusion
    assert "<svg" in accuracy and accuracy.count('aria-roledescription="line mark"') >= 2  # train and validation
    assert "Training and validation accuracy" in accuracy
    search = sections["l2_search"]  # the demo's head is fitted by L-BFGS: its search is its curve
    assert "<svg" in search and search.count('aria-roledescription="line mark"') >= 2
    assert "L-BFGS head: loss per L2 strength" in search
