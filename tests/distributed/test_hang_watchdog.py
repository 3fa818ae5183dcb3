"""Two gloo ranks started as srun starts them: one hangs (an injected fault), the other
waits for it in a collective; both watchdogs print every thread's stack under their rank and
exit 4 (a crash, which the sbatch script requeues) within the timeout and a small slack. Before
the hang, the other rank is a straggler: the log line and metrics.jsonl name it."""

import json
import socket
import subprocess
import time

import pytest

from framework.training.faults import ENV as FAULTS
from framework.training.watchdog import EXIT_HUNG
from tests.conftest import DEBUG_RECIPE, REPO, cli_command, quick_overrides

pytestmark = pytest.mark.slow
TIMEOUT_S = 6  # train.hang_timeout_minutes=0.1
SLACK_S = 15  # the watchdog's poll, its stack dump, a loaded 2-core machine


def test_a_hung_rank_ends_the_job_with_both_stacks_and_the_crash_status(tmp_path, small_dataset):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", str(DEBUG_RECIPE), *quick_overrides(tmp_path, small_dataset, 20),
            "tracking.log_interval=1", f"train.hang_timeout_minutes={TIMEOUT_S / 60}",
            "data.num_workers=0"]
    cmd, env = cli_command(args, module="tests.distributed.hang_worker")
    env = {**env, "OMP_NUM_THREADS": "1", FAULTS: "hang=1:6", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w+")
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        logs.append(log)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    ended = time.time()
    out = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [EXIT_HUNG, EXIT_HUNG], out[0][-3000:] + out[1][-3000:]
    hung_at = float(out[1].split("rank 1 hangs in step 6 at ")[1].split()[0])
    assert ended - hung_at < TIMEOUT_S + SLACK_S
    for rank, text in enumerate(out):
        assert f"llada: watchdog: rank {rank}: no progress for" in text
        assert f"exiting {EXIT_HUNG}" in text
        assert f"[rank {rank}] thread MainThread:" in text
    assert "in phase data of step 6" in out[1] and "hang_forever" in out[1]
    assert "of step 6" in out[0]  # waiting for rank 1 in the step's collectives
    # the straggler, step by step before the hang: rank 1, its own part of each step the longer
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["time/slowest_rank"] == 1 and r["time/straggler_ratio"] > 1.3
               for r in records[1:]), records
    assert "| slowest rank 1 " in out[0]
