"""Real services for the scale-out tests, all inside one loopback-only network namespace.

Ray picks its node address from the default route and would listen on the machine's external
interface; inside a network namespace that holds only `lo` it has nothing but 127.0.0.1. The
namespace is held open by a sleeping process (`unshare --net`); commands enter it with `nsenter`,
and the test process itself enters it (this thread only) to talk to the services with a client.
Every process in the namespace was started by these tests, so closing it ends them all, by pid.

- `LoopbackNamespace`: the namespace.
- `TrackingService`: PostgreSQL in a temporary folder + `mlflow server --serve-artifacts`
  (transferlab.tracking_server), inside the namespace.
- `RayCluster`: `ray start --head` plus one worker node, each with 1 CPU, inside the namespace.

Each `start` skips the test, with the reason, when a system program is missing (in CI, where
`.ci/run` installs them, it fails it: `helpers.unavailable`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from helpers import VENV_BIN, Process, unavailable

from transferlab.errors import TransferlabError
from transferlab.tracking_server import postgres_bin, stop_process_group

CLONE_NEWNET = 0x40000000
NAMESPACE_LIFETIME_S = 3600  # the holder's sleep: a namespace never outlives a crashed test run by long
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def require_programs(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        unavailable(f"system programs missing: {', '.join(missing)}")


def _inode(path: str) -> int | None:
    try:
        return Path(path).stat().st_ino
    except OSError:
        return None


class LoopbackNamespace:
    """A network namespace with only a loopback interface (up), for as long as the holder runs."""

    def __init__(self, holder: subprocess.Popen, inode: int) -> None:
        self.holder = holder
        self.path = f"/proc/{holder.pid}/ns/net"
        self.inode = inode

    @classmethod
    def create(cls, timeout: float = 30) -> LoopbackNamespace:
        if os.geteuid() != 0:
            unavailable("a loopback-only network namespace needs root (unshare --net)")
        require_programs("unshare", "nsenter", "ip")
        script = f"ip link set lo up && echo ready && exec sleep {NAMESPACE_LIFETIME_S}"
        holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        ready, _, _ = select.select([holder.stdout], [], [], timeout)
        line = holder.stdout.readline() if ready else ""
        inode = _inode(f"/proc/{holder.pid}/ns/net")
        # Only once the holder said "ready" is it inside the new namespace; never treat ours as the test's.
        if line.strip() != "ready" or inode is None or inode == _inode("/proc/self/ns/net"):
            stop_process_group(holder.pid, 5, holder)
            raise RuntimeError(f"no loopback-only network namespace within {timeout:.0f} s")
        return cls(holder, inode)

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--"]

    def interfaces(self) -> list[str]:
        done = subprocess.run(
            [*self.prefix, "ip", "-o", "link"], capture_output=True, text=True, timeout=10, check=True
        )
        return [line.split(":")[1].strip() for line in done.stdout.splitlines()]

    def run(self, args: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
        """Run a command inside, bounded by `timeout` (its whole process group is killed then)."""
        process = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(process.pid, 5, process)
            stdout, stderr = process.communicate()
            raise AssertionError(f"{' '.join(args)} did not finish within {timeout:.0f} s:\n{stderr[-3000:]}") from None
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def popen(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a command inside, in a process group of its own."""
        env = {
            **os.environ,
            **QUIET_ENV,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            **kwargs.pop("env", {}),
        }
        return subprocess.Popen([*self.prefix, *args], env=env, start_new_session=True, **kwargs)

    def process(self, command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Process:
        """A `transferlab` command run inside, its output lines read as they come (`helpers.Process`);
        its pid is the command's own (`nsenter` runs it in its place)."""
        return Process(command, cwd, prefix=self.prefix, env={**QUIET_ENV, **env})

    @contextmanager
    def entered(self) -> Iterator[None]:
        """This thread inside the namespace (clients in the test process reach the services)."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        inside = os.open(self.path, os.O_RDONLY)
        try:
            if libc.setns(inside, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the test namespace failed")
            try:
                yield
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the test process's namespace failed")
        finally:
            os.close(inside)
            os.close(home)

    def pids(self) -> list[int]:
        """Processes in the namespace (all started by the tests), the holder excluded."""
        own = _inode("/proc/self/ns/net")
        assert self.inode != own, "refusing to list the test process's own network namespace"
        found = []
        for entry in Path("/proc").iterdir():
            ours = entry.name.isdigit() and int(entry.name) not in (self.holder.pid, os.getpid())
            if ours and _inode(f"{entry}/ns/net") == self.inode:
                found.append(int(entry.name))
        return found

    def close(self, timeout: float = 20) -> None:
        """End every process in the namespace (SIGTERM, then SIGKILL), then the holder."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        stop_process_group(self.holder.pid, 5, self.holder)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _scratch(prefix: str) -> Path:
    """A temporary folder other users (postgres) can enter; pytest's own tmp folders are private."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@dataclass
class TrackingService:
    """`python -m transferlab.tracking_server start|stop` (PostgreSQL + `mlflow server
    --serve-artifacts`) run inside `namespace`, with its data in a temporary folder."""

    namespace: LoopbackNamespace
    directory: Path = field(default_factory=lambda: _scratch("transferlab-tracking-"))
    port: int = 5050

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self, action: str, timeout: float) -> None:
        args = [str(VENV_BIN / "python"), "-m", "transferlab.tracking_server", action, "--dir", str(self.directory)]
        if action == "start":
            args += ["--port", str(self.port), "--workers", "1"]
        done = self.namespace.run(args, timeout=timeout)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    def start(self) -> None:
        try:
            postgres_bin()
        except TransferlabError as exc:
            unavailable(str(exc))
        if os.geteuid() == 0:
            require_programs("runuser")
        self._command("start", timeout=300)

    def stop(self) -> None:
        self._command("stop", timeout=120)

    def close(self) -> None:
        if (self.directory / "server.json").is_file():
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class RayCluster:
    """A Ray head node and one worker node (1 CPU each) on 127.0.0.1 inside `namespace`."""

    namespace: LoopbackNamespace
    port: int = 6379
    temp_dir: Path = field(default_factory=lambda: _scratch("tl-ray-"))
    groups: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, cwd: Path, timeout: float = 180) -> None:
        """`ray start --block` for each node (Ray then ends a node's processes when its command ends)."""
        if not (VENV_BIN / "ray").is_file():
            unavailable("Ray is not installed: `make setup EXTRAS=ray`")
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", "--block"]
        common += ["--object-store-memory=100000000"]
        head = ["ray", "start", "--head", f"--port={self.port}", "--include-dashboard=false"]
        head += [f"--temp-dir={self.temp_dir}", *common]
        worker = ["ray", "start", f"--address={self.address}", *common]
        for name, args in (("head", head), ("worker", worker)):
            log_file = self.temp_dir / f"ray-start-{name}.log"
            with log_file.open("w") as out:
                process = self.namespace.popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
            self.groups.append(process)
            deadline = time.monotonic() + timeout
            while "block forever" not in log_file.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"ray start ({name}) did not come up:\n{log_file.read_text()[-3000:]}")
                time.sleep(0.5)

    def nodes(self, timeout: float = 60) -> list[dict]:
        """`ray.nodes()` as a driver inside the namespace sees it."""
        keys = ("NodeID", "NodeManagerAddress", "Alive", "Resources")
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            f"print(json.dumps([{{k: n[k] for k in {keys!r}}} for n in ray.nodes()]))"
        )
        done = self.namespace.run([str(VENV_BIN / "python"), "-c", code], timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        """End each node's `ray start --block` and every process of its session (the daemons, the
        workers) with SIGKILL: a throwaway cluster. Never `ray stop`: it ends every Ray on the machine."""
        sessions = {process.pid for process in self.groups}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (ray := [pid for pid in self.namespace.pids() if _sid(pid) in sessions]):
            for pid in ray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for process in self.groups:
            process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
