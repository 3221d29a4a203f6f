"""Scratch copies of the project, for `make demo` and the DVC tests: the real pipeline, isolated."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from transferlab.offline_plots import TEMPLATE_FILE

_GIT_IDENTITY = ("-c", "user.name=transferlab", "-c", "user.email=transferlab@localhost.invalid")


def project_files(root: Path) -> list[str]:
    """Tracked plus untracked-not-ignored files of the checkout at `root` (what a clone would hold)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted(rel for rel in set(listed.split("\0")) if rel and (root / rel).is_file())


def copy_project(root: Path, target: Path) -> Path:
    """Copy the project's files into `target` (replaced) as a fresh git repo with one commit.

    DVC needs a git repo (and `dvc exp run` a commit); uncommitted work in `root` is included.
    So is what `make setup` generated for DVC (the git-ignored offline plots template).
    """
    if target.exists():
        shutil.rmtree(target)
    for rel in project_files(root):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target / rel)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run(["git", *_GIT_IDENTITY, "add", "-A"], cwd=target, check=True)
    subprocess.run(["git", *_GIT_IDENTITY, "commit", "-q", "--no-verify", "-m", "scratch copy"], cwd=target, check=True)
    if (root / TEMPLATE_FILE).is_file():
        shutil.copy2(root / TEMPLATE_FILE, target / TEMPLATE_FILE)
    return target
