"""PNG figures for reports and MLflow, drawn with matplotlib's Agg renderer (no display needed).

Each function takes plain data and a path, writes one PNG, and returns the path
(`plot_misclassified_files` reads its photos itself). Figures are built with
`matplotlib.figure.Figure` rather than pyplot, so nothing global is touched, and every function
can run in a figure worker (figure_workers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transferlab.metrics import Calibration

log = logging.getLogger(__name__)

DPI = 110
# zlib level of the PNGs: level 1 writes them several times faster than the default 6, for files
# about 10 % larger (photo grids barely compress at any level).
PNG_COMPRESS_LEVEL = 1
# Above this many classes the confusion heat map drops per-cell numbers.
ANNOTATE_MAX_CLASSES = 20
MISCLASSIFIED_TITLE = "Most confidently misclassified test images"


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG in one drawing pass: figures lay themselves out (constrained layout), so no
    `bbox_inches="tight"`, which draws everything twice to measure it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    log.info("wrote %s", path)
    return path


def _message_figure(text: str, path: Path) -> Path:
    """A small figure that says why there is nothing to plot (DVC outputs must still exist)."""
    fig = Figure(figsize=(4, 2), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return _save(fig, path)


def _epoch_axis(history: pd.DataFrame) -> np.ndarray:
    """Epoch numbers, made continuous when a second phase restarts its count."""
    epochs = history["epoch"].to_numpy() if "epoch" in history else np.arange(len(history))
    if len(epochs) and np.all(np.diff(epochs) > 0):
        return epochs
    return np.arange(1, len(history) + 1)


def plot_training_curves(
    history: pd.DataFrame,
    path: Path,
    kept_epoch: int | None = None,
    l2_search: Sequence[dict[str, float]] = (),
    refit_search: Sequence[dict[str, float]] = (),
) -> Path:
    """Loss and accuracy per epoch, training and validation, with phase boundaries marked.

    `history` has the columns of `reports/history.csv`
    (`epoch,phase,loss,accuracy,val_loss,val_accuracy,learning_rate`); missing ones are skipped.
    `kept_epoch`, the epoch whose weights the model keeps (early stopping), is marked too. With
    `l2_search` (an L-BFGS head's strengths, strongest first: `linear_head.LinearFit.scores`), a
    third panel shows how the head scored at each: that phase is one epoch in the other two. With
    `refit_search` (the head fitted again after fine-tuning, `finetune.refit_head`), a last panel
    shows that search.
    """
    if history.empty:
        return _message_figure("no training history", path)
    x = _epoch_axis(history)
    panels = (("loss", "Loss"), ("accuracy", "Accuracy"))
    searches = [
        (searched, title)
        for searched, title in (
            (l2_search, "Head: L-BFGS fits by L2 strength"),
            (refit_search, "Head refitted after fine-tuning"),
        )
        if searched
    ]
    columns = len(panels) + len(searches)
    fig = Figure(figsize=(5 * columns, 4), layout="constrained")
    for i, (searched, title) in enumerate(searches, start=len(panels) + 1):
        _draw_l2_search(fig.add_subplot(1, columns, i), searched, title)
    for i, (metric, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, columns, i)
        for column, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if column in history:
                ax.plot(x, history[column].to_numpy(dtype=float), marker="o", markersize=3, label=label)
        if "phase" in history:
            phases = history["phase"].astype(str).to_numpy()
            for n, boundary in enumerate(np.flatnonzero(phases[1:] != phases[:-1])):
                ax.axvline(
                    (x[boundary] + x[boundary + 1]) / 2,
                    color="grey",
                    linestyle="--",
                    linewidth=1,
                    label=None if n else f"{phases[boundary + 1]} starts",
                )
        if kept_epoch is not None and "epoch" in history and kept_epoch in set(history["epoch"]):
            ax.axvline(float(kept_epoch), color="green", linewidth=1.5, alpha=0.6, label=f"kept: epoch {kept_epoch}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves")
    return _save(fig, path)


def _draw_l2_search(ax: Axes, l2_search: Sequence[dict[str, float]], title: str) -> None:
    """Loss (training, validation) and validation accuracy against the L2 strength, weaker to the
    right, the kept strength (lowest validation loss) marked."""
    strengths = np.array([fit["l2"] for fit in l2_search])
    ax.plot(strengths, [fit["loss"] for fit in l2_search], marker="o", markersize=3, label="train loss")
    ax.plot(strengths, [fit["val_loss"] for fit in l2_search], marker="o", markersize=3, label="validation loss")
    kept = min(l2_search, key=lambda fit: fit["val_loss"])
    ax.axvline(kept["l2"], color="green", linewidth=1.5, alpha=0.6, label=f"kept: l2 {kept['l2']:g}")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("L2 strength (weaker to the right)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    accuracy = ax.twinx()
    accuracy.plot(
        strengths, [fit["val_accuracy"] for fit in l2_search], color="C4", marker="s", markersize=3, linestyle=":"
    )
    accuracy.set_ylabel("validation accuracy (dotted)", color="C4")
    ax.set_title(title)
    ax.legend()


def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Row-normalised heat map (each row: where images of that actual class went), with counts."""
    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = len(classes)
    size = min(max(4.0, 0.6 * n + 2), 30.0)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of actual class")
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Confusion matrix (normalised by actual class)")
    if n <= ANNOTATE_MAX_CLASSES:
        for r in range(n):
            for c in range(n):
                colour = "white" if normalised[r, c] > 0.5 else "black"
                text = f"{normalised[r, c]:.2f}\n({counts[r, c]})"
                ax.text(c, r, text, ha="center", va="center", color=colour, fontsize=8)
    return _save(fig, path)


def plot_misclassified(
    images: Sequence[np.ndarray],
    actual: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
    path: Path,
    title: str = MISCLASSIFIED_TITLE,
) -> Path:
    """A grid of images captioned `true -> predicted (confidence)` under `title`; images are RGB in
    [0, 255], one size.

    The grid is one mosaic image under one set of axes, which draws in a fraction of the time
    of a subplot per image.
    """
    if not images:
        return _message_figure("no misclassified test images", path)
    columns = min(4, len(images))
    rows = int(np.ceil(len(images) / columns))
    tiles = np.stack([np.clip(np.asarray(image), 0, 255).astype(np.uint8) for image in images])
    size, gap = tiles.shape[1], tiles.shape[1] // 3  # room for a two-line caption above each tile
    mosaic = np.full((rows * (size + gap), columns * size, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(2.4 * columns, 2.4 * rows * (size + gap) / size))
    ax = fig.add_axes((0, 0, 1, 0.94))
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * (size + gap) + gap, (i % columns) * size
        mosaic[top : top + size, left : left + size] = tile
        caption = f"true: {actual[i]}\npred: {predicted[i]} ({confidence[i]:.2f})"
        ax.text(left + size / 2, top - 2, caption, ha="center", va="bottom", fontsize=8)
    ax.imshow(mosaic)
    ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def plot_misclassified_files(
    files: Sequence[Path],
    actual: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
    path: Path,
    thumbnail_size: int,
    title: str = MISCLASSIFIED_TITLE,
) -> Path:
    """`plot_misclassified` of the photos in `files`, read here as thumbnails of `thumbnail_size`
    (central squares; in a figure worker, off the job's path); unreadable ones are left out."""
    from transferlab.images import thumbnail

    kept, tiles = [], []
    for i, file in enumerate(files):
        try:
            tiles.append(thumbnail(Path(file), thumbnail_size))
        except (OSError, ValueError) as exc:
            log.warning("misclassified grid: left out %s (%s)", file, exc)
            continue
        kept.append(i)
    return plot_misclassified(
        tiles,
        [actual[i] for i in kept],
        [predicted[i] for i in kept],
        [confidence[i] for i in kept],
        path,
        title,
    )


def plot_reliability(calibration: Calibration, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the ECE in the title."""
    edges = calibration.bin_edges
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = calibration.count > 0
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(centres[filled], calibration.accuracy[filled], width=width, edgecolor="black", label="accuracy")
    ax.bar(
        centres[filled],
        (calibration.confidence - calibration.accuracy)[filled],
        bottom=calibration.accuracy[filled],
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE = {calibration.ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    hist = fig.add_subplot(1, 2, 2)
    hist.bar(centres, calibration.count, width=width, edgecolor="black")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    hist.set_title("Confidence histogram")
    return _save(fig, path)


def _sweep_positions(values: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """x positions of a swept key's values: the numbers themselves, or category indices and their labels."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(dtype=float), None
    labels = sorted(values.astype(str).unique())
    return values.astype(str).map(labels.index).to_numpy(dtype=float), labels


def spans_a_decade(numbers: np.ndarray) -> bool:
    """True when positive values span a factor of 10 or more (a log axis shows them evenly): a
    learning rate swept over 1e-2 and 1e-3 does, dropout 0.1 to 0.5 does not."""
    if numbers.size == 0 or numbers.min() <= 0:
        return False
    return bool(numbers.max() >= 10 * numbers.min())


def plot_sweep(table: pd.DataFrame, keys: Sequence[str], path: Path, best: Hashable | None) -> Path:
    """Validation accuracy against each swept key (one panel per key), failed jobs as x, and the
    row labelled `best` in `table` starred (the sweep's best child: `sweep_bookkeeping.best_row`).

    `table` is a sweep summary (`sweep_bookkeeping.summary_table`): a column per key, `status`,
    `val_accuracy`.
    """
    if not keys or table.empty:
        return _message_figure("no swept keys", path)
    columns = min(3, len(keys))
    rows = int(np.ceil(len(keys) / columns))
    fig = Figure(figsize=(4.5 * columns, 3.6 * rows), layout="constrained")
    scored = table["val_accuracy"].notna()
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, columns, i + 1)
        x, labels = _sweep_positions(table[key].fillna("").astype(str))
        y = table["val_accuracy"].to_numpy(dtype=float)
        ax.scatter(x[scored], y[scored], color="tab:blue", label="job")
        if (~scored).any():
            ax.scatter(x[~scored], np.zeros(int((~scored).sum())), color="tab:red", marker="x", label="failed")
        if best is not None:
            where = table.index.get_loc(best)
            ax.scatter([x[where]], [y[where]], s=220, marker="*", color="gold", edgecolor="black", label="best")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        elif spans_a_decade(x):
            ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle("Validation accuracy per swept value")
    return _save(fig, path)
