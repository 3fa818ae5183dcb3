"""Bad shards never stop the stream: a missing shard, a shard that is not what prepare wrote (cut
short, one flipped byte in a sample's data), a corrupt header and a garbage sample are skipped with
a warning naming shard and key, counted, and the run completes; damaged data never reaches a
batch."""

import contextlib
import hashlib
import io
import json
import re
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch

from collections import Counter

from data_pipeline.loader import DataError
from data_pipeline.streams import ShardStream
from data_pipeline.shards import load_manifest
from tests.conftest import DEBUG_RECIPE, prepare_small, quick_overrides, run_cli, stdlib_glob
from tests.unit.data_helpers import make_loader, take


@pytest.fixture(autouse=True)
def _warning_quota_of_its_own(monkeypatch):
    """Each test's warnings are shown (the quota per kind is per process): and what these tests
    warn of never uses up a later test's."""
    from data_pipeline import corpus
    monkeypatch.setattr(corpus, "_warned", Counter())


def rehash(manifest, *indices):
    """Record shards' current size and sha256 in the manifest: shards some other writer made
    with bad content under a matching hash, so that the checks after the hash are reached."""
    m = json.loads(manifest.read_text())
    for i in indices:
        data = (manifest.parent / m["shards"][i]["file"]).read_bytes()
        m["shards"][i].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest.write_text(json.dumps(m))


MEMBER = 1024  # one 64-token uint16 sample: 512-byte header + 128-byte npy header + 128, padded


def flip_sample_byte(shard, member: int) -> tuple:
    """One byte inside the token data of a member flipped, every tar header intact; (the
    sample's tokens before, after)."""
    raw = bytearray(shard.read_bytes())
    start = member * MEMBER + 512 + 128
    before = np.frombuffer(bytes(raw[start:start + 128]), dtype=np.uint16).copy()
    raw[start + 37] ^= 0x01
    shard.write_bytes(bytes(raw))
    return before, np.frombuffer(bytes(raw[start:start + 128]), dtype=np.uint16).copy()


def corrupt_copy(src_manifest, dst):
    """A copy of the dataset with shard 1 truncated, shard 2 holding a garbage sample and a sample
    with an id outside the vocabulary, shard 3 with a corrupt header (both under hashes that
    match), shard 4 missing, shard 5 with one flipped byte inside a sample's data."""
    shutil.copytree(src_manifest.parent, dst)
    m = json.loads((dst / "manifest.json").read_text())
    files = [dst / s["file"] for s in m["shards"]]
    files[1].write_bytes(files[1].read_bytes()[:3000])
    with tarfile.open(files[2]) as t:
        members = [(i, t.extractfile(i).read()) for i in t.getmembers()]
    with tarfile.open(files[2], "w", format=tarfile.USTAR_FORMAT) as t:
        for k, (info, data) in enumerate(members):
            if k == 5:
                data = b"\x93NUMPY garbage that is not an array"
                info.name = "garbage.tokens.npy"
            elif k == 9:
                data = data[:-2] + b"\xff\xff"  # id 65535 in a 512-piece vocabulary
                info.name = "outofvocab.tokens.npy"
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    raw = bytearray(files[3].read_bytes())
    raw[512 * 6 + 10] ^= 0xFF  # inside the 4th member's header: checksum no longer matches
    files[3].write_bytes(bytes(raw))
    files[4].unlink()
    flip_sample_byte(files[5], 7)
    rehash(dst / "manifest.json", 2, 3)
    return dst / "manifest.json"


DAMAGED = {1, 2, 3, 4, 5}


def test_bad_shards_and_samples_are_skipped_counted_and_named(small_dataset, tmp_path, capfd):
    bad = corrupt_copy(small_dataset, tmp_path / "bad")
    ds = load_manifest(bad)
    # exactly one epoch (every damaged shard once): until the stream has entered epoch 1, whose
    # first open shards (seeded) are intact ones
    seed = next(s for s in range(100) if not DAMAGED & {
        shard for shard, _ in ShardStream(ds, 0, 0, 1, s, 3, Counter()).assigned(1)[:3]})
    loader = make_loader([bad], mb=16, open_shards=3, seed=seed, streams=1)  # all in one stream
    while loader.step == 0 or loader.stream_states[0]["datasets"][0]["epoch"] == 0:
        next(loader)
    assert loader.counters == {"missing_shards": 1, "corrupt_shards": 3, "bad_samples": 2}
    err = capfd.readouterr().err
    assert "small-000004.tar unreadable" in err
    assert "small-000001.tar: 3000 bytes, the manifest records" in err
    assert "small-000005.tar: content does not match the sha256 its manifest records" in err
    assert re.search(r"small-000003.tar: corrupt tar header \(checksum mismatch\) after sample "
                     r"\d{10}; rest of shard skipped", err)
    assert "small-000002.tar sample garbage" in err
    assert "sample outofvocab: token id 65535 >= vocabulary size 512" in err


def test_a_flipped_byte_in_a_samples_data_never_reaches_a_batch(small_dataset, tmp_path):
    shutil.copytree(small_dataset.parent, tmp_path / "flip")
    manifest = tmp_path / "flip" / "manifest.json"
    ds = load_manifest(manifest)
    shard = tmp_path / "flip" / ds.shards[0]["file"]
    before, after = flip_sample_byte(shard, 3)
    assert not np.array_equal(before, after)
    with tarfile.open(shard) as t:  # the tar itself is intact: tarfile reads every member
        assert len(t.getmembers()) == ds.shards[0]["samples"]
    intact = ds.samples - ds.shards[0]["samples"]
    loader = make_loader([manifest], mb=16, open_shards=3, streams=1)  # one stream: one epoch
    rows = torch.cat([b["targets"] for b in take(loader, intact // 16)]).numpy()
    assert loader.counters == {"missing_shards": 0, "corrupt_shards": 1, "bad_samples": 0}
    assert not any(np.array_equal(r, after) for r in rows)  # a whole epoch of the others


def test_a_damaged_shard_cut_into_pieces_is_counted_once_per_epoch(small_dataset, tmp_path):
    """Three times as many streams as shards: each shard is read as 3 pieces, each by another
    stream; a missing shard, the corrupt ones and the bad samples are still counted once per
    epoch, and every good sample is read once."""
    bad = corrupt_copy(small_dataset, tmp_path / "bad")
    ds = load_manifest(bad)
    num_streams = 3 * len(ds.shards)
    counters, read = Counter(), Counter()
    for c in range(num_streams):
        stream = ShardStream(ds, 0, c, num_streams, seed=0, open_shards=2, counters=counters)
        assert stream.pieces == 3
        for shard, piece in stream.assigned(0):  # epoch 0: every piece of every shard once
            rows, members = stream._load(shard, piece)
            read.update((shard, m) for m in members.tolist())
    assert counters == {"missing_shards": 1, "corrupt_shards": 3, "bad_samples": 2}
    assert max(read.values()) == 1  # no sample twice
    intact = ds.samples - sum(ds.shards[i]["samples"] for i in DAMAGED)
    assert intact < len(read) < ds.samples  # the good samples of shards 2 and 3 too


def test_counters_survive_a_resume_without_double_counting(small_dataset, tmp_path):
    bad = corrupt_copy(small_dataset, tmp_path / "bad")
    total = json.loads(bad.read_text())["samples"]
    straight = make_loader([bad], mb=16)
    take(straight, total // 16)
    first = make_loader([bad], mb=16)
    take(first, 40)
    second = make_loader([bad], mb=16, state=first.state_dict())
    take(second, total // 16 - 40)
    assert second.counters == straight.counters


def test_shards_cut_at_a_member_boundary_or_empty_are_truncated_not_short(small_dataset,
                                                                          tmp_path):
    shutil.copytree(small_dataset.parent, tmp_path / "cut")
    manifest = tmp_path / "cut" / "manifest.json"
    m = json.loads(manifest.read_text())
    first, second = (tmp_path / "cut" / m["shards"][i]["file"] for i in (0, 1))
    first.write_bytes(first.read_bytes()[:1024 * 50])  # exactly 50 whole members, no end marker
    second.write_bytes(b"")
    stream = ShardStream(load_manifest(manifest), 0, 0, 1, 0, 8, Counter())
    assert len(stream._load(0)[0]) == len(stream._load(1)[0]) == 0  # not what prepare wrote
    rehash(manifest, 0, 1)  # under matching hashes the tar reader still tells them truncated
    stream = ShardStream(load_manifest(manifest), 0, 0, 1, 0, 8, Counter())
    assert len(stream._load(0)[0]) == 50 and len(stream._load(1)[0]) == 0
    assert stream.counters == {"corrupt_shards": 2}


@contextlib.contextmanager
def time_limit(seconds: int):
    """A stall fails the test instead of hanging the suite."""
    def expired(signum, frame):
        raise TimeoutError(f"no progress within {seconds} s: the stream stalled")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_one_bad_shard_drawn_again_and_again_never_stops_the_stream(small_dataset, tmp_path):
    # as many streams as shards: each stream holds one shard per epoch, so the bad one comes up
    # for a stream several epochs in a row now and then
    shutil.copytree(small_dataset.parent, tmp_path / "one")
    ds = load_manifest(tmp_path / "one" / "manifest.json")
    (tmp_path / "one" / ds.shards[0]["file"]).unlink()
    n, total = len(ds.shards), 0
    with time_limit(120):
        for slot in range(n):
            counters = Counter()
            stream = ShardStream(ds, 0, slot, n, 0, 8, counters)
            samples = iter(stream)
            got = [next(samples)[0] for _ in range(128 * 12)]  # a dozen epochs of this stream
            assert all(arr.shape == (ds.seq_len,) for arr in got)
            # the missing shard is counted once per epoch in which this reader drew it
            drawn = sum(stream.assigned(e)[0][0] == 0 for e in range(stream.epoch + 1))
            assert counters["missing_shards"] == drawn and set(counters) <= {"missing_shards"}
            total += drawn
    assert total >= 2  # it did come up


def test_no_readable_shard_at_all_is_an_error_not_a_stall(small_dataset, tmp_path):
    shutil.copytree(small_dataset.parent, tmp_path / "gone")
    for shard in (tmp_path / "gone").glob("*.tar"):
        shard.unlink()
    with pytest.raises(DataError, match="none of the .* shards of .* has a readable sample"):
        next(make_loader([tmp_path / "gone" / "manifest.json"]))


@pytest.mark.slow
def test_training_on_a_damaged_dataset_completes_and_reports(small_tokenizer, tmp_path):
    # ~8 shards of 24 sequences; 24 steps of 16 read each worker's half more than once
    good = prepare_small(tmp_path / "good", small_tokenizer, samples_per_shard=24,
                         inputs=[stdlib_glob("json")])
    bad = corrupt_copy(good, tmp_path / "bad")
    run = tmp_path / "run"
    proc = run_cli(["train", str(DEBUG_RECIPE), *quick_overrides(run, bad, steps=24),
                    "data.num_workers=2", "tracking.log_interval=12"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 24
    skipped = summary["data_skipped"]  # counted at every read, once per epoch
    assert skipped["bad_samples"] >= 2 and skipped["corrupt_shards"] >= 2
    assert skipped["missing_shards"] >= 1
    assert "data skipped" in proc.stdout
    assert "small-000002.tar sample garbage" in proc.stderr


def test_a_dataset_of_empty_shards_is_an_error_not_a_stall(small_dataset, tmp_path):
    shutil.copytree(small_dataset.parent, tmp_path / "empty")
    manifest = tmp_path / "empty" / "manifest.json"
    m = json.loads(manifest.read_text())
    for shard in m["shards"]:
        shard["samples"] = 0
    manifest.write_text(json.dumps(m))
    with time_limit(60), pytest.raises(DataError, match="none of the .* shards of .* holds a"):
        next(make_loader([manifest]))


def test_an_open_shard_lost_before_a_resume_is_counted_and_named(small_dataset, tmp_path, capfd):
    """A unit the saved state had open and half read is gone at the resume: its samples are
    lost, and that is counted and warned of, not skipped in silence."""
    shutil.copytree(small_dataset.parent, tmp_path / "lost")
    manifest = tmp_path / "lost" / "manifest.json"
    first = make_loader([manifest], mb=4, streams=1, open_shards=2)
    take(first, 3)
    state = first.state_dict()
    shard = next(w[0] for w in state["streams"]["0"]["datasets"][0]["open"] if w[2])
    ds = load_manifest(manifest)
    (tmp_path / "lost" / ds.shards[shard]["file"]).unlink()
    capfd.readouterr()
    second = make_loader([manifest], mb=4, streams=1, open_shards=2, state=state)
    take(second, 3)
    assert second.counters["missing_shards"] == 1
    err = capfd.readouterr().err
    assert f"shard {ds.url(shard)} unreadable" in err


def test_a_piece_whose_samples_are_all_bad_is_not_an_unusable_dataset(small_tokenizer, tmp_path):
    """One shard of 4 samples, 3 of them bad, read by 4 streams: each stream holds a piece of one
    sample, and most pieces are bad in most epochs; every stream still finds the good sample."""
    from data_pipeline.shards import ShardWriter, write_manifest

    good = prepare_small(tmp_path / "good", small_tokenizer, inputs=[stdlib_glob("json")])
    m = json.loads(good.read_text())
    row = np.full(64, 7, dtype=np.uint16)
    writer = ShardWriter(tmp_path / "good" / "one.tar")
    for k in range(4):
        writer.add(f"{k:010d}", row if k == 2 else np.full(64, 60000, dtype=np.uint16))
    m["shards"] = [{**writer.close(), "tokens": 4 * 64}]
    write_manifest(tmp_path / "good", m)
    ds = load_manifest(good)
    with time_limit(120):
        for seed in range(5):
            for c in range(4):
                stream = iter(ShardStream(ds, 0, c, 4, seed, 2, Counter()))
                assert all(np.array_equal(next(stream)[0], row) for _ in range(2))
