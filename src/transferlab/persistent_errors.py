"""The test photos that every run of a study gets wrong: the floor under the test error.

Every evaluated run logs `evaluation/confusion.csv` (the actual and predicted class of each test
photo, in the test manifest's order). Read across many runs (seeds, settings, fine-tuning), it
tells which photos no configuration gets right. Those photos are where tuning stops paying: a
mislabelled photo, a flower too small to see, a look-alike of another class. `make study` writes
the report (bench/study.py).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transferlab import tracking
from transferlab.manifests import Manifest
from transferlab.paths import StagePaths
from transferlab.plots import plot_misclassified_files
from transferlab.stages.evaluate import ARTIFACT_DIR, THUMBNAIL_SIZE

log = logging.getLogger(__name__)

CONFUSION_ARTIFACT = f"{ARTIFACT_DIR}/{StagePaths(Path()).confusion.name}"


@dataclass(frozen=True)
class TestPredictions:
    """The predicted class of every test photo (rows, in manifest order) by every run (columns)."""

    test: Manifest
    predicted: pd.DataFrame  # index: photo paths relative to test.raw_root; columns: run ids

    @property
    def actual(self) -> pd.Series:
        return pd.Series(self.test.label_names, index=self.predicted.index)

    def wrong(self) -> pd.DataFrame:
        """True where a run got a photo wrong."""
        return self.predicted.ne(self.actual, axis=0)

    def majority_vote_accuracy(self, runs: Sequence[str]) -> float:
        """The share of photos whose true class gets more of these runs' votes than any other class
        (a tie counts as wrong): what an ensemble voting with these runs would score."""
        if not len(runs):
            raise ValueError("a majority vote needs at least one run")
        predicted, actual = self.predicted[list(runs)], self.actual
        right = predicted.eq(actual, axis=0).sum(axis=1)
        other_votes = [predicted.eq(name).sum(axis=1).where(actual != name, 0) for name in self.test.classes]
        return float((right > pd.concat(other_votes, axis=1).max(axis=1)).mean())

    def always_wrong(self) -> pd.DataFrame:
        """The photos every run got wrong: `photo`, `actual`, `predicted` as `class (runs)` most
        frequent first, and that most frequent class with the share of runs predicting it (`top`,
        `share`)."""
        actual, wrong = self.actual, self.wrong()
        photos = wrong.index[wrong.all(axis=1)] if len(wrong.columns) else wrong.index[:0]
        rows = []
        for photo in photos:
            counts = self.predicted.loc[photo].value_counts()
            rows.append(
                {
                    "photo": photo,
                    "actual": actual[photo],
                    "predicted": ", ".join(f"{name} ({count})" for name, count in counts.items()),
                    "top": counts.index[0],
                    "share": counts.iloc[0] / len(wrong.columns),
                }
            )
        return pd.DataFrame(rows, columns=["photo", "actual", "predicted", "top", "share"])


def read_test_predictions(store: tracking.Store, run_ids: Sequence[str], test: Manifest) -> TestPredictions:
    """Each run's `evaluation/confusion.csv` against the test manifest, a column per run id.

    A run without one (not evaluated yet), or whose table is not of this manifest (another
    split), is left out with a warning.
    """
    actual = test.label_names
    columns = {}
    with tempfile.TemporaryDirectory() as scratch:
        for run_id in run_ids:
            try:
                local = store.client.download_artifacts(run_id, CONFUSION_ARTIFACT, scratch)
            except Exception as exc:  # MLflow raises several kinds for a missing artifact
                log.warning("run %s left out: no %s (%s)", run_id, CONFUSION_ARTIFACT, exc)
                continue
            table = pd.read_csv(local)
            if list(table["actual"]) != actual:
                log.warning("run %s left out: its test photos are not this split's", run_id)
                continue
            columns[run_id] = table["predicted"].to_numpy()
    return TestPredictions(test, pd.DataFrame(columns, index=pd.Index(test.paths, name="photo")))


def write_report(predictions: TestPredictions, groups: Mapping[str, Sequence[str]], markdown: Path) -> Path:
    """`markdown` (a table per group of runs and the photos every run got wrong) and, beside it,
    a `.png` grid of those photos, captioned with the class most runs predicted and their share.

    `groups` names sets of runs (a study point with its seeds) by their run ids.
    """
    wrong = predictions.wrong()
    runs, photos = len(wrong.columns), len(wrong)
    always = predictions.always_wrong()
    vote = (
        f" A majority vote of all {runs} runs scores {predictions.majority_vote_accuracy(wrong.columns):.1%}."
        if runs
        else ""
    )
    lines = [
        f"# Test photos every run gets wrong\n\n{runs} runs, {photos} test photos. Wrong in every run: "
        f"**{len(always)}**; right in every run: {int((~wrong).all(axis=1).sum())}. If the {len(always)} stay "
        f"wrong, no run of these settings can score above {1 - len(always) / max(photos, 1):.1%}.{vote}\n",
        "| runs | settings | mean accuracy % | majority vote % | wrong in every run | wrong in some run |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for group, names in groups.items():
        part = wrong[[name for name in names if name in wrong.columns]]
        if part.columns.empty:
            continue
        mean_accuracy = 100 * (1 - part.to_numpy().mean())
        vote = 100 * predictions.majority_vote_accuracy(part.columns)
        every, some = int(part.all(axis=1).sum()), int(part.any(axis=1).sum())
        lines.append(f"| {len(part.columns)} | {group} | {mean_accuracy:.1f} | {vote:.1f} | {every} | {some} |")
    lines += ["", "| photo | true class | predicted (runs) |", "|---|---|---|"]
    lines += [f"| {row.photo} | {row.actual} | {row.predicted} |" for row in always.itertuples()]
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text("\n".join(lines) + "\n")
    figure = markdown.with_suffix(".png")
    plot_misclassified_files(
        [predictions.test.raw_root / photo for photo in always["photo"]],
        list(always["actual"]),
        list(always["top"]),
        list(always["share"]),
        figure,
        THUMBNAIL_SIZE,
        title=f"Test photos all {runs} runs got wrong (share of runs predicting that class)",
    )
    log.info("photos every run got wrong: %s and %s", markdown, figure)
    return markdown
