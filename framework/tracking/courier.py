"""The courier: the process that sends a tracking directory's outbox to MLflow (``python -m
framework.tracking DIR``, started by the Tracker), and ``llada tracking sync``, which sends what a
courier could not. Only this side talks to MLflow and draws the loss curve, so neither takes the
trainer's GIL."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from framework.config import ConfigError
from framework.tracking.outbox import PLOT, STATE, Outbox, RunState, hold_lock
from framework.tracking.plot import draw_curve
from framework.tracking.system import SystemSampler, next_step, optional_sampler

# the curve of a plot record written before plot records named their metrics (and metrics had
# no group prefix): an outbox kept from then still sends
LEGACY_PLOT = {"x": "consumed_tokens", "y": "loss", "by": "loss_by_t/"}
# MLflow's log_batch limits (per request)
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
# our own retry schedule replaces MLflow's (7 retries with backoff: minutes per failed request)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def mlflow_client(uri: str):
    """The client of a tracking URI; an unknown scheme is a ConfigError (no request is made)."""
    for key, value in HTTP_DEFAULTS.items():  # the user's environment wins
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient
    try:
        return MlflowClient(uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds
        raise ConfigError(f"tracking.uri: {uri!r}: {_one_line(e)}") from None


class Sender:
    """Sends an outbox's pending records to MLflow, creating or continuing the run, and the
    system metrics ``system`` has sampled (None: none)."""

    def __init__(self, box: Outbox, log: Callable[[str], None],
                 system: Optional[SystemSampler] = None):
        self.box, self.log, self.system = box, log, system
        self.client = mlflow_client(box.state.uri)
        self.server_params: Optional[Dict[str, str]] = None  # known once the run is reached
        self.system_step = 0  # MLflow's step of the first system sample: the run's next

    def waiting(self) -> bool:
        return bool(self.box.pending or (self.system and self.system.pending(1)))

    def send(self) -> int:
        """Everything pending, oldest first; how many records went. Raises when the server
        fails; what went before stays sent."""
        self._ensure_run()
        sent = 0
        while self.box.pending:
            count = self._send_some([r for _, r in self.box.pending[:MAX_METRICS]])
            self.box.mark_sent(count)
            sent += count
        self._send_system()
        return sent

    def _send_system(self) -> None:
        from mlflow.entities import Metric
        while self.system is not None:
            samples = self.system.pending(MAX_METRICS)
            if not samples:
                return
            self.client.log_batch(self.box.state.run_id, synchronous=True, metrics=[
                Metric(k, v, ms, self.system_step + n) for ms, n, m in samples
                for k, v in m.items()])
            self.system.done(samples[-1][1])

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
                # MLflow's own monitor reads the run's last steps from here as well
                self.system_step = next_step(getattr(run.data, "_metric_objs", []))
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
            # created with the run's tags: MLflow takes its user (Created by) from them then only
            tags = {k: v for _, r in self.box.pending if r["kind"] == "tags"
                    for k, v in r["tags"].items()}
            state.run_id = client.create_run(exp_id, run_name=state.run_name,
                                             tags=tags).info.run_id
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
            if draw_curve(self.box.steps, path, {**LEGACY_PLOT, **first}):
                self.client.log_artifact(run_id, str(path), artifact_path="plots")
            return 1
        if kind == "status":
            if first["status"] in ("FINISHED", "FAILED", "KILLED"):
                self.client.set_terminated(run_id, first["status"])
            else:
                self.client.update_run(run_id, status=first["status"])
            return 1
        raise ValueError(f"{self.box.path}: unknown record kind {kind!r}")


class Courier:
    """The sending side: polls the outbox, sends in batches, one warning per outage."""

    def __init__(self, directory: Path, send_interval_s: float, retry_interval_s: float,
                 log: Callable[[str], None], system_interval_s: float = 0.0):
        """``system_interval_s``: MLflow's system metrics every this many seconds (0: none)."""
        self.box = Outbox(directory, RunState.load(directory / STATE))
        self.sender = Sender(self.box, log, optional_sampler(system_interval_s, log))
        self.send_interval_s, self.retry_interval_s, self.log = (send_interval_s,
                                                                 retry_interval_s, log)
        self.online: Optional[bool] = None  # None: not tried yet
        self.next_send = 0.0

    def run(self, closing: threading.Event) -> None:
        """Until ``closing`` is set (the trainer's end), then a last try with everything."""
        while True:
            done = closing.is_set()
            if done and self.sender.system is not None:
                self.sender.system.close()
            self.box.poll()
            if self.sender.waiting() and (done or time.monotonic() >= self.next_send):
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


def sync(directory: Path, log: Callable[[str], None] = print) -> int:
    """``llada tracking sync``: send what a tracking directory kept. How many records went."""
    directory = Path(directory)
    if not (directory / STATE).is_file() and (directory / "tracking" / STATE).is_file():
        directory = directory / "tracking"  # a run directory names its tracking directory
    if not (directory / STATE).is_file():
        raise ConfigError(f"{directory}: no tracking state ({STATE}) here or in its tracking/")
    lock = hold_lock(directory, 0.0, log)
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
    parser.add_argument("--system-metrics-interval", type=float, default=0.0)
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
    Courier(args.directory, args.send_interval, args.retry_interval, log,
            args.system_metrics_interval).run(closing)


if __name__ == "__main__":
    main()
