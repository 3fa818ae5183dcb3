"""SentencePiece tokenizer with the special tokens LLaDA needs.

The mask token is a *control* symbol: encoding text can never produce it, so it never occurs in
data. Trained once per run directory from a sample of the corpus and cached there.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List

import sentencepiece as spm

from framework.config import ConfigError, DataConfig
from data_pipeline.corpus import corpus_files, read_documents

MASK_PIECE = "<|mdm_mask|>"


@dataclass
class Tokenizer:
    sp: spm.SentencePieceProcessor
    path: Path

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def mask_id(self) -> int:
        return self.sp.piece_to_id(MASK_PIECE)

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode(ids)


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise ConfigError(f"data.tokenizer_model: file not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer_model: {path} is not a SentencePiece model ({e})") from None
    tok = Tokenizer(sp, path)
    if sp.piece_to_id(MASK_PIECE) == sp.unk_id():
        raise ConfigError(f"data.tokenizer_model: {path} has no mask token {MASK_PIECE}")
    if tok.eos_id < 0:
        raise ConfigError(f"data.tokenizer_model: {path} has no EOS token")
    return tok


def _training_sample(cfg: DataConfig, seed: int) -> str:
    """A seeded sample of whole documents up to tokenizer_train_bytes, as training lines."""
    files = corpus_files(cfg)
    random.Random(seed).shuffle(files)
    out, size = [], 0
    for path in files:
        for doc in read_documents(path, cfg.jsonl_text_field):
            lines = [line for line in doc.splitlines() if line.strip()]
            out.extend(lines)
            size += sum(len(line) for line in lines)
            if size >= cfg.tokenizer_train_bytes:
                return "\n".join(out)
    return "\n".join(out)


def train_tokenizer(cfg: DataConfig, out_dir: Path) -> Tokenizer:
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = _training_sample(cfg, cfg.seed)
    spm.set_random_generator_seed(cfg.seed + 1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample.splitlines()),
        model_writer=model,
        vocab_size=cfg.tokenizer_vocab_size,
        model_type="bpe",
        byte_fallback=True,  # any byte sequence encodes; no <unk> in training data
        character_coverage=1.0,
        normalization_rule_name="identity",  # code: keep every space and character as is
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # EOS doubles as padding (LLaDA)
        control_symbols=[MASK_PIECE],
        user_defined_symbols=["\n"],  # lines are training sentences; keep newlines one token
        num_threads=1,  # deterministic merges
        minloglevel=2,
    )
    # write-then-rename: a crash never leaves a truncated model under the cached name
    final = out_dir / "spm.model"
    tmp = final.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(final)
    return load_tokenizer(final)


def get_tokenizer(cfg: DataConfig, run_dir: Path) -> Tokenizer:
    """The recipe's tokenizer, or the one trained on the corpus and cached under the run dir."""
    if cfg.tokenizer_model:
        return load_tokenizer(Path(cfg.tokenizer_model))
    cached = run_dir / "tokenizer" / "spm.model"
    if cached.is_file():
        return load_tokenizer(cached)
    return train_tokenizer(cfg, cached.parent)
