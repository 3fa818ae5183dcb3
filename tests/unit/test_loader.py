"""The streaming loader: exact resume in a new process, the split by data-parallel rank and
worker, seeded mixtures, pipe: URLs, refusal of a changed layout."""

import json
import multiprocessing as mp
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.errors import DataConfigError
from data_pipeline.loader import ShardStream
from data_pipeline.shards import load_manifest
from tests.conftest import prepare_small, stdlib_glob
from tests.unit.data_helpers import make_loader, same, take


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_tokenizer):
    """~1,900 sequences of 32 tokens in ~47 shards of 40."""
    return prepare_small(tmp_path_factory.mktemp("tiny"), small_tokenizer, seq_len=32,
                         samples_per_shard=40, inputs=[stdlib_glob("json"), stdlib_glob("logging")],
                         name="tiny")


@pytest.fixture(scope="module")
def other(tmp_path_factory, small_tokenizer):
    return prepare_small(tmp_path_factory.mktemp("other"), small_tokenizer, seq_len=32,
                         samples_per_shard=40, inputs=[stdlib_glob("email")], name="other")


def _resume_child(args, state_json, out_path, n):
    manifests, kwargs = args
    loader = make_loader(manifests, state=json.loads(state_json), **kwargs)
    torch.save(take(loader, n), out_path)


def check_resume(tmp_path, manifests, n, **kwargs):
    straight = take(make_loader(manifests, **kwargs), 2 * n)
    first = make_loader(manifests, **kwargs)
    head = take(first, n)
    state = json.dumps(first.state_dict())  # what a checkpoint carries: plain JSON
    del first
    out = tmp_path / f"tail-{kwargs.get('dp_rank', 0)}.pt"
    child = mp.get_context("spawn").Process(target=_resume_child,
                                            args=((manifests, kwargs), state, out, n))
    child.start()
    child.join(300)
    assert child.exitcode == 0
    tail = torch.load(out)
    assert same(head, straight[:n])
    assert same(tail, straight[n:])  # token for token, masks included


def test_resume_in_a_new_process_continues_exactly(tmp_path, tiny):
    # 130 batches of 4 drain and replace several of the 3 open shards and stop with 3 half-read
    check_resume(tmp_path, [tiny], 130, open_shards=3)


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_resume_with_two_data_parallel_ranks_and_two_workers(tmp_path, tiny, other, dp_rank):
    # a two-dataset mixture: the mixture RNG is part of the state too
    check_resume(tmp_path, [tiny, other], 61, dp_rank=dp_rank, dp_size=2, workers=2,
                 weights=[0.7, 0.3], open_shards=2)


def test_resume_past_an_epoch_boundary(tmp_path, tiny):
    # one slot holds every shard: ~480 batches of 4 make an epoch
    check_resume(tmp_path, [tiny], 300, open_shards=5)


def _samples(manifest):
    ds = load_manifest(manifest)
    return [s["tokens.npy"] for i in range(len(ds.shards))
            for s in wds.WebDataset(ds.url(i), shardshuffle=False).decode()]


def test_one_epoch_over_all_ranks_and_workers_reads_every_sample_once(tiny):
    ds = load_manifest(tiny)
    expected = Counter(a.tobytes() for a in _samples(tiny))
    seen = Counter()
    num_slots = 2 * 3  # 2 data-parallel ranks x 3 workers
    for slot in range(num_slots):
        stream = ShardStream(ds, 0, slot, num_slots, seed=5, open_shards=3, counters=Counter())
        samples = iter(stream)
        for _ in range(sum(ds.shards[s]["samples"] for s in stream.assigned(0))):
            seen[next(samples).tobytes()] += 1
        assert stream.epoch == 0 and not stream.window  # drained before epoch 1 began
    assert seen == expected
    # a new epoch is another permutation of the shards
    s = ShardStream(ds, 0, 0, 1, seed=5, open_shards=3, counters=Counter())
    assert not np.array_equal(s.assigned(0), s.assigned(1))


def test_loader_deals_each_slot_stream_to_its_rank_and_worker(tiny):
    ds = load_manifest(tiny)
    for dp_rank in (0, 1):
        batches = take(make_loader([tiny], dp_rank=dp_rank, dp_size=2, workers=2, mb=4), 12)
        for worker in (0, 1):
            stream = iter(ShardStream(ds, 0, dp_rank * 2 + worker, 4, seed=0, open_shards=3,
                                      counters=Counter()))
            rows = [torch.from_numpy(next(stream).astype(np.int64)) for _ in range(6 * 4)]
            got = torch.cat([b["targets"] for b in batches[worker::2]])
            assert torch.equal(got, torch.stack(rows))


def test_global_sample_indices_partition_over_ranks_and_step_counts_accumulation(tiny):
    a = take(make_loader([tiny], dp_rank=0, dp_size=2, workers=2, mb=4, accum=3), 6)
    b = take(make_loader([tiny], dp_rank=1, dp_size=2, workers=2, mb=4, accum=3), 6)
    idx = torch.cat([x["index"] for x in a + b]).sort().values
    assert torch.equal(idx, torch.arange(48))
    assert [int(x["step"]) for x in a] == [0, 0, 0, 1, 1, 1]


def test_mixture_follows_the_weights(tiny, other):
    tiny_rows = {a.tobytes() for a in _samples(tiny)}
    batches = take(make_loader([tiny, other], weights=[3, 1], mb=8, open_shards=2), 80)
    rows = torch.cat([b["targets"] for b in batches]).numpy().astype(np.uint16)
    share = np.mean([r.tobytes() in tiny_rows for r in rows])
    assert abs(share - 0.75) < 0.05


def test_datasets_prepared_on_first_run_share_one_tokenizer(tmp_path):
    from data_pipeline.datasets import open_datasets
    from data_pipeline.config import DataConfig, DatasetConfig, TokenizerConfig

    cfg = DataConfig(
        datasets=[DatasetConfig(manifest=str(tmp_path / n / "manifest.json"),
                                prepare_inputs=[stdlib_glob(pkg)])
                  for n, pkg in (("a", "json"), ("b", "logging"))],
        seq_len=32, samples_per_shard=64, prepare_workers=1,
        tokenizer=TokenizerConfig(vocab_size=800, train_bytes=100_000))
    a, b = open_datasets(cfg, is_main=True, barrier=lambda: None)
    assert a.tokenizer_sha256 == b.tokenizer_sha256 and a.samples and b.samples


def test_pipe_urls_read_the_same_stream(tiny):
    local = take(make_loader([tiny]), 20)
    piped = take(make_loader([tiny], shards_url=f"pipe:cat {tiny.parent}/{{shard}}"), 20)
    assert same(local, piped)


def test_seed_changes_the_order(tiny):
    assert not same(take(make_loader([tiny], seed=0), 5), take(make_loader([tiny], seed=1), 5))


def test_restoring_into_another_layout_is_refused(tiny):
    loader = make_loader([tiny], dp_rank=0, dp_size=2, workers=2)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(DataConfigError, match=r"data state: .*dp_size 2 -> 4.*refused"):
        make_loader([tiny], dp_rank=0, dp_size=4, workers=2, state=state)
    with pytest.raises(DataConfigError, match=r"workers 2 -> 1"):
        make_loader([tiny], dp_rank=0, dp_size=2, workers=1, state=state)
    with pytest.raises(DataConfigError, match=r"open_shards 3 -> 2"):  # replay needs the same
        make_loader([tiny], dp_rank=0, dp_size=2, workers=2, open_shards=2, state=state)


def test_fewer_shards_than_readers_is_a_clear_error(tiny):
    n = len(load_manifest(tiny).shards)
    with pytest.raises(DataConfigError, match=f"has {n} shards, fewer than the {n + 1} readers"):
        make_loader([tiny], dp_size=n + 1)


def test_two_ranks_resume_as_one_rank_with_two_workers(tiny):
    """DP2 x 1 worker -> DP1 x 2 workers: the same readers, so the same micro-batches, indices
    and noise, in global order; a reordering change of layout is refused."""
    ranks = [make_loader([tiny], dp_rank=r, dp_size=2, workers=1, variable_length_prob=0.3)
             for r in range(2)]
    for loader in ranks:
        take(loader, 3)
    states = [loader.state_dict() for loader in ranks]
    expected = [take(loader, 2) for loader in ranks]  # steps 3 and 4 of each rank
    one = make_loader([tiny], dp_size=1, workers=2, accum=2, variable_length_prob=0.3)
    one.load_state_dicts(states)
    got = take(one, 4)
    assert same(got, [expected[0][0], expected[1][0], expected[0][1], expected[1][1]])
    assert [int(b["step"]) for b in got] == [3, 3, 4, 4]

    four = [make_loader([tiny], dp_rank=r, dp_size=4, workers=1) for r in range(4)]
    for loader in four:
        take(loader, 1)
    with pytest.raises(DataConfigError, match=r"4 x 1 -> 2 x 2 would reorder the stream"):
        make_loader([tiny], dp_rank=0, dp_size=2, workers=2).load_state_dicts(
            [loader.state_dict() for loader in four])
    with pytest.raises(DataConfigError, match=r"saved by 2 readers .* this run has 1 x 1"):
        make_loader([tiny], dp_size=1, workers=1).load_state_dicts(states)
