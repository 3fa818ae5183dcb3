"""A tiny randomly initialised model ready for inference (the sampler's and the likelihood's
tests), and the release's ``generate`` reimplemented independently as the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.tokenizer import load_tokenizer
from framework.config import ModelConfig
from framework.inference.model import InferenceModel
from framework.model.model import build_model, transformer_config
from framework.model.weights import init_weights


def tiny_model(tokenizer: Path, seed: int = 0, max_length: int = 256, causal: bool = False,
               **sizes) -> InferenceModel:
    """Needs the ``world`` fixture (megatron's groups). init_std 0.2: logits far from uniform,
    so confidences are well separated and rounding never decides a comparison. ``causal``: an
    autoregressive baseline's model (objective ar)."""
    tok = load_tokenizer(tokenizer)
    cfg = ModelConfig(**{"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                         "num_kv_heads": 2, "ffn_hidden_size": 64, "vocab_size": tok.vocab_size,
                         "init_std": 0.2, **sizes})
    model = build_model(cfg, transformer_config(cfg, tensor_parallel=1,
                                                params_dtype=torch.float32, on_cpu=True),
                        causal=causal)
    init_weights(model, cfg, seed, 0, 1)
    model.eval()
    return InferenceModel(model, cfg, tok, tok.special_ids(), max_length, torch.device("cpu"),
                          torch.float32, "tiny", objective="ar" if causal else "pretrain")


def full_logits(im: InferenceModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training model's plain forward: [b, S] -> [b, S, vocab], no mask, no cache."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return im.model(x)[..., :im.tokenizer.vocab_size].float()
    return fn


def release_generate(logits_fn, prompt: torch.Tensor, steps: int, gen_length: int,
                     block_length: int, cfg_scale: float, mask_id: int) -> torch.Tensor:
    """ML-GSAI/LLaDA generate.py at temperature 0 with low-confidence remasking, for one
    prompt [1, P], written from the release's algorithm: full-sequence logits every step,
    confidences beyond the block set to -inf, the release's transfer-count schedule. Its
    ``topk`` is replaced by a stable descending order (ties to the lower position)."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long,
                   device=prompt.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for nb in range(num_blocks):
        lo = prompt.shape[1] + nb * block_length
        block_mask = x[:, lo:lo + block_length] == mask_id
        mask_num = block_mask.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps, mask_num % steps
        transfer = torch.zeros(1, steps, dtype=torch.int64) + base
        transfer[0, :remainder[0]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(logits_fn(torch.cat([x, un_x])), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = logits_fn(x)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, lo + block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -np.inf))
            order = np.argsort(-confidence[0].cpu().numpy(), kind="stable")[:int(transfer[0, i])]
            order = torch.as_tensor(order, device=x.device)
            x[0, order] = x0[0, order]
    return x
