"""The per-chunk step of llada_kernels/linear_cross_entropy.py as two Triton kernels, one program per
row, in place on the chunk's logits (bf16 or fp32; arithmetic in fp32):

- ``row_stats``: the row's max and sum of exp(logit - max) in one pass (the running max rescales
  the running sum), and the target's logit where this slice of the vocabulary holds it;
- ``softmax_grad_``: the logits overwritten with (softmax - one-hot) x the row's weight, from the
  row's log-sum-exp over the whole vocabulary (combined across tensor-parallel ranks in between).

Where the PyTorch step (``TorchStep``) holds fp32 copies of the chunk, these read and write the
logits buffer alone. On CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set
before triton is imported), which is how the tests check them against the PyTorch step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llada_kernels.linear_cross_entropy import TRITON_CHUNK_ELEMENTS

BLOCK = 4096  # vocabulary columns per iteration of a row's loop


@triton.jit
def _row_stats_kernel(logits_ptr, stride, local_ptr, max_ptr, sum_ptr, target_ptr, V,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    running_max = tl.load(base).to(tl.float32)  # any real logit: the running max stays finite
    running_sum = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max),
                                                                           axis=0)
        running_max = new_max
    local = tl.load(local_ptr + row)
    held = (local >= 0) & (local < V)
    target = tl.load(base + tl.where(held, local, 0)).to(tl.float32)
    tl.store(max_ptr + row, running_max)
    tl.store(sum_ptr + row, running_sum)
    tl.store(target_ptr + row, tl.where(held, target, 0.0))


@triton.jit
def _softmax_grad_kernel(logits_ptr, stride, local_ptr, lse_ptr, scale_ptr, V,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    local = tl.load(local_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)
        tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=inside)


def _block(v: int) -> int:
    return min(BLOCK, triton.next_power_of_2(v))


class TritonStep:
    """The per-chunk step on Triton (``llada_kernels/linear_cross_entropy.py`` ``TorchStep``'s
    contract)."""

    chunk_elements = TRITON_CHUNK_ELEMENTS

    @staticmethod
    def row_stats(logits: torch.Tensor, local: torch.Tensor):
        if logits.stride(1) != 1:
            raise ValueError("TritonStep: the logits' rows must be contiguous")
        c, v = logits.shape
        out = torch.empty(3, c, dtype=torch.float32, device=logits.device)
        if c:
            _row_stats_kernel[(c,)](logits, logits.stride(0), local.contiguous(), out[0], out[1],
                                    out[2], v, BLOCK=_block(v))
        return out[0], out[1], out[2]

    @staticmethod
    def softmax_grad_(logits: torch.Tensor, local: torch.Tensor, lse: torch.Tensor,
                      scale: torch.Tensor) -> None:
        c, v = logits.shape
        if c:
            _softmax_grad_kernel[(c,)](logits, logits.stride(0), local.contiguous(),
                                       lse.contiguous(), scale.contiguous(), v,
                                       BLOCK=_block(v))
