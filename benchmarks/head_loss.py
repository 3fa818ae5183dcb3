"""Peak memory and time of the head + loss at the LLaDA-1B shape: the fused head
(llada_kernels/linear_cross_entropy.py) against the unfused one (the [N, V] logits, their fp32 copy
for the CE, and their gradient), forward and backward of the same N masked positions.

Each variant runs in a fresh process, so that one's allocations do not hide the other's: on CUDA
the peak is ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the growth of the peak
resident set (``ru_maxrss``) over the inputs'. The default N is the masked half of a 4 x 4096
micro-batch on a GPU, and of one 4096 sequence on CPU (where the matmuls take a minute).

    python benchmarks/head_loss.py [--positions N] [--hidden 2048] [--vocab 126464]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_variant(variant: str, n: int, h: int, v: int, device: str) -> dict:
    from llada_kernels.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    scale = torch.rand(n, device=device, generator=g) + 0.5
    fn = linear_cross_entropy if variant == "fused" else reference_linear_cross_entropy

    def step():
        total, _ = fn(hidden, weight, targets, scale)
        total.backward()
        return total

    if device == "cuda":
        step()  # warm-up: kernels compiled, allocator settled
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        total = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        total = step()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "peak_bytes": peak, "seconds": seconds, "loss": float(total),
            "dtype": str(dtype).replace("torch.", "")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--variant", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.positions or (4 * 4096 // 2 if device == "cuda" else 4096 // 2)
    if args.variant:  # one variant, in this (fresh) process
        print(json.dumps(run_variant(args.variant, n, args.hidden, args.vocab, device)))
        return

    from benchmarks.results import machine, record, today
    results = {}
    for variant in ("unfused", "fused"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--positions",
                              str(n), "--hidden", str(args.hidden), "--vocab", str(args.vocab)],
                             check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    fused, unfused = results["fused"], results["unfused"]
    if abs(fused["loss"] - unfused["loss"]) > 1e-3 * abs(unfused["loss"]):
        raise SystemExit(f"head_loss: the fused loss {fused['loss']} differs from the unfused "
                         f"{unfused['loss']}")
    gib = 1024 ** 3
    command = "python benchmarks/head_loss.py " + " ".join(sys.argv[1:])
    record("Head + loss at the 1B shape: fused vs unfused, peak memory",
           "Forward and backward of the output head and the weighted CE at N masked positions "
           "(hidden 2048, vocabulary 126464), each variant in a fresh process; peak: "
           "max_memory_allocated above the inputs on CUDA, peak resident set growth on CPU. "
           "ratio = fused / unfused.",
           ["date", "machine", "N x hidden x vocab", "dtype", "unfused peak GiB",
            "fused peak GiB", "memory ratio", "unfused s", "fused s", "time ratio", "command"],
           [[today(), machine(), f"{n} x {args.hidden} x {args.vocab}", fused["dtype"],
             f"{unfused['peak_bytes'] / gib:.2f}", f"{fused['peak_bytes'] / gib:.2f}",
             f"{fused['peak_bytes'] / max(unfused['peak_bytes'], 1):.2f}",
             f"{unfused['seconds']:.3f}", f"{fused['seconds']:.3f}",
             f"{fused['seconds'] / unfused['seconds']:.2f}", f"`{command.strip()}`"]])


if __name__ == "__main__":
    main()
