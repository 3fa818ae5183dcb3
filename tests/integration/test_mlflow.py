"""MLflow tracking against a real server that fails mid-run: training goes on, one warning, and
at the end every step's metrics are on the server (the debug recipe's full read-back:
test_debug_recipe.py; kill -9 and resume into the same run: test_resume_exact.py)."""

import json
import threading

import pytest

from framework.config import load_config
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE, quick_overrides, tracking_overrides

pytestmark = pytest.mark.slow

STEPS = 16
ALWAYS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
          "train/consumed_tokens", "train/skipped_steps", "train/seq_len", "data/bad_samples"}


def test_server_stopped_mid_run_and_restarted(world, tmp_path, small_dataset, mlflow_server,
                                              capfd):
    cfg = load_config(DEBUG_RECIPE, quick_overrides(tmp_path, small_dataset, steps=STEPS) +
                      tracking_overrides(mlflow_server, "server-restart") +
                      ["tracking.log_interval=1", "tracking.send_interval_s=0.05",
                       "tracking.retry_interval_s=0.5", "checkpoint.interval=8"])
    trainer = build_trainer(cfg)
    step = trainer.train_step
    restart = threading.Thread(target=mlflow_server.start)

    def train_step():
        if trainer.step == 3:
            mlflow_server.stop()
        elif trainer.step == 6:  # back while training goes on
            restart.start()
        elif trainer.step == 12:  # up before the end, so records go before close() too
            restart.join()
        return step()

    trainer.train_step = train_step
    try:
        summary = trainer.fit()
    finally:
        if not mlflow_server.healthy():
            restart.join() if restart.is_alive() else mlflow_server.start()
    out = capfd.readouterr().out
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert out.count("llada: warning: MLflow at") == 1, out  # one warning, not a flood
    assert "answers again" in out

    run_id = json.loads((tmp_path / "tracking" / "run.json").read_text())["run_id"]
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for name in ALWAYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == list(range(1, STEPS + 1)), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert loss == {r["step"]: r["train/loss"] for r in records}
    saves = client.get_metric_history(run_id, "checkpoint/save_seconds")
    assert sorted(m.step for m in saves) == [8, 16]
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss_curve.png"}
