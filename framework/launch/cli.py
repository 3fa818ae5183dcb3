"""``llada``: the command line. ``llada train RECIPE [key=value ...]``,
``llada plan RECIPE [key=value ...]``, ``llada prepare INPUT... -o DIR [options]``,
``llada export CHECKPOINT OUT_DIR``, ``llada checkpoint verify PATH``
(framework/launch/checkpoint_cli.py), ``llada validate RUN_DIR|CHECKPOINT [--data MANIFEST]``,
``llada slurm submit RECIPE --nodes N --gpus-per-node G --time T [key=value ...]``,
``llada slurm prepare INPUT... -o DIR --array N --time T [options]``,
``llada tracking sync RUN_DIR``, ``llada generate MODEL``, ``llada eval MODEL``,
``llada lm-eval ...`` (framework/launch/inference_cli.py).

Bad input (a missing recipe, an unknown key, a wrong type, sizes that do not divide) prints one
line naming the key or file and exits 2, without a traceback. A failed run exits 1; a run stopped
early by a signal or the job's deadline, with its checkpoint saved, exits 3 (``EXIT_REQUEUE``); a
rank the hang watchdog ends exits 4 (framework/training/watchdog.py: a crash, to be restarted).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from data_pipeline.errors import DataConfigError
from framework.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
BAD_INPUT = (ConfigError, DataConfigError)  # bad input, of every package: one line, exit 2


def _error(msg: str, code: int) -> int:
    print(f"llada: error: {msg}", file=sys.stderr, flush=True)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from framework.config import load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)

    # the signals that mean "checkpoint and stop" are handled from here on, before the slow part
    # (imports, data preparation, building the engine): one arriving then stops after step one
    from framework.training.preemption import EXIT_REQUEUE, StopRequest, deadline_from_env
    try:
        stop = StopRequest(cfg.preemption, deadline_from_env()).install()
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)

    from framework.checkpoint.checkpointer import CheckpointError
    from framework.parallel.world import shutdown_world
    from framework.training.run import run_training
    from framework.training.trainer import TrainingError

    try:
        recipe = " ".join([str(args.recipe), *args.overrides])
        summary = run_training(cfg, stop, recipe=recipe)
    except BAD_INPUT as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except (TrainingError, CheckpointError) as e:
        return _error(str(e), EXIT_FAILED)
    finally:  # the handler stays: a late signal during teardown must not kill the process
        shutdown_world()
    return EXIT_REQUEUE if summary["status"] == "stopped" else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from framework.config import load_config
    from framework.launch.plan import peak_and_mfu, plan

    try:
        cfg = load_config(args.recipe, args.overrides, need_data=False)
        if cfg.parallel.world_size is None:
            raise ConfigError("parallel.world_size: llada plan needs the number of GPUs, e.g. "
                              "parallel.world_size=1024")
        if args.mfu is not None and not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu: must be in (0, 1], got {args.mfu}")
        peak, mfu, mfu_from = peak_and_mfu(cfg, mfu=args.mfu, gpu=args.gpu,
                                           peak_tflops=args.peak_tflops, measured=args.measured)
        print(plan(cfg, mfu=mfu, peak_flops=peak, mfu_from=mfu_from))
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)
    return 0


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from framework.launch.slurm import SubmitOptions, prepare_submission, submit

    try:
        opts = SubmitOptions(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
            tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
            account=args.account, partition=args.partition, job_name=args.job_name,
            signal_minutes=args.signal_minutes, max_crash_retries=args.max_crash_retries)
        try:
            cfg, script = prepare_submission(args.recipe, args.overrides, opts, need_data=True)
        except ConfigError as e:
            if not args.dry_run:
                raise
            # a dry run shows the script even with the data unset (no other error passes)
            cfg, script = prepare_submission(args.recipe, args.overrides, opts, need_data=False)
            print(f"llada: warning: {e}; the job would stop at its start with this error",
                  file=sys.stderr)
        if args.dry_run:
            print(script, end="")
            return 0
        job, path = submit(script, Path(cfg.run.dir))
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except (RuntimeError, OSError) as e:
        return _error(str(e), EXIT_FAILED)
    log = Path(cfg.run.dir).resolve() / "slurm" / f"{opts.job_name or cfg.run.name}-{job}.out"
    print(f"llada: submitted job {job} ({opts.nodes} x {opts.tasks_per_node} tasks, "
          f"--time {opts.time}); script {path}\n"
          f"llada: follow it: squeue -j {job}; tail -f {log}")
    return 0


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    """Send what a run kept while its MLflow server was unreachable."""
    from framework.tracking.courier import sync

    try:
        sent = sync(Path(args.directory))
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except Exception as e:  # noqa: BLE001 - the server's or the network's failure, kept for later
        return _error(f"{args.directory}: MLflow did not take the records ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}); they stay kept, try again later",
                      EXIT_FAILED)
    print(f"llada: {sent} tracking record(s) sent")
    return 0


def _prepare_config(args: argparse.Namespace, parts: Optional[int] = None):
    from data_pipeline.config import PrepareConfig, TokenizerConfig
    return PrepareConfig(
        inputs=args.inputs, output=args.output, name=args.name, seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard, jsonl_text_field=args.text_field,
        workers=args.workers, seed=args.seed, holdout_fraction=args.holdout_fraction,
        holdout_seed=args.holdout_seed, parts=parts or args.parts,
        part=getattr(args, "part", 0), sft=args.sft, sft_overflow=args.sft_overflow,
        tokenizer=TokenizerConfig(model=args.tokenizer, vocab_size=args.vocab_size,
                                  train_bytes=args.tokenizer_train_bytes))


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.merge import merge
    from data_pipeline.prepare import prepare, prepare_tokenizer

    try:
        cfg = _prepare_config(args)
        if args.tokenizer_only:
            prepare_tokenizer(cfg)
        elif args.merge:
            merge(cfg)
        else:
            prepare(cfg)
    except BAD_INPUT as e:
        return _error(str(e), EXIT_BAD_INPUT)
    return 0


def cmd_slurm_prepare(args: argparse.Namespace) -> int:
    """The tokenizer (unless given), an array of parts and the merge, as dependent jobs."""
    from data_pipeline.corpus import expand_inputs
    from data_pipeline.tokenizer import load_tokenizer
    from framework.launch.slurm_prepare import ArrayOptions, render, submit

    try:
        opts = ArrayOptions(parts=args.array, time=args.time, cpus_per_task=args.cpus_per_task,
                            mem=args.mem, account=args.account, partition=args.partition,
                            job_name=args.job_name)
        cfg = _prepare_config(args, parts=args.array)  # bad input fails here, not in the jobs
        expand_inputs(cfg.inputs)
        if cfg.tokenizer.model:
            load_tokenizer(Path(cfg.tokenizer.model), "--tokenizer")
        output = Path(cfg.output).resolve()
        argv = [*cfg.inputs, "--output", str(output)]
        for flag, dest in _PREPARE_FLAGS:
            value = getattr(args, dest)
            if dest == "workers" and not value:
                value = opts.cpus_per_task  # a job's CPUs, not the node's
            if isinstance(value, bool):  # a flag: named or not
                argv += [flag] if value else []
            elif value is not None:
                argv += [flag, str(value)]
        jobs = render(argv, output, cfg.name, opts, train_tokenizer=cfg.tokenizer.model is None)
        if args.dry_run:
            for name, text in jobs:
                print(f"# --- {name}\n{text}", end="")
            return 0
        done = submit(jobs, output, opts.parts)
    except BAD_INPUT as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except (RuntimeError, OSError) as e:
        return _error(str(e), EXIT_FAILED)
    ids = ", ".join(f"{name.rsplit('-', 1)[1]} {job}" for name, job, _ in done)
    print(f"llada: submitted {ids} (parts: array 0-{opts.parts - 1}); scripts and logs in "
          f"{output / 'slurm'}\nllada: follow them: squeue -j {','.join(j for _, j, _ in done)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """The held-out bound of a checkpoint: a table on stdout, the report as JSON."""
    from framework.checkpoint.hf_files import HFFormatError
    from framework.checkpoint.reshard import ReshardError
    from framework.evaluation.validate import table, validate, write_report
    from framework.parallel.world import shutdown_world

    try:
        report = validate(Path(args.source), args.data or [], sequences=args.sequences,
                          t_samples=args.t_samples, seed=args.seed,
                          micro_batch_size=args.micro_batch_size, device=args.device,
                          warn=lambda m: print(f"llada: warning: {m}", file=sys.stderr))
    except (*BAD_INPUT, HFFormatError, ReshardError) as e:
        return _error(str(e), EXIT_BAD_INPUT)
    finally:
        shutdown_world()
    out = Path(args.output) if args.output else Path(report["checkpoint"]) / "validation.json"
    try:
        write_report(report, out)
    except OSError as e:
        return _error(f"--output {out}: {e.strerror or e}", EXIT_FAILED)
    print(table(report))
    print(f"llada: report {out}")
    return 0


def _default(name: str):
    """PrepareConfig's default: the dataclass stays the one source of truth for the flags."""
    from data_pipeline.config import PrepareConfig, TokenizerConfig
    cls = TokenizerConfig if name in ("vocab_size", "train_bytes") else PrepareConfig
    return cls.__dataclass_fields__[name].default


def _prepare_arguments(parser: argparse.ArgumentParser) -> List[Tuple[str, str]]:
    """The options of llada prepare, shared with llada slurm prepare; returns (flag, dest) of
    each option but the output, which llada slurm prepare hands on to its jobs."""
    from data_pipeline.config import SFT_OVERFLOW
    added = []

    class _Recorder:  # records what it adds: the one list of these options
        def add_argument(self, *args, **kwargs):
            added.append(parser.add_argument(*args, **kwargs))

    prep = _Recorder()
    prep.add_argument("inputs", nargs="+", help="input globs, e.g. 'data/**/*.jsonl.gz', or stdlib")
    prep.add_argument("-o", "--output", required=True, help="output directory")
    prep.add_argument("--name", default=_default("name"), help="shard name prefix")
    prep.add_argument("--seq-len", type=int, default=_default("seq_len"),
                      help="tokens per sequence")
    prep.add_argument("--samples-per-shard", type=int, default=_default("samples_per_shard"))
    prep.add_argument("--text-field", default=_default("jsonl_text_field"),
                      help="JSONL field holding the text")
    prep.add_argument("--workers", type=int, default=_default("workers"),
                      help="tokeniser processes (0: one per CPU this process may use)")
    prep.add_argument("--seed", type=int, default=_default("seed"),
                      help="seeds the order of input files and of the sequences")
    prep.add_argument("--tokenizer", default=None,
                      help="an existing tokenizer: a SentencePiece .model (must hold "
                      "<|mdm_mask|>), or a Hugging Face tokenizer directory (tokenizer.json; "
                      "its mask: an existing mask or reserved token, else a new one in the "
                      "model's padding rows), or a dataset's tokenizer.hf.json; default: train "
                      "a SentencePiece model on the inputs")
    prep.add_argument("--vocab-size", type=int, default=_default("vocab_size"),
                      help="when training one")
    prep.add_argument("--tokenizer-train-bytes", type=int, default=_default("train_bytes"),
                      help="text sampled to train it")
    prep.add_argument("--holdout-fraction", type=float, default=_default("holdout_fraction"),
                      help="hold out this fraction of the documents (by a seeded hash of each) "
                      "into OUTPUT/holdout/, a dataset of its own for data.validation")
    prep.add_argument("--holdout-seed", type=int, default=_default("holdout_seed"),
                      help="seeds the hash that chooses the held-out documents")
    prep.add_argument("--sft", action="store_true",
                      help="SFT shards: the inputs are JSONL conversations ('messages', or "
                      "'prompt'/'response'), or stdlib-sft (pairs made from the standard "
                      "library's functions); one (prompt, response) pair per sample; needs "
                      "--tokenizer (the fine-tuned model's)")
    prep.add_argument("--sft-overflow", choices=SFT_OVERFLOW,
                      default=_default("sft_overflow"),
                      help="a pair longer than --seq-len: dropped (skip) or cut, losing its "
                      "response's end (truncate); counted in the manifest either way")
    return [(a.option_strings[-1], a.dest) for a in added
            if a.option_strings and a.dest != "output"]


# llada prepare's options that llada slurm prepare hands on to its jobs: (flag, dest)
_PREPARE_FLAGS = _prepare_arguments(argparse.ArgumentParser(add_help=False))


def _recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/debug-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada", description="Pretrain LLaDA masked diffusion "
                                     "language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="pretrain from a recipe",
                           description="Pretrain from a recipe YAML; key=value overrides any "
                           "config key, e.g. train.steps=100 deepspeed.zero_stage=2.")
    _recipe_arguments(train)
    train.set_defaults(func=cmd_train)

    from framework.launch.plan import GUESSED_MFU, MEASURED
    from framework.training.flops import H100_SXM
    plan = sub.add_parser(
        "plan", help="check and size a parallel layout without launching anything",
        description="Check that tp x pp x dp fits the model and batch for parallel.world_size "
        "GPUs, and print per-GPU parameters and memory (weights, gradients, optimizer state by "
        "ZeRO stage, activations), FLOPs per step and the step time at an MFU: measured on --gpu "
        "by benchmarks/train_step.py where benchmarks/measured.json has it, else --mfu. E.g. "
        "llada plan recipes/llada-8b.yaml parallel.tp=8 parallel.pp=4 parallel.world_size=1024")
    _recipe_arguments(plan)
    plan.add_argument("--mfu", type=float, default=None,
                      help="model FLOPs utilisation to assume (default: the one measured on "
                      f"--gpu where --measured has it, else {GUESSED_MFU})")
    plan.add_argument("--gpu", default=None, metavar="NAME",
                      help="the GPU by its torch.cuda device name, e.g. 'NVIDIA H200': its "
                      "datasheet peak, and its MFU measured by benchmarks/train_step.py for "
                      "this model shape and sequence length where --measured has one")
    plan.add_argument("--measured", type=Path, default=MEASURED,
                      help="benchmark records (default: the repository's "
                      "benchmarks/measured.json)")
    plan.add_argument("--peak-tflops", type=float, default=None,
                      help="dense bf16 peak per GPU, as MFU counts it (default: --gpu's, or the "
                      f"H100 SXM datasheet's {H100_SXM / 1e12:.0f})")
    plan.set_defaults(func=cmd_plan)

    from framework.launch.checkpoint_cli import add_parsers as checkpoint_parsers
    checkpoint_parsers(sub)

    slurm = sub.add_parser("slurm", help="run on a Slurm cluster",
                           description="Slurm jobs that checkpoint and requeue themselves "
                           "ahead of time limits and on preemption (the sbatch script: "
                           "framework/launch/llada.sbatch).")
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True)
    sub_submit = slurm_sub.add_parser(
        "submit", help="render the sbatch script for a recipe and sbatch it",
        description="Check the recipe and overrides against nodes x tasks, fill in the sbatch "
        "script (resources, the run's arguments, paths) and submit it with sbatch; the rendered "
        "script is kept under run.dir/slurm and the job log goes there too. "
        "Overrides may come before or after the options.")
    _recipe_arguments(sub_submit)
    sub_submit.add_argument("--nodes", required=True,
                            help="N, or MIN-MAX: the job starts on as many as are free (a "
                            "restart after a node is lost continues on fewer); the global batch "
                            "must divide over every count")
    sub_submit.add_argument("--gpus-per-node", type=int, required=True,
                            help="one task per GPU; 0 with --tasks-per-node for CPU tasks")
    sub_submit.add_argument("--time", required=True, help="time limit, e.g. 48:00:00")
    sub_submit.add_argument("--account")
    sub_submit.add_argument("--partition")
    sub_submit.add_argument("--job-name", help="default: run.name")
    sub_submit.add_argument("--tasks-per-node", type=int,
                            help="default: --gpus-per-node; needed for CPU tasks")
    sub_submit.add_argument("--cpus-per-task", type=int,
                            help="CPUs per rank (default: data.num_workers + 2)")
    from framework.launch.slurm import SubmitOptions
    defaults = {k: f.default for k, f in SubmitOptions.__dataclass_fields__.items()}
    sub_submit.add_argument("--signal-minutes", type=float, default=defaults["signal_minutes"],
                            help="minutes before the time limit at which the job checkpoints "
                            "and requeues itself")
    sub_submit.add_argument("--max-crash-retries", type=int,
                            default=defaults["max_crash_retries"],
                            help="requeues after crashes in a row without a new checkpoint")
    sub_submit.add_argument("--dry-run", action="store_true",
                            help="print the rendered script instead of submitting it")
    sub_submit.set_defaults(func=cmd_slurm_submit)
    sub_prep = slurm_sub.add_parser(
        "prepare", help="llada prepare as a Slurm array of parts plus a merge",
        description="Submit llada prepare as dependent Slurm jobs: the tokenizer (unless "
        "--tokenizer is given), an array of --array parts, each tokenising its share of the "
        "inputs, and the merge that writes the manifest. The scripts and logs go to "
        "OUTPUT/slurm. Takes llada prepare's options.")
    _prepare_arguments(sub_prep)
    sub_prep.add_argument("--array", type=int, required=True, help="number of parts (>= 2)")
    sub_prep.add_argument("--time", required=True, help="time limit of each job, e.g. 4:00:00")
    sub_prep.add_argument("--cpus-per-task", type=int, default=4,
                          help="CPUs of each job (its tokeniser processes unless --workers)")
    sub_prep.add_argument("--mem", help="memory of each job, e.g. 16G")
    sub_prep.add_argument("--account")
    sub_prep.add_argument("--partition")
    sub_prep.add_argument("--job-name", help="default: prepare-NAME")
    sub_prep.add_argument("--dry-run", action="store_true",
                          help="print the scripts instead of submitting them")
    sub_prep.set_defaults(func=cmd_slurm_prepare)

    tracking = sub.add_parser("tracking", help="MLflow tracking",
                              description="The MLflow run of a training run (framework/tracking/).")
    tracking_sub = tracking.add_subparsers(dest="tracking_command", required=True)
    sync = tracking_sub.add_parser(
        "sync", help="send the records a run kept while MLflow was unreachable",
        description="Send the records of a run directory's tracking outbox (or of a "
        "tracking-unsent-* directory set aside) that its MLflow server has not got, in order, "
        "to the same run; nothing is sent twice.")
    sync.add_argument("directory", help="run directory, its tracking/ or a tracking-unsent-*")
    sync.set_defaults(func=cmd_tracking_sync)

    prep = sub.add_parser(
        "prepare", help="tokenise text/JSONL into WebDataset tar shards",
        description="Tokenise .txt/.jsonl(.gz) files (globs; 'stdlib' for the embedded corpus) "
        "in parallel, join documents with EOS, cut fixed-length sequences and write them in a "
        "seeded random order to NAME-000000.tar ... plus manifest.json and the tokenizer "
        "(tokenizer.model, or tokenizer.hf.json for a Hugging Face one) in OUTPUT. "
        "Deterministic; an up-to-date OUTPUT is left as is. In parts: --tokenizer-only "
        "once (unless --tokenizer), then --parts N --part P for each P (on any machines), then "
        "--merge --parts N; llada slurm prepare submits that as Slurm jobs. With --sft: JSONL "
        "conversations (or stdlib-sft) -> SFT shards, one (prompt, response) pair per sample, "
        "tokenised with --tokenizer, the fine-tuned model's.")
    _prepare_arguments(prep)
    prep.add_argument("--parts", type=int, default=_default("parts"),
                      help="the dataset is prepared as this many independent parts")
    prep.add_argument("--part", type=int, default=_default("part"),
                      help="the part this run prepares, 0 .. parts-1")
    prep.add_argument("--merge", action="store_true",
                      help="write the dataset's manifest from its --parts parts' manifests")
    prep.add_argument("--tokenizer-only", action="store_true",
                      help="only train (or copy) OUTPUT's tokenizer, for the parts to share")
    prep.set_defaults(func=cmd_prepare)

    val = sub.add_parser(
        "validate", help="the held-out bound of a checkpoint (any layout), on one process",
        description="Evaluate the LLaDA bound (nats per token, its Monte Carlo and sampling "
        "errors, bits per byte, the bound by mask ratio) of a checkpoint on held-out sets with "
        "the estimator and masks of the run's own evaluations; print a table and write JSON.")
    val.add_argument("source", help="a run directory, its checkpoints/ or a step_N directory")
    val.add_argument("--data", action="append", metavar="MANIFEST",
                     help="a held-out dataset's manifest.json (repeatable); default: the run's "
                     "data.validation")
    val.add_argument("--sequences", type=int, help="per set (default: the run's eval.sequences)")
    val.add_argument("--t-samples", type=int, help="draws per sequence (default: the run's)")
    val.add_argument("--seed", type=int, help="evaluation seed (default: the run's eval.seed)")
    val.add_argument("--micro-batch-size", type=int, help="masked copies per forward (32)")
    val.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    val.add_argument("--output", help="the JSON report (default: CHECKPOINT/validation.json)")
    val.set_defaults(func=cmd_validate)

    from framework.launch.inference_cli import add_parsers
    add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # DeepSpeed probes for accelerators and compilers at import; keep it from spawning
    # compiler checks that print noise on machines without CUDA.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every argument is the harness's
        from framework.launch.inference_cli import cmd_lm_eval
        return cmd_lm_eval(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `llada slurm submit RECIPE --nodes 2 ... key=value`: overrides after the options
    if getattr(args, "overrides", None) is not None and getattr(args, "slurm_command", None):
        args.overrides += [a for a in extra if not a.startswith("-")]
        extra = [a for a in extra if a.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
