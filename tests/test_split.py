"""Split stage: image checks, stratified deterministic manifests, the report, atomic output."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from transferlab.cli import main
from transferlab.config import Config, compose
from transferlab.errors import DataError
from transferlab.manifests import load_classes, load_manifest
from transferlab.paths import SPLITS, StagePaths
from transferlab.stages.download import download
from transferlab.stages.split import split


def _read(splits: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(splits / f"{name}.csv", dtype=str, keep_default_na=False) for name in SPLITS}


def _with_data(cfg: Config, **changes: object) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_stratified_and_complete(synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path) -> None:
    report = split(synthetic_cfg, StagePaths(tmp_path))
    frames = _read(StagePaths(tmp_path).splits)
    classes = json.loads((StagePaths(tmp_path).splits / "classes.json").read_text())
    assert classes == sorted(p.name for p in synthetic_raw.iterdir()) and len(classes) == 3
    # 12 per class with val 0.2 and test 0.2: 8 / 2 / 2 in every class
    for name, expected in {"train": 8, "val": 2, "test": 2}.items():
        assert list(frames[name].columns) == ["path", "label"]
        assert frames[name]["label"].value_counts().to_dict() == dict.fromkeys(classes, expected)
        assert report["totals"][name] == 3 * expected
    everything = pd.concat(frames.values())
    assert everything["path"].is_unique
    on_disk = sorted(p.relative_to(synthetic_raw).as_posix() for p in synthetic_raw.rglob("*.jpg"))
    assert sorted(everything["path"]) == on_disk
    assert all(path.split("/")[0] == label for path, label in everything.itertuples(index=False))
    assert report["counts"][classes[0]] == {"train": 8, "val": 2, "test": 2, "total": 12}
    assert report["settings"] == {"name": "synthetic", "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 123}
    assert report["skipped"] == []
    assert json.loads((StagePaths(tmp_path).splits / "report.json").read_text()) == report


def test_deterministic_for_a_seed(synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path) -> None:
    paths = StagePaths(tmp_path)
    split(synthetic_cfg, paths)
    first, first_val = _snapshot(paths.splits), _read(paths.splits)["val"]["path"].tolist()
    split(synthetic_cfg, paths)
    assert _snapshot(paths.splits) == first
    split(_with_data(synthetic_cfg, split_seed=7), paths)
    assert _read(paths.splits)["val"]["path"].tolist() != first_val


def test_manifests_load_in_the_input_pipeline(prepared_project: StagePaths, synthetic_cfg: Config) -> None:
    classes = load_classes(prepared_project.classes)
    raw = prepared_project.raw_dataset(synthetic_cfg.data.name)
    for name in SPLITS:
        manifest = load_manifest(prepared_project.manifest(name), raw, classes)
        assert len(manifest) > 0
        assert all(Path(p).is_file() for p in manifest.absolute_paths)


def _save(path: Path, mode: str, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (24, 16), "white" if mode != "1" else 1).save(path, fmt)


def test_bad_files_are_skipped_with_reasons(synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path) -> None:
    cls = sorted(p.name for p in synthetic_raw.iterdir())[0]
    good = sorted((synthetic_raw / cls).glob("*.jpg"))[0].read_bytes()
    bad = {
        f"{cls}/truncated.jpg": good[: len(good) // 2],
        f"{cls}/empty.jpg": b"",
        f"{cls}/notes.jpg": b"this is not an image\n",
        f"{cls}/.DS_Store": b"\x00\x00\x00\x01Bud1",
        f"{cls}/.ipynb_checkpoints/copy.jpg": good,
        f"{cls}/nested/._resource.jpg": b"\x00\x05\x16\x07",
        "LICENSE.txt": b"CC-BY\n",
        ".hidden_top": b"",
    }
    for rel, data in bad.items():
        (synthetic_raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (synthetic_raw / rel).write_bytes(data)
    _save(synthetic_raw / cls / "photo.webp", "RGB", "WEBP")
    _save(synthetic_raw / cls / "mono.bmp", "1", "BMP")

    report = split(synthetic_cfg, StagePaths(tmp_path))
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons[f"{cls}/truncated.jpg"].startswith("corrupt or truncated")
    assert reasons[f"{cls}/empty.jpg"] == "empty file"
    assert reasons[f"{cls}/notes.jpg"].startswith("not an image")
    assert reasons[f"{cls}/.DS_Store"] == "hidden file"
    assert reasons[f"{cls}/.ipynb_checkpoints"] == "hidden folder"
    assert reasons[f"{cls}/nested/._resource.jpg"] == "hidden file"
    assert reasons["LICENSE.txt"] == "not in a class folder"
    assert reasons[".hidden_top"] == "hidden file"
    assert reasons[f"{cls}/photo.webp"].startswith("unsupported image format WEBP")
    assert "1-bit BMP" in reasons[f"{cls}/mono.bmp"]
    assert len(reasons) == 10 and report["totals"]["skipped"] == 10
    listed = set(pd.concat(_read(StagePaths(tmp_path).splits).values())["path"])
    assert not listed & set(reasons)
    assert report["counts"][cls]["total"] == 12


@pytest.mark.parametrize(
    ("name", "mode", "fmt"),
    [
        ("gray.jpg", "L", "JPEG"),
        ("cmyk.jpg", "CMYK", "JPEG"),
        ("alpha.png", "RGBA", "PNG"),
        ("palette.png", "P", "PNG"),
        ("sixteen.png", "I;16", "PNG"),
        ("anim.gif", "P", "GIF"),
        ("rgb.bmp", "RGB", "BMP"),
        ("gray.bmp", "L", "BMP"),
    ],
)
def test_other_formats_and_modes_are_accepted(
    synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path, name: str, mode: str, fmt: str
) -> None:
    cls = sorted(p.name for p in synthetic_raw.iterdir())[-1]
    _save(synthetic_raw / cls / name, mode, fmt)
    report = split(synthetic_cfg, StagePaths(tmp_path))
    assert report["skipped"] == []
    assert f"{cls}/{name}" in set(pd.concat(_read(StagePaths(tmp_path).splits).values())["path"])


def test_too_small_class_is_named(synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path) -> None:
    tiny = synthetic_raw / "tiny"
    tiny.mkdir()
    for path in sorted(synthetic_raw.rglob("*.jpg"))[:2]:
        shutil.copy(path, tiny / path.name)
    with pytest.raises(DataError, match=r"class 'tiny' has 2 usable image\(s\); every class needs at least 3"):
        split(synthetic_cfg, StagePaths(tmp_path))
    assert not (StagePaths(tmp_path).splits).exists()
    # without a test split, two images are enough (one for train, one for val)
    report = split(_with_data(synthetic_cfg, test_fraction=0.0), StagePaths(tmp_path))
    assert report["counts"]["tiny"] == {"train": 1, "val": 1, "test": 0, "total": 2}
    assert _read(StagePaths(tmp_path).splits)["test"].empty


def test_class_of_only_bad_files(synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path) -> None:
    (synthetic_raw / "broken").mkdir()
    (synthetic_raw / "broken" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="class 'broken' has 0 usable"):
        split(synthetic_cfg, StagePaths(tmp_path))


def test_fewer_than_two_classes(tmp_path: Path, synthetic_raw: Path, synthetic_cfg: Config) -> None:
    for folder in sorted(synthetic_raw.iterdir())[1:]:
        shutil.rmtree(folder)
    with pytest.raises(DataError, match="need at least 2"):
        split(synthetic_cfg, StagePaths(tmp_path))


def test_failed_split_keeps_previous_manifests(prepared_project: StagePaths, synthetic_cfg: Config) -> None:
    before = _snapshot(prepared_project.splits)
    raw = prepared_project.raw_dataset(synthetic_cfg.data.name)
    (raw / "tiny").mkdir()
    with pytest.raises(DataError, match="tiny"):
        split(synthetic_cfg, prepared_project)
    assert _snapshot(prepared_project.splits) == before
    assert sorted(p.name for p in prepared_project.splits.parent.iterdir()) == ["raw", "splits"]


def test_missing_raw_folder(tmp_path: Path, synthetic_cfg: Config) -> None:
    with pytest.raises(DataError, match="run `dvc repro download`"):
        split(_with_data(synthetic_cfg, name="nothing"), StagePaths(tmp_path))


def test_cli_exits_2_with_one_line(
    prepared_project: StagePaths,
    synthetic_cfg: Config,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(prepared_project.root)
    assert main(["split"]) == 0
    (prepared_project.raw_dataset(synthetic_cfg.data.name) / "tiny").mkdir()
    capsys.readouterr()
    assert main(["split", "--params", "params.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("DataError: class 'tiny' has 0 usable image(s)")


@pytest.mark.shared
def test_flower_sample_folder(shared_dir: Path, tmp_path: Path) -> None:
    sample = shared_dir / "data" / "flower_photos_sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} is absent")
    cfg = compose(["data=folder", f"data.source={sample}", "data.name=flowers_sample"])
    paths = StagePaths(tmp_path)
    download(cfg, paths)
    started = time.perf_counter()
    report = split(cfg, paths)
    elapsed = time.perf_counter() - started
    assert report["classes"] == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert report["totals"] == {"train": 420, "val": 90, "test": 90, "images": 600, "skipped": 0}
    assert elapsed < 20, f"checking 600 images took {elapsed:.1f} s"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_dvc_repro_split(project_copy: Path) -> None:
    _run(["transferlab", "compose", "data=synthetic", "data.synthetic.images_per_class=10"], project_copy)
    _run(["dvc", "repro", "split"], project_copy)
    paths = StagePaths(project_copy)
    frames = _read(paths.splits)
    assert sum(len(f) for f in frames.values()) == 30
    assert load_classes(paths.classes) == ["blue_triangle", "green_square", "red_circle"]
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"source", "download", "split"}
    assert lock["stages"]["download"]["params"]["params.yaml"]["data.synthetic"]["images_per_class"] == 10
    again = _run(["dvc", "repro", "split"], project_copy)
    assert "didn't change" in again.stdout


def _split_warnings(cfg: Config, paths: StagePaths, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.clear()
    with caplog.at_level("WARNING", logger="transferlab.stages.split"):
        split(cfg, paths)
    return [r.getMessage() for r in caplog.records if r.name == "transferlab.stages.split"]


def test_console_names_the_first_skipped_files_and_counts_the_rest(
    synthetic_cfg: Config, synthetic_raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cls = sorted(p.name for p in synthetic_raw.iterdir())[0]
    for i in range(8):
        (synthetic_raw / cls / f"empty{i}.jpg").write_bytes(b"")
    paths = StagePaths(tmp_path)
    named = [f"skipped {cls}/empty{i}.jpg: empty file" for i in range(5)]
    assert _split_warnings(synthetic_cfg, paths, caplog) == [
        *named,
        f"and 3 more skipped files: {paths.split_report} lists them all",
    ]
    for i in range(5, 8):
        (synthetic_raw / cls / f"empty{i}.jpg").unlink()
    assert _split_warnings(synthetic_cfg, paths, caplog) == named
