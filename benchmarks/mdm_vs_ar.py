"""Masked diffusion (LLaDA) against the autoregressive baseline at equal training FLOPs.

Both objectives train the same model (the debug recipe's unless overridden: causal attention
and next-token CE for ``objective.kind=ar``) from scratch, with the same seeds, on the same
shards, for the same FLOP budget. Each objective's FLOPs come from the project's one counter
(framework/training/flops.py, ``expected_per_token``): causal attention counts half, the
autoregressive head runs at every position, the diffusion head at the masked half, so at equal
FLOPs the step counts differ (AR takes ~15% fewer steps at the debug size).

(A) held-out bits per byte: the debug recipe's data (runs/data/stdlib-128, prepared by the
    first debug run; --data for another manifest), a budget of what ``--steps`` diffusion steps
    cost; each run evaluates the recipe's held-out set at its end (diffusion: the stratified
    bound; AR: the exact NLL). ``bpb_without_first`` (every token but each sequence's first, both
    objectives over the same tokens and bytes) is the comparison column.
(B) reversal probe, in the spirit of the paper's reversal-poem task: made-up names (seeded,
    pronounceable, 2-3 syllables, no name a prefix of another), ``--pairs`` pairs (A, B); half
    "both" (documents "A is the parent of B." and "B is the child of A."), half "forward-only"
    ("A is the parent of B." only), ``--repeats`` shuffled copies, one fact per document,
    prepared with the debug tokenizer. Trained from scratch rather than from (A)'s model: (A)'s
    code corpus knows nothing of these names or of English relations, and starting both
    objectives from one untrained model keeps the equal-FLOPs comparison exact. Probes (greedy,
    exact name match, the completion read up to the first non-letter):
      - reverse of forward-only (never trained): [EOS] "B is the child of" -> " A." (the test);
      - forward of forward-only, reverse of "both" (trained): the controls;
      - diffusion only: infill of the trained sentence, [EOS] [masks] " is the parent of B." ->
        A, the paper's sense of reversal (the earlier part from the later one, same text); an
        autoregressive model cannot condition on a suffix, so it has no such row.
    Diffusion fills len(tokens of " A.") masks in as many steps (one commit per step, low-
    confidence remasking): it is told the answer's length; AR decodes as many tokens greedily
    (``framework.inference.sampler.generate`` dispatches on the model's objective).
    Sizing (measured on 2 cores): diffusion memorises far slower than AR. 200 pairs, lr 1e-3,
    600 diffusion steps: diffusion 0% even on the trained controls, AR 99-100%; 60 pairs, lr
    3e-3, 800 steps: diffusion 3-7% (infill 27%), AR 93%; 40 pairs, lr 3e-3, 600 steps:
    diffusion 30-50% (infill 80%). Hence the defaults: 40 pairs (20 per condition), lr 3e-3
    for both objectives, 1200 diffusion steps' FLOPs (AR: 1025), within the ~15 minutes.
    Note that the infill direction is one diffusion's own objective trains (any masking of a
    sentence, the first name's included); the test's relation reversal is trained by neither.

    python benchmarks/mdm_vs_ar.py [--steps 200] [--probe-steps 1200] [--pairs 40]
        [--repeats 24] [--probe-lr 3e-3] [--work-dir runs/mdm-vs-ar] [--parts ab] [key=value ...]

key=value overrides go to every training run (e.g. run.device=cuda train.precision=bf16, or a
bigger model.*; the FLOP counter reads the overridden model). The defaults take about 14
minutes on 2 CPU cores (measured 13m57s: (A) 3 min, (B) 11 min). Everything is written under --work-dir; only benchmarks/RESULTS.md in
the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "debug-cpu.yaml"
KINDS = ("pretrain", "ar")
LABEL = {"pretrain": "diffusion (LLaDA)", "ar": "autoregressive"}
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
          "st", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = [""] * 4 + ["n", "r", "l", "s"]
# the environment as started: loading a model for the probe exports a world of one (RANK,
# MASTER_PORT, ... of its live process group: framework/parallel/world.py _fill_launcher_env),
# which a training run started after it would inherit and collide with (EADDRINUSE)
ENV = dict(os.environ)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200,
                   help="(A) budget: the FLOPs of this many diffusion steps of the recipe")
    p.add_argument("--probe-steps", type=int, default=1200,
                   help="(B) budget: the FLOPs of this many diffusion steps")
    p.add_argument("--pairs", type=int, default=40, help="(B) name pairs, half of them 'both'")
    p.add_argument("--probe-lr", type=float, default=3e-3, help="(B) optimizer.lr of both")
    p.add_argument("--repeats", type=int, default=24, help="(B) shuffled copies of the facts")
    p.add_argument("--data", help="(A) training manifest (default: the recipe's)")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "mdm-vs-ar"))
    p.add_argument("--parts", default="ab", choices=["a", "b", "ab"])
    p.add_argument("--device", default="auto", help="for the probe's inference")
    p.add_argument("--seed", type=int, default=0, help="(B) the names and the corpus order")
    p.add_argument("overrides", nargs="*", help="key=value for every training run")
    args = p.parse_args()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/mdm_vs_ar.py " + " ".join(sys.argv[1:])
    extra = list(args.overrides) + ([f"data.datasets=[{{manifest: {args.data}}}]"]
                                    if args.data else [])
    if "a" in args.parts:
        part_a(args, work, extra, command.strip())
    if "b" in args.parts:
        part_b(args, work, list(args.overrides), command.strip())


# ---------------------------------------------------------------------------------------------
# training at equal FLOPs

def plan(overrides, diffusion_steps):
    """{kind: steps} giving each objective the FLOPs of ``diffusion_steps`` diffusion steps
    (expected head positions), and the budget. The recipe's batch and length, overridden."""
    from framework.config import load_config
    from framework.training.flops import FlopCounter
    cfg = load_config(RECIPE, overrides, need_data=False)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    per_token = {k: FlopCounter(cfg.model, k).expected_per_token(cfg.data.seq_len)
                 for k in KINDS}
    budget = per_token["pretrain"] * tokens * diffusion_steps
    return {k: max(1, round(budget / (per_token[k] * tokens))) for k in KINDS}, budget, cfg


def flops_done(cfg, kind, summary) -> float:
    """The FLOPs a finished run trained for: the trainer's count (summary.json ``flops``: the
    counter at each step's length and masked positions); without it, its consumed tokens at
    the expected cost per token."""
    from framework.training.flops import FlopCounter
    if summary.get("flops"):
        return summary["flops"]
    return FlopCounter(cfg.model, kind, cfg.objective.ar_loss_weight > 0).expected_per_token(
        cfg.data.seq_len) * summary["tokens"]


def train(run_dir: Path, kind: str, steps: int, overrides) -> tuple[dict, float]:
    """One fresh run (its directory replaced: an old one would be resumed); (summary, seconds)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "framework", "train", str(RECIPE), f"run.dir={run_dir}",
           f"run.name={run_dir.name}", f"objective.kind={kind}", f"train.steps={steps}",
           "tracking.enabled=false", "eval.at_start=false", "eval.interval=0",
           "checkpoint.save_final=true", *overrides]
    print(f"[mdm_vs_ar] {kind}: {steps} steps -> {run_dir} (log: {run_dir}/train.log)", flush=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-15:]
        sys.exit(f"[mdm_vs_ar] training failed (rc {rc}):\n" + "\n".join(tail))
    return json.loads((run_dir / "summary.json").read_text()), seconds


# ---------------------------------------------------------------------------------------------
# (A) held-out bits per byte

def part_a(args, work: Path, overrides, command: str) -> None:
    from benchmarks.results import machine, record, today
    steps, budget, cfg = plan(overrides, args.steps)
    print(f"[mdm_vs_ar] (A) budget {budget:.3g} FLOPs ({args.steps} diffusion steps): "
          f"steps {steps} on {machine()}", flush=True)
    res = {}
    for kind in KINDS:
        summary, secs = train(work / f"bpb-{kind}", kind, steps[kind], overrides)
        val = next(iter(summary["validation"].values()))  # the recipe's one held-out set
        res[kind] = (summary, secs, val["last"])
    ratio = res["pretrain"][2]["bpb_without_first"] / res["ar"][2]["bpb_without_first"]
    rows = []
    for kind in KINDS:
        summary, secs, v = res[kind]
        what = "bound" if kind == "pretrain" else "exact NLL"
        rows.append([today(), machine(), f"{budget:.3g}", LABEL[kind], str(summary["steps"]),
                     f"{flops_done(cfg, kind, summary):.3g}",
                     f"{v['loss']:.4f} ({what})", f"{v['bpb']:.4f}",
                     f"{v['bpb_without_first']:.4f}",
                     f"{ratio:.3f}" if kind == "pretrain" else "(reference)", f"{secs:.0f}",
                     f"`{command}`"])
    record("mdm_vs_ar: diffusion vs autoregression at equal FLOPs",
           "`python benchmarks/mdm_vs_ar.py` (defaults: `--steps 200`): the debug recipe's model "
           "trained from scratch on its shards (runs/data/stdlib-128) with each objective, same "
           "seeds, for the same training FLOPs (budget: what `--steps` diffusion steps of 32 x "
           "128 tokens cost by framework/training/flops.py, which counts causal attention half "
           "and the AR head at every position, so the step counts differ); held-out set: the "
           "recipe's (256 sequences, eval.t_samples 8 for the bound). Columns: training FLOPs "
           "= the trainer's count (summary.json flops: the counter at each step's actual "
           "masked positions and length); held-out loss in nats per token "
           "(diffusion: the LLaDA bound over every token, an upper bound on its NLL; AR: the "
           "exact NLL per predicted token); bpb over the tokens each objective scores; bpb "
           "without first = both over every token but each sequence's first, same bytes: the "
           "comparison; diffusion / AR = the ratio of that column (> 1: diffusion worse). "
           "wall s: the training run including its start and evaluation. "
           "Reversal probe: the next section.",
           ["date", "machine", "budget FLOPs", "objective", "steps", "training FLOPs",
            "held-out loss", "bpb", "bpb without first", "diffusion / AR", "wall s",
            "command"], rows)


# ---------------------------------------------------------------------------------------------
# (B) reversal probe

def make_names(rng: random.Random, n: int) -> list[str]:
    """n distinct pronounceable names, none a prefix of another (so a matched name is exact)."""
    names: set[str] = set()
    while len(names) < n:
        syll = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                for _ in range(rng.choice((2, 3)))]
        name = "".join(syll).capitalize()
        if not any(o.startswith(name) or name.startswith(o) for o in names):
            names.add(name)
    out = sorted(names)
    rng.shuffle(out)
    return out


def parent(a: str, b: str) -> str:
    return f"{a} is the parent of {b}."


def child(a: str, b: str) -> str:
    return f"{b} is the child of {a}."


def facts_corpus(work: Path, pairs: int, repeats: int, seed: int):
    """The pairs (both, forward-only) and corpus.jsonl: one fact per document, ``repeats``
    shuffled copies (each fact in many contexts and offsets of the packed sequences)."""
    rng = random.Random(seed)
    names = make_names(rng, 2 * pairs)
    pp = list(zip(names[:pairs], names[pairs:]))
    both, fwd = pp[:pairs // 2], pp[pairs // 2:]
    docs = [parent(a, b) for a, b in pp] + [child(a, b) for a, b in both]
    path = work / "facts" / "corpus.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(repeats):
            rng.shuffle(docs)
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return both, fwd, path


def prepare_facts(corpus: Path, out: Path, tokenizer: Path, seq_len: int) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "framework", "prepare", str(corpus), "-o", str(out),
                    "--tokenizer", str(tokenizer), "--seq-len", str(seq_len), "--name", "facts",
                    "--samples-per-shard", "256"], cwd=REPO, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    return out / "manifest.json"


def split_prompt(im, text: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of ``text`` = prompt + " " + answer, cut where the whole
    sentence's tokens are (so the answer's tokens are the ones trained on)."""
    full = im.tokenizer.encode(text)
    head = im.tokenizer.encode(text[:len(text) - len(answer) - 1])
    assert full[:len(head)] == head, (text, full, head)
    return im.document_start() + head, full[len(head):]


def name_of(text: str) -> str:
    m = re.match(r"\s*([A-Za-z]+)", text)
    return m.group(1) if m else ""


def complete(im, items) -> list[bool]:
    """items: (sentence, name its end holds); the model completes the sentence's start, given as
    many positions as the answer has tokens; correct if the name read back is the name."""
    from framework.inference.sampler import SamplerConfig, generate
    cut = [split_prompt(im, s, name + ".") for s, name in items]
    ok = [False] * len(items)
    for g in sorted({len(ans) for _, ans in cut}):  # one gen_length per call
        idx = [i for i, (_, ans) in enumerate(cut) if len(ans) == g]
        cfg = SamplerConfig(gen_length=g, steps=g, block_length=g, temperature=0.0,
                            stop_at_eos=False, batch_size=64)
        for i, c in zip(idx, generate(im, [cut[i][0] for i in idx], cfg)):
            ok[i] = name_of(im.tokenizer.decode(c.tokens)) == items[i][1]
    return ok


def infill(im, pairs) -> list[bool]:
    """Diffusion only: [EOS] + masks for A + " is the parent of B."; k steps, each committing
    the most confident masked position (low-confidence remasking, one block)."""
    import torch
    ok = []
    for a, b in pairs:
        full, k = im.tokenizer.encode(parent(a, b)), len(im.tokenizer.encode(a))
        x = torch.tensor([im.document_start() + [im.mask_id] * k + full[k:]], device=im.device)
        for _ in range(k):
            masked = x == im.mask_id
            probs = torch.softmax(im.logits(x, masked), -1)  # [masked, vocab]
            conf, pred = probs.max(-1)
            j = int(conf.argmax())
            x[0, masked[0].nonzero()[j, 0]] = pred[j]
        ok.append(name_of(im.tokenizer.decode(x[0, 1:1 + k].tolist())) == a)
    return ok


def accuracy(flags) -> str:
    return f"{sum(flags)}/{len(flags)} ({100 * sum(flags) / max(1, len(flags)):.1f}%)"


def part_b(args, work: Path, overrides, command: str) -> None:
    from benchmarks.results import machine, record, today
    from framework.inference.model import load
    steps, budget, cfg = plan(overrides, args.probe_steps)
    tokenizer = REPO / Path(cfg.data.datasets[0].manifest).parent / "tokenizer.model"
    if not tokenizer.is_file():
        sys.exit(f"[mdm_vs_ar] {tokenizer} missing: run part (A) or `llada train "
                 f"{RECIPE.relative_to(REPO)}` once to prepare the debug data")
    both, fwd, corpus = facts_corpus(work, args.pairs, args.repeats, args.seed)
    manifest = prepare_facts(corpus, work / "facts" / "shards", tokenizer, cfg.data.seq_len)
    facts_over = [f"optimizer.lr={args.probe_lr}", *overrides,
                  f"data.datasets=[{{manifest: {manifest}}}]", "data.validation=[]",
                  "eval.at_end=false"]
    rows = []
    for kind in KINDS:
        summary, secs = train(work / f"reversal-{kind}", kind, steps[kind], facts_over)
        im = load(str(work / f"reversal-{kind}"), args.device)
        t0 = time.perf_counter()
        test = complete(im, [(child(a, b), a) for a, b in fwd])
        forward = complete(im, [(parent(a, b), b) for a, b in fwd])
        rev_both = complete(im, [(child(a, b), a) for a, b in both])
        fill = accuracy(infill(im, fwd)) if kind == "pretrain" else "n/a (needs a suffix)"
        print(f"[mdm_vs_ar] {kind}: probes {time.perf_counter() - t0:.1f}s", flush=True)
        rows.append([today(), machine(), f"{len(both)} / {len(fwd)} x {args.repeats}",
                     f"{budget:.3g}", LABEL[kind], str(summary["steps"]),
                     f"{flops_done(cfg, kind, summary):.3g}", f"{summary['last_loss']:.3f}",
                     accuracy(test), accuracy(forward), accuracy(rev_both), fill,
                     f"{secs:.0f}", f"`{command}`"])
    record("mdm_vs_ar: reversal probe at equal FLOPs",
           "`python benchmarks/mdm_vs_ar.py` (defaults: `--probe-steps 1200 --pairs 40 --repeats"
           " 24 --probe-lr 3e-3`): made-up names (pronounceable, 2-3 syllables, about 4 debug-"
           "tokenizer pieces each); pairs (A, B), half 'both' (trained on \"A is the parent of "
           "B.\" and \"B is the child of A.\"), half 'forward-only' (\"A is the parent of B.\" only);"
           " one fact per document, the facts in shuffled copies; the debug model trained from "
           "scratch on them with each objective for the same FLOPs (as above; optimizer.lr 3e-3 "
           "for both: the recipe's 1e-3 left diffusion far from memorising). Accuracy = exact "
           "name, greedy: diffusion fills the answer's masks (as many as \" A.\" has tokens, one "
           "commit per step), AR completes the sentence. reverse, forward-only: \"B is the child "
           "of\" -> A, never trained (the test; chance ~ 1 / the number of names); forward, "
           "forward-only and reverse, both: trained controls; infill: \"[masks] is the parent of "
           "B.\" -> A, the trained sentence's earlier part from its later one (diffusion only). "
           "train loss: the mean of the last 10 steps (diffusion: the bound's estimate, per "
           "token of the packed sequences; AR: next-token CE).",
           ["date", "machine", "pairs both / forward-only x copies", "budget FLOPs",
            "objective", "steps", "training FLOPs", "train loss",
            "reverse, forward-only (held out)", "forward, forward-only", "reverse, both",
            "infill A from \"... parent of B.\"", "wall s", "command"], rows)


if __name__ == "__main__":
    main()
