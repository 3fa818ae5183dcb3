"""The tracking rank's side of MLflow tracking: a ``Tracker`` writes the run's records into the
outbox and starts the courier that sends them; ``open_tracker`` sets one up for a training run
(params, tags, artifacts), agreed by every rank."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch.distributed as dist

from data_pipeline.files import atomic_write
from framework.config import ConfigError, TrackingConfig
from framework.parallel.world import World
from framework.tracking.courier import mlflow_client
from framework.tracking.outbox import STATE, Outbox, RunState, hold_lock, set_aside

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's length


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


class Tracker:
    """The tracking rank's side: records into the outbox, a courier process to send them."""

    def __init__(self, cfg: TrackingConfig, directory: Path, *, uri: str,
                 artifact_location: Optional[str], run_name: str, run_id: Optional[str],
                 resumed_at: Optional[int], rollback: bool = False,
                 plot: Optional[Dict[str, str]] = None, ignore_signals: Sequence[int] = (),
                 log: Callable[[str], None] = print):
        """``run_id``: from the checkpoint resumed (None: run.json's, if this run has one).
        ``resumed_at``: the step resumed from; None (a fresh start) starts a new MLflow run,
        setting aside any unsent records of the old one. ``rollback``: the resume goes back to
        before a checkpoint the run completed, so the steps after it take another path: they
        go to a new run, a child of the old one, which keeps its curve. ``plot``: the curve the
        courier draws (``x``, ``y`` and the prefix ``by`` of the metrics drawn beside it).
        ``ignore_signals``: the stop signals, which Slurm sends to every process of the job;
        the courier outlives them and ends when the trainer does."""
        self.cfg, self.dir, self.log = cfg, directory, log
        self.plot_spec = plot
        directory.mkdir(parents=True, exist_ok=True)
        mlflow_client(uri)  # a bad URI is refused at the start, not by the courier later
        self._lock = hold_lock(directory, cfg.close_timeout_s, log)
        state_path = directory / STATE
        state = RunState.load(state_path) if state_path.exists() else None
        fresh = RunState(uri, cfg.experiment, run_name, artifact_location, run_id)
        if state is not None and (resumed_at is None or state.uri != uri or
                                  (run_id is not None and run_id != state.run_id)):
            set_aside(directory, state, log)
            state = None
        self.box = Outbox(directory, state or fresh, write=True)
        parent = None
        if resumed_at is not None and rollback:
            parent = self.box.state.run_id
            self.box.close()
            set_aside(directory, self.box.state, log)
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
             "--system-metrics-interval", str(cfg.system_metrics_interval_s),
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
        """Metrics at a step of a stream; a step this run has already logged in that stream is
        dropped (the first record of a step wins)."""
        self._put({"kind": "metrics", "stream": stream, "step": step,
                   "time": int(time.time() * 1000), "metrics": values})

    def plot(self) -> None:
        """The curve, drawn and sent by the courier from every step record so far."""
        if self.plot_spec is not None:
            self._put({"kind": "plot", **self.plot_spec})

    def close(self, status: str) -> None:
        """The end of this job: the curve, the run's status; the courier sends what is left."""
        self.plot()
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


def run_tags(recipe: Optional[str], world: World, resumed_at: Optional[int]) -> Dict[str, object]:
    """What this job ran: code, recipe, layout, where, who; tags are overwritten by each job.
    MLflow's UI shows ``mlflow.source.name`` as the run's Source (in full for a JOB) and
    ``mlflow.user`` as Created by (the Sender creates the run with these tags)."""
    command = f"llada train {recipe}" if recipe else "(in-process config)"
    tags: Dict[str, object] = {
        **git_commit(), "recipe": recipe or "(in-process config)",
        "mlflow.source.name": command, "mlflow.source.type": "JOB",
        "mlflow.user": _user(),
        "layout": f"TP{world.tp}xPP{world.pp}xDP{world.dp}", "world_size": world.world_size,
        "host": socket.gethostname(),
        "resumed_at_step": "no (fresh start)" if resumed_at is None else resumed_at,
    }
    if "SLURM_JOB_ID" in os.environ:  # SLURM_RESTART_COUNT is set from the first requeue on
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        tags["slurm_restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return tags


def _user() -> str:
    try:
        return os.environ.get("SLURM_JOB_USER") or getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no name
        return "unknown"


def open_tracker(cfg: TrackingConfig, world: World, run_dir: Path, *, run_name: str,
                 run_id: Optional[str], resumed_at: Optional[int], rollback: bool,
                 params: Dict[str, str], recipe: Optional[str], config_yaml: str,
                 tokenizer: Path, plot: Dict[str, str],
                 ignore_signals: Sequence[int]) -> Optional[Tracker]:
    """The MLflow run of a training run, on the rank that reports (``World.reports``): params
    (the flattened config), tags, the config and tokenizer as artifacts. None on the other ranks
    and with tracking off. A bad tracking.uri is one error on every rank (collective)."""
    tracker, error = None, None
    if cfg.enabled and world.reports:
        run_dir = run_dir.resolve()
        try:
            tracker = Tracker(
                cfg, run_dir / "tracking", uri=cfg.uri or f"sqlite:///{run_dir / 'mlflow.db'}",
                # the local store keeps its artifacts beside it, not in the working directory
                artifact_location=None if cfg.uri else (run_dir / "mlartifacts").as_uri(),
                run_name=cfg.run_name or run_name, run_id=run_id, resumed_at=resumed_at,
                rollback=rollback, plot=plot, ignore_signals=ignore_signals)
        except ConfigError as e:
            error = str(e)
        else:
            tracker.params(params, resumed_at or 0)
            tracker.tags(run_tags(recipe, world, resumed_at))
            config_copy = run_dir / "tracking" / "config.yaml"
            atomic_write(config_copy, config_yaml.encode())
            tracker.artifact(config_copy, "config")
            tracker.artifact(tokenizer, "tokenizer")
    errors: List[Optional[str]] = [None] * world.world_size
    dist.all_gather_object(errors, error)
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        if tracker is not None:
            tracker.close("FAILED")
        raise ConfigError(failed)
    return tracker


def run_id_for_rank0(tracker: Optional[Tracker], world: World) -> Optional[str]:
    """The MLflow run id, from the tracking rank to its pipeline's first stage (rank 0 writes
    meta.json); collective. None while the courier has not made the run yet: run.json names it
    then."""
    answer = [None if tracker is None else tracker.run_id]
    if world.pp > 1:
        dist.broadcast_object_list(answer, src=world.pp_last_rank, group=world.pp_group)
    return answer[0]
