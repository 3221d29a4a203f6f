"""What a person sees in the terminal: log format, quiet library start-up, one progress bar per long pass.

`configure()` runs first in every entry point (`transferlab`, `transferlab-train`, `make demo`).
It sets the log format, keeps TensorFlow's and MLflow's internal chatter out of the terminal and
installs an import hook (the served MLflow model installs only the hook): TensorFlow prints absl/oneDNN lines
straight to file descriptor 2 while it is imported, whatever `TF_CPP_MIN_LOG_LEVEL` says, so
the first `import tensorflow` (also through `import keras`) runs with fd 2 captured, and only
the lines that are not INFO/WARNING chatter reach the terminal. If the import fails, everything
it printed is shown, so a real error is never hidden. It also installs the hooks that make the first
imports of TensorFlow and MLflow cheaper (`lean_imports`) and the SIGINT/SIGTERM handler
(`errors.stop_on_signals`), so `kill` stops a command as Ctrl-C does.

Progress bars (`progress_bar`, `keras_progress`) are tqdm bars on stderr that show only when
stderr is a terminal; logs and pipes get one log line per pass or epoch instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from transferlab import lean_imports
from transferlab.errors import stop_on_signals
from transferlab.import_hooks import wrap_first_imports

if TYPE_CHECKING:
    import keras

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Defaults for settings the user may override in the environment.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's C++ INFO and WARNING lines (after its logging starts)
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables...", etc.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per model logged (its signature check)
    "MLFLOW_DISABLE_TELEMETRY": "true",  # offline-first: MLflow must not call home
}
# Python loggers whose INFO lines are internals ("Assets written to ...", "setup plugin ...": the
# import of Optuna imports Alembic, whose plugins log each as it is set up).
QUIET_LOGGERS = ("tensorflow", "absl", "alembic")
# Modules whose import prints C++ log lines on fd 2.
NOISY_IMPORTS = frozenset({"tensorflow"})
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl/glog line: severity letter, MMDD, time, thread, file:line]
_GLOG_LINE = re.compile(r"^(?P<severity>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]+\] ")
# TensorFlow Lite's own logger ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
_TFLITE_LINE = re.compile(r"^(?P<severity>INFO|WARNING): ")
_SEVERITY_RANK = {"I": 0, "INFO": 0, "W": 1, "WARNING": 1, "E": 2, "F": 3}


def configure(level: int = logging.INFO) -> None:
    """Log format and quiet start-up for an entry point; call it before anything heavy is imported.

    It also makes the first imports of TensorFlow and MLflow cheaper (`lean_imports`) and SIGTERM
    stop the process as Ctrl-C does (`errors.stop_on_signals`)."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_imports()
    lean_imports.install()
    stop_on_signals()


def quiet_imports() -> None:
    """Make the first import of TensorFlow keep its C++ start-up chatter off the terminal."""
    wrap_first_imports(NOISY_IMPORTS, quiet_c_stderr)


def is_chatter(line: str, min_level: int | None = None) -> bool:
    """True for a C++ log line below `TF_CPP_MIN_LOG_LEVEL` (INFO at 1, WARNING too at 2) or absl's preamble."""
    if min_level is None:
        setting = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
        min_level = int(setting) if setting.isdigit() else 0
    if line.strip() == _ABSL_PREAMBLE:
        return min_level >= 1
    match = _GLOG_LINE.match(line) or _TFLITE_LINE.match(line)
    return bool(match) and _SEVERITY_RANK[match["severity"]] < min_level


@contextlib.contextmanager
def quiet_c_stderr(keep: Callable[[str], bool] | None = None) -> Iterator[None]:
    """Capture file descriptor 2 (C and C++ code print there directly) while the block runs.

    Afterwards the captured lines `keep` accepts (by default those that are not chatter,
    `is_chatter`) are written to stderr; if the block raises, every captured line is, so the
    reason for a failure is never lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            wanted = keep or (lambda line: not is_chatter(line))
            kept = "".join(line for line in lines if failed or wanted(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _WholeLines(tqdm):
    """tqdm whose `write` puts a message and its line end in one call.

    tqdm writes them in two. A stop signal handled between the two (`errors.stop_on_signals`
    raises there) left the log line open, and `interrupted (SIGTERM received)` went on its end.
    """

    @classmethod
    def write(cls, s: str, file: Any = None, end: str = "\n", nolock: bool = False) -> None:
        tqdm.write(s + end, file=file, end="", nolock=nolock)


def logs_above_bars() -> contextlib.AbstractContextManager[None]:
    """While it is entered, console log lines are printed above the progress bars, each whole."""
    return logging_redirect_tqdm(tqdm_class=_WholeLines)


def progress_bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr, shown only when stderr is a terminal; it stays as one finished line."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True)


@contextlib.contextmanager
def logged_progress(total: int | None, desc: str, unit: str = "it") -> Iterator[tqdm]:
    """`progress_bar` with log lines printed above it while it runs; closed when the block ends."""
    with logs_above_bars(), progress_bar(total, desc, unit) as bar:
        yield bar


@contextlib.contextmanager
def keras_progress(desc: str, epochs: int = 1) -> Iterator[keras.callbacks.Callback]:
    """A Keras callback drawing one bar over every batch of a `predict` pass or of `epochs` `fit` epochs.

    Use it with `verbose=0`. Log lines print above the bar while it runs; it closes when the
    block ends, also on an error. In `fit` its postfix shows the epoch, loss and validation accuracy.
    """
    import keras

    class KerasProgress(keras.callbacks.Callback):
        bar: tqdm | None = None
        # Keras may call the batch hooks from a helper thread, so a step does not wait for the
        # previous one's results (a per-batch hook otherwise makes every step synchronous).
        async_safe = True

        def _start(self) -> None:
            steps = self.params.get("steps")
            self.bar = progress_bar(steps * epochs if steps else None, desc, "batch")

        def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
            self._start()

        def on_predict_begin(self, logs: Mapping[str, Any] | None = None) -> None:
            self._start()

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            if self.bar is not None:
                self.bar.update()

        def on_predict_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            if self.bar is not None:
                self.bar.update()

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            if self.bar is not None:
                shown = {k: f"{float(v):.4f}" for k, v in (logs or {}).items() if k in ("loss", "val_accuracy")}
                self.bar.set_postfix({"epoch": epoch + 1, **shown})

    callback = KerasProgress()
    with logs_above_bars():
        try:
            yield callback
        finally:
            if callback.bar is not None:
                callback.bar.close()
