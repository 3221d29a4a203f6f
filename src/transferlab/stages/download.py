"""Download stage: put the dataset named by `data.source` into `data/raw/<name>/<class>/...`.

`data.source` is an http(s) URL (fetched into a download cache), a local .tgz/.tar/.zip, a local
folder of class folders, or `synthetic`. The target is built in a temporary folder beside it
and renamed into place only when complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.atomic import replace_dir
from transferlab.config import SYNTHETIC_SOURCE, Config, DataConfig, local_source
from transferlab.errors import DownloadError
from transferlab.locks import stage_lock
from transferlab.paths import StagePaths
from transferlab.sources import (
    ExtractLimits,
    check_class_folders,
    copy_folder,
    extract_archive,
    fetch_url,
    is_url,
    verify_sha256,
)
from transferlab.synthetic import generate

log = logging.getLogger(__name__)


def download(cfg: Config, paths: StagePaths) -> Path:
    """Fetch, extract, copy or generate the dataset into `data/raw/<name>/`, replacing what was there.

    Archives fetched from URLs are kept in `data/downloads/`, so a re-run does not fetch them again.
    One download at a time per project (`BusyError` for a second).
    """
    with stage_lock(paths.locks, "download"):
        return _download(cfg, paths)


def _download(cfg: Config, paths: StagePaths) -> Path:
    data_cfg = cfg.data
    target_dir = paths.raw_dataset(data_cfg.name)
    source = data_cfg.source
    limits = ExtractLimits(data_cfg.max_extracted_bytes, data_cfg.max_compression_ratio)
    if source == SYNTHETIC_SOURCE:
        assert data_cfg.synthetic is not None  # DataConfig.check guarantees it
        _ignore_checksum(data_cfg, "a synthetic dataset")
        with replace_dir(target_dir) as tmp:
            generate(data_cfg.synthetic, tmp)
    elif is_url(source):
        archive = fetch_url(source, paths.downloads, data_cfg.sha256)
        with replace_dir(target_dir) as tmp:
            extract_archive(archive, tmp, limits)
            check_class_folders(tmp, source)
    else:
        local = _local_source(source, paths.root, target_dir)
        if local.is_dir():
            _ignore_checksum(data_cfg, "a folder source")
            with replace_dir(target_dir) as tmp:
                check_class_folders(local, source)
                copy_folder(local, tmp)
        else:
            if data_cfg.sha256 is not None:
                verify_sha256(local, data_cfg.sha256, str(local))
            with replace_dir(target_dir) as tmp:
                extract_archive(local, tmp, limits)
                check_class_folders(tmp, source)
    log.info("dataset %s ready in %s", data_cfg.name, target_dir)
    return target_dir


def _local_source(source: str, root: Path, target_dir: Path) -> Path:
    """The existing local file or folder `source` names (`config.local_source`: a relative path is
    taken from the project `root`), refusing one the stage would overwrite."""
    path = local_source(source, root)
    if path is None:  # synthetic and http(s) are handled before
        raise DownloadError(f"data.source {source!r}: only http(s) URLs, local paths and 'synthetic' are supported")
    if not path.exists():
        raise DownloadError(
            f"data.source {source} does not exist: give an http(s) URL, a .tgz/.tar/.zip, a folder "
            "with one sub-folder per class, or 'synthetic'"
        )
    raw_root = target_dir.resolve().parent
    if path == raw_root or raw_root in path.parents or path in raw_root.parents:
        raise DownloadError(
            f"data.source {source} overlaps {raw_root}, which the download stage replaces: keep the "
            "source images outside it"
        )
    return path


def _ignore_checksum(data_cfg: DataConfig, what: str) -> None:
    if data_cfg.sha256 is not None:
        log.warning("data.sha256 is ignored for %s (%s)", what, data_cfg.source)
