"""SFT data (../shared/LLADA.md): JSONL conversations -> (tokens, prompt length) pairs, and the
collator that masks responses only.

A record is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` or
``{"prompt": str, "response": str}``. An n-turn dialogue gives n pairs: pair k's prompt is the
conversation up to the k-th assistant turn (earlier replies included), its response that turn.
Turns are rendered with the tokenizer's chat control tokens, which text can never produce:
``<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>`` (Llama 3's layout), after
one BOS; a tokenizer with no end-header token (a Hugging Face one with Qwen's ``<|im_start|>`` and
``<|im_end|>``) gets ChatML's ``<|im_start|>role\\n content <|im_end|>\\n``, after its BOS if it
has one.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from data_pipeline.collate import TrainBatch
from data_pipeline.config import ObjectiveConfig
from data_pipeline.corpus import Report, read_lines, skipper, warn
from data_pipeline.errors import DataConfigError
from data_pipeline.noise import forward_process, sample_noise
from data_pipeline.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class SFTExample(NamedTuple):
    tokens: np.ndarray  # [n] int64: prompt then response (ending with <|eot_id|>)
    prompt_len: int


class ChatFormat:
    def __init__(self, tok: Tokenizer):
        ids = tok.special_ids()
        self.chatml = ids["end_header"] is None and ids["start_header"] is not None
        missing = [k for k in ("start_header", "eot") if ids[k] is None]
        if not self.chatml:  # Llama 3's layout: BOS, then headers closed by their own token
            missing += [k for k in ("end_header", "bos") if ids[k] is None]
        if missing:
            raise DataConfigError(f"tokenizer.model: {tok.path} lacks the chat tokens SFT needs "
                                  f"({', '.join(missing)})")
        self.tok, self.ids = tok, ids
        self.start = [ids["bos"]] if ids["bos"] is not None else []
        self.after_turn = tok.encode("\n") if self.chatml else []

    def header(self, role: str) -> List[int]:
        if self.chatml:
            return [self.ids["start_header"]] + self.tok.encode(role) + self.tok.encode("\n")
        return ([self.ids["start_header"]] + self.tok.encode(role) + [self.ids["end_header"]]
                + self.tok.encode("\n\n"))

    def turn(self, role: str, content: str) -> List[int]:
        return (self.header(role) + self.tok.encode(content) + [self.ids["eot"]]
                + self.after_turn)

    def prompt(self, messages: List[dict]) -> List[int]:
        """The prompt for the next assistant turn after ``messages`` (what generation with the
        chat template starts from): the conversation so far, then the assistant's header."""
        context = list(self.start)
        for m in messages:
            context = context + self.turn(m["role"], m["content"])
        return context + self.header("assistant")

    def pairs(self, messages: List[dict]) -> List[SFTExample]:
        out: List[SFTExample] = []
        context = list(self.start)
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "assistant":
                prompt = context + self.header("assistant")
                response = self.tok.encode(content) + [self.ids["eot"]]
                out.append(SFTExample(np.array(prompt + response, dtype=np.int64), len(prompt)))
            context = context + self.turn(role, content)
        return out


def _messages(record) -> List[dict]:
    if isinstance(record, dict) and "messages" in record:
        msgs = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "response" in record:
        msgs = [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    else:
        raise ValueError("neither 'messages' nor 'prompt' and 'response'")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' is not a non-empty list")
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"a message is not {{'role': {'|'.join(ROLES)}, 'content': str}}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant turn")
    return msgs


def conversation_record(messages: List[dict]) -> str:
    """A conversation as one canonical string (what ``llada prepare --sft`` hashes to choose its
    split): the same conversation gives the same string as messages or as prompt/response, however
    its line is spaced."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def read_conversations(path, counts: Counter, report: Report = warn
                       ) -> Iterator[Tuple[str, List[dict]]]:
    """(where, messages) of every conversation of a JSONL file (``where``: file and line); a line
    that is not one (nor UTF-8, nor readable) is skipped, reported and counted."""
    skip = skipper(counts, report)
    for where, line in read_lines(path, counts, report):
        if not line.strip():
            continue
        try:
            messages = _messages(json.loads(line))
        except ValueError as e:  # json.JSONDecodeError included
            skip("bad_lines", f"{where}: not a conversation ({e}); line skipped")
            continue
        yield where, messages


def read_sft_jsonl(path: Path, tok: Tokenizer, max_len: Optional[int] = None,
                   counts: Optional[Counter] = None) -> Iterator[SFTExample]:
    """The (prompt, response) pairs of a JSONL file; bad lines and over-long pairs skipped with a
    warning naming file and line, and counted."""
    fmt = ChatFormat(tok)
    counts = Counter() if counts is None else counts
    for where, messages in read_conversations(path, counts):
        for k, ex in enumerate(fmt.pairs(messages)):
            if max_len is not None and len(ex.tokens) > max_len:
                counts["too_long"] += 1
                warn("too_long", f"{where}: turn {k + 1} has {len(ex.tokens)} tokens, "
                     f"more than {max_len}; skipped")
                continue
            yield ex


# ---------------------------------------------------------------- the SFT sample of a shard
# One definition of how a pair is stored (``llada prepare --sft`` writes it, the loader and the
# held-out reader read it): a 1-D array of seq_len + 1 ids, the prompt length first, then the
# pair's tokens padded with EOS to seq_len (the padding is response: SFT trains on it).


def sft_sample(ex: SFTExample, seq_len: int, eos_id: int, dtype) -> np.ndarray:
    """The stored form of a pair that fits (``len(ex.tokens) <= seq_len``, a prompt shorter
    than it)."""
    if not 0 < ex.prompt_len < len(ex.tokens) <= seq_len:
        raise ValueError(f"a pair of {len(ex.tokens)} tokens with a prompt of {ex.prompt_len} "
                         f"does not fit a sequence of {seq_len}")
    out = np.full(seq_len + 1, eos_id, dtype=dtype)
    out[0] = ex.prompt_len
    out[1:1 + len(ex.tokens)] = ex.tokens
    return out


def split_sft(rows):
    """(prompt lengths [b], tokens [b, seq_len]) of stored SFT samples [b, seq_len + 1]
    (numpy arrays or tensors)."""
    return rows[:, 0], rows[:, 1:]


def sft_sample_problem(row: np.ndarray, seq_len: int) -> Optional[str]:
    """What is wrong with a stored SFT sample's prompt length, if anything."""
    prompt_len = int(row[0])
    if not 0 < prompt_len < seq_len:
        return f"prompt length {prompt_len} is not in [1, {seq_len})"
    return None


class SFTCollator:
    """Stored pairs -> the training batch: the prompt is never masked, the response (its EOS
    padding included: masked and trained on, which teaches the model to stop) is masked at a
    per-sequence ratio, and each sequence's loss is divided by its response length.

    The paper pads each mini-batch to its longest pair; every pair here is padded to the dataset's
    sequence length instead, so a pair's loss never depends on which others share its micro-batch
    (the same under every layout and accumulation) and pipeline stages always see one shape.
    Choose data.seq_len near the longest pairs. No 1% cut: a cut would drop responses."""

    def __init__(self, cfg: ObjectiveConfig, mask_id: int):
        self.cfg, self.mask_id = cfg, mask_id

    def __call__(self, rows: torch.Tensor, index: torch.Tensor, step: int) -> TrainBatch:
        prompt_len, tokens = split_sft(rows)
        tokens = tokens.contiguous()
        length = tokens.shape[1]
        noise = sample_noise(index, length, self.cfg.seed, self.cfg.t_sampling)
        noisy, mask, p_mask = forward_process(tokens, noise, self.mask_id, self.cfg.eps)
        prompt = torch.arange(length)[None, :] < prompt_len[:, None]
        mask &= ~prompt  # the prompt is restored after masking
        noisy = torch.where(prompt, tokens, noisy)
        return TrainBatch(noisy, tokens, mask, p_mask, (length - prompt_len).float(), index, step)
