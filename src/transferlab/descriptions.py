"""A training run's description (markdown, shown at the top of its MLflow page).

Train writes what was trained on what data and how it went; evaluate adds the test results.

    **small_cnn** (random weights, dropout 0.2) on **synthetic**: 3 classes; 72 train, 24 validation
    and 24 test images (splits `1f0c...`).

    | phase | epochs | learning rate | backbone |
    ...

    **Best epoch** 10 of 10: validation accuracy **0.917**, loss 0.308. With test-time flipping
    (the saved model): validation accuracy **0.958**.

    **Test**: accuracy **0.833**, top-2 accuracy 1.000, macro F1 0.817 on 24 images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import pandas as pd

from transferlab.config import Config

TEST_HEADING = "**Test**"


class Phase(Protocol):
    """What a description needs of a training phase (`trainer.Phase`)."""

    name: str
    learning_rate: float
    unfreeze: int | Literal["all"]
    source: Literal["pool", "cut", "images"]
    views: int


class Refit(Protocol):
    """What a description needs of a head refitted after fine-tuning (`trainer.HeadRefit`)."""

    l2: float
    val_loss: float
    trained_val_loss: float
    kept: bool


def _backbone(cfg: Config) -> str:
    model = cfg.model
    name = f"**{model.backbone}**" + (f" alpha {model.alpha:g}" if model.alpha is not None else "")
    weights = {None: "random weights", "imagenet": "ImageNet weights"}.get(model.weights)
    weights = weights or f"weights from {Path(str(model.weights)).name}"
    return f"{name} ({weights}, dropout {model.dropout:g})"


def backbone_state(phase: Phase, trainable: int | None = None) -> str:
    """How much of the backbone a phase trains, and on what ("backbone frozen, head trained on cached
    features", "top 20 backbone layers unfrozen (...), trained on cached activations at the cut");
    with `trainable`, the count of unfrozen layers with weights (the log shows it)."""
    views = f" of {phase.views} augmented views" if phase.views > 1 else ""
    if (trainable == 0) if trainable is not None else (phase.unfreeze == 0):
        how = "fitted by L-BFGS" if phase.solver == "lbfgs" else "trained"
        return "backbone frozen" + (f", head {how} on cached features{views}" if phase.source == "pool" else "")
    which = "all backbone layers" if phase.unfreeze == "all" else f"top {phase.unfreeze} backbone layers"
    counted = f"{trainable} with weights; " if trainable is not None else ""
    text = f"{which} unfrozen ({counted}BatchNorm stays frozen)"
    return text + (f", trained on cached activations at the cut{views}" if phase.source == "cut" else "")


def _phase_rows(phases: Sequence[Phase], history: pd.DataFrame) -> list[str]:
    rows = ["| phase | epochs | learning rate | backbone |", "| --- | --- | --- | --- |"]
    for phase in phases:
        epochs = history.loc[history["phase"] == phase.name, "epoch"]
        if epochs.empty:
            continue
        span = f"{epochs.min()}-{epochs.max()}" if len(epochs) > 1 else str(epochs.min())
        rate = "L-BFGS" if phase.solver == "lbfgs" else f"{phase.learning_rate:g}"
        rows.append(f"| {phase.name} | {span} | {rate} | {backbone_state(phase)} |")
    return rows


def training_description(
    cfg: Config,
    phases: Sequence[Phase],
    history: pd.DataFrame,
    best: pd.Series,
    images: Mapping[str, int],
    classes: int,
    digest: str,
    test_time_val_accuracy: float | None = None,
    ensemble: Sequence[tuple[int, int, float, bool]] = (),
    refit: Refit | None = None,
) -> str:
    """Backbone, data, phases and the best epoch of a finished training run; with
    `test_time_val_accuracy`, the saved model's, which averages test-time views (flips, crops);
    with `ensemble` (seed, kept epoch, validation accuracy and whether it is averaged in, of each
    member; ensemble.py), the heads averaged into the saved one; with `refit`, the head fitted
    again after fine-tuning and whether the saved model holds it."""
    counts = ", ".join(f"{n} {split.replace('val', 'validation')}" for split, n in images.items())
    data = f"**{cfg.data.name}**: {classes} classes; {counts} images (splits `{digest}`)."
    lines = [f"{_backbone(cfg)} on {data}", "", *_phase_rows(phases, history), ""]
    lines.append(
        f"**Best epoch** {int(best['epoch'])} of {len(history)}: validation accuracy "
        f"**{best['val_accuracy']:.3f}**, loss {best['val_loss']:.3f}."
    )
    if test_time_val_accuracy is not None:
        views = [f"crops ({cfg.model.test_time_crops})"] if cfg.model.test_time_crops > 1 else []
        views += ["flipping"] if cfg.model.test_time_flip else []
        adds = [f"test-time {' and '.join(views)}"] if views else []
        adds += [f"{sum(averaged for *_, averaged in ensemble)} heads averaged"] if ensemble else []
        adds += ["the refitted head"] if refit is not None and refit.kept else []
        lines[-1] += f" With {', '.join(adds)} (the saved model): validation accuracy **{test_time_val_accuracy:.3f}**."
    if refit is not None:
        outcome = "kept" if refit.kept else "the fine-tuned head stays"
        lines += [
            "",
            f"**Head refitted** after fine-tuning, by L-BFGS on the fine-tuned features (l2 {refit.l2:g}): "
            f"validation loss {refit.val_loss:.3f} against {refit.trained_val_loss:.3f}: {outcome}.",
        ]
    if ensemble:
        seeds = ", ".join(str(seed) for seed, *_ in ensemble)
        epochs = ", ".join(str(epoch) for _, epoch, *_ in ensemble)
        alone = ", ".join(f"{accuracy:.3f}" for _, _, accuracy, _ in ensemble)
        idle = [str(seed) for seed, _, _, averaged in ensemble if not averaged]
        seeds_word = "seeds" if len(idle) > 1 else "seed"
        left_out = f" Left out of the average, having learned nothing: {seeds_word} {', '.join(idle)}." if idle else ""
        lines += [
            "",
            f"**Ensemble** of {len(ensemble)} heads (seeds {seeds}; best epochs {epochs}; the table and best "
            f"epoch above are the first's), averaged into the saved one. Validation accuracy of each alone: "
            f"{alone}.{left_out}",
        ]
    return "\n".join(lines)


def with_test_results(description: str, metrics: Mapping[str, float], top_k: int) -> str:
    """`description` with its test paragraph (from evaluate's metrics) added or replaced."""
    training = description.split(TEST_HEADING, 1)[0].rstrip()
    test = (
        f"{TEST_HEADING}: accuracy **{metrics['test_accuracy']:.3f}**, top-{top_k} accuracy "
        f"{metrics[f'test_top{top_k}_accuracy']:.3f}, macro F1 {metrics['test_macro_f1']:.3f} "
        f"on {int(metrics['test_images'])} images."
    )
    return f"{training}\n\n{test}" if training else test
