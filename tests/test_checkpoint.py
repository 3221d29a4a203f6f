"""checkpoint.py: a killed run's state comes back exactly, and a state it cannot trust is ignored."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from transferlab.checkpoint import STATE_FILE, Checkpointer


def _tiny_model():  # returns a compiled keras.Model with optimizer state after one step
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    model.fit(np.ones((4, 3), "float32"), np.eye(2, dtype="float32")[[0, 1, 0, 1]], epochs=1, verbose=0)
    return model


def test_saved_epoch_restores_weights_optimizer_and_history(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    state = checkpointer.begin("run-1", "hash-1")
    model = _tiny_model()
    for epoch in (1, 2):
        state.epochs_done = epoch
        state.history.append({"epoch": epoch, "val_accuracy": 0.5 * epoch})
        checkpointer.save(state, model, "head")
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == ["epoch-0002.keras", STATE_FILE]

    loaded = Checkpointer(tmp_path / "checkpoints").load("hash-1")
    assert loaded is not None and loaded.run_id == "run-1" and loaded.epochs_done == 2
    assert loaded.history == state.history and loaded.model_kind == "head"
    restored = checkpointer.restore_model(loaded)
    assert restored is not None
    for ours, theirs in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert int(restored.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())


def test_untrustworthy_states_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="transferlab.checkpoint")  # said, not warned: nothing to act on
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.load("h") is None  # nothing there
    state = checkpointer.begin("run-1", "h")
    assert checkpointer.load("other-config") is None
    state.model_file = "epoch-0001.keras"  # the state names a model file that is not there
    (tmp_path / STATE_FILE).write_text(json.dumps(state.__dict__))
    assert checkpointer.load("h") is None
    (tmp_path / STATE_FILE).write_text("{truncated")
    assert checkpointer.load("h") is None
    assert "unreadable checkpoint" in caplog.text


def test_clear_removes_everything(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.begin("run-1", "h")
    checkpointer.clear()
    assert not checkpointer.directory.exists()
    checkpointer.clear()  # clearing nothing is fine
