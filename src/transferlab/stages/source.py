"""Source stage: record what `data.source` holds, so DVC reruns the download when it changes.

DVC sees `data.source` only as a parameter: the same folder with photos added, removed or
edited is the same string, and `dvc repro` would keep (or restore from its run cache) the old
`data/raw/`. This stage runs on every `dvc repro` (`always_changed`) and writes
`data/source.json`, which the download stage depends on: the file changes, and the download
runs again, exactly when the source does. It reads no image:
- a folder: every file's path, size and modification time (links followed, as the download
  copies them), hashed;
- a local archive: its size and modification time;
- a URL or `synthetic`: the parameters already say everything (`data.sha256` pins a URL).

The record is a DVC output like the others (pushed and pulled with them), kept while the stage
runs (`persist`), so a clone without the source can keep the one it pulled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from transferlab.atomic import write_text
from transferlab.config import Config, local_source
from transferlab.errors import DownloadError
from transferlab.paths import StagePaths
from transferlab.sources import check_class_folders, walk_files

log = logging.getLogger(__name__)


def record_source(cfg: Config, paths: StagePaths) -> Path:
    """Write `data/source.json`: what `data.source` holds now, as far as a download would see.

    A source the download could not use stops here, before DVC runs the download (and removes
    `data/raw/`): a missing path, a file that is no archive, a folder without class folders or
    with an empty one. A source that is not on this machine but is the one the record names, with
    its `data/raw/` there (a clone that pulled it with `dvc pull`), keeps that record: the pulled
    data stays in use.
    """
    source = cfg.data.source
    if uses_pulled_data(cfg, paths):
        log.warning("data.source %s is not on this machine: data/raw as pulled stays in use", source)
        return paths.source_record
    if needs_pull(cfg, paths):
        raise DownloadError(not_pulled(cfg, paths))
    record = describe_source(source, paths.root)
    write_text(paths.source_record, json.dumps(record, indent=1, sort_keys=True) + "\n")
    files = f" ({record['files']} files)" if "files" in record else ""
    log.info("data.source %s%s recorded in %s", source, files, paths.source_record)
    return paths.source_record


def uses_pulled_data(cfg: Config, paths: StagePaths) -> bool:
    """True when the source is elsewhere (`_source_elsewhere`) and its `data/raw/<name>/` is here:
    a clone that pulled the data without the source."""
    return _source_elsewhere(cfg, paths) and paths.raw_dataset(cfg.data.name).is_dir()


def needs_pull(cfg: Config, paths: StagePaths) -> bool:
    """True when the source is elsewhere and its `data/raw/<name>/` is not here either: a clone
    that has not pulled its data yet."""
    return _source_elsewhere(cfg, paths) and not paths.raw_dataset(cfg.data.name).is_dir()


def _source_elsewhere(cfg: Config, paths: StagePaths) -> bool:
    """`data.source` is a local path that is not on this machine, and the record names it (the
    record came with the project, from where the source is)."""
    local = local_source(cfg.data.source, paths.root)
    return local is not None and not local.exists() and recorded_source(paths) == cfg.data.source


def not_pulled(cfg: Config, paths: StagePaths) -> str:
    """The one line for `needs_pull`."""
    raw = paths.raw_dataset(cfg.data.name)
    return f"data.source {cfg.data.source} is not on this machine, nor {raw} (`dvc pull` fetches it)"


def recorded_source(paths: StagePaths) -> str | None:
    """The `source` of the record already written, if it can be read."""
    try:
        return json.loads(paths.source_record.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def describe_source(source: str, root: Path) -> dict[str, Any]:
    """The source's identity: its files' listing digest for a folder, size and time for an archive.

    Raises `DownloadError` (`DataError` for an empty class folder, `sources.check_class_folders`)
    for a source the download could not use.
    """
    path = local_source(source, root)
    if path is None:
        return {"source": source}
    if not path.exists():
        raise DownloadError(f"data.source {source} does not exist")
    if not path.is_dir():
        if not (tarfile.is_tarfile(path) or zipfile.is_zipfile(path)):
            raise DownloadError(f"data.source {source} is neither a .tgz/.tar/.zip archive nor a folder of classes")
        stat = path.stat()
        return {"source": source, "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}
    check_class_folders(path, source)
    listing = hashlib.sha256()
    count = 0
    for file in sorted(walk_files(path)):
        stat = file.stat()  # a link's target, as the download copies it
        listing.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count += 1
    return {"source": source, "files": count, "listing_sha256": listing.hexdigest()}
