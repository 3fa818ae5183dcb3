"""``llada slurm submit``: fill in llada.sbatch (beside this module, shipped as package data) for
one run and hand it to ``sbatch``.

The script stays the one description of the job (its ``#SBATCH`` lines are the defaults, its body
the restart logic); rendering only replaces the resource directives with the ones asked for and
writes the run's arguments and paths at the script's settings marker, so the rendered file runs
the same on every restart, from any directory. The config is loaded and the layout checked
against nodes x tasks first: a bad key or a batch that does not divide fails here, in one line,
not hours later when the job starts.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from framework.config import Config, ConfigError, check_world, load_config
from framework.training.preemption import EXIT_REQUEUE

TEMPLATE = Path(__file__).resolve().parent / "llada.sbatch"
SETTINGS_MARKER = "# llada-submit: settings"
_DIRECTIVE = re.compile(r"^#SBATCH\s+--([\w-]+)(?:=(.*))?$")


@dataclass
class SubmitOptions:
    nodes: str  # N, or a range MIN-MAX: Slurm gives as many as it can without waiting
    gpus_per_node: int
    time: str  # Slurm's formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    tasks_per_node: Optional[int] = None  # default: one per GPU
    cpus_per_task: Optional[int] = None  # default: data.num_workers + 2
    account: Optional[str] = None
    partition: Optional[str] = None
    job_name: Optional[str] = None  # default: run.name
    signal_minutes: float = 10.0  # USR1 this long before the time limit
    max_crash_retries: int = 3

    def __post_init__(self):
        self.nodes = str(self.nodes).strip()
        node_counts(self.nodes)  # a bad --nodes is one line now
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is None:
            if self.gpus_per_node == 0:
                raise ConfigError("--tasks-per-node: needed when --gpus-per-node is 0 (CPU tasks)")
            self.tasks_per_node = self.gpus_per_node
        if self.tasks_per_node < 1:
            raise ConfigError(f"--tasks-per-node: must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ConfigError(f"--tasks-per-node: one task per GPU, so it must equal "
                              f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task: must be >= 1, got {self.cpus_per_task}")
        if self.max_crash_retries < 0:
            raise ConfigError(f"--max-crash-retries: must be >= 0, got {self.max_crash_retries}")
        limit = time_limit_seconds(self.time)
        signal_s = round(60 * self.signal_minutes)
        if not 0 < signal_s < limit:
            raise ConfigError(f"--signal-minutes: {self.signal_minutes:g} must be > 0 and "
                              f"shorter than --time {self.time}")


    @property
    def node_counts(self) -> range:
        return node_counts(self.nodes)


def node_counts(value: str) -> range:
    """Every node count a job of ``--nodes value`` may start with: N, or each of MIN..MAX (a
    restart after a node is lost may get fewer nodes than the first start)."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", value)
    if not m:
        raise ConfigError(f"--nodes: {value!r} is not a node count N or range MIN-MAX")
    low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    if low < 1:
        raise ConfigError(f"--nodes: must be >= 1, got {value}")
    if high < low:
        raise ConfigError(f"--nodes: {value}: the maximum is below the minimum")
    return range(low, high + 1)


def time_limit_seconds(value: str) -> int:
    """Slurm's ``--time`` formats, in seconds; ConfigError names the flag."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ConfigError(f"--time: {value!r} is not a Slurm time limit (e.g. 48:00:00, 2-00:00:00)")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (nums + [0, 0])[:3]
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(nums) == 1:  # MM
        total = nums[0] * 60
    elif len(nums) == 2:  # MM:SS
        total = nums[0] * 60 + nums[1]
    else:  # HH:MM:SS
        total = nums[0] * 3600 + nums[1] * 60 + nums[2]
    if total <= 0:
        raise ConfigError(f"--time: {value!r} must be longer than zero")
    return total


def _template() -> str:
    if not TEMPLATE.is_file():
        raise ConfigError(f"{TEMPLATE}: the sbatch script is missing from this installation "
                          "(it is package data of framework.launch); reinstall llada-framework")
    return TEMPLATE.read_text()


def directives(cfg: Config, opts: SubmitOptions, run_dir: Path) -> Dict[str, Optional[str]]:
    """The resource directives this submission sets over the script's own (None: drop it)."""
    return {
        "job-name": opts.job_name or cfg.run.name,
        "nodes": opts.nodes,
        # a job given a node range gets no task count: Slurm fixes a job's task count at its
        # first start, and a requeued job would then wait for as many nodes as it had before.
        # The script's srun starts LLADA_TASKS_PER_NODE on each node it was given instead.
        "ntasks-per-node": str(opts.tasks_per_node) if len(opts.node_counts) == 1 else None,
        "gpus-per-node": str(opts.gpus_per_node) if opts.gpus_per_node else None,
        "cpus-per-task": str(opts.cpus_per_task or cfg.data.num_workers + 2),
        "time": opts.time,
        "signal": f"B:USR1@{round(60 * opts.signal_minutes)}",
        # %x job name, %j job id; a % of the path itself is written %%
        "output": str(run_dir / "slurm").replace("%", "%%") + "/%x-%j.out",
        "chdir": str(Path.cwd()),
        "account": opts.account,
        "partition": opts.partition,
    }


def directive(name: str, value: str) -> str:
    """``#SBATCH --name=value``; sbatch splits values at blanks and ends them at ``#`` unless
    they are double-quoted."""
    if re.search(r'[\s#"\\]', value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH --{name}={value}"


def render(recipe: Path, overrides: List[str], cfg: Config, opts: SubmitOptions,
           python: str = sys.executable) -> str:
    """The script for this run: resource directives replaced or added, arguments and paths
    written at the settings marker."""
    run_dir = Path(cfg.run.dir).resolve()
    wanted = directives(cfg, opts, run_dir)
    lines = _template().splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    for i in header:
        if not _DIRECTIVE.match(lines[i]):
            raise ConfigError(f"{TEMPLATE}: {lines[i]!r}: write directives as --name=value")
    placed: set = set()
    kept: List[str] = []
    for i in header:
        name = _DIRECTIVE.match(lines[i]).group(1)
        if name not in wanted:
            kept.append(lines[i])  # --requeue, --open-mode=append, --exclusive, ...
        elif name not in placed:  # the first line of a name takes the value; repeats go
            placed.add(name)
            if wanted[name] is not None:
                kept.append(directive(name, wanted[name]))
    kept += [directive(k, v) for k, v in wanted.items() if v is not None and k not in placed]
    body = lines[header[-1] + 1:]
    if SETTINGS_MARKER not in body:
        raise ConfigError(f"{TEMPLATE}: the line {SETTINGS_MARKER!r} is missing")
    at = body.index(SETTINGS_MARKER)
    args = " ".join(shlex.quote(a) for a in [str(recipe.resolve()), *overrides])
    settings = [
        f"# rendered by `llada slurm submit` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"set -- {args}",
        f"LLADA_PYTHON={shlex.quote(python)}",
        f"LLADA_RUN_DIR={shlex.quote(str(run_dir))}",
        f"LLADA_TASKS_PER_NODE={opts.tasks_per_node}",
        f"LLADA_MAX_CRASH_RETRIES={opts.max_crash_retries}",
        f"LLADA_EXIT_REQUEUE={EXIT_REQUEUE}",
    ]
    return "\n".join(lines[:header[0]] + kept + body[:at] + settings + body[at + 1:]) + "\n"


def prepare_submission(recipe: str, overrides: List[str], opts: SubmitOptions,
                       need_data: bool) -> Tuple[Config, str]:
    """The config checked against the job's world, and the rendered script."""
    cfg = load_config(recipe, overrides, need_data=need_data)
    counts = opts.node_counts
    for nodes in counts:  # a restart on fewer nodes resumes under a smaller data-parallel size
        try:
            check_world(cfg.train, cfg.parallel, nodes * opts.tasks_per_node)
        except ConfigError as e:
            if len(counts) == 1:
                raise
            raise ConfigError(f"{e} (--nodes {opts.nodes}: on {nodes} node(s) x "
                              f"{opts.tasks_per_node} tasks; every count in the range must "
                              f"work)") from None
    if cfg.parallel.world_size is not None:
        if len(counts) > 1:
            raise ConfigError(f"parallel.world_size: {cfg.parallel.world_size} fixes the world, "
                              f"but --nodes {opts.nodes} is a range; unset it")
        world = counts[0] * opts.tasks_per_node
        if cfg.parallel.world_size != world:
            raise ConfigError(f"parallel.world_size: {cfg.parallel.world_size}, but the job has "
                              f"{opts.nodes} nodes x {opts.tasks_per_node} tasks = {world}")
    if opts.gpus_per_node and cfg.run.device == "cpu":
        raise ConfigError("run.device: cpu, but the job asks for GPUs; use --gpus-per-node 0 "
                          "--tasks-per-node N for CPU tasks")
    if "USR1" not in cfg.preemption.signals:
        raise ConfigError(f"preemption.signals: {cfg.preemption.signals} lacks USR1, the signal "
                          f"the sbatch script hands on to the ranks")
    return cfg, render(Path(recipe), overrides, cfg, opts)


def sbatch_path() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise ConfigError("sbatch: not found on PATH (run on a Slurm login node, or use "
                          "--dry-run to print the script)")
    return exe


def sbatch(path: Path, *flags: str) -> str:
    """``sbatch --parsable [flags] PATH``; the job id. RuntimeError: sbatch's own last line."""
    proc = subprocess.run([sbatch_path(), "--parsable", *flags, str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
        raise RuntimeError(f"sbatch {path}: {lines[-1]}")
    return proc.stdout.strip().split(";")[0]


def submit(script: str, run_dir: Path) -> Tuple[str, Path]:
    """Write the rendered script under ``run.dir/slurm`` (kept: what ran) and sbatch it;
    returns (job id, script path)."""
    sbatch_path()  # before anything is written
    out = run_dir.resolve() / "slurm"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    return sbatch(path), path
