"""predict.py and inference.py: model loading, per-file errors, the command's output and exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import VENV_BIN, damaged_jpeg, declared_png, user_environment

from transferlab.cli import main
from transferlab.errors import DataError, ModelError
from transferlab.inference import load_image_batch, load_model, model_image_size
from transferlab.predict import collect_images, find_classes, predict_command, top_k_labels

RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return path


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


def test_oversized_image_is_reported_not_decoded(colour_image, tmp_path: Path) -> None:
    """Issue 12: `predict` decoded a PNG declaring 16000 x 16000 pixels (768 MB)."""
    good = colour_image("red.png", RED)
    bomb = tmp_path / "images" / "bomb.png"
    bomb.write_bytes(declared_png(16000, 16000))
    batch = load_image_batch([bomb, good], 64)
    assert batch.paths == [good]
    assert [(path, reason.split(",")[0]) for path, reason in batch.errors] == [(bomb, "image is 16000x16000 pixels")]


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


def test_classes_of_another_length_are_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Run in its project, `models/model.keras` finds the project's classes.json by two routes."""
    splits = tmp_path / "data" / "splits"
    splits.mkdir(parents=True)
    (splits / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert find_classes(Path("models/model.keras"), 5) == [f"class_{i}" for i in range(5)]
    mismatch = f"{splits / 'classes.json'} lists 3 classes but the model has 5 outputs"
    assert [r.getMessage() for r in caplog.records] == [
        mismatch,
        "no classes.json matches models/model.keras; labels are class indices",
    ]


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


def test_cli_predict_reports_a_damaged_jpeg_in_one_line(colour_model: Path, colour_image, tmp_path: Path) -> None:
    """New-user report: libjpeg wrote "Corrupt JPEG data: ..." to the terminal (file descriptor 2)
    before predict's warning. The real console script: one warning for the damaged file, nothing
    else on stderr, the good file still predicted."""
    damaged = damaged_jpeg(tmp_path / "images" / "corrupt.jpg")
    good = colour_image("good.jpg", GREEN)
    command = [sys.executable, str(VENV_BIN / "transferlab"), "predict", str(colour_model), str(damaged), str(good)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=user_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stderr.splitlines()
    assert f"WARNING transferlab.predict: cannot predict {damaged}: corrupt or truncated: " in line
    assert done.stdout.splitlines()[1].split()[:3] == [str(good), "1", "green"]
