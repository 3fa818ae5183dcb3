"""``llada slurm prepare INPUT... -o OUTPUT --array N --time T [prepare options]``: a dataset
prepared by a Slurm array of N independent parts and merged (``data_pipeline/parts.py``), as
dependent jobs: the tokenizer (only when none is given) -> the N parts -> the merge. Each job runs
``llada prepare`` with the same options, so the three agree on the inputs and settings; each
script is kept under OUTPUT/slurm, its log beside it.

A failed part makes the merge's dependency unsatisfiable, and Slurm cancels the merge
(``--kill-on-invalid-dep=yes``) instead of leaving it pending. Re-running the same command
resubmits everything; finished parts find themselves up to date and return at once, so only the
failed part does work again (or run that part alone, then the merge)."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from framework.config import ConfigError
from framework.launch.slurm import directive, sbatch, sbatch_path, time_limit_seconds


@dataclass
class ArrayOptions:
    parts: int
    time: str
    cpus_per_task: int = 4
    mem: Optional[str] = None
    account: Optional[str] = None
    partition: Optional[str] = None
    job_name: Optional[str] = None  # default: prepare-NAME

    def __post_init__(self):
        if self.parts < 2:
            raise ConfigError(f"--array: the number of parts must be >= 2, got {self.parts} "
                              "(one part: run llada prepare itself)")
        if self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task: must be >= 1, got {self.cpus_per_task}")
        time_limit_seconds(self.time)


def script(name: str, opts: ArrayOptions, output: Path, command: str, array: bool) -> str:
    """One job's sbatch script: its directives, then ``exec`` of the command."""
    log = str(output / "slurm").replace("%", "%%") + ("/%x-%A_%a.out" if array else "/%x-%j.out")
    wanted = {"job-name": name, "nodes": "1", "ntasks": "1",
              "cpus-per-task": str(opts.cpus_per_task), "time": opts.time, "output": log,
              "chdir": str(Path.cwd()), "mem": opts.mem, "account": opts.account,
              "partition": opts.partition}
    lines = ["#!/bin/bash",
             f"# rendered by `llada slurm prepare` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             *(directive(k, v) for k, v in wanted.items() if v is not None),
             "set -euo pipefail", f"exec {command}", ""]
    return "\n".join(lines)


def render(prepare_args: List[str], output: Path, dataset: str, opts: ArrayOptions,
           train_tokenizer: bool, python: str = sys.executable) -> List[Tuple[str, str]]:
    """(job name, script) of each job, in dependency order."""
    base = shlex.join([python, "-m", "framework", "prepare", *prepare_args])
    parts = f"--parts {opts.parts}"
    name = opts.job_name or f"prepare-{dataset}"
    jobs = [(f"{name}-tokenizer", script(f"{name}-tokenizer", opts, output,
                                         f"{base} --tokenizer-only", array=False))
            ] if train_tokenizer else []
    jobs.append((f"{name}-part", script(f"{name}-part", opts, output,
                                        f'{base} {parts} --part "$SLURM_ARRAY_TASK_ID"',
                                        array=True)))
    jobs.append((f"{name}-merge", script(f"{name}-merge", opts, output, f"{base} {parts} --merge",
                                         array=False)))
    return jobs


def submit(jobs: List[Tuple[str, str]], output: Path, parts: int) -> List[Tuple[str, str, Path]]:
    """sbatch each job after the one before it; (name, job id, script path) of each."""
    sbatch_path()
    out = output / "slurm"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    done: List[Tuple[str, str, Path]] = []
    for name, text in jobs:
        path = out / f"{name}-{stamp}.sbatch"
        path.write_text(text)
        flags = [f"--array=0-{parts - 1}"] if name.endswith("-part") else []
        if done:
            flags += [f"--dependency=afterok:{done[-1][1]}", "--kill-on-invalid-dep=yes"]
        done.append((name, sbatch(path, *flags), path))
    return done
