"""Pipeline parallelism with DeepSpeed's pipeline engine (why DeepSpeed's and not megatron-core's
schedules: README, "Parallelism").

The pieces of framework/model/model.py are cut into stages at ``stage_bounds``: the embedding on
the first stage, the head and the loss on the last, the Transformer layers as
``parallel.pp_layers`` says or as evenly as possible. DeepSpeed's topology orders ranks
(pipe, data, model): tensor-parallel peers are adjacent, then data-parallel replicas, then stages,
which is megatron-core's order, so both libraries see the same groups.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology


class LLaDAPipeline(PipelineModule):
    def __init__(self, specs: List[LayerSpec], bounds: Sequence[int], loss_fn: Callable, *,
                 tp: int, pp: int, dp: int):
        self._bounds = list(bounds)
        super().__init__(layers=specs, loss_fn=loss_fn,
                         topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
                         partition_method="uniform",  # replaced by our bounds below
                         activation_checkpoint_interval=0)  # ours: per layer, in the pieces

    def _partition_layers(self, method: str) -> None:
        # DeepSpeed's methods balance piece counts or parameters (the embedding and head would
        # count as layers); ours puts whole Transformer layers where the config says.
        self.parts = self._bounds
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])
