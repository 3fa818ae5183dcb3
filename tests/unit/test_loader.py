"""The streaming loader: the same samples in the same steps under every layout, exact resume in
a new process and under another layout, datasets with fewer shards than readers, seeded
mixtures, pipe: URLs, refusal of a changed order of samples."""

import json
import multiprocessing as mp
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.errors import DataConfigError
from data_pipeline.loader import saved_ranks
from data_pipeline.streams import ShardStream, piece_range
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
def three(tmp_path_factory, small_tokenizer):
    """A dataset of 3 shards: fewer than the streams and readers of most layouts."""
    path = prepare_small(tmp_path_factory.mktemp("three"), small_tokenizer, seq_len=32,
                         samples_per_shard=400, inputs=[stdlib_glob("json")], name="three")
    assert len(load_manifest(path).shards) == 3
    return path


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
    # one stream holds every shard: ~480 batches of 4 make an epoch
    check_resume(tmp_path, [tiny], 300, open_shards=5, streams=1)


def _samples(manifest):
    ds = load_manifest(manifest)
    return [s["tokens.npy"] for i in range(len(ds.shards))
            for s in wds.WebDataset(ds.url(i), shardshuffle=False).decode()]


@pytest.mark.parametrize("num_streams", [6, 64], ids=["whole-shards", "pieces"])
def test_one_epoch_over_all_streams_reads_every_sample_once(tiny, num_streams):
    """Every stream's units of epoch 0 together are the dataset, each sample once: whole shards
    with fewer streams than shards, pieces of shards with more (64 streams, 47 shards)."""
    ds = load_manifest(tiny)
    expected = Counter(a.tobytes() for a in _samples(tiny))
    seen = Counter()
    for c in range(num_streams):
        stream = ShardStream(ds, 0, c, num_streams, seed=5, open_shards=3, counters=Counter())
        units = stream.assigned(0)
        assert units, f"stream {c} has no unit"
        samples = iter(stream)
        for shard, piece in units:
            lo, hi = piece_range(ds.shards[shard]["samples"], piece, stream.pieces)
            for _ in range(hi - lo):
                seen[next(samples)[0].tobytes()] += 1
        assert stream.epoch == 0 and not stream.window  # drained before epoch 1 began
    assert seen == expected
    # a new epoch is another permutation of the shards
    s = ShardStream(ds, 0, 0, 1, seed=5, open_shards=3, counters=Counter())
    assert s.assigned(0) != s.assigned(1)


def steps_of(manifests, dp, workers, mb, steps, weights=None, states=None, batch=16, **kw):
    """{step: the sorted (global index, source, mask, step) of all its samples} over every
    data-parallel rank of a layout; and each rank's state after them. ``states``: the saved
    ranks' states to resume from (each rank takes those ``saved_ranks`` names)."""
    accum = batch // (mb * dp)
    loaders = [make_loader(manifests, dp_rank=r, dp_size=dp, workers=workers, mb=mb,
                           accum=accum, weights=weights, **kw) for r in range(dp)]
    if states is not None:
        for r, loader in enumerate(loaders):
            loader.load_state_dicts([states[q] for q in saved_ranks(r, dp, len(states))])
    out = {}
    for _ in range(steps):
        rows = []
        for loader in loaders:
            for _ in range(accum):
                b = next(loader)
                rows += [(int(i), tuple(src.tolist()), m.numpy().tobytes(), b.step)
                         for i, src, m in zip(b.index, b.source, b.mask)]
        out[rows[0][3]] = sorted(rows)
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    return out, states


LAYOUTS = {  # (data-parallel size, workers per rank, micro-batch size): 16 samples a step
    "dp2-w2": (2, 2, 4), "dp4-w1-mb2": (4, 1, 2), "dp1-w3-mb8": (1, 3, 8),
    "dp2-w4-mb2": (2, 4, 2),  # 8 readers, of a mixture with a 3-shard dataset
}


def test_every_layout_gives_the_same_samples_in_the_same_steps(tiny, three):
    """The samples of each step, their global indices, sources and masks are the same under any
    data-parallel size, worker count and micro-batch size; a 3-shard dataset serves 8 readers."""
    mix = dict(manifests=[tiny, three], weights=[0.7, 0.3], open_shards=2,
               variable_length_prob=0.3)
    reference, _ = steps_of(dp=1, workers=0, mb=4, steps=6, **mix)
    assert sorted(reference) == list(range(6))
    assert {src[0] for rows in reference.values() for _, src, _, _ in rows} == {0, 1}
    for name, (dp, workers, mb) in LAYOUTS.items():
        got, _ = steps_of(dp=dp, workers=workers, mb=mb, steps=6, **mix)
        assert got == reference, name
    # each source names the sample that came: (dataset, shard, member ordinal of its tar)
    loader = make_loader([tiny, three], weights=[0.7, 0.3], mb=16, open_shards=2)
    b = next(loader)
    for row, (d, shard, member) in zip(b.targets, b.source.tolist()):
        ds = load_manifest([tiny, three][d])
        stored = list(wds.WebDataset(ds.url(shard), shardshuffle=False).decode())[member]
        assert np.array_equal(row.numpy(), stored["tokens.npy"])


def test_a_resume_under_another_layout_continues_the_same_stream(tiny, three):
    mix = dict(manifests=[tiny, three], weights=[0.7, 0.3], open_shards=2)
    whole, _ = steps_of(dp=1, workers=0, mb=4, steps=8, **mix)
    _, saved = steps_of(dp=2, workers=2, mb=4, steps=5, **mix)
    saved = json.loads(json.dumps(saved))  # what checkpoints carry: plain JSON
    for dp, workers, mb in ((4, 1, 2), (1, 0, 8), (8, 1, 2)):
        got, states = steps_of(dp=dp, workers=workers, mb=mb, steps=3, states=saved, **mix)
        assert got == {s: whole[s] for s in (5, 6, 7)}, (dp, workers)
        assert {s["step"] for s in states} == {8}


def test_a_state_saved_inside_a_step_resumes_only_under_its_data_parallel_size(tiny):
    loader = make_loader([tiny], dp_rank=1, dp_size=2, workers=0, mb=2, accum=4)
    take(loader, 6)  # a step and a half
    state = loader.state_dict()
    assert (state["step"], state["handed"]) == (1, 2)
    again = make_loader([tiny], dp_rank=1, dp_size=2, workers=2, mb=2, accum=4, state=state)
    assert same(take(again, 2), take(loader, 2))
    with pytest.raises(DataConfigError, match=r"2 micro-batches into step 2, which resumes "
                                              r"only under the data-parallel size and "
                                              r"micro-batch size that saved it \(2 x 2\)"):
        make_loader([tiny], dp_rank=0, dp_size=1, workers=0, mb=2, accum=8, state=state)
    with pytest.raises(DataConfigError, match=r"not 2 x 1"):
        make_loader([tiny], dp_rank=1, dp_size=2, workers=0, mb=1, accum=8, state=state)


def test_global_sample_indices_partition_over_ranks_and_step_counts_accumulation(tiny):
    a = take(make_loader([tiny], dp_rank=0, dp_size=2, workers=2, mb=4, accum=3), 6)
    b = take(make_loader([tiny], dp_rank=1, dp_size=2, workers=2, mb=4, accum=3), 6)
    idx = torch.cat([x["index"] for x in a + b]).sort().values
    assert torch.equal(idx, torch.arange(48))
    assert torch.equal(torch.cat([x["index"] for x in a[:3]]), torch.arange(12))  # step 0: 0-11
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


def test_restoring_with_another_order_of_samples_is_refused(tiny, tmp_path):
    loader = make_loader([tiny], dp_rank=0, dp_size=2, workers=2)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(DataConfigError, match=r"data state: .*open_shards 3 -> 2.*refused"):
        make_loader([tiny], dp_rank=0, dp_size=2, open_shards=2, state=state)
    with pytest.raises(DataConfigError, match=r"seed 0 -> 1"):
        make_loader([tiny], dp_rank=0, dp_size=2, seed=1, state=state)
    with pytest.raises(DataConfigError, match=r"global_batch 8 -> 16"):
        make_loader([tiny], dp_rank=0, dp_size=2, accum=2, state=state)
    with pytest.raises(DataConfigError, match=r"data.streams: 4, but the run was started with 8"):
        make_loader([tiny], dp_rank=0, dp_size=2, streams=4, state=state)
    reordered = tmp_path / "reordered"  # prepared again: the same samples in other shards
    shutil.copytree(tiny.parent, reordered)
    m = json.loads((reordered / "manifest.json").read_text())
    m["shards"] = m["shards"][::-1]
    (reordered / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataConfigError, match=r"data state: saved with a different data layout "
                                              r"\(datasets "):
        make_loader([reordered / "manifest.json"], dp_rank=0, dp_size=2, state=state)
    old = {**state, "version": 2}
    with pytest.raises(DataConfigError, match=r"earlier version .*one stream per data-parallel"):
        make_loader([tiny], dp_rank=0, dp_size=2, state=old)


def test_streams_must_divide_the_batch_and_be_shared_by_the_ranks(tiny):
    with pytest.raises(DataConfigError, match=r"data.streams: 3 streams do not divide the "
                                              r"global batch of 8 samples"):
        make_loader([tiny], mb=8, streams=3)
    with pytest.raises(DataConfigError, match=r"data.streams: 2 streams cannot be shared "
                                              r"evenly by 4 data-parallel ranks"):
        make_loader([tiny], mb=2, dp_size=4, streams=2)
    # more workers than a rank has streams: the extra ones would idle, so they are not started
    assert make_loader([tiny], mb=2, dp_size=2, workers=8, streams=4).workers == 2


def test_a_loader_says_what_its_readers_hold(tiny):
    ds = load_manifest(tiny)
    loader = make_loader([tiny], dp_size=2, workers=2, mb=4, open_shards=3)  # 8 streams
    mean = sum(s["bytes"] for s in ds.shards) / len(ds.shards)
    largest = max(s["bytes"] for s in ds.shards)
    assert loader.reader_bytes() == int(2 * 3 * mean + largest)  # 2 streams per reader
    assert loader.describe().startswith("8 canonical streams, 4 on this data-parallel rank, "
                                        "read by 2 readers (DataLoader workers)")
