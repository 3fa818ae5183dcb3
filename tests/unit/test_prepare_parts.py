"""`llada prepare` in parts: the inputs' split (whole files, large uncompressed ones cut at line
boundaries, compressed ones whole), and the merge that refuses a missing, stale or incomplete
part by name and completes once that part alone is re-run. (On a real Slurm array:
tests/integration/test_slurm.py.)"""

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

import data_pipeline.parts as parts
from data_pipeline.config import PrepareConfig, TokenizerConfig
from data_pipeline.corpus import Piece, read_documents
from data_pipeline.errors import DataConfigError
from data_pipeline.merge import merge
from data_pipeline.prepare import prepare
from tests.conftest import stdlib_glob


def test_large_uncompressed_files_are_cut_at_line_boundaries(tmp_path, monkeypatch):
    lines = [json.dumps({"text": f"document {i} " + "x" * (i % 37)}) for i in range(500)]
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines) + "\n")
    small = tmp_path / "small.jsonl.gz"
    with gzip.open(small, "wt") as f:
        f.write("\n".join(lines[:50]) + "\n")
    monkeypatch.setattr(parts, "SPLIT_MIN_BYTES", 1000)
    split = parts.split_inputs([big, small], 3)
    assert [len(p) for p in split] == [1, 1, 2]  # the big file in 3 pieces, the .gz whole
    assert split[2][1] == Piece(small)
    pieces = [p for part in split for p in part if p.path == big]
    assert pieces[0].start == 0 and pieces[-1].end is None
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    # every line once, in order, whatever byte the cut fell on
    docs = [d for piece in pieces for d in read_documents(piece)]
    assert docs == [json.loads(line)["text"] for line in lines]
    # more parts than bytes: the empty parts get nothing, nothing is lost
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one\ntwo\n")
    monkeypatch.setattr(parts, "SPLIT_MIN_BYTES", 0)
    split = parts.split_inputs([tiny], 16)
    assert "".join(d for part in split for p in part for d in read_documents(p)) == "one\ntwo\n"


def config(out: Path, tokenizer: Path, part: int = 0, seq_len: int = 64) -> PrepareConfig:
    return PrepareConfig(inputs=[stdlib_glob("json"), stdlib_glob("email")], output=str(out),
                         name="small", seq_len=seq_len, samples_per_shard=40, workers=1,
                         holdout_fraction=0.1, parts=3, part=part,
                         tokenizer=TokenizerConfig(model=str(tokenizer)))


def test_merge_refuses_a_missing_stale_or_incomplete_part_and_completes_after_it(
        tmp_path, small_tokenizer):
    out = tmp_path / "d"
    for p in (0, 2):
        prepare(config(out, small_tokenizer, p), log=lambda _: None)
    with pytest.raises(DataConfigError, match=r"part 1 of 3 is missing or did not finish .*"
                       r"part-00001-of-00003.json not found.*--parts 3 --part 1"):
        merge(config(out, small_tokenizer))
    assert not (out / "manifest.json").exists()
    prepare(config(out, small_tokenizer, 1, seq_len=32), log=lambda _: None)  # other settings
    with pytest.raises(DataConfigError, match=r"part 1 of 3 .* was prepared from other inputs "
                       "or settings"):
        merge(config(out, small_tokenizer))
    prepare(config(out, small_tokenizer, 1), log=lambda _: None)  # redone: replaces its shards
    m1 = json.loads(parts.part_manifest(out, 1, 3).read_text())
    assert sorted(f.name for f in out.glob("small-00001-*")) == sorted(
        s["file"] for s in m1["shards"])  # the stale part's shards are gone
    m2 = json.loads(parts.part_manifest(out, 2, 3).read_text())
    (out / m2["shards"][1]["file"]).unlink()
    with pytest.raises(DataConfigError, match=rf"part 2 of 3 is incomplete: its shard "
                       rf"{m2['shards'][1]['file']} is missing"):
        merge(config(out, small_tokenizer))
    lines = []
    prepare(config(out, small_tokenizer, 2), log=lines.append)  # that part alone, again
    manifest = merge(config(out, small_tokenizer), log=lines.append)
    assert "merged 3 parts" in lines[-1]
    assert manifest["samples"] == sum(
        json.loads(parts.part_manifest(out, p, 3).read_text())["samples"] for p in range(3))
    assert Counter(s["file"][:11] for s in manifest["shards"]) == Counter(
        {f"small-{p:05d}": len(json.loads(parts.part_manifest(out, p, 3).read_text())["shards"])
         for p in range(3)})
    assert (out / "holdout" / "manifest.json").is_file()
    assert (out / "tokenizer.model").read_bytes() == small_tokenizer.read_bytes()
    # up to date: a second merge (and a re-run part) rewrite nothing
    mtime = (out / "manifest.json").stat().st_mtime_ns
    prepare(config(out, small_tokenizer, 0), log=lines.append)
    merge(config(out, small_tokenizer), log=lines.append)
    assert "up to date" in lines[-1] and "up to date" in lines[-2]
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_a_part_without_a_tokenizer_beforehand_is_refused(tmp_path):
    cfg = PrepareConfig(inputs=[stdlib_glob("json")], output=str(tmp_path / "d"), parts=2)
    with pytest.raises(DataConfigError, match=r"prepare.tokenizer.model: a dataset prepared in 2 "
                       r"parts needs its tokenizer beforehand.*--tokenizer-only"):
        prepare(cfg)
