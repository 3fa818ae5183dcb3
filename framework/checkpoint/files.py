"""What a checkpoint directory holds, by name: the one definition that saving, checking, resuming,
resharding and exporting read.

Layout under ``<run.dir>/checkpoints``::

    step_00000500/                 one complete checkpoint: the state after 500 optimizer steps
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's shards
        data/dp_rank_00000.json    each data-parallel rank's loader state (exact data resume)
        rng/rank_00000.pt          each rank's Python, NumPy, torch and CUDA generator states
        tokenizer.model            the tokenizer the data was cut with (export is self-contained):
                                   tokenizer.hf.json for a Hugging Face one
                                   (data_pipeline/tokenizer.py)
        meta.json                  written last: step, consumed samples/tokens, resolved config,
                                   layout, tokenizer hashes, and every file above with its size and
                                   content checksum
    step_00000600.tmp/             a save in progress (or one that died): never read
    step_00000700.abandoned/       after a resume to an earlier step: kept, never chosen
    latest                         the newest complete tag (DeepSpeed's pointer format)
    rollback.json                  a rollback decided but not yet carried out by metrics.jsonl and
                                   MLflow: {"to": step}; a start that fails before them decides it
                                   again from this, not from the (by then abandoned) checkpoints
    rollbacks.json                 the run's automatic rollbacks (train.on_divergence=rollback),
                                   oldest first, never deleted: [{"at_step", "to", "lr_factor",
                                   "rollbacks", "reason", "time"}]; a resume from step ``to``
                                   continues at that rate until a newer checkpoint records it

meta.json also records each file's content checksum (``checksums``: the algorithm and file ->
hex digest, computed by the rank that wrote the file) and its own (``meta_checksum``): see
framework/checkpoint/integrity.py.

DeepSpeed's shards (engine._get_ckpt_name / _get_zero_ckpt_name), per model-parallel rank
m = pp_rank x tp + tp_rank (DeepSpeed's pipeline grid and megatron-core's model-parallel group
agree on it) and data-parallel rank d:

    mp_rank_{m:02d}_model_states.pt    once per m: the module's weights (None under pipeline
                                       parallelism, whose stages write layer_* files instead), the
                                       names and shapes of the optimizer's flat groups
                                       (``param_shapes``) and the DeepSpeed config
    [bf16_]zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt
                                       ZeRO-1/2: rank d's slice of each flat group (fp32 master
                                       weights and the Adam state of that slice)
    zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt
                                       ZeRO-3 only: rank d's partition of the weights
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from data_pipeline.loader import saved_ranks

FORMAT = 1  # of meta.json
META = "meta.json"
LATEST = "latest"
ROLLBACK = "rollback.json"
ROLLBACKS = "rollbacks.json"
TOKENIZER = "tokenizer.model"  # a SentencePiece tokenizer's; a Hugging Face one's: tokenizer.hf.json
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> Optional[int]:
    """The step of a ``step_N`` directory; None for anything else (``.tmp``, ``.abandoned``)."""
    m = _TAG.match(path.name)
    return int(m.group(1)) if m else None


def rank_file(kind: str, rank: int) -> str:
    """``data/dp_rank_00001.json`` or ``rng/rank_00003.pt``: one per data-parallel rank / rank."""
    return f"data/dp_rank_{rank:05d}.json" if kind == "data" else f"rng/rank_{rank:05d}.pt"


def model_states(mp: int) -> str:
    return f"mp_rank_{mp:02d}_model_states.pt"


def optim_states(dp: int, mp: int, bf16: bool) -> str:
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


def zero3_model_states(dp: int, mp: int) -> str:
    return f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"


def deepspeed_files(layout: dict) -> List[str]:
    """The shards DeepSpeed writes for a layout (the ``layout`` of meta.json)."""
    mp, dp, zero = layout["tp"] * layout["pp"], layout["dp"], layout["zero_stage"]
    bf16 = layout["precision"] == "bf16"
    if zero == 3:
        return [name for m in range(mp) for d in range(dp)
                for name in (zero3_model_states(d, m), optim_states(d, m, bf16))]
    files = [model_states(m) for m in range(mp)]
    if zero > 0:
        files += [optim_states(d, m, bf16) for m in range(mp) for d in range(dp)]
    return files


def files_read(layout: dict, *, rank: int, dp_rank: int, mp_rank: int, world_size: int,
               dp: int) -> List[str]:
    """The files one rank reads to resume a checkpoint of ``layout`` under the same shard layout
    and no pipeline parallelism (DeepSpeed's own load: its model-parallel rank's weights, its
    data-parallel rank's optimizer slice), with its RNG state and data stream."""
    zero, bf16 = layout["zero_stage"], layout["precision"] == "bf16"
    if zero == 3:
        files = [zero3_model_states(dp_rank, mp_rank), optim_states(dp_rank, mp_rank, bf16)]
    else:
        files = [model_states(mp_rank)] + ([optim_states(dp_rank, mp_rank, bf16)] if zero else [])
    if layout["world_size"] == world_size:
        files.append(rank_file("rng", rank))
    # the saved ranks that held this rank's data streams (data_pipeline/loader.py)
    return files + [rank_file("data", r) for r in saved_ranks(dp_rank, dp, layout["dp"])]


def checkpoint_tokenizer(tag_dir: Path) -> Path:
    """The tokenizer file a checkpoint carries (SentencePiece or Hugging Face)."""
    from data_pipeline.tokenizer import find_tokenizer
    return find_tokenizer(Path(tag_dir)) or Path(tag_dir) / TOKENIZER
