"""Training step at the real shape: the framework against the best plain PyTorch loop, same run.

Measured in one process, on the same batches, each variant's tokens/s, MFU (FLOPs of
framework/training/flops.py's FlopCounter with each step's actual masked count, over the
datasheet dense bf16 peak of the device; none on CPU) and peak memory
(torch.cuda.max_memory_allocated, reset per variant; on CPU the process's peak RSS is printed
once, it is not per variant):

(a) framework: ``build_trainer(cfg).train_step()`` with the whole stack on, as ``llada train``
    runs it: the DeepSpeed engine at the recipe's ZeRO stage, the megatron-core model, the real
    data pipeline (PretrainLoader), MLflow tracking (a file store under the run's temporary
    directory, its courier process running) and each step's record through ``Trainer._record``,
    as ``fit`` does (a record every tracking.log_interval steps);
(b) the best plain PyTorch loop of the same model with our numerics (benchmarks/plain_llada.py):
    fp32 parameters and AdamW states with bf16 compute under torch.autocast (fp32 throughout
    when the recipe trains in fp32), compiled (``--compile``, the default on CUDA), head at the
    masked positions (their logits materialised, the cross entropy compiled: the framework's
    fused head + loss is its own gain), fused AdamW on CUDA, clip_grad_norm_;
(c) for information, the bf16-only plain loop: bf16 parameters and AdamW states, no master copy
    (what the 48k tokens/s H100 figure of ../shared/STACK.md used).
benchmarks/gpu_train_step.sh runs the GPU rows as one short script.

ratio = (a) / (b) in tokens/s. The first ``--warmup`` steps of each variant (compilation) are
not timed; the plain loops replay the batches the framework's steps drew, warmup ones first.
Rows go to benchmarks/RESULTS.md as each comparison completes (a run cut short by a timeout
keeps what it measured), the framework's also to benchmarks/measured.json, from which
``llada plan --gpu NAME`` takes the measured MFU.

Data: a recipe that names its datasets (recipes/debug-cpu.yaml) trains on them; one that leaves
them unset (recipes/llada-1b.yaml, recipes/llada-8b.yaml: ``manifest: ???``) gets the
benchmark's own, the embedded default corpus prepared once into ``--data-dir``/stdlib-SEQ_LEN
with a 4096-piece SentencePiece vocabulary (the model's 126464 rows stay: the head's cost is the
model's, whatever the tokenizer uses) and reused by later runs.

    python benchmarks/train_step.py [--steps 20] [--warmup 3]          # CPU: the debug shape
    python benchmarks/train_step.py --recipe recipes/llada-1b.yaml --data-dir /tmp/bench-data \\
        train.global_batch_size=4 train.micro_batch_size=4 run.device=cuda train.compile=true
    python benchmarks/train_step.py --recipe recipes/llada-8b.yaml --data-dir /tmp/bench-data \\
        --steps 10 model.num_layers=12 train.activation_checkpointing=false train.global_batch_size=4 \\
        train.micro_batch_size=4 run.device=cuda train.compile=true

The 8B row keeps 12 of its 32 layers (3.65B parameters) so that one 141 GiB H200 holds it at
micro-batch 4 x 4096 with fp32 master weights and Adam states: ``llada plan recipes/llada-8b.yaml
model.num_layers=12 parallel.world_size=1 train.global_batch_size=4 train.micro_batch_size=4
train.activation_checkpointing=false`` estimates 92 GiB (54 weights + gradients + optimizer, 37
activations); the 1B stack measured 61 GiB on an H100 (../shared/STACK.md) against the same
estimate's 53 for it, so about 106 GiB, with room for the allocator and the plain loops' own
(about as large: 16 bytes per parameter, and the same activations). 14 layers would estimate
103 GiB (about 119) and 16 layers 115 (about 133): too close to 141 for a run that cannot be
watched. Without activation checkpointing, as the plain loop runs: recomputation would add a
forward that MFU does not count, and time to a run that must stay short.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import machine, record, today  # noqa: E402
from framework.launch.plan import MODEL_KEYS  # noqa: E402 - the shape llada plan matches by

MEASURED = REPO / "benchmarks" / "measured.json"
SECTION = "Training step at the real shape: framework vs the best plain PyTorch loop"
INTRO = ("One process, one device, the same batches for every variant; tokens/s over the timed "
         "steps (compilation warm-up excluded); MFU: FlopCounter's FLOPs (head at the actual "
         "masked positions) over the datasheet dense bf16 peak, none on CPU; peak memory: "
         "torch.cuda.max_memory_allocated per variant, \"-\" on CPU. framework: Trainer.train_step "
         "with ZeRO, the data pipeline and MLflow tracking on. (b) plain: the best plain PyTorch "
         "loop with our numerics (fp32 master weights and Adam states, bf16 autocast), compiled, "
         "head at masked positions (logits materialised), fused AdamW. (c) plain bf16: bf16 weights and AdamW states, "
         "no master copy, for information. ratio = framework tokens/s / the row's; the "
         "framework's row: / (b).")
HEADER = ["date", "machine", "recipe", "variant", "steps", "tokens/s", "MFU", "peak memory GiB",
          "ratio", "command"]
GIB = 1024 ** 3
# the benchmark's own data, for a recipe that names none: small enough to prepare in seconds
OWN_DATA = ["data.validation=[]", "data.tokenizer.vocab_size=4096",
            "data.tokenizer.train_bytes=8000000", "data.samples_per_shard=256"]


@dataclass
class Measured:
    label: str
    tokens_per_s: float
    mfu: Optional[float]
    peak_gib: Optional[float]


class RecordingLoader:
    """The trainer's loader, keeping every micro-batch it hands out: the plain loops replay
    them, so every variant trains on the very same batches."""

    def __init__(self, loader):
        self.loader, self.batches = loader, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.batches.append(batch)
        return batch

    def __getattr__(self, name):  # counters, state_dict, close: the loader's own
        return getattr(self.loader, name)


class Device:
    """Synchronisation, the peak-memory window and the peak flops of one device."""

    def __init__(self, device: torch.device):
        from framework.training.flops import peak_flops
        self.device, self.cuda = device, device.type == "cuda"
        self.peak_flops = peak_flops(torch.cuda.get_device_name(device)) if self.cuda else None
        self.base = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def before_build(self) -> None:
        """What earlier variants left allocated is not this one's."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)

    def after_build(self) -> None:
        """The peak from here on: the weights stay counted, a construction's transient copies
        do not (the steady state of training is what has to fit)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> Optional[float]:
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_allocated(self.device) - self.base) / GIB


def timed(step: Callable[[int], None], warmup: int, steps: int, dev: Device) -> float:
    """Seconds of steps warmup .. warmup + steps - 1; ``step(i)`` runs step i."""
    for i in range(warmup):
        step(i)
    dev.sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    dev.sync()
    return time.perf_counter() - start


def run_framework(cfg, args, dev: Device):
    """(a): the framework's steps; returns the measurement, the micro-batches of every step,
    whether it trained in bf16 and a weak reference to a parameter of its model; the trainer
    is torn down (its memory freed once this frame is gone: ``release``)."""
    from framework.training.factory import build_trainer
    from framework.training.flops import FlopCounter

    dev.before_build()
    trainer = build_trainer(cfg, recipe=f"benchmarks/train_step.py {args.recipe}")
    dev.after_build()
    trainer.data = RecordingLoader(trainer.data)
    results = []

    def step(i: int) -> None:  # fit's loop body, less validation and checkpoints
        result = trainer.train_step()
        trainer.history.append(result)
        trainer.divergence.observe(result)
        trainer._record(result, {})
        if i >= args.warmup:
            results.append(result)

    seconds = timed(step, args.warmup, args.steps, dev)
    peak = dev.peak_gib()
    counter = FlopCounter(cfg.model, cfg.objective.kind)
    flops = sum(counter.step(r.tokens, r.seq_len, r.masked) for r in results)
    tokens = sum(r.tokens for r in results)
    batches = trainer.data.batches
    accum, facts = trainer.accum, trainer.metrics.facts
    compiled = "compiled layers" if cfg.train.compile else "eager"
    head = "fused head + loss" if cfg.train.fused_head else "unfused head"
    label = (f"framework: ZeRO-{facts['zero_stage']} {facts['precision']}, {compiled}, {head}, "
             f"PretrainLoader, MLflow on (a record every {cfg.tracking.log_interval} steps)")

    # teardown, in fit's order: the loader's workers ended first (forked after the courier
    # started, they hold its stdin open: it would never see the end), the tracker's last
    # records sent, the engine's buffers released, so that the plain loops get the device
    param = weakref.ref(next(trainer.engine.module.parameters()))
    trainer.data.close()
    trainer.metrics.close("completed")
    check_tracking(Path(cfg.run.dir) / "tracking")
    trainer.engine.destroy()
    measured = Measured(label, tokens / seconds, mfu(flops, seconds, dev), peak)
    steps = [batches[i * accum:(i + 1) * accum] for i in range(args.warmup + args.steps)]
    return measured, steps, facts["precision"] == "bf16", param  # the trainer goes with the frame


def check_tracking(directory: Path) -> None:
    """The row says MLflow was on: every record the steps wrote reached the store (a courier
    that failed to start would otherwise go unnoticed: training never waits for it)."""
    from framework.tracking.outbox import STATE, Outbox, RunState
    box = Outbox(directory, RunState.load(directory / STATE))
    if box.pending or box.state.run_id is None:
        sys.exit(f"train_step: MLflow tracking failed: {len(box.pending)} records of "
                 f"{box.path} not sent to {box.state.uri} (the courier's error is above)")


def mfu(flops: float, seconds: float, dev: Device) -> Optional[float]:
    return None if dev.peak_flops is None else flops / seconds / dev.peak_flops


def release() -> None:
    """What the last variant left: its graphs, its cached device blocks."""
    gc.collect()
    torch._dynamo.reset()  # compiled graphs of the last variant: none is reused
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_plain(cfg, steps: List[list], args, dev: Device, *, master: bool, bf16: bool,
              compile: bool) -> Measured:
    """(b) with ``master`` (fp32 parameters and states, bf16 autocast when ``bf16``), (c)
    without (bf16 parameters and states)."""
    from benchmarks.plain_llada import PlainLLaDA, masked_inputs
    from framework.model.params import total_params
    from framework.training.flops import FlopCounter

    device, oc = dev.device, cfg.optimizer
    compute = torch.bfloat16 if bf16 else torch.float32
    dev.before_build()
    with torch.device(device):
        model = PlainLLaDA(cfg.model, compute).to(torch.float32 if master else torch.bfloat16)
    dev.after_build()
    count = sum(p.numel() for p in model.parameters())
    assert count == total_params(cfg.model), (
        f"plain model: {count} parameters, the parameter table {total_params(cfg.model)}")
    if compile:
        model.compile_parts()
    opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps,
                            weight_decay=oc.weight_decay, fused=dev.cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=master and bf16)

    def step(i: int) -> None:
        micro = steps[i]
        for batch in micro:  # host batches, moved as the framework's are: inside the step
            inputs = masked_inputs(batch.noisy, batch.targets, batch.mask, batch.p_mask)
            with autocast:
                loss = model.loss(*(x.to(device, non_blocking=True) for x in inputs))
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, args.warmup, args.steps, dev)
    peak = dev.peak_gib()
    counter = FlopCounter(cfg.model)
    timed_steps = steps[args.warmup:]
    flops = sum(counter.step(sum(b.noisy.numel() for b in s), s[0].noisy.shape[1],
                             sum(int(b.mask.sum()) for b in s)) for s in timed_steps)
    tokens = sum(b.noisy.numel() for s in timed_steps for b in s)
    how = "compiled" if compile else "eager"
    fused = ", fused AdamW" if dev.cuda else ""
    if master:
        label = (f"(b) plain: fp32 master + bf16 autocast, {how}{fused}" if bf16
                 else f"(b) plain: fp32, {how}{fused}")
    else:
        label = f"(c) plain bf16: bf16 weights and AdamW states, {how}{fused}"
    return Measured(label, tokens / seconds, mfu(flops, seconds, dev), peak)


def configure(args) -> tuple:
    """The config to benchmark and the overrides that made it (the benchmark's data added
    where the recipe names none)."""
    from framework.config import ConfigError, load_config

    run_dir = tempfile.mkdtemp(prefix="bench-train-step-")
    fixed = [f"run.dir={run_dir}", f"train.steps={10 ** 6}",  # a long run's schedule and logging
             "objective.variable_length_prob=0",  # every step at the full length
             "tracking.enabled=true", f"tracking.uri=file://{run_dir}/mlruns"]
    overrides = [*fixed, *args.overrides]
    try:
        return load_config(args.recipe, overrides), overrides
    except ConfigError as e:
        if "data.datasets" not in str(e):
            raise
    seq_len = load_config(args.recipe, overrides, need_data=False).data.seq_len
    out = Path(args.data_dir).resolve() / f"stdlib-{seq_len}"
    own = [f"data.datasets=[{{manifest: {out / 'manifest.json'}, prepare_inputs: [stdlib]}}]",
           *OWN_DATA]
    print(f"train_step: {args.recipe} names no data: the embedded corpus, prepared once "
          f"into {out}", flush=True)
    return load_config(args.recipe, [*own, *overrides]), [*own, *overrides]


def write_measured(rec: dict, path: Path = MEASURED) -> None:
    """Add ``rec``, replacing a record of the same gpu, model and seq_len."""
    records = json.loads(path.read_text()) if path.exists() else []
    key = (rec["gpu"], rec["model"], rec["seq_len"])
    records = [r for r in records if (r.get("gpu"), r.get("model"), r.get("seq_len")) != key]
    path.write_text(json.dumps([*records, rec], indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "debug-cpu.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--data-dir", default=str(REPO / "runs" / "data"),
                        help="where the benchmark's own data is prepared and kept, for a recipe "
                        "that names none")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the plain loops (default: on CUDA)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    args = parser.parse_args()
    # as the llada command does: DeepSpeed probes the accelerator at import
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # MLflow 3 refuses the file store unless told (the framework's default is an SQLite store,
    # which needs SQLAlchemy, absent from the GPU machine's wheels); the courier inherits this
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    from framework.parallel.world import resolve_device, shutdown_world

    cfg, overrides = configure(args)
    if cfg.objective.kind != "pretrain":
        sys.exit(f"train_step: objective.kind={cfg.objective.kind}: the plain loop is LLaDA "
                 "pretraining only")
    dev = Device(resolve_device(cfg.run.device))
    framework, steps, bf16, param = run_framework(cfg, args, dev)
    release()
    if param() is not None:
        print("train_step: warning: the framework's model is still referenced after teardown; "
              "its memory stays allocated (subtracted from the plain loops' peaks)", flush=True)
    compile = dev.cuda if args.compile is None else args.compile
    print(f"train_step: {framework.label}: {framework.tokens_per_s:,.0f} tokens/s", flush=True)

    recipe = f"{Path(args.recipe).name} {' '.join(args.overrides)}".strip()
    command = f"`{' '.join(['python benchmarks/train_step.py', *sys.argv[1:]])}`"
    gpu = machine()
    write_measured({
        "gpu": gpu, "recipe": Path(args.recipe).name,
        "model": {k: getattr(cfg.model, k) for k in MODEL_KEYS},
        "seq_len": cfg.data.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
        "tokens_per_s": round(framework.tokens_per_s, 1),
        "mfu": None if framework.mfu is None else round(framework.mfu, 4),
        "peak_memory_gib": None if framework.peak_gib is None else round(framework.peak_gib, 2),
        "date": today(), "command": command.strip("`")})

    def row(r: Measured, ratio: str) -> list:
        return [today(), gpu, recipe, r.label, str(args.steps), f"{r.tokens_per_s:,.0f}",
                "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                "-" if r.peak_gib is None else f"{r.peak_gib:.1f}", ratio, command]

    best = run_plain(cfg, steps, args, dev, master=True, bf16=bf16, compile=compile)
    release()
    record(SECTION, INTRO, HEADER,
           [row(framework, f"{framework.tokens_per_s / best.tokens_per_s:.2f}"),
            row(best, f"{framework.tokens_per_s / best.tokens_per_s:.2f}")])
    bf16_only = run_plain(cfg, steps, args, dev, master=False, bf16=True, compile=compile)
    release()
    record(SECTION, INTRO, HEADER,
           [row(bf16_only, f"{framework.tokens_per_s / bf16_only.tokens_per_s:.2f}")])
    if not dev.cuda:  # kilobytes on Linux; the whole process, all variants and the data prep
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
        print(f"train_step: peak RSS of the process: {rss:.2f} GiB (all variants)")
    print(f"train_step: overrides used: {' '.join(overrides)}")
    shutdown_world()


if __name__ == "__main__":
    main()
