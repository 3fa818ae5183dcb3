"""``llada``: the command line. ``llada train RECIPE [key=value ...]``,
``llada plan RECIPE [key=value ...]``, ``llada prepare INPUT... -o DIR [options]``,
``llada export CHECKPOINT OUT_DIR``.

Bad input (a missing recipe, an unknown key, a wrong type, sizes that do not divide) prints one
line naming the key or file and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _error(msg: str, code: int) -> int:
    print(f"llada: error: {msg}", file=sys.stderr, flush=True)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from framework.config import ConfigError, load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)

    from framework.checkpoint import CheckpointError
    from framework.parallel import shutdown_world
    from framework.trainer import Trainer, TrainingError

    try:
        Trainer(cfg).fit()
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except (TrainingError, CheckpointError) as e:
        return _error(str(e), EXIT_FAILED)
    finally:
        shutdown_world()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from framework.config import ConfigError, load_config
    from framework.plan import plan

    try:
        cfg = load_config(args.recipe, args.overrides, need_data=False)
        if cfg.parallel.world_size is None:
            raise ConfigError("parallel.world_size: llada plan needs the number of GPUs, e.g. "
                              "parallel.world_size=1024")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu: must be in (0, 1], got {args.mfu}")
        print(plan(cfg, mfu=args.mfu, peak_flops=args.peak_tflops * 1e12))
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint's consolidated weights, config and tokenizer in the layout of the public
    LLaDA Hugging Face release; ``init.from=OUT_DIR`` starts a run from them."""
    import torch
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from framework.checkpoint import read_meta, resolve_checkpoint
    from framework.config import ConfigError, ModelConfig
    from framework.hf import HFFormatError, write_hf_dir
    from framework.reshard import Layout, ReshardError, read_weights

    try:
        source = Path(args.checkpoint)
        if (source / "checkpoints").is_dir():  # a run directory
            source = source / "checkpoints"
        tag = resolve_checkpoint(source, lambda m: print(f"llada: warning: {m}"), "CHECKPOINT")
        meta = read_meta(tag)
        try:
            model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                        meta["config"]["model"]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{tag}: its model config does not fit this version's "
                              f"({str(e).splitlines()[0]})") from None
        weights = read_weights(tag, Layout.saved(meta["layout"]))
        out = write_hf_dir(Path(args.out_dir), weights, model, tag / "tokenizer.model",
                           meta["special_ids"], dtype=getattr(torch, args.dtype),
                           max_sequence_length=meta["config"]["data"]["seq_len"],
                           overwrite=args.overwrite)
    except (ConfigError, HFFormatError, ReshardError, FileExistsError) as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except OSError as e:
        return _error(f"{args.out_dir}: {e.strerror or e}", EXIT_FAILED)
    print(f"llada: exported {tag} (step {meta['step']}) to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from framework.config import ConfigError, PrepareConfig, TokenizerConfig

    try:
        cfg = PrepareConfig(
            inputs=args.inputs, output=args.output, name=args.name, seq_len=args.seq_len,
            samples_per_shard=args.samples_per_shard, jsonl_text_field=args.text_field,
            workers=args.workers, seed=args.seed,
            tokenizer=TokenizerConfig(model=args.tokenizer, vocab_size=args.vocab_size,
                                      train_bytes=args.tokenizer_train_bytes))
        from data_pipeline.prepare import prepare
        prepare(cfg)
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)
    return 0


def _default(name: str):
    """PrepareConfig's default: the dataclass stays the one source of truth for the flags."""
    from framework.config import PrepareConfig, TokenizerConfig
    cls = TokenizerConfig if name in ("vocab_size", "train_bytes") else PrepareConfig
    return cls.__dataclass_fields__[name].default


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

    from framework.flops import PEAK_FLOPS
    plan = sub.add_parser(
        "plan", help="check and size a parallel layout without launching anything",
        description="Check that tp x pp x dp fits the model and batch for parallel.world_size "
        "GPUs, and print per-GPU parameters and memory (weights, gradients, optimizer state by "
        "ZeRO stage, activations), FLOPs per step and the step time at a stated MFU. E.g. "
        "llada plan recipes/llada-8b.yaml parallel.tp=8 parallel.pp=4 parallel.world_size=1024")
    _recipe_arguments(plan)
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume")
    plan.add_argument("--peak-tflops", type=float, default=PEAK_FLOPS["H100"] / 1e12,
                      help="dense bf16 peak per GPU (default: H100, measured)")
    plan.set_defaults(func=cmd_plan)

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

    prep = sub.add_parser(
        "prepare", help="tokenise text/JSONL into WebDataset tar shards",
        description="Tokenise .txt/.jsonl(.gz) files (globs; 'stdlib' for the embedded corpus) "
        "in parallel, join documents with EOS, cut fixed-length sequences and write "
        "NAME-000000.tar ... plus manifest.json and tokenizer.model to OUTPUT. Deterministic; "
        "an up-to-date OUTPUT is left as is.")
    prep.add_argument("inputs", nargs="+", help="input globs, e.g. 'data/**/*.jsonl.gz', or stdlib")
    prep.add_argument("-o", "--output", required=True, help="output directory")
    prep.add_argument("--name", default=_default("name"), help="shard name prefix")
    prep.add_argument("--seq-len", type=int, default=_default("seq_len"),
                      help="tokens per sequence")
    prep.add_argument("--samples-per-shard", type=int, default=_default("samples_per_shard"))
    prep.add_argument("--text-field", default=_default("jsonl_text_field"),
                      help="JSONL field holding the text")
    prep.add_argument("--workers", type=int, default=_default("workers"),
                      help="tokeniser processes (0: one per core)")
    prep.add_argument("--seed", type=int, default=_default("seed"),
                      help="seeds the order of input files")
    prep.add_argument("--tokenizer", default=None,
                      help="an existing SentencePiece .model (must hold <|mdm_mask|>); "
                      "default: train one on the inputs")
    prep.add_argument("--vocab-size", type=int, default=_default("vocab_size"),
                      help="when training one")
    prep.add_argument("--tokenizer-train-bytes", type=int, default=_default("train_bytes"),
                      help="text sampled to train it")
    prep.set_defaults(func=cmd_prepare)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # DeepSpeed probes for accelerators and compilers at import; keep it from spawning
    # compiler checks that print noise on machines without CUDA.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    args = build_parser().parse_args(argv)
    return args.func(args)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
