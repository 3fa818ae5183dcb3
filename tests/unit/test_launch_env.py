"""Where a rank learns its place under srun: its rank and world from Slurm's variables, the
rendezvous host from the job's node list (as every node names it), and the one log line that
says which host runs which ranks."""

import os

import pytest

from framework.parallel.world import _fill_launcher_env, first_host, ranks_by_host


@pytest.mark.parametrize("nodelist, host", [
    ("node1", "node1"), ("node[1-2]", "node1"), ("node[1,3]", "node1"),
    ("gpu[07-09,12],cpu01", "gpu07"), ("a-b[010-011]", "a-b010"), ("x1,x2", "x1"),
])
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_ranks_by_host_in_runs_and_in_order_of_first_rank():
    assert ranks_by_host(["node1", "node1", "node2", "node2"]) == "node1 0-1, node2 2-3"
    assert ranks_by_host(["b", "a", "b"]) == "b 0,2, a 1"
    assert ranks_by_host(["solo"]) == "solo 0"


def test_slurm_variables_make_the_rendezvous(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[2-3]")
    monkeypatch.setenv("SLURM_JOB_ID", "20017")
    _fill_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == \
        ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "node2" and os.environ["MASTER_PORT"] == "20017"
