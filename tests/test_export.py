"""export.py: SavedModel and TFLite exports that give the Keras model's probabilities and carry
their class names, so `transferlab predict` works on an export alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferlab.cli import main
from transferlab.errors import ModelError, TransferlabError
from transferlab.export import export_model, load_export, probe_image, run_tflite
from transferlab.images import decode_image_bytes
from transferlab.inference import load_model


def test_savedmodel_export_serves_like_keras(colour_model: Path, colour_image, tmp_path: Path) -> None:
    import tensorflow as tf

    out = export_model(colour_model, tmp_path / "savedmodel", "savedmodel")
    assert (out / "saved_model.pb").is_file()
    image = decode_image_bytes(colour_image("g.png", (20, 230, 20)).read_bytes(), 64)[None]
    loaded = tf.saved_model.load(str(out))  # keep a reference: `serve` needs its variables alive
    served = loaded.serve(tf.constant(image)).numpy()
    np.testing.assert_allclose(served, load_model(colour_model).predict(image, verbose=0), atol=1e-5)
    assert served.argmax() == 1  # green


def test_tflite_export_runs_in_the_interpreter(colour_model: Path, colour_image, tmp_path: Path) -> None:
    out = export_model(colour_model, tmp_path / "out" / "model.tflite", "tflite")
    assert out.stat().st_size > 0
    image = decode_image_bytes(colour_image("b.png", (20, 20, 230)).read_bytes(), 64)[None]
    probabilities = run_tflite(out, image)
    np.testing.assert_allclose(probabilities, load_model(colour_model).predict(image, verbose=0), atol=1e-5)
    assert probabilities.argmax() == 2  # blue


COLOURS = ["red", "green", "blue"]  # the colour_model fixture's classes.json


@pytest.mark.parametrize(("fmt", "name"), [("savedmodel", "savedmodel"), ("tflite", "model.tflite")])
def test_exports_carry_their_class_names_and_predict_on_their_own(
    colour_model: Path, colour_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, fmt: str, name: str
) -> None:
    out = export_model(colour_model, tmp_path / "export" / name, fmt)  # type: ignore[arg-type]
    if fmt == "savedmodel":
        assert json.loads((out / "assets.extra" / "classes.json").read_text()) == COLOURS
    # Elsewhere, with no classes.json and no data/splits/ in sight:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = Path(shutil.move(out, elsewhere / name))
    monkeypatch.chdir(elsewhere)
    exported = load_export(moved)
    assert exported.classes == COLOURS and exported.image_size == 64
    assert load_export(str(moved)).classes == COLOURS, "a path as text too, as the README calls it"
    images = [colour_image("r.png", (230, 20, 20)), colour_image("b.png", (20, 20, 230))]
    assert main(["predict", str(moved), *map(str, images), "-k", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["predictions"][0]["label"] for r in results] == ["red", "blue"]


def test_export_needs_the_class_names(colour_model: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone" / "model.keras"
    lone.parent.mkdir()
    shutil.copy(colour_model, lone)
    with pytest.raises(ModelError, match=r"no classes\.json with 3 class names"):
        export_model(lone, tmp_path / "m.tflite", "tflite")
    assert not (tmp_path / "m.tflite").exists()


def test_export_refuses_to_overwrite_and_unknown_formats(colour_model: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken.tflite"
    taken.write_bytes(b"keep me")
    with pytest.raises(TransferlabError, match="already exists"):
        export_model(colour_model, taken, "tflite")
    assert taken.read_bytes() == b"keep me"
    with pytest.raises(TransferlabError, match="unknown export format"):
        export_model(colour_model, tmp_path / "x", "onnx")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="dvc repro train"):
        export_model(tmp_path / "missing.keras", tmp_path / "y.tflite", "tflite")


def test_cli_export(colour_model: Path, tmp_path: Path) -> None:
    assert main(["export", str(colour_model), str(tmp_path / "m.tflite"), "--format", "tflite"]) == 0
    assert main(["export", str(colour_model), str(tmp_path / "m.tflite"), "--format", "tflite"]) == 2


@pytest.mark.slow
def test_tflite_export_of_a_real_transfer_model(tmp_path: Path) -> None:
    """The train stage's saved architecture (MobileNetV2 backbone, Dropout head, test-time flipping), random weights."""
    from transferlab.config import ModelConfig
    from transferlab.model import attach_head, build_classifier, flips_at_test_time

    classifier = build_classifier(ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights=None), 4, 64)
    model = attach_head(classifier, classifier.head, test_time_flip=True)
    model_file = tmp_path / "model.keras"
    model.save(model_file)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    out = export_model(model_file, tmp_path / "model.tflite", "tflite")
    image = probe_image(64)
    assert flips_at_test_time(model) and not np.allclose(image, image[:, :, ::-1])
    np.testing.assert_allclose(run_tflite(out, image), model.predict(image, verbose=0), atol=1e-3)


@pytest.mark.parametrize(("fmt", "name"), [("savedmodel", "savedmodel"), ("tflite", "model.tflite")])
def test_a_model_with_test_time_crops_exports_and_predicts_like_keras(tmp_path: Path, fmt: str, name: str) -> None:
    """A model that takes 3 squares of each photo exports with that input; `transferlab predict`
    on the export and on the `.keras` file decodes those 3 squares of a wide photo and agrees."""
    from PIL import Image

    from transferlab.config import ModelConfig
    from transferlab.model import attach_head, build_classifier
    from transferlab.predict import load_predictor, predict_files

    classifier = build_classifier(ModelConfig(backbone="small_cnn", weights=None), 3, 32, seed=0)
    model = attach_head(classifier, classifier.head, test_time_flip=True, test_time_crops=3)
    model_file = tmp_path / "model.keras"
    model.save(model_file)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    out = export_model(model_file, tmp_path / name, fmt)
    exported = load_export(out)
    assert (exported.crops, exported.image_size, exported.classes) == (3, 32, ["a", "b", "c"])
    wide = np.random.default_rng(1).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    from_export, from_keras = (
        predict_files(load_predictor(path), [tmp_path / "wide.png"], k=3)[0]["predictions"]
        for path in (out, model_file)
    )
    squares = decode_image_bytes((tmp_path / "wide.png").read_bytes(), 32, (0.0, 0.5, 1.0))[None]
    expected = model.predict(squares, verbose=0)[0]
    for predictions in (from_export, from_keras):
        got = {p["label"]: p["probability"] for p in predictions}
        np.testing.assert_allclose([got[c] for c in "abc"], expected, atol=1e-5)


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_a_power_normalised_head_exports_and_predicts_like_keras(tmp_path: Path, fmt: str) -> None:
    from transferlab.config import ModelConfig
    from transferlab.model import attach_head, build_classifier

    cfg = ModelConfig(backbone="small_cnn", weights=None, feature_power=0.5)
    classifier = build_classifier(cfg, 3, 32, seed=0)
    model = attach_head(classifier, classifier.head, test_time_flip=True)
    model_file = tmp_path / "model.keras"
    model.save(model_file)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    exported = load_export(export_model(model_file, tmp_path / ("model.tflite" if fmt == "tflite" else fmt), fmt))
    image = probe_image(32)
    np.testing.assert_allclose(exported.probabilities(image), model.predict(image, verbose=0), atol=1e-5)


def test_an_export_input_of_unknown_size_is_refused() -> None:
    from transferlab.export import ExportedClassifier

    with pytest.raises(ModelError, match=r"export input must be \(1, size, size, 3\)"):
        ExportedClassifier.of_input_shape((1, None, None, 3), None, lambda pixels: pixels)
    exported = ExportedClassifier.of_input_shape((1, 3, 32, 32, 3), None, lambda pixels: pixels)
    assert (exported.image_size, exported.crops, exported.image_shape) == (32, 3, (3, 32, 32, 3))
