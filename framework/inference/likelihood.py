"""The conditional log-likelihood of a continuation r given a context p, by the LLaDA paper's
Monte Carlo estimator (../shared/LLADA.md, likelihood evaluation), and multiple choice from it.

Draw k of K masks exactly l of r's tokens, l from the k-th of K equal strata of 1..|r| (the masks:
data_pipeline/noise.py ``eval_noise``, the held-out bound's own draws, here over r's positions),
and scores ``X_k = |r| / l x (summed CE at the masked positions)``; the mean of the K terms is an
unbiased estimate of the bound on -log p(r | p), so the estimate of log p(r | p) is its negative.
Its standard error is the spread of the K terms over sqrt(K), as if they were independent (which
over-states it for stratified draws). The masks are keyed by (seed, a hash of the tokens), so an
estimate does not depend on the batch or the process it ran in. Optional classifier-free
guidance scores ``u + (w + 1)(c - u)`` with the context masked in the unconditional row.

``greedy``: whether r is what the model predicts with all of r masked (the harness's
``is_greedy``). The CE is over the tokenizer's vocabulary (not the padding rows). A model of the
autoregressive objective gets its exact log-likelihood instead (one causal forward), so the two
objectives are compared on the same requests. A model trained with the logit shift is scored by
the predictions it makes at the position before each masked one (``InferenceModel.logits``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.noise import eval_noise
from framework.config import ConfigError
from framework.inference.model import InferenceModel
from framework.model.attention import Attend

Pair = Tuple[List[int], List[int]]  # (context ids, continuation ids)
KEY_BITS = 40  # eval_noise's sample index: 64 bits less 24 of position


@dataclass
class Estimate:
    loglik: float  # the estimate of log p(r | p), nats
    stderr: float  # its Monte Carlo standard error
    greedy: bool


def encode_pair(im: InferenceModel, context: str, continuation: str) -> Pair:
    """Token ids of (context, continuation) as the harness's own models split them: the
    context's trailing spaces move to the continuation, the whole is encoded at once and the
    continuation is what follows the context's own encoding (SentencePiece encodes a word's
    leading space with the word)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = im.tokenizer.encode(context + continuation)
    head = im.tokenizer.encode(context) if context else []
    return whole[:len(head)], whole[len(head):]


def pair_key(context: Sequence[int], continuation: Sequence[int]) -> int:
    text = json.dumps([list(context), list(continuation)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> (64 - KEY_BITS)


@torch.no_grad()
def loglikelihoods(im: InferenceModel, pairs: Sequence[Pair], samples: int = 128,
                   batch_size: int = 32, cfg_scale: float = 0.0, seed: int = 0,
                   start: Optional[List[int]] = None) -> List[Estimate]:
    """One Estimate per (context, continuation) pair, each after ``start`` (default: the
    document start). A context too long for the model is cut from the left (the harness's
    rule); a continuation that alone does not fit is an error. Memory: a forward holds the
    float32 logits of its rows' masked positions, about batch_size x |r| / 2 x vocab."""
    if samples < 1:
        raise ConfigError(f"--samples: must be >= 1, got {samples}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    start = im.document_start() if start is None else list(start)
    if im.objective == "ar":
        if cfg_scale:
            raise ConfigError("--cfg-scale: classifier-free guidance is for diffusion models; "
                              f"{im.source} is autoregressive")
        return _next_token_loglikelihoods(im, pairs, batch_size, start)
    # (pair, draw or -1 for the greedy row, tokens, masked positions, weight, continuation start)
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        seq = _sequence(im, i, ctx, cont, start)
        offset = len(seq) - len(cont)
        noise = eval_noise(torch.tensor([pair_key(ctx, cont)]), len(cont), samples, seed)
        for k in range(samples):
            where = torch.nonzero(noise.mask[0, k]).flatten() + offset
            rows.append((i, k, seq, where, float(noise.weight[0, k]), offset))
        rows.append((i, -1, seq, torch.arange(offset, len(seq)), 1.0, offset))
    terms = np.zeros((len(pairs), samples))
    greedy = [True] * len(pairs)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        sums, hits = _score(im, chunk, cfg_scale)
        for (i, k, _, _, weight, _), s, hit in zip(chunk, sums, hits):
            if k < 0:
                greedy[i] = hit
            else:
                terms[i, k] = weight * s
    out = []
    for i in range(len(pairs)):
        x = terms[i]
        err = float(x.std(ddof=1) / math.sqrt(samples)) if samples > 1 else float("nan")
        out.append(Estimate(-float(x.mean()), err, greedy[i]))
    return out


def _sequence(im: InferenceModel, i: int, ctx: List[int], cont: List[int], start: List[int]
              ) -> List[int]:
    """start + context + continuation of request i, the context cut from the left to fit."""
    if not cont:
        raise ConfigError(f"request {i + 1}: the continuation is empty")
    room = im.max_length - len(start) - len(cont)
    if room < 0:
        raise ConfigError(f"request {i + 1}: a continuation of {len(cont)} tokens exceeds "
                          f"the model's maximum length {im.max_length}")
    return start + list(ctx)[max(0, len(ctx) - room):] + list(cont)


def _next_token_loglikelihoods(im: InferenceModel, pairs: Sequence[Pair], batch_size: int,
                               start: List[int]) -> List[Estimate]:
    """An autoregressive model's exact log p(r | p): one causal forward of start + p + r,
    the log-probability of each token of r at the position before it (no Monte Carlo: stderr
    0); ``greedy`` when each is the argmax there."""
    seqs = []
    for i, (ctx, cont) in enumerate(pairs):
        seq = _sequence(im, i, ctx, cont, start)
        if len(seq) == len(cont):
            raise ConfigError(f"request {i + 1}: nothing precedes the continuation (an "
                              "autoregressive model needs one token to predict the first from)")
        seqs.append((seq, len(cont)))
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        ids, real = im.pad_left([seq for seq, _ in chunk])
        width = ids.shape[1]
        select = torch.zeros_like(real)
        for r, (_, n) in enumerate(chunk):
            select[r, width - n - 1:width - 1] = True  # each predicts the next: r's tokens
        targets = torch.roll(ids, -1, dims=1)[select]
        unpadded = all(len(seq) == width for seq, _ in chunk)
        logits = im.logits(ids, select, Attend(key_mask=None if unpadded else real))
        ce = F.cross_entropy(logits, targets, reduction="none").double()
        hit = logits.argmax(-1) == targets
        at = 0
        for _, n in chunk:
            out.append(Estimate(-float(ce[at:at + n].sum()), 0.0, bool(hit[at:at + n].all())))
            at += n
    return out


def _score(im: InferenceModel, chunk, cfg_scale: float):
    """Per row: the summed CE at its masked positions, and whether every one is the argmax."""
    ids, real = im.pad_left([row[2] for row in chunk])
    width = ids.shape[1]
    select = torch.zeros_like(real)
    prompt = torch.zeros_like(real)
    for r, (_, _, seq, where, _, offset) in enumerate(chunk):
        pad = width - len(seq)
        select[r, where + pad] = True
        prompt[r, pad:pad + offset] = True  # what precedes the continuation
    targets = ids[select]
    noisy = ids.masked_fill(select, im.mask_id)
    real = None if all(len(row[2]) == width for row in chunk) else real  # unmasked kernels
    if cfg_scale == 0:
        logits = im.logits(noisy, select, Attend(key_mask=real))
    else:
        both = torch.cat([noisy, noisy.masked_fill(prompt, im.mask_id)])
        cond, uncond = im.logits(both, torch.cat([select, select]),
                                 Attend(key_mask=None if real is None else
                                        torch.cat([real, real]))).chunk(2)
        logits = uncond + (cfg_scale + 1) * (cond - uncond)
    ce = F.cross_entropy(logits, targets, reduction="none").double()  # float32 logits
    hit = (logits.argmax(-1) == targets).double()
    row = torch.repeat_interleave(torch.arange(len(chunk), device=ce.device),
                                  select.sum(1).to(ce.device))
    sums = torch.zeros(len(chunk), dtype=torch.float64, device=ce.device).index_add_(0, row, ce)
    misses = torch.zeros(len(chunk), dtype=torch.float64, device=ce.device).index_add_(
        0, row, 1 - hit)
    return sums.tolist(), (misses == 0).tolist()


# ----------------------------------------------------------------------------- multiple choice
@dataclass
class Question:
    context: str
    choices: List[str]
    gold: int


def read_choices(path: Path) -> List[Question]:
    """``{"context": str, "choices": [str, ...], "gold": int}`` per line; a malformed line is a
    ConfigError naming the file and line (DataConfigError where it is not JSON)."""
    from data_pipeline.files import jsonl_records

    out = []
    for n, rec in jsonl_records(path, "--choices"):
        ok = (isinstance(rec, dict) and isinstance(rec.get("context"), str)
              and isinstance(rec.get("choices"), list) and len(rec["choices"]) >= 2
              and all(isinstance(c, str) and c for c in rec["choices"])
              and isinstance(rec.get("gold"), int) and not isinstance(rec["gold"], bool)
              and 0 <= rec["gold"] < len(rec["choices"]))
        if not ok:
            raise ConfigError(f"--choices: {path}:{n}: not {{\"context\": str, \"choices\": "
                              f"[two or more non-empty str], \"gold\": index of one}}")
        out.append(Question(rec["context"], rec["choices"], rec["gold"]))
    if not out:
        raise ConfigError(f"--choices: {path} holds no question")
    return out


def multiple_choice(im: InferenceModel, questions: Sequence[Question], samples: int = 128,
                    batch_size: int = 32, cfg_scale: float = 0.0, seed: int = 0) -> dict:
    """Accuracy (the choice of highest estimated log-likelihood) and ``acc_norm`` (per byte of
    the choice, as the harness normalises), their sampling errors, and every item's estimates."""
    pairs, owner = [], []
    for q_i, q in enumerate(questions):
        for c in q.choices:
            pairs.append(encode_pair(im, q.context, c))
            owner.append(q_i)
    est = loglikelihoods(im, pairs, samples, batch_size, cfg_scale, seed)
    items, correct, correct_norm, at = [], 0, 0, 0
    for q in questions:
        mine = est[at:at + len(q.choices)]
        at += len(q.choices)
        ll = [e.loglik for e in mine]
        per_byte = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, q.choices)]
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(per_byte))
        correct += pred == q.gold
        correct_norm += pred_norm == q.gold
        items.append({"context": q.context, "choices": q.choices, "gold": q.gold,
                      "loglik": ll, "stderr": [e.stderr for e in mine], "pred": pred,
                      "pred_norm": pred_norm})
    n = len(questions)
    acc, acc_norm = correct / n, correct_norm / n

    def sampling(p: float) -> float:
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    return {"questions": n, "acc": acc, "acc_stderr": sampling(acc), "acc_norm": acc_norm,
            "acc_norm_stderr": sampling(acc_norm),
            "mean_loglik_stderr": float(np.mean([e.stderr for e in est])),
            "samples": samples, "seed": seed, "cfg_scale": cfg_scale, "items": items}
