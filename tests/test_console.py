"""console.py: no TensorFlow start-up chatter in the terminal, real errors still shown, progress bars on a tty."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import chatter, user_environment

from transferlab.console import is_chatter, logged_progress

# What `import tensorflow` printed on this machine before console.configure() (TF 2.21).
ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN_LINE = (
    "I0000 00:00:1795893590.097380   26424 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors."
)
XNNPACK_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
ERROR_LINE = "E0000 00:00:1795893590.097380   26424 cuda_dnn.cc:8310] Unable to register cuDNN factory"


def test_chatter_is_info_and_warning_below_the_tf_log_level() -> None:
    for line in (ABSL_PREAMBLE, ONEDNN_LINE, XNNPACK_LINE, ONEDNN_LINE.replace("I0000", "W0000")):
        assert is_chatter(line, min_level=2), line
    assert not is_chatter(ERROR_LINE, min_level=2)
    assert not is_chatter("ImportError: libcudart.so.12: cannot open shared object file", min_level=2)
    assert not is_chatter(ONEDNN_LINE, min_level=0), "TF_CPP_MIN_LOG_LEVEL=0 asks for everything"
    assert is_chatter(ONEDNN_LINE, min_level=1) and not is_chatter(ONEDNN_LINE.replace("I0000", "W0000"), 1)


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=user_environment(**(env or {}))
    )


FAKE_TENSORFLOW = """import os
os.write(2, b"I0000 00:00:1.5   7 port.cc:153] oneDNN custom operations are on.\\n")
os.write(2, b"E0000 00:00:1.5   7 loader.cc:9] libtensorflow_framework.so.2: cannot open shared object file\\n")
{tail}
"""


@pytest.mark.parametrize("fails", [False, True], ids=["imports", "fails"])
def test_a_failing_import_shows_everything_it_printed(tmp_path: Path, fails: bool) -> None:
    """A broken TensorFlow install must not be silenced: on failure every captured line is shown."""
    package = tmp_path / "tensorflow"
    package.mkdir()
    tail = 'raise ImportError("cannot load the TensorFlow runtime")' if fails else ""
    (package / "__init__.py").write_text(FAKE_TENSORFLOW.format(tail=tail))
    done = python(
        "from transferlab import console\nconsole.configure()\nimport tensorflow\nprint('imported')",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert "libtensorflow_framework.so.2: cannot open shared object file" in done.stderr, "errors always show"
    if fails:
        assert done.returncode == 1
        assert "oneDNN custom operations" in done.stderr
        assert "ImportError: cannot load the TensorFlow runtime" in done.stderr
    else:
        assert done.returncode == 0 and done.stdout == "imported\n"
        assert "oneDNN" not in done.stderr


PROGRESS_SCRIPT = """
from transferlab import console
console.configure()
import logging
import numpy as np
import keras
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
x, y = np.zeros((40, 4), "float32"), np.zeros(40, "int32")
with console.keras_progress("phase demo", epochs=3) as progress:
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[progress])
logging.getLogger("transferlab").info("fitted")
with console.keras_progress("scoring") as progress:
    model.predict(x, batch_size=10, verbose=0, callbacks=[progress])
"""


def run_on_a_terminal(code: str, timeout: float = 300) -> str:
    """Run `python -c code` with stdout and stderr on a pseudo-terminal; return everything it wrote."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns (tqdm fits them)
    command = [sys.executable, "-c", code]
    proc = subprocess.Popen(command, stdout=terminal, stderr=terminal, close_fds=True, env=user_environment())
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process exited
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert proc.wait(timeout=30) == 0, output.decode(errors="replace")[-3000:]
    return output.decode(errors="replace")


def test_each_pass_draws_one_bar_on_a_terminal_and_nothing_else_reaches_it() -> None:
    """Importing Keras (so TensorFlow) after `configure()` prints nothing; a fit and a predict pass draw
    one bar each on a terminal, and none in a pipe, where only the log line remains."""
    shown = run_on_a_terminal(PROGRESS_SCRIPT)
    assert "phase demo" in shown and "15/15" in shown, shown[-2000:]  # 5 batches x 3 epochs, one bar
    assert "epoch=3" in shown
    assert "scoring" in shown and "4/4" in shown
    assert "fitted" in shown
    assert chatter(shown) == []
    piped = python(PROGRESS_SCRIPT)
    assert piped.returncode == 0, piped.stderr
    lines = piped.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO transferlab: fitted"), "no chatter, no bar in a pipe"


class _Writes(io.StringIO):
    """A stream that keeps each `write` call's text."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_a_log_line_above_a_bar_is_written_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """In one write with its line end: a SIGTERM handled between the two writes tqdm makes left the
    line open, and `interrupted (SIGTERM received)` was printed on its end (a sweep's log, CI)."""
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)  # the console: what logging_redirect_tqdm redirects
    monkeypatch.setattr(logging.root, "handlers", [logging.StreamHandler(stream)])
    with logged_progress(3, "pass"):
        logging.getLogger("transferlab.test").warning("epoch 1/50: val_accuracy 0.6667")
    assert "epoch 1/50: val_accuracy 0.6667\n" in stream.calls, stream.calls
