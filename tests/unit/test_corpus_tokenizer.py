"""Reading real text with bad input skipped and counted; the tokenizer's special tokens."""

import gzip
from collections import Counter

import pytest
import sentencepiece as spm

from data_pipeline.corpus import expand_inputs, read_documents, stdlib_files
from data_pipeline.tokenizer import CHAT_PIECES, MASK_PIECE, load_tokenizer
from data_pipeline.errors import DataConfigError


def test_stdlib_corpus_is_real_python_source():
    files = stdlib_files()
    assert len(files) > 200
    assert any(f.name == "os.py" for f in files)


def test_tokenizer_has_special_tokens_and_never_emits_them(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    ids = tok.special_ids()
    assert ids == {"mask": 3, "eos": 2, "pad": 2, "bos": 1, "unk": 0, "start_header": 4,
                   "end_header": 5, "eot": 6}
    text = f"x = 1  # {MASK_PIECE} {CHAT_PIECES['eot']}\n\tprint('héllo ✓')\n"
    encoded = tok.encode(text)
    assert not set(encoded) & {3, 4, 5, 6}
    assert tok.decode(encoded) == text  # lossless, byte fallback for anything unseen


def test_tokenizer_without_a_mask_token_is_refused(tmp_path):
    lines = [f"line {i} of some text" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"),
                                   vocab_size=40, minloglevel=2)
    with pytest.raises(DataConfigError, match=r"tokenizer.model: .*m.model has no mask token"):
        load_tokenizer(tmp_path / "m.model")


def test_bad_lines_and_empty_files_are_skipped_counted_and_named(tmp_path, capfd):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "good"}\nnot json\n{"other": 1}\n\xff\xfe{"text": "x"}\n'
                      b'{"text": "also good"}\n')
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"first line\n\xc3\x28 broken\nlast line\n")
    (tmp_path / "empty.txt").write_text("")
    counts = Counter()
    assert list(read_documents(jsonl, "text", counts)) == ["good", "also good"]
    assert list(read_documents(txt, "text", counts)) == ["first line\nlast line\n"]
    assert list(read_documents(tmp_path / "empty.txt", "text", counts)) == []
    assert counts == {"bad_lines": 4, "empty_files": 1}
    err = capfd.readouterr().err
    for where in ("d.jsonl:2", "d.jsonl:3", "d.jsonl:4: not UTF-8", "t.txt:2: not UTF-8",
                  "empty.txt: no text"):
        assert where in err, err


def test_truncated_gzip_is_skipped_after_what_was_readable(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(2000):
            f.write(f'{{"text": "document {i} with some words in it"}}\n')
    path.write_bytes(path.read_bytes()[:-200])
    counts = Counter()
    docs = list(read_documents(path, "text", counts))
    assert 0 < len(docs) < 2000 and counts["unreadable_files"] == 1


def test_glob_that_matches_nothing_is_an_error_naming_it(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert expand_inputs([str(tmp_path / "*.txt")]) == [tmp_path / "a.txt"]
    with pytest.raises(DataConfigError, match=r"prepare.inputs: '.*\*.jsonl' matches no file"):
        expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")])


def test_corrupt_gzip_data_is_skipped_not_raised(tmp_path):
    path = tmp_path / "flip.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(3000):
            f.write(f'{{"text": "document {i} with some words in it, {i * 7}"}}\n')
    raw = bytearray(path.read_bytes())
    for pos in range(200, len(raw) - 200, 997):  # damage the deflate stream itself
        raw[pos] ^= 0x5A
    path.write_bytes(bytes(raw))
    counts = Counter()
    list(read_documents(path, "text", counts, report=None))
    assert counts["unreadable_files"] + counts["bad_lines"] >= 1


def test_a_vocabulary_too_large_for_the_corpus_is_a_config_error(tmp_path):
    from data_pipeline.tokenizer import train_tokenizer
    from data_pipeline.config import TokenizerConfig

    (tmp_path / "a.txt").write_text("a tiny corpus\n" * 10)
    with pytest.raises(DataConfigError, match=r"tokenizer.vocab_size: .*Vocabulary size too high"):
        train_tokenizer([tmp_path / "a.txt"], TokenizerConfig(vocab_size=32000), tmp_path / "t.model")
