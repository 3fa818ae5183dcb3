"""``llada prepare --holdout-fraction``: a held-out split chosen by document, never sharing a
document with the training split, the same on every re-run and worker count, as a dataset of
its own."""

import json
from collections import Counter

import pytest

from data_pipeline.config import PrepareConfig, TokenizerConfig
from data_pipeline.corpus import expand_inputs, read_documents
from data_pipeline.errors import DataConfigError
from data_pipeline.prepare import HOLDOUT_DIR, held_out, prepare
from data_pipeline.shards import load_manifest
from data_pipeline.tokenizer import load_tokenizer
from tests.conftest import SMALL_CORPUS
from tests.unit.data_helpers import documents_in, packed_stream

FRACTION = 0.15


def make(out, tokenizer, workers=2, fraction=FRACTION, seed=0):
    return prepare(PrepareConfig(inputs=list(SMALL_CORPUS), output=str(out), name="small",
                                 seq_len=64, samples_per_shard=64, workers=workers,
                                 holdout_fraction=fraction, holdout_seed=seed,
                                 tokenizer=TokenizerConfig(model=str(tokenizer))),
                   log=lambda _: None)


def documents_of(manifest_path, eos: int) -> Counter:
    """The documents of a dataset (sequences in packing order, split at EOS)."""
    return Counter(documents_in(packed_stream(manifest_path)[1], eos))


@pytest.fixture(scope="module")
def split(tmp_path_factory, small_tokenizer):
    out = tmp_path_factory.mktemp("holdout")
    return out, make(out, small_tokenizer)


def test_no_document_is_in_both_splits(split, small_tokenizer):
    out, manifest = split
    tok = load_tokenizer(small_tokenizer)
    train = documents_of(out / "manifest.json", tok.eos_id)
    held = documents_of(out / HOLDOUT_DIR / "manifest.json", tok.eos_id)
    assert held and train and not set(held) & set(train)
    # the held-out documents are exactly those the seeded hash picks
    docs = [d for f in expand_inputs(list(SMALL_CORPUS)) for d in read_documents(f)]
    picked = [d for d in docs if held_out(d, FRACTION, 0)]
    assert 0 < len(picked) < len(docs) and manifest["holdout"]["documents"] == len(picked)
    assert set(held) <= {tuple(tok.encode(d)) for d in picked}
    # the held-out split is a dataset of its own, of the same tokenizer
    m = load_manifest(out / HOLDOUT_DIR / "manifest.json")
    assert m.tokenizer_sha256 == load_manifest(out / "manifest.json").tokenizer_sha256
    assert m.samples == manifest["holdout"]["samples"] > 0


def test_the_split_is_the_same_on_a_re_run_and_another_worker_count(split, small_tokenizer,
                                                                      tmp_path):
    out, manifest = split
    again = make(tmp_path, small_tokenizer, workers=1)
    held = json.loads((out / HOLDOUT_DIR / "manifest.json").read_text())
    held_again = json.loads((tmp_path / HOLDOUT_DIR / "manifest.json").read_text())
    assert [s["sha256"] for s in held_again["shards"]] == [s["sha256"] for s in held["shards"]]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    # another seed holds out other documents
    other = make(tmp_path / "other", small_tokenizer, seed=1)
    assert other["holdout"]["documents"] != manifest["holdout"]["documents"] or \
        other["shards"][0]["sha256"] != manifest["shards"][0]["sha256"]


def test_a_holdout_too_small_for_one_sequence_is_an_error(small_tokenizer, tmp_path):
    with pytest.raises(DataConfigError, match="prepare.holdout_fraction"):
        make(tmp_path, small_tokenizer, fraction=1e-9)
    assert not (tmp_path / "manifest.json").exists()
