"""SentencePiece tokenizer with the special tokens LLaDA needs.

The mask and the chat tokens are *control* symbols: encoding text can never produce them, so the
mask never occurs in data and a user cannot forge a turn boundary. EOS doubles as padding (LLaDA).
Their ids are recorded in every dataset manifest.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import sentencepiece as spm

from data_pipeline.config import TokenizerConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.corpus import read_documents
from data_pipeline.files import atomic_write

MASK_PIECE = "<|mdm_mask|>"
CHAT_PIECES = {"start_header": "<|start_header_id|>", "end_header": "<|end_header_id|>",
               "eot": "<|eot_id|>"}


@dataclass
class Tokenizer:
    sp: spm.SentencePieceProcessor
    path: Path

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _control(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() else i

    @property
    def mask_id(self) -> int:
        return self._control(MASK_PIECE)

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> Optional[int]:
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def special_ids(self) -> Dict[str, Optional[int]]:
        """What a manifest records: None where the model lacks the token (chat tokens are
        optional for pretraining; SFT refuses a tokenizer without them)."""
        ids = {"mask": self.mask_id, "eos": self.eos_id, "pad": self.eos_id, "bos": self.bos_id,
               "unk": self.sp.unk_id()}
        ids.update({name: self._control(piece) for name, piece in CHAT_PIECES.items()})
        return ids

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def piece_bytes(self) -> np.ndarray:
        """[vocab] the UTF-8 bytes of text each piece stands for (bits per byte divides by
        their sum): a byte-fallback piece one byte, a control or unknown piece none, any other
        its text with SentencePiece's word-boundary mark as the space it encodes."""
        sp = self.sp
        out = np.zeros(sp.get_piece_size(), dtype=np.int64)
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                out[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode(ids)


def load_tokenizer(path: Path, key: str = "tokenizer.model") -> Tokenizer:
    """A SentencePiece model that has a mask token and an EOS; anything else is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"{key}: file not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise DataConfigError(f"{key}: {path} is not a SentencePiece model ({msg})") from None
    tok = Tokenizer(sp, path)
    if tok.mask_id is None:
        raise DataConfigError(f"{key}: {path} has no mask token {MASK_PIECE}; LLaDA needs one")
    if tok.eos_id < 0:
        raise DataConfigError(f"{key}: {path} has no EOS token")
    return tok


def _training_sample(files: List[Path], cfg: TokenizerConfig, text_field: str) -> List[str]:
    """A seeded sample of whole documents up to cfg.train_bytes, as training lines."""
    order = list(files)
    random.Random(cfg.seed).shuffle(order)
    out: List[str] = []
    size = 0
    for path in order:  # bad input is reported when the data itself is tokenised
        for doc in read_documents(path, text_field, report=None):
            lines = [line for line in doc.splitlines() if line.strip()]
            out.extend(lines)
            size += sum(len(line) for line in lines)
            if size >= cfg.train_bytes:
                return out
    return out


def train_tokenizer(files: List[Path], cfg: TokenizerConfig, out_path: Path,
                    text_field: str = "text") -> Tokenizer:
    """BPE with byte fallback (any byte sequence encodes, no <unk> in data), identity
    normalisation (code keeps every space), unk 0, BOS 1, EOS 2, then the control symbols."""
    sample = _training_sample(files, cfg, text_field)
    if not sample:
        raise DataConfigError(f"tokenizer: no text to train on in {len(files)} input files")
    spm.set_random_generator_seed(cfg.seed + 1)
    model = io.BytesIO()
    try:
        _train(sample, model, cfg)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (32000). Please set it to <= N"
        msg = " ".join(str(e).split())
        raise DataConfigError(f"tokenizer.vocab_size: SentencePiece training failed: "
                              f"{msg[msg.find(']') + 1:].strip()[:200]}") from None
    atomic_write(out_path, model.getvalue())
    return load_tokenizer(out_path)


def _train(sample: List[str], model: io.BytesIO, cfg: TokenizerConfig) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=model,
        vocab_size=cfg.vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # EOS doubles as padding (LLaDA)
        control_symbols=[MASK_PIECE, *CHAT_PIECES.values()],
        user_defined_symbols=["\n"],  # lines are training sentences; keep newlines one token
        num_threads=1,  # deterministic merges
        minloglevel=2,
    )


def tokenizer_for(files: List[Path], cfg: TokenizerConfig, out_path: Path,
                  text_field: str = "text") -> Tokenizer:
    """cfg.model copied to out_path (the dataset carries its tokenizer), or one trained there."""
    if cfg.model:
        data = load_tokenizer(Path(cfg.model), "tokenizer.model").path.read_bytes()
        if not out_path.is_file() or out_path.read_bytes() != data:
            atomic_write(out_path, data)
        return load_tokenizer(out_path)
    return train_tokenizer(files, cfg, out_path, text_field)
