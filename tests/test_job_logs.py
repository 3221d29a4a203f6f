"""job_logs.py: no retracing warnings across sweep jobs, no ANSI codes in log files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from transferlab.errors import describe, strip_ansi
from transferlab.job_logs import DropRetracingWarnings, PlainText, quiet_job_logs


def _fit_fresh_models(count: int) -> None:
    """What a sweep does: one new model per job, in one process (TensorFlow then warns about retracing)."""
    import keras
    import numpy as np

    x, y = np.zeros((16, 4), "float32"), np.eye(2)[np.zeros(16, dtype=int)]
    for _ in range(count):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, validation_data=(x, y))
        model.predict(x, verbose=0)


def _retrace_a_fresh_function(count: int) -> None:
    """Define and call a new `tf.function` `count` times: from the fifth, TensorFlow warns about
    retracing. It warns at most twice per function's code in a process, so Keras' own train step,
    which earlier tests in the session fit, may have used its warnings up; this code is fresh."""
    import tensorflow as tf

    for i in range(count):

        @tf.function
        def step(x: tf.Tensor) -> tf.Tensor:
            return x + 1

        step(tf.constant(float(i)))


@pytest.mark.slow
def test_retracing_warnings_are_dropped_and_other_tensorflow_warnings_kept(caplog: pytest.LogCaptureFixture) -> None:
    tf_logger = logging.getLogger("tensorflow")
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        _retrace_a_fresh_function(5)
    assert any("retracing" in r.getMessage() for r in caplog.records), "the warning this filter is for"
    caplog.clear()
    quiet_job_logs()
    quiet_job_logs()  # once per job: installs each filter once
    try:
        assert sum(isinstance(f, DropRetracingWarnings) for f in tf_logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger="tensorflow"):
            _fit_fresh_models(3)
            tf_logger.warning("some other TensorFlow warning")
        messages = [r.getMessage() for r in caplog.records]
        assert not any("retracing" in m for m in messages)
        assert "some other TensorFlow warning" in messages
    finally:
        for target in (tf_logger, *logging.getLogger().handlers):
            for installed in [f for f in target.filters if isinstance(f, (DropRetracingWarnings, PlainText))]:
                target.removeFilter(installed)


def test_log_files_get_plain_text(tmp_path: Path) -> None:
    logger = logging.getLogger("transferlab.test_job_logs")
    handler = logging.FileHandler(tmp_path / "app.log")
    handler.addFilter(PlainText())
    logger.addHandler(handler)
    try:
        logger.warning("Exception encountered: %s", "\x1b[1mbad shape\x1b[0m")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / "app.log").read_text() == "Exception encountered: bad shape\n"


def test_error_lines_carry_no_ansi_codes() -> None:
    """Keras wraps messages of errors raised in layers in bold codes; the one-line form drops them."""
    error = ValueError("Exception encountered when calling Dense.call().\n\n\x1b[1mbad input\x1b[0m\n")
    assert describe(ValueError("\x1b[1mbad input\x1b[0m")) == "ValueError: bad input"
    assert "\x1b" not in strip_ansi(str(error))
