"""``llada export CHECKPOINT OUT_DIR`` and ``llada checkpoint verify PATH``: what is done with a
run's checkpoints outside training. Bad input: one line naming the path, exit 2
(framework/launch/cli.py's ``_error``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from framework.launch.cli import BAD_INPUT, EXIT_BAD_INPUT, EXIT_FAILED, _error

EXIT_DAMAGED = 1  # llada checkpoint verify: a checkpoint is incomplete or damaged


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint's consolidated weights, config and tokenizer in the layout of the public
    LLaDA Hugging Face release; ``init.from=OUT_DIR`` starts a run from them."""
    import torch

    from framework.checkpoint.hf_files import HFFormatError, export_checkpoint
    from framework.checkpoint.reshard import ReshardError

    try:
        tag, meta = export_checkpoint(Path(args.checkpoint), Path(args.out_dir),
                                      getattr(torch, args.dtype), overwrite=args.overwrite,
                                      warn=lambda m: print(f"llada: warning: {m}"))
    except (*BAD_INPUT, HFFormatError, ReshardError, FileExistsError) as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except OSError as e:
        return _error(f"{args.out_dir}: {e.strerror or e}", EXIT_FAILED)
    print(f"llada: exported {tag} (step {meta['step']}) to {args.out_dir}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Every file of each checkpoint against its recorded size and content checksum: one line
    per checkpoint, naming each damaged file; exit 1 when any is incomplete or damaged."""
    from framework.checkpoint.checkpointer import checkpoints_under, read_meta, verify_checkpoint
    from framework.checkpoint.integrity import has_checksums

    path = Path(args.path)
    if not path.exists():
        return _error(f"{path}: no such checkpoint, checkpoints or run directory", EXIT_BAD_INPUT)
    tags = checkpoints_under(path)
    if not tags:
        return _error(f"{path}: holds no checkpoint (step_N directories)", EXIT_BAD_INPUT)
    bad = 0
    for tag in tags:
        start = time.perf_counter()
        problems = verify_checkpoint(tag)
        if problems:
            bad += 1
            print(f"llada: {tag}: DAMAGED: {'; '.join(problems)}", flush=True)
            continue
        meta = read_meta(tag)
        size = sum(meta["files"].values())
        how = "content checksums match" if has_checksums(meta) else \
            "sizes only: written before checksums"
        print(f"llada: {tag}: ok ({len(meta['files'])} files, {size / 2**20:.1f} MiB, {how}, "
              f"{time.perf_counter() - start:.1f} s)", flush=True)
    if bad:
        print(f"llada: {bad} of {len(tags)} checkpoint(s) incomplete or damaged: a resume "
              "(checkpoint.resume=auto) passes them over", flush=True)
        return EXIT_DAMAGED
    return 0


def add_parsers(sub) -> None:
    export = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face LLaDA directory",
        description="Consolidate a checkpoint (any layout) into safetensors weights with "
        "LLaDAModelLM keys, config.json and the tokenizer, as the public LLaDA release lays them "
        "out. CHECKPOINT: a step_N directory, a checkpoints directory or a run directory (its "
        "newest complete checkpoint). `llada train RECIPE init.from=OUT_DIR` starts from it.")
    export.add_argument("checkpoint", help="step_N, checkpoints/ or run directory")
    export.add_argument("out_dir", help="output directory (must not exist)")
    export.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="weights' dtype (the release's is bfloat16)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR once the new export is complete")
    export.set_defaults(func=cmd_export)

    ckpt = sub.add_parser("checkpoint", help="check a run's checkpoints",
                          description="Checkpoints outside training (framework/checkpoint/).")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    verify = ckpt_sub.add_parser(
        "verify", help="check every file of checkpoints against its size and checksum",
        description="Read every file of a checkpoint (or of every checkpoint under a "
        "checkpoints or run directory) and compare it with the size and content checksum "
        "recorded in its meta.json when it was written. Prints one line per checkpoint naming "
        "each damaged file; exits 1 when any checkpoint is incomplete or damaged.")
    verify.add_argument("path", help="a step_N directory, a checkpoints directory or a run "
                        "directory")
    verify.set_defaults(func=cmd_verify)
