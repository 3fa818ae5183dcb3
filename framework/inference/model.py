"""A trained model, loaded for inference: one process, CPU (fp32) or one GPU (bf16), the
training model's own definition (framework/model/), its tokenizer and special ids.

MODEL is a checkpoint of any layout or an ``llada export`` directory
(framework/checkpoint/source.py); a model of the autoregressive objective is built with causal
attention, as it was trained. A batch of token sequences of different
lengths is left-padded: the pad positions are attended by nobody (``Attend.key_mask``) and, RoPE
being relative, a padded row gives the logits the row alone would, up to rounding.

A model trained with the logit shift (objective.logit_shift, Dream's; an export's
``llada_logit_shift``) predicts position j at the output of position j - 1 (a row's first real
position at itself): ``logits`` reads every prediction there, so the sampler and the likelihood
ask for positions and get their predictions either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from data_pipeline.collate import read_mask, shifted_reads
from data_pipeline.tokenizer import Tokenizer, load_tokenizer
from framework.config import ModelConfig, ParallelConfig
from framework.model.attention import Attend
from framework.model.model import LLaDAModel, build_model, transformer_config

@dataclass
class InferenceModel:
    model: LLaDAModel
    cfg: ModelConfig
    tokenizer: Tokenizer
    special: Dict[str, Optional[int]]  # mask, eos, bos, eot, ... (None where absent)
    max_length: int  # the sequence length it was trained at: prompt + generation must fit
    device: torch.device
    dtype: torch.dtype
    source: str  # what was loaded: the checkpoint's step_N directory or the export directory
    step: Optional[int] = None  # the checkpoint's step (None for an export)
    objective: str = "pretrain"  # what trained it: ar is the causal autoregressive baseline
    logit_shift: bool = False  # position j's prediction is the output at j - 1 (Dream's shift)

    @property
    def mask_id(self) -> int:
        return self.special["mask"]

    @property
    def stop_ids(self) -> List[int]:
        """Tokens that end a completion: EOS and, for chat models, <|eot_id|>."""
        return [i for i in (self.special.get("eos"), self.special.get("eot")) if i is not None]

    def document_start(self) -> List[int]:
        """What precedes a prompt: pretraining joins documents with EOS, so a document's text
        follows an EOS (a chat prompt starts with its own BOS instead: data_pipeline/sft.py)."""
        return [self.special["eos"]]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, select: torch.Tensor,
               attend: Optional[Attend] = None) -> torch.Tensor:
        """float32 logits [N, vocab] of the predictions of the selected positions ([b, s] bool;
        the padded vocabulary's extra rows dropped: no token has them); a shifted model's read
        at the position before each (``attend.start``: where ``ids`` begin in the sequence)."""
        select, order = select.to(self.device), None
        if self.logit_shift:
            select, order = self._shifted(select, attend)
        out = self.model(ids.to(self.device), select=select, attend=attend)
        if order is not None:
            out = out.index_select(0, order)
        return out[:, :self.tokenizer.vocab_size].float()

    def _shifted(self, select: torch.Tensor, attend: Optional[Attend]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(where the head runs [b, s], each prediction's row of its output) of a shifted model:
        a row's first real position (its key mask's first True) predicts itself."""
        b, width = select.shape
        start = attend.start if attend is not None else 0
        real = attend.key_mask if attend is not None else None
        first = (real.int().argmax(1) if real is not None
                 else torch.zeros(b, dtype=torch.long, device=select.device))
        reads, order = shifted_reads(select.reshape(-1).nonzero().squeeze(1), width,
                                     first=first - start)
        return read_mask(reads, select.shape), order

    def pad_left(self, rows: Sequence[Sequence[int]], pad_to: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids [b, S], key_mask [b, S]) of rows left-padded to S = ``pad_to`` or the longest;
        pad positions hold EOS (never the mask) and are False in the key mask."""
        width = pad_to or max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.special["eos"], dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            real[i, width - len(r):] = True
        return ids.to(self.device), real.to(self.device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(path, device: str = "auto", dtype: Optional[torch.dtype] = None,
         warn=print, key: str = "MODEL") -> InferenceModel:
    """The model at ``path`` (a checkpoint or an export directory, see the module docstring).
    ConfigError naming ``key`` when it is neither; the readers' own errors (HFFormatError,
    ReshardError) for damaged ones."""
    from framework.checkpoint.source import copy_weights, read_source
    from framework.parallel.world import init_world

    src = read_source(path, warn, key)
    cfg = src.model
    tokenizer = load_tokenizer(src.tokenizer, f"{key}: {src.source}")
    world = init_world(ParallelConfig(), device)  # megatron's layers need its (1-way) groups
    dtype = dtype or default_dtype(world.device)
    model = build_model(cfg, transformer_config(cfg, tensor_parallel=1, params_dtype=dtype,
                                                on_cpu=world.device.type == "cpu"),
                        causal=src.objective == "ar")
    model = model.to(world.device)
    copy_weights(model, src, key)
    model.eval()
    return InferenceModel(model, cfg, tokenizer, tokenizer.special_ids(), src.max_length,
                          world.device, dtype, src.source, src.step, src.objective,
                          src.logit_shift)
