"""The fused head + weighted CE's vocab-parallel form (llada_kernels/linear_cross_entropy.py): the
vocabulary cut in two slices over 2 gloo processes gives the one-device reference's value, terms
and gradients (the input's whole, the weight's slice), in fp32 and bf16."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llada_kernels.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy
from tests.unit.test_linear_cross_entropy import TOLERANCE, case

DTYPES = (torch.float32, torch.bfloat16)
SLICE = 97  # vocabulary rows per rank: odd, and targets fall in both slices


def _worker(rank: int, world: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    for dtype in DTYPES:
        hidden, weight, targets, scale = case(23, 16, SLICE * world, dtype, seed=3)
        part = weight.detach()[rank * SLICE:(rank + 1) * SLICE].clone().requires_grad_()
        total, terms = linear_cross_entropy(hidden, part, targets, scale, group=dist.group.WORLD,
                                            vocab_start=rank * SLICE, chunk_rows=6)
        grad_hidden, grad_part = torch.autograd.grad(total, (hidden, part))
        out[(rank, str(dtype))] = (total.detach(), terms, grad_hidden, grad_part)
    dist.destroy_process_group()


def test_vocab_parallel_form_equals_one_device():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    for dtype in DTYPES:
        hidden, weight, targets, scale = case(23, 16, 2 * SLICE, dtype, seed=3)
        ref_total, ref_terms = reference_linear_cross_entropy(hidden, weight, targets, scale)
        ref_hidden, ref_weight = torch.autograd.grad(ref_total, (hidden, weight))
        tol = TOLERANCE[dtype]
        for rank in range(2):
            total, terms, grad_hidden, grad_part = out[(rank, str(dtype))]
            torch.testing.assert_close(total, ref_total.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(terms, ref_terms, rtol=1e-5, atol=1e-5)
            want_part = ref_weight[rank * SLICE:(rank + 1) * SLICE]
            for got, want in ((grad_hidden, ref_hidden), (grad_part, want_part)):
                assert got.dtype == dtype
                torch.testing.assert_close(got.float(), want.float(), rtol=tol["rtol"],
                                           atol=tol["atol"] * want.float().abs().max().item())
