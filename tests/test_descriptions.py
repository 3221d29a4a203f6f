"""descriptions.py: the markdown a training run shows at the top of its MLflow page."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import tiny_cfg

from transferlab.descriptions import training_description, with_test_results
from transferlab.stages.train import kept_row
from transferlab.trainer import plan_phases

TEST_METRICS = {"test_accuracy": 0.8333, "test_top2_accuracy": 1.0, "test_macro_f1": 0.8166, "test_images": 24}


def two_phase_description() -> str:
    cfg = tiny_cfg(
        "train.epochs=2",
        "finetune=top20",
        "finetune.epochs=1",
        "finetune.warmup_epochs=0",
        "finetune.learning_rate=0.0001",
    )
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "phase": ["head", "head", "finetune"],
            "val_accuracy": [0.5, 0.75, 0.875],
            "val_loss": [1.0, 0.7, 0.4],
        }
    )
    images = {"train": 20, "val": 8, "test": 8}
    return training_description(cfg, plan_phases(cfg), history, kept_row(history, 3), images, 3, "0123456789abcdef")


def test_training_description_names_backbone_data_phases_and_best_epoch() -> None:
    text = two_phase_description()
    assert text.startswith("**small_cnn** (random weights, dropout 0.2) on **synthetic**: 3 classes;")
    assert "20 train, 8 validation, 8 test images (splits `0123456789abcdef`)" in text
    lr = tiny_cfg().train.learning_rate
    head = "backbone frozen, head trained on cached features of 3 augmented views"  # the default flips
    assert f"| head | 1-2 | {lr:g} | {head} |" in text
    finetune = (
        "top 20 backbone layers unfrozen (BatchNorm stays frozen), trained on cached activations at the cut "
        "of 3 augmented views"
    )
    assert f"| finetune | 3 | 0.0001 | {finetune} |" in text
    assert "**Best epoch** 3 of 3: validation accuracy **0.875**, loss 0.400." in text


@pytest.mark.parametrize(
    ("overrides", "views"),
    [
        ((), "crops (3) and flipping"),
        (("model.test_time_crops=1",), "flipping"),
        (("model.test_time_flip=false", "model.test_time_crops=2"), "crops (2)"),
    ],
)
def test_a_model_with_test_time_views_adds_its_own_validation_accuracy(overrides: tuple[str, ...], views: str) -> None:
    cfg = tiny_cfg("train.epochs=2", *overrides)
    history = pd.DataFrame(
        {"epoch": [1, 2], "phase": ["head", "head"], "val_accuracy": [0.5, 0.75], "val_loss": [1.0, 0.7]}
    )
    images = {"train": 20, "val": 8, "test": 8}
    text = training_description(cfg, plan_phases(cfg), history, kept_row(history, 2), images, 3, "0123", 0.875)
    assert text.endswith(
        "**Best epoch** 2 of 2: validation accuracy **0.750**, loss 0.700. "
        f"With test-time {views} (the saved model): validation accuracy **0.875**."
    )


def test_an_lbfgs_head_phase_says_it_was_fitted_not_stepped() -> None:
    cfg = tiny_cfg("train.head_solver=lbfgs")
    history = pd.DataFrame({"epoch": [1], "phase": ["head"], "val_accuracy": [0.75], "val_loss": [0.7]})
    text = training_description(cfg, plan_phases(cfg), history, kept_row(history, 1), {"train": 20}, 3, "0123")
    assert (
        "| head | 1 | L-BFGS | backbone frozen, head fitted by L-BFGS on cached features of 3 augmented views |" in text
    )


def _ensemble_description(members: list[tuple[int, int, float, bool]]) -> str:
    """A 3-member ensemble run's description; member 0 kept epoch 2 of 2 (validation 0.75)."""
    cfg = tiny_cfg("train.epochs=2", "train.ensemble=3")
    history = pd.DataFrame(
        {"epoch": [1, 2], "phase": ["head", "head"], "val_accuracy": [0.5, 0.75], "val_loss": [1.0, 0.7]}
    )
    images = {"train": 20, "val": 8, "test": 8}
    return training_description(cfg, plan_phases(cfg), history, kept_row(history, 2), images, 3, "0123", 0.9, members)


def test_an_ensemble_names_its_members_and_what_each_scored_alone() -> None:
    text = _ensemble_description([(123, 2, 0.75, True), (7, 1, 0.625, True), (9, 2, 0.875, True)])
    assert (
        "With test-time crops (3) and flipping, 3 heads averaged (the saved model): validation accuracy **0.900**."
        in text
    )
    assert text.endswith(
        "**Ensemble** of 3 heads (seeds 123, 7, 9; best epochs 2, 1, 2; the table and best epoch above are the "
        "first's), averaged into the saved one. Validation accuracy of each alone: 0.750, 0.625, 0.875."
    )


def test_an_ensemble_says_which_members_it_left_out_and_counts_only_the_averaged() -> None:
    text = _ensemble_description([(123, 2, 0.75, True), (7, 1, 0.375, False), (9, 2, 0.875, True)])
    assert "With test-time crops (3) and flipping, 2 heads averaged (the saved model)" in text
    assert text.endswith("0.750, 0.375, 0.875. Left out of the average, having learned nothing: seed 7.")


def test_test_results_are_added_once_and_replaced_by_a_new_evaluation() -> None:
    trained = two_phase_description()
    evaluated = with_test_results(trained, TEST_METRICS, top_k=2)
    assert evaluated.startswith(trained)
    assert evaluated.endswith("**Test**: accuracy **0.833**, top-2 accuracy 1.000, macro F1 0.817 on 24 images.")
    again = with_test_results(evaluated, {**TEST_METRICS, "test_accuracy": 0.5}, top_k=2)
    assert again.count("**Test**") == 1 and "accuracy **0.500**" in again
    assert with_test_results("", TEST_METRICS, top_k=2).startswith("**Test**")
