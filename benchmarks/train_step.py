"""Training throughput of the framework's step against a bare PyTorch reference, same run.

(a) framework: ``Trainer.train_step`` (DeepSpeed engine, ZeRO, megatron-core model, LLaDA
    objective with the head at masked positions, schedule, non-finite checks);
(b) reference: the same model and batches in a plain loop: full-vocabulary head, F.cross_entropy
    on masked positions, torch AdamW, clip_grad_norm_, no DeepSpeed.

The ratio (a)/(b) is what the framework costs or saves; absolute tokens/s depend on the machine,
which is shared and noisy, so only the ratio is compared across runs.

    python benchmarks/train_step.py [--recipe recipes/debug-cpu.yaml] [--steps 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "debug-cpu.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from benchmarks.results import machine, record, today
    from framework.config import load_config
    from framework.training.factory import build_trainer

    run_dir = tempfile.mkdtemp(prefix="bench-")
    cfg = load_config(args.recipe, [f"run.dir={run_dir}", f"train.steps={10**6}",
                                    "objective.variable_length_prob=0", *args.overrides])
    trainer = build_trainer(cfg)
    dev = trainer.world.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        return args.steps * tokens_per_step / (time.perf_counter() - start)

    framework_tps = timed(trainer.train_step)

    # reference: the same module outside DeepSpeed, a plain loop
    model = trainer.engine.module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=dev.type == "cuda")
    bf16 = trainer.facts["precision"] == "bf16"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def reference_step():
        for _ in range(trainer.accum):
            batch = next(trainer.data)  # masked by the collator, as in the framework's step
            noisy, tokens, mask, p_mask = (x.to(dev) for x in (batch.noisy, batch.targets,
                                                                batch.mask, batch.p_mask))
            with autocast:
                logits = model(noisy)
            ce = torch.nn.functional.cross_entropy(logits[mask].float(), tokens[mask],
                                                   reduction="none")
            loss = (ce / p_mask[:, None].expand_as(tokens)[mask]).sum() / tokens.numel()
            (loss / trainer.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reference_tps = timed(reference_step)
    ratio = framework_tps / reference_tps
    command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:])
    record("Training step: framework vs bare PyTorch loop",
           "ratio = framework / reference tokens/s; the reference runs the same model in a plain "
           "loop with the full-vocabulary head, so the head at masked positions only counts in "
           "the framework's favour, and DeepSpeed's engine against it.",
           ["date", "machine", "recipe", "mode", "framework tokens/s", "reference tokens/s",
            "ratio", "command"],
           [[today(), machine(), f"{Path(args.recipe).name} {' '.join(args.overrides)}",
             f"ZeRO-{cfg.deepspeed.zero_stage} {trainer.facts['precision']}",
             f"{framework_tps:,.0f}", f"{reference_tps:,.0f}", f"{ratio:.2f}",
             f"`{command.strip()}`"]])

if __name__ == "__main__":
    main()
