"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1 with an SQLite backend
and its artifacts under one directory, in a process group of its own; it can be stopped and
started again on the same port and store (a server that fails mid-run and comes back). On a host
of the local Slurm cluster (``on``: argv -> argv run there) it listens on that host's address,
which this machine's own network cannot reach: it is asked there, and read from its store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, host: str = "127.0.0.1",
                 on: Optional[Callable[[List[str]], List[str]]] = None):
        self.root, self.host, self.on = root, host, on
        self.port = _free_port() if on is None else 5000  # a host of its own: any port is free
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        self.launch()
        self.wait(timeout)

    def launch(self) -> None:
        """Start the server without waiting for it (``wait``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe), "server", "--host", self.host, "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"),
               # a host name (not localhost, not an address) passes MLflow's DNS-rebinding guard
               "--allowed-hosts", f"{self.host},{self.host}:{self.port}"]
        log = open(self.root / "server.log", "ab")
        # without its job runner: seven more processes (huey consumers), about 30 CPU seconds
        # to start, for features (prompt optimisation, trace jobs) that tracking does not use
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd if self.on is None else self.on(cmd), cwd=self.root,
                                     stdout=log, stderr=subprocess.STDOUT,
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
        if self.on is not None:
            ask = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)"
            return subprocess.run(self.on([sys.executable, "-c", ask, f"{self.uri}/health"]),
                                  capture_output=True).returncode == 0
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
        return MlflowClient(self.uri if self.on is None else f"sqlite:///{self.root / 'mlflow.db'}")
