"""The LLaDA masked-diffusion objective (../shared/LLADA.md): the forward process and the loss.

Pure functions of their inputs. The noise (t per sequence, a uniform draw per token) comes from
``sample_noise``, seeded by each sample's global index, so tensor/pipeline-parallel peers and a
resumed run corrupt a given sample identically whatever rank or step it lands on.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

_SEED_STRIDE = 1_000_003  # keeps (seed, index) pairs apart when folded into one 63-bit seed


class Noise(NamedTuple):
    t: torch.Tensor  # [b] float32, t ~ U(0, 1) per sequence
    u: torch.Tensor  # [b, L] float32, one uniform per token; a token is masked when u < p_mask


class Corrupted(NamedTuple):
    noisy: torch.Tensor  # [b, L] token ids with masked positions set to the mask id
    mask: torch.Tensor  # [b, L] bool, True where masked (these positions enter the loss)
    p_mask: torch.Tensor  # [b] float32, the masking probability of each sequence


def sample_noise(sample_index: torch.Tensor, seq_len: int, seed: int) -> Noise:
    """Draw t and per-token uniforms for each sample from an RNG seeded by its global index.

    Drawn at full ``seq_len`` so a batch cut to a shorter length (1% variable length) masks each
    kept position exactly as the uncut batch would.
    """
    ts, us = [], []
    gen = torch.Generator()
    for idx in sample_index.tolist():
        gen.manual_seed((seed * _SEED_STRIDE + int(idx)) & 0x7FFF_FFFF_FFFF_FFFF)
        ts.append(torch.rand(1, generator=gen))
        us.append(torch.rand(seq_len, generator=gen))
    return Noise(torch.cat(ts), torch.stack(us))


def forward_process(tokens: torch.Tensor, noise: Noise, mask_id: int, eps: float) -> Corrupted:
    """Mask each token independently with its sequence's p_mask = (1 - eps) t + eps."""
    b, length = tokens.shape
    p_mask = (1.0 - eps) * noise.t.to(tokens.device) + eps
    u = noise.u[:, :length].to(tokens.device)
    mask = u < p_mask[:, None]
    noisy = torch.where(mask, torch.full_like(tokens, mask_id), tokens)
    return Corrupted(noisy, mask, p_mask)


def llada_loss(
    masked_logits: torch.Tensor,
    masked_targets: torch.Tensor,
    masked_p: torch.Tensor,
    num_tokens: int,
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum over masked positions of CE(logits_i, x_i) / p_mask(seq of i), divided by b x L.

    ``masked_logits`` [N, V] are the logits at the N masked positions only (the model computes
    its head there alone); ``masked_p`` [N] is the p_mask of each position's sequence;
    ``num_tokens`` is b x L of the (possibly cut) batch: the paper divides by all tokens, not by
    the masked count, which keeps the loss an ELBO comparable across runs.
    ``cross_entropy`` returns per-position CE; tensor parallelism passes the vocab-parallel one.
    """
    if cross_entropy is None:
        ce = F.cross_entropy(masked_logits.float(), masked_targets, reduction="none")
    else:
        ce = cross_entropy(masked_logits, masked_targets)
    return (ce.float() / masked_p.float()).sum() / num_tokens
