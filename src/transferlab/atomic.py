"""Replace a stage's output folder in one rename, so a failed run never leaves half of it.

The new content is built in a hidden temporary folder next to the target (same filesystem,
so the final `rename` is atomic) and swapped in only when the block finishes without error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def replace_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it becomes `target`, else it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(new: Path, target: Path) -> None:
    """Move `target` aside, rename `new` into its place, then delete the old content."""
    if not (target.exists() or target.is_symlink()):
        new.rename(target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    target.rename(aside / target.name)
    try:
        new.rename(target)
    except OSError:
        (aside / target.name).rename(target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Delete temp folders of earlier runs on `target` that were killed before they could clean up."""
    for kind in ("tmp", "old"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*-*"):
            pid = leftover.name[len(f".{target.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                log.info("removing %s left by an interrupted run", leftover)
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_file(target: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temp path beside `target` (same suffix), then rename it over `target`.

    Readers see the old file or the complete new one, never a partial write.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        write(tmp)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: Path, text: str) -> None:
    """Atomically replace `target` with `text`."""
    write_file(target, lambda tmp: tmp.write_text(text))
