"""AdamW that skips the step of a non-finite loss, decided alike on every rank.

A step whose loss is non-finite must leave parameters *and* optimizer state untouched. The loss
of a micro-batch exists only where it is computed (every rank without pipelining; the last stage
with it), while the optimizer step runs on every rank, inside DeepSpeed (and, with pipelining,
inside its schedule). So the verdict is taken at the step: ``NonFiniteGuard`` collects the
micro-batch losses on the device and reduces its flag over the world once per step.
ZeRO and DeepSpeed's bf16 optimizer also discard a step whose gradient norm is not finite without
calling this optimizer; the trainer then asks the guard itself, so every rank reduces alike.
DeepSpeed reads ``overflow`` after each step to count skipped steps.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self, device: torch.device):
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self._verdict: Optional[bool] = None

    def reset(self) -> None:
        """At the start of an optimizer step."""
        self.flag.zero_()
        self._verdict = None

    def observe(self, loss: torch.Tensor) -> None:
        # on the device: no host sync per micro-batch
        torch.maximum(self.flag, (~torch.isfinite(loss.detach())).float(), out=self.flag)

    def verdict(self) -> bool:
        """Whether any rank saw a non-finite loss this step. Collective on first call per step."""
        if self._verdict is None:
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
            self._verdict = bool(self.flag.item())
        return self._verdict


class SkippableAdamW(torch.optim.AdamW):
    def __init__(self, *args, guard: NonFiniteGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        # ZeRO may call this once per parameter group (or sub-group): the verdict is cached
        self.overflow = self.guard.verdict()
        if self.overflow:
            return None
        return super().step(closure)
