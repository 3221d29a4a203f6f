"""Split stage: check every image under `data/raw/<name>/` and write stratified manifests.

Outputs in `data/splits/`: `train.csv`, `val.csv`, `test.csv` (columns `path,label`, paths
relative to the raw dataset folder with `/` separators), `classes.json` (sorted class names)
and `report.json` (counts per class and split, every skipped file with its reason, and the
data settings the split was made with). All five are replaced together or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from transferlab.atomic import replace_dir
from transferlab.config import Config, DataConfig
from transferlab.errors import DataError
from transferlab.images import check_images, is_hidden
from transferlab.locks import stage_lock
from transferlab.manifests import MANIFEST_COLUMNS, split_settings
from transferlab.paths import SPLITS, StagePaths

log = logging.getLogger(__name__)

SKIPPED_SHOWN = 5  # skipped files named on the console; report.json lists every one


def split(cfg: Config, paths: StagePaths) -> dict[str, Any]:
    """Verify the images in `data/raw/<name>/`, split them per class, write `data/splits/`; return the report.

    One split at a time per project (`BusyError` for a second).
    """
    with stage_lock(paths.locks, "split"):
        return _split(cfg, paths)


def _split(cfg: Config, paths: StagePaths) -> dict[str, Any]:
    data_cfg = cfg.data
    raw_dir = paths.raw_dataset(data_cfg.name)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} not found: run `dvc repro download` (or `transferlab download`) first")
    class_dirs, candidates, skipped = _scan(raw_dir)
    started = time.perf_counter()
    reasons = check_images([raw_dir / rel for rel in candidates])
    log.info("checked %d files in %.1f s", len(candidates), time.perf_counter() - started)
    by_class: dict[str, list[str]] = {name: [] for name in class_dirs}
    for rel, reason in zip(candidates, reasons, strict=True):
        if reason is None:
            by_class[rel.split("/", 1)[0]].append(rel)
        else:
            skipped.append({"path": rel, "reason": reason})
    assignment = _assign_splits(by_class, data_cfg, raw_dir)
    report = _report(data_cfg, assignment, skipped)
    _write(paths, assignment, report)
    totals = report["totals"]
    log.info(
        "split %d images of %d classes: train %d, val %d, test %d; skipped %d (see %s)",
        totals["images"],
        len(report["classes"]),
        totals["train"],
        totals["val"],
        totals["test"],
        totals["skipped"],
        paths.split_report,
    )
    _log_skipped(report["skipped"], paths.split_report)
    return report


def _log_skipped(skipped: Sequence[Mapping[str, str]], report_path: Path) -> None:
    """One warning per skipped file for the first few, then one line counting the rest."""
    for item in skipped[:SKIPPED_SHOWN]:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    if len(skipped) > SKIPPED_SHOWN:
        log.warning("and %d more skipped files: %s lists them all", len(skipped) - SKIPPED_SHOWN, report_path)


def _scan(raw_dir: Path) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """Class folder names, candidate files (POSIX paths relative to `raw_dir`), and skipped entries.

    Class folders are the visible top-level folders; their files are searched recursively. Hidden
    entries, top-level files and anything that is not a regular file are skipped with a reason.
    """
    classes: list[str] = []
    candidates: list[str] = []
    skipped: list[dict[str, str]] = []
    for entry in sorted(raw_dir.iterdir()):
        if is_hidden(entry.name):
            kind = "folder" if entry.is_dir() else "file"
            skipped.append({"path": entry.name, "reason": f"hidden {kind}"})
        elif entry.is_dir():
            classes.append(entry.name)
            _scan_class(raw_dir, entry, candidates, skipped)
        else:
            skipped.append({"path": entry.name, "reason": "not in a class folder"})
    return classes, sorted(candidates), skipped


def _scan_class(raw_dir: Path, class_dir: Path, candidates: list[str], skipped: list[dict[str, str]]) -> None:
    for folder, dirs, files in os.walk(class_dir):
        base = Path(folder)
        for name in sorted(dirs):
            if is_hidden(name):
                skipped.append({"path": _rel(raw_dir, base / name), "reason": "hidden folder"})
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            path = base / name
            if is_hidden(name):
                skipped.append({"path": _rel(raw_dir, path), "reason": "hidden file"})
            elif not path.is_file():
                skipped.append({"path": _rel(raw_dir, path), "reason": "not a regular file"})
            else:
                candidates.append(_rel(raw_dir, path))


def _rel(raw_dir: Path, path: Path) -> str:
    return PurePosixPath(path.relative_to(raw_dir)).as_posix()


def _assign_splits(
    by_class: Mapping[str, Sequence[str]], data_cfg: DataConfig, raw_dir: Path
) -> dict[str, dict[str, list[str]]]:
    """`{split: {class: sorted paths}}`: each class shuffled by its own seed and cut by the fractions."""
    usable = [name for name, files in by_class.items() if files]
    if len(usable) < 2:
        found = ", ".join(usable) or "none"
        raise DataError(
            f"{raw_dir} has {len(usable)} class folder(s) with usable images ({found}); need at least 2: "
            "put the images in one sub-folder per class"
        )
    assignment: dict[str, dict[str, list[str]]] = {name: {} for name in SPLITS}
    for label in sorted(by_class):
        files = sorted(by_class[label])
        n_val, n_test = _split_sizes(label, len(files), data_cfg, raw_dir)
        random.Random(f"{data_cfg.split_seed}/{label}").shuffle(files)
        assignment["test"][label] = sorted(files[:n_test])
        assignment["val"][label] = sorted(files[n_test : n_test + n_val])
        assignment["train"][label] = sorted(files[n_test + n_val :])
    return assignment


def _split_sizes(label: str, n: int, data_cfg: DataConfig, raw_dir: Path) -> tuple[int, int]:
    """(val, test) sizes for a class of `n` images: rounded fractions, at least one each where non-empty."""
    wants_test = data_cfg.test_fraction > 0
    needed = 3 if wants_test else 2
    if n < needed:
        which = "train, val and test" if wants_test else "train and val"
        raise DataError(
            f"class {label!r} has {n} usable image(s); every class needs at least {needed} (one each for "
            f"{which}): add images to {raw_dir / label} or remove the folder"
        )
    n_val = max(1, int(n * data_cfg.val_fraction + 0.5))
    n_test = max(1, int(n * data_cfg.test_fraction + 0.5)) if wants_test else 0
    while n - n_val - n_test < 1:  # rounding up can leave no training image in tiny classes
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _report(
    data_cfg: DataConfig, assignment: Mapping[str, Mapping[str, Sequence[str]]], skipped: list[dict[str, str]]
) -> dict[str, Any]:
    classes = sorted(assignment["train"])
    counts = {label: {name: len(assignment[name][label]) for name in SPLITS} for label in classes}
    for per_split in counts.values():
        per_split["total"] = sum(per_split[name] for name in SPLITS)
    totals = {name: sum(c[name] for c in counts.values()) for name in SPLITS}
    totals["images"] = sum(totals[name] for name in SPLITS)
    totals["skipped"] = len(skipped)
    return {
        "settings": split_settings(data_cfg),
        "classes": classes,
        "counts": counts,
        "totals": totals,
        "skipped": sorted(skipped, key=lambda item: item["path"]),
    }


def _write(paths: StagePaths, assignment: Mapping[str, Mapping[str, Sequence[str]]], report: dict[str, Any]) -> None:
    """All split files, built in a temporary folder that replaces `data/splits/` in one rename."""
    with replace_dir(paths.splits) as tmp:
        for name in SPLITS:
            rows = [(path, label) for label, files in sorted(assignment[name].items()) for path in files]
            frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
            frame.to_csv(tmp / paths.manifest(name).name, index=False, lineterminator="\n")
        (tmp / paths.classes.name).write_text(json.dumps(report["classes"], indent=2) + "\n")
        (tmp / paths.split_report.name).write_text(json.dumps(report, indent=2) + "\n")
