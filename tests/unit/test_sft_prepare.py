"""``llada prepare --sft``: conversations -> SFT shards (a pair per sample: its prompt length, then
its tokens padded with EOS), over-long pairs skipped or truncated and counted, deterministic,
held out by conversation; stdlib-sft; the loader and the held-out reader on SFT sets; the
objective's kind against the manifests'."""

import ast
import itertools
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import (DataConfig, DatasetConfig, ObjectiveConfig, PrepareConfig,
                                  TokenizerConfig, ValidationSetConfig)
from data_pipeline.datasets import open_datasets, open_validation
from data_pipeline.errors import DataConfigError
from data_pipeline.loader import PretrainLoader
from data_pipeline.streams import ShardStream
from data_pipeline.prepare import manifest_of, prepare
from data_pipeline.prepare_sft import function_pairs
from data_pipeline.sft import ChatFormat, SFTCollator, SFTExample, sft_sample, split_sft
from data_pipeline.shards import (ShardWriter, decode_tokens, load_manifest, read_sequences,
                                  split_key, tar_members, write_manifest)
from data_pipeline.tokenizer import load_tokenizer
from framework.launch.cli import main
from tests.conftest import prepare_small, stdlib_glob
from tests.unit.data_helpers import OPEN_LOADERS
from tests.unit.test_cli_bad_input import assert_one_line_error

SEQ_LEN = 128
LONG = {"prompt": "tell a long story", "response": "once upon a time " * 60}  # > SEQ_LEN
LONG_PROMPT = {"prompt": "why " * 120, "response": "no"}  # no room for a response token


def conversation(i: int, turns: int) -> dict:
    msgs = [{"role": "system", "content": f"conversation {i}"}]
    for k in range(turns):
        msgs += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k}"}]
    return {"messages": msgs}


RECORDS = [conversation(0, 2), {"prompt": "Say hi", "response": "hi"}, LONG, LONG_PROMPT,
           *[conversation(i, 1 + i % 3) for i in range(1, 40)]]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    lines = [json.dumps(r) + "\n" for r in RECORDS]
    lines.insert(2, "this line is not JSON\n")
    path.write_text("".join(lines))
    return path


def sft_config(out, tokenizer, inputs, **kw) -> PrepareConfig:
    kw = {"seq_len": SEQ_LEN, "samples_per_shard": 16, **kw}
    return PrepareConfig(inputs=[str(i) for i in inputs], output=str(out), name="chat", sft=True,
                         tokenizer=TokenizerConfig(model=str(tokenizer)), **kw)


@pytest.fixture(scope="module")
def sft_set(tmp_path_factory, small_tokenizer, chats) -> Path:
    out = tmp_path_factory.mktemp("sft-set")
    prepare(sft_config(out, small_tokenizer, [chats]), log=lambda _: None)
    return out / "manifest.json"


def stored(manifest: Path) -> dict:
    """key -> stored row of every sample of a dataset."""
    ds = load_manifest(manifest)
    rows = {}
    for i in range(len(ds.shards)):
        for name, data in tar_members(Path(ds.url(i)).read_bytes(), ds.url(i)):
            rows[split_key(name)[0]] = decode_tokens(data)
    return rows


def expected_pairs(tok, records):
    fmt = ChatFormat(tok)
    return [ex for r in records
            for ex in fmt.pairs(r["messages"] if "messages" in r else [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]}])]


def test_each_stored_row_is_a_pair_padded_with_eos(sft_set, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    m = json.loads(sft_set.read_text())
    assert m["kind"] == "sft" and m["seq_len"] == SEQ_LEN and m["dtype"] == "uint16"
    assert all(s["tokens"] == SEQ_LEN * s["samples"] for s in m["shards"])
    pairs = [ex for ex in expected_pairs(tok, RECORDS) if len(ex.tokens) <= SEQ_LEN]
    rows = stored(sft_set)
    assert sorted(rows) == [f"{i:010d}" for i in range(len(pairs))]  # keys: the input order
    for key, ex in zip(sorted(rows), pairs):
        row = rows[key]
        assert row.shape == (SEQ_LEN + 1,) and row[0] == ex.prompt_len
        assert np.array_equal(row[1:1 + len(ex.tokens)], ex.tokens)
        assert np.all(row[1 + len(ex.tokens):] == tok.eos_id)
    assert m["sources"]["pairs"] == m["samples"] == len(pairs)
    assert m["sources"]["too_long"] == 2 and m["sources"]["truncated"] == 0
    assert m["sources"]["bad_lines"] == 1 and m["sources"]["conversations"] == len(RECORDS)
    listed = (sft_set.parent / "skipped-inputs.txt").read_text()
    assert "chats.jsonl:3: not a conversation" in listed and listed.count("more than") == 2


def test_truncate_cuts_the_response_and_counts_it(tmp_path, small_tokenizer, chats):
    tok = load_tokenizer(small_tokenizer)
    m = prepare(sft_config(tmp_path, small_tokenizer, [chats], sft_overflow="truncate"),
                log=lambda _: None)
    assert m["sources"]["truncated"] == 1 and m["sources"]["too_long"] == 1  # the prompt alone
    (long,) = expected_pairs(tok, [LONG])
    row = next(r for r in stored(tmp_path / "manifest.json").values()
               if r[0] == long.prompt_len and np.array_equal(r[1:], long.tokens[:SEQ_LEN]))
    assert row[-1] != tok.special_ids()["eot"]  # the response's end is lost


def test_two_runs_give_byte_identical_shards_and_a_rerun_is_up_to_date(
        tmp_path, small_tokenizer, chats, sft_set):
    again = tmp_path / "again"
    prepare(sft_config(again, small_tokenizer, [chats]), log=lambda _: None)
    m = json.loads(sft_set.read_text())
    assert len(m["shards"]) > 1
    for s in m["shards"]:
        assert (again / s["file"]).read_bytes() == (sft_set.parent / s["file"]).read_bytes()
    logged = []
    prepare(sft_config(again, small_tokenizer, [chats]), log=logged.append)
    assert "is up to date" in logged[0]
    other = prepare(sft_config(again, small_tokenizer, [chats], sft_overflow="truncate"),
                    log=logged.append)
    assert other["sources"]["truncated"] == 1  # the setting is in the fingerprint


def test_holdout_keeps_each_conversation_in_one_split(tmp_path, small_tokenizer, chats):
    tok = load_tokenizer(small_tokenizer)
    m = prepare(sft_config(tmp_path, small_tokenizer, [chats], holdout_fraction=0.3),
                log=lambda _: None)
    held = json.loads((tmp_path / "holdout" / "manifest.json").read_text())
    assert held["kind"] == "sft" and held["split"]["holdout_of"] == "chat"
    assert m["holdout"]["pairs"] == held["samples"] > 0 and m["samples"] > 0
    splits = {}  # conversation -> the split of each of its pairs
    for split, manifest in (("train", tmp_path / "manifest.json"),
                            ("held", tmp_path / "holdout" / "manifest.json")):
        for row in stored(manifest).values():
            text = tok.decode(row[1:1 + row[0]].tolist())
            name = text.split("conversation ")[1].split()[0] if "conversation" in text else text
            splits.setdefault(name, []).append(split)
    assert {tuple(set(s)) for s in splits.values()} == {("train",), ("held",)}
    turns = {f"{i}": 1 + i % 3 for i in range(1, 40)}
    assert all(len(splits[f"{i}"]) == n for i, n in turns.items())  # whole conversations


def test_function_pairs_are_signature_and_docstring_then_the_body():
    source = '''class A:
    @property
    def method(self, x):
        """Doc of method.

    Less indented."""
        # a comment
        if x:
            return 1
        return 2

    def only_doc(self):
        """Nothing else."""

async def coro(a,
               b):
    "One line."

    await a

def g():
    """Code on the docstring's line: no clean cut."""; return 0
'''
    assert list(function_pairs(source)) == [
        (3, 'def method(self, x):\n    """Doc of method.\n\nLess indented."""',
         "    # a comment\n    if x:\n        return 1\n    return 2"),
        (15, 'async def coro(a,\n               b):\n    "One line."', "    await a")]


def test_stdlib_sft_prompts_are_signatures_and_docstrings(tmp_path, small_tokenizer,
                                                          monkeypatch):
    tok = load_tokenizer(small_tokenizer)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    module = Path(stdlib_glob("json")).parents[1] / "textwrap.py"
    monkeypatch.setattr("data_pipeline.corpus.stdlib_files", lambda: [module, broken])
    m = prepare(sft_config(tmp_path / "out", small_tokenizer, ["stdlib-sft"], seq_len=512),
                log=lambda _: None)
    assert m["sources"]["unparsable_files"] == 1 and m["sources"]["files"] == 2
    docs = {}  # a function's name -> the first lines of the docstrings of functions so named
    for n in ast.walk(ast.parse(module.read_text())):
        if isinstance(n, ast.FunctionDef) and ast.get_docstring(n):
            docs.setdefault(n.name, []).append(ast.get_docstring(n).splitlines()[0])
    rows = list(stored(tmp_path / "out" / "manifest.json").values())
    assert len(rows) == m["sources"]["pairs"] > 3
    start = 1 + len(ChatFormat(tok).header("user"))  # after BOS and the user's header
    for row in rows:
        prompt = row[1:1 + row[0]].tolist()
        text = tok.decode(prompt[start:prompt.index(tok.special_ids()["eot"])])
        assert text.startswith("def ")
        assert any(first in text for first in docs[text[4:text.index("(")]])


def sft_loader(manifest: Path, mask_id: int, mb: int = 4) -> PretrainLoader:
    ds = load_manifest(manifest)
    cfg = DataConfig(datasets=[DatasetConfig(manifest=str(manifest))], seq_len=ds.seq_len,
                     open_shards=2, num_workers=0)
    loader = PretrainLoader(cfg, [ds], [1.0], SFTCollator(ObjectiveConfig(), mask_id),
                            micro_batch_size=mb, accumulation=1, dp_rank=0, dp_size=1)
    OPEN_LOADERS.append(loader)
    return loader


def test_the_loader_streams_sft_pairs(sft_set, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    rows = {r.tobytes() for r in stored(sft_set).values()}
    loader = sft_loader(sft_set, tok.mask_id)
    for b in itertools.islice(loader, 10):
        assert b.targets.shape == (4, SEQ_LEN)
        prompt = torch.arange(SEQ_LEN)[None, :] < (SEQ_LEN - b.norm)[:, None]
        assert not (b.mask & prompt).any() and torch.equal(b.noisy[prompt], b.targets[prompt])
        for target, norm in zip(b.targets, b.norm):
            row = np.concatenate(([SEQ_LEN - int(norm)], target.numpy())).astype(np.uint16)
            assert row.tobytes() in rows
    assert loader.counters["bad_samples"] == 0
    ds = load_manifest(sft_set)
    held = read_sequences(ds)  # what a held-out evaluation reads
    assert held.shape == (ds.samples, SEQ_LEN + 1) and held.dtype == np.int64
    prompt_len, tokens = split_sft(held)
    assert {r.tobytes() for r in np.column_stack((prompt_len, tokens)).astype(np.uint16)} == rows


def handmade_set(out: Path, tokenizer: Path, seq_len: int) -> Path:
    """One shard, by the real writer: pairs whose prompt length is the mask id, or above the
    vocabulary (both fine), then rows whose prompt length is seq_len or 0 (both bad)."""
    tok = load_tokenizer(tokenizer)
    cfg = sft_config(out, tokenizer, ["x.jsonl"], seq_len=seq_len)
    tokens = np.full(seq_len - 10, 100, dtype=np.int64)
    good = [sft_sample(SFTExample(tokens, p), seq_len, tok.eos_id, np.uint16)
            for p in (tok.mask_id, tok.vocab_size + 5)]
    bad = [good[0].copy(), good[0].copy()]
    bad[0][0], bad[1][0] = seq_len, 0
    out.mkdir()
    writer = ShardWriter(out / "chat-000000.tar", seq_len)
    for i, row in enumerate(good + bad):
        writer.add(f"{i:010d}", row)
    shutil.copy(tokenizer, out / "tokenizer.model")
    write_manifest(out, manifest_of(cfg, "chat", [writer.close()], None, tok, "hand", {}))
    return out / "manifest.json"


def test_a_row_with_a_bad_prompt_length_is_skipped_and_counted(tmp_path, small_tokenizer,
                                                                capfd):
    manifest = handmade_set(tmp_path / "bad", small_tokenizer, seq_len=600)
    ds = load_manifest(manifest)
    counters = Counter()
    got = list(itertools.islice(ShardStream(ds, 0, 0, 1, 0, 1, counters), 2))
    assert sorted(int(r[0][0]) for r in got) == [3, 517] and counters["bad_samples"] == 2
    err = capfd.readouterr().err
    assert "chat-000000.tar sample 0000000002: prompt length 600 is not in [1, 600)" in err
    assert "sample 0000000003: prompt length 0" in err
    with pytest.raises(DataConfigError, match="sample '0000000002.tokens.npy': prompt length"):
        read_sequences(ds)


@pytest.fixture(scope="module")
def pretraining_set(tmp_path_factory, small_tokenizer) -> Path:
    return prepare_small(tmp_path_factory.mktemp("pretrain"), small_tokenizer, seq_len=SEQ_LEN,
                         inputs=[stdlib_glob("json")])


def test_the_objective_refuses_shards_of_the_other_kind(sft_set, pretraining_set):
    def data(manifest, validation=()):
        return DataConfig(datasets=[DatasetConfig(manifest=str(manifest))], seq_len=SEQ_LEN,
                          validation=[ValidationSetConfig(name="v", manifest=str(v))
                                      for v in validation])

    for kind, manifest, has in (("pretrain", sft_set, "sft"), ("ar", sft_set, "sft"),
                                ("sft", pretraining_set, "pretrain")):
        with pytest.raises(DataConfigError) as e:
            open_datasets(data(manifest), True, lambda: None, kind=kind)
        assert str(e.value).startswith(f"data.datasets[0].manifest: {manifest} holds {has}")
        assert f"objective.kind={kind}" in str(e.value)
    cfg = data(sft_set, validation=[pretraining_set])
    (train,) = open_datasets(cfg, True, lambda: None, kind="sft")
    with pytest.raises(DataConfigError, match=r"data.validation\[0\].manifest: .* holds pretrain"):
        open_validation(cfg, train, kind="sft")


def test_first_run_preparation_of_an_sft_objective(tmp_path, small_tokenizer, chats):
    cfg = DataConfig(datasets=[DatasetConfig(manifest=str(tmp_path / "chat" / "manifest.json"),
                                             prepare_inputs=[str(chats)])],
                     seq_len=SEQ_LEN, samples_per_shard=16)
    with pytest.raises(DataConfigError, match="data.tokenizer.model: data.datasets.0. is "
                                              "prepared from prepare_inputs as SFT shards"):
        open_datasets(cfg, True, lambda: None, kind="sft")
    cfg.tokenizer = TokenizerConfig(model=str(small_tokenizer))
    (ds,) = open_datasets(cfg, True, lambda: None, kind="sft")
    assert ds.kind == "sft" and ds.sample_len == SEQ_LEN + 1 and ds.samples > 0


@pytest.mark.parametrize("inputs, args, needles", [
    (["x.jsonl"], [], ["prepare.tokenizer.model", "--sft needs an existing tokenizer"]),
    (["x.jsonl"], ["--tokenizer", "T", "--parts", "2"], ["prepare.parts", "SFT sets are small"]),
    (["stdlib"], ["--tokenizer", "T"], ["prepare.inputs", "stdlib is an input of pretraining"]),
])
def test_cli_refuses_bad_sft_input(tmp_path, small_tokenizer, capsys, inputs, args, needles):
    args = [str(small_tokenizer) if a == "T" else a for a in args]
    code = main(["prepare", "--sft", *inputs, "-o", str(tmp_path / "d"), *args])
    out = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess([], code, out.out, out.err), *needles)
    assert not (tmp_path / "d" / "manifest.json").exists()
