"""Where a rank learns its place under srun: its rank and world from Slurm's variables, the
rendezvous host from the job's node list (as every node names it), and the one log line that
says which host runs which ranks."""

import os
from unittest import mock

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


def test_slurm_variables_make_the_rendezvous():
    # the whole environment comes back afterwards: the variables _fill_launcher_env sets would
    # send every later test's world to a 4-rank rendezvous at node2
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    with mock.patch.dict(os.environ, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4",
                                      "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[2-3]",
                                      "SLURM_JOB_ID": "20017"}):
        for key in rendezvous:
            os.environ.pop(key, None)
        _fill_launcher_env()
        assert [os.environ[k] for k in rendezvous] == ["3", "4", "1", "node2", "20017"]
    assert os.environ.get("MASTER_ADDR") != "node2"
