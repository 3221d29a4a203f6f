"""Per-epoch training checkpoints, so a killed run resumes from its last finished epoch.

A checkpoint is the model being fitted (with its optimizer state) saved as `epoch-NNNN.keras`,
plus `state.json` naming that file, the best epoch's file (kept while it is the best), the
MLflow run, the config hash, the history and where each phase stands (early-stopping and
plateau counters). Model files are written first and the state last, each atomically, so
`state.json` always points at complete files; files it no longer names are deleted after it
is written. A finished run deletes its checkpoints.

The state of the epoch before is kept too (`previous.json`, with the files it names): if a model
file of the newest cannot be read (a disk error, a bad copy), training resumes from the epoch
before, and if neither can, it starts over; the log says which.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transferlab import atomic, keras_saving
from transferlab.errors import first_line

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
PREVIOUS_STATE_FILE = "previous.json"  # the state as it was before the newest epoch was recorded
KERAS_MEMBERS = frozenset({"config.json", "model.weights.h5"})  # what `keras.models.load_model` reads from a .keras zip
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
    # An L-BFGS head phase's strengths tried, in order, with their scores (`linear_head.LinearFit`).
    l2_search: list[dict[str, float]] = field(default_factory=list)


class Checkpointer:
    """Saves and restores the training state in one folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def previous_state_path(self) -> Path:
        return self.directory / PREVIOUS_STATE_FILE

    def load(self, config_hash: str) -> CheckpointState | None:
        """The state to resume from, or None (nothing there, unreadable, another config, or no
        model files that load). Falls back to the epoch before when a newest model is unreadable."""
        state = self._read(self.state_path)
        if state is None:
            return None
        if state.config_hash != config_hash:
            log.info("checkpoint in %s is for another config: starting afresh", self.directory)
            return None
        problem = self._unreadable(state)
        if problem is None:
            return state
        previous = self._read(self.previous_state_path)
        previous_problem = self._unreadable(previous) if previous else "no earlier checkpoint"
        if previous is None or previous_problem is not None:
            log.info("checkpoint %s, and the one before cannot be used (%s): starting over", problem, previous_problem)
            return None
        start = previous.model_file or "the start"
        log.info("checkpoint %s: resuming from %s (epoch %d) instead", problem, start, previous.epochs_done)
        self.write_state(previous)  # on disk too, so the next epoch's fallback is this one
        return previous

    def begin(self, run_id: str, config_hash: str) -> CheckpointState:
        """A fresh state for a new run (clears any older checkpoint)."""
        self.clear()
        state = CheckpointState(run_id=run_id, config_hash=config_hash)
        self.write_state(state)
        return state

    def save(self, state: CheckpointState, model: keras.Model, kind: ModelKind, *, best: bool = False) -> None:
        """Record a finished epoch (and, with `best`, keep it as the best): model file first, then the state."""
        name = f"epoch-{state.epochs_done:04d}.keras"
        atomic.write_file(self.directory / name, lambda tmp: keras_saving.save(model, tmp))
        if self.state_path.is_file():  # the epoch before, where a resume falls back to
            atomic.write_text(self.previous_state_path, self.state_path.read_text())
        state.model_file, state.model_kind = name, kind
        if best:
            state.best_file, state.best_kind = name, kind
        self.write_state(state)

    def save_best(self, state: CheckpointState, model: keras.Model, kind: ModelKind, label: str) -> None:
        """Store `model` as the best so far under `label` (a phase carrying the best over as its own kind)."""
        name = f"best-{label}.keras"
        atomic.write_file(self.directory / name, lambda tmp: keras_saving.save(model, tmp))
        state.best_file, state.best_kind = name, kind
        self.write_state(state)

    def restore_best(self, state: CheckpointState) -> keras.Model:
        """The best epoch's model, uncompiled: only its weights are used (a next phase starts from
        them with its own optimizer), and compiling would warn about a best model saved before its
        optimizer took a step."""
        import keras

        assert state.best_file is not None
        return keras.models.load_model(self.directory / state.best_file, compile=False)

    def restore_model(self, state: CheckpointState) -> keras.Model | None:
        """The saved model (compiled, with optimizer state), if the state has one."""
        import keras

        if state.model_file is None:
            return None
        return keras.models.load_model(self.directory / state.model_file)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def write_state(self, state: CheckpointState) -> None:
        """Write the state atomically, then delete model files neither it nor the previous state names."""
        atomic.write_text(self.state_path, json.dumps(asdict(state), indent=1))
        previous = self._read(self.previous_state_path, quiet=True)
        keep = {state.model_file, state.best_file}
        if previous is not None:
            keep |= {previous.model_file, previous.best_file}
        for path in self.directory.glob("*.keras"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def _read(self, path: Path, quiet: bool = False) -> CheckpointState | None:
        """The state in `path`, or None when there is none or it cannot be read."""
        if not path.is_file():
            return None
        try:
            return CheckpointState(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            if not quiet:
                log.info("ignoring unreadable checkpoint %s (%s)", path, exc)
            return None

    def _unreadable(self, state: CheckpointState) -> str | None:
        """None when every model file `state` names is a whole `.keras` archive, else which one is
        not and why. Checked without TensorFlow (which must not start before a multi_worker
        strategy): every member's CRC, and the members Keras loads."""
        for name in dict.fromkeys(n for n in (state.model_file, state.best_file) if n):
            path = self.directory / name
            if not path.is_file():
                return f"{name} is missing"
            try:
                with zipfile.ZipFile(path) as archive:
                    missing = sorted(KERAS_MEMBERS - set(archive.namelist()))
                    corrupt = archive.testzip()
            except Exception as exc:  # BadZipFile, zlib.error, EOFError, OSError, ... on damaged bytes
                return f"{name} is unreadable ({first_line(exc)})"
            if missing or corrupt:
                return f"{name} is unreadable ({'corrupt member ' + corrupt if corrupt else 'no ' + missing[0]})"
        return None
