"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1 with an SQLite backend
and its artifacts under one directory, in a process group of its own; it can be stopped and
started again on the same port and store (a server that fails mid-run and comes back)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        self.launch()
        self.wait(timeout)

    def launch(self) -> None:
        """Start the server without waiting for it (``wait``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")
        # without its job runner: seven more processes (huey consumers), about 30 CPU seconds
        # to start, for features (prompt optimisation, trace jobs) that tracking does not use
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        log.close()

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: "
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """The whole process group (uvicorn's workers too), and wait until the port is closed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        while self.healthy():
            time.sleep(0.1)

    def client(self):
        from mlflow import MlflowClient
        return MlflowClient(self.uri)
