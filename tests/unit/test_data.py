import gzip
import json

import torch

from data_pipeline.corpus import read_documents, stdlib_files
from data_pipeline.token_stream import TokenStream
from data_pipeline.tokenizer import MASK_PIECE, load_tokenizer
from data_pipeline.variable_length import batch_length


def test_stdlib_corpus_is_real_python_source():
    files = stdlib_files()
    assert len(files) > 200
    assert any(f.name == "os.py" for f in files)


def test_tokenizer_has_special_tokens_and_never_emits_mask(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    assert tok.mask_id == 3 and tok.eos_id == 2 and tok.vocab_size == 512
    ids = tok.encode(f"x = 1  # {MASK_PIECE}\n\tprint('héllo ✓')\n")
    assert tok.mask_id not in ids
    assert tok.decode(ids) == f"x = 1  # {MASK_PIECE}\n\tprint('héllo ✓')\n"  # lossless


def test_token_stream_deals_every_sequence_once_across_ranks(small_tokenizer, tmp_path):
    tok = load_tokenizer(small_tokenizer)
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 200)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"document {i} " * 20}) + "\n")
    files = sorted(tmp_path.iterdir())

    def take(rank, size, n):
        it = iter(TokenStream(files, tok, seq_len=32, micro_batch_size=2, dp_rank=rank,
                              dp_size=size, seed=1))
        return [next(it) for _ in range(n)]

    single = take(0, 1, 12)
    r0, r1 = take(0, 2, 6), take(1, 2, 6)
    idx = torch.cat([b.index for b in r0 + r1]).sort().values
    assert torch.equal(idx, torch.arange(24))
    by_index = {int(i): s for b in single for i, s in zip(b.index, b.tokens)}
    for b in r0 + r1:
        for i, s in zip(b.index, b.tokens):
            assert torch.equal(by_index[int(i)], s)
    assert all(b.tokens.shape == (2, 32) for b in single)


def test_bad_jsonl_lines_are_skipped_with_a_warning(tmp_path, recwarn):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good"}\nnot json\n{"other": 1}\n{"text": "also good"}\n')
    assert list(read_documents(path)) == ["good", "also good"]
    messages = [str(w.message) for w in recwarn]
    assert any("d.jsonl:2" in m for m in messages) and any("d.jsonl:3" in m for m in messages)


def test_variable_length_cuts_about_one_percent_and_is_seeded_by_step():
    lengths = [batch_length(step, 4096, 0.01, seed=0) for step in range(20000)]
    cut = [n for n in lengths if n < 4096]
    assert 0.007 <= len(cut) / 20000 <= 0.013
    assert all(1 <= n <= 4096 for n in cut)
    assert lengths[:100] == [batch_length(step, 4096, 0.01, seed=0) for step in range(100)]
