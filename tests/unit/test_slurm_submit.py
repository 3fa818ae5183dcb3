"""``llada slurm submit --dry-run``: the rendered script, and the one-line refusals that come
before anything reaches the queue; the sbatch script (package data of framework.launch) passes bash -n and shellcheck."""

import os
import re
import shutil
import subprocess

import pytest

from framework.launch.cli import main
from framework.config import ConfigError
from framework.launch.slurm import time_limit_seconds
from tests.conftest import DEBUG_RECIPE, REPO

EIGHT_B = REPO / "recipes" / "llada-8b.yaml"
SCRIPTS = sorted((REPO / "framework" / "launch").glob("*.sbatch"))


def submit(capsys, *args):
    code = main(["slurm", "submit", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def directives(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.M))


def test_8b_on_16_nodes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = submit(capsys, EIGHT_B, "--nodes", "16", "--gpus-per-node", "8", "--time",
                            "48:00:00", "--account", "proj1", "--partition", "gpu")
    # without --dry-run and with the data unset, nothing is submitted
    assert code == 2 and "data.datasets[0].manifest" in err and out == ""
    code, out, err = submit(capsys, EIGHT_B, "--nodes", "16", "--gpus-per-node", "8", "--time",
                            "48:00:00", "--account", "proj1", "--partition", "gpu", "--dry-run")
    assert code == 0, err
    d = directives(out)
    assert d["nodes"] == "16" and d["ntasks-per-node"] == "8" and d["gpus-per-node"] == "8"
    assert d["time"] == "48:00:00" and d["signal"] == "B:USR1@600"
    assert d["account"] == "proj1" and d["partition"] == "gpu" and d["job-name"] == "llada-8b"
    assert d["requeue"] == "" and d["open-mode"] == "append" and d["exclusive"] == ""
    assert d["cpus-per-task"] == "4"  # data.num_workers + 2
    assert d["output"] == f"{tmp_path}/runs/llada-8b/slurm/%x-%j.out"
    assert d["chdir"] == str(tmp_path)
    assert f"set -- {EIGHT_B}\n" in out and "LLADA_EXIT_REQUEUE=3" in out
    assert f"LLADA_RUN_DIR={tmp_path}/runs/llada-8b" in out
    # the data is not set: the dry run says the job would stop at once
    assert "warning" in err and "data.datasets[0].manifest" in err
    assert not (tmp_path / "runs").exists()


def test_cpu_tasks_overrides_after_the_options_and_quoting(capsys, tmp_path):
    code, out, err = submit(capsys, DEBUG_RECIPE, "--nodes", "2", "--gpus-per-node", "0",
                            "--tasks-per-node", "2", "--time", "1-00:00", "--dry-run",
                            f"run.dir={tmp_path}/my run", "train.global_batch_size=128",
                            "--signal-minutes", "2.5", "--max-crash-retries", "5")
    assert code == 0, err
    d = directives(out)
    assert "gpus-per-node" not in d and d["ntasks-per-node"] == "2" and d["nodes"] == "2"
    assert d["signal"] == "B:USR1@150" and d["time"] == "1-00:00"
    assert f"set -- {DEBUG_RECIPE} 'run.dir={tmp_path}/my run' train.global_batch_size=128\n" in out
    assert "\nLLADA_MAX_CRASH_RETRIES=5\n" in out
    # sbatch would cut an unquoted value at the blank
    assert d["output"] == f'"{tmp_path}/my run/slurm/%x-%j.out"'
    assert err == ""


def test_node_range_leaves_the_task_count_to_srun(capsys):
    # 1,280 sequences of 2 per GPU divide over 4 nodes x 8 GPUs and over 5
    code, out, err = submit(capsys, EIGHT_B, "--nodes", "4-5", "--gpus-per-node", "8",
                            "--time", "48:00:00", "--dry-run")
    assert code == 0, err
    d = directives(out)
    assert d["nodes"] == "4-5" and d["gpus-per-node"] == "8" and d["exclusive"] == ""
    assert "ntasks-per-node" not in d  # a requeued job would keep its first start's count
    assert "\nLLADA_TASKS_PER_NODE=8\n" in out


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "0", "--gpus-per-node", "8", "--time", "1:00:00"], "--nodes: must be >= 1"),
    (["--nodes", "two", "--gpus-per-node", "8", "--time", "1:00:00"],
     "--nodes: 'two' is not a node count N or range MIN-MAX"),
    (["--nodes", "4-2", "--gpus-per-node", "8", "--time", "1:00:00"],
     "--nodes: 4-2: the maximum is below the minimum"),
    (["--nodes", "15-16", "--gpus-per-node", "8", "--time", "1:00:00"],  # 1,280 over 120 GPUs
     "is not a multiple of train.micro_batch_size x data-parallel size = 2 x 120 (--nodes "
     "15-16: on 15 node(s) x 8 tasks; every count in the range must work)"),
    (["--nodes", "1-2", "--gpus-per-node", "8", "--time", "1:00:00", "parallel.world_size=8"],
     "parallel.world_size: 8 fixes the world, but --nodes 1-2 is a range; unset it"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "soon"], "--time: 'soon'"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "5:00"], "--signal-minutes: 10"),
    (["--nodes", "1", "--gpus-per-node", "0", "--time", "1:00:00"], "--tasks-per-node: needed"),
    (["--nodes", "1", "--gpus-per-node", "8", "--tasks-per-node", "4", "--time", "1:00:00"],
     "--tasks-per-node: one task per GPU"),
    (["--nodes", "3", "--gpus-per-node", "8", "--time", "1:00:00"],
     "train.global_batch_size: 1280 is not a multiple"),  # 24 GPUs
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00", "parallel.tp=3"],
     "parallel.tp: 3 does not divide"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00", "parallel.world_size=16"],
     "parallel.world_size: 16, but the job has 1 nodes x 8 tasks = 8"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00", "run.device=cpu"],
     "run.device: cpu, but the job asks for GPUs"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00", "preemption.signals=[TERM]"],
     "preemption.signals: ['TERM'] lacks USR1"),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00", "model.hiden_size=1"],
     "model.hiden_size"),
])
def test_refusals_name_the_flag_or_key(capsys, args, needle):
    code, out, err = submit(capsys, EIGHT_B, *args, "--dry-run")
    assert code == 2 and out == "", err
    lines = [line for line in err.splitlines() if line.startswith("llada: error:")]
    assert len(lines) == 1 and needle in lines[0], err


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["slurm", "submit", str(EIGHT_B), "--nodes", "1", "--gpus-per-node", "8",
              "--time", "1:00:00", "--gpu-per-node", "8"])
    assert e.value.code == 2 and "--gpu-per-node" in capsys.readouterr().err


def test_slurm_time_formats():
    assert time_limit_seconds("90") == 90 * 60
    assert time_limit_seconds("10:30") == 10 * 60 + 30
    assert time_limit_seconds("48:00:00") == 48 * 3600
    assert time_limit_seconds("2-06") == 2 * 86400 + 6 * 3600
    assert time_limit_seconds("2-06:30") == 2 * 86400 + 6 * 3600 + 30 * 60
    assert time_limit_seconds("1-00:00:01") == 86401
    for bad in ("0", "1:2:3:4", "-5", "", "UNLIMITED"):
        with pytest.raises(ConfigError, match="--time"):
            time_limit_seconds(bad)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        if os.environ.get("LLADA_REQUIRE_SLURM"):
            pytest.fail("shellcheck is missing (install.sh --with-slurm installs it)")
        pytest.skip("shellcheck not installed (install.sh --with-slurm installs it)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
