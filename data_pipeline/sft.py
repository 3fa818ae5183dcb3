"""SFT data (../shared/LLADA.md): JSONL conversations -> (tokens, prompt length) pairs, and the
collator that masks responses only.

A record is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` or
``{"prompt": str, "response": str}``. An n-turn dialogue gives n pairs: pair k's prompt is the
conversation up to the k-th assistant turn (earlier replies included), its response that turn.
Turns are rendered with the tokenizer's chat control tokens, which text can never produce:
``<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>``, after one BOS.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

import numpy as np
import torch

from data_pipeline.config import ObjectiveConfig
from data_pipeline.corpus import read_lines, warn
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
        missing = [k for k in ("start_header", "end_header", "eot") if ids[k] is None]
        if missing or ids["bos"] is None:
            raise DataConfigError(f"tokenizer.model: {tok.path} lacks the chat tokens SFT needs "
                                  f"({', '.join(missing) or 'bos'})")
        self.tok, self.ids = tok, ids

    def header(self, role: str) -> List[int]:
        return ([self.ids["start_header"]] + self.tok.encode(role) + [self.ids["end_header"]]
                + self.tok.encode("\n\n"))

    def turn(self, role: str, content: str) -> List[int]:
        return self.header(role) + self.tok.encode(content) + [self.ids["eot"]]

    def prompt(self, messages: List[dict]) -> List[int]:
        """The prompt for the next assistant turn after ``messages`` (what generation with the
        chat template starts from): the conversation so far, then the assistant's header."""
        context = [self.ids["bos"]]
        for m in messages:
            context = context + self.turn(m["role"], m["content"])
        return context + self.header("assistant")

    def pairs(self, messages: List[dict]) -> List[SFTExample]:
        out: List[SFTExample] = []
        context = [self.ids["bos"]]
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


def read_sft_jsonl(path: Path, tok: Tokenizer, max_len: Optional[int] = None,
                   counts: Optional[Counter] = None) -> Iterator[SFTExample]:
    """The (prompt, response) pairs of a JSONL file; bad lines and over-long pairs skipped with a
    warning naming file and line, and counted."""
    import json

    fmt = ChatFormat(tok)
    counts = Counter() if counts is None else counts
    for where, line in read_lines(path, counts):
        if not line.strip():
            continue
        try:
            pairs = fmt.pairs(_messages(json.loads(line)))
        except ValueError as e:  # json.JSONDecodeError included
            counts["bad_lines"] += 1
            warn("bad_lines", f"{where}: not a conversation ({e}); line skipped")
            continue
        for k, ex in enumerate(pairs):
            if max_len is not None and len(ex.tokens) > max_len:
                counts["too_long"] += 1
                warn("too_long", f"{where}: turn {k + 1} has {len(ex.tokens)} tokens, "
                     f"more than {max_len}; skipped")
                continue
            yield ex


class SFTBatch(NamedTuple):
    noisy: torch.Tensor  # [b, l] prompt intact, response positions masked with p_mask
    targets: torch.Tensor  # [b, l] clean tokens (responses padded with EOS)
    mask: torch.Tensor  # [b, l] bool, masked response positions (EOS padding included)
    p_mask: torch.Tensor  # [b]
    response_len: torch.Tensor  # [b] response length with padding: the loss divides by it
    index: torch.Tensor  # [b] global sample indices (the noise seeds)


class SFTCollator:
    """Pads a batch with EOS to its longest pair (the padding is response: masked and trained on,
    which teaches the model to stop), masks response tokens only, at a per-sequence ratio."""

    def __init__(self, cfg: ObjectiveConfig, mask_id: int, eos_id: int):
        self.cfg, self.mask_id, self.eos_id = cfg, mask_id, eos_id

    def __call__(self, examples: List[SFTExample], index: torch.Tensor) -> SFTBatch:
        length = max(len(ex.tokens) for ex in examples)
        tokens = torch.full((len(examples), length), self.eos_id, dtype=torch.long)
        prompt_len = torch.tensor([ex.prompt_len for ex in examples])
        for row, ex in enumerate(examples):
            tokens[row, :len(ex.tokens)] = torch.from_numpy(ex.tokens)
        noise = sample_noise(index, length, self.cfg.seed, self.cfg.t_sampling)
        noisy, mask, p_mask = forward_process(tokens, noise, self.mask_id, self.cfg.eps)
        prompt = torch.arange(length)[None, :] < prompt_len[:, None]
        mask &= ~prompt  # the prompt is restored after masking
        noisy = torch.where(prompt, tokens, noisy)
        return SFTBatch(noisy, tokens, mask, p_mask, length - prompt_len, index)
