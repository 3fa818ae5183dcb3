"""The training mixture: the recipe's datasets, prepared on first run where the recipe says how,
checked against one another, and opened as a loader for one data-parallel rank."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, List

from framework.config import ConfigError, DataConfig, PrepareConfig
from data_pipeline.shards import MANIFEST, ShardSet, load_manifest


def prepare_config(cfg: DataConfig, index: int) -> PrepareConfig:
    """How ``llada train`` prepares dataset ``index`` when its manifest is missing."""
    ds = cfg.datasets[index]
    manifest = Path(ds.manifest)
    if manifest.name != MANIFEST:
        raise ConfigError(f"data.datasets[{index}].manifest: {manifest} must be named {MANIFEST} "
                          "to be prepared from prepare_inputs")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", manifest.parent.name) or "data"
    return PrepareConfig(inputs=list(ds.prepare_inputs), output=str(manifest.parent), name=name,
                         seq_len=cfg.seq_len, samples_per_shard=cfg.samples_per_shard,
                         jsonl_text_field=cfg.jsonl_text_field, workers=cfg.prepare_workers,
                         seed=cfg.seed, tokenizer=cfg.tokenizer)


def open_datasets(cfg: DataConfig, is_main: bool, barrier: Callable[[], None]) -> List[ShardSet]:
    """The recipe's datasets, checked: one tokenizer for all, the configured sequence length.

    Rank 0 prepares what is missing (and can be prepared) while the other ranks wait."""
    if is_main:
        from data_pipeline.prepare import prepare
        for i, ds in enumerate(cfg.datasets):
            if ds.prepare_inputs and not Path(ds.manifest).is_file():
                prepare(prepare_config(cfg, i))
    barrier()
    sets = [load_manifest(ds.manifest, ds.shards_url, key=f"data.datasets[{i}].manifest")
            for i, ds in enumerate(cfg.datasets)]
    first = sets[0]
    for i, s in enumerate(sets):
        if s.seq_len != cfg.seq_len:
            raise ConfigError(f"data.seq_len: {cfg.seq_len}, but {s.manifest} holds sequences of "
                              f"{s.seq_len} tokens")
        if s.tokenizer_sha256 != first.tokenizer_sha256 or s.special_ids != first.special_ids:
            raise ConfigError(f"data.datasets[{i}].manifest: {s.manifest} was tokenised with "
                              f"another tokenizer than {first.manifest}; a mixture needs one")
    return sets
