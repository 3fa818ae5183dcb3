"""`llada prepare`: deterministic shards, a complete manifest, clean re-runs, bad input."""

import gzip
import hashlib
import json

import numpy as np
import webdataset as wds

from data_pipeline.shards import load_manifest
from data_pipeline.tokenizer import load_tokenizer
from tests.conftest import prepare_small, run_cli, stdlib_glob
from tests.unit.data_helpers import packed_stream


def shard_bytes(manifest):
    m = json.loads(manifest.read_text())
    return [(manifest.parent / s["file"]).read_bytes() for s in m["shards"]]


def test_prepare_twice_gives_byte_identical_shards(tmp_path, small_tokenizer):
    a = prepare_small(tmp_path / "a", small_tokenizer)
    b = prepare_small(tmp_path / "b", small_tokenizer)
    assert shard_bytes(a) == shard_bytes(b)
    assert a.read_bytes() == b.read_bytes()


def test_manifest_describes_the_shards(small_dataset, small_tokenizer):
    m = json.loads(small_dataset.read_text())
    tok = load_tokenizer(small_tokenizer)
    assert m["seq_len"] == 64 and m["dtype"] == "uint16"
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["vocab_size"] == 512
    assert m["tokenizer"]["special_ids"]["mask"] == 3 and m["tokenizer"]["special_ids"]["eos"] == 2
    assert [s["file"] for s in m["shards"]][:2] == ["small-000000.tar", "small-000001.tar"]
    assert all(s["samples"] == 128 for s in m["shards"][:-1]) and m["shards"][-1]["samples"] <= 128
    assert sum(s["samples"] for s in m["shards"]) == m["samples"] > 1000
    for s in m["shards"]:
        data = (small_dataset.parent / s["file"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        assert s["tokens"] == 64 * s["samples"]
    assert not list(small_dataset.parent.glob("*.tmp"))


def test_shards_hold_the_documents_joined_by_eos(small_dataset, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    keys, stream = packed_stream(small_dataset)  # a plain webdataset reader decodes ours too
    assert keys == [f"{i:010d}" for i in range(len(keys))]
    assert stream.dtype == np.uint16 and 3 not in stream
    first_doc = stream[:int(np.argmax(stream == tok.eos_id))].tolist()
    text = tok.decode(first_doc)
    assert len(text) > 100 and text in "".join(open(f).read() for f in _small_files())


def test_sequences_are_spread_over_the_shards_in_a_seeded_order(small_dataset):
    ds = load_manifest(small_dataset)
    n = ds.samples
    first = [int(s["__key__"]) for s in wds.WebDataset(ds.url(0), shardshuffle=False)]
    # a uniform sample of the whole dataset, not a run of neighbours: its keys cover the range
    assert len(first) == 128 and min(first) < n // 10 and max(first) > n - n // 10
    assert np.mean(np.diff(sorted(first))) > n / 256


def _small_files():
    import glob
    return [f for p in ("json", "email", "logging")
            for f in glob.glob(stdlib_glob(p))]


def test_rerun_is_up_to_date_and_a_crash_is_redone_cleanly(tmp_path, small_tokenizer):
    out = tmp_path / "d"
    manifest = prepare_small(out, small_tokenizer)
    good = shard_bytes(manifest)
    mtime = manifest.stat().st_mtime_ns
    prepare_small(out, small_tokenizer)
    assert manifest.stat().st_mtime_ns == mtime  # nothing rewritten
    # a crash mid-way: no manifest, a half-written temporary shard, a truncated final shard
    manifest.unlink()
    (out / "small-000003.tar.tmp").write_bytes(b"\0" * 1000)
    shard = out / "small-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    prepare_small(out, small_tokenizer)
    assert shard_bytes(manifest) == good
    assert not list(out.glob("*.tmp"))


def test_cli_prepares_jsonl_gz_and_text_and_counts_bad_input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with gzip.open(src / "a.jsonl.gz", "wt") as f:
        for i in range(300):
            f.write(json.dumps({"body": f"record {i}: " + "lorem ipsum dolor sit amet " * 8}) + "\n")
        f.write("{broken\n")
    (src / "b.txt").write_bytes(("plain text line\n" * 200).encode() + b"\xff\xfe\n")
    (src / "c.txt").write_text("")
    out = tmp_path / "out"
    proc = run_cli(["prepare", str(src / "*.jsonl.gz"), str(src / "*.txt"), "-o", str(out),
                    "--name", "mix", "--seq-len", "32", "--samples-per-shard", "50",
                    "--text-field", "body", "--vocab-size", "300", "--workers", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"]["files"] == 3 and m["sources"]["documents"] == 301
    assert m["sources"]["bad_lines"] == 2 and m["sources"]["empty_files"] == 1
    assert m["samples"] > 100 and all(s["samples"] <= 50 for s in m["shards"])
    # one line for the skips, each named in the list beside the manifest
    (line,) = [x for x in proc.stderr.splitlines() if "skipped" in x]
    assert "skipped 3 inputs (1 empty files, 2 bad lines)" in line and "skipped-inputs.txt" in line
    listed = (out / "skipped-inputs.txt").read_text()
    assert "a.jsonl.gz:301" in listed and "b.txt:201: not UTF-8" in listed and "c.txt" in listed
    assert "llada prepare:" in proc.stdout


def test_tokeniser_workers_drop_the_callers_signal_handlers(small_tokenizer):
    """``llada train`` handles TERM (checkpoint and stop) before it prepares data on first run;
    a forked tokeniser worker that kept the handler could not be ended by the pool's terminate()
    and prepare would hang at its end."""
    import signal

    from data_pipeline.prepare import _init_worker

    interrupt = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN in a background job
    saved = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _init_worker(load_tokenizer(small_tokenizer).worker_args())  # each worker's first
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is interrupt  # not the caller's: left as it was
    finally:
        signal.signal(signal.SIGTERM, saved)
