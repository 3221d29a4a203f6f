"""progress.py: best epoch across phases, early stopping, plateau drops, and phases over before a kill."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import tiny_cfg

from transferlab.checkpoint import CheckpointState
from transferlab.config import EarlyStoppingConfig, TrainConfig
from transferlab.progress import judge_epoch, phase_is_over, start_phase

EVERY_EPOCH = TrainConfig(early_stopping=None)
STOPPING = TrainConfig(early_stopping=EarlyStoppingConfig(monitor="val_loss", patience=2, min_delta=0.01))


def _run(cfg: TrainConfig, losses: list[float], state: CheckpointState | None = None) -> list[tuple[bool, bool, bool]]:
    state = state or CheckpointState("run", "hash")
    verdicts = []
    for loss in losses:
        state.epochs_done += 1
        verdict = judge_epoch(state, state.epochs_done, {"val_loss": loss, "val_accuracy": 1 - loss}, cfg, cfg.schedule)
        verdicts.append((verdict.improved, verdict.stop, verdict.lower_learning_rate))
    return verdicts


def test_best_epoch_and_early_stopping_with_min_delta() -> None:
    state = CheckpointState("run", "hash")
    verdicts = _run(STOPPING, [0.9, 0.5, 0.495, 0.6], state)
    # 0.495 is within min_delta of 0.5: no improvement; two such epochs stop the phase.
    assert verdicts == [(True, False, False), (True, False, False), (False, False, False), (False, True, False)]
    assert (state.best_epoch, state.best_value) == (2, 0.5)


def test_accuracy_is_maximised() -> None:
    cfg = TrainConfig(early_stopping=EarlyStoppingConfig(monitor="val_accuracy", patience=1))
    state = CheckpointState("run", "hash")
    _run(cfg, [0.5, 0.2, 0.3], state)  # accuracies 0.5, 0.8, 0.7
    assert state.best_epoch == 2 and state.best_value == 0.8


def test_plateau_lowers_the_rate_after_patience_epochs_and_waits_again() -> None:
    cfg = dataclasses.replace(
        TrainConfig(schedule="plateau", early_stopping=None),
        plateau=dataclasses.replace(TrainConfig().plateau, patience=2),
    )
    lowers = [lower for _, _, lower in _run(cfg, [0.5, 0.6, 0.6, 0.6, 0.6, 0.4, 0.7])]
    assert lowers == [False, False, True, False, True, False, False]
    assert not any(stop for _, stop, _ in _run(cfg, [0.5] * 10)), "no early stopping unless configured"


def test_a_later_phase_must_beat_the_earlier_best_and_has_its_own_patience() -> None:
    state = CheckpointState("run", "hash")
    start_phase(state, "head")
    _run(STOPPING, [0.5, 0.7, 0.7], state)  # head stops after epoch 3, best epoch 1
    assert phase_is_over(state, "head", epochs=10, cfg=STOPPING)
    start_phase(state, "finetune")
    assert state.phase_start == 3 and not phase_is_over(state, "finetune", epochs=10, cfg=STOPPING)
    verdicts = _run(STOPPING, [0.6, 0.45], state)
    assert verdicts == [(False, False, False), (True, False, False)] and state.best_epoch == 5


def test_phase_over_by_epoch_budget_or_finished_list() -> None:
    state = CheckpointState("run", "hash", epochs_done=4, phase="head", phase_start=0)
    assert phase_is_over(state, "head", epochs=4, cfg=TrainConfig())
    assert not phase_is_over(state, "head", epochs=5, cfg=TrainConfig())
    assert not phase_is_over(state, "finetune", epochs=1, cfg=TrainConfig())
    state.finished_phases.append("finetune")
    assert phase_is_over(state, "finetune", epochs=1, cfg=TrainConfig())


def test_the_finetune_phase_has_its_own_schedule() -> None:
    """finetune=top60: a constant-rate head phase, then a warm-up epoch and cosine decay."""
    from transferlab.model import learning_rate_schedule
    from transferlab.trainer import plan_phases

    phases = plan_phases(tiny_cfg("finetune=top60"))
    assert [(phase.name, phase.schedule) for phase in phases] == [("head", "constant"), ("finetune", "cosine")]
    assert plan_phases(tiny_cfg("finetune=top60", "finetune.schedule=null"))[1].schedule == "constant"
    finetune = phases[1]
    rate = learning_rate_schedule(
        finetune.schedule, finetune.learning_rate, finetune.epochs, finetune.warmup_epochs, 10
    )
    assert float(rate(0)) < finetune.learning_rate / 50, "the warm-up starts low"
    assert float(rate(10)) == pytest.approx(finetune.learning_rate), "and reaches the rate after one epoch"
    assert float(rate(finetune.epochs * 10)) == pytest.approx(0.0, abs=1e-9), "cosine decays to zero"
