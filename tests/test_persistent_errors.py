"""persistent_errors.py: the test photos every run got wrong, read back from the runs' logged
`evaluation/confusion.csv` in a real SQLite MLflow store, with a report and a grid of real JPEGs."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from transferlab import tracking
from transferlab.config import MlflowConfig
from transferlab.manifests import Manifest
from transferlab.persistent_errors import read_test_predictions, write_report

CLASSES = ("red", "green", "blue")
PHOTOS = ("red/a.jpg", "red/b.jpg", "green/c.jpg", "green/d.jpg", "blue/e.jpg", "blue/f.jpg")
LABELS = (0, 0, 1, 1, 2, 2)
# The predictions of three runs: b.jpg is wrong in all three (blue, blue, green), d.jpg in two.
RUNS = (
    ("red", "blue", "green", "red", "blue", "blue"),
    ("red", "blue", "green", "blue", "blue", "blue"),
    ("red", "green", "green", "green", "blue", "blue"),
)


@pytest.fixture
def test_split(tmp_path: Path) -> Manifest:
    raw = tmp_path / "raw"
    for photo, label in zip(PHOTOS, LABELS, strict=True):
        (raw / photo).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), CLASSES[label]).save(raw / photo, "JPEG")
    return Manifest(raw, PHOTOS, LABELS, CLASSES)


def _log_run(store: tracking.Store, tmp_path: Path, actual: list[str] | None, predicted: tuple[str, ...]) -> str:
    """A run that logged a confusion table as evaluate does (none when `actual` is None)."""
    with store.start_run(run_name="job") as run:
        if actual is not None:
            table = tmp_path / "evaluation" / "confusion.csv"
            table.parent.mkdir(exist_ok=True)
            pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(table, index=False)
            run.log_artifact(table, "evaluation")
    return run.run_id


def test_photos_wrong_in_every_run_are_found_counted_and_drawn(
    test_split: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tracking.open_store(MlflowConfig(experiment="errors", system_metrics=False), tmp_path)
    actual = [CLASSES[label] for label in LABELS]
    scored = [_log_run(store, tmp_path, actual, predicted) for predicted in RUNS]
    unevaluated = _log_run(store, tmp_path, None, RUNS[0])
    other_split = _log_run(store, tmp_path, list(reversed(actual)), RUNS[0])

    caplog.set_level(logging.WARNING, logger="transferlab.persistent_errors")
    predictions = read_test_predictions(store, [*scored, unevaluated, other_split], test_split)

    assert list(predictions.predicted.columns) == scored
    assert f"run {unevaluated} left out: no evaluation/confusion.csv" in caplog.text
    assert f"run {other_split} left out: its test photos are not this split's" in caplog.text
    assert predictions.wrong().sum(axis=1).to_dict() == {
        "red/a.jpg": 0,
        "red/b.jpg": 3,
        "green/c.jpg": 0,
        "green/d.jpg": 2,
        "blue/e.jpg": 0,
        "blue/f.jpg": 0,
    }
    assert predictions.majority_vote_accuracy(scored[2:]) == 5 / 6  # one run: its own accuracy
    # Runs 2 and 3 split on d.jpg (blue, green): a tie counts as wrong (counted right, 5 / 6).
    assert predictions.majority_vote_accuracy(scored[1:]) == 4 / 6
    with pytest.raises(ValueError, match="at least one run"):
        predictions.majority_vote_accuracy([])
    assert predictions.always_wrong().to_dict("records") == [
        {"photo": "red/b.jpg", "actual": "red", "predicted": "blue (2), green (1)", "top": "blue", "share": 2 / 3}
    ]

    report = write_report(predictions, {"first two": scored[:2], "last": scored[2:]}, tmp_path / "errors.md")
    text = report.read_text()
    assert "3 runs, 6 test photos. Wrong in every run: **1**; right in every run: 4." in text
    assert "no run of these settings can score above 83.3%" in text
    # d.jpg's three votes tie (red, blue, green): a tie counts as wrong, so the vote misses b and d.
    assert "A majority vote of all 3 runs scores 66.7%." in text
    assert "| 2 | first two | 66.7 | 66.7 | 2 | 2 |" in text  # b and d wrong in both
    assert "| 1 | last | 83.3 | 83.3 | 1 | 1 |" in text
    assert "| red/b.jpg | red | blue (2), green (1) |" in text
    with Image.open(report.with_suffix(".png")) as grid:
        assert grid.format == "PNG" and grid.width > 100

    unscored = read_test_predictions(store, [unevaluated], test_split)  # every run left out
    empty = write_report(unscored, {"none": [unevaluated]}, tmp_path / "empty.md").read_text()
    assert "0 runs, 6 test photos." in empty and "majority vote of all" not in empty
