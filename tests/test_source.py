"""stages/source.py: `data/source.json` changes exactly when what `data.source` holds does, so
`dvc repro` copies a folder source again after photos are added, removed or edited."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import Process, class_folders

from transferlab.errors import DataError, DownloadError
from transferlab.stages.source import describe_source


def test_a_folder_is_known_by_its_files_names_sizes_and_times(tmp_path: Path) -> None:
    folder = class_folders(tmp_path / "photos")
    first = describe_source(str(folder), tmp_path)
    assert first["files"] == 8 and describe_source("photos", tmp_path) == {**first, "source": "photos"}
    assert describe_source(str(folder), tmp_path) == first, "nothing changed"
    (folder / "red" / "extra.png").write_bytes((folder / "red" / "0.png").read_bytes())
    added = describe_source(str(folder), tmp_path)
    assert added["files"] == 9 and added["listing_sha256"] != first["listing_sha256"]
    photo = folder / "blue" / "1.png"
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    assert describe_source(str(folder), tmp_path)["listing_sha256"] != added["listing_sha256"], "edited"


def test_an_archive_by_size_and_time_and_a_url_or_synthetic_by_name_alone(tmp_path: Path) -> None:
    archive = tmp_path / "photos.zip"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))
    described = describe_source(str(archive), tmp_path)
    assert described == {"source": str(archive), "bytes": 22, "modified_ns": archive.stat().st_mtime_ns}
    url = "https://example.org/photos.tgz"
    assert describe_source(url, tmp_path) == {"source": url}
    assert describe_source("synthetic", tmp_path) == {"source": "synthetic"}


def test_a_source_the_download_could_not_use_stops_here(tmp_path: Path) -> None:
    """Before DVC runs the download, which would first remove data/raw/."""
    folder = class_folders(tmp_path / "photos")
    (folder / "green").mkdir()
    with pytest.raises(DataError, match=r"^class folder 'green' of \S+ holds no files: add images to it or remove it$"):
        describe_source(str(folder), tmp_path)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.png").write_bytes((folder / "red" / "0.png").read_bytes())
    with pytest.raises(DownloadError, match=r"holds no class folders: put each class's images in one$"):
        describe_source(str(loose), tmp_path)
    with pytest.raises(DownloadError, match=r"is neither a \.tgz/\.tar/\.zip archive nor a folder of classes$"):
        describe_source(str(loose / "a.png"), tmp_path)


def _run(cwd: Path, *command: str, status: int = 0) -> str:
    process = Process(command, cwd)
    assert process.finish() == status, process.output[-3000:]
    return process.output


@pytest.mark.slow
def test_dvc_repro_copies_a_folder_source_again_when_its_photos_change(project_copy: Path, tmp_path: Path) -> None:
    """A new user fixed their photo folder and ran `make run` again: DVC restored the old
    `data/raw/` from its run cache, because the path, its only parameter, had not changed."""
    folder = class_folders(tmp_path / "photos", per_class=3)
    _run(project_copy, "transferlab", "compose", "data=folder", f"data.source={folder}", "data.name=colours")
    first = _run(project_copy, "transferlab", "repro", "split")
    assert "Running stage 'download'" in first
    raw = project_copy / "data" / "raw" / "colours"
    assert len(list(raw.rglob("*.png"))) == 6
    assert "Stage 'download' didn't change" in _run(project_copy, "transferlab", "repro", "split")

    (folder / "blue" / "3.png").write_bytes((folder / "blue" / "0.png").read_bytes())
    again = _run(project_copy, "transferlab", "repro", "split")
    assert "Running stage 'download'" in again and "Running stage 'split'" in again
    assert len(list(raw.rglob("*.png"))) == 7
    (folder / "blue" / "3.png").unlink()
    back = _run(project_copy, "transferlab", "repro", "split")  # the first listing again: DVC's run cache has it
    assert len(list(raw.rglob("*.png"))) == 6, back[-2000:]

    (folder / "green").mkdir()  # an empty class folder: the source stage stops, data/raw/ stays
    empty = _run(project_copy, "dvc", "repro", "split", status=255)
    assert f"DataError: class folder 'green' of {folder} holds no files" in empty
    assert "Running stage 'download'" not in empty and len(list(raw.rglob("*.png"))) == 6
    (folder / "green").rmdir()

    loose = tmp_path / "loose"  # photos without class folders: `transferlab repro` ends on the stage's line, status 2
    loose.mkdir()
    shutil.copy(folder / "red" / "0.png", loose)
    _run(project_copy, "transferlab", "compose", f"data.source={loose}")
    stopped = _run(project_copy, "transferlab", "repro", "split", status=2)
    assert stopped.strip().splitlines()[-1] == (
        f"DownloadError: data.source {loose} holds no class folders: put each class's images in one"
    )
    assert "failed to reproduce" not in stopped and len(list(raw.rglob("*.png"))) == 6
    _run(project_copy, "transferlab", "compose", f"data.source={folder}")

    folder.rename(tmp_path / "elsewhere")  # as in a clone that pulled data/raw/ without the photos
    pulled = _run(project_copy, "transferlab", "repro", "split")
    assert f"data.source {folder} is not on this machine: data/raw as pulled stays in use" in pulled
    assert "Stage 'download' didn't change" in pulled and len(list(raw.rglob("*.png"))) == 6
    shutil.rmtree(raw)  # a clone that has not pulled yet
    unpulled = _run(project_copy, "transferlab", "repro", "split", status=2)
    assert f"ConfigError: data.source {folder} is not on this machine, nor {raw} (`dvc pull` fetches it)" in unpulled
