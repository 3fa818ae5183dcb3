"""The configuration's schema: one small dataclass per component (recipes are loaded over it by
recipe.py).

Every component receives only its own sub-config. The data pipeline owns the configs of its
components (``data``, ``objective``: data_pipeline/config.py); the framework's are here, and
``Config`` composes both. Checks that involve a single component live in that dataclass's
``__post_init__``; checks across components live in ``Config.__post_init__``. All of them raise
an error whose message names the offending key (``ConfigError`` here, the data pipeline's
``DataConfigError`` there, which ``load_config`` passes on as a ``ConfigError``), so the CLI can
print one line and exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from data_pipeline.config import DataConfig, ObjectiveConfig, positive, require


class ConfigError(ValueError):
    """A bad recipe, key or value. The message is one line and names the key or file."""


def _require(cond: bool, key: str, msg: str) -> None:
    require(cond, key, msg, ConfigError)


def _positive(obj, section: str, *names: str) -> None:
    positive(obj, section, *names, error=ConfigError)


@dataclass
class RunConfig:
    dir: str = "runs/debug"  # every output of the run (summary, metrics, checkpoints, tokenizer)
    name: str = "llada"
    seed: int = 1234  # model initialisation
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        _require(bool(self.dir), "run.dir", "must not be empty")
        _require(self.device in ("auto", "cpu", "cuda"), "run.device",
                 f"must be one of auto, cpu, cuda; got {self.device!r}")


ROPE_SCALING = ("none", "linear", "llama3")  # as Hugging Face's rope_type: default, linear, llama3


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling as a checkpoint's config.json says (Hugging Face ``rope_scaling``
    / ``rope_parameters``): ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama
    3.1) divides the low ones by ``factor``, keeps the high ones and blends in between."""

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    def __post_init__(self):
        _require(self.type in ROPE_SCALING, "model.rope_scaling.type",
                 f"must be one of {', '.join(ROPE_SCALING)}; got {self.type!r}")
        _positive(self, "model.rope_scaling", "factor", "low_freq_factor",
                  "original_max_position_embeddings")
        _require(self.high_freq_factor > self.low_freq_factor, "model.rope_scaling.high_freq_factor",
                 f"must exceed low_freq_factor={self.low_freq_factor}, got {self.high_freq_factor}")


@dataclass
class ModelConfig:
    # a Hugging Face Llama/Qwen2/Qwen3 directory whose config.json gives every key below but
    # init_std (framework/checkpoint/hf_causal.py); keys also set here must agree with it
    from_hf: Optional[str] = None
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_kv_heads: int = 4  # == heads: MHA; fewer: GQA
    ffn_hidden_size: int = 352
    vocab_size: int = 4096  # the tokenizer's; padded for tensor parallelism when built
    pad_vocab_to_multiple_of: int = 128  # a multiple of parallel.tp; the same under every layout
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    head_dim: Optional[int] = None  # None: hidden_size / num_attention_heads (Qwen3 sets its own)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)

    def __post_init__(self):
        _positive(self, "model", "num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                  "ffn_hidden_size", "vocab_size", "pad_vocab_to_multiple_of", "rope_theta",
                  "norm_eps", "init_std")
        _require(self.head_dim is None or self.head_dim > 0, "model.head_dim",
                 f"must be > 0 or null, got {self.head_dim}")
        _require(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
                 "model.num_attention_heads", f"{self.num_attention_heads} heads do not divide "
                 f"model.hidden_size={self.hidden_size} (or set model.head_dim)")
        _require(self.num_attention_heads % self.num_kv_heads == 0, "model.num_kv_heads",
                 f"{self.num_kv_heads} kv heads do not divide "
                 f"model.num_attention_heads={self.num_attention_heads}")
        if self.head_dim is not None and self.head_dim * self.num_attention_heads == \
                self.hidden_size:
            self.head_dim = None  # the default spelled out: one spelling of each model
        _require(self.kv_channels % 2 == 0, "model.head_dim",
                 f"the head dimension ({self.kv_channels}) must be even for RoPE")

    @property
    def kv_channels(self) -> int:
        """The head dimension: model.head_dim, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class OptimizerConfig:
    lr: float = 4e-4  # peak
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables

    def __post_init__(self):
        _positive(self, "optimizer", "lr", "eps")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optimizer.beta1",
                 "betas must be in [0, 1)")
        _require(self.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0")


@dataclass
class ScheduleConfig:
    """Warmup-Stable-Decay (LLaDA; framework/training/schedule.py): warmup to optimizer.lr, stable,
    an optional drop, a linear decay to final_lr; fractions of train.steps, rounded to steps."""

    warmup_steps: int = 2000
    drop_at: Optional[float] = None  # fraction of train.steps; None: no drop
    drop_lr: float = 1e-4
    decay_fraction: float = 0.1304348  # LLaDA: the last 0.3T of 2.3T tokens (0.3 / 2.3)
    final_lr: float = 1e-5

    def __post_init__(self):
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        _require(self.drop_at is None or 0.0 <= self.drop_at <= 1.0, "schedule.drop_at",
                 f"must be in [0, 1] or null, got {self.drop_at}")
        _require(0.0 <= self.decay_fraction <= 1.0, "schedule.decay_fraction",
                 f"must be in [0, 1], got {self.decay_fraction}")
        _require(self.drop_lr >= 0 and self.final_lr >= 0, "schedule.final_lr", "must be >= 0")


@dataclass
class ParallelConfig:
    """Layout: tensor x pipeline x data parallel; data parallelism is what remains of the world."""

    tp: int = 1  # tensor parallel: heads, MLP and vocabulary split across this many GPUs
    pp: int = 1  # pipeline parallel stages (DeepSpeed's pipeline engine, 1F1B)
    world_size: Optional[int] = None  # for `llada plan` only; a launched run takes the launcher's
    sequence_parallel: bool = False  # shard norms/residuals along the sequence across tp ranks
    pp_layers: List[int] = field(default_factory=list)  # Transformer layers per stage; []: even

    def __post_init__(self):
        _positive(self, "parallel", "tp", "pp")
        _require(self.world_size is None or self.world_size > 0, "parallel.world_size",
                 f"must be > 0, got {self.world_size}")
        _require(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel",
                 "needs parallel.tp > 1 (it shards along the sequence across tensor-parallel ranks)")
        _require(not self.pp_layers or len(self.pp_layers) == self.pp, "parallel.pp_layers",
                 f"{len(self.pp_layers)} entries for parallel.pp={self.pp} stages")
        _require(all(n > 0 for n in self.pp_layers), "parallel.pp_layers",
                 f"every stage needs at least one layer, got {list(self.pp_layers)}")


@dataclass
class DeepSpeedConfig:
    """Our side of DeepSpeed's JSON, which is generated from it (framework/training/deepspeed_config.py)."""

    zero_stage: int = 1
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    offload_optimizer: bool = False  # ZeRO-Offload of the optimizer state to CPU memory

    def __post_init__(self):
        _require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage",
                 f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _positive(self, "deepspeed", "reduce_bucket_size", "allgather_bucket_size")
        _require(not self.offload_optimizer or self.zero_stage > 0, "deepspeed.offload_optimizer",
                 "needs deepspeed.zero_stage >= 1")


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between saves; 0: none by step count
    interval_minutes: float = 0.0  # also save once this much wall time has passed since the last
    save_final: bool = False
    keep: int = 2  # newest complete checkpoints kept; older ones deleted once a newer is complete
    keep_every: int = 0  # also keep, permanently, every checkpoint whose step is a multiple of it
    keep_best: bool = False  # also keep the one of lowest loss on data.validation's first set
    async_save: Optional[bool] = None  # write in the background (null: on CUDA); see README
    # auto: the newest complete checkpoint under <run.dir>/checkpoints; never: start fresh (refused
    # over existing checkpoints); or a path to a step_N directory or to a checkpoints directory
    resume: str = "auto"

    def __post_init__(self):
        _require(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        _require(self.interval_minutes >= 0, "checkpoint.interval_minutes", "must be >= 0")
        _require(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
        _positive(self, "checkpoint", "keep")
        _require(self.resume.strip() != "", "checkpoint.resume",
                 "must be auto, never or a checkpoint path")


# signals that must never be handled: they cannot be (KILL, STOP) or they mean a crash
_UNCATCHABLE = {"KILL", "STOP", "SEGV", "BUS", "FPE", "ILL", "ABRT", "CHLD"}


@dataclass
class PreemptionConfig:
    """Stopping early without losing work (framework/training/preemption.py): on one of
    ``signals`` or near the job's deadline, the trainer saves after its step and exits 3."""
    signals: List[str] = field(default_factory=lambda: ["USR1", "TERM"])
    deadline_margin_minutes: float = 3.0  # kept free before the deadline, beyond 2 steps + 1 save

    def __post_init__(self):
        import signal
        for name in self.signals:
            bare = name.upper().removeprefix("SIG")
            _require(hasattr(signal, f"SIG{bare}") and bare not in _UNCATCHABLE,
                     "preemption.signals", f"{name!r} is not a signal that can mean 'checkpoint "
                     f"and stop' (e.g. USR1, USR2, TERM, INT)")
        self.signals = [name.upper().removeprefix("SIG") for name in self.signals]
        _require(self.deadline_margin_minutes >= 0, "preemption.deadline_margin_minutes",
                 "must be >= 0")


@dataclass
class InitConfig:
    # `init.from` in recipes: a checkpoint or `llada export` whose weights start a fresh run
    from_: Optional[str] = None


@dataclass
class TrackingConfig:
    log_interval: int = 10  # steps between log lines and metric records
    metrics_file: bool = True  # <run.dir>/metrics.jsonl, one record per logged step
    progress_bar: bool = True  # on the rank that logs, when its output is a terminal
    enabled: bool = True  # MLflow (framework/tracking/), from the rank that holds the loss
    uri: Optional[str] = None  # None: an SQLite store <run.dir>/mlflow.db; or http(s)://host:port
    experiment: str = "llada"
    run_name: Optional[str] = None  # None: run.name
    send_interval_s: float = 1.0  # records collect this long into one request (log_batch)
    retry_interval_s: float = 30.0  # while the server is unreachable, how often to try again
    close_timeout_s: float = 120.0  # at the end, how long the last records may take to send
    system_metrics_interval_s: float = 10.0  # MLflow's system metrics of the node; 0: none

    def __post_init__(self):
        _positive(self, "tracking", "log_interval", "send_interval_s", "retry_interval_s",
                  "close_timeout_s")
        _require(self.system_metrics_interval_s >= 0, "tracking.system_metrics_interval_s",
                 f"must be >= 0 (0: off), got {self.system_metrics_interval_s}")
        _require(self.uri is None or bool(self.uri.strip()), "tracking.uri",
                 "must not be empty (unset it for the local store under run.dir)")
        _require(bool(self.experiment.strip()), "tracking.experiment", "must not be empty")


@dataclass
class EvalConfig:
    """Validation during training (framework/evaluation/): the LLaDA bound on ``sequences`` of each
    held-out set, ``t_samples`` stratified draws each, masks seeded by (``seed``, sequence)."""

    interval: int = 0  # steps between evaluations; 0: none by step count
    at_start: bool = False  # the weights a fresh run starts from (step 0)
    at_end: bool = True  # after the last step
    sequences: int = 256  # per set, spread evenly over it (all of a smaller set), read once
    t_samples: int = 8  # K: draws per sequence, one in each of K strata of the masked count
    micro_batch_size: Optional[int] = None  # masked copies per forward; None: train's
    seed: int = 0

    def __post_init__(self):
        _require(self.interval >= 0, "eval.interval", "must be >= 0")
        _positive(self, "eval", "sequences", "t_samples")
        _require(self.micro_batch_size is None or self.micro_batch_size > 0,
                 "eval.micro_batch_size", f"must be > 0 or null, got {self.micro_batch_size}")
        _require(self.seed >= 0, "eval.seed", f"must be >= 0, got {self.seed}")

    def due(self, step: int, last: bool) -> bool:
        """Whether the weights after ``step`` steps are evaluated (0: the start)."""
        if step == 0:
            return self.at_start
        return (self.interval > 0 and step % self.interval == 0) or (last and self.at_end)


@dataclass
class TrainConfig:
    steps: int = MISSING  # optimizer steps
    micro_batch_size: int = 8  # sequences per data-parallel rank per forward/backward
    global_batch_size: int = 8  # = micro x accumulation x data-parallel size
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_consecutive_nonfinite: int = 5  # a NaN/Inf loss skips the step; this many in a row diverge
    compile: bool = False  # torch.compile each Transformer layer
    # the head's projection fused with the loss (llada_kernels/linear_cross_entropy.py): the masked
    # positions' logits never held whole; off under ZeRO-3 (the weight is gathered by its module)
    fused_head: bool = True
    activation_checkpointing: bool = False  # recompute in backward: memory for a forward per layer
    checkpoint_layers: Optional[int] = None  # None: every layer; N: the first N of each stage
    # divergence (framework/training/divergence.py): stop (exit 1) | rollback (to the newest
    # checkpoint before it, the rate x rollback_lr_factor from there; README, Faults); with
    # rollback, spike_steps losses in a row above spike_factor x the recent median diverge too
    on_divergence: str = "stop"
    spike_factor: float = 3.0
    spike_steps: int = 3
    rollback_lr_factor: float = 0.25
    max_rollbacks: int = 3  # over the run
    # hang watchdog (framework/training/watchdog.py): null: 10 x the slowest step, >= 5 min; 0: off
    hang_timeout_minutes: Optional[float] = None
    hang_floor_minutes: float = 30.0  # for the first step of a start, validations and saves

    def __post_init__(self):
        if self.steps != MISSING:  # the schema itself is built with steps unset
            _positive(self, "train", "steps")
        _positive(self, "train", "micro_batch_size", "global_batch_size",
                  "max_consecutive_nonfinite")
        for key, ok, want in (
                ("on_divergence", self.on_divergence in ("stop", "rollback"), "stop or rollback"),
                ("spike_factor", self.spike_factor > 1, "> 1"),
                ("rollback_lr_factor", 0 < self.rollback_lr_factor <= 1, "in (0, 1]"),
                ("max_rollbacks", self.max_rollbacks >= 0, ">= 0"),
                ("hang_timeout_minutes", self.hang_timeout_minutes is None
                 or self.hang_timeout_minutes >= 0, ">= 0 (0: off) or null (automatic)")):
            _require(ok, f"train.{key}", f"must be {want}, got {getattr(self, key)!r}")
        _positive(self, "train", "spike_steps", "hang_floor_minutes")
        _require(self.precision in ("auto", "bf16", "fp32"), "train.precision",
                 f"must be one of auto, bf16, fp32; got {self.precision!r}")
        _require(self.checkpoint_layers is None or self.checkpoint_layers >= 0,
                 "train.checkpoint_layers", f"must be >= 0 or null, got {self.checkpoint_layers}")
        _require(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
                 f"{self.global_batch_size} is not a multiple of "
                 f"train.micro_batch_size={self.micro_batch_size}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    init: InitConfig = field(default_factory=InitConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _require(len(self.data.datasets) > 0, "data.datasets",
                 "at least one dataset (a manifest.json from llada prepare) is needed")
        _require(self.objective.mask_id is None or self.objective.mask_id < self.model.vocab_size,
                 "objective.mask_id",
                 f"{self.objective.mask_id} is outside the vocabulary "
                 f"(model.vocab_size={self.model.vocab_size})")
        # DeepSpeed's pipeline engine refuses ZeRO-2/3; without ZeRO its gradient clipping
        # counts the replicated weights (norm gains) of the first stage only
        _require(self.parallel.pp == 1 or self.deepspeed.zero_stage == 1, "deepspeed.zero_stage",
                 f"ZeRO-{self.deepspeed.zero_stage} cannot be combined with pipeline parallelism "
                 f"(parallel.pp={self.parallel.pp}); use deepspeed.zero_stage=1")
        check_model_split(self.model, self.parallel)
        ck, ev = self.checkpoint, self.eval
        _require(not ck.keep_best or bool(self.data.validation), "checkpoint.keep_best",
                 "needs a held-out set (data.validation)")
        # a checkpoint records the evaluation of its own step: both must fall on the same steps
        _require(not ck.keep_best or (ck.interval > 0 and ev.interval > 0
                                      and ck.interval % ev.interval == 0),
                 "checkpoint.keep_best", f"needs checkpoint.interval (={ck.interval}) to be a "
                 f"multiple of eval.interval (={ev.interval}), both > 0, so that checkpoints are "
                 "evaluated")
        _require(self.train.on_divergence != "rollback" or ck.interval > 0 or ck.interval_minutes
                 > 0, "train.on_divergence", "rollback needs checkpoints to roll back to: set "
                 "checkpoint.interval or checkpoint.interval_minutes")
        _require(not self.parallel.sequence_parallel or self.data.seq_len % self.parallel.tp == 0,
                 "parallel.sequence_parallel", f"data.seq_len={self.data.seq_len} is not a "
                 f"multiple of parallel.tp={self.parallel.tp}")


def check_model_split(model: ModelConfig, par: ParallelConfig) -> None:
    """The model's sizes against tensor and pipeline parallelism (no world size needed)."""
    tp, pp = par.tp, par.pp
    _require(model.num_attention_heads % tp == 0, "parallel.tp",
             f"{tp} does not divide model.num_attention_heads={model.num_attention_heads}")
    _require(model.num_kv_heads % tp == 0 or tp % model.num_kv_heads == 0, "parallel.tp",
             f"{tp} and model.num_kv_heads={model.num_kv_heads} must divide one another")
    _require(model.ffn_hidden_size % tp == 0, "parallel.tp",
             f"{tp} does not divide model.ffn_hidden_size={model.ffn_hidden_size}")
    # the padded vocabulary must not depend on tp: a run keeps its shapes under any layout
    _require(model.pad_vocab_to_multiple_of % tp == 0, "model.pad_vocab_to_multiple_of",
             f"{model.pad_vocab_to_multiple_of} is not a multiple of parallel.tp={tp}")
    _require(model.num_layers >= pp, "parallel.pp",
             f"{pp} stages for model.num_layers={model.num_layers}")
    _require(not par.pp_layers or sum(par.pp_layers) == model.num_layers, "parallel.pp_layers",
             f"{list(par.pp_layers)} sums to {sum(par.pp_layers)}, "
             f"not model.num_layers={model.num_layers}")


def data_parallel_size(par: ParallelConfig, world_size: int) -> int:
    model_parallel = par.tp * par.pp
    _require(world_size % model_parallel == 0, "parallel.tp",
             f"tp x pp = {par.tp} x {par.pp} = {model_parallel} does not divide the world size "
             f"{world_size}")
    return world_size // model_parallel


def check_world(train: TrainConfig, par: ParallelConfig, world_size: int) -> int:
    """The layout against a world size; returns the data-parallel size."""
    dp = data_parallel_size(par, world_size)
    _require(train.global_batch_size % (train.micro_batch_size * dp) == 0,
             "train.global_batch_size",
             f"{train.global_batch_size} is not a multiple of train.micro_batch_size x "
             f"data-parallel size = {train.micro_batch_size} x {dp}")
    return dp
