"""Replace a stage's output folder in one rename (with files beside it, in one step), so a
failed run never leaves half of it.

The new content is built in a hidden temporary folder next to the target (same filesystem,
so the final `rename` is atomic) and swapped in only when the block finishes without error.
Ctrl-C and SIGTERM wait for the swap to finish; after a `kill -9` between its two renames the
next `replace_dir` on the same target puts the old content back before it starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from transferlab.errors import interrupts_deferred

log = logging.getLogger(__name__)


@contextlib.contextmanager
def replace_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it becomes `target`, else it is removed."""
    with replace_together(target, ()) as (folder, _):
        yield folder


@contextlib.contextmanager
def replace_together(folder: Path, files: Sequence[Path]) -> Iterator[tuple[Path, list[Path]]]:
    """`replace_dir(folder)` and, in the same step, each of `files`: one unit of output.

    Yields the new folder and one new path per file (its own name, in a hidden folder beside it).
    On success every file is renamed over its target and the folder swapped in, one rename
    after the other with Ctrl-C and SIGTERM held back; on an error all of the new is removed
    and the old stays.
    """
    targets = [folder, *files]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(target)
    new_dir, *holders = (
        Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)) for target in targets
    )
    new_dir.chmod(0o755)
    new_files = [holder / file.name for holder, file in zip(holders, files, strict=True)]
    try:
        yield new_dir, new_files
        with interrupts_deferred():
            for new, file in zip(new_files, files, strict=True):
                new.replace(file)
            _swap(new_dir, folder)
    except BaseException:
        shutil.rmtree(new_dir, ignore_errors=True)
        raise
    finally:
        for holder in holders:
            shutil.rmtree(holder, ignore_errors=True)


def _swap(new: Path, target: Path) -> None:
    """Move `target` aside, rename `new` into its place, then delete the old content.

    Its caller holds Ctrl-C and SIGTERM back, so it never stops between the two renames.
    """
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
    """Clean up after runs on `target` that were killed before they could: delete their temp
    folders, and if one died between the two renames of `_swap`, put the old content back."""
    for kind in ("old", "tmp"):
        for leftover in sorted(target.parent.glob(f".{target.name}.{kind}-*-*")):
            pid = leftover.name[len(f".{target.name}.{kind}-") :].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            moved_aside = leftover / target.name
            if kind == "old" and moved_aside.exists() and not (target.exists() or target.is_symlink()):
                log.warning("restoring %s from %s (a run was killed while replacing it)", target, leftover)
                moved_aside.rename(target)
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
