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

The record is versioned in git beside dvc.lock, not in DVC's cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from transferlab.atomic import write_text
from transferlab.config import SYNTHETIC_SOURCE, Config
from transferlab.errors import DownloadError
from transferlab.paths import StagePaths
from transferlab.sources import is_url, walk_files

log = logging.getLogger(__name__)


def record_source(cfg: Config, paths: StagePaths) -> Path:
    """Write `data/source.json`: what `data.source` holds now, as far as a download would see.

    A source that is not on this machine, named by the record already there (a clone that pulled
    `data/raw/` with `dvc pull`), keeps that record: the pulled data stays in use.
    """
    source = cfg.data.source
    local = _local_path(source, paths.root)
    if local is not None and not local.exists() and _recorded_source(paths) == source:
        log.warning("data.source %s is not on this machine: data/raw as it is stays in use", source)
        return paths.source_record
    record = describe_source(source, paths.root)
    write_text(paths.source_record, json.dumps(record, indent=1, sort_keys=True) + "\n")
    files = f" ({record['files']} files)" if "files" in record else ""
    log.info("data.source %s%s recorded in %s", source, files, paths.source_record)
    return paths.source_record


def _recorded_source(paths: StagePaths) -> str | None:
    """The `source` of the record already written, if it can be read."""
    try:
        return json.loads(paths.source_record.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _local_path(source: str, root: Path) -> Path | None:
    """The file or folder `source` names on this machine; None for a URL or `synthetic`."""
    if source == SYNTHETIC_SOURCE or is_url(source) or "://" in source:
        return None
    return (root / Path(source).expanduser()).resolve()


def describe_source(source: str, root: Path) -> dict[str, Any]:
    """The source's identity: its files' listing digest for a folder, size and time for an archive."""
    path = _local_path(source, root)
    if path is None:
        return {"source": source}
    if not path.exists():
        raise DownloadError(f"data.source {source} does not exist")
    if not path.is_dir():
        stat = path.stat()
        return {"source": source, "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}
    listing = hashlib.sha256()
    count = 0
    for file in sorted(walk_files(path)):
        stat = file.stat()  # a link's target, as the download copies it
        listing.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count += 1
    return {"source": source, "files": count, "listing_sha256": listing.hexdigest()}
