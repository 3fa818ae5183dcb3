"""A stand-in model whose cross entropy is known in closed form, for the estimator's tests: every
target is token 0, and the CE at a masked position is ``c = 0.5 + 3 x (the row's masked
fraction) + 0.4 x sin(position)``: harder with less context, and uneven along the sequence, as a
trained model's is, so the variance of an estimator of the bound is that of its masks."""

from __future__ import annotations

import math

import torch

MASK_ID = 1


def ce_at(masked_fraction: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    return 0.5 + 3.0 * masked_fraction + 0.4 * torch.sin(position.double())


class KnownCE(torch.nn.Module):
    """``model(noisy [b, L], select [b, L])`` -> logits [N, 2] with CE(logits, 0) = ce_at(...)."""

    def forward(self, noisy: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        fraction = (noisy == MASK_ID).double().mean(1, keepdim=True).expand_as(noisy)
        position = torch.arange(noisy.shape[1]).expand_as(noisy)
        c = ce_at(fraction[select], position[select])
        # softplus(l1 - l0) = c  <=>  l1 = log(exp(c) - 1) with l0 = 0
        return torch.stack([torch.zeros_like(c), torch.log(torch.expm1(c))], dim=1)


def exact_bound(seq_len: int) -> float:
    """The bound per token of KnownCE on any sequence of length L: the mean over l = 1..L of
    the mean CE over l masked positions at masked fraction l / L (positions uniform)."""
    sin_mean = sum(math.sin(j) for j in range(seq_len)) / seq_len
    return sum(0.5 + 3.0 * n / seq_len + 0.4 * sin_mean for n in range(1, seq_len + 1)) / seq_len
