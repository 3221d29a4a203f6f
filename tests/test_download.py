"""Download stage: every kind of source, checksums, safe extraction, atomic replacement."""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from transferlab.cli import main
from transferlab.config import Config, DataConfig, write_params
from transferlab.errors import DownloadError
from transferlab.paths import StagePaths
from transferlab.sources import cache_name
from transferlab.stages.download import download


def _jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "JPEG")
    return buffer.getvalue()


DATASET = {
    "cats/a.jpg": _jpeg((200, 30, 30)),
    "cats/b.jpg": _jpeg((190, 40, 30)),
    "dogs/c.jpg": _jpeg((30, 30, 200)),
    "LICENSE.txt": b"CC-BY\n",
}


def _tar(path: Path, files: dict[str, bytes], top: str | None = "dataset") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, files: dict[str, bytes], top: str | None = "dataset") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{top}/{name}" if top else name, data)
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cfg(source: Path | str, sha256: str | None = None, name: str = "pets", **limits: float) -> Config:
    cfg = Config(data=DataConfig(name=name, source=str(source), sha256=sha256, **limits))
    cfg.check()
    return cfg


def run_download(cfg: Config, target: Path) -> Path:
    """The download stage of the project that `target` (`<project>/data/raw/<name>`) belongs to."""
    assert target.name == cfg.data.name
    return download(cfg, StagePaths(target.parents[2]))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """Where the stage writes in a project: <project>/data/raw/pets."""
    return tmp_path / "project" / "data" / "raw" / "pets"


def _assert_nothing_left(target: Path) -> None:
    """No dataset, and no temporary folders beside where it would have been."""
    assert not target.exists()
    if target.parent.exists():
        assert list(target.parent.iterdir()) == []


def test_local_tarball_with_good_checksum(tmp_path: Path, target: Path) -> None:
    archive = _tar(tmp_path / "pets.tgz", DATASET)
    run_download(_cfg(archive, _sha256(archive)), target)
    assert _files(target) == DATASET  # the single top folder "dataset/" is stripped
    assert sorted(p.name for p in target.parent.iterdir()) == ["pets"]


def test_bad_checksum_leaves_nothing(tmp_path: Path, target: Path) -> None:
    archive = _tar(tmp_path / "pets.tgz", DATASET)
    with pytest.raises(DownloadError, match="sha256"):
        run_download(_cfg(archive, "0" * 64), target)
    _assert_nothing_left(target)


def test_failed_download_keeps_previous_dataset(tmp_path: Path, target: Path) -> None:
    good = _tar(tmp_path / "good.tgz", DATASET)
    run_download(_cfg(good), target)
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DownloadError, match="corrupt or truncated"):
        run_download(_cfg(broken), target)
    assert _files(target) == DATASET
    assert sorted(p.name for p in target.parent.iterdir()) == ["pets"]


def test_rerun_replaces_old_content(tmp_path: Path, target: Path) -> None:
    run_download(_cfg(_tar(tmp_path / "a.tgz", DATASET)), target)
    (target / "cats" / "stale.jpg").write_bytes(_jpeg())
    run_download(_cfg(_tar(tmp_path / "b.tgz", {"x/1.jpg": _jpeg(), "y/2.jpg": _jpeg()})), target)
    assert sorted(_files(target)) == ["x/1.jpg", "y/2.jpg"]


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A tarball whose good first member is followed by `member`."""
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("dataset/cats/a.jpg")
        good.size = len(DATASET["cats/a.jpg"])
        tar.addfile(good, io.BytesIO(DATASET["cats/a.jpg"]))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "data"),
    [
        pytest.param(_member("../evil.txt"), b"pwned", id="parent-dir"),
        pytest.param(_member("dataset/../../evil.txt"), b"pwned", id="nested-parent-dir"),
        pytest.param(_member("/tmp/transferlab-evil.txt"), b"pwned", id="absolute"),
        pytest.param(_member("dataset/cats/link.jpg", tarfile.SYMTYPE, "/etc/passwd"), b"", id="symlink"),
        pytest.param(_member("dataset/cats/hard.jpg", tarfile.LNKTYPE, "dataset/cats/a.jpg"), b"", id="hardlink"),
        pytest.param(_member("dataset/cats/dev", tarfile.CHRTYPE), b"", id="device"),
        pytest.param(_member("dataset/cats/fifo", tarfile.FIFOTYPE), b"", id="fifo"),
    ],
)
def test_unsafe_tar_member_rejected(tmp_path: Path, target: Path, member: tarfile.TarInfo, data: bytes) -> None:
    archive = _tar_with(tmp_path / "evil.tgz", member, data)
    with pytest.raises(DownloadError, match="refusing to extract"):
        run_download(_cfg(archive), target)
    _assert_nothing_left(target)
    assert not (tmp_path / "evil.txt").exists()
    assert not (target.parent.parent / "evil.txt").exists()
    assert not Path("/tmp/transferlab-evil.txt").exists()


def test_zip_source(tmp_path: Path, target: Path) -> None:
    archive = _zip(tmp_path / "pets.zip", DATASET)
    run_download(_cfg(archive, _sha256(archive)), target)
    assert _files(target) == DATASET


def test_zip_macos_resource_folder_ignored(tmp_path: Path, target: Path) -> None:
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in DATASET.items():
            zf.writestr(f"dataset/{name}", data)
        zf.writestr("__MACOSX/dataset/cats/._a.jpg", b"\x00\x05\x16\x07")
    run_download(_cfg(archive), target)
    assert _files(target) == DATASET


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "C:/evil.txt", "dataset\\..\\..\\evil.txt"])
def test_unsafe_zip_member_rejected(tmp_path: Path, target: Path, name: str) -> None:
    archive = _zip(tmp_path / "evil.zip", {"cats/a.jpg": DATASET["cats/a.jpg"]})
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(name, b"pwned")
    with pytest.raises(DownloadError, match="refusing to extract"):
        run_download(_cfg(archive), target)
    _assert_nothing_left(target)
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_rejected(tmp_path: Path, target: Path) -> None:
    archive = _zip(tmp_path / "evil.zip", {"cats/a.jpg": DATASET["cats/a.jpg"]})
    link = zipfile.ZipInfo("dataset/cats/link.jpg")
    link.external_attr = (0o120777 << 16) | 0x20
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DownloadError, match="link"):
        run_download(_cfg(archive), target)
    _assert_nothing_left(target)


ZEROS = 64 * 2**20  # 64 MiB of zeros: about 64 KB compressed, a ratio near 1000


def _zeros_zip(path: Path) -> Path:
    """Issue 12's bomb, scaled down: a good image, then one member of zeros, deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset/cats/a.jpg", DATASET["cats/a.jpg"])
        with zf.open("dataset/cats/zeros.jpg", "w") as member:
            for _ in range(ZEROS // 2**20):
                member.write(bytes(2**20))
    return path


def _zeros_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("dataset/cats/zeros.jpg")
        info.size = ZEROS
        tar.addfile(info, io.BytesIO(bytes(ZEROS)))
    return path


@pytest.mark.parametrize("make", [_zeros_zip, _zeros_tar], ids=["zip", "tar.gz"])
def test_compression_bomb_is_refused_naming_the_member(tmp_path: Path, target: Path, make) -> None:
    """Issue 12: a 1 MB zip holding 1 GiB of zeros was extracted in full (tar had no bound either)."""
    archive = make(tmp_path / f"bomb.{'zip' if make is _zeros_zip else 'tgz'}")
    assert archive.stat().st_size < ZEROS / 500
    with pytest.raises(DownloadError) as caught:
        run_download(_cfg(archive), target)  # the default ratio bound: 100
    message = str(caught.value)
    assert "\n" not in message
    assert "member 'dataset/cats/zeros.jpg' expands the" in message and "more than 100 times" in message
    assert "data.max_compression_ratio" in message
    _assert_nothing_left(target)
    run_download(_cfg(archive, max_compression_ratio=5000), target)  # a genuine archive: raise the bound
    assert (target / "cats" / "zeros.jpg").stat().st_size == ZEROS


def test_total_extracted_size_is_bounded(tmp_path: Path, target: Path) -> None:
    archive = _tar(tmp_path / "pets.tar", DATASET, top=None)
    run_download(_cfg(archive, max_extracted_bytes=10_000), target)
    total = sum(len(data) for data in DATASET.values())
    with pytest.raises(DownloadError, match=r"member '.*' takes the extracted size past 1,000 bytes"):
        run_download(_cfg(archive, max_extracted_bytes=1_000), target)
    assert _files(target) == DATASET, "the previous dataset stays"
    assert total > 1_000


def test_two_top_level_entries_are_not_stripped(tmp_path: Path, target: Path) -> None:
    archive = _tar(tmp_path / "flat.tar", DATASET, top=None)
    run_download(_cfg(archive), target)
    assert _files(target) == DATASET


def test_not_an_archive(tmp_path: Path, target: Path) -> None:
    bogus = tmp_path / "images.tgz"
    bogus.write_text("not an archive")
    with pytest.raises(DownloadError, match=r"not a \.tgz, \.tar or \.zip"):
        run_download(_cfg(bogus), target)
    _assert_nothing_left(target)


def test_folder_source_is_hard_linked_and_ignores_checksum(
    tmp_path: Path, target: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "my_images"
    for name, data in DATASET.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    with caplog.at_level(logging.WARNING):
        run_download(_cfg(source, "0" * 64), target)
    assert _files(target) == DATASET
    assert (target / "cats" / "a.jpg").stat().st_ino == (source / "cats" / "a.jpg").stat().st_ino
    assert "data.sha256 is ignored" in caplog.text


def test_folder_source_follows_symbolic_links(tmp_path: Path, target: Path) -> None:
    """Issue 12: links were hard-linked as links, so a relative one pointed at nothing in
    data/raw and its image was skipped by the split."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "more_dogs").mkdir(parents=True)
    (elsewhere / "dog.jpg").write_bytes(DATASET["dogs/c.jpg"])
    (elsewhere / "more_dogs" / "d.jpg").write_bytes(DATASET["cats/b.jpg"])
    source = tmp_path / "my_images"
    (source / "cats").mkdir(parents=True)
    (source / "dogs").mkdir()
    (source / "cats" / "a.jpg").write_bytes(DATASET["cats/a.jpg"])
    (source / "cats" / "relative.jpg").symlink_to("a.jpg")
    (source / "dogs" / "absolute.jpg").symlink_to(elsewhere / "dog.jpg")
    (source / "dogs" / "up_and_over.jpg").symlink_to(Path("..", "..", "elsewhere", "dog.jpg"))
    (source / "dogs" / "folder").symlink_to(elsewhere / "more_dogs", target_is_directory=True)
    run_download(_cfg(source), target)
    assert _files(target) == {
        "cats/a.jpg": DATASET["cats/a.jpg"],
        "cats/relative.jpg": DATASET["cats/a.jpg"],
        "dogs/absolute.jpg": DATASET["dogs/c.jpg"],
        "dogs/up_and_over.jpg": DATASET["dogs/c.jpg"],
        "dogs/folder/d.jpg": DATASET["cats/b.jpg"],
    }
    assert not any(path.is_symlink() for path in target.rglob("*")), "data/raw holds files, never links"


def test_folder_source_with_a_broken_link_is_refused(tmp_path: Path, target: Path) -> None:
    source = tmp_path / "my_images"
    (source / "cats").mkdir(parents=True)
    (source / "cats" / "a.jpg").write_bytes(DATASET["cats/a.jpg"])
    (source / "cats" / "gone.jpg").symlink_to("moved_away.jpg")
    with pytest.raises(DownloadError, match=r"cats/gone\.jpg is a broken symbolic link \(to moved_away\.jpg\)"):
        run_download(_cfg(source), target)
    _assert_nothing_left(target)


def test_missing_local_source(tmp_path: Path, target: Path) -> None:
    with pytest.raises(DownloadError, match=r"data\.source .* does not exist"):
        run_download(_cfg(tmp_path / "nowhere"), target)


def test_source_inside_raw_folder_refused(target: Path) -> None:
    inside = target.parent / "my_images"
    (inside / "cats").mkdir(parents=True)
    with pytest.raises(DownloadError, match="overlaps"):
        run_download(_cfg(inside), target)


def test_synthetic_source(synthetic_cfg, tmp_path: Path) -> None:
    target = tmp_path / "data" / "raw" / synthetic_cfg.data.name
    run_download(synthetic_cfg, target)
    assert len(list(target.rglob("*.jpg"))) == 36


class _Server:
    """An HTTP server on 127.0.0.1 in a thread that counts the requests it answers."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], **handler_kwargs: object) -> None:
        self.requests = 0
        outer = self

        class Counting(handler):  # type: ignore[valid-type, misc]
            def __init__(self, *args: object) -> None:
                super().__init__(*args, **handler_kwargs)

            def handle_one_request(self) -> None:
                outer.requests += 1
                super().handle_one_request()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def serve() -> Iterator[object]:
    """`serve(handler_class, **handler_kwargs)` starts a server; all are shut down after the test."""
    started: list[_Server] = []

    def start(handler: type[http.server.BaseHTTPRequestHandler], **handler_kwargs: object) -> _Server:
        server = _Server(handler, **handler_kwargs)
        server.thread.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_http_url_downloads_once_into_cache(tmp_path: Path, target: Path, serve) -> None:
    site = tmp_path / "site"
    site.mkdir()
    archive = _tar(site / "pets.tgz", DATASET)
    server = serve(http.server.SimpleHTTPRequestHandler, directory=str(site))
    url = server.url("pets.tgz")
    cfg = _cfg(url, _sha256(archive))
    run_download(cfg, target)
    assert _files(target) == DATASET
    cache = target.parent.parent / "downloads"
    assert [p.name for p in cache.iterdir()] == [cache_name(url)]
    run_download(cfg, target)  # a re-run uses the cache
    assert server.requests == 1
    assert _files(target) == DATASET


def test_http_bad_checksum_is_not_cached(tmp_path: Path, target: Path, serve) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _tar(site / "pets.tgz", DATASET)
    server = serve(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with pytest.raises(DownloadError, match="sha256"):
        run_download(_cfg(server.url("pets.tgz"), "0" * 64), target)
    _assert_nothing_left(target)
    assert list((target.parent.parent / "downloads").iterdir()) == []


def test_http_404(target: Path, tmp_path: Path, serve) -> None:
    server = serve(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with pytest.raises(DownloadError, match="HTTP 404"):
        run_download(_cfg(server.url("missing.tgz")), target)
    _assert_nothing_left(target)


class _DropsMidFile(http.server.BaseHTTPRequestHandler):
    """Announces the whole tarball, sends half of it, and closes the connection."""

    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload[: len(self.payload) // 2])
        self.wfile.flush()
        self.close_connection = True


def test_connection_dropped_mid_file(tmp_path: Path, target: Path, serve) -> None:
    payload = _tar(tmp_path / "pets.tgz", {**DATASET, "big/noise.bin": os.urandom(300_000)}).read_bytes()
    handler = type("Drops", (_DropsMidFile,), {"payload": payload})
    server = serve(handler)
    with pytest.raises(DownloadError, match=r"stopped after \d+ of \d+ bytes.*data\.source") as caught:
        run_download(_cfg(server.url("pets.tgz")), target)
    assert "\n" not in str(caught.value)
    _assert_nothing_left(target)
    cache = target.parent.parent / "downloads"
    assert list(cache.iterdir()) == []  # no .part file, nothing a later run could trust


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_url_is_one_line_naming_data_source(target: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/flower_photos.tgz"
    with pytest.raises(DownloadError) as caught:
        run_download(_cfg(url), target)
    message = str(caught.value)
    assert "\n" not in message
    assert url in message and "data.source" in message
    _assert_nothing_left(target)


def test_cli_download_error_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], synthetic_cfg
) -> None:
    import dataclasses

    cfg = dataclasses.replace(synthetic_cfg, data=_cfg(tmp_path / "nowhere").data)
    write_params(cfg, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["download", "--params", "params.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("DownloadError: data.source")
