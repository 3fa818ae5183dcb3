"""Tracking against the tests' MLflow server: the loss by mask ratio, the courier through an outage (its
requests fail while a flag is set), `llada tracking sync`, resumed jobs' repeated steps, an earlier
run's unsent records set aside, a rollback's child run, bad URIs. (A real server that stops and
comes back: tests/integration/test_mlflow.py.)"""

import json
import threading
import time

import pytest
import torch

from framework.config import ConfigError, TrackingConfig
from framework.parallel.world import _free_port as free_port
from framework.tracking.courier import Courier, mlflow_client, sync
from framework.tracking.outbox import Outbox, RunState
from framework.tracking.tracker import Tracker, flatten
from framework.training.objective import LossByT, ObjectiveLoss, t_bucket_names, weighted


def test_flatten_names_nested_keys_and_writes_lists_as_json():
    assert flatten({"model": {"hidden_size": 128, "norm": None},
                    "data": {"datasets": [{"manifest": "a", "weight": 1.0}]}, "run": {"dir": "x"}}) \
        == {"model.hidden_size": "128", "model.norm": "null", "run.dir": "x",
            "data.datasets": '[{"manifest": "a", "weight": 1.0}]'}


def per_sequence_losses(logits, targets, mask, p_mask):
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (ce * mask / p_mask[:, None]).sum(1) / targets.shape[1]


def test_loss_by_t_is_each_buckets_mean_sequence_loss_and_skipped_steps_do_not_count():
    torch.manual_seed(0)
    b, length, vocab = 6, 9, 11
    p_mask = torch.tensor([0.05, 0.07, 0.55, 0.999, 1.0, 0.31])
    mask = torch.rand(b, length) < p_mask[:, None]
    mask[:, 0] = True
    targets = torch.randint(vocab, (b, length))
    logits = torch.randn(b, length, vocab)
    ce = weighted(lambda x, y: torch.nn.functional.cross_entropy(x, y, reduction="none"))
    by_t = LossByT()
    loss_fn = ObjectiveLoss(ce, lambda loss: None, by_t)
    loss = loss_fn(logits[mask], (targets, mask, p_mask, torch.full((b,), float(length))))
    expected = per_sequence_losses(logits, targets, mask, p_mask)
    assert torch.allclose(loss, expected.mean(), rtol=1e-6)  # the sequences' mean is the loss
    by_t.end_step(keep=True)
    loss_fn(logits[mask] * float("nan"), (targets, mask, p_mask, torch.full((b,), float(length))))  # a skipped step
    by_t.end_step(keep=False)
    got = by_t.take(torch.device("cpu"), lambda t: None)
    names = t_bucket_names()
    assert set(got) == {names[0], names[5], names[9], names[3]}  # empty buckets left out
    assert got[names[0]] == pytest.approx(expected[:2].mean().item(), rel=1e-6)
    assert got[names[9]] == pytest.approx(expected[3:5].mean().item(), rel=1e-6)  # t = 1 too
    assert got[names[5]] == pytest.approx(expected[2].item(), rel=1e-6)
    # reduce sees the window (sums, counts); take resets it
    seen = []
    by_t.take(torch.device("cpu"), seen.append)
    assert seen[0].tolist() == [[0.0] * 10, [0.0] * 10]


def open_tracker(directory, uri, resumed_at=None, run_id=None, lines=None, rollback=False):
    """The trainer's side, with its courier process."""
    cfg = TrackingConfig(experiment="unit", send_interval_s=0.05, retry_interval_s=0.2,
                         close_timeout_s=60)
    return Tracker(cfg, directory, uri=uri, artifact_location=None, run_name="unit",
                   run_id=run_id, resumed_at=resumed_at, rollback=rollback,
                   plot={"x": "tokens", "y": "loss", "by": "loss_by_t/"},
                   log=(lines if lines is not None else []).append)


def step_record(step, loss):
    return {"kind": "metrics", "stream": "step", "step": step, "time": 0,
            "metrics": {"loss": loss}}


def start_courier(directory, lines, down):
    """A courier in this process (a thread), whose every request fails as a dead server's while
    ``down["on"]``."""
    courier = Courier(directory, send_interval_s=0.01, retry_interval_s=0.2, log=lines.append)
    client = courier.sender.client
    for name in ("log_batch", "set_terminated", "create_run", "get_run"):
        def failing(*args, _real=getattr(client, name), **kwargs):
            if down["on"]:
                raise ConnectionError("Connection refused")
            return _real(*args, **kwargs)
        setattr(client, name, failing)
    closing = threading.Event()
    thread = threading.Thread(target=courier.run, args=(closing,))
    thread.start()
    return closing, thread


def trainer_side(tmp_path, uri, run_id=None):
    """A tracking directory's outbox open for writing, as the trainer has it, with no courier."""
    directory = tmp_path / "tracking"
    directory.mkdir()
    RunState(uri, "unit", "unit", None, run_id=run_id).save(directory / "run.json")
    return directory, Outbox(directory, RunState.load(directory / "run.json"), write=True)


def history(uri, run_id, name="loss"):
    from mlflow import MlflowClient
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, name))


def test_an_outage_costs_one_warning_and_what_is_kept_is_sent_once(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    directory, box = trainer_side(tmp_path, uri)
    box.append({"kind": "params", "params": {"model.hidden_size": "128"}, "step": 0})
    for step in range(1, 4):
        box.append(step_record(step, 10.0 - step))
    lines, down = [], {"on": True}
    closing, thread = start_courier(directory, lines, down)
    time.sleep(1.0)  # a few retries fail
    down["on"] = False
    box.append(step_record(4, 6.0))
    deadline = time.monotonic() + 30
    while not any("answers again" in line for line in lines):
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
    down["on"] = True  # down again at the end: kept for `llada tracking sync`
    box.append(step_record(5, 5.0))
    box.append({"kind": "status", "status": "FINISHED"})
    box.close()
    closing.set()
    thread.join()
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 3, lines  # once per outage, then what is left at the end
    assert "training goes on" in warnings[0] and "llada tracking sync" in warnings[2]
    run_id = RunState.load(directory / "run.json").run_id
    assert history(uri, run_id) == [(s, 10.0 - s) for s in range(1, 5)]

    assert sync(tmp_path) == 2  # a run directory names its tracking/: step 5, the status
    assert history(uri, run_id) == [(s, 10.0 - s) for s in range(1, 6)]
    assert sync(directory) == 0  # nothing twice

    # the next job resumes from the checkpoint at step 3 and runs steps 4 and 5 again
    lines = []
    resumed = open_tracker(directory, uri, resumed_at=3, run_id=run_id, lines=lines)
    for step in range(4, 8):
        resumed.metrics(step, {"loss": 100.0 + step})
    resumed.close("FINISHED")
    assert resumed.repeated == 2 and resumed.run_id == run_id
    assert not [line for line in lines if "warning" in line], lines
    assert history(uri, run_id) == [(s, 10.0 - s) for s in range(1, 6)] + [(6, 106.0),
                                                                              (7, 107.0)]


def test_sync_to_a_server_that_does_not_answer_keeps_everything(tmp_path):
    state = {"uri": f"http://127.0.0.1:{free_port()}", "experiment": "x", "run_name": "x",
             "artifact_location": None, "run_id": None, "sent": 0}
    (tmp_path / "run.json").write_text(json.dumps(state))
    record = {"kind": "metrics", "stream": "step", "step": 1, "time": 0, "metrics": {"loss": 1}}
    (tmp_path / "outbox.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(Exception, match="Connection refused|connect"):
        sync(tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["sent"] == 0


def test_a_fresh_start_sets_an_earlier_runs_unsent_records_aside(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    directory, box = trainer_side(tmp_path, uri)
    box.append(step_record(1, 1.0))  # a job whose records never reached the server
    box.close()
    lines = []
    second = open_tracker(directory, uri, lines=lines)
    second.close("FINISHED")  # a fresh start (no checkpoint): a new MLflow run
    (aside,) = tmp_path.glob("tracking-unsent-*")
    assert any(str(aside) in line for line in lines), lines
    outbox = [json.loads(x) for x in (directory / "outbox.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in outbox] == ["plot", "status"]  # the new run's own only
    assert sync(aside) == 1  # the old record goes to a run of its own
    old = RunState.load(aside / "run.json").run_id
    assert old != second.run_id and history(uri, old) == [(1, 1.0)]


@pytest.mark.parametrize("uri", ["htp://127.0.0.1:5000", "mysqlx://host/db", "/not/a/uri"])
def test_an_unknown_uri_scheme_is_a_config_error(tmp_path, uri):
    with pytest.raises(ConfigError, match="tracking.uri"):
        open_tracker(tmp_path / "tracking", uri)


@pytest.mark.parametrize("key, value", [("uri", " "), ("experiment", ""),
                                        ("retry_interval_s", 0)])
def test_bad_tracking_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"tracking.{key}"):
        TrackingConfig(**{key: value})


def test_a_rollback_before_a_completed_checkpoint_tracks_in_a_child_run(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("unit")
    parent = client.create_run(experiment.experiment_id if experiment else
                               client.create_experiment("unit")).info.run_id
    directory, box = trainer_side(tmp_path, uri, run_id=parent)
    for step in range(1, 7):  # checkpoints at 3 and 6
        box.append(step_record(step, float(step)))
        if step in (3, 6):
            box.append({**step_record(step, 0.1), "stream": "checkpoint"})
    box.close()
    # back to the checkpoint at step 3: steps 4.. take another path (another lr, say)
    lines = []
    child = open_tracker(directory, uri, resumed_at=3, run_id=parent, lines=lines, rollback=True)
    child.metrics(4, {"loss": 40.0})
    child.close("FINISHED")
    assert child.repeated == 0 and child.run_id != parent
    assert any(f"a child of {parent}" in line for line in lines), lines
    tags = mlflow_client(uri).get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["rolled_back_to_step"] == "3"
    assert history(uri, child.run_id) == [(4, 40.0)]


def test_an_outbox_kept_from_an_earlier_version_still_sends(tmp_path, mlflow_server):
    """Plot records used not to name their metrics (nor metrics their group): such an outbox,
    resumed or synced after an upgrade, sends its curve instead of stalling on it."""
    directory, box = trainer_side(tmp_path, mlflow_server.uri)
    box.append(step_record(1, 3.0))
    box.append({"kind": "plot"})
    box.close()
    assert sync(directory) == 2
    run_id = RunState.load(directory / "run.json").run_id
    listed = mlflow_client(mlflow_server.uri).list_artifacts(run_id, "plots")
    assert [a.path for a in listed] == ["plots/loss_curve.png"]
