"""A Hugging Face tokenizer (a directory with ``tokenizer.json``, read through the ``tokenizers``
library) as a dataset's tokenizer, beside SentencePiece (data_pipeline/tokenizer.py).

A dataset carries it as one self-contained JSON file, HF_FILE, that we write:
``{"format", "version", "special_ids", "mask": {"id", "source", "token"}, "chat_template",
"tokenizer": <the tokenizer.json object>}`` with sorted keys and fixed separators, so its bytes
(and the sha256 manifests and checkpoints compare) are a function of the source directory. A
wrapper, not extra keys in tokenizer.json: the library refuses those.

The mask token LLaDA needs, in this order: a ``<|mdm_mask|>``/``<|mask|>`` token (or the
config's mask_token) that exists as a special token ("existing"); else the first reserved or
unused special token (Llama 3's ``<|reserved_special_token_N|>``) ("reserved"); else a new
special token ``<|mdm_mask|>`` at the first id past the tokenizer ("added"), which a model
directory allows only in the padding rows of its embedding (config.json vocab_size).

Text never produces a special token here (``encode_special_tokens``): a document holding
"<|endoftext|>" or a reserved token's text is encoded as that text, so the mask never occurs in
data and no turn boundary can be forged, as with SentencePiece's control symbols. Otherwise the
ids are the library's own (``add_special_tokens=False``: no BOS).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_pipeline.errors import DataConfigError
from data_pipeline.tokenizer import (CHAT_PIECES, HF_FILE, HF_SOURCE, MASK_PIECE, BatchEncoder,
                                     Tokenizer)

FORMAT = "llada-hf-tokenizer"
VERSION = 1
MASK_NAMES = (MASK_PIECE, "<|mask|>")  # an existing token of these names is the mask
QWEN_CHAT = {"start_header": "<|im_start|>", "end_header": None, "eot": "<|im_end|>"}
ROLES = ("mask", "eos", "pad", "bos", "unk", "start_header", "end_header", "eot")


def _read_json(path: Path, key: str, required: bool = False) -> Optional[dict]:
    if not path.is_file():
        if required:
            raise DataConfigError(f"{key}: {path} not found (a Hugging Face tokenizer directory "
                                  f"has a {HF_SOURCE})")
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataConfigError(f"{key}: {path} is not JSON ({' '.join(str(e).split())[:120]})"
                              ) from None
    if not isinstance(obj, dict):
        raise DataConfigError(f"{key}: {path} is not a JSON object")
    return obj


def _backend(inner_json: str, where: Path, key: str):
    """The ``tokenizers`` object of a tokenizer.json text, set up as we encode: special-token
    text as text, never truncated or padded (a tokenizer.json may ask for either)."""
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_str(inner_json)
    except Exception as e:  # the library raises plain Exceptions
        raise DataConfigError(f"{key}: {where} is not a tokenizer the tokenizers library loads "
                              f"({' '.join(str(e).split())[:160]})") from None
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


def backend_encoder(inner_json: str) -> BatchEncoder:
    """A prepare worker's encoder (tokenizer.batch_encoder): documents -> ids, no BOS."""
    backend = _backend(inner_json, Path(HF_FILE), "tokenizer")

    def encode(docs: List[str]) -> List[List[int]]:
        return [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)] if docs else []
    return encode


def _size(backend) -> int:
    """The ids the tokenizer can produce: one past its largest, added tokens included."""
    return max(backend.get_vocab(with_added_tokens=True).values()) + 1


def _content(value) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_id(backend, config: dict, name: str, src: Path, key: str,
              required: bool = False) -> Optional[int]:
    """The id of tokenizer_config.json's ``name`` (eos_token, ...), None where it names none
    (or, unless ``required``, one the tokenizer lacks: transformers would add it, at an id no
    model of this tokenizer was trained with)."""
    content = _content(config.get(name))
    if content is None:
        return None
    i = backend.token_to_id(content)
    if i is None and required:
        raise DataConfigError(f"{key}: {src / 'tokenizer_config.json'}'s {name} {content!r} is "
                              f"not a token of its {HF_SOURCE}")
    return i


def _eos(backend, config: dict, model_cfg: dict, src: Path, key: str) -> int:
    eos = _token_id(backend, config, "eos_token", src, key, required=True)
    if eos is None:  # a model directory says it in config.json
        ids = model_cfg.get("eos_token_id")
        eos = ids[0] if isinstance(ids, list) and ids else ids
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise DataConfigError(f"{key}: {src} names no EOS token (tokenizer_config.json eos_token "
                              "or config.json eos_token_id); LLaDA joins documents with it")
    if not 0 <= eos < _size(backend):
        raise DataConfigError(f"{key}: {src / 'config.json'}'s eos_token_id {eos} is not an id "
                              f"of its {HF_SOURCE}")
    return eos


def _chat_ids(backend) -> Dict[str, Optional[int]]:
    """Llama 3's header and end-of-turn tokens where it has them, else Qwen's (no end-header
    token: a Qwen header ends with a newline)."""
    pieces = CHAT_PIECES if backend.token_to_id(CHAT_PIECES["start_header"]) is not None \
        else QWEN_CHAT
    return {name: None if piece is None else backend.token_to_id(piece)
            for name, piece in pieces.items()}


def _reserved(content: str) -> bool:
    """Llama 3's <|reserved_special_token_N|>, <|reserved_N|>, BERT-like [unusedN], ..."""
    low = content.lower()
    return "reserved" in low or "unused" in low


def _mask(backend, config: dict, taken: set, rows: Optional[int], src: Path, key: str) -> dict:
    """The mask token's {"id", "source", "token"} by the policy of the module docstring."""
    special = {t.content: i for i, t in sorted(backend.get_added_tokens_decoder().items())
               if t.special}
    named = [*MASK_NAMES, _content(config.get("mask_token"))]
    for name in named:
        if name is not None and name in special:
            return {"id": special[name], "source": "existing", "token": name}
    for content, i in special.items():  # in id order: the first reserved one
        if _reserved(content) and i not in taken:
            return {"id": i, "source": "reserved", "token": content}
    size = _size(backend)
    if rows is None or size < rows:  # a new model grows by a row; a model's padding row is free
        return {"id": size, "source": "added", "token": MASK_PIECE}
    raise DataConfigError(f"{key}: {src} has no usable mask id: no {'/'.join(MASK_NAMES)} token, "
                          f"no reserved token, and its {size} tokens fill config.json's "
                          f"vocab_size={rows} rows")


def _with_mask(inner: dict, mask: dict) -> dict:
    """The tokenizer.json object with an added mask token appended as a special token."""
    token = {"id": mask["id"], "content": mask["token"], "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
    return {**inner, "added_tokens": [*inner.get("added_tokens", []), token]}


def _chat_template(config: dict, src: Path) -> Optional[str]:
    """tokenizer_config.json's template (a string, or named ones: the default), else a
    chat_template.jinja beside it (how recent transformers saves it)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if isinstance(template, str):
        return template
    jinja = src / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def canonical(wrapper: dict) -> bytes:
    """The carried bytes: the same object always gives the same bytes."""
    return json.dumps(wrapper, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                      ).encode("utf-8")


def hf_tokenizer_bytes(src: Path, model_rows: Optional[int] = None,
                       key: str = "tokenizer") -> bytes:
    """The HF_FILE wrapper of the Hugging Face directory ``src``: tokenizer.json (required),
    tokenizer_config.json (the roles' tokens, mask_token, chat_template), config.json (a model's:
    vocab_size is its embedding's rows, unless ``model_rows`` says)."""
    src = Path(src)
    inner = _read_json(src / HF_SOURCE, key, required=True)
    config = _read_json(src / "tokenizer_config.json", key) or {}
    model_cfg = _read_json(src / "config.json", key) or {}
    backend = _backend(json.dumps(inner), src / HF_SOURCE, key)
    rows = model_rows if model_rows is not None else model_cfg.get("vocab_size")
    eos = _eos(backend, config, model_cfg, src, key)
    pad = _token_id(backend, config, "pad_token", src, key)
    roles = {"eos": eos, "pad": eos if pad is None else pad,  # LLaDA pads with EOS
             "bos": _token_id(backend, config, "bos_token", src, key),
             "unk": _token_id(backend, config, "unk_token", src, key), **_chat_ids(backend)}
    mask = _mask(backend, config, {i for i in roles.values() if i is not None},
                 rows if isinstance(rows, int) else None, src, key)
    if mask["source"] == "added":
        inner = _with_mask(inner, mask)
    return canonical({"format": FORMAT, "version": VERSION,
                      "special_ids": {"mask": mask["id"], **roles}, "mask": mask,
                      "chat_template": _chat_template(config, src), "tokenizer": inner})


# ------------------------------------------------------------------- the bytes of each id


@lru_cache(maxsize=1)
def _unicode_to_byte() -> Dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table, which byte-level BPE (GPT-2, Qwen, Llama 3)
    spells its pieces in: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def _types(component) -> set:
    """Every component type named in a tokenizer.json part (a decoder, a Sequence of them)."""
    if isinstance(component, dict):
        found = {component["type"]} if isinstance(component.get("type"), str) else set()
        return found.union(*(_types(v) for v in component.values()))
    if isinstance(component, list):
        return set().union(*(_types(v) for v in component))
    return set()


def _piece_style(inner: dict) -> str:
    """How a vocabulary piece spells its text: "bytelevel", "metaspace" (SentencePiece-like:
    ▁ for a space, <0xNN> byte fallback) or, for anything else, "decode" (each id decoded alone:
    right for whole characters, approximate where a piece is part of one)."""
    types = _types(inner.get("decoder"))
    if "ByteLevel" in types:
        return "bytelevel"
    if types & {"Metaspace", "ByteFallback"} or "\u2581" in json.dumps(inner.get("decoder")):
        return "metaspace"
    return "decode"


def _byte_piece(piece: str) -> bool:
    """A SentencePiece byte-fallback piece, <0xNN>: one byte of text."""
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _metaspace_bytes(piece: str) -> int:
    return 1 if _byte_piece(piece) else len(piece.replace("\u2581", " ").encode("utf-8"))


def _vocab_bytes(backend, style: str) -> Dict[int, int]:
    table = _unicode_to_byte()
    out = {}
    for piece, i in backend.get_vocab(with_added_tokens=False).items():
        if style == "bytelevel":
            out[i] = sum(1 if ch in table else len(ch.encode("utf-8")) for ch in piece)
        elif style == "metaspace":
            out[i] = _metaspace_bytes(piece)
        else:
            out[i] = len(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


# --------------------------------------------------------------------------- the tokenizer


class HFTokenizer(Tokenizer):
    kind = "huggingface"
    file_name = HF_FILE

    def __init__(self, wrapper: dict, raw: bytes, path: Path, key: str):
        self.wrapper, self._raw, self.path = wrapper, raw, path
        self._inner_json = json.dumps(wrapper["tokenizer"])
        self.backend = _backend(self._inner_json, path, key)
        self._size = _size(self.backend)

    @classmethod
    def from_directory(cls, src: Path, key: str = "tokenizer",
                       model_rows: Optional[int] = None) -> "HFTokenizer":
        """A Hugging Face directory, wrapped in memory as it would be carried."""
        return cls.from_bytes(hf_tokenizer_bytes(src, model_rows, key), Path(src), key)

    @classmethod
    def from_bytes(cls, raw: bytes, path: Path, key: str = "tokenizer") -> "HFTokenizer":
        """A carried HF_FILE's bytes (``path``: where they are, for errors)."""
        try:
            wrapper = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataConfigError(f"{key}: {path} is not JSON ({' '.join(str(e).split())[:120]})"
                                  ) from None
        problem = _wrapper_problem(wrapper)
        if problem:
            raise DataConfigError(f"{key}: {path} is not a {FORMAT} file ({problem})")
        return cls(wrapper, raw, Path(path), key)

    @property
    def vocab_size(self) -> int:
        return self._size

    def special_ids(self) -> Dict[str, Optional[int]]:
        ids = self.wrapper["special_ids"]
        return {name: ids.get(name) for name in ROLES}

    @property
    def mask(self) -> dict:
        """{"id", "source": "existing" | "reserved" | "added", "token"}."""
        return dict(self.wrapper["mask"])

    @property
    def chat_template(self) -> Optional[str]:
        return self.wrapper.get("chat_template")

    def data(self) -> bytes:
        return self._raw

    def manifest_entry(self) -> dict:
        return {**super().manifest_entry(), "mask": self.mask}

    def piece_bytes(self) -> np.ndarray:
        """Exact UTF-8 bytes per id for byte-level and SentencePiece-like tokenizers (as with
        SentencePiece, a word-boundary mark the tokenizer prepends to a text counts as its
        space); an added token its text, a special one (the mask, EOS, ...) none."""
        style = _piece_style(self.wrapper["tokenizer"])
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i, n in _vocab_bytes(self.backend, style).items():
            out[i] = n
        for i, token in self.backend.get_added_tokens_decoder().items():
            if style == "metaspace" and _byte_piece(token.content):
                out[i] = 1  # byte pieces declared special still stand for a byte
            else:
                out[i] = 0 if token.special else len(token.content.encode("utf-8"))
        return out

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def worker_args(self) -> Tuple[str, str]:
        return self.kind, self._inner_json

    def hf_files(self) -> Dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json of a directory that transformers'
        AutoTokenizer loads as this tokenizer (its mask token included), for an export."""
        ids = self.special_ids()
        names = {"eos_token": ids["eos"], "bos_token": ids["bos"], "pad_token": ids["pad"],
                 "unk_token": ids["unk"], "mask_token": ids["mask"]}
        config = {name: self.backend.id_to_token(i) for name, i in names.items()
                  if i is not None}
        config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return {HF_SOURCE: _pretty(self.wrapper["tokenizer"]),
                "tokenizer_config.json": _pretty(config)}


def _pretty(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _wrapper_problem(w) -> Optional[str]:
    """What makes ``w`` not our wrapper, if anything."""
    if not isinstance(w, dict):
        return "not a JSON object"
    if w.get("format") != FORMAT:
        if "model" in w:
            return f"a bare {HF_SOURCE}: give its directory, with its tokenizer_config.json"
        return f"format {w.get('format')!r}"
    if w.get("version") != VERSION:
        return f"version {w.get('version')!r}, expected {VERSION}"
    ids, mask = w.get("special_ids"), w.get("mask")
    if not isinstance(ids, dict) or not isinstance(w.get("tokenizer"), dict):
        return "no special_ids or tokenizer object"
    if not isinstance(ids.get("mask"), int) or not isinstance(ids.get("eos"), int):
        return "no mask or EOS id"
    if not isinstance(mask, dict) or mask.get("id") != ids["mask"]:
        return "its mask entry does not match special_ids"
    return None
