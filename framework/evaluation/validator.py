"""The held-out evaluation of a model under any layout: the same number whatever the layout
(within rounding: exactly so in fp32 up to the kernels' own differences), and bit for bit the
same on every evaluation of the same weights. What is evaluated is the objective's:

- pretraining: the LLaDA bound per token of each sequence;
- SFT: the bound of each held-out response (EOS padding included, as SFT trains it) given its
  prompt, per response token: the draws mask the response only;
- autoregressive: the exact NLL per predicted token (every token but a sequence's first), one
  causal forward per sequence.

Bits per byte divide by the bytes of the scored tokens (none for SFT: a response's EOS padding,
trained on and scored, has no bytes); ``bpb_without_first`` (pretraining and autoregressive)
leaves every sequence's first token out of both, so the bound of the one and the exact NLL of
the other are read on one axis over the same tokens.

Each set's ``eval.sequences`` sequences (spread evenly over it) are read once; sequence i is
evaluated by data-parallel rank i mod dp, its K masked copies (data_pipeline/noise.py
``eval_noise``, keyed by (eval.seed, i), made one micro-batch at a time; K = 1 unmasked copy for
the autoregressive objective) in micro-batches of ``micro_batch_size`` copies. Every rank runs
the same number of micro-batches (the last padded with copies that select nothing and are
dropped): ZeRO-3 gathers and the pipeline engine's barriers need all ranks in step. The last
pipeline stage's tensor rank 0 of each replica writes its draws (summed CE, weight, mask ratio,
CE at position 0) into a [4, n, K] table that one all-reduce over the world completes (every
other entry is an exact zero), so every rank computes the statistics from the same numbers.

A model trained with the logit shift (objective.logit_shift, Dream's) is read as it was
trained: the head runs at each masked position's predecessor (a sequence's first position at
itself), and each draw's CE is that prediction's.

Nothing here touches the training data stream or any random generator, and the model is back in
training mode afterwards, so a run with evaluation trains exactly as one without.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.collate import next_token_targets, read_mask, shifted_reads
from data_pipeline.noise import eval_noise
from data_pipeline.sft import split_sft
from data_pipeline.shards import ShardSet, read_sequences
from data_pipeline.tokenizer import load_tokenizer
from framework.config import EvalConfig
from framework.evaluation.bound import bound_stats
from framework.model.model import take_rows
from framework.parallel.world import World

# + <set>/loss, loss_mc_stderr, loss_seq_stderr, bpb, bpb_without_first, loss_by_ratio/<bucket>
VAL = "val/"
VAL_SECONDS = "time/val_seconds"


@dataclass
class HeldOutSet:
    """The evaluated sequences of one set and what each objective scores of them: positions
    from ``scored_from`` on (pretraining: all; SFT: the response, padding included; the
    autoregressive objective: all but the first, which it never predicts)."""

    name: str
    tokens: torch.Tensor  # [n, L] int64, the evaluated sequences of the set
    text_bytes: int  # UTF-8 bytes of the text the scored tokens encode (0: no bpb)
    kind: str = "pretrain"  # the objective evaluated (data_pipeline/config.py OBJECTIVES)
    scored_from: Optional[torch.Tensor] = None  # [n] int64 (SFT: the prompt lengths); None: 0
    bytes_without_first: int = 0  # UTF-8 bytes of every token but each sequence's first

    @classmethod
    def read(cls, name: str, shards: ShardSet, count: int, kind: str = "pretrain"
             ) -> "HeldOutSet":
        rows = read_sequences(shards, count)
        piece_bytes = load_tokenizer(shards.tokenizer_path, f"{shards.manifest}").piece_bytes()
        if kind == "sft":  # no bits per byte: most of a response's nats are its padding's
            prompt_len, tokens = split_sft(rows)
            return cls(name, torch.from_numpy(np.ascontiguousarray(tokens)), 0, kind,
                       torch.from_numpy(prompt_len.copy()))
        without_first = int(piece_bytes[rows[:, 1:]].sum())
        if kind == "ar":  # it predicts every token but the first: those are its bytes
            return cls(name, torch.from_numpy(rows), without_first, kind,
                       bytes_without_first=without_first)
        return cls(name, torch.from_numpy(rows), int(piece_bytes[rows].sum()), kind,
                   bytes_without_first=without_first)

    def lengths(self) -> np.ndarray:
        """[n] the scored tokens of each sequence: what its loss is per."""
        n, seq_len = self.tokens.shape
        if self.kind == "ar":
            return np.full(n, seq_len - 1)
        if self.scored_from is None:
            return np.full(n, seq_len)
        return seq_len - self.scored_from.numpy()


class Validator:
    """``evaluate()``: {metric name: value} of every set, the same on every rank (collective)."""

    def __init__(self, cfg: EvalConfig, sets: List[HeldOutSet], world: World, model, *,
                 micro_batch_size: int, mask_id: int,
                 cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 pipeline: bool = False, estimator: str = "stratified", shift: bool = False):
        """``model``: the DeepSpeed engine (or a plain module on one process), called as
        ``model(noisy, select=mask)``; with ``pipeline``, DeepSpeed's pipeline engine.
        ``shift``: the model reads each prediction at the position before (logit_shift)."""
        self.cfg, self.sets, self.world, self.model = cfg, sets, world, model
        self.micro_batch_size, self.mask_id = micro_batch_size, mask_id
        self.cross_entropy, self.pipeline, self.estimator = cross_entropy, pipeline, estimator
        self.shift = shift
        self.writes = world.pp_rank == world.pp - 1 and world.tp_rank == 0
        self.results: Dict[str, Dict[str, float]] = {}  # per set: the last evaluation

    def evaluate(self) -> Dict[str, float]:
        """{metric name: value} of every set; each set's statistics also in ``self.results``."""
        start = time.perf_counter()
        values: Dict[str, float] = {}
        was_training = self.model.training
        try:
            for s in self.sets:
                self.results[s.name] = self.evaluate_set(s)
                values.update({f"{VAL}{s.name}/{k}": v for k, v in self.results[s.name].items()})
        finally:
            self.model.train(was_training)  # the engine and the module under it
        values[VAL_SECONDS] = time.perf_counter() - start
        return values

    def evaluate_set(self, s: HeldOutSet, seed: Optional[int] = None) -> Dict[str, float]:
        """The statistics of one set (``seed``: another evaluation seed, for benchmarks)."""
        n = s.tokens.shape[0]
        k = 1 if s.kind == "ar" else self.cfg.t_samples  # the exact NLL needs one forward
        seed = self.cfg.seed if seed is None else seed
        # per draw: summed CE, weight, mask ratio, the CE at position 0; each entry written by
        # one rank
        table = torch.zeros(4, n, k, dtype=torch.float64, device=self.world.device)
        mine = range(self.world.dp_rank, n, self.world.dp)  # this replica's sequences
        rows = [(i, d) for i in mine for d in range(k)]
        mb = self.micro_batch_size
        micro = -(-(-(-n // self.world.dp) * k) // mb)  # the most micro-batches of any replica
        chunks = [rows[j * mb:(j + 1) * mb] for j in range(micro)]
        batches = (self._batch(s, chunk, k, seed, table) for chunk in chunks)
        for chunk, ce in zip(chunks, self._forward(batches, micro)):
            if self.writes:
                for (i, d), (total, first) in zip(chunk, ce.tolist()):
                    table[0, i, d], table[3, i, d] = total, first
        dist.all_reduce(table)  # one writer per entry: the sum is that entry, exactly
        ce_sums, weight, ratio, ce_first = table.cpu().numpy()
        if s.kind == "ar":  # its position 0 predicts token 1: no first token is ever scored
            ratio, ce_first = None, np.zeros_like(ce_first)
        return bound_stats(ce_sums, weight, ratio, s.lengths(), s.text_bytes,
                           ce_first=None if s.kind == "sft" else ce_first,
                           bytes_without_first=s.bytes_without_first)

    def _batch(self, s: HeldOutSet, chunk, k: int, seed: int, table: torch.Tensor):
        """((input [mb, L], where the head runs [mb, L]), (targets, select)) of one micro-batch,
        made when the forward needs it (the masks of the chunk's sequences only), padded to full
        size with rows that select nothing (the head runs nowhere on them); the draws' weights
        and ratios into ``table``. The diffusion objectives mask draw d of sequence i; the
        autoregressive one reads it whole and predicts every next token (weight 1)."""
        mb, seq_len = self.micro_batch_size, s.tokens.shape[1]
        seqs = sorted({i for i, _ in chunk})
        inputs = torch.full((mb, seq_len), self.mask_id, dtype=torch.int64)
        targets = torch.full((mb, seq_len), self.mask_id, dtype=torch.int64)
        select = torch.zeros(mb, seq_len, dtype=torch.bool)
        if s.kind == "ar":
            for r, (i, _) in enumerate(chunk):
                inputs[r] = s.tokens[i]
                targets[r], select[r] = (x[0] for x in next_token_targets(s.tokens[i:i + 1]))
                if self.writes:
                    table[1, i, 0] = 1.0
            return (inputs, select), (targets, select)
        index = torch.tensor(seqs, dtype=torch.int64)
        start = None if s.scored_from is None else s.scored_from[index]
        noise = eval_noise(index, seq_len, k, seed, self.estimator, start=start)
        at = {i: r for r, i in enumerate(seqs)}
        for r, (i, d) in enumerate(chunk):
            targets[r], select[r] = s.tokens[i], noise.mask[at[i], d]
            if self.writes:
                table[1, i, d], table[2, i, d] = noise.weight[at[i], d], noise.ratio[at[i], d]
        inputs = torch.where(select, inputs, targets)
        head = select
        if self.shift:
            head = read_mask(shifted_reads(select.reshape(-1).nonzero().squeeze(1),
                                           seq_len)[0], select.shape)
        return (inputs, head), (targets, select)

    def _row_sums(self, logits: torch.Tensor, labels) -> torch.Tensor:
        """[mb, 2] each row's summed CE at its selected positions and the CE at its first
        position (0 where not selected), float64, on the device."""
        targets, select = labels
        if self.shift:  # the head ran at the reads: each prediction's row, in select's order
            _, order = shifted_reads(select.reshape(-1).nonzero().squeeze(1), select.shape[1])
            logits = take_rows(logits, order)
        ce = self.cross_entropy(logits, targets[select]).double()
        full = torch.zeros(select.shape, dtype=torch.float64, device=ce.device)
        full.masked_scatter_(select, ce)
        return torch.stack([full.sum(1), full[:, 0]], dim=1)

    @torch.no_grad()
    def _forward(self, batches: Iterator, micro: int) -> List[Optional[torch.Tensor]]:
        """The row sums of each of the ``micro`` micro-batches (meaningful where
        ``self.writes``)."""
        device = self.world.device
        if not self.pipeline:
            out = []
            self.model.eval()
            for (noisy, head), (targets, select) in batches:
                targets, select = targets.to(device), select.to(device)
                logits = self.model(noisy.to(device), select=head.to(device))
                out.append(self._row_sums(logits, (targets, select)))
            return out
        # DeepSpeed's pipeline evaluation: our per-row sums in place of the training loss, one
        # output per micro-batch kept on the last stage (no averaging, no broadcast); the
        # activation shapes re-agreed before and after (eval micro-batches differ from
        # training's); and the engine's running training loss set aside, which eval_batch would
        # add our [mb] sums to (train_batch starts it afresh)
        engine, module = self.model, self.model.module
        train_loss_fn, total_loss = module.loss_fn, engine.total_loss
        module.loss_fn, engine.total_loss = self._row_sums, None
        engine.reset_activation_shape()
        try:
            outputs = engine.eval_batch((((noisy, head), (targets, select))
                                         for (noisy, head), (targets, select) in batches),
                                        compute_loss=True, reduce_output=None, bcast_loss=False,
                                        num_micro_batches=micro)
        finally:
            module.loss_fn, engine.total_loss = train_loss_fn, total_loss
            engine.reset_activation_shape()
        if not engine.is_last_stage():
            return [None] * micro
        return list(outputs)


def console_lines(step: int, values: Dict[str, float]) -> List[str]:
    """``val    step 100 | stdlib loss 5.1234 ± 0.0021 (mc) ± 0.0412 (seqs) | 1.873 bpb``"""
    names = sorted({k[len(VAL):].split("/")[0] for k in values if k.startswith(VAL)})
    lines = []
    for name in names:
        def get(key, fmt, p=f"{VAL}{name}/"):
            return format(values[p + key], fmt) if p + key in values else "n/a"
        # an exact NLL (autoregressive) has no Monte Carlo error
        mc = (f" ± {get('loss_mc_stderr', '.4f')} (mc)"
              if f"{VAL}{name}/loss_mc_stderr" in values else "")
        bpb = f" | {get('bpb', '.4f')} bpb" if f"{VAL}{name}/bpb" in values else ""  # not SFT
        lines.append(f"val  step {step:>6} | {name} loss {get('loss', '.4f')}{mc} ± "
                     f"{get('loss_seq_stderr', '.4f')} (seqs){bpb}")
    if lines and VAL_SECONDS in values:
        lines[-1] += f" | {values[VAL_SECONDS]:.1f}s"
    return lines
