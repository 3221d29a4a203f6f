"""serving.py: the pyfunc wrapper, `runs:/<id>/model` loading, and `mlflow models serve` of
`models:/<name>@<alias>` over HTTP."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import ModelServer, declared_png

from transferlab.config import Config, MlflowConfig
from transferlab.serving import (
    CHUNK_ROWS,
    DEFAULT_MAX_ROWS,
    IMAGE_COLUMN,
    MAX_ROWS_ENV,
    BadRequestError,
    ImageClassifierModel,
    encode_image_file,
    model_signature,
    pip_requirements,
    to_output_frame,
)

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


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


LOG_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
import mlflow
from mlflow.utils import environment, requirements_utils
from transferlab.serving import log_image_classifier

model_file, root = Path(sys.argv[1]), Path(sys.argv[2])
mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
client = mlflow.MlflowClient()
run = client.create_run(client.create_experiment("e", artifact_location=str(root / "artifacts")))
check = environment.warn_dependency_requirement_mismatches
log_image_classifier(model_file, ["red", "green", "blue"], 64, client, run)
print(json.dumps({
    "scanned": requirements_utils._MODULES_TO_PACKAGES is not None,
    "check_restored": environment.warn_dependency_requirement_mismatches is check,
    "requirements": next(root.rglob("requirements.txt")).read_text().split(),
}))
"""


def test_logging_a_model_does_not_check_the_pins_it_read_from_this_environment(
    colour_model: Path, tmp_path: Path
) -> None:
    """MLflow's check of a model's pip requirements against the environment scans every installed
    distribution (0.3 s per process); the pins come from this environment, so it is skipped."""
    args = [sys.executable, "-c", LOG_IN_A_FRESH_PROCESS, str(colour_model), str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
    logged = json.loads(done.stdout.strip().splitlines()[-1])
    assert logged == {"scanned": False, "check_restored": True, "requirements": pip_requirements()}


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
    with pytest.raises(ValueError, match=r"row 0: not an image \(no format Pillow can read\)"):
        model.predict(context, pd.DataFrame({IMAGE_COLUMN: ["aGVsbG8gd29ybGQ="]}))


def _loaded(colour_model: Path, **config: object) -> tuple[ImageClassifierModel, object]:
    import mlflow

    model = ImageClassifierModel()
    context = mlflow.pyfunc.PythonModelContext(
        artifacts={"keras_model": str(colour_model)},
        model_config={"classes": CLASSES, "image_size": 64, **config},
    )
    model.load_context(context)
    return model, context


def test_requests_are_scored_in_bounded_chunks(
    colour_model: Path, colour_requests: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many rows a request holds, at most CHUNK_ROWS images are decoded at a time."""
    model, context = _loaded(colour_model, max_rows=100)
    from transferlab import inference

    batches: list[int] = []
    predict = inference.predict_pixels
    monkeypatch.setattr(inference, "predict_pixels", lambda m, x: batches.append(len(x)) or predict(m, x))
    labels, images = colour_requests
    out = model.predict(context, pd.DataFrame({IMAGE_COLUMN: images * 24}))  # 72 rows
    assert out["label"].tolist() == labels * 24
    assert batches == [CHUNK_ROWS, CHUNK_ROWS, 72 - 2 * CHUNK_ROWS]


def test_bad_requests_name_the_limit_or_the_row(
    colour_model: Path, colour_requests: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: 20,000 rows were accepted (5.3 GB), and a PNG declaring 16000 x 16000 pixels decoded."""
    _, images = colour_requests
    model, context = _loaded(colour_model, max_rows=4)
    with pytest.raises(
        BadRequestError, match=r"request has 5 rows, over the limit of 4 \(TRANSFERLAB_SERVE_MAX_ROWS\)"
    ):
        model.predict(context, pd.DataFrame({IMAGE_COLUMN: images[:1] * 5}))
    bomb = base64.b64encode(declared_png(16000, 16000)).decode()
    with pytest.raises(BadRequestError, match=r"^row 1: image is 16000x16000 pixels, over the limit") as caught:
        model.predict(context, pd.DataFrame({IMAGE_COLUMN: [images[0], bomb]}))
    assert caught.value.get_http_status_code() == 400
    with pytest.raises(BadRequestError, match="row 0: 'image' must be a base64 string, got NoneType"):
        model.predict(context, pd.DataFrame({IMAGE_COLUMN: [None]}))

    monkeypatch.setenv(MAX_ROWS_ENV, "2")  # read when the server loads the model; wins over model_config
    assert _loaded(colour_model, max_rows=4)[0].max_rows == 2
    monkeypatch.delenv(MAX_ROWS_ENV)
    assert _loaded(colour_model)[0].max_rows == DEFAULT_MAX_ROWS
    monkeypatch.setenv(MAX_ROWS_ENV, "lots")
    with pytest.raises(ValueError, match=r"TRANSFERLAB_SERVE_MAX_ROWS .* must be a whole number >= 1, got 'lots'"):
        _loaded(colour_model)


@pytest.mark.slow
def test_runs_uri_resolves_to_the_logged_model(
    logged_colour_run: tuple[str, str], colour_requests: tuple[list[str], list[str]]
) -> None:
    import mlflow

    run_id, uri = logged_colour_run
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert loaded.metadata.run_id == run_id
    assert loaded.metadata.model_id  # an MLflow 3 LoggedModel
    labels, images = colour_requests
    assert loaded.predict(pd.DataFrame({IMAGE_COLUMN: images}))["label"].tolist() == labels


@pytest.mark.slow
def test_mlflow_models_serve_round_trip(
    model_server: ModelServer, colour_requests: tuple[list[str], list[str]]
) -> None:
    labels, images = colour_requests
    split = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[image] for image in images]}}
    status, body = model_server.post(split)
    assert status == 200, body
    assert [row["label"] for row in body["predictions"]] == labels
    assert set(body["predictions"][0]) == {"label", "probability", *CLASSES}
    records = {"dataframe_records": [{IMAGE_COLUMN: images[2]}]}
    status, body = model_server.post(records)
    assert status == 200 and body["predictions"][0]["label"] == "green"
    status, body = model_server.post({"dataframe_records": [{IMAGE_COLUMN: "bm90IGFuIGltYWdl"}]})
    assert status == 400
    assert "row 0: not an image (no format Pillow can read)" in body["message"]


def test_logging_a_model_does_not_load_it_again(
    synthetic_cfg: Config, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """MLflow's serving check is off: `Model.log` would load the model it saved and serve the input
    example through it (a second load of the Keras file per run), and only warn if that failed.
    A file Keras cannot read is logged without that warning; the example is still logged with it."""
    import dataclasses
    import urllib.parse

    import mlflow

    from transferlab.tracking import open_store

    cfg = dataclasses.replace(synthetic_cfg, mlflow=MlflowConfig(system_metrics=False))
    not_keras = tmp_path / "model.keras"
    not_keras.write_bytes(b"not a Keras file")
    with open_store(cfg.mlflow, tmp_path / "project").start_run(run_name="log-only") as run:
        uri = run.log_model(not_keras, CLASSES, 64)
    assert "validate serving input" not in capfd.readouterr().err
    model = mlflow.MlflowClient(run.store.uri).get_logged_model(uri.removeprefix("models:/"))
    logged = Path(urllib.parse.urlparse(model.artifact_location).path)
    assert (logged / "serving_input_example.json").is_file() and (logged / "input_example.json").is_file()
    assert (logged / "artifacts" / "model.keras").read_bytes() == not_keras.read_bytes()
