"""The tracking directory on local disk (<run.dir>/tracking): the outbox of the run's records,
run.json (the MLflow run and how much of the outbox the server has), and the lock that keeps two
senders off one outbox."""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from data_pipeline.files import atomic_write
from framework.config import ConfigError

OUTBOX, STATE, PLOT, LOCK = "outbox.jsonl", "run.json", "loss_curve.png", "courier.lock"


@dataclass
class RunState:
    """run.json: where this run's records go, and how many bytes of the outbox the server has."""
    uri: str
    experiment: str
    run_name: str
    artifact_location: Optional[str]  # for an experiment we create; None: the server decides
    run_id: Optional[str] = None
    sent: int = 0

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.__dict__, indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> "RunState":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"{path}: not a readable tracking state ({e})") from None


class Outbox:
    """The run's records on local disk, one JSON line each, in order. One writer (the trainer)
    appends, a line at a time and flushed; the courier reads what is new (``poll``) and keeps
    what the server has not acknowledged (past ``state.sent``) as pending."""

    def __init__(self, directory: Path, state: RunState, write: bool = False):
        self.dir, self.state = directory, state
        self.path = directory / OUTBOX
        self.pending: List[Tuple[int, dict]] = []  # (end offset in the file, record)
        self.high: Dict[str, int] = {}  # per metrics stream: the highest step recorded
        self.steps: List[dict] = []  # the step records (the loss curve)
        self.size = 0  # bytes read
        self._file = None
        if write and self.path.exists():  # a line a crash cut short is dropped
            data = self.path.read_bytes()
            whole = data.rfind(b"\n") + 1
            if whole < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(whole)
        if write:  # reading the run's records, the writer keeps only the highest steps
            self._file = open(self.path, "ab")
        self.poll()

    def poll(self) -> int:
        """Read the lines written since the last poll (complete ones only); how many."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.size)
            data = f.read()
        whole = data.rfind(b"\n") + 1
        count = 0
        for line in data[:whole].splitlines(keepends=True):
            self.size += len(line)
            record = json.loads(line)
            self._note_high(record)
            if self._file is None:  # the courier's: the writer needs only the highest steps
                if record["kind"] == "metrics" and record["stream"] == "step":
                    self.steps.append(record)
                if self.size > self.state.sent:
                    self.pending.append((self.size, record))
            count += 1
        return count

    def _note_high(self, record: dict) -> None:
        if record["kind"] == "metrics":
            self.high[record["stream"]] = max(self.high.get(record["stream"], -1),
                                              record["step"])

    def has(self, record: dict) -> bool:
        """A step record this run logged already (a resumed job runs it again)."""
        return record["kind"] == "metrics" and record["step"] <= self.high.get(record["stream"], -1)

    def append(self, record: dict) -> None:
        """The writer's: one line, flushed, so the courier sees it at once."""
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()
        self._note_high(record)

    def mark_sent(self, count: int) -> None:
        self.state.sent = self.pending[count - 1][0]
        del self.pending[:count]
        self.state.save(self.dir / STATE)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def hold_lock(directory: Path, timeout: float, log: Callable[[str], None]):
    """One sender per tracking directory: the trainer takes the lock and hands it to its
    courier, so the next job (or `llada tracking sync`) waits for a courier still sending."""
    lock = open(directory / LOCK, "a")
    deadline, told = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise ConfigError(f"{directory}: another process is still sending this run's "
                                  f"records (it holds {LOCK}); wait for it or stop it") from None
            if not told:
                log(f"llada: waiting for the previous job's tracking courier to finish sending "
                    f"({directory / LOCK})")
                told = True
            time.sleep(0.2)


def set_aside(directory: Path, old: RunState, log: Callable[[str], None]) -> None:
    """Records of an earlier MLflow run the server has not got: kept, never sent to this one."""
    outbox = directory / OUTBOX
    if outbox.exists() and outbox.stat().st_size > old.sent:
        aside = directory.parent / f"tracking-unsent-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True)
        os.replace(outbox, aside / OUTBOX)
        old.save(aside / STATE)
        log(f"llada: warning: records of the earlier MLflow run {old.run_id} were never sent; "
            f"they are kept in {aside} (`llada tracking sync {aside}` sends them)")
    else:
        outbox.unlink(missing_ok=True)
