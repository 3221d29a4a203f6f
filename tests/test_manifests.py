"""manifests.py: reading the split stage's files, with a fix named for every way they can be wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from transferlab.config import Config, write_params
from transferlab.errors import DataError
from transferlab.manifests import check_splits_fresh, load_classes, load_manifest, split_datasets, splits_digest
from transferlab.paths import StagePaths


def test_class_list_problems_name_the_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found: run `dvc repro split`"):
        load_classes(tmp_path / "classes.json")
    for text in ("{not json", '["only_one"]', '{"a": 1}'):
        (tmp_path / "classes.json").write_text(text)
        with pytest.raises(DataError, match="dvc repro split"):
            load_classes(tmp_path / "classes.json")


def test_manifest_problems_name_the_stage_to_run(prepared_project: StagePaths) -> None:
    paths = prepared_project
    raw, classes = paths.raw_dataset("synthetic"), load_classes(paths.classes)
    manifest = load_manifest(paths.manifest("train"), raw, classes)
    assert len(manifest) > 0 and all(Path(p).is_file() for p in manifest.absolute_paths)
    with pytest.raises(DataError, match=r"has label 'red_circle' not in classes\.json"):
        load_manifest(paths.manifest("train"), raw, [c for c in classes if c != "red_circle"] + ["x"])
    with pytest.raises(DataError, match="run `dvc repro download`"):
        load_manifest(paths.manifest("train"), raw.parent / "elsewhere", classes)
    paths.manifest("val").write_text("file,class\n")
    with pytest.raises(DataError, match="must have columns path,label"):
        load_manifest(paths.manifest("val"), raw, classes)


def test_splits_made_with_other_settings_are_stale(prepared_project: StagePaths, synthetic_cfg: Config) -> None:
    check_splits_fresh(synthetic_cfg, prepared_project)
    reseeded = dataclasses.replace(synthetic_cfg, data=dataclasses.replace(synthetic_cfg.data, split_seed=9))
    with pytest.raises(DataError, match=r"stale \(data.split_seed is 9, splits were made with 123\)"):
        check_splits_fresh(reseeded, prepared_project)


def test_stale_splits_name_the_command_that_fixes_them(prepared_project: StagePaths, synthetic_cfg: Config) -> None:
    paths = prepared_project
    reseeded = dataclasses.replace(synthetic_cfg, data=dataclasses.replace(synthetic_cfg.data, split_seed=9))
    # The project (params.yaml) still agrees with the splits: this run (a sweep job) overrides data.*,
    # and `dvc repro split` would change nothing.
    with pytest.raises(DataError, match=r"this run sets data\.split_seed.*`transferlab compose data\.split_seed=9`"):
        check_splits_fresh(reseeded, paths)
    # The project moved and the splits did not follow: DVC remakes them.
    write_params(reseeded, paths.root / "params.yaml")
    with pytest.raises(DataError, match=r": run `dvc repro split`$"):
        check_splits_fresh(reseeded, paths)
    # params.yaml agrees with neither: it is older than conf/.
    other = dataclasses.replace(synthetic_cfg, data=dataclasses.replace(synthetic_cfg.data, split_seed=5))
    with pytest.raises(DataError, match=r"params\.yaml does not match conf/: run `transferlab compose`"):
        check_splits_fresh(other, paths)


def test_digest_follows_the_manifests(prepared_project: StagePaths) -> None:
    before = splits_digest(prepared_project)
    assert before == splits_digest(prepared_project) and len(before) == 16
    classes = json.loads(prepared_project.classes.read_text())
    prepared_project.classes.write_text(json.dumps(classes[::-1]))
    assert splits_digest(prepared_project) != before


def test_split_datasets_describe_each_manifest_with_the_split_digest(
    prepared_project: StagePaths, synthetic_cfg: Config
) -> None:
    datasets = split_datasets(synthetic_cfg, prepared_project)
    assert [(d.split, d.name, d.context) for d in datasets] == [
        ("train", "synthetic-train", "training"),
        ("val", "synthetic-val", "validation"),
        ("test", "synthetic-test", "test"),
    ]
    assert {d.digest for d in datasets} == {splits_digest(prepared_project)}  # the transferlab.manifest_hash tag
    assert [d.source for d in datasets] == ["data/splits/train.csv", "data/splits/val.csv", "data/splits/test.csv"]
    assert {d.data_source for d in datasets} == {"synthetic"}
    report = json.loads(prepared_project.split_report.read_text())
    assert [len(d.frame) for d in datasets] == [report["totals"][s] for s in ("train", "val", "test")]
    assert list(datasets[0].frame.columns) == ["path", "label"]
    prepared_project.manifest("test").unlink()
    with pytest.raises(DataError, match=r"test\.csv not found: run `dvc repro split`"):
        split_datasets(synthetic_cfg, prepared_project, ["test"])
