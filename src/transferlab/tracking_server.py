"""A local team tracking server: `mlflow server` on PostgreSQL with proxied artifacts, on 127.0.0.1.

    python -m transferlab.tracking_server start [--dir build/tracking-server] [--port 5050] [--pg-port 5433]
    python -m transferlab.tracking_server stop [--dir build/tracking-server]

(`make tracking-server` / `make tracking-server-stop`.) `start` creates a PostgreSQL cluster in
`<dir>/postgres` the first time (PostgreSQL's own `initdb` and `pg_ctl` from the system packages;
as root they run as the `postgres` user, which `initdb` requires), a database `mlflow`, and starts
`mlflow server --serve-artifacts` with artifacts in `<dir>/artifacts`. Clients need no shared disk:
runs and artifacts both go through the server's URL. Both services listen on 127.0.0.1 only.
Every wait is bounded; what `start` launched is recorded in `<dir>/server.json` for `stop`.

The tests start the same services (in a loopback-only network namespace) through this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.errors import TransferlabError, run_reporting_errors

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("build/tracking-server")
POSTGRES_LIB = Path("/usr/lib/postgresql")  # Debian/Ubuntu: <version>/bin/{initdb,pg_ctl,psql}
DEFAULT_PORT = 5050
DEFAULT_PG_PORT = 5433
DATABASE = "mlflow"
PG_USER = "postgres"  # the Debian package's system user; initdb refuses to run as root
STATE_FILE = "server.json"
# Environment of every service started here: no usage reports leave the machine.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def postgres_bin() -> Path:
    """The folder with PostgreSQL's server programs (initdb, pg_ctl), newest version first."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(POSTGRES_LIB.glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not candidates:
        raise TransferlabError(
            "PostgreSQL server programs (initdb, pg_ctl) not found: install them "
            "(Debian/Ubuntu: apt-get install postgresql) or put their folder on PATH"
        )
    return candidates[-1].parent


def _run(args: Sequence[str], timeout: float, what: str) -> str:
    """Run a service command; a failure or a timeout is one line naming `what`."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TransferlabError(f"{what} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise TransferlabError(f"{what} failed: {detail[-1] if detail else f'exit status {done.returncode}'}")
    return done.stdout


@dataclass
class Postgres:
    """A PostgreSQL cluster in `directory` listening on 127.0.0.1:`port` and a unix socket inside it."""

    directory: Path
    port: int = DEFAULT_PG_PORT

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "socket"

    @property
    def log_file(self) -> Path:
        return self.directory / "postgres.log"

    def _as_owner(self, *args: str) -> list[str]:
        runuser = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []
        return [*runuser, *args]

    def init(self, timeout: float = 120) -> None:
        """Create the cluster unless it exists (trust on the unix socket, passwords over TCP)."""
        if (self.data / "PG_VERSION").is_file():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, PG_USER, PG_USER)
            for path in (self.data, self.socket_dir):
                shutil.chown(path, PG_USER, PG_USER)
        self.data.chmod(0o700)
        initdb = str(postgres_bin() / "initdb")
        args = ["-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--auth-local=trust", "--auth-host=scram-sha-256"]
        _run(self._as_owner(initdb, *args), timeout, "initdb")

    def start(self, timeout: float = 60) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir}"
        pg_ctl = str(postgres_bin() / "pg_ctl")
        args = ["-D", str(self.data), "-l", str(self.log_file), "-w", "-t", str(int(timeout)), "-o", options, "start"]
        if os.geteuid() == 0 and not self.log_file.exists():
            self.log_file.touch()
            shutil.chown(self.log_file, PG_USER, PG_USER)
        _run(self._as_owner(pg_ctl, *args), timeout + 10, f"PostgreSQL on 127.0.0.1:{self.port}")

    def stop(self, timeout: float = 30) -> None:
        pg_ctl = str(postgres_bin() / "pg_ctl")
        args = ["-D", str(self.data), "-m", "fast", "-w", "-t", str(int(timeout)), "stop"]
        _run(self._as_owner(pg_ctl, *args), timeout + 10, "stopping PostgreSQL")

    def ensure_database(self, name: str, user: str, password: str, timeout: float = 30) -> None:
        """Create the login role and its database unless they exist (over the unix socket)."""
        psql = [str(postgres_bin() / "psql"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres"]
        psql += ["-v", "ON_ERROR_STOP=1", "-qtA", "-d", "postgres", "-c"]

        def sql(statement: str) -> str:
            return _run([*psql, statement], timeout, "psql").strip()

        if not sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'"):
            sql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        if not sql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'"):
            sql(f"CREATE DATABASE {name} OWNER {user}")

    def uri(self, name: str, user: str, password: str) -> str:
        """SQLAlchemy URI for MLflow (`postgresql+psycopg2`: the driver of the `postgres` extra)."""
        return f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{self.port}/{name}"


def wait_healthy(url: str, timeout: float, alive: subprocess.Popen | None = None) -> None:
    """Poll `<url>/health` until it answers 200; fail after `timeout` s or when `alive` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise TransferlabError(f"mlflow server exited with status {alive.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    raise TransferlabError(f"mlflow server {url} did not answer /health within {timeout:.0f} s")


@dataclass
class MlflowServer:
    """`mlflow server` with `backend_uri` as its store, proxying artifacts kept in `artifacts`."""

    backend_uri: str
    artifacts: Path
    port: int = DEFAULT_PORT
    log_file: Path | None = None
    workers: int = 2
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        return [
            mlflow,
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts.resolve()),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]

    def start(self, timeout: float = 120) -> None:
        """Start in its own process group (so `stop` ends all its workers) and wait for /health."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            wait_healthy(self.url, timeout, self.process)
        except TransferlabError:
            self.stop()
            raise

    def stop(self, timeout: float = 20) -> None:
        if self.process is not None:
            stop_process_group(self.process.pid, timeout, self.process)
            self.process = None


def stop_process_group(pid: int, timeout: float = 20, process: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group `pid` leads, SIGKILL what is left of it after `timeout` s.

    Pass the `Popen` of a child process so that it is reaped (an unreaped child would look alive).
    """

    def group_alive() -> bool:
        if process is not None and process.poll() is not None:
            return False
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        return True

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # the leader may be gone and its workers not
    if process is not None:
        process.wait(timeout=10)


def _start(args: argparse.Namespace) -> int:
    directory = args.dir.resolve()
    state_file = directory / STATE_FILE
    if state_file.is_file():
        raise TransferlabError(f"a server started from {directory} may still run: `{_stop_command(args)}` first")
    postgres = Postgres(directory / "postgres", args.pg_port)
    postgres.init()
    postgres.start()
    try:
        postgres.ensure_database(DATABASE, DATABASE, DATABASE)
        uri = postgres.uri(DATABASE, DATABASE, DATABASE)
        server = MlflowServer(uri, directory / "artifacts", args.port, directory / "mlflow.log", args.workers)
        # Detached: `stop` ends it through the process group recorded below.
        server.start()
    except BaseException:
        postgres.stop()
        raise
    assert server.process is not None
    payload = {"url": server.url, "mlflow_pid": server.process.pid, "pg_port": args.pg_port}
    state_file.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"MLflow server on PostgreSQL: {server.url} (logs in {directory})")
    print(f"export MLFLOW_TRACKING_URI={server.url}")
    return 0


def _stop_command(args: argparse.Namespace) -> str:
    return f"python -m transferlab.tracking_server stop --dir {args.dir}"


def _stop(args: argparse.Namespace) -> int:
    directory = args.dir.resolve()
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        print(f"no server started from {directory}")
        return 0
    state = json.loads(state_file.read_text())
    stop_process_group(int(state["mlflow_pid"]))
    postgres = Postgres(directory / "postgres", int(state["pg_port"]))
    if (postgres.data / "postmaster.pid").is_file():
        postgres.stop()
    state_file.unlink()
    print(f"stopped the MLflow server {state['url']} and its PostgreSQL (data kept in {directory})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transferlab.tracking_server", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, handler in (("start", _start), ("stop", _stop)):
        command = sub.add_parser(name)
        command.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the database and artifacts live")
        command.set_defaults(handler=handler)
        if name == "start":
            command.add_argument("--port", type=int, default=DEFAULT_PORT, help="the server's port on 127.0.0.1")
            command.add_argument("--pg-port", type=int, default=DEFAULT_PG_PORT, help="PostgreSQL's port on 127.0.0.1")
            command.add_argument("--workers", type=int, default=2, help="the server's worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
