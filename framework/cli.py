"""``llada``: the command line. ``llada train RECIPE [key=value ...]``.

Bad input (a missing recipe, an unknown key, a wrong type, sizes that do not divide) prints one
line naming the key or file and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
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

    from framework.parallel import shutdown_world
    from framework.trainer import Trainer, TrainingError

    try:
        Trainer(cfg).fit()
    except ConfigError as e:
        return _error(str(e), EXIT_BAD_INPUT)
    except TrainingError as e:
        return _error(str(e), EXIT_FAILED)
    finally:
        shutdown_world()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada", description="Pretrain LLaDA masked diffusion "
                                     "language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="pretrain from a recipe",
                           description="Pretrain from a recipe YAML; key=value overrides any "
                           "config key, e.g. train.steps=100 deepspeed.zero_stage=2.")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/debug-cpu.yaml")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.set_defaults(func=cmd_train)
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
