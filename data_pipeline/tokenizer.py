"""The tokenizer a dataset is cut with: a SentencePiece model (trained here, or given) or a
Hugging Face tokenizer (data_pipeline/hf_tokenizer.py), with the special tokens LLaDA needs.

A dataset (and a checkpoint) carries its tokenizer as one file beside its manifest: SP_FILE for
SentencePiece, HF_FILE for a Hugging Face tokenizer (a self-contained wrapper of its
tokenizer.json, special ids and mask policy). The manifest's ``tokenizer.file`` names which;
``find_tokenizer`` finds it in a directory. Its sha256 is of exactly those bytes.

SentencePiece's mask and chat tokens are *control* symbols: encoding text can never produce
them, so the mask never occurs in data and a user cannot forge a turn boundary; a Hugging Face
tokenizer is made to encode special-token text as plain text for the same reason. EOS doubles as
padding (LLaDA). Their ids are recorded in every dataset manifest.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import sentencepiece as spm

from data_pipeline.config import TokenizerConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.corpus import read_documents
from data_pipeline.files import atomic_write

MASK_PIECE = "<|mdm_mask|>"
CHAT_PIECES = {"start_header": "<|start_header_id|>", "end_header": "<|end_header_id|>",
               "eot": "<|eot_id|>"}
SP_FILE = "tokenizer.model"  # a carried SentencePiece model
HF_FILE = "tokenizer.hf.json"  # a carried Hugging Face tokenizer (hf_tokenizer.py's wrapper)
TOKENIZER_FILES = (SP_FILE, HF_FILE)
HF_SOURCE = "tokenizer.json"  # what makes a directory a Hugging Face tokenizer's

BatchEncoder = Callable[[List[str]], List[List[int]]]


class Tokenizer(ABC):
    """What the pipeline and the framework use of a tokenizer, whichever its kind."""

    kind: str = ""  # "sentencepiece" | "huggingface", as manifests record it
    file_name: str = ""  # the name it is carried under beside a manifest
    path: Path  # where it was loaded from

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The ids it can produce, special ones included: model.vocab_size must be at least
        this."""

    @abstractmethod
    def special_ids(self) -> Dict[str, Optional[int]]:
        """mask, eos, pad, bos, unk, start_header, end_header, eot: None where it lacks one
        (chat tokens are optional for pretraining; SFT refuses a tokenizer without them)."""

    @abstractmethod
    def data(self) -> bytes:
        """The bytes of the carried file."""

    @abstractmethod
    def piece_bytes(self) -> np.ndarray:
        """[vocab_size] the UTF-8 bytes of text each id stands for (bits per byte divides by
        their sum); special ids none."""

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        """The ids of ``text``, no BOS or EOS added."""

    @abstractmethod
    def decode(self, ids: List[int]) -> str:
        """The text of ``ids``."""

    @abstractmethod
    def worker_args(self) -> Tuple[str, str]:
        """What a forked prepare worker builds its own encoder from (``batch_encoder``)."""

    @property
    def mask_id(self) -> Optional[int]:
        return self.special_ids()["mask"]

    @property
    def eos_id(self) -> int:
        return self.special_ids()["eos"]

    @property
    def bos_id(self) -> Optional[int]:
        return self.special_ids()["bos"]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data()).hexdigest()

    def manifest_entry(self) -> dict:
        """The manifest's ``tokenizer`` entry."""
        return {"file": self.file_name, "kind": self.kind, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "special_ids": self.special_ids()}


@dataclass
class SentencePieceTokenizer(Tokenizer):
    sp: spm.SentencePieceProcessor
    path: Path

    kind = "sentencepiece"
    file_name = SP_FILE

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _control(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() else i

    def special_ids(self) -> Dict[str, Optional[int]]:
        eos, bos = self.sp.eos_id(), self.sp.bos_id()
        ids = {"mask": self._control(MASK_PIECE), "eos": eos, "pad": eos,
               "bos": bos if bos >= 0 else None, "unk": self.sp.unk_id()}
        ids.update({name: self._control(piece) for name, piece in CHAT_PIECES.items()})
        return ids

    def data(self) -> bytes:
        return self.path.read_bytes()

    def piece_bytes(self) -> np.ndarray:
        """A byte-fallback piece one byte, a control or unknown piece none, any other its text
        with SentencePiece's word-boundary mark as the space it encodes."""
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

    def worker_args(self) -> Tuple[str, str]:
        return self.kind, str(self.path)


def batch_encoder(args: Tuple[str, str]) -> BatchEncoder:
    """In a forked worker: documents -> their ids (no BOS, no EOS), from ``worker_args``. The
    tokenizer is loaded here, not inherited, so a worker never shares the parent's state."""
    kind, payload = args
    if kind == SentencePieceTokenizer.kind:
        return spm.SentencePieceProcessor(model_file=payload).encode
    # one process per CPU already: a worker's own thread pool would only oversubscribe them
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from data_pipeline.hf_tokenizer import backend_encoder
    return backend_encoder(payload)


def find_tokenizer(directory: Path, key: str = "tokenizer") -> Optional[Path]:
    """The tokenizer file carried in ``directory`` (a dataset's, a checkpoint step's), or None;
    both kinds there is an error (which would the ids mean?)."""
    found = [Path(directory) / name for name in TOKENIZER_FILES
             if (Path(directory) / name).is_file()]
    if len(found) > 1:
        raise DataConfigError(f"{key}: {directory} holds both {SP_FILE} and {HF_FILE}; exactly "
                              "one tokenizer may be there")
    return found[0] if found else None


def hf_tokenizer_bytes(src_dir: Path, model_rows: Optional[int] = None,
                       key: str = "tokenizer") -> bytes:
    """The carried HF_FILE of a Hugging Face tokenizer directory (data_pipeline/hf_tokenizer.py)."""
    from data_pipeline.hf_tokenizer import hf_tokenizer_bytes as build
    return build(Path(src_dir), model_rows, key)


def _in_directory(path: Path, key: str) -> Optional[Path]:
    """The file to load of a directory: its carried tokenizer, or None for a Hugging Face
    directory (tokenizer.json; a SentencePiece tokenizer.model beside it, as Llama 2's
    directories ship, is not ours and not read)."""
    if (path / HF_FILE).is_file() or not (path / HF_SOURCE).is_file():
        found = find_tokenizer(path, key)
        if found is None:
            raise DataConfigError(f"{key}: {path} holds no tokenizer ({HF_SOURCE}, {SP_FILE} or "
                                  f"{HF_FILE})")
        return found
    return None


def load_tokenizer(path: Path, key: str = "tokenizer.model") -> Tokenizer:
    """A SentencePiece model file, a carried HF_FILE, or a directory (a Hugging Face tokenizer's,
    wrapped in memory; or one holding SP_FILE or HF_FILE). It must have a mask token and an EOS;
    anything else is an error naming ``key`` and the file."""
    from data_pipeline import hf_tokenizer

    path = Path(path)
    if path.is_dir():
        found = _in_directory(path, key)
        if found is None:
            return hf_tokenizer.HFTokenizer.from_directory(path, key)
        path = found
    if not path.is_file():
        raise DataConfigError(f"{key}: file not found: {path}")
    if path.name == HF_SOURCE:  # a tokenizer.json: its directory says the rest
        return hf_tokenizer.HFTokenizer.from_directory(path.parent, key)
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":  # JSON: never a SentencePiece model (a protobuf)
        return hf_tokenizer.HFTokenizer.from_bytes(data, path, key)
    return _load_sentencepiece(path, key)


def _load_sentencepiece(path: Path, key: str) -> SentencePieceTokenizer:
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise DataConfigError(f"{key}: {path} is not a SentencePiece model nor a Hugging Face "
                              f"tokenizer ({msg})") from None
    tok = SentencePieceTokenizer(sp, path)
    if tok.mask_id is None:
        raise DataConfigError(f"{key}: {path} has no mask token {MASK_PIECE}; LLaDA needs one")
    if tok.eos_id < 0:
        raise DataConfigError(f"{key}: {path} has no EOS token")
    return tok


def carry(tok: Tokenizer, directory: Path) -> Path:
    """``tok``'s file in ``directory`` (unless it is there already, byte for byte), the other
    kind's removed: a dataset carries exactly one tokenizer."""
    path = Path(directory) / tok.file_name
    data = tok.data()
    if not path.is_file() or path.read_bytes() != data:
        atomic_write(path, data)
    for name in TOKENIZER_FILES:
        if name != tok.file_name:
            (Path(directory) / name).unlink(missing_ok=True)
    return path


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


def tokenizer_for(files: List[Path], cfg: TokenizerConfig, out_dir: Path,
                  text_field: str = "text") -> Tokenizer:
    """The tokenizer ``out_dir`` carries: cfg.model's (a SentencePiece .model, a carried
    HF_FILE or a Hugging Face directory) copied there, or a SentencePiece model trained there;
    loaded back from the carried file."""
    out_dir = Path(out_dir)
    if cfg.model:
        return load_tokenizer(carry(load_tokenizer(Path(cfg.model), "tokenizer.model"), out_dir))
    tok = train_tokenizer(files, cfg, out_dir / SP_FILE, text_field)
    (out_dir / HF_FILE).unlink(missing_ok=True)  # one tokenizer per dataset
    return tok
