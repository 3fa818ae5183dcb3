"""A Hugging Face tokenizer beside SentencePiece (issue 36): ``llada prepare --tokenizer DIR``
writes shards of the tokenizer's own ids, carries it as tokenizer.hf.json, records its special
ids and where its mask id came from, and counts bits per byte over the text's UTF-8 bytes.

The tokenizers are byte-level BPEs trained here on a few KB of text and saved by transformers."""

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import PrepareConfig, TokenizerConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.prepare import fingerprint, prepare
from data_pipeline.sft import ChatFormat
from data_pipeline.tokenizer import (HF_FILE, SP_FILE, find_tokenizer, hf_tokenizer_bytes,
                                     load_tokenizer)
from tests.unit.data_helpers import packed_stream

LLAMA3 = ["<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eot_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
PLAIN = ["<|endoftext|>", "<|begin_of_text|>"]
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DOCS = ["héllo wörld ✓ 日本\nthe second line", "def f(x):\n    return x + 1\n",
        "a document with <|endoftext|> and <|reserved_special_token_0|> in its text",
        "plain ascii text " * 20, "Ünïcödé — “quotes” and tabs\tand emoji 🙂"]


@pytest.fixture(scope="module")
def text():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return (stdlib / "json" / "decoder.py").read_text().splitlines() + DOCS


def hf_dir(out: Path, lines, specials, vocab_size=400, model_rows=None, **tokens) -> Path:
    """A byte-level BPE trained on ``lines``, saved by transformers into ``out`` (EOS, BOS and
    padding set as ``tokens`` says); ``model_rows``: a config.json with that vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokens = tokens or {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **tokens).save_pretrained(str(out))
    if model_rows is not None:
        (out / "config.json").write_text(json.dumps({"vocab_size": model_rows}))
    return out


def n_tokens(directory: Path) -> int:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(True)


def test_prepare_writes_the_tokenizers_own_ids_and_carries_it(tmp_path, text, capfd):
    from transformers import AutoTokenizer

    src = hf_dir(tmp_path / "hf", text, LLAMA3, bos_token="<|begin_of_text|>",
                 eos_token="<|endoftext|>")
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3))
    out = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(inputs)], output=str(out), name="hf", seq_len=16,
                          samples_per_shard=8, workers=2,
                          tokenizer=TokenizerConfig(model=str(src))), log=lambda _: None)
    assert "huggingface/tokenizers" not in capfd.readouterr().err  # no fork warning

    auto = AutoTokenizer.from_pretrained(str(src))
    split = AutoTokenizer.from_pretrained(str(src), split_special_tokens=True)
    eos = auto.convert_tokens_to_ids("<|endoftext|>")
    expected = []
    for doc in DOCS * 3:
        ids = auto(doc, add_special_tokens=False)["input_ids"]
        if "<|" in doc:  # special-token text is text: never an EOS or the mask in data
            assert ids != split(doc, add_special_tokens=False)["input_ids"]
            ids = split(doc, add_special_tokens=False)["input_ids"]
        expected += ids + [eos]
    _, stream = packed_stream(out / "manifest.json")
    assert stream.dtype == np.uint16 and len(stream) == len(expected) // 16 * 16
    assert stream.tolist() == expected[:len(stream)]

    m = json.loads((out / "manifest.json").read_text())["tokenizer"]
    ids = {name: auto.convert_tokens_to_ids(t) for name, t in [
        ("eos", "<|endoftext|>"), ("bos", "<|begin_of_text|>"), ("start_header", LLAMA3[2]),
        ("end_header", LLAMA3[3]), ("eot", LLAMA3[4]), ("mask", LLAMA3[5])]}
    assert m["special_ids"] == {**ids, "pad": ids["eos"], "unk": None}
    assert m["mask"] == {"id": ids["mask"], "source": "reserved", "token": LLAMA3[5]}
    assert m["file"] == HF_FILE and m["kind"] == "huggingface" and m["vocab_size"] == len(auto)
    carried = out / HF_FILE
    assert find_tokenizer(out) == carried and not (out / SP_FILE).exists()
    assert m["sha256"] == hashlib.sha256(carried.read_bytes()).hexdigest()
    assert carried.read_bytes() == hf_tokenizer_bytes(src)  # a function of the directory
    assert load_tokenizer(carried).sha256 == load_tokenizer(src).sha256 == m["sha256"]


def test_piece_bytes_are_the_texts_utf8_bytes(tmp_path, text):
    tok = load_tokenizer(hf_dir(tmp_path / "hf", text, LLAMA3))
    pieces = tok.piece_bytes()
    assert len(pieces) == tok.vocab_size
    for doc in DOCS:
        ids = tok.encode(doc)
        assert int(pieces[ids].sum()) == len(doc.encode("utf-8")), doc
        assert tok.decode(ids) == doc
    assert pieces[tok.mask_id] == 0 and pieces[tok.eos_id] == 0


def test_piece_bytes_of_a_sentencepiece_style_tokenizer(tmp_path, text):
    """Metaspace (▁ for a space) with byte fallback, its byte pieces in the vocabulary as in a
    converted SentencePiece model; the ▁ it puts before a text counts as one byte, as
    SentencePiece's own does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "</s>", *byte_pieces], show_progress=False))
    src = tmp_path / "sp-style"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(src))
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
    (src / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(src)
    assert tok.mask["source"] == "added"
    for doc in DOCS:
        ids = tok.encode(doc)
        assert int(tok.piece_bytes()[ids].sum()) == len(doc.encode("utf-8")) + 1, doc


def test_an_existing_mask_token_is_the_mask(tmp_path, text):
    src = hf_dir(tmp_path / "hf", text, [*PLAIN, "<|mdm_mask|>", "<|reserved_special_token_0|>"])
    tok = load_tokenizer(src)
    assert tok.mask == {"id": 2, "source": "existing", "token": "<|mdm_mask|>"}
    assert tok.mask_id not in tok.encode("text with <|mdm_mask|> in it")


def test_a_mask_is_added_in_the_models_padding_rows(tmp_path, text):
    size = n_tokens(hf_dir(tmp_path / "plain", text, PLAIN))
    src = hf_dir(tmp_path / "hf", text, PLAIN, model_rows=size + 8)
    tok = load_tokenizer(src)
    assert tok.mask == {"id": size, "source": "added", "token": "<|mdm_mask|>"}
    assert tok.vocab_size == size + 1 and tok.special_ids()["pad"] == tok.eos_id
    assert tok.decode([tok.mask_id]) == "<|mdm_mask|>"
    assert tok.mask_id not in tok.encode("<|mdm_mask|>")
    # without a model (a new one's vocabulary grows by one) it is added too
    (src / "config.json").unlink()
    assert load_tokenizer(src).mask["source"] == "added"


def test_a_tokenizer_with_no_usable_mask_id_is_refused_on_one_line(tmp_path, text, capsys):
    from framework.launch.cli import main

    size = n_tokens(hf_dir(tmp_path / "plain", text, PLAIN))
    src = hf_dir(tmp_path / "full-vocab", text, PLAIN, model_rows=size)
    (tmp_path / "a.txt").write_text("hello\n")
    code = main(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"),
                 "--tokenizer", str(src)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llada: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "full-vocab has no usable mask id" in lines[0]
    assert f"its {size} tokens fill config.json's vocab_size={size} rows" in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("broken, needle", [
    (lambda d: (d / "tokenizer.json").unlink(), "holds no tokenizer"),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json is not JSON"),
    (lambda d: (d / "tokenizer.json").write_text('{"model": 1}'), "tokenizer.json is not a "
     "tokenizer the tokenizers library loads"),
    (lambda d: (d / "tokenizer_config.json").write_text("{}"), "names no EOS token"),
])
def test_a_broken_directory_is_one_error_naming_it(tmp_path, text, broken, needle):
    src = hf_dir(tmp_path / "hf", text, LLAMA3)
    broken(src)
    with pytest.raises(DataConfigError, match="--tokenizer: .*hf") as e:
        load_tokenizer(src, "--tokenizer")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_fingerprint_follows_the_tokenizers_bytes(tmp_path, text):
    a = hf_dir(tmp_path / "a", text, LLAMA3)
    b = hf_dir(tmp_path / "b", text, LLAMA3, vocab_size=380)
    files = [tmp_path / "x.txt"]
    files[0].write_text("x\n")

    def of(model: Path) -> str:
        return fingerprint(PrepareConfig(inputs=[str(files[0])], output=str(tmp_path / "o"),
                                         tokenizer=TokenizerConfig(model=str(model))), files)
    assert of(a) == of(a) != of(b)


def test_sft_turns_in_llama3_and_chatml_layouts(tmp_path, text):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hé"}]
    llama = load_tokenizer(hf_dir(tmp_path / "llama", text, LLAMA3,
                                  bos_token="<|begin_of_text|>", eos_token="<|endoftext|>"))
    (pair,) = ChatFormat(llama).pairs(messages)
    assert llama.decode(pair.tokens.tolist()) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhé<|eot_id|>")
    qwen = load_tokenizer(hf_dir(tmp_path / "qwen", text, QWEN))
    (pair,) = ChatFormat(qwen).pairs(messages)
    assert qwen.decode(pair.tokens[:pair.prompt_len].tolist()) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.decode(pair.tokens[pair.prompt_len:].tolist()) == "hé<|im_end|>"
    with pytest.raises(DataConfigError, match="lacks the chat tokens SFT needs"):
        ChatFormat(load_tokenizer(hf_dir(tmp_path / "plain", text, PLAIN)))


def test_hf_files_load_in_transformers_as_the_same_tokenizer(tmp_path, text):
    from transformers import AutoTokenizer

    tok = load_tokenizer(hf_dir(tmp_path / "hf", text, PLAIN, model_rows=1000))
    out = tmp_path / "export"
    out.mkdir()
    for name, data in tok.hf_files().items():
        (out / name).write_bytes(data)
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.mask_token_id == tok.mask_id and auto.eos_token_id == tok.eos_id
    assert auto(DOCS[0], add_special_tokens=False)["input_ids"] == tok.encode(DOCS[0])


def test_prepare_in_parts_with_a_hugging_face_directory(tmp_path, text):
    from data_pipeline.merge import merge
    from data_pipeline.prepare import prepare_tokenizer

    src = hf_dir(tmp_path / "hf", text, LLAMA3)
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 4))
    out = tmp_path / "data"
    cfg = dict(inputs=[str(inputs)], output=str(out), name="p", seq_len=16, workers=1,
               holdout_fraction=0.3, parts=2)
    # --tokenizer-only carries it; the parts and the merge then find it in OUTPUT
    prepare_tokenizer(PrepareConfig(**cfg, tokenizer=TokenizerConfig(model=str(src))),
                      log=lambda _: None)
    for part in range(2):
        prepare(PrepareConfig(**cfg, part=part), log=lambda _: None)
    manifest = merge(PrepareConfig(**cfg), log=lambda _: None)
    assert manifest["tokenizer"]["file"] == HF_FILE
    assert manifest["tokenizer"]["kind"] == "huggingface"
    assert find_tokenizer(out / "holdout") == out / "holdout" / HF_FILE
    assert (out / "holdout" / HF_FILE).read_bytes() == (out / HF_FILE).read_bytes()
