"""Getting a dataset's files: fetch a URL (progress, checksum, cache), extract an archive safely, copy a folder.

Nothing here trusts a partial result: downloads land in `<name>.part` and are renamed into the
cache only when complete and verified; extraction refuses any member that could write outside
the destination (absolute paths, `..`, links, devices) instead of skipping it, and stops at the
member that takes the extracted size past `ExtractLimits` (total bytes, and bytes per byte of
archive), counted as it is written, whatever the archive declares.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from tqdm import tqdm

from transferlab.errors import DataError, DownloadError, first_line

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
OFFLINE_HINT = (
    "without internet, fetch the archive elsewhere and point data.source at the local "
    ".tgz/.zip or folder (transferlab compose data.source=/path/to/archive.tgz)"
)
_IGNORED_TOP = frozenset({"__MACOSX"})  # resource forks that macOS adds to zip files


def is_url(source: str) -> bool:
    """True for http(s) URLs; other schemes are not supported."""
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise DownloadError when `path` does not have the SHA-256 `expected`."""
    _require_digest(file_sha256(path), expected, what)


def _require_digest(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise DownloadError(
            f"{what} has sha256 {actual}, expected {expected} (data.sha256): the file is corrupt, "
            "truncated or not the dataset; set data.sha256=null to accept it anyway"
        )


def cache_name(url: str) -> str:
    """File name of `url` in the download cache: a digest of the URL plus its base name."""
    base = PurePosixPath(urllib.parse.urlsplit(url).path).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base) or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def fetch_url(url: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """The cached copy of `url`, downloading it first unless a complete (and matching) copy exists."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / cache_name(url)
    if cached.is_file():
        if sha256 is None or file_sha256(cached) == sha256:
            log.info("using cached %s for %s", cached, url)
            return cached
        log.info("cached %s does not match data.sha256; fetching %s again", cached, url)
        cached.unlink()
    part = cached.with_name(cached.name + ".part")
    try:
        actual = _stream_to(url, part)
        if sha256 is not None:
            _require_digest(actual, sha256, url)
        part.replace(cached)
    finally:
        part.unlink(missing_ok=True)
    log.info("downloaded %s to %s", url, cached)
    return cached


def _stream_to(url: str, out: Path) -> str:
    """Stream `url` into `out` with a progress bar; return the SHA-256 of what was received."""
    digest = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "transferlab"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, out.open("wb") as f:
            expected = response.headers.get("Content-Length")
            total = int(expected) if expected and expected.isdigit() else None
            with tqdm(
                total=total, desc=f"downloading {cache_name(url)}", unit="B", unit_scale=True, disable=None
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; {OFFLINE_HINT}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DownloadError(f"could not fetch {url} ({first_line(reason)}); {OFFLINE_HINT}") from exc
    if total is not None and received != total:
        raise DownloadError(f"download of {url} stopped after {received} of {total} bytes; {OFFLINE_HINT}")
    return digest.hexdigest()


@dataclass(frozen=True)
class ExtractLimits:
    """How much an archive may expand to (`data.max_extracted_bytes`, `data.max_compression_ratio`)."""

    max_bytes: int
    max_ratio: float


class _Budget:
    """Bytes extracted so far, against the limits; refuses the member that goes over."""

    def __init__(self, archive: Path, limits: ExtractLimits) -> None:
        self.archive, self.limits = archive, limits
        self.archive_bytes = max(1, archive.stat().st_size)
        self.written = 0

    def spend(self, count: int, member: str) -> None:
        self.written += count
        refuse = f"{self.archive}: member {member!r}"
        if self.written > self.limits.max_bytes:
            raise DownloadError(
                f"{refuse} takes the extracted size past {self.limits.max_bytes:,} bytes (data.max_extracted_bytes); "
                "refusing to extract (raise the limit if the archive is genuine)"
            )
        if self.written > self.limits.max_ratio * self.archive_bytes:
            raise DownloadError(
                f"{refuse} expands the {self.archive_bytes:,}-byte archive more than {self.limits.max_ratio:g} times "
                "(data.max_compression_ratio); refusing to extract (a zip bomb? raise the limit if it is genuine)"
            )


def extract_archive(archive: Path, dest: Path, limits: ExtractLimits) -> None:
    """Extract a .tar(.gz/.bz2/.xz) or .zip into the empty folder `dest`, stripping a single top folder.

    Raises DownloadError, leaving `dest`'s content undefined, when a member would escape `dest`,
    is a link or device, goes over `limits`, or the archive is corrupt; callers extract into a
    temporary folder.
    """
    scratch = dest / ".extracting"
    scratch.mkdir()
    budget = _Budget(archive, limits)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _extract_members(archive, _zip_members(zf), scratch, budget)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r|*") as tar:
                _extract_members(archive, _tar_members(tar), scratch, budget)
        else:
            raise DownloadError(f"{archive} is not a .tgz, .tar or .zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the disk, not the archive
            raise DownloadError(f"could not extract {archive} into {dest}: {first_line(exc)}") from exc
        raise DownloadError(f"{archive} is corrupt or truncated ({first_line(exc)})") from exc
    root = _single_top_folder(scratch) or scratch
    for entry in sorted(root.iterdir()):
        if entry.name not in _IGNORED_TOP:
            entry.rename(dest / entry.name)
    shutil.rmtree(scratch)


@dataclass(frozen=True)
class _Member:
    """One archive entry, tar or zip alike."""

    name: str
    kind: Literal["file", "dir", "link", "special"]
    open: Callable[[], IO[bytes]]


def _tar_members(tar: tarfile.TarFile) -> Iterator[_Member]:
    for info in tar:
        if info.issym() or info.islnk():
            kind = "link"
        elif info.isfile():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        else:
            kind = "special"
        yield _Member(info.name, kind, lambda info=info: tar.extractfile(info))


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        mode = (info.external_attr >> 16) & 0o170000  # 0 when the archiver recorded no Unix mode
        if stat.S_ISLNK(mode):
            kind = "link"
        elif mode not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "special"
        else:
            kind = "dir" if info.is_dir() else "file"
        yield _Member(info.filename, kind, lambda info=info: zf.open(info))


def _extract_members(archive: Path, members: Iterator[_Member], dest: Path, budget: _Budget) -> None:
    """Write regular files and folders; refuse links, devices, paths that leave `dest`, and the
    member that goes over the budget."""
    for member in tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=None):
        rel = _safe_member_path(member.name, archive)
        if member.kind == "link":
            raise DownloadError(f"{archive}: member {member.name!r} is a link; refusing to extract")
        if member.kind == "special":
            raise DownloadError(f"{archive}: member {member.name!r} is a device or fifo; refusing to extract")
        if rel is None:
            continue
        if member.kind == "dir":
            (dest / rel).mkdir(parents=True, exist_ok=True)
            continue
        with member.open() as source:
            _write_file(source, dest / rel, budget, member.name)


def _safe_member_path(name: str, archive: Path) -> PurePosixPath | None:
    """The member's path relative to the destination; None for entries to skip (`./`, __MACOSX)."""
    normal = name.replace("\\", "/")
    path = PurePosixPath(normal)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", normal) or ".." in path.parts:
        raise DownloadError(f"{archive}: member {name!r} points outside the target folder; refusing to extract")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or parts[0] in _IGNORED_TOP:
        return None
    return PurePosixPath(*parts)


def _write_file(source: IO[bytes], target: Path, budget: _Budget, member: str) -> None:
    """Copy `source` to `target` in chunks, each counted against `budget` before it is written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            budget.spend(len(chunk), member)
            out.write(chunk)


def _single_top_folder(root: Path) -> Path | None:
    """The only visible entry of `root` when it is a folder (flower_photos.tgz wraps everything in one)."""
    visible = [e for e in root.iterdir() if not e.name.startswith(".") and e.name not in _IGNORED_TOP]
    if len(visible) == 1 and visible[0].is_dir():
        return visible[0]
    return None


def copy_folder(source: Path, dest: Path) -> int:
    """Copy every file under `source` into the existing folder `dest`, hard-linking where possible.

    Symbolic links (absolute or relative, to files or folders) are followed: `dest` gets the
    bytes they point at, never a link. A broken link stops the copy with a DownloadError.
    """
    count = 0
    for src_file in tqdm(sorted(walk_files(source)), desc=f"copying {source.name}", unit="file", disable=None):
        target = dest / src_file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        real = src_file.resolve()  # a link's target: `os.link` would link the link itself
        try:
            os.link(real, target)
        except OSError:  # another filesystem, or links not permitted
            shutil.copy2(real, target)
        count += 1
    return count


def check_class_folders(dataset: Path, source: str) -> None:
    """A dataset has one class folder at least, and a file in each: an empty class folder would
    vanish without a word (neither a copy nor DVC keeps an empty folder, so the split would never
    see that class)."""
    classes = [p for p in sorted(dataset.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        raise DownloadError(f"data.source {source} holds no class folders: put each class's images in one")
    for folder in classes:
        if next(walk_files(folder), None) is None:
            raise DataError(f"class folder {folder.name!r} of {source} holds no files: add images to it or remove it")


def walk_files(root: Path) -> Iterator[Path]:
    """Files under `root`, following symlinked files and folders like a plain copy would.

    Raises DownloadError on a broken link; skips (with a warning) fifos, sockets and devices.
    """
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle
            dirs.clear()
            continue
        seen.add(real)
        for name in files:
            path = Path(folder) / name
            if path.is_file():
                yield path
            elif path.is_symlink():
                raise DownloadError(
                    f"{path} is a broken symbolic link (to {path.readlink()}): fix or remove it, "
                    "then run the download stage again"
                )
            else:
                log.warning("skipping %s: not a regular file", path)
