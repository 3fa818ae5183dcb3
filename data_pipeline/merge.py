"""``llada prepare --merge --parts N``: the one manifest of a dataset prepared in N parts, from the
parts' own manifests (never their tokens: the merge reads a few KB per part however large the
dataset). It refuses, naming the part, while a part is missing, was prepared from other inputs or
settings, or lacks a shard it lists; a refused merge changes nothing, and re-running only that
part then the merge completes the dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from data_pipeline.config import PrepareConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.parts import PART_FORMAT, part_manifest, skipped_list, with_part_tokenizer
from data_pipeline.prepare import (HOLDOUT_DIR, SOURCE_COUNTS, fingerprint, input_files,
                                   manifest_of, missing_shard, up_to_date, write_dataset)
from data_pipeline.shards import MANIFEST
from data_pipeline.tokenizer import carry, tokenizer_for


def _part(cfg: PrepareConfig, files: List[Path], p: int) -> dict:
    out, n = Path(cfg.output), cfg.parts
    path = part_manifest(out, p, n)
    redo = f"re-run it alone: llada prepare ... --parts {n} --part {p}"
    if not path.is_file():
        raise DataConfigError(f"prepare --merge: part {p} of {n} is missing or did not finish "
                              f"({path} not found); {redo}")
    try:
        m = json.loads(path.read_text())
        if m.get("format") != PART_FORMAT:
            raise ValueError(f"format {m.get('format')!r}")
    except (ValueError, AttributeError) as e:
        raise DataConfigError(f"prepare --merge: part {p} of {n}: {path} is not a part "
                              f"manifest ({e}); {redo}") from None
    if m.get("fingerprint") != fingerprint(cfg, files, p):
        raise DataConfigError(f"prepare --merge: part {p} of {n} ({path}) was prepared from "
                              f"other inputs or settings than these; {redo}")
    gone = missing_shard(out, m["shards"]) or (
        m["holdout"] and missing_shard(out / HOLDOUT_DIR, m["holdout"]["shards"]))
    if gone:
        raise DataConfigError(f"prepare --merge: part {p} of {n} is incomplete: its shard {gone} "
                              f"is missing or not the size its manifest records; {redo}")
    return m


def merge(cfg: PrepareConfig, log=print) -> dict:
    """Write (or find up to date) the manifest of the dataset whose ``cfg.parts`` parts are
    prepared; returns it."""
    if cfg.parts < 2:
        raise DataConfigError(f"prepare.parts: --merge needs the number of parts (>= 2), got "
                              f"{cfg.parts}")
    cfg = with_part_tokenizer(cfg)
    files = input_files(cfg)
    out = Path(cfg.output)
    fp = fingerprint(cfg, files)
    holdout = cfg.holdout_fraction > 0
    done = up_to_date(out, out / MANIFEST, fp, holdout)
    if done is not None:
        log(f"llada prepare: {out / MANIFEST} is up to date ({done['samples']} samples)")
        return done
    parts = [_part(cfg, files, p) for p in range(cfg.parts)]  # every refusal before any write
    tok = tokenizer_for(files, cfg.tokenizer, out, cfg.jsonl_text_field)
    for p, m in enumerate(parts):
        if m["tokenizer"]["sha256"] != tok.sha256:
            raise DataConfigError(f"prepare --merge: part {p} of {cfg.parts} was tokenised with "
                                  f"another tokenizer than {cfg.tokenizer.model}")
    (out / MANIFEST).unlink(missing_ok=True)
    sources = {k: sum(m["sources"][k] for m in parts) for k in SOURCE_COUNTS}
    manifest = manifest_of(cfg, cfg.name, [s for m in parts for s in m["shards"]],
                           sum(m["sources"]["dropped_tail_tokens"] for m in parts), tok, fp,
                           sources)
    if not manifest["shards"]:
        raise DataConfigError(f"prepare.inputs: {cfg.parts} parts hold no sequence of "
                              f"prepare.seq_len={cfg.seq_len}")
    held = [m["holdout"] for m in parts] if holdout else []
    documents = sum(h["sources"]["documents"] for h in held)
    held_manifest = manifest_of(cfg, f"{cfg.name}-holdout", [s for h in held for s in
                                                             h["shards"]],
                                sum(h["sources"]["dropped_tail_tokens"] for h in held), tok,
                                fp, {"documents": documents})
    if holdout:
        if not held_manifest["shards"]:
            raise DataConfigError(f"prepare.holdout_fraction: {cfg.holdout_fraction} held out "
                                  f"{documents} documents, fewer than one sequence; hold out more")
        carry(tok, out / HOLDOUT_DIR)
    manifest["parts"] = cfg.parts
    skipped = b"".join(skipped_list(out, p, cfg.parts).read_bytes() for p in range(cfg.parts)
                       if skipped_list(out, p, cfg.parts).is_file())
    path = write_dataset(cfg, manifest, held_manifest, {"documents": documents}, skipped)
    log(f"llada prepare: merged {cfg.parts} parts: {manifest['samples']} sequences of "
        f"{cfg.seq_len} tokens in {len(manifest['shards'])} shards from {sources['documents']} "
        f"documents in {sources['files']} files; {path}")
    return manifest
