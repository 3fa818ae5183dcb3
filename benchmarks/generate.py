"""``llada generate``'s speed: plain mode against a plain loop of the release's algorithm, and
fast mode against plain mode, with how far fast mode's outputs agree with plain mode's.

(a) reference: the release's ``generate`` as written (tests/unit/inference_helpers.py, the test
    suite's independent reimplementation): one prompt at a time, logits of the whole sequence at
    every step;
(b) ours, plain mode, one prompt at a time (same tokens as (a): counted), then batched;
(c) ours, fast mode: the dual or prefix key-value cache refreshed per block, with and without
    confidence-threshold decoding (0.9, 0.5), and the threshold alone, batched.

Prompts: the first ``--prompt-len`` tokens of held-out sequences (not trained on). Every row
generates ``--gen-length`` tokens per prompt (no stop at EOS, so all do the same work); tokens/s
is those over wall time. Agreement: the fraction of generated positions equal to plain mode's,
and of prompts whose whole output is plain mode's.

    python benchmarks/generate.py [RUN_DIR|CHECKPOINT|EXPORT] [--data HOLDOUT_MANIFEST]
        [--prompts 16] [--prompt-len 32] [--gen-length 64] [--steps 64] [--block-length 8]

Default model: runs/debug-cpu (the README's main job leaves it) and its held-out set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=str(REPO / "runs" / "debug-cpu"))
    parser.add_argument("--data", help="held-out manifest (default: the run's first "
                        "data.validation set)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import torch

    from benchmarks.results import machine, record, today
    from data_pipeline.shards import load_manifest, read_sequences
    from framework.checkpoint.checkpointer import read_meta
    from framework.inference.model import load
    from framework.inference.sampler import SamplerConfig, generate
    from tests.unit.inference_helpers import full_logits, release_generate

    im = load(args.model, args.device)
    manifest = args.data or read_meta(Path(im.source))["config"]["data"]["validation"][0][
        "manifest"]
    seqs = read_sequences(load_manifest(manifest), args.prompts)
    prompts = [im.document_start() + s[:args.prompt_len].tolist() for s in seqs]
    g, n = args.gen_length, len(prompts)
    plain = SamplerConfig(gen_length=g, steps=args.steps, block_length=args.block_length,
                          stop_at_eos=False, batch_size=args.batch_size)

    def timed(fn):
        if im.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if im.device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def release():
        return [release_generate(full_logits(im), torch.tensor([p], device=im.device),
                                 args.steps, g, args.block_length, 0.0, im.mask_id)[0, len(p):]
                .tolist() for p in prompts]

    ref, ref_s = timed(release)
    ref = _rows([_until_stop(r, im.stop_ids) for r in ref], g)
    runs = {}
    for name, cfg in [
        ("ours, plain, batch 1", SamplerConfig(**{**plain.__dict__, "batch_size": 1})),
        (f"ours, plain, batch {args.batch_size}", plain),
        ("fast: dual cache", SamplerConfig(**{**plain.__dict__, "cache": "dual"})),
        ("fast: prefix cache", SamplerConfig(**{**plain.__dict__, "cache": "prefix"})),
        ("fast: dual cache + threshold 0.9",
         SamplerConfig(**{**plain.__dict__, "cache": "dual", "threshold": 0.9})),
        ("fast: dual cache + threshold 0.5",
         SamplerConfig(**{**plain.__dict__, "cache": "dual", "threshold": 0.5})),
        ("threshold 0.5 alone (no cache)",
         SamplerConfig(**{**plain.__dict__, "threshold": 0.5})),
    ]:
        generate(im, prompts[:1], cfg)  # warm-up
        runs[name] = timed(lambda: generate(im, prompts, cfg))

    base = f"ours, plain, batch {args.batch_size}"
    plain_rows = _rows([c.tokens for c in runs[base][0]], g)
    rows = [["release loop (reference)", f"{n * g / ref_s:,.1f}", "1.00", "—", "—",
             f"{args.steps / g:.3f}"]]
    for name, (done, secs) in runs.items():
        got = _rows([c.tokens for c in done], g)
        if name.startswith("ours, plain"):
            vs, other = ref_s / secs, ref
        else:
            vs, other = runs[base][1] / secs, plain_rows
        pos = sum(a == b for x, y in zip(got, other) for a, b in zip(x, y)) / (n * g)
        whole = sum(x == y for x, y in zip(got, other)) / n
        steps = sum(c.steps for c in done) / (n * g)
        rows.append([name, f"{n * g / secs:,.1f}", f"{vs:.2f}", f"{pos:.3f}", f"{whole:.3f}",
                     f"{steps:.3f}"])
    command = "python benchmarks/generate.py " + " ".join(sys.argv[1:])
    record("Generation: llada generate vs the release's loop, fast mode vs plain",
           "tokens/s over all prompts; ratio: plain rows against the release loop, fast rows "
           "against plain batched; agreement (positions, whole outputs): plain rows with the "
           "release loop, fast rows with plain mode; steps per generated token.",
           ["date", "machine", "model", "prompts x (prompt + gen)", "steps / block", "mode",
            "tokens/s", "ratio", "agree (pos)", "agree (whole)", "steps/token", "command"],
           [[today(), machine(), f"{Path(im.source).name} ({im.dtype})".replace("torch.", ""),
             f"{n} x ({args.prompt_len} + {g})", f"{args.steps} / {args.block_length}", *r,
             f"`{command}`"] for r in rows])


def _until_stop(tokens, stop_ids):
    """A completion as ours are cut: before its first stop token."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stop_ids), tokens)


def _rows(completions, g):
    """Each completion over all g positions, -1 past its end (its stop token and what follows
    are not in a completion)."""
    return [list(c) + [-1] * (g - len(c)) for c in completions]


if __name__ == "__main__":
    main()
