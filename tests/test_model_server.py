"""model_server.py: `transferlab serve` bounds request bodies in bytes before MLflow reads them
(issue 12: a 111 MB request made the server peak at 5.3 GB)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import SERVE_MAX_BYTES, SERVE_MAX_ROWS, ModelServer

from transferlab.errors import ConfigError
from transferlab.model_server import DEFAULT_MAX_BYTES, MAX_BYTES_ENV, BodySizeLimit, max_bytes_setting

LIMIT = 100


class BodyReadingApp:
    """An ASGI app that reads the whole body, as MLflow's does, then answers 200 with its length."""

    def __init__(self) -> None:
        self.called = False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        self.called = True
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


def call(
    chunks: list[bytes], content_length: int | None, expect: bool = False
) -> tuple[list[dict], int, BodyReadingApp]:
    """Run BodySizeLimit(LIMIT) around BodyReadingApp for one request; (messages sent, chunks read, app)."""
    app = BodyReadingApp()
    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    headers += [(b"expect", b"100-continue")] if expect else []
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    pending = list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(BodySizeLimit(app, LIMIT)(scope, receive, send))
    return sent, len(chunks) - len(pending), app


def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    """The app never sees it; the body is drained and dropped (the client is still sending it),
    or not read at all when the client waits for `100 Continue`."""
    assert call([b"x" * 60, b"x" * 60], content_length=120, expect=True)[1] == 0
    sent, read, app = call([b"x" * 60, b"x" * 60], content_length=120)
    assert read == 2 and not app.called
    assert sent[0]["status"] == 413
    assert sent[1]["body"] == (
        b'{"error_code": "REQUEST_TOO_LARGE", "message": "request body of 120 bytes is over the limit of 100 '
        b'bytes (TRANSFERLAB_SERVE_MAX_BYTES): send the images in smaller requests"}'
    )


def test_a_streamed_body_is_cut_off_once_it_passes_the_limit() -> None:
    """Chunked: no length declared; the app's own answer to the cut-off body is replaced by the 413."""
    sent, read, app = call([b"x" * 60, b"x" * 60, b"x" * 60], content_length=None)
    assert app.called and read == 3, "the app stops at the chunk that passes the limit; the rest is drained"
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 413
    assert b"request body is over the limit of 100 bytes (TRANSFERLAB_SERVE_MAX_BYTES)" in sent[1]["body"]


@pytest.mark.parametrize("content_length", [LIMIT, None])
def test_bodies_up_to_the_limit_pass(content_length: int | None) -> None:
    sent, read, _ = call([b"x" * 50, b"x" * 50], content_length=content_length)
    assert read == 2 and sent[0]["status"] == 200 and sent[1]["body"] == b"100"


def test_other_traffic_passes() -> None:
    seen: list[str] = []

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        seen.append(scope["type"])

    asyncio.run(BodySizeLimit(app, LIMIT)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_limit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    assert max_bytes_setting() == DEFAULT_MAX_BYTES == 64 * 2**20
    monkeypatch.setenv(MAX_BYTES_ENV, "5000000")
    assert max_bytes_setting() == 5_000_000
    for bad in ("lots", "0", "-1", "1e6"):
        monkeypatch.setenv(MAX_BYTES_ENV, bad)
        with pytest.raises(ConfigError, match=f"{MAX_BYTES_ENV} must be a whole number of bytes >= 1, got '{bad}'"):
            max_bytes_setting()


def test_serve_refuses_a_bad_setting_or_model_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transferlab.cli import main

    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    assert main(["serve", "models:/anything@champion"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ConfigError: {MAX_BYTES_ENV} must be a whole number of bytes >= 1, got 'lots'"
    )
    monkeypatch.delenv(MAX_BYTES_ENV)
    assert main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ModelError: {tmp_path} is not an MLflow model folder (no MLmodel file) nor a model URI"
    )


def peak_growth_mb(server: ModelServer, action: Callable[[], object]) -> float:
    """How far the server's memory rose above its level before `action`, sampled every 20 ms meanwhile."""
    before = server.rss_mb()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.rss_mb())
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join(timeout=10)
    return max(peak, server.rss_mb()) - before


@pytest.mark.slow
def test_transferlab_serve_refuses_big_bodies_before_reading_them(
    limited_model_server: ModelServer, colour_image
) -> None:
    """The issue's 111 MB request, with its length declared and streamed chunked: HTTP 413 with the
    reason, and the server's memory never grows by anything like the body; normal requests work."""
    from transferlab.serving import IMAGE_COLUMN, encode_image_file

    server = limited_model_server
    good = encode_image_file(colour_image("red.png", (230, 20, 20)))
    request = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[good]] * SERVE_MAX_ROWS}}
    status, body = server.post(request)  # warm: the model loaded and traced
    assert status == 200 and [row["label"] for row in body["predictions"]] == ["red"] * SERVE_MAX_ROWS

    head, tail = b'{"dataframe_split": {"columns": ["image"], "data": [["', b'"]]}}'
    size = 111 * 10**6
    huge = head + b"A" * (size - len(head) - len(tail)) + tail
    answers: list[tuple[int, dict]] = []
    grown = peak_growth_mb(server, lambda: answers.append(server.post_body(huge)))
    status, body = answers.pop()
    assert status == 413
    assert body["message"] == (
        f"request body of {size:,} bytes is over the limit of {SERVE_MAX_BYTES:,} bytes "
        "(TRANSFERLAB_SERVE_MAX_BYTES): send the images in smaller requests"
    )
    assert grown < 50, f"the server grew by {grown:.0f} MB while refusing a {size / 1e6:.0f} MB body"

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(size // 2**20):
            yield b"A" * 2**20
        yield tail

    grown = peak_growth_mb(server, lambda: answers.append(server.post_body(chunks())))
    status, body = answers.pop()
    assert status == 413
    assert body["message"].startswith(f"request body is over the limit of {SERVE_MAX_BYTES:,} bytes")
    assert grown < 50, f"the server grew by {grown:.0f} MB while refusing a streamed {size / 1e6:.0f} MB body"

    status, body = server.post(request)
    assert status == 200 and len(body["predictions"]) == SERVE_MAX_ROWS, "the server still answers"
