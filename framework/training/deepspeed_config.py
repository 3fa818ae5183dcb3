"""DeepSpeed's JSON, generated from our config: the one source of truth for batch sizes,
precision, clipping and ZeRO. Nothing here is written by hand in a recipe."""

from __future__ import annotations

from framework.config import DeepSpeedConfig


def deepspeed_json(cfg: DeepSpeedConfig, *, micro_batch_size: int, grad_accumulation: int,
                   data_parallel_size: int, bf16: bool, grad_clip: float,
                   pipeline_partitioned: bool = True) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(
            overlap_comm=cfg.overlap_comm,
            contiguous_gradients=cfg.contiguous_gradients,
            reduce_bucket_size=cfg.reduce_bucket_size,
        )
        if cfg.zero_stage < 3:
            zero["allgather_bucket_size"] = cfg.allgather_bucket_size
        else:
            zero["stage3_prefetch_bucket_size"] = cfg.allgather_bucket_size
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": micro_batch_size * grad_accumulation * data_parallel_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # Pipeline engine only: split the activations (and gradients) a stage sends across its
        # tensor-parallel peers, which hold identical copies, and gather them on arrival. Not
        # with sequence parallelism: there each peer already holds a different part.
        "pipeline": {"pipe_partitioned": pipeline_partitioned,
                     "grad_partitioned": pipeline_partitioned},
        # The optimizer is ours (torch AdamW, fused on CUDA); ZeRO partitions its state.
        "zero_allow_untested_optimizer": True,
        # Logging is ours too (framework/training/metrics.py); keep DeepSpeed's own reports quiet.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
