"""The quick process end of the console scripts: same status, every exit handler run, output flushed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# A console script in miniature: `tensorflow` stands in as loaded (the quick end applies only then),
# an exit handler registered by the "library" writes a file, output stays buffered until the end.
SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys, types
    from pathlib import Path

    from transferlab.process_exit import run_and_exit

    sys.modules.setdefault("tensorflow", types.ModuleType("tensorflow"))
    out = Path(sys.argv[1])

    def main():
        logging.basicConfig(level=logging.INFO, filename=str(out / "log.txt"))
        atexit.register(lambda: (out / "handler.txt").write_text("ran"))
        sys.stdout.write("buffered output")  # no newline, no flush
        logging.getLogger("x").info("logged")
        how = sys.argv[2]
        if how == "raise":
            raise RuntimeError("boom")
        if how == "exit":
            sys.exit(4)
        return int(how)

    run_and_exit(main)
    """
)


def run_script(tmp_path: Path, how: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), how], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(("how", "status"), [("0", 0), ("3", 3), ("exit", 4)])
def test_the_status_handlers_and_buffered_output_survive_the_quick_end(tmp_path: Path, how: str, status: int) -> None:
    done = run_script(tmp_path, how)
    assert done.returncode == status
    assert done.stdout == "buffered output"
    assert (tmp_path / "handler.txt").read_text() == "ran", "other exit handlers run first"
    assert "logged" in (tmp_path / "log.txt").read_text(), "log handlers are flushed"


def test_an_uncaught_error_ends_the_usual_way(tmp_path: Path) -> None:
    done = run_script(tmp_path, "raise")
    assert done.returncode == 1
    assert "RuntimeError: boom" in done.stderr
    assert (tmp_path / "handler.txt").read_text() == "ran"
