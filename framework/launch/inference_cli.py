"""``llada generate MODEL``, ``llada eval MODEL`` and ``llada lm-eval ...`` (the harness's CLI
with our model registered: framework/evaluation/harness.py). MODEL: a checkpoint of any layout
or an ``llada export`` directory. Bad input: one line naming the flag, file or line, exit 2
(framework/launch/cli.py's ``_error``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from framework.launch.cli import BAD_INPUT, EXIT_BAD_INPUT, _error


def _bad_input():
    """What a model that cannot be read raises, beside the bad input of every package."""
    from framework.checkpoint.hf_mapping import HFFormatError
    from framework.checkpoint.reshard import ReshardError
    return (*BAD_INPUT, HFFormatError, ReshardError)


def _warn(msg: str) -> None:
    print(f"llada: warning: {msg}", file=sys.stderr)


def _dtype(name: Optional[str]):
    import torch
    return getattr(torch, name) if name else None


def read_prompts(path: Path) -> List[object]:
    """``{"prompt": str}`` or ``{"messages": [...]}`` per line (a str, or a message list for
    --chat); a malformed line is an error naming the file and line."""
    from data_pipeline.files import jsonl_records
    from framework.config import ConfigError

    out = []
    for n, rec in jsonl_records(path, "--prompts-file"):
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append(rec["prompt"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            out.append(rec["messages"])
        else:
            raise ConfigError(f"--prompts-file: {path}:{n}: neither {{\"prompt\": str}} nor "
                              f"{{\"messages\": [...]}}")
    if not out:
        raise ConfigError(f"--prompts-file: {path} holds no prompt")
    return out


def _encode(im, prompt, chat: bool) -> List[int]:
    from data_pipeline.sft import ChatFormat, _messages
    from framework.config import ConfigError
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            _messages({"messages": messages + [{"role": "assistant", "content": ""}]})
        except ValueError as e:
            raise ConfigError(f"--prompts-file: a conversation is malformed ({e})") from None
        return ChatFormat(im.tokenizer).prompt(messages)
    if not isinstance(prompt, str):
        raise ConfigError("--prompts-file: a {\"messages\": ...} line needs --chat")
    return im.document_start() + im.tokenizer.encode(prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    from framework.inference.model import load
    from framework.inference.sampler import SamplerConfig, generate
    from framework.parallel.world import shutdown_world

    try:
        cfg = SamplerConfig(
            gen_length=args.gen_length, steps=args.steps,
            block_length=args.block_length or args.gen_length, remasking=args.remasking,
            temperature=args.temperature, cfg_scale=args.cfg_scale,
            stop_at_eos=not args.no_stop_at_eos, seed=args.seed, cache=args.cache,
            refresh=args.refresh, threshold=args.threshold, batch_size=args.batch_size)
        prompts = list(args.prompt or []) + (read_prompts(args.prompts_file)
                                             if args.prompts_file else [])
        if not prompts:
            return _error("give --prompt TEXT or --prompts-file FILE.jsonl", EXIT_BAD_INPUT)
        im = load(args.model, args.device, _dtype(args.dtype), warn=_warn)
        if im.objective == "ar":
            print("llada generate: an autoregressive model (objective ar): next-token decoding; "
                  "--steps, --block-length, --remasking, --cfg-scale, --cache, --refresh and "
                  "--threshold do not apply", file=sys.stderr)
        ids = [_encode(im, p, args.chat) for p in prompts]
        done = generate(im, ids, cfg)
    except _bad_input() as e:
        return _error(str(e), EXIT_BAD_INPUT)
    finally:
        shutdown_world()
    records = []
    for p, c in zip(prompts, done):
        records.append({"prompt": p, "completion": im.tokenizer.decode(c.tokens),
                        "steps": c.steps, "tokens": c.generated, "seconds": round(c.seconds, 4),
                        "tokens_per_s": round(c.batch_generated / c.seconds, 2)})
    if args.jsonl:
        from data_pipeline.files import atomic_write
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write(Path(args.jsonl), text.encode())
    for i, r in enumerate(records):
        prompt = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"])
        print(f"=== {i + 1}: {prompt}\n{r['completion']}\n--- {r['steps']} steps, "
              f"{r['tokens_per_s']:,.1f} tokens/s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from framework.evaluation.validate import table, validate
    from framework.inference.likelihood import multiple_choice, read_choices
    from framework.inference.model import load
    from framework.parallel.world import shutdown_world

    if not args.data and not args.choices:
        return _error("give --data MANIFEST (the held-out bound) and/or --choices FILE.jsonl",
                      EXIT_BAD_INPUT)
    report: dict = {"model": str(args.model)}
    try:
        questions = read_choices(Path(args.choices)) if args.choices else None
        im = load(args.model, args.device, _dtype(args.dtype), warn=_warn) \
            if questions is not None else None
        if args.data:
            # the bound is evaluated in fp32 (llada validate's rule): the model loaded for the
            # choices serves when it is fp32 too, else validate loads its own
            same = im if im is not None and im.dtype == torch.float32 else None
            held = validate(Path(args.model), args.data, sequences=args.sequences,
                            t_samples=args.t_samples, seed=args.seed, device=args.device,
                            warn=_warn, key="MODEL", model=same)
            report.update(step=held["step"], heldout=held)
        if questions is not None:
            report.update(step=im.step, choices=multiple_choice(
                im, questions, args.samples, args.batch_size, args.cfg_scale, args.seed or 0))
    except _bad_input() as e:
        return _error(str(e), EXIT_BAD_INPUT)
    finally:
        shutdown_world()
    if "heldout" in report:
        print(table(report["heldout"]))
    if "choices" in report:
        c = report["choices"]
        print(f"{'choices':<24} {'items':>6} {'acc':>8} {'± ':>7} {'acc_norm':>9} {'± ':>7} "
              f"{'loglik ± (mean)':>16}\n{args.choices:<24} {c['questions']:>6} {c['acc']:>8.4f} "
              f"{c['acc_stderr']:>7.4f} {c['acc_norm']:>9.4f} {c['acc_norm_stderr']:>7.4f} "
              f"{c['mean_loglik_stderr']:>16.4f}  ({c['samples']} samples each)")
    if args.output:
        from data_pipeline.files import atomic_write
        atomic_write(Path(args.output), (json.dumps(report, indent=1) + "\n").encode())
        print(f"llada: report {args.output}")
    return 0


def cmd_lm_eval(argv: List[str]) -> int:
    """The harness's own CLI, with ``llada`` registered as a model."""
    try:
        import framework.evaluation.harness  # noqa: F401 - registers the model
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        return _error(f"llada lm-eval needs the lm-evaluation-harness ({e.name} is missing): "
                      f"pip install -e '.[eval]'", EXIT_BAD_INPUT)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except _bad_input() as e:
        return _error(str(e), EXIT_BAD_INPUT)
    finally:
        sys.argv = saved
        from framework.parallel.world import shutdown_world
        shutdown_world()
    return 0


def add_parsers(sub) -> None:
    gen = sub.add_parser(
        "generate", help="sample from a trained model (the LLaDA reverse process)",
        description="Generate completions of prompts with the LLaDA sampler: --gen-length "
        "masks after the prompt, --steps forward passes over --block-length blocks "
        "(semi-autoregressive), low-confidence or random remasking; fast mode with --cache "
        "(dual/prefix key-value cache) and --threshold (parallel decoding).")
    gen.add_argument("model", help="a checkpoint (run dir, checkpoints/ or step_N) or an "
                     "llada export directory")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help='JSONL: {"prompt": str} (or {"messages": [...]} '
                     "with --chat) per line")
    gen.add_argument("--chat", action="store_true", help="apply the chat template of SFT")
    gen.add_argument("--gen-length", type=int, default=128)
    gen.add_argument("--steps", type=int, default=128, help="forward passes in all")
    gen.add_argument("--block-length", type=int, help="default: --gen-length (one block)")
    gen.add_argument("--remasking", default="low_confidence",
                     help="low_confidence or random")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--cfg-scale", type=float, default=0.0,
                     help="classifier-free guidance weight (0: off)")
    gen.add_argument("--no-stop-at-eos", action="store_true",
                     help="run every step even after the completion has ended")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cache", default="none", help="none, prefix or dual (fast mode)")
    gen.add_argument("--refresh", default="block",
                     help="rebuild the cache every block (fast) or every step (exact)")
    gen.add_argument("--threshold", type=float,
                     help="commit every masked token above this confidence (fast mode; 0.9)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    gen.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"],
                     help="default: bfloat16 on a GPU, float32 on a CPU")
    gen.add_argument("--jsonl", help="also write the completions here, one JSON object each")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser(
        "eval", help="score a trained model: the held-out bound, multiple-choice accuracy",
        description="--data: the held-out bound and bits per byte (llada validate's estimator); "
        "--choices: multiple-choice accuracy from the Monte Carlo conditional log-likelihood. "
        "A table on stdout, the report as JSON with --output.")
    ev.add_argument("model", help="a checkpoint or an llada export directory")
    ev.add_argument("--data", action="append", metavar="MANIFEST",
                    help="a held-out dataset's manifest.json (repeatable)")
    ev.add_argument("--choices", help='JSONL: {"context", "choices", "gold"} per line')
    ev.add_argument("--samples", type=int, default=128,
                    help="Monte Carlo draws per (context, choice)")
    ev.add_argument("--cfg-scale", type=float, default=0.0)
    ev.add_argument("--batch-size", type=int, default=32, help="rows per forward")
    ev.add_argument("--sequences", type=int, help="--data: sequences per set")
    ev.add_argument("--t-samples", type=int, help="--data: draws per sequence")
    ev.add_argument("--seed", type=int, help="evaluation seed")
    ev.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"])
    ev.add_argument("--output", help="the JSON report")
    ev.set_defaults(func=cmd_eval)

    sub.add_parser("lm-eval", help="the lm-evaluation-harness CLI with the model 'llada'",
                   description="Runs lm-eval's CLI (all its arguments) with --model llada "
                   "available, e.g. llada lm-eval --model llada --model_args pretrained=DIR "
                   "--tasks hellaswag. Needs the eval extra.", add_help=False)
