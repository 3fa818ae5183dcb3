"""The reverse process (../shared/LLADA.md, sampling): prompt + G masks, N steps, each
predicting the masked tokens of the current block and committing some of them.

Plain mode is the release's ``generate``: blocks of B tokens generated left to right, N·B/G steps
each, the linear schedule of commits per step (B / steps, the remainder over the first steps),
low-confidence remasking (commit the predictions whose probability is highest) or random, Gumbel-
max sampling in float64 at temperature > 0, classifier-free guidance ``u + (w + 1)(c - u)`` with
the unconditional row's prompt masked. Ties in confidence go to the lower position (a stable
sort; the release's ``topk`` leaves them unspecified). Only the current block's positions are
predicted (the head runs there alone), so nothing after it can be committed.

Fast mode (Fast-dLLM's two ideas): ``cache`` keeps every layer's keys and values from a forward
of the whole sequence at the start of a block and, for the block's other steps, runs only the
block (``dual``: the committed prefix and the masked suffix from the cache) or the block and
everything after it (``prefix``); ``threshold`` commits every masked position of the block whose
confidence exceeds it (at least the most confident one), so a block takes as many steps as it
needs. With ``refresh: step`` and no threshold the cache is rebuilt every step and fast mode
gives plain mode's tokens exactly (tested).

A model trained with the logit shift (Dream's) reads each position's prediction at the one
before it (framework/inference/model.py); a cached span then starts one position before its
block.

Randomness (temperature > 0, random remasking) comes from one generator per prompt, seeded by
(seed, the prompt's index): a prompt's tokens do not depend on the batch it ran in.
``stop_at_eos``: a row is finished once a stop token (EOS, <|eot_id|>) is committed with nothing
masked before it; what follows could not change its completion, so it is left as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from framework.config import ConfigError
from framework.inference.model import InferenceModel
from framework.model.attention import Attend

REMASKING = ("low_confidence", "random")
CACHE = ("none", "prefix", "dual")
REFRESH = ("block", "step")


@dataclass
class SamplerConfig:
    gen_length: int = 128  # G: tokens generated after the prompt
    steps: int = 128  # N: forward passes in all (plain mode)
    block_length: int = 128  # B: semi-autoregressive blocks (B = G: one block)
    remasking: str = "low_confidence"
    temperature: float = 0.0
    cfg_scale: float = 0.0  # classifier-free guidance weight w (0: off)
    stop_at_eos: bool = True
    seed: int = 0
    cache: str = "none"  # fast mode: none | prefix | dual
    refresh: str = "block"  # when the cache is rebuilt: block (fast) | step (exact)
    threshold: Optional[float] = None  # fast mode: commit every position above this confidence
    batch_size: int = 8  # prompts per forward

    def __post_init__(self):
        def need(cond: bool, flag: str, msg: str):
            if not cond:
                raise ConfigError(f"{flag}: {msg}")
        for flag, value in (("--gen-length", self.gen_length), ("--steps", self.steps),
                            ("--block-length", self.block_length),
                            ("--batch-size", self.batch_size)):
            need(isinstance(value, int) and value > 0, flag, f"must be a positive integer, got "
                 f"{value!r}")
        need(self.gen_length % self.block_length == 0, "--block-length",
             f"{self.block_length} does not divide --gen-length {self.gen_length}")
        blocks = self.gen_length // self.block_length
        need(self.steps % blocks == 0, "--steps",
             f"{self.steps} is not a multiple of the {blocks} blocks (--gen-length "
             f"{self.gen_length} / --block-length {self.block_length})")
        need(self.remasking in REMASKING, "--remasking", f"one of {', '.join(REMASKING)}, got "
             f"{self.remasking!r}")
        need(self.temperature >= 0, "--temperature", f"must be >= 0, got {self.temperature}")
        need(self.cfg_scale >= 0, "--cfg-scale", f"must be >= 0, got {self.cfg_scale}")
        need(self.cache in CACHE, "--cache", f"one of {', '.join(CACHE)}, got {self.cache!r}")
        need(self.refresh in REFRESH, "--refresh", f"one of {', '.join(REFRESH)}, got "
             f"{self.refresh!r}")
        need(self.threshold is None or 0 < self.threshold < 1, "--threshold",
             f"must be in (0, 1), got {self.threshold}")

    @property
    def blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.blocks


@dataclass
class Completion:
    tokens: List[int]  # the completion, up to (not including) its stop token
    steps: int  # steps that committed something of this prompt
    generated: int  # positions committed (the completion, its stop token and any after it)
    seconds: float  # wall time of the batch it ran in
    batch_generated: int  # positions committed by the whole batch (tokens/s of the batch)


def commit_schedule(masked: int, steps: int) -> List[int]:
    """How many of ``masked`` positions each of ``steps`` steps commits: the linear schedule,
    ``masked // steps`` each and one more in the first ``masked % steps`` steps."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def _row_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + index) & (2**63 - 1))


class _Batch:
    """One batch of prompts being generated: its tokens, masks and cache."""

    def __init__(self, im: InferenceModel, prompts: Sequence[Sequence[int]], cfg: SamplerConfig,
                 first_index: int):
        self.im, self.cfg = im, cfg
        self.plen = max(len(p) for p in prompts)
        total = self.plen + cfg.gen_length
        ids, self.real = im.pad_left([list(p) + [im.mask_id] * cfg.gen_length for p in prompts],
                                     pad_to=total)
        self.x = ids
        self.unpadded = len({len(p) for p in prompts}) == 1
        self.prompt = self.real.clone()
        self.prompt[:, self.plen:] = False
        self.gens = [_row_generator(cfg.seed, first_index + i, im.device)
                     for i in range(len(prompts))]
        self.cache: Optional[dict] = None
        self.done = torch.zeros(len(prompts), dtype=torch.bool, device=im.device)
        self.steps = torch.zeros(len(prompts), dtype=torch.long, device=im.device)

    def _inputs(self, x: torch.Tensor):
        """The rows to run and their key mask (None without padding: SDPA's unmasked kernels);
        with guidance, each row and its unconditional twin."""
        real = None if self.unpadded else self.real
        if self.cfg.cfg_scale == 0:
            return x, real
        uncond = x.masked_fill(self.prompt, self.im.mask_id)
        return torch.cat([x, uncond]), None if real is None else torch.cat([real, real])

    def _guided(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.cfg_scale == 0:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + (self.cfg.cfg_scale + 1) * (cond - uncond)

    def block_logits(self, lo: int, hi: int, fresh: bool) -> torch.Tensor:
        """[b, B, vocab] float32 logits of the block [lo, hi). ``fresh``: the cache (if any) is
        rebuilt by a forward of the whole sequence; otherwise only the span runs."""
        x, real = self._inputs(self.x)
        b, total = x.shape
        cfg = self.cfg
        if cfg.cache == "none" or fresh or self.cache is None:
            select = torch.zeros(b, total, dtype=torch.bool, device=x.device)
            select[:, lo:hi] = True
            self.cache = {} if cfg.cache != "none" else None
            attend = Attend(key_mask=real, cache=self.cache, store=self.cache is not None)
            logits = self.im.logits(x, select, attend)
        else:
            # the span from the block on; a shifted model reads the block's first prediction
            # at the position before it, so its span starts there (the prompt is never empty)
            first = lo - 1 if self.im.logit_shift else lo
            end = hi if cfg.cache == "dual" else total
            select = torch.zeros(b, end - first, dtype=torch.bool, device=x.device)
            select[:, lo - first:hi - first] = True
            logits = self.im.logits(x[:, first:end], select,
                                    Attend(key_mask=real, start=first, cache=self.cache))
        return self._guided(logits.view(b, hi - lo, -1))

    def _draw(self, shape) -> torch.Tensor:
        """float64 uniforms of ``shape`` for every row, each from the row's own generator."""
        return torch.stack([torch.rand(shape, generator=g, device=self.im.device,
                                       dtype=torch.float64) for g in self.gens])

    def step(self, lo: int, hi: int, count: Optional[int], fresh: bool) -> None:
        """One step: predict the block, commit ``count`` positions per row (None: by the
        threshold) among its masked ones."""
        cfg, im = self.cfg, self.im
        lg = self.block_logits(lo, hi, fresh).double()  # [b, B, vocab]
        block = self.x[:, lo:hi]
        if cfg.temperature > 0:  # Gumbel-max, float64: argmax of logits - T log(-log u)
            pred = torch.argmax(lg - cfg.temperature * torch.log(-torch.log(
                self._draw(lg.shape[1:]))), dim=-1)
        else:
            pred = torch.argmax(lg, dim=-1)
        if cfg.remasking == "low_confidence":
            conf = F.softmax(lg, dim=-1).gather(-1, pred[..., None]).squeeze(-1)
        else:
            conf = self._draw(pred.shape[1:])
        masked = (block == im.mask_id) & ~self.done[:, None]  # a finished row stays as it is
        self.steps += masked.any(1).long()  # the steps that commit something of the row
        conf = conf.masked_fill(~masked, -float("inf"))
        if count is None:
            k = (conf > cfg.threshold).sum(1).clamp(min=1)
        else:
            k = torch.full((block.shape[0],), count, device=block.device)
        k = torch.minimum(k, masked.sum(1))
        order = torch.sort(conf, dim=1, descending=True, stable=True).indices
        take = torch.zeros_like(masked).scatter_(
            1, order, torch.arange(block.shape[1], device=block.device)[None, :] < k[:, None])
        self.x[:, lo:hi] = torch.where(take, pred, block)
        if cfg.stop_at_eos:
            self._finish_rows()

    def _finish_rows(self) -> None:
        gen = self.x[:, self.plen:]
        stop = torch.zeros_like(gen, dtype=torch.bool)
        for s in self.im.stop_ids:
            stop |= gen == s
        before = torch.cumsum((gen == self.im.mask_id).long(), dim=1)  # masks up to here
        self.done |= (stop & (before == 0)).any(dim=1)

    def block_done(self, lo: int, hi: int) -> bool:
        pending = (self.x[:, lo:hi] == self.im.mask_id).any(dim=1) & ~self.done
        return not bool(pending.any())


def _completion(gen: List[int], stop_ids: Sequence[int], mask_id: int) -> List[int]:
    for i, t in enumerate(gen):
        if t in stop_ids or t == mask_id:
            return gen[:i]
    return gen


def generate(im: InferenceModel, prompts: Sequence[Sequence[int]], cfg: SamplerConfig,
             trace: Optional[Callable[[torch.Tensor, int, int, int], None]] = None
             ) -> List[Completion]:
    """Completions of token prompts, ``cfg.batch_size`` at a time. ``trace(x, plen, lo, hi)``
    is called after every step with the batch's tokens (tests check the invariants on it)."""
    too_long = [i for i, p in enumerate(prompts) if len(p) + cfg.gen_length > im.max_length]
    if too_long:
        i = too_long[0]
        raise ConfigError(f"prompt {i + 1}: {len(prompts[i])} tokens + --gen-length "
                          f"{cfg.gen_length} exceed the model's maximum length {im.max_length} "
                          f"(the sequence length it was trained at)")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt is empty")
    out: List[Completion] = []
    run = _next_token_batch if im.objective == "ar" else _generate_batch
    for first in range(0, len(prompts), cfg.batch_size):
        out += run(im, prompts[first:first + cfg.batch_size], cfg, first, trace)
    return out


@torch.no_grad()
def _next_token_batch(im, prompts, cfg: SamplerConfig, first: int, trace) -> List[Completion]:
    """An autoregressive model (objective ar) decodes left to right, one token per forward of
    the whole sequence so far (greedy, or Gumbel-max in float64 at temperature > 0); a row is
    frozen once it ends; the batch stops when every row has (asked every 16 tokens, not at every
    one: a host sync). No key/value cache yet: each token costs a forward of the whole sequence.
    The diffusion settings (steps, blocks, remasking, guidance, cache) do not apply: llada
    generate says so."""
    start = time.perf_counter()
    ids, real = im.pad_left([list(p) for p in prompts])
    plen = ids.shape[1]
    gens = [_row_generator(cfg.seed, first + i, im.device) for i in range(len(prompts))]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=im.device)
    stop = torch.tensor(im.stop_ids, device=im.device)
    unpadded = len({len(p) for p in prompts}) == 1
    for n in range(cfg.gen_length):
        if n % 16 == 15 and bool(done.all()):
            break
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[:, -1] = True
        attend = Attend(key_mask=None if unpadded else real)
        logits = im.logits(ids, last, attend).double()
        if cfg.temperature > 0:
            noise = torch.stack([torch.rand(logits.shape[1], generator=g, device=im.device,
                                            dtype=torch.float64) for g in gens])
            logits = logits / cfg.temperature - torch.log(-torch.log(noise.clamp_min(1e-300)))
        token = torch.where(done, im.special["eos"], logits.argmax(-1))
        done |= torch.isin(token, stop) & cfg.stop_at_eos
        ids = torch.cat([ids, token[:, None]], dim=1)
        real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)
        if trace is not None:
            trace(ids.clone(), plen, ids.shape[1] - 1, ids.shape[1])
    if im.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gen = ids[:, plen:].tolist()
    rows = [_completion(row, im.stop_ids, im.mask_id) for row in gen]
    made = [min(len(r) + 1, cfg.gen_length) for r in rows]  # with its stop token
    return [Completion(r, made[i], made[i], seconds, sum(made)) for i, r in enumerate(rows)]


@torch.no_grad()
def _generate_batch(im, prompts, cfg: SamplerConfig, first: int, trace) -> List[Completion]:
    start = time.perf_counter()
    batch = _Batch(im, prompts, cfg, first)
    for blk in range(cfg.blocks):
        lo = batch.plen + blk * cfg.block_length
        hi = lo + cfg.block_length
        # the fixed schedule runs its steps without asking the device (no host sync per step:
        # finished rows are frozen on the device); threshold decoding runs until the block is full
        counts = commit_schedule(cfg.block_length, cfg.steps_per_block) \
            if cfg.threshold is None else None
        step = 0
        while (step < len(counts)) if counts is not None else not batch.block_done(lo, hi):
            batch.step(lo, hi, counts[step] if counts is not None else None,
                       fresh=step == 0 or cfg.refresh == "step")
            step += 1
            if trace is not None:
                trace(batch.x.clone(), batch.plen, lo, hi)
        if bool(batch.done.all()):
            break
    if im.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gen = batch.x[:, batch.plen:].tolist()
    committed = [sum(t != im.mask_id for t in row) for row in gen]
    steps = batch.steps.tolist()
    return [Completion(_completion(row, im.stop_ids, im.mask_id), steps[i],
                       committed[i], seconds, sum(committed))
            for i, row in enumerate(gen)]
