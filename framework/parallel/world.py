"""Process groups: torch.distributed, megatron-core's tensor/pipeline groups, and the adapter
DeepSpeed needs to see the data-parallel group inside them.

One process without a launcher is a world of one: we fill in the rendezvous variables so the same
code path (DeepSpeed engine, megatron layers) runs for ``llada train`` and for torchrun/srun.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from framework.config import ConfigError, ParallelConfig, data_parallel_size


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: prepares data, writes config.yaml, summary.json and checkpoint metadata."""
        return self.rank == 0

    @property
    def reports(self) -> bool:
        """The rank that holds the loss and everything measured with it (the loss by mask ratio
        exists on the last pipeline stage only): it writes the step records to the console,
        metrics.jsonl and MLflow. Last pipeline stage, tensor rank 0, data rank 0."""
        return (self.pp_rank, self.tp_rank, self.dp_rank) == (self.pp - 1, 0, 0)

    # the process groups, from megatron-core's parallel state (built by ``init_world``): the one
    # place outside the model that reads it
    @property
    def dp_group(self):
        """This rank's data-parallel group: same tensor and pipeline rank, every replica."""
        return ps.get_data_parallel_group()

    @property
    def pp_group(self):
        """This rank's pipeline: same tensor and data rank, every stage."""
        return ps.get_pipeline_model_parallel_group()

    @property
    def pp_last_rank(self) -> int:
        """The global rank of this rank's pipeline's last stage (where the loss is)."""
        return ps.get_pipeline_model_parallel_last_rank()

    def log(self, msg: str) -> None:
        """A line of the run's own (settings, resumes, warnings): printed once, by rank 0."""
        if self.is_main:
            print(msg, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[07-09,12],cpu01' -> 'gpu07'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level entry
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    # each bracket group: its first range's first number, zero padding kept
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0],
                  nodelist[:end])


def _fill_launcher_env() -> None:
    """torchrun sets RANK & co.; under ``srun`` (one task per GPU) they come from Slurm's
    variables; a plain ``llada train`` is a world of one."""
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in os.environ:
            if not nodes:
                raise ConfigError("Slurm launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
            os.environ["MASTER_ADDR"] = first_host(nodes)
        # a port of the job's own, so that two jobs sharing a node do not collide
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda requested but no CUDA device is available")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op when a CPU world starts (one to two
    minutes in every fresh environment); only its inference all-reduce uses it, training never
    does. Marking the op incompatible makes DeepSpeed fall back to torch.distributed."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_world(cfg: ParallelConfig, device_choice: str) -> World:
    import deepspeed  # deferred: importing it is slow and only training needs it

    _fill_launcher_env()
    device = resolve_device(device_choice)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        _skip_shm_comm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
    world_size = dist.get_world_size()
    data_parallel_size(cfg, world_size)  # tp x pp must divide the world: one line, exit 2
    if not ps.model_parallel_is_initialized():
        # megatron's rank order (tp fastest, then dp, then pp) is DeepSpeed's pipeline topology
        # order (model, data, pipe) too: both see the same groups
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tp,
                                     pipeline_model_parallel_size=cfg.pp)
    return World(rank=dist.get_rank(), world_size=world_size,
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)), tp=cfg.tp, pp=cfg.pp,
                 dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
                 tp_rank=ps.get_tensor_model_parallel_rank(),
                 pp_rank=ps.get_pipeline_model_parallel_rank(), device=device)


def log_hosts(world: World) -> None:
    """One line, from rank 0, of which host runs which ranks and where they met: what a
    multi-node job's log is read for first when ranks do not find each other or a node fails.
    A world of one has nothing to say."""
    if world.world_size == 1:
        return
    # through the rendezvous store, which already works, not a collective: on GPUs that would
    # build the whole world's NCCL communicator here, and hang here when NCCL is what is broken
    store = dist.distributed_c10d._get_default_store()
    store.set(f"llada/host/{world.rank}", socket.gethostname())
    if not world.is_main:
        return
    keys = [f"llada/host/{r}" for r in range(world.world_size)]
    hosts = [h.decode() for h in store.multi_get(keys)]  # waits for every rank's
    world.log(f"llada: ranks by host: {ranks_by_host(hosts)} (rendezvous at "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})")


def ranks_by_host(hosts: List[str]) -> str:
    """``node1 0-1, node2 2-3``: each host's ranks (in runs), hosts in order of their first."""
    runs: Dict[str, List[List[int]]] = {}
    for rank, host in enumerate(hosts):
        spans = runs.setdefault(host, [])
        if spans and spans[-1][1] == rank - 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(f"{host} " + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
                     for host, spans in runs.items())


def check_sequence_parallel(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError("parallel.sequence_parallel: needs CUDA devices (megatron-core's "
                          "sequence-parallel communication allocates on the GPU)")


def reduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Under sequence parallelism each tensor-parallel rank sees part of the sequence, so the
    gradient of a replicated norm gain is a partial sum: add the parts as it is produced, before
    DeepSpeed accumulates or reduces it over data parallel."""
    group = ps.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            p.register_hook(all_reduce)


def shutdown_world() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """megatron-core's parallel_state under the names DeepSpeed's ``mpu`` argument expects:
    'model parallel' there means tensor x pipeline here."""

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(ps.get_model_parallel_group())

    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
