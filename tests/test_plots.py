"""plots.py writes real, non-empty PNGs for normal and degenerate inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from transferlab import plots
from transferlab.metrics import calibration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_width: int = 100) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.width >= min_width and image.height >= 50
        # Not a blank canvas: more than one colour was drawn.
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 1


def two_phase_history() -> pd.DataFrame:
    rows = []
    for epoch in range(1, 7):
        phase = "head" if epoch <= 4 else "finetune"
        rows.append(
            {
                "epoch": epoch,
                "phase": phase,
                "loss": 1.5 / epoch,
                "accuracy": 0.5 + 0.07 * epoch,
                "val_loss": 1.6 / epoch,
                "val_accuracy": 0.45 + 0.07 * epoch,
                "learning_rate": 1e-3 if phase == "head" else 1e-4,
            }
        )
    return pd.DataFrame(rows)


def test_training_curves(tmp_path: Path) -> None:
    out = plots.plot_training_curves(two_phase_history(), tmp_path / "figs" / "curves.png")
    assert out == tmp_path / "figs" / "curves.png"
    assert_png(out)


def test_training_curves_gain_a_panel_for_an_l2_search(tmp_path: Path) -> None:
    searched = [
        {"l2": l2, "loss": 0.1 / i, "accuracy": 0.9, "val_loss": 0.3 + (i - 3) ** 2 / 100, "val_accuracy": 0.88}
        for i, l2 in enumerate((0.1, 0.03, 0.01, 0.003), start=1)
    ]
    one_epoch = two_phase_history().head(1)
    plain = plots.plot_training_curves(one_epoch, tmp_path / "plain.png")
    with_search = plots.plot_training_curves(one_epoch, tmp_path / "search.png", kept_epoch=1, l2_search=searched)
    assert_png(with_search)
    with Image.open(plain) as two_panels, Image.open(with_search) as three_panels:
        assert three_panels.width == two_panels.width * 3 // 2 and three_panels.height == two_panels.height


def test_training_curves_tolerate_missing_columns_and_empty_history(tmp_path: Path) -> None:
    partial = two_phase_history()[["epoch", "loss", "accuracy"]]
    assert_png(plots.plot_training_curves(partial, tmp_path / "partial.png"))
    empty = pd.DataFrame(columns=["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"])
    assert_png(plots.plot_training_curves(empty, tmp_path / "empty.png"))


@pytest.mark.parametrize("num_classes", [3, 25])  # 25: above the per-cell annotation limit
def test_confusion_heat_map(tmp_path: Path, num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    confusion = rng.integers(0, 10, size=(num_classes, num_classes))
    confusion[0] = 0  # a class with no test images must not divide by zero
    classes = [f"class_{i}" for i in range(num_classes)]
    assert_png(plots.plot_confusion_matrix(confusion, classes, tmp_path / "confusion.png"))


def test_misclassified_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, size=(40, 40, 3)).astype(np.float32) for _ in range(5)]
    out = plots.plot_misclassified(
        images, ["a", "b", "c", "a", "b"], ["b", "c", "a", "c", "a"], [0.9, 0.8, 0.7, 0.6, 0.5], tmp_path / "mis.png"
    )
    assert_png(out, min_width=300)


def test_misclassified_grid_with_no_mistakes_still_writes_a_figure(tmp_path: Path) -> None:
    assert_png(plots.plot_misclassified([], [], [], [], tmp_path / "none.png"))


def test_misclassified_grid_reads_its_photos_and_leaves_out_unreadable_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photo, broken = tmp_path / "photo.jpg", tmp_path / "broken.jpg"
    Image.new("RGB", (300, 200), (200, 40, 40)).save(photo)
    broken.write_bytes(b"not a photo")
    out = plots.plot_misclassified_files(
        [broken, photo], ["a", "b"], ["b", "a"], [0.9, 0.8], tmp_path / "mis.png", thumbnail_size=48
    )
    assert_png(out)
    assert f"left out {broken}" in caplog.text and str(photo) not in caplog.text


def test_reliability_diagram(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=60)
    p = rng.dirichlet([1.0, 1.0, 1.0], size=60)
    assert_png(plots.plot_reliability(calibration(y, p, bins=10), tmp_path / "reliability.png"))


def test_sweep_plot_has_a_panel_per_swept_key(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "job": range(6),
            "train.learning_rate": ["0.01", "0.001", "0.0001"] * 2,  # numeric: log axis
            "augment": ["none"] * 3 + ["light"] * 3,  # categorical
            "status": ["FINISHED"] * 5 + ["FAILED"],
            "val_accuracy": [0.8, 0.9, 0.7, 0.85, 0.95, None],
        }
    )
    two_panels = plots.plot_sweep(table, ["train.learning_rate", "augment"], tmp_path / "sweep.png", 4)
    one_panel = plots.plot_sweep(table, ["augment"], tmp_path / "one.png", 4)
    assert_png(two_panels) and assert_png(one_panel)
    with Image.open(two_panels) as wide, Image.open(one_panel) as narrow:
        assert wide.width > 1.5 * narrow.width
    assert_png(plots.plot_sweep(table.iloc[:0], ["augment"], tmp_path / "empty.png", None))


def test_sweep_plot_stars_the_best_child_also_on_a_tie_of_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New-user report: two jobs at the same validation accuracy; the parent named the one with the
    lower validation loss as its best child, the plot starred the other."""
    from transferlab.sweep_bookkeeping import best_row

    table = pd.DataFrame(
        {
            "model.dropout": ["0.1", "0.2", "0.3"],
            "status": ["FINISHED"] * 3,
            "val_accuracy": [0.9, 0.8, 0.9],
            "val_loss": [0.33, 0.40, 0.32],
        }
    )
    best = best_row(table)
    assert best is not None and best.name == 2
    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.plot_sweep(table, ["model.dropout"], tmp_path / "sweep.png", best.name)
    [star] = [c for c in drawn[0].axes[0].collections if c.get_label() == "best"]
    assert star.get_offsets().tolist() == [[0.3, 0.9]]


def test_sweep_axes_are_logarithmic_from_a_decade_up() -> None:
    assert plots.spans_a_decade(np.array([0.01, 0.001]))  # `make sweep`'s learning rates
    assert plots.spans_a_decade(np.array([8.0, 128.0]))
    assert not plots.spans_a_decade(np.array([0.1, 0.5]))
    assert not plots.spans_a_decade(np.array([0.0, 0.5])), "zero has no place on a log axis"
