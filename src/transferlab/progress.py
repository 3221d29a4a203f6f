"""Epoch-by-epoch decisions of training: the best epoch, early stopping, plateau learning-rate drops.

Pure logic over the checkpointed `CheckpointState`, so a resumed run makes exactly the
decisions the uninterrupted run would have made. The best epoch is tracked across phases:
a fine-tuning phase must beat the head phase's best to replace it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from transferlab.checkpoint import CheckpointState
from transferlab.config import TrainConfig


@dataclass(frozen=True)
class Verdict:
    """What to do after an epoch."""

    improved: bool  # a new best epoch: keep its model
    stop: bool  # early stopping ends the phase
    lower_learning_rate: bool  # schedule=plateau: multiply the rate by plateau.factor


def monitored_metric(cfg: TrainConfig) -> str:
    """The metric that decides the best epoch and the plateau: early stopping's, else val_loss."""
    return cfg.early_stopping.monitor if cfg.early_stopping else "val_loss"


def is_better(value: float, best: float | None, metric: str, min_delta: float = 0.0) -> bool:
    """Lower loss or higher accuracy, by more than `min_delta`."""
    if best is None:
        return True
    return value < best - min_delta if metric.endswith("loss") else value > best + min_delta


def start_phase(state: CheckpointState, name: str) -> None:
    """A new phase begins after the epochs done so far; its counters start at zero."""
    state.phase, state.phase_start = name, state.epochs_done
    state.epochs_without_improvement = state.epochs_since_lr_change = 0


def judge_epoch(
    state: CheckpointState, epoch: int, logs: Mapping[str, float], cfg: TrainConfig, schedule: str
) -> Verdict:
    """Update the state with a finished epoch's metrics and say what follows (`schedule`: the phase's)."""
    metric = monitored_metric(cfg)
    min_delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
    value = float(logs[metric])
    improved = is_better(value, state.best_value, metric, min_delta)
    if improved:
        state.best_epoch, state.best_value = epoch, value
        state.epochs_without_improvement = state.epochs_since_lr_change = 0
    else:
        state.epochs_without_improvement += 1
        state.epochs_since_lr_change += 1
    lower = schedule == "plateau" and state.epochs_since_lr_change >= cfg.plateau.patience
    if lower:
        state.epochs_since_lr_change = 0
    stop = cfg.early_stopping is not None and state.epochs_without_improvement >= cfg.early_stopping.patience
    return Verdict(improved=improved, stop=stop, lower_learning_rate=lower)


def phase_is_over(state: CheckpointState, name: str, epochs: int, cfg: TrainConfig) -> bool:
    """Whether a phase of `epochs` epochs has nothing left to do (finished, or stopped early before a kill)."""
    if name in state.finished_phases:
        return True
    if state.phase != name:
        return False
    done = state.epochs_done - state.phase_start
    stopped = cfg.early_stopping is not None and state.epochs_without_improvement >= cfg.early_stopping.patience
    return done >= epochs or stopped
