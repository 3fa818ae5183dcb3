"""The fused head + weighted CE (llada_kernels/linear_cross_entropy.py) against the unfused reference:
value, per-position terms and both gradients, on odd shapes, in fp32 and bf16, one chunk and
many; its PyTorch step here, its Triton step under Triton's interpreter (a subprocess: the
interpreter is chosen when triton is imported). The vocab-parallel form:
tests/distributed/test_vocab_parallel_head.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llada_kernels.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy

REPO = Path(__file__).resolve().parents[2]
# (positions, hidden, vocabulary, rows per chunk): one chunk, ragged chunks, a row per chunk,
# a vocabulary wider than the Triton kernel's block, no position at all
SHAPES = [(37, 24, 131, None), (37, 24, 131, 10), (5, 16, 5000, 2), (1, 8, 7, 1), (0, 8, 7, None)]
# bf16: the gradients are rounded to bf16 (as unfused autograd's are), and the weight gradient's
# chunks are summed in fp32 where the reference sums inside one matmul
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


def case(n, h, v, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    # 1 / (p_mask x divisor): any positive weight
    scale = (torch.rand(n, generator=g) * 3 + 0.1).to(device)
    return hidden, weight, targets, scale


def check_against_reference(backend: str, device: str = "cpu") -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for n, h, v, rows in SHAPES:
            hidden, weight, targets, scale = case(n, h, v, dtype, device=device)
            total, terms = linear_cross_entropy(hidden, weight, targets, scale, chunk_rows=rows,
                                                backend=backend)
            ref_total, ref_terms = reference_linear_cross_entropy(hidden, weight, targets, scale)
            # a non-unit incoming gradient: the precomputed gradients are scaled by it
            grads = torch.autograd.grad(total * 0.7, (hidden, weight))
            ref_grads = torch.autograd.grad(ref_total * 0.7, (hidden, weight))
            tol = TOLERANCE[dtype]
            assert terms.dtype == torch.float32 and not terms.requires_grad
            # the value is computed from the same bf16 logits either way: fp32 agreement
            torch.testing.assert_close(terms, ref_terms, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=1e-5, atol=1e-5)
            for got, want in zip(grads, ref_grads):
                assert got.dtype == want.dtype == dtype
                scale_of = want.float().abs().max().item() if want.numel() else 1.0
                torch.testing.assert_close(got.float(), want.float(), rtol=tol["rtol"],
                                           atol=tol["atol"] * scale_of)


def test_torch_step_equals_the_unfused_reference():
    check_against_reference("torch")


def test_triton_kernels_equal_the_unfused_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    code = ("from tests.unit.test_linear_cross_entropy import check_against_reference; "
            "check_against_reference('triton')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU machine runs it)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_equals_the_unfused_reference(backend):
    """The same checks on the GPU, the Triton kernels compiled for real (the GPU machine's
    script, benchmarks/gpu_train_step.sh, runs this file)."""
    check_against_reference(backend, "cuda")


def test_no_gradient_work_without_gradients():
    hidden, weight, targets, scale = case(9, 8, 33, torch.float32)
    with torch.no_grad():
        total, terms = linear_cross_entropy(hidden, weight, targets, scale, chunk_rows=4)
    ref_total, ref_terms = reference_linear_cross_entropy(hidden, weight, targets, scale)
    assert not total.requires_grad
    torch.testing.assert_close(terms, ref_terms)


def test_bad_shapes_are_refused_in_one_line():
    hidden, weight, targets, scale = case(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r"hidden \(4, 8\) and weight \(10, 9\)"):
        linear_cross_entropy(hidden, torch.zeros(10, 9), targets, scale)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:3], scale)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        linear_cross_entropy(hidden, weight, targets, scale, backend="cuda")
