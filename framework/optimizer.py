"""AdamW that can be told to skip its next step.

A step whose loss is non-finite must leave parameters *and* optimizer state untouched. ZeRO and
DeepSpeed's bf16 optimizer discard such steps themselves (their gradient norm is not finite); plain
fp32 without ZeRO hands the step straight to this optimizer, so it honours the trainer's verdict.
DeepSpeed reads ``overflow`` after each step to count skipped steps.
"""

from __future__ import annotations

import torch


class SkippableAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_next = False
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = self.skip_next
        self.skip_next = False
        if self.overflow:
            return None
        return super().step(closure)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (attention, MLP, embedding, head); never norms' gains."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
