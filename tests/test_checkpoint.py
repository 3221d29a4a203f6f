"""checkpoint.py: a killed run's state comes back exactly, and a state it cannot trust is ignored."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from transferlab.checkpoint import PREVIOUS_STATE_FILE, STATE_FILE, Checkpointer


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
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == [
        "epoch-0001.keras",
        "epoch-0002.keras",
        PREVIOUS_STATE_FILE,
        STATE_FILE,
    ]

    loaded = Checkpointer(tmp_path / "checkpoints").load("hash-1")
    assert loaded is not None and loaded.run_id == "run-1" and loaded.epochs_done == 2
    assert loaded.history == state.history and loaded.model_kind == "head"
    restored = checkpointer.restore_model(loaded)
    assert restored is not None
    for ours, theirs in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert int(restored.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())


def test_the_best_model_comes_back_without_a_warning_about_its_optimizer(tmp_path: Path) -> None:
    """A phase carries the best over before its optimizer took a step; restoring it loads the
    weights alone (compiling it printed "Skipping variable loading for optimizer ...")."""
    import warnings

    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")  # never trained: optimizer not built
    checkpointer = Checkpointer(tmp_path)
    state = checkpointer.begin("run-1", "hash-1")
    checkpointer.save_best(state, model, "head", "head")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = checkpointer.restore_best(state)
    for ours, theirs in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_the_epoch_before_is_kept_with_its_state(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path)
    state = _epochs(checkpointer, _tiny_model(), 3, best_at=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras", PREVIOUS_STATE_FILE, STATE_FILE]
    assert (state.model_file, state.model_kind, state.best_file) == ("epoch-0003.keras", "full", "epoch-0001.keras")
    previous = json.loads((tmp_path / PREVIOUS_STATE_FILE).read_text())
    assert (previous["epochs_done"], previous["model_file"], previous["model_kind"]) == (2, "epoch-0002.keras", "head")
    state.epochs_done = 4
    checkpointer.save(state, _tiny_model(), "full", best=True)  # epoch 2 goes; epoch 1 is the fallback's best
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == [
        "epoch-0001.keras",
        "epoch-0003.keras",
        "epoch-0004.keras",
    ]


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


def _epochs(checkpointer: Checkpointer, model, count: int, best_at: int | None = None):  # -> CheckpointState
    """`count` epochs recorded (the last as kind "full"), epoch `best_at` kept as the best."""
    state = checkpointer.begin("run-1", "h")
    for epoch in range(1, count + 1):
        state.epochs_done = epoch
        state.history.append({"epoch": epoch, "val_accuracy": 0.1 * epoch})
        checkpointer.save(state, model, "head" if epoch < count else "full", best=epoch == best_at)
    return state


def _flip_a_byte_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "flipped byte"])
def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """Issue 12: a corrupt `epoch-NNNN.keras` made every later run fail until the folder was deleted."""
    caplog.set_level(logging.INFO, logger="transferlab.checkpoint")  # it repairs itself: said, not warned
    checkpointer = Checkpointer(tmp_path)
    model = _tiny_model()
    _epochs(checkpointer, model, 3)
    newest = tmp_path / "epoch-0003.keras"
    if damage == "garbage":
        newest.write_bytes(b"PK\x03\x04 not a whole zip file")
    else:  # the zip's structure intact, one member's bytes changed: its CRC tells
        _flip_a_byte_in_the_middle(newest)

    state = Checkpointer(tmp_path).load("h")
    assert state is not None and state.run_id == "run-1"
    assert (state.epochs_done, state.model_file, state.model_kind) == (2, "epoch-0002.keras", "head")
    assert [row["epoch"] for row in state.history] == [1, 2]
    assert "checkpoint epoch-0003.keras is unreadable" in caplog.text
    assert "resuming from epoch-0002.keras (epoch 2) instead" in caplog.text
    assert (tmp_path / STATE_FILE).read_text() == (tmp_path / PREVIOUS_STATE_FILE).read_text(), "resumed on disk too"
    restored = checkpointer.restore_model(state)
    for ours, theirs in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_no_readable_checkpoint_starts_over(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    caplog.set_level(logging.INFO, logger="transferlab.checkpoint")
    checkpointer = Checkpointer(tmp_path)
    _epochs(checkpointer, _tiny_model(), 2)
    for name in ("epoch-0001.keras", "epoch-0002.keras"):
        path = tmp_path / name
        if damage == "delete":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:100])
    assert checkpointer.load("h") is None
    assert "the one before cannot be used" in caplog.text and "starting over" in caplog.text
