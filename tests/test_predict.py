"""predict.py: decoding like the training pipeline, per-file errors, the command's output and exit status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferlab.cli import main
from transferlab.errors import DataError, ModelError
from transferlab.predict import (
    collect_images,
    decode_image,
    find_classes,
    load_image_batch,
    load_model,
    model_image_size,
    predict_command,
    top_k_labels,
)

RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return path


def test_decode_matches_training_pipeline(tmp_path: Path) -> None:
    from PIL import Image

    from transferlab.pipeline import decode_and_resize

    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)).save(path)
    ours = decode_image(path.read_bytes(), 64)
    theirs = np.round(decode_and_resize(str(path), 64).numpy())
    assert ours.shape == (64, 64, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_decode_converts_grayscale_and_alpha_to_rgb(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (10, 10), 200).save(tmp_path / "grey.png")
    Image.new("RGBA", (10, 10), (10, 20, 30, 128)).save(tmp_path / "alpha.png")
    assert decode_image((tmp_path / "grey.png").read_bytes(), 16).shape == (16, 16, 3)
    assert decode_image((tmp_path / "alpha.png").read_bytes(), 16)[0, 0].tolist() == [10, 20, 30]


def test_decode_falls_back_to_pillow_for_formats_tensorflow_lacks(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (12, 12), RED).save(tmp_path / "red.tiff")
    pixels = decode_image((tmp_path / "red.tiff").read_bytes(), 8)
    assert pixels[4, 4].tolist() == list(RED)


def test_load_image_batch_reports_unreadable_files(colour_image, tmp_path: Path) -> None:
    good = [colour_image("red.png", RED), colour_image("green.jpg", GREEN)]
    corrupt = write_corrupt(tmp_path / "images" / "broken.jpg")
    text = tmp_path / "images" / "notes.png"
    text.write_text("hello")
    truncated = tmp_path / "images" / "truncated.jpg"
    truncated.write_bytes(good[1].read_bytes()[:100])
    missing = tmp_path / "images" / "gone.png"
    batch = load_image_batch([good[0], corrupt, text, good[1], truncated, missing], 64)
    assert batch.paths == good
    assert batch.pixels.shape == (2, 64, 64, 3)
    assert [path for path, _ in batch.errors] == [corrupt, text, truncated, missing]
    assert all(reason for _, reason in batch.errors)


def test_collect_images_expands_folders_and_reports_missing(colour_image, tmp_path: Path) -> None:
    a = colour_image("a.png", RED)
    nested = colour_image("sub/b.JPG", GREEN)
    (a.parent / ".hidden.png").write_bytes(a.read_bytes())
    (a.parent / "readme.txt").write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    files, errors = collect_images([a.parent, empty, tmp_path / "nope.png"])
    assert files == [a, nested]
    assert errors == [(empty, "folder holds no image files"), (tmp_path / "nope.png", "no such file or folder")]


def test_top_k_labels_orders_and_clips() -> None:
    probs = np.array([[0.1, 0.7, 0.2]])
    assert top_k_labels(probs, ["a", "b", "c"], 2) == [[("b", 0.7), ("c", 0.2)]]
    assert len(top_k_labels(probs, ["a", "b", "c"], 9)[0]) == 3


def test_model_helpers(colour_model: Path, tmp_path: Path) -> None:
    model = load_model(colour_model)
    assert model_image_size(model) == 64
    assert find_classes(colour_model, 3) == ["red", "green", "blue"]
    lone = tmp_path / "elsewhere" / "model.keras"
    lone.parent.mkdir()
    shutil.copy(colour_model, lone)
    assert find_classes(lone, 3) == ["class_0", "class_1", "class_2"]
    with pytest.raises(ModelError, match="dvc repro train"):
        load_model(tmp_path / "missing.keras")
    with pytest.raises(ModelError, match="cannot load"):
        load_model(write_corrupt(tmp_path / "bad.keras"))


def test_predict_table_for_good_images(colour_model: Path, colour_image, capsys: pytest.CaptureFixture[str]) -> None:
    files = [colour_image("r.png", RED), colour_image("g.jpg", GREEN), colour_image("b.bmp", BLUE)]
    assert predict_command(colour_model, files, 2, as_json=False) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["file", "rank", "label", "probability"]
    firsts = [line.split() for line in lines[1:] if line.startswith(str(files[0].parent))]
    assert [(row[1], row[2]) for row in firsts] == [("1", "red"), ("1", "green"), ("1", "blue")]
    assert len(lines) == 1 + 3 * 2


def test_predict_json_mixed_inputs(
    colour_model: Path, colour_image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = colour_image("r.png", RED)
    corrupt = write_corrupt(tmp_path / "images" / "corrupt.jpg")
    assert predict_command(colour_model, [good.parent, tmp_path / "missing.png"], 3, as_json=True) == 0
    results = {Path(r["file"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert set(results) == {"r.png", "corrupt.jpg", "missing.png"}
    preds = results["r.png"]["predictions"]
    assert [p["label"] for p in preds] == ["red", "green", "blue"]
    assert sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-5)
    assert preds[0]["probability"] > 0.9
    assert "error" in results[corrupt.name] and "error" in results["missing.png"]


def test_predict_fails_only_when_nothing_was_predicted(
    colour_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = write_corrupt(tmp_path / "corrupt.png")
    assert predict_command(colour_model, [corrupt, tmp_path / "missing.jpg"], 1, as_json=False) == 1
    assert capsys.readouterr().out == ""
    with pytest.raises(DataError, match="top-k"):
        predict_command(colour_model, [corrupt], 0, as_json=False)


def test_cli_predict(colour_model: Path, colour_image, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = colour_image("b.png", BLUE)
    assert main(["predict", str(colour_model), str(image), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] == "blue"
    assert main(["predict", str(tmp_path / "none.keras"), str(image)]) == 2
    assert "ModelError" in capsys.readouterr().err
