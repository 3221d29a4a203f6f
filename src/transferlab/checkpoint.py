"""Per-epoch training checkpoints, so a killed run resumes from its last finished epoch.

A checkpoint is the model being fitted (with its optimizer state) saved as
`epoch-NNNN.keras`, plus `state.json` naming that file, the MLflow run, the config hash and
the history so far. The model file is written first and the state last, each atomically, so
`state.json` always points at a complete file. A finished run deletes its checkpoints.
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
ModelKind = Literal["head", "full"]


@dataclass
class CheckpointState:
    """Where an interrupted run stopped."""

    run_id: str
    config_hash: str
    epochs_done: int = 0
    model_kind: ModelKind = "head"
    model_file: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


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
        if state.model_file and not (self.directory / state.model_file).is_file():
            log.info("checkpoint model %s is missing: starting afresh", state.model_file)
            return None
        return state

    def begin(self, run_id: str, config_hash: str) -> CheckpointState:
        """A fresh state for a new run (clears any older checkpoint)."""
        self.clear()
        state = CheckpointState(run_id=run_id, config_hash=config_hash)
        self._write_state(state)
        return state

    def save(self, state: CheckpointState, model: keras.Model, kind: ModelKind) -> None:
        """Record a finished epoch: model file first, then the state that points at it."""
        name = f"epoch-{state.epochs_done:04d}.keras"
        atomic.write_file(self.directory / name, model.save)
        previous = state.model_file
        state.model_file, state.model_kind = name, kind
        self._write_state(state)
        if previous and previous != name:
            (self.directory / previous).unlink(missing_ok=True)

    def restore_model(self, state: CheckpointState) -> keras.Model | None:
        """The saved model (compiled, with optimizer state), if the state has one."""
        import keras

        if state.model_file is None:
            return None
        return keras.models.load_model(self.directory / state.model_file)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_state(self, state: CheckpointState) -> None:
        atomic.write_text(self.state_path, json.dumps(asdict(state), indent=1))
