"""The README's main job, end to end: the debug recipe on CPU from the embedded default corpus,
tracked in a real MLflow server and read back from it."""

import getpass
import json
import re
import socket

import pytest
import yaml

from framework.tracking.tracker import flatten
from framework.training.objective import t_bucket_names
from tests.conftest import DEBUG_RECIPE, SFT_RECIPE, run_cli, tracking_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory, mlflow_server):
    """The main job (40 of its steps): its run directory and the finished process."""
    tmp_path = tmp_path_factory.mktemp("debug-recipe")
    # the recipe's dataset, prepared on first run from the embedded corpus (here under tmp_path)
    data = tmp_path / "data" / "manifest.json"
    # 40 of the recipe's 200 steps (CI time): the loss has fallen by over 20% by then (7.94 ->
    # 5.96 at step 25, 5.72 at 200)
    # the held-out bound at the start and the end (the recipe's 256 sequences: here 128)
    held = data.parent / "holdout" / "manifest.json"
    proc = run_cli(["train", str(DEBUG_RECIPE), f"run.dir={tmp_path}", "train.steps=40",
                    f"data.datasets=[{{manifest: {data}, prepare_inputs: [stdlib], "
                    f"holdout_fraction: 0.01}}]",
                    f"data.validation=[{{name: stdlib, manifest: {held}}}]", "eval.sequences=128",
                    *tracking_overrides(mlflow_server, "debug-recipe")],
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path, proc


def test_debug_recipe_trains_and_the_loss_falls(debug_run, mlflow_server):
    tmp_path, proc = debug_run
    data = tmp_path / "data" / "manifest.json"
    held = data.parent / "holdout" / "manifest.json"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["skipped_steps"] == 0
    assert summary["last_loss"] <= 0.8 * summary["first_loss"], summary
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    # shards, manifest and tokenizer were prepared on first run; the config is saved
    manifest = json.loads(data.read_text())
    assert manifest["samples"] > 50_000 and len(manifest["shards"]) > 40
    assert (data.parent / "tokenizer.model").is_file()
    assert "llada prepare:" in proc.stdout
    assert summary["data_skipped"] == {"bad_samples": 0, "corrupt_shards": 0, "missing_shards": 0}
    assert (tmp_path / "config.yaml").is_file()
    # the recipe saves its final checkpoint: what a new user trained can be used
    assert (tmp_path / "checkpoints" / "step_00000040" / "meta.json").is_file()
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3  # the start's evaluation, step 25 and the last
    # the log line's window, time split and ETA (the operator reads the job log, no bar)
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("step     40/40 | loss")]
    assert re.search(r"\(steps 26-40\) .* \| data wait \d+% fwd\+bwd \d+% optimizer \d+% .*"
                     r"\| eta 0s \|", line), line
    # the held-out split was prepared with the data; its bound falls, in bits per byte too
    assert json.loads(held.read_text())["samples"] >= 128
    val = summary["validation"]["stdlib"]
    start, end = json.loads(metrics[0]), json.loads(metrics[-1])
    assert start["step"] == 0 and val["last"]["step"] == 40
    assert val["last"]["loss"] == end["val/stdlib/loss"] < 0.9 * start["val/stdlib/loss"]
    assert end["val/stdlib/bpb"] < start["val/stdlib/bpb"]
    assert "val  step     40 | stdlib loss" in proc.stdout
    check_first_screen(proc)
    check_mlflow_run(mlflow_server.client(), tmp_path, metrics)


def test_sft_recipe_fine_tunes_the_main_jobs_model_and_answers(debug_run, tmp_path):
    """The SFT debug recipe from the main job's checkpoint: its SFT set made from the embedded
    corpus on first run with the main job's tokenizer, the held-out response bound falls, and
    llada generate --chat answers from the result (12 of its 100 steps, fewer held-out pairs:
    CI time)."""
    main_dir, _ = debug_run
    data = tmp_path / "sft-data" / "manifest.json"
    held = data.parent / "holdout" / "manifest.json"
    proc = run_cli(["train", str(SFT_RECIPE), f"run.dir={tmp_path / 'run'}",
                    f"init.from={main_dir}", "train.steps=12", "eval.interval=0",
                    "eval.sequences=32", "eval.t_samples=4", "tracking.enabled=false",
                    f"data.tokenizer.model={main_dir / 'data' / 'tokenizer.model'}",
                    f"data.datasets=[{{manifest: {data}, prepare_inputs: [stdlib-sft], "
                    f"holdout_fraction: 0.05}}]",
                    f"data.validation=[{{name: sft, manifest: {held}}}]"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"weights from {main_dir / 'checkpoints' / 'step_00000040'} (trained with " \
           "objective pretrain)" in proc.stdout
    manifest = json.loads(data.read_text())
    assert manifest["kind"] == "sft" and manifest["samples"] > 1000
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    start, end = records[0], records[-1]
    assert (start["step"], end["step"]) == (0, 12)
    assert end["val/sft/loss"] < 0.9 * start["val/sft/loss"], (start, end)
    out = run_cli(["generate", str(tmp_path / "run"), "--chat", "--prompt",
                   'def is_empty(self):\n    """Return True if the queue is empty."""',
                   "--gen-length", "16", "--steps", "16"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("=== 1: def is_empty") and "16 steps" in out.stdout


def check_first_screen(proc):
    """Ours only: no library's warning or INFO line, the corpus' skips as one line."""
    out = proc.stdout + proc.stderr
    for noise in ("UserWarning", "warnings.warn", "[WARNING]", "[INFO]", " INFO ", "Warning:"):
        assert noise not in out, out[:3000]
    assert all(line.startswith(("llada", "step ", "val ")) for line in out.splitlines()), \
        out[:3000]
    skips = [line for line in out.splitlines() if "skipped" in line and "step " not in line]
    assert len(skips) == 2, skips  # the warning naming the list, and prepare's summary line
    (warning,) = [line for line in skips if line.startswith("llada: warning:")]
    assert "each named in" in warning and "skipped-inputs.txt" in warning


STEP_METRICS = {"train/loss", "train/loss_step", "train/lr", "train/grad_norm",
                "train/grad_norm_max", "train/window_steps", "train/window_skipped",
                "train/tokens_per_s", "train/consumed_tokens", "train/skipped_steps",
                "train/seq_len", "time/step_seconds", "time/step_seconds_median",
                "time/step_seconds_p90", "time/eta_seconds",
                *(f"time/{part}_fraction" for part in ("data", "forward_backward", "optimizer",
                                                       "checkpoint", "validation")),
                "memory/rss_gib", "memory/peak_rss_gib", "data/bad_samples",
                "data/corrupt_shards", "data/missing_shards",
                *(f"train/loss_by_t/{b}" for b in t_bucket_names())}
VAL_METRICS = {"val/stdlib/loss", "val/stdlib/loss_mc_stderr", "val/stdlib/loss_seq_stderr",
               "val/stdlib/bpb", "val/stdlib/bpb_without_first", "time/val_seconds"}


def check_mlflow_run(client, run_dir, metrics_lines):
    """Params, tags, every metric at every logged step and the artifacts (checkpoint events:
    test_mlflow.py, test_resume_exact.py)."""
    experiment = client.get_experiment_by_name("debug-recipe")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert run.data.params["train.steps"] == "40"
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"]), tags
    assert tags["recipe"].startswith(f"{DEBUG_RECIPE} run.dir={run_dir}")
    assert (tags["layout"], tags["world_size"]) == ("TP1xPP1xDP1", "1")
    # the run page's Source and Created by
    assert tags["mlflow.source.name"] == f"llada train {tags['recipe']}"
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.user"] == run.info.user_id == getpass.getuser()
    assert tags["host"] == socket.gethostname()
    assert json.loads((run_dir / "tracking" / "run.json").read_text())["run_id"] == run_id

    records = [json.loads(line) for line in metrics_lines]
    steps = [r["step"] for r in records]
    assert steps == [0, 25, 40]
    # MFU needs the accelerator's peak: none on CPU, so none is made up; no GPU memory either
    by_ratio = {k for k in run.data.metrics if k.startswith("val/stdlib/loss_by_ratio/")}
    assert len(by_ratio) == 10
    system = {k for k in run.data.metrics if k.startswith("system/")}  # MLflow's system metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert set(run.data.metrics) == STEP_METRICS | VAL_METRICS | by_ratio | system | {
        "checkpoint/save_seconds"}
    # the UI's chart sections are the names' first parts: one per concern, no catch-all
    assert {k.split("/")[0] for k in run.data.metrics if "/" in k} == {
        "train", "val", "time", "memory", "data", "checkpoint", "system"}
    assert all("/" in k for k in run.data.metrics)
    for name in STEP_METRICS | VAL_METRICS:  # every metric of every record, same step and value
        history = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        assert history == {r["step"]: r[name] for r in records if name in r}, name
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/stdlib/bpb")) == [0, 40]
    tokens = [m.value for m in sorted(client.get_metric_history(run_id, "train/consumed_tokens"),
                                      key=lambda m: m.step)]
    assert tokens == sorted(tokens) and tokens[-1] > 40 * 32 * 64

    listed = {a.path for d in ("config", "tokenizer", "plots")
              for a in client.list_artifacts(run_id, d)}
    assert listed == {"config/config.yaml", "tokenizer/tokenizer.model", "plots/loss_curve.png"}
    local = client.download_artifacts(run_id, "plots/loss_curve.png", str(run_dir / "downloaded"))
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    config = client.download_artifacts(run_id, "config/config.yaml", str(run_dir / "downloaded"))
    assert yaml.safe_load(open(config)) == yaml.safe_load((run_dir / "config.yaml").read_text())
