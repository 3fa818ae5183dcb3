"""The training mixture: the recipe's datasets, prepared on first run where the recipe says how,
checked against one another and against the objective (SFT trains on SFT shards, pretraining and
the autoregressive baseline on pretraining shards), and opened as a loader for one data-parallel
rank."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional

from data_pipeline.config import DataConfig, PrepareConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.shards import MANIFEST, ShardSet, load_manifest


# the kind of shards (shards.KINDS) each objective (config.OBJECTIVES) trains on
DATA_KIND = {"pretrain": "pretrain", "ar": "pretrain", "sft": "sft"}


def prepare_config(cfg: DataConfig, index: int, tokenizer: Optional[str] = None,
                   sft: bool = False) -> PrepareConfig:
    """How ``llada train`` prepares dataset ``index`` when its manifest is missing; with
    ``tokenizer``, that model instead of data.tokenizer's (one tokenizer for a whole mixture);
    ``sft``: as SFT shards."""
    ds = cfg.datasets[index]
    manifest = Path(ds.manifest)
    if manifest.name != MANIFEST:
        raise DataConfigError(f"data.datasets[{index}].manifest: {manifest} must be named "
                              f"{MANIFEST} to be prepared from prepare_inputs")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", manifest.parent.name) or "data"
    tok = cfg.tokenizer if tokenizer is None else replace(cfg.tokenizer, model=tokenizer)
    return PrepareConfig(inputs=list(ds.prepare_inputs), output=str(manifest.parent), name=name,
                         seq_len=cfg.seq_len, samples_per_shard=cfg.samples_per_shard,
                         jsonl_text_field=cfg.jsonl_text_field, workers=cfg.prepare_workers,
                         seed=cfg.seed, holdout_fraction=ds.holdout_fraction, tokenizer=tok,
                         sft=sft, sft_overflow=ds.sft_overflow)


def prepare_missing(cfg: DataConfig, kind: str = "pretrain") -> None:
    """Prepare every dataset whose manifest is missing and that names prepare_inputs, as shards
    of the objective ``kind``'s. Without data.tokenizer.model the mixture shares one tokenizer:
    an already prepared dataset's, or the one trained for the first dataset prepared here; SFT
    shards need the fine-tuned model's, data.tokenizer.model."""
    from data_pipeline.prepare import prepare

    sft = DATA_KIND[kind] == "sft"
    missing = [i for i, ds in enumerate(cfg.datasets)
               if ds.prepare_inputs and not Path(ds.manifest).is_file()]
    if sft and missing and not cfg.tokenizer.model:
        raise DataConfigError(
            f"data.tokenizer.model: data.datasets[{missing[0]}] is prepared from prepare_inputs "
            "as SFT shards, which need the tokenizer of the model they fine-tune; set it")
    shared = cfg.tokenizer.model
    if shared is None:
        ready = [Path(d.manifest) for d in cfg.datasets if Path(d.manifest).is_file()]
        shared = _carried(ready[0]) if ready else None
    for i in missing:
        prepare(prepare_config(cfg, i, shared, sft=sft))
        shared = shared or _carried(Path(cfg.datasets[i].manifest))


def _carried(manifest: Path) -> str:
    """The tokenizer file a prepared dataset carries (SentencePiece's or a Hugging Face one's),
    by the name its manifest records."""
    from data_pipeline.tokenizer import SP_FILE, find_tokenizer

    try:
        name = json.loads(manifest.read_text())["tokenizer"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None  # an unreadable manifest: whichever file is there (or an error naming it)
    if not isinstance(name, str):
        found = find_tokenizer(manifest.parent, f"{manifest}")
        return str(found or manifest.parent / SP_FILE)
    return str(manifest.parent / name)


def _wait_for_manifests(cfg: DataConfig, poll_s: float = 2.0) -> None:
    """Ranks other than 0 wait for rank 0's first-run preparation by polling the filesystem,
    not in a collective: preparing a real corpus outlasts a process-group timeout, and if rank 0
    fails, its launcher (torchrun, srun) ends the job instead of a barrier hanging."""
    pending = [Path(d.manifest) for d in cfg.datasets if d.prepare_inputs]
    while not all(p.is_file() for p in pending):
        time.sleep(poll_s)


def open_datasets(cfg: DataConfig, is_main: bool, barrier: Callable[[], None],
                  kind: str = "pretrain") -> List[ShardSet]:
    """The recipe's datasets, checked: one tokenizer for all, the configured sequence length,
    the shards the objective ``kind`` (config.OBJECTIVES) trains on.

    Rank 0 prepares what is missing (and can be prepared) while the other ranks wait."""
    if is_main:
        prepare_missing(cfg, kind)
    else:
        _wait_for_manifests(cfg)
    barrier()
    sets = [load_manifest(ds.manifest, ds.shards_url, key=f"data.datasets[{i}].manifest")
            for i, ds in enumerate(cfg.datasets)]
    first = sets[0]
    for i, s in enumerate(sets):
        check_kind(s, kind, f"data.datasets[{i}].manifest")
        if s.seq_len != cfg.seq_len:
            raise DataConfigError(f"data.seq_len: {cfg.seq_len}, but {s.manifest} holds "
                                  f"sequences of {s.seq_len} tokens")
        check_tokenizer(s, first.tokenizer_sha256, first.special_ids,
                        f"{first.manifest}; a mixture needs one", f"data.datasets[{i}].manifest")
    return sets


def check_tokenizer(s: ShardSet, sha256: str, special_ids: dict, of: str, key: str) -> None:
    """The dataset was tokenised with the model's tokenizer (``of`` names where that is): the
    model's ids must mean the same tokens."""
    if s.tokenizer_sha256 != sha256 or s.special_ids != special_ids:
        raise DataConfigError(f"{key}: {s.manifest} was tokenised with another tokenizer than "
                              f"{of}")


def check_kind(s: ShardSet, kind: str, key: str) -> None:
    """The dataset holds the samples the objective ``kind`` trains on."""
    need = DATA_KIND[kind]
    if s.kind != need:
        how = "llada prepare --sft" if need == "sft" else "llada prepare without --sft"
        raise DataConfigError(f"{key}: {s.manifest} holds {s.kind} shards; objective.kind={kind} "
                              f"trains on {need} shards ({how})")


def open_validation(cfg: DataConfig, train: ShardSet, kind: str = "pretrain") -> List[ShardSet]:
    """The recipe's held-out sets (after ``open_datasets``: a first-run preparation has written
    them), each of the training data's tokenizer and of the objective ``kind``'s shards."""
    sets = []
    training = {Path(d.manifest).resolve() for d in cfg.datasets}
    for i, v in enumerate(cfg.validation):
        key = f"data.validation[{i}].manifest"
        if Path(v.manifest).resolve() in training:
            raise DataConfigError(f"{key}: {v.manifest} is a training dataset (data.datasets): "
                                  "a held-out set must be held out, e.g. llada prepare "
                                  "--holdout-fraction's holdout/manifest.json")
        s = load_manifest(v.manifest, v.shards_url, key=key)
        check_kind(s, kind, key)
        check_tokenizer(s, train.tokenizer_sha256, train.special_ids,
                        f"the training data ({train.manifest})", key)
        sets.append(s)
    return sets
