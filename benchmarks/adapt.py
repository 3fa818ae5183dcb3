"""Diffusion from scratch against diffusion adapted from an autoregressive model, at equal
diffusion-training FLOPs (recipes/adapt-debug-cpu.yaml is the adapted run).

1. The debug recipe's model is trained by our autoregressive objective (``--ar-steps`` steps;
   its FLOPs are stated in every adapted row: the price of the starting point) and exported as
   a standard Llama directory (``llada export``: what transformers loads).
2. From that directory (``model.from_hf`` + ``init.from``, the Hugging Face path any Llama or
   Qwen model takes), diffusion training for ``--steps`` steps, in variants:
   plain (bidirectional from step 0, no shift), shift + annealing (Dream's logit shift and
   DiffuLLaMA's attention-mask annealing over ``--anneal`` steps: the recipe's), and shift +
   annealing + the mixed loss (``objective.ar_loss_weight`` ``--ar-weight``: a causal next-token
   term on the same batch, which costs FLOPs of its own: that run takes fewer steps, to the same
   training FLOPs by the trainer's own count).
3. Diffusion from scratch for ``--steps`` steps, same seeds, same shards.
Each run evaluates the recipe's held-out set at its end: the LLaDA bound (nats per token, an
upper bound on the NLL) and bits per byte. The ratio column: bound / scratch's (< 1: better).

    python benchmarks/adapt.py [--steps 200] [--ar-steps 200] [--anneal 50] [--ar-weight 0.3]
        [--work-dir runs/adapt] [key=value ...]

key=value overrides go to every training run. About 12 minutes on 2 CPU cores. Everything is
written under --work-dir; only benchmarks/RESULTS.md in the repository.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mdm_vs_ar import ENV, RECIPE, flops_done, train  # noqa: E402


def variants(args) -> dict:
    """name -> the objective overrides of an adapted run."""
    shift = ["objective.logit_shift=true", f"objective.anneal_steps={args.anneal}"]
    return {"adapted, plain": ["objective.logit_shift=false", "objective.anneal_steps=0"],
            "adapted, shift + annealing": shift,
            f"adapted, shift + annealing + AR loss x{args.ar_weight:g}":
                shift + [f"objective.ar_loss_weight={args.ar_weight}"]}


def main() -> None:
    from benchmarks.results import machine, record, today
    from framework.config import load_config

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200, help="diffusion steps of each run")
    p.add_argument("--ar-steps", type=int, default=200, help="autoregressive pretraining steps")
    p.add_argument("--anneal", type=int, default=50, help="objective.anneal_steps")
    p.add_argument("--ar-weight", type=float, default=0.3, help="objective.ar_loss_weight")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "adapt"))
    p.add_argument("overrides", nargs="*", help="key=value for every training run")
    args = p.parse_args()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/adapt.py " + " ".join(sys.argv[1:])).strip()
    over = list(args.overrides)

    ar, ar_secs = train(work / "ar", "ar", args.ar_steps, over)
    cfg = load_config(RECIPE, over, need_data=False)
    ar_flops = flops_done(cfg, "ar", ar)
    export = work / "ar-hf"
    subprocess.run([sys.executable, "-m", "framework", "export", str(work / "ar"), str(export),
                    "--overwrite"], cwd=REPO, env=ENV, check=True)
    results = {}
    summary, secs = train(work / "scratch", "pretrain", args.steps, over)
    results["diffusion from scratch"] = (summary, secs)
    scratch_flops = flops_done(cfg, "pretrain", summary)
    for name, extra in variants(args).items():
        # the debug recipe's model section is what model.from_hf gives (load_config refuses a
        # disagreement, e.g. a model.* override that the export does not have)
        adapted = [f"init.from={export}", f"model.from_hf={export}", *extra, *over]
        steps = args.steps
        if "ar_loss_weight" in " ".join(extra):  # the same training FLOPs in fewer steps
            probe, _ = train(work / "probe", "pretrain", 2, adapted)
            per_step = flops_done(cfg, "pretrain", probe) / probe["steps"]
            steps = max(1, round(scratch_flops / per_step))
        run_dir = work / name.split(",")[1].strip().replace(" ", "-").replace("+", "")
        results[name] = train(run_dir, "pretrain", steps, adapted)
    base = _val(results["diffusion from scratch"][0])["loss"]
    rows = []
    for name, (summary, secs) in results.items():
        v = _val(summary)
        rows.append([today(), machine(), name, str(summary["steps"]),
                     f"{flops_done(cfg, 'pretrain', summary):.3g}",
                     "-" if name.endswith("scratch") else f"{ar_flops:.3g} ({args.ar_steps} steps)",
                     f"{v['loss']:.4f}", f"{v['bpb']:.4f}",
                     "(reference)" if name.endswith("scratch") else f"{v['loss'] / base:.3f}",
                     f"{secs:.0f}", f"`{command}`"])
    print(f"[adapt] AR pretraining: {ar_secs:.0f} s", flush=True)
    record("adapt: diffusion adapted from an autoregressive model vs from scratch",
           "`python benchmarks/adapt.py` (defaults: `--steps 200 --ar-steps 200 --anneal 50 "
           "--ar-weight 0.3`): the debug recipe's model; the adapted runs start from the same "
           "model trained by the autoregressive objective for --ar-steps steps, exported as a "
           "Llama directory and read back through `model.from_hf` / `init.from` "
           "(recipes/adapt-debug-cpu.yaml). Diffusion-training FLOPs: the trainer's count "
           "(summary.json flops); the run with the AR loss term takes fewer steps to the same "
           "count. AR pretraining FLOPs: the cost of the starting point, not in the first "
           "column. Held-out: the recipe's set at the end, the LLaDA bound in nats per token "
           "(eval.t_samples 8) and bits per byte; bound / scratch < 1: better than scratch.",
           ["date", "machine", "run", "steps", "diffusion-training FLOPs",
            "AR pretraining FLOPs", "held-out bound", "bpb", "bound / scratch", "wall s",
            "command"], rows)


def _val(summary: dict) -> dict:
    return next(iter(summary["validation"].values()))["last"]


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"[adapt] {time.perf_counter() - t0:.0f} s", flush=True)
