"""The output head and the weighted cross entropy, fused: the loss at N positions of
``hidden [N, h] @ weight.T`` over the vocabulary without the [N, V] logits ever held at once.

    loss = sum_i scale_i * CE(hidden_i @ weight.T, target_i)

``scale_i`` is each position's weight (LLaDA: 1 / (p_mask x the sequence's divisor)). The
positions are taken a chunk of rows at a time: the chunk's logits (in the input dtype, fp32
accumulation in the matmul), their row statistics (max, sum of exponentials, the target's logit;
fp32), then, in the same buffer, the logits' gradient (softmax - one-hot) x scale, from which the
chunk's input gradient and its share of the weight gradient (accumulated in fp32) follow at once.
The forward pass thus does the backward's work: three matmuls in all, as unfused, and only the
[N, h] and [V, h] gradients are kept for backward, which scales them by the incoming gradient.
That is why the output is the scalar sum (the per-position terms come back detached): a scalar's
gradient is one number, so the precomputed gradients are exact.

Vocab-parallel (tensor parallelism): ``weight`` is this rank's slice of the vocabulary, rows
[vocab_start, vocab_start + V/tp); the row statistics are combined across ``group`` (max, then
the rescaled sums and the target's logit, which one rank holds), the same on every rank; the
input gradient is summed across the group (what megatron's column-parallel layer does in its
backward). Nothing of size V crosses the network.

Why our own and not a library: Liger-Kernel's fused linear cross entropy takes a per-position
weight only with reduction="none", which recomputes the logits in backward (four matmuls instead
of three), and neither it nor Apple's cut-cross-entropy has the vocab-parallel form. The per-chunk
step has two implementations: plain PyTorch (CPU, and the reference for the kernel) and a Triton
kernel (llada_kernels/triton_cross_entropy.py) that works in place on the logits buffer, used on CUDA.
``reference_linear_cross_entropy`` is the unfused computation both are tested against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Elements of one chunk's logits. The PyTorch step holds an fp32 copy of a bf16 chunk besides:
# 2^26 (256 MiB in fp32). The Triton step holds only the logits: 2^28 (512 MiB in bf16), at the
# 1B shape (V = 126464) 2122 rows, four chunks for 4 x 4096 tokens half masked. Fewer chunks
# mean fewer passes over the [V, h] weight gradient (each chunk adds a [V, h] product to it).
TORCH_CHUNK_ELEMENTS = 1 << 26
TRITON_CHUNK_ELEMENTS = 1 << 28


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                   targets: torch.Tensor, scale: torch.Tensor
                                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unfused computation, one device: (sum of the terms, the terms [N] fp32)."""
    logits = hidden @ weight.t()
    terms = F.cross_entropy(logits.float(), targets, reduction="none") * scale.float()
    return terms.sum(), terms.detach()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         scale: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None,
                         vocab_start: int = 0, chunk_rows: Optional[int] = None,
                         backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum_i scale_i x CE_i, differentiable in ``hidden`` and ``weight``; the terms [N] fp32,
    detached). ``targets`` [N] are global vocabulary ids; ``weight`` [V_local, h] holds rows
    ``vocab_start..`` of the vocabulary (all of it without ``group``). ``backend``: "torch",
    "triton", or "auto" (Triton on CUDA when it imports, else PyTorch)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} are not [N, h] and [V, h]")
    if targets.shape != hidden.shape[:1] or scale.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} and scale "
                         f"{tuple(scale.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    step = _step_backend(backend, hidden.device)
    rows = chunk_rows or max(1, step.chunk_elements // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, scale, group, vocab_start, rows,
                                     step, need_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, group, vocab_start, rows, step, need_grad):
        n = hidden.shape[0]
        terms = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        # one chunk: the weight gradient straight from one matmul; more: summed in fp32
        many, grad_weight = n > rows, None
        scale = scale.float()
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            h = hidden[lo:hi]
            logits = h @ weight.t()  # [c, V_local], the input dtype
            local = targets[lo:hi] - vocab_start  # outside [0, V_local): another rank's
            row_max, sum_exp, target_logit = step.row_stats(logits, local)
            lse, target_logit = _combine(row_max, sum_exp, target_logit, group)
            terms[lo:hi] = (lse - target_logit) * scale[lo:hi]
            if not need_grad:
                continue
            step.softmax_grad_(logits, local, lse, scale[lo:hi])  # logits := d loss / d logits
            grad_hidden[lo:hi] = logits @ weight
            if grad_weight is None:  # the first chunk's product starts the sum
                grad_weight = logits.t() @ h
                grad_weight = grad_weight.float() if many else grad_weight
            elif logits.dtype == torch.float32:
                grad_weight.addmm_(logits.t(), h)  # in place: no [V, h] product held
            else:  # the product in bf16 (half an fp32 one), added in fp32
                grad_weight += logits.t() @ h
        if need_grad and grad_weight is None:  # no position selected: a zero gradient, not none
            grad_weight = torch.zeros_like(weight)
        if need_grad and group is not None:
            dist.all_reduce(grad_hidden, group=group)  # every slice's share of d loss / d hidden
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(terms)
        return terms.sum(), terms

    @staticmethod
    def backward(ctx, grad_sum, _grad_terms):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy: backward of a forward that ran without "
                               "gradients (under no_grad, or inputs that need none)")
        g = grad_sum.float()  # e.g. 1 / accumulation: scaled in fp32, not rounded to bf16 first
        dh = (grad_hidden.float() * g).to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # the fp32 accumulator scaled in place (used once: no double backward), so that an
            # fp32 weight's gradient is the accumulator itself, with no [V, h] copy
            dw = (grad_weight.mul_(g) if grad_weight.dtype == torch.float32
                  else grad_weight.float() * g).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None, None


def _combine(row_max, sum_exp, target_logit, group):
    """Per row: the log-sum-exp over the whole vocabulary and the target's logit, from each
    slice's max, its sum of exp(logit - max) and its target logit (0 where it holds none)."""
    if group is None:
        return row_max + torch.log(sum_exp), target_logit
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    both = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit])
    dist.all_reduce(both, group=group)
    return global_max + torch.log(both[0]), both[1]


class TorchStep:
    """The per-chunk step in plain PyTorch: each row's log-sum-exp stands for its (max, sum) pair
    (a max of lse and a sum of 1), the gradient made in place (one fp32 copy of a bf16 chunk)."""

    chunk_elements = TORCH_CHUNK_ELEMENTS

    @staticmethod
    def row_stats(logits: torch.Tensor, local: torch.Tensor):
        x = logits.float()
        lse = torch.logsumexp(x, dim=1)
        held = (local >= 0) & (local < x.shape[1])
        target = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
        return lse, torch.ones_like(lse), torch.where(held, target, torch.zeros_like(target))

    @staticmethod
    def softmax_grad_(logits: torch.Tensor, local: torch.Tensor, lse: torch.Tensor,
                      scale: torch.Tensor) -> None:
        grad = logits.float()  # fp32 logits: this very buffer
        grad.sub_(lse[:, None]).exp_()
        held = (local >= 0) & (local < logits.shape[1])
        # minus the one-hot where this slice holds the target (a scatter: no host sync)
        grad.scatter_add_(1, local.clamp(0, logits.shape[1] - 1)[:, None],
                          -held.to(grad.dtype)[:, None])
        grad.mul_(scale[:, None])
        if grad is not logits:
            logits.copy_(grad)


def _step_backend(backend: str, device: torch.device):
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"linear_cross_entropy: backend {backend!r} is not auto, torch or triton")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return TorchStep
    try:
        from llada_kernels.triton_cross_entropy import TritonStep
    except ImportError as e:
        if backend == "triton":
            raise ImportError(f"linear_cross_entropy: backend 'triton' needs triton ({e})") from e
        return TorchStep
    return TritonStep
