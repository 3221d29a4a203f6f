"""Per-epoch training checkpoints, so a killed run resumes from its last finished epoch.

A checkpoint is the model being fitted (with its optimizer state) saved as `epoch-NNNN.keras`,
plus `state.json` naming that file, the best epoch's file (kept while it is the best), the
MLflow run, the config hash, the history and where each phase stands (early-stopping and
plateau counters). Model files are written first and the state last, each atomically, so
`state.json` always points at complete files; files it no longer names are deleted after it
is written. A finished run deletes its checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transferlab import atomic

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
# What a checkpointed model is: the head alone, the top of the backbone above the cut plus the
# head (cut.py), or the whole classifier.
ModelKind = Literal["head", "top", "full"]


@dataclass
class CheckpointState:
    """Where an interrupted run stopped."""

    run_id: str
    config_hash: str
    epochs_done: int = 0
    model_kind: ModelKind = "head"
    model_file: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # Where the phases stand: finished ones, the current one and the epoch it started after.
    finished_phases: list[str] = field(default_factory=list)
    phase: str | None = None
    phase_start: int = 0
    # The best epoch so far (by the monitored metric) and the counters of the current phase.
    best_epoch: int | None = None
    best_value: float | None = None
    best_file: str | None = None
    best_kind: ModelKind | None = None
    epochs_without_improvement: int = 0
    epochs_since_lr_change: int = 0


class Checkpointer:
    """Saves and restores the training state in one folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def load(self, config_hash: str) -> CheckpointState | None:
        """The state to resume from, or None (nothing there, unreadable, or another config)."""
        if not self.state_path.is_file():
            return None
        try:
            state = CheckpointState(**json.loads(self.state_path.read_text()))
        except (ValueError, TypeError) as exc:
            log.info("ignoring unreadable checkpoint %s (%s)", self.state_path, exc)
            return None
        if state.config_hash != config_hash:
            log.info("checkpoint in %s is for another config: starting afresh", self.directory)
            return None
        for name in (state.model_file, state.best_file):
            if name and not (self.directory / name).is_file():
                log.info("checkpoint model %s is missing: starting afresh", name)
                return None
        return state

    def begin(self, run_id: str, config_hash: str) -> CheckpointState:
        """A fresh state for a new run (clears any older checkpoint)."""
        self.clear()
        state = CheckpointState(run_id=run_id, config_hash=config_hash)
        self.write_state(state)
        return state

    def save(self, state: CheckpointState, model: keras.Model, kind: ModelKind, *, best: bool = False) -> None:
        """Record a finished epoch (and, with `best`, keep it as the best): model file first, then the state."""
        name = f"epoch-{state.epochs_done:04d}.keras"
        atomic.write_file(self.directory / name, model.save)
        state.model_file, state.model_kind = name, kind
        if best:
            state.best_file, state.best_kind = name, kind
        self.write_state(state)

    def save_best(self, state: CheckpointState, model: keras.Model, kind: ModelKind, label: str) -> None:
        """Store `model` as the best so far under `label` (a phase carrying the best over as its own kind)."""
        name = f"best-{label}.keras"
        atomic.write_file(self.directory / name, model.save)
        state.best_file, state.best_kind = name, kind
        self.write_state(state)

    def restore_best(self, state: CheckpointState) -> keras.Model:
        """The best epoch's model."""
        import keras

        assert state.best_file is not None
        return keras.models.load_model(self.directory / state.best_file)

    def restore_model(self, state: CheckpointState) -> keras.Model | None:
        """The saved model (compiled, with optimizer state), if the state has one."""
        import keras

        if state.model_file is None:
            return None
        return keras.models.load_model(self.directory / state.model_file)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def write_state(self, state: CheckpointState) -> None:
        """Write the state atomically, then delete model files it no longer names."""
        atomic.write_text(self.state_path, json.dumps(asdict(state), indent=1))
        keep = {STATE_FILE, state.model_file, state.best_file}
        for path in self.directory.glob("*.keras"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
