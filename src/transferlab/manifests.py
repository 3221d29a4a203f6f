"""The split stage's file contract, read side: manifests, class list, and whether they fit a config.

`stages/split.py` writes `data/splits/`; training, evaluation and predict read it through here,
and `split_settings` is the one definition of "the settings a split was made with".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from transferlab.config import PARAMS_FILE, Config, DataConfig, load_params, override_value
from transferlab.errors import ConfigError, DataError
from transferlab.paths import SPLITS, StagePaths

MANIFEST_COLUMNS = ("path", "label")
# MLflow's dataset context of each split ("Datasets used" in the UI).
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class Manifest:
    """One split: image paths relative to `raw_root`, and their class indices."""

    raw_root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def absolute_paths(self) -> list[str]:
        return [str(self.raw_root / p) for p in self.paths]

    @property
    def label_names(self) -> list[str]:
        """The class name of every image, in order."""
        return [self.classes[i] for i in self.labels]


@dataclass(frozen=True, eq=False)
class SplitDataset:
    """One split as MLflow records it (see `tracking.Run.log_datasets`)."""

    split: str
    name: str  # <data.name>-<split>
    context: str  # training, validation or test
    digest: str  # `splits_digest`, the value of the transferlab.manifest_hash tag
    source: str  # the manifest in the project, tracked by DVC: data/splits/<split>.csv
    data_source: str  # where the images came from: `data.source` (URL, archive, folder, synthetic)
    frame: pd.DataFrame  # the manifest's rows (path, label)


def load_classes(path: Path) -> list[str]:
    """Ordered class names written by the split stage."""
    try:
        classes = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: run `dvc repro split` (or `transferlab split`) first") from exc
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: run `dvc repro split` again") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
        raise DataError(f"{path} must list at least two class names: run `dvc repro split` again")
    return classes


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: run `dvc repro split` (or `transferlab split`) first") from exc


def load_manifest(path: Path, raw_root: Path, classes: Sequence[str]) -> Manifest:
    """Read `<split>.csv`; fail with the stage to run when it is missing or inconsistent."""
    frame = _read_manifest(path)
    if tuple(frame.columns) != MANIFEST_COLUMNS:
        raise DataError(f"{path} must have columns {','.join(MANIFEST_COLUMNS)}: run `dvc repro split` again")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise DataError(f"{path} has label {unknown[0]!r} not in classes.json: run `dvc repro split` again")
    if len(frame) and not (raw_root / frame["path"].iloc[0]).is_file():
        raise DataError(
            f"{raw_root / frame['path'].iloc[0]} listed in {path} is missing: run `dvc repro download` "
            "and `dvc repro split` again"
        )
    return Manifest(
        raw_root=raw_root,
        paths=tuple(frame["path"]),
        labels=tuple(index[label] for label in frame["label"]),
        classes=tuple(classes),
    )


def split_settings(data_cfg: DataConfig) -> dict[str, Any]:
    """The data settings a split is made with; `report.json` records them, training checks them."""
    return {
        "name": data_cfg.name,
        "val_fraction": data_cfg.val_fraction,
        "test_fraction": data_cfg.test_fraction,
        "split_seed": data_cfg.split_seed,
    }


def check_splits_fresh(cfg: Config, paths: StagePaths) -> None:
    """Fail when the prepared splits were made with other data settings than this config's."""
    try:
        report = json.loads(paths.split_report.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{paths.split_report} not found: run `dvc repro split` (or `transferlab split`)") from exc
    except ValueError as exc:
        raise DataError(f"{paths.split_report} is not valid JSON: run `dvc repro split` again") from exc
    made_with = report.get("settings", {})
    wanted = split_settings(cfg.data)
    stale = sorted(k for k, v in wanted.items() if made_with.get(k) != v)
    if stale:
        key = stale[0]
        raise DataError(
            f"prepared splits are stale (data.{key} is {wanted[key]!r}, splits were made with "
            f"{made_with.get(key)!r}): {_splits_fix(cfg, paths, key, made_with)}"
        )


def _splits_fix(cfg: Config, paths: StagePaths, key: str, made_with: dict[str, Any]) -> str:
    """The command that makes the splits fit: it depends on whether this run or the project moved.

    The splits follow the project settings (params.yaml). A run that sets other data values
    (a sweep's `data.*` override) cannot get its own splits; `dvc repro split` would change nothing.
    """
    try:
        project = split_settings(load_params(paths.root / PARAMS_FILE).data)
    except ConfigError:
        return "run `transferlab compose`, then `dvc repro split`"
    value = override_value(getattr(cfg.data, key))
    if project == made_with:
        return (
            f"this run sets data.{key}, but runs train on the splits of the project settings: drop the override, "
            f"or make it the project's with `transferlab compose data.{key}={value}`, then `dvc repro split`"
        )
    if project == split_settings(cfg.data):
        return "run `dvc repro split`"
    return f"{PARAMS_FILE} does not match conf/: run `transferlab compose`, then `dvc repro split`"


def splits_digest(paths: StagePaths) -> str:
    """Digest of the manifests and class list (the 'data manifest hash' tag)."""
    digest = hashlib.sha256()
    for file in [*(paths.manifest(name) for name in SPLITS), paths.classes]:
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def split_datasets(cfg: Config, paths: StagePaths, splits: Sequence[str] = SPLITS) -> list[SplitDataset]:
    """The prepared manifests of `splits` as datasets, all with the digest of the whole split."""
    digest = splits_digest(paths)
    datasets = []
    for split in splits:
        manifest = paths.manifest(split)
        frame = _read_manifest(manifest)
        source = manifest.relative_to(paths.root).as_posix() if manifest.is_relative_to(paths.root) else str(manifest)
        datasets.append(
            SplitDataset(
                split=split,
                name=f"{cfg.data.name}-{split}",
                context=SPLIT_CONTEXTS[split],
                digest=digest,
                source=source,
                data_source=cfg.data.source,
                frame=frame,
            )
        )
    return datasets
