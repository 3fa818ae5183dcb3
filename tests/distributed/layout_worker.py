"""One process of the layout runs of test_layouts.py, started by torchrun: for each layout in
turn, build the trainer, take 3 optimizer steps, and (rank 0) save the losses and the whole
model's weights, gathered from every tensor-parallel slice, pipeline stage and ZeRO partition.
A layout named ``eval-*`` instead resumes the reference's checkpoint, evaluates the held-out set
twice, takes a step and evaluates again (rank 0 saves the results).

    python -m torch.distributed.run --nproc-per-node N -m tests.distributed.layout_worker \
        OUT_DIR MANIFEST LAYOUTS_JSON
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from framework.config import load_config
from framework.model.weights import full_state_dict
from framework.training.factory import build_trainer
from framework.training.metrics import FRACTION
from tests.conftest import DEBUG_RECIPE, quick_overrides

STEPS = 3
# the held-out evaluation of the eval-* layouts: 33 sequences over 2 data-parallel ranks (17 and
# 16) x 3 draws in micro-batches of 8 (the last of each rank padded)
EVAL = ["eval.sequences=33", "eval.t_samples=3", "eval.micro_batch_size=8"]
# small enough for seconds per layout; 4 layers for two stages, 2 kv heads for tp 2
MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.vocab_size=512"]


def layout_overrides(run_dir: Path, manifest: Path, extra: list) -> list:
    # 2 readers in every layout: 1 data-parallel rank x 2 workers here, and layouts with 2
    # data-parallel ranks say data.num_workers=1, so the same samples reach the same global
    # micro-batch under every data-parallel size
    # a moderate lr: Adam turns rounding-level differences of near-zero gradients into update
    # differences in proportion to it
    return [*quick_overrides(run_dir, manifest, STEPS), *MODEL, "data.num_workers=2",
            "optimizer.lr=1e-3", "tracking.metrics_file=false", *extra]


def cpu_sequence_parallel() -> None:
    """megatron-core's sequence-parallel collectives allocate their buffers on
    ``torch.cuda.current_device()``, so a run refuses sequence parallelism without CUDA. Here the
    buffers go to the CPU instead (gloo has the same collectives), so that the layout check
    covers our sequence-parallel wiring too: the split embedding, the gathered head and the norm
    gradients summed over tensor-parallel ranks."""
    import framework.training.factory
    torch.cuda.current_device = lambda: torch.device("cpu")
    framework.training.factory.check_sequence_parallel = lambda device: None


def reset_parallel_state(cfg) -> None:
    """Layouts run in turn in one world: megatron's groups are rebuilt when tp or pp change."""
    if ps.model_parallel_is_initialized() and (
            ps.get_tensor_model_parallel_world_size() != cfg.parallel.tp
            or ps.get_pipeline_model_parallel_world_size() != cfg.parallel.pp):
        ps.destroy_model_parallel()


def run_layout(out: Path, manifest: Path, name: str, extra: list) -> None:
    cfg = load_config(DEBUG_RECIPE, layout_overrides(out / name, manifest, extra))
    reset_parallel_state(cfg)
    start = time.perf_counter()
    trainer = build_trainer(cfg)
    built = time.perf_counter()
    if name.startswith("eval-"):
        result = {"values": [trainer.validator.evaluate() for _ in range(2)]}
        trainer.train_step()  # and after a step: the engine's training state does not leak in
        result["after_a_step"] = trainer.validator.evaluate()
    else:
        steps = [trainer.train_step() for _ in range(STEPS)]
        weights = full_state_dict(trainer.engine.module, cfg.deepspeed.zero_stage)
        for step in steps:  # the record's time split (collective); pipelines: DeepSpeed's timer
            trainer.window.add(step)
        values = trainer.window.take(steps[-1], consumed_tokens=0, skipped_steps=0,
                                     data_counters={}, loss_by_t=trainer.objective.by_t)
        split = {p: values[FRACTION.format(p)] for p in ("data", "forward_backward", "optimizer")}
        result = {"losses": [s.loss for s in steps], "weights": weights, "split": split}
    trainer.data.close()
    if dist.get_rank() == 0:
        torch.save(result, out / f"{name}.pt")
    if dist.get_rank() == 0:
        print(f"{name}: built in {built - start:.1f}s, ran in {time.perf_counter() - built:.1f}s",
              file=sys.stderr)
    del trainer
    gc.collect()
    dist.barrier()


def main(out: str, manifest: str, layouts: str) -> None:
    if not torch.cuda.is_available():
        cpu_sequence_parallel()
    for name, extra in json.loads(layouts).items():
        run_layout(Path(out), Path(manifest), name, extra)
    from framework.parallel.world import shutdown_world
    shutdown_world()


if __name__ == "__main__":
    main(*sys.argv[1:])
