"""Real services a test can stop and start again: an `mlflow server` subprocess (SQLite backend, proxied
artifacts) on a given port, waited on until healthy, stopped by killing its process group (SIGKILL when a test
wants a crash); a `ray start --head` cluster with token authentication and its own temp folder, stopped by killing
its session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent


class MlflowProcess:
    """`mlflow server` on 127.0.0.1:`port` with its store under `root` (kept across restarts)."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = Path(root), port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> MlflowProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: "
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not become healthy in {timeout_s:.0f} s")
            time.sleep(0.25)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (field 6 of /proc/PID/stat). Ray's workers put themselves in their own process
    groups, so killing the driver's group leaves them running; they stay in its session."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def kill_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a process and every process it started (a local Ray included) at once: a lost head node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = session_pids(proc.pid)
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            proc.wait(timeout=10)
        time.sleep(0.2)
    else:
        raise AssertionError(f"processes of session {proc.pid} survived SIGKILL: {session_pids(proc.pid)}")


class RayHead:
    """`ray start --head --block` on free ports with token authentication (a per-head token passed through
    RAY_AUTH_TOKEN, so ~/.ray/auth_token is never touched) and its own temp folder (its session logs); stopped by
    killing its session, without touching other Ray instances on the machine. `env` is the environment of the head
    (and of every worker it starts), plus the token settings; `address` is the dashboard's (jobs API, State API)."""

    def __init__(self, log: Path, env: dict[str, str], *, num_cpus: int = 2):
        from dcdit_platform.raycluster import free_port

        self.token = uuid.uuid4().hex
        self.dashboard, self.gcs = free_port(), free_port()
        # Ray gives the dashboard 60 s to start; its nine module processes took longer on the loaded 2-core machine
        # (`ray start` failed with the dashboard's log and no error in it), so the head waits as long as start() does.
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard}",
                    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "180"}
        self.address, self.gcs_address = f"http://127.0.0.1:{self.dashboard}", f"127.0.0.1:{self.gcs}"
        # Short: Ray's unix sockets live below it, and socket paths are limited to ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.log, self.num_cpus = log, num_cpus
        self.ports = {"--port": self.gcs, "--dashboard-port": self.dashboard, "--ray-client-server-port": free_port(),
                      "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                      "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
                      "--node-manager-port": free_port(), "--object-manager-port": free_port()}
        self.proc: subprocess.Popen | None = None

    def ray(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """The `ray` CLI with this head's token."""
        return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=self.env, **kwargs)

    def start(self, timeout_s: float = 180.0) -> RayHead:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(self.num_cpus),
                 "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
                 f"--temp-dir={self.temp_dir}", *[f"{k}={v}" for k, v in self.ports.items()]],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while self.ray("job", "list", "--address", self.address, timeout=60).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Ray head did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_session(self.proc)
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
