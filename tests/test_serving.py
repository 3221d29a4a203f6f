"""serving.py: the pyfunc wrapper, `runs:/<id>/model` loading, and `mlflow models serve` of
`models:/<name>@<alias>` over HTTP."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from transferlab.config import Config, MlflowConfig
from transferlab.registry import register_run_model
from transferlab.serving import (
    IMAGE_COLUMN,
    ImageClassifierModel,
    encode_image_file,
    model_signature,
    pip_requirements,
    to_output_frame,
)

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
SERVER_START_TIMEOUT_S = 180
REGISTERED = "colours-classifier"  # the served model is addressed by registered name and alias


@pytest.fixture
def colour_requests(colour_image) -> tuple[list[str], list[str]]:
    """(expected labels, base64 images) in three formats."""
    files = [colour_image("r.png", COLOURS["red"]), colour_image("b.jpg", COLOURS["blue"])]
    files.append(colour_image("g.bmp", COLOURS["green"]))
    return ["red", "blue", "green"], [encode_image_file(f) for f in files]


def test_output_frame_columns_and_values() -> None:
    frame = to_output_frame(pd.DataFrame([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]).to_numpy(), CLASSES)
    assert list(frame.columns) == ["label", "probability", "red", "green", "blue"]
    assert frame["label"].tolist() == ["green", "red"]
    assert frame["probability"].tolist() == pytest.approx([0.7, 0.6])


def test_signature_and_pinned_requirements() -> None:
    signature = model_signature(CLASSES)
    assert signature.inputs.input_names() == [IMAGE_COLUMN]
    assert signature.outputs.input_names() == ["label", "probability", *CLASSES]
    pins = {line.split("==")[0]: line.split("==")[1] for line in pip_requirements()}
    assert {"mlflow", "keras", "numpy", "pandas", "pillow", "cloudpickle"} <= set(pins)
    assert any(name.startswith("tensorflow") for name in pins)
    assert all(pins.values())


def test_python_model_predicts_from_base64(colour_model: Path, colour_requests: tuple[list[str], list[str]]) -> None:
    import mlflow

    model = ImageClassifierModel()
    context = mlflow.pyfunc.PythonModelContext(
        artifacts={"keras_model": str(colour_model)}, model_config={"classes": CLASSES, "image_size": 64}
    )
    model.load_context(context)
    labels, images = colour_requests
    out = model.predict(context, pd.DataFrame({IMAGE_COLUMN: images}))
    assert out["label"].tolist() == labels
    assert (out["probability"] > 0.9).all()
    assert out[CLASSES].sum(axis=1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    empty = model.predict(context, pd.DataFrame({IMAGE_COLUMN: pd.Series([], dtype=str)}))
    assert empty.empty and list(empty.columns) == ["label", "probability", *CLASSES]
    data_url = "data:image/png;base64," + images[0]
    assert model.predict(context, pd.DataFrame({IMAGE_COLUMN: [data_url]}))["label"].tolist() == ["red"]
    with pytest.raises(ValueError, match="row 1: 'image' is not valid base64"):
        model.predict(context, pd.DataFrame({IMAGE_COLUMN: [images[0], "%%% not base64"]}))
    with pytest.raises(ValueError, match="row 0: not a readable image"):
        model.predict(context, pd.DataFrame({IMAGE_COLUMN: ["aGVsbG8gd29ybGQ="]}))


@pytest.fixture(scope="module")
def logged_run(
    colour_model: Path, synthetic_cfg: Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A training-like MLflow run (sqlite store in a temp project) holding the colour model: (run id, URI)."""
    from transferlab.tracking import open_store

    root = tmp_path_factory.mktemp("serving_project")
    cfg = dataclasses.replace(synthetic_cfg, mlflow=MlflowConfig(system_metrics=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        with open_store(cfg.mlflow, root).start_run(run_name="serving-test") as run:
            run.log_metrics({"val_accuracy": 1.0})
            run.log_model(colour_model, CLASSES, 64)
        run.record.write(root / "models" / "run.json")
        register_run_model(run.store, REGISTERED, run.run_id, alias="champion")
        yield run.run_id, run.store.uri


@pytest.mark.slow
def test_runs_uri_resolves_to_the_logged_model(
    logged_run: tuple[str, str], colour_requests: tuple[list[str], list[str]]
) -> None:
    import mlflow

    run_id, uri = logged_run
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert loaded.metadata.run_id == run_id
    assert loaded.metadata.model_id  # an MLflow 3 LoggedModel
    labels, images = colour_requests
    assert loaded.predict(pd.DataFrame({IMAGE_COLUMN: images}))["label"].tolist() == labels


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_for_ping(base: str, server: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"no /ping answer within {SERVER_START_TIMEOUT_S} s:\n{log_file.read_text()[-3000:]}")


@pytest.mark.slow
def test_mlflow_models_serve_round_trip(
    logged_run: tuple[str, str], colour_requests: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    _, uri = logged_run
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the server execs `uvicorn`
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{REGISTERED}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log_file = tmp_path / "serve.log"
    with log_file.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_ping(base, server, log_file)
        labels, images = colour_requests
        split = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[image] for image in images]}}
        status, body = _post(f"{base}/invocations", split)
        assert status == 200, body
        assert [row["label"] for row in body["predictions"]] == labels
        assert set(body["predictions"][0]) == {"label", "probability", *CLASSES}
        records = {"dataframe_records": [{IMAGE_COLUMN: images[2]}]}
        status, body = _post(f"{base}/invocations", records)
        assert status == 200 and body["predictions"][0]["label"] == "green"
        status, body = _post(f"{base}/invocations", {"dataframe_records": [{IMAGE_COLUMN: "bm90IGFuIGltYWdl"}]})
        assert status == 400
        assert "not a readable image" in body.get("stack_trace", "") + body.get("message", "")
    finally:
        # The server runs uvicorn as a child: stop the whole process group this test started.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
