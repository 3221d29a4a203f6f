"""`transferlab serve`: MLflow's scoring server for a logged classifier, with request bodies bounded in bytes.

MLflow 3's scoring server (what `mlflow models serve` runs) is a FastAPI app served by uvicorn
(`mlflow.pyfunc.scoring_server`). It reads a request's whole body into memory and parses it
before the model sees a row, and neither it nor uvicorn bounds the body's size: the model's own
limits (rows per request, pixels per image) come too late for a few huge rows. Here the same app
runs behind `BodySizeLimit`, which answers HTTP 413 before the app reads the body: when the
declared `Content-Length` is over the limit, or as soon as the bytes of a chunked upload pass it.
What arrived is dropped and the rest is read and discarded, so memory stays flat and the client,
still sending, gets the answer.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.errors import ConfigError

if TYPE_CHECKING:
    from transferlab.tracking import Store

log = logging.getLogger(__name__)

# Bytes one request body may hold; the server reads MAX_BYTES_ENV when it starts.
DEFAULT_MAX_BYTES = 64 * 2**20
MAX_BYTES_ENV = "TRANSFERLAB_SERVE_MAX_BYTES"
# Where `serve` tells the app factory (run in each uvicorn worker) the model's folder is.
MODEL_DIR_ENV = "TRANSFERLAB_SERVE_MODEL_DIR"

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]


def max_bytes_setting() -> int:
    """Bytes per request body: MAX_BYTES_ENV, else DEFAULT_MAX_BYTES."""
    raw = os.environ.get(MAX_BYTES_ENV) or str(DEFAULT_MAX_BYTES)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{MAX_BYTES_ENV} must be a whole number of bytes >= 1, got {raw!r}")
    return value


class BodyTooLargeError(Exception):
    """Raised inside the app when a streamed body passes the limit; `BodySizeLimit` answers 413."""


class BodySizeLimit:
    """ASGI middleware: HTTP 413 with a one-line JSON `message` for a body over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self, size: int | None) -> str:
        body = f"request body of {size:,} bytes" if size is not None else "request body"
        return (
            f"{body} is over the limit of {self.max_bytes:,} bytes ({MAX_BYTES_ENV}): "
            "send the images in smaller requests"
        )

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":  # such a client waits: nothing to drain
                await _drain(receive)
            await _answer(send, 413, self._refusal(int(declared)))  # the app never sees the request
            return
        received = 0
        cut_off = more = False

        async def counted_receive() -> Message:
            nonlocal received, cut_off, more
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = bool(message.get("more_body"))
                if received > self.max_bytes:
                    cut_off = True
                    raise BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            if not cut_off:  # once cut off, the app's own answer (a 500 for the error) is dropped for ours
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:  # BodyTooLargeError, as raised or wrapped (Starlette's task groups): answered below
            if not cut_off:
                raise
        if cut_off:
            if more:
                await _drain(receive)
            await _answer(send, 413, self._refusal(None))


async def _drain(receive: Receive) -> None:
    """Read the rest of a refused body, keeping none of it: a client that sends the whole body
    before it reads the answer (most do) then gets the answer rather than a broken connection."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _answer(send: Send, status: int, message: str) -> None:
    """A JSON error answer in MLflow's shape (`error_code`, `message`)."""
    body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app() -> ASGIApp:
    """uvicorn's app factory: MLflow's scoring app for the model in MODEL_DIR_ENV, body-limited."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_DIR_ENV])
    return BodySizeLimit(scoring_server.init(model), max_bytes_setting())


@contextmanager
def model_folder(reference: str, store_for: Callable[[], Store]) -> Iterator[Path]:
    """The MLflow model folder of `reference`: a local folder as given, or a `models:/` or `runs:/`
    URI downloaded from the store `store_for()` opens into a temporary folder (removed afterwards)."""
    from transferlab.errors import ModelError
    from transferlab.registry import is_model_uri

    if not is_model_uri(reference):
        if not (Path(reference) / "MLmodel").is_file():
            raise ModelError(f"{reference} is not an MLflow model folder (no MLmodel file) nor a model URI")
        yield Path(reference)
        return
    store = store_for()
    with tempfile.TemporaryDirectory(prefix="transferlab-serve-") as tmp:
        log.info("fetching %s from %s", reference, store.uri)
        yield store.download_model(reference, Path(tmp))


def serve(model_dir: Path, max_bytes: int, host: str, port: int, workers: int) -> None:
    """Serve the MLflow model in `model_dir` on `host:port` until stopped (Ctrl-C, SIGTERM); each
    worker reads `max_bytes` (`max_bytes_setting()`) from the environment it inherits."""
    import uvicorn

    os.environ[MODEL_DIR_ENV] = str(model_dir.resolve())
    log.info("serving %s on http://%s:%d (request bodies up to %s bytes)", model_dir, host, port, f"{max_bytes:,}")
    uvicorn.run(f"{__name__}:create_app", factory=True, host=host, port=port, workers=workers)
