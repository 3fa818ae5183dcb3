"""Experiment tracking in MLflow: one MLflow run per training run, however often it is preempted.

Only the rank that holds the loss (last pipeline stage, tensor rank 0, data rank 0) tracks. Its
``Tracker`` appends every record (params, tags, step metrics, checkpoint events, artifacts, the
loss curve, the status) as one line to a local outbox, <run.dir>/tracking/outbox.jsonl: a small
write, all the training step pays. A courier, a process of its own (``python -m
framework.tracking``), reads what is new and sends what the server has not acknowledged, in order
and batched (``log_batch``), and draws the loss curve; <run.dir>/tracking/run.json holds the run id
and how far the outbox is sent. In a process of its own, neither the MLflow client's work (an
SQLite store runs inside it) nor matplotlib's takes the trainer's GIL. A server that is down or
fails mid-run costs one warning: training goes on, and everything is sent when it is back, at the
end, or later by ``llada tracking sync RUN_DIR``. The courier ends when the trainer closes its
stdin, on purpose or by dying: a killed job's records are sent all the same.

Resume: the run id travels in checkpoint metadata (and run.json); the next job continues that run.
The outbox holds every step the run has logged, so steps that a killed job logged after its last
checkpoint, and that the resumed job runs again, are not logged twice: the first record stays (on
the same layout a resume replays those steps exactly). A resume to before a checkpoint the run
completed (a rollback) takes another path: a new run, a child of the old one. One gap is left: a
courier killed between the server's answer to a batch and the line in run.json that records it
sends that batch again.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from data_pipeline.tokenizer import atomic_write
from framework.config import ConfigError, TrackingConfig

OUTBOX, STATE, PLOT, LOCK = "outbox.jsonl", "run.json", "loss_curve.png", "courier.lock"
# MLflow's log_batch limits (per request)
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_PARAM_VALUE = 1000, 100, 100, 6000
# our own retry schedule replaces MLflow's (7 retries with backoff: minutes per failed request)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def flatten(tree: dict, prefix: str = "") -> Dict[str, str]:
    """{"model": {"hidden_size": 128}} -> {"model.hidden_size": "128"}; lists as JSON."""
    out: Dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:MAX_PARAM_VALUE]
    return out


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


class Sender:
    """Sends an outbox's pending records to MLflow, creating or continuing the run."""

    def __init__(self, box: Outbox, log: Callable[[str], None]):
        self.box, self.log = box, log
        self.client = mlflow_client(box.state.uri)
        self.server_params: Optional[Dict[str, str]] = None  # known once the run is reached

    def send(self) -> int:
        """Everything pending, oldest first; how many records went. Raises when the server
        fails; what went before stays sent."""
        self._ensure_run()
        sent = 0
        while self.box.pending:
            count = self._send_some([r for _, r in self.box.pending[:MAX_METRICS]])
            self.box.mark_sent(count)
            sent += count
        return sent

    def _ensure_run(self) -> None:
        from mlflow.exceptions import MlflowException
        state, client = self.box.state, self.client
        if state.run_id is not None and self.server_params is None:
            try:
                run = client.get_run(state.run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.log(f"llada: warning: MLflow run {state.run_id} is not on {state.uri}: "
                         "this run's records go to a new run there")
                state.run_id = None
            else:
                if run.info.status != "RUNNING":
                    client.update_run(state.run_id, status="RUNNING")
                self.server_params = dict(run.data.params)
        if state.run_id is None:
            experiment = client.get_experiment_by_name(state.experiment)
            if experiment is None:
                try:
                    exp_id = client.create_experiment(state.experiment,
                                                      artifact_location=state.artifact_location)
                except MlflowException:  # another job created it meanwhile
                    exp_id = client.get_experiment_by_name(state.experiment).experiment_id
            else:
                exp_id = experiment.experiment_id
            state.run_id = client.create_run(exp_id, run_name=state.run_name).info.run_id
            state.save(self.box.dir / STATE)
            self.server_params = {}
            self.log(f"llada: MLflow run {state.run_id} ({state.run_name}) in experiment "
                     f"{state.experiment!r} at {state.uri}")

    def _send_some(self, records: List[dict]) -> int:
        """The first record, with the metric records after it that fit in one request."""
        from mlflow.entities import Metric, Param, RunTag
        run_id, first = self.box.state.run_id, records[0]
        kind = first["kind"]
        if kind == "metrics":
            metrics: List[Metric] = []
            count = 0
            for r in records:
                if r["kind"] != "metrics" or len(metrics) + len(r["metrics"]) > MAX_METRICS:
                    break
                metrics += [Metric(k, float(v), r["time"], r["step"])
                            for k, v in r["metrics"].items()]
                count += 1
            self.client.log_batch(run_id, metrics=metrics, synchronous=True)
            return count
        if kind == "params":
            new, changed = {}, []
            for k, v in first["params"].items():
                old = self.server_params.get(k)
                if old is None:
                    new[k] = v
                elif old != v:  # MLflow params are immutable: the change becomes a tag
                    changed.append(f"{k}: {old} -> {v}")
            items = list(new.items())
            for i in range(0, len(items), MAX_PARAMS):
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in
                                                      items[i:i + MAX_PARAMS]], synchronous=True)
            self.server_params.update(new)
            if changed:
                self.client.set_tag(run_id, f"changed_params_at_step_{first['step']}",
                                    "; ".join(changed)[:5000])
            return 1
        if kind == "tags":
            items = list(first["tags"].items())
            for i in range(0, len(items), MAX_TAGS):
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in
                                                    items[i:i + MAX_TAGS]], synchronous=True)
            return 1
        if kind == "artifact":
            if Path(first["path"]).is_file():
                self.client.log_artifact(run_id, first["path"], artifact_path=first["dir"])
            else:
                self.log(f"llada: warning: {first['path']}: gone before it reached MLflow; "
                         "not sent")
            return 1
        if kind == "plot":  # drawn now, from every step record of the run so far
            path = self.box.dir / PLOT
            if draw_curve(self.box.steps, path):
                self.client.log_artifact(run_id, str(path), artifact_path="plots")
            return 1
        if kind == "status":
            if first["status"] in ("FINISHED", "FAILED", "KILLED"):
                self.client.set_terminated(run_id, first["status"])
            else:
                self.client.update_run(run_id, status=first["status"])
            return 1
        raise ValueError(f"{self.box.path}: unknown record kind {kind!r}")


class Tracker:
    """The tracking rank's side: records into the outbox, a courier process to send them."""

    def __init__(self, cfg: TrackingConfig, directory: Path, *, uri: str,
                 artifact_location: Optional[str], run_name: str, run_id: Optional[str],
                 resumed_at: Optional[int], ignore_signals: Sequence[int] = (),
                 log: Callable[[str], None] = print):
        """``run_id``: from the checkpoint resumed (None: run.json's, if this run has one).
        ``resumed_at``: the step resumed from; None (a fresh start) starts a new MLflow run,
        setting aside any unsent records of the old one. ``ignore_signals``: the stop signals,
        which Slurm sends to every process of the job; the courier outlives them and ends when
        the trainer does."""
        self.cfg, self.dir, self.log = cfg, directory, log
        directory.mkdir(parents=True, exist_ok=True)
        mlflow_client(uri)  # a bad URI is refused at the start, not by the courier later
        self._lock = _hold_lock(directory, cfg.close_timeout_s, log)
        state_path = directory / STATE
        state = RunState.load(state_path) if state_path.exists() else None
        fresh = RunState(uri, cfg.experiment, run_name, artifact_location, run_id)
        if state is not None and (resumed_at is None or state.uri != uri or
                                  (run_id is not None and run_id != state.run_id)):
            _set_aside(directory, state, log)
            state = None
        self.box = Outbox(directory, state or fresh, write=True)
        parent = None
        if resumed_at is not None and self.box.high.get("checkpoint", -1) > resumed_at:
            # a rollback (to before a checkpoint the run completed): the steps after it take
            # another path, so they go to a new run, a child of the old one, which keeps its curve
            parent = self.box.state.run_id
            self.box.close()
            _set_aside(directory, self.box.state, log)
            fresh.run_id = None
            self.box = Outbox(directory, fresh, write=True)
            log(f"llada: step {resumed_at} is before the run's newest checkpoint: a new MLflow "
                f"run, a child of {parent}, tracks from there")
        self.box.state.save(state_path)
        self._run_id = self.box.state.run_id
        self.repeated = 0  # step records a resumed job made again, dropped
        self.courier = subprocess.Popen(
            [sys.executable, "-m", "framework.tracking", str(directory),
             "--send-interval", str(cfg.send_interval_s),
             "--retry-interval", str(cfg.retry_interval_s),
             "--ignore-signals", ",".join(str(int(s)) for s in ignore_signals)],
            stdin=subprocess.PIPE, pass_fds=(self._lock.fileno(),),
            start_new_session=True)  # a Ctrl-C to the terminal's group is the trainer's
        if parent is not None:
            self.tags({"mlflow.parentRunId": parent, "rolled_back_to_step": resumed_at})

    @property
    def run_id(self) -> Optional[str]:
        """Known once the courier has reached the server and made the run (run.json)."""
        if self._run_id is None:
            try:
                self._run_id = RunState.load(self.dir / STATE).run_id
            except ConfigError:  # being replaced this very moment: next time
                pass
        return self._run_id

    def params(self, params: Dict[str, str], step: int) -> None:
        self._put({"kind": "params", "params": params, "step": step})

    def tags(self, tags: Dict[str, object]) -> None:
        self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def artifact(self, path: Path, directory: str) -> None:
        self._put({"kind": "artifact", "path": str(Path(path).resolve()), "dir": directory})

    def metrics(self, step: int, values: Dict[str, float], stream: str = "step") -> None:
        self._put({"kind": "metrics", "stream": stream, "step": step,
                   "time": int(time.time() * 1000), "metrics": values})

    def checkpoint(self, step: int, path: Path, seconds: float) -> None:
        """A checkpoint event; the loss curve is drawn and sent."""
        self.metrics(step, {"checkpoint/save_seconds": seconds}, stream="checkpoint")
        self.tags({"checkpoint/latest": path})
        self._put({"kind": "plot"})

    def close(self, status: str) -> None:
        """The end of this job: the curve, the run's status; the courier sends what is left."""
        self._put({"kind": "plot"})
        self._put({"kind": "status", "status": status})
        self.box.close()
        try:
            self.courier.stdin.close()
            self.courier.wait(self.cfg.close_timeout_s)
        except subprocess.TimeoutExpired:
            self.courier.kill()
            self.courier.wait()
            self.log(f"llada: warning: MLflow at {self.box.state.uri} did not take the last "
                     f"records within tracking.close_timeout_s={self.cfg.close_timeout_s:g}; "
                     f"`llada tracking sync {self.dir}` sends them")
        self._lock.close()

    def _put(self, record: dict) -> None:
        if self.box.has(record):  # a step the killed job logged, run again
            self.repeated += 1
            return
        self.box.append(record)


class Courier:
    """The sending side: polls the outbox, sends in batches, one warning per outage."""

    def __init__(self, directory: Path, send_interval_s: float, retry_interval_s: float,
                 log: Callable[[str], None]):
        self.box = Outbox(directory, RunState.load(directory / STATE))
        self.sender = Sender(self.box, log)
        self.send_interval_s, self.retry_interval_s, self.log = (send_interval_s,
                                                                 retry_interval_s, log)
        self.online: Optional[bool] = None  # None: not tried yet
        self.next_send = 0.0

    def run(self, closing: threading.Event) -> None:
        """Until ``closing`` is set (the trainer's end), then a last try with everything."""
        while True:
            done = closing.is_set()
            self.box.poll()
            if self.box.pending and (done or time.monotonic() >= self.next_send):
                self.send(final=done)
            if done:
                return
            closing.wait(max(0.01, min(self.send_interval_s, self.next_send - time.monotonic())))

    def send(self, final: bool) -> None:
        uri = self.box.state.uri
        try:
            sent = self.sender.send()
        except Exception as e:  # noqa: BLE001 - whatever the server or network does
            self.next_send = time.monotonic() + self.retry_interval_s
            if self.online is not False:  # one warning per outage, not one per step
                self.log(f"llada: warning: MLflow at {uri} failed ({_one_line(e)}); training "
                         f"goes on, records are kept in {self.box.path} and sent when it "
                         f"answers (retry every {self.retry_interval_s:g} s)")
            if final:
                self.log(f"llada: warning: {len(self.box.pending)} tracking records are not on "
                         f"{uri}; `llada tracking sync {self.box.dir}` sends them")
            self.online = False
            return
        if self.online is False:
            self.log(f"llada: MLflow at {uri} answers again: {sent} kept records sent")
        self.online = True
        self.next_send = time.monotonic() + self.send_interval_s


def mlflow_client(uri: str):
    """The client of a tracking URI; an unknown scheme is a ConfigError (no request is made)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient
    try:
        return MlflowClient(uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds
        raise ConfigError(f"tracking.uri: {uri!r}: {_one_line(e)}") from None


def _hold_lock(directory: Path, timeout: float, log: Callable[[str], None]):
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


def _set_aside(directory: Path, old: RunState, log: Callable[[str], None]) -> None:
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


def draw_curve(steps: List[dict], path: Path) -> bool:
    """loss vs tokens and loss per mask-ratio bucket vs tokens, from step records, with
    matplotlib's Agg canvas; False when there is nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from framework.objective import t_bucket_names
    if not steps:
        return False
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    def x(r: dict) -> float:
        return r["metrics"].get("consumed_tokens", r["step"])

    left.plot([x(r) for r in steps], [r["metrics"].get("loss", math.nan) for r in steps])
    left.set(xlabel="tokens", ylabel="loss", title="loss")
    for name in t_bucket_names():
        key = f"loss_by_t/{name}"
        points = [(x(r), r["metrics"][key]) for r in steps if key in r["metrics"]]
        if points:
            right.plot(*zip(*points), label=f"t {name}")
    right.set(xlabel="tokens", ylabel="loss", title="loss by mask ratio t")
    if right.lines:
        right.legend(fontsize="small", ncols=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    tmp = path.with_name(f"tmp-{path.name}")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return True


def git_commit(source: Path = Path(__file__).resolve().parent) -> Dict[str, str]:
    """The framework's own commit (where it runs from a git checkout), and whether the
    checkout has changes; MLflow shows ``mlflow.source.git.commit`` on the run's page."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"mlflow.source.git.commit": "unknown (not a git checkout)"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower()}


def run_tags(recipe: Optional[str], world, resumed_at: Optional[int]) -> Dict[str, object]:
    """What this job ran: code, recipe, layout, where; tags are overwritten by each job."""
    tags: Dict[str, object] = {
        **git_commit(), "recipe": recipe or "(in-process config)",
        "layout": f"TP{world.tp}xPP{world.pp}xDP{world.dp}", "world_size": world.world_size,
        "host": socket.gethostname(),
        "resumed_at_step": "no (fresh start)" if resumed_at is None else resumed_at,
    }
    if "SLURM_JOB_ID" in os.environ:  # SLURM_RESTART_COUNT is set from the first requeue on
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        tags["slurm_restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return tags


def sync(directory: Path, log: Callable[[str], None] = print) -> int:
    """``llada tracking sync``: send what a tracking directory kept. How many records went."""
    directory = Path(directory)
    if not (directory / STATE).is_file() and (directory / "tracking" / STATE).is_file():
        directory = directory / "tracking"  # a run directory names its tracking directory
    if not (directory / STATE).is_file():
        raise ConfigError(f"{directory}: no tracking state ({STATE}) here or in its tracking/")
    lock = _hold_lock(directory, 0.0, log)
    try:
        box = Outbox(directory, RunState.load(directory / STATE))
        return Sender(box, log).send() if box.pending else 0
    finally:
        lock.close()


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def main(argv: Optional[List[str]] = None) -> None:
    """The courier: ``python -m framework.tracking DIR``, started by the Tracker."""
    parser = argparse.ArgumentParser(prog="python -m framework.tracking")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--send-interval", type=float, required=True)
    parser.add_argument("--retry-interval", type=float, required=True)
    parser.add_argument("--ignore-signals", default="")
    args = parser.parse_args(argv)
    for sig in filter(None, args.ignore_signals.split(",")):
        signal.signal(int(sig), signal.SIG_IGN)

    def log(msg: str) -> None:
        print(msg, flush=True)

    closing = threading.Event()

    def wait_for_the_trainer() -> None:  # EOF: it closed our stdin, or it is gone
        sys.stdin.buffer.read()
        closing.set()

    threading.Thread(target=wait_for_the_trainer, daemon=True).start()
    Courier(args.directory, args.send_interval, args.retry_interval, log).run(closing)


if __name__ == "__main__":
    main()
