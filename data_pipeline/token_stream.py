"""A minimal token stream over real text: documents -> token ids + EOS, concatenated and cut into
fixed ``seq_len`` sequences, dealt to data-parallel ranks in micro-batches.

Each sequence carries its global index (its position in the stream), which seeds its noise: the
same sample is corrupted identically on tensor-parallel peers and after a restart.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, List, NamedTuple

import torch

from data_pipeline.corpus import read_documents
from data_pipeline.tokenizer import Tokenizer


class TokenBatch(NamedTuple):
    tokens: torch.Tensor  # [b, L] int64
    index: torch.Tensor  # [b] int64, global sample indices


class TokenStream:
    """Iterator of micro-batches for one data-parallel rank.

    Global sequence k belongs to micro-batch k // micro_batch_size, and micro-batches go to the
    data-parallel ranks in turn, so the ranks together see every sequence exactly once. Each epoch
    visits the files in a fresh order seeded by (seed, epoch).
    """

    def __init__(self, files: List[Path], tokenizer: Tokenizer, *, seq_len: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 jsonl_text_field: str = "text"):
        if not files:
            raise ValueError("TokenStream needs at least one file")
        self.files, self.tok = files, tokenizer
        self.seq_len, self.mb = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.text_field = jsonl_text_field

    def _sequences(self) -> Iterator[List[int]]:
        buf: List[int] = []
        epoch = 0
        while True:
            order = list(self.files)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            docs = 0
            for path in order:
                for doc in read_documents(path, self.text_field):
                    docs += 1
                    buf.extend(self.tok.encode(doc))
                    buf.append(self.tok.eos_id)
                    while len(buf) >= self.seq_len:
                        yield buf[:self.seq_len]
                        del buf[:self.seq_len]
            if docs == 0:  # an empty corpus would otherwise loop forever
                raise ValueError(f"no readable document in {len(self.files)} data files")
            epoch += 1

    def __iter__(self) -> Iterator[TokenBatch]:
        batch: List[List[int]] = []
        for k, seq in enumerate(self._sequences()):
            if (k // self.mb) % self.dp_size != self.dp_rank:
                continue
            batch.append(seq)
            if len(batch) == self.mb:
                first = k - self.mb + 1
                yield TokenBatch(torch.tensor(batch, dtype=torch.long),
                                 torch.arange(first, first + self.mb, dtype=torch.long))
                batch = []
